"""Command line: ``sam3fast segment IMAGE --prompt TEXT [--checkpoint PATH] [--out DIR]``.

Writes ``<stem>_overlay.png`` (masks, boxes, scores drawn on the image) and ``<stem>.json`` (one
entry per instance: score, box xyxy in pixels, COCO RLE mask). Without a checkpoint (none given, none
in the Hugging Face cache) it stops and says so; ``--random-weights`` runs anyway with random
weights, and every output is then labelled as such.

``sam3fast segment`` / ``sam3fast track`` also take a folder, a quoted glob or ``@list.txt`` of inputs and
then run a batch job (``sam3fast.batch``: atomic per-input outputs, resume, error records), one
process or one per GPU under ``torchrun --nproc-per-node N -m sam3fast.cli ...``. Exit codes: 0 done,
1 some inputs of a batch failed (error records written), 2 bad arguments or input.
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

RANDOM_WARNING = "RANDOM WEIGHTS: no checkpoint was loaded; these outputs are meaningless"
RANDOM_BANNER = "RANDOM WEIGHTS - outputs are meaningless"

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


def _segment_record(path: str, image, prompts: List[str], results, args, ckpt, model):
    """(JSON document, (scores, boxes, masks) for the overlay) of one image's results."""
    random_w = ckpt is None
    instances = []
    all_scores, all_boxes, all_masks = [], [], []
    for prompt, r in zip(prompts, results):
        scores = r["scores"].cpu().numpy()
        boxes = r["boxes"].cpu().numpy()
        masks = r["masks"].cpu().numpy()
        for sc, b, m in zip(scores, boxes, masks):
            instances.append({
                "prompt": prompt, "score": float(sc), "box_xyxy": [float(v) for v in b],
                "area": int(m.sum()), "segmentation": mask_to_rle(m),
            })
        all_scores.append(scores)
        all_boxes.append(boxes)
        all_masks.append(masks)
    doc = {
        "image": os.path.abspath(path), "width": image.width, "height": image.height,
        "prompts": prompts, "threshold": args.threshold, "config": args.config,
        "checkpoint": os.path.abspath(ckpt) if ckpt else None, "random_weights": random_w,
        "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
        "instances": instances,
    }
    if random_w:
        doc["warning"] = RANDOM_WARNING
    arrays = (np.concatenate(all_scores), np.concatenate(all_boxes),
              np.concatenate(all_masks) if all_masks else np.zeros((0, image.height, image.width), bool))
    return doc, arrays


def _segment_overlay(image, arrays, random_w: bool):
    return draw_overlay(image, *arrays, banner=RANDOM_BANNER if random_w else None)


def _check_prompts(prompts: List[str]) -> bool:
    if any(not p.strip() for p in prompts):
        print("error: --prompt must be a non-empty text", file=sys.stderr)
        return False
    return True


def _batch_or_other_rank(path, kind: str, batch, args) -> Optional[int]:
    """The exit code when this call is not the plain one-input run: a folder, glob or @list runs
    ``batch(args)``; one input under torchrun is done by rank 0 alone (others return 0)."""
    from .batch import input_kind

    if input_kind(path, kind) != "single":
        return batch(args)
    if _not_rank0():
        return 0
    return None


def _segment(args) -> int:
    rc = _batch_or_other_rank(args.image, "image", _segment_batch, args)
    if rc is not None:
        return rc
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
    if not _check_prompts(prompts):
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
    doc, arrays = _segment_record(args.image, image, prompts, results, args, ckpt, model)
    json_path = os.path.join(args.out, f"{stem}.json")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    overlay = _segment_overlay(image, arrays, random_w)
    png_path = os.path.join(args.out, f"{stem}_overlay.png")
    overlay.save(png_path)
    tag = " [RANDOM WEIGHTS]" if random_w else ""
    print(f"{len(doc['instances'])} instance(s){tag} for {prompts} in {args.image}")
    print(f"  build {t1 - t0:.1f} s, predict {t2 - t1:.1f} s on {model.device} ({doc['dtype']})")
    print(f"  wrote {json_path}\n  wrote {png_path}")
    return 0


