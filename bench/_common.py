"""What the op benchmarks in bench/ share: the Triton interpreter switch, timing, the machine header
and the results files ``bench/results/<op>_<device>_<date>.{json,md}``.

The scripts run as ``python bench/bench_<op>.py`` and through ``runpy`` (tests/test_bench_smoke.py),
so bench/ is not a package: each script puts its own folder on ``sys.path`` and imports this file
as ``_common``. Importing it changes nothing; ``use_interpreter_without_cuda`` is called explicitly.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def use_interpreter_without_cuda() -> None:
    """Run Triton kernels in the interpreter where no GPU exists. Triton reads TRITON_INTERPRET when a
    kernel is decorated, so call this before importing a kernel module."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def time_ms(fn, device, reps):
    """Median ms of ``fn()``: ``triton.testing.do_bench`` (L2 flushed) on CUDA, else ``reps`` timed
    calls with ``time.perf_counter`` after one warm-up call."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(reps, 100), return_mode="median")
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def timed(fn, reps: int, cuda: bool) -> tuple[float, torch.Tensor]:
    """(median ms over ``reps`` calls, the warm-up call's output); with ``cuda`` each call is
    synchronised on both sides."""
    out = fn()  # warm-up (and the answer to check)
    ts = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), out


def triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def machine_header(device, shape, dtype=None, sms=False):
    """The header printed above a kernel benchmark and stored with its results, in this key order:
    date, python, torch, triton, device, sms (only with ``sms``), cuda, triton_interpreter, shape,
    dtype (only when given), timing."""
    cuda = device.type == "cuda"
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    h = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "device": torch.cuda.get_device_name(device) if cuda else cpu,
    }
    if sms:
        h["sms"] = torch.cuda.get_device_properties(device).multi_processor_count if cuda else None
    h["cuda"] = torch.version.cuda if cuda else None
    h["triton_interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    h["shape"] = shape
    if dtype is not None:
        h["dtype"] = dtype
    h["timing"] = "triton.testing.do_bench median, L2 flushed" if cuda else "perf_counter median"
    return h


def print_header(title, header):
    print(f"# {title} benchmark")
    for k, v in header.items():
        print(f"# {k}: {v}")


def write_results(name, header, rows, columns, cells, out=None):
    """Writes ``<stem>.json`` ({"header", "rows"}) and ``<stem>.md`` (the header as a list, then a
    table with ``columns``: the first two text, the others right-aligned numbers; ``cells(row)`` gives
    a row's cell strings). ``stem`` is ``out``, or bench/results/<name>_<device>_<date>."""
    stem = out or os.path.join(
        RESULTS, "{}_{}_{}".format(name, header["device"].replace(" ", "-").lower(), datetime.date.today())
    )
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# {name}\n\n" + "".join(f"- {k}: {v}\n" for k, v in header.items()))
        align = ["---"] * 2 + ["---:"] * (len(columns) - 2)
        f.write("\n| " + " | ".join(columns) + " |\n|" + "|".join(align) + "|\n")
        for r in rows:
            f.write("| " + " | ".join(cells(r)) + " |\n")
    print(f"# wrote {stem}.json and .md")


def write_json_and_text(stem, results, text):
    """Writes ``<stem>.json`` (``results``) and ``<stem>.md`` (``text``, a formatted table) and says
    so: the end-to-end benchmarks' results files."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    print("wrote", stem + ".json", stem + ".md")


def graphed(fn):
    """``fn`` captured in a CUDA graph (warmed up on a side stream first, the graph runners' recipe
    ``sam3fast.predictor.graphs.warm_up_and_capture``); returns a call that replays the graph and
    returns the captured outputs, which the replay rewrites (so a benchmark checks a replay's values
    as it checks the eager call's). For launch-bound ops: the replay's time is the GPU time without
    the host's. (It returned the bare replay, None, until the first H200 run of 2026-11-27, where the
    checks of bench_residual_norm and bench_fused_linear failed on it.)"""
    from sam3fast.predictor.graphs import warm_up_and_capture

    graph, out, _ = warm_up_and_capture(fn, 1, None, "bench_capture")

    def replay():
        graph.replay()
        return out

    return replay
