//! SGD with momentum and weight decay, PyTorch semantics (spec §3.1), with parameter groups.
//!
//! For every parameter `θ` that has a gradient in the step:
//! `g ← grad + wd·θ`; `buf ← μ·buf + g` (on its first step `buf = g`); then
//! `θ ← θ − lr·buf`, or with Nesterov `θ ← θ − lr·(g + μ·buf)`. Dampening is 0 (the reference
//! never sets it). A parameter without a gradient is skipped entirely: neither it nor its
//! momentum buffer changes.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{TrainError, TrainResult};

/// The learning rate of a parameter group relative to the scheduled one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GroupLr {
    /// `scale × scheduled lr` (1.0 follows the schedule).
    Scale(f64),
    /// A constant learning rate, independent of the schedule.
    Fixed(f64),
}

/// Hyper-parameters of one parameter group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupOptions {
    /// How the group's learning rate relates to the scheduled one.
    pub lr: GroupLr,
    /// L2 weight decay added to the gradient (`g ← grad + wd·θ`).
    pub weight_decay: f64,
    /// Momentum `μ`; 0 disables the buffer.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl GroupOptions {
    /// The reference recipe: scheduled lr, momentum 0.9, weight decay 1e-4, no Nesterov.
    pub fn reference() -> Self {
        Self {
            lr: GroupLr::Scale(1.0),
            weight_decay: 1e-4,
            momentum: 0.9,
            nesterov: false,
        }
    }
}

struct Param {
    name: String,
    var: Var,
    momentum_buffer: Option<Tensor>,
}

struct ParamGroup {
    options: GroupOptions,
    params: Vec<Param>,
}

/// Stochastic gradient descent with momentum and weight decay over named variables.
pub struct Sgd {
    groups: Vec<ParamGroup>,
    step_count: u64,
}

/// Key of the step counter in [`Sgd::state_tensors`].
pub const STEP_KEY: &str = "step";
/// Prefix of momentum-buffer keys in [`Sgd::state_tensors`] (`buf.<var name>`).
pub const BUFFER_PREFIX: &str = "buf.";

impl Sgd {
    /// An optimizer with one group holding `vars` (names must be unique).
    pub fn new(vars: Vec<(String, Var)>, options: GroupOptions) -> TrainResult<Self> {
        let mut sgd = Self {
            groups: Vec::new(),
            step_count: 0,
        };
        sgd.add_group(vars, options)?;
        Ok(sgd)
    }

    /// Adds a parameter group with its own options; a name already in the optimizer is an error.
    pub fn add_group(
        &mut self,
        vars: Vec<(String, Var)>,
        options: GroupOptions,
    ) -> TrainResult<()> {
        validate_options(&options)?;
        let mut seen: HashSet<&str> = self
            .groups
            .iter()
            .flat_map(|g| g.params.iter().map(|p| p.name.as_str()))
            .collect();
        for (name, _) in &vars {
            if !seen.insert(name.as_str()) {
                return Err(TrainError::key(
                    "<optimizer>",
                    name.clone(),
                    "variable added to the optimizer twice",
                ));
            }
        }
        let params = vars
            .into_iter()
            .map(|(name, var)| Param {
                name,
                var,
                momentum_buffer: None,
            })
            .collect();
        self.groups.push(ParamGroup { options, params });
        Ok(())
    }

    /// Number of steps taken (restored by [`Sgd::load_state`]).
    pub fn step_count(&self) -> u64 {
        self.step_count
    }

    /// Names of all optimized variables, group by group.
    pub fn var_names(&self) -> Vec<&str> {
        self.groups
            .iter()
            .flat_map(|g| g.params.iter().map(|p| p.name.as_str()))
            .collect()
    }

