"""Host work per video frame, counted on the CPU: the aten operations sam3fast issues per frame
outside the regions a GPU runs as CUDA graphs, by phase, and the host reads of tensor values.

Why count: on a GPU every eager aten operation costs the host some microseconds (Python, the
dispatcher, the launch) whatever its size, while a CUDA-graph replay launches all the operations
of its region at once. When the host issues a frame's work more slowly than the GPU runs it, the
frame rate is the host's. GPU time is scarce; these counts come from the same code path on any CPU
and do not depend on the machine (the tiny config has fewer layers than the full model, so its
counts inside the stages are lower; the per-frame logic around them is the same).

What is counted, per frame (the median over the frames after ``--warmup``):

- ``graphed``: operations inside the regions that run as one CUDA-graph replay on a GPU, by region
  (the video detector's step, the tracker's step through its runner, the tracker's backbone, the
  memory encoder outside the step), and
  the number of such region calls (one replay each on a GPU);
- ``eager``: the rest, by phase: the method of the per-frame driver that issued it (the concept
  video: what ``_det_track_one_frame`` calls; the tracker: what its ``propagate_in_video`` loop (``_propagate``)
  calls), ``(frame driver)`` for its own operations and ``(outside)`` for the rest (the outputs
  of held frames, the request API);
- ``kernels``: the eager operations that would launch a kernel (they write in place or return
  a tensor that is not a view of an input);
- ``reads``: ``aten::_local_scalar_dense`` (``.item()``, ``int(t)``), ``is_nonzero`` (``bool(t)``),
  ``equal`` and ``nonzero`` calls: each is a host read of a device value, a sync on a GPU.
  Device-to-host copies are not visible on a CPU.

On the CPU the graph runners run their steps eagerly on the same buffers: the tracker with
``cuda_graphs = True`` (its step through :class:`~sam3fast.video.tracker_graphs.GraphedMemoryStep`
at every object count; on a GPU the default "auto" graphs it up to 2 objects, so above that its
operations are eager there), the detector through its graphed-step seam.

    python bench/host_ops.py --smoke          # tiny config, a few frames (CI: it cannot rot)
    python bench/host_ops.py                  # tiny config, 16 frames, 1 / 4 / 16 clicked objects + concept
    python bench/host_ops.py --config sam3 --frames 6 --objects 1   # the full model (slow on a CPU)
    python bench/host_ops.py --parts paths                            # the two tracker paths compared

``--parts paths`` compares the tracker's two memory paths at ``--path-objects`` clicked objects on
one steady-state frame (the last whole one), both eager as a GPU runs them above 2 objects: the
fixed-capacity bank (the default) and the official per-frame selection (``fixed_capacity_step =
False``). A bf16 model runs each module's CUDA dispatch on CPU tensors (``KERNEL_PATHS_ON_CPU``: the
same ``sam3fast::`` ops and fusions a GPU takes, each computed by its CPU kernel). Per path: every
operation (eager, none graphed), those that write memory, host reads, the megabytes their tensors
span (inputs and outputs, a proxy for the traffic) and the memory attention's keys (computed,
valid); then the operations whose counts differ.

Results (not with --smoke): bench/results/host_ops_<config>_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import statistics
import sys
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # official-package helpers live with the tests
sys.path.insert(0, HERE)

# Operations that read a tensor's value on the host: a sync each on a GPU. ``bool(t)`` reaches a
# dispatch mode as ``is_nonzero``, not as the ``_local_scalar_dense`` of ``.item()``; ``nonzero``
# sizes its output by the values.
READ_OPS = ("_local_scalar_dense", "is_nonzero", "equal", "nonzero")


def _storages(tree) -> set:
    from torch.utils import _pytree as pytree

    return {x.untyped_storage().data_ptr() for x in pytree.tree_leaves(tree)
            if isinstance(x, torch.Tensor) and x.numel() > 0}


def _nbytes(tree) -> int:
    from torch.utils import _pytree as pytree

    return sum(x.numel() * x.element_size() for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor))


def launches_kernel(func, args, kwargs, out) -> bool:
    """Whether an operation would launch a device kernel: it writes in place, or returns a tensor
    that is not a view of an input (views, and ``.to`` to the dtype a tensor has, launch nothing;
    a read of a value is a copy, counted as a read)."""
    if func.overloadpacket.__name__ in READ_OPS:
        return False
    if func._schema.is_mutable:
        return True
    outs = _storages(out)
    return bool(outs - _storages((args, kwargs or {})))


class HostOpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while active, per frame: inside a graphed region (by
    region) or eager (by phase: the first frame below ``driver`` on the Python stack)."""

    def __init__(self, driver: str, package: str = "sam3fast"):
        super().__init__()
        self.driver = driver
        self.package = package  # frames of files whose path holds it name the phases
        self.region = []  # names of the graphed regions entered (the outermost counts)
        self.frames = []  # per frame: {"graphed": Counter, "calls": Counter, "eager": Counter, "ops": Counter, "reads": int}
        self.new_frame()

    def new_frame(self):
        self.frames.append({"graphed": collections.Counter(), "calls": collections.Counter(),
                            "eager": collections.Counter(), "ops": collections.Counter(), "reads": 0,
                            "kernels": 0, "mb": 0.0})

    def enter_region(self, name):
        if not self.region:
            self.frames[-1]["calls"][name] += 1
        self.region.append(name)

    def exit_region(self):
        self.region.pop()

    def _phase(self) -> str:
        f = sys._getframe(3)  # (this, __torch_dispatch__, the mode's caller)
        below = None
        while f is not None:
            name = f.f_code.co_name
            if name == self.driver and self.package in f.f_code.co_filename:
                return below or "(frame driver)"
            if self.package in f.f_code.co_filename:
                below = name
            f = f.f_back
        return "(outside)"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        fr = self.frames[-1]
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if name in READ_OPS:
            fr["reads"] += 1
        if self.region:
            fr["graphed"][self.region[0]] += 1
        else:
            fr["eager"][self._phase()] += 1
            fr["ops"][name if func.namespace == "aten" else f"{func.namespace}.{name}"] += 1
            if launches_kernel(func, args, kwargs, out):
                fr["kernels"] += 1
                fr["mb"] += _nbytes((args, kwargs, out)) / 1e6  # the kernel's tensors, in and out
        return out


