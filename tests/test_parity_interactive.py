"""Interactive image prompts (``predict_inst``) against the official package: same re-drawn weights,
same images and prompts; masks, IoU predictions and low-res logits compared."""

import numpy as np
import pytest
import torch
from PIL import Image

import sam3fast
from sam3fast.config import get_config
from official_ref import build_official_image_model, cpu_mode, official, official_checkpoint_state, redraw_


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    base = rng.random((h // 8 + 2, w // 8 + 2, 3))
    img = Image.fromarray((base * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return img


class Pair:
    def __init__(self, cfg, tmp_path, seed=0):
        official()
        from sam3.model.sam3_image_processor import Sam3Processor as OfficialProcessor

        self.cfg = cfg
        self.ref = build_official_image_model(cfg, enable_inst_interactivity=True)
        redraw_(self.ref, seed=seed)
        path = str(tmp_path / "sam3.pt")
        torch.save({"model": official_checkpoint_state(self.ref)}, path)
        self.ours = sam3fast.build_sam3_image_model(checkpoint_path=path, device="cpu", config=cfg,
                                                    enable_inst_interactivity=True)
        with cpu_mode():
            self.ref_proc = OfficialProcessor(self.ref, resolution=cfg.resolution, device="cpu")
        self.proc = sam3fast.Sam3Processor(self.ours, resolution=cfg.resolution, device="cpu")

    def states(self, image):
        with cpu_mode():
            rs = self.ref_proc.set_image(image)
        return rs, self.proc.set_image(image)


def _check(ref, got, logits=False):
    (rm, ri, rl), (gm, gi, gl) = ref, got
    assert gm.shape == rm.shape and gm.dtype == rm.dtype == np.float32
    assert gi.shape == ri.shape and gl.shape == rl.shape
    np.testing.assert_allclose(gi, ri, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gl, rl, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(rl).max()))
    if logits:
        np.testing.assert_allclose(gm, rm, rtol=1e-4, atol=1e-3)
    else:
        assert (gm != rm).mean() < 1e-3
    # non-degenerate: both signs in the low-res logits, masks neither empty nor full
    assert (rl > 0).any() and (rl < 0).any()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Pair(get_config("tiny"), tmp_path_factory.mktemp("inter"))


CASES = {
    "one_point_multimask": dict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1]),
                                multimask_output=True),
    "pos_neg_points_single": dict(point_coords=np.array([[40.0, 30.0], [80.0, 60.0]]),
                                  point_labels=np.array([1, 0]), multimask_output=False),
    "box": dict(box=np.array([20.0, 10.0, 100.0, 70.0]), multimask_output=False),
    "box_and_point": dict(box=np.array([20.0, 10.0, 100.0, 70.0]), point_coords=np.array([[50.0, 40.0]]),
                          point_labels=np.array([0]), multimask_output=True),
    "two_boxes": dict(box=np.array([[20.0, 10.0, 100.0, 70.0], [5.0, 5.0, 60.0, 50.0]]), multimask_output=False),
    "logits": dict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1]), multimask_output=True,
                   return_logits=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_predict_inst_parity(tiny, case):
    image = _image(90, 130, seed=3)
    rs, s = tiny.states(image)
    kw = CASES[case]
    with cpu_mode():
        ref = tiny.ref.predict_inst(rs, **kw)
    got = tiny.ours.predict_inst(s, **kw)
    _check(ref, got, logits=kw.get("return_logits", False))


def test_mask_input_refinement(tiny):
    image = _image(80, 100, seed=4)
    rs, s = tiny.states(image)
    with cpu_mode():
        _, ri, rl = tiny.ref.predict_inst(rs, point_coords=np.array([[30.0, 30.0]]), point_labels=np.array([1]))
        best = rl[np.argmax(ri)][None]
        ref = tiny.ref.predict_inst(rs, point_coords=np.array([[30.0, 30.0], [70.0, 50.0]]),
                                    point_labels=np.array([1, 1]), mask_input=best, multimask_output=False)
    got = tiny.ours.predict_inst(s, point_coords=np.array([[30.0, 30.0], [70.0, 50.0]]),
                                 point_labels=np.array([1, 1]), mask_input=best, multimask_output=False)
    _check(ref, got)


def test_predict_inst_batch(tiny):
    images = [_image(90, 130, 5), _image(64, 48, 6)]
    with cpu_mode():
        rs = tiny.ref_proc.set_image_batch(images)
    s = tiny.proc.set_image_batch(images)
    kw = dict(point_coords_batch=[np.array([[40.0, 30.0]]), np.array([[10.0, 20.0], [30.0, 40.0]])],
              point_labels_batch=[np.array([1]), np.array([1, 0])], multimask_output=True)
    with cpu_mode():
        ref = tiny.ref.predict_inst_batch(rs, **kw)
    got = tiny.ours.predict_inst_batch(s, **kw)
    for i in range(2):
        _check((ref[0][i], ref[1][i], ref[2][i]), (got[0][i], got[1][i], got[2][i]))


def test_hole_filling_matters_and_matches(tiny):
    """The official fills background holes <= 256 px in the low-res mask: find a prompt where it
    changes the output, and check both agree there."""
    image = _image(120, 120, seed=8)
    rs, s = tiny.states(image)
    changed = False
    for x in range(10, 110, 25):
        for y in range(10, 110, 25):
            kw = dict(point_coords=np.array([[float(x), float(y)]]), point_labels=np.array([1]))
            with cpu_mode():
                ref = tiny.ref.predict_inst(rs, **kw)
            got = tiny.ours.predict_inst(s, **kw)
            _check(ref, got)
            raw = torch.nn.functional.interpolate(torch.from_numpy(ref[2])[None], (120, 120), mode="bilinear",
                                                  align_corners=False)[0] > 0
            changed |= bool((raw.numpy() != (ref[0] > 0)).any())
    assert changed, "no prompt exercised hole filling"


@pytest.mark.parametrize("kw, match", [
    (dict(point_coords=np.array([[10.0, 10.0]])), "point_labels"),
    (dict(point_coords=np.array([[500.0, 10.0]]), point_labels=np.array([1])), "outside the image"),
    (dict(point_coords=np.array([[10.0, 10.0]]), point_labels=np.array([1, 1])), "does not match"),
    (dict(point_coords=np.array([[10.0, 10.0]]), point_labels=np.array([7])), "point_labels"),
    (dict(box=np.array([50.0, 10.0, 20.0, 40.0])), "x1 >= x0"),
    (dict(box=np.array([0.0, 0.0, 300.0, 40.0])), "outside the image"),
    (dict(mask_input=np.zeros((1, 10, 10), np.float32)), "mask_input"),
])
def test_bad_interactive_input(tiny, kw, match):
    _, s = tiny.states(_image(50, 60, 1))
    with pytest.raises(ValueError, match=match):
        tiny.ours.predict_inst(s, **kw)


def test_predict_inst_needs_interactivity():
    model = sam3fast.build_image_model("tiny", device="cpu")
    st = sam3fast.Sam3Processor(model, resolution=112).set_image(_image(30, 30, 0))
    with pytest.raises(RuntimeError, match="enable_inst_interactivity"):
        model.predict_inst(st, point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1]))


@pytest.mark.slow
def test_full_size_predict_inst(tmp_path):
    pair = Pair(get_config("sam3"), tmp_path)
    image = _image(300, 400, seed=2)
    rs, s = pair.states(image)
    for kw in (CASES["one_point_multimask"], CASES["box_and_point"]):
        with cpu_mode():
            ref = pair.ref.predict_inst(rs, **kw)
        _check(ref, pair.ours.predict_inst(s, **kw))
