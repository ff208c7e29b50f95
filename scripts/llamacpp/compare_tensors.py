#!/usr/bin/env python3
"""Compares two GGUF files tensor by tensor (names, ggml types, raw bytes) and prints one JSON object:
{"identical_files": bool, "tensors": N, "same_bytes": N, "type_differs": [names], "bytes_differ": [names],
"metadata_differs": [keys]}.
Metadata keys are compared by value, apart from the tokenizer arrays, which are compared in full.

    GGUF_PY=llama.cpp/gguf-py python3 scripts/llamacpp/compare_tensors.py OURS.gguf THEIRS.gguf
"""

import json
import os
import sys

sys.path.insert(0, os.environ.get("GGUF_PY", ""))
from gguf import GGUFReader  # noqa: E402


def fields(r: GGUFReader) -> dict:
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            out[k] = f.contents()
        except Exception:  # noqa: BLE001 - a type gguf-py cannot render: compare its raw parts
            out[k] = [bytes(p) for p in f.parts]
    return out


def main() -> None:
    a, b = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2])
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys(), f"tensor names differ: {sorted(ta.keys() ^ tb.keys())}"
    type_differs = [n for n in ta if ta[n].tensor_type != tb[n].tensor_type]
    bytes_differ = [n for n in ta if n not in type_differs and bytes(ta[n].data) != bytes(tb[n].data)]
    fa, fb = fields(a), fields(b)
    metadata_differs = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
    with open(sys.argv[1], "rb") as fa_, open(sys.argv[2], "rb") as fb_:
        identical = fa_.read() == fb_.read()
    print(json.dumps({
        "identical_files": identical,
        "tensors": len(ta),
        "same_bytes": len(ta) - len(type_differs) - len(bytes_differ),
        "type_differs": [f"{n}: {ta[n].tensor_type.name} vs {tb[n].tensor_type.name}" for n in type_differs],
        "bytes_differ": bytes_differ,
        "metadata_differs": metadata_differs,
    }))


if __name__ == "__main__":
    main()
