//! Dynamic loss scaling for fp16 training, with PyTorch `GradScaler`
//! semantics; device-independent (the device only reports whether the
//! step's gradients held an inf or NaN).
//!
//! The loss is multiplied by [`LossScaler::scale`] before backward, so small
//! fp16 gradients do not flush to zero; the optimizer step unscales them by
//! [`LossScaler::inv_scale`] (`kernels/optimizer.cu` folds it into AdamW's
//! gradient factor) and checks them for inf/NaN. Then
//! [`LossScaler::update`] with that flag:
//!
//! * inf/NaN found: the step is **skipped** (weights and AdamW moments stay
//!   as they were), the scale is multiplied by `backoff_factor` (0.5) but
//!   never goes below `min_scale`, and the count of good steps restarts;
//! * otherwise the step applies, and after `growth_interval` (2000)
//!   consecutive good steps the scale is multiplied by `growth_factor` (2)
//!   if that stays finite, and the count restarts.
//!
//! Initial scale 2^16. With the default factors the scale stays a power of
//! two, so scaling and unscaling are exact. `min_scale` is not in PyTorch
//! (which can back off forever): with it, a model whose gradients overflow
//! even at the floor keeps skipping steps, and [`StepOutcome::Skipped`]
//! says so (`at_floor`) for the caller to stop on. bf16 and fp32 training
//! need no scaling: [`LossScaler::disabled`] is scale 1, never changes and
//! never skips (the training loop's own non-finite check applies).

use serde::Serialize;

/// The scaler's settings; [`Default`] is PyTorch's `GradScaler()` plus a
/// floor of 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaleConfig {
    pub init_scale: f32,
    pub growth_factor: f32,
    pub backoff_factor: f32,
    pub growth_interval: u32,
    pub min_scale: f32,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        LossScaleConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            min_scale: 1.0,
        }
    }
}

/// What [`LossScaler::update`] decided for a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepOutcome {
    /// The optimizer step applies. `grew` when this step completed a growth
    /// interval and the scale went up.
    Applied { grew: bool },
    /// inf/NaN gradients: the optimizer step must not apply.
    Skipped {
        /// The scale the step ran at, and the one the next step gets.
        scale: f32,
        new_scale: f32,
        /// The scale was already at `min_scale`: it could not back off.
        at_floor: bool,
    },
}

impl StepOutcome {
    pub fn skipped(&self) -> bool {
        matches!(self, StepOutcome::Skipped { .. })
    }
}

impl std::fmt::Display for StepOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            StepOutcome::Applied { grew: false } => write!(f, "step applied"),
            StepOutcome::Applied { grew: true } => write!(f, "step applied; loss scale grown"),
            StepOutcome::Skipped {
                scale,
                new_scale,
                at_floor,
            } => {
                write!(
                    f,
                    "step skipped: inf/NaN gradients at loss scale {scale}; next scale {new_scale}"
                )?;
                if at_floor {
                    write!(
                        f,
                        " (at the minimum loss scale: gradients overflow even unscaled)"
                    )?;
                }
                Ok(())
            }
        }
    }
}

/// The scaler's state for logs and metrics (one JSON object per step).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LossScaleState {
    pub loss_scale: f32,
    /// Consecutive good steps since the last growth or overflow.
    pub good_steps: u32,
    /// Steps seen, and steps skipped, since the scaler was made.
    pub steps: u64,
    pub skipped_steps: u64,
}

#[derive(Clone, Debug)]
pub struct LossScaler {
    config: Option<LossScaleConfig>,
    scale: f32,
    good_steps: u32,
    steps: u64,
    skipped_steps: u64,
}

impl LossScaler {
    /// A dynamic scaler; panics on settings that could not work (a scale or
    /// floor that is not positive and finite, factors on the wrong side of 1,
    /// a zero interval, or an initial scale below the floor).
    pub fn new(config: LossScaleConfig) -> Self {
        let positive = |v: f32| v.is_finite() && v > 0.0;
        assert!(
            positive(config.init_scale)
                && positive(config.min_scale)
                && config.init_scale >= config.min_scale
                && config.growth_factor.is_finite()
                && config.growth_factor > 1.0
                && positive(config.backoff_factor)
                && config.backoff_factor < 1.0
                && config.growth_interval > 0,
            "invalid loss scale settings {config:?}"
        );
        LossScaler {
            config: Some(config),
            scale: config.init_scale,
            good_steps: 0,
            steps: 0,
            skipped_steps: 0,
        }
    }

