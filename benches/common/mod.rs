//! Helpers the benchmarks share (a module, not a bench target).

use std::time::{Duration, Instant};

/// Best seconds per call of `f` over repeated runs lasting about `budget`.
pub fn time(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    let start = Instant::now();
    while start.elapsed() < budget {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

/// Deterministic pseudo-normal values (sum of uniforms), no dependency.
pub fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n)
        .map(|_| (u() + u() + u() + u() - 2.0) * 0.05)
        .collect()
}
