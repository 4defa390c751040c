//! The panic hook survives opendp's concurrent hook swaps (`dpfl_common::dp::hook`).
//!
//! Its own test binary: it replaces the process's panic hook, which no other test may see.

use dpfl_common::dp::hook::with_opendp;
use std::panic;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Replays opendp's take/set-silent/restore swap from many threads at once (the
/// interleaving that lost the hook) and checks the hook installed before is the one
/// that runs after.
#[test]
fn concurrent_silent_swaps_leave_the_original_hook_installed() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let before = panic::take_hook();
    panic::set_hook(Box::new(|_| {
        CALLS.fetch_add(1, Ordering::SeqCst);
    }));
    let swap = || {
        for _ in 0..200 {
            let prev = panic::take_hook();
            panic::set_hook(Box::new(|_| {}));
            std::thread::yield_now();
            panic::set_hook(prev);
        }
    };
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| with_opendp(swap));
        }
    });
    let _ = panic::catch_unwind(|| panic!("counted by the original hook"));
    let calls = CALLS.load(Ordering::SeqCst);
    panic::set_hook(before);
    assert_eq!(calls, 1, "the hook installed before the swaps must be back");
}
