//! CPU implementations on contiguous f32 slices. Device-independent shape handling and the
//! candle custom-op plumbing live in the parent modules, so a CUDA implementation only needs
//! to provide the same kernels.

pub(crate) mod batch_norm;
pub(crate) mod bf16;
pub(crate) mod conv;
pub(crate) mod geom;
pub(crate) mod grouped;
pub(crate) mod loss;
pub(crate) mod matmul;
pub(crate) mod winograd;

use candle_core::{bail, CpuStorage, Layout, Result};
use gemm::Parallelism;

/// The contiguous f32 data of a CPU tensor argument, or an error naming the op and argument.
pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    arg: &str,
) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(data) => data,
        _ => bail!("{op}: {arg} must be f32"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: {arg} must be contiguous"),
    }
}

/// The contiguous f32 slice an in-place op writes, or `"{op}: {arg} must be contiguous f32"`.
pub(crate) fn f32_slice_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
    arg: &str,
) -> Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&mut data[start..end]),
        _ => bail!("{op}: {arg} must be contiguous f32"),
    }
}

/// Deterministic test values in [-1, 1] (xorshift), shared by the kernels' unit tests.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// `dst[..src.len()] = src` for the few floats of a short row (a narrow plane's, an im2col
/// run): in blocks of 4 moved as values, because `copy_from_slice` of a run-time length calls
/// `memmove`, which cost more than the copy itself (5 % of a 4×4-plane convolution in `perf`).
#[inline(always)]
pub(crate) fn copy_short(dst: &mut [f32], src: &[f32]) {
    let dst = &mut dst[..src.len()];
    let (mut d, mut s) = (dst.chunks_exact_mut(4), src.chunks_exact(4));
    for (d, s) in (&mut d).zip(&mut s) {
        let s: [f32; 4] = s.try_into().unwrap();
        let d: &mut [f32; 4] = d.try_into().unwrap();
        *d = s;
    }
    for (d, &s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d = s;
    }
}

/// Whether the CPU has AVX2, which the explicit-SIMD kernels (`_mm256_*`) need; they keep a
/// portable twin for other CPUs, computing the same bits.
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX2 and FMA, which the kernels without a portable twin need (the
/// small dot products, the direct grouped convolution): callers take another path elsewhere.
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `f` in a function compiled for AVX2 and FMA when the CPU has them, else as is.
///
/// The crate is built for baseline x86-64 (SSE2) so that one binary runs everywhere; element-wise
/// loops inlined into `f` get 8-wide vectors this way. Mark the closure itself
/// `#[inline(always)]` as well as the functions it calls: a closure that LLVM chose not to inline
/// compiles for the baseline and silently runs 4-wide SSE (`perf` showed the Winograd input
/// transform doing so once it grew). Results are unchanged: Rust never contracts `a * b + c` into an FMA on its own.
#[inline(always)]
pub(crate) fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { run(f) };
        }
    }
    f()
}

thread_local! {
    /// Scratch buffers kept by each thread between calls: a convolution chunk's transformed
    /// tiles or im2col columns are megabytes, and fresh allocations of that size cost a page fault per 4 KiB (20 % of the
    /// time in `perf`), plus a TLB-flushing copy-on-write fault when calloc'd.
    static POOL: std::cell::Cell<Vec<Vec<f32>>> = const { std::cell::Cell::new(Vec::new()) };
}

/// A buffer of at least `len` floats from this thread's pool, with unspecified contents: the
/// smallest pooled one that is large enough, else the largest, grown (growing zero-fills the
/// new part, which `perf` showed as 2 % of a step when buffers were taken in LIFO order).
/// (Taken out of the pool rather than borrowed: a GEMM's own rayon tasks may run another
/// chunk on this thread meanwhile, which then simply gets a buffer of its own.)
pub(crate) fn take_buffer(len: usize) -> Vec<f32> {
    let mut pool = POOL.with(|p| p.take());
    let fit = (0..pool.len())
        .filter(|&i| pool[i].len() >= len)
        .min_by_key(|&i| pool[i].len())
        .or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].len()));
    let mut buf = fit.map(|i| pool.swap_remove(i)).unwrap_or_default();
    POOL.with(|p| p.set(pool));
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    buf
}

/// Returns a buffer of [`take_buffer`] to this thread's pool.
/// A full pool keeps its six largest buffers (a convolution chunk holds up to four at once).
pub(crate) fn give_back(buf: Vec<f32>) {
    let mut pool = POOL.with(|p| p.take());
    pool.push(buf);
    if pool.len() > 6 {
        let smallest = (0..pool.len()).min_by_key(|&i| pool[i].len()).unwrap_or(0);
        pool.swap_remove(smallest);
    }
    POOL.with(|p| p.set(pool));
}