    /// Applies one update with the scheduled learning rate `lr` (groups scale or replace it).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> candle_core::Result<()> {
        // Momentum buffers first (a parameter's first step creates its buffer), then every
        // update in one kernels::sgd_update_multi call: one multi-tensor launch on CUDA, one
        // pass on the CPU, each parameter bit-identical to the generic-op formula in the module
        // docs.
        let mut firsts = Vec::new();
        for group in &mut self.groups {
            for param in &mut group.params {
                let has_grad = grads.get(param.var.as_tensor()).is_some();
                let first = param.momentum_buffer.is_none();
                firsts.push(first);
                if has_grad && first && group.options.momentum != 0.0 {
                    param.momentum_buffer = Some(param.var.as_tensor().zeros_like()?);
                }
            }
        }
        let mut updates = Vec::new();
        let mut firsts = firsts.into_iter();
        for group in &self.groups {
            let options = group.options;
            let group_lr = match options.lr {
                GroupLr::Scale(s) => s * lr,
                GroupLr::Fixed(f) => f,
            };
            for param in &group.params {
                let first = firsts.next().unwrap_or(false);
                let Some(grad) = grads.get(param.var.as_tensor()) else {
                    continue;
                };
                let buf = if options.momentum != 0.0 {
                    param.momentum_buffer.as_ref()
                } else {
                    None
                };
                updates.push(kernels::SgdParam {
                    theta: param.var.as_tensor(),
                    grad,
                    buf,
                    step: kernels::SgdStep {
                        lr: group_lr,
                        weight_decay: options.weight_decay,
                        momentum: options.momentum,
                        nesterov: options.nesterov,
                        first,
                    },
                });
            }
        }
        kernels::sgd_update_multi(&updates)?;
        self.step_count += 1;
        Ok(())
    }

    /// The optimizer state: `buf.<var name>` for every existing momentum buffer and `step`
    /// (a 0-dim `i64` tensor on the CPU). Variables that never had a gradient have no buffer.
    /// The buffers are copies: the optimizer updates its own in place.
    pub fn state_tensors(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut state = HashMap::new();
        for param in self.groups.iter().flat_map(|g| g.params.iter()) {
            if let Some(buf) = &param.momentum_buffer {
                state.insert(format!("{BUFFER_PREFIX}{}", param.name), buf.copy()?);
            }
        }
        let step = Tensor::new(self.step_count as i64, &candle_core::Device::Cpu)?;
        state.insert(STEP_KEY.to_string(), step);
        Ok(state)
    }

    /// Restores a state written by [`Sgd::state_tensors`]; `source` names the file for errors.
    ///
    /// Strict: a buffer for an unknown variable, a buffer whose shape or dtype differs from its
    /// variable, or a missing `step` is an error. Variables absent from the state get no buffer
    /// (they had never received a gradient when the state was saved). Buffers are moved to
    /// their variable's device.
    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        source: &Path,
    ) -> TrainResult<()> {
        let step = state
            .get(STEP_KEY)
            .ok_or_else(|| TrainError::key(source, STEP_KEY, "missing optimizer step count"))?;
        let step = step.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
        let [step] = step[..] else {
            return Err(TrainError::key(source, STEP_KEY, "expected a single value"));
        };
        let step = u64::try_from(step).map_err(|_| {
            TrainError::key(source, STEP_KEY, format!("negative step count {step}"))
        })?;
        let mut buffers: HashMap<&str, &Tensor> = HashMap::new();
        for (key, tensor) in state {
            if key == STEP_KEY {
                continue;
            }
            let Some(name) = key.strip_prefix(BUFFER_PREFIX) else {
                return Err(TrainError::key(
                    source,
                    key.clone(),
                    "unexpected optimizer state entry",
                ));
            };
            buffers.insert(name, tensor);
        }
        let mut restored = Vec::new();
        for param in self.groups.iter().flat_map(|g| g.params.iter()) {
            let Some(buf) = buffers.remove(param.name.as_str()) else {
                restored.push(None);
                continue;
            };
            let key = format!("{BUFFER_PREFIX}{}", param.name);
            let var = param.var.as_tensor();
            if buf.dims() != var.dims() {
                return Err(TrainError::key(
                    source,
                    key,
                    format!(
                        "momentum buffer shape {:?} != variable shape {:?}",
                        buf.dims(),
                        var.dims()
                    ),
                ));
            }
            if buf.dtype() != var.dtype() {
                return Err(TrainError::key(
                    source,
                    key,
                    format!(
                        "momentum buffer dtype {:?} != variable dtype {:?}",
                        buf.dtype(),
                        var.dtype()
                    ),
                ));
            }
            // A private copy: buffers are updated in place, and `state` may share storage.
            restored.push(Some(buf.to_device(var.device())?.copy()?));
        }
        if let Some(name) = buffers.keys().min() {
            return Err(TrainError::key(
                source,
                format!("{BUFFER_PREFIX}{name}"),
                "momentum buffer for a variable the optimizer does not hold",
            ));
        }
        for (param, buf) in self
            .groups
            .iter_mut()
            .flat_map(|g| g.params.iter_mut())
            .zip(restored)
        {
            param.momentum_buffer = buf;
        }
        self.step_count = step;
        Ok(())
    }
}

