"""Where the time goes, by stage and by kernel: ``torch.profiler`` over sam3fast's eager paths.

Each stage of the model is wrapped in a ``record_function`` range (forward pre/post hooks on the
modules named below, no change to the model), then a few steady-state calls run under
``torch.profiler.profile`` with CPU and CUDA activities. Three tables per part (``attribute``: each
kernel counted once, in the innermost stage range around the op that launched it):

* by stage: device (GPU) time of the kernels launched inside each range, per call / per frame,
  the range's span on the GPU timeline and its host (CPU) time; a stage whose host time exceeds
  its device time is launch-bound (the case CUDA graphs fix);
* the kernels with the most device time;
* each stage's largest kernels (where a float32 island's GEMMs, or the trunk's attention, sit).

Parts (sam3fast's own model, full-size ``sam3`` config, random weights drawn with the tests' video
recipe so that clicked objects stay tracked; speed does not depend on weight values):

* ``image``: ``ImagePredictor.predict`` at batch 1, one text prompt, eager (no CUDA graphs);
* ``tracker``: the SAM 2-style tracker, N clicked objects on frame 0, ``propagate_in_video``;
* ``concept``: the drop-in video predictor with a text prompt, ``propagate_in_video``.

    python bench/profile_gpu.py                                  # GPU: image, tracker N = 1, 16, concept
    python bench/profile_gpu.py --parts tracker --objects 4 --frames 12
    python bench/profile_gpu.py --smoke                          # CPU, tiny config (CI keeps it alive)

On a GPU the tables go to bench/results/profile_<part>_<gpu>_<date>.md; this is the first look
before Nsight Systems (``SAM3FAST_NVTX=1 nsys profile ...``, README).
"""

from __future__ import annotations

import argparse
import time
import datetime
import os
import sys
import tempfile

import numpy as np
import torch
from torch.autograd import DeviceType

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # video_clip
sys.path.insert(0, HERE)

from bench_image import machine_header  # noqa: E402

# Stage name -> dotted module path, per model. Paths that a config lacks are skipped.
IMAGE_STAGES = {
    "vit_trunk": "backbone.vision_backbone.trunk",
    "fpn_neck": "backbone.vision_backbone.convs",
    "text_encoder": "backbone.language_backbone",
    "geometry_encoder": "geometry_encoder",
    "fusion_encoder": "transformer.encoder",
    "detr_decoder": "transformer.decoder",
    "segmentation_head": "segmentation_head",
    "scoring": "dot_prod_scoring",
}

# --tracker-variants: name -> what the section title adds
TRACKER_VARIANTS = {
    "default": "",
    "perframe": ", tracker.fixed_capacity_step = False",
    "ungraphed": ", CUDA graphs off, two-way kernels as in a capture (the graphed step's kernels, eagerly)",
}
# the tracker's CUDA-graph switches the "ungraphed" variant turns off
GRAPH_SWITCHES = ("cuda_graphs", "backbone_cuda_graphs", "memory_encoder_cuda_graphs")

TRACKER_STAGES = {
    "memory_attention": "transformer.encoder",
    "mask_decoder": "sam_mask_decoder",
    "prompt_encoder": "sam_prompt_encoder",
    "memory_encoder": "maskmem_backbone",
    "obj_ptr_proj": "obj_ptr_proj",
}


def _module(root, path):
    m = root
    for part in path.split("."):
        if not hasattr(m, part):
            return None
        m = getattr(m, part)
    return m


