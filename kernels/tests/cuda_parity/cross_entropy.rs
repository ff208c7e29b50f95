use crate::common::{both_dtypes, check, poisoned, randn, upload, widen, Elem, REDUCED};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::testing::gpu;
use qlora_kernels::{cross_entropy, cuda, Rng};

#[test]
fn cross_entropy_matches_cpu() {
    let Some(dev) = gpu("cross_entropy_matches_cpu") else { return };
    both_dtypes!(cross_entropy_case, &dev, &mut Rng::new(5));
}

fn cross_entropy_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    for (rows, vocab) in [(1, 2), (3, 11), (7, 257), (33, 1000), (4, 32_003)] {
        let what = format!("{rows}x{vocab}");
        let logits = randn::<T>(rng, rows * vocab, 3.0);
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