/// The variables of `varmap` that the optimizer should update: every variable whose name
/// `is_buffer` rejects (pass `backbones::is_buffer` to drop BatchNorm running statistics),
/// sorted by name so that group order is deterministic.
pub fn trainable_vars(
    varmap: &candle_nn::VarMap,
    is_buffer: impl Fn(&str) -> bool,
) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut vars: Vec<(String, Var)> = data
        .iter()
        .filter(|(name, _)| !is_buffer(name))
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

fn validate_options(options: &GroupOptions) -> TrainResult<()> {
    let bad = |msg: String| Err(TrainError::format("<optimizer options>", msg));
    if !(options.momentum >= 0.0 && options.momentum.is_finite()) {
        return bad(format!(
            "momentum must be finite and >= 0, got {}",
            options.momentum
        ));
    }
    if !(options.weight_decay >= 0.0 && options.weight_decay.is_finite()) {
        return bad(format!(
            "weight decay must be finite and >= 0, got {}",
            options.weight_decay
        ));
    }
    if options.nesterov && options.momentum == 0.0 {
        return bad("Nesterov momentum requires momentum > 0".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Gradients equal to the given values: the gradient of `Σ_v Σ var·values` w.r.t. each var.
    fn grads_of(pairs: &[(&Var, &[f32])]) -> GradStore {
        let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
        for (var, values) in pairs {
            let g = Tensor::new(*values, &Device::Cpu).unwrap();
            loss = (loss + (var.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
        }
        loss.backward().unwrap()
    }

    fn vec(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Hand-unrolled PyTorch SGD for one scalar-per-element parameter.
    fn reference_steps(
        theta0: &[f32],
        grads: &[Vec<f32>],
        lr: &[f64],
        wd: f64,
        mu: f64,
        nesterov: bool,
    ) -> Vec<f32> {
        let mut theta: Vec<f64> = theta0.iter().map(|&x| x as f64).collect();
        let mut buf: Option<Vec<f64>> = None;
        for (step, grad) in grads.iter().enumerate() {
            let g: Vec<f64> = grad
                .iter()
                .zip(&theta)
                .map(|(&gr, &th)| gr as f64 + wd * th)
                .collect();
            let b: Vec<f64> = match &buf {
                None => g.clone(),
                Some(b) => b.iter().zip(&g).map(|(b, g)| mu * b + g).collect(),
            };
            for i in 0..theta.len() {
                let d = if nesterov { g[i] + mu * b[i] } else { b[i] };
                theta[i] -= lr[step] * d;
            }
            buf = Some(b);
        }
        theta.iter().map(|&x| x as f32).collect()
    }

    #[test]
    fn three_steps_match_the_pytorch_formula_and_skip_vars_without_grad() {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32, -2.0, 0.5], &dev).unwrap();
        let b = Var::new(&[0.3f32], &dev).unwrap();
        let frozen = Var::new(&[4.0f32, 5.0], &dev).unwrap();
        let mut sgd = Sgd::new(
            vec![
                ("w".into(), w.clone()),
                ("b".into(), b.clone()),
                ("frozen".into(), frozen.clone()),
            ],
            GroupOptions::reference(),
        )
        .unwrap();
        let lrs = [0.1, 0.05, 0.02];
        let w_grads = [
            vec![0.5f32, -1.0, 2.0],
            vec![0.1, 0.2, -0.3],
            vec![-1.0, 0.0, 1.0],
        ];
        let b_grads = [vec![1.0f32], vec![-2.0], vec![0.25]];
        for step in 0..3 {
            let grads = grads_of(&[(&w, &w_grads[step]), (&b, &b_grads[step])]);
            assert!(grads.get(frozen.as_tensor()).is_none());
            sgd.step(&grads, lrs[step]).unwrap();
        }
        let want_w = reference_steps(&[1.0, -2.0, 0.5], &w_grads, &lrs, 1e-4, 0.9, false);
        let want_b = reference_steps(&[0.3], &b_grads, &lrs, 1e-4, 0.9, false);
        for (got, want) in vec(w.as_tensor())
            .iter()
            .zip(&want_w)
            .chain(vec(b.as_tensor()).iter().zip(&want_b))
        {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_eq!(vec(frozen.as_tensor()), vec![4.0, 5.0]);
        assert_eq!(sgd.step_count(), 3);
        let state = sgd.state_tensors().unwrap();
        assert!(state.contains_key("buf.w") && state.contains_key("buf.b"));
        assert!(!state.contains_key("buf.frozen"), "no gradient, no buffer");

        // A fourth step in which only `b` has a gradient leaves `w` and its buffer alone.
        let w_before = vec(w.as_tensor());
        sgd.step(&grads_of(&[(&b, &[1.0])]), 0.1).unwrap();
        assert_eq!(vec(w.as_tensor()), w_before);
        assert_eq!(
            vec(&sgd.state_tensors().unwrap()["buf.w"]),
            vec(&state["buf.w"])
        );
    }

    #[test]
    fn trainable_vars_drop_buffers_in_name_order() {
        let varmap = candle_nn::VarMap::new();
        for name in [
            "bn.weight",
            "bn.running_mean",
            "conv.weight",
            "bn.running_var",
        ] {
            varmap
                .get(
                    2,
                    name,
                    candle_nn::Init::Const(0.0),
                    DType::F32,
                    &Device::Cpu,
                )
                .unwrap();
        }
        let names: Vec<String> = trainable_vars(&varmap, |n| {
            n.ends_with("running_mean") || n.ends_with("running_var")
        })
        .into_iter()
        .map(|(n, _)| n)
        .collect();
        assert_eq!(names, vec!["bn.weight", "conv.weight"]);
    }

    #[test]
    fn nesterov_groups_and_fixed_lr_follow_their_options() {
        let dev = Device::Cpu;
        let a = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let m = Var::new(&[-1.0f32], &dev).unwrap();
        let mut sgd = Sgd::new(
            vec![("a".into(), a.clone())],
            GroupOptions {
                lr: GroupLr::Scale(1.0),
                weight_decay: 0.01,
                momentum: 0.5,
                nesterov: true,
            },
        )
        .unwrap();
        sgd.add_group(
            vec![("mixblock.w".into(), m.clone())],
            GroupOptions {
                lr: GroupLr::Fixed(0.2),
                weight_decay: 0.0,
                momentum: 0.0,
                nesterov: false,
            },
        )
        .unwrap();
        let a_grads = [vec![1.0f32, -1.0], vec![0.5, 0.5], vec![2.0, 0.0]];
        let lrs = [0.1, 0.3, 0.05];
        for step in 0..3 {
            let grads = grads_of(&[(&a, &a_grads[step]), (&m, &[1.0])]);
            sgd.step(&grads, lrs[step]).unwrap();
        }
        let want_a = reference_steps(&[1.0, 2.0], &a_grads, &lrs, 0.01, 0.5, true);
        for (got, want) in vec(a.as_tensor()).iter().zip(&want_a) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        // Plain SGD at a fixed lr 0.2, three unit gradients: −1 − 0.6.
        assert!((vec(m.as_tensor())[0] + 1.6).abs() < 1e-6);
        assert!(!sgd.state_tensors().unwrap().contains_key("buf.mixblock.w"));
        assert!(sgd
            .add_group(vec![("a".into(), m.clone())], GroupOptions::reference())
            .is_err());
    }

    #[test]
    fn state_round_trip_continues_identically_and_rejects_bad_entries() {
        let dev = Device::Cpu;
        let make = || {
            let w = Var::new(&[1.0f32, -2.0], &dev).unwrap();
            let sgd = Sgd::new(vec![("w".into(), w.clone())], GroupOptions::reference()).unwrap();
            (w, sgd)
        };
        let grad = |w: &Var, g: [f32; 2]| grads_of(&[(w, &g)]);
        let (w1, mut sgd1) = make();
        sgd1.step(&grad(&w1, [0.5, 1.0]), 0.1).unwrap();
        let state = sgd1.state_tensors().unwrap();

        let (w2, mut sgd2) = make();
        w2.set(w1.as_tensor()).unwrap();
        sgd2.load_state(&state, Path::new("ck.safetensors"))
            .unwrap();
        assert_eq!(sgd2.step_count(), 1);
        sgd1.step(&grad(&w1, [-1.0, 2.0]), 0.1).unwrap();
        sgd2.step(&grad(&w2, [-1.0, 2.0]), 0.1).unwrap();
        assert_eq!(vec(w1.as_tensor()), vec(w2.as_tensor()));

        let mut unknown = state.clone();
        unknown.insert(
            "buf.nope".into(),
            Tensor::zeros(2, DType::F32, &dev).unwrap(),
        );
        let err = sgd2
            .load_state(&unknown, Path::new("ck.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("buf.nope") && err.contains("ck.safetensors"),
            "{err}"
        );
        let mut wrong_shape = state.clone();
        wrong_shape.insert("buf.w".into(), Tensor::zeros(3, DType::F32, &dev).unwrap());
        let err = sgd2
            .load_state(&wrong_shape, Path::new("ck.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("buf.w") && err.contains("shape"), "{err}");
        let mut no_step = state;
        no_step.remove(STEP_KEY);
        let err = sgd2
            .load_state(&no_step, Path::new("ck.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("step"), "{err}");
    }
}
