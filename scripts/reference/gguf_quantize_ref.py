#!/usr/bin/env python3
"""Reference bytes for qlora-rt's GGUF quantizers (models/src/gguf/quant.rs), from gguf-py's numpy quantizers.

Writes tests/fixtures/gguf/quantize_ref.safetensors: `input`, 20 rows x 64 f32 values (two 32-value blocks per
row), and the bytes gguf-py 0.19.0's `gguf.quants.quantize` makes of them as `Q8_0`, `Q4_0`, `Q4_1` and `F16`
(U8 tensors, one row of bytes per input row). The rows cover what rounding depends on: uniform and normal values
at several scales, exact halves for Q8_0's round-half-away-from-zero, blocks whose largest magnitude is negative
or tied in sign (Q4_0 takes the signed first extreme), constant and all-zero blocks (zero scales), and values
near f16's range limits. models/tests/gguf_export.rs compares our quantizer's output to these bytes bit for bit.

gguf-py documents its Q8_0 as bit-exact with ggml's C reference `quantize_row_q8_0_ref`; its Q4_0/Q4_1 follow
`quantize_row_q4_0_ref`/`quantize_row_q4_1_ref` operation for operation in f32 (see the module docs of
quant.rs). Only pure-Python numpy code runs: no network, no model weights.

    python3 -m venv /tmp/ggufvenv && /tmp/ggufvenv/bin/pip install gguf==0.19.0 numpy
    /tmp/ggufvenv/bin/python scripts/reference/gguf_quantize_ref.py
"""

from importlib import metadata
import sys
from pathlib import Path

import numpy as np
from gguf.quants import quantize
from gguf import GGMLQuantizationType as T

from quant_ref_common import safetensors, scaled_rows

OUT = Path(__file__).resolve().parents[2] / "tests/fixtures/gguf/quantize_ref.safetensors"


def rows() -> np.ndarray:
    rng = np.random.default_rng(20261124)
    r = scaled_rows(rng, 64)
    # Exact halves of the Q8_0 step: max |x| = 127 makes d = 1, so x + 0.5 lands on .5 boundaries.
    halves = np.arange(-32, 32, dtype=np.float64) + 0.5
    halves[0] = 127.0
    halves[32] = -127.0
    r.append(halves)
    # Largest magnitude negative; ties between +m and -m (the first wins).
    neg = rng.uniform(-1, 1, 64)
    neg[5] = -3.0
    neg[40] = -2.0
    r.append(neg)
    tie = rng.uniform(-1, 1, 64)
    tie[3], tie[7] = 2.0, -2.0
    tie[33], tie[34] = -2.5, 2.5
    r.append(tie)
    r.append(np.full(64, 0.75))
    r.append(np.zeros(64))
    mixed = np.zeros(64)
    mixed[32:] = rng.uniform(-1, 1, 32)
    r.append(mixed)
    r.append(rng.uniform(-60000, 60000, 64))
    r.append(rng.uniform(-1e-6, 1e-6, 64))
    r.append(rng.uniform(0.5, 1.5, 64))
    r.append(-rng.uniform(0.5, 1.5, 64))
    steps = np.linspace(-1, 1, 64)
    r.append(steps)
    r.append(rng.standard_t(2, 64))
    out = np.stack(r).astype(np.float32)
    assert out.shape == (20, 64), out.shape
    return out


def main() -> int:
    x = rows()
    tensors = {"input": ("F32", x.shape, x.tobytes())}
    for ty in (T.Q8_0, T.Q4_0, T.Q4_1, T.F16):
        q = np.ascontiguousarray(quantize(x, ty)).view(np.uint8).reshape(x.shape[0], -1)
        tensors[ty.name] = ("U8", q.shape, q.tobytes())
    OUT.write_bytes(safetensors(tensors, {"gguf": metadata.version("gguf"), "numpy": np.__version__}))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
