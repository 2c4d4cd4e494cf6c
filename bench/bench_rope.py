"""Benchmark of the ViT trunk's 2-D axial RoPE (``sam3fast::rope``) on q and k.

Shapes (SAM 3): the attention's qkv projection viewed (B, L, 3, nH, hd) with nH = 16, hd = 64, and
the RoPE applied to its q, k view ``qkv[:, :, :2]`` (B, L, 2, 16, 64), non-contiguous:
  window  B = 9 windows (one 1008 px image), L = 24 x 24 = 576, the window table
  global  B = 1, L = 72 x 72 = 5184, the global ("interp", scale 24 / 72) table
Rows, each timed on the same inputs:
  op (defaults)          ``sam3fast::rope`` as ``Attention.forward`` calls it (GPU)
  triton l<BLOCK_L> w<warps>  the launcher: a sweep of tokens per program and warps
  eager apply_rope       the model's PyTorch path (``Attention.use_kernel = False``): the float32
                         chain of ``sam3fast.model.vit.apply_rope``
  compiled               torch.compile of apply_rope (inductor fuses the chain; its FMAs may move
                         a bf16 result by an ulp, so it is checked to a tolerance, not bit for bit)
  copy                   ``x.contiguous()`` of the same view: the same bytes read and written, no
                         arithmetic (what the memory system allows)
GB/s counts the useful bytes of every row alike: x read once and the output written once (2 x
B L 2 nH hd elements of the dtype) plus the float32 table (L hd / 2 x 8 bytes). Each kernel row
is checked bit for bit against apply_rope before it is timed. The last lines add up a trunk:
(blocks before the last global block) window blocks and (global blocks) global ones.

    python bench/bench_rope.py                        # GPU: both shapes, bf16
    python bench/bench_rope.py --dtype float16 --no-compile
    python bench/bench_rope.py --smoke                # CPU: tiny shapes, Triton interpreter, seconds

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
from sam3fast.kernels import rope as rp  # noqa: E402
from sam3fast.model.vit import apply_rope, compute_axial_cis  # noqa: E402

# (BLOCK_L, num_warps); BLOCK_R is all 32 head rows at SAM 3 sizes.
TILES = [(1, 4), (2, 4), (4, 4), (8, 4), (8, 8), (16, 8), (32, 8)]


def make_inputs(B, side, heads, hd, scale, dtype, device, seed=0):
    """The (B, L, 3, heads, hd) projection and its q, k view, and the complex table."""
    g = torch.Generator().manual_seed(seed)
    qkv = (3 * torch.randn(B, side * side, 3, heads, hd, generator=g)).to(device=device, dtype=dtype)
    freqs = compute_axial_cis(hd, side, side, scale_pos=scale).to(device)
    return qkv, qkv[:, :, :2], freqs


def _bitwise_equal(a, b):
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.shape == b.shape and torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def bench_shape(name, B, side, scale, args, device, dtype, tiles, compile_backend):
    _, x, freqs = make_inputs(B, side, args.heads, args.head_dim, scale, dtype, device)
    rope = torch.view_as_real(freqs)
    nbytes = 2 * x.numel() * x.element_size() + rope.numel() * 4
    label = f"{name} {tuple(x.shape)}"
    want = apply_rope(x, freqs)

    cands = {}
    if device.type == "cuda":
        op = torch.ops.sam3fast.rope
        cands["op (defaults)"] = lambda: op(x, rope)
    for bl, nw in tiles:
        cands[f"triton l{bl} w{nw}"] = lambda bl=bl, nw=nw: rp._rope_triton(x, rope, block_l=bl, num_warps=nw)
    cands["eager apply_rope"] = lambda: apply_rope(x, freqs)
    if device.type == "cuda":  # the same calls replayed from CUDA graphs (GPU time only)
        cands["CUDA graph: op"] = graphed(lambda: op(x, rope))
        cands["CUDA graph: eager apply_rope"] = graphed(lambda: apply_rope(x, freqs))
    if not args.no_compile:
        torch._dynamo.reset()
        comp = torch.compile(apply_rope, fullgraph=True, backend=compile_backend)
        cands[f"compiled apply_rope ({compile_backend})"] = lambda: comp(x, freqs)
    cands["copy (x.contiguous())"] = lambda: x.contiguous()

    rows = []
    for impl, fn in cands.items():
        out = fn()
        if impl.startswith(("op", "triton", "eager")):
            assert _bitwise_equal(out, want), f"{impl}: not bit-identical to apply_rope"
        elif impl.startswith("compiled"):
            torch.testing.assert_close(out, want)
        ms = time_ms(fn, device, args.reps)
        gbs = nbytes / ms / 1e6
        rows.append({"shape": label, "impl": impl, "ms": ms, "GBs": gbs})
        print(f"{label:32} {impl:34} {ms:10.4f} ms  {gbs:9.1f} GB/s")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI); numbers are not performance numbers")
    p.add_argument("--images", type=int, default=1, help="images per batch (window blocks: 9 windows each)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--out", default=None, help="results path stem (GPU: bench/results/rope_<gpu>_<date>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vit = get_config("sam3").vit
    window, grid = vit.window_size, vit.grid
    n_windows = math.ceil(grid / window) ** 2
    run_blocks = max(vit.global_att_blocks) + 1
    n_global = len(vit.global_att_blocks)
    if args.smoke:
        window, grid, n_windows, args.heads, args.head_dim, args.reps = 3, 5, 4, 2, 16, 3
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    dtype = getattr(torch, args.dtype)
    # The interpreter pays per program: one tile keeps the smoke run short.
    tiles = [(2, 4)] if device.type == "cpu" else TILES
    compile_backend = "aot_eager" if device.type == "cpu" else "inductor"  # inductor's CPU cold start is ~20 s

    shapes = {"window": (args.images * n_windows, window, 1.0), "global": (args.images, grid, window / grid)}
    shape = {name: f"B={B} L={s}x{s} heads=2x{args.heads} hd={args.head_dim}" for name, (B, s, _) in shapes.items()}
    header = machine_header(device, shape, dtype=args.dtype, sms=True)
    header["compile_backend"] = compile_backend
    print_header("rope", header)

    rows = []
    for name, (B, side, scale) in shapes.items():
        rows += bench_shape(name, B, side, scale, args, device, dtype, tiles, compile_backend)

    # A trunk's worth: the run blocks, window and global, with each row's time per shape.
    def per_shape(impl):
        return {r["shape"].split()[0]: r["ms"] for r in rows if r["impl"] == impl}

    n_window = run_blocks - n_global
    for impl in ("op (defaults)", "eager apply_rope"):
        t = per_shape(impl)
        if len(t) == 2:
            total = n_window * t["window"] + n_global * t["global"]
            print(f"# trunk ({n_window} window + {n_global} global blocks), {impl}: {total:.3f} ms")

    if device.type == "cuda" or args.out:
        write_results(
            "rope", header, rows, ["shape", "impl", "ms", "GB/s"],
            lambda r: [r["shape"], r["impl"], f"{r['ms']:.4f}", f"{r['GBs']:.1f}"],
            args.out,
        )
    assert all(math.isfinite(r["ms"]) for r in rows)


if __name__ == "__main__":
    main()
