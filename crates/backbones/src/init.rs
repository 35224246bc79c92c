//! Weight initialization (spec §2.6) and the bookkeeping that makes it
//! reproducible from a seed.
//!
//! While a network is built, every tensor it asks its `VarBuilder` for is
//! recorded in a [`ParamRegistry`] together with its role ([`ParamKind`]). The
//! `VarBuilder` gets a matching candle init hint, so a fresh `VarMap` already
//! follows the scheme; [`ParamRegistry::init_weights`] then overwrites every
//! recorded variable with values drawn from a `ChaCha8Rng`, because candle's
//! own initializers draw from a generator that cannot be seeded per run.

use candle_core::{Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// Which initialization recipe to follow (spec §2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum InitScheme {
    /// Benchmark-era / AutoMix: conv Kaiming-normal (fan-out, ReLU), BN 1/0,
    /// zero-init residual (last BN of each residual branch has weight 0),
    /// classifier `N(0, 0.01²)` with bias 0.
    #[default]
    Benchmark,
    /// PyTorch module defaults: conv and linear Kaiming-uniform with `a = √5`
    /// (bound `1/√fan_in`), linear bias `U(±1/√fan_in)`, BN 1/0, no zero-init residual.
    PytorchDefault,
}

/// The role of one variable, which decides how it is initialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Convolution kernel; `fan_in = in/groups·k·k`, `fan_out = out·k·k` (not divided by groups).
    ConvWeight {
        /// Inputs feeding one output unit.
        fan_in: usize,
        /// PyTorch's fan-out: `out_channels·k·k`.
        fan_out: usize,
    },
    /// BatchNorm scale; `zero_init` marks the last BN of a residual branch.
    BnWeight {
        /// Whether the benchmark scheme sets this scale to 0.
        zero_init: bool,
    },
    /// BatchNorm shift.
    BnBias,
    /// BatchNorm running mean (a buffer).
    RunningMean,
    /// BatchNorm running variance (a buffer).
    RunningVar,
    /// Classifier weight (`out × in`).
    LinearWeight {
        /// Input features.
        fan_in: usize,
    },
    /// Classifier bias.
    LinearBias {
        /// Input features of the layer.
        fan_in: usize,
    },
}

impl ParamKind {
    /// Whether the variable is a buffer (running statistic) rather than a trained parameter.
    pub fn is_buffer(self) -> bool {
        matches!(self, ParamKind::RunningMean | ParamKind::RunningVar)
    }
}

/// How one variable's initial values are distributed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dist {
    Const(f64),
    Normal(f64),
    Uniform(f64),
}

fn dist(scheme: InitScheme, kind: ParamKind) -> Dist {
    use ParamKind::*;
    match (scheme, kind) {
        (InitScheme::Benchmark, ConvWeight { fan_out, .. }) => {
            Dist::Normal((2.0 / fan_out as f64).sqrt())
        }
        (InitScheme::PytorchDefault, ConvWeight { fan_in, .. }) => {
            Dist::Uniform(1.0 / (fan_in as f64).sqrt())
        }
        (InitScheme::Benchmark, BnWeight { zero_init: true }) => Dist::Const(0.0),
        (_, BnWeight { .. }) => Dist::Const(1.0),
        (_, BnBias) | (_, RunningMean) => Dist::Const(0.0),
        (_, RunningVar) => Dist::Const(1.0),
        (InitScheme::Benchmark, LinearWeight { .. }) => Dist::Normal(0.01),
        (InitScheme::Benchmark, LinearBias { .. }) => Dist::Const(0.0),
        (InitScheme::PytorchDefault, LinearWeight { fan_in })
        | (InitScheme::PytorchDefault, LinearBias { fan_in }) => {
            Dist::Uniform(1.0 / (fan_in as f64).sqrt())
        }
    }
}

fn hint(d: Dist) -> Init {
    match d {
        Dist::Const(v) => Init::Const(v),
        Dist::Normal(stdev) => Init::Randn { mean: 0.0, stdev },
        Dist::Uniform(b) => Init::Uniform { lo: -b, up: b },
    }
}

/// One recorded variable: its full `VarMap` name, shape and role.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// Full variable name (`VarBuilder` prefix included), e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// Shape.
    pub shape: Shape,
    /// Role.
    pub kind: ParamKind,
}

/// The variables of one network, in construction order, and the scheme they follow.
#[derive(Debug, Clone)]
pub struct ParamRegistry {
    scheme: InitScheme,
    specs: Vec<ParamSpec>,
}

/// Joins a `VarBuilder` prefix and a local name the way candle does.
pub(crate) fn full_name(vb: &VarBuilder, name: &str) -> String {
    let prefix = vb.prefix();
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

impl ParamRegistry {
    /// An empty registry for networks initialized with `scheme`.
    pub fn new(scheme: InitScheme) -> Self {
        Self {
            scheme,
            specs: Vec::new(),
        }
    }

    /// The scheme used for init hints and [`Self::init_weights`].
    pub fn scheme(&self) -> InitScheme {
        self.scheme
    }

    /// All recorded variables, in construction order.
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Fetches `<prefix>.name` from `vb` with the scheme's init hint and records it.
    pub fn get<S: Into<Shape>>(
        &mut self,
        vb: &VarBuilder,
        shape: S,
        name: &str,
        kind: ParamKind,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let t = vb.get_with_hints(shape.clone(), name, hint(dist(self.scheme, kind)))?;
        self.specs.push(ParamSpec {
            name: full_name(vb, name),
            shape,
            kind,
        });
        Ok(t)
    }

    /// Overwrites every recorded variable in `varmap` with fresh values drawn
    /// from `ChaCha8Rng::seed_from_u64(seed)`, in construction order (running
    /// statistics are reset to 0/1). Same seed and architecture → same weights.
    pub fn init_weights(&self, varmap: &VarMap, seed: u64) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let vars = varmap.data().lock().unwrap();
        for spec in &self.specs {
            let var = vars.get(&spec.name).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "init_weights: variable `{}` is not in the VarMap (was the network built from it?)",
                    spec.name
                ))
            })?;
            if var.shape() != &spec.shape {
                candle_core::bail!(
                    "init_weights: variable `{}` has shape {:?}, the network expects {:?}",
                    spec.name,
                    var.shape(),
                    spec.shape
                );
            }
            let n = spec.shape.elem_count();
            let values = draw(dist(self.scheme, spec.kind), n, &mut rng)?;
            let t = Tensor::from_vec(values, spec.shape.clone(), var.device())?
                .to_dtype(var.dtype())?;
            var.set(&t)?;
        }
        Ok(())
    }
}

fn draw(d: Dist, n: usize, rng: &mut ChaCha8Rng) -> Result<Vec<f32>> {
    Ok(match d {
        Dist::Const(v) => vec![v as f32; n],
        Dist::Normal(std) => {
            let normal = Normal::new(0.0f64, std)
                .map_err(|e| candle_core::Error::Msg(format!("normal init: {e}")))?;
            (0..n).map(|_| normal.sample(rng) as f32).collect()
        }
        Dist::Uniform(b) => (0..n).map(|_| rng.random_range(-b..b) as f32).collect(),
    })
}
