"""Benchmark of the fused mask post-processing (``sam3fast::mask_postprocess``).

Compares, for N low-resolution mask logits (N, h, w) -> (H, W), with and without non-overlap:
  triton list       the fused kernel, "list" schedule (the default: objects tested a chunk at a time,
                    a loop over the live ones only): a sweep of tiles, and the custom op (default tile)
  triton scan       the "scan" schedule at the default tile (objects tested one by one; the default
                    until 2026-11-26 session 9)
  triton ... skip_empty=False
                    the same kernel evaluating every (object, tile) pair, as before the skip of pairs
                    whose tile cannot meet the object's positive logits (the outputs are identical)
  CUDA graph: ...   the op, each tile of the sweep and the official chain replayed from a CUDA graph:
                    device time without the host's launch overhead (the op is four launches, the
                    official chain a dozen); the eager rows of the sweep are host-bound on an H200
  ref eager         ``mask_postprocess_ref``: the same outputs (packed bits, boxes, areas) in eager PyTorch
  ref compiled      torch.compile of it
  official eager    what the official code does: F.interpolate -> sigmoid -> > 0.5 (sam3_image_processor
                    ``_forward_grounding``), the tracker's object-wise non-overlap on the full-resolution
                    masks (sam3_tracking_predictor ``_apply_object_wise_non_overlapping_constraints``) and
                    perflib ``masks_to_boxes``; it returns full-resolution bool masks
  official compiled torch.compile of it
GB/s is "useful" bandwidth for every row: bytes of the logits read plus the packed masks, boxes and
areas written, over the time; baselines that write full-resolution masks move more than that.

    python bench/bench_mask_postprocess.py            # GPU: real sizes, writes bench/results/*.json + .md
    python bench/bench_mask_postprocess.py --smoke    # CPU: tiny shapes, Triton interpreter, < 20 s

CPU numbers (``--smoke``) check that the script runs; they are not performance numbers.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench/_common.py, also when run through runpy

from _common import graphed, machine_header, print_header, time_ms, use_interpreter_without_cuda, write_results  # noqa: E402

use_interpreter_without_cuda()  # before the kernel import

import torch.nn.functional as F  # noqa: E402

from sam3fast.kernels import mask_postprocess as mp  # noqa: E402

# (block_h, block_words, num_warps) of the list schedule: the default 8 x 64 first, then wider rows (a
# dead object's zero words go out in longer runs), the scan schedule's earlier sweep, and (session 14)
# tiles with fewer registers per program. A static sm_90 build (no GPU; Triton 3.7,
# sam3fast.kernels._static_build) gives the default 142 registers without non-overlap (3 programs
# per SM) and 80 with it (6 per SM), while the graphed op took 0.24 against 0.12 ms on the H200;
# 8x64 w2 has 80 / 80 registers (12 per SM), 4x64 w2 56 (18 per SM), 4x64 w1 and 2x64 w1 no
# cross-warp reductions (2 barriers instead of 22-38).
TILES = [(8, 2, 4), (4, 4, 4), (2, 8, 4), (8, 4, 8), (16, 2, 4), (4, 2, 2), (8, 2, 2), (4, 2, 1), (2, 2, 1)]
_LAUNCH = inspect.signature(mp._mask_postprocess_triton).parameters
DEFAULT_TILE = tuple(_LAUNCH[k].default for k in ("block_h", "block_words", "num_warps"))  # what the op runs


def official_style(masks, scores, active, H, W, non_overlap):
    """The official post-processing chain, eager (see the module docstring for the sources)."""
    probs = F.interpolate(masks.unsqueeze(1), size=(H, W), mode="bilinear", align_corners=False).sigmoid()
    binary = (probs > 0.5) & active.view(-1, 1, 1, 1)
    if non_overlap and masks.shape[0] > 1:
        per_obj = torch.where(binary, scores.view(-1, 1, 1, 1).to(probs.dtype), 0)
        obj = torch.arange(masks.shape[0], device=masks.device).view(-1, 1, 1, 1)
        keep = torch.argmax(per_obj, dim=0, keepdim=True) == obj
        binary = torch.where(keep, per_obj, torch.clamp(per_obj, max=0)) > 0
    binary = binary.squeeze(1)
    y = torch.arange(H, device=masks.device).view(1, H)
    x = torch.arange(W, device=masks.device).view(1, W)
    with_x = binary.amax(dim=1)
    with_y = binary.amax(dim=2)
    boxes = torch.stack(
        [
            torch.amin(~with_x * W + with_x * x, dim=1),
            torch.amin(~with_y * H + with_y * y, dim=1),
            torch.amax(with_x * x, dim=1),
            torch.amax(with_y * y, dim=1),
        ],
        dim=1,
    ).float()
    return binary, boxes


def make_inputs(N, h, w, dtype, device, seed=0):
    """Compact blobs (what real masks look like: most tiles of most objects are empty) of random
    centre and radius, some overlapping, plus noise; distinct scores."""
    g = torch.Generator().manual_seed(seed)
    yy = torch.linspace(0, 1, h).view(1, h, 1)
    xx = torch.linspace(0, 1, w).view(1, 1, w)
    cy, cx = torch.rand(N, 1, 1, generator=g), torch.rand(N, 1, 1, generator=g)
    r = 0.05 + 0.2 * torch.rand(N, 1, 1, generator=g)
    logits = 6 * (1 - ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2) + 0.5 * torch.randn(N, h, w, generator=g)
    scores = torch.rand(N, generator=g)
    active = torch.ones(N, dtype=torch.bool)
    return logits.to(device=device, dtype=dtype), scores.to(device), active.to(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI); numbers are not performance numbers")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--low", type=int, default=288)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--out", default=None, help="results path stem (GPU: bench/results/mask_postprocess_<gpu>_<date>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.n, args.low, args.height, args.width, args.reps = 3, 24, 40, 72, 3
        if device.type == "cpu":
            args.dtype = "float32"  # the interpreter has no bf16 arithmetic; keep the baselines comparable
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    dtype = getattr(torch, args.dtype)
    # The interpreter pays per program iteration: large tiles keep the smoke run short.
    tiles = [(32, 4, 4)] if device.type == "cpu" else TILES
    compile_backend = "aot_eager" if device.type == "cpu" else "inductor"  # inductor's CPU cold start is ~20 s

    N, h, w, H, W = args.n, args.low, args.low, args.height, args.width
    masks, scores, active = make_inputs(N, h, w, dtype, device)
    useful_bytes = masks.numel() * masks.element_size() + N * H * ((W + 31) // 32) * 4 + N * 4 * 4 + N * 8
    header = machine_header(device, {"N": args.n, "h": args.low, "w": args.low, "H": args.height, "W": args.width},
                            dtype=args.dtype)
    header["compile_backend"] = compile_backend
    print_header("mask_postprocess", header)

    rows = []
    for non_overlap in (False, True):
        ref = mp.mask_postprocess_ref(masks, scores, active, H, W, non_overlap)
        cands = {}
        for bh, bk, nw in tiles:
            tile = dict(block_h=bh, block_words=bk, num_warps=nw)
            fn = (lambda tile=tile: mp._mask_postprocess_triton(masks, scores, active, H, W, non_overlap, **tile))
            cands[f"triton list {bh}x{bk * 32} w{nw}"] = fn
            if device.type == "cuda":
                # The eager rows include the host's four launches (~0.1-0.2 ms on the H200 of
                # 2026-11-27, the same for every tile); the graphed ones are the device time.
                fn()  # (compiled before the capture)
                cands[f"CUDA graph: list {bh}x{bk * 32} w{nw}"] = graphed(fn)
        if device.type == "cuda":
            op = torch.ops.sam3fast.mask_postprocess
            cands["triton (op, default tile)"] = lambda: op(masks, scores, active, H, W, non_overlap)
        # The scan schedule and the kernel before the skip of empty pairs, at the tile the op uses
        # (the interpreter: the smoke tile), beside the sweep row of that tile.
        bh, bk, nw = tiles[0] if device.type == "cpu" else DEFAULT_TILE
        for label, extra in (("triton scan", {}), ("triton", {"skip_empty": False})):
            tile = dict(block_h=bh, block_words=bk, num_warps=nw, **extra)
            suffix = " skip_empty=False" if extra else ""
            cands[f"{label} {bh}x{bk * 32} w{nw}{suffix}"] = (
                lambda tile=tile, sched="scan": mp._mask_postprocess_triton(
                    masks, scores, active, H, W, non_overlap, schedule=sched, **tile)
            )
        cands["ref eager"] = lambda: mp.mask_postprocess_ref(masks, scores, active, H, W, non_overlap)
        cands["official eager"] = lambda: official_style(masks, scores, active, H, W, non_overlap)
        if device.type == "cuda":
            cands["CUDA graph: op (default tile)"] = graphed(lambda: op(masks, scores, active, H, W, non_overlap))
            cands["CUDA graph: official eager"] = graphed(lambda: official_style(masks, scores, active, H, W, non_overlap))
        if not args.no_compile:
            torch._dynamo.reset()
            ref_c = torch.compile(mp.mask_postprocess_ref, fullgraph=True, backend=compile_backend)
            off_c = torch.compile(official_style, fullgraph=True, backend=compile_backend)
            cands[f"ref compiled ({compile_backend})"] = lambda: ref_c(masks, scores, active, H, W, non_overlap)
            cands[f"official compiled ({compile_backend})"] = lambda: off_c(masks, scores, active, H, W, non_overlap)
        for name, fn in cands.items():
            out = fn()
            if name.startswith(("triton", "CUDA graph: list")):
                # Outputs must match the reference before a time means anything (a float32 rounding
                # can flip pixels whose logit is ~0: allow a handful).
                flips = int((mp.unpack_masks(out[0], W) != mp.unpack_masks(ref[0], W)).sum())
                assert flips <= max(8, N * H * W // 10**6), f"{name}: {flips} pixels differ from the reference"
            ms = time_ms(fn, device, args.reps)
            row = {"non_overlap": non_overlap, "impl": name, "ms": ms, "useful_GBps": useful_bytes / ms / 1e6}
            rows.append(row)
            print(f"non_overlap={non_overlap!s:5}  {name:34} {ms:10.3f} ms  {row['useful_GBps']:9.2f} GB/s")

    if device.type == "cuda" or args.out:
        write_results(
            "mask_postprocess", header, rows, ["non_overlap", "impl", "ms", "useful GB/s"],
            lambda r: [f"{r['non_overlap']}", r["impl"], f"{r['ms']:.3f}", f"{r['useful_GBps']:.1f}"], args.out,
        )

if __name__ == "__main__":
    main()
