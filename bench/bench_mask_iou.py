"""Mask IoU and mask NMS on bit-packed masks (``sam3fast.mask_ops``) vs the official broadcast approach.

Cases are N x M masks of H x W (discs of random size plus speckle). Rows:
  sam3fast                 torch.ops.sam3fast.mask_iou on packed masks (CPU C++ or CUDA kernel)
  sam3fast + pack          the same, plus pack_masks of both bool inputs (what a caller holding bool
                           masks pays)
  official                 sam3.perflib.masks_ops.mask_iou on the bool masks: (N, M, H*W) broadcast
                           and/or + sums; skipped when its int64 sums would exceed --official-max-gib
NMS cases (N masks, thresholds 0.1 and 0.5) compare sam3fast.mask_ops.nms_masks with the official
sam3.perflib.nms.nms_masks (the detector's video-path NMS: prefilter, mask_iou, greedy NMS with host
syncs) on the same logits. Every answer is checked against the official one before it is timed.

    python bench/bench_mask_iou.py            # GPU: 288x288 and video-size masks
    python bench/bench_mask_iou.py --smoke    # CPU (CI): tiny cases, a few seconds

Times are medians (CUDA: synchronised perf_counter around each call). CPU --smoke numbers only show
that the script runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the official-package helper lives with the tests
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench/_common.py, also when run through runpy

from _common import timed  # noqa: E402

from sam3fast import mask_ops  # noqa: E402

IOU_CASES = [(100, 100, 288, 288), (200, 200, 288, 288), (200, 16, 288, 288), (16, 16, 1080, 1920), (64, 64, 1080, 1920)]
NMS_CASES = [(200, 288, 288), (50, 1080, 1920)]
SMOKE_IOU = [(7, 5, 24, 40), (20, 20, 36, 70)]
SMOKE_NMS = [(20, 24, 40)]


def blobs(N, H, W, seed):
    g = torch.Generator().manual_seed(seed)
    yy = torch.arange(H, dtype=torch.float32).view(1, H, 1)
    xx = torch.arange(W, dtype=torch.float32).view(1, 1, W)
    cy, cx = torch.rand(N, 1, 1, generator=g) * H, torch.rand(N, 1, 1, generator=g) * W
    r = (0.05 + 0.25 * torch.rand(N, 1, 1, generator=g)) * max(H, W)
    return ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) | (torch.rand(N, H, W, generator=g) < 0.01)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny CPU cases (CI); not performance numbers")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--official-max-gib", type=float, default=16.0, help="skip the official broadcast above this size")
    p.add_argument("--no-official", action="store_true")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.cpu and not args.smoke
    dev = torch.device("cuda" if cuda else "cpu")
    iou_cases, nms_cases = (SMOKE_IOU, SMOKE_NMS) if args.smoke else (IOU_CASES, NMS_CASES)
    reps = 3 if args.smoke else args.reps
    if not cuda and not args.smoke:
        iou_cases = [c for c in iou_cases if c[2] * c[3] <= 288 * 288]  # keep CPU runs in minutes

    official_iou = official_nms = None
    if not args.no_official:
        from official_ref import official

        official()
        from sam3.perflib.masks_ops import mask_iou as official_iou
        from sam3.perflib.nms import nms_masks as official_nms

    backend = mask_ops.mask_ops_backend(torch.empty(0, device=dev))
    print("# mask_iou / mask_nms benchmark")
    print(f"# device: {torch.cuda.get_device_name(dev) if cuda else f'CPU ({platform.machine()}, {torch.get_num_threads()} threads)'}")
    print(f"# torch {torch.__version__}, sam3fast backend: {backend[0]} ({backend[1]}), median of {reps} runs")

    for N, M, H, W in iou_cases:
        a_bool, b_bool = blobs(N, H, W, 0).to(dev), blobs(M, H, W, 1).to(dev)
        a, b = mask_ops.pack_masks(a_bool), mask_ops.pack_masks(b_bool)
        rows = {
            "sam3fast": lambda: mask_ops.mask_iou(a, b),
            "sam3fast + pack": lambda: mask_ops.mask_iou(mask_ops.pack_masks(a_bool), mask_ops.pack_masks(b_bool)),
        }
        want = None
        gib = N * M * H * W * 8 / 2**30  # the official int64 sums of (N, M, H*W)
        if official_iou is not None and gib <= args.official_max_gib:
            rows["official"] = lambda: official_iou(a_bool, b_bool)
            want = official_iou(a_bool, b_bool)
        for name, fn in rows.items():
            ms, out = timed(fn, reps, cuda)
            if want is not None:
                assert torch.equal(out, want), f"{name}: IoU differs from the official"
            pairs_per_s = N * M / ms / 1e3
            print(f"iou  N={N:4d} M={M:4d} {H}x{W:<5d} {name:18s} {ms:10.3f} ms  {pairs_per_s:10.1f} Mpairs/s")
        if "official" not in rows and official_iou is not None:
            print(f"iou  N={N:4d} M={M:4d} {H}x{W:<5d} {'official':18s} skipped (needs ~{gib:.0f} GiB)")

    for N, H, W in nms_cases:
        m = blobs(N, H, W, 2).to(dev)
        g = torch.Generator().manual_seed(3)
        logits = (torch.where(m.cpu(), 1.0, -1.0) * (0.5 + torch.rand(N, H, W, generator=g))).to(dev)
        probs = torch.rand(N, generator=g).to(dev)
        for thr in (0.1, 0.5):
            rows = {"sam3fast": lambda: mask_ops.nms_masks(probs, logits, 0.3, thr)}
            if official_nms is not None and N * N * H * W * 8 / 2**30 <= args.official_max_gib:
                rows["official"] = lambda: official_nms(probs, logits, 0.3, thr)
            want = rows["official"]() if "official" in rows else None
            for name, fn in rows.items():
                ms, out = timed(fn, reps, cuda)
                if want is not None:
                    assert torch.equal(out, want), f"{name}: NMS keep differs from the official"
                print(f"nms  N={N:4d} {H}x{W:<5d} thr={thr:<4} {name:18s} {ms:10.3f} ms  kept {int(out.sum())}")


if __name__ == "__main__":
    main()
