"""Command line: ``sam3fast segment IMAGE --prompt TEXT [--checkpoint PATH] [--out DIR]``.

Writes ``<stem>_overlay.png`` (masks, boxes, scores drawn on the image) and ``<stem>.json`` (one
entry per instance: score, box xyxy in pixels, COCO RLE mask). Without a checkpoint (none given, none
in the Hugging Face cache) it stops and says so; ``--random-weights`` runs anyway with random
weights, and every output is then labelled as such.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import numpy as np

SAMPLE_IMAGE = os.path.join(os.path.dirname(__file__), "assets", "sample.jpg")

_COLORS = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]],
    dtype=np.float32,
)


def mask_to_rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def draw_overlay(image, scores, boxes, masks, banner: Optional[str] = None):
    from PIL import Image, ImageDraw

    base = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for i in range(len(scores)):
        c = _COLORS[i % len(_COLORS)]
        m = masks[i]
        base[m] = 0.45 * base[m] + 0.55 * c
    out = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(out)
    for i in range(len(scores)):
        c = tuple(int(v) for v in _COLORS[i % len(_COLORS)])
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        d.rectangle((x0, y0, x1, y1), outline=c, width=2)
        d.text((x0 + 3, y0 + 2), f"{scores[i]:.2f}", fill=c)
    if banner:
        d.rectangle((0, 0, out.width, 14), fill=(0, 0, 0))
        d.text((4, 1), banner, fill=(255, 80, 80))
    return out


def _segment(args) -> int:
    import torch
    from PIL import Image

    from .build import build_image_model
    from .checkpoint import CheckpointError, resolve_checkpoint_path
    from .predictor.image import ImagePredictor

    if not os.path.exists(args.image):
        print(f"error: image not found: {args.image}", file=sys.stderr)
        return 2
    try:
        image = Image.open(args.image)
        image.load()
    except Exception as e:  # PIL raises several types for unreadable files
        print(f"error: cannot read image {args.image}: {e}", file=sys.stderr)
        return 2
    prompts: List[str] = [p for p in args.prompt]
    if any(not p.strip() for p in prompts):
        print("error: --prompt must be a non-empty text", file=sys.stderr)
        return 2

    ckpt = args.checkpoint
    if ckpt is None:
        try:
            ckpt = resolve_checkpoint_path(None, load_from_HF=True)
        except CheckpointError as e:
            if not args.random_weights:
                print(f"error: {e}\nTo try the pipeline without weights, pass --random-weights "
                      "(outputs are then meaningless and labelled as such).", file=sys.stderr)
                return 2
            ckpt = None
    elif args.random_weights:
        print("error: --checkpoint and --random-weights are mutually exclusive", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    try:
        model = build_image_model(config=args.config, checkpoint_path=ckpt, device=args.device, dtype=args.dtype)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t1 = time.perf_counter()
    predictor = ImagePredictor(model, confidence_threshold=args.threshold)
    results = predictor.predict([image], prompts)[0]
    t2 = time.perf_counter()

    random_w = ckpt is None
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.image))[0]
    instances = []
    all_scores, all_boxes, all_masks = [], [], []
    for prompt, r in zip(prompts, results):
        scores = r["scores"].cpu().numpy()
        boxes = r["boxes"].cpu().numpy()
        masks = r["masks"].cpu().numpy()
        for s, b, m in zip(scores, boxes, masks):
            instances.append({
                "prompt": prompt, "score": float(s), "box_xyxy": [float(v) for v in b],
                "area": int(m.sum()), "segmentation": mask_to_rle(m),
            })
        all_scores.append(scores)
        all_boxes.append(boxes)
        all_masks.append(masks)
    doc = {
        "image": os.path.abspath(args.image), "width": image.width, "height": image.height,
        "prompts": prompts, "threshold": args.threshold, "config": args.config,
        "checkpoint": os.path.abspath(ckpt) if ckpt else None, "random_weights": random_w,
        "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
        "instances": instances,
    }
    if random_w:
        doc["warning"] = "RANDOM WEIGHTS: no checkpoint was loaded; these outputs are meaningless"
    json_path = os.path.join(args.out, f"{stem}.json")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    overlay = draw_overlay(
        image, np.concatenate(all_scores), np.concatenate(all_boxes),
        np.concatenate(all_masks) if all_masks else np.zeros((0, image.height, image.width), bool),
        banner="RANDOM WEIGHTS - outputs are meaningless" if random_w else None,
    )
    png_path = os.path.join(args.out, f"{stem}_overlay.png")
    overlay.save(png_path)
    tag = " [RANDOM WEIGHTS]" if random_w else ""
    print(f"{len(instances)} instance(s){tag} for {prompts} in {args.image}")
    print(f"  build {t1 - t0:.1f} s, predict {t2 - t1:.1f} s on {model.device} ({doc['dtype']})")
    print(f"  wrote {json_path}\n  wrote {png_path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="sam3fast", description="Fast SAM 3 inference")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("segment", help="segment every instance of a text concept in an image")
    s.add_argument("image", nargs="?", default=SAMPLE_IMAGE, help="image file (default: the bundled sample)")
    s.add_argument("--prompt", action="append", required=True, help="text prompt; repeat for several")
    s.add_argument("--checkpoint", default=None, help="path to sam3.pt (default: the Hugging Face cache)")
    s.add_argument("--out", default="sam3fast_out", help="output folder")
    s.add_argument("--threshold", type=float, default=0.5, help="score threshold")
    s.add_argument("--random-weights", action="store_true", help="run without a checkpoint (outputs meaningless)")
    s.add_argument("--config", default="sam3", help="model preset (sam3, tiny)")
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    s.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    args = p.parse_args(argv)
    if args.cmd == "segment":
        return _segment(args)
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
