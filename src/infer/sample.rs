//! Turning logits into a token: greedy, or temperature with top-k and top-p,
//! reproducible from a seed.

pub use crate::backend::argmax;
use crate::backend::{Pick, draw_sorted};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to pick the next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` is greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (`0`: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (`1`: all).
    pub top_p: f32,
    /// Seed of the random stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Check ranges; the message names the offending option.
    pub fn validate(&self) -> crate::Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(crate::Error::Invalid(format!(
                "--temperature must be a finite number ≥ 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(crate::Error::Invalid(format!(
                "--top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// A sampler: parameters plus its random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            candidates: Vec::new(),
        }
    }

    /// The choice for the next token: greedy, or a draw with the next
    /// number of the random stream. A backend applies it to the logits.
    pub fn pick(&mut self) -> Pick {
        if self.params.temperature == 0.0 {
            return Pick::Greedy;
        }
        Pick::Draw {
            temperature: self.params.temperature,
            top_k: self.params.top_k,
            top_p: self.params.top_p,
            u: self.rng.random::<f64>(),
        }
    }

    /// Pick a token from one position's logits on the host.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let pick = self.pick();
        draw_sorted(logits, &pick, &mut self.candidates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_zero_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_argmax_at_any_temperature() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            top_p: 1.0,
            seed: 7,
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0]), 1);
        }
    }

    #[test]
    fn top_p_drops_the_tail_and_seed_reproduces() {
        // Probabilities ≈ 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps two tokens.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.8,
            seed: 42,
        };
        let mut a = Sampler::new(p);
        let draws: Vec<u32> = (0..400).map(|_| a.sample(&logits)).collect();
        assert!(draws.iter().all(|&t| t < 2));
        assert!(draws.contains(&0) && draws.contains(&1));
        let mut b = Sampler::new(p);
        let again: Vec<u32> = (0..400).map(|_| b.sample(&logits)).collect();
        assert_eq!(draws, again);
    }

    #[test]
    fn bad_parameters_are_named() {
        let e = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("--top-p"));
        let e = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("--temperature"));
    }
}
