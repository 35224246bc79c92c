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
/// With `accumulate` the product is added to `dst`, otherwise `dst` is overwritten. Small
/// products of `k`-contiguous operands (the Winograd weight gradients of narrow layers) run
/// [`dot::products`], the same bits as `gemm` in fewer cycles.
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
    if dot::applies(m, n, &lhs, &rhs) {
        dot::products(m, n, k, dst, dst_row_stride, accumulate, lhs, rhs);
    } else {
        gemm_checked(
            m,
            n,
            k,
            dst,
            dst_row_stride,
            accumulate,
            lhs,
            rhs,
            parallelism,
        );
    }
}

/// `gemm::gemm` on views [`matmul`] has bounds-checked (`k > 0`).
#[allow(clippy::too_many_arguments)]
fn gemm_checked(
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
    // SAFETY: every index the views can reach was bounds-checked by the caller, and `dst`
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

/// Small `m × n` products whose operands both run contiguously along `k` (`lhs` rows, `rhs`
/// columns), as the Winograd weight gradients `∂U[ξ] = Z[ξ] · V[ξ]ᵀ` of layers with ≤ 16
/// channels are. `gemm` computes these (`m·n ≤ 256`) with "horizontal" kernels: each output an
/// 8-lane FMA chain along `k` in blocks of 1,024, reduced across lanes and added to the output.
/// Its 2 × 2 output blocks load four vectors per four FMAs, which leaves the FMA units half
/// idle (4.7 % of a width-16 training step in `perf`). [`products`] runs the same per-output
/// arithmetic — lane chains, masked tail, reduction order, block sums — over 2 × 4 blocks (six
/// loads per eight FMAs), so every output keeps its bits (tested against `gemm`).
mod dot {
    use super::MatRef;

    /// `gemm`'s block of `k` per pass of its horizontal kernels.
    const KC: usize = 1024;

    /// Whether `gemm` would take its horizontal kernels and this CPU can run [`products`].
    pub(super) fn applies(m: usize, n: usize, lhs: &MatRef<'_>, rhs: &MatRef<'_>) -> bool {
        m * n <= 256 && lhs.col_stride == 1 && rhs.row_stride == 1 && crate::cpu::has_avx2_fma()
    }

    /// The product for [`super::matmul`] once [`applies`] holds (views bounds-checked by the
    /// caller, `k > 0`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn products(
        m: usize,
        n: usize,
        k: usize,
        dst: &mut [f32],
        dst_row_stride: usize,
        accumulate: bool,
        lhs: MatRef<'_>,
        rhs: MatRef<'_>,
    ) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `applies` checked AVX2 and FMA; the caller bounds-checked every index of the
        // `m × k` and `k × n` views and of `dst`'s `m × n` block, and `dst` is borrowed
        // mutably, so it aliases neither operand.
        unsafe {
            avx2::products(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                dst_row_stride,
                accumulate,
                (lhs.data.as_ptr(), lhs.row_stride),
                (rhs.data.as_ptr(), rhs.col_stride),
            )
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (m, n, k, dst, dst_row_stride, accumulate, lhs, rhs);
            unreachable!("dot::applies is false off x86-64")
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use super::KC;
        use std::arch::x86_64::*;

        /// `(pointer, stride)`: row `i` of `lhs` (column `j` of `rhs`) starts `i · stride`
        /// floats in, its `k` values contiguous.
        type Rows = (*const f32, usize);

        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        pub(super) unsafe fn products(
            m: usize,
            n: usize,
            k: usize,
            dst: *mut f32,
            dst_rs: usize,
            accumulate: bool,
            lhs: Rows,
            rhs: Rows,
        ) {
            let mut depth = 0;
            // Without `accumulate` the first block stores its sums; later ones add theirs.
            let mut store = !accumulate;
            while depth < k {
                let kb = KC.min(k - depth);
                let mut i = 0;
                while i < m {
                    let mb = (m - i).min(2);
                    let mut j = 0;
                    while j < n {
                        let nb = (n - j).min(4);
                        let out = dst.add(i * dst_rs + j);
                        let l = lhs.0.add(i * lhs.1 + depth);
                        let r = rhs.0.add(j * rhs.1 + depth);
                        let (ls, rs) = (lhs.1, rhs.1);
                        match (mb, nb) {
                            (2, 4) => block::<2, 4>(kb, out, dst_rs, store, l, ls, r, rs),
                            (2, 3) => block::<2, 3>(kb, out, dst_rs, store, l, ls, r, rs),
                            (2, 2) => block::<2, 2>(kb, out, dst_rs, store, l, ls, r, rs),
                            (2, _) => block::<2, 1>(kb, out, dst_rs, store, l, ls, r, rs),
                            (_, 4) => block::<1, 4>(kb, out, dst_rs, store, l, ls, r, rs),
                            (_, 3) => block::<1, 3>(kb, out, dst_rs, store, l, ls, r, rs),
                            (_, 2) => block::<1, 2>(kb, out, dst_rs, store, l, ls, r, rs),
                            _ => block::<1, 1>(kb, out, dst_rs, store, l, ls, r, rs),
                        }
                        j += nb;
                    }
                    i += mb;
                }
                store = false;
                depth += kb;
            }
        }

        /// `MR × NR` outputs over `kb` values of `k`.
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn block<const MR: usize, const NR: usize>(
            kb: usize,
            out: *mut f32,
            out_rs: usize,
            store: bool,
            lhs: *const f32,
            lhs_rs: usize,
            rhs: *const f32,
            rhs_cs: usize,
        ) {
            let mut acc = [[_mm256_setzero_ps(); NR]; MR];
            let full = kb / 8 * 8;
            let mut d = 0;
            while d < full {
                let r: [__m256; NR] =
                    std::array::from_fn(|j| _mm256_loadu_ps(rhs.add(j * rhs_cs + d)));
                for (i, acc_row) in acc.iter_mut().enumerate() {
                    let l = _mm256_loadu_ps(lhs.add(i * lhs_rs + d));
                    for (a, &rj) in acc_row.iter_mut().zip(&r) {
                        *a = _mm256_fmadd_ps(l, rj, *a);
                    }
                }
                d += 8;
            }
            if d < kb {
                // As `gemm`: a masked load (zeros past the end) and a full FMA.
                let mask = tail_mask(kb - d);
                let r: [__m256; NR] =
                    std::array::from_fn(|j| _mm256_maskload_ps(rhs.add(j * rhs_cs + d), mask));
                for (i, acc_row) in acc.iter_mut().enumerate() {
                    let l = _mm256_maskload_ps(lhs.add(i * lhs_rs + d), mask);
                    for (a, &rj) in acc_row.iter_mut().zip(&r) {
                        *a = _mm256_fmadd_ps(l, rj, *a);
                    }
                }
            }
            for (i, acc_row) in acc.iter().enumerate() {
                for (j, &a) in acc_row.iter().enumerate() {
                    let o = out.add(i * out_rs + j);
                    let sum = reduce_sum(a);
                    // `gemm` stores `1·sum`, then adds with `fma(1, sum, dst)`: the same bits.
                    *o = if store { sum } else { sum + *o };
                }
            }
        }

        /// Lanes `0..len` set (`len < 8`).
        #[inline(always)]
        unsafe fn tail_mask(len: usize) -> __m256i {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), lanes)
        }

        /// `gemm`'s lane sum: `((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7))`.
        #[inline(always)]
        unsafe fn reduce_sum(x: __m256) -> f32 {
            let x = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
            let hi = _mm_movehl_ps(x, x);
            let r0 = _mm_add_ps(x, hi);
            let r0_shuffled = _mm_shuffle_ps::<0b0001>(r0, r0);
            _mm_cvtss_f32(_mm_add_ss(r0, r0_shuffled))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::{gemm_checked, matmul, MatRef};
        use crate::cpu::test_values as values;
        use gemm::Parallelism;

        #[test]
        fn small_dot_products_give_the_bits_of_gemm() {
            if !crate::cpu::has_avx2_fma() {
                eprintln!("SKIPPED (no AVX2/FMA): dot products not used on this CPU");
                return;
            }
            let mut case = 0u32;
            for (m, n) in [
                (16, 16),
                (1, 1),
                (1, 7),
                (3, 5),
                (2, 16),
                (16, 3),
                (5, 9),
                (8, 32),
            ] {
                for k in [1usize, 5, 8, 13, 1023, 1024, 1031, 2600] {
                    for accumulate in [false, true] {
                        case += 1;
                        let (lhs_rs, rhs_cs, dst_rs) = (k + 3, k + 1, n + 2);
                        let lhs = values(m * lhs_rs, case);
                        let rhs = values(n * rhs_cs, case + 1000);
                        let start = values(m * dst_rs, case + 2000);
                        let (mut ours, mut theirs) = (start.clone(), start);
                        let l = MatRef::row_major(&lhs, lhs_rs);
                        let r = MatRef::transposed(&rhs, rhs_cs);
                        assert!(super::applies(m, n, &l, &r));
                        matmul(
                            m,
                            n,
                            k,
                            &mut ours,
                            dst_rs,
                            accumulate,
                            l,
                            r,
                            Parallelism::None,
                        );
                        // `gemm` itself on the same views (what `matmul` ran before `dot`).
                        let none = Parallelism::None;
                        gemm_checked(m, n, k, &mut theirs, dst_rs, accumulate, l, r, none);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&ours),
                            bits(&theirs),
                            "{m}×{n}×{k} accumulate {accumulate}"
                        );
                    }
                }
            }
        }

        #[test]
        fn other_layouts_and_sizes_keep_gemm() {
            let data = vec![0f32; 64 * 64];
            let row = MatRef::row_major(&data, 64);
            let col = MatRef::transposed(&data, 64);
            assert!(!super::applies(16, 17, &row, &col), "m·n > 256");
            assert!(!super::applies(4, 4, &col, &col), "lhs not k-contiguous");
            assert!(!super::applies(4, 4, &row, &row), "rhs not k-contiguous");
        }
    }
}
