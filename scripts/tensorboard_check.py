#!/usr/bin/env python3
"""Reads the TensorBoard event files `qlora-rt finetune --report-to tensorboard` wrote in OUT with TensorBoard's
own reader (EventAccumulator, which checks the TFRecord CRCs) and compares every scalar with OUT/metrics.jsonl.
Prints the tags with their point counts and exits non-zero on any difference. Not run by CI (needs Python).

Run (tensorboard in a venv outside the repo):
  python3 -m venv /tmp/venv && /tmp/venv/bin/pip install tensorboard
  /tmp/venv/bin/python scripts/tensorboard_check.py OUT
"""
import json
import math
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

out = sys.argv[1]
acc = EventAccumulator(out, size_guidance={"scalars": 0})
acc.Reload()
tags = acc.Tags()["scalars"]
scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags}
for tag in sorted(tags):
    points = scalars[tag]
    print(f"{tag:28} {len(points):4} points, steps {min(points)}..{max(points)}, last {points[max(points)]:.6g}")

failures = 0
keys = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm", "eval_loss": "eval/loss"}
with open(f"{out}/metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if line.strip()]
for row in rows:
    for key, tag in keys.items():
        if key not in row:
            continue
        got = scalars.get(tag, {}).get(row["step"])
        # Summaries hold float32.
        if got is None or not math.isclose(got, row[key], rel_tol=1e-6, abs_tol=1e-12):
            print(f"MISMATCH step {row['step']} {tag}: events {got}, metrics.jsonl {row[key]}")
            failures += 1
print(f"{len(rows)} metrics rows compared, {failures} mismatch(es)")
sys.exit(1 if failures else 0)
