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
SAMPLE_CLIP = os.path.join(os.path.dirname(__file__), "assets", "sample_clip.mp4")

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


def _checkpoint_for(args):
    """(ok, checkpoint path or None for random weights): --checkpoint, else the hub cache, else
    only with --random-weights; a refusal is printed."""
    from .checkpoint import CheckpointError, resolve_checkpoint_path

    if args.checkpoint is not None:
        if args.random_weights:
            print("error: --checkpoint and --random-weights are mutually exclusive", file=sys.stderr)
            return False, None
        return True, args.checkpoint
    try:
        return True, resolve_checkpoint_path(None, load_from_HF=True)
    except CheckpointError as e:
        if args.random_weights:
            return True, None
        print(f"error: {e}\nTo try the pipeline without weights, pass --random-weights "
              "(outputs are then meaningless and labelled as such).", file=sys.stderr)
        return False, None


def _segment(args) -> int:
    from PIL import Image

    from .build import build_image_model
    from .checkpoint import CheckpointError
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

    ok, ckpt = _checkpoint_for(args)
    if not ok:
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


def _parse_floats(text: str, n: int, what: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{what} must be {n} comma-separated numbers, got {text!r}") from None
    if len(vals) != n:
        raise ValueError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    return vals


def _track(args) -> int:
    import cv2
    import torch

    from .checkpoint import CheckpointError
    from .video import build_sam3_video_predictor
    from .video.io import open_video

    if not args.prompt and not args.points and not args.box:
        print("error: give --prompt TEXT, --points, or --box", file=sys.stderr)
        return 2
    if args.prompt is not None and not args.prompt.strip():
        print("error: --prompt must be a non-empty text", file=sys.stderr)
        return 2
    ok, ckpt = _checkpoint_for(args)
    if not ok:
        return 2
    try:
        video = open_video(args.video, image_size=8)  # cheap probe: readable? size, frame count
        num_frames, vh, vw = len(video), video.video_height, video.video_width
        pred = build_sam3_video_predictor(checkpoint_path=ckpt, load_from_HF=False, config=args.config,
                                          device=args.device, dtype=args.dtype)
        sid = pred.handle_request({"type": "start_session", "resource_path": args.video})["session_id"]
        req = {"type": "add_prompt", "session_id": sid, "frame_index": args.frame}
        if args.prompt:
            req["text"] = args.prompt
        if args.box:
            x0, y0, x1, y1 = _parse_floats(args.box, 4, "--box")
            req["bounding_boxes"] = [[x0 / vw, y0 / vh, (x1 - x0) / vw, (y1 - y0) / vh]]
            req["bounding_box_labels"] = [1]
        if args.points:
            pts = [_parse_floats(p, 2, "--points") for p in args.points.split(";")]
            req["points"] = torch.tensor([[x / vw, y / vh] for x, y in pts])
            req["point_labels"] = torch.ones(len(pts), dtype=torch.int32)
            req["obj_id"] = 1
        pred.handle_request(req)
    except (CheckpointError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    random_w = ckpt is None
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(os.path.normpath(args.video)))[0]
    frames_out = {}
    # (the propagation draws its own tqdm progress bar, as the official does)
    for resp in pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid,
                                            "propagation_direction": args.direction}):
        o = resp["outputs"]
        insts = []
        for oid, p, box, m in zip(o["out_obj_ids"], o["out_probs"], o["out_boxes_xywh"], o["out_binary_masks"]):
            insts.append({"obj_id": int(oid), "score": float(p),
                          "box_xywh": [float(box[0] * vw), float(box[1] * vh), float(box[2] * vw), float(box[3] * vh)],
                          "area": int(m.sum()), "segmentation": mask_to_rle(m)})
        frames_out[int(resp["frame_index"])] = (insts, o)
    pred.handle_request({"type": "close_session", "session_id": sid})

    doc = {"video": os.path.abspath(args.video), "width": vw, "height": vh, "num_frames": num_frames,
           "prompt": args.prompt, "points": args.points, "box": args.box, "prompt_frame": args.frame,
           "config": args.config, "checkpoint": os.path.abspath(ckpt) if ckpt else None, "random_weights": random_w,
           "frames": [{"frame_index": f, "instances": frames_out[f][0]} for f in sorted(frames_out)]}
    if random_w:
        doc["warning"] = "RANDOM WEIGHTS: no checkpoint was loaded; these outputs are meaningless"
    json_path = os.path.join(args.out, f"{stem}_tracks.json")
    with open(json_path, "w") as f:
        json.dump(doc, f)
    video_path = os.path.join(args.out, f"{stem}_overlay.mp4")
    writer = cv2.VideoWriter(video_path, cv2.VideoWriter_fourcc(*"mp4v"), args.fps, (vw, vh))
    from PIL import Image

    banner = "RANDOM WEIGHTS - outputs are meaningless" if random_w else None
    for i, frame in enumerate(_raw_frames(args.video)):
        insts, o = frames_out.get(i, ([], None))
        scores = np.array([x["score"] for x in insts], np.float32)
        boxes = np.array([[x["box_xywh"][0], x["box_xywh"][1], x["box_xywh"][0] + x["box_xywh"][2],
                           x["box_xywh"][1] + x["box_xywh"][3]] for x in insts], np.float32).reshape(-1, 4)
        masks = np.asarray(o["out_binary_masks"]) if o is not None else np.zeros((0, vh, vw), bool)
        img = draw_overlay(Image.fromarray(frame), scores, boxes, masks, banner=banner)
        writer.write(cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR))
    writer.release()
    n_obj = len({x["obj_id"] for f in doc["frames"] for x in f["instances"]})
    tag = " [RANDOM WEIGHTS]" if random_w else ""
    print(f"{n_obj} object(s){tag} tracked over {num_frames} frames of {args.video}")
    print(f"  wrote {json_path}\n  wrote {video_path}")
    return 0


def _raw_frames(path: str):
    """The video's frames as RGB uint8 at their own size (for the overlay)."""
    import cv2

    if os.path.isdir(path):
        names = sorted((n for n in os.listdir(path) if os.path.splitext(n)[0].isdigit()),
                       key=lambda n: int(os.path.splitext(n)[0]))
        for n in names:
            yield np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(os.path.join(path, n)).convert("RGB"))
        return
    cap = cv2.VideoCapture(path)
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    cap.release()


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
    t = sub.add_parser("track", help="detect and track a text concept (or clicked object) through a video")
    t.add_argument("video", nargs="?", default=SAMPLE_CLIP, help="mp4 file or folder of <index>.jpg frames "
                   "(default: the bundled sample clip)")
    t.add_argument("--prompt", default=None, help="text prompt")
    t.add_argument("--points", default=None, help='positive clicks in pixels on --frame: "x,y;x,y"')
    t.add_argument("--box", default=None, help='a box in pixels on --frame: "x0,y0,x1,y1"')
    t.add_argument("--frame", type=int, default=0, help="frame index the prompt is given on")
    t.add_argument("--direction", default="forward", choices=["forward", "backward", "both"])
    t.add_argument("--checkpoint", default=None)
    t.add_argument("--out", default="sam3fast_out")
    t.add_argument("--random-weights", action="store_true")
    t.add_argument("--config", default="sam3")
    t.add_argument("--device", default=None)
    t.add_argument("--dtype", default="float32")
    t.add_argument("--fps", type=float, default=10.0, help="frame rate of the overlay video")
    args = p.parse_args(argv)
    if args.cmd == "segment":
        return _segment(args)
    if args.cmd == "track":
        return _track(args)
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
