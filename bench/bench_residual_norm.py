"""Benchmark of the ViT trunk's fused residual add + LayerNorm (``sam3fast::residual_norm``).

Shapes (SAM 3, one 1008 px image): the residual stream (1, 72, 72, 1024) and the three calls a
trunk makes, each against the chain of PyTorch operations it replaces in the block-by-block trunk:
  unwindow+add+norm2  after a window block's attention: y in window order (9, 24, 24, 1024)
                      eager: window_unpartition (a copy), the add, F.layer_norm
  add+norm2           after a global block's attention: the add, F.layer_norm
  add+norm1+window    after an MLP, the next block a window block: the add, F.layer_norm,
                      window_partition (a copy) of the norm
Rows, each timed on the same inputs:
  op (defaults)       the op as ``ViT._fused_blocks`` calls it (GPU)
  triton t<BLOCK_T> w<warps>  the launcher: a sweep of tokens per program and warps
  eager chain         the PyTorch operations the op replaces
  compiled chain      torch.compile of that chain (inductor fuses it too)
  CUDA graph: ...     the op and the eager chain replayed from CUDA graphs (device time only)
GB/s counts what the op must move for every row alike: x and y read, s and n written (4 x N x C
elements of the dtype). Each row is checked before it is timed: s bit for bit against the add, n
against F.layer_norm within 2 bf16 ulps. The last lines add up a trunk: per window block one
unwindow+add+norm2 and one add+norm1+window, per global block one add+norm2 and one add+norm1.
Then the tracker's memory attention (``MemoryAttention.fuse_residual_norm``): add+norm over
(objects, 5184, 256) at ``--mem-objects``, and a frame's 12 of them.

    python bench/bench_residual_norm.py                 # GPU: bf16
    python bench/bench_residual_norm.py --no-compile
    python bench/bench_residual_norm.py --smoke         # CPU: tiny shapes, Triton interpreter, seconds

CPU numbers (``--smoke``) check that the script runs; they are not performance numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench/_common.py, also when run through runpy

from _common import (  # noqa: E402
    graphed, machine_header, print_header, time_ms, use_interpreter_without_cuda, write_results,
)

use_interpreter_without_cuda()  # before the kernel import

from sam3fast.config import get_config  # noqa: E402
from sam3fast.kernels import residual_norm as rn  # noqa: E402

# (BLOCK_T, num_warps) at C = 1024
TILES = [(1, 4), (2, 4), (4, 4), (4, 8), (8, 8), (16, 8)]
# ... at C = 256 (the memory attention's stream)
MEM_TILES = [(8, 4), (16, 4), (32, 4), (16, 8), (32, 8)]


def eager_chain(x, y, w, b, eps, yw, ow):
    """The block-by-block trunk's operations (``residual_norm_ref`` is exactly them)."""
    return rn.residual_norm_ref(x, y, w, b, eps, yw, ow)


