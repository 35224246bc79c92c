//! How a convolution algorithm is chosen, apart from cuDNN itself so that it can be tested
//! without a GPU: which candidates to try, in which order, and trying them until one runs.
//!
//! `cuda::conv` feeds this the results of cuDNN's heuristics
//! (`cudnnGetConvolution*Algorithm_v7`) and a closure that tries one candidate for real: set
//! the descriptor's math type, query and allocate the workspace, run the convolution. The first
//! candidate that runs is cached; one that cuDNN refuses (NOT_SUPPORTED), that fails while
//! running (EXECUTION_FAILED) or whose workspace cannot be had is skipped for the next, as
//! PyTorch's `AlgoIterator::try_all` does. Any other error (a bad parameter: a bug of ours)
//! stops at once.
//!
//! Deterministic mode tries fixed, well-trodden algorithms first (forward
//! IMPLICIT_PRECOMP_GEMM, backward-data ALGO_1, backward-filter ALGO_1: PyTorch's only choice
//! when `deterministic` is on and `benchmark` off), then the heuristics' deterministic results
//! as a fallback (PyTorch stops with an error there instead). Otherwise the heuristics' order,
//! with the fixed algorithm appended as a last resort when the heuristics do not list it.

use candle_core::{bail, Result};
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Largest workspace a candidate may ask for, in bytes (1 GiB); a candidate that wants more is
/// skipped like one whose workspace allocation failed.
///
/// PyTorch refuses ≥ 1 TiB, because cuDNN sometimes reports sizes above 2^63 for algorithms it
/// cannot run. This cap is lower because our workspace is kept (grow-only, one per thread and
/// device) for the rest of the process: one algorithm's appetite would be withheld from the
/// activations for the whole run. 1 GiB is ≈ 1.3 % of an H100's memory and ten times the largest
/// activation of a batch-100 CIFAR ResNeXt-50; the algorithms this rules out (FFT variants on
/// large planes) have cheaper alternatives in the same candidate list.
pub(crate) const MAX_WORKSPACE_BYTES: usize = 1 << 30;

/// One result of cuDNN's heuristics, reduced to what the choice needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Heuristic<A, M> {
    /// The algorithm.
    pub algo: A,
    /// Whether cuDNN reported the result usable (`status == SUCCESS`).
    pub usable: bool,
    /// Whether cuDNN reports the algorithm as bit-reproducible.
    pub deterministic: bool,
    /// The math type the algorithm wants on the convolution descriptor.
    pub math: M,
}

/// The candidates to try, in order, each with the math type to set on the descriptor before
/// trying it.
///
/// * `fixed`: the known-good algorithm of this pass with the precision's own math type.
/// * `deterministic`: fixed first, then the usable deterministic heuristic results.
/// * otherwise: the usable heuristic results in cuDNN's order, then `fixed` if not among them.
/// * `required_math` (strict f32: FMA math only, PyTorch asserts the same): results with another
///   math type are left out.
///
/// Duplicates (same algorithm and math type) are tried once.
pub(crate) fn candidates<A: Copy + PartialEq, M: Copy + PartialEq>(
    heuristics: &[Heuristic<A, M>],
    fixed: (A, M),
    deterministic: bool,
    required_math: Option<M>,
) -> Vec<(A, M)> {
    let mut out: Vec<(A, M)> = Vec::new();
    let mut push = |c: (A, M)| {
        if !out.contains(&c) {
            out.push(c);
        }
    };
    if deterministic {
        push(fixed);
    }
    for h in heuristics {
        let math_ok = required_math.is_none_or(|m| m == h.math);
        if h.usable && math_ok && (h.deterministic || !deterministic) {
            push((h.algo, h.math));
        }
    }
    push(fixed);
    out
}

/// What trying one candidate gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// It ran: keep it.
    Ran,
    /// cuDNN does not support it for this problem (NOT_SUPPORTED); the detail says where.
    NotSupported(String),
    /// It was launched and failed (EXECUTION_FAILED).
    ExecutionFailed(String),
    /// Its workspace could not be had: the allocation failed, or it is over
    /// [`MAX_WORKSPACE_BYTES`].
    AllocFailed(String),
}

impl Attempt {
    fn describe(&self) -> String {
        match self {
            Attempt::Ran => "ran".into(),
            Attempt::NotSupported(d) => format!("not supported ({d})"),
            Attempt::ExecutionFailed(d) => format!("execution failed ({d})"),
            Attempt::AllocFailed(d) => format!("workspace not available ({d})"),
        }
    }
}

