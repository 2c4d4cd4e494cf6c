"""Benchmark of the ViT trunk's linears with their epilogues, each one Triton GEMM
(``sam3fast.kernels.fused_linear``): the MLP's fc1 + exact GELU (``sam3fast::linear_gelu``) and the
attention's qkv + RoPE of q, k (``sam3fast::linear_rope``).

Shapes (SAM 3, one 1008 px image): fc1 x (5184, 1024) -> (5184, 4736), 50.3 GFLOP; qkv (9 windows of
576 tokens, and one grid of 5184) 1024 -> 3072, 32.6 GFLOP. Rows, each timed on the same inputs:
  op (defaults)            the op as ``Mlp`` / ``Attention`` call it with ``fused_gelu`` / ``fused_rope``
  triton <BM>x<BN>x<BK> w<warps> s<stages>   the launcher: a tile sweep
  eager linear + <epilogue>  what the module runs without it: cuBLAS (bias epilogue), then nn.GELU /
                           the rope kernel (``sam3fast::rope`` on CUDA)
  eager linear alone       cuBLAS without the epilogue: the GEMM the fused kernel must match
  cublasLt linear + tanh gelu  fc1 with cuBLASLt's GELU + bias epilogue (``linear_tanh_gelu``, what
                           ``Mlp.tanh_gelu_epilogue`` runs): the tanh-approximate GELU, so it is
                           checked against the eager linear + tanh GELU instead
  compiled linear + <epilogue>  torch.compile of the pair
  CUDA graph: ...          the op and the eager pair replayed from CUDA graphs (device time only)
  cxblock gelu cases       the memory encoder's CXBlock pwconv1 (256 -> 1024 at 16 objects): the
                           eager linear + exact GELU against cuBLASLt's tanh-GELU epilogue
                           (``CXBlock.tanh_gelu_epilogue``), and a frame's two blocks
  ffn relu cases           the ReLU FFNs' linear1 (memory attention, fusion encoder: 256 -> 2048):
                           ``linear_relu`` with cuBLASLt's ReLU + bias epilogue (the default on CUDA)
                           against the linear and then the ReLU
TFLOP/s counts the GEMM's 2 M N K for every row. Each row is checked against the eager pair before
it is timed (within 2 ulps of the dtype, 1e-5 in float32, relative to max(|y|, 1)). The "# trunk"
lines add up a trunk: (blocks run) x (op - eager pair) for fc1; for qkv, the window blocks' and
the global blocks' share. ``fused_gelu`` / ``fused_rope`` stay off until an H100 run of this script
shows the op under the eager pair.

    python bench/bench_fused_linear.py                 # GPU: bf16
    python bench/bench_fused_linear.py --no-compile
    python bench/bench_fused_linear.py --smoke         # CPU: tiny shapes, Triton interpreter, seconds

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
from sam3fast.kernels import fused_linear as lg  # noqa: E402
from sam3fast.kernels.rope import rope as rope_op  # noqa: E402
from sam3fast.model.common import linear_relu  # noqa: E402
from sam3fast.model.vit import compute_axial_cis, linear_tanh_gelu  # noqa: E402

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
    p.add_argument("--out", default=None, help="results path stem (GPU: bench/results/fused_linear_<gpu>_<date>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vit = get_config("sam3").vit
    M, K, N = args.images * vit.grid ** 2, vit.embed_dim, int(vit.embed_dim * vit.mlp_ratio)
    run_blocks = max(vit.global_att_blocks) + 1
    tiles = TILES
    if args.smoke:
        M, K, N, args.reps = 40, 32, 48, 3
        args.dtype = "float32"  # (the interpreter's tl.dot of bf16 tiles is wrong: kernels/fused_linear.py)
        tiles = [(16, 32, 16, 4, 2)]
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    dtype = getattr(torch, args.dtype)
    compile_backend = "aot_eager" if device.type == "cpu" else "inductor"

    H = vit.num_heads
    n_window = run_blocks - len(vit.global_att_blocks)
    win, grid = vit.window_size, vit.grid
    if args.smoke:
        H, win, grid = 2, 3, 6
        K = 32
    C = K  # the attention width is the trunk's
    header = machine_header(device, {"fc1": f"M={M} K={K} N={N}", "qkv": f"K={K} N={3 * C} heads={H}"},
                            dtype=args.dtype, sms=True)
    header["compile_backend"] = compile_backend
    print_header("fused_linear", header)

    g = torch.Generator().manual_seed(0)
    rows = []

    def bench(label, want, cands, flops, want_tanh=None):
        tol = max(2 * torch.finfo(dtype).eps, 1e-5)  # (float32: the GEMM's accumulation order)
        for impl, fn in cands.items():
            y = fn()
            if "alone" not in impl:
                ref = want_tanh if "tanh" in impl else want
                err = ((y.float() - ref.float()).abs() / ref.float().abs().clamp(min=1)).max().item()
                assert err <= tol, f"{label} {impl}: {err:.3g} (relative) off the eager pair"
            ms = time_ms(fn, device, args.reps)
            rows.append({"case": label, "impl": impl, "ms": ms, "TFLOPs": flops / ms / 1e9})
            print(f"{label:22} {impl:40} {ms:10.4f} ms  {flops / ms / 1e9:8.1f} TFLOP/s")

    def tile_rows(launch, cands, tiles_ok):
        for bm, bn, bk, nw, ns in tiles_ok:
            cands[f"triton {bm}x{bn}x{bk} w{nw} s{ns}"] = lambda t=(bm, bn, bk, nw, ns): launch(
                block_m=t[0], block_n=t[1], block_k=t[2], num_warps=t[3], num_stages=t[4])

    def compile_row(cands, name, fn, *a):
        if not args.no_compile:
            torch._dynamo.reset()
            comp = torch.compile(fn, fullgraph=True, backend=compile_backend)
            cands[f"compiled {name} ({compile_backend})"] = lambda: comp(*a)

    # fc1 + GELU
    x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(device=device, dtype=dtype)
    b = (0.5 * torch.randn(N, generator=g)).to(device=device, dtype=dtype)
    cands = {}
    if device.type == "cuda":
        cands["op (defaults)"] = lambda: torch.ops.sam3fast.linear_gelu(x, w, b)
    tile_rows(lambda **t: lg._linear_gelu_triton(x, w, b, **t), cands, tiles)
    cands["eager linear + gelu"] = lambda: eager_pair(x, w, b)
    cands["eager linear alone"] = lambda: F.linear(x, w, b)
    cands["cublasLt linear + tanh gelu"] = lambda: linear_tanh_gelu(x, w, b)
    if device.type == "cuda":
        cands["CUDA graph: op"] = graphed(lambda: torch.ops.sam3fast.linear_gelu(x, w, b))
        cands["CUDA graph: eager linear + gelu"] = graphed(lambda: eager_pair(x, w, b))
        cands["CUDA graph: cublasLt linear + tanh gelu"] = graphed(lambda: linear_tanh_gelu(x, w, b))
    compile_row(cands, "linear + gelu", eager_pair, x, w, b)
    bench("fc1+gelu", eager_pair(x, w, b), cands, 2 * M * N * K,
          want_tanh=F.gelu(F.linear(x.double(), w.double(), b.double()), approximate="tanh"))

    # the ReLU FFNs' linear1 (sam3fast.model.common.linear_relu: on by default on CUDA, exact): the
    # memory attention's at 1 and 16 objects (4 layers a frame) and the fusion encoder's (6 an image)
    relu_cases = [("ffn relu, 1 object", 5184), ("ffn relu, 16 objects", 16 * 5184)]
    if args.smoke:
        relu_cases = [("ffn relu, 1 object", 40)]
    d_model, d_ffn = (256, 2048) if not args.smoke else (32, 48)
    lin1 = torch.nn.Linear(d_model, d_ffn).to(device=device, dtype=dtype).requires_grad_(False)
    for name, rows_ in relu_cases:
        xr = torch.randn(rows_, d_model, generator=g).to(device=device, dtype=dtype)
        cands = {"eager linear + relu": lambda xr=xr: linear_relu(xr, lin1, epilogue=False),
                 "cublasLt linear + relu": lambda xr=xr: linear_relu(xr, lin1, epilogue=True)}
        if device.type == "cuda":
            cands["CUDA graph: eager linear + relu"] = graphed(lambda xr=xr: linear_relu(xr, lin1, epilogue=False))
            cands["CUDA graph: cublasLt linear + relu"] = graphed(lambda xr=xr: linear_relu(xr, lin1, epilogue=True))
        with torch.no_grad():
            bench(name, F.relu(lin1(xr)), cands, 2 * rows_ * d_model * d_ffn)

    # the memory encoder's CXBlock pwconv1 + GELU (CXBlock.tanh_gelu_epilogue: "auto" on CUDA in bf16):
    # (objects x 72 x 72, 256) -> 1024, two blocks a frame
    cx_cases = [("cxblock gelu, 16 objects", 16 * 5184)] if not args.smoke else [("cxblock gelu, 2 objects", 40)]
    d_cx = 256 if not args.smoke else 32
    w1 = (torch.randn(4 * d_cx, d_cx, generator=g) / math.sqrt(d_cx)).to(device=device, dtype=dtype)
    b1 = (0.5 * torch.randn(4 * d_cx, generator=g)).to(device=device, dtype=dtype)
    for name, rows_ in cx_cases:
        xc = torch.randn(rows_, d_cx, generator=g).to(device=device, dtype=dtype)
        cands = {"eager linear + gelu": lambda xc=xc: eager_pair(xc, w1, b1),
                 "cublasLt linear + tanh gelu": lambda xc=xc: linear_tanh_gelu(xc, w1, b1)}
        if device.type == "cuda":
            cands["CUDA graph: eager linear + gelu"] = graphed(lambda xc=xc: eager_pair(xc, w1, b1))
            cands["CUDA graph: cublasLt linear + tanh gelu"] = graphed(lambda xc=xc: linear_tanh_gelu(xc, w1, b1))
        bench(name, eager_pair(xc, w1, b1), cands, 2 * rows_ * d_cx * 4 * d_cx,
              want_tanh=F.gelu(F.linear(xc.double(), w1.double(), b1.double()), approximate="tanh"))

    # qkv + RoPE: the window blocks' call and the global blocks' call
    wq = (torch.randn(3 * C, K, generator=g) / math.sqrt(K)).to(device=device, dtype=dtype)
    bq = (0.5 * torch.randn(3 * C, generator=g)).to(device=device, dtype=dtype)
    for name, B, side, scale in (("qkv+rope window", args.images * (grid // win) ** 2, win, 1.0),
                                 ("qkv+rope global", args.images, grid, win / grid)):
        xq = torch.randn(B, side * side, K, generator=g).to(device=device, dtype=dtype)
        freqs = compute_axial_cis(C // H, side, side, scale_pos=scale).to(device)
        table = torch.view_as_real(freqs).float()

        def pair(xq=xq, freqs=freqs):  # the attention's unfused path
            qkv = F.linear(xq, wq, bq).view(xq.shape[0], xq.shape[1], 3, H, C // H)
            return torch.cat((rope_op(qkv[:, :, :2], freqs), qkv[:, :, 2:]), dim=2)

        cands = {}
        if device.type == "cuda":
            cands["op (defaults)"] = lambda xq=xq, table=table: torch.ops.sam3fast.linear_rope(xq, wq, bq, table, H)
        tile_rows(lambda xq=xq, table=table, **t: lg._linear_rope_triton(xq, wq, bq, table, H, **t), cands,
                  [t for t in tiles if C % t[1] == 0])
        cands["eager linear + rope"] = pair
        cands["eager linear alone"] = lambda xq=xq: F.linear(xq, wq, bq)
        if device.type == "cuda":
            cands["CUDA graph: op"] = graphed(lambda xq=xq, table=table: torch.ops.sam3fast.linear_rope(
                xq, wq, bq, table, H))
            cands["CUDA graph: eager linear + rope"] = graphed(pair)
        bench(name, pair(), cands, 2 * B * side * side * 3 * C * K)

    t = {(r["case"], r["impl"]): r["ms"] for r in rows}
    for fused, plain in (("cublasLt linear + tanh gelu", "eager linear + gelu"),
                         ("CUDA graph: cublasLt linear + tanh gelu", "CUDA graph: eager linear + gelu")):
        fc1 = [t.get(("fc1+gelu", fused)), t.get(("fc1+gelu", plain))]
        if None not in fc1:
            print(f"# trunk ({run_blocks} blocks), fc1+gelu, {fused} vs {plain}: {run_blocks * (fc1[0] - fc1[1]):+.3f} ms")
    for fused, plain in (("cublasLt linear + relu", "eager linear + relu"),
                         ("CUDA graph: cublasLt linear + relu", "CUDA graph: eager linear + relu")):
        for name, _ in relu_cases:
            pair_ms = [t.get((name, fused)), t.get((name, plain))]
            if None not in pair_ms:
                print(f"# {name}, 4 memory-attention layers a frame, {fused} vs {plain}: "
                      f"{4 * (pair_ms[0] - pair_ms[1]):+.3f} ms")
    for fused, plain in (("cublasLt linear + tanh gelu", "eager linear + gelu"),
                         ("CUDA graph: cublasLt linear + tanh gelu", "CUDA graph: eager linear + gelu")):
        for name, _ in cx_cases:
            pair_ms = [t.get((name, fused)), t.get((name, plain))]
            if None not in pair_ms:
                print(f"# {name}, 2 CXBlocks a frame, {fused} vs {plain}: {2 * (pair_ms[0] - pair_ms[1]):+.3f} ms")
    for fused, plain in (("op (defaults)", "eager"), ("CUDA graph: op", "CUDA graph: eager")):
        fc1 = [t.get(("fc1+gelu", fused)), t.get(("fc1+gelu", f"{plain} linear + gelu"))]
        if None not in fc1:
            print(f"# trunk ({run_blocks} blocks), fc1+gelu, {fused} vs {plain}: {run_blocks * (fc1[0] - fc1[1]):+.3f} ms")
        qw = [t.get(("qkv+rope window", fused)), t.get(("qkv+rope window", f"{plain} linear + rope"))]
        qg = [t.get(("qkv+rope global", fused)), t.get(("qkv+rope global", f"{plain} linear + rope"))]
        if None not in qw + qg:
            d = n_window * (qw[0] - qw[1]) + (run_blocks - n_window) * (qg[0] - qg[1])
            print(f"# trunk ({n_window} window + {run_blocks - n_window} global blocks), qkv+rope, {fused} vs {plain}: "
                  f"{d:+.3f} ms")

    if device.type == "cuda" or args.out:
        write_results(
            "fused_linear", header, rows, ["case", "impl", "ms", "TFLOP/s"],
            lambda r: [r["case"], r["impl"], f"{r['ms']:.4f}", f"{r['TFLOPs']:.1f}"],
            args.out,
        )
    assert all(math.isfinite(r["ms"]) for r in rows)

if __name__ == "__main__":
    main()
