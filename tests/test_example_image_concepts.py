"""The official image example programs, replayed call by call on the official ``sam3`` package and on
sam3fast with the same random weights ("drop-in" = the user code changes its imports only).

* ``examples/sam3_image_predictor_example.ipynb``: ``build_sam3_image_model(bpe_path=...)``,
  ``Sam3Processor(model, confidence_threshold=0.5)``, ``set_image``, then three prompt cells, each
  ``reset_all_prompts`` + a text prompt ("shoe"), one positive box, a positive and a negative box
  (boxes prepared as the example does: xywh pixels -> ``box_xywh_to_cxcywh`` -> normalised).
* ``examples/sam3_image_interactive.ipynb`` (the Jupyter widget): ``set_text_prompt(prompt, state)``,
  boxes added with ``add_geometric_prompt(box, label, state)`` after the widget stores its own
  ``state["prompted_boxes"]``, the confidence slider (``set_confidence_threshold(v, state)``) and
  "Clear All Prompts" (``state = processor.reset_all_prompts(state)``: None in both packages).

Every returned state is compared: same keys read by user code, types, dtypes, devices and shapes;
scores within 1e-3, boxes within 0.5 px, each mask disagreeing on at most 0.1% of its pixels, the
same number of detections. Tiny config in seconds; the full ``sam3`` config once (slow), where the
official side is built by the official builder itself from the same checkpoint file.

The shared pieces of the example modules live here: :class:`InMode` (runs official objects inside
the CPU patches of ``official_ref``/``official_video_ref``) and :class:`Api` (what a user module
imports, one per package).
"""

from __future__ import annotations

import contextlib
import inspect
import re
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
import torch

import sam3fast
from official_ref import bpe_path, build_official_image_model, cpu_mode, official, official_checkpoint_state, redraw_
from sam3fast.config import get_config
from test_parity_image import _image

CFG = get_config("tiny")
SCORE_TOL, BOX_TOL_PX, MASK_FRAC = 1e-3, 0.5, 1e-3


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a loaded 2-core machine: two intra-op threads made these replays 5-10x slower
    (measured: 16 s vs 1.6 s); restored afterwards. Imported by the other example modules."""
    with threads(1):
        yield


# ----------------------------------------------------------------------------------------------
# Running official objects inside their CPU patches


class InMode:
    """Proxy for an official object: every method call (and every step of a returned generator)
    runs inside ``mode`` (``cpu_mode`` / ``official_video_mode``); sub-modules reached as attributes
    are proxied too, and proxies assigned as attributes are unwrapped. User code then reads exactly
    as the example: ``predictor = sam3_model.tracker; predictor.backbone = sam3_model.detector.backbone``."""

    def __init__(self, obj, mode):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_mode", mode)

    def __getattr__(self, name):
        val = getattr(self._obj, name)
        if inspect.ismethod(val):
            return self._wrap(val)
        if isinstance(val, torch.nn.Module):
            return InMode(val, self._mode)
        return val

    def __setattr__(self, name, value):
        setattr(self._obj, name, unwrap(value))

    def _wrap(self, fn):
        def call(*args, **kwargs):
            with self._mode():
                out = fn(*(unwrap(a) for a in args), **{k: unwrap(v) for k, v in kwargs.items()})
            return self._steps(out) if inspect.isgenerator(out) else out

        return call

    def _steps(self, gen):
        while True:
            with self._mode():
                try:
                    item = next(gen)
                except StopIteration:
                    return
            yield item


def unwrap(x):
    return object.__getattribute__(x, "_obj") if isinstance(x, InMode) else x


def in_mode(mode, factory: Callable) -> Callable:
    """``factory`` called inside ``mode`` (arguments unwrapped), its result proxied."""

    def make(*args, **kwargs):
        with mode():
            return InMode(factory(*(unwrap(a) for a in args), **{k: unwrap(v) for k, v in kwargs.items()}), mode)

    return make


class Api:
    """The names an example imports (``from sam3 import ...`` / ``from sam3fast import ...``), bound
    to one package; ``ctx`` is where module-level code that touches torch.cuda runs (the official's
    CPU patches; nothing for sam3fast)."""

    def __init__(self, name: str, ctx=contextlib.nullcontext, **names):
        self.name, self.ctx = name, ctx
        self.__dict__.update(names)


def official_processor_class():
    official()
    from sam3.model.sam3_image_processor import Sam3Processor

    return in_mode(cpu_mode, Sam3Processor)


# ----------------------------------------------------------------------------------------------
# Comparison


def snapshot(state: Dict[str, Any]) -> Dict[str, Any]:
    """The state entries the examples read, copied (the state dict is updated in place)."""
    out = {k: state[k] for k in ("original_height", "original_width") if k in state}
    out["keys"] = sorted(state)  # (values of backbone_out and geometric_prompt are engine internals)
    for k in ("scores", "boxes", "masks", "masks_logits"):
        if k in state:
            out[k] = state[k].detach().clone()
    return out


def assert_masks_match(a: torch.Tensor, b: torch.Tensor, where: str):
    """Per mask: at most MASK_FRAC of its pixels differ (bool masks of the same shape)."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.bool, (where, a.shape, b.shape, a.dtype, b.dtype)
    if a.numel():
        frac = (a != b).flatten(1).float().mean(1)
        assert frac.max() <= MASK_FRAC, f"{where}: masks differ on {frac.max():.2%} of pixels"


