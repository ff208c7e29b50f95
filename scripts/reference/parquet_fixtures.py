#!/usr/bin/env python3
"""Writes the Parquet dataset fixtures under tests/fixtures/data/ as pyarrow (what Hugging Face `datasets` uses)
writes them, so the Rust reader is checked against real files, not only its own writer's (models/src/data/parquet.rs,
cli/tests/datasets.rs):

- alpaca.snappy.parquet: Alpaca rows (instruction, input, output), pyarrow's defaults (snappy, dictionary pages).
- sharegpt.snappy.parquet: ShareGPT rows, `conversations` a list<struct<from, value>>, plus an optional `system`.
- text.zstd.parquet: one `text` row compressed with zstd, a codec qlora-rt leaves out (the refusal test).

Words stay within the tiny fixture tokenizer's alphabet (lower-case letters, digits, ".,!?'").

Run (pyarrow in a venv outside the repo):
  python3 -m venv /tmp/venv && /tmp/venv/bin/pip install pyarrow
  /tmp/venv/bin/python scripts/reference/parquet_fixtures.py tests/fixtures/data
"""
import sys

import pyarrow as pa
import pyarrow.parquet as pq

out = sys.argv[1]
alpaca = [
    {"instruction": "what is the answer?", "input": "", "output": "the answer is 42."},
    {"instruction": "add the numbers.", "input": "2 and 2", "output": "it is 4."},
] * 4
pq.write_table(pa.Table.from_pylist(alpaca), f"{out}/alpaca.snappy.parquet")
sharegpt = [
    {
        "system": "be brief.",
        "conversations": [{"from": "human", "value": "what is the answer?"}, {"from": "gpt", "value": "42."}],
    },
    {"system": None, "conversations": [{"from": "human", "value": "hi!"}, {"from": "gpt", "value": "hello."}]},
]
pq.write_table(pa.Table.from_pylist(sharegpt), f"{out}/sharegpt.snappy.parquet")
pq.write_table(pa.Table.from_pylist([{"text": "plain text."}]), f"{out}/text.zstd.parquet", compression="zstd")
print("pyarrow", pa.__version__)
