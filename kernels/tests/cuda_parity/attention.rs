use crate::common::{check, narrow, poisoned, randn, upload, widen, Elem, REDUCED};
use qlora_kernels::attention::{cu_seqlens, AttentionParams};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::testing::{assert_close, gpu};
use qlora_kernels::{attention, cuda, Rng};

/// The f32 reference kernels (bf16 and f16 run the flash kernels: tests/cuda_flash_attention.rs).
#[test]
fn attention_matches_cpu() {
    let Some(dev) = gpu("attention_matches_cpu") else { return };
    attention_case::<f32>(&dev, &mut Rng::new(13));
}

/// lse with −∞ (a query that sees no key) mapped to a finite sentinel, so that assert_close can compare it.
fn finite_lse(v: impl IntoIterator<Item = f32>) -> Vec<f64> {
    v.into_iter().map(|l| if l == f32::NEG_INFINITY { -1e30 } else { l as f64 }).collect()
}

/// Forward and backward against the CPU twin on its f32 kernel over the widened inputs. Backward takes the CPU's
/// out (rounded to T) and lse, so it is checked on its own. Tolerances: f32 REDUCED (sums over up to a few hundred
/// keys, or a GQA group's queries, in another order, and an online softmax instead of a two-pass one); bf16 BF16
/// (one rounding of each output); lse REDUCED in both (f32 on both sides).
fn attention_case<T: Elem + cuda::attention::AttentionFloat>(dev: &CudaDevice, rng: &mut Rng) {
    struct Case {
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        causal: bool,
        window: Option<usize>,
        softcap: Option<f64>,
        /// Per sequence: (queries, keys).
        lens: Vec<(usize, usize)>,
    }
    let case = |n_heads, n_kv_heads, head_dim, causal, window, softcap, lens: &[(usize, usize)]| Case {
        n_heads,
        n_kv_heads,
        head_dim,
        causal,
        window,
        softcap,
        lens: lens.to_vec(),
    };
    let cases = [
        // MHA, three packed sequences of odd lengths.
        case(2, 2, 64, true, None, None, &[(17, 17), (1, 1), (33, 33)]),
        // GQA 3, fewer queries than keys (bottom-right aligned).
        case(6, 2, 128, true, None, None, &[(5, 9), (1, 30), (13, 13)]),
        // GQA 4, sliding window and softcap (inputs scaled so that the cap bends the scores).
        case(4, 1, 256, true, Some(7), Some(2.5), &[(19, 19), (3, 11), (25, 25)]),
        // Odd head_dim, non-causal: a sequence without keys (its queries see nothing), one with more queries than
        // keys, a window on both sides of the diagonal, and an empty sequence.
        case(3, 1, 40, false, Some(5), None, &[(4, 0), (9, 6), (0, 0), (7, 12)]),
        // One longer sequence: the online softmax over hundreds of keys.
        case(2, 2, 64, true, Some(100), Some(30.0), &[(300, 300)]),
        case(8, 2, 40, true, None, None, &[(1, 64), (2, 2), (45, 45)]),
    ];
    for c in cases {
        let p = AttentionParams {
            causal: c.causal,
            sliding_window: c.window,
            softcap: c.softcap,
            ..AttentionParams::new(c.n_heads, c.n_kv_heads, c.head_dim)
        };
        let what = format!(
            "heads {}/{} head_dim {} causal {} window {:?} softcap {:?} lens {:?}",
            c.n_heads, c.n_kv_heads, c.head_dim, c.causal, c.window, c.softcap, c.lens
        );
        let (cu_q, cu_k) = cu_seqlens(&c.lens);
        let (tq, tk) = (*cu_q.last().unwrap() as usize, *cu_k.last().unwrap() as usize);
        let max_q = c.lens.iter().map(|l| l.0).max().unwrap();
        let max_k = c.lens.iter().map(|l| l.1).max().unwrap();
        let (nq, nk) = (tq * c.n_heads * c.head_dim, tk * c.n_kv_heads * c.head_dim);
        let qk_scale = if c.softcap.is_some() { 3.0 } else { 1.0 };
        let (q, k, v) = (randn::<T>(rng, nq, qk_scale), randn::<T>(rng, nk, qk_scale), randn::<T>(rng, nk, 1.0));
        let d_out = randn::<T>(rng, nq, 1.0);
        let (qw, kw, vw, dow) = (widen(&q), widen(&k), widen(&v), widen(&d_out));
        let (gq, gk, gv, gdo) = (upload(dev, &q), upload(dev, &k), upload(dev, &v), upload(dev, &d_out));
        let (gcq, gck) = (upload(dev, &cu_q), upload(dev, &cu_k));

        let (mut out, mut lse) = (poisoned::<T>(dev, nq), poisoned::<f32>(dev, tq * c.n_heads));
        cuda::attention::attention_forward(&p, &gq, &gk, &gv, &gcq, &gck, max_q, max_k, &mut out, &mut lse).unwrap();
        let (mut want_out, mut want_lse) = (vec![0.0f32; nq], vec![0.0f32; tq * c.n_heads]);
        attention::attention_forward(&p, &qw, &kw, &vw, &cu_q, &cu_k, &mut want_out, &mut want_lse);
        check(&format!("attention out {what}"), &out, &want_out, T::tol(REDUCED));
        let got_lse = finite_lse(lse.to_vec().unwrap());
        assert_close(&format!("attention lse {what} [{}]", T::NAME), &got_lse, &finite_lse(want_lse.clone()), REDUCED);

        let out_t: Vec<T> = narrow(&want_out);
        let (gout, glse) = (upload(dev, &out_t), upload(dev, &want_lse));
        let (mut dq, mut dk, mut dv) = (poisoned::<T>(dev, nq), poisoned::<T>(dev, nk), poisoned::<T>(dev, nk));
        cuda::attention::attention_backward(
            &p, &gq, &gk, &gv, &gout, &glse, &gdo, &gcq, &gck, max_q, max_k, &mut dq, &mut dk, &mut dv,
        )
        .unwrap();
        let (mut want_dq, mut want_dk, mut want_dv) = (vec![0.0f32; nq], vec![0.0f32; nk], vec![0.0f32; nk]);
        attention::attention_backward(
            &p,
            &qw,
            &kw,
            &vw,
            &widen(&out_t),
            &want_lse,
            &dow,
            &cu_q,
            &cu_k,
            &mut want_dq,
            &mut want_dk,
            &mut want_dv,
        );
        check(&format!("attention dq {what}"), &dq, &want_dq, T::tol(REDUCED));
        check(&format!("attention dk {what}"), &dk, &want_dk, T::tol(REDUCED));
        check(&format!("attention dv {what}"), &dv, &want_dv, T::tol(REDUCED));
    }
}
