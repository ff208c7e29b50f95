//! `qlora-rt merge --device cuda` against `--device cpu`, through the binary: the tiny Llama fixture with its peft
//! LoRA adapter and with a DoRA adapter trained for two steps on the CPU, merged from the NF4 and from the original
//! weights, in bf16 and f32. model.safetensors must be the same bytes whichever device computed it: the promise of
//! `--device` (the delta and DoRA's row norms are summed in one fixed order on both; every other step rounds once).
//! Then one Llama-3-8B MLP weight merged on both, equal bit for bit, with the time each takes.
//!
//! Prints `qlora-gpu: <test>: ran on <gpu>` or `qlora-gpu: <test>: skipped: <why>`; a missing GPU passes unless
//! QLORA_REQUIRE_GPU=1. The binary is CARGO_BIN_EXE_qlora-cli, or QLORA_RT_BIN on another machine; the fixture comes
//! from CARGO_MANIFEST_DIR, or QLORA_FIXTURES.

mod common;

use common::{chat_data, gpu_run_ok as run};
use qlora_autograd::{merged_weight, LoraAdapter, LoraConfig, LoraInit};
use qlora_runtime::quant::{BaseWeight, Nf4Weight};
use qlora_runtime::testing::{fixtures_dir, gpu, gpu_device};
use qlora_runtime::{DType, Device, Rng, Tensor};
use std::path::Path;
use std::time::Instant;

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

#[test]
fn merge_on_cuda_writes_the_cpus_bytes() {
    let Some(_dev) = gpu("merge_on_cuda_writes_the_cpus_bytes") else { return };
    let model = fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("models/llama");
    let dir = tempfile::tempdir().unwrap();
    let data = chat_data(dir.path());
    // Two steps move B off zero and the magnitudes off the weight norms, so every DoRA term counts.
    let dora = dir.path().join("dora");
    run(&[
        "finetune",
        "--model",
        path(&model),
        "--data",
        path(&data),
        "--out",
        path(&dora),
        "--dora",
        "--device",
        "cpu",
        "--max-steps",
        "2",
        "--max-seq-len",
        "64",
        "--micro-batch",
        "2",
        "--lr",
        "5e-2",
        "--warmup-steps",
        "0",
    ]);
    let lora = model.join("adapter");
    for (kind, adapter) in [("lora", &lora), ("dora", &dora)] {
        for flags in [
            ["--from", "nf4", "--dtype", "bf16"],
            ["--from", "nf4", "--dtype", "f32"],
            ["--from", "dense", "--dtype", "f32"],
        ] {
            let merged = |device: &str| {
                let out = dir.path().join(format!("{kind}-{}-{}-{device}", flags[1], flags[3]));
                let mut args = vec!["merge", "--model", path(&model), "--adapter", path(adapter), "--out", path(&out)];
                args.extend(flags);
                args.extend(["--device", device]);
                run(&args);
                std::fs::read(out.join("model.safetensors")).expect("merged weights")
            };
            let (cpu, cuda) = (merged("cpu"), merged("cuda"));
            let what = format!("{kind} {}", flags.join(" "));
            assert_eq!(cpu.len(), cuda.len(), "{what}: file sizes");
            let differ = cpu.iter().zip(&cuda).filter(|(a, b)| a != b).count();
            let first = cpu.iter().zip(&cuda).position(|(a, b)| a != b);
            assert_eq!(differ, 0, "{what}: {differ} of {} bytes differ, the first at {first:?}", cpu.len());
        }
    }
}

/// Adapted weights of Llama-3-8B: 32 layers of q, o (4096²), k, v (1024 × 4096) and gate, up, down (14336 × 4096).
const LLAMA_8B_ADAPTED: f64 = 32.0 * (2.0 * 4096.0 * 4096.0 + 2.0 * 1024.0 * 4096.0 + 3.0 * 14336.0 * 4096.0);

