//! A bounds-checked wrapper over `gemm::gemm` for f32 row/column-strided matrices.

use gemm::Parallelism;

/// A read-only matrix view: element `(i, j)` lives at `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix whose rows are `row_stride` apart.
    pub fn row_major(data: &'a [f32], row_stride: usize) -> Self {
        Self {
            data,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows are `row_stride` apart.
    pub fn transposed(data: &'a [f32], row_stride: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: row_stride,
        }
    }

    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
        assert!(
            last < self.data.len(),
            "{what}: {rows}x{cols} view needs index {last} but has {} elements",
            self.data.len()
        );
    }
}

/// `dst (m x n, row-major, rows dst_row_stride apart) (+)= lhs (m x k) * rhs (k x n)`.
///
/// With `accumulate` the product is added to `dst`, otherwise `dst` is overwritten.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_row_stride: usize,
    accumulate: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let dst_last = (m - 1) * dst_row_stride + (n - 1);
    assert!(
        dst_last < dst.len(),
        "matmul dst: {m}x{n} view needs index {dst_last} but has {} elements",
        dst.len()
    );
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                dst[row * dst_row_stride..row * dst_row_stride + n].fill(0.0);
            }
        }
        return;
    }
    lhs.check(m, k, "matmul lhs");
    rhs.check(k, n, "matmul rhs");
    // SAFETY: every index the views can reach was bounds-checked above, and `dst`
    // is borrowed mutably so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
