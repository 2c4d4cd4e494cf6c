"""Benchmark of the ViT MLP's fc1 + exact GELU as one Triton GEMM (``sam3fast::linear_gelu``).

Shape (SAM 3, one 1008 px image): x (5184, 1024) -> (5184, 4736), 50.3 GFLOP. Rows, each timed on
the same inputs:
  op (defaults)            the op as ``Mlp.forward`` calls it with ``fused_gelu`` on (GPU)
  triton <BM>x<BN>x<BK> w<warps> s<stages>   the launcher: a tile sweep
  eager linear + gelu      what the MLP runs without it: cuBLAS (bias epilogue) and nn.GELU
  eager linear alone       cuBLAS without the GELU: the GEMM the fused kernel must match
  compiled linear + gelu   torch.compile of the pair (inductor: cuBLAS + a fused GELU kernel)
  CUDA graph: ...          the op and the eager pair replayed from CUDA graphs (device time only)
TFLOP/s counts the GEMM's 2 M N K for every row. Each row is checked against the eager pair before
it is timed (within 2 ulps of the dtype, 1e-5 in float32, relative to max(|y|, 1)). The last line is the trunk's
share: (blocks run) x (op - eager pair). ``Mlp.fused_gelu`` stays off until an H100 run of this
script shows the op under the eager pair.

    python bench/bench_linear_gelu.py                 # GPU: bf16
    python bench/bench_linear_gelu.py --no-compile
    python bench/bench_linear_gelu.py --smoke         # CPU: tiny shapes, Triton interpreter, seconds

CPU numbers (``--smoke``) check that the script runs; they are not performance numbers.
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
from sam3fast.kernels import linear_gelu as lg  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TILES = [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4),
         (256, 128, 64, 8, 3)]


def eager_pair(x, w, b):
    return F.gelu(F.linear(x, w, b))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI); numbers are not performance numbers")
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--out", default=None, help="results path stem (GPU: bench/results/linear_gelu_<gpu>_<date>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vit = get_config("sam3").vit
    M, K, N = args.images * vit.grid ** 2, vit.embed_dim, int(vit.embed_dim * vit.mlp_ratio)
    run_blocks = max(vit.global_att_blocks) + 1
    tiles = TILES
    if args.smoke:
        M, K, N, args.reps = 40, 32, 48, 3
        args.dtype = "float32"  # (the interpreter's tl.dot of bf16 tiles is wrong: kernels/linear_gelu.py)
        tiles = [(16, 32, 16, 4, 2)]
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    dtype = getattr(torch, args.dtype)
    compile_backend = "aot_eager" if device.type == "cpu" else "inductor"

    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(device=device, dtype=dtype)
    b = (0.5 * torch.randn(N, generator=g)).to(device=device, dtype=dtype)
    flops = 2 * M * N * K
    header = machine_header(device, {"fc1": f"M={M} K={K} N={N}"}, dtype=args.dtype, sms=True)
    header["compile_backend"] = compile_backend
    print_header("linear_gelu", header)

    want = eager_pair(x, w, b)
    cands = {}
    if device.type == "cuda":
        op = torch.ops.sam3fast.linear_gelu
        cands["op (defaults)"] = lambda: op(x, w, b)
    for bm, bn, bk, nw, ns in tiles:
        cands[f"triton {bm}x{bn}x{bk} w{nw} s{ns}"] = lambda t=(bm, bn, bk, nw, ns): lg._linear_gelu_triton(
            x, w, b, block_m=t[0], block_n=t[1], block_k=t[2], num_warps=t[3], num_stages=t[4])
    cands["eager linear + gelu"] = lambda: eager_pair(x, w, b)
    cands["eager linear alone"] = lambda: F.linear(x, w, b)
    if device.type == "cuda":
        cands["CUDA graph: op"] = graphed(lambda: op(x, w, b))
        cands["CUDA graph: eager linear + gelu"] = graphed(lambda: eager_pair(x, w, b))
    if not args.no_compile:
        torch._dynamo.reset()
        comp = torch.compile(eager_pair, fullgraph=True, backend=compile_backend)
        cands[f"compiled linear + gelu ({compile_backend})"] = lambda: comp(x, w, b)

    tol = max(2 * torch.finfo(dtype).eps, 1e-5)  # (float32: the GEMM's accumulation order)
    rows = []
    for impl, fn in cands.items():
        y = fn()
        if "alone" not in impl:
            err = ((y.float() - want.float()).abs() / want.float().abs().clamp(min=1)).max().item()
            assert err <= tol, f"{impl}: {err:.3g} (relative) off the eager pair"
        ms = time_ms(fn, device, args.reps)
        rows.append({"impl": impl, "ms": ms, "TFLOPs": flops / ms / 1e9})
        print(f"{impl:40} {ms:10.4f} ms  {flops / ms / 1e9:8.1f} TFLOP/s")

    t = {r["impl"]: r["ms"] for r in rows}
    for fused, plain in (("op (defaults)", "eager linear + gelu"), ("CUDA graph: op", "CUDA graph: eager linear + gelu")):
        if fused in t and plain in t:
            print(f"# trunk ({run_blocks} blocks), {fused} vs {plain}: {run_blocks * (t[fused] - t[plain]):+.3f} ms")

    if device.type == "cuda" or args.out:
        write_results(
            "linear_gelu", header, rows, ["impl", "ms", "TFLOP/s"],
            lambda r: [r["impl"], f"{r['ms']:.4f}", f"{r['TFLOPs']:.1f}"],
            args.out,
        )
    assert all(math.isfinite(r["ms"]) for r in rows)


if __name__ == "__main__":
    main()
