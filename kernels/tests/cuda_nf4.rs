//! GPU parity of NF4 dequantization (`kernels/cuda/nf4.cu`) with its CPU twin (`qlora_kernels::nf4`), bit for bit, on
//! random packed bytes and scales: f32, bf16 and f16 outputs; plain and double-quantized absmax; every blocksize;
//! lengths that exercise the vector path, its tail and odd n; writes into a range of a larger buffer, aligned or not;
//! each row scaled by its own factor (DoRA's fold); and the 14336 × 4096 weight of an 8B model's MLP, which also
//! reports the kernel's bandwidth against a device copy measured in the same run. Decoding's NF4 GEMV
//! (`kernels/cuda/nf4_gemv.cu`) against its CPU twin (within f32 summation error), with a bandwidth report for an 8B
//! model's three weight shapes at 1, 2 and 8 rows of x.
//!
//! Each test prints `qlora-gpu: <test>: ran on cuda:0 (...)` or `qlora-gpu: <test>: skipped: <why>`; without a GPU
//! they skip (and pass), unless QLORA_REQUIRE_GPU=1.

use half::{bf16, f16};
use qlora_kernels::cuda::nf4::{self as gnf4, Nf4Output, Nf4Scales};
use qlora_kernels::cuda::{CudaDevice, DeviceBuffer, DeviceCopy};
use qlora_kernels::nf4::{self, WeightElem, DYNAMIC_MAP_SIGNED, NESTED_BLOCKSIZE};
use qlora_kernels::testing::{device_seconds, gpu};
use qlora_kernels::Rng;

/// Lengths around the kernel's vector tile (1024 elements: 32 lanes × 32) and its 16-byte runs, odd ones included,
/// and one past a whole wave of an H200 (132 × 2048 threads × 32 elements).
const LENS: [usize; 14] = [1, 2, 7, 31, 32, 33, 1023, 1024, 1025, 2048 + 7, 64 * 37 + 3, 70_001, 1 << 20, 9_000_001];
const BLOCKSIZES: [usize; 7] = [32, 64, 128, 256, 1024, 2048, 4096];

/// An output type: its CPU twin's element and its bits.
trait Out: Nf4Output + WeightElem + PartialEq + std::fmt::Debug {
    const NAME: &'static str;
    fn bits(self) -> u32;
}

impl Out for f32 {
    const NAME: &'static str = "f32";
    fn bits(self) -> u32 {
        self.to_bits()
    }
}

impl Out for bf16 {
    const NAME: &'static str = "bf16";
    fn bits(self) -> u32 {
        self.to_bits() as u32
    }
}

impl Out for f16 {
    const NAME: &'static str = "f16";
    fn bits(self) -> u32 {
        self.to_bits() as u32
    }
}

fn upload<T: DeviceCopy>(dev: &CudaDevice, v: &[T]) -> DeviceBuffer<T> {
    dev.upload(v).expect("upload")
}

fn bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.below(256) as u8).collect()
}

/// Block scales of trained weights (about 0.05), with the cases the flush and the rounding must agree on: zero (−0.0
/// from code 0), subnormal, normal but making subnormal products, negative, and large enough to overflow f16.
fn absmax(rng: &mut Rng, blocks: usize) -> Vec<f32> {
    let special = [0.0, 0.75 * f32::MIN_POSITIVE, 3.5 * f32::MIN_POSITIVE, -0.03, 1.0e-6, 7.0e4, 1.0];
    (0..blocks)
        .map(|b| if b % 5 == 3 { special[b / 5 % special.len()] } else { (0.05 + 0.01 * rng.normal()) as f32 })
        .collect()
}

/// Asserts equal bits, naming the first differing element.
#[track_caller]
fn assert_bits<T: Out>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what} [{}]: lengths", T::NAME);
    if let Some(i) = (0..got.len()).find(|&i| got[i].bits() != want[i].bits()) {
        panic!(
            "{what} [{}]: element {i}: GPU {:?} ({:#x}) vs CPU {:?} ({:#x})",
            T::NAME,
            got[i],
            got[i].bits(),
            want[i],
            want[i].bits()
        );
    }
}

/// The CPU twin: out[..n] from packed and a resolved absmax.
fn cpu<T: Out>(packed: &[u8], absmax: &[f32], blocksize: usize, n: usize) -> Vec<T> {
    let mut out = vec![T::from_f32(f32::NAN); n];
    nf4::dequantize_nf4(packed, absmax, blocksize, &mut out);
    out
}

