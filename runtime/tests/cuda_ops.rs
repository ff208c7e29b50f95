//! The execution contract of the runtime ops, on every device through `test_device!`: scalars a step produces (a
//! loss, its gradient spread over rows, a squared gradient norm) stay tensors on the op's device and are made there
//! without reading anything back; attention takes its boundaries as `SeqLens`; `read_scalars` reads several values
//! in one wait. Each body runs on the CPU (in CI) and on CUDA where a GPU is present (the GPU suite), where it also
//! counts the host's waits.

use qlora_runtime::cuda::{read_scalars, synchronizations};
use qlora_runtime::op::first_grad;
use qlora_runtime::ops::attention::{attention, AttentionParams, SeqLens};
use qlora_runtime::ops::concat::write_rows;
use qlora_runtime::ops::cross_entropy::cross_entropy_op;
use qlora_runtime::ops::elementwise::broadcast_scaled;
use qlora_runtime::ops::reduce::{sum, sum_rows_product, sum_squares_into};
use qlora_runtime::testing::{assert_close, Tolerance};
use qlora_runtime::{test_device, DType, Device, Rng, Tensor};

/// f32 sums over a few hundred values in another order than the host's f64.
const SUM: Tolerance = Tolerance { abs: 1e-4, rel: 1e-5 };

fn randn(shape: &[usize], rng: &mut Rng, device: Device) -> Tensor {
    Tensor::randn(shape, 1.0, DType::F32, rng).to_device(device).unwrap()
}

/// Runs `f` and returns what it gave and the host's waits for `device` meanwhile.
fn waits<R>(device: Device, f: impl FnOnce() -> R) -> (R, u64) {
    let before = synchronizations(device).unwrap();
    let r = f();
    (r, synchronizations(device).unwrap() - before)
}

fn scalars_stay_on_the_device(device: Device) {
    let mut rng = Rng::new(1);
    let x = randn(&[7, 33], &mut rng, device);
    let ((s, full, spread, mut sq), n) = waits(device, || {
        let s = sum(&x).unwrap();
        let full = Tensor::full_on(&[3, 2], 1.5, DType::F32, device).unwrap();
        let spread = broadcast_scaled(&s, 0.5, &[4, 5], DType::F32).unwrap();
        let mut sq = Tensor::zeros_on(&[], DType::F32, device).unwrap();
        sum_squares_into(&x, &mut sq).unwrap();
        sum_squares_into(&full, &mut sq).unwrap();
        (s, full, spread, sq)
    });
    assert_eq!(n, 0, "making and combining device scalars waits for nothing");
    for t in [&s, &full, &spread, &sq] {
        assert_eq!(t.device(), device);
    }
    let host = x.to_vec::<f64>();
    let want_sum: f64 = host.iter().sum();
    let want_sq: f64 = host.iter().map(|v| v * v).sum::<f64>() + 6.0 * 1.5 * 1.5;
    let (values, n) = waits(device, || read_scalars(&[&s, &sq]).unwrap());
    assert!(device == Device::Cpu || n == 1, "two scalars read in one wait, not {n}");
    assert_close("sum, Σx²", &values, &[want_sum, want_sq], SUM);
    assert_eq!(full.to_vec::<f32>(), vec![1.5; 6]);
    assert_close("spread", &spread.to_vec::<f64>(), &[0.5 * values[0]; 20], SUM);
    sq = sq.to_device(Device::Cpu).unwrap();
    assert_eq!(sq.shape(), [] as [usize; 0]);
}
test_device!(scalars_stay_on_the_device, scalars_stay_on_the_device_cpu, scalars_stay_on_the_device_cuda);

