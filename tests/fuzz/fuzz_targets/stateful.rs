//! Fuzz `Server`, the control thread's `Executor` and two workers' `Core`s together: a sequence of
//! client and peer packets and time steps, then every allocation ends. Oracle (in `turnpike::sim`, shared
//! with the proptest `tests/stateful.rs`): no panic or hang, counters monotone and equal to what was
//! billed, and every table empty at the end.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    turnpike::sim::run_bytes(data);
});