/// A weight's inputs on both sides: packed bytes, and either plain or nested scales with the absmax they resolve to.
struct Case {
    n: usize,
    blocksize: usize,
    packed: Vec<u8>,
    absmax: Vec<f32>,
    nested: Option<Nested>,
}

/// A case's weight on the device, for calls that take several weights at once.
struct Uploaded {
    packed: DeviceBuffer<u8>,
    absmax: DeviceBuffer<f32>,
    nested: Option<NestedOnDevice>,
}

struct NestedOnDevice {
    q: DeviceBuffer<u8>,
    absmax2: DeviceBuffer<f32>,
    code2: DeviceBuffer<f32>,
    offset: f32,
}

impl Uploaded {
    fn scales(&self) -> Nf4Scales<'_> {
        match &self.nested {
            None => Nf4Scales::Absmax(&self.absmax),
            Some(n) => Nf4Scales::Nested { qabsmax: &n.q, absmax2: &n.absmax2, code2: &n.code2, offset: n.offset },
        }
    }
}

struct Nested {
    q: Vec<u8>,
    absmax2: Vec<f32>,
    code2: Vec<f32>,
    offset: f32,
}

impl Case {
    fn new(rng: &mut Rng, n: usize, blocksize: usize, nested: bool) -> Case {
        let packed = bytes(rng, nf4::nf4_packed_len(n));
        let blocks = nf4::nf4_num_blocks(n, blocksize);
        if !nested {
            return Case { n, blocksize, packed, absmax: absmax(rng, blocks), nested: None };
        }
        // The checkpoint's nested map is usually bnb's, but any 256 values must work: every other case uses random
        // ones. absmax2 mixes magnitudes so that some products are subnormal and flush; offset 0 keeps them visible.
        let code2 =
            if n % 2 == 0 { DYNAMIC_MAP_SIGNED.to_vec() } else { (0..256).map(|_| rng.normal() as f32).collect() };
        let absmax2 = absmax(rng, blocks.div_ceil(NESTED_BLOCKSIZE));
        let offset = if n % 3 == 0 { 0.0 } else { 0.05 };
        let nested = Nested { q: bytes(rng, blocks), absmax2, code2, offset };
        let mut resolved = vec![0.0f32; blocks];
        nf4::dequantize_absmax_nested(&nested.q, &nested.absmax2, offset, &nested.code2, &mut resolved);
        Case { n, blocksize, packed, absmax: resolved, nested: Some(nested) }
    }

    fn what(&self) -> String {
        format!("n {} blocksize {}{}", self.n, self.blocksize, if self.nested.is_some() { " nested" } else { "" })
    }