/// Appends `len` floats to `v`, computed in parallel runs of `chunk`: `compute(i, run)` gets
/// the `i`-th run (the last may be shorter), zeroed by the thread that then computes it.
/// Zeroing the whole vector first (`vec![0.0; len]`) ran on the calling thread alone, with the
/// other cores waiting: ≈ 2 % of a width-16 step's samples, twice that in wall time. A run
/// zeroed just before it is computed is also in cache when the kernel writes it.
pub(crate) fn par_extend(
    v: &mut Vec<f32>,
    len: usize,
    chunk: usize,
    compute: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    par_extend_filled(v, len, chunk, |i, run| compute(i, zeroed(run)));
}

/// `run` after writing zeros to every element, as initialised floats.
fn zeroed(run: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    for e in run.iter_mut() {
        e.write(0.0);
    }
    // SAFETY: every element was initialised just above; `MaybeUninit<f32>` has the layout of
    // `f32`.
    unsafe { &mut *(run as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// A vector of `len` floats (capacity `len + spare`) filled in parallel runs of `chunk`:
/// `fill(i, run)` gets the `i`-th run (the last may be shorter) and must write every element
/// of it. Unlike `vec![0.0; len]` it does not first zero the memory that `fill` overwrites
/// (the zeroing was ≈ 4 % of a step in `perf`).
pub(crate) fn par_new_vec(
    len: usize,
    spare: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len + spare);
    par_extend_filled(&mut v, len, chunk, fill);
    v
}

/// Appends `len` floats to `v`, filled in parallel runs of `chunk` by `fill`, which must write
/// every element of its run (the contract of [`par_new_vec`] and [`par_extend`]).
fn par_extend_filled(
    v: &mut Vec<f32>,
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
) {
    use rayon::prelude::*;
    v.reserve(len);
    let old = v.len();
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, run)| fill(i, run));
    // SAFETY: `fill` wrote each of the first `len` spare elements (its contract), and
    // capacity ≥ old + len.
    unsafe { v.set_len(old + len) };
}

/// How a convolution's batch is cut into chunks of whole images for the thread pool.
pub(crate) struct Schedule {
    pub images_per_chunk: usize,
    /// `Rayon` when there are fewer chunks than threads, so the GEMMs split the work instead.
    pub parallelism: Parallelism,
}

/// Equal chunks of whole images, about `target` work units (GEMM columns, Winograd tiles) each,
/// at least `min_chunks_per_thread` per thread (`per_image` units per image). Equal and a whole
/// number per thread: a 64 + 36 image split of a late stage left one core idle for a third of
/// the call. Depends on the thread count only, which reproducible sums rely on.
pub(crate) fn split_images(
    batch: usize,
    per_image: usize,
    target: usize,
    min_chunks_per_thread: usize,
) -> Schedule {
    let threads = rayon::current_num_threads().max(1);
    let per_thread = (batch * per_image).div_ceil(threads);
    let chunks_per_thread = per_thread.div_ceil(target).max(min_chunks_per_thread);
    let images_per_chunk = batch.div_ceil(threads * chunks_per_thread).max(1);
    let chunks = batch.div_ceil(images_per_chunk);
    let parallelism = if chunks < threads {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    Schedule {
        images_per_chunk,
        parallelism,
    }
}

/// Chunks per run when `chunks` are grouped into one contiguous run per thread, each run
/// summing into its own accumulator. Fixed by the thread count alone (not by work stealing),
/// so the floating-point sum, and a whole training run, is reproducible, which resuming from a
/// checkpoint relies on.
pub(crate) fn chunks_per_run(chunks: usize) -> usize {
    let runs = rayon::current_num_threads().clamp(1, chunks.max(1));
    chunks.div_ceil(runs).max(1)
}

/// `out = Σ parts`, added in order. The same sum as adding every part onto zeros (`p + 0.0`
/// is `0.0 + p`, also for -0.0), but the first part is stored rather than added to `out`:
/// reading a page of a fresh calloc'd buffer before writing it costs a copy-on-write fault.
pub(crate) fn sum_in_order(parts: &[Vec<f32>], out: &mut [f32]) {
    if let Some((first, rest)) = parts.split_first() {
        for (t, p) in out.iter_mut().zip(first) {
            *t = p + 0.0;
        }
        for part in rest {
            for (t, p) in out.iter_mut().zip(part) {
                *t += p;
            }
        }
    }
}