/// A 14336 × 4096 NF4 weight (double quant) and an r = 16 adapter, LoRA and DoRA: the GPU's merged bf16 weight is the
/// CPU's bytes; the time of each (the GPU's with the NF4 upload and the bf16 download), and both scaled to an 8B
/// model's adapted weights by element count, are printed.
#[test]
fn an_8b_mlp_weight_merges_on_cuda_as_on_the_cpu() {
    let Some(dev) = gpu_device("an_8b_mlp_weight_merges_on_cuda_as_on_the_cpu") else { return };
    let (out_f, in_f, r) = (14336, 4096, 16);
    let mut rng = Rng::new(3);
    let random =
        |rng: &mut Rng, n: usize, scale: f64| (0..n).map(|_| (scale * rng.normal()) as f32).collect::<Vec<_>>();
    let w = Tensor::from_vec(random(&mut rng, out_f * in_f, 0.02), &[out_f, in_f]).unwrap().to_dtype(DType::BF16);
    let base = BaseWeight::Nf4(Nf4Weight::quantize(&w, 64, true).unwrap());
    for dora in [false, true] {
        let config =
            LoraConfig { r, alpha: 16.0, use_rslora: false, use_dora: dora, dropout: 0.0, init: LoraInit::Default };
        let ad = LoraAdapter::new("mlp.up_proj", &base, &config, &mut rng).unwrap();
        ad.lora_b.set_value(Tensor::from_vec(random(&mut rng, out_f * r, 0.01), &[out_f, r]).unwrap());
        let start = Instant::now();
        let cpu = merged_weight(&base, &ad, DType::BF16).unwrap();
        let cpu_s = start.elapsed().as_secs_f64();
        let on_gpu = || {
            let merged = merged_weight(&base.to_device(dev).unwrap(), &ad.to_device(dev).unwrap(), DType::BF16);
            merged.unwrap().to_device(Device::Cpu).unwrap()
        };
        on_gpu(); // compiles the kernels
        let start = Instant::now();
        let cuda = on_gpu();
        let cuda_s = start.elapsed().as_secs_f64();
        let kind = if dora { "DoRA" } else { "LoRA" };
        if cpu.to_bytes() != cuda.to_bytes() {
            panic!("{kind}: the GPU's merged weight differs from the CPU's: {}", stages(&base, &ad, dev));
        }
        let scale = LLAMA_8B_ADAPTED / (out_f * in_f) as f64;
        println!(
            "qlora-gpu: merge {out_f}x{in_f} r {r} {kind}: cpu {:.0} ms, cuda {:.1} ms (with transfers); an 8B model's \
             adapted weights: cpu {:.1} s, cuda {:.1} s",
            cpu_s * 1e3,
            cuda_s * 1e3,
            cpu_s * scale,
            cuda_s * scale
        );
    }
}

/// Which of `merged_weight`'s steps first differs between the CPU and `dev`: elements that differ in the dequantized
/// base, the delta and the rounded result, and the first differing element's values at each step.
fn stages(base: &BaseWeight, ad: &LoraAdapter, dev: Device) -> String {
    let (gpu_base, gpu_ad) = (base.to_device(dev).unwrap(), ad.to_device(dev).unwrap());
    let back = |t: Tensor| t.to_device(Device::Cpu).unwrap().to_vec::<f32>();
    let w = (base.materialize(DType::F32).unwrap().to_vec::<f32>(), back(gpu_base.materialize(DType::F32).unwrap()));
    let d = (ad.delta_weight(base).unwrap().to_vec::<f32>(), back(gpu_ad.delta_weight(&gpu_base).unwrap()));
    let r = (
        merged_weight(base, ad, DType::BF16).unwrap().to_vec::<f32>(),
        back(merged_weight(&gpu_base, &gpu_ad, DType::BF16).unwrap()),
    );
    let differ = |(a, b): &(Vec<f32>, Vec<f32>)| a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    let first = r.0.iter().zip(&r.1).position(|(x, y)| x.to_bits() != y.to_bits());
    let at = first.map_or(String::new(), |i| {
        format!(
            "; element {i}: base {:e} / {:e}, delta {:e} / {:e}, bf16 {:e} / {:e}",
            w.0[i], w.1[i], d.0[i], d.1[i], r.0[i], r.1[i]
        )
    });
    format!(
        "elements differing (cpu vs gpu): dequantized base {}, delta {}, bf16 result {}{at}",
        differ(&w),
        differ(&d),
        differ(&r)
    )
}
