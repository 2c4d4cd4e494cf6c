"""Video parity: ``sam3fast.video`` (detector + orchestration + request API, with sam3fast's tracker)
against the official ``sam3`` video predictor, tiny config, same checkpoint, same synthetic clip.

Weights: the official video model re-drawn by ``official_ref.redraw_`` (stable scales, smoothed
transposed convs, gain 10 on the scoring projection, +6 on the presence bias) with +5 on the
tracker's object-score bias, so tracks persist; seed 29 detects, tracks, duplicates and removes several objects on the clip (up to 6 ids,
hotstart removals), seed 26 tracks one object stably (the base of the interactive session). Both
engines run every request; each frame's outputs must have the same object ids, masks with IoU >=
0.99, probabilities within 1e-3 and boxes within 1e-3 relative.

Tests run with one intra-op thread (restored afterwards): on a loaded 2-core machine OpenMP
barriers made two-thread runs 10-50x slower, and these models are tiny.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from kernel_checks import KernelPathsOnCpu
from official_ref import build_official_tracker, redraw_
from official_video_ref import (
    build_official_video_model,
    build_official_video_predictor,
    official_video_mode,
    run_official_session,
    save_official_video_checkpoint,
    to_numpy_outputs,
)
from video_clip import make_clip, write_jpg_folder

from sam3fast.checkpoint import CheckpointError
from sam3fast.config import get_config
from sam3fast.video import (
    Sam3VideoPredictor,
    build_sam3_video_predictor,
    build_video_model,
    generic_nms,
    mask_iou_matrix,
    nms_masks,
)
from sam3fast.video.device_plan import device_plan_refusal
from sam3fast.video.frame_masks import FrameMasks
from sam3fast.video.inference import (
    apply_object_wise_non_overlapping_constraints,
    fill_holes_in_mask_scores,
    masks_to_boxes,
)

CFG = get_config("tiny")
NUM_FRAMES = 20
SCORE_GAIN, PRESENCE_SHIFT, OBJ_SCORE_SHIFT = 10.0, 6.0, 5.0
RICH_SEED, SIMPLE_SEED = 29, 26


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_jpg_folder(make_clip(NUM_FRAMES, 72, 96), str(tmp_path_factory.mktemp("clip") / "frames"))


def _official_model(seed, **overrides):
    # construction draws a buffer (the prompt encoder's Gaussian matrix) from the global generator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_official_video_model(CFG, seed=None, **overrides)
    redraw_(model, seed=seed, score_gain=SCORE_GAIN, presence_shift=PRESENCE_SHIFT)
    with torch.no_grad():
        model.tracker.sam_mask_decoder.pred_obj_score_head.layers[2].bias.add_(OBJ_SCORE_SHIFT)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {seed: save_official_video_checkpoint(_official_model(seed), str(d / f"sam3_tiny_{seed}.pt"))
            for seed in (RICH_SEED, SIMPLE_SEED)}


@pytest.fixture(scope="module")
def predictors(checkpoints):
    cache = {}

    def get(engine, seed):
        if (engine, seed) not in cache:
            if engine == "official":
                cache[engine, seed] = build_official_video_predictor(CFG, checkpoints[seed])
            else:
                cache[engine, seed] = build_sam3_video_predictor(checkpoint_path=checkpoints[seed], config=CFG,
                                                                 device="cpu")
        return cache[engine, seed]

    return get


# ----------------------------------------------------------------------------------------------
# Session runners and comparison


def run_our_session(predictor, resource, steps, close=True):
    """:func:`official_video_ref.run_official_session` for sam3fast (same record format)."""
    sid = predictor.handle_request(request={"type": "start_session", "resource_path": str(resource)})["session_id"]
    records = [{"type": "start_session", "response": {"session_id": sid}}]
    for step in steps:
        req = dict(step, session_id=sid)
        if req["type"] == "propagate_in_video":
            response = [{"frame_index": r["frame_index"], "outputs": to_numpy_outputs(r["outputs"])}
                        for r in predictor.handle_stream_request(request=dict(req))]
        else:
            r = predictor.handle_request(request=dict(req))
            response = ({"frame_index": r["frame_index"], "outputs": to_numpy_outputs(r["outputs"])}
                        if "outputs" in r else dict(r))
        records.append({"type": req["type"], "request": req, "response": response})
    if close:
        predictor.handle_request(request={"type": "close_session", "session_id": sid})
    return records


def _frames(response):
    return response if isinstance(response, list) else [response]


def compare_sessions(official, ours):
    """Assert per-request, per-frame parity; returns a summary for spread checks."""
    assert len(official) == len(ours)
    worst = {"iou": 1.0, "prob": 0.0, "box": 0.0}
    ids_seen, max_objs, frames_cmp = set(), 0, 0
    for i, (a, b) in enumerate(zip(official, ours)):
        assert a["type"] == b["type"]
        ra, rb = a["response"], b["response"]
        if a["type"] == "start_session":
            continue  # fresh uuids
        if not (isinstance(ra, list) or "outputs" in ra):
            assert ra == rb, f"step {i}: {ra} != {rb}"
            continue
        fa, fb = _frames(ra), _frames(rb)
        assert [f["frame_index"] for f in fa] == [f["frame_index"] for f in fb], f"step {i}: frame order"
        for x, y in zip(fa, fb):
            t, oa, ob = x["frame_index"], x["outputs"], y["outputs"]
            where = f"step {i} ({a['type']}) frame {t}"
            assert oa["out_obj_ids"].tolist() == ob["out_obj_ids"].tolist(), where
            assert ob["out_obj_ids"].dtype == np.int64 and ob["out_probs"].dtype == np.float32
            assert ob["out_boxes_xywh"].dtype == np.float32 and ob["out_binary_masks"].dtype == np.bool_
            assert ob["out_binary_masks"].shape == oa["out_binary_masks"].shape, where
            for ma, mb in zip(oa["out_binary_masks"], ob["out_binary_masks"]):
                union = (ma | mb).sum()
                iou = 1.0 if union == 0 else (ma & mb).sum() / union
                worst["iou"] = min(worst["iou"], float(iou))
                assert iou >= 0.99, f"{where}: mask IoU {iou}"
            if len(oa["out_probs"]):
                dp = float(np.abs(oa["out_probs"] - ob["out_probs"]).max())
                db = float(np.abs(oa["out_boxes_xywh"] - ob["out_boxes_xywh"]).max()
                           / max(np.abs(oa["out_boxes_xywh"]).max(), 1e-6))
                worst["prob"], worst["box"] = max(worst["prob"], dp), max(worst["box"], db)
                assert dp <= 1e-3, f"{where}: probs differ by {dp}"
                assert db <= 1e-3, f"{where}: boxes differ by {db} (relative)"
            ids_seen.update(oa["out_obj_ids"].tolist())
            max_objs = max(max_objs, len(oa["out_obj_ids"]))
            frames_cmp += 1
    return {"ids": ids_seen, "max_objs": max_objs, "frames": frames_cmp, **worst}


def _run_both(predictors, seed, clip, steps):
    official = run_official_session(predictors("official", seed), clip, steps)
    ours = run_our_session(predictors("ours", seed), clip, steps)
    return official, ours


# ----------------------------------------------------------------------------------------------
# Sessions


def test_text_prompt_forward_parity(predictors, clip_dir):
    steps = [{"type": "add_prompt", "frame_index": 0, "text": "blob"},
             {"type": "propagate_in_video", "propagation_direction": "forward"}]
    official, ours = _run_both(predictors, RICH_SEED, clip_dir, steps)
    s = compare_sessions(official, ours)
    frames = ours[-1]["response"]
    assert [f["frame_index"] for f in frames] == list(range(NUM_FRAMES))
    # not degenerate: several objects appear, coexist and disappear (hotstart removals, new ids)
    assert len(s["ids"]) >= 5 and s["max_objs"] >= 3, s
    counts = [len(f["outputs"]["out_obj_ids"]) for f in frames]
    assert len(set(counts)) >= 3, counts
    areas = [int(m.sum()) for f in frames for m in f["outputs"]["out_binary_masks"]]
    assert max(areas) > 1000 and min(areas) < 500, areas


def test_text_prompt_mid_frame_both_directions_parity(predictors, clip_dir):
    """Full detect-and-track propagation forward from frame 8, then backward (reverse detector
    buffer, reverse hotstart); then a box (visual) prompt and both directions again."""
    steps = [{"type": "add_prompt", "frame_index": 8, "text": "blob"},
             {"type": "propagate_in_video", "propagation_direction": "both"},
             {"type": "add_prompt", "frame_index": 10, "bounding_boxes": [[0.1, 0.2, 0.5, 0.6]],
              "bounding_box_labels": [1]},
             {"type": "propagate_in_video", "propagation_direction": "both"}]
    official, ours = _run_both(predictors, RICH_SEED, clip_dir, steps)
    s = compare_sessions(official, ours)
    order = [f["frame_index"] for f in ours[2]["response"]]
    assert order == list(range(8, NUM_FRAMES)) + list(range(7, -1, -1))
    assert len(s["ids"]) >= 3, s


def test_points_remove_and_partial_propagation_parity(predictors, clip_dir):
    """Text prompt and forward propagation, a click adding a new object, partial propagation in
    both directions, a refinement click, removal of the clicked object, then partial and cached
    (fetch) propagations."""
    steps = [
        {"type": "add_prompt", "frame_index": 0, "text": "blob"},
        {"type": "propagate_in_video", "propagation_direction": "forward"},
        {"type": "add_prompt", "frame_index": 5, "points": [[0.3, 0.6]], "point_labels": [1], "obj_id": 5},
        {"type": "propagate_in_video", "propagation_direction": "both", "start_frame_index": 5},
        {"type": "add_prompt", "frame_index": 12, "points": [[0.5, 0.5], [0.2, 0.2]], "point_labels": [1, 0],
         "obj_id": 0},
        {"type": "remove_object", "obj_id": 5},
        {"type": "propagate_in_video", "propagation_direction": "forward"},
        {"type": "propagate_in_video", "propagation_direction": "backward", "start_frame_index": 19},
    ]
    official, ours = _run_both(predictors, SIMPLE_SEED, clip_dir, steps)
    s = compare_sessions(official, ours)
    assert s["frames"] >= 4 * NUM_FRAMES
    click = ours[3]["response"]["outputs"]
    assert 5 in click["out_obj_ids"].tolist()
    assert click["out_probs"][click["out_obj_ids"].tolist().index(5)] == 1.0  # a clicked object's score
    both = ours[4]["response"]
    assert all(5 in f["outputs"]["out_obj_ids"].tolist() for f in both)
    for f in ours[7]["response"] + ours[8]["response"]:
        assert 5 not in f["outputs"]["out_obj_ids"].tolist()
        assert f["outputs"]["out_obj_ids"].tolist() == [0]


def _model_session(model, mode, clip, frame_idx=0, directions=(False,)):
    """init_state + text prompt + propagation(s) at the model level -> (records, tracker metadata)."""
    with mode():
        state = model.init_state(resource_path=clip)
        _, first = model.add_prompt(state, frame_idx=frame_idx, text_str="blob")
        out = [(frame_idx, first)]
        for reverse in directions:
            out += list(model.propagate_in_video(state, start_frame_idx=frame_idx, reverse=reverse))
        md = state["tracker_metadata"]
    frames = [{"frame_index": t, "outputs": to_numpy_outputs(o)} for t, o in out]
    return [{"type": "session", "response": frames}], md


def test_orchestration_with_official_tracker_parity(checkpoints, clip_dir):
    """sam3fast's detector and orchestration driving the *official* tracker object, against the
    official model: isolates the orchestration from the tracker port. Forward from frame 8, then
    backward."""
    official = _official_model(RICH_SEED)
    official.load_state_dict(torch.load(checkpoints[RICH_SEED], weights_only=True)["model"])
    hybrid = build_video_model(CFG, checkpoint_path=checkpoints[RICH_SEED], device="cpu")
    hybrid.tracker = _official_model(RICH_SEED).tracker
    hybrid.tracker.load_state_dict(official.tracker.state_dict())
    rec_o, md_o = _model_session(official, official_video_mode, clip_dir, 8, (False, True))
    rec_h, md_h = _model_session(hybrid, official_video_mode, clip_dir, 8, (False, True))
    s = compare_sessions(rec_o, rec_h)
    assert s["iou"] == 1.0 and s["box"] == 0.0 and len(s["ids"]) >= 3, s
    assert md_h["obj_ids_all_gpu"].tolist() == md_o["obj_ids_all_gpu"].tolist()
    assert md_h["rank0_metadata"]["removed_obj_ids"] == md_o["rank0_metadata"]["removed_obj_ids"]


HEURISTIC_VARIANTS = {
    # one-to-one track matching (scipy Hungarian), object limit, boundary filter, bbox-mismatch and
    # 4-frame periodic re-conditioning
    "o2o_limits_recondition": dict(o2o_matching_masklets_enable=True, max_num_objects=3,
                                   suppress_det_close_to_boundary=True, reconstruction_bbox_iou_thresh=0.5,
                                   reconstruction_bbox_det_score=0.5, recondition_every_nth_frame=4),
    # masklet confirmation, keep-alive counters and suppression of long-unmatched tracks
    "confirmation_keep_alive": dict(masklet_confirmation_enable=True, suppress_unmatched_only_within_hotstart=False,
                                    decrease_trk_keep_alive_for_empty_masklets=True, min_trk_keep_alive=-4,
                                    init_trk_keep_alive=0, max_trk_keep_alive=8),
}


@pytest.mark.parametrize("planning", ["device", "host"])
@pytest.mark.parametrize("variant", sorted(HEURISTIC_VARIANTS))
def test_heuristic_variants_model_parity(checkpoints, clip_dir, variant, planning):
    """Heuristics that the released configs leave off, at the model level (``init_state`` /
    ``add_prompt`` / ``propagate_in_video``), both engines built with the same overrides; ours
    planning on the device (where it does not refuse) and on the host."""
    overrides = HEURISTIC_VARIANTS[variant]
    official = _official_model(RICH_SEED, **overrides)
    official.load_state_dict(torch.load(checkpoints[RICH_SEED], weights_only=True)["model"])
    ours = build_video_model(CFG, checkpoint_path=checkpoints[RICH_SEED], device="cpu", **overrides)
    ours.device_planning = planning == "device"

    official_rec, md_o = _model_session(official, official_video_mode, clip_dir)
    ours_rec, md_u = _model_session(ours, contextlib.nullcontext, clip_dir)
    compare_sessions(official_rec, ours_rec)
    assert md_u["obj_ids_all_gpu"].tolist() == md_o["obj_ids_all_gpu"].tolist()
    assert md_u["max_obj_id"] == md_o["max_obj_id"] and md_u["max_obj_id"] >= 3
    r0o, r0u = md_o["rank0_metadata"], md_u["rank0_metadata"]
    assert r0u["removed_obj_ids"] == r0o["removed_obj_ids"]
    refused = device_plan_refusal(ours) is not None
    assert ("plan_state" in r0u) == (planning == "device" and not refused)
    if "plan_state" in r0u:  # the device counters, a row per tracked object
        ids = md_u["obj_ids_all_gpu"].tolist()
        assert len(ids) > 0 and r0u["plan_state"].keep_alive.tolist() == [r0o["trk_keep_alive"][i] for i in ids]
    else:
        assert dict(r0u["trk_keep_alive"]) == dict(r0o["trk_keep_alive"])
    assert {k: v for k, v in r0u["suppressed_obj_ids"].items() if v} == \
        {k: v for k, v in r0o["suppressed_obj_ids"].items() if v}
    if "masklet_confirmation" in r0o:
        for k in ("status", "consecutive_det_num"):
            assert r0u["masklet_confirmation"][k].tolist() == r0o["masklet_confirmation"][k].tolist()


# ----------------------------------------------------------------------------------------------
# Detector step (one frame ahead, NMS, joint scores, bf16-rounded SAM 2 features)


def test_detector_step_parity(checkpoints, clip_dir):
    official = _official_model(RICH_SEED)
    official.load_state_dict(torch.load(checkpoints[RICH_SEED], weights_only=True)["model"])
    ours = build_video_model(CFG, checkpoint_path=checkpoints[RICH_SEED], device="cpu")
    with official_video_mode():
        so = official.init_state(resource_path=clip_dir)
    su = ours.init_state(resource_path=clip_dir)
    for s in (so, su):
        s["input_batch"].find_text_batch[0] = "blob"
    fco, fcu = {}, {}
    for t, reverse in [(0, False), (1, False), (2, False), (9, True), (8, True)]:
        with official_video_mode(), torch.inference_mode():
            do = official.run_backbone_and_detection(
                frame_idx=t, num_frames=NUM_FRAMES, input_batch=so["input_batch"],
                geometric_prompt=so["constants"]["empty_geometric_prompt"], feature_cache=fco, reverse=reverse,
                allow_new_detections=True)
        with torch.inference_mode():
            du = ours.run_backbone_and_detection(
                frame_idx=t, num_frames=NUM_FRAMES, input_batch=su["input_batch"], geometric_prompt=None,
                feature_cache=fcu, reverse=reverse, allow_new_detections=True)
            # the next frame's detection is queued (overlap_next_detection): the planning read
            # launches it; here, by hand, so that the one-ahead buffer is the official's
            assert ours.detector._deferred is not None or t + (-1 if reverse else 1) in fcu["multigpu_buffer"]
            ours.detector.run_deferred()
        assert sorted(fco["multigpu_buffer"]) == sorted(fcu["multigpu_buffer"]), t
        assert sorted(k for k in fco if isinstance(k, int)) == sorted(k for k in fcu if isinstance(k, int))
        bo, bu = fco["multigpu_buffer"][t], fcu["multigpu_buffer"][t]
        lo, lu = bo["pred_logits"][0], bu["pred_logits"]
        torch.testing.assert_close(lu, lo, rtol=1e-4, atol=1e-4)
        # NMS-suppressed queries (-1e4) are the same ones
        assert torch.equal(lu < -100, lo < -100)
        torch.testing.assert_close(bu["pred_boxes_xyxy"], bo["pred_boxes_xyxy"][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bu["pred_masks"], bo["pred_masks"][0], rtol=1e-4, atol=1e-3)
        # ours keeps every query slot with a validity mask; the valid ones are the official's list
        assert du["valid"].shape == du["scores"].shape and du["valid"].dtype == torch.bool
        for k in ("scores", "bbox", "mask"):
            got = du[k][du["valid"]]
            assert got.shape == do[k].shape, (t, k)
            torch.testing.assert_close(got, do[k], rtol=1e-4, atol=1e-3)
        to = fco[t][1]["tracker_backbone_out"]
        tu = fcu[t][1]["tracker_backbone_out"]
        for a, b in zip(tu["backbone_fpn"], to["backbone_fpn"]):
            torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)
        # SAM 2 features are bf16-rounded values
        f2 = bu["tracker_backbone_fpn_2"]
        assert torch.equal(f2, f2.to(torch.bfloat16).float())
    p = lu.sigmoid()
    assert (p > 0.5).sum() >= 1 and (lu < -100).sum() >= 1  # some kept, some suppressed by NMS


# ----------------------------------------------------------------------------------------------
# Tensor helpers vs the official ones


def _random_masks(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, h // 4, w // 4, generator=g)
    return torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)[:, 0] * 4 + 0.5


def test_nms_and_iou_match_official():
    with official_video_mode():
        from sam3.perflib.masks_ops import mask_iou
        from sam3.perflib.nms import generic_nms_cpu, nms_masks as official_nms

        for seed in range(6):
            masks = _random_masks(16, 32, 32, seed)
            probs = torch.rand(16, generator=torch.Generator().manual_seed(100 + seed))
            for thr in (0.1, 0.5):
                keep = nms_masks(probs, masks, 0.5, thr)
                assert torch.equal(keep, official_nms(probs, masks, 0.5, thr)), (seed, thr)
            b = masks > 0
            torch.testing.assert_close(mask_iou_matrix(b, b[:5]), mask_iou(b, b[:5]), rtol=0, atol=0)
        # ties: the official CPU order (argsort()[::-1]) keeps the later index first
        ious = torch.ones(3, 3)
        scores = torch.tensor([0.7, 0.9, 0.9])
        keep = generic_nms(ious, scores, torch.ones(3, dtype=torch.bool), 0.5)
        assert keep.tolist() == [False, False, True]
        assert generic_nms_cpu(ious, scores, 0.5).tolist() == [2]


def test_mask_helpers_match_official():
    with official_video_mode():
        from sam3.model.sam3_tracker_utils import fill_holes_in_mask_scores as official_fill
        from sam3.perflib.masks_ops import masks_to_boxes as official_boxes

        logits = _random_masks(5, 32, 40, 7)
        logits[1] = -5.0  # an empty mask
        logits[2, 10:13, 10:13] = -3.0  # a 9-pixel hole
        for area in (0, 16):
            torch.testing.assert_close(fill_holes_in_mask_scores(logits[:, None], area),
                                       official_fill(logits[:, None], area), rtol=0, atol=0)
        binary = logits > 0
        torch.testing.assert_close(masks_to_boxes(binary), official_boxes(binary, list(range(5))), rtol=0, atol=0)
        empty = torch.zeros(0, 1, 32, 40)
        assert fill_holes_in_mask_scores(empty, 16).shape == empty.shape

        tracker = build_official_tracker(CFG)
        scores = torch.tensor([[0.3], [0.9], [0.9], [0.1], [0.5]])
        torch.testing.assert_close(
            apply_object_wise_non_overlapping_constraints(binary[:, None], scores, background_value=0),
            tracker._apply_object_wise_non_overlapping_constraints(binary[:, None], scores, background_value=0),
            rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors, and the session stays usable


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory):
    return write_jpg_folder(make_clip(4, 72, 96, seed=1), str(tmp_path_factory.mktemp("short") / "frames"))


def test_bad_requests_keep_session_usable(predictors, short_clip, tmp_path):
    pred = predictors("ours", SIMPLE_SEED)
    sid = pred.handle_request({"type": "start_session", "resource_path": short_clip})["session_id"]

    def req(**kw):
        return pred.handle_request(dict(kw, session_id=sid))

    with pytest.raises(RuntimeError, match="Cannot find session"):
        pred.handle_request({"type": "add_prompt", "session_id": "nope", "frame_index": 0, "text": "blob"})
    with pytest.raises(RuntimeError, match="Cannot find session"):
        list(pred.handle_stream_request({"type": "propagate_in_video", "session_id": "nope"}))
    with pytest.raises(RuntimeError, match="No prompts"):
        list(pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid}))
    with pytest.raises(ValueError, match="out of range"):
        req(type="add_prompt", frame_index=4, text="blob")
    with pytest.raises(ValueError, match="out of range"):
        req(type="add_prompt", frame_index=-1, text="blob")
    with pytest.raises(ValueError, match="at least one type of prompt"):
        req(type="add_prompt", frame_index=0)
    with pytest.raises(ValueError, match="one box"):
        req(type="add_prompt", frame_index=0, bounding_boxes=[[0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]],
            bounding_box_labels=[1, 1])
    with pytest.raises(ValueError, match="inside \\[0, 1\\]"):
        req(type="add_prompt", frame_index=0, bounding_boxes=[[0.9, 0.1, 0.5, 0.2]], bounding_box_labels=[1])
    with pytest.raises(RuntimeError, match="invalid request type"):
        req(type="frobnicate")

    first = req(type="add_prompt", frame_index=0, text="blob")
    assert first["frame_index"] == 0 and len(first["outputs"]["out_obj_ids"]) >= 1
    frames = list(pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid,
                                              "propagation_direction": "forward", "start_frame_index": 0}))
    assert [f["frame_index"] for f in frames] == [0, 1, 2, 3]
    before = [f["outputs"]["out_obj_ids"].tolist() for f in frames]

    with pytest.raises(ValueError, match="outside the frame"):
        req(type="add_prompt", frame_index=1, points=[[1.5, 0.5]], point_labels=[1], obj_id=9)
    with pytest.raises(ValueError, match="outside the frame"):
        req(type="add_prompt", frame_index=1, points=[[0.5, -0.1]], point_labels=[1], obj_id=9)
    with pytest.raises(ValueError, match="point_labels"):
        req(type="add_prompt", frame_index=1, points=[[0.5, 0.5]], point_labels=[1, 0], obj_id=9)
    with pytest.raises(ValueError, match="out of range"):
        req(type="add_prompt", frame_index=7, points=[[0.5, 0.5]], point_labels=[1], obj_id=9)
    with pytest.raises(ValueError, match="obj_id"):
        req(type="add_prompt", frame_index=1, points=[[0.5, 0.5]], point_labels=[1])
    with pytest.raises(ValueError, match="Object 12345 not found"):
        req(type="remove_object", obj_id=12345)
    with pytest.raises(ValueError, match="propagation direction"):
        list(pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid,
                                         "propagation_direction": "sideways"}))
    with pytest.raises(ValueError, match="out of range"):
        list(pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid,
                                         "start_frame_index": 10}))

    # nothing above changed the session: a fetch returns the same frames, and it still takes clicks
    again = list(pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid,
                                             "propagation_direction": "forward", "start_frame_index": 0}))
    assert [f["outputs"]["out_obj_ids"].tolist() for f in again] == before
    click = req(type="add_prompt", frame_index=1, points=[[0.5, 0.5]], point_labels=[1], obj_id=9)
    assert 9 in click["outputs"]["out_obj_ids"].tolist()
    assert pred.handle_request({"type": "reset_session", "session_id": sid}) == {"is_success": True}
    assert pred.handle_request({"type": "close_session", "session_id": sid}) == {"is_success": True}
    assert pred.handle_request({"type": "close_session", "session_id": sid}) == {"is_success": True}  # idempotent


def test_bad_resources(predictors, tmp_path):
    pred = predictors("ours", SIMPLE_SEED)
    with pytest.raises(FileNotFoundError):
        pred.handle_request({"type": "start_session", "resource_path": str(tmp_path / "missing.mp4")})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError):
        pred.handle_request({"type": "start_session", "resource_path": str(empty)})
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError):
        pred.handle_request({"type": "start_session", "resource_path": str(garbage)})
    with pytest.raises(ValueError, match="resource_path"):
        pred.handle_request({"type": "start_session"})
    assert pred._ALL_INFERENCE_STATES == {}  # no half-made session left behind


# ----------------------------------------------------------------------------------------------
# Builders


def test_builders_strict_and_signatures(checkpoints, tmp_path):
    sd = torch.load(checkpoints[SIMPLE_SEED], weights_only=True)["model"]
    model = build_video_model(CFG, checkpoint_path=checkpoints[SIMPLE_SEED], device="cpu")
    assert set(model.state_dict()) == set(sd)
    assert all(k.startswith(("detector.", "tracker.")) for k in sd)

    missing = dict(sd)
    missing.pop("tracker.no_obj_ptr")
    p = str(tmp_path / "missing.pt")
    torch.save({"model": missing}, p)
    with pytest.raises(CheckpointError, match="tracker.no_obj_ptr"):
        build_video_model(CFG, checkpoint_path=p, device="cpu")
    extra = dict(sd, **{"detector.bogus": torch.zeros(1)})
    torch.save({"model": extra}, p)
    with pytest.raises(CheckpointError, match="detector.bogus"):
        build_video_model(CFG, checkpoint_path=p, device="cpu")

    if torch.cuda.device_count() < 2:  # (several GPUs: tests/test_video_multigpu.py)
        with pytest.raises(ValueError, match="no CUDA device|are visible"):
            build_sam3_video_predictor(checkpoint_path=checkpoints[SIMPLE_SEED], config=CFG, gpus_to_use=[0, 1])
    pred = build_sam3_video_predictor(checkpoints[SIMPLE_SEED], config=CFG, device="cpu")  # positional, as official
    assert isinstance(pred, Sam3VideoPredictor) and pred.model.hotstart_delay == 15
    ablation = build_video_model(CFG, device="cpu", apply_temporal_disambiguation=False)
    assert ablation.hotstart_delay == 0 and ablation.recondition_every_nth_frame == 0
    assert not ablation.tracker.use_memory_selection
    # random weights are reproducible, buffers included
    again = build_video_model(CFG, device="cpu", apply_temporal_disambiguation=False)
    for (k, a), b in zip(ablation.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_compiled_video_model_parity(checkpoints, predictors, clip_dir):
    """``compile`` (here the aot_eager backend: graph capture without code generation): the
    detector stages and the tracker step run compiled, fullgraph, with the official outputs."""
    torch._dynamo.reset()
    model = build_video_model(CFG, checkpoint_path=checkpoints[RICH_SEED], device="cpu", compile="aot_eager")
    assert model.tracker._memory_step_compiled is not None
    steps = [{"type": "add_prompt", "frame_index": 0, "text": "blob"},
             {"type": "propagate_in_video", "propagation_direction": "forward"}]
    official = run_official_session(predictors("official", RICH_SEED), clip_dir, steps)
    ours = run_our_session(Sam3VideoPredictor(model=model), clip_dir, steps)
    compare_sessions(official, ours)
    assert model.tracker.step_counts["fixed_capacity"] > 0
    torch._dynamo.reset()


@pytest.mark.parametrize("kernel_paths", [False, True], ids=["cpu_paths", "cuda_dispatch"])
def test_bf16_video_session_error_budget(checkpoints, clip_dir, kernel_paths):
    """A bfloat16 video model runs detect-and-track end to end against the float32 official, next to
    the official's own bfloat16 mode (its CUDA autocast; ``torch.autocast("cpu", bfloat16)`` stands
    in): on at least as many frames as the autocast it reports the official's object ids, and on
    those its mean mask disagreement (1 - IoU) and mean largest probability difference are at most
    2x the autocast's (measured 0.14x and 0.12x: the autocast's session drifts further). Where the
    stand-in keeps the official's ids on fewer than 80 % of the frames (a machine whose CPU bf16
    autocast loses them; see the assertion), the ids on every frame and fixed drift bounds instead.
    ``cuda_dispatch``: the modules take their CUDA paths (``KernelPathsOnCpu``: the kernels' ops, whose
    CPU kernels are the references), which must call the tracker's ops listed and keep the budget."""
    steps = [{"type": "add_prompt", "frame_index": 0, "text": "blob"},
             {"type": "propagate_in_video", "propagation_direction": "forward"}]
    official = build_official_video_predictor(CFG, checkpoints[SIMPLE_SEED])  # its own: autocast runs on it
    ref = run_official_session(official, clip_dir, steps)[-1]["response"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = run_official_session(official, clip_dir, steps)[-1]["response"]
    pred = build_sam3_video_predictor(checkpoint_path=checkpoints[SIMPLE_SEED], config=CFG, device="cpu",
                                      dtype=torch.bfloat16)
    record = KernelPathsOnCpu() if kernel_paths else contextlib.nullcontext()
    with record:
        got = run_our_session(pred, clip_dir, steps)[-1]["response"]
    assert len(ref) == len(auto) == len(got) == NUM_FRAMES
    if kernel_paths:  # (the tiny config's 8-wide heads keep the two-way, rpb and prompt kernels off)
        want = {"rope", "residual_norm", "memory_attention", "rope_projection", "dwconv_norm", "layer_norm2d",
                "mask_postprocess", "connected_component_sizes", "table_apply_staged_", "table_ptr_slots",
                "table_memory_tokens"}
        assert want <= record.ops, sorted(record.ops)

    def drift(run):
        same, miss, dprob = 0, [], []
        for a, b in zip(ref, run):
            a, b = a["outputs"], b["outputs"]
            assert np.isfinite(b["out_probs"]).all() and np.isfinite(b["out_boxes_xywh"]).all()
            if a["out_obj_ids"].tolist() != b["out_obj_ids"].tolist():
                continue
            same += 1
            for ma, mb in zip(a["out_binary_masks"], b["out_binary_masks"]):
                union = (ma | mb).sum()
                miss.append(0.0 if union == 0 else 1.0 - (ma & mb).sum() / union)
            if len(a["out_probs"]):
                dprob.append(float(np.abs(a["out_probs"] - b["out_probs"]).max()))
        return same, float(np.mean(miss)), float(np.mean(dprob))

    (same16, miss16, prob16), (same_a, miss_a, prob_a) = drift(got), drift(auto)
    assert same16 >= same_a, (same16, same_a)
    if same_a >= 0.8 * NUM_FRAMES:
        assert 0 < miss_a and miss16 <= 2 * miss_a, (miss16, miss_a)
        assert 0 < prob_a and prob16 <= 2 * prob_a, (prob16, prob_a)
    else:
        # The stand-in lost the official's objects: on an AMD EPYC without AVX-512 (2026-11-27) the
        # official under the CPU bf16 autocast reported no object on any frame where its float32 run
        # reports one at probability 0.96, so there is no shared frame to compare drift on. Then
        # the bf16 model must keep the official's ids on every frame within fixed bounds (measured
        # there: mask disagreement 0.009-0.010, probability difference 0.0005).
        assert same16 == NUM_FRAMES, (same16, same_a)
        assert miss16 <= 0.05 and prob16 <= 0.005, (miss16, prob16)


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "sequential"])
def test_concept_video_host_reads_per_frame(checkpoints, clip_dir, monkeypatch, pipelined):
    """Steady state of a text-prompted propagation: the host reads tensor values only through the
    model's ``host_channel``, and (``pipelined_outputs``, the default) with one copy per frame: the
    planning copy, which also carries the outputs queued after the frame before, plus one at the end
    for the last frame's held outputs. Without pipelining each yielded frame's outputs take a copy
    of their own. (On a GPU each copy is one wait on an event; not counted here: the CPU backend of
    hole filling, scipy, which on CUDA is a Triton kernel reading nothing.)"""
    from host_reads import record_host_reads

    pred = build_sam3_video_predictor(checkpoint_path=checkpoints[RICH_SEED], config=CFG, device="cpu")
    model = pred.model
    model.pipelined_outputs = pipelined
    sid = pred.handle_request({"type": "start_session", "resource_path": clip_dir})["session_id"]
    pred.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 0, "text": "blob"})
    armed, ran, start = [False], [], {}
    orig = model._run_single_frame_inference

    def run(inference_state, frame_idx, reverse):
        if frame_idx == 3:  # (frames 1-2: tracker banks are built, with the official scan)
            armed[0], start["transfers"] = True, model.host_channel.transfers
        if armed[0]:
            ran.append(frame_idx)
        return orig(inference_state, frame_idx, reverse)

    monkeypatch.setattr(model, "_run_single_frame_inference", run)
    reads = model._read_for_planning
    planning = []
    monkeypatch.setattr(model, "_read_for_planning", lambda flat: planning.append(1) or reads(flat))
    yielded = []
    with record_host_reads(monkeypatch, armed) as hits:
        for r in pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid}):
            if armed[0]:
                yielded.append(r["frame_index"])
        armed[0] = False
    assert len(ran) == NUM_FRAMES - 3 and len(yielded) > 0
    transfers = model.host_channel.transfers - start["transfers"]
    assert len(planning) >= len(ran)  # every frame plans (and reads) once
    counted = [h for h in hits if not h[1].startswith("connected_components.py")]
    assert counted and all(name == "numpy" and site.startswith("host_channel.py:") for name, site in counted), counted
    if pipelined:
        assert transfers == len(ran) + 1, (transfers, len(ran))
    else:
        # one copy per frame yielded before the last; the hotstart_delay frames held at the end
        # come out together after it, with one copy
        at_end = model.hotstart_delay
        assert transfers == len(ran) + len(yielded) - at_end + 1, (transfers, len(ran), len(yielded))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ahead", [False, True], ids=["one_stream", "ahead_stream"])
