"""The static video detector step and its CUDA-graph runner (sam3fast.video.graphs), and the video
detector wired through them.

On CPU the step, run on preallocated buffers (by hand and through the runner, which then runs it
eagerly), must equal the detector's eager ``_detect_frame`` exactly, frame after frame, with and
without NMS and with a geometric box prompt; a whole session with the step forced must equal one
without. GPU-only tests (replay = eager, outputs safe from the next replay, no host sync during a
replay, a whole propagation with graphs = one without) skip cleanly without CUDA.

Weights and clip: the video parity tests' fixtures (the official model re-drawn so that the
detector finds, and NMS suppresses, several objects on the synthetic clip). The GPU tests draw the
same recipe on sam3fast's model directly: the official model cannot be built on a CUDA machine by
those helpers (its CPU mode fakes the device properties).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_video_parity import (  # fixtures and helpers only (no test_* names: nothing is collected twice)
    CFG,
    NUM_FRAMES,
    OBJ_SCORE_SHIFT,
    PRESENCE_SHIFT,
    RICH_SEED,
    SCORE_GAIN,
    _session_frames,
    checkpoints,  # noqa: F401 -- a fixture
    clip_dir,  # noqa: F401 -- a fixture
    run_our_session,
    to_numpy_outputs,
)
from video_clip import make_clip, write_jpg_folder

from sam3fast.video import build_sam3_video_predictor, build_video_model, graphs
from sam3fast.video.graphs import OUTPUT_KEYS, DetectorKey, GraphedDetector, detector_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NMS = dict(run_nms=True, nms_prob_thresh=0.5, nms_iou_thresh=0.1)  # the session's (score thr, det_nms_thresh)
NO_NMS = dict(run_nms=False, nms_prob_thresh=None, nms_iou_thresh=None)
FRAMES = (0, 7, 13, 19)


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _setup(checkpoint, clip, device):
    model = build_video_model(CFG, checkpoint_path=checkpoint, device=device)
    det = model.detector
    with torch.inference_mode():
        state = model.init_state(resource_path=clip)
        feats, mask = det.encode_text_batch(["blob"])
    return det, state["input_batch"].img_batch, feats, mask


@pytest.fixture(scope="module")
def cpu_setup(checkpoints, clip_dir):  # noqa: F811
    return _setup(checkpoints[RICH_SEED], clip_dir, "cpu")


def _box(device):
    # one positive box (cxcywh in [0, 1]) over the left part of the frame
    return {"boxes": torch.tensor([[[0.3, 0.55, 0.4, 0.5]]], device=device),
            "box_labels": torch.ones((1, 1), dtype=torch.bool, device=device)}


def _flat(out):
    assert list(out) == list(OUTPUT_KEYS)
    return [out[k] for k in OUTPUT_KEYS[:-1]] + list(out["tracker_backbone_pos_enc"])


def _assert_equal(a, b, where=""):
    for k, x, y in zip(list(OUTPUT_KEYS[:-1]) + ["pos_enc"] * 3, _flat(a), _flat(b)):
        assert x.shape == y.shape and x.dtype == y.dtype, (where, k)
        assert torch.equal(x, y), (where, k, (x.float() - y.float()).abs().max().item())


def _eager(det, images, t, feats, mask, geo, nms):
    with torch.inference_mode():
        return det._detect_frame(t, images=images, text_feats=feats, text_mask=mask, geometric_prompt=geo, **nms)


# ----------------------------------------------------------------------------------------------
# CPU: the step on buffers = the eager path


@pytest.mark.parametrize("geo", [False, True], ids=["text", "text+box"])
@pytest.mark.parametrize("nms", [False, True], ids=["no_nms", "nms"])
def test_static_step_on_buffers_equals_detect_frame(cpu_setup, nms, geo):
    det, images, feats, mask = cpu_setup
    assert not det._uses_graphed_step()  # on CPU the eager path is what _detect_frame runs
    nms_kw = NMS if nms else NO_NMS
    g = _box("cpu") if geo else None
    R = det.cfg.resolution
    # buffers allocated once, refilled per frame (the frame cast from the store's float16 by the copy)
    frame = torch.full((1, 3, R, R), float("nan"))
    tf, tm = torch.full_like(feats, float("nan")), torch.zeros_like(mask)
    bx = torch.full((1, 1, 4), float("nan")) if geo else None
    bl = torch.zeros((1, 1), dtype=torch.bool) if geo else None
    runner = GraphedDetector(det)
    assert not runner.cuda_graphs and runner.why_not_graphs(runner.key(feats, bx, **nms_kw)) is not None
    suppressed = 0
    prev = None
    for t in FRAMES:
        want = _eager(det, images, t, feats, mask, g, nms_kw)
        with torch.inference_mode():
            frame.copy_(images[t][None])
            tf.copy_(feats)
            tm.copy_(mask)
            if geo:
                bx.copy_(g["boxes"])
                bl.copy_(g["box_labels"])
            got = detector_step(det, frame, tf, tm, bx, bl, **nms_kw)
            via_runner = runner.run(images[t], feats, mask, g and g["boxes"], g and g["box_labels"], **nms_kw)
        _assert_equal(got, want, f"step t={t}")
        _assert_equal(via_runner, want, f"runner t={t}")
        suppressed += int((want["pred_logits"] < -100).sum())
        if prev is not None:  # the buffers were refilled: another frame, other outputs
            assert not torch.equal(prev["pred_masks"], want["pred_masks"])
        prev = want
    assert len(runner.entries) == 1  # one key, its buffers reused frame after frame
    (e,) = runner.entries.values()
    assert e.key.boxes == (1 if geo else -1) and e.key.run_nms == nms and e.graph is None
    if nms:
        assert suppressed >= 1  # NMS did suppress queries on these frames
    else:
        assert suppressed == 0


def test_box_prompt_reaches_the_step(cpu_setup):
    """The geometric prompt buffer is read: a box changes the outputs, and a different box too."""
    det, images, feats, mask = cpu_setup
    runner = GraphedDetector(det)
    with torch.inference_mode():
        plain = runner.run(images[3], feats, mask, **NMS)
        boxed = runner.run(images[3], feats, mask, _box("cpu")["boxes"], _box("cpu")["box_labels"], **NMS)
        other = runner.run(images[3], feats, mask, torch.tensor([[[0.7, 0.3, 0.2, 0.2]]]),
                           torch.ones((1, 1), dtype=torch.bool), **NMS)
    assert not torch.equal(plain["pred_logits"], boxed["pred_logits"])
    assert not torch.equal(boxed["pred_logits"], other["pred_logits"])
    assert torch.equal(plain["tracker_backbone_fpn_0"], boxed["tracker_backbone_fpn_0"])  # backbone: no prompt
    assert sorted(k.boxes for k in runner.entries) == [-1, 1]


def test_runner_outputs_survive_the_next_call_and_alias_no_buffer(cpu_setup):
    det, images, feats, mask = cpu_setup
    runner = GraphedDetector(det)
    with torch.inference_mode():
        a = runner.run(images[4], feats, mask, **NMS)
        keep = [x.clone() for x in _flat(a)]
        b = runner.run(images[5], feats, mask, **NMS)
    for x, y in zip(_flat(a), keep):
        assert torch.equal(x, y)
    assert not torch.equal(a["pred_masks"], b["pred_masks"])
    (e,) = runner.entries.values()
    buffers = {t.untyped_storage().data_ptr() for t in e.inputs.values()}
    assert not buffers & {t.untyped_storage().data_ptr() for t in _flat(b)}


def test_runner_rejects_bad_inputs(cpu_setup):
    det, images, feats, mask = cpu_setup
    with pytest.raises(ValueError, match="CUDA"):
        GraphedDetector(det, cuda_graphs=True)
    runner = GraphedDetector(det)
    R = det.cfg.resolution
    cases = [
        (dict(frame=torch.zeros(3, R + 1, R)), "frame"),
        (dict(frame=torch.zeros(2, 3, R, R)), "frame"),
        (dict(text_feats=feats.repeat(2, 1, 1)), "one prompt"),
        (dict(text_mask=mask.float()), "text_mask"),
        (dict(boxes=_box("cpu")["boxes"]), "together"),
        (dict(boxes=torch.zeros(1, 1, 3), box_labels=torch.ones(1, 1, dtype=torch.bool)), "boxes"),
    ]
    for over, match in cases:
        kw = dict(frame=images[0], text_feats=feats, text_mask=mask, boxes=None, box_labels=None)
        kw.update(over)
        with pytest.raises(ValueError, match=match):
            runner.run(kw["frame"], kw["text_feats"], kw["text_mask"], kw["boxes"], kw["box_labels"], **NO_NMS)
    with pytest.raises(ValueError, match="nms_prob_thresh"):
        runner.run(images[0], feats, mask, run_nms=True)
    assert isinstance(runner.key(feats, None, **NMS), DetectorKey)


STEPS = [{"type": "add_prompt", "frame_index": 8, "text": "blob"},
         {"type": "propagate_in_video", "propagation_direction": "both"},
         {"type": "add_prompt", "frame_index": 10, "bounding_boxes": [[0.1, 0.2, 0.5, 0.6]],
          "bounding_box_labels": [1]},
         {"type": "propagate_in_video", "propagation_direction": "both"}]


def _responses(records):
    out = []
    for r in records[1:]:
        resp = r["response"]
        out += resp if isinstance(resp, list) else ([resp] if "outputs" in resp else [])
    return out


def _assert_same_frames(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["frame_index"] == y["frame_index"]
        oa, ob = x["outputs"], y["outputs"]
        assert oa["out_obj_ids"].tolist() == ob["out_obj_ids"].tolist(), x["frame_index"]
        for k in ("out_binary_masks", "out_probs", "out_boxes_xywh"):
            assert np.array_equal(oa[k], ob[k]), (x["frame_index"], k)


def test_session_with_forced_static_step_matches(checkpoints, clip_dir, monkeypatch):  # noqa: F811
    """A text prompt propagated both ways from frame 8 (forward and reverse one-ahead buffer),
    then a box (visual) prompt and both ways again: the step forced through the runner gives the
    outputs of the eager path, and the runner did serve every detector call."""
    runs, runners = {}, {}
    for forced in (False, True):
        pred = build_sam3_video_predictor(checkpoint_path=checkpoints[RICH_SEED], config=CFG, device="cpu")
        det = pred.model.detector
        if forced:
            monkeypatch.setattr(det, "_uses_graphed_step", lambda: True)
            detects, steps = [], []
            monkeypatch.setattr(det, "_detect_frame",
                                lambda *a, _f=det._detect_frame, **k: detects.append(1) or _f(*a, **k))
            monkeypatch.setattr(graphs, "detector_step",
                                lambda *a, _f=graphs.detector_step, **k: steps.append(1) or _f(*a, **k))
        runs[forced] = _responses(run_our_session(pred, clip_dir, STEPS))
        runners[forced] = det._graph_runner
    assert runners[False] is None  # nothing changes on CPU unless forced
    keys = sorted(k.boxes for k in runners[True].entries)
    assert keys == [-1, 1], keys  # text only, and text + the visual box on the prompted frame's call(s)
    # every detector call (both propagations: every frame twice at least) went through the step
    assert len(steps) == len(detects) >= 2 * NUM_FRAMES
    frames = runs[True]
    assert sum(len(f["outputs"]["out_obj_ids"]) for f in frames) >= NUM_FRAMES  # objects were tracked
    _assert_same_frames(runs[False], runs[True])


def test_recipe_weights_detect_and_track_on_cpu(clip_dir):  # noqa: F811
    """The GPU tests' weights (below) find and track objects on the clip: checked here on CPU, so the
    GPU comparisons are not between empty outputs."""
    pred = build_sam3_video_predictor(config=CFG, device="cpu", load_from_HF=False)
    pred.model.load_state_dict(_recipe_state_dict())
    frames = _responses(run_our_session(pred, clip_dir, STEPS[:2]))
    assert len(frames) == NUM_FRAMES + 1  # the prompted frame, then the propagation
    assert sum(len(f["outputs"]["out_obj_ids"]) for f in frames) >= NUM_FRAMES


# ----------------------------------------------------------------------------------------------
# GPU: capture and replay


def _recipe_state_dict():
    """The parity tests' weight recipe drawn on sam3fast's own model (same names, same init
    function), for the GPU tests: building the official model there is not possible (its CPU mode
    fakes the CUDA device properties, and official_ref's torchvision shim is for CPU torch)."""
    from sam3fast.model.init import stable_random_init_

    model = build_video_model(CFG, device="cpu")
    stable_random_init_(model, seed=RICH_SEED, score_gain=SCORE_GAIN, presence_shift=PRESENCE_SHIFT)
    with torch.no_grad():
        model.tracker.sam_mask_decoder.pred_obj_score_head.layers[2].bias.add_(OBJ_SCORE_SHIFT)
    return model.state_dict()


@pytest.fixture(scope="module")
def gpu_weights():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return _recipe_state_dict()


def _cuda_predictor(weights):
    pred = build_sam3_video_predictor(config=CFG, device="cuda", load_from_HF=False)
    pred.model.load_state_dict(weights)  # copied in place: strict, every key
    return pred


@pytest.fixture(scope="module")
def gpu_setup(gpu_weights, clip_dir):  # noqa: F811
    model = build_video_model(CFG, device="cuda")
    model.load_state_dict(gpu_weights)
    det = model.detector
    with torch.inference_mode():
        state = model.init_state(resource_path=clip_dir)
        feats, mask = det.encode_text_batch(["blob"])
    return det, state["input_batch"].img_batch, feats, mask


def _close(a, b, where):
    # The replay launches the very kernels the eager call does; equal up to float32 rounding of any
    # kernel whose reduction order is not fixed (expected bit-equal).
    for k, x, y in zip(list(OUTPUT_KEYS[:-1]) + ["pos_enc"] * 3, _flat(a), _flat(b)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where} {k}: {m}")
    assert torch.equal(a["pred_logits"] < -100, b["pred_logits"] < -100), where  # same NMS decisions


@needs_cuda
@pytest.mark.parametrize("geo", [False, True], ids=["text", "text+box"])
@pytest.mark.parametrize("nms", [False, True], ids=["no_nms", "nms"])
def test_gpu_replay_equals_eager(gpu_setup, nms, geo):
    det, images, feats, mask = gpu_setup
    assert det._uses_graphed_step()
    nms_kw = NMS if nms else NO_NMS
    g = _box("cuda") if geo else None
    runner = GraphedDetector(det)
    key = runner.key(feats, g and g["boxes"], **nms_kw)
    assert runner.why_not_graphs(key) is None, runner.why_not_graphs(key)
    for t in FRAMES:
        det.cuda_graphs = False
        try:
            want = _eager(det, images, t, feats, mask, g, nms_kw)
        finally:
            det.cuda_graphs = True
        with torch.inference_mode():
            got = runner.run(images[t], feats, mask, g and g["boxes"], g and g["box_labels"], **nms_kw)
        _close(got, want, f"t={t}")
    e = runner.entries[key]
    assert e.graph is not None and e.replays == len(FRAMES)
    det.world_size = 2
    try:
        assert det._uses_graphed_step()  # each rank replays its own graph for its frame of a chunk
    finally:
        det.world_size = 1
    # the cached position encodings are handed through (not rewritten by a replay), the rest cloned
    assert runner._written[key] == (True,) * 7 + (False,) * 3


@needs_cuda
def test_gpu_outputs_held_across_the_next_replay(gpu_setup):
    det, images, feats, mask = gpu_setup
    runner = GraphedDetector(det)
    with torch.inference_mode():
        a = runner.run(images[2], feats, mask, **NMS)
        keep = [x.clone() for x in _flat(a)]
        b = runner.run(images[3], feats, mask, **NMS)
        c = runner.run(images[4], feats, mask, **NMS)
    torch.cuda.synchronize()
    for x, y in zip(_flat(a), keep):
        assert torch.equal(x, y)
    assert not torch.equal(a["pred_masks"], b["pred_masks"]) and not torch.equal(b["pred_masks"], c["pred_masks"])
    (e,) = runner.entries.values()
    graph_out = {t.untyped_storage().data_ptr() for t in e.outputs[:7]}
    assert not graph_out & {t.untyped_storage().data_ptr() for t in _flat(a)[:7]}


@needs_cuda
def test_gpu_no_host_sync_during_replay(gpu_setup):
    det, images, feats, mask = gpu_setup
    runner = GraphedDetector(det)
    frames = [images[t] for t in (5, 6, 7)]  # read (and moved to the device) before the check
    g = _box("cuda")
    with torch.inference_mode():
        runner.run(frames[0], feats, mask, **NMS)  # capture (syncs there are allowed)
        runner.run(frames[0], feats, mask, g["boxes"], g["box_labels"], **NMS)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for f in frames:
                runner.run(f, feats, mask, **NMS)
                runner.run(f, feats, mask, g["boxes"], g["box_labels"], **NMS)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert all(e.replays == 1 + len(frames) for e in runner.entries.values())


@needs_cuda
def test_gpu_propagation_with_graphs_equals_without(gpu_weights, clip_dir):  # noqa: F811
    runs, runners = {}, {}
    for use_graphs in (False, True):
        pred = _cuda_predictor(gpu_weights)
        pred.model.detector.cuda_graphs = use_graphs
        runs[use_graphs] = _responses(run_our_session(pred, clip_dir, STEPS))
        runners[use_graphs] = pred.model.detector._graph_runner
    assert runners[False] is None
    assert sorted(k.boxes for k in runners[True].entries) == [-1, 1]
    assert all(e.graph is not None for e in runners[True].entries.values())
    assert sum(len(f["outputs"]["out_obj_ids"]) for f in runs[True]) >= NUM_FRAMES
    a, b = runs[False], runs[True]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        oa, ob = x["outputs"], y["outputs"]
        assert x["frame_index"] == y["frame_index"]
        assert oa["out_obj_ids"].tolist() == ob["out_obj_ids"].tolist(), x["frame_index"]
        for ma, mb in zip(oa["out_binary_masks"], ob["out_binary_masks"]):
            union = (ma | mb).sum()
            assert union == 0 or (ma & mb).sum() / union >= 0.999, x["frame_index"]
        np.testing.assert_allclose(oa["out_probs"], ob["out_probs"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(oa["out_boxes_xywh"], ob["out_boxes_xywh"], rtol=1e-5, atol=1e-3)


@needs_cuda
def test_gpu_ahead_detection_stream_equals_one_stream(gpu_weights, clip_dir):  # noqa: F811
    """``ahead_detection_stream``: the next frame's detection on a side stream (its graph replayed
    there, its outputs waited for by event) gives the session of the one-stream default (STEPS:
    text and box prompts, clicks, removals, both directions). (Its steady frames' syncs:
    test_video_parity.test_cuda_concept_frames_make_no_implicit_sync.)"""
    runs = {}
    for ahead in (False, True):
        pred = _cuda_predictor(gpu_weights)
        pred.model.ahead_detection_stream = ahead
        runs[ahead] = _responses(run_our_session(pred, clip_dir, STEPS))
        assert (pred.model.detector._ahead.stream is not None) == ahead
    assert sum(len(f["outputs"]["out_obj_ids"]) for f in runs[True]) >= NUM_FRAMES
    _assert_same_frames(runs[False], runs[True])


# ----------------------------------------------------------------------------------------------
# GPU: device memory stays flat as the video grows (sam3fast.video: FrameStore, retired outputs)


@needs_cuda
def test_gpu_session_memory_is_flat_and_outputs_unchanged(gpu_weights, tmp_path):
    """On CUDA, finished outputs (the tracker's stored frames, the cached video-resolution masks)
    leave the device: allocated device memory does not grow with the frames, and the outputs are
    those of a session that keeps everything on the device (the official placement); a fetch of
    early frames reads the retired outputs back. (Here, not in test_video_parity: the recipe
    weights drawn on sam3fast's own model, no official model needed on the GPU machine.)"""
    n = 48
    clip = write_jpg_folder(make_clip(n, 72, 96), str(tmp_path / "long"))
    runs, growth = {}, {}
    for retire in (False, True):
        pred = _cuda_predictor(gpu_weights)
        pred.model.retire_finished_outputs = retire
        pred.model.tracker.retire_finished_outputs = retire
        sid = _session_frames(pred, clip)
        mem, outs = [], []
        for r in pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid}):
            torch.cuda.synchronize()
            mem.append(torch.cuda.memory_allocated())
            outs.append(to_numpy_outputs(r["outputs"]))
        growth[retire] = mem[-1] - mem[n // 3]
        fetched = [to_numpy_outputs(r["outputs"]) for r in pred.handle_stream_request(
            {"type": "propagate_in_video", "session_id": sid, "start_frame_index": 2,
             "max_frame_num_to_track": 3, "propagation_direction": "forward"})]
        runs[retire] = outs, fetched
        pred.handle_request({"type": "close_session", "session_id": sid})
        del pred
        torch.cuda.empty_cache()
    assert sum(len(o["out_obj_ids"]) for o in runs[True][0]) >= n  # objects were tracked
    for a, b in zip(runs[False][0] + runs[False][1], runs[True][0] + runs[True][1]):
        assert a["out_obj_ids"].tolist() == b["out_obj_ids"].tolist()
        assert np.array_equal(a["out_binary_masks"], b["out_binary_masks"])
        assert np.array_equal(a["out_probs"], b["out_probs"])
    assert growth[False] > 0, growth  # the official placement grows with the video
    assert growth[True] <= 0.05 * growth[False], growth


def test_next_detection_launched_behind_the_planning_read(checkpoints, clip_dir, monkeypatch):  # noqa: F811
    """``overlap_next_detection`` (default): frame t+1's detection is launched after frame t's
    tracker step and planning copy (so the host's wait covers frame t only), not before the tracker
    step as the official order has it; the outputs are the same either way (same computations), and
    a reset session leaves nothing queued."""
    runs, orders = {}, {}
    for overlap in (False, True, "ahead"):
        pred = build_sam3_video_predictor(checkpoint_path=checkpoints[RICH_SEED], config=CFG, device="cpu")
        model = pred.model
        model.overlap_next_detection = overlap is True
        # off CUDA the side-stream launch is the official order: launched at once, inline
        model.ahead_detection_stream = overlap == "ahead"
        log = []
        det = model.detector
        monkeypatch.setattr(det, "_detect_frame",
                            lambda t, *a, _f=det._detect_frame, _l=log, **k: _l.append(("detect", t)) or _f(t, *a, **k))
        monkeypatch.setattr(model, "_read_for_planning",
                            lambda flat, _f=model._read_for_planning, _l=log: _l.append(("read", None)) or _f(flat))
        monkeypatch.setattr(model, "run_tracker_propagation",
                            lambda *a, _f=model.run_tracker_propagation, _l=log, **k:
                            _l.append(("track", k["frame_idx"])) or _f(*a, **k))
        runs[overlap] = _responses(run_our_session(pred, clip_dir, STEPS[:2]))
        orders[overlap] = log
        det._deferred = (3, {}, {})  # as if a session stopped with the next detection queued
        with torch.inference_mode():
            model.reset_state(model.init_state(resource_path=clip_dir))
        assert det._deferred is None  # a reset drops it (nothing would launch it for the old buffer)
    _assert_same_frames(runs[False], runs[True])
    _assert_same_frames(runs[False], runs["ahead"])

    def gaps(log):
        """For every "track t, read, detect f" run: f - t (which frame the detection after frame t's
        planning read is for)."""
        return [log[i + 2][1] - log[i][1] for i in range(len(log) - 2)
                if log[i][0] == "track" and log[i + 1][0] == "read" and log[i + 2][0] == "detect"]

    # overlapped: right after frame t's read comes frame t +- 1's detection (the next frame); in the
    # official order it is frame t +- 2's, launched at the start of frame t +- 1 (nothing between).
    # Where a propagation turns (the reverse pass starts away from the last forward frame) the
    # first detection is a plain one-frame call: at most two such gaps.
    for overlap, dist in ((True, 1), (False, 2), ("ahead", 2)):
        g = gaps(orders[overlap])
        assert sum(abs(x) == dist for x in g) >= NUM_FRAMES - 4, (overlap, g)
        assert sum(abs(x) != dist for x in g) <= 2, (overlap, g)
    assert sorted(t for k, t in orders[False] if k == "detect") == sorted(t for k, t in orders[True] if k == "detect")
