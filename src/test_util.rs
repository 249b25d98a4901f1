//! Helpers for unit tests only.

/// Spins for a pseudo-random 0 to `max - 1` iterations, advancing the
/// xorshift32 state `x` (never zero). Race tests use it to put the other
/// thread's next step at varied moments, the same sequence on every run.
pub(crate) fn random_spin(x: &mut u32, max: u32) {
    *x ^= *x << 13;
    *x ^= *x >> 17;
    *x ^= *x << 5;
    for _ in 0..(*x % max) {
        std::hint::spin_loop();
    }
}
