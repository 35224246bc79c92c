//! SIGTERM / SIGINT: the first asks the training loop to finish its step,
//! checkpoint at that iteration and exit (what a preempted cluster job needs);
//! a second one exits at once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Result;
use signal_hook::consts::{SIGINT, SIGTERM};

/// The signal number received, 0 while none has arrived.
#[derive(Clone)]
pub struct Interrupt(Arc<AtomicUsize>);

impl Interrupt {
    /// Installs the handlers for SIGTERM and SIGINT.
    pub fn install() -> Result<Self> {
        let received = Arc::new(AtomicUsize::new(0));
        let armed = Arc::new(AtomicBool::new(false));
        for sig in [SIGTERM, SIGINT] {
            // signal-hook's idiom: the conditional shutdown is registered first, so the
            // first signal only arms it (it sees `armed` still false) and a second one exits.
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, armed.clone())?;
            signal_hook::flag::register(sig, armed.clone())?;
            signal_hook::flag::register_usize(sig, received.clone(), sig as usize)?;
        }
        Ok(Self(received))
    }

    /// A handle that no signal sets (library use, tests).
    pub fn never() -> Self {
        Self(Arc::new(AtomicUsize::new(0)))
    }

    /// The signal received so far, if any.
    pub fn received(&self) -> Option<Signal> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            n => Some(Signal(n as i32)),
        }
    }
}

/// A received signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signal(pub i32);

impl Signal {
    /// `SIGTERM` / `SIGINT`.
    pub fn name(self) -> &'static str {
        match self.0 {
            SIGTERM => "SIGTERM",
            SIGINT => "SIGINT",
            _ => "a signal",
        }
    }

    /// The shell's exit status for a process stopped by this signal.
    pub fn exit_code(self) -> u8 {
        (128 + self.0) as u8
    }
}