def assert_states_match(ref: Dict[str, Any], got: Dict[str, Any], where: str):
    assert set(got) == set(ref), (where, sorted(got), sorted(ref))
    for k in ("original_height", "original_width", "keys"):
        assert type(got[k]) is type(ref[k]) and got[k] == ref[k], (where, k, got[k], ref[k])
    if "scores" not in ref:
        return  # before any prompt
    for k in ("scores", "boxes", "masks", "masks_logits"):
        a, b = got[k], ref[k]
        assert isinstance(a, torch.Tensor), (where, k, type(a))
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device), \
            f"{where} {k}: {(a.shape, a.dtype, a.device)} vs official {(b.shape, b.dtype, b.device)}"
    n = ref["scores"].numel()
    assert ref["masks"].shape[:2] == (n, 1) and ref["boxes"].shape == (n, 4)
    if n:
        assert (got["scores"] - ref["scores"]).abs().max() <= SCORE_TOL, where
        assert (got["boxes"] - ref["boxes"]).abs().max() <= BOX_TOL_PX, where
        assert (got["masks_logits"] - ref["masks_logits"]).abs().max() <= SCORE_TOL, where  # probabilities
    assert_masks_match(got["masks"][:, 0], ref["masks"][:, 0], where)


def assert_catches(compare: Callable, ref, variants: Dict[str, Any]):
    """``compare(ref, ref)`` passes and ``compare(ref, variant)`` fails for each variant: the
    comparison of a test module can fail, at its stated tolerances."""
    compare(ref, ref, "itself")
    for name, bad in variants.items():
        with pytest.raises(AssertionError):
            compare(ref, bad, name)


def flip_pixels(mask: torch.Tensor, frac: float) -> torch.Tensor:
    """A copy of a bool mask (..., H, W) with the first ``frac`` of its first map's pixels inverted."""
    out = mask.clone()
    flat = out.reshape(-1, mask.shape[-2] * mask.shape[-1])
    n = int(np.ceil(frac * flat.shape[1]))
    flat[0, :n] = ~flat[0, :n]
    return flat.reshape(mask.shape)


def compare_records(ref: List, got: List, compare: Callable):
    """Records are ``(step, value)`` lists from one replay on each package."""
    assert [s for s, _ in got] == [s for s, _ in ref]
    for (step, r), (_, g) in zip(ref, got):
        compare(r, g, step)


# ----------------------------------------------------------------------------------------------
# The example programs (user code: only ``api`` differs between the two runs)

