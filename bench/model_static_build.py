"""Static sm_90 builds of every Triton launch the models make, at the models' own call sites, on CPU.

The image model (one text prompt), the SAM 2-style tracker (clicked objects propagated over a few
frames) and the concept video predictor (a text prompt propagated) run on CPU tensors with their
CUDA dispatch (``KERNEL_PATHS_ON_CPU``). Each ``sam3fast::`` op they call first runs its CUDA body,
whose kernel launches are compiled for an H100 with the specialisation Triton would give those
arguments (``sam3fast.kernels._static_build.capture``) and recorded instead of run, then its CPU
kernel (the reference), whose value the model goes on with. So a launch that cannot build for the
GPU at the shapes the model gives it (e.g. an integer argument equal to 1, which Triton passes as a
constant) fails here, on a machine without a GPU, as it would fail on the device; the kernel tests'
own shapes may not meet it (session 18: the memory attention's (B, 1, L, D) stream made
``residual_norm``'s window addressing divide by a constant 0).

    env -u TRITON_INTERPRET python bench/model_static_build.py                 # tiny config, bf16
    env -u TRITON_INTERPRET python bench/model_static_build.py --parts tracker --objects 1,4
    env -u TRITON_INTERPRET python bench/model_static_build.py --config sam3   # full size: slow on CPU

Prints each op's calls, the kernels built (name, registers, spills) and every failure; exits 1 on
a failure. Static facts, not timings. The tiny config's 8-wide heads keep the two-way, rpb and
prompt cross-attention kernels off (as in the CPU error-budget tests), so those are not reached there.
The mask decoder's two-way kernels run on a GPU whenever the step is captured (the tracker graphs
its step up to ``GRAPH_AUTO_MAX_ROWS`` objects) and eagerly from ``EAGER_KERNEL_MIN_BATCH`` objects:
here, with nothing captured, the threshold is lowered to 1 so every object count reaches them as a
graphed step would (full size only, see above).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for p in (HERE, os.path.join(HERE, "..", "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)


def _shapes(args):
    return ", ".join(f"{tuple(a.shape)} {str(a.dtype).replace('torch.', '')}" if torch.is_tensor(a) else repr(a)
                     for a in args)


class OpBuilds:
    """Context manager: while active, each ``sam3fast::`` op call runs its CUDA body (under the
    caller's ``capture`` its launches are built, not run), then its CPU kernel. ``calls``: op name ->
    count; ``failures``: (op, argument shapes, exception) of the CUDA bodies that raised."""

    def __init__(self, builds):
        self.builds = builds  # the list the caller's ``capture`` appends each build to
        self.calls = collections.Counter()
        self.failures = []
        self.builds_by_op = collections.defaultdict(list)
        self._mode = None

    def __enter__(self):
        from torch._library.custom_ops import OPDEFS
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func.namespace == "sam3fast":
                    name = func._schema.name
                    opdef = OPDEFS.get(name)
                    short = name.split("::")[-1]
                    outer.calls[short] += 1
                    if opdef is not None:
                        before = len(outer.builds)
                        try:
                            opdef._init_fn(*args, **kwargs)  # the CUDA body: launches built, not run
                        except Exception as e:  # noqa: BLE001 (every failure is reported)
                            outer.failures.append((short, _shapes(args), e))
                        outer.builds_by_op[short].extend(outer.builds[before:])
                return func(*args, **kwargs)

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return False


def run(parts, config, dtype, objects, frames):
    """(OpBuilds, builds): the parts run under the capture; builds are every launch compiled."""
    import sam3fast
    from sam3fast.kernels import _triton_compat
    from sam3fast.kernels._static_build import all_kernels, capture
    from video_clip import make_clip, write_jpg_folder

    from sam3fast.model.init import stable_random_init_

    cfg = sam3fast.get_config(config)
    small = config == "tiny"

    def detecting(model):  # the tests' recipe: queries score on both sides of 0, so masks come out
        stable_random_init_(model, seed=20, score_gain=6.0, presence_shift=3.0)
        return model
    from sam3fast.model import sam_heads

    _triton_compat.KERNEL_PATHS_ON_CPU = True
    eager_min = sam_heads.EAGER_KERNEL_MIN_BATCH
    sam_heads.EAGER_KERNEL_MIN_BATCH = 1  # the two-way kernels as in a captured step (module docstring)
    try:
        with capture(*all_kernels()) as builds, torch.inference_mode():
            rec = OpBuilds(builds)
            with rec:
                if "image" in parts:
                    model = detecting(sam3fast.build_image_model(cfg, device="cpu", dtype=dtype))
                    pred = sam3fast.ImagePredictor(model, cuda_graphs=False)
                    image = np.random.default_rng(0).integers(0, 256, (72 if small else 720, 96 if small else 1280, 3),
                                                              dtype=np.uint8)
                    pred.predict([image], ["yellow bird"])
                    del model, pred
                if "tracker" in parts or "concept" in parts:
                    with tempfile.TemporaryDirectory(prefix="model_static_build_") as tmp:
                        h, w = (72, 96) if small else (540, 960)
                        clip = write_jpg_folder(make_clip(frames, h, w), os.path.join(tmp, "frames"))
                        if "tracker" in parts:
                            from bench_video import click_objects

                            model = detecting(sam3fast.build_sam3_video_model(config=cfg, device="cpu", dtype=dtype,
                                                                              load_from_HF=False))
                            tracker = model.tracker
                            tracker.backbone = model.detector.backbone
                            for n in objects:
                                st = tracker.init_state(video_path=clip)
                                click_objects(tracker, st, n)
                                for _ in tracker.propagate_in_video(st, start_frame_idx=0,
                                                                    max_frame_num_to_track=frames - 1,
                                                                    reverse=False, tqdm_disable=True,
                                                                    propagate_preflight=True):
                                    pass
                            del model, tracker
                        if "concept" in parts:
                            pred = sam3fast.build_sam3_video_predictor(config=cfg, device="cpu", dtype=dtype,
                                                                       load_from_HF=False)
                            detecting(pred.model)
                            sid = pred.handle_request({"type": "start_session", "resource_path": clip})["session_id"]
                            pred.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 0,
                                                 "text": "blob"})
                            for _ in pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid}):
                                pass
                            pred.handle_request({"type": "close_session", "session_id": sid})
    finally:
        _triton_compat.KERNEL_PATHS_ON_CPU = False
        sam_heads.EAGER_KERNEL_MIN_BATCH = eager_min
    return rec, builds


def _worst_by_kernel(builds) -> dict:
    """Kernel name -> (most registers, most spill stores) over ``builds``."""
    from sam3fast.kernels._static_build import sass_stats

    worst = {}
    for b in builds:
        st = sass_stats(b.kernel)
        regs, spills = worst.get(b.name, (0, 0))
        worst[b.name] = (max(regs, st["regs"]), max(spills, st["spill_stores"]))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--parts", default="image,tracker,concept")
    ap.add_argument("--objects", default="1,4", help="tracker part: clicked objects, comma-separated")
    ap.add_argument("--frames", type=int, default=3)
    args = ap.parse_args(argv)

    rec, builds = run(args.parts.split(","), args.config, getattr(torch, args.dtype),
                      [int(v) for v in args.objects.split(",")], args.frames)
    print(f"# static sm_90 builds at the models' call sites: config {args.config}, {args.dtype}, parts {args.parts}")
    print(f"# {sum(rec.calls.values())} op calls, {len(builds)} launches built, {len(rec.failures)} failures")
    for op in sorted(rec.calls):
        kinds = _worst_by_kernel(rec.builds_by_op.get(op, []))
        desc = ", ".join(f"{k} (regs {r}, spill stores {s})" for k, (r, s) in sorted(kinds.items())) or "no launch"
        print(f"{op:28} {rec.calls[op]:5d} calls  {desc}")
    # launches made outside a sam3fast:: op: a wrapper that calls its launcher directly on CPU tensors
    # (the two-way attention's, whose ops have no CPU kernel); built the same way, their outputs are
    # left unwritten, which only the values after them see
    attributed = {id(b) for bs in rec.builds_by_op.values() for b in bs}
    direct = [b for b in builds if id(b) not in attributed]
    counts = collections.Counter(b.name for b in direct)
    for name, (regs, spills) in sorted(_worst_by_kernel(direct).items()):
        print(f"{'(direct launch)':28} {counts[name]:5d} builds {name} (regs {regs}, spill stores {spills})")
    for op, shapes, e in rec.failures:
        lines = [ln for ln in str(e).splitlines() if ln.strip() and set(ln.strip()) != {"^"}]
        why = str(e.__cause__) if e.__cause__ is not None else (lines[-1] if lines else "")
        print(f"FAILED {op}({shapes}): {type(e).__name__}: {why.strip()[:300]}")
    return 1 if rec.failures else 0


if __name__ == "__main__":
    sys.exit(main())
