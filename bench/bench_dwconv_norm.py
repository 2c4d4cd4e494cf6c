"""Benchmark of the memory encoder's depthwise 7 x 7 convolution + LayerNorm (``sam3fast::dwconv_norm``).

Shapes (SAM 3 tracker): the fuser's (B, 256, 72, 72) map at B = 1 and 16 objects, NCHW (what the
CXBlock receives). Rows, each timed on the same inputs:
  op (defaults)             the op as ``CXBlock.forward`` calls it (GPU)
  triton <BH>x<BW> w<warps>  the launcher: a sweep of pixel tiles and warps
  eager NCHW                the convolution on the contiguous input (PyTorch's generic depthwise
                            kernel in bf16) + F.layer_norm on the channels-last view + its copy
  eager channels-last       the same on a channels-last copy of the input (cuDNN), what the block
                            ran before the op
  compiled                  torch.compile of the eager NCHW chain
  CUDA graph: ...           the op and the eager channels-last chain replayed from CUDA graphs
GB/s counts x read once and y written once; GFLOP/s the convolution's 2 B C H W k^2. Each row is
checked against the eager chain (within 2 ulps of the dtype relative to max(|y|, 1)). The last lines
are the per-frame share: 2 CXBlocks a frame.

    python bench/bench_dwconv_norm.py                 # GPU: bf16, 1 and 16 objects
    python bench/bench_dwconv_norm.py --no-compile
    python bench/bench_dwconv_norm.py --smoke         # CPU: tiny shapes, Triton interpreter, seconds

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

from sam3fast.kernels import dwconv_norm as dn  # noqa: E402

# (BLOCK_H, BLOCK_W, num_warps)
TILES = [(4, 8, 8), (4, 8, 4), (2, 8, 4), (8, 8, 8), (2, 4, 4), (4, 4, 4)]


def eager_chain(x, cw, cb, nw, nb, eps, channels_last):
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return dn.dwconv_norm_ref(x, cw, cb, nw, nb, eps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI); numbers are not performance numbers")
    p.add_argument("--objects", default="1,16", help="comma-separated object counts")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--out", default=None, help="results path stem (GPU: bench/results/dwconv_norm_<gpu>_<date>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    C, g, k = 256, 72, 7
    objects = [int(n) for n in args.objects.split(",")]
    tiles = TILES
    if args.smoke:
        C, g, objects, args.reps, tiles = 16, 4, [1], 2, [(2, 4, 4)]
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    dtype = getattr(torch, args.dtype)
    compile_backend = "aot_eager" if device.type == "cpu" else "inductor"
    header = machine_header(device, {"map": f"(B, {C}, {g}, {g}) k={k}, B in {objects}"}, dtype=args.dtype, sms=True)
    header["compile_backend"] = compile_backend
    print_header("dwconv_norm", header)

    rows = []
    for B in objects:
        gen = torch.Generator().manual_seed(B)
        x = torch.randn(B, C, g, g, generator=gen).to(device=device, dtype=dtype)
        cw = (torch.randn(C, 1, k, k, generator=gen) / k).to(device=device, dtype=dtype)
        cb, nw, nb = ((s * torch.randn(C, generator=gen) + m).to(device=device, dtype=dtype)
                      for s, m in ((0.2, 0.0), (0.3, 1.0), (0.2, 0.0)))
        eps = 1e-6
        # the reference: the chain in float32 on the same (rounded) inputs; a candidate may be off it
        # by twice the eager bf16 chain's own error (each convolution algorithm rounds its output
        # before the norm divides by a small std: NCHW and channels-last differed by 2 bf16 ulps at
        # 16 objects on the H200 of 2026-11-27), or 2 ulps, whichever is larger
        want = eager_chain(*(t.float() for t in (x, cw, cb, nw, nb)), eps, False)
        nbytes = 2 * x.numel() * x.element_size()
        flops = 2 * B * C * g * g * k * k
        cands = {}
        if device.type == "cuda":
            cands["op (defaults)"] = lambda: torch.ops.sam3fast.dwconv_norm(x, cw, cb, nw, nb, eps)
        for bh, bw, nw_ in tiles:
            cands[f"triton {bh}x{bw} w{nw_}"] = lambda t=(bh, bw, nw_): dn._dwconv_norm_triton(
                x, cw, cb, nw, nb, eps, block_h=t[0], block_w=t[1], num_warps=t[2])
        # the pixels-major kernel on the NCHW input (the default before session 17, when it also
        # converted each tap's weights through shared memory: 0.67 ms a call at 16 objects in the
        # H200 tracker profile of 2026-11-27)
        cands["triton 4x8 w8 pixels-major"] = lambda: dn._dwconv_norm_triton(
            x, cw, cb, nw, nb, eps, block_h=4, block_w=8, num_warps=8, channels_first_tile=False)
        cands["eager NCHW"] = lambda: eager_chain(x, cw, cb, nw, nb, eps, False)
        cands["eager channels-last"] = lambda: eager_chain(x, cw, cb, nw, nb, eps, True)
        if device.type == "cuda":
            cands["CUDA graph: op"] = graphed(lambda: torch.ops.sam3fast.dwconv_norm(x, cw, cb, nw, nb, eps))
            cands["CUDA graph: eager channels-last"] = graphed(lambda: eager_chain(x, cw, cb, nw, nb, eps, True))
        if not args.no_compile:
            torch._dynamo.reset()
            comp = torch.compile(eager_chain, fullgraph=True, backend=compile_backend)
            cands[f"compiled ({compile_backend})"] = lambda: comp(x, cw, cb, nw, nb, eps, False)
        def rel_err(y):
            return ((y.float() - want).abs() / want.abs().clamp(min=1)).max().item()

        tol = max(2 * rel_err(eager_chain(x, cw, cb, nw, nb, eps, False)), 2 * torch.finfo(dtype).eps)
        for impl, fn in cands.items():
            err = rel_err(fn())
            assert err <= tol, f"B={B} {impl}: {err:.3g} (relative) off the float32 chain (bound {tol:.3g})"
            ms = time_ms(fn, device, args.reps)
            rows.append({"objects": B, "impl": impl, "ms": ms, "GBs": nbytes / ms / 1e6, "GFLOPs": flops / ms / 1e6})
            print(f"B={B:<3} {impl:34} {ms:10.4f} ms  {nbytes / ms / 1e6:8.1f} GB/s  {flops / ms / 1e6:9.1f} GFLOP/s")
        t = {r["impl"]: r["ms"] for r in rows if r["objects"] == B}
        for fused, plain in (("op (defaults)", "eager channels-last"), ("CUDA graph: op", "CUDA graph: eager channels-last")):
            if fused in t and plain in t:
                print(f"# frame (2 CXBlocks), B={B}, {fused} vs {plain}: {2 * (t[fused] - t[plain]):+.3f} ms")

    if device.type == "cuda" or args.out:
        write_results(
            "dwconv_norm", header, rows, ["objects", "impl", "ms", "GB/s", "GFLOP/s"],
            lambda r: [str(r["objects"]), r["impl"], f"{r['ms']:.4f}", f"{r['GBs']:.1f}", f"{r['GFLOPs']:.1f}"],
            args.out,
        )
    assert all(math.isfinite(r["ms"]) for r in rows)


if __name__ == "__main__":
    main()