/// Σ over rows of x⊙y (DoRA's magnitude gradient) on the op's device without waiting: the column sums of the
/// product, in bf16 too; x and y of different shapes are an error naming the op.
fn column_sums_of_a_product(device: Device) {
    let mut rng = Rng::new(3);
    let (x, y) = (randn(&[2, 17, 40], &mut rng, device), randn(&[2, 17, 40], &mut rng, device));
    let (xs, ys) = (x.to_vec::<f64>(), y.to_vec::<f64>());
    let mut want = vec![0.0f64; 40];
    for (i, (a, b)) in xs.iter().zip(&ys).enumerate() {
        want[i % 40] += a * b;
    }
    for (dtype, tol) in [(DType::F32, SUM), (DType::BF16, Tolerance { abs: 0.1, rel: 1e-2 })] {
        let (x, y) = (x.to_dtype(dtype), y.to_dtype(dtype));
        let (got, n) = waits(device, || sum_rows_product(&x, &y).unwrap());
        assert_eq!((n, got.shape(), got.device()), (0, &[40][..], device), "{dtype:?}");
        assert_close(&format!("sum_rows_product {dtype:?}"), &got.to_vec::<f64>(), &want, tol);
    }
    let e = sum_rows_product(&x, &randn(&[34, 41], &mut rng, device)).unwrap_err().to_string();
    assert!(e.contains("sum_rows_product"), "{e}");
}
test_device!(column_sums_of_a_product, column_sums_of_a_product_cpu, column_sums_of_a_product_cuda);

/// The loss a tape records and its backward: no wait on either side, and dlogits = (softmax − onehot)/normalizer.
fn loss_and_its_gradient_wait_for_nothing(device: Device) {
    let mut rng = Rng::new(2);
    let (rows, vocab) = (5, 11);
    let logits = randn(&[rows, vocab], &mut rng, device);
    let targets = Tensor::from_vec(vec![3i32, -100, 0, 10, 7], &[rows]).unwrap().to_device(device).unwrap();
    let normalizer = 4.0;
    let ((loss, dlogits), n) = waits(device, || {
        let (loss, grad) = cross_entropy_op(&logits, &targets, normalizer).unwrap();
        let seed = Tensor::full_on(&[], 1.0, DType::F32, device).unwrap();
        let d = grad.backward(&[Some(seed)]).unwrap();
        (loss, first_grad(&d).unwrap().clone())
    });
    assert_eq!(n, 0, "the loss and its backward stay on the device");
    let x = logits.to_vec::<f64>();
    let t = [3i64, -100, 0, 10, 7];
    let (mut want_loss, mut want_d) = (0.0, vec![0.0; rows * vocab]);
    for r in 0..rows {
        let row = &x[r * vocab..(r + 1) * vocab];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
        if t[r] < 0 {
            continue;
        }
        want_loss += m + z.ln() - row[t[r] as usize];
        for c in 0..vocab {
            let p = (row[c] - m).exp() / z;
            want_d[r * vocab + c] = (p - if c == t[r] as usize { 1.0 } else { 0.0 }) / normalizer;
        }
    }
    assert_close("loss", &[loss.to_scalar::<f64>().unwrap()], &[want_loss / normalizer], SUM);
    assert_close("dlogits", &dlogits.to_vec::<f64>(), &want_d, Tolerance { abs: 1e-6, rel: 1e-5 });
}
test_device!(
    loss_and_its_gradient_wait_for_nothing,
    loss_and_its_gradient_wait_for_nothing_cpu,
    loss_and_its_gradient_wait_for_nothing_cuda
);

/// Causal attention of 4 query heads over 2 KV heads of 8.
fn causal_gqa(sliding_window: Option<usize>) -> AttentionParams {
    AttentionParams { n_heads: 4, n_kv_heads: 2, head_dim: 8, scale: 0.35, causal: true, sliding_window, softcap: None }
}

