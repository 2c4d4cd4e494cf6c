"""Multi-device video predictor (``sam3fast.video.distributed``) on CPU: gloo, 2 processes.

The same code as on GPUs (frame-parallel detection, objects sharded across ranks, the plan
broadcast as a device tensor) must give rank 0 outputs identical to one process; a worker that
raises or dies must give one clear RuntimeError quickly; shutdown must leave no process and no
port; a new predictor must work afterwards. Tiny config, the RICH_SEED checkpoint of
``test_video_parity`` (several objects entering and leaving), a 10-frame clip.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time

import numpy as np
import pytest
import torch

from test_video_parity import CFG, RICH_SEED, checkpoints  # noqa: F401 (fixture)
from video_clip import make_clip, write_jpg_folder

from sam3fast.video import Sam3VideoPredictorMultiGPU, build_sam3_video_predictor
from sam3fast.video.distributed import decode_plan, encode_plan, pack_bytes, plan_size, unpack_bytes

TIMEOUT_S = 60.0  # per collective; faults are detected by polling, well before this


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def clip10(tmp_path_factory):
    return write_jpg_folder(make_clip(10, 72, 96), str(tmp_path_factory.mktemp("clip10") / "frames"))


def _build(checkpoints, **kw):  # noqa: F811
    return build_sam3_video_predictor(checkpoint_path=checkpoints[RICH_SEED], config=CFG, devices=["cpu", "cpu"],
                                      collective_timeout_s=TIMEOUT_S, **kw)


@pytest.fixture(scope="module")
def two_ranks(checkpoints):  # noqa: F811
    pred = _build(checkpoints)
    yield pred
    pred.shutdown()


def _children():
    return [p for p in multiprocessing.active_children() if p.name.startswith("sam3fast-video-rank")]


def _session(pred, clip, steps):
    sid = pred.handle_request({"type": "start_session", "resource_path": clip})["session_id"]
    out, layout = [], None
    for step in steps:
        req = dict(step, session_id=sid)
        if req["type"] == "propagate_in_video":
            out.extend((r["frame_index"], r["outputs"]) for r in pred.handle_stream_request(req))
        else:
            r = pred.handle_request(req)
            if "outputs" in r:
                out.append((r["frame_index"], r["outputs"]))
    layout = [a.tolist() for a in pred._ALL_INFERENCE_STATES[sid]["state"]["tracker_metadata"]["obj_ids_per_gpu"]]
    pred.handle_request({"type": "close_session", "session_id": sid})
    return out, layout


def _assert_identical(a, b):
    assert [t for t, _ in a] == [t for t, _ in b]
    for (t, x), (_, y) in zip(a, b):
        for k in ("out_obj_ids", "out_probs", "out_boxes_xywh", "out_binary_masks"):
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), f"frame {t}: {k} differs"


STEPS = [
    {"type": "add_prompt", "frame_index": 0, "text": "blob"},
    {"type": "propagate_in_video", "propagation_direction": "forward"},
]


def test_two_ranks_identical_to_one_process(checkpoints, clip10, two_ranks):  # noqa: F811
    one = build_sam3_video_predictor(checkpoint_path=checkpoints[RICH_SEED], config=CFG, device="cpu")
    ref, ref_layout = _session(one, clip10, STEPS)
    two_ranks._ctx.stats.clear()
    got, layout = _session(two_ranks, clip10, STEPS)
    _assert_identical(ref, got)
    # the scene: at least 4 objects, some appear after the first frame and some leave before the end
    seen = {t: set(o["out_obj_ids"].tolist()) for t, o in ref[1:]}
    ids = set().union(*seen.values())
    assert len(ids) >= 4, ids
    first = {i: min(t for t in seen if i in seen[t]) for i in ids}
    left = [(i, t) for i in ids for t in seen if t > first[i] and i not in seen[t]]
    assert any(f > 0 for f in first.values()) and left, (first, seen)
    # objects were sharded: both ranks hold objects (least-loaded placement alternates them)
    assert len(ref_layout) == 1 and len(layout) == 2
    assert layout[0] and layout[1], layout
    assert sorted(layout[0] + layout[1]) == sorted(ref_layout[0])
    # the steady-state traffic went through the device collectives
    stats = two_ranks._ctx.stats
    assert stats["detector outputs"] > 0 and stats["tracker masks and scores"] > 0


CLICK_STEPS = [
    {"type": "add_prompt", "frame_index": 0, "text": "blob"},
    {"type": "propagate_in_video", "propagation_direction": "forward"},
    {"type": "add_prompt", "frame_index": 5, "points": [[0.3, 0.6]], "point_labels": [1], "obj_id": 7},
    {"type": "propagate_in_video", "propagation_direction": "both", "start_frame_index": 5},
    {"type": "add_prompt", "frame_index": 6, "points": [[0.5, 0.5], [0.2, 0.2]], "point_labels": [1, 0],
     "obj_id": 1},
    {"type": "remove_object", "obj_id": 7},
    {"type": "propagate_in_video", "propagation_direction": "forward"},
]


def test_clicks_and_partial_propagation_identical(checkpoints, clip10, two_ranks):  # noqa: F811
    """Clicks on a new object and on an object held by rank 1, partial propagations (the refined
    objects' masks travel from their rank), removal: rank 0 answers as one process does."""
    one = build_sam3_video_predictor(checkpoint_path=checkpoints[RICH_SEED], config=CFG, device="cpu")
    ref, _ = _session(one, clip10, CLICK_STEPS)
    got, layout = _session(two_ranks, clip10, CLICK_STEPS)
    _assert_identical(ref, got)
    assert 1 in layout[1]  # the refined object lives on rank 1
    assert any(7 in o["out_obj_ids"].tolist() for _, o in got)


def test_stream_stopped_early_keeps_ranks_in_step(clip10, two_ranks):
    sid = two_ranks.handle_request({"type": "start_session", "resource_path": clip10})["session_id"]
    two_ranks.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 0, "text": "blob"})
    gen = two_ranks.handle_stream_request({"type": "propagate_in_video", "session_id": sid,
                                           "propagation_direction": "forward"})
    next(gen)
    gen.close()  # rank 0 finishes the propagation with the workers, then the next request works
    two_ranks.handle_request({"type": "remove_object", "session_id": sid, "obj_id": 0})
    two_ranks.handle_request({"type": "close_session", "session_id": sid})