# Box prompts of the example (xywh pixels on its 1024-wide test image), scaled onto a smaller image.
EXAMPLE_BOX = [480.0, 290.0, 110.0, 360.0]
EXAMPLE_BOXES = [[480.0, 290.0, 110.0, 360.0], [370.0, 280.0, 115.0, 375.0]]
IMAGE_H, IMAGE_W, SCALE = 340, 420, 0.5


def normalize_bbox(bbox_xywh, img_w, img_h):
    """``sam3.visualization_utils.normalize_bbox`` for tensors (that module needs matplotlib,
    pandas and scikit-learn: it is exercised itself in test_example_plotting.py)."""
    return bbox_xywh / torch.tensor([img_w, img_h, img_w, img_h], dtype=bbox_xywh.dtype)


def image_predictor_example(api, image, build_kw=None, processor_kw=None):
    """``sam3_image_predictor_example.ipynb``: returns ``[(cell, state snapshot), ...]``."""
    from sam3.model.box_ops import box_xywh_to_cxcywh  # users keep this official helper

    model = api.build_sam3_image_model(bpe_path=bpe_path(), **(build_kw or {}))
    width, height = image.size
    processor = api.Sam3Processor(model, **{"confidence_threshold": 0.5, **(processor_kw or {})})
    inference_state = processor.set_image(image)
    records = [("set_image", snapshot(inference_state))]

    processor.reset_all_prompts(inference_state)
    inference_state = processor.set_text_prompt(state=inference_state, prompt="shoe")
    records.append(("text prompt", snapshot(inference_state)))

    box_input_xywh = torch.tensor(EXAMPLE_BOX).view(-1, 4) * SCALE
    box_input_cxcywh = box_xywh_to_cxcywh(box_input_xywh)
    norm_box_cxcywh = normalize_bbox(box_input_cxcywh, width, height).flatten().tolist()
    processor.reset_all_prompts(inference_state)
    inference_state = processor.add_geometric_prompt(state=inference_state, box=norm_box_cxcywh, label=True)
    records.append(("single box", snapshot(inference_state)))

    box_input_xywh = (torch.tensor(EXAMPLE_BOXES) * SCALE).tolist()
    box_input_cxcywh = box_xywh_to_cxcywh(torch.tensor(box_input_xywh).view(-1, 4))
    norm_boxes_cxcywh = normalize_bbox(box_input_cxcywh, width, height).tolist()
    box_labels = [True, False]
    processor.reset_all_prompts(inference_state)
    for box, label in zip(norm_boxes_cxcywh, box_labels):
        inference_state = processor.add_geometric_prompt(state=inference_state, box=box, label=label)
    records.append(("positive and negative boxes", snapshot(inference_state)))
    return records


def widget_session(api, image, processor_kw=None, build_kw=None):
    """The calls of ``sam3_image_interactive.ipynb``'s ``Sam3SegmentationWidget`` for: load an
    image, type a prompt, draw a positive and a negative box, move the confidence slider, clear."""
    model = api.build_sam3_image_model(bpe_path=bpe_path(), **(build_kw or {}))
    processor = api.Sam3Processor(model, **(processor_kw or {}))
    state = processor.set_image(image)
    records = []
    state = processor.set_text_prompt("a cat", state)
    records.append(("text", snapshot(state)))
    for (x_min, y_min, x_max, y_max), label in (((60.0, 50.0, 250.0, 260.0), True), ((300.0, 40.0, 400.0, 150.0), False)):
        img_h, img_w = state["original_height"], state["original_width"]
        box = [(x_min + x_max) / 2.0 / img_w, (y_min + y_max) / 2.0 / img_h, (x_max - x_min) / img_w,
               (y_max - y_min) / img_h]
        if "prompted_boxes" not in state:
            state["prompted_boxes"] = []
        state["prompted_boxes"].append({"box": [x_min, y_min, x_max, y_max], "label": label})
        state = processor.add_geometric_prompt(box, label, state)
        assert state["prompted_boxes"][-1]["label"] is label  # the user's own entry survives
        records.append((f"box {label}", snapshot(state)))
    for value in (0.3, 0.62):
        state = processor.set_confidence_threshold(value, state)
        records.append((f"confidence {value}", snapshot(state)))
    cleared = processor.reset_all_prompts(state)
    records.append(("clear", {"returned": cleared, "keys": sorted(k for k in state if k != "backbone_out"),
                              "backbone_keys": sorted(state["backbone_out"])}))
    return records