def wrap_region(cls, method, counter_ref, name):
    """Counts ``cls.method``'s operations as the graphed region ``name`` (restore with the result)."""
    orig = getattr(cls, method)

    def wrapped(*a, **kw):
        c = counter_ref[0]
        if c is None:
            return orig(*a, **kw)
        c.enter_region(name)
        try:
            return orig(*a, **kw)
        finally:
            c.exit_region()

    setattr(cls, method, wrapped)
    return cls, method, orig


def summarize(counter: HostOpCounter, warmup: int) -> dict:
    frames = [f for f in counter.frames if sum(f["graphed"].values()) + sum(f["eager"].values()) > 0]
    steady = frames[warmup:] or frames
    med = lambda xs: float(statistics.median(xs)) if xs else 0.0  # noqa: E731

    def per_key(field):
        keys = sorted({k for f in steady for k in f[field]})
        return {k: med([f[field][k] for f in steady]) for k in keys}

    eager = [sum(f["eager"].values()) for f in steady]
    kernels = [f["kernels"] for f in steady]
    graphed = [sum(f["graphed"].values()) for f in steady]
    top = collections.Counter()
    for f in steady:
        top.update(f["ops"])
    return {
        "frames_counted": len(steady), "frames_skipped": len(frames) - len(steady),
        "eager_ops": med(eager), "eager_ops_min": min(eager) if eager else 0, "eager_ops_max": max(eager) if eager else 0,
        "eager_kernels": med(kernels), "graphed_ops": med(graphed), "reads": med([f["reads"] for f in steady]),
        "eager_by_phase": per_key("eager"), "graphed_by_region": per_key("graphed"), "region_calls": per_key("calls"),
        "top_eager_ops": [(k, round(v / len(steady), 1)) for k, v in top.most_common(15)],
    }