def _not_rank0() -> bool:
    """Under torchrun (several ranks) with a single input, only rank 0 works."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0


def _segment_batch(args) -> int:
    """Folder / glob / @list of images (sam3fast.batch): images batched per rank, one backbone pass
    per batch serves every prompt."""
    from .batch import error_record, run_job

    prompts: List[str] = [p for p in args.prompt]
    if not _check_prompts(prompts):
        return 2
    ok, ckpt = _checkpoint_for(args)
    if not ok:
        return 2
    random_w = ckpt is None

    def setup(device):
        from .build import build_image_model
        from .predictor.image import ImagePredictor

        model = build_image_model(config=args.config, checkpoint_path=ckpt, device=device, dtype=args.dtype)
        return ImagePredictor(model, confidence_threshold=args.threshold)

    def process(predictor, chunk):
        from PIL import Image

        loaded = []
        for item in chunk:
            try:
                image = Image.open(item.path)
                image.load()
                loaded.append((item, image))
            except Exception as e:  # PIL raises several types for unreadable files
                yield item, error_record("image", item.path, e), None
        if not loaded:
            return
        try:
            batch = predictor.predict([im for _, im in loaded], prompts)
        except Exception:  # one bad image fails the batch: run them one by one to find it
            batch = None
        for k, (item, image) in enumerate(loaded):
            try:
                results = batch[k] if batch is not None else predictor.predict([image], prompts)[0]
            except Exception as e:
                yield item, error_record("image", item.path, e), None
                continue
            doc, arrays = _segment_record(item.path, image, prompts, results, args, ckpt, predictor.model)
            yield item, doc, (lambda tmp, im=image, a=arrays: _segment_overlay(im, a, random_w).save(tmp))

    return run_job(args.image, "image", out_dir=args.out, chunk_size=args.batch_size,
                   overlay_ext=".png" if args.overlay else None, device=args.device, setup=setup,
                   process=process, banner=" [RANDOM WEIGHTS]" if random_w else "")


def _parse_floats(text: str, n: int, what: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{what} must be {n} comma-separated numbers, got {text!r}") from None
    if len(vals) != n:
        raise ValueError(f"{what} must be {n} comma-separated numbers, got {text!r}")
    return vals


def _track_request_fields(args, vw: int, vh: int) -> dict:
    """The add_prompt fields for --prompt / --box / --points (pixels -> normalised)."""
    import torch

    req = {}
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
    return req


def _track_one(pred, path: str, args, ckpt):
    """Track through one video: (JSON document, {frame: (instances, outputs)})."""
    from .video.io import open_video

    video = open_video(path, image_size=8)  # cheap probe: readable? size, frame count
    num_frames, vh, vw = len(video), video.video_height, video.video_width
    sid = pred.handle_request({"type": "start_session", "resource_path": path})["session_id"]
    try:
        req = {"type": "add_prompt", "session_id": sid, "frame_index": args.frame}
        req.update(_track_request_fields(args, vw, vh))
        pred.handle_request(req)
        frames_out = {}
        for resp in pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid,
                                                "propagation_direction": args.direction}):
            o = resp["outputs"]
            insts = []
            for oid, p, box, m in zip(o["out_obj_ids"], o["out_probs"], o["out_boxes_xywh"], o["out_binary_masks"]):
                insts.append({"obj_id": int(oid), "score": float(p),
                              "box_xywh": [float(box[0] * vw), float(box[1] * vh), float(box[2] * vw),
                                           float(box[3] * vh)],
                              "area": int(m.sum()), "segmentation": mask_to_rle(m)})
            frames_out[int(resp["frame_index"])] = (insts, o)
    finally:
        pred.handle_request({"type": "close_session", "session_id": sid})
    random_w = ckpt is None
    doc = {"video": os.path.abspath(path), "width": vw, "height": vh, "num_frames": num_frames,
           "prompt": args.prompt, "points": args.points, "box": args.box, "prompt_frame": args.frame,
           "config": args.config, "checkpoint": os.path.abspath(ckpt) if ckpt else None, "random_weights": random_w,
           "frames": [{"frame_index": f, "instances": frames_out[f][0]} for f in sorted(frames_out)]}
    if random_w:
        doc["warning"] = RANDOM_WARNING
    return doc, frames_out


def _write_track_overlay(out_path: str, path: str, doc: dict, frames_out: dict, fps: float) -> None:
    import cv2
    from PIL import Image

    vw, vh = doc["width"], doc["height"]
    writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (vw, vh))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV could not open {out_path} for writing")
    banner = RANDOM_BANNER if doc["random_weights"] else None
    try:
        for i, frame in enumerate(_raw_frames(path)):
            insts, o = frames_out.get(i, ([], None))
            scores = np.array([x["score"] for x in insts], np.float32)
            boxes = np.array([[x["box_xywh"][0], x["box_xywh"][1], x["box_xywh"][0] + x["box_xywh"][2],
                               x["box_xywh"][1] + x["box_xywh"][3]] for x in insts], np.float32).reshape(-1, 4)
            masks = np.asarray(o["out_binary_masks"]) if o is not None else np.zeros((0, vh, vw), bool)
            img = draw_overlay(Image.fromarray(frame), scores, boxes, masks, banner=banner)
            writer.write(cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def _check_track_prompt(args) -> bool:
    if not args.prompt and not args.points and not args.box:
        print("error: give --prompt TEXT, --points, or --box", file=sys.stderr)
        return False
    if args.prompt is not None and not args.prompt.strip():
        print("error: --prompt must be a non-empty text", file=sys.stderr)
        return False
    return True


def _track(args) -> int:
    rc = _batch_or_other_rank(args.video, "video", _track_batch, args)
    if rc is not None:
        return rc
    from .checkpoint import CheckpointError
    from .video import build_sam3_video_predictor
    from .video.io import open_video

    if not _check_track_prompt(args):
        return 2
    ok, ckpt = _checkpoint_for(args)
    if not ok:
        return 2
    try:
        video = open_video(args.video, image_size=8)  # cheap probe before the build
        _track_request_fields(args, video.video_width, video.video_height)  # bad --box/--points
        # async_loading_frames: a frame folder decodes in the background while tracking starts
        pred = build_sam3_video_predictor(checkpoint_path=ckpt, load_from_HF=False, config=args.config,
                                          device=args.device, dtype=args.dtype, async_loading_frames=True)
        # (the propagation draws its own tqdm progress bar, as the official does)
        doc, frames_out = _track_one(pred, args.video, args, ckpt)
    except (CheckpointError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(os.path.normpath(args.video)))[0]
    json_path = os.path.join(args.out, f"{stem}_tracks.json")
    with open(json_path, "w") as f:
        json.dump(doc, f)
    video_path = os.path.join(args.out, f"{stem}_overlay.mp4")
    _write_track_overlay(video_path, args.video, doc, frames_out, args.fps)
    n_obj = len({x["obj_id"] for f in doc["frames"] for x in f["instances"]})
    tag = " [RANDOM WEIGHTS]" if ckpt is None else ""
    print(f"{n_obj} object(s){tag} tracked over {doc['num_frames']} frames of {args.video}")
    print(f"  wrote {json_path}\n  wrote {video_path}")
    return 0


def _track_batch(args) -> int:
    """Folder / glob / @list of videos (sam3fast.batch): one predictor per rank, one video at a time."""
    from .batch import error_record, run_job

    if not _check_track_prompt(args):
        return 2
    try:
        _track_request_fields(args, 1, 1)  # malformed --box / --points stop the job before it starts
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok, ckpt = _checkpoint_for(args)
    if not ok:
        return 2

    def setup(device):
        from .video import build_sam3_video_predictor

        pred = build_sam3_video_predictor(checkpoint_path=ckpt, load_from_HF=False, config=args.config,
                                          device=device, dtype=args.dtype, async_loading_frames=True)
        pred.model.progress = False  # the job draws one bar for all videos
        return pred

    def process(pred, chunk):
        for item in chunk:
            try:
                doc, frames_out = _track_one(pred, item.path, args, ckpt)
            except Exception as e:  # unreadable video, decoder errors: an error record, the job goes on
                yield item, error_record("video", item.path, e), None
                continue
            yield item, doc, (lambda tmp, p=item.path, d=doc, f=frames_out:
                              _write_track_overlay(tmp, p, d, f, args.fps))

    return run_job(args.video, "video", out_dir=args.out, chunk_size=1,
                   overlay_ext=".mp4" if args.overlay else None, device=args.device, setup=setup,
                   process=process, banner=" [RANDOM WEIGHTS]" if ckpt is None else "")


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


_BATCH_HELP = """\
inputs:
  INPUT is one file (as always), or a batch of inputs:
    @LIST     a text file listing one input per line ('#' comments, paths relative to the file)
    FOLDER    every {what} under the folder, recursively
              (hidden names and --out skipped){folder_note}
    'GLOB'    a quoted pattern with * ? [ ] (** recurses), when no such path exists
  Batch outputs mirror the inputs' paths: OUT/REL.json (+ OUT/REL.overlay.{ovl} with --overlay),
  REL being the input's path (extension kept) relative to FOLDER, to the glob's leading folders
  without wildcards, or to the deepest folder holding every listed input; files are written to a
  temporary name and renamed, so a JSON present means that input is done. A re-run skips inputs
  already done, retries failed ones and resumes after a crash. An input that cannot be read or run
  gets an error record (a JSON with "error"); the job goes on and exits 1 at the end with a summary.