def test_cuda_concept_frames_make_no_implicit_sync(checkpoints, clip_dir, monkeypatch, ahead):
    """On CUDA, a concept-video frame that neither adds nor removes objects (nor re-conditions
    them) waits for the device only where it means to (the planning read, an event), and so does
    the output path of every frame (its read is an event): ``torch.cuda.set_sync_debug_mode("warn")``
    reports no synchronising call (a copy from or to pageable memory, ``.item()``, ``nonzero``...).
    A blocking host-to-device copy would also wait for the next frame's detection, queued behind
    the planning copy. ``ahead``: with ``ahead_detection_stream`` (the next detection on a side
    stream, launched before the tracker step) as well."""
    import warnings

    pred = build_sam3_video_predictor(checkpoint_path=checkpoints[RICH_SEED], config=CFG, device="cuda")
    model = pred.model
    model.ahead_detection_stream = ahead
    sid = pred.handle_request({"type": "start_session", "resource_path": clip_dir})["session_id"]
    pred.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 0, "text": "blob"})
    orig, per_frame = model._run_single_frame_inference, {}

    def run(inference_state, frame_idx, reverse):
        before = inference_state["tracker_metadata"].get("obj_ids_all_gpu")
        before = None if before is None else before.tolist()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = orig(inference_state, frame_idx, reverse)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        after = inference_state["tracker_metadata"]["obj_ids_all_gpu"].tolist()
        syncs = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message)]
        per_frame[frame_idx] = (before == after and len(after) > 0, syncs)
        return out

    launch, output_syncs = model._postprocess_launch, []

    def post(*args, **kwargs):  # the output path: launch and read, on every yielded frame
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                read = launch(*args, **kwargs)
                out = read()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        output_syncs.extend(f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                            if "synchroniz" in str(w.message))
        return lambda: out

    monkeypatch.setattr(model, "_run_single_frame_inference", run)
    monkeypatch.setattr(model, "_postprocess_launch", post)
    frames = list(pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid}))
    assert len(frames) == NUM_FRAMES
    # steady: no object added or removed, and no periodic re-conditioning (tracker state edits)
    nth = model.recondition_every_nth_frame
    steady = {f: syncs for f, (same, syncs) in per_frame.items() if same and f >= 3 and not (nth > 0 and f % nth == 0)}
    assert len(steady) >= 3, {f: same for f, (same, _) in per_frame.items()}
    assert all(not syncs for syncs in steady.values()), steady
    assert not output_syncs, output_syncs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pipelined_outputs_ride_in_the_planning_copy(checkpoints, clip_dir):
    """On CUDA the default (``pipelined_outputs``) sends each frame's outputs to the host inside the
    next frame's planning copy (one gathered, 16-byte aligned, pinned copy per frame): the
    outputs equal those of the sequential mode, where each frame's outputs take a copy of their
    own, and the copies number one per frame plus one at the end."""
    runs, transfers = {}, {}
    for pipelined in (False, True):
        pred = build_sam3_video_predictor(checkpoint_path=checkpoints[RICH_SEED], config=CFG, device="cuda")
        pred.model.pipelined_outputs = pipelined
        sid = _session_frames(pred, clip_dir)
        before = pred.model.host_channel.transfers
        runs[pipelined] = [to_numpy_outputs(r["outputs"])
                           for r in pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid})]
        transfers[pipelined] = pred.model.host_channel.transfers - before
    assert len(runs[True]) == len(runs[False]) == NUM_FRAMES
    assert sum(len(o["out_obj_ids"]) for o in runs[True]) > 0  # objects were output
    for t, (a, b) in enumerate(zip(runs[False], runs[True])):
        assert a["out_obj_ids"].tolist() == b["out_obj_ids"].tolist(), t
        assert np.array_equal(a["out_binary_masks"], b["out_binary_masks"]), t
        assert np.array_equal(a["out_probs"], b["out_probs"]) and np.array_equal(a["out_boxes_xywh"],
                                                                                 b["out_boxes_xywh"]), t
    assert transfers[True] <= NUM_FRAMES + 1 < transfers[False], transfers


