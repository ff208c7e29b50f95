//! GPU parity of the split-KV decode attention kernels (`kernels/cuda/decode_attention.cu`, bf16 and f16) against the
//! CPU twin `qlora_kernels::attention` and against the flash kernels on the same inputs: packs of sequences with 1 to
//! 16 new queries (and ones with none, or no keys) against caches of 1 to 5000 keys of odd lengths; GQA ratios 1, 2,
//! 3, 4 and 8 (with 3, a token's heads straddle two blocks of rows); causal and not (more queries than keys); sliding
//! windows; softcap; head_dims 64, 80, 96, 128, 256 and odd ones (40 on the 16-byte path, 100 and 5 off it). Each case
//! runs with one split (the blocks write out and lse), several, more than the short sequences have keys for (empty
//! splits), and the launcher's choice, which is also what `attention_forward` must run. Outputs start as NaN, so an
//! element left unwritten fails. Then: two runs give the same bits; and a report of Llama-3-8B's decode attention
//! against the flash kernels.
//!
//! The CPU twin runs in f32 on the widened inputs. Tolerances, per element (`abs + rel·|want|`), as the flash
//! kernels' (cuda_flash_attention.rs): out, one rounding to T plus P rounded to T before P·V: bf16 2e-2, f16 5e-3;
//! lse, f32 on both sides with exp2/log2 approximations: 1e-4. Against the flash kernels' out and lse, whose errors
//! from the CPU are of the same kind and size, the same bounds.
//!
//! Each test prints `qlora-gpu: <test>: ran on ...` or skips without a GPU (a failure under QLORA_REQUIRE_GPU=1).

use half::{bf16, f16};
use qlora_kernels::attention::{cu_seqlens, AttentionParams};
use qlora_kernels::cuda::attention::{self as gattn, AttentionFloat, FlashPath, ForwardKernels, Half as Kernels};
use qlora_kernels::cuda::{CudaDevice, DeviceBuffer, DeviceCopy};
use qlora_kernels::nf4::WeightElem;
use qlora_kernels::testing::attention::{case, finite_lse, on_gpu, AttentionCase, GpuInputs};
use qlora_kernels::testing::{assert_close, device_seconds, gpu, Tolerance};
use qlora_kernels::Rng;

/// A 16-bit I/O type with its tolerance on out (its f32 conversions: [`WeightElem`]).
trait Half: AttentionFloat + WeightElem {
    const NAME: &'static str;
    const OUT: Tolerance;
}

impl Half for bf16 {
    const NAME: &'static str = "bf16";
    const OUT: Tolerance = Tolerance { abs: 2e-2, rel: 2e-2 };
}

impl Half for f16 {
    const NAME: &'static str = "f16";
    const OUT: Tolerance = Tolerance { abs: 5e-3, rel: 5e-3 };
}

const LSE: Tolerance = Tolerance { abs: 1e-4, rel: 1e-4 };

/// Forced split counts: one (no combine), a few, and more than the short sequences' keys fill (empty splits); None
/// is the launcher's choice.
const SPLITS: [Option<usize>; 4] = [Some(1), Some(5), Some(64), None];

const CASES: &[AttentionCase] = &[
    // Llama-3-8B's heads: a pack of caches from 1 to 4999 keys, one sequence without new queries.
    case((32, 8), 128, true, None, None, &[(1, 4999), (4, 777), (0, 300), (2, 2), (1, 1), (3, 2049)]),
    // GQA 1, not causal: a sequence with more queries than keys, one without keys.
    case((8, 8), 64, false, None, None, &[(1, 513), (4, 1), (2, 3001), (3, 0)]),
    // GQA 2, a window that cuts every long cache.
    case((16, 8), 80, true, Some(100), None, &[(3, 2000), (1, 50), (4, 1025)]),
    // GQA 8, Gemma's window and softcap at head_dim 256.
    case((16, 2), 256, true, Some(1000), Some(50.0), &[(2, 1500), (1, 7), (4, 3333)]),
    // An odd head_dim on the 16-byte path, a saturating cap, empty sequences.
    case((8, 2), 40, true, None, Some(5.0), &[(4, 5000), (1, 1), (0, 0), (2, 901)]),
    // A head_dim that is no multiple of 8 (element-wise loads), non-causal with a window.
    case((4, 1), 100, false, Some(300), None, &[(3, 1200), (1, 77)]),
    // The most queries the decode kernels take: 16 tokens × GQA 4 = 4 blocks of rows per KV head.
    case((12, 3), 96, true, None, None, &[(16, 2048), (5, 5)]),
    // GQA 3: token 5's three heads are rows 15, 16 and 17, in two blocks; head_dim 5 and a window of 3.
    case((6, 2), 5, true, Some(3), None, &[(7, 200), (2, 2)]),
];

