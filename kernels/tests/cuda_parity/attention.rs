use crate::common::{check, narrow, poisoned, upload, widen, Elem, REDUCED};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::testing::attention::{case, finite_lse, GpuInputs};
use qlora_kernels::testing::{assert_close, gpu};
use qlora_kernels::{cuda, Rng};

/// The f32 reference kernels (bf16 and f16 run the flash kernels: tests/cuda_flash_attention.rs).
#[test]
fn attention_matches_cpu() {
    let Some(dev) = gpu("attention_matches_cpu") else { return };
    attention_case::<f32>(&dev, &mut Rng::new(13));
}

/// Forward and backward against the CPU twin on its f32 kernel over the widened inputs. Backward takes the CPU's
/// out (rounded to T) and lse, so it is checked on its own. Tolerances: f32 REDUCED (sums over up to a few hundred
/// keys, or a GQA group's queries, in another order, and an online softmax instead of a two-pass one); bf16 BF16
/// (one rounding of each output); lse REDUCED in both (f32 on both sides).
fn attention_case<T: Elem + cuda::attention::AttentionFloat>(dev: &CudaDevice, rng: &mut Rng) {
    let cases = [
        // MHA, three packed sequences of odd lengths.
        case((2, 2), 64, true, None, None, &[(17, 17), (1, 1), (33, 33)]),
        // GQA 3, fewer queries than keys (bottom-right aligned).
        case((6, 2), 128, true, None, None, &[(5, 9), (1, 30), (13, 13)]),
        // GQA 4, sliding window and softcap (inputs scaled so that the cap bends the scores).
        case((4, 1), 256, true, Some(7), Some(2.5), &[(19, 19), (3, 11), (25, 25)]),
        // Odd head_dim, non-causal: a sequence without keys (its queries see nothing), one with more queries than
        // keys, a window on both sides of the diagonal, and an empty sequence.
        case((3, 1), 40, false, Some(5), None, &[(4, 0), (9, 6), (0, 0), (7, 12)]),
        // One longer sequence: the online softmax over hundreds of keys.
        case((2, 2), 64, true, Some(100), Some(30.0), &[(300, 300)]),
        case((8, 2), 40, true, None, None, &[(1, 64), (2, 2), (45, 45)]),
    ];
    for c in cases {
        let p = c.params();
        let what = format!("{c:?}");
        let (nq, nk) = c.sizes();
        let inputs = c.gpu_inputs(dev, rng, T::from_f32, T::to_f32);
        let GpuInputs { host: [qw, kw, vw, dow], device: [gq, gk, gv, gdo], cu_seqlens: [gcq, gck] } = inputs;
        let (cu, max) = ([&gcq, &gck], c.max_seqlen());

        let (mut out, mut lse) = (poisoned::<T>(dev, nq), poisoned::<f32>(dev, c.tq() * c.heads.0));
        cuda::attention::attention_forward(&p, &gq, &gk, &gv, cu, max, &mut out, &mut lse).unwrap();
        let (want_out, want_lse) = c.forward(&qw, &kw, &vw);
        check(&format!("attention out {what}"), &out, &want_out, T::tol(REDUCED));
        let got_lse = finite_lse(lse.to_vec().unwrap());
        assert_close(&format!("attention lse {what} [{}]", T::NAME), &got_lse, &finite_lse(want_lse.clone()), REDUCED);

        let out_t: Vec<T> = narrow(&want_out);
        let (gout, glse) = (upload(dev, &out_t), upload(dev, &want_lse));
        let (mut dq, mut dk, mut dv) = (poisoned::<T>(dev, nq), poisoned::<T>(dev, nk), poisoned::<T>(dev, nk));
        let grads = [&mut dq, &mut dk, &mut dv];
        cuda::attention::attention_backward(&p, [&gq, &gk, &gv], [&gout, &gdo], &glse, cu, max, grads).unwrap();
        let [want_dq, want_dk, want_dv] = c.backward([&qw, &kw, &vw], &widen(&out_t), &want_lse, &dow);
        check(&format!("attention dq {what}"), &dq, &want_dq, T::tol(REDUCED));
        check(&format!("attention dk {what}"), &dk, &want_dk, T::tol(REDUCED));
        check(&format!("attention dv {what}"), &dv, &want_dv, T::tol(REDUCED));
    }
}
