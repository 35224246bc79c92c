//! The mixed-label representation `(y_a, y_b, λ)` (spec §3.4).

use candle_core::{Result, Tensor};

/// Weight of `y_a` in the mixed target.
#[derive(Debug, Clone)]
pub enum Lambda {
    /// One λ for the whole batch (every method but PuzzleMix).
    Scalar(f64),
    /// One λ per sample (`N`, `f32`, on the labels' device): PuzzleMix.
    PerSample(Tensor),
}

impl Lambda {
    /// The batch mean of λ (the scalar itself for [`Lambda::Scalar`]).
    pub fn mean(&self) -> Result<f64> {
        match self {
            Lambda::Scalar(l) => Ok(*l),
            Lambda::PerSample(t) => t.mean_all()?.to_dtype(candle_core::DType::F64)?.to_scalar(),
        }
    }
}

/// Mixed labels: the target of sample `i` is `λ_i·onehot(y_a[i]) + (1−λ_i)·onehot(y_b[i])`.
#[derive(Debug, Clone)]
pub struct MixedLabels {
    /// Labels of the un-permuted images (`N`, `u32`).
    pub y_a: Tensor,
    /// Labels of the partner images `y[π]` (`N`, `u32`).
    pub y_b: Tensor,
    /// Weight of `y_a`.
    pub lambda: Lambda,
}

impl MixedLabels {
    /// Plain labels written as a (trivial) mixture: `y_a = y_b = y`, `λ = 1`.
    pub fn plain(y: &Tensor) -> Self {
        Self {
            y_a: y.clone(),
            y_b: y.clone(),
            lambda: Lambda::Scalar(1.0),
        }
    }

    /// Labels `(y, y[π], λ)` for a partner permutation `perm` (`N`, `u32`).
    pub fn permuted(y: &Tensor, perm: &Tensor, lambda: f64) -> Result<Self> {
        Ok(Self {
            y_a: y.clone(),
            y_b: y.index_select(perm, 0)?,
            lambda: Lambda::Scalar(lambda),
        })
    }

    /// Whether these labels are plain (vanilla): λ = 1 scalar.
    pub fn is_plain(&self) -> bool {
        matches!(self.lambda, Lambda::Scalar(l) if l == 1.0)
    }

    /// Dense soft targets `N×num_classes` (f32): `λ·onehot(y_a) + (1−λ)·onehot(y_b)`.
    pub fn soft_targets(&self, num_classes: usize) -> Result<Tensor> {
        let a = one_hot(&self.y_a, num_classes)?;
        let b = one_hot(&self.y_b, num_classes)?;
        match &self.lambda {
            Lambda::Scalar(l) => (a * *l)? + (b * (1.0 - *l))?,
            Lambda::PerSample(l) => {
                let l = l.to_dtype(candle_core::DType::F32)?.unsqueeze(1)?;
                let one_minus = (1.0 - &l)?;
                a.broadcast_mul(&l)? + b.broadcast_mul(&one_minus)?
            }
        }
    }
}

/// One-hot encoding of `u32` labels as `N×num_classes` f32.
pub fn one_hot(labels: &Tensor, num_classes: usize) -> Result<Tensor> {
    let n = labels.dim(0)?;
    let classes = Tensor::arange(0u32, num_classes as u32, labels.device())?
        .unsqueeze(0)?
        .broadcast_as((n, num_classes))?;
    labels
        .unsqueeze(1)?
        .broadcast_as((n, num_classes))?
        .eq(&classes)?
        .to_dtype(candle_core::DType::F32)
}