# ----------------------------------------------------------------------------------------------
# Device memory stays flat as the video grows


def _session_frames(pred, resource, text="blob"):
    sid = pred.handle_request({"type": "start_session", "resource_path": resource})["session_id"]
    pred.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 0, "text": text})
    return sid


def _stream(pred, sid):
    """A session's propagation (forward), each frame's outputs as numpy."""
    return [to_numpy_outputs(r["outputs"]) for r in
            pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid})]


def _same_outputs(got, want):
    """Two sessions' frames: the same ids, and bit for bit the same masks, probabilities and boxes."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a["out_obj_ids"].tolist() == b["out_obj_ids"].tolist()
        for key in ("out_binary_masks", "out_probs", "out_boxes_xywh"):
            assert np.array_equal(a[key], b[key]), key


def test_session_frames_stream_from_the_host(checkpoints, clip_dir):
    """The session's frames are a FrameStore (host uint8); after a propagation the device holds at
    most its cache of frames, and the outputs equal those of a session on the batch-loaded
    frames (the official layout: all frames on the device)."""
    from sam3fast.video.io import FrameStore, load_video

    pred = build_sam3_video_predictor(checkpoint_path=checkpoints[SIMPLE_SEED], config=CFG, device="cpu")
    sid = _session_frames(pred, clip_dir)
    state = pred._ALL_INFERENCE_STATES[sid]["state"]
    store = state["input_batch"].img_batch
    assert isinstance(store, FrameStore) and len(store) == NUM_FRAMES
    streamed = _stream(pred, sid)
    assert store.device_bytes <= store.cache_size * store[0].numel() * 2
    # the same session on a (T, 3, R, R) tensor of every frame
    frames, _, _ = load_video(clip_dir, CFG.resolution)
    state["input_batch"].img_batch = frames
    pred.handle_request({"type": "reset_session", "session_id": sid})
    pred.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 0, "text": "blob"})
    batch = _stream(pred, sid)
    assert len(streamed) == NUM_FRAMES
    _same_outputs(streamed, batch)


def test_closed_session_leaves_its_object_table_to_the_next(checkpoints, clip_dir):
    """A closed session's object table (the tracker's memory rows) serves the next session of the
    same shapes: no new table, so on a GPU no new capture of the tracker step; and the next
    session's outputs are bit for bit those of a new predictor."""
    pred = build_sam3_video_predictor(checkpoint_path=checkpoints[SIMPLE_SEED], config=CFG, device="cpu")
    tracker = pred.model.tracker

    def session():
        sid = _session_frames(pred, clip_dir)
        out = _stream(pred, sid)
        tables = list(tracker._tables)
        pred.handle_request({"type": "close_session", "session_id": sid})
        return out, tables

    first, tables = session()
    assert len(tables) == 1 and tables[0].used > 0 and max(len(o["out_obj_ids"]) for o in first) > 0
    second, again = session()
    assert again == tables and tracker._tables == tables  # the same table, kept as the spare
    fresh = build_sam3_video_predictor(checkpoint_path=checkpoints[SIMPLE_SEED], config=CFG, device="cpu")
    assert len(second) == NUM_FRAMES
    _same_outputs(second, _stream(fresh, _session_frames(fresh, clip_dir)))


