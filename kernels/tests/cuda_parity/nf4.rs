use crate::common::{poisoned, upload};
use half::bf16;
use qlora_kernels::testing::gpu;
use qlora_kernels::{cuda, nf4, Rng};

#[test]
fn nf4_dequantization_matches_cpu_bit_for_bit() {
    let Some(dev) = gpu("nf4_dequantization_matches_cpu_bit_for_bit") else { return };
    let mut rng = Rng::new(8);
    let tiny = 1.5 * f32::MIN_POSITIVE;
    for (n, blocksize) in [(1, 64), (63, 64), (1001, 64), (64 * 37 + 3, 32), (5000, 256), (4096, 4096)] {
        let what = format!("n {n} blocksize {blocksize}");
        let mut x: Vec<f32> = (0..n).map(|_| (0.02 * rng.normal()) as f32).collect();
        // A block whose products are subnormal: both sides flush them to zero.
        x.iter_mut().take(blocksize.min(n)).enumerate().for_each(|(i, v)| *v = tiny * ((i % 7) as f32 - 3.0) / 3.0);
        let mut packed = vec![0u8; nf4::nf4_packed_len(n)];
        let mut absmax = vec![0.0f32; nf4::nf4_num_blocks(n, blocksize)];
        nf4::quantize_nf4(&x, blocksize, &mut packed, &mut absmax);
        let (gq, ga) = (upload(&dev, &packed), upload(&dev, &absmax));

        let mut out = poisoned::<f32>(&dev, n);
        cuda::nf4::dequantize_nf4(&gq, &ga, blocksize, &mut out).unwrap();
        let mut want = vec![0.0f32; n];
        nf4::dequantize_nf4(&packed, &absmax, blocksize, &mut want);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out.to_vec().unwrap()), bits(&want), "dequantize_nf4 f32 {what}");

        let mut out = poisoned::<bf16>(&dev, n);
        cuda::nf4::dequantize_nf4(&gq, &ga, blocksize, &mut out).unwrap();
        let mut want = vec![bf16::ZERO; n];
        nf4::dequantize_nf4(&packed, &absmax, blocksize, &mut want);
        let bits16 = |v: &[bf16]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits16(&out.to_vec().unwrap()), bits16(&want), "dequantize_nf4 bf16 {what}");
    }

    for nb in [1, 255, 600, 4097] {
        let absmax: Vec<f32> = (0..nb).map(|_| (0.05 + 0.01 * rng.normal()).abs() as f32).collect();
        let nested = nf4::quantize_absmax_nested(&absmax);
        let code = upload(&dev, &nf4::DYNAMIC_MAP_SIGNED);
        let mut out = poisoned::<f32>(&dev, nb);
        let (gq, g2) = (upload(&dev, &nested.qabsmax), upload(&dev, &nested.absmax2));
        cuda::nf4::dequantize_absmax_nested(&gq, &g2, nested.offset, &code, &mut out).unwrap();
        let mut want = vec![0.0f32; nb];
        nf4::dequantize_absmax_nested(
            &nested.qabsmax,
            &nested.absmax2,
            nested.offset,
            &nf4::DYNAMIC_MAP_SIGNED,
            &mut want,
        );
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out.to_vec().unwrap()), bits(&want), "dequantize_absmax_nested nb {nb}");
    }
}
