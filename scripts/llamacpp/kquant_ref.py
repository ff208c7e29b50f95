#!/usr/bin/env python3
"""Known-answer bytes for qlora-rt's GGUF quantizers (models/src/formats/gguf/quant/) from ggml itself.

Builds kquant_ref.c against a llama.cpp checkout whose libggml-base.a is built (see run_checks.sh), runs it on rows
of 256 f32 values and writes tests/fixtures/gguf/kquant_ref.safetensors: `input` (22 rows x 256 f32) and, per type
(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), the bytes of ggml's `quantize_row_<type>_ref` as U8 [rows,
row bytes]. The rows cover what the K-quants' searches and roundings depend on: uniform, normal and heavy-tailed
values at several scales, all-positive and all-negative rows (Q4_K/Q5_K's min clamps to 0), zero and constant
rows, rows with one zero 16- or 32-value group (the zero-scale `continue` paths), single outliers, tiny values
near ggml's GROUP_MAX_EPS and values near f16's range. models/tests/gguf_export.rs compares bit for bit.

    python3 scripts/llamacpp/kquant_ref.py LLAMA_CPP_DIR
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "reference"))
from quant_ref_common import safetensors, scaled_rows  # noqa: E402

OUT = HERE.parents[1] / "tests/fixtures/gguf/kquant_ref.safetensors"
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def rows() -> np.ndarray:
    rng = np.random.default_rng(20261204)
    r = scaled_rows(rng, 256)
    r.append(rng.standard_t(2, 256))
    r.append(rng.uniform(0.5, 1.5, 256))
    r.append(-rng.uniform(0.5, 1.5, 256))
    r.append(np.zeros(256))
    r.append(np.full(256, 0.75))
    r.append(np.full(256, -0.75))
    gap32 = rng.normal(0, 0.05, 256)
    gap32[64:96] = 0
    r.append(gap32)
    gap16 = rng.normal(0, 0.05, 256)
    gap16[16:32] = 0
    gap16[200:216] = 1e-9
    r.append(gap16)
    outlier = rng.normal(0, 0.02, 256)
    outlier[17] = 3.0
    outlier[150] = -5.0
    r.append(outlier)
    r.append(rng.uniform(-1e-6, 1e-6, 256))
    r.append(rng.uniform(-60000, 60000, 256))
    r.append(np.linspace(-1, 1, 256))
    mixed = rng.normal(0, 1, 256) * np.repeat(10.0 ** rng.uniform(-3, 0, 16), 16)
    r.append(mixed)
    r.append(np.round(rng.normal(0, 4, 256)) / 4)
    out = np.stack(r).astype(np.float32)
    assert out.shape == (22, 256), out.shape
    return out


def main() -> None:
    llama = Path(sys.argv[1]).resolve()
    x = rows()
    commit = subprocess.run(["git", "-C", str(llama), "rev-parse", "HEAD"], capture_output=True, text=True)
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "kquant_ref"
        subprocess.run(["g++", "-O2", "-x", "c", str(HERE / "kquant_ref.c"), "-x", "none",
                        f"-I{llama}/ggml/include", f"-I{llama}/ggml/src", f"{llama}/build/ggml/src/libggml-base.a",
                        "-lm", "-lpthread", "-fopenmp", "-o", str(exe)], check=True)
        (Path(tmp) / "in.f32").write_bytes(x.tobytes())
        subprocess.run([str(exe), f"{tmp}/in.f32", f"{tmp}/out"], check=True)
        tensors = {"input": ("F32", x.shape, x.tobytes())}
        for t in TYPES:
            data = (Path(tmp) / f"out.{t}").read_bytes()
            tensors[t] = ("U8", (x.shape[0], len(data) // x.shape[0]), data)
    OUT.write_bytes(safetensors(tensors, {"llama.cpp": commit.stdout.strip() or str(llama)}))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