def test_interleaved_sessions_keep_their_own_tables(checkpoints, clip_dir, short_clip):
    """Two live sessions streamed frame by frame in turn, then a third after the first closes:
    no live session's table goes to another (the third takes the closed one's), and every
    session's outputs are bit for bit its outputs alone on a new predictor."""
    def solo(resource):
        p = build_sam3_video_predictor(checkpoint_path=checkpoints[SIMPLE_SEED], config=CFG, device="cpu")
        return _stream(p, _session_frames(p, resource))

    pred = build_sam3_video_predictor(checkpoint_path=checkpoints[SIMPLE_SEED], config=CFG, device="cpu")
    tracker = pred.model.tracker
    sids = [_session_frames(pred, clip_dir), _session_frames(pred, short_clip)]
    streams = [pred.handle_stream_request({"type": "propagate_in_video", "session_id": s}) for s in sids]
    got, done = [[], []], [False, False]
    while not all(done):
        for i, stream in enumerate(streams):
            if not done[i]:
                r = next(stream, None)
                done[i] = r is None
                if r is not None:
                    got[i].append(to_numpy_outputs(r["outputs"]))

    def table_of(sid):
        held = {id(t) for t in tracker._tables}
        states = pred._ALL_INFERENCE_STATES[sid]["state"]["tracker_inference_states"]
        tables = {id(st["memory_bank"]["bank"].table) for st in states if st.get("memory_bank")}
        assert len(tables) == 1 and tables <= held, (tables, held)
        return tables.pop()

    first, second = table_of(sids[0]), table_of(sids[1])
    assert first != second
    pred.handle_request({"type": "close_session", "session_id": sids[0]})
    third = _session_frames(pred, clip_dir)
    got.append(_stream(pred, third))
    assert table_of(third) == first and table_of(sids[1]) == second
    for out, want in zip(got, [solo(clip_dir), solo(short_clip), solo(clip_dir)]):
        assert len(out) > 0
        _same_outputs(out, want)


