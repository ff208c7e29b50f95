"""What the quantizer reference scripts (gguf_quantize_ref.py here, ../llamacpp/kquant_ref.py) share: the rows every
quantizer is checked on first, and the safetensors file they write without the safetensors package (so that the
scripts need nothing beyond numpy and the quantizer they record)."""

import json
import struct


def scaled_rows(rng, n):
    """A uniform and a normal row of `n` values at each scale from 1e-3 to 37: rounding at the magnitudes of real
    weights and of outliers."""
    rows = []
    for scale in (1e-3, 0.02, 1.0, 37.0):
        rows.append(rng.uniform(-scale, scale, n))
        rows.append(rng.normal(0.0, scale, n))
    return rows


def safetensors(tensors, meta):
    """The bytes of a safetensors file holding `tensors` (name → (dtype, shape, raw bytes)), with `meta` as its
    metadata."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = meta
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text.encode() + b"".join(blobs)
