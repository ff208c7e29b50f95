//! GPU parity of the flash-attention kernels (bf16 and f16) against the CPU twin `qlora_kernels::attention`, on
//! fresh random inputs: every padded head_dim (and head sizes between them, which run zero-padded), GQA ratios 1, 2,
//! 4 and 8, packed sequences of odd lengths spanning several tiles, bottom-right causal alignment, sliding windows,
//! softcap, non-causal sequences with more queries than keys, sequences without keys and empty ones, and packs of
//! equal sequences (which the Hopper backward runs with the sequence slowest in its grid). Outputs start as NaN, so
//! an element a kernel leaves unwritten fails.
//!
//! Each case runs on the kernels the device picks (`FlashPath::Fastest`: on Hopper the wgmma ones where they serve the
//! head_dim) and, where those differ, also on the portable mma.sync ones, so a Hopper run covers both families;
//! `cases_reach_every_flash_kernel` checks without a GPU that the cases reach every flash entry point on both.
//!
//! The CPU twin runs in f32 on the widened inputs. Tolerances, per element (`abs + rel·|want|`) and normwise:
//! - out: one rounding of the output to T, plus P rounded to T before P·V (as every flash kernel does): bf16 2e-2,
//!   f16 5e-3 per element;
//! - lse: f32 on both sides from the same products, exp2/log2 approximations on the GPU: 1e-4;
//! - dq, dk, dv: P and dS rounded to T before their products, sums over up to a few hundred rows in another order:
//!   bf16 3e-2 per element and 1e-2 normwise, f16 1e-2 and 3e-3.
//!
//! Each test prints `qlora-gpu: <test>: ran on ...` or skips without a GPU (a failure under QLORA_REQUIRE_GPU=1).

use half::{bf16, f16};
use qlora_kernels::cuda::attention::{self as gattn, flash_kernels, AttentionFloat, FlashPath, Kind};
use qlora_kernels::cuda::compile::{Output, Target};
use qlora_kernels::cuda::source::Module;
use qlora_kernels::cuda::{self, CudaDevice, DeviceBuffer};
use qlora_kernels::nf4::WeightElem;
use qlora_kernels::testing::attention::{case, finite_lse, on_gpu, AttentionCase, GpuInputs};
use qlora_kernels::testing::{assert_close, Tolerance};
use qlora_kernels::Rng;
use std::collections::BTreeSet;

/// A 16-bit I/O type with its tolerances (its f32 conversions: [`WeightElem`]).
trait Half: AttentionFloat + WeightElem {
    const NAME: &'static str;
    const OUT: Tolerance;
    const GRAD: Tolerance;
    /// Bound on ‖got − want‖ / ‖want‖ for the gradients.
    const GRAD_NORMWISE: f64;
}

impl Half for bf16 {
    const NAME: &'static str = "bf16";
    const OUT: Tolerance = Tolerance { abs: 2e-2, rel: 2e-2 };
    const GRAD: Tolerance = Tolerance { abs: 3e-2, rel: 3e-2 };
    const GRAD_NORMWISE: f64 = 1e-2;
}

impl Half for f16 {
    const NAME: &'static str = "f16";
    const OUT: Tolerance = Tolerance { abs: 5e-3, rel: 5e-3 };
    const GRAD: Tolerance = Tolerance { abs: 1e-2, rel: 1e-2 };
    const GRAD_NORMWISE: f64 = 3e-3;
}

const LSE: Tolerance = Tolerance { abs: 1e-4, rel: 1e-4 };

