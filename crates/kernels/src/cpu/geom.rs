//! The shape of one convolution, shared by the im2col/GEMM kernels (`conv`) and the Winograd
//! kernels, which `conv` dispatches to: it sits below both so neither imports the other for it.

/// Shape of one convolution (square stride/padding, dilation 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConvGeom {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
    pub h_out: usize,
    pub w_out: usize,
}

impl ConvGeom {
    pub(crate) fn c_in_per_group(&self) -> usize {
        self.c_in / self.groups
    }
    pub(crate) fn c_out_per_group(&self) -> usize {
        self.c_out / self.groups
    }
    /// Rows of one group's column matrix (= columns of one group's weight matrix).
    pub(crate) fn k_per_group(&self) -> usize {
        self.c_in_per_group() * self.kh * self.kw
    }
    pub(crate) fn plane_out(&self) -> usize {
        self.h_out * self.w_out
    }
    pub(crate) fn image_in(&self) -> usize {
        self.c_in * self.h * self.w
    }
    pub(crate) fn image_out(&self) -> usize {
        self.c_out * self.plane_out()
    }
    /// Elements of an im2col matrix of `cols` output pixels (`c_in · kh · kw` rows).
    pub(crate) fn k_columns(&self, cols: usize) -> usize {
        self.c_in * self.kh * self.kw * cols
    }
    /// A 1x1, stride-1, unpadded conv reads the input image as its column matrix.
    pub(crate) fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }
}
