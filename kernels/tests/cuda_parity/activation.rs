use crate::common::{check, parity_test, poisoned, randn, upload, widen, Elem, LENS};
use qlora_kernels::activation::Glu;
use qlora_kernels::cuda::{CudaDevice, DeviceBuffer};
use qlora_kernels::{activation, cuda, Rng};

parity_test!(activations_match_cpu: activation_case, seed 2);

type CpuUnary = fn(&[f32], &mut [f32]);
type CpuBinary = fn(&[f32], &[f32], &mut [f32]);
type GpuUnary<T> = fn(&DeviceBuffer<T>, &mut DeviceBuffer<T>) -> cuda::Result<()>;
type GpuBinary<T> = fn(&DeviceBuffer<T>, &DeviceBuffer<T>, &mut DeviceBuffer<T>) -> cuda::Result<()>;

fn activation_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    const CAP: f32 = 30.0;
    let unary: [(&str, GpuUnary<T>, CpuUnary); 2] = [
        ("silu_forward", cuda::activation::silu_forward, activation::silu_forward),
        ("gelu_tanh_forward", cuda::activation::gelu_tanh_forward, activation::gelu_tanh_forward),
    ];
    let binary: [(&str, GpuBinary<T>, CpuBinary); 2] = [
        ("silu_backward", cuda::activation::silu_backward, activation::silu_backward),
        ("gelu_tanh_backward", cuda::activation::gelu_tanh_backward, activation::gelu_tanh_backward),
    ];
    // 5_000_003: more 8-element chunks than twice a wave has threads, so threads take two chunks per step and loop;
    // a tail of 3. LENS: no chunk (1, 7), one chunk per thread at most, tails of 3 and 1.
    for n in LENS.into_iter().chain([5_000_003]) {
        // Spread over the saturating tails as well as the curved middle.
        let (x, u, g) = (randn::<T>(rng, n, 4.0), randn::<T>(rng, n, 1.0), randn::<T>(rng, n, 1.0));
        let (xw, uw, gw) = (widen(&x), widen(&u), widen(&g));
        let (gx, gu, gg) = (upload(dev, &x), upload(dev, &u), upload(dev, &g));
        let mut want = vec![0.0f32; n];
        for (name, gpu_fn, cpu_fn) in unary {
            let mut out = poisoned::<T>(dev, n);
            gpu_fn(&gx, &mut out).unwrap();
            cpu_fn(&xw, &mut want);
            check(&format!("{name} n={n}"), &out, &want, T::TOL);
        }
        for (name, gpu_fn, cpu_fn) in binary {
            let mut out = poisoned::<T>(dev, n);
            gpu_fn(&gx, &gu, &mut out).unwrap();
            cpu_fn(&xw, &uw, &mut want);
            check(&format!("{name} n={n}"), &out, &want, T::TOL);
        }
        for kind in [Glu::SwiGlu, Glu::GeGlu] {
            let mut out = poisoned::<T>(dev, n);
            cuda::activation::glu_forward(kind, &gx, &gu, &mut out).unwrap();
            activation::glu_forward(kind, &xw, &uw, &mut want);
            check(&format!("{kind:?} forward n={n}"), &out, &want, T::TOL);
            let (mut d_gate, mut d_up) = (poisoned::<T>(dev, n), poisoned::<T>(dev, n));
            cuda::activation::glu_backward(kind, &gx, &gu, &gg, &mut d_gate, &mut d_up).unwrap();
            let mut want_up = vec![0.0f32; n];
            activation::glu_backward(kind, &xw, &uw, &gw, &mut want, &mut want_up);
            check(&format!("{kind:?} d_gate n={n}"), &d_gate, &want, T::TOL);
            check(&format!("{kind:?} d_up n={n}"), &d_up, &want_up, T::TOL);
            // The product is written over d_out.
            let (mut d_gate, mut d_up, mut out) = (poisoned::<T>(dev, n), poisoned::<T>(dev, n), upload(dev, &g));
            cuda::activation::glu_backward_out(kind, &gx, &gu, &mut out, &mut d_gate, &mut d_up).unwrap();
            let mut want_out = vec![0.0f32; n];
            activation::glu_backward_out(kind, &xw, &uw, &gw, &mut want, &mut want_up, &mut want_out);
            check(&format!("{kind:?} backward_out d_gate n={n}"), &d_gate, &want, T::TOL);
            check(&format!("{kind:?} backward_out d_up n={n}"), &d_up, &want_up, T::TOL);
            check(&format!("{kind:?} backward_out out n={n}"), &out, &want_out, T::TOL);
        }
        let xc = randn::<T>(rng, n, 2.0 * CAP as f64);
        let (xcw, gxc) = (widen(&xc), upload(dev, &xc));
        let mut out = poisoned::<T>(dev, n);
        cuda::activation::softcap_forward(&gxc, CAP, &mut out).unwrap();
        activation::softcap_forward(&xcw, CAP, &mut want);
        check(&format!("softcap_forward n={n}"), &out, &want, T::TOL);
        let mut out = poisoned::<T>(dev, n);
        cuda::activation::softcap_backward(&gxc, CAP, &gg, &mut out).unwrap();
        activation::softcap_backward(&xcw, CAP, &gw, &mut want);
        check(&format!("softcap_backward n={n}"), &out, &want, T::TOL);
    }
}
