"""Benchmark of the memory encoder's mask input (``sam3fast::mask_for_memory``): low-res logits
(B, 1, 288, 288) float32 -> the mask downsampler's (B, 1, 1152, 1152) input in the model dtype.

Rows, each timed on the same inputs:
  eager            the model's ops as it runs them today (``mask_for_memory_ref``): F.interpolate to
                   (1008, 1008) in float32, cast, sigmoid (or > 0), * 20 - 10, F.interpolate to
                   (1152, 1152) antialiased in float32, cast
  compiled         torch.compile of that
  triton ...       the kernel through the op (default tile) and a sweep of (BLOCK_H, BLOCK_W, warps)
GB/s counts the bytes any implementation must move: the logits read once and the output written
once, B * (288^2 * 4 + 1152^2 * sizeof(dtype)). The eager path moves far more (each full-size
intermediate is written and read back): both byte counts per object are in the header.

    python bench/bench_mask_for_memory.py                   # GPU: B = 1, 16, 64, bf16, sigmoid masks
    python bench/bench_mask_for_memory.py --binarize --dtype float32
    python bench/bench_mask_for_memory.py --smoke           # CPU: tiny shapes, Triton interpreter, seconds

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

from _common import machine_header, print_header, time_ms, use_interpreter_without_cuda, write_results  # noqa: E402

use_interpreter_without_cuda()  # before the kernel import

from sam3fast.kernels import mask_for_memory as mfm  # noqa: E402

# (BLOCK_H, BLOCK_W, num_warps)
TILES = [mfm.DEFAULT_TILE, (4, 128, 4), (16, 128, 4), (16, 64, 4), (8, 256, 8), (32, 64, 8), (16, 128, 8)]


def eager_bytes(low, high, out, elt):
    """Bytes one object's eager path reads and writes, op by op (sigmoid mode)."""
    lo, hi, o = low * low, high * high, out * out
    moves = [lo * 4 + hi * 4,  # F.interpolate to (R, R), float32
             0 if elt == 4 else hi * (4 + elt),  # .to(model dtype)
             2 * hi * elt,  # sigmoid
             2 * hi * elt,  # * scale
             2 * hi * elt,  # + bias
             0 if elt == 4 else hi * (elt + 4),  # .float()
             hi * 4 + o * 4,  # antialiased F.interpolate to (I, I), float32
             0 if elt == 4 else o * (4 + elt)]  # .to(model dtype)
    return sum(moves)


def bench_shape(B, args, device, dtype, tiles, compile_backend):
    low_hw, high, out = (args.low, args.low), (args.high, args.high), (args.out, args.out)
    g = torch.Generator().manual_seed(B)
    coarse = torch.randn(B, 1, max(args.low // 16, 2), max(args.low // 16, 2), generator=g) * 8
    low = torch.nn.functional.interpolate(coarse, size=low_hw, mode="bilinear", align_corners=False)
    low = (low + 0.5 * torch.randn(low.shape, generator=g)).to(device)
    elt = torch.empty((), dtype=dtype).element_size()
    nbytes = B * (low_hw[0] * low_hw[1] * 4 + out[0] * out[1] * elt)
    label = f"B={B} {args.low}->{args.high}->{args.out}"
    binarize = args.binarize

    # Accuracy gate before any time means something: float64, and PyTorch in this dtype.
    ref64 = mfm.mask_for_memory_ref(low.double(), high, out, 20.0, -10.0, binarize, torch.float64)
    torch_err = (mfm.mask_for_memory_ref(low, high, out, 20.0, -10.0, binarize, dtype).double() - ref64).abs()

    def eager():
        return mfm.mask_for_memory_ref(low, high, out, 20.0, -10.0, binarize, dtype)

    cands = {}
    if device.type == "cuda":
        op = torch.ops.sam3fast.mask_for_memory
        cands["triton (op, default tile)"] = lambda: op(low, list(high), list(out), 20.0, -10.0, binarize, dtype)
    for bh, bw, nw in tiles:
        cands[f"triton {bh}x{bw} w{nw}"] = (lambda bh=bh, bw=bw, nw=nw: mfm._mask_for_memory_triton(
            low, high, out, 20.0, -10.0, binarize, dtype, block_h=bh, block_w=bw, num_warps=nw))
    cands["eager (interpolate, sigmoid, affine, interpolate aa)"] = eager
    if not args.no_compile:
        torch._dynamo.reset()
        comp = torch.compile(eager, fullgraph=True, backend=compile_backend)
        cands[f"compiled ({compile_backend})"] = comp

    rows = []
    for name, fn in cands.items():
        res = fn()
        if name.startswith("triton"):
            err = (res.double() - ref64).abs()
            if binarize:
                # A high-res logit within rounding of 0 may land on either side of the threshold, in
                # PyTorch as in the kernel: a few pixels, not the max, are gated.
                bad = (err > 0.1).double().mean().item()
                assert bad < 1e-3, f"{name}: {100 * bad:.3g} % of the pixels off by > 0.1"
            else:
                limit = max(2 * torch_err.max().item(), 1e-5)
                assert err.max().item() <= limit, f"{name}: max error {err.max().item():.3g} > {limit:.3g}"
        ms = time_ms(fn, device, args.reps)
        gbs = nbytes / ms / 1e6
        rows.append({"shape": label, "impl": name, "ms": ms, "GBs": gbs})
        print(f"{label:26} {name:52} {ms:10.4f} ms  {gbs:8.1f} GB/s")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI); numbers are not performance numbers")
    p.add_argument("--objects", default="1,16,64", help="comma-separated batch sizes (objects)")
    p.add_argument("--low", type=int, default=288)
    p.add_argument("--high", type=int, default=1008)
    p.add_argument("--out", type=int, default=1152)
    p.add_argument("--binarize", action="store_true", help="masks from prompts ((z > 0) instead of sigmoid)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--results", default=None,
                   help="results path stem (GPU: bench/results/mask_for_memory_<gpu>_<date>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.objects, args.low, args.high, args.out, args.reps = "2", 6, 21, 24, 3
        if device.type == "cpu":
            args.dtype = "float32"  # the interpreter has no bf16 arithmetic
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    dtype = getattr(torch, args.dtype)
    objects = [int(b) for b in args.objects.split(",")]
    tiles = [(8, 32, 4)] if device.type == "cpu" else TILES  # the interpreter pays per program
    compile_backend = "aot_eager" if device.type == "cpu" else "inductor"  # inductor's CPU cold start is ~20 s

    shape = {"objects": args.objects, "low": args.low, "high": args.high, "out": args.out,
             "mode": "binarize" if args.binarize else "sigmoid"}
    header = machine_header(device, shape, dtype=args.dtype, sms=True)
    header["compile_backend"] = compile_backend
    elt = torch.empty((), dtype=dtype).element_size()
    header["bytes_per_object_min"] = args.low**2 * 4 + args.out**2 * elt
    header["bytes_per_object_eager"] = eager_bytes(args.low, args.high, args.out, elt)
    print_header("mask_for_memory", header)

    rows = []
    for B in objects:
        rows += bench_shape(B, args, device, dtype, tiles, compile_backend)

    if device.type == "cuda" or args.results:
        write_results(
            "mask_for_memory", header, rows, ["shape", "impl", "ms", "GB/s"],
            lambda r: [r["shape"], r["impl"], f"{r['ms']:.4f}", f"{r['GBs']:.1f}"],
            args.results,
        )
    assert all(math.isfinite(r["ms"]) for r in rows)


if __name__ == "__main__":
    main()