def hook_stages(pairs):
    """Wrap each (name, module) forward in a ``record_function(name)`` range; returns a remover."""
    handles = []
    for name, mod in pairs:
        if mod is None:
            continue
        stack = []

        def pre(_m, _a, name=name, stack=stack):
            rf = torch.autograd.profiler.record_function("stage::" + name)
            rf.__enter__()
            stack.append(rf)

        def post(_m, _a, _o, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return lambda: [h.remove() for h in handles]


OUTSIDE = "(outside the stages)"


def _stage_of(evt):
    """The innermost ``stage::`` range around a CPU event (the event itself included), else OUTSIDE."""
    while evt is not None:
        if evt.name.startswith("stage::"):
            return evt.name[7:]
        evt = evt.cpu_parent
    return OUTSIDE


def attribute(events):
    """Device time by stage and by kernel from the profiler's events (``prof.events()``).

    Every kernel is counted once, where the profiler links it: to the CPU event that launched it
    (its innermost op, or the innermost range when no op was open), whose ``kernels`` list it is in;
    its stage is the innermost ``stage::`` range around that event. (``key_averages()`` lists both an
    op, with its kernels' time as its own device time, and each kernel: summing its rows counts the
    time twice, which the tables of this script did before 2026-11-27's fix.)
    Returns {"kernels": {name: [launches, us]}, "stages": {stage: {name: [launches, us]}},
    "host": {stage: [calls, us]} (the CPU ranges), "span": {stage: us} (the GPU-side ranges, from the
    first kernel's start to the last one's end, idle gaps included), "sites": {stage: {kernel:
    {launching op and its input shapes: [launches, us]}}} (the shapes where the profile recorded
    them: ``record_shapes``)}."""
    kernels, stages, host, span, sites = {}, {}, {}, {}, {}
    for e in events:
        cpu = e.device_type == DeviceType.CPU
        if e.name.startswith("stage::"):
            us = e.time_range.end - e.time_range.start
            if cpu:
                h = host.setdefault(e.name[7:], [0, 0.0])
                h[0] += 1
                h[1] += us
            else:
                span[e.name[7:]] = span.get(e.name[7:], 0.0) + us
        if not cpu or e.is_async or not e.kernels:
            continue
        stage = _stage_of(e)
        per_stage = stages.setdefault(stage, {})
        site = e.name + _shapes(e)
        for k in e.kernels:
            for table in (kernels, per_stage):
                row = table.setdefault(k.name, [0, 0.0])
                row[0] += 1
                row[1] += k.duration
            row = sites.setdefault(stage, {}).setdefault(k.name, {}).setdefault(site, [0, 0.0])
            row[0] += 1
            row[1] += k.duration
    return {"kernels": kernels, "stages": stages, "host": host, "span": span, "sites": sites}


def _shapes(evt, limit=70):
    """`` [(a, b), (c,)]``: the event's recorded input shapes (empty ones dropped), or ''."""
    shapes = [tuple(s) for s in (getattr(evt, "input_shapes", None) or []) if s]
    if not shapes:
        return ""
    text = " " + ", ".join("x".join(str(d) for d in s) for s in shapes)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(name, n=90):
    return name if len(name) <= n else name[: n - 3] + "..."


def profile(fn, calls, per, cuda, label, top=30, top_per_stage=6):
    """Run ``fn`` ``calls`` times under the profiler; tables normalised per ``per`` units (calls or
    frames). Returns (markdown lines, summary dict)."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    a = attribute(prof.events())
    n = per[1]
    unit = per[0]
    stage_us = {st: sum(v[1] for v in ks.values()) for st, ks in a["stages"].items()}
    total_us = sum(v[1] for v in a["kernels"].values())
    names = sorted(set(stage_us) | set(a["host"]), key=lambda st: -stage_us.get(st, 0.0))
    lines = [f"## {label}", "",
             f"{calls} profiled calls; times per {unit} ({n} {unit}s in all). Device time of all kernels "
             f"(each counted once): {total_us / 1e3 / n:.2f} ms per {unit}.", "",
             "Kernel ms: the kernels launched inside the stage's range; GPU span: the range on the GPU "
             "timeline (idle gaps included); host ms: the range on the CPU. A stage whose host time is "
             "over its kernel time is launch-bound (the case CUDA graphs fix).", "",
             f"| stage | calls per {unit} | kernel ms per {unit} | GPU span ms per {unit} | host ms per {unit} | "
             f"share of kernel time |",
             "|---|---:|---:|---:|---:|---:|"]
    for st in names:
        calls_st, host_us = a["host"].get(st, [0, 0.0])
        dev = stage_us.get(st, 0.0)
        span = a["span"].get(st)
        lines.append(f"| {st} | {calls_st / n:.2f} | {dev / 1e3 / n:.3f} | "
                     f"{'' if span is None else f'{span / 1e3 / n:.3f}'} | {host_us / 1e3 / n:.3f} | "
                     f"{100 * dev / max(total_us, 1e-9):.1f} % |")
    ranked = sorted(a["kernels"].items(), key=lambda kv: -kv[1][1])
    lines += ["", f"| kernel (top {top} by device time) | launches per {unit} | device ms per {unit} | share |",
              "|---|---:|---:|---:|"]
    for key, (count, dev) in ranked[:top]:
        lines.append(f"| `{_short(key)}` | {count / n:.1f} | {dev / 1e3 / n:.3f} | "
                     f"{100 * dev / max(total_us, 1e-9):.1f} % |")
    lines += ["", f"| stage | kernel (top {top_per_stage} of the stage) | its main launch site (op, input shapes) | "
              f"launches per {unit} | device ms per {unit} | share of the stage |", "|---|---|---|---:|---:|---:|"]
    for st in names:
        ks = sorted(a["stages"].get(st, {}).items(), key=lambda kv: -kv[1][1])[:top_per_stage]
        for key, (count, dev) in ks:
            where = sorted(a["sites"][st][key].items(), key=lambda kv: -kv[1][1])
            site = where[0][0] + (f" (+{len(where) - 1} more)" if len(where) > 1 else "")
            lines.append(f"| {st} | `{_short(key, 70)}` | `{site}` | {count / n:.1f} | {dev / 1e3 / n:.3f} | "
                         f"{100 * dev / max(stage_us[st], 1e-9):.1f} % |")
    summary = {"label": label, "per": unit, "kernel_ms": total_us / 1e3 / n,
               "stages": {st: {"device_ms": stage_us.get(st, 0.0) / 1e3 / n,
                               "gpu_span_ms": a["span"].get(st, 0.0) / 1e3 / n,
                               "host_ms": a["host"].get(st, [0, 0.0])[1] / 1e3 / n,
                               "calls": a["host"].get(st, [0, 0.0])[0] / n} for st in names}}
    return lines + [""], summary


def host_profile(session, pred, cuda, frames, top=30):
    """The concept loop as it runs by default (detector graphed on CUDA), under cProfile: where the
    host's time per frame goes, waits on the device (event/stream synchronize, ``.item()``,
    ``.cpu()``) included. Markdown lines: wall ms per frame, then the top functions by cumulative
    and by own time."""
    import cProfile
    import io
    import pstats

    pred.model.detector.cuda_graphs = True
    session()  # warm-up: captures the detector graph
    if cuda:
        torch.cuda.synchronize()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    session()
    prof.disable()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    lines = ["", "## concept video, host side (cProfile, detector graphed)", "",
             f"Whole session (start, prompt, {frames} frames, close): {wall * 1e3:.1f} ms, "
             f"{wall * 1e3 / frames:.1f} ms per frame (cProfile overhead included).", ""]
    for key, title in (("cumulative", "cumulative"), ("tottime", "own time")):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(top)
        lines += [f"Top {top} by {title}:", "", "```"] + [ln for ln in buf.getvalue().splitlines() if ln.strip()]
        lines += ["```", ""]
    return lines


def _video_weights(cfg):
    import sam3fast
    from sam3fast.model.init import stable_random_init_

    model = sam3fast.build_sam3_video_model(config=cfg, device="cpu", load_from_HF=False)
    stable_random_init_(model, seed=20, score_gain=6.0, presence_shift=3.0)  # the tests' video recipe
    with torch.no_grad():
        model.tracker.sam_mask_decoder.pred_obj_score_head.layers[2].bias.add_(5.0)  # clicked objects stay
    return model.state_dict()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU, 2 frames, one call per part")
    ap.add_argument("--config", default="sam3")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--parts", default="image,tracker,concept")
    ap.add_argument("--objects", default="1,16", help="tracker part: clicked objects, comma-separated")
    ap.add_argument("--tracker-variants", default="default",
                    help="tracker part, comma-separated: default (the fixed-capacity bank), perframe "
                         "(tracker.fixed_capacity_step = False: the official per-frame memory selection) and/or "
                         "ungraphed (the default path with the tracker's CUDA graphs off and the mask decoder's "
                         "two-way kernels on as inside a capture: the kernels a graphed step replays, each in "
                         "the kernel table, plus the launch gaps a graph removes)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--calls", type=int, default=5, help="image part: profiled calls")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.config, args.device, args.dtype, args.frames, args.calls, args.objects = "tiny", "cpu", "float32", 3, 1, "1"
    import sam3fast
    from sam3fast.model import sam_heads
    from video_clip import make_clip, write_jpg_folder

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = args.dtype
    cfg = sam3fast.get_config(args.config)
    parts = args.parts.split(",")
    header = machine_header(device)
    date = datetime.date.today().isoformat()
    out = {}

    def write(part, lines):
        text = "\n".join([f"# profile: {part}, config {args.config}, {dtype}, "
                          f"{header.get('gpu', header['device'])}, torch {header['torch']}, {date}", ""] + lines)
        print(text, flush=True)
        if cuda and not args.smoke:
            os.makedirs(args.out, exist_ok=True)
            gpu = header.get("gpu", "gpu").replace(" ", "_")
            path = os.path.join(args.out, f"profile_{part}_{args.config}_{gpu}_{date}.md")
            with open(path, "w") as f:
                f.write(text + "\n")
            print("wrote", path)

    ctx = torch.autocast("cuda", enabled=False) if cuda else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), ctx:
        if "image" in parts:
            model = sam3fast.build_image_model(cfg, device=device, dtype=dtype)
            pred = sam3fast.ImagePredictor(model, cuda_graphs=False)
            rng = np.random.default_rng(0)
            image = rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)
            for _ in range(1 if args.smoke else 3):
                pred.predict([image], ["yellow bird"])  # warm-up (cuDNN/Triton autotune, caches)
            remove = hook_stages([(n, _module(model, p)) for n, p in IMAGE_STAGES.items()])
            try:
                lines, out["image"] = profile(lambda: pred.predict([image], ["yellow bird"]), args.calls,
                                              ("call", args.calls), cuda, "image: ImagePredictor.predict, batch 1, "
                                              "one text prompt, eager")
            finally:
                remove()
            write("image", lines)
            del model, pred
            if cuda:
                torch.cuda.empty_cache()

        if "tracker" in parts or "concept" in parts:
            weights = _video_weights(cfg)
            with tempfile.TemporaryDirectory(prefix="profile_gpu_") as tmp:
                clip = write_jpg_folder(make_clip(args.frames, 540 if not args.smoke else 72,
                                                  960 if not args.smoke else 96), os.path.join(tmp, "frames"))
                if "tracker" in parts:
                    from bench_video import click_objects

                    model = sam3fast.build_sam3_video_model(config=cfg, device=device, dtype=dtype,
                                                            load_from_HF=False)
                    model.load_state_dict(weights)
                    tracker = model.tracker
                    tracker.backbone = model.detector.backbone
                    lines = []
                    variants = args.tracker_variants.split(",")
                    unknown = set(variants) - set(TRACKER_VARIANTS)
                    if unknown:
                        raise SystemExit(f"--tracker-variants: unknown {sorted(unknown)} ({', '.join(TRACKER_VARIANTS)})")
                    fixed_default = tracker.fixed_capacity_step
                    graph_switches = {k: getattr(tracker, k) for k in GRAPH_SWITCHES}
                    eager_min = sam_heads.EAGER_KERNEL_MIN_BATCH
                    for n, variant in [(int(x), v) for x in args.objects.split(",") for v in variants]:
                        tracker.fixed_capacity_step = False if variant == "perframe" else fixed_default
                        ungraphed = variant == "ungraphed"
                        for k, v in graph_switches.items():
                            setattr(tracker, k, False if ungraphed else v)
                        sam_heads.EAGER_KERNEL_MIN_BATCH = 1 if ungraphed else eager_min
                        def session(n=n):
                            st = tracker.init_state(video_path=clip)
                            click_objects(tracker, st, n)
                            for _ in tracker.propagate_in_video(st, start_frame_idx=0,
                                                                max_frame_num_to_track=args.frames - 1,
                                                                reverse=False, tqdm_disable=True,
                                                                propagate_preflight=True):
                                pass

                        session()  # warm-up
                        stages = [(n_, _module(tracker, p)) for n_, p in TRACKER_STAGES.items()]
                        stages.append(("vit_trunk", model.detector.backbone.vision_backbone.trunk))
                        remove = hook_stages(stages)
                        try:
                            key = f"tracker_{n}" + ("" if variant == "default" else f"_{variant}")
                            part_lines, out[key] = profile(
                                session, 1, ("frame", args.frames), cuda,
                                f"tracker: {n} clicked object(s), {args.frames} frames of 540 x 960 (backbone included)"
                                + TRACKER_VARIANTS[variant])
                        finally:
                            remove()
                        lines += part_lines
                    tracker.fixed_capacity_step = fixed_default
                    for k, v in graph_switches.items():
                        setattr(tracker, k, v)
                    sam_heads.EAGER_KERNEL_MIN_BATCH = eager_min
                    write("tracker", lines)
                    del model, tracker
                    if cuda:
                        torch.cuda.empty_cache()

                if "concept" in parts:
                    pred = sam3fast.build_sam3_video_predictor(config=cfg, device=device, dtype=dtype,
                                                               load_from_HF=False)
                    pred.model.load_state_dict(weights)
                    pred.model.detector.cuda_graphs = False  # eager, so that its stages show their kernels

                    def concept_session():
                        sid = pred.handle_request({"type": "start_session", "resource_path": clip})["session_id"]
                        pred.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 0,
                                             "text": "blob"})
                        counts = [len(r["outputs"]["out_obj_ids"]) for r in pred.handle_stream_request(
                            {"type": "propagate_in_video", "session_id": sid})]
                        pred.handle_request({"type": "close_session", "session_id": sid})
                        return counts

                    concept_session()  # warm-up (graph capture, autotune)
                    det, trk = pred.model.detector, pred.model.tracker
                    stages = [("detector_" + n_, _module(det, p)) for n_, p in IMAGE_STAGES.items()]
                    stages += [("tracker_" + n_, _module(trk, p)) for n_, p in TRACKER_STAGES.items()]
                    remove = hook_stages(stages)
                    counts = []
                    try:
                        lines, out["concept"] = profile(lambda: counts.extend(concept_session()), 1,
                                                        ("frame", args.frames), cuda,
                                                        f"concept video: text prompt, {args.frames} frames of "
                                                        f"540 x 960")
                    finally:
                        remove()
                    lines.insert(2, f"Objects per frame (outputs): {counts}. The detector runs eagerly here "
                                    "(``detector.cuda_graphs = False``) so that its stages show their kernels.")
                    lines += host_profile(concept_session, pred, cuda, args.frames)
                    write("concept", lines)
                    if hasattr(pred, "shutdown"):
                        pred.shutdown()
    return out


if __name__ == "__main__":
    main()