def compare_widget(ref, got, step):
    if step == "clear":
        assert got["returned"] is ref["returned"] is None
        assert got["keys"] == ref["keys"]
        assert not {"language_features", "language_mask"} & set(got["backbone_keys"])
    else:
        assert_states_match(ref, got, step)


# ----------------------------------------------------------------------------------------------
# Fixtures and tests


_DECODER_BRANCHES = re.compile(r"^transformer\.decoder\.layers\.\d+\."
                               r"(self_attn\.out_proj|ca_text\.out_proj|cross_attn\.out_proj|linear2)\.weight$")


def tiny_weights_(model, seed=2, decoder_branch_scale=0.1):
    """``redraw_`` plus smaller residual branches in the detector decoder: at the tiny config its
    post-norm layers otherwise give every query the same summary (all 16 scores within 1e-4, all
    kept or all dropped at 0.5). With these the prompts of the example keep 3, 4 and 5 of 16 queries,
    the nearest score 0.015 from the threshold (measured)."""
    redraw_(model, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _DECODER_BRANCHES.match(name):
                p.mul_(decoder_branch_scale)
    return model


def tiny_official_image_model(seed=2, **kw):
    """``build_official_image_model(CFG, **kw)`` with :func:`tiny_weights_`; construction is seeded
    too (the interactive head draws a buffer, the prompt encoder's Gaussian matrix, that ``redraw_``
    leaves as constructed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_official_image_model(CFG, **kw)
    return tiny_weights_(model, seed=seed)


def tiny_image_checkpoint(folder, **model_kw):
    """:func:`tiny_official_image_model` and its ``sam3.pt`` in ``folder``."""
    ref = tiny_official_image_model(**model_kw)
    path = str(folder / "sam3.pt")
    torch.save({"model": official_checkpoint_state(ref)}, path)
    return ref, path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return tiny_image_checkpoint(tmp_path_factory.mktemp("img"))


def tiny_apis(ref_model, path):
    """Official: the prebuilt tiny model (the official builder hard-codes the full sizes).
    sam3fast: its drop-in builder on the same checkpoint, at the tiny config."""
    ref = Api("official", cpu_mode, build_sam3_image_model=lambda **kw: InMode(ref_model, cpu_mode),
              Sam3Processor=official_processor_class())
    ours = Api("sam3fast", build_sam3_image_model=lambda **kw: sam3fast.build_sam3_image_model(
        checkpoint_path=path, device="cpu", config=CFG, **kw), Sam3Processor=sam3fast.Sam3Processor)
    return ref, ours


def test_comparison_catches_differences():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 1, 40, 50, generator=g) > 0.5
    ref = {"original_height": 40, "original_width": 50, "keys": ["a"], "scores": torch.rand(3, generator=g),
           "boxes": torch.rand(3, 4, generator=g) * 40, "masks": masks, "masks_logits": masks.float()}
    assert_catches(assert_states_match, ref, {
        "score +2e-3": dict(ref, scores=ref["scores"] + 2e-3),
        "box +0.6 px": dict(ref, boxes=ref["boxes"] + 0.6),
        "0.2% of a mask": dict(ref, masks=flip_pixels(masks, 2e-3)),
        "one detection less": {k: v[:2] if isinstance(v, torch.Tensor) else v for k, v in ref.items()},
        "float64 scores": dict(ref, scores=ref["scores"].double()),
        "width": dict(ref, original_width=51),
        "a key more": dict(ref, extra=1),
    })
    assert_states_match(ref, dict(ref, scores=ref["scores"] + 9e-4, boxes=ref["boxes"] + 0.45,
                                  masks=flip_pixels(masks, 9e-4)), "within the tolerances")


def test_imports_are_the_official_names():
    official()
    import sam3
    from sam3.model.sam3_image_processor import Sam3Processor
    from sam3.model_builder import build_sam3_video_model, build_sam3_video_predictor

    for ours, theirs in ((sam3fast.build_sam3_image_model, sam3.build_sam3_image_model),
                         (sam3fast.Sam3Processor, Sam3Processor),
                         (sam3fast.build_sam3_video_model, build_sam3_video_model),
                         (sam3fast.build_sam3_video_predictor, build_sam3_video_predictor)):
        assert ours.__name__ == theirs.__name__
        official_params = list(inspect.signature(theirs).parameters)
        assert list(inspect.signature(ours).parameters)[:len(official_params)] == official_params


def test_image_predictor_example_tiny(tiny_checkpoint):
    ref_api, our_api = tiny_apis(*tiny_checkpoint)
    image = _image(IMAGE_H, IMAGE_W, seed=4)
    kw = dict(processor_kw=dict(resolution=CFG.resolution))  # the tiny model's input size
    ref = image_predictor_example(ref_api, image, **kw)
    got = image_predictor_example(our_api, image, **kw)
    compare_records(ref, got, assert_states_match)
    # not degenerate: detections on every prompt, masks neither empty nor the whole image
    for step, r in ref[1:]:
        assert r["scores"].numel() >= 1, step
        area = r["masks"].float().mean((1, 2, 3))
        assert (area > 0).any() and (area < 1).all(), step
    assert [r["scores"].numel() for _, r in ref[1:]] == [3, 4, 5]  # of 16 queries


def test_interactive_widget_calls_tiny(tiny_checkpoint):
    ref_api, our_api = tiny_apis(*tiny_checkpoint)
    image = _image(IMAGE_H, IMAGE_W, seed=7)
    kw = dict(processor_kw=dict(resolution=CFG.resolution))
    ref = widget_session(ref_api, image, **kw)
    got = widget_session(our_api, image, **kw)
    compare_records(ref, got, compare_widget)
    counts = [r["scores"].numel() for s, r in ref if s != "clear"]
    assert max(counts) >= 2 and len(set(counts)) >= 2, counts  # the slider changes what is kept


@pytest.mark.slow
def test_image_predictor_example_full_size(tmp_path):
    """The official sizes at 1008 px. The official model comes from ``sam3.build_sam3_image_model``
    itself (random init, then ``redraw_``, saved as ``sam3.pt``); sam3fast's from its drop-in builder
    on that file. ``confidence_threshold=0.0`` keeps all 200 queries of every cell (at 0.5 these
    weights keep all of them on the text prompt and none on the box prompts: the 0.5 decisions are
    compared at the tiny config), so every query's score, box and mask is compared."""
    import gc

    official()
    import sam3

    path = str(tmp_path / "sam3.pt")

    def official_build(**kw):
        model = redraw_(sam3.build_sam3_image_model(load_from_HF=False, device="cpu", **kw), seed=0)
        torch.save({"model": official_checkpoint_state(model)}, path)
        return model

    ref_api = Api("official", cpu_mode, build_sam3_image_model=in_mode(cpu_mode, official_build),
                  Sam3Processor=official_processor_class())
    our_api = Api("sam3fast", build_sam3_image_model=lambda **kw: sam3fast.build_sam3_image_model(
        checkpoint_path=path, device="cpu", **kw), Sam3Processor=sam3fast.Sam3Processor)
    image = _image(IMAGE_H, IMAGE_W, seed=11)
    kw = dict(processor_kw=dict(confidence_threshold=0.0))
    with threads(2):  # real work here
        ref = image_predictor_example(ref_api, image, **kw)
        gc.collect()
        got = image_predictor_example(our_api, image, **kw)
    compare_records(ref, got, assert_states_match)
    assert [r["scores"].numel() for _, r in ref[1:]] == [200, 200, 200]
    assert all(r["scores"].std() > 0.01 and r["boxes"].std(0).mean() > 1.0 for _, r in ref[1:])
