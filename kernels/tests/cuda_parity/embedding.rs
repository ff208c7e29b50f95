use crate::common::{check, parity_test, poisoned, randn, upload, widen, Elem, EXACT};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::testing::gpu;
use qlora_kernels::{cuda, embedding, Rng};

parity_test!(embedding_matches_cpu_bit_for_bit: embedding_case, seed 6);

fn embedding_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    // Few ids over many tokens: heavy repetition, the backward's hard case. Forward: dims of a multiple of 8 take the
    // 16-byte path (100 × 256 × 40_000: threads copy four runs per step and loop), the others the scalar one.
    let shapes = [(1, 1, 1), (5, 3, 4), (4, 8, 3000), (1000, 33, 2000), (7, 4099, 40), (50, 257, 0), (1000, 64, 3)];
    for (vocab, dim, n) in shapes.into_iter().chain([(100, 256, 40_000), (30, 2048, 7)]) {
        let what = format!("vocab {vocab} dim {dim} n {n}");
        let table = randn::<T>(rng, vocab * dim, 1.0);
        let ids: Vec<i32> = (0..n).map(|_| rng.below(vocab as u64) as i32).collect();
        let gids = upload(dev, &ids);
        let mut out = poisoned::<T>(dev, n * dim);
        cuda::embedding::embedding_forward(&upload(dev, &table), &gids, dim, &mut out).unwrap();
        let mut want = vec![0.0f32; n * dim];
        embedding::embedding_forward(&widen(&table), &ids, dim, &mut want);
        check(&format!("embedding_forward {what}"), &out, &want, EXACT);

        let d_out = randn::<T>(rng, n * dim, 1.0);
        let prior = randn::<T>(rng, vocab * dim, 1.0);
        let mut d_table = upload(dev, &prior);
        cuda::embedding::embedding_backward_accumulate(&upload(dev, &d_out), &gids, dim, &mut d_table).unwrap();
        let mut want = widen(&prior);
        embedding::embedding_backward_accumulate(&widen(&d_out), &ids, dim, &mut want);
        check(&format!("embedding_backward_accumulate {what}"), &d_table, &want, EXACT);
    }
}

#[test]
fn embedding_marks_a_bad_id_with_nan() {
    let Some(dev) = gpu("embedding_marks_a_bad_id_with_nan") else { return };
    let table = upload(&dev, &[1.0f32, 2.0, 3.0, 4.0]);
    let mut out = poisoned::<f32>(&dev, 6);
    cuda::embedding::embedding_forward(&table, &upload(&dev, &[1, 2, -1]), 2, &mut out).unwrap();
    let out = out.to_vec().unwrap();
    assert_eq!(&out[..2], [3.0, 4.0]);
    assert!(out[2..].iter().all(|v| v.is_nan()), "{out:?}");
    // Rows of 8: the 16-byte path.
    let table: Vec<f32> = (0..16).map(|v| v as f32).collect();
    let mut out = poisoned::<f32>(&dev, 24);
    cuda::embedding::embedding_forward(&upload(&dev, &table), &upload(&dev, &[2, 1, 0]), 8, &mut out).unwrap();
    let out = out.to_vec().unwrap();
    assert!(out[..8].iter().all(|v| v.is_nan()), "{out:?}");
    assert_eq!(&out[8..], &[&table[8..], &table[..8]].concat()[..]);
}