/// Tries `candidates` in order with `try_one` and returns the first that ran. A candidate that
/// is not supported, fails to execute or gets no workspace is skipped (counted in
/// [`conv_algorithms_skipped`]); an `Err` from `try_one` is returned at once. With
/// `fail_first`, the first candidate is skipped as not supported without being tried (the
/// [`fail_first_conv_algorithm`] hook).
///
/// The error when none runs is one line naming `what` and every candidate's outcome.
pub(crate) fn first_that_runs<C: Copy + Debug>(
    what: &str,
    candidates: &[C],
    fail_first: bool,
    mut try_one: impl FnMut(C) -> Result<Attempt>,
) -> Result<C> {
    let mut outcomes = Vec::new();
    for (i, &c) in candidates.iter().enumerate() {
        let attempt = if i == 0 && fail_first {
            Attempt::NotSupported("forced by kernels::test_hooks::fail_first_conv_algorithm".into())
        } else {
            try_one(c)?
        };
        if attempt == Attempt::Ran {
            return Ok(c);
        }
        SKIPPED.fetch_add(1, Ordering::Relaxed);
        outcomes.push(format!("{c:?}: {}", attempt.describe()));
    }
    if outcomes.is_empty() {
        bail!("cuDNN: no {what} algorithm to try for this convolution");
    }
    bail!(
        "cuDNN: no {what} algorithm ran for this convolution; tried {}",
        outcomes.join("; ")
    )
}

/// How a cuDNN error status is handled while trying candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusClass {
    /// NOT_SUPPORTED (any sub-code): try the next candidate.
    NotSupported,
    /// EXECUTION_FAILED (any sub-code): try the next candidate.
    ExecutionFailed,
    /// cuDNN could not allocate device memory of its own: try the next candidate.
    AllocFailed,
    /// Anything else (bad parameter, internal error, ...): stop.
    Other,
}

/// Classifies a cuDNN status by its numeric value, for both numbering schemes: cuDNN 9
/// groups codes by thousands (3xxx NOT_SUPPORTED, 4004 INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED,
/// 5xxx EXECUTION_FAILED); cuDNN 8 used 9, 2 (ALLOC_FAILED) and 8. `cuda::conv` checks these
/// values against the bindings it is compiled with.
pub(crate) const fn classify_status(code: u32) -> StatusClass {
    match code {
        3000..=3999 | 9 => StatusClass::NotSupported,
        5000..=5999 | 8 => StatusClass::ExecutionFailed,
        4004 | 2 => StatusClass::AllocFailed,
        _ => StatusClass::Other,
    }
}

static FAIL_FIRST: AtomicBool = AtomicBool::new(false);
static SKIPPED: AtomicU64 = AtomicU64::new(0);

/// Test hook: while on, every algorithm choice that is made (the first convolution of a shape,
/// pass and setting on a thread) skips its first candidate as if cuDNN did not support it, so
/// that the fallback to the next candidate runs. Process-wide; choices already cached are
/// unaffected.
pub fn fail_first_conv_algorithm(on: bool) {
    FAIL_FIRST.store(on, Ordering::Relaxed);
}

/// Whether [`fail_first_conv_algorithm`] is on.
pub(crate) fn fail_first() -> bool {
    FAIL_FIRST.load(Ordering::Relaxed)
}

