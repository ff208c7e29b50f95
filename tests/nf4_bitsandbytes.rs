//! Bit-for-bit parity of the NF4 CPU reference (`qlora_kernels::nf4`) with bitsandbytes' CUDA kernels.
//!
//! The oracle is `tests/fixtures/nf4/nf4_bnb.safetensors`, written by `scripts/reference/nf4_fixtures.py` on a GPU
//! machine (its docstring lists every tensor). For every case in the file this test requires, bit for bit: the packed
//! nibbles and the f32 absmax; with double quantization the quantized absmax bytes, the nested absmax and the
//! rebuilt absmax (the offset within one ulp, since bnb takes it from a GPU reduction); the dequantized weight in f32
//! and, for 16-bit inputs, in the input's dtype; and the dynamic maps. A missing fixture fails the test: it never
//! passes silently. `QLORA_NF4_FIXTURE=<path>` points it at another copy of the file.
//!
//! One relaxation, for the cases the script marks `reciprocal_sensitive` (values placed within an ulp of a rounding
//! threshold under random absmax): bnb computes `1/absmax` with the GPU's approximate `MUFU.RCP`, which returns IEEE's
//! reciprocal or an adjacent f32 (see `qlora_kernels::nf4`'s module docs). There each block must be reproduced exactly
//! by quantizing with one of those three scales, and every other step (absmax, thresholds, ties, packing) must match.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use half::{bf16, f16};
use qlora_kernels::nf4::{
    absmax_mean, dequantize_absmax_nested, dequantize_blockwise_8bit, dequantize_nf4, ftz, nf4_code_index,
    nf4_num_blocks, nf4_packed_len, quantize_8bit_nearest, quantize_absmax_nested, quantize_absmax_nested_with_offset,
    quantize_blockwise_8bit, quantize_nf4, WeightElem, DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED, NF4_CODE,
    NF4_THRESHOLDS,
};
use safetensors::{Dtype, SafeTensors};

const SCRIPT: &str = "scripts/reference/nf4_fixtures.py";

fn fixture_bytes() -> Vec<u8> {
    let path = std::env::var_os("QLORA_NF4_FIXTURE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join("nf4").join("nf4_bnb.safetensors")
    });
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the bitsandbytes NF4 fixture {} ({e}).\n\
             Generate it on a machine with a CUDA GPU, PyTorch and bitsandbytes, from the repository root:\n    \
             python3 {SCRIPT} --out tests/fixtures/nf4\n\
             (or set QLORA_NF4_FIXTURE to the path of an existing nf4_bnb.safetensors)",
            path.display()
        )
    })
}

/// The fixture file: typed access to its tensors, and the failures found so far.
struct Fixture<'a> {
    st: SafeTensors<'a>,
    meta: HashMap<String, String>,
    failures: Vec<String>,
}

