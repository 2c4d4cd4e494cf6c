"""End-to-end video frames per second: sam3fast vs the official ``sam3`` package (0.1.4), same
random weights, same synthetic clip, same run.

Part 1, SAM 2-style tracker (``model.tracker`` with ``tracker.backbone = model.detector.backbone``):
``init_state(video_path=<jpg folder>)``, one click per object on frame 0 (points spread over the
frame), then ``propagate_in_video(state, 0, T, reverse=False, propagate_preflight=True)`` timed to
the last frame (backbone included), for N objects. Variants:

* ``e2e``: as above; the backbone runs on every frame.
* ``cached``: the tracker step alone. The state's ``cached_features`` keeps only the most recent
  frame (official design, sam3fast alike), so a second propagation recomputes the backbone; here
  every frame's ``tracker.forward_image`` output is computed beforehand and put in
  ``state["cached_features"]`` (an ``init_state`` argument of both packages).
* sam3fast only: the plain rows run the defaults (``tracker.cuda_graphs = "auto"``: the step graphed
  on CUDA up to 2 objects); ``perframe`` = ``tracker.fixed_capacity_step = False`` (the official
  per-frame memory selection, host syncs) instead of the preallocated memory bank; ``prefetch`` (e2e,
  with and without ``perframe``) = ``tracker.prefetch_backbone = True`` (the next frame's backbone
  launched before this frame's step, on a side stream on CUDA); ``eager-step`` =
  ``cuda_graphs = False`` at the counts the default graphs (CUDA only); ``graphed-exact`` (with
  ``--graphed-rows``) = ``tracker.cuda_graphs = True`` with ``step_buckets = "exact"`` at the counts
  the default runs eagerly (the step captured as a CUDA graph per object count, no padded row; CUDA
  only); ``backbone-eager`` = ``tracker.backbone_cuda_graphs =
  False`` (the backbone of each frame run eagerly instead of replayed from its CUDA graph; e2e, the
  first object count, CUDA only); ``nchw-fuser`` = ``tracker.maskmem_backbone.channels_last_fuser =
  False`` (the memory encoder's fuser on an NCHW map; e2e); ``fold`` / ``no-fold`` =
  ``tracker.transformer.encoder.fold_value = True`` / ``False`` (memory attention's v_proj folded into
  out_proj always / never; the default "auto" folds where the op runs SDPA: bf16 from 4 objects;
  cached rows only); ``new-table`` = ``tracker.spare_tables = 0`` (each session allocates its
  object table, and on CUDA captures its step graph again, instead of taking the table the last
  session left; cached, the first object count); ``compiled`` =
  ``tracker.compile_step()`` (``mode="reduce-overhead"``, CUDA graphs, on CUDA). Eager rows note the
  memory keys per object and frame that memory attention computes and that it attends (valid):
  a fixed-capacity bank computes its masked slots too, the official selection only what it keeps.

Part 2, concept video (``build_sam3_video_predictor``: detector on every frame + tracker):
``start_session`` on the clip, ``add_prompt(text)`` on frame 0, then the ``propagate_in_video``
stream (forward) timed; the number of objects per frame is read from the outputs. With random
weights it depends on the weight recipe: ``--score-gain``/``--presence-shift`` (detector scores)
and ``--det-nms-thresh`` (the detector's NMS IoU threshold, official 0.1, set on both models) raise
it; the counts reached are reported as measured, per side, with the objects the tracker ran
(hidden ones included). sam3fast rows run with the default ``pipelined_outputs`` (each frame's
outputs ride to the host in the next frame's planning copy: one copy per frame); variants:
``sequential`` (``pipelined_outputs = False``: the outputs read before the next frame starts, as
the official interleaves), ``host-planning`` (``model.device_planning = False``: the hotstart heuristics on the host,
as the official), ``ahead-stream`` (``model.ahead_detection_stream = True``: the next frame's detection
launched before this frame's tracker step, on a side stream; CUDA), ``det-eager`` (the detector
without its CUDA graph), ``tracker-graphed``.

Precision: the official video code has no float32 mode on CUDA. Its tracker enters a global
``torch.autocast("cuda", bfloat16)`` when constructed (``sam3_tracking_predictor.py`` 49-50,
never exited) and the video model's per-frame methods are decorated with the same autocast, so
its CUDA rows are "float32 weights + its built-in bf16 autocast". On CPU autocast("cuda") is off and
:func:`official_video_ref.official_video_mode` keeps its bf16 roundings in float32. sam3fast rows
run with autocast disabled (the official's global autocast would otherwise leak into them) at
the dtype they name. ``--official-compile``: the official model's own option
(``compile_model=True``: torch.compile ``max-autotune`` of its stages, concept part, CUDA).

    python bench/bench_video.py                  # GPU: full size, 48 frames, 1/4/16 objects, fp32 + bf16
    python bench/bench_video.py --smoke          # CPU, tiny config, 5 frames, 1 and 2 objects (CI)

On a GPU the results go to bench/results/video_fps_<parts>_<config>_<gpu>_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # official-package helpers live with the tests
sys.path.insert(0, HERE)

from bench_image import machine_header  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def grid_points(n):
    """n click positions (relative x, y) spread over the frame on a ceil(sqrt(n)) grid."""
    k = math.ceil(math.sqrt(n))
    return [((i % k + 0.5) / k, (i // k + 0.5) / k) for i in range(n)]


def click_objects(tracker, state, n):
    """Objects 0 .. n-1 on frame 0 of ``state``, one positive click each at :func:`grid_points`."""
    for i, (x, y) in enumerate(grid_points(n)):
        tracker.add_new_points_or_box(state, frame_idx=0, obj_id=i, points=torch.tensor([[x, y]]),
                                      labels=torch.tensor([1], dtype=torch.int32))


def run_sessions(session, device, warmup, iters):
    """Run ``session() -> (frames, seconds, extra)`` warmup + iters times; median seconds."""
    for _ in range(warmup):
        session()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    runs = [session() for _ in range(iters)]
    sec = float(np.median([r[1] for r in runs]))
    row = {"frames": runs[-1][0], "seconds": sec, "fps": runs[-1][0] / sec, "ms_per_frame": 1e3 * sec / runs[-1][0]}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["resident_gib"] = resident
    row.update(runs[-1][2])
    return row


# ----------------------------------------------------------------------------------------------
# Part 1: SAM 2-style tracker


def tracker_session(tracker, clip, n, frames, device, mode, cache=None):
    def session():
        if isinstance(cache, Exception):
            raise cache  # building the feature cache failed: the row records why
        with mode():
            st = tracker.init_state(video_path=clip)
            if cache is not None:
                st["cached_features"] = cache
            click_objects(tracker, st, n)
            _sync(device)
            t0 = time.perf_counter()
            stamps = [time.perf_counter() for _ in tracker.propagate_in_video(
                st, start_frame_idx=0, max_frame_num_to_track=frames - 1, reverse=False, tqdm_disable=True,
                propagate_preflight=True)]
            _sync(device)
            t1 = time.perf_counter()
            return len(stamps), t1 - t0, steady_rate(stamps, t1, tracker.num_maskmem + 1)
    return session


def steady_rate(stamps, t_end, first):
    """``{"steady_fps": ...}``: the frames yielded from index ``first`` on (a full memory bank: the
    first ``num_maskmem`` frames attend to fewer memory frames) over the host time from that
    frame's yield to the end of the stream (after the final sync); {} for a stream too short."""
    if len(stamps) < first + 2:
        return {}
    return {"steady_fps": (len(stamps) - first - 1) / (t_end - stamps[first]), "steady_from": first}