    /// Runs `f` on this weight's packed bytes and scales, uploaded.
    fn on_device<R>(&self, dev: &CudaDevice, f: impl FnOnce(&DeviceBuffer<u8>, Nf4Scales<'_>) -> R) -> R {
        let w = self.upload(dev);
        f(&w.packed, w.scales())
    }

    fn upload(&self, dev: &CudaDevice) -> Uploaded {
        let nested = self.nested.as_ref().map(|n| NestedOnDevice {
            q: upload(dev, &n.q),
            absmax2: upload(dev, &n.absmax2),
            code2: upload(dev, &n.code2),
            offset: n.offset,
        });
        Uploaded { packed: upload(dev, &self.packed), absmax: upload(dev, &self.absmax), nested }
    }

    /// Runs the GPU kernel into out[start..start + n] of a NaN-filled buffer of `len`; returns the whole buffer.
    fn gpu<T: Out>(&self, dev: &CudaDevice, len: usize, start: usize) -> Vec<T> {
        let mut out = upload(dev, &vec![T::from_f32(f32::NAN); len]);
        self.on_device(dev, |packed, scales| match scales {
            Nf4Scales::Absmax(absmax) if start == 0 && len == self.n => {
                gnf4::dequantize_nf4(packed, absmax, self.blocksize, &mut out).unwrap()
            }
            _ => gnf4::dequantize_nf4_into(packed, scales, self.blocksize, self.n, &mut out, start).unwrap(),
        });
        out.to_vec().unwrap()
    }

    fn check<T: Out>(&self, dev: &CudaDevice) {
        let want = cpu::<T>(&self.packed, &self.absmax, self.blocksize, self.n);
        assert_bits(&self.what(), &self.gpu::<T>(dev, self.n, 0), &want);
    }
}

/// Every length and blocksize, each output type, with the absmax plain or `nested`.
fn check_every_shape(dev: &CudaDevice, rng: &mut Rng, nested: bool) {
    for n in LENS {
        for blocksize in BLOCKSIZES {
            let case = Case::new(rng, n, blocksize, nested);
            case.check::<f32>(dev);
            case.check::<bf16>(dev);
            case.check::<f16>(dev);
        }
    }
}

#[test]
fn dequantize_nf4_matches_cpu_bit_for_bit() {
    let Some(dev) = gpu("dequantize_nf4_matches_cpu_bit_for_bit") else { return };
    check_every_shape(&dev, &mut Rng::new(41), false);
}

#[test]
fn nested_absmax_is_rebuilt_in_the_same_launch_bit_for_bit() {
    let Some(dev) = gpu("nested_absmax_is_rebuilt_in_the_same_launch_bit_for_bit") else { return };
    let mut rng = Rng::new(42);
    check_every_shape(&dev, &mut rng, true);
    // The standalone rebuild stays the CPU's too (its launcher is public).
    for nb in [1, 255, 600, 4097] {
        let case = Case::new(&mut rng, nb * 64, 64, true);
        let nested = case.nested.as_ref().expect("nested case");
        let mut out = upload(&dev, &vec![f32::NAN; nb]);
        let (q, a2, code) = (upload(&dev, &nested.q), upload(&dev, &nested.absmax2), upload(&dev, &nested.code2));
        gnf4::dequantize_absmax_nested(&q, &a2, nested.offset, &code, &mut out).unwrap();
        assert_bits(&format!("dequantize_absmax_nested nb {nb}"), &out.to_vec().unwrap(), &case.absmax);
    }
}

/// Into a range of a larger buffer: starts that keep the 16-byte alignment take the vector path, the others go
/// element by element; both must write exactly out[start..start + n] and nothing else.
fn into_case<T: Out>(dev: &CudaDevice, rng: &mut Rng) {
    let aligned = 16 / size_of::<T>();
    for (n, blocksize) in [(5000, 64), (4096 + 2, 128), (77, 32), (3 * 1024, 4096)] {
        for nested in [false, true] {
            let case = Case::new(rng, n, blocksize, nested);
            let want = cpu::<T>(&case.packed, &case.absmax, blocksize, n);
            for start in [0, 1, 3, aligned, 5 * aligned, 1000 * aligned + 1] {
                let len = start + n + 9;
                let got = case.gpu::<T>(dev, len, start);
                let what = format!("into {} start {start}", case.what());
                assert_bits(&what, &got[start..start + n], &want);
                let untouched = got[..start].iter().chain(&got[start + n..]).all(|v| v.to_f32().is_nan());
                assert!(untouched, "{what} [{}]: wrote outside out[start..start + n]", T::NAME);
            }
        }
    }
}

/// diag(g)·W (DoRA's m/n folded into the dequantization): each row's factor times its blocks' absmax, bit for bit
/// the CPU twin's, for plain and nested scales, every output type, rows of one and several blocks (odd row counts,
/// one past a tile, a long weight past a wave), factors of 0, 1, negative and tiny; from an unaligned start too.
fn rows_scaled_case<T: Out>(dev: &CudaDevice, rng: &mut Rng) {
    for (rows, row_len, blocksize) in [(3, 64, 64), (7, 192, 64), (33, 1024, 128), (5, 4096, 4096), (4099, 2048, 64)] {
        for nested in [false, true] {
            let case = Case::new(rng, rows * row_len, blocksize, nested);
            let special = [0.0f32, 1.0, -2.5, 1.0e-30];
            let g: Vec<f32> = (0..rows)
                .map(|r| if r % 4 == 1 { special[r / 4 % 4] } else { (1.0 + 0.1 * rng.normal()) as f32 })
                .collect();
            let mut want = vec![T::from_f32(f32::NAN); case.n];
            nf4::dequantize_nf4_rows_scaled(&case.packed, &case.absmax, blocksize, &g, row_len, &mut want);
            let g_dev = upload(dev, &g);
            for start in [0, 3] {
                let mut out = upload(dev, &vec![T::from_f32(f32::NAN); start + case.n]);
                let rows_arg = gnf4::RowScale { scale: &g_dev, row_len };
                case.on_device(dev, |packed, scales| {
                    gnf4::dequantize_nf4_rows_into(packed, scales, Some(rows_arg), blocksize, case.n, &mut out, start)
                        .unwrap()
                });
                let got = out.to_vec().unwrap();
                let what = format!("rows scaled {} rows {rows} start {start}", case.what());
                assert_bits(&what, &got[start..], &want);
            }
        }
    }
}

#[test]
fn dequantize_into_writes_exactly_its_range_with_rows_scaled_or_not() {
    let Some(dev) = gpu("dequantize_into_writes_exactly_its_range_with_rows_scaled_or_not") else { return };
    let mut rng = Rng::new(43);
    into_case::<f32>(&dev, &mut rng);
    into_case::<bf16>(&dev, &mut rng);
    into_case::<f16>(&dev, &mut rng);
    rows_scaled_case::<f32>(&dev, &mut rng);
    rows_scaled_case::<bf16>(&dev, &mut rng);
    rows_scaled_case::<f16>(&dev, &mut rng);
}

#[test]
fn llama_8b_mlp_weight_matches_cpu_and_reports_bandwidth() {
    let Some(dev) = gpu("llama_8b_mlp_weight_matches_cpu_and_reports_bandwidth") else { return };
    let mut rng = Rng::new(44);
    let (n, blocksize) = (14336 * 4096, 64);
    let case = Case::new(&mut rng, n, blocksize, true);
    let want = cpu::<bf16>(&case.packed, &case.absmax, blocksize, n);
    assert_bits(&case.what(), &case.gpu::<bf16>(&dev, n, 0), &want);

    // Bytes moved = read + written, as a copy's are counted: 2 · 117 MB for the bf16 copy.
    let nested = case.nested.as_ref().expect("nested case");
    let (packed, absmax) = (upload(&dev, &case.packed), upload(&dev, &case.absmax));
    let (q, absmax2, code2) = (upload(&dev, &nested.q), upload(&dev, &nested.absmax2), upload(&dev, &nested.code2));
    let blocks = absmax.len();
    let mut out16 = dev.alloc::<bf16>(n).unwrap();
    let mut out32 = dev.alloc::<f32>(n).unwrap();
    let copy = device_seconds(&dev, 20, || drop(out16.try_clone().unwrap()));
    let copy_rate = (4 * n) as f64 / copy;
    let scales = Nf4Scales::Nested { qabsmax: &q, absmax2: &absmax2, code2: &code2, offset: nested.offset };
    println!("qlora-gpu: {} 14336x4096: device copy {:.0} GB/s", dev.name(), copy_rate / 1e9);
    for (what, nested, out_bytes) in
        [("bf16 nested", true, 2), ("bf16 absmax", false, 2), ("f32 nested", true, 4), ("f32 absmax", false, 4)]
    {
        let s = device_seconds(&dev, 20, || {
            let scales = if nested { scales } else { Nf4Scales::Absmax(&absmax) };
            let r = if out_bytes == 2 {
                gnf4::dequantize_nf4_into(&packed, scales, blocksize, n, &mut out16, 0)
            } else {
                gnf4::dequantize_nf4_into(&packed, scales, blocksize, n, &mut out32, 0)
            };
            r.unwrap()
        });
        let scale_bytes = if nested { blocks + 4 * blocks.div_ceil(NESTED_BLOCKSIZE) } else { 4 * blocks };
        let rate = (n / 2 + scale_bytes + out_bytes * n) as f64 / s;
        println!(
            "qlora-gpu: dequantize_nf4 {what} 14336x4096: {:.1} us, {:.0} GB/s = {:.0}% of copy",
            s * 1e6,
            rate / 1e9,
            100.0 * rate / copy_rate
        );
    }
}

/// Decoding's product x·Wᵀ against the CPU twin (which sums exactly in f64): every row count 1 to 8 (the rows
/// kernels take 1 or 2, the blocks kernels 4 or 8 and leave the rest unwritten); widths on the vector path (in % 32
/// = 0: one step, several, a partial last step, 14336's seven warps of two steps, more steps than warps; 14336 at
/// two rows of f32 x too wide to stage for the rows kernels, so the blocks kernels take it) and off it; row counts
/// that leave a block's or a warp's last rows past the weight; plain and nested scales (with zero, subnormal and tiny
/// absmax, which take the per-element path); f32 and bf16; several weights in one call (a projection group: weights
/// of one kind of scales share a launch, up to three; a rank past 32, which the rows kernels spread over the lanes).
/// Each output may differ from the exact sum by f32 summation error, at most [`GEMV_SUM`] of Σ|w·x| (the tree's depth
/// times f32's unit roundoff, with margin), plus one rounding of the output (bf16's 2⁻⁸). With an adapter's
/// up-projection (`lora`: rank, U's row stride, U's first element), alpha·U·Bᵀ is added before that rounding, its
/// terms counted in the magnitude.
const GEMV_SUM: f64 = 2e-6;

fn gemv_case<T: Out + qlora_kernels::cuda::GpuFloat>(
    dev: &CudaDevice,
    cases: &[&Case],
    in_f: usize,
    m: usize,
    lora: Option<(usize, usize, usize)>,
    rng: &mut Rng,
) {
    let mut randn = |n: usize| -> Vec<T> { (0..n).map(|_| T::from_f32(rng.normal() as f32)).collect() };
    let widen = |v: &[T]| -> Vec<f32> { v.iter().map(|v| v.to_f32()).collect() };
    let x = randn(m * in_f);
    let (rank, ldu, u_offset) = lora.unwrap_or((0, 0, 0));
    let alpha = -0.625f32;
    // Per weight: its U and B (each its own), the CPU's y.
    let operands: Vec<(Vec<T>, Vec<T>)> =
        cases.iter().map(|c| (randn(u_offset + m * ldu), randn(c.n / in_f * rank))).collect();
    let xw = widen(&x);
    let weights: Vec<_> = cases.iter().map(|c| c.upload(dev)).collect();
    let uploaded: Vec<_> = operands.iter().map(|(u, b)| (upload(dev, u), upload(dev, b))).collect();
    let mut ys: Vec<DeviceBuffer<T>> =
        cases.iter().map(|c| upload(dev, &vec![T::from_f32(f32::NAN); m * (c.n / in_f)])).collect();
    let mut call: Vec<gnf4::GemvWeight<'_, T>> = weights
        .iter()
        .zip(&uploaded)
        .zip(ys.iter_mut())
        .map(|((w, (u, b)), y)| gnf4::GemvWeight {
            packed: &w.packed,
            scales: w.scales(),
            lora: lora.map(|_| gnf4::GemvLora { u, u_offset, ldu, b, rank, alpha }),
            y,
        })
        .collect();
    gnf4::nf4_gemv(&mut call, cases[0].blocksize, &upload(dev, &x), in_f).unwrap();
    // bf16 output: half an ulp, relative, or half the spacing of bf16's subnormals (2^-133), absolute.
    let (output_rounding, subnormal_rounding) =
        if T::NAME == "bf16" { (2f64.powi(-8), 2f64.powi(-134)) } else { (0.0, 0.0) };
    for ((case, (u, b)), y) in cases.iter().zip(&operands).zip(&ys) {
        let out_f = case.n / in_f;
        let (uw, bw) = (widen(u), widen(b));
        let mut want = vec![0.0f32; m * out_f];
        let cpu_lora = lora.map(|_| nf4::GemvLora { u: &uw[u_offset..], ldu, b: &bw, rank, alpha });
        nf4::nf4_gemv(&case.packed, &case.absmax, case.blocksize, &xw, in_f, cpu_lora, &mut want);
        let dense = cpu::<f32>(&case.packed, &case.absmax, case.blocksize, case.n);
        let got = y.to_vec().unwrap();
        for r in 0..m {
            for o in 0..out_f {
                let up: f64 = (0..rank)
                    .map(|j| (alpha as f64 * uw[u_offset + r * ldu + j] as f64 * bw[o * rank + j] as f64).abs())
                    .sum();
                let magnitude: f64 =
                    up + (0..in_f).map(|i| (dense[o * in_f + i] as f64 * xw[r * in_f + i] as f64).abs()).sum::<f64>();
                let (g, w) = (got[r * out_f + o].to_f32() as f64, want[r * out_f + o] as f64);
                let bound = GEMV_SUM * magnitude + output_rounding * w.abs() + subnormal_rounding;
                let what =
                    format!("{} of {} [{out_f}, {in_f}] m {m} lora {lora:?} [{}]", case.what(), cases.len(), T::NAME);
                assert!((g - w).abs() <= bound, "{what}: y[{r}, {o}] = {g} vs {w} (bound {bound:.3e})");
            }
        }
    }
}

#[test]
fn nf4_gemv_matches_cpu() {
    let Some(dev) = gpu("nf4_gemv_matches_cpu") else { return };
    let mut rng = Rng::new(44);
    let shapes = [
        (1, 32, 32),
        (7, 64, 64),
        (33, 4096, 64),
        (5, 100, 32),
        (3, 1000, 128),
        (9, 14336, 64),
        (6, 1056, 64),
        (5, 9248, 256),
        (2, 2048, 4096),
        (11, 4128, 1024),
    ];
    for (out_f, in_f, blocksize) in shapes {
        for nested in [false, true] {
            let case = Case::new(&mut rng, out_f * in_f, blocksize, nested);
            for m in 1..=gnf4::GEMV_MAX_ROWS {
                gemv_case::<f32>(&dev, &[&case], in_f, m, None, &mut rng);
                gemv_case::<bf16>(&dev, &[&case], in_f, m, None, &mut rng);
            }
            // A group: three weights of one kind of scales (one launch), and one of the other kind after two of
            // this kind (two launches); each with a LoRA up-projection on its write: a whole U of rank 16, and
            // rank 3 read from a wider U at an offset.
            let same = Case::new(&mut rng, 3 * in_f, blocksize, nested);
            let other = Case::new(&mut rng, 2 * in_f, blocksize, !nested);
            for m in [1, 2, 5] {
                gemv_case::<bf16>(&dev, &[&case, &same, &case], in_f, m, None, &mut rng);
            }
            for (m, lora) in [(1, (16, 16, 0)), (2, (40, 40, 0)), (3, (3, 11, 5)), (8, (16, 48, 16))] {
                gemv_case::<f32>(&dev, &[&case, &same, &other], in_f, m, Some(lora), &mut rng);
                gemv_case::<bf16>(&dev, &[&case, &same, &other], in_f, m, Some(lora), &mut rng);
            }
        }
    }
}

/// Decoding's cost: the GEMV of an 8B model's weights (q/o_proj 4096 × 4096, gate/up_proj 14336 × 4096, down_proj
/// 4096 × 14336; nested scales, bf16 x) at 1 and 8 rows of x. Each call reads the packed weight, its scales and x
/// and writes y; that traffic per second of device time is printed against a device copy timed the same way in the
/// same run (read + written, as a copy's bytes are counted). The calls cycle through copies of the weight filling
/// 512 MB, as decoding cycles through a model's layers, so that no call finds its weight in the 50 MB L2. A report,
/// not an assertion.
#[test]
fn nf4_gemv_bandwidth_report() {
    let Some(dev) = gpu("nf4_gemv_bandwidth_report") else { return };
    let blocksize = 64;
    let n_copy = 14336 * 4096;
    let copy_src = dev.alloc::<bf16>(n_copy).unwrap();
    let copy_rate = (4 * n_copy) as f64 / device_seconds(&dev, 20, || drop(copy_src.try_clone().unwrap()));
    println!("qlora-gpu: {}: device copy {:.0} GB/s (117 MB bf16)", dev.name(), copy_rate / 1e9);
    for (out_f, in_f) in [(4096, 4096), (14336, 4096), (4096, 14336)] {
        let n = out_f * in_f;
        let case = Case::new(&mut Rng::new(45), n, blocksize, true);
        let nested = case.nested.as_ref().expect("nested case");
        let weight_bytes = n / 2 + nested.q.len() + 4 * nested.absmax2.len();
        let copies = (512usize << 20).div_ceil(weight_bytes);
        let weights: Vec<_> = (0..copies)
            .map(|_| {
                let (p, q) = (upload(&dev, &case.packed), upload(&dev, &nested.q));
                (p, q, upload(&dev, &nested.absmax2))
            })
            .collect();
        let code2 = upload(&dev, &nested.code2);
        for m in [1, 2, 8] {
            let x = upload(&dev, &vec![bf16::from_f32(0.5); m * in_f]);
            let mut y = dev.alloc::<bf16>(m * out_f).unwrap();
            let mut next = 0;
            let seconds = device_seconds(&dev, copies, || {
                let (packed, qabsmax, absmax2) = &weights[next % copies];
                next += 1;
                let scales = Nf4Scales::Nested { qabsmax, absmax2, code2: &code2, offset: nested.offset };
                gnf4::nf4_gemv(&mut [gnf4::GemvWeight { packed, scales, lora: None, y: &mut y }], blocksize, &x, in_f)
                    .unwrap()
            });
            let rate = (weight_bytes + 2 * m * (in_f + out_f)) as f64 / seconds;
            println!(
                "qlora-gpu: nf4_gemv {out_f}x{in_f} m {m}: {:.2} us, {:.0} GB/s = {:.0}% of the device copy's {:.0} GB/s",
                seconds * 1e6,
                rate / 1e9,
                100.0 * rate / copy_rate,
                copy_rate / 1e9
            );
        }
    }
}
