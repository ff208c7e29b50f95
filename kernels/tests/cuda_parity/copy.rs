use crate::common::{poisoned, upload};
use half::bf16;
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::testing::gpu;
use qlora_kernels::{cuda, Rng};

#[test]
fn casts_round_as_half_does() {
    let Some(dev) = gpu("casts_round_as_half_does") else { return };
    let mut rng = Rng::new(11);
    // 5_000_012 elements: threads take two 8-element chunks per step and loop; the twelve specials end the last
    // chunk and fill the tail of 4.
    let mut x: Vec<f32> =
        (0..5_000_000).map(|_| (rng.normal() * 10f64.powi(rng.below(60) as i32 - 30)) as f32).collect();
    // Ties (round to even), the largest finite values, infinities, signed zeros and subnormals.
    x.extend([1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), f32::MAX, -f32::MAX, f32::INFINITY, f32::NEG_INFINITY]);
    x.extend([0.0, -0.0, 1e-40, -3e-39, f32::MIN_POSITIVE, 3.3895314e38]);
    let gx = upload(&dev, &x);
    let mut b = poisoned::<bf16>(&dev, x.len());
    cuda::copy::cast(&gx, &mut b).unwrap();
    let b = b.to_vec().unwrap();
    let bits = |v: &[bf16]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&b), bits(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()), "cast f32 → bf16");

    let gb = upload(&dev, &b);
    let mut back = poisoned::<f32>(&dev, x.len());
    cuda::copy::cast(&gb, &mut back).unwrap();
    let fbits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(fbits(&back.to_vec().unwrap()), fbits(&b.iter().map(|v| v.to_f32()).collect::<Vec<_>>()), "bf16 → f32");

    let mut same = poisoned::<f32>(&dev, x.len());
    cuda::copy::cast(&gx, &mut same).unwrap();
    assert_eq!(fbits(&same.to_vec().unwrap()), fbits(&x), "cast f32 → f32");
    let mut same = poisoned::<bf16>(&dev, x.len());
    cuda::copy::cast(&gb, &mut same).unwrap();
    assert_eq!(bits(&same.to_vec().unwrap()), bits(&b), "cast bf16 → bf16");
    let mut nan = poisoned::<bf16>(&dev, 1);
    cuda::copy::cast(&upload(&dev, &[f32::NAN]), &mut nan).unwrap();
    assert!(nan.to_vec().unwrap()[0].is_nan(), "cast keeps NaN");
}

#[test]
fn casts_of_short_lengths_round_as_half_does() {
    let Some(dev) = gpu("casts_of_short_lengths_round_as_half_does") else { return };
    let mut rng = Rng::new(15);
    // Tail only, one chunk, chunks and a tail.
    for n in [1, 7, 8, 1003] {
        let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let mut b = poisoned::<bf16>(&dev, n);
        cuda::copy::cast(&upload(&dev, &x), &mut b).unwrap();
        let b = b.to_vec().unwrap();
        let want: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "f32 → bf16 n={n}"
        );
        let mut back = poisoned::<f32>(&dev, n);
        cuda::copy::cast(&upload(&dev, &b), &mut back).unwrap();
        let back: Vec<u32> = back.to_vec().unwrap().iter().map(|v| v.to_bits()).collect();
        assert_eq!(back, want.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>(), "bf16 → f32 n={n}");
    }
}

/// The CPU reference of strided_copy: the view's elements in row-major order.
fn gather<T: Copy>(src: &[T], offset: usize, shape: &[usize], strides: &[usize]) -> Vec<T> {
    let n: usize = shape.iter().product();
    (0..n)
        .map(|i| {
            let (mut rem, mut at) = (i, offset);
            for d in (0..shape.len()).rev() {
                at += (rem % shape[d]) * strides[d];
                rem /= shape[d];
            }
            src[at]
        })
        .collect()
}

#[test]
fn strided_copy_gathers_views() {
    let Some(dev) = gpu("strided_copy_gathers_views") else { return };
    let mut rng = Rng::new(12);
    let len = 5 * 7 * 9 + 11;
    let f: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
    strided_case(&dev, &f, "f32");
    strided_case(&dev, &f.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), "bf16");
    strided_case(&dev, &(0..len).map(|_| rng.next_u64() as i32).collect::<Vec<_>>(), "i32");
    strided_case(&dev, &(0..len).map(|_| rng.next_u64() as u8).collect::<Vec<_>>(), "u8");
}

/// Views of a buffer holding a [5, 7, 9] tensor after 11 elements: the whole tensor, transposed, narrowed, one
/// element (rank 0), a broadcast (stride 0), a rank-8 view, and an empty one. Compared bit for bit.
fn strided_case<T: cuda::DeviceCopy + PartialEq + std::fmt::Debug>(dev: &CudaDevice, src: &[T], name: &str) {
    let views: [(&str, usize, Vec<usize>, Vec<usize>); 8] = [
        ("contiguous", 11, vec![5, 7, 9], vec![63, 9, 1]),
        ("transposed 0↔2", 11, vec![9, 7, 5], vec![1, 9, 63]),
        ("permuted (1, 2, 0)", 11, vec![7, 9, 5], vec![9, 1, 63]),
        ("narrowed [1..4, 2..7, 3..8]", 11 + 63 + 18 + 3, vec![3, 5, 5], vec![63, 9, 1]),
        ("rank 0", 100, vec![], vec![]),
        ("broadcast rows", 11, vec![4, 9], vec![0, 1]),
        ("rank 8", 0, vec![2, 1, 2, 1, 2, 1, 2, 3], vec![150, 7, 70, 3, 30, 2, 9, 1]),
        ("empty", 11, vec![3, 0, 2], vec![1, 1, 1]),
    ];
    let gsrc = upload(dev, src);
    for (what, offset, shape, strides) in views {
        let want = gather(src, offset, &shape, &strides);
        let mut dst = upload(dev, &vec![src[0]; want.len()]);
        // Poison with a value the view does not hold where one exists, so unwritten elements show.
        if let Some(other) = src.iter().find(|v| !want.contains(v)) {
            dst = upload(dev, &vec![*other; want.len()]);
        }
        cuda::copy::strided_copy(&gsrc, offset, &shape, &strides, &mut dst).unwrap();
        assert_eq!(dst.to_vec().unwrap(), want, "strided_copy {what} [{name}]");
    }
}