distributed (torchrun):
  torchrun --nproc-per-node N -m sam3fast.cli {cmd} FOLDER ...   (--nnodes/--rdzv-* across nodes)
  runs one process per device (cuda:LOCAL_RANK with NCCL and a gloo group for host counters; gloo on
  CPU). The sorted inputs are cut into chunks of {share}; chunks with work left are dealt
  round-robin to the ranks. Rank 0 draws one progress bar for the whole job; the others are quiet.
  Without torchrun it runs in one process. --out must be one folder seen by every rank.
"""


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="sam3fast", description="Fast SAM 3 inference")
    sub = p.add_subparsers(dest="cmd", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser(
        "segment", help="segment every instance of a text concept in an image (or a batch of images)",
        formatter_class=fmt,
        epilog=_BATCH_HELP.format(what="image (.jpg .jpeg .png .bmp .tif .tiff .webp)", folder_note="",
                                  ovl="png", cmd="segment",
                                  share="--batch-size images"))
    s.add_argument("image", nargs="?", default=SAMPLE_IMAGE, metavar="INPUT",
                   help="image file (default: the bundled sample), or a FOLDER, 'GLOB' or @LIST (see below)")
    s.add_argument("--prompt", action="append", required=True, help="text prompt; repeat for several")
    s.add_argument("--checkpoint", default=None, help="path to sam3.pt (default: the Hugging Face cache)")
    s.add_argument("--out", default="sam3fast_out", help="output folder")
    s.add_argument("--threshold", type=float, default=0.5, help="score threshold")
    s.add_argument("--random-weights", action="store_true", help="run without a checkpoint (outputs meaningless)")
    s.add_argument("--config", default="sam3", help="model preset (sam3, tiny)")
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    s.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    s.add_argument("--batch-size", type=int, default=4,
                   help="batch jobs: images per backbone batch on each rank (default 4)")
    s.add_argument("--overlay", action="store_true",
                   help="batch jobs: also write an overlay PNG per image (a single image always gets one)")
    t = sub.add_parser(
        "track", help="detect and track a text concept (or clicked object) through a video (or a batch of videos)",
        formatter_class=fmt,
        epilog=_BATCH_HELP.format(
            what="video (.mp4 .mov .avi .mkv .webm, and frame folders)", ovl="mp4", cmd="track",
            folder_note=("; a folder that itself holds image files is one\n"
                         "              video (a frame folder), as before"),
            share="one video"))
    t.add_argument("video", nargs="?", default=SAMPLE_CLIP, metavar="INPUT",
                   help="mp4 file or folder of <index>.jpg frames (default: the bundled sample clip), or a "
                   "FOLDER of videos, 'GLOB' or @LIST (see below)")
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
    t.add_argument("--overlay", action="store_true",
                   help="batch jobs: also write an overlay MP4 per video (a single video always gets one)")
    args = p.parse_args(argv)
    if args.cmd == "segment":
        return _segment(args)
    if args.cmd == "track":
        return _track(args)
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
