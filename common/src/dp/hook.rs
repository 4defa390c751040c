//! Keeps the process's panic hook alive across concurrent opendp calls.
//!
//! opendp 0.16 guards some of its big-float arithmetic with `catch_unwind_silent`: it
//! takes the process-global panic hook, installs a silent one, runs the operation and puts
//! the hook it took back. Two threads doing that at once interleave as
//! take(H) set(S) / take(S) set(S) / restore(H) / restore(S): the process ends with the
//! **silent** hook for good, and every later panic — a server bug, a node's failed
//! invariant, a test's failed assertion — exits without a word. Our noise sampler runs
//! opendp on several threads at once, and a test process runs the server and its nodes
//! side by side, so this happened (CI runs that failed with empty output).
//!
//! [`with_opendp`] counts the opendp calls in flight: the first one in saves the hook
//! that is installed, and the last one out reinstalls it, whatever opendp's own swaps left
//! behind. While calls are in flight a panic on another thread may still go unprinted
//! (opendp's swap is process-wide and cannot be prevented from outside); afterwards the
//! original hook is always back. Every opendp call in this workspace goes through it.

use std::panic::{self, PanicHookInfo};
use std::sync::{Arc, Mutex, MutexGuard};

type Hook = Arc<dyn Fn(&PanicHookInfo<'_>) + Sync + Send + 'static>;

struct State {
    in_flight: usize,
    saved: Option<Hook>,
}

static STATE: Mutex<State> = Mutex::new(State {
    in_flight: 0,
    saved: None,
});

fn state() -> MutexGuard<'static, State> {
    // A panic while holding this lock cannot leave the count inconsistent (both updates
    // are single statements), so a poisoned lock is still usable.
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

fn install(hook: &Hook) {
    let hook = Arc::clone(hook);
    panic::set_hook(Box::new(move |info| hook(info)));
}

/// Decrements the count on drop, so an opendp call that panics still restores the hook.
struct InFlight;

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = state();
        s.in_flight -= 1;
        if s.in_flight == 0 {
            if let Some(hook) = s.saved.take() {
                install(&hook);
            }
        }
    }
}

/// Runs `f` (which calls opendp) so that the panic hook installed before the first of
/// any concurrent opendp calls is the one installed after the last.
pub fn with_opendp<R>(f: impl FnOnce() -> R) -> R {
    {
        let mut s = state();
        if s.in_flight == 0 {
            let hook: Hook = Arc::from(panic::take_hook());
            install(&hook);
            s.saved = Some(hook);
        }
        s.in_flight += 1;
    }
    let _guard = InFlight;
    f()
}
