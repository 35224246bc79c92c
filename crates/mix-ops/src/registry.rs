//! Building a [`MixMethod`] from its config name, α and `mix_args` (spec §4.1, §5.0),
//! and the README α table (§5.14).
//!
//! `"automix"` / `"samix"` are not mixing functions but a separate model
//! (spec §5.12–5.13), built by the `automix` crate; they are not listed in
//! [`MIX_MODES`] and [`build_method`] rejects them with a pointer there.

use std::fmt;

use crate::attentivemix::AttentiveMix;
use crate::cutmix::CutMix;
use crate::fmix::FMix;
use crate::gridmix::GridMix;
use crate::manifoldmix::ManifoldMix;
use crate::mixup::MixUp;
use crate::puzzlemix::PuzzleMix;
use crate::resizemix::ResizeMix;
use crate::saliencymix::SaliencyMix;
use crate::smoothmix::SmoothMix;
use crate::vanilla::Vanilla;
use crate::MixMethod;

/// Every `mix_mode` name this crate can build.
pub const MIX_MODES: &[&str] = &[
    "vanilla",
    "mixup",
    "cutmix",
    "manifoldmix",
    "smoothmix",
    "saliencymix",
    "attentivemix",
    "fmix",
    "puzzlemix",
    "gridmix",
    "resizemix",
];

/// A configuration that cannot be turned into a mixing method.
#[derive(Debug, Clone, PartialEq)]
pub enum MixConfigError {
    /// The `mix_mode` name is not known.
    UnknownMode(String),
    /// A name that is valid but built elsewhere (AutoMix/SAMix).
    NotAMixFunction(String),
    /// A listed mode whose implementation is missing from [`build_method`].
    Unregistered(String),
    /// α is not a positive finite number.
    BadAlpha {
        /// The mode.
        mode: String,
        /// The offending α.
        alpha: f64,
    },
    /// `mix_args` do not parse or fail validation.
    BadArgs {
        /// The mode.
        mode: String,
        /// What is wrong, naming the field.
        message: String,
    },
}

impl fmt::Display for MixConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownMode(name) => write!(
                f,
                "unknown mix_mode `{name}`; known: {} (automix/samix are separate models)",
                MIX_MODES.join(", ")
            ),
            Self::NotAMixFunction(name) => write!(
                f,
                "mix_mode `{name}` is not a mixing function: AutoMix/SAMix are built by the automix crate"
            ),
            Self::Unregistered(name) => write!(
                f,
                "mix_mode `{name}` is listed in MIX_MODES but not registered in build_method"
            ),
            Self::BadAlpha { mode, alpha } => {
                write!(f, "mix_mode `{mode}`: alpha must be a finite number > 0, got {alpha}")
            }
            Self::BadArgs { mode, message } => {
                write!(f, "invalid mix_args for mix_mode `{mode}`: {message}")
            }
        }
    }
}

impl std::error::Error for MixConfigError {}

pub use crate::args::{MixArgs, NoArgs};

/// Parses and validates `mix_args` for `mode`; `None` or JSON `null` gives the defaults.
pub fn parse_args<A: MixArgs>(
    mode: &str,
    mix_args: Option<&serde_json::Value>,
) -> Result<A, MixConfigError> {
    crate::args::parse_mix_args(mix_args).map_err(|message| MixConfigError::BadArgs {
        mode: mode.to_string(),
        message,
    })
}

fn check_alpha(mode: &str, alpha: f64) -> Result<f64, MixConfigError> {
    if alpha.is_finite() && alpha > 0.0 {
        Ok(alpha)
    } else {
        Err(MixConfigError::BadAlpha {
            mode: mode.to_string(),
            alpha,
        })
    }
}

/// Builds the method `name` with Beta parameter `alpha` and optional `mix_args`
/// (a JSON object; missing fields take the CIFAR-10 config values of spec §5.0).
/// α is ignored (and not checked) for `vanilla`.
pub fn build_method(
    name: &str,
    alpha: f64,
    mix_args: Option<&serde_json::Value>,
) -> Result<Box<dyn MixMethod>, MixConfigError> {
    if name == "vanilla" {
        parse_args::<NoArgs>(name, mix_args)?;
        return Ok(Box::new(Vanilla));
    }
    if name == "automix" || name == "samix" {
        return Err(MixConfigError::NotAMixFunction(name.to_string()));
    }
    if !MIX_MODES.contains(&name) {
        return Err(MixConfigError::UnknownMode(name.to_string()));
    }
    let alpha = check_alpha(name, alpha)?;
    Ok(match name {
        "mixup" => {
            parse_args::<NoArgs>(name, mix_args)?;
            Box::new(MixUp { alpha })
        }
        "cutmix" => Box::new(CutMix {
            alpha,
            args: parse_args(name, mix_args)?,
        }),
        "manifoldmix" => Box::new(ManifoldMix {
            alpha,
            args: parse_args(name, mix_args)?,
        }),
        "smoothmix" => Box::new(SmoothMix {
            alpha,
            args: parse_args(name, mix_args)?,
        }),
        "saliencymix" => Box::new(SaliencyMix {
            alpha,
            args: parse_args(name, mix_args)?,
        }),
        "fmix" => Box::new(FMix {
            alpha,
            args: parse_args(name, mix_args)?,
        }),
        "gridmix" => Box::new(GridMix {
            alpha,
            args: parse_args(name, mix_args)?,
        }),
        "resizemix" => Box::new(ResizeMix {
            alpha,
            args: parse_args(name, mix_args)?,
        }),
        "attentivemix" => Box::new(AttentiveMix {
            alpha,
            args: parse_args(name, mix_args)?,
        }),
        "puzzlemix" => Box::new(PuzzleMix {
            alpha,
            args: parse_args(name, mix_args)?,
        }),
        // Modules that own other MIX_MODES entries add their arms above.
        _ => return Err(MixConfigError::Unregistered(name.to_string())),
    })
}

/// The README α of `mode` for backbone `"r18"` or `"rx50"` (spec §5.14), including
/// AutoMix/SAMix (α = 2, built by the automix crate). `None` for `vanilla` (no α),
/// unknown modes and unknown backbones.
pub fn default_alpha(mode: &str, backbone: &str) -> Option<f64> {
    let (r18, rx50) = match mode {
        "mixup" | "puzzlemix" | "resizemix" => (1.0, 1.0),
        "cutmix" | "saliencymix" | "fmix" | "gridmix" => (0.2, 0.2),
        "manifoldmix" | "attentivemix" | "automix" | "samix" => (2.0, 2.0),
        "smoothmix" => (0.5, 0.2),
        _ => return None,
    };
    match backbone {
        "r18" => Some(r18),
        "rx50" => Some(rx50),
        _ => None,
    }
}
