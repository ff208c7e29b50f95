//! Learning-rate schedules with linear warmup, as Hugging Face's `get_*_schedule_with_warmup` define them.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// The learning rate for optimizer step `step` (0-based): warmup ramps from 0 to the peak over
    /// `warmup_steps`, then linear decays to 0 at `total_steps` and cosine follows half a cosine to 0.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        match self.kind {
            ScheduleKind::Constant => self.peak_lr,
            ScheduleKind::Linear => self.peak_lr * (1.0 - progress),
            ScheduleKind::Cosine => self.peak_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_shapes() {
        let s = |kind| Schedule { kind, peak_lr: 1.0, warmup_steps: 10, total_steps: 110 };
        for kind in [ScheduleKind::Constant, ScheduleKind::Linear, ScheduleKind::Cosine] {
            assert_eq!(s(kind).lr_at(0), 0.0);
            assert!((s(kind).lr_at(5) - 0.5).abs() < 1e-12);
            assert!((s(kind).lr_at(10) - 1.0).abs() < 1e-12);
        }
        assert_eq!(s(ScheduleKind::Constant).lr_at(1000), 1.0);
        assert!((s(ScheduleKind::Linear).lr_at(60) - 0.5).abs() < 1e-12);
        assert!((s(ScheduleKind::Cosine).lr_at(60) - 0.5).abs() < 1e-12);
        assert!(s(ScheduleKind::Cosine).lr_at(110).abs() < 1e-12);
        assert_eq!(s(ScheduleKind::Linear).lr_at(500), 0.0, "clamped past the end");
        let no_warmup = Schedule { kind: ScheduleKind::Linear, peak_lr: 2.0, warmup_steps: 0, total_steps: 4 };
        assert_eq!(no_warmup.lr_at(0), 2.0);
    }
}
