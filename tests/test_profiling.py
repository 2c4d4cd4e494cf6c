"""NVTX ranges: off by default (a shared no-op context), on with enable_nvtx; the engine runs either way."""

import numpy as np
from PIL import Image

import sam3fast
from sam3fast import profiling


def test_nvtx_ranges_off_and_on():
    assert not profiling.nvtx_enabled()
    assert profiling.stage("x") is profiling.stage("y")  # shared nullcontext: no allocation per call
    model = sam3fast.build_image_model("tiny", device="cpu")
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    ref = sam3fast.ImagePredictor(model, 0.0).predict([image], ["bird"])[0][0]["scores"]
    profiling.enable_nvtx(True)
    try:
        with profiling.stage("outer"):
            got = sam3fast.ImagePredictor(model, 0.0).predict([image], ["bird"])[0][0]["scores"]
        proc = sam3fast.Sam3Processor(model, resolution=112)
        proc.set_text_prompt("bird", proc.set_image(image))
    finally:
        profiling.enable_nvtx(False)
    assert (got == ref).all()


class _Recorder:
    """A stand-in for the ``nvtx`` module that records the ranges opened."""

    def __init__(self):
        self.opened = []

    def annotate(self, name, domain=None, color=None):
        import contextlib

        self.opened.append(name)
        return contextlib.nullcontext()


def test_concept_video_stages_have_ranges(monkeypatch):
    """The concept-video loop opens a range per stage on every frame, and runs the same with them."""
    import os

    import torch

    from sam3fast.model.init import stable_random_init_

    clip = os.path.join(os.path.dirname(sam3fast.__file__), "assets", "sample_clip.mp4")
    pred = sam3fast.build_sam3_video_predictor(config="tiny", device="cpu", load_from_HF=False)
    stable_random_init_(pred.model, seed=20, score_gain=6.0, presence_shift=3.0)
    pred.model.progress = False

    def session():
        sid = pred.handle_request({"type": "start_session", "resource_path": clip})["session_id"]
        pred.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 0, "text": "blob"})
        out = [r["outputs"] for r in pred.handle_stream_request(
            {"type": "propagate_in_video", "session_id": sid, "max_frame_num_to_track": 5})]
        pred.handle_request({"type": "close_session", "session_id": sid})
        return out

    with torch.inference_mode():
        ref = session()
        rec = _Recorder()
        monkeypatch.setattr(profiling, "_nvtx", rec)
        monkeypatch.setattr(profiling, "_enabled", True)
        got = session()
    assert len(got) == len(ref) == 6
    for a, b in zip(got, ref):
        assert a["out_obj_ids"].tolist() == b["out_obj_ids"].tolist()
        assert (a["out_binary_masks"] == b["out_binary_masks"]).all()
    frames = rec.opened.count("video_detection")
    assert frames >= 6  # (the prompt frame runs twice)
    for name in ("video_tracker_propagation", "video_planning", "video_execution", "video_postprocess"):
        assert rec.opened.count(name) >= 6, (name, rec.opened)
