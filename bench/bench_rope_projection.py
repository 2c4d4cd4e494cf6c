"""Benchmark of the memory attention's projections with RoPE in the epilogue
(``sam3fast::rope_projection``) against what the module runs without it: the projection
(``F.linear``, cuBLAS) then the memory-attention op's RoPE prepass (``_rope_prepass``), which reads
the projected rows back and writes them rotated.

Shapes (SAM 3 tracker, per memory-attention layer, ``--objects`` objects):
  keys     the cross-attention's keys: (B, 7 x 5184 + 64, 64) -> 256, the 7 memory frames rotated,
           the 64 object-pointer tokens not
  queries  a query (or self-attention key) projection: (B, 5184, 256) -> 256, every row rotated
Rows, each on the same inputs:
  op (defaults)                  ``sam3fast::rope_projection`` as ``RoPEAttention`` calls it (GPU)
  triton r<R> j<J> w<W> s<S>     the launcher: rows, channel pairs a program, warps, stages
  linear + rope prepass          the unfused path (``RoPEAttention.fuse_rope_projection = False``)
  linear alone                   ``F.linear``: the unfused path's first half (its bytes once)
  compiled (inductor)            torch.compile of the reference (the linear and the rotation)
  CUDA graph: ...                the op and the unfused path replayed (GPU time only)
GB/s counts the bytes every row must move alike: x read and the output written once (the weight and
the RoPE table are small and L2-resident). Each row is checked against the reference before it is
timed (to bf16 rounding: the dots are summed in another order than cuBLAS's). The last lines add
up a frame: per memory-attention layer a cross-attention's keys and three query-shaped projections
(its query, the self-attention's query and key), times the layers.

    python bench/bench_rope_projection.py                       # GPU: 1 and 16 objects, bf16
    python bench/bench_rope_projection.py --objects 5 --no-compile
    python bench/bench_rope_projection.py --smoke               # CPU: tiny shapes, Triton interpreter

CPU numbers (``--smoke``, float32: the interpreter cannot do bf16 dots) check that the script runs;
they are not performance numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench/_common.py, also when run through runpy

from _common import (  # noqa: E402
    graphed, machine_header, print_header, time_ms, use_interpreter_without_cuda, write_results,
)

use_interpreter_without_cuda()  # before the kernel import

from sam3fast.config import get_config  # noqa: E402
from sam3fast.kernels import memory_attention as ma  # noqa: E402
from sam3fast.kernels import rope_projection as rp  # noqa: E402
from sam3fast.model.vit import compute_axial_cis  # noqa: E402

# (BLOCK_R, BLOCK_J, BLOCK_K, num_warps, num_stages)
TILES = [(64, 64, 64, 8, 3), (64, 64, 64, 4, 3), (64, 32, 64, 4, 3), (128, 32, 64, 8, 3), (128, 64, 64, 8, 2),
         (64, 64, 64, 8, 2)]


def make_inputs(B, S, K, D, side, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, K, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(D, K, generator=g) / K ** 0.5).to(device=device, dtype=dtype)
    b = (0.3 * torch.randn(D, generator=g)).to(device=device, dtype=dtype)
    rope = torch.view_as_real(compute_axial_cis(D, side, side)).float().to(device)
    return x, w, b, rope


def bench_shape(name, B, S, K, D, side, n_rope, args, device, dtype, tiles, compile_backend):
    x, w, b, rope = make_inputs(B, S, K, D, side, dtype, device)
    nbytes = x.numel() * x.element_size() + B * S * D * x.element_size()
    label = f"{name} B={B} S={S} K={K}"
    want = rp.rope_projection_ref(x, w, b, rope, n_rope, 1)

    def unfused():
        y = F.linear(x, w, b).view(B, S, 1, D)
        return ma._rope_prepass(y, rope, n_rope) if n_rope else y

    cands = {}
    if device.type == "cuda":
        op = torch.ops.sam3fast.rope_projection
        cands["op (defaults)"] = lambda: op(x, w, b, rope, n_rope, 1)
    for t in tiles:
        r, j, k, nw, ns = t
        cands[f"triton r{r} j{j} w{nw} s{ns}"] = lambda r=r, j=j, k=k, nw=nw, ns=ns: rp._rope_projection_triton(
            x, w, b, rope, n_rope, 1, block_r=r, block_j=j, block_k=k, num_warps=nw, num_stages=ns)
    cands["linear + rope prepass"] = unfused
    cands["linear alone"] = lambda: F.linear(x, w, b)
    if device.type == "cuda":
        cands["CUDA graph: op"] = graphed(lambda: op(x, w, b, rope, n_rope, 1))
        cands["CUDA graph: linear + rope prepass"] = graphed(unfused)
    if not args.no_compile:
        torch._dynamo.reset()
        comp = torch.compile(rp.rope_projection_ref, fullgraph=True, backend=compile_backend)
        cands[f"compiled ({compile_backend})"] = lambda: comp(x, w, b, rope, n_rope, 1)

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    rows = []
    for impl, fn in cands.items():
        out = fn()
        if impl != "linear alone":
            torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol, msg=lambda m: f"{impl}: {m}")
        ms = time_ms(fn, device, args.reps)
        gbs = nbytes / ms / 1e6
        rows.append({"shape": label, "impl": impl, "ms": ms, "GBs": gbs})
        print(f"{label:34} {impl:36} {ms:10.4f} ms  {gbs:9.1f} GB/s")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI); numbers are not performance numbers")
    p.add_argument("--objects", default="1,16", help="comma-separated batch sizes (objects)")
    p.add_argument("--frames", type=int, default=7, help="memory frames (rotated key rows: frames x 5184)")
    p.add_argument("--ptr-tokens", type=int, default=64, help="object-pointer tokens (not rotated)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--out", default=None, help="results path stem (GPU: bench/results/rope_projection_<gpu>_<date>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = get_config("sam3")
    side, D, M, layers = cfg.feat_size, cfg.d_model, cfg.tracker.mem_dim, cfg.tracker.mem_attn_layers
    objects = [int(v) for v in args.objects.split(",")]
    if args.smoke:
        side, D, M, objects, args.frames, args.ptr_tokens, args.reps = 4, 32, 16, [2], 2, 5, 3
        args.dtype = "float32"  # (the interpreter computes bf16 dots on raw bits)
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    dtype = getattr(torch, args.dtype)
    tiles = [(16, 16, 16, 4, 2)] if device.type == "cpu" else TILES  # the interpreter pays per program
    compile_backend = "aot_eager" if device.type == "cpu" else "inductor"
    L = side * side
    shapes = {"keys": (args.frames * L + args.ptr_tokens, M, args.frames * L), "queries": (L, D, L)}
    header = machine_header(device, {n: f"S={s} K={k} -> {D}, n_rope={r}" for n, (s, k, r) in shapes.items()},
                            dtype=args.dtype, sms=True)
    header["objects"] = objects
    header["compile_backend"] = compile_backend
    print_header("rope_projection", header)

    rows = []
    for B in objects:
        for name, (S, K, n_rope) in shapes.items():
            rows += bench_shape(name, B, S, K, D, side, n_rope, args, device, dtype, tiles, compile_backend)

    # A frame's worth: per layer one cross-attention's keys and three query-shaped projections.
    for B in objects:
        for impl in ("op (defaults)", "linear + rope prepass"):
            t = {r["shape"].split()[0]: r["ms"] for r in rows if r["impl"] == impl and f" B={B} " in r["shape"]}
            if len(t) == 2:
                total = layers * (t["keys"] + 3 * t["queries"])
                print(f"# frame ({layers} layers), {B} object(s), {impl}: {total:.3f} ms")

    if device.type == "cuda" or args.out:
        write_results(
            "rope_projection", header, rows, ["shape", "impl", "ms", "GB/s"],
            lambda r: [r["shape"], r["impl"], f"{r['ms']:.4f}", f"{r['GBs']:.1f}"],
            args.out,
        )
    assert all(math.isfinite(r["ms"]) for r in rows)


if __name__ == "__main__":
    main()
