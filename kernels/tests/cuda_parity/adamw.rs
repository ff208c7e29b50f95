use crate::common::{check, narrow, parity_test, randn, upload, widen, Elem, LENS};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::testing::Tolerance;
use qlora_kernels::{adamw, cuda, Rng};

parity_test!(adamw_matches_cpu: adamw_case, seed 7);

fn adamw_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    for n in LENS {
        let p0 = randn::<T>(rng, n, 1.0);
        let (mut gp, mut gm, mut gv) = (upload(dev, &p0), dev.zeros::<f32>(n).unwrap(), dev.zeros::<f32>(n).unwrap());
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        for step in 1..=5 {
            let h = adamw::AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step };
            let g = randn::<T>(rng, n, 1.0);
            cuda::adamw::adamw_step(&h, &mut gp, &upload(dev, &g), &mut gm, &mut gv, None).unwrap();
            // The twin keeps p in T between steps, as the GPU does.
            let mut pw = widen(&p);
            adamw::adamw_step(&h, &mut pw, &widen(&g), &mut m, &mut v);
            p = narrow(&pw);
        }
        check(&format!("adamw p n={n}"), &gp, &widen(&p), T::TOL);
        check(&format!("adamw m n={n}"), &gm, &m, Tolerance::F32);
        check(&format!("adamw v n={n}"), &gv, &v, Tolerance::F32);
    }
}

/// Every parameter of an optimizer in one launch (`adamw_multi`, f32): the same bits as the CPU twin per tensor
/// (the kernel's per-element arithmetic is adamw_step's), for tensors of odd, empty and one-element lengths, with the
/// gradient clipped by a device norm and without; and the multi-tensor sum of squares against the CPU's sum.
#[test]
fn adamw_multi_matches_cpu() {
    let Some(dev) = qlora_kernels::testing::gpu("adamw_multi_matches_cpu") else { return };
    let rng = &mut Rng::new(17);
    let lens: Vec<usize> = LENS.into_iter().chain([0, 65_536, 229_377]).collect();
    let p0: Vec<Vec<f32>> = lens.iter().map(|&n| randn::<f32>(rng, n, 1.0)).collect();
    let mut gp: Vec<_> = p0.iter().map(|p| upload(&dev, p)).collect();
    let mut gm: Vec<_> = lens.iter().map(|&n| dev.zeros::<f32>(n).unwrap()).collect();
    let mut gv: Vec<_> = lens.iter().map(|&n| dev.zeros::<f32>(n).unwrap()).collect();
    let (mut p, mut m, mut v) = (
        p0.clone(),
        lens.iter().map(|&n| vec![0.0f32; n]).collect::<Vec<_>>(),
        lens.iter().map(|&n| vec![0.0f32; n]).collect::<Vec<_>>(),
    );
    for step in 1..=4 {
        let h = adamw::AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step };
        let g: Vec<Vec<f32>> = lens.iter().map(|&n| randn::<f32>(rng, n, 1.0)).collect();
        let gg: Vec<_> = g.iter().map(|g| upload(&dev, g)).collect();
        // The squared global norm on the device, as the optimizer forms it; clipped on even steps (max_norm 1).
        let mut norm_sq = dev.zeros::<f32>(1).unwrap();
        cuda::reduce::sum_squares_multi(&gg.iter().collect::<Vec<_>>(), &mut norm_sq, false).unwrap();
        let want_sq: f64 = g.iter().flatten().map(|&x| x as f64 * x as f64).sum();
        let got_sq = norm_sq.to_vec().unwrap()[0];
        assert!((got_sq as f64 - want_sq).abs() <= 1e-5 * want_sq, "sum_squares_multi {got_sq} vs {want_sq}");
        let clip = (step % 2 == 0).then_some((&norm_sq, 1.0f32));
        let mut params: Vec<cuda::adamw::MultiParam> = gp
            .iter_mut()
            .zip(&gg)
            .zip(gm.iter_mut().zip(gv.iter_mut()))
            .map(|((p, g), (m, v))| cuda::adamw::MultiParam { p, g, m, v })
            .collect();
        cuda::adamw::adamw_multi(&h, &mut params, clip).unwrap();
        // The twin clips by the factor of the GPU's own norm, as the kernel does.
        let factor = if step % 2 == 0 { adamw::clip_factor(got_sq, 1.0) } else { 1.0 };
        for i in 0..lens.len() {
            let gi: Vec<f32> = g[i].iter().map(|x| x * factor).collect();
            adamw::adamw_step(&h, &mut p[i], &gi, &mut m[i], &mut v[i]);
        }
    }
    for (i, n) in lens.iter().enumerate() {
        check(&format!("adamw_multi p n={n}"), &gp[i], &p[i], Tolerance::F32);
        check(&format!("adamw_multi m n={n}"), &gm[i], &m[i], Tolerance::F32);
        check(&format!("adamw_multi v n={n}"), &gv[i], &v[i], Tolerance::F32);
    }
}