def run_tracker(model, clip, n, frames, warmup):
    """Clicked objects: ``n`` clicks on frame 0, then ``propagate_in_video`` (a frame per yield)."""
    from bench_video import click_objects
    from sam3fast.video.tracker_graphs import GraphedMemoryStep
    from sam3fast.video.tracker_predictor import Sam3TrackerPredictor

    tracker = model.tracker
    tracker.backbone = model.detector.backbone
    tracker.cuda_graphs = True  # the step through its runner (eager on the CPU, a graph on a GPU)
    ref = [None]
    undo = [wrap_region(GraphedMemoryStep, "_step", ref, "tracker step"),
            wrap_region(Sam3TrackerPredictor, "_tracker_levels", ref, "tracker backbone"),
            wrap_region(Sam3TrackerPredictor, "_encode_memory", ref, "memory encoder")]
    try:
        with torch.inference_mode():
            st = tracker.init_state(video_path=clip)
            click_objects(tracker, st, n)
            tracker.propagate_in_video_preflight(st)
            counter = ref[0] = HostOpCounter("_propagate")  # (propagate_in_video's frame loop)
            with counter:
                for _ in tracker.propagate_in_video(st, start_frame_idx=0, max_frame_num_to_track=frames - 1,
                                                    reverse=False, tqdm_disable=True):
                    counter.new_frame()
    finally:
        ref[0] = None
        for cls, method, orig in undo:
            setattr(cls, method, orig)
        tracker.cuda_graphs = "auto"
    out = summarize(counter, warmup)
    out["step_counts"] = dict(tracker.step_counts)
    return out


def run_concept(predictor, clip, prompt, warmup):
    """Text prompt on frame 0, then the ``propagate_in_video`` stream; a frame starts at each
    ``_run_single_frame_inference`` (outputs are held ``hotstart_delay`` frames, so yields do not
    mark frames)."""
    from sam3fast.video.graphs import GraphedDetector
    from sam3fast.video.inference import Sam3VideoInference
    from sam3fast.video.tracker_graphs import GraphedMemoryStep

    model = predictor.model
    model.tracker.cuda_graphs = True
    model.detector._uses_graphed_step = lambda: True  # the seam: the static step on its buffers
    ref = [None]
    from sam3fast.video.tracker_predictor import Sam3TrackerPredictor

    undo = [wrap_region(GraphedDetector, "_step", ref, "detector step"),
            wrap_region(GraphedMemoryStep, "_step", ref, "tracker step"),
            wrap_region(Sam3TrackerPredictor, "_encode_memory", ref, "memory encoder")]
    orig_frame = Sam3VideoInference._run_single_frame_inference

    def frame(self, *a, **kw):
        if ref[0] is not None:
            ref[0].new_frame()
        return orig_frame(self, *a, **kw)

    Sam3VideoInference._run_single_frame_inference = frame
    counts, tracked = [], []
    try:
        sid = predictor.handle_request(request={"type": "start_session", "resource_path": clip})["session_id"]
        predictor.handle_request(request={"type": "add_prompt", "session_id": sid, "frame_index": 0, "text": prompt})
        counter = ref[0] = HostOpCounter("_det_track_one_frame")
        with counter:
            for r in predictor.handle_stream_request(request={"type": "propagate_in_video", "session_id": sid,
                                                              "propagation_direction": "forward"}):
                counts.append(len(r["outputs"]["out_obj_ids"]))
                stats = r["outputs"].get("frame_stats") or {}
                if "num_obj_tracked" in stats:
                    tracked.append(int(stats["num_obj_tracked"]))
        predictor.handle_request(request={"type": "close_session", "session_id": sid})
    finally:
        ref[0] = None
        Sam3VideoInference._run_single_frame_inference = orig_frame
        for cls, method, orig in undo:
            setattr(cls, method, orig)
        del model.detector._uses_graphed_step
        model.tracker.cuda_graphs = "auto"
    out = summarize(counter, warmup)
    out["objects_per_frame"] = counts
    out["tracked_per_frame"] = tracked
    return out


