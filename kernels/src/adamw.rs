//! AdamW update, decoupled weight decay as `torch.optim.AdamW` applies it (decay first, then the Adam step).

use crate::Float;
use rayon::prelude::*;

/// Hyperparameters of one update; `step` counts from 1 (bias correction uses it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
}

/// The factor torch.nn.utils.clip_grad_norm_ scales every gradient by, from the squared global norm: max_norm /
/// (norm + 1e-6) when norm exceeds max_norm, else 1; in f32 as the CUDA AdamW kernel computes it from its device
/// copy of the norm.
pub fn clip_factor(norm_sq: f32, max_norm: f32) -> f32 {
    let norm = norm_sq.sqrt();
    if norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// p, g, m, v: \[n\] → p, m, v updated in place.
pub fn adamw_step<T: Float>(h: &AdamWStep, p: &mut [T], g: &[T], m: &mut [T], v: &mut [T]) {
    assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len(), "adamw: lengths differ");
    assert!(h.step >= 1, "adamw: step counts from 1");
    let bc1 = 1.0 - h.beta1.powf(h.step as f64);
    let bc2 = 1.0 - h.beta2.powf(h.step as f64);
    let (b1, b2) = (T::c(h.beta1), T::c(h.beta2));
    let decay = T::c(1.0 - h.lr * h.weight_decay);
    // Folding the bias corrections into one step size and epsilon, as torch's non-capturable path does:
    // p -= (lr/bc1) · m / (sqrt(v)/sqrt(bc2) + eps).
    let step_size = T::c(h.lr / bc1);
    let bc2_sqrt = T::c(bc2.sqrt());
    let eps = T::c(h.eps);
    const CHUNK: usize = 4096;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                let gi = g[i];
                m[i] = b1 * m[i] + (T::one() - b1) * gi;
                v[i] = b2 * v[i] + (T::one() - b2) * gi * gi;
                p[i] = p[i] * decay - step_size * m[i] / (v[i].sqrt() / bc2_sqrt + eps);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook update with explicit bias-corrected moments.
    fn reference(h: &AdamWStep, p: f64, g: f64, m: f64, v: f64) -> (f64, f64, f64) {
        let m = h.beta1 * m + (1.0 - h.beta1) * g;
        let v = h.beta2 * v + (1.0 - h.beta2) * g * g;
        let mhat = m / (1.0 - h.beta1.powi(h.step as i32));
        let vhat = v / (1.0 - h.beta2.powi(h.step as i32));
        let p = p * (1.0 - h.lr * h.weight_decay) - h.lr * mhat / (vhat.sqrt() + h.eps);
        (p, m, v)
    }

    #[test]
    fn matches_textbook_adamw_over_several_steps() {
        let mut rng = crate::Rng::new(4);
        let n = 9000; // spans several chunks
        let mut p: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let (mut rp, mut rm, mut rv) = (p.clone(), m.clone(), v.clone());
        for step in 1..=5 {
            let g: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            let h = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step };
            adamw_step(&h, &mut p, &g, &mut m, &mut v);
            for i in 0..n {
                (rp[i], rm[i], rv[i]) = reference(&h, rp[i], g[i], rm[i], rv[i]);
            }
        }
        for i in 0..n {
            assert!((p[i] - rp[i]).abs() < 1e-12, "[{i}] {} vs {}", p[i], rp[i]);
            assert!((m[i] - rm[i]).abs() < 1e-15 && (v[i] - rv[i]).abs() < 1e-15);
        }
    }

    #[test]
    fn first_step_moves_each_weight_by_about_lr() {
        let h = AdamWStep { lr: 0.5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1 };
        let (mut p, mut m, mut v) = (vec![1.0f32, 1.0], vec![0.0; 2], vec![0.0; 2]);
        adamw_step(&h, &mut p, &[3.0, -0.001], &mut m, &mut v);
        assert!((p[0] - 0.5).abs() < 1e-5 && (p[1] - 1.5).abs() < 1e-3, "{p:?}");
    }
}