def test_uniform_bad_request_keeps_predictor_usable(clip10, two_ranks):
    sid = two_ranks.handle_request({"type": "start_session", "resource_path": clip10})["session_id"]
    with pytest.raises(ValueError, match="out of range"):
        two_ranks.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 99, "text": "blob"})
    r = two_ranks.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 0, "text": "blob"})
    assert r["frame_index"] == 0
    two_ranks.handle_request({"type": "close_session", "session_id": sid})


def test_plan_roundtrip_and_packing():
    plan = {"new_det_fa_inds": np.array([7, 2]), "new_det_obj_ids": np.array([5, 6]),
            "new_det_gpu_ids": np.array([1, 0]), "obj_ids_newly_removed": {3},
            "num_obj_dropped_due_to_limit": 1, "trk_id_to_max_iou_high_conf_det": {4: 9, 1: 0}}
    buf = encode_plan(12, plan, [2, 3], num_queries=10, num_tracks=5, recondition=True, device="cpu")
    assert buf.shape == (plan_size(2, 10, 5),) and buf.dtype == torch.int64
    d = decode_plan(buf.numpy(), 2, 10)
    assert d["frame_idx"] == 12 and d["recondition"] and d["num_obj_per_gpu"].tolist() == [2, 3]
    assert d["new_det_fa_inds"].tolist() == [7, 2] and d["new_det_obj_ids"].tolist() == [5, 6]
    assert d["new_det_gpu_ids"].tolist() == [1, 0] and d["obj_ids_newly_removed"] == {3}
    assert list(d["trk_id_to_max_iou_high_conf_det"].items()) == [(4, 9), (1, 0)]  # order kept
    assert plan_size(8, 200, 40) == plan_size(8, 200, 64) == 7 + 8 + 1000 + 64  # fixed in steps of 64 objects
    x, y = torch.randn(3, 5), torch.randn(2, 4).to(torch.bfloat16).float()
    flat, specs = pack_bytes([x, y], [None, torch.bfloat16])
    assert flat.numel() == 3 * 5 * 4 + 2 * 4 * 2
    a, b = unpack_bytes(flat, specs)
    assert torch.equal(a, x) and torch.equal(b, y) and b.dtype == torch.float32


def _free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_shutdown_leaves_nothing_and_worker_faults_are_clear(checkpoints, clip10, two_ranks):  # noqa: F811
    # (after the shared predictor's tests: it is shut down here, then new predictors are built)
    port = two_ranks._store.port
    two_ranks.shutdown()
    assert _children() == [] and _free(port)
    with pytest.raises(RuntimeError, match="shutdown"):
        two_ranks.handle_request({"type": "start_session", "resource_path": clip10})

    # a worker that raises in the middle of a propagation
    pred = _build(checkpoints)
    sid = pred.handle_request({"type": "start_session", "resource_path": clip10})["session_id"]
    pred.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 0, "text": "blob"})
    pred.inject_fault(rank=1, after_collectives=5)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="worker rank 1 raised RuntimeError: injected fault") as e:
        for _ in pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid}):
            pass
    assert time.monotonic() - t0 < TIMEOUT_S
    assert "traceback on rank 1" in str(e.value)
    assert _children() == []
    with pytest.raises(RuntimeError, match="broken"):
        pred.handle_request({"type": "close_session", "session_id": sid})
    pred.shutdown()

    # a worker killed while idle: the next request fails clearly
    pred = _build(checkpoints)
    sid = pred.handle_request({"type": "start_session", "resource_path": clip10})["session_id"]
    (pid,) = pred.worker_pids.values()
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker rank 1 \(pid \d+\) died with exit code -9"):
        pred.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 0, "text": "blob"})
    assert time.monotonic() - t0 < TIMEOUT_S
    assert _children() == []
    port = pred._store.port if pred._store is not None else None
    pred.shutdown()
    assert port is None or _free(port)

    # and a predictor built afterwards in the same process works
    pred = _build(checkpoints)
    try:
        out, layout = _session(pred, clip10, STEPS[:1])
        assert len(out) == 1 and len(out[0][1]["out_obj_ids"]) > 0
    finally:
        pred.shutdown()
    assert _children() == []
    assert isinstance(pred, Sam3VideoPredictorMultiGPU)