def compare_tracker_paths(model, clip, n, frames) -> dict:
    """The bank and the per-frame selection at ``n`` clicked objects, both eager, under the CUDA
    dispatch: one steady-state frame each (the last whole one of ``frames``)."""
    from bench_video import click_objects
    from sam3fast.kernels import _triton_compat
    from sam3fast.model.memory_attention import MemoryAttention
    from torch.utils._python_dispatch import _disable_current_modes

    tracker = model.tracker
    tracker.backbone = model.detector.backbone
    keys = []
    orig_fwd = MemoryAttention.forward

    def fwd(self, curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens, memory_valid=None, **kw):
        with _disable_current_modes():  # the count is not the frame's work
            valid = memory.shape[1] if memory_valid is None else int(memory_valid.sum(1).min())
        keys.append((memory.shape[1], valid))
        return orig_fwd(self, curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens, memory_valid, **kw)

    out = {}
    saved = tracker.fixed_capacity_step, tracker.cuda_graphs
    _triton_compat.KERNEL_PATHS_ON_CPU = True
    MemoryAttention.forward = fwd
    try:
        for path, fixed in (("bank", True), ("perframe", False)):
            tracker.fixed_capacity_step, tracker.cuda_graphs = fixed, False
            keys.clear()
            rec = HostOpCounter("_propagate")  # nothing graphed here: every operation is eager
            with torch.inference_mode():
                st = tracker.init_state(video_path=clip)
                click_objects(tracker, st, n)
                tracker.propagate_in_video_preflight(st)
                with rec:
                    for _ in tracker.propagate_in_video(st, start_frame_idx=0, max_frame_num_to_track=frames - 1,
                                                        reverse=False, tqdm_disable=True):
                        rec.new_frame()
            fr = rec.frames[-2]  # the last whole frame (the last entry opens after the last yield)
            out[path] = {"ops": sum(fr["eager"].values()), "kernels": fr["kernels"], "reads": fr["reads"],
                         "mb": round(fr["mb"], 1), "keys": keys[-1], "by_op": dict(fr["ops"])}
    finally:
        MemoryAttention.forward = orig_fwd
        _triton_compat.KERNEL_PATHS_ON_CPU = False
        tracker.fixed_capacity_step, tracker.cuda_graphs = saved
    return out


def format_paths(n, frames, paths) -> str:
    lines = ["", f"## tracker paths at {n} clicked objects, frame {frames - 1} of {frames}, both eager "
             "(CUDA dispatch, bf16)", "",
             "| path | operations | of which kernels | MB their tensors span | host reads "
             "| memory-attention keys (computed, valid) |",
             "|---|---:|---:|---:|---:|---|"]
    for path, r in paths.items():
        lines.append(f"| {path} | {r['ops']} | {r['kernels']} | {r['mb']} | {r['reads']} "
                     f"| {r['keys'][0]}, {r['keys'][1]} |")
    a, b = paths["bank"]["by_op"], paths["perframe"]["by_op"]
    diff = sorted(((a.get(k, 0) - b.get(k, 0), k) for k in set(a) | set(b) if a.get(k, 0) != b.get(k, 0)),
                  key=lambda dk: (-abs(dk[0]), dk[1]))
    lines += ["", "operations whose counts differ (bank - perframe): " +
              ", ".join(f"{k} {d:+d}" for d, k in diff[:24])]
    return "\n".join(lines)


