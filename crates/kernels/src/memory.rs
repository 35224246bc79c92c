//! Process allocator setting for CPU training.

/// Makes glibc's `malloc` keep freed memory for reuse instead of returning it to the kernel.
///
/// A CPU training step allocates and frees hundreds of activation- and column-sized buffers of
/// 0.1–30 MB. By default glibc serves blocks above its mmap threshold (128 KiB, adapting up to
/// 32 MiB) with a fresh `mmap` and trims the heap top above 128 KiB, so those buffers come
/// back as new pages: one page fault and one zeroing per 4 KiB, every step. Raising the
/// threshold to its maximum (32 MiB) and the trim threshold to 2 GiB keeps them in the heap;
/// peak memory is unchanged (the same buffers are live at the peak). Measured on the 2-core
/// CI machine: ResNet-18 train step at base width 16 ≈ +40 % images/s (see
/// `docs/performance.md`). Blocks above 32 MiB would still be mapped afresh (ResNeXt-50's
/// stage-1 activations are 105 MB at batch 100: 1.1 million page faults, 4.4 GB zeroed per
/// step), so `mmap` is switched off for the heap altogether (`M_MMAP_MAX = 0`; glibc still falls
/// back to it if the heap cannot grow): ResNeXt-50 +16 % images/s, peak RSS +2 %. Does nothing
/// on other platforms. Call once, at start-up.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes allocator parameters; it is called before the
        // process has any threads that allocate concurrently with it, and invalid values are
        // rejected by glibc (return value 0), which leaves the defaults in place.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_MMAP_MAX, 0);
        }
    }
}
