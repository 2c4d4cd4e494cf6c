"""Drop-in API behaviour, bad input (clear errors, never a crash deep inside), and the CLI."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sam3fast
from sam3fast.cli import SAMPLE_IMAGE, main


@pytest.fixture(scope="module")
def model():
    return sam3fast.build_sam3_image_model(device="cpu", config="tiny", load_from_HF=False)


@pytest.fixture()
def proc(model):
    return sam3fast.Sam3Processor(model, resolution=model.cfg.resolution, device="cpu")


def test_public_surface():
    for name in ("build_sam3_image_model", "Sam3Processor", "build_image_model", "ImagePredictor"):
        assert hasattr(sam3fast, name)


def test_input_kinds_give_same_result(proc):
    arr = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    outs = []
    for im in (Image.fromarray(arr), arr, torch.from_numpy(arr).permute(2, 0, 1)):
        st = proc.set_text_prompt("bird", proc.set_image(im))
        assert (st["original_height"], st["original_width"]) == (50, 70)
        assert st["masks"].shape[1:] == (1, 50, 70) and st["masks"].dtype == torch.bool
        assert st["boxes"].shape == (st["scores"].shape[0], 4)
        outs.append(st["scores"])
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


def test_state_is_a_plain_dict_users_can_extend(proc):
    st = proc.set_image(Image.new("RGB", (40, 30)))
    st["prompted_boxes"] = []
    st = proc.add_geometric_prompt([0.5, 0.5, 0.2, 0.2], True, st)
    assert st["prompted_boxes"] == [] and "scores" in st


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((20, 30), np.uint8), "3 channels"),
        (np.zeros((20, 30, 4), np.uint8), "3 channels"),
        (torch.zeros(4, 20, 30), "3 channels"),
        (torch.zeros(3, 0, 30), "empty"),
        (torch.full((3, 8, 8), 2.0), r"\[0, 1\]"),
        (torch.full((3, 8, 8), float("nan")), r"\[0, 1\]"),
        (torch.zeros(3, 8, 8, dtype=torch.int32), "dtype"),
        ("not an image", "PIL image"),
    ],
)
def test_bad_images(proc, image, match):
    with pytest.raises(ValueError, match=match):
        proc.set_image(image)


def test_pil_modes_are_converted(proc):
    st = proc.set_image(Image.new("L", (20, 10)))
    assert st["original_width"] == 20
    st = proc.set_image(Image.new("RGBA", (20, 10)))
    assert st["original_height"] == 10


@pytest.mark.parametrize(
    "box, match",
    [
        ([0.5, 0.5, 0.2], "4 numbers"),
        ([0.5, 0.5, -0.1, 0.2], "positive"),
        ([0.9, 0.5, 0.5, 0.2], "outside the image"),
        ([0.5, 0.5, float("nan"), 0.2], "non-finite"),
        ("abcd", "4 numbers"),
    ],
)
def test_bad_boxes(proc, box, match):
    st = proc.set_image(Image.new("RGB", (40, 30)))
    with pytest.raises(ValueError, match=match):
        proc.add_geometric_prompt(box, True, st)


def test_prompt_errors(proc):
    with pytest.raises(ValueError, match="set_image"):
        proc.set_text_prompt("bird", {})
    st = proc.set_image(Image.new("RGB", (40, 30)))
    with pytest.raises(ValueError, match="empty"):
        proc.set_text_prompt("   ", st)
    with pytest.raises(ValueError, match="string"):
        proc.set_text_prompt(None, st)
    with pytest.raises(ValueError, match="confidence_threshold"):
        proc.set_confidence_threshold(1.5)


def test_overlong_prompt_is_truncated_with_a_warning(proc):
    st = proc.set_image(Image.new("RGB", (40, 30)))
    with pytest.warns(UserWarning, match="32"):
        proc.set_text_prompt(" ".join(["bird"] * 60), st)


def test_batch_state_cannot_run_concepts(proc):
    st = proc.set_image_batch([Image.new("RGB", (40, 30)), Image.new("RGB", (20, 30))])
    assert st["original_heights"] == [30, 30]
    with pytest.raises(ValueError, match="set_image_batch"):
        proc.set_text_prompt("bird", st)
    with pytest.raises(ValueError, match="empty"):
        proc.set_image_batch([])


def test_resolution_mismatch(model):
    with pytest.raises(ValueError, match="resolution"):
        sam3fast.Sam3Processor(model, resolution=1008)


def test_bf16_model_runs_and_tracks_fp32(model, tmp_path):
    path = str(tmp_path / "m.pt")
    torch.save(model.state_dict(), path)
    m16 = sam3fast.build_image_model(config="tiny", checkpoint_path=path, device="cpu", dtype="bfloat16")
    assert m16.dtype == torch.bfloat16
    image = Image.fromarray((np.random.default_rng(1).random((60, 60, 3)) * 255).astype(np.uint8))
    r32 = sam3fast.ImagePredictor(model, 0.0).predict([image], ["bird"])[0][0]
    r16 = sam3fast.ImagePredictor(m16, 0.0).predict([image], ["bird"])[0][0]
    assert r16["scores"].dtype == torch.float32
    assert (r16["scores"] - r32["scores"]).abs().max() < 0.05


def test_cli_refuses_without_weights(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    rc = main(["segment", SAMPLE_IMAGE, "--prompt", "bird", "--out", str(tmp_path), "--config", "tiny"])
    assert rc == 2
    assert "--random-weights" in capsys.readouterr().err


def test_cli_random_weights_writes_labelled_outputs(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    from pycocotools import mask as mask_utils

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    out = tmp_path / "out"
    rc = main(["segment", SAMPLE_IMAGE, "--prompt", "yellow bird", "--prompt", "sun", "--out", str(out),
               "--config", "tiny", "--random-weights", "--threshold", "0.0"])
    assert rc == 0
    doc = json.loads((out / "sample.json").read_text())
    assert doc["random_weights"] is True and "RANDOM WEIGHTS" in doc["warning"]
    assert doc["prompts"] == ["yellow bird", "sun"]
    assert len(doc["instances"]) > 0
    inst = doc["instances"][0]
    m = mask_utils.decode({"size": inst["segmentation"]["size"], "counts": inst["segmentation"]["counts"].encode()})
    assert m.shape == (doc["height"], doc["width"]) and int(m.sum()) == inst["area"]
    assert os.path.getsize(out / "sample_overlay.png") > 0


def test_cli_bad_image(tmp_path, capsys):
    bad = tmp_path / "x.jpg"
    bad.write_text("no")
    assert main(["segment", str(bad), "--prompt", "a", "--random-weights", "--config", "tiny"]) == 2
    assert "cannot read image" in capsys.readouterr().err


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny sessions on a loaded 2-core machine thrash with 2 threads
    yield
    torch.set_num_threads(n)


def test_cli_track_writes_json_and_overlay(tmp_path, monkeypatch, one_thread):
    import huggingface_hub.constants as c
    from video_clip import make_clip, write_mp4

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    clip = str(tmp_path / "clip.mp4")
    write_mp4(make_clip(num_frames=6, height=48, width=64, seed=1), clip)
    out = tmp_path / "out"
    rc = main(["track", clip, "--prompt", "blob", "--random-weights", "--config", "tiny", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "clip_tracks.json").read_text())
    assert doc["random_weights"] is True and doc["num_frames"] == 6
    assert [f["frame_index"] for f in doc["frames"]] == list(range(6))
    assert os.path.getsize(out / "clip_overlay.mp4") > 0


def test_cli_track_bad_input(tmp_path, capsys):
    assert main(["track", str(tmp_path / "missing.mp4"), "--prompt", "a", "--random-weights", "--config", "tiny"]) == 2
    assert "error" in capsys.readouterr().err
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage" * 10)
    assert main(["track", str(bad), "--prompt", "a", "--random-weights", "--config", "tiny"]) == 2
    assert main(["track", str(bad), "--random-weights", "--config", "tiny"]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_video_session_on_in_memory_array_equals_mp4(tmp_path, one_thread):
    """An in-memory (T, H, W, 3) uint8 array is a video resource too (the mp4 recipe): the frames
    OpenCV decodes from a file, passed as an array, give the same outputs as the file."""
    from video_clip import make_clip, read_mp4, write_mp4

    clip = str(tmp_path / "c.mp4")
    write_mp4(make_clip(num_frames=5, height=48, width=64, seed=2), clip)
    pred = sam3fast.build_sam3_video_predictor(config="tiny", load_from_HF=False, device="cpu")

    def run(resource):
        sid = pred.handle_request({"type": "start_session", "resource_path": resource})["session_id"]
        pred.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 0, "text": "blob"})
        outs = [r["outputs"] for r in pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid})]
        pred.handle_request({"type": "close_session", "session_id": sid})
        return outs

    a, b = run(clip), run(read_mp4(clip))
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert np.array_equal(x["out_obj_ids"], y["out_obj_ids"])
        assert np.array_equal(x["out_binary_masks"], y["out_binary_masks"])
