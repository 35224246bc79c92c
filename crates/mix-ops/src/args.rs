//! The `mix_args` contract every method's argument struct follows. It lives
//! apart from the registry so that method files depend on it alone, and the
//! registry (which imports every method) is imported by none of them.

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// A method's `mix_args` struct: parsed with serde (`default`,
/// `deny_unknown_fields`), then checked by [`MixArgs::validate`].
pub trait MixArgs: DeserializeOwned + Default {
    /// Checks value ranges; the message names the offending field.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// `mix_args` of methods that take none: only `{}` (or nothing) is accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NoArgs {}

impl MixArgs for NoArgs {}

/// Parses and validates `mix_args`; `None` or JSON `null` gives the defaults.
/// The error message names the offending field.
pub fn parse_mix_args<A: MixArgs>(mix_args: Option<&serde_json::Value>) -> Result<A, String> {
    let args = match mix_args {
        None | Some(serde_json::Value::Null) => A::default(),
        Some(value) => A::deserialize(value).map_err(|e| e.to_string())?,
    };
    args.validate()?;
    Ok(args)
}