    /// Scale 1, for bf16 and fp32: [`Self::update`] always applies.
    pub fn disabled() -> Self {
        LossScaler {
            config: None,
            scale: 1.0,
            good_steps: 0,
            steps: 0,
            skipped_steps: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.is_some()
    }

    /// The factor the loss (and so every gradient) is multiplied by.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// What gradients are multiplied by to undo the scale.
    pub fn inv_scale(&self) -> f32 {
        1.0 / self.scale
    }

    /// Records a step whose gradients were (`found_inf`) or were not
    /// inf/NaN, adjusts the scale, and says whether the step applies.
    pub fn update(&mut self, found_inf: bool) -> StepOutcome {
        self.steps += 1;
        let Some(config) = self.config else {
            return StepOutcome::Applied { grew: false };
        };
        if found_inf {
            let scale = self.scale;
            let new_scale = (scale * config.backoff_factor).max(config.min_scale);
            self.scale = new_scale;
            self.good_steps = 0;
            self.skipped_steps += 1;
            return StepOutcome::Skipped {
                scale,
                new_scale,
                at_floor: scale <= config.min_scale,
            };
        }
        self.good_steps += 1;
        if self.good_steps < config.growth_interval {
            return StepOutcome::Applied { grew: false };
        }
        self.good_steps = 0;
        let grown = self.scale * config.growth_factor;
        let grew = grown.is_finite();
        if grew {
            self.scale = grown;
        }
        StepOutcome::Applied { grew }
    }

    pub fn state(&self) -> LossScaleState {
        LossScaleState {
            loss_scale: self.scale,
            good_steps: self.good_steps,
            steps: self.steps,
            skipped_steps: self.skipped_steps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaler() -> LossScaler {
        LossScaler::new(LossScaleConfig::default())
    }

    #[test]
    fn starts_at_two_to_the_sixteen_and_unscales_exactly() {
        let s = scaler();
        assert_eq!(s.scale(), 65536.0);
        assert_eq!(s.inv_scale(), 1.0 / 65536.0);
        assert_eq!(0.123f32 * s.scale() * s.inv_scale(), 0.123);
        assert!(s.enabled());
    }

    #[test]
    fn overflow_skips_the_step_and_halves_the_scale() {
        let mut s = scaler();
        for _ in 0..10 {
            assert_eq!(s.update(false), StepOutcome::Applied { grew: false });
        }
        let outcome = s.update(true);
        assert_eq!(
            outcome,
            StepOutcome::Skipped {
                scale: 65536.0,
                new_scale: 32768.0,
                at_floor: false
            }
        );
        assert!(outcome.skipped());
        assert_eq!(
            outcome.to_string(),
            "step skipped: inf/NaN gradients at loss scale 65536; next scale 32768"
        );
        assert_eq!(
            s.state(),
            LossScaleState {
                loss_scale: 32768.0,
                good_steps: 0,
                steps: 11,
                skipped_steps: 1
            }
        );
        // Two overflows in a row: halved twice.
        s.update(true);
        assert_eq!(s.scale(), 16384.0);
    }

    #[test]
    fn grows_after_exactly_the_interval_of_good_steps() {
        let mut s = scaler();
        for step in 1..2000 {
            assert_eq!(
                s.update(false),
                StepOutcome::Applied { grew: false },
                "{step}"
            );
        }
        assert_eq!(s.scale(), 65536.0);
        assert_eq!(s.update(false), StepOutcome::Applied { grew: true });
        assert_eq!(s.scale(), 131072.0);
        assert_eq!(s.state().good_steps, 0);
        // The next growth needs another full interval.
        for _ in 1..2000 {
            s.update(false);
        }
        assert_eq!(s.scale(), 131072.0);
        s.update(false);
        assert_eq!(s.scale(), 262144.0);
    }

    #[test]
    fn an_overflow_restarts_the_growth_interval() {
        let mut s = scaler();
        for _ in 0..1999 {
            s.update(false);
        }
        s.update(true);
        assert_eq!(s.scale(), 32768.0);
        for _ in 0..1999 {
            s.update(false);
        }
        assert_eq!(s.scale(), 32768.0, "1999 good steps after the overflow");
        assert_eq!(s.update(false), StepOutcome::Applied { grew: true });
        assert_eq!(s.scale(), 65536.0);
    }

    #[test]
    fn never_backs_off_below_the_floor() {
        let mut s = scaler();
        let mut last = None;
        for _ in 0..40 {
            last = Some(s.update(true));
            assert!(s.scale() >= 1.0);
        }
        assert_eq!(s.scale(), 1.0);
        assert_eq!(
            last,
            Some(StepOutcome::Skipped {
                scale: 1.0,
                new_scale: 1.0,
                at_floor: true
            })
        );
        assert!(last.unwrap().to_string().contains("minimum loss scale"));
        assert_eq!(s.state().skipped_steps, 40);
        // 16 halvings reach the floor from 2^16; the 17th was already there.
        let mut t = scaler();
        for _ in 0..16 {
            assert!(matches!(
                t.update(true),
                StepOutcome::Skipped {
                    at_floor: false,
                    ..
                }
            ));
        }
        assert!(matches!(
            t.update(true),
            StepOutcome::Skipped { at_floor: true, .. }
        ));
    }

    #[test]
    fn never_grows_to_infinity() {
        let mut s = LossScaler::new(LossScaleConfig {
            init_scale: f32::MAX / 1.5,
            growth_interval: 1,
            ..LossScaleConfig::default()
        });
        assert_eq!(s.update(false), StepOutcome::Applied { grew: false });
        assert_eq!(s.scale(), f32::MAX / 1.5);
    }

    /// A training run with injected overflows: the gradients overflow fp16
    /// whenever scale × the largest gradient exceeds 65504. The scaler
    /// settles on the largest power of two that fits, skips exactly the
    /// overflowing steps, and probes one growth per interval.
    #[test]
    fn settles_below_overflow_under_injection() {
        let max_grad = 0.3f32; // fits up to scale 2^17 (0.3 * 2^18 > 65504)
        let mut s = scaler();
        let (mut applied, mut skipped) = (0, 0);
        for _ in 0..20_000 {
            let overflow = max_grad * s.scale() > 65504.0;
            match s.update(overflow) {
                StepOutcome::Applied { .. } => applied += 1,
                StepOutcome::Skipped { .. } => skipped += 1,
            }
            assert!(s.scale() <= 262144.0);
        }
        // 2^16 -> 2^17 at step 2000 and 2^18 at 4000; 2^18 overflows at the
        // next step (skipped, back to 2^17), and then every 2001 steps the
        // scaler probes 2^18 again: skips at 4001, 6002, ..., 18008.
        assert_eq!(skipped, 8);
        assert_eq!(applied, 20_000 - 8);
        assert_eq!(s.state().skipped_steps, 8);
        assert!(s.scale() == 131072.0 || s.scale() == 262144.0);
    }

    #[test]
    fn disabled_is_scale_one_and_never_skips() {
        let mut s = LossScaler::disabled();
        assert!(!s.enabled());
        assert_eq!(s.scale(), 1.0);
        assert_eq!(s.update(true), StepOutcome::Applied { grew: false });
        for _ in 0..5000 {
            s.update(false);
        }
        assert_eq!(s.scale(), 1.0);
        assert_eq!(s.state().skipped_steps, 0);
    }

    #[test]
    fn state_is_metrics_friendly_json() {
        let mut s = scaler();
        s.update(true);
        let json = serde_json::to_value(s.state()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "loss_scale": 32768.0,
                "good_steps": 0,
                "steps": 1,
                "skipped_steps": 1,
            })
        );
    }

    #[test]
    #[should_panic(expected = "invalid loss scale settings")]
    fn rejects_a_backoff_that_grows() {
        LossScaler::new(LossScaleConfig {
            backoff_factor: 2.0,
            ..LossScaleConfig::default()
        });
    }
}
