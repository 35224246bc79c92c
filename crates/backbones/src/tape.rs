//! The taped training forward: the backbone's training step with its backward run by the
//! backbone itself instead of candle's autograd.
//!
//! candle's `backward` adds every gradient contribution onto a fresh `zeros_like` tensor (two
//! ops, and two CUDA launches, per input of every op) and walks generic nodes one op at a time.
//! The taped forward runs the same custom ops (`kernels`) outside the autograd graph, keeps
//! what each backward needs, and attaches the feature map to the graph through one node whose
//! backward replays the blocks in reverse with `kernels`' backward functions. Parameter
//! gradients go into a [`TapeGrads`], which the caller adds to candle's `GradStore`; the
//! values are those of candle's autograd, bit for bit (`tests/tape.rs`).
//!
//! A frozen network (weights from [`crate::DetachedVarMap`]) tapes too when its input needs a
//! gradient, and then computes that alone: in training mode (AutoMix's momentum encoder on the
//! MixBlock's mixed images) and in evaluation mode (PuzzleMix's saliency pass,
//! [`crate::CifarResNet::forward_eval`], whose BatchNorm backward is the input-only
//! `kernels::batch_norm_eval_backward_input`).

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor};

/// Parameter gradients collected during one backward pass.
#[derive(Default)]
pub(crate) struct GradSink(Vec<(Tensor, Tensor)>);

impl GradSink {
    /// Records `grad` for `param` if `param` is a trained variable.
    pub(crate) fn push(&mut self, param: &Tensor, grad: Tensor) {
        if param.track_op() {
            self.0.push((param.clone(), grad));
        }
    }
}

/// The parameter gradients of a taped forward ([`crate::CifarResNet::forward_train`]), filled
/// when candle's `backward` reaches the taped features. Add them to the `GradStore` that
/// `backward` returned with [`TapeGrads::add_to`] before the optimizer reads it.
#[derive(Debug, Clone, Default)]
pub struct TapeGrads(Arc<Mutex<Vec<(Tensor, Tensor)>>>);

impl TapeGrads {
    /// Adds (sums, for a parameter that already has one) every collected gradient to `grads`
    /// and empties this collection.
    pub fn add_to(&self, grads: &mut GradStore) -> Result<()> {
        let taken = std::mem::take(&mut *self.0.lock().expect("TapeGrads mutex poisoned"));
        for (param, g) in taken {
            let total = match grads.remove(&param) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert(&param, total);
        }
        Ok(())
    }

    fn extend(&self, sink: GradSink) {
        self.0
            .lock()
            .expect("TapeGrads mutex poisoned")
            .extend(sink.0);
    }

    /// Number of parameter gradients collected and not yet added.
    pub fn len(&self) -> usize {
        self.0.lock().expect("TapeGrads mutex poisoned").len()
    }

    /// Whether no gradient is waiting to be added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the backward of one `conv → BN(→ ReLU)` layer needs.
pub(crate) struct LayerTape {
    /// The convolution's input.
    pub input: Tensor,
    /// The convolution's output, the BatchNorm's input.
    pub pre_bn: Tensor,
    /// The BatchNorm's batch statistics `[mean, var]`.
    pub stats: Tensor,
}

/// What a residual block's backward needs.
pub(crate) struct BlockTape {
    /// The main path's layers, in order.
    pub layers: Vec<LayerTape>,
    /// The projection shortcut's layer, if any.
    pub shortcut: Option<LayerTape>,
    /// The two inputs of the closing `relu(main + shortcut)`.
    pub residual: (Tensor, Tensor),
}

/// The backward of a taped forward: from the features' gradient to the input's, if needed.
type Backward = Box<dyn FnOnce(&Tensor) -> Result<Option<Tensor>> + Send + Sync>;

/// `value` (computed outside the graph) as a node of `x`'s graph, with `anchor` (a trained
/// variable, or a frozen one when `x` needs a gradient) as second input so that `backward`
/// reaches the node even when `x` needs no gradient. The node's backward runs `backward` once.
pub(crate) fn attach(
    x: &Tensor,
    anchor: &Tensor,
    value: Tensor,
    backward: Backward,
) -> Result<Tensor> {
    let value = value.contiguous()?;
    x.apply_op2(
        anchor,
        Attach {
            value,
            backward: Mutex::new(Some(backward)),
        },
    )
}

struct Attach {
    value: Tensor,
    backward: Mutex<Option<Backward>>,
}

impl CustomOp2 for Attach {
    fn name(&self) -> &'static str {
        "backbones-taped-features"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.value.storage_and_layout();
        let data = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => v[a..b].to_vec(),
            _ => candle_core::bail!(
                "{}: features must be contiguous f32 on the CPU",
                self.name()
            ),
        };
        Ok((CpuStorage::F32(data), self.value.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (storage, layout) = self.value.storage_and_layout();
        match &*storage {
            // A fresh op output: contiguous from offset 0 over its whole buffer, so cloning
            // the buffer (one device-to-device copy) copies exactly the features.
            Storage::Cuda(s) if layout.is_contiguous() && layout.start_offset() == 0 => {
                Ok((s.try_clone(layout)?, self.value.shape().clone()))
            }
            _ => candle_core::bail!("{}: features must be a fresh CUDA tensor", self.name()),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let backward = self
            .backward
            .lock()
            .expect("tape mutex poisoned")
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg(
                    "a taped forward's backward ran twice (build a new forward per backward)"
                        .into(),
                )
            })?;
        let grad_x = backward(grad_res)?;
        Ok((grad_x.filter(|_| x.track_op()), None))
    }
}

/// Runs a taped backward `run` with a fresh sink, then hands the sink's gradients to `out`.
pub(crate) fn collect(
    out: &TapeGrads,
    run: impl FnOnce(&mut GradSink) -> Result<Option<Tensor>>,
) -> Result<Option<Tensor>> {
    let mut sink = GradSink::default();
    let grad_x = run(&mut sink)?;
    out.extend(sink);
    Ok(grad_x)
}