/// Every padded head_dim and the paths between: tails of every tile size, GQA 1/2/4/8, windows cutting tiles,
/// caps that bend the scores (inputs are scaled up where a cap is set). The Hopper kernels (64, 128, 256) also get
/// head sizes below their D, one not a multiple of 8 (100: element-wise loads), and windows with caps.
const CASES: &[AttentionCase] = &[
    case((4, 4), 64, true, None, None, &[(1, 1), (17, 17), (130, 130), (257, 257)]),
    case((8, 2), 128, true, None, None, &[(5, 9), (1, 30), (200, 200)]),
    case((8, 1), 256, true, Some(33), Some(2.5), &[(150, 150), (3, 40), (64, 64)]),
    case((6, 3), 80, true, None, None, &[(70, 70), (129, 129)]),
    case((4, 1), 96, false, Some(20), None, &[(4, 0), (9, 6), (0, 0), (40, 70)]),
    case((2, 1), 40, true, None, None, &[(33, 33), (100, 100)]),
    case((3, 3), 5, false, None, Some(30.0), &[(7, 7), (20, 20)]),
    case((16, 2), 32, true, None, None, &[(65, 65), (66, 66)]),
    case((8, 8), 72, true, Some(100), Some(50.0), &[(300, 300)]),
    case((2, 2), 256, false, None, None, &[(70, 90), (1, 1)]),
    case((16, 2), 64, true, Some(70), Some(20.0), &[(300, 300), (129, 200), (0, 7)]),
    case((4, 1), 100, false, None, None, &[(90, 40), (3, 150)]),
    case((2, 2), 128, true, Some(64), Some(30.0), &[(260, 260), (50, 190)]),
    case((4, 2), 200, true, None, None, &[(130, 130), (10, 70)]),
    // Equal sequences: the Hopper backward's sequence-major grid (and a single sequence, which is one).
    case((8, 2), 64, true, None, None, &[(130, 130), (130, 130), (130, 130)]),
    case((4, 1), 128, true, Some(90), Some(30.0), &[(200, 200), (200, 200)]),
    case((4, 2), 256, true, None, None, &[(100, 100), (100, 100)]),
    case((8, 8), 128, false, None, None, &[(70, 70)]),
];

/// The forward and backward entry points case `c` reaches on `target` along `path` (a backward over equal sequences
/// takes its sequence-major twin where the kernel has one).
fn kernels<T: AttentionFloat>(target: Target, path: FlashPath, c: &AttentionCase) -> [&'static str; 2] {
    let Kind::Flash(half) = T::KIND else { panic!("16-bit types run the flash kernels") };
    let [fwd, bwd] = flash_kernels(target, path, c.head_dim, half);
    [fwd.name, if c.equal_sequences() { bwd.for_equal_sequences() } else { bwd }.name]
}

/// The paths whose kernels differ on this device: the fastest, and the portable one where it is another.
fn paths<T: AttentionFloat>(target: Target, c: &AttentionCase) -> Vec<FlashPath> {
    let portable = kernels::<T>(target, FlashPath::Portable, c);
    let differs = kernels::<T>(target, FlashPath::Fastest, c) != portable;
    [FlashPath::Fastest].into_iter().chain(differs.then_some(FlashPath::Portable)).collect()
}

fn narrow<T: Half>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn widen<T: Half>(v: &[T]) -> Vec<f32> {
    v.iter().map(|&x| x.to_f32()).collect()
}

fn upload<T: cuda::DeviceCopy>(dev: &CudaDevice, v: &[T]) -> DeviceBuffer<T> {
    dev.upload(v).expect("upload")
}

fn poisoned<T: Half>(dev: &CudaDevice, n: usize) -> DeviceBuffer<T> {
    upload(dev, &vec![T::from_f32(f32::NAN); n])
}

/// `got` against the CPU result rounded to T, element by element and (with `normwise`) as a whole.
#[track_caller]
fn check<T: Half>(what: &str, got: &DeviceBuffer<T>, want: &[f32], tol: Tolerance, normwise: Option<f64>) {
    let got: Vec<f64> = got.to_vec().expect("download").iter().map(|&v| v.to_f32() as f64).collect();
    let want: Vec<f64> = want.iter().map(|&v| T::from_f32(v).to_f32() as f64).collect();
    assert_close(&format!("{what} [{}]", T::NAME), &got, &want, tol);
    if let Some(bound) = normwise {
        let diff: f64 = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
        let norm: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
        assert!(diff <= bound * norm.max(1e-30), "{what} [{}]: normwise error {} > {bound}", T::NAME, diff / norm);
    }
}