def format_table(results) -> str:
    lines = [f"# host operations per video frame: config {results['config']}, torch {results['torch']}, "
             f"{results['date']}", "",
             "Counted on the CPU (bench/host_ops.py): aten operations per frame, the median over the frames "
             "after the first " + str(results["warmup"]) + ". graphed = inside the regions a GPU replays as "
             "CUDA graphs (one replay per region call); eager = issued one by one; reads = host reads of a "
             "tensor value (a sync on a GPU); kernels = the eager operations that write memory (not views, not a "
             "``.to`` to the same dtype). The tracker step counts as graphed at every object count here "
             "(a GPU's default graphs it up to 2 objects).", "",
             "| part | objects | eager ops | (min-max) | of which kernels | graphed ops | region calls | reads |",
             "|---|---:|---:|---|---:|---:|---|---:|"]
    for row in results["rows"]:
        calls = ", ".join(f"{k} {v:g}" for k, v in row["region_calls"].items())
        lines.append(f"| {row['part']} | {row['objects']} | {row['eager_ops']:.0f} | {row['eager_ops_min']}-"
                     f"{row['eager_ops_max']} | {row['eager_kernels']:.0f} | {row['graphed_ops']:.0f} | {calls} | "
                     f"{row['reads']:.0f} |")
    for row in results["rows"]:
        lines += ["", f"## {row['part']}, objects {row['objects']}: eager operations by phase (median per frame)", ""]
        for k, v in sorted(row["eager_by_phase"].items(), key=lambda kv: -kv[1]):
            lines.append(f"- {k}: {v:g}")
        lines.append("- top operations (mean per frame): " + ", ".join(f"{k} {v}" for k, v in row["top_eager_ops"]))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config, 5 frames, 1 object + concept + paths (CI)")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=None, help="frames not counted (default: num_maskmem + 1, "
                    "the memory bank filling; 1 with --smoke)")
    ap.add_argument("--objects", default="1,4,16", help="tracker part: clicked objects, comma-separated")
    ap.add_argument("--parts", default="tracker,concept", help="tracker, concept, paths (the two tracker "
                    "memory paths compared; with --smoke too)")
    ap.add_argument("--path-objects", type=int, default=5, help="paths part: clicked objects")
    ap.add_argument("--path-frames", type=int, default=20, help="paths part: frames (the pointers fill "
                    "max_obj_ptrs_in_encoder = 16 of them; --smoke: --frames)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.smoke:
        args.config, args.frames, args.objects, args.warmup = "tiny", 5, "1", 1
        args.parts += ",paths"
        args.path_frames = args.frames
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # counts do not depend on it; tiny tensors run faster on one thread
    try:
        with tempfile.TemporaryDirectory(prefix="host_ops_") as tmp:
            return _main(args, tmp)
    finally:
        torch.set_num_threads(threads)


def _main(args, tmp):
    import sam3fast
    from official_video_ref import VIDEO_TEXT, build_official_video_model, save_official_video_checkpoint
    from video_clip import make_clip, write_jpg_folder

    cfg = sam3fast.get_config(args.config)
    warmup = cfg.tracker.num_maskmem + 1 if args.warmup is None else args.warmup
    h, w = (72, 96) if args.config == "tiny" else (540, 960)
    clip = write_jpg_folder(make_clip(args.frames, h, w), os.path.join(tmp, "frames"))
    # the benchmark's weights (bench_video): random, with the recipe that makes detections
    ref = build_official_video_model(cfg, recipe={"tracker_obj_shift": 5.0})
    ckpt = save_official_video_checkpoint(ref, os.path.join(tmp, "sam3.pt"))
    del ref
    results = {"config": args.config, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
               "frames": args.frames, "warmup": warmup, "rows": []}
    parts = args.parts.split(",")
    if "tracker" in parts:
        model = sam3fast.build_sam3_video_model(checkpoint_path=ckpt, config=cfg, device="cpu", dtype="float32")
        for n in [int(x) for x in args.objects.split(",")]:
            row = run_tracker(model, clip, n, args.frames, warmup)
            results["rows"].append({"part": "tracker", "objects": n, **row})
        del model
    if "concept" in parts:
        pred = sam3fast.build_sam3_video_predictor(checkpoint_path=ckpt, config=cfg, device="cpu", dtype="float32")
        row = run_concept(pred, clip, VIDEO_TEXT, warmup)
        tracked = row["tracked_per_frame"][warmup:] or row["tracked_per_frame"]
        objects = f"{min(tracked)}-{max(tracked)} tracked" if tracked else "?"
        results["rows"].append({"part": "concept", "objects": objects, **row})
        if hasattr(pred, "shutdown"):
            pred.shutdown()
    if "paths" in parts:
        if args.path_frames != args.frames:
            clip = write_jpg_folder(make_clip(args.path_frames, h, w), os.path.join(tmp, "path_frames"))
        model = sam3fast.build_sam3_video_model(checkpoint_path=ckpt, config=cfg, device="cpu", dtype="bfloat16")
        results["paths"] = {"objects": args.path_objects, "frames": args.path_frames,
                            **compare_tracker_paths(model, clip, args.path_objects, args.path_frames)}
        del model
    text = format_table(results)
    if "paths" in results:
        p = dict(results["paths"])
        text += "\n" + format_paths(p.pop("objects"), p.pop("frames"), p)
    print(text)
    if not args.smoke:
        from _common import write_json_and_text

        write_json_and_text(os.path.join(args.out, f"host_ops_{args.config}_{results['date']}"), results, text)
    return results


if __name__ == "__main__":
    main()
