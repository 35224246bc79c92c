//! Variable creation and deterministic initialisation on a shared [`VarMap`].

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{Init, VarMap};
use rand::RngCore;
use rand_distr::{Distribution, Normal};

/// Creates (or fetches, if it exists with the same shape) the f32 variable `name` in `vm`,
/// zero-initialised, and returns the shared [`Var`].
pub(crate) fn var<S: Into<Shape>>(vm: &VarMap, name: &str, shape: S, dev: &Device) -> Result<Var> {
    vm.get(shape, name, Init::Const(0.0), DType::F32, dev)?;
    let data = vm.data().lock().expect("VarMap mutex poisoned");
    data.get(name)
        .cloned()
        .ok_or_else(|| candle_core::Error::Msg(format!("variable `{name}` missing after creation")))
}

/// Overwrites `v` with `N(0, std²)` draws from `rng` (host-side, so a seed fixes the result on
/// every device).
pub(crate) fn fill_normal(v: &Var, std: f64, rng: &mut dyn RngCore) -> Result<()> {
    let normal = Normal::new(0.0f64, std).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let n = v.elem_count();
    let data: Vec<f32> = (0..n).map(|_| normal.sample(rng) as f32).collect();
    let t = Tensor::from_vec(data, v.shape(), v.device())?;
    v.set(&t)
}

/// Overwrites `v` with the constant `value`.
pub(crate) fn fill_const(v: &Var, value: f64) -> Result<()> {
    let t = (Tensor::ones(v.shape(), DType::F32, v.device())? * value)?;
    v.set(&t)
}

/// Softmax over the last axis with the max-shift detached (same value, cleaner graph).
pub(crate) fn softmax_last(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(candle_core::D::Minus1)?.detach();
    let num = xs.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(candle_core::D::Minus1)?;
    num.broadcast_div(&den)
}