def test_retired_outputs_session_matches(checkpoints, clip_dir, monkeypatch):
    """On CUDA finished outputs leave the device (the tracker's stored frames, the cached masks).
    Forced on the CPU with clones standing in for the host copies, through clicks, removal, partial
    and cached (fetch) propagation: the same outputs, and the cache holds the retired copies."""
    steps = [
        {"type": "add_prompt", "frame_index": 0, "text": "blob"},
        {"type": "propagate_in_video", "propagation_direction": "forward"},
        {"type": "add_prompt", "frame_index": 5, "points": [[0.3, 0.6]], "point_labels": [1], "obj_id": 5},
        {"type": "propagate_in_video", "propagation_direction": "both", "start_frame_index": 5},
        {"type": "remove_object", "obj_id": 5},
        {"type": "propagate_in_video", "propagation_direction": "backward", "start_frame_index": 19},
    ]
    runs, copies = {}, set()

    def to_host(v):
        c = v.clone()
        copies.add(c.data_ptr())
        return c

    for retire in (False, True):
        pred = build_sam3_video_predictor(checkpoint_path=checkpoints[SIMPLE_SEED], config=CFG, device="cpu")
        if retire:
            monkeypatch.setattr(pred.model, "_retires_outputs", lambda: True)
            monkeypatch.setattr(pred.model, "_to_host", to_host)
            monkeypatch.setattr(pred.model.tracker, "_retires", lambda st: True)
            monkeypatch.setattr(pred.model.tracker, "_to_host", to_host)
            monkeypatch.setattr(pred.model.tracker, "_mark_retired", lambda: None)
        records = run_our_session(pred, clip_dir, steps, close=False)
        runs[retire] = [r["response"] for r in records[1:] if r["type"] != "remove_object"]
        state = next(iter(pred._ALL_INFERENCE_STATES.values()))["state"]
    # a fully propagated frame caches its low-res logits (FrameMasks, one host copy per frame), a
    # clicked or partially propagated one its (1, H, W) masks (one host copy per object)
    frames = list(state["cached_frame_outputs"].values())
    cached = [f.low for f in frames if isinstance(f, FrameMasks)]
    cached += [m for f in frames if not isinstance(f, FrameMasks) for m in f.values()]
    assert len(frames) >= NUM_FRAMES and all(m.data_ptr() in copies for m in cached)
    trackers = state["tracker_inference_states"]
    assert sum(len(t.get("retired_outputs", {})) for t in trackers) >= NUM_FRAMES // 2
    for a, b in zip(runs[False], runs[True]):
        a, b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
        assert len(a) == len(b)
        for fa, fb in zip(a, b):
            assert fa["outputs"]["out_obj_ids"].tolist() == fb["outputs"]["out_obj_ids"].tolist()
            assert np.array_equal(fa["outputs"]["out_binary_masks"], fb["outputs"]["out_binary_masks"])
            assert np.array_equal(fa["outputs"]["out_probs"], fb["outputs"]["out_probs"])


