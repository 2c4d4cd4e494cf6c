"""Multi-GPU scaling of the concept video predictor: frames/s at W = 1, 2, 4, 8 ranks.

The same text-prompted session runs at every world size W (public API only):
``build_sam3_video_predictor(checkpoint_path=..., gpus_to_use=[0..W-1])`` (W = 1: the one-process
predictor, the baseline; on CPU ``devices=["cpu"] * W``, gloo), then ``start_session`` on a
synthetic clip, ``add_prompt(text)`` on frame 0, and the ``propagate_in_video`` stream (forward)
timed from its first request to its end (the stream ends after every rank has reported its
status, so the time covers all ranks). Per W: frames/s, ms/frame, objects per frame (min/median/
max of ``len(out_obj_ids)``, and of ``frame_stats["num_obj_tracked"]``, which counts hidden
objects too), speed-up over W = 1 and efficiency (speed-up / W).

Next to every measured row, the scaling model of docs/scaling.md, clearly labelled "model":

    T(W) = D / W + mean_t ceil(N_t / W) * a + c     (N_t = num_obj_tracked on frame t, measured)

with the paper constants D = 20 ms (detector), a = 3.2 ms per object, c = 5 ms (serial rank-0
work), which describe the full-size model in bf16 on one H100/H200-class GPU (``--model-ms``
changes them). A GPU run at ``--config sam3 --dtype bfloat16`` checks them; any other run (tiny
config, CPU) is not what they describe, and the "model / measured" column says how far off it is.

Bytes on the wire per frame (W > 1): "counted" is what rank 0 received, from the predictor's own
per-collective counters (``predictor.model.dist.stats``, bytes received per collective, read
before ``add_prompt`` and after the stream: ``add_prompt`` already gathers the first detector
chunks, so the session's bytes are divided by the clip's frames); "model" is the formula of the
``sam3fast.video.distributed`` docstring at this config (Q queries, g grid, m = 4g, detector
tensors in the model dtype, the last FPN level in bf16; tracker rows in float32 as the code sends
them; n = ceil(N_t / W)). Peak GPU
memory: rank 0's ``torch.cuda.max_memory_allocated`` (the other ranks are other processes), and
for every rank's GPU the peak of NVML's used memory sampled every 50 ms during the timed sessions
(whole device: CUDA context and caching allocator included), when ``nvidia-ml-py`` is installed.

Objects: random weights detect what their recipe makes them detect. The weights are the sam3fast
model re-drawn with ``stable_random_init_`` and a recipe (``RECIPES``): at the tiny config the
"rich" recipe of tests/test_video_parity.py (RICH_SEED), at full size the "video" recipe of
tests/official_video_ref.py (the rich one detected nothing there). On the moving-blob clip of
``tests/video_clip.make_clip`` both keep adding objects over time, so ``--frames`` (and the clip
size) sets how many objects are tracked; ``--det-nms-thresh`` / ``--new-det-thresh`` (heuristics,
passed to every rank's builder) change the count too. The counts reached are reported as
measured. The weights are saved once to a checkpoint that every rank loads (identical weights).
Measured once (H200, sam3 config, bf16, make_clip(32, 540, 960), video recipe): tracked objects
1, 2, 3, ... up to 8 from frame 13 on.

    python bench/bench_scaling.py                      # GPU: sam3 config, bf16, W = 1, 2, 4, 8 up to the GPUs visible
    python bench/bench_scaling.py --frames 96         # longer clip: more objects over time
    python bench/bench_scaling.py --smoke              # CPU (CI): tiny config, W = 1 and 2 on gloo, 8 frames

On a GPU the results go to bench/results/scaling_<config>_<gpus>_<date>.{json,md}. CPU numbers
(``--smoke`` above all: two 1-thread processes on a shared machine) only show that the script
and the distributed path run; they are never performance numbers.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the synthetic clip lives with the tests
sys.path.insert(0, HERE)

from bench_image import machine_header as _one_device_header  # noqa: E402

# docs/scaling.md: detector D, per-object a, serial remainder c (ms; full size, bf16, H100/H200)
PAPER_MS = (20.0, 3.2, 5.0)
# Weight recipes for stable_random_init_ plus three knobs (tests/official_video_ref.video_weights_):
# "rich" is tests/test_video_parity.py's RICH_SEED recipe (many objects at the tiny config; at full
# size it detected none on make_clip(32, 540, 960): H200, 2026-11-25); "video" is VIDEO_RECIPE of
# tests/official_video_ref.py with the object-score shift of bench_video (one more tracked object per
# frame up to 8 at full size on that clip, same run). "auto": rich for tiny, video otherwise.
RECIPES = {
    "rich": dict(seed=29, score_gain=10.0, presence_shift=6.0, obj_shift=5.0, pos_embed_scale=1.0, mask_sign=1.0),
    "video": dict(seed=20, score_gain=6.0, presence_shift=3.0, obj_shift=5.0, pos_embed_scale=0.1, mask_sign=-1.0),
}
OBJ_SCORE_BIAS = "tracker.sam_mask_decoder.pred_obj_score_head.layers.2.bias"
COUNTED = ("detector outputs", "tracker masks and scores")


# ----------------------------------------------------------------------------------------------
# Machine, weights, clip


def machine_header(device, worlds):
    """bench_image's header for rank 0's device, plus every visible GPU by name and, with several
    GPUs, ``nvidia-smi topo -m`` (NVLink or PCIe decides what the bytes on the wire cost)."""
    h = _one_device_header(device)
    h["cpu_count"] = os.cpu_count()
    if device.type == "cuda":
        n = torch.cuda.device_count()
        h["gpus"] = [f"cuda:{i} {torch.cuda.get_device_name(i)} "
                     f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)" for i in range(n)]
        h["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version()) if hasattr(torch.cuda, "nccl") else None
        if n > 1:
            try:
                h["topology"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                               timeout=20).stdout.strip()
            except Exception as e:  # noqa: BLE001 - the header says why it is missing
                h["topology"] = f"unavailable ({type(e).__name__})"
    h["world_sizes"] = worlds
    return h


def recipe_checkpoint(cfg, path, recipe):
    """The sam3fast video model (random weights) re-drawn with ``recipe``, saved as a sam3.pt-style
    file: every rank loads the same file, so every rank holds the same weights."""
    import sam3fast
    from sam3fast.model.init import stable_random_init_

    model = sam3fast.build_sam3_video_model(load_from_HF=False, config=cfg, device="cpu")
    stable_random_init_(model, seed=recipe["seed"], score_gain=recipe["score_gain"],
                        presence_shift=recipe["presence_shift"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == OBJ_SCORE_BIAS:
                p.add_(recipe["obj_shift"])  # tracked objects stay present
            elif name.endswith("vision_backbone.trunk.pos_embed"):
                p.mul_(recipe["pos_embed_scale"])  # < 1: masks follow the image, not the position table
            elif name.startswith("detector.segmentation_head.instance_seg_head."):
                p.mul_(recipe["mask_sign"])  # -1: every query mask becomes its complement
    torch.save({"model": model.state_dict()}, path)
    del model
    return path


# ----------------------------------------------------------------------------------------------
# Measuring


class MemorySampler:
    """Peak NVML used memory of each listed GPU (whole device, any process), sampled from a thread.
    ``peaks`` is None where NVML cannot be read (no ``nvidia-ml-py``)."""

    def __init__(self, indices, interval_s=0.05):
        self.indices, self.interval_s = list(indices), interval_s
        self.peaks = None
        try:
            self.peaks = [torch.cuda.device_memory_used(i) for i in self.indices]
        except Exception as e:  # noqa: BLE001
            self.why = f"{type(e).__name__}: {e}"[:120]
        self._stop = threading.Event()
        self._th = None

    def __enter__(self):
        if self.peaks is not None:
            self._th = threading.Thread(target=self._run, daemon=True, name="bench-scaling-nvml")
            self._th.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval_s):
            for k, i in enumerate(self.indices):
                self.peaks[k] = max(self.peaks[k], torch.cuda.device_memory_used(i))

    def __exit__(self, *exc):
        self._stop.set()
        if self._th is not None:
            self._th.join(timeout=5)


def counters(predictor):
    """Bytes received so far by rank 0, per collective (``predictor.model.dist.stats``); None
    with one process (no collectives)."""
    dist = getattr(predictor.model, "dist", None)
    stats = getattr(dist, "stats", None)
    return None if stats is None else dict(stats)


def one_session(predictor, clip, prompt, device):
    """start_session, add_prompt(text) on frame 0, the forward stream (timed), close_session."""
    sid = predictor.handle_request({"type": "start_session", "resource_path": clip})["session_id"]
    before = counters(predictor)  # bytes: the whole session (add_prompt gathers the first chunks)
    first = predictor.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 0, "text": prompt})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    shown, tracked = [], []
    t0 = time.perf_counter()
    for r in predictor.handle_stream_request({"type": "propagate_in_video", "session_id": sid,
                                              "propagation_direction": "forward"}):
        out = r["outputs"]
        shown.append(len(out["out_obj_ids"]))
        fs = out.get("frame_stats") or {}
        tracked.append(int(fs["num_obj_tracked"]) if "num_obj_tracked" in fs else len(out["out_obj_ids"]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    after = counters(predictor)
    predictor.handle_request({"type": "close_session", "session_id": sid})
    moved = None if after is None else {k: after.get(k, 0) - (before or {}).get(k, 0) for k in after}
    return {"frames": len(shown), "seconds": dt, "shown": shown, "tracked": tracked, "bytes": moved,
            "prompt_objects": len(first["outputs"]["out_obj_ids"])}


def build(ckpt, cfg, dtype, devs, timeout_s, overrides):
    import sam3fast

    kw = dict(checkpoint_path=ckpt, config=cfg, load_from_HF=False, dtype=dtype, **overrides)
    if len(devs) == 1:
        pred = sam3fast.build_sam3_video_predictor(device=devs[0], **kw)
    else:
        pred = sam3fast.build_sam3_video_predictor(devices=devs, collective_timeout_s=timeout_s, **kw)
    pred.model.progress = False  # rank 0's progress bar only (display, no effect on the work)
    return pred


def measure(W, devs, args, ckpt, cfg, clip, overrides):
    device = torch.device(devs[0])
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    pred = build(ckpt, cfg, args.dtype, devs, args.collective_timeout, overrides)
    build_s = time.perf_counter() - t0
    try:
        for _ in range(args.warmup):
            one_session(pred, clip, args.prompt, device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sampler = MemorySampler([torch.device(d).index for d in devs]) if cuda else None
        with sampler or _null():
            runs = [one_session(pred, clip, args.prompt, device) for _ in range(args.iters)]
    finally:
        pred.shutdown()
        del pred
        if cuda:
            torch.cuda.empty_cache()
    last = runs[-1]
    sec = float(np.median([r["seconds"] for r in runs]))
    row = {"W": W, "devices": [str(d) for d in devs], "build_s": build_s, "frames": last["frames"], "seconds": sec,
           "fps": last["frames"] / sec, "ms_per_frame": 1e3 * sec / last["frames"],
           "shown_per_frame": last["shown"], "tracked_per_frame": last["tracked"],
           "prompt_objects": last["prompt_objects"],
           "runs_identical_counts": all(r["shown"] == last["shown"] and r["tracked"] == last["tracked"] for r in runs)}
    if last["bytes"] is not None:
        row["counted_bytes_per_frame"] = {k: v / last["frames"] for k, v in last["bytes"].items()}
    if cuda:
        row["rank0_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if sampler.peaks is not None:
            row["nvml_peak_used_gib"] = [p / 2**30 for p in sampler.peaks]
        else:
            row["nvml_unavailable"] = sampler.why
    return row


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------------------------
# The model of docs/scaling.md and of the distributed.py docstring


def model_ms(W, tracked, D, a, c):
    """docs/scaling.md: D / W + mean_t ceil(N_t / W) * a + c (ms per frame)."""
    return D / W + float(np.mean([math.ceil(n / W) for n in tracked])) * a + c


def model_bytes(W, tracked, cfg, dtype):
    """The distributed.py docstring's bytes received per rank per frame, at this config."""
    Q, g, d = cfg.num_queries, cfg.feat_size, cfg.d_model
    m = 4 * g
    s = torch.empty((), dtype=dtype).element_size()
    det_frame = Q * 9 * s + Q * m * m * s + (d // 8) * m * m * s + (d // 4) * (m // 2) ** 2 * s + d * g * g * 2
    trk = float(np.mean([(W - 1) * math.ceil(n / W) * (m * m + 1) * 4 for n in tracked]))
    plan = 8 * (7 + W + 5 * Q + 64 * math.ceil(max(max(tracked, default=0), 1) / 64))
    return {"detector outputs": (W - 1) / W * det_frame, "tracker masks and scores": trk,
            "update plan (ranks > 0)": plan}


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny config, W = 1 and 2 on gloo, 8 frames, 1 iteration")
    ap.add_argument("--config", default="sam3", help="sam3 (real shapes, random weights) or tiny")
    ap.add_argument("--device", default=None, help="cuda (one rank per GPU) or cpu (gloo); default: cuda if available")
    ap.add_argument("--worlds", default="1,2,4,8", help="world sizes; on CUDA those above the visible GPUs are skipped")
    ap.add_argument("--dtype", default=None, help="model dtype (default bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--frames", type=int, default=48, help="clip length (more frames: more objects over time)")
    ap.add_argument("--height", type=int, default=540)
    ap.add_argument("--width", type=int, default=960)
    ap.add_argument("--clip-seed", type=int, default=0, help="video_clip.make_clip seed")
    ap.add_argument("--prompt", default="blob")
    ap.add_argument("--recipe", choices=("auto", "rich", "video"), default="auto",
                    help="random-weight recipe (auto: rich for tiny, video otherwise); the knobs below override it")
    ap.add_argument("--weights-seed", type=int, default=None)
    ap.add_argument("--score-gain", type=float, default=None, help="detector score gain")
    ap.add_argument("--presence-shift", type=float, default=None, help="presence-logit shift")
    ap.add_argument("--obj-shift", type=float, default=None, help="tracker object-score shift (> 0 keeps objects)")
    ap.add_argument("--pos-embed-scale", type=float, default=None, help="ViT position-table scale")
    ap.add_argument("--mask-sign", type=float, default=None, help="-1 flips the query masks")
    ap.add_argument("--det-nms-thresh", type=float, default=None,
                    help="heuristic override on every rank (official 0.1)")
    ap.add_argument("--new-det-thresh", type=float, default=None,
                    help="heuristic override on every rank (official 0.7)")
    ap.add_argument("--iters", type=int, default=3, help="timed sessions per W (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed sessions per W")
    ap.add_argument("--collective-timeout", type=float, default=600.0, help="seconds, every collective")
    ap.add_argument("--model-ms", default=",".join(f"{x:g}" for x in PAPER_MS),
                    help="D,a,c of docs/scaling.md in ms (default: the paper constants)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.config, args.device, args.worlds, args.frames = "tiny", "cpu", "1,2", 8
        args.height, args.width, args.iters, args.warmup = 72, 96, 1, 0
    threads = torch.get_num_threads()
    if args.smoke or args.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny tensors; the workers copy this, so W processes use W cores
    try:
        with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:  # clip + checkpoint (3.4 GB at full size)
            return _main(args, tmp)
    finally:
        torch.set_num_threads(threads)


def _main(args, tmp):
    global LAST_RESULTS  # the smoke test reads the rows from the runpy namespace
    import sam3fast
    from video_clip import make_clip, write_jpg_folder

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    dtype = getattr(torch, args.dtype)
    cfg = sam3fast.get_config(args.config)
    D, a, c = (float(x) for x in args.model_ms.split(","))
    worlds = [int(w) for w in args.worlds.split(",")]
    skipped = []
    if cuda:
        n_gpu = torch.cuda.device_count()
        skipped = [w for w in worlds if w > n_gpu]
        worlds = [w for w in worlds if w <= n_gpu]
    overrides = {k: v for k, v in (("det_nms_thresh", args.det_nms_thresh), ("new_det_thresh", args.new_det_thresh))
                 if v is not None}
    name = args.recipe if args.recipe != "auto" else ("rich" if args.config == "tiny" else "video")
    knobs = dict(seed=args.weights_seed, score_gain=args.score_gain, presence_shift=args.presence_shift,
                 obj_shift=args.obj_shift, pos_embed_scale=args.pos_embed_scale, mask_sign=args.mask_sign)
    recipe = {**RECIPES[name], **{k: v for k, v in knobs.items() if v is not None}}

    header = machine_header(device, worlds)
    t0 = time.perf_counter()
    frames = make_clip(args.frames, args.height, args.width, args.clip_seed)
    clip = write_jpg_folder(frames, os.path.join(tmp, "frames"))
    ckpt = recipe_checkpoint(cfg, os.path.join(tmp, "sam3.pt"), recipe)
    results = {"machine": header, "config": args.config, "dtype": args.dtype, "date": datetime.date.today().isoformat(),
               "clip": f"video_clip.make_clip({args.frames}, {args.height}, {args.width}, seed={args.clip_seed}) "
                       "as a JPEG folder",
               "weights": {"recipe": name, **recipe}, "overrides": overrides, "prompt": args.prompt,
               "model_ms": {"D": D, "a": a, "c": c,
                            "source": "docs/scaling.md paper constants" if (D, a, c) == PAPER_MS else "--model-ms"},
               "skipped_world_sizes": skipped, "smoke": args.smoke, "rows": []}
    print(f"# multi-GPU scaling benchmark: config {args.config}, {args.dtype}, W = {worlds}")
    for k, v in header.items():
        text = str(v)
        print(f"# {k}: " + ("\n#   " + text.replace("\n", "\n#   ") if "\n" in text else text))
    print(f"# clip + weights ready in {time.perf_counter() - t0:.1f} s; weights {name} {recipe}, "
          f"overrides {overrides or 'none'}")
    if skipped:
        print(f"# skipped W = {skipped}: only {torch.cuda.device_count()} GPU(s) visible")
    if not cuda or args.smoke:
        print("# CPU run: these numbers only show that the script and the gloo path run; "
              "they are NOT performance numbers")

    rows = results["rows"]
    for W in worlds:
        devs = [f"cuda:{i}" for i in range(W)] if cuda else ["cpu"] * W
        try:
            row = measure(W, devs, args, ckpt, cfg, clip, overrides)
        except Exception as e:  # noqa: BLE001 - a GPU run records the failing W and goes on
            if args.smoke:
                raise
            row = {"W": W, "devices": devs, "error": f"{type(e).__name__}: {e}"[:600]}
        if "fps" in row:
            row["model_ms_per_frame"] = model_ms(W, row["tracked_per_frame"], D, a, c)
            row["model_fps"] = 1e3 / row["model_ms_per_frame"]
            if W > 1:
                row["model_bytes_per_frame"] = model_bytes(W, row["tracked_per_frame"], cfg, dtype)
        rows.append(row)
        print(f"W={W} ->", f"ERROR {row['error']}" if "error" in row else
              f"{row['fps']:.2f} frames/s ({row['ms_per_frame']:.1f} ms/frame); model {row['model_ms_per_frame']:.1f} "
              f"ms/frame; objects shown/tracked per frame (max) {max(row['shown_per_frame'], default=0)}/"
              f"{max(row['tracked_per_frame'], default=0)}", flush=True)

    base = next((r for r in rows if r["W"] == 1 and "fps" in r), None)
    for r in rows:
        if base is not None and "fps" in r:
            r["speedup"] = r["fps"] / base["fps"]
            r["efficiency"] = r["speedup"] / r["W"]
            r["model_speedup"] = base["model_ms_per_frame"] / r["model_ms_per_frame"]
            r["same_object_counts_as_W1"] = (r["shown_per_frame"] == base["shown_per_frame"]
                                             and r["tracked_per_frame"] == base["tracked_per_frame"])
    table = format_table(results)
    print(table)
    if cuda and not args.smoke:
        from _common import write_json_and_text

        gpu = header.get("gpu", "gpu").replace(" ", "_")
        write_json_and_text(os.path.join(args.out, f"scaling_{args.config}_{torch.cuda.device_count()}x{gpu}_"
                                                   f"{results['date']}"), results, table)
    LAST_RESULTS = results
    return results


def _mm(xs):
    return "-" if not xs else f"{min(xs)}/{float(np.median(xs)):g}/{max(xs)}"


def format_table(results):
    m = results["machine"]
    mod = results["model_ms"]
    lines = [
        f"# multi-GPU scaling benchmark: config {results['config']}, {results['dtype']}, "
        f"{m.get('gpu', m['device'])}, torch {m['torch']}, {results['date']}",
        "",
        f"GPUs: {m.get('gpus', 'none (CPU, gloo)')}",
        f"clip: {results['clip']}; weights: {results['weights']}; overrides: {results['overrides'] or 'none'}; "
        f"prompt {results['prompt']!r}",
        "frames/s = frames yielded / seconds of the whole forward propagate_in_video stream (median of timed "
        "sessions; detector every frame); objects/frame = min/median/max over frames of len(out_obj_ids) (shown) "
        "and frame_stats num_obj_tracked (tracked); speed-up and efficiency against W = 1 (one process).",
        f"model = docs/scaling.md T(W) = D/W + mean ceil(N_t/W)*a + c with D = {mod['D']:g}, a = {mod['a']:g}, "
        f"c = {mod['c']:g} ms ({mod['source']}; full size, bf16, one H100/H200-class GPU): a prediction, not a "
        "measurement.",
    ]
    if results["smoke"] or m.get("gpu") is None:
        lines.append("CPU run: NOT performance numbers (they only show that the script and the gloo path run).")
    lines += ["",
              "| W | frames | frames/s | ms/frame | model ms/frame | model / measured | speed-up | model speed-up | "
              "efficiency | objects shown | objects tracked | same counts as W=1 | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['W']} | | | | | | | | | | | | {r['error'][:200]} |")
            continue
        cells = [r["W"], r["frames"], f"{r['fps']:.2f}", f"{r['ms_per_frame']:.1f}", f"{r['model_ms_per_frame']:.1f}",
                 f"{r['model_ms_per_frame'] / r['ms_per_frame']:.2f}",
                 f"{r['speedup']:.2f}x" if "speedup" in r else "",
                 f"{r['model_speedup']:.2f}x" if "speedup" in r else "",
                 f"{r['efficiency']:.0%}" if "efficiency" in r else "",
                 _mm(r["shown_per_frame"]), _mm(r["tracked_per_frame"]),
                 {True: "yes", False: "NO"}.get(r.get("same_object_counts_as_W1"), ""),
                 "" if r["runs_identical_counts"] else "object counts differ between timed sessions"]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    multi = [r for r in results["rows"] if "counted_bytes_per_frame" in r or "model_bytes_per_frame" in r]
    if multi:
        lines += ["", "Bytes received per rank per frame (counted: rank 0's per-collective counters, "
                      "predictor.model.dist.stats; model: the sam3fast.video.distributed docstring formula at this "
                      "config; the plan broadcast is sent by rank 0, so only ranks > 0 receive it)", "",
                  "| W | detector counted | detector model | tracker counted | tracker model | "
                  "plan model (ranks > 0) |",
                  "|---|---|---|---|---|---|"]
        for r in multi:
            cnt, mdl = r.get("counted_bytes_per_frame", {}), r.get("model_bytes_per_frame", {})
            lines.append("| " + " | ".join([str(r["W"])] + [_bytes(d.get(k)) for k in COUNTED for d in (cnt, mdl)]
                                           + [_bytes(mdl.get("update plan (ranks > 0)"))]) + " |")
    mem = [r for r in results["rows"] if "rank0_peak_allocated_gib" in r]
    if mem:
        lines += ["", "GPU memory (rank 0: torch max_memory_allocated; every rank's GPU: peak NVML used memory "
                      "sampled every 50 ms, whole device)", "",
                  "| W | rank 0 peak allocated GiB | NVML peak used GiB per rank |", "|---|---|---|"]
        for r in mem:
            nv = r.get("nvml_peak_used_gib")
            lines.append(f"| {r['W']} | {r['rank0_peak_allocated_gib']:.2f} | "
                         f"{' / '.join(f'{x:.1f}' for x in nv) if nv else 'n/a: ' + r.get('nvml_unavailable', '')} |")
    return "\n".join(lines)


def _bytes(x):
    if x is None:
        return "-"
    for unit, k in (("MB", 1e6), ("KB", 1e3)):
        if x >= k:
            return f"{x / k:.2f} {unit}"
    return f"{x:.0f} B"


if __name__ == "__main__":
    main()