def count_memory_keys(acc, args, kwargs):
    """Forward pre-hook body for ``MemoryAttention``: adds (keys computed, keys attended, object
    rows) of one call into the device tensor ``acc`` (no host sync)."""
    memory = args[2] if len(args) > 2 else kwargs["memory"]
    valid = args[5] if len(args) > 5 else kwargs.get("memory_valid")
    B, S = memory.shape[:2]
    acc[0] += B * S
    acc[1] += B * S if valid is None else valid.sum()
    acc[2] += B


def feature_cache(tracker, clip, device, mode, strict):
    """Every frame's ``tracker.forward_image`` output, as ``_get_image_feature`` caches one (the
    exception instead if that fails and not ``strict``: the cached rows then report it)."""
    try:
        with mode(), torch.inference_mode():
            st = tracker.init_state(video_path=clip)
            cache = {}
            for t in range(st["num_frames"]):
                img = st["images"][t].to(device).float().unsqueeze(0)
                cache[t] = (img, tracker.forward_image(img))
        return cache
    except Exception as e:  # noqa: BLE001
        if strict:
            raise
        return e


# ----------------------------------------------------------------------------------------------
# Part 2: concept video (request API)


def concept_session(predictor, clip, prompt, device, mode):
    def session():
        with mode():
            sid = predictor.handle_request(request={"type": "start_session", "resource_path": clip})["session_id"]
            predictor.handle_request(request={"type": "add_prompt", "session_id": sid, "frame_index": 0,
                                              "text": prompt})
            _sync(device)
            cuda = device.type == "cuda"
            counts, tracked, mem = [], [], []
            t0 = time.perf_counter()
            for r in predictor.handle_stream_request(
                    request={"type": "propagate_in_video", "session_id": sid, "propagation_direction": "forward"}):
                counts.append(len(r["outputs"]["out_obj_ids"]))
                stats = r["outputs"].get("frame_stats") or {}
                if "num_obj_tracked" in stats:  # objects the tracker ran, hidden ones included
                    tracked.append(int(stats["num_obj_tracked"]))
                if cuda:  # (a counter read: no sync)
                    mem.append(torch.cuda.memory_allocated(device))
            _sync(device)
            dt = time.perf_counter() - t0
            predictor.handle_request(request={"type": "close_session", "session_id": sid})
        extra = {"objects_per_frame": [int(min(counts)), float(np.median(counts)), int(max(counts))],
                 "object_counts": counts}
        if tracked:
            extra["tracked_per_frame"] = [int(min(tracked)), float(np.median(tracked)), int(max(tracked))]
            extra["tracked_counts"] = tracked
        if len(mem) >= 6:  # device memory growth over the last two thirds of the frames (flat: ~0)
            a = len(mem) // 3
            extra["device_growth_mb_per_100_frames"] = (mem[-1] - mem[a]) / 2**20 * 100 / (len(mem) - 1 - a)
        return len(counts), dt, extra
    return session


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU, 5 frames, objects 1 and 2, 1 iteration")
    ap.add_argument("--config", default="sam3")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="sam3fast dtypes, comma-separated (default: float32,bfloat16 "
                                                  "on CUDA, float32 on CPU)")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--objects", default="1,4,16", help="tracker part: clicked objects, comma-separated")
    ap.add_argument("--height", type=int, default=540)
    ap.add_argument("--width", type=int, default=960)
    ap.add_argument("--iters", type=int, default=3, help="timed sessions per row (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed sessions per row")
    ap.add_argument("--parts", default="tracker,concept")
    ap.add_argument("--no-official", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows (default on CUDA only)")
    ap.add_argument("--official-compile", action="store_true", help="also the official compile_model=True row")
    ap.add_argument("--graphed-rows", action="store_true",
                    help="tracker part: also the step graphed (one capture per object count) at the counts "
                         "the default runs eagerly")
    ap.add_argument("--prompt", default=None, help="concept part text prompt (default: the recipe's)")
    ap.add_argument("--score-gain", type=float, default=None, help="weight recipe: detector score gain")
    ap.add_argument("--presence-shift", type=float, default=None, help="weight recipe: presence-logit shift")
    ap.add_argument("--obj-shift", type=float, default=5.0, help="weight recipe: tracker object-score shift "
                                                                "(> 0 keeps tracked objects present)")
    ap.add_argument("--det-nms-thresh", type=float, default=None,
                    help="detector NMS IoU threshold on both models (official 0.1; higher keeps more objects)")
    ap.add_argument("--skip-variants", default="",
                    help="tracker part: sam3fast variants to leave out, comma-separated (perframe, prefetch, "
                         "eager-step, graphed, backbone-eager, nchw-fuser, fold, no-fold, compiled); the default "
                         "rows always run")
    ap.add_argument("--tracker-kinds", default="e2e,cached",
                    help="tracker part: the row kinds of the default and per-variant rows (e2e, cached)")
    ap.add_argument("--concept-variants", default="ahead-stream,sequential,host-planning,det-eager,tracker-graphed",
                    help="concept part: sam3fast variants to run besides the default row, comma-separated")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    kinds = {k.strip() for k in args.tracker_kinds.split(",") if k.strip()}
    if not kinds or kinds - {"e2e", "cached"}:
        ap.error(f"--tracker-kinds takes e2e and/or cached, got {args.tracker_kinds!r}")
    args.tracker_kinds = sorted(kinds)  # (a list: the args go into the JSON)
    concept_known = {"ahead-stream", "sequential", "host-planning", "det-eager", "tracker-graphed"}
    concept_variants = {v.strip() for v in args.concept_variants.split(",") if v.strip()}
    if concept_variants - concept_known:
        ap.error(f"--concept-variants: unknown {sorted(concept_variants - concept_known)} "
                 f"(known: {', '.join(sorted(concept_known))})")
    args.concept_variants = sorted(concept_variants)
    if args.smoke:
        args.config, args.device, args.frames, args.objects = "tiny", "cpu", 5, "1,2"
        args.height, args.width, args.iters, args.warmup, args.no_compile = 72, 96, 1, 0, True
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: one thread is faster and steady on a busy 2-core machine
    try:
        with tempfile.TemporaryDirectory(prefix="bench_video_") as tmp:  # clip + checkpoint (3.4 GB at full size)
            return _main(args, tmp)
    finally:
        torch.set_num_threads(threads)


def _main(args, tmp):
    import sam3fast
    from official_video_ref import VIDEO_RECIPE, VIDEO_TEXT, build_official_video_model, \
        build_official_video_predictor, official_video_mode, save_official_video_checkpoint
    import official_video_ref
    from official_ref import move_official_model
    from video_clip import make_clip, write_jpg_folder

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtypes = (args.dtype or ("float32,bfloat16" if cuda else "float32")).split(",")
    objects = [int(n) for n in args.objects.split(",")]
    parts = args.parts.split(",")
    compile_rows = not args.no_compile
    prompt = args.prompt or VIDEO_TEXT
    cfg = sam3fast.get_config(args.config)
    clip = write_jpg_folder(make_clip(args.frames, args.height, args.width), os.path.join(tmp, "frames"))

    recipe = {"tracker_obj_shift": args.obj_shift}
    if args.score_gain is not None:
        recipe["score_gain"] = args.score_gain
    if args.presence_shift is not None:
        recipe["presence_shift"] = args.presence_shift
    t0 = time.perf_counter()
    ref = build_official_video_model(cfg, recipe=recipe)  # VIDEO_RECIPE + recipe, on CPU
    ckpt = save_official_video_checkpoint(ref, os.path.join(tmp, "sam3.pt"))
    print(f"weights: official video model, VIDEO_RECIPE + {recipe}, saved in {time.perf_counter() - t0:.1f} s")

    # Official: on CPU inside official_video_mode (CUDA -> CPU patches); on CUDA natively.
    omode = contextlib.nullcontext if cuda else official_video_mode

    def ours_mode():  # the official tracker leaves a global bf16 autocast entered on this thread
        return torch.autocast("cuda", enabled=False) if cuda else contextlib.nullcontext()

    official_dtype = "fp32 weights + built-in bf16 autocast" if cuda else "float32"
    results = {"machine": machine_header(device), "config": args.config, "date": datetime.date.today().isoformat(),
               "clip": f"video_clip.make_clip({args.frames}, {args.height}, {args.width}) as a JPEG folder",
               "weights": {**VIDEO_RECIPE, **recipe}, "prompt": prompt, "det_nms_thresh": args.det_nms_thresh,
               "args": vars(args), "rows": []}
    rows = results["rows"]

    def add(part, engine, dtype, variant, n, session, **extra):
        name = f"{part} {engine} {dtype} {variant}" + ("" if n is None else f" N={n}")
        try:
            row = run_sessions(session, device, args.warmup, args.iters)
        except Exception as e:  # noqa: BLE001 -- a GPU run records a failing row and goes on
            if args.smoke:
                raise
            row = {"error": f"{type(e).__name__}: {e}"[:400]}
        row.update(part=part, engine=engine, dtype=dtype, variant=variant, objects=n, **extra)
        rows.append(row)
        print(name, "->", "ERROR " + row["error"] if "error" in row else
              f"{row['fps']:.2f} frames/s ({row['ms_per_frame']:.1f} ms/frame)", flush=True)
        save(partial=True)  # a run cut short by a deadline keeps the rows it has
        return row

    def save(partial=False):
        if not cuda or args.smoke:
            return
        os.makedirs(args.out, exist_ok=True)
        gpu = results["machine"].get("gpu", "gpu").replace(" ", "_")
        stem = os.path.join(args.out, f"video_fps_{'_'.join(parts)}_{args.config}_{gpu}_{results['date']}")
        results["complete"] = not partial
        with open(stem + ".json", "w") as f:
            json.dump(results, f, indent=1)
        if not partial:
            with open(stem + ".md", "w") as f:
                f.write(format_table(results) + "\n")
            print("wrote", stem + ".json", stem + ".md")

    def free():
        if cuda:
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- part 1: tracker
    if "tracker" in parts:
        if not args.no_official:
            with omode():
                ref = move_official_model(ref, device) if cuda else ref
                tracker = ref.tracker
                tracker.backbone = ref.detector.backbone
            for n in objects:
                add("tracker", "official", official_dtype, "e2e", n, tracker_session(tracker, clip, n, args.frames,
                                                                                  device, omode))
            # built after the e2e rows, so that it is not in their peak memory
            cache = feature_cache(tracker, clip, device, omode, args.smoke)
            for n in objects:
                add("tracker", "official", official_dtype, "cached", n, tracker_session(tracker, clip, n, args.frames,
                                                                                     device, omode, cache))
            del tracker, cache
        del ref
        free()
        for dtype in dtypes:
            with ours_mode():
                model = sam3fast.build_sam3_video_model(checkpoint_path=ckpt, config=cfg, device=device, dtype=dtype)
            tracker = model.tracker
            tracker.backbone = model.detector.backbone

            def ours(variant, n, cache=None):
                before = dict(tracker.step_counts)
                # keys the memory attention computes vs attends (valid), per object and frame: a
                # fixed-capacity bank computes its masked slots too (eager steps only: a graph
                # replay runs no hook)
                keys = torch.zeros(3, dtype=torch.float64, device=device)
                hook = tracker.transformer.encoder.register_forward_pre_hook(
                    lambda mod, a, kw: count_memory_keys(keys, a, kw), with_kwargs=True)
                try:
                    row = add("tracker", "sam3fast", dtype, variant, n, tracker_session(
                        tracker, clip, n, args.frames, device, ours_mode, cache))
                finally:
                    hook.remove()
                row["step_counts"] = {k: v - before[k] for k, v in tracker.step_counts.items()}
                computed, attended, obj_frames = keys.tolist()
                if obj_frames:
                    row["memory_keys_per_object_frame"] = {"computed": computed / obj_frames,
                                                           "attended": attended / obj_frames}

            def variants(suffix, per_frame_too, kinds=("e2e", "cached"), counts=None):
                counts = objects if counts is None else counts
                kinds = [k for k in kinds if k in args.tracker_kinds]
                if not counts or not kinds or suffix.strip() in skip:
                    return
                per_frame_too = per_frame_too and "perframe" not in skip
                for use_cache in [k == "cached" for k in kinds]:  # the feature cache: the cached rows only
                    cache = feature_cache(tracker, clip, device, ours_mode, args.smoke) if use_cache else None
                    kind = "cached" if use_cache else "e2e"
                    for n in counts:
                        ours(kind + suffix, n, cache)
                        if per_frame_too:
                            tracker.fixed_capacity_step = False
                            ours(kind + suffix + " perframe", n, cache)
                            tracker.fixed_capacity_step = True
                    del cache
                    free()

            skip = {v.strip() for v in args.skip_variants.split(",") if v.strip()}
            variants("", per_frame_too=True)  # the default: cuda_graphs "auto"
            # the next frame's backbone on a side stream beside this frame's step (the same outputs)
            tracker.prefetch_backbone = True
            variants(" prefetch", per_frame_too=True, kinds=("e2e",))
            tracker.prefetch_backbone = False
            if cuda:
                # where "auto" graphs the step (up to GRAPH_AUTO_MAX_ROWS objects): the same counts
                # eagerly; where it does not: graphed at every count (cuda_graphs True), with --graphed-rows
                from sam3fast.video.tracker_predictor import GRAPH_AUTO_MAX_ROWS

                tracker.cuda_graphs = False
                variants(" eager-step", per_frame_too=False, counts=[n for n in objects if n <= GRAPH_AUTO_MAX_ROWS])
                if args.graphed_rows:
                    # (power-of-two buckets cost a full row per padded object: 5 objects as 8 took
                    # 38.8 ms a frame on an H100 against 25.2 eagerly; one capture per count pads none)
                    tracker.cuda_graphs, tracker.step_buckets = True, "exact"
                    variants(" graphed-exact", per_frame_too=False,
                             counts=[n for n in objects if n > GRAPH_AUTO_MAX_ROWS])
                    tracker.step_buckets = "pow2"
            tracker.cuda_graphs = "auto"
            if cuda:
                # the backbone eagerly (the default replays it from a CUDA graph): the first count
                tracker.backbone_cuda_graphs = False
                variants(" backbone-eager", per_frame_too=False, kinds=("e2e",), counts=objects[:1])
                tracker.backbone_cuda_graphs = "auto"
            # the memory encoder's fuser in NCHW memory (its default "auto" runs it channels-last on CUDA)
            tracker.maskmem_backbone.channels_last_fuser = False
            variants(" nchw-fuser", per_frame_too=False, kinds=("e2e",))
            tracker.maskmem_backbone.channels_last_fuser = "auto"
            # memory attention with v_proj folded into out_proj (P.V 64 wide instead of 256): the
            # tracker step alone, where the difference shows
            tracker.transformer.encoder.fold_value = True
            variants(" fold", per_frame_too=False, kinds=("cached",))
            tracker.transformer.encoder.fold_value = False
            variants(" no-fold", per_frame_too=False, kinds=("cached",))
            tracker.transformer.encoder.fold_value = "auto"
            # every session on a new object table (the default serves it the closed session's
            # table, and with its tensors the captured step graphs): the first count, cached
            tracker.spare_tables = 0
            variants(" new-table", per_frame_too=False, kinds=("cached",), counts=objects[:1])
            tracker.spare_tables = 1
            if compile_rows:
                tracker.compile_step(mode="reduce-overhead" if cuda else None)
                variants(" compiled", per_frame_too=False)
            del model, tracker
            free()

    # ---------------------------------------------------------------- part 2: concept video
    if "concept" in parts:
        def concept(engine, dtype, variant, build, mode):
            try:
                with mode():
                    predictor = build()
                    if args.det_nms_thresh is not None:
                        predictor.model.det_nms_thresh = args.det_nms_thresh
                    if cuda and engine == "official":
                        move_official_model(predictor.model, device)
            except Exception as e:  # noqa: BLE001
                if args.smoke:
                    raise
                rows.append({"part": "concept", "engine": engine, "dtype": dtype, "variant": variant,
                             "objects": None, "error": f"build: {type(e).__name__}: {e}"[:400]})
                print("concept", engine, dtype, variant, "-> ERROR", rows[-1]["error"])
                return
            add("concept", engine, dtype, variant, None, concept_session(predictor, clip, prompt, device, mode))
            if hasattr(predictor, "shutdown"):
                predictor.shutdown()
            del predictor
            free()

        def official_predictor(compile_model=False):
            # The helper builds and serves inside official_video_mode; on CUDA it must not (that
            # mode maps CUDA to CPU): its reference to the mode is swapped for a no-op meanwhile.
            saved = official_video_ref.official_video_mode
            if cuda:
                official_video_ref.official_video_mode = contextlib.nullcontext
            try:
                predictor = build_official_video_predictor(cfg, ckpt)
            finally:
                official_video_ref.official_video_mode = saved
            predictor.model.compile_model = compile_model
            return predictor

        def ours_predictor(dtype, compile=False, pipelined=True, det_graphs=True, tracker_graphs=None,
                           device_planning=True, ahead_stream=False):
            pred = sam3fast.build_sam3_video_predictor(checkpoint_path=ckpt, config=cfg, device=device, dtype=dtype,
                                                       compile=compile)
            pred.model.pipelined_outputs = pipelined  # outputs ride in the next frame's planning copy
            pred.model.device_planning = device_planning  # False: the hotstart heuristics on the host
            pred.model.detector.cuda_graphs = det_graphs  # per-frame detector as one CUDA-graph replay (CUDA)
            pred.model.ahead_detection_stream = ahead_stream  # the next detection on a side stream (CUDA)
            if tracker_graphs is not None:  # None: the default ("auto")
                pred.model.tracker.cuda_graphs = tracker_graphs  # the propagation step as a CUDA graph (CUDA)
            return pred

        if not args.no_official:
            concept("official", official_dtype, "e2e", official_predictor, omode)
        for dtype in dtypes:
            concept("sam3fast", dtype, "e2e", lambda d=dtype: ours_predictor(d), ours_mode)
            chosen = args.concept_variants
            # (off CUDA the official launch order, inline)
            if "ahead-stream" in chosen:
                concept("sam3fast", dtype, "e2e ahead-stream", lambda d=dtype: ours_predictor(d, ahead_stream=True),
                        ours_mode)
            if "sequential" in chosen:
                concept("sam3fast", dtype, "e2e sequential", lambda d=dtype: ours_predictor(d, pipelined=False),
                        ours_mode)
            if "host-planning" in chosen:
                concept("sam3fast", dtype, "e2e host-planning",
                        lambda d=dtype: ours_predictor(d, device_planning=False), ours_mode)
            if cuda and "det-eager" in chosen:  # on CPU the detector runs eagerly either way
                concept("sam3fast", dtype, "e2e det-eager", lambda d=dtype: ours_predictor(d, det_graphs=False),
                        ours_mode)
            if cuda and "tracker-graphed" in chosen:
                concept("sam3fast", dtype, "e2e tracker-graphed",
                        lambda d=dtype: ours_predictor(d, tracker_graphs=True), ours_mode)
            if compile_rows:
                concept("sam3fast", dtype, "compiled", lambda d=dtype: ours_predictor(d, compile=True), ours_mode)
        if args.official_compile and not args.no_official:  # last: it changes global dynamo settings
            if cuda:
                concept("official", official_dtype, "compiled", lambda: official_predictor(True), omode)
            else:
                print("--official-compile: CUDA only (the CPU helpers run the official code with dynamo disabled)")

    # ---------------------------------------------------------------- ratios, table, files
    base = {(r["part"], r["objects"], r["variant"].split()[0]): r["fps"] for r in rows
            if r["engine"] == "official" and r["variant"] in ("e2e", "cached") and "fps" in r}
    for r in rows:
        b = base.get((r["part"], r["objects"], r["variant"].split()[0]))
        if b and "fps" in r:
            r["vs_official"] = r["fps"] / b
    table = format_table(results)
    print(table)
    save()
    return results


def format_table(results):
    m = results["machine"]
    lines = [f"# video frames/s benchmark: config {results['config']}, {m.get('gpu', m['device'])}, "
             f"torch {m['torch']}, {results['date']}",
             "", f"clip: {results['clip']}; weights: {results['weights']}; prompt {results['prompt']!r}; "
             f"det_nms_thresh {results['det_nms_thresh'] or 'official (0.1)'}",
             "frames/s = frames yielded / seconds of the whole propagate_in_video stream (median of timed sessions); "
             "e2e includes the backbone, cached = tracker step only (features precomputed); "
             "objects/frame = min/median/max of len(out_obj_ids) (random weights: the count is what they produce); "
             "tracked/frame = the same of the objects the tracker ran (hidden ones included); "
             "'from frame k on' = frames yielded after frame k over the host time from frame k's yield to the "
             "end of the stream (the memory bank is full from there: earlier frames attend to fewer memory frames)",
             "",
             "| part | engine | dtype | variant | objects | frames | frames/s | ms/frame | vs official | peak GiB | "
             "objects/frame | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        objs = r.get("objects_per_frame")
        note = r.get("error", "")
        if "step_counts" in r:
            note = note or "steps " + ", ".join(f"{k} {v}" for k, v in r["step_counts"].items())
        if "memory_keys_per_object_frame" in r:
            mk = r["memory_keys_per_object_frame"]
            note = (note + "; " if note else "") + f"keys/obj/frame {mk['computed']:.0f} computed, {mk['attended']:.0f} attended"
        if "steady_fps" in r:
            note = (note + "; " if note else "") + f"{r['steady_fps']:.2f} frames/s from frame {r['steady_from']} on"
        if "tracked_per_frame" in r:
            tr = r["tracked_per_frame"]
            note = (note + "; " if note else "") + f"tracked/frame {tr[0]}/{tr[1]:g}/{tr[2]}"
        if "device_growth_mb_per_100_frames" in r:
            note = (note + "; " if note else "") + f"device +{r['device_growth_mb_per_100_frames']:.1f} MB/100 frames"
        cells = [r["part"], r["engine"], r["dtype"], r["variant"], "" if r["objects"] is None else r["objects"],
                 r.get("frames", ""), f"{r['fps']:.2f}" if "fps" in r else "-",
                 f"{r['ms_per_frame']:.1f}" if "fps" in r else "-",
                 f"{r['vs_official']:.2f}x" if "vs_official" in r else "",
                 f"{r['peak_gib']:.2f}" if "peak_gib" in r else "",
                 "" if objs is None else f"{objs[0]}/{objs[1]:g}/{objs[2]}", note]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines + target_lines(results["rows"]))


# The video targets (#6, H100, bf16): frames/s of the tracker with N objects, or a ratio
# to the official video predictor at N objects.
FPS_TARGETS = {1: ("fps", 60.0), 5: ("ratio", 3.0), 16: ("fps", 25.0)}


def target_lines(rows):
    """Markdown lines comparing the tracker part's e2e rows (backbone included) with
    ``FPS_TARGETS``: sam3fast's default row ("e2e") and its best e2e variant per object count,
    against the official "e2e" row of the same run. Empty when no such rows ran."""
    out = []
    for n, (kind, goal) in FPS_TARGETS.items():
        ours = [r for r in rows if r["part"] == "tracker" and r["engine"] == "sam3fast" and r["objects"] == n
                and r["variant"].split()[0] == "e2e" and "fps" in r]
        if not ours:
            continue
        official = next((r["fps"] for r in rows if r["part"] == "tracker" and r["engine"] == "official"
                         and r["objects"] == n and r["variant"] == "e2e" and "fps" in r), None)
        best = max(ours, key=lambda r: r["fps"])
        default = next((r for r in ours if r["variant"] == "e2e"), None)
        parts = []
        for label, r in (("default", default), ("best", best)):
            if r is None:
                continue
            ratio = f", {r['fps'] / official:.2f}x official" if official else ""
            parts.append(f"{label} {r['fps']:.1f} frames/s ({r['dtype']} {r['variant']}{ratio})")
        value = best["fps"] if kind == "fps" else (best["fps"] / official if official else None)
        want = f">= {goal:g} frames/s" if kind == "fps" else f">= {goal:g}x the official"
        verdict = "no official row" if value is None else ("met" if value >= goal else "not met")
        out.append(f"- {n} object{'s' if n > 1 else ''}: " + "; ".join(parts) + f". Target {want}: {verdict}.")
    if out:
        out = ["", "Against the video targets of issue #6 (tracker, backbone included, this machine):", ""] + out
    return out


if __name__ == "__main__":
    main()