fn upload<T: DeviceCopy>(dev: &CudaDevice, v: &[T]) -> DeviceBuffer<T> {
    dev.upload(v).expect("upload")
}

/// out and lse of one forward, both NaN-filled first.
struct Outputs<T: Half> {
    out: DeviceBuffer<T>,
    lse: DeviceBuffer<f32>,
}

impl<T: Half> Outputs<T> {
    fn poisoned(dev: &CudaDevice, c: &AttentionCase) -> Self {
        let out = upload(dev, &vec![T::from_f32(f32::NAN); c.sizes().0]);
        Outputs { out, lse: upload(dev, &vec![f32::NAN; c.tq() * c.heads.0]) }
    }

    /// out widened to f64, and lse with −∞ made comparable.
    fn host(&self) -> (Vec<f64>, Vec<f64>) {
        let out = self.out.to_vec().expect("download").iter().map(|&x| x.to_f32() as f64).collect();
        (out, finite_lse(self.lse.to_vec().expect("download")))
    }

    fn bits(&self) -> (Vec<u32>, Vec<u32>) {
        let out = self.out.to_vec().expect("download").iter().map(|x| x.to_f32().to_bits()).collect();
        (out, self.lse.to_vec().expect("download").iter().map(|x| x.to_bits()).collect())
    }
}

/// `got` against `want` (out already rounded to T), out within T::OUT and lse within [`LSE`].
#[track_caller]
fn check<T: Half>(what: &str, got: &(Vec<f64>, Vec<f64>), want: &(Vec<f64>, Vec<f64>)) {
    assert_close(&format!("out {what} [{}]", T::NAME), &got.0, &want.0, T::OUT);
    assert_close(&format!("lse {what} [{}]", T::NAME), &got.1, &want.1, LSE);
}

fn run_case<T: Half>(dev: &CudaDevice, rng: &mut Rng, c: &AttentionCase) {
    let p = c.params();
    let GpuInputs { host: [qw, kw, vw, _], device: [gq, gk, gv, _], cu_seqlens: [gcq, gck] } =
        c.gpu_inputs(dev, rng, T::from_f32, T::to_f32);
    let (cu, max) = ([&gcq, &gck], c.max_seqlen());
    let (want_out, want_lse) = c.forward(&qw, &kw, &vw);
    let want = (want_out.iter().map(|&x| T::from_f32(x).to_f32() as f64).collect(), finite_lse(want_lse));

    let mut flash = Outputs::<T>::poisoned(dev, c);
    gattn::attention_forward_with(FlashPath::FastestFlash, &p, &gq, &gk, &gv, cu, max, &mut flash.out, &mut flash.lse)
        .unwrap();
    let flash = flash.host();
    for splits in SPLITS {
        let plan = gattn::decode_plan(dev, kernels::<T>(), &p, max, c.lens.len(), splits).unwrap();
        let what = format!("{c:?} in {plan:?}");
        let mut got = Outputs::<T>::poisoned(dev, c);
        let decode = ForwardKernels::Decode(splits);
        gattn::attention_forward_with(decode, &p, &gq, &gk, &gv, cu, max, &mut got.out, &mut got.lse).unwrap();
        let host = got.host();
        check::<T>(&format!("{what} vs CPU"), &host, &want);
        check::<T>(&format!("{what} vs the flash kernels"), &host, &flash);
        if splits.is_none() {
            // The forward's own dispatch runs the decode kernels with the launcher's splits: the same bits.
            let mut fastest = Outputs::<T>::poisoned(dev, c);
            let (out, lse) = (&mut fastest.out, &mut fastest.lse);
            gattn::attention_forward_with(FlashPath::Fastest, &p, &gq, &gk, &gv, cu, max, out, lse).unwrap();
            assert_eq!(fastest.bits(), got.bits(), "attention_forward runs the decode kernels: {what}");
        }
    }
}

fn kernels<T: AttentionFloat>() -> Kernels {
    match T::KIND {
        gattn::Kind::Flash(half) => half,
        gattn::Kind::Reference => panic!("16-bit types run the flash and decode kernels"),
    }
}

#[test]
fn decode_attention_matches_cpu_and_flash() {
    on_gpu("decode_attention_matches_cpu_and_flash", 51, CASES, &[run_case::<bf16>, run_case::<f16>]);
}