/// Attention with boundaries made on the host reads nothing back, and checks them against the tensors there.
fn attention_takes_host_boundaries(device: Device) {
    let mut rng = Rng::new(3);
    let p = causal_gqa(Some(3));
    let cu = SeqLens::new(&[0, 2, 7, 7, 9], device).unwrap();
    assert_eq!((cu.max_len(), cu.total(), cu.n_seqs()), (5, 9, 4));
    let (q, k, v) =
        (randn(&[9, 4, 8], &mut rng, device), randn(&[9, 2, 8], &mut rng, device), randn(&[9, 2, 8], &mut rng, device));
    let ((out, _), n) = waits(device, || attention(&p, [&q, &k, &v], [&cu, &cu]).unwrap());
    assert_eq!(n, 0, "boundaries are read on the host");
    let host = |t: &Tensor| t.to_device(Device::Cpu).unwrap();
    let cpu_cu = cu.to_device(Device::Cpu).unwrap();
    let (want, _) = attention(&p, [&host(&q), &host(&k), &host(&v)], [&cpu_cu, &cpu_cu]).unwrap();
    assert_close("attention", &out.to_vec::<f64>(), &want.to_vec::<f64>(), Tolerance { abs: 1e-5, rel: 1e-4 });

    let short = SeqLens::new(&[0, 2, 7], device).unwrap();
    let e = attention(&p, [&q, &k, &v], [&short, &short]).unwrap_err().to_string();
    assert!(e.contains("cu_seqlens_q ends at 7 for 9 tokens"), "{e}");
    assert!(SeqLens::new(&[0, 3, 2], device).unwrap_err().to_string().contains("never decrease"));
}
test_device!(
    attention_takes_host_boundaries,
    attention_takes_host_boundaries_cpu,
    attention_takes_host_boundaries_cuda
);

/// Rows written in place land where asked and nowhere else, in any float dtype; attention over a view of a buffer's
/// first rows (a KV cache's filled rows ahead of its spare ones) equals attention over exactly those rows.
fn rows_written_in_place_and_read_as_a_view(device: Device) {
    let mut rng = Rng::new(4);
    for dtype in [DType::F32, DType::BF16] {
        let mut buffer = Tensor::zeros_on(&[6, 2, 8], dtype, device).unwrap();
        let rows = randn(&[2, 2, 8], &mut rng, device).try_to_dtype(dtype).unwrap();
        let alias = buffer.clone();
        write_rows(&mut buffer, 3, &rows).unwrap();
        let got = buffer.to_vec::<f64>();
        let mut want = vec![0.0; 6 * 16];
        want[3 * 16..5 * 16].copy_from_slice(&rows.to_vec::<f64>());
        assert_eq!(got, want, "{dtype:?}");
        assert_eq!(alias.to_vec::<f64>(), vec![0.0; 6 * 16], "a tensor sharing the storage does not see the write");
        let e = write_rows(&mut buffer, 5, &rows).unwrap_err().to_string();
        assert!(e.contains("at row 5"), "{e}");
    }

    let p = causal_gqa(None);
    // 5 filled rows of 8: the spare ones hold values a wrong read would notice.
    let (k_buf, v_buf) = (randn(&[8, 2, 8], &mut rng, device), randn(&[8, 2, 8], &mut rng, device));
    let (k, v) = (k_buf.narrow(0, 0, 5).unwrap(), v_buf.narrow(0, 0, 5).unwrap());
    let q = randn(&[2, 4, 8], &mut rng, device);
    let (cu_q, cu_k) = (SeqLens::new(&[0, 2], device).unwrap(), SeqLens::new(&[0, 5], device).unwrap());
    let (out, _) = attention(&p, [&q, &k, &v], [&cu_q, &cu_k]).unwrap();
    let exact = |t: &Tensor| Tensor::from_vec(t.to_vec::<f32>(), t.shape()).unwrap().to_device(device).unwrap();
    let (want, _) = attention(&p, [&q, &exact(&k), &exact(&v)], [&cu_q, &cu_k]).unwrap();
    assert_eq!(out.to_vec::<f32>(), want.to_vec::<f32>());
}
test_device!(
    rows_written_in_place_and_read_as_a_view,
    rows_written_in_place_and_read_as_a_view_cpu,
    rows_written_in_place_and_read_as_a_view_cuda
);
