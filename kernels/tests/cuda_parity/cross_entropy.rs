use crate::common::{check, parity_test, poisoned, randn, upload, widen, Elem, REDUCED};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::testing::gpu;
use qlora_kernels::{cross_entropy, cuda, Rng};

parity_test!(cross_entropy_matches_cpu: cross_entropy_case, seed 5);

fn cross_entropy_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    // Rows start 16-byte aligned when vocab is a multiple of 8 (1000, 128256), else each at its own offset, with up to
    // 7 (bf16) or 3 (f32) logits before the first chunk (11, 257, 1003, 32003); 7: no chunk at all; 8, 16: chunks
    // only. Each case also runs with logits near 1e4 and some −∞ (masked) ones.
    let shapes = [(1, 2), (3, 11), (7, 257), (33, 1000), (4, 32_003), (2, 128_256), (3, 1003), (5, 8), (2, 7), (3, 16)];
    for ((rows, vocab), shift) in shapes.into_iter().flat_map(|s| [(s, 0.0), (s, 1e4)]) {
        let what = format!("{rows}x{vocab} shift {shift}");
        let mut logits = randn::<T>(rng, rows * vocab, 3.0);
        // About a third of the rows ignored, the first always trained.
        let targets: Vec<i32> =
            (0..rows)
                .map(|r| {
                    if r > 0 && rng.below(3) == 0 {
                        cross_entropy::IGNORE_INDEX
                    } else {
                        rng.below(vocab as u64) as i32
                    }
                })
                .collect();
        if shift != 0.0 {
            // Masked logits other than the targets (a −∞ target's loss is +∞ on both sides, which no tolerance takes).
            for (i, v) in logits.iter_mut().enumerate() {
                let masked = i % 5 == 3 && targets[i / vocab] != (i % vocab) as i32;
                *v = T::from_f32(if masked { f32::NEG_INFINITY } else { shift + v.to_f32() });
            }
        }
        let d_loss: Vec<f32> = (0..rows).map(|_| rng.normal() as f32).collect();
        let lw = widen(&logits);
        let (gl, gt, gd) = (upload(dev, &logits), upload(dev, &targets), upload(dev, &d_loss));
        let (mut loss, mut lse) = (poisoned::<f32>(dev, rows), poisoned::<f32>(dev, rows));
        cuda::cross_entropy::cross_entropy_forward(&gl, &gt, vocab, &mut loss, &mut lse).unwrap();
        let (mut want_loss, mut want_lse) = (vec![0.0f32; rows], vec![0.0f32; rows]);
        cross_entropy::cross_entropy_forward(&lw, &targets, vocab, &mut want_loss, &mut want_lse);
        check(&format!("cross_entropy loss {what}"), &loss, &want_loss, REDUCED);
        check(&format!("cross_entropy lse {what}"), &lse, &want_lse, REDUCED);

        let mut d_logits = poisoned::<T>(dev, rows * vocab);
        let cpu_lse = upload(dev, &want_lse);
        cuda::cross_entropy::cross_entropy_backward(&gl, &gt, &cpu_lse, &gd, vocab, &mut d_logits).unwrap();
        let mut want = vec![0.0f32; rows * vocab];
        cross_entropy::cross_entropy_backward(&lw, &targets, &want_lse, &d_loss, vocab, &mut want);
        check(&format!("cross_entropy d_logits {what}"), &d_logits, &want, T::tol(REDUCED));
    }
}

#[test]
fn cross_entropy_marks_a_bad_target_with_nan() {
    let Some(dev) = gpu("cross_entropy_marks_a_bad_target_with_nan") else { return };
    let (rows, vocab) = (3, 5);
    let logits = upload(&dev, &vec![0.5f32; rows * vocab]);
    let targets = upload(&dev, &[1, 5, cross_entropy::IGNORE_INDEX]);
    let (mut loss, mut lse) = (poisoned::<f32>(&dev, rows), poisoned::<f32>(&dev, rows));
    cuda::cross_entropy::cross_entropy_forward(&logits, &targets, vocab, &mut loss, &mut lse).unwrap();
    let loss = loss.to_vec().unwrap();
    assert!(loss[0].is_finite() && loss[1].is_nan() && loss[2] == 0.0, "{loss:?}");
    let mut d = poisoned::<f32>(&dev, rows * vocab);
    cuda::cross_entropy::cross_entropy_backward(&logits, &targets, &lse, &upload(&dev, &[1.0f32; 3]), vocab, &mut d)
        .unwrap();
    let d = d.to_vec().unwrap();
    assert!(d[..vocab].iter().all(|v| v.is_finite()) && d[vocab..2 * vocab].iter().all(|v| v.is_nan()));
    assert!(d[2 * vocab..].iter().all(|&v| v == 0.0));
}
