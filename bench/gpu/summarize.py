"""The decisions a GPU run's kernel benchmarks support, in one screen: per benchmark file and per
case (its rows grouped by everything but the implementation and the metrics), the fastest rows,
where the default launch stands against the fastest, and the baselines (eager PyTorch, SDPA,
cuDNN, cuBLAS, the official code).

    python bench/gpu/summarize.py                          # every bench/results/*.json with rows
    python bench/gpu/summarize.py bench/results/*_run3.json
    python bench/gpu/summarize.py --top 5

Reads the ``{"header", "rows"}`` files that ``bench/_common.write_results`` writes (each row with
"impl" and "ms"). What it prints is arithmetic on those numbers (ratios), nothing new is measured;
a "default" is the row named "op (defaults)" (or the first row whose name starts with "op" or says
"(op" or "defaults") of a case; a case is a row's text and integer fields (floats are measurements).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(os.path.dirname(HERE), "results")
# row keys that are measurements or labels of one implementation, not part of the case
_METRICS = {"impl", "ms", "GBs", "TFLOPs", "useful_GBps", "tflops", "gbs", "ms_median", "ms_mean", "frac"}
_BASELINES = ("eager", "sdpa", "cudnn", "cublas", "official", "compiled", "copy", "scipy", "torch", "xformers")


def _case_key(row: dict) -> tuple:
    """The row's case: its text and integer fields (shape, objects, ...); floats are measurements."""
    return tuple((k, row[k]) for k in sorted(row)
                 if k not in _METRICS and isinstance(row[k], (str, int, bool)) and not isinstance(row[k], float))


def _is_default(impl: str) -> bool:
    return impl.startswith("op") or "(op" in impl or "defaults" in impl


def summarize(path: str, top: int = 3) -> list:
    """The lines for one results file (empty when it holds no impl/ms rows)."""
    with open(path) as f:
        data = json.load(f)
    rows = [r for r in data.get("rows", []) if isinstance(r, dict) and "impl" in r and isinstance(r.get("ms"), (int, float))]
    if not rows:
        return []
    device = data.get("header", {}).get("device", "?")
    lines = [f"## {os.path.basename(path)} ({device})"]
    cases: dict = {}
    for r in rows:
        cases.setdefault(_case_key(r), []).append(r)
    for key, group in cases.items():
        label = ", ".join(f"{k}={v}" for k, v in key) or "(one case)"
        ranked = sorted(group, key=lambda r: r["ms"])
        best = ranked[0]
        default = next((r for r in group if r["impl"] == "op (defaults)"), None) or next(
            (r for r in group if _is_default(r["impl"])), None)
        lines.append(f"- {label}")
        for r in ranked[:top]:
            lines.append(f"    {r['ms']:9.4f} ms  {r['impl']}")
        if default is not None:
            verdict = "is the fastest" if default is best else f"{default['ms'] / best['ms']:.2f}x the fastest"
            lines.append(f"    default ({default['impl']}): {default['ms']:.4f} ms, {verdict}")
        for r in group:
            if r["impl"].lower().startswith(_BASELINES) and r is not best:
                lines.append(f"    baseline {r['impl']}: {r['ms']:.4f} ms ({r['ms'] / best['ms']:.2f}x the fastest)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="results JSON files (default: every bench/results/*.json)")
    p.add_argument("--top", type=int, default=3, help="fastest rows shown per case")
    args = p.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(RESULTS, "*.json")))
    shown = 0
    for path in files:
        try:
            lines = summarize(path, args.top)
        except (OSError, ValueError) as e:  # an unreadable file is named, the others go on
            print(f"## {path}: not read ({type(e).__name__}: {e})")
            continue
        if lines:
            print("\n".join(lines) + "\n")
            shown += 1
    print(f"# {shown} of {len(files)} files had benchmark rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
