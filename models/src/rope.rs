//! Rotary inverse frequencies from a config, with the scalings transformers applies
//! (`modeling_rope_utils.py`: default, linear, llama3), computed in f32 as transformers does.

use crate::config::{Rope, RopeScaling};
use qlora_runtime::rope_inv_freq;

/// inv_freq: [head_dim / 2].
pub fn inv_freq(rope: &Rope, head_dim: usize) -> Vec<f32> {
    let base = rope_inv_freq::<f32>(head_dim, rope.theta);
    match rope.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let (factor, low, high, old) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                original_max_position_embeddings as f32,
            );
            let low_wavelen = old / low;
            let high_wavelen = old / high;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_bands() {
        let rope = Rope {
            theta: 500_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let base = rope_inv_freq::<f32>(128, 500_000.0);
        let scaled = inv_freq(&rope, 128);
        // High frequencies (short wavelengths) untouched, the lowest divided by the factor, the middle blended.
        assert_eq!(scaled[0], base[0]);
        assert_eq!(scaled[63], base[63] / 8.0);
        let mid: Vec<usize> = (0..64).filter(|&i| scaled[i] != base[i] && scaled[i] != base[i] / 8.0).collect();
        assert!(!mid.is_empty(), "some frequencies fall in the blended band");
        for i in mid {
            assert!(scaled[i] < base[i] && scaled[i] > base[i] / 8.0);
        }
        let lin = inv_freq(&Rope { theta: 10_000.0, scaling: RopeScaling::Linear { factor: 8.0 } }, 8);
        assert_eq!(lin[0], 1.0 / 8.0);
    }
}
