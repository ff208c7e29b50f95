"""What the fixture scripts (gguf_fixtures.py, nf4_fixtures.py, peft_fixtures.py) share: their --out and --seed
arguments, importing what they need, the metadata that heads every fixture file, and failing with one line that names
the script."""

import argparse
import importlib
import os
import sys


def fail(msg):
    print(f"{os.path.basename(sys.argv[0])}: {msg}", file=sys.stderr)
    sys.exit(1)


def fixture_args(doc, out, seed, seed_help="base seed"):
    """--out (default `out`) and --seed (default `seed`), described by the first paragraph of the script's `doc`."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", default=out, help=f"output folder (default: {out})")
    ap.add_argument("--seed", type=int, default=seed, help=seed_help)
    return ap.parse_args()


def require(module, hint):
    """The imported `module`, or a failure saying what is missing (`hint`: what to install)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        fail(f"needs {hint}")


def fixture_meta(name, seed, torch, **fields):
    """The safetensors metadata of `{name}_fixtures.py`'s file: its format, generator, seed and torch version, then
    `fields` (versions and device)."""
    return {
        "format": f"qlora-rt {name} fixtures v1",
        "generator": f"scripts/reference/{name}_fixtures.py",
        "torch": torch.__version__,
        "seed": str(seed),
        **fields,
    }