fn run_case<T: Half>(dev: &CudaDevice, rng: &mut Rng, c: &AttentionCase) {
    let p = c.params();
    let (nq, nk) = c.sizes();
    let inputs = c.gpu_inputs(dev, rng, T::from_f32, T::to_f32);
    let GpuInputs { host: [qw, kw, vw, dow], device: [gq, gk, gv, gdo], cu_seqlens: [gcq, gck] } = inputs;
    let (cu, max) = ([&gcq, &gck], c.max_seqlen());

    let (want_out, want_lse) = c.forward(&qw, &kw, &vw);
    // Backward from the CPU's out (rounded to T) and lse, so that it is checked on its own.
    let out_t: Vec<T> = narrow(&want_out);
    let [want_dq, want_dk, want_dv] = c.backward([&qw, &kw, &vw], &widen(&out_t), &want_lse, &dow);
    let (gout, glse) = (upload(dev, &out_t), upload(dev, &want_lse));

    for path in paths::<T>(dev.target(), c) {
        let [fwd, bwd] = kernels::<T>(dev.target(), path, c);
        let what = format!("{c:?} on {fwd} + {bwd}");
        let (mut out, mut lse) = (poisoned::<T>(dev, nq), upload(dev, &vec![f32::NAN; c.tq() * c.heads.0]));
        gattn::attention_forward_with(path, &p, &gq, &gk, &gv, cu, max, &mut out, &mut lse).unwrap();
        check(&format!("out {what}"), &out, &want_out, T::OUT, None);
        let got_lse = finite_lse(lse.to_vec().unwrap());
        assert_close(&format!("lse {what} [{}]", T::NAME), &got_lse, &finite_lse(want_lse.clone()), LSE);

        let backward = || {
            let (mut dq, mut dk, mut dv) = (poisoned::<T>(dev, nq), poisoned::<T>(dev, nk), poisoned::<T>(dev, nk));
            let grads = [&mut dq, &mut dk, &mut dv];
            gattn::attention_backward_with(path, &p, [&gq, &gk, &gv], [&gout, &gdo], &glse, cu, max, grads).unwrap();
            (dq, dk, dv)
        };
        let (dq, dk, dv) = backward();
        let norm = Some(T::GRAD_NORMWISE);
        check(&format!("dq {what}"), &dq, &want_dq, T::GRAD, norm);
        check(&format!("dk {what}"), &dk, &want_dk, T::GRAD, norm);
        check(&format!("dv {what}"), &dv, &want_dv, T::GRAD, norm);

        // dK and dV are summed in registers in a fixed order: a second run gives the same bits.
        let (_, dk2, dv2) = backward();
        let bits = |b: &DeviceBuffer<T>| b.to_vec().unwrap().iter().map(|x| x.to_f32().to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&dk), bits(&dk2), "dk is reproducible {what} [{}]", T::NAME);
        assert_eq!(bits(&dv), bits(&dv2), "dv is reproducible {what} [{}]", T::NAME);
    }
}

#[test]
fn flash_attention_matches_cpu() {
    on_gpu("flash_attention_matches_cpu", 41, CASES, &[run_case::<bf16>, run_case::<f16>]);
}

/// Training-sized packs: 1024-token sequences, GQA 4 and 2, head_dim 64, 128 and 256, many tiles in both passes.
#[test]
fn flash_attention_matches_cpu_on_long_sequences() {
    on_gpu(
        "flash_attention_matches_cpu_on_long_sequences",
        43,
        &[
            case((8, 2), 64, true, None, None, &[(1024, 1024), (1000, 1000)]),
            case((8, 2), 128, true, Some(300), None, &[(1024, 1024), (777, 777)]),
            case((4, 2), 256, true, None, None, &[(1024, 1024)]),
        ],
        &[run_case::<bf16>],
    );
}

/// Without a GPU: on Hopper the cases reach every entry point of the wgmma modules along the fastest path and every
/// entry point of the mma.sync modules along the portable one (as they do on an sm_80 device along the fastest).
#[test]
fn cases_reach_every_flash_kernel() {
    let sm_90a = Target { arch: 90, arch_specific: true, output: Output::Cubin };
    let sm_80 = Target { arch: 80, arch_specific: false, output: Output::Cubin };
    for (target, path) in [(sm_90a, FlashPath::Fastest), (sm_90a, FlashPath::Portable), (sm_80, FlashPath::Fastest)] {
        let hopper = target == sm_90a && path == FlashPath::Fastest;
        let reached: BTreeSet<&str> = CASES
            .iter()
            .flat_map(|c| [kernels::<bf16>(target, path, c), kernels::<f16>(target, path, c)])
            .flatten()
            .collect();
        for m in Module::ALL.into_iter().filter(|m| m.name().starts_with("flash_attention")) {
            if target.compiles(m) && (m.arch_specific_only().is_some() == hopper) {
                for e in m.entry_points() {
                    assert!(reached.contains(e), "{e} is reached by no case on {target} along {path:?}");
                }
            }
        }
    }
}
