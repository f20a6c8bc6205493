//! Learning-rate schedules: linear warmup, then constant, linear or cosine decay.
//!
//! Steps are 0-based. During warmup (`step < warmup`) the rate is
//! `peak·(step+1)/warmup`, so step 0 already trains and step `warmup-1` is at
//! `peak`. After warmup the decay runs from `peak` at step `warmup` to
//! `peak·min_ratio` at step `total-1`, and stays there for any later step.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The shape of the decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Stay at the peak rate (`min_ratio` unused).
    Constant,
    /// Straight line from the peak to `peak·min_ratio`.
    Linear,
    /// Half a cosine from the peak to `peak·min_ratio`.
    #[default]
    Cosine,
}

impl ScheduleKind {
    /// The CLI name: `constant`, `linear` or `cosine`.
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ScheduleKind {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<ScheduleKind> {
        match s.to_ascii_lowercase().as_str() {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(crate::Error::Invalid(format!(
                "learning-rate schedule '{s}': expected constant, linear or cosine"
            ))),
        }
    }
}

/// A learning rate for every step of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// The rate at the end of warmup.
    pub peak: f32,
    /// Warmup steps (0 = start at the peak).
    pub warmup: u64,
    /// Total steps of the run; the decay reaches its floor at step `total-1`.
    pub total: u64,
    /// Decay shape after warmup.
    pub kind: ScheduleKind,
    /// The floor of the decay as a fraction of `peak` (0.0 decays to zero).
    pub min_ratio: f32,
}

impl LrSchedule {
    /// The learning rate at 0-based `step`.
    pub fn lr_at(&self, step: u64) -> f32 {
        if step < self.warmup {
            return (f64::from(self.peak) * (step + 1) as f64 / self.warmup as f64) as f32;
        }
        let floor = f64::from(self.peak) * f64::from(self.min_ratio);
        let peak = f64::from(self.peak);
        // Decay over steps warmup..=total-1; a run with no decay steps stays at the peak.
        let last = self.total.saturating_sub(1);
        if self.kind == ScheduleKind::Constant || last <= self.warmup {
            return self.peak;
        }
        let frac = ((step - self.warmup) as f64 / (last - self.warmup) as f64).min(1.0);
        let lr = match self.kind {
            ScheduleKind::Constant => peak,
            ScheduleKind::Linear => peak + (floor - peak) * frac,
            ScheduleKind::Cosine => {
                floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos())
            }
        };
        lr as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind) -> LrSchedule {
        LrSchedule {
            peak: 1e-3,
            warmup: 10,
            total: 110,
            kind,
            min_ratio: 0.1,
        }
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-6 * b.abs().max(1e-9)
    }

    #[test]
    fn warmup_is_linear_from_peak_over_warmup() {
        for kind in [
            ScheduleKind::Constant,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            let s = sched(kind);
            assert!(close(s.lr_at(0), 1e-4), "{kind}: {}", s.lr_at(0));
            assert!(close(s.lr_at(4), 5e-4), "{kind}");
            assert!(close(s.lr_at(9), 1e-3), "{kind}");
            assert!(close(s.lr_at(10), 1e-3), "{kind}");
        }
    }

    #[test]
    fn decay_endpoints_and_midpoint() {
        let lin = sched(ScheduleKind::Linear);
        let cos = sched(ScheduleKind::Cosine);
        let con = sched(ScheduleKind::Constant);
        // Decay spans steps 10..=109.
        for s in [&lin, &cos] {
            assert!(close(s.lr_at(109), 1e-4), "{}: {}", s.kind, s.lr_at(109));
            assert!(close(s.lr_at(500), 1e-4), "{}: past the end", s.kind);
        }
        assert!(close(con.lr_at(109), 1e-3));
        assert!(close(con.lr_at(500), 1e-3));
        // Linear at step 34, 24 of the 99 decay steps in.
        assert!(close(lin.lr_at(34), 1e-3 - 0.9e-3 * 24.0 / 99.0));
        // Cosine at the middle of the decay is halfway between peak and floor.
        let mid = LrSchedule { total: 111, ..cos };
        assert!(close(mid.lr_at(60), 0.55e-3), "{}", mid.lr_at(60));
        // Cosine is above linear in the first half and below it in the second.
        assert!(cos.lr_at(30) > lin.lr_at(30));
        assert!(cos.lr_at(90) < lin.lr_at(90));
    }

    #[test]
    fn monotone_up_then_down() {
        for kind in [ScheduleKind::Linear, ScheduleKind::Cosine] {
            let s = sched(kind);
            for t in 0..9 {
                assert!(s.lr_at(t + 1) > s.lr_at(t), "{kind} warmup at {t}");
            }
            for t in 10..109 {
                assert!(s.lr_at(t + 1) < s.lr_at(t), "{kind} decay at {t}");
            }
        }
    }

    #[test]
    fn degenerate_runs_do_not_divide_by_zero() {
        let s = LrSchedule {
            peak: 2e-4,
            warmup: 0,
            total: 1,
            kind: ScheduleKind::Cosine,
            min_ratio: 0.0,
        };
        assert_eq!(s.lr_at(0), 2e-4);
        let s = LrSchedule {
            total: 0,
            warmup: 5,
            ..s
        };
        assert!(close(s.lr_at(0), 4e-5));
        assert!(s.lr_at(7).is_finite());
        // Warmup 0, decay to zero at the last step.
        let s = LrSchedule {
            warmup: 0,
            total: 3,
            ..s
        };
        assert_eq!(s.lr_at(0), 2e-4);
        assert!(s.lr_at(2).abs() < 1e-12);
    }

    #[test]
    fn kind_names_round_trip() {
        for kind in [
            ScheduleKind::Constant,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            assert_eq!(kind.to_string().parse::<ScheduleKind>().unwrap(), kind);
        }
        assert_eq!(
            "Cosine".parse::<ScheduleKind>().unwrap(),
            ScheduleKind::Cosine
        );
        let e = "exp".parse::<ScheduleKind>().unwrap_err().to_string();
        assert!(e.contains("'exp'") && e.contains("cosine"), "{e}");
        assert_eq!(
            serde_json::to_string(&ScheduleKind::Linear).unwrap(),
            "\"linear\""
        );
    }
}
