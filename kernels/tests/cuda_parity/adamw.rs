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
