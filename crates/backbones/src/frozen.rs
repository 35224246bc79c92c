//! Networks that read the same weights without ever receiving gradients.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::is_buffer;

/// A `VarBuilder` backend over an existing `VarMap` that hands out detached
/// views of its parameters: they share storage with the variables, so they
/// always see the current weights, but a backward pass through a network
/// built from them computes no weight gradients. BatchNorm buffers are handed
/// out as the variables themselves, so a train-mode forward still updates them.
///
/// Used for PuzzleMix's saliency pass (only the input gradient is needed) and
/// AutoMix's momentum encoder (updated by EMA, never by gradients).
pub struct DetachedVarMap {
    vm: VarMap,
}

impl DetachedVarMap {
    /// Wraps a VarMap (cheap: VarMaps share their contents when cloned).
    pub fn new(vm: VarMap) -> Self {
        Self { vm }
    }

    /// A `VarBuilder` reading detached views of the VarMap's variables.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl SimpleBackend for DetachedVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.vm.get(s, name, h, dtype, dev)?;
        Ok(if is_buffer(name) { t } else { t.detach() })
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.vm.get_unchecked(name, dtype, dev)?;
        Ok(if is_buffer(name) { t } else { t.detach() })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vm.contains_tensor(name)
    }
}
