"""Benchmark of the object table's per-step bookkeeping (kernels/table_memory.py): the staged frames
applied and the memory assembled, as every graphed tracker step does before the memory attention.

Rows, each on the same random table (objects in the first rows, bf16, M = 64 channels on 72 x 72,
4 conditioning slots, 5 ring frames, 15 ring pointers, D = 256; the first call of each applies a
staged frame to every row, later calls find nothing staged, as graph replays between stagings do):
  pytorch            the references (``table_apply_staged_ref`` + the PyTorch ``table_memory``
                     path): ~90 small operations
  kernels            the ``sam3fast::`` ops (3 Triton launches and the pointer projection's ~6)
and each of them graphed (``graphed``: one CUDA graph replay, the tracker step's situation, where
a launch costs its gap and not its host time). Outputs are checked equal (bit for bit) first.
GB/s counts the bytes the assembly must write and read once: memory and its positions (rows x S x
M x 2 x 2 bytes) and the features they come from.

    python bench/bench_table_memory.py                  # GPU: 1, 5, 16 objects (the bucket's rows)
    python bench/bench_table_memory.py --smoke          # CPU: tiny shapes, Triton interpreter, seconds

CPU numbers (``--smoke``) check that the script runs; they are not performance numbers.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench/_common.py, also when run through runpy

from _common import graphed, machine_header, print_header, time_ms, use_interpreter_without_cuda, write_results  # noqa: E402

use_interpreter_without_cuda()  # before the kernel import

from sam3fast.kernels import _triton_compat as tc  # noqa: E402
from sam3fast.video import memory_bank as mb  # noqa: E402
from sam3fast.video.memory_bank import BankSpec, TableState, table_apply_staged, table_memory  # noqa: E402


def random_table(cap, C, F, G, M, side, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    def flags(p, *shape):
        return (torch.rand(*shape, generator=g) < p).to(device)

    def ints(hi, *shape):
        return torch.randint(0, hi, shape, generator=g).to(device)

    return TableState(
        ring_feat=r(cap, F, M, side, side), ring_ptr=r(cap, G, D), count=ints(3 * G, cap),
        last_feat=r(cap, M, side, side), last_ptr=r(cap, D), last_content=flags(0.9, cap), last_good=flags(0.8, cap),
        cond_feats=r(cap, C, M, side, side), cond_ptrs=r(cap, C, D), cond_frames=ints(8, cap, C),
        cond_valid=flags(1.0, cap, C), maskmem_pos=r(cap, M, side, side), active=flags(1.0, cap),
        segment=torch.zeros(cap, dtype=torch.long, device=device), next_feat=r(cap, M, side, side),
        next_ptr=r(cap, D), next_good=flags(0.8, cap), next_content=flags(1.0, cap), staged=flags(1.0, cap),
    )


def bench_rows(rows_run, args, device, dtype):
    C, F, G, M, side, D, NM = args.cond, 5, 15, args.channels, args.side, args.ptr_dim, 7
    spec = BankSpec(num_maskmem=NM, F=F, G=G, ptr_norm=G + 1, sign=1)
    proj = torch.nn.Linear(D, M).to(device=device, dtype=dtype)
    enc = torch.randn(NM, 1, 1, M).to(device=device, dtype=dtype)
    frame = torch.tensor(9, device=device)
    base = random_table(rows_run, C, F, G, M, side, D, dtype, device, seed=rows_run)

    def step(state, kernels):
        def run():
            old = tc.KERNEL_PATHS_ON_CPU, mb.TABLE_KERNELS
            tc.KERNEL_PATHS_ON_CPU = kernels and device.type == "cpu"
            mb.TABLE_KERNELS = kernels
            try:
                with torch.inference_mode():
                    table_apply_staged(spec, state)
                    return table_memory(spec, state, frame, False, enc, proj, rows_run)
            finally:
                tc.KERNEL_PATHS_ON_CPU, mb.TABLE_KERNELS = old
        return run

    L = side * side
    S = (C + F + 1) * L + (C + G + 1) * (D // M)
    elt = torch.empty((), dtype=dtype).element_size()
    nbytes = rows_run * (2 * S * M * elt + (C + F + 2) * M * L * elt + S)
    results, outs = [], {}
    for name, kernels in (("pytorch", False), ("kernels", True)):
        state = TableState(*(t.clone() for t in base))
        fn = step(state, kernels)
        outs[name] = fn()
        cands = {name: fn}
        if device.type == "cuda" and not args.no_graphs:
            cands[f"{name} graphed"] = graphed(fn)
        for label, f in cands.items():
            ms = time_ms(f, device, args.reps)
            results.append({"shape": f"rows={rows_run}", "impl": label, "ms": ms, "GBs": nbytes / ms / 1e6})
            print(f"rows={rows_run:<4} {label:20} {ms:10.4f} ms  {nbytes / ms / 1e6:8.1f} GB/s")
    for a, b in zip(outs["pytorch"][:2] + outs["pytorch"][3:], outs["kernels"][:2] + outs["kernels"][3:]):
        assert torch.equal(a, b), "the kernels' memory differs from the references'"
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI); numbers are not performance numbers")
    p.add_argument("--objects", default="1,8,16", help="comma-separated rows (a step runs the bucket's rows)")
    p.add_argument("--side", type=int, default=72)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--ptr-dim", type=int, default=256)
    p.add_argument("--cond", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--results", default=None, help="results path stem (GPU: bench/results/table_memory_<gpu>_<date>)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.objects, args.side, args.channels, args.ptr_dim, args.cond, args.reps = "2", 4, 8, 32, 2, 2
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    dtype = getattr(torch, args.dtype)
    shape = {"objects": args.objects, "side": args.side, "channels": args.channels, "ptr_dim": args.ptr_dim,
             "cond_slots": args.cond, "ring_frames": 5, "ring_pointers": 15}
    header = machine_header(device, shape, dtype=args.dtype, sms=True)
    print_header("table_memory", header)
    rows = []
    for n in (int(x) for x in args.objects.split(",")):
        rows += bench_rows(n, args, device, dtype)
    if device.type == "cuda" or args.results:
        write_results("table_memory", header, rows, ["shape", "impl", "ms", "GB/s"],
                      lambda r: [r["shape"], r["impl"], f"{r['ms']:.4f}", f"{r['GBs']:.1f}"], args.results)


if __name__ == "__main__":
    main()