impl<'a> Fixture<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        let st = SafeTensors::deserialize(bytes).unwrap_or_else(|e| panic!("fixture is not valid safetensors: {e:?}"));
        let (_, header) = SafeTensors::read_metadata(bytes).expect("fixture header");
        let meta = header.metadata().clone().unwrap_or_default();
        Fixture { st, meta, failures: Vec::new() }
    }

    fn has(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }

    fn raw(&self, name: &str, dtype: Dtype) -> (Vec<usize>, &'a [u8]) {
        let t = self
            .st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture lacks tensor {name} (regenerate it with {SCRIPT})"));
        assert_eq!(t.dtype(), dtype, "{name}: dtype");
        (t.shape().to_vec(), t.data())
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        let (_, data) = self.raw(name, Dtype::F32);
        data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    fn u8s(&self, name: &str) -> Vec<u8> {
        self.raw(name, Dtype::U8).1.to_vec()
    }

    fn shape(&self, name: &str) -> Vec<usize> {
        self.st.tensor(name).map(|t| t.shape().to_vec()).unwrap_or_default()
    }

    fn usize_scalar(&self, name: &str) -> usize {
        let (shape, data) = self.raw(name, Dtype::I32);
        assert_eq!(shape, [1], "{name}: shape");
        i32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize
    }

    /// Cases are the prefixes of the `{case}.input` tensors.
    fn cases(&self) -> BTreeSet<String> {
        self.st.names().iter().filter_map(|n| n.strip_suffix(".input")).map(str::to_owned).collect()
    }

    fn reciprocal_sensitive(&self, case: &str) -> bool {
        self.meta.get(&format!("{case}.reciprocal_sensitive")).is_some_and(|v| v == "true")
    }

    fn fail(&mut self, msg: String) {
        self.failures.push(msg);
    }

    fn expect_eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        if got != want {
            self.fail(format!("{what}: got {got:?}, bitsandbytes has {want:?}"));
        }
    }

    /// Element-wise equality of bit patterns, reporting the count and the first few offenders.
    fn expect_bits<T: Copy + PartialEq + std::fmt::Debug>(&mut self, what: &str, got: &[T], want: &[T]) -> bool {
        if got.len() != want.len() {
            self.fail(format!("{what}: length {} vs bitsandbytes {}", got.len(), want.len()));
            return false;
        }
        let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
        if !bad.is_empty() {
            let first: Vec<String> =
                bad.iter().take(4).map(|&i| format!("[{i}] {:?} vs {:?}", got[i], want[i])).collect();
            self.fail(format!("{what}: {} of {} differ; {}", bad.len(), got.len(), first.join(", ")));
        }
        bad.is_empty()
    }

    fn finish(self, what: &str) {
        if !self.failures.is_empty() {
            let origin: Vec<String> = ["bitsandbytes", "torch", "device"]
                .iter()
                .map(|k| format!("{k} {}", self.meta.get(*k).map_or("?", String::as_str)))
                .collect();
            panic!(
                "{what}: {} mismatch(es) against the fixture ({}):\n  {}",
                self.failures.len(),
                origin.join(", "),
                self.failures.join("\n  ")
            );
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// ulps between two finite f32 of the same sign.
fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

/// For a mismatching nibble: is the scaled value within 2 ulps of a threshold? Such a value is decided by the last
/// bit of `1/absmax` and `x·(1/absmax)`; a mismatch anywhere else is a plain bug.
fn near_threshold(x: f32, absmax: f32) -> bool {
    let s = x * (1.0 / absmax);
    NF4_THRESHOLDS.iter().any(|&t| ulps(s.abs(), t.abs()) <= 2 && (s < 0.0) == (t < 0.0))
}

/// The scales bnb's kernel may have used for a block: `MUFU.RCP` is faithfully rounded, so one of the two f32 that
/// bracket the exact `1/absmax`: IEEE's, or the other one (then flushed to zero, like everything in those kernels).
fn candidate_scales(absmax: f32) -> Vec<f32> {
    let r = 1.0f32 / absmax;
    if !r.is_normal() {
        return vec![ftz(r)];
    }
    let other = if r as f64 > 1.0 / absmax as f64 { r.to_bits() - 1 } else { r.to_bits() + 1 };
    vec![r, ftz(f32::from_bits(other))]
}

/// Every block of bnb's bytes is reproduced by the IEEE scale or by the other faithful reciprocal (bnb's MUFU.RCP):
/// reports how many took each, or fails on the first block that neither reproduces.
fn explain_blocks(
    fx: &mut Fixture,
    case: &str,
    absmax: &[f32],
    block: impl Fn(usize, f32) -> Vec<u8>,
    want: impl Fn(usize) -> Vec<u8>,
) {
    let mut used = [0usize; 2];
    for (b, &a) in absmax.iter().enumerate() {
        let Some(hit) = candidate_scales(a).into_iter().position(|r| block(b, r) == want(b)) else {
            return fx.fail(format!("{case}: block {b} (absmax {a:e}) is reproduced by neither faithful reciprocal"));
        };
        used[hit] += 1;
    }
    let [ieee, other] = used;
    eprintln!(
        "{case}: {} blocks reproduced, {ieee} with the IEEE reciprocal, {other} only with the other faithful one \
         (bnb's MUFU.RCP)",
        absmax.len()
    );
}

fn quantize<T: WeightElem>(x: &[T], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let mut packed = vec![0u8; nf4_packed_len(x.len())];
    let mut absmax = vec![0.0f32; nf4_num_blocks(x.len(), blocksize)];
    quantize_nf4(x, blocksize, &mut packed, &mut absmax);
    (packed, absmax)
}

fn check_nf4_case(fx: &mut Fixture, case: &str) {
    let x = fx.f32s(&format!("{case}.input"));
    let n = x.len();
    let bs = fx.usize_scalar(&format!("{case}.blocksize"));
    let nb = nf4_num_blocks(n, bs);
    let nested = fx.has(&format!("{case}.nested_absmax"));

    let packed_bnb = fx.u8s(&format!("{case}.packed"));
    let packed_shape = fx.shape(&format!("{case}.packed"));
    fx.expect_eq(&format!("{case}: packed shape"), packed_shape, vec![n.div_ceil(2), 1]);
    let raw_name = if nested { format!("{case}.absmax_raw") } else { format!("{case}.absmax") };
    let absmax_bnb = fx.f32s(&raw_name);
    fx.expect_eq(&format!("{case}: absmax length"), absmax_bnb.len(), nb);

    // Quantization from f32.
    let (packed, absmax) = quantize(&x, bs);
    fx.expect_bits(&format!("{case}: absmax (f32 bits)"), &bits(&absmax), &bits(&absmax_bnb));
    if fx.reciprocal_sensitive(case) {
        let block = |b: usize, r: f32| -> Vec<u8> {
            let code = |v: f32| nf4_code_index(ftz(ftz(v) * r));
            let xs = &x[b * bs..((b + 1) * bs).min(n)];
            xs.chunks(2).map(|p| (code(p[0]) << 4) | code(p.get(1).copied().unwrap_or(0.0))).collect()
        };
        let want = |b: usize| packed_bnb[b * bs / 2..((b + 1) * bs / 2).min(packed_bnb.len())].to_vec();
        explain_blocks(fx, case, &absmax, block, want);
    } else if !fx.expect_bits(&format!("{case}: packed bytes"), &packed, &packed_bnb) {
        let nibble = |p: &[u8], k: usize| if k % 2 == 0 { p[k / 2] >> 4 } else { p[k / 2] & 0x0F };
        let bad: Vec<usize> = (0..n).filter(|&k| nibble(&packed, k) != nibble(&packed_bnb, k)).collect();
        let boundary = bad.iter().filter(|&&k| near_threshold(x[k], absmax[k / bs])).count();
        let pad = n % 2 == 1 && nibble(&packed, n) != nibble(&packed_bnb, n);
        fx.fail(format!(
            "{case}: {} nibble(s) differ, {boundary} of them within 2 ulps of a threshold after scaling (the \
             reciprocal's last bit decides those); padding nibble differs: {pad}; first element: {:?}",
            bad.len(),
            bad.first().map(|&k| (k, x[k], absmax[k / bs], nibble(&packed, k), nibble(&packed_bnb, k)))
        ));
    }

    // 16-bit inputs: quantizing the native values directly must give the same bytes.
    let native = fx.st.tensor(&format!("{case}.dequant_native")).ok().map(|t| t.dtype());
    let bnb = (packed_bnb.as_slice(), absmax_bnb.as_slice());
    match native {
        Some(Dtype::BF16) => check_native::<bf16>(fx, &format!("{case}: bf16"), &x, bs, bnb),
        Some(Dtype::F16) => check_native::<f16>(fx, &format!("{case}: f16"), &x, bs, bnb),
        _ => {}
    }

    let quant_map = fx.f32s(&format!("{case}.quant_map"));
    fx.expect_bits(&format!("{case}: quant_map vs NF4_CODE"), &bits(&NF4_CODE), &bits(&quant_map));

    // The absmax dequantization reads: f32 as is, or rebuilt from the nested state.
    let absmax_for_dequant = if nested {
        let qabsmax_bnb = fx.u8s(&format!("{case}.absmax"));
        let absmax2_bnb = fx.f32s(&format!("{case}.nested_absmax"));
        let offset_bnb = fx.f32s(&format!("{case}.nested_offset"));
        let code2_bnb = fx.f32s(&format!("{case}.nested_code"));
        let rebuilt_bnb = fx.f32s(&format!("{case}.absmax_dequant"));
        fx.expect_eq(&format!("{case}: nested_offset shape"), offset_bnb.len(), 1);
        let offset_bnb = offset_bnb[0];

        let offset = absmax_mean(&absmax_bnb);
        eprintln!(
            "{case}: offset {} bitsandbytes' ({offset:e})",
            if offset == offset_bnb { "equals" } else { "differs from" }
        );
        if ulps(offset, offset_bnb) > 1 {
            fx.fail(format!(
                "{case}: offset {offset:e} is {} ulps from bitsandbytes' {offset_bnb:e}",
                ulps(offset, offset_bnb)
            ));
        }
        // With bnb's own offset the nested bytes must agree exactly; with ours, too, whenever the offsets agree.
        let nq = quantize_absmax_nested_with_offset(&absmax_bnb, offset_bnb);
        fx.expect_bits(&format!("{case}: quantized absmax bytes"), &nq.qabsmax, &qabsmax_bnb);
        fx.expect_bits(&format!("{case}: nested_absmax"), &bits(&nq.absmax2), &bits(&absmax2_bnb));
        if offset == offset_bnb {
            fx.expect_eq(
                &format!("{case}: quantize_absmax_nested (own offset)"),
                quantize_absmax_nested(&absmax_bnb),
                nq,
            );
        }
        fx.expect_bits(
            &format!("{case}: nested_code vs DYNAMIC_MAP_SIGNED"),
            &bits(&DYNAMIC_MAP_SIGNED),
            &bits(&code2_bnb),
        );

        let mut rebuilt = vec![0.0f32; nb];
        dequantize_absmax_nested(&qabsmax_bnb, &absmax2_bnb, offset_bnb, &code2_bnb, &mut rebuilt);
        fx.expect_bits(&format!("{case}: rebuilt absmax"), &bits(&rebuilt), &bits(&rebuilt_bnb));
        rebuilt_bnb
    } else {
        absmax_bnb
    };

    // Dequantization of bnb's bytes: f32, then the input's own dtype (one rounding of the f32 product).
    let want = fx.f32s(&format!("{case}.dequant"));
    let mut out = vec![0.0f32; n];
    dequantize_nf4(&packed_bnb, &absmax_for_dequant, bs, &mut out);
    fx.expect_bits(&format!("{case}: dequantized f32"), &bits(&out), &bits(&want));
    let native_name = format!("{case}.dequant_native");
    match native {
        Some(d @ (Dtype::BF16 | Dtype::F16)) => {
            let want: Vec<u16> =
                fx.raw(&native_name, d).1.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
            let got = match d {
                Dtype::BF16 => dequantized_bits(&packed_bnb, &absmax_for_dequant, bs, n, bf16::to_bits),
                _ => dequantized_bits(&packed_bnb, &absmax_for_dequant, bs, n, f16::to_bits),
            };
            fx.expect_bits(&format!("{case}: dequantized {d:?}"), &got, &want);
        }
        Some(other) => fx.fail(format!("{case}: dequant_native has unexpected dtype {other:?}")),
        None => {}
    }
}

/// Quantizing a 16-bit input's native values (`x` must be exactly T) gives bnb's (packed bytes, absmax).
fn check_native<T: WeightElem>(fx: &mut Fixture, what: &str, x: &[f32], bs: usize, (packed, absmax): (&[u8], &[f32])) {
    let xs: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    fx.expect_eq(&format!("{what}: input is exact"), xs.iter().map(|v| v.to_f32()).collect(), x.to_vec());
    let (p, a) = quantize(&xs, bs);
    fx.expect_bits(&format!("{what}: packed bytes"), &p, packed);
    fx.expect_bits(&format!("{what}: absmax"), &bits(&a), &bits(absmax));
}

fn check_blockwise8_case(fx: &mut Fixture, case: &str) {
    let x = fx.f32s(&format!("{case}.input"));
    let bs = fx.usize_scalar(&format!("{case}.blocksize"));
    let q_bnb = fx.u8s(&format!("{case}.quantized"));
    let absmax_bnb = fx.f32s(&format!("{case}.absmax"));
    let mut q = vec![0u8; x.len()];
    let mut absmax = vec![0.0f32; x.len().div_ceil(bs)];
    quantize_blockwise_8bit(&x, &DYNAMIC_MAP_SIGNED, bs, &mut q, &mut absmax);
    fx.expect_bits(&format!("{case}: absmax"), &bits(&absmax), &bits(&absmax_bnb));
    if fx.reciprocal_sensitive(case) {
        let block = |b: usize, r: f32| -> Vec<u8> {
            let xs = &x[b * bs..((b + 1) * bs).min(x.len())];
            xs.iter().map(|&v| quantize_8bit_nearest(&DYNAMIC_MAP_SIGNED, ftz(ftz(v) * r))).collect()
        };
        let want = |b: usize| q_bnb[b * bs..((b + 1) * bs).min(q_bnb.len())].to_vec();
        explain_blocks(fx, case, &absmax, block, want);
    } else {
        fx.expect_bits(&format!("{case}: quantized bytes"), &q, &q_bnb);
    }
    let want = fx.f32s(&format!("{case}.dequant"));
    let mut out = vec![0.0f32; x.len()];
    dequantize_blockwise_8bit(&q_bnb, &absmax_bnb, &DYNAMIC_MAP_SIGNED, bs, &mut out);
    fx.expect_bits(&format!("{case}: dequantized"), &bits(&out), &bits(&want));
}

#[test]
fn nf4_quantize_and_dequantize_match_bitsandbytes() {
    let bytes = fixture_bytes();
    let mut fx = Fixture::new(&bytes);
    let cases: Vec<String> = fx.cases().into_iter().filter(|c| !c.starts_with("blockwise8_")).collect();
    assert!(!cases.is_empty(), "the fixture holds no NF4 case; regenerate it with {SCRIPT}");
    let nested = cases.iter().filter(|c| fx.has(&format!("{c}.nested_absmax"))).count();
    assert!(nested > 0 && nested < cases.len(), "the fixture should hold cases with and without double quantization");
    for case in &cases {
        check_nf4_case(&mut fx, case);
    }
    eprintln!("checked {} NF4 cases ({nested} double-quantized) against bitsandbytes", cases.len());
    fx.finish("NF4 vs bitsandbytes");
}

#[test]
fn blockwise_8bit_matches_bitsandbytes() {
    let bytes = fixture_bytes();
    let mut fx = Fixture::new(&bytes);
    let cases: Vec<String> = fx.cases().into_iter().filter(|c| c.starts_with("blockwise8_")).collect();
    assert!(!cases.is_empty(), "the fixture holds no blockwise8_ case; regenerate it with {SCRIPT}");
    for case in &cases {
        check_blockwise8_case(&mut fx, case);
    }
    fx.finish("8-bit blockwise vs bitsandbytes");
}

#[test]
fn dynamic_maps_match_bitsandbytes() {
    let bytes = fixture_bytes();
    let mut fx = Fixture::new(&bytes);
    let signed = fx.f32s("dynamic_map_signed");
    let unsigned = fx.f32s("dynamic_map_unsigned");
    fx.expect_bits("create_dynamic_map(signed=True)", &bits(&DYNAMIC_MAP_SIGNED), &bits(&signed));
    fx.expect_bits("create_dynamic_map(signed=False)", &bits(&DYNAMIC_MAP_UNSIGNED), &bits(&unsigned));
    fx.finish("dynamic maps vs bitsandbytes");
}

/// NF4 dequantized straight to a 16-bit dtype (one rounding of the f32 product), as bits.
fn dequantized_bits<T: WeightElem>(
    packed: &[u8],
    absmax: &[f32],
    bs: usize,
    n: usize,
    to_bits: fn(T) -> u16,
) -> Vec<u16> {
    let mut out = vec![T::from_f32(0.0); n];
    dequantize_nf4(packed, absmax, bs, &mut out);
    out.into_iter().map(to_bits).collect()
}
