//! The one-thread rule for CUDA devices whose stream is the per-thread default stream.
//!
//! Our CUDA kernels take raw device pointers and rely on stream order alone: event tracking is
//! off (see [`crate::cuda_device`]), so nothing else orders one use of a buffer after another.
//! On a device opened with an explicit stream ([`crate::cuda_device`], candle's
//! `Device::new_cuda_with_stream`) every host thread queues onto that one stream, so that holds
//! whatever thread launches. candle's `Device::new_cuda` instead uses the per-thread default
//! stream: each host thread gets its own, and since the context is not in multi-stream mode
//! cudarc records no events either. Work queued from a second thread is then unordered with the
//! first thread's: a race, or a free before the last read. So on such a device our ops only run
//! on the thread that used it first, and refuse (with an error) to run on another. The check
//! is a pointer comparison on explicit streams and a short lock otherwise.

use candle_core::{bail, Result};
use std::fmt::Debug;
use std::sync::Mutex;
use std::thread::ThreadId;

/// The first thread that used each device (by key), and the check against it.
pub(crate) struct FirstThread<K> {
    owners: Mutex<Vec<(K, ThreadId)>>,
}

impl<K: Copy + PartialEq + Debug> FirstThread<K> {
    /// No device used yet.
    pub(crate) const fn new() -> Self {
        Self {
            owners: Mutex::new(Vec::new()),
        }
    }

    /// Records the current thread as `device`'s first user, or checks that it is that thread.
    pub(crate) fn check(&self, device: K, op: &str) -> Result<()> {
        let current = std::thread::current().id();
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        match owners.iter().find(|(k, _)| *k == device) {
            None => {
                owners.push((device, current));
                Ok(())
            }
            Some(&(_, owner)) if owner == current => Ok(()),
            Some(&(_, owner)) => bail!(
                "{op}: CUDA device {device:?} runs on the per-thread default stream \
                 (Device::new_cuda) and was first used on thread {owner:?}; work from thread \
                 {current:?} would not be ordered with it. Open the device with \
                 kernels::cuda_device (one explicit stream for every thread)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_refused_on_any_thread_but_its_first() -> Result<()> {
        static RULE: FirstThread<u32> = FirstThread::new();
        RULE.check(1, "op")?;
        RULE.check(1, "op")?;
        let (other_thread, own_device) = std::thread::spawn(|| {
            (
                RULE.check(1, "kernels-test").map_err(|e| e.to_string()),
                RULE.check(2, "kernels-test").map_err(|e| e.to_string()),
            )
        })
        .join()
        .expect("thread");
        let err = other_thread.unwrap_err();
        // One line (candle appends a backtrace when RUST_BACKTRACE is set).
        let first_line = err.lines().next().unwrap_or_default();
        assert!(
            first_line
                .starts_with("kernels-test: CUDA device 1 runs on the per-thread default stream")
                && first_line.contains("kernels::cuda_device"),
            "{err}"
        );
        // A device first used by the other thread is that thread's, and not this one's.
        assert!(own_device.is_ok());
        assert!(RULE.check(2, "op").is_err());
        Ok(())
    }
}
