"""Batched linear assignment: sam3fast (CPU op, CUDA op) vs scipy and torch-linear-assignment.

Each case is B problems of (N, M) float32 costs. Methods (those that are available run):
  sam3fast_cpu    torch.ops.sam3fast.linear_sum_assignment on a CPU tensor (intra-op threads)
  scipy_cpu       a Python loop of scipy.optimize.linear_sum_assignment over a CPU tensor
  sam3fast_cuda   the CUDA op on a CUDA tensor (one thread block per problem), synchronised
  scipy_from_cuda the usual GPU-pipeline fallback: copy to host, scipy loop, copy the answer back
  tla_cuda        torch_linear_assignment.batch_linear_assignment on a CUDA tensor, if installed (0.1.0 is
                  a Triton kernel, one program per problem; bench/gpu/prepare_carry.sh carries its wheel). A
                  failure or a non-optimal answer of this third-party baseline is printed, not fatal
Times are medians over repeats, in ms per batch; every answer is checked against scipy's
optimal cost. Usage: python bench/bench_assignment.py [--smoke] [--repeats R] [--cases B,N,M ...]
[--no-knobs | --knobs-only] [--profile] (--smoke: small CPU cases, a few seconds; for CI).
--profile (CUDA) adds block 0's cycles per phase (reading the matrix, row minima, greedy matching,
searches) and its searches and Dijkstra steps, from the phase-timing kernel (SAM3FAST_LSA_PROFILE).

On CUDA a second table times sam3fast_cuda alone under the launcher's tuning knobs
(csrc/cuda/assignment_tuning.h), one 200x128 problem and 1000 of 64x64: SAM3FAST_LSA_THREADS
(0 = the size rule, 32 = one warp, 64), SAM3FAST_LSA_INIT (0 none, 1 row reduction + greedy, 2 + reduction
transfer), SAM3FAST_LSA_STAGE (1 = stage the costs in shared memory up to the opt-in limit, 0 = up to
48 KiB, 2 = the default: 1 when there are no more problems than SMs, else 0), SAM3FAST_LSA_REGS (1 = the
default: the searches' column state in registers, 0 = in shared memory) and SAM3FAST_LSA_SPLIT (2 = the
default: with no more problems than SMs a block of several warps initialises together, then warp 0 alone
runs the searches; 1 = that always, 0 = every warp searches). The launcher
reads them at every call, so the script sets them in os.environ between calls (and restores them). Columns:
ms/batch as above (host clock around a synchronised call: includes the op's dispatch and launch) and
graph us/call, the device time per call of 20 calls replayed from one CUDA graph (no host overhead).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from sam3fast.assignment import batched_linear_sum_assignment

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench/_common.py, also when run through runpy

from _common import timed  # noqa: E402

try:
    from torch_linear_assignment import batch_linear_assignment as tla_batch
except ImportError:
    tla_batch = None

FULL_CASES = [(1, 16, 16), (1, 100, 100), (1, 256, 256), (1, 200, 300), (1, 200, 128), (64, 32, 32), (1024, 16, 16),
              (1000, 64, 64), (4096, 8, 12), (256, 64, 100), (64, 256, 256)]
SMOKE_CASES = [(1, 32, 32), (64, 8, 12), (200, 6, 9), (8, 40, 25)]
KNOB_CASES = [(1, 200, 128), (1000, 64, 64)]
# (SAM3FAST_LSA_THREADS, SAM3FAST_LSA_INIT, SAM3FAST_LSA_STAGE, SAM3FAST_LSA_REGS, SAM3FAST_LSA_SPLIT); the
# first is the launcher's default; REGS = 0 keeps the column state in shared memory (the kernel before
# 2026-11-27's register state), SPLIT = 0 lets every warp search (the kernel before session 21's split, in
# which warp 0 alone searches after the block's initialisation), for the same settings
KNOB_SETTINGS = [("0", "2", "2", "1", "2"), ("0", "2", "2", "1", "0"), ("0", "2", "2", "0", "2"),
                 ("0", "2", "2", "0", "0"), ("0", "2", "0", "1", "2"), ("0", "1", "2", "1", "2"),
                 ("0", "0", "2", "1", "2"), ("32", "2", "2", "1", "2"), ("32", "2", "2", "0", "2"),
                 ("32", "0", "2", "1", "2"), ("64", "2", "2", "1", "2"), ("64", "2", "2", "1", "0"),
                 ("64", "0", "2", "1", "2"), ("256", "2", "2", "1", "2"), ("32", "2", "0", "1", "2"),
                 ("0", "2", "1", "1", "2")]
KNOB_VARS = ("SAM3FAST_LSA_THREADS", "SAM3FAST_LSA_INIT", "SAM3FAST_LSA_STAGE", "SAM3FAST_LSA_REGS",
             "SAM3FAST_LSA_SPLIT")


def scipy_loop(cost_cpu: torch.Tensor) -> torch.Tensor:
    B, n, _ = cost_cpu.shape
    out = np.full((B, n), -1, dtype=np.int64)
    arr = cost_cpu.numpy()
    for b in range(B):
        rows, cols = scipy_lsa(arr[b])
        out[b, rows] = cols
    return torch.from_numpy(out)


def total_cost(cost: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    c = cost.double().cpu()
    a = a.cpu()
    picked = torch.gather(c, 2, a.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(a >= 0, picked, torch.zeros_like(picked)).sum(-1)


def methods(cost_cpu: torch.Tensor, use_cuda: bool):
    yield "sam3fast_cpu", False, lambda: batched_linear_sum_assignment(cost_cpu)
    yield "scipy_cpu", False, lambda: scipy_loop(cost_cpu)
    if use_cuda:
        cost_gpu = cost_cpu.cuda()
        has_op = torch._C._dispatch_has_kernel_for_dispatch_key("sam3fast::linear_sum_assignment", "CUDA")
        if has_op:
            yield "sam3fast_cuda", True, lambda: batched_linear_sum_assignment(cost_gpu)
        yield "scipy_from_cuda", True, lambda: scipy_loop(cost_gpu.cpu()).to(cost_gpu.device)
        if tla_batch is not None:
            yield "tla_cuda", True, lambda: tla_batch(cost_gpu)


def graphed_us(fn, calls: int = 20, reps: int = 5) -> float:
    """Median device microseconds per call of ``fn`` over ``reps`` replays of one CUDA graph of ``calls``
    calls (CUDA events around each replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


@contextlib.contextmanager
def restored_env(names):
    """Restores the environment variables ``names`` on exit (the knobs are set between calls)."""
    saved = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def knob_rows(repeats: int, g: torch.Generator) -> None:
    """sam3fast_cuda under each KNOB_SETTINGS entry (set in os.environ, restored after)."""
    print("# launcher knobs (csrc/cuda/assignment_tuning.h), sam3fast_cuda only; threads 0 = the size rule; "
          "first row of each case = the defaults")
    print(f"{'B':>5} {'N':>4} {'M':>4}  {'threads':>7} {'init':>4} {'stage':>5} {'regs':>4} {'split':>5} "
          f"{'ms/batch':>10} {'graph us/call':>14}")
    with restored_env(KNOB_VARS):
        for B, n, m in KNOB_CASES:
            cost = torch.rand(B, n, m, generator=g)
            ref_cost = total_cost(cost, batched_linear_sum_assignment(cost))  # the CPU op: scipy's answers
            cost_gpu = cost.cuda()
            fn = lambda: batched_linear_sum_assignment(cost_gpu)  # noqa: E731
            for setting in KNOB_SETTINGS:
                os.environ.update(zip(KNOB_VARS, setting))
                ms, out = timed(fn, repeats, True)
                got = total_cost(cost, out)
                if not torch.allclose(got, ref_cost, rtol=1e-9, atol=1e-9):
                    raise AssertionError(f"knobs {setting} on {(B, n, m)}: not optimal "
                                         f"(max diff {(got - ref_cost).abs().max()})")
                us = graphed_us(fn)
                threads, init, stage, regs, split = setting
                print(f"{B:>5} {n:>4} {m:>4}  {threads:>7} {init:>4} {stage:>5} {regs:>4} {split:>5} {ms:>10.3f} "
                      f"{us:>14.1f}")


PROFILE_CASES = [(1, 200, 128), (1, 256, 256), (1000, 64, 64)]
# defaults, every warp searching, shared column state, no init, no opt-in staging, one warp
PROFILE_SETTINGS = [("0", "2", "2", "1", "2"), ("0", "2", "2", "1", "0"), ("0", "2", "2", "0", "2"),
                    ("0", "0", "2", "1", "2"), ("0", "2", "0", "1", "2"), ("32", "2", "2", "1", "2")]


def profile_rows(g: torch.Generator) -> None:
    """SAM3FAST_LSA_PROFILE=1: the phase-timing kernel, whose block 0 prints (device printf, on
    stdout at the sync) the cycles of each phase and its searches and Dijkstra steps, for
    PROFILE_CASES under PROFILE_SETTINGS (answers checked; a warm-up call first)."""
    print("# phase cycles of block 0 (SAM3FAST_LSA_PROFILE=1; threads, init, stage, regs, split as in the knob "
          "table)",
          flush=True)
    with restored_env(KNOB_VARS + ("SAM3FAST_LSA_PROFILE",)):
        for B, n, m in PROFILE_CASES:
            cost = torch.rand(B, n, m, generator=g)
            ref_cost = total_cost(cost, batched_linear_sum_assignment(cost))
            cost_gpu = cost.cuda()
            for setting in PROFILE_SETTINGS:
                os.environ.update(zip(KNOB_VARS, setting))
                os.environ["SAM3FAST_LSA_PROFILE"] = "0"
                batched_linear_sum_assignment(cost_gpu)  # warm (caches, clocks)
                torch.cuda.synchronize()
                os.environ["SAM3FAST_LSA_PROFILE"] = "1"
                print(f"# {B}x({n}x{m}) threads,init,stage,regs,split={','.join(setting)}:", flush=True)
                out = batched_linear_sum_assignment(cost_gpu)
                torch.cuda.synchronize()  # (flushes the device printf)
                if not torch.allclose(total_cost(cost, out), ref_cost, rtol=1e-9, atol=1e-9):
                    raise AssertionError(f"profile kernel {setting} on {(B, n, m)}: not optimal")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small CPU cases only (CI)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--cases", nargs="*", default=None, help="B,N,M triples")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--no-knobs", action="store_true", help="skip the CUDA launcher knob table")
    ap.add_argument("--knobs-only", action="store_true", help="only the CUDA launcher knob table")
    ap.add_argument("--profile", action="store_true",
                    help="also the phase cycles of block 0 (SAM3FAST_LSA_PROFILE=1) for a few cases")
    args = ap.parse_args()

    cases = [tuple(int(x) for x in c.split(",")) for c in args.cases] if args.cases else (
        SMOKE_CASES if args.smoke else FULL_CASES)
    repeats = args.repeats or (3 if args.smoke else 10)
    use_cuda = torch.cuda.is_available() and not (args.smoke or args.cpu_only)

    print(f"# linear assignment, float32 costs ~ U(0, 1); torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()})"
          + (f", GPU {torch.cuda.get_device_name()}" if use_cuda else ", no GPU"))
    print(f"# tla = torch-linear-assignment: {'installed' if tla_batch is not None else 'not installed'}")
    print(f"{'B':>5} {'N':>4} {'M':>4}  {'method':<16} {'ms/batch':>10} {'us/problem':>11} {'vs scipy':>9}")
    g = torch.Generator().manual_seed(0)
    if args.knobs_only:
        cases = []
    for B, n, m in cases:
        cost = torch.rand(B, n, m, generator=g)
        ref_cost = total_cost(cost, scipy_loop(cost))
        rows, notes = [], []
        for name, cuda, fn in methods(cost, use_cuda):
            try:
                ms, out = timed(fn, repeats, cuda)
                got = total_cost(cost, out)
            except Exception as e:  # noqa: BLE001 (only the optional baseline may fail: see below)
                if name != "tla_cuda":
                    raise
                notes.append(f"# {name} on {(B, n, m)} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            if not torch.allclose(got, ref_cost, rtol=1e-9, atol=1e-9):
                msg = f"{name} on {(B, n, m)}: not optimal (max diff {(got - ref_cost).abs().max()})"
                if name != "tla_cuda":
                    raise AssertionError(msg)
                notes.append("# " + msg)  # a third party's wrong answer is reported, not timed
                continue
            rows.append((name, ms))
        base = dict(rows)["scipy_cpu"]
        for name, ms in rows:
            print(f"{B:>5} {n:>4} {m:>4}  {name:<16} {ms:>10.3f} {ms * 1e3 / B:>11.1f} {base / ms:>8.1f}x")
        for note in notes:
            print(note)
    has_op = use_cuda and torch._C._dispatch_has_kernel_for_dispatch_key("sam3fast::linear_sum_assignment", "CUDA")
    if has_op and not args.no_knobs:
        knob_rows(repeats, g)
    if has_op and args.profile:
        profile_rows(g)

if __name__ == "__main__":
    main()