/// The splits are merged in a fixed order and each block's warps in warp order: two runs give the same bits, with one
/// split, many, and the launcher's choice.
#[test]
fn decode_attention_is_deterministic() {
    let Some(dev) = gpu("decode_attention_is_deterministic") else { return };
    let c = CASES[0];
    let (p, max) = (c.params(), c.max_seqlen());
    let GpuInputs { device: [gq, gk, gv, _], cu_seqlens: [gcq, gck], .. } =
        c.gpu_inputs(&dev, &mut Rng::new(53), bf16::from_f32, bf16::to_f32);
    for splits in SPLITS {
        let run = || {
            let mut o = Outputs::<bf16>::poisoned(&dev, &c);
            let (decode, cu) = (ForwardKernels::Decode(splits), [&gcq, &gck]);
            gattn::attention_forward_with(decode, &p, &gq, &gk, &gv, cu, max, &mut o.out, &mut o.lse).unwrap();
            o.bits()
        };
        assert_eq!(run(), run(), "two runs with splits {splits:?}");
    }
}

/// Decoding's attention in Llama-3-8B (32 query heads, 8 KV heads, head_dim 128, bf16, causal) at batch 1 and 8
/// with caches of 512, 4096 and 32768 keys, one query per sequence: device time of the decode kernels (with the
/// combine) and of the flash kernels (`FlashPath::FastestFlash`), and the K and V bytes each call reads per second
/// against a device copy timed the same way in the same run (read + written, as a copy's bytes are counted). The
/// calls cycle through copies of the cache filling 512 MB, as decoding cycles through a model's layers, so that no
/// call finds its cache in the 50 MB L2. A report, not an assertion.
#[test]
fn llama_3_8b_decode_attention_report() {
    let Some(dev) = gpu("llama_3_8b_decode_attention_report") else { return };
    let copy_src = dev.alloc::<bf16>(1 << 27).unwrap();
    let copy_rate = (4usize << 27) as f64 / device_seconds(&dev, 20, || drop(copy_src.try_clone().unwrap()));
    println!("qlora-gpu: {}: device copy {:.0} GB/s (256 MB bf16)", dev.name(), copy_rate / 1e9);
    drop(copy_src);
    let p = AttentionParams { causal: true, ..AttentionParams::new(32, 8, 128) };
    let mut rng = Rng::new(54);
    let pattern: Vec<bf16> = (0..1 << 20).map(|_| bf16::from_f32(rng.normal() as f32)).collect();
    let random = |n: usize| upload(&dev, &pattern.iter().cycle().take(n).copied().collect::<Vec<_>>());
    for batch in [1, 8] {
        for cache in [512, 4096, 32768] {
            let (cu_q, cu_k) = cu_seqlens(&vec![(1, cache); batch]);
            let (gcq, gck) = (upload(&dev, &cu_q), upload(&dev, &cu_k));
            let kv_elems = batch * cache * p.n_kv_heads * p.head_dim;
            let kv_bytes = 2 * 2 * kv_elems;
            let copies = (512usize << 20).div_ceil(kv_bytes);
            let (k, v) = (random(kv_elems), random(kv_elems));
            let caches: Vec<_> = (0..copies).map(|_| (k.try_clone().unwrap(), v.try_clone().unwrap())).collect();
            let q = random(batch * p.n_heads * p.head_dim);
            let (mut out, mut lse) =
                (dev.alloc::<bf16>(q.len()).unwrap(), dev.alloc::<f32>(batch * p.n_heads).unwrap());
            let plan = gattn::decode_plan(&dev, Kernels::Bf16, &p, [1, cache], batch, None).unwrap();
            // None: the flash kernels; Some(n): the decode kernels with n splits.
            let mut time = |splits: Option<usize>| {
                let mut next = 0;
                device_seconds(&dev, copies, || {
                    let (k, v) = &caches[next % copies];
                    next += 1;
                    let (cu, max) = ([&gcq, &gck], [1, cache]);
                    let kernels = match splits {
                        None => ForwardKernels::Flash(FlashPath::FastestFlash),
                        Some(n) => ForwardKernels::Decode(Some(n)),
                    };
                    gattn::attention_forward_with(kernels, &p, &q, k, v, cu, max, &mut out, &mut lse).unwrap()
                })
            };
            let mut rows = vec![(format!("decode ({} splits)", plan.splits), time(Some(plan.splits)))];
            // Other split counts (powers of two down to one 64-key stage a split), so that the launcher's choice can
            // be tuned from one run.
            let others: Vec<usize> = (0..8).map(|e| 1 << e).filter(|&n| n != plan.splits && n * 64 <= cache).collect();
            for n in others {
                rows.push((format!("decode ({n} splits, forced)"), time(Some(n))));
            }
            rows.push(("flash".into(), time(None)));
            for (what, seconds) in rows {
                let rate = kv_bytes as f64 / seconds;
                println!(
                    "qlora-gpu: attention Llama-3-8B batch {batch} cache {cache} {what}: {:.1} us, {:.0} GB/s of K/V \
                     = {:.0}% of copy",
                    seconds * 1e6,
                    rate / 1e9,
                    100.0 * rate / copy_rate
                );
            }
        }
    }
}