def test_retired_frame_masks_are_host_copies(checkpoints, clip_dir, monkeypatch):
    """A full propagation caches every frame with objects as FrameMasks whose logits are the
    retired (host) copy, one per frame, holding the rows of its unhidden objects only."""
    copies = set()

    def to_host(v):
        c = v.clone()
        copies.add(c.data_ptr())
        return c

    pred = build_sam3_video_predictor(checkpoint_path=checkpoints[RICH_SEED], config=CFG, device="cpu")
    monkeypatch.setattr(pred.model, "_retires_outputs", lambda: True)
    monkeypatch.setattr(pred.model, "_to_host", to_host)
    steps = [{"type": "add_prompt", "frame_index": 0, "text": "blob"},
             {"type": "propagate_in_video", "propagation_direction": "forward"}]
    records = run_our_session(pred, clip_dir, steps, close=False)
    state = next(iter(pred._ALL_INFERENCE_STATES.values()))["state"]
    cache = state["cached_frame_outputs"]
    assert sorted(cache) == list(range(NUM_FRAMES))
    assert all(isinstance(f, FrameMasks) or len(f) == 0 for f in cache.values())  # ({} without objects)
    held = [f for f in cache.values() if isinstance(f, FrameMasks)]
    assert len(held) >= NUM_FRAMES // 2
    # one host copy per frame (not per object; the prompt frame runs twice), plus a gather of it
    # (on the host) for a frame with hidden objects
    assert len(held) <= len(copies) <= 2 * len(held) + 1 and all(f.low.data_ptr() in copies for f in held)
    assert all(f.low.shape[0] == len(f) for f in held)
    shown = {r["frame_index"]: set(r["outputs"]["out_obj_ids"].tolist()) for r in records[-1]["response"]}
    assert any(shown.values())
    for t, f in cache.items():  # the cache holds at least the shown objects (empty ones too)
        assert shown[t] <= set(f), (t, shown[t], list(f))