def bench_call(name, yw, ow, args, device, dtype, tiles, compile_backend, shape=None):
    """``shape`` (B, H, W, C): another stream than the trunk's (no windows)."""
    B, g, C, win = args.images, args.grid, args.width, args.window
    B, H, W, C = (B, g, g, C) if shape is None else shape
    gen = torch.Generator().manual_seed(len(name))
    x = (2 * torch.randn(B, H, W, C, generator=gen)).to(device=device, dtype=dtype)
    y = torch.randn(rn._window_shape(x, yw * win), generator=gen).to(device=device, dtype=dtype)
    w = (1 + 0.3 * torch.randn(C, generator=gen)).to(device=device, dtype=dtype)
    b = (0.2 * torch.randn(C, generator=gen)).to(device=device, dtype=dtype)
    eps, yw, ow = 1e-6, yw * win, ow * win
    nbytes = 4 * x.numel() * x.element_size()
    s_want, n_want = eager_chain(x, y, w, b, eps, yw, ow)
    label = f"{name} {tuple(x.shape)}"

    cands = {}
    if device.type == "cuda":
        op = torch.ops.sam3fast.residual_norm
        cands["op (defaults)"] = lambda: op(x, y, w, b, eps, yw, ow)
    for bt, nw in tiles:
        cands[f"triton t{bt} w{nw}"] = lambda bt=bt, nw=nw: rn._residual_norm_triton(
            x, y, w, b, eps, yw, ow, block_t=bt, num_warps=nw)
    cands["eager chain"] = lambda: eager_chain(x, y, w, b, eps, yw, ow)
    if device.type == "cuda":
        cands["CUDA graph: op"] = graphed(lambda: op(x, y, w, b, eps, yw, ow))
        cands["CUDA graph: eager chain"] = graphed(lambda: eager_chain(x, y, w, b, eps, yw, ow))
    if not args.no_compile:
        torch._dynamo.reset()
        comp = torch.compile(eager_chain, fullgraph=True, backend=compile_backend)
        cands[f"compiled chain ({compile_backend})"] = lambda: comp(x, y, w, b, eps, yw, ow)

    ulp2 = 2 * torch.finfo(dtype).eps
    rows = []
    for impl, fn in cands.items():
        s, n = fn()
        assert torch.equal(s, s_want), f"{impl}: the residual stream differs from the add"
        err = ((n.float() - n_want.float()).abs() / (n_want.float().abs() + 1)).max().item()
        assert err <= ulp2, f"{impl}: the norm is {err:.3g} (relative) off F.layer_norm"
        ms = time_ms(fn, device, args.reps)
        gbs = nbytes / ms / 1e6
        rows.append({"call": label, "impl": impl, "ms": ms, "GBs": gbs})
        print(f"{label:42} {impl:30} {ms:10.4f} ms  {gbs:9.1f} GB/s")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI); numbers are not performance numbers")
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--mem-objects", default="1,16",
                   help="objects of the memory-attention rows (comma-separated; empty: none)")
    p.add_argument("--out", default=None, help="results path stem (GPU: bench/results/residual_norm_<gpu>_<date>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vit = get_config("sam3").vit
    args.grid, args.width, args.window = vit.grid, vit.embed_dim, vit.window_size
    args.mem_width = get_config("sam3").d_model
    run_blocks = max(vit.global_att_blocks) + 1
    n_global = len(vit.global_att_blocks)
    if args.smoke:
        args.grid, args.width, args.window, args.reps, args.mem_width, args.mem_objects = 6, 40, 3, 3, 24, "2"
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    if args.grid % args.window:
        p.error(f"the window {args.window} must divide the grid {args.grid}")
    dtype = getattr(torch, args.dtype)
    tiles = [(4, 4)] if device.type == "cpu" else TILES  # the interpreter pays per program
    compile_backend = "aot_eager" if device.type == "cpu" else "inductor"

    calls = {"unwindow+add+norm2": (1, 0), "add+norm2": (0, 0), "add+norm1+window": (0, 1)}
    shape = {name: f"B={args.images} {args.grid}x{args.grid}x{args.width} window {args.window}" for name in calls}
    header = machine_header(device, shape, dtype=args.dtype, sms=True)
    header["compile_backend"] = compile_backend
    print_header("residual_norm", header)

    rows = []
    for name, (yw, ow) in calls.items():
        rows += bench_call(name, yw, ow, args, device, dtype, tiles, compile_backend)
    # the tracker's memory attention (MemoryAttention.fuse_residual_norm): 12 adds + norms a frame
    # over (objects, 5184, 256), each against the add and F.layer_norm
    mem_rows = []
    for B in [int(v) for v in args.mem_objects.split(",") if v]:
        mem_rows += bench_call(f"memattn add+norm B={B}", 0, 0, args, device, dtype,
                               tiles if device.type == "cpu" else MEM_TILES, compile_backend,
                               shape=(B, 1, args.grid * args.grid, args.mem_width))
    for impl in ("op (defaults)", "eager chain", "CUDA graph: op", "CUDA graph: eager chain"):
        for r in mem_rows:
            if r["impl"] == impl:
                print(f"# memory attention frame (12 calls), {r['call'].split(' (')[0]}, {impl}: {12 * r['ms']:.3f} ms")
    rows += mem_rows

    # A trunk's worth: per window block unwindow+add+norm2 and add+norm1+window (the next block's
    # norm1; counted for every block), per global block add+norm2 and add+norm1 (add+norm2's time).
    def per_call(impl):
        return {r["call"].split()[0]: r["ms"] for r in rows if r["impl"] == impl}

    n_window = run_blocks - n_global
    for impl in ("op (defaults)", "eager chain", "CUDA graph: op", "CUDA graph: eager chain"):
        t = per_call(impl)
        if all(name in t for name in calls):
            total = (n_window * (t["unwindow+add+norm2"] + t["add+norm1+window"])
                     + n_global * 2 * t["add+norm2"])
            print(f"# trunk ({n_window} window + {n_global} global blocks), {impl}: {total:.3f} ms")

    if device.type == "cuda" or args.out:
        write_results(
            "residual_norm", header, rows, ["call", "impl", "ms", "GB/s"],
            lambda r: [r["call"], r["impl"], f"{r['ms']:.4f}", f"{r['GBs']:.1f}"],
            args.out,
        )
    assert all(math.isfinite(r["ms"]) for r in rows)


if __name__ == "__main__":
    main()
