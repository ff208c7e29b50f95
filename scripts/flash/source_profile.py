"""Per-instruction warp stalls from Nsight Compute's source page: reads the CSV of
`ncu --import REP --page source --csv --print-source sass` and prints the 40 SASS instructions with the most warp-stall
samples (their share of all samples, in program order), then the stall-reason columns summed over the kernel. Which
instruction the warps wait on is what the details page's stall totals cannot say (e.g. the instruction after a barrier).
Usage: python3 scripts/flash/source_profile.py SOURCE.csv
"""
import csv
import sys


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main(path):
    rows = list(csv.reader(open(path, errors="replace")))
    header_at = next(i for i, r in enumerate(rows) if any(c.strip() == "Source" for c in r))
    header = rows[header_at]
    body = [r for r in rows[header_at + 1:] if len(r) == len(header)]
    source = next(i for i, c in enumerate(header) if c.strip() == "Source")
    samples = next(i for i, c in enumerate(header) if "Warp Stall Sampling (All" in c)
    total = sum(number(r[samples]) for r in body) or 1.0
    print(f"{len(body)} instructions, {total:.0f} warp-stall samples")
    top = sorted(range(len(body)), key=lambda i: -number(body[i][samples]))[:40]
    for i in sorted(top):
        print(f"{i:6d} {100 * number(body[i][samples]) / total:5.1f}%  {body[i][source][:110]}")
    reasons = [(c, sum(number(r[j]) for r in body)) for j, c in enumerate(header) if c.startswith("stall_")]
    for name, value in sorted(reasons, key=lambda x: -x[1])[:20]:
        print(f"{name[:60]:60s} {100 * value / total:5.1f}%")


if __name__ == "__main__":
    main(sys.argv[1])