def test_memory_encoder_passes_do_not_change_the_session(checkpoints, clip_dir, monkeypatch):
    """The memory encoder over several sessions in one pass (the default) or one pass per session
    (the official's way, MEMORY_ENCODER_ROWS = 1): the same session."""
    from sam3fast.video import inference

    steps = [{"type": "add_prompt", "frame_index": 0, "text": "blob"},
             {"type": "propagate_in_video", "propagation_direction": "forward"}]
    runs, calls = {}, {}
    for rows in (64, 1):
        monkeypatch.setattr(inference, "MEMORY_ENCODER_ROWS", rows)
        pred = build_sam3_video_predictor(checkpoint_path=checkpoints[RICH_SEED], config=CFG, device="cpu")
        encode, n = pred.model.tracker._run_memory_encoder, [0]

        def counted(*a, encode=encode, n=n, **k):
            n[0] += 1
            return encode(*a, **k)

        monkeypatch.setattr(pred.model.tracker, "_run_memory_encoder", counted)
        runs[rows] = run_our_session(pred, clip_dir, steps)
        calls[rows] = n[0]
    compare_sessions(runs[1], runs[64])
    assert calls[1] > calls[64] + 3, calls  # frames with several sessions occurred


@pytest.mark.parametrize("hotstart", [True, False], ids=["hotstart", "no_hotstart"])
def test_pipelined_outputs_same_outputs_one_frame_later(checkpoints, clip_dir, monkeypatch, hotstart):
    """``pipelined_outputs``: every frame's outputs equal the default mode's, and each is yielded
    only after the next frame's inference ran (its copy to the host overlapped that frame)."""
    runs, order = {}, []
    for pipelined in (False, True):
        pred = build_sam3_video_predictor(checkpoint_path=checkpoints[RICH_SEED], config=CFG, device="cpu")
        model = pred.model
        model.pipelined_outputs = pipelined
        if not hotstart:
            model.hotstart_delay = 0
        sid = _session_frames(pred, clip_dir)
        if pipelined:
            orig = model._run_single_frame_inference

            def run(inference_state, frame_idx, reverse, orig=orig):
                order.append(("run", frame_idx))
                return orig(inference_state, frame_idx, reverse)

            monkeypatch.setattr(model, "_run_single_frame_inference", run)
        frames = []
        for r in pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid}):
            order.append(("yield", r["frame_index"])) if pipelined else None
            frames.append((r["frame_index"], to_numpy_outputs(r["outputs"])))
        runs[pipelined] = frames
    assert [f for f, _ in runs[False]] == [f for f, _ in runs[True]] == list(range(NUM_FRAMES))
    for (_, a), (_, b) in zip(runs[False], runs[True]):
        assert a["out_obj_ids"].tolist() == b["out_obj_ids"].tolist()
        assert np.array_equal(a["out_binary_masks"], b["out_binary_masks"])
        assert np.array_equal(a["out_probs"], b["out_probs"]) and np.array_equal(a["out_boxes_xywh"],
                                                                                 b["out_boxes_xywh"])
    delay = model.hotstart_delay
    lag = max(delay, 1)  # frame f's outputs are launched after frame f + delay - 1 (hotstart) or f ran
    for f in range(NUM_FRAMES - 1 - delay):  # (the last frames all come out at the end)
        ran = order.index(("run", f + lag))
        assert order.index(("yield", f)) > ran, (f, order)


def test_async_loading_frames_session_matches(checkpoints, clip_dir):
    """``async_loading_frames=True``: the frames decode in a background thread while the session
    runs; the outputs are those of the eager loader."""
    steps = [{"type": "add_prompt", "frame_index": 0, "text": "blob"},
             {"type": "propagate_in_video", "propagation_direction": "forward"}]
    runs = {}
    for async_loading in (False, True):
        pred = build_sam3_video_predictor(checkpoint_path=checkpoints[SIMPLE_SEED], config=CFG, device="cpu",
                                          async_loading_frames=async_loading)
        runs[async_loading] = run_our_session(pred, clip_dir, steps)[-1]["response"]
    assert len(runs[True]) == NUM_FRAMES
    for a, b in zip(runs[False], runs[True]):
        assert a["outputs"]["out_obj_ids"].tolist() == b["outputs"]["out_obj_ids"].tolist()
        assert np.array_equal(a["outputs"]["out_binary_masks"], b["outputs"]["out_binary_masks"])