/// Number of candidates skipped so far by algorithm choices (hooked or real failures), for
/// tests.
pub fn conv_algorithms_skipped() -> u64 {
    SKIPPED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn h(algo: u32, usable: bool, deterministic: bool, math: u8) -> Heuristic<u32, u8> {
        Heuristic {
            algo,
            usable,
            deterministic,
            math,
        }
    }

    #[test]
    fn candidates_follow_the_heuristics_and_end_with_the_fixed_algorithm() {
        let hs = [
            h(7, true, false, 1),
            h(2, false, true, 1),
            h(3, true, true, 1),
            h(7, true, false, 1),
        ];
        // Unusable results are dropped, duplicates tried once, the fixed one appended.
        assert_eq!(
            candidates(&hs, (1, 1), false, None),
            [(7, 1), (3, 1), (1, 1)]
        );
        // Already listed: not appended again.
        assert_eq!(candidates(&hs, (3, 1), false, None), [(7, 1), (3, 1)]);
    }

    #[test]
    fn deterministic_mode_tries_the_fixed_algorithm_first_then_deterministic_results() {
        let hs = [
            h(7, true, false, 1),
            h(3, true, true, 1),
            h(1, true, true, 1),
        ];
        assert_eq!(candidates(&hs, (1, 1), true, None), [(1, 1), (3, 1)]);
    }

    #[test]
    fn strict_math_leaves_out_results_of_another_math_type() {
        let hs = [h(7, true, false, 2), h(3, true, false, 0)];
        assert_eq!(candidates(&hs, (1, 0), false, Some(0)), [(3, 0), (1, 0)]);
        // Other precisions take each result's own math type.
        assert_eq!(
            candidates(&hs, (1, 0), false, None),
            [(7, 2), (3, 0), (1, 0)]
        );
    }

    #[test]
    fn the_first_candidate_that_runs_is_chosen_after_skippable_failures() -> Result<()> {
        let tried = RefCell::new(Vec::new());
        let before = conv_algorithms_skipped();
        let chosen = first_that_runs("forward", &[10u32, 11, 12, 13], false, |c| {
            tried.borrow_mut().push(c);
            Ok(match c {
                10 => Attempt::NotSupported("shape".into()),
                11 => Attempt::ExecutionFailed("launch".into()),
                12 => Attempt::AllocFailed("out of memory".into()),
                _ => Attempt::Ran,
            })
        })?;
        assert_eq!(chosen, 13);
        assert_eq!(*tried.borrow(), [10, 11, 12, 13]);
        // Other tests may skip candidates concurrently: at least these three.
        assert!(conv_algorithms_skipped() >= before + 3);
        Ok(())
    }

    #[test]
    fn nothing_after_the_candidate_that_ran_is_tried() -> Result<()> {
        let tried = RefCell::new(Vec::new());
        let chosen = first_that_runs("forward", &[4u32, 5], false, |c| {
            tried.borrow_mut().push(c);
            Ok(Attempt::Ran)
        })?;
        assert_eq!((chosen, tried.into_inner()), (4, vec![4]));
        Ok(())
    }

    #[test]
    fn the_hook_fails_the_first_candidate_without_trying_it() -> Result<()> {
        let tried = RefCell::new(Vec::new());
        let chosen = first_that_runs("backward-data", &[4u32, 5], true, |c| {
            tried.borrow_mut().push(c);
            Ok(Attempt::Ran)
        })?;
        assert_eq!((chosen, tried.into_inner()), (5, vec![5]));
        // A single candidate, hooked: nothing runs, and the error says why.
        let err = first_that_runs("backward-data", &[4u32], true, |_| Ok(Attempt::Ran))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no backward-data algorithm ran")
                && err.contains("4: not supported (forced by kernels::test_hooks"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn when_every_candidate_fails_the_error_lists_each_outcome() {
        let err = first_that_runs("backward-filter", &[1u32, 2], false, |c| {
            Ok(if c == 1 {
                Attempt::AllocFailed("needs 2000000000000 bytes, over the cap".into())
            } else {
                Attempt::ExecutionFailed("CUDNN_STATUS_EXECUTION_FAILED".into())
            })
        })
        .unwrap_err()
        .to_string();
        // The message is one line (candle appends a backtrace when RUST_BACKTRACE is set).
        let err = err.lines().next().unwrap_or_default();
        assert!(
            err.contains("1: workspace not available (needs 2000000000000 bytes")
                && err.contains("2: execution failed (CUDNN_STATUS_EXECUTION_FAILED)"),
            "{err}"
        );
        let none = first_that_runs::<u32>("forward", &[], false, |_| Ok(Attempt::Ran));
        assert!(none
            .unwrap_err()
            .to_string()
            .contains("no forward algorithm to try"));
    }

    #[test]
    fn other_errors_stop_the_search_at_once() {
        let tried = RefCell::new(Vec::new());
        let res = first_that_runs("forward", &[1u32, 2], false, |c| {
            tried.borrow_mut().push(c);
            bail!("CUDNN_STATUS_BAD_PARAM")
        });
        assert!(res.unwrap_err().to_string().contains("BAD_PARAM"));
        assert_eq!(tried.into_inner(), [1]);
    }

    #[test]
    fn statuses_are_classified_in_both_numbering_schemes() {
        use StatusClass::*;
        // cuDNN 9.
        for (code, class) in [
            (3000, NotSupported),
            (3002, NotSupported),
            (3010, NotSupported),
            (5000, ExecutionFailed),
            (5003, ExecutionFailed),
            (4004, AllocFailed),
            (2000, Other),
            (4000, Other),
            (1001, Other),
            (0, Other),
        ] {
            assert_eq!(classify_status(code), class, "cuDNN 9 code {code}");
        }
        // cuDNN 8.
        for (code, class) in [
            (9, NotSupported),
            (8, ExecutionFailed),
            (2, AllocFailed),
            (3, Other),
            (4, Other),
        ] {
            assert_eq!(classify_status(code), class, "cuDNN 8 code {code}");
        }
    }
}
