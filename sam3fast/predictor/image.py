"""Image predictors: the drop-in ``Sam3Processor`` and the native batched ``ImagePredictor``.

``Sam3Processor`` has the official calls and state keys (``original_height``/``original_width``,
``masks`` (N, 1, H, W) bool, ``masks_logits`` (N, 1, H, W) probabilities, ``boxes`` (N, 4) xyxy pixels,
``scores`` (N,)); the state is a plain dict users may add keys to.

``ImagePredictor`` is the native API: a batch of images through the backbone once, every distinct
text prompt through the text encoder once, and all (image, prompt) pairs through the heads in one
batched pass.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..profiling import stage
from .preprocess import preprocess


def _check_threshold(t) -> float:
    t = float(t)
    if not (0.0 <= t <= 1.0) or math.isnan(t):
        raise ValueError(f"confidence_threshold must be in [0, 1], got {t}")
    return t


def _check_box(box) -> List[float]:
    try:
        if isinstance(box, (str, bytes)):
            raise TypeError
        vals = [float(v) for v in (box.tolist() if hasattr(box, "tolist") else box)]
    except (TypeError, ValueError):
        raise ValueError(f"box must be 4 numbers [cx, cy, w, h] normalised to [0, 1], got {box!r}") from None
    if len(vals) != 4:
        raise ValueError(f"box must be 4 numbers [cx, cy, w, h] normalised to [0, 1], got {len(vals)} values")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"box has non-finite values: {vals}")
    cx, cy, w, h = vals
    if w <= 0 or h <= 0:
        raise ValueError(f"box width and height must be positive, got w={w}, h={h}")
    eps = 1e-4
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if x0 < -eps or y0 < -eps or x1 > 1 + eps or y1 > 1 + eps:
        raise ValueError(
            f"box [cx={cx:.4g}, cy={cy:.4g}, w={w:.4g}, h={h:.4g}] extends outside the image "
            f"(corners ({x0:.4g}, {y0:.4g})-({x1:.4g}, {y1:.4g}) must lie in [0, 1]; boxes are "
            "normalised cxcywh, clip them to the image first)"
        )
    return vals


def postprocess(out: Dict[str, torch.Tensor], i: int, height: int, width: int, threshold: float):
    """The official processor's post-processing for pair ``i``: score = sigmoid(logit) *
    sigmoid(presence); keep score > threshold; boxes xyxy in pixels; masks bilinear to the image
    size then sigmoid ("masks_logits", as the official names it) and > 0.5."""
    probs = out["pred_logits"][i].float().sigmoid() * out["presence_logit"][i].float().sigmoid()
    keep = probs > threshold
    scores = probs[keep]
    boxes = out["pred_boxes_xyxy"][i][keep].float()
    scale = torch.tensor([width, height, width, height], device=boxes.device, dtype=boxes.dtype)
    boxes = boxes * scale
    result = {"scores": scores, "boxes": boxes}
    if "pred_masks" in out:
        m = out["pred_masks"][i][keep].float().unsqueeze(1)
        if m.shape[0] > 0:
            m = F.interpolate(m, (height, width), mode="bilinear", align_corners=False)
        else:
            m = m.new_zeros((0, 1, height, width))
        m = m.sigmoid()
        result["masks_logits"] = m
        result["masks"] = m > 0.5
    return result


class _TextCache:
    """Text features per prompt string (the text encoder is 350 M parameters: encode once)."""

    def __init__(self, model, capacity: int = 64):
        self.model = model
        self.capacity = capacity
        self._d: "OrderedDict[str, tuple]" = OrderedDict()

    def get(self, prompts: Sequence[str]):
        missing = [p for p in dict.fromkeys(prompts) if p not in self._d]
        if missing:
            with stage("text_encoder"):
                feats, mask = self.model.encode_text(missing)
            for j, p in enumerate(missing):
                self._d[p] = (feats[j], mask[j])
                if len(self._d) > self.capacity:
                    self._d.popitem(last=False)
        for p in prompts:
            self._d.move_to_end(p)
        feats = torch.stack([self._d[p][0] for p in prompts])
        mask = torch.stack([self._d[p][1] for p in prompts])
        return feats, mask


class Sam3Processor:
    """Drop-in for ``sam3.model.sam3_image_processor.Sam3Processor``."""

    def __init__(self, model, resolution: int = 1008, device=None, confidence_threshold: float = 0.5):
        if resolution != model.cfg.resolution:
            raise ValueError(
                f"resolution {resolution} does not match the model's input size {model.cfg.resolution}"
            )
        self.model = model
        self.resolution = resolution
        self.device = torch.device(device) if device is not None else model.device
        self.confidence_threshold = _check_threshold(confidence_threshold)
        self._text = _TextCache(model)

    # -------------------------------------------------------------------- images
    @torch.inference_mode()
    def set_image(self, image, state: Optional[dict] = None) -> dict:
        if state is None:
            state = {}
        with stage("preprocess"):
            x, h, w = preprocess(image, self.resolution, self.device, self.model.dtype)
        state["original_height"] = h
        state["original_width"] = w
        with stage("backbone"):
            state["backbone_out"] = dict(self.model.encode_image(x[None]))
        return state

    @torch.inference_mode()
    def set_image_batch(self, images: List, state: Optional[dict] = None) -> dict:
        """As the official: one state for a batch; the concept heads use the first image (the
        official ``_forward_grounding`` always runs on image 0). Use :class:`ImagePredictor` to run
        prompts on every image of a batch."""
        if state is None:
            state = {}
        if not isinstance(images, (list, tuple)):
            raise ValueError("Images must be a list of PIL images or tensors")
        if len(images) == 0:
            raise ValueError("Images list must not be empty")
        xs, hs, ws = [], [], []
        for im in images:
            x, h, w = preprocess(im, self.resolution, self.device, self.model.dtype)
            xs.append(x)
            hs.append(h)
            ws.append(w)
        state["original_heights"] = hs
        state["original_widths"] = ws
        state["backbone_out"] = dict(self.model.encode_image(torch.stack(xs)))
        return state

    # -------------------------------------------------------------------- prompts
    @torch.inference_mode()
    def set_text_prompt(self, prompt: str, state: Dict) -> dict:
        if "backbone_out" not in state:
            raise ValueError("You must call set_image before set_text_prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        feats, mask = self._text.get([prompt])
        state["backbone_out"]["language_features"] = feats
        state["backbone_out"]["language_mask"] = mask
        state.setdefault("geometric_prompt", {"boxes": [], "labels": []})
        return self._forward_grounding(state)

    @torch.inference_mode()
    def add_geometric_prompt(self, box: List, label: bool, state: Dict) -> dict:
        """Add a box [cx, cy, w, h] normalised to [0, 1]; label True = positive, False = negative.
        Without a text prompt the official uses the text "visual"; so does this."""
        if "backbone_out" not in state:
            raise ValueError("You must call set_image before add_geometric_prompt")
        vals = _check_box(box)
        if "language_features" not in state["backbone_out"]:
            feats, mask = self._text.get(["visual"])
            state["backbone_out"]["language_features"] = feats
            state["backbone_out"]["language_mask"] = mask
        gp = state.setdefault("geometric_prompt", {"boxes": [], "labels": []})
        gp["boxes"].append(vals)
        gp["labels"].append(bool(label))
        return self._forward_grounding(state)

    def reset_all_prompts(self, state: Dict) -> None:
        if "backbone_out" in state:
            for k in ("language_features", "language_mask", "language_embeds"):
                state["backbone_out"].pop(k, None)
        for k in ("geometric_prompt", "boxes", "masks", "masks_logits", "scores"):
            state.pop(k, None)

    @torch.inference_mode()
    def set_confidence_threshold(self, threshold: float, state: Optional[dict] = None):
        self.confidence_threshold = _check_threshold(threshold)
        if state is not None and "boxes" in state:
            return self._forward_grounding(state)
        return state

    # -------------------------------------------------------------------- heads
    def _forward_grounding(self, state: Dict) -> dict:
        if "original_height" not in state:
            raise ValueError(
                "this state comes from set_image_batch, which (as in the official processor) cannot "
                "run concept prompts; use set_image, or sam3fast.ImagePredictor for batches"
            )
        bo = state["backbone_out"]
        gp = state.get("geometric_prompt", {"boxes": [], "labels": []})
        dev = self.device
        boxes = labels = bmask = None
        if gp["boxes"]:
            boxes = torch.tensor([gp["boxes"]], dtype=torch.float32, device=dev)
            labels = torch.tensor([gp["labels"]], dtype=torch.bool, device=dev)
            bmask = torch.zeros(labels.shape, dtype=torch.bool, device=dev)
        with stage("heads"):
            out = self.model.forward_heads(
                bo, torch.zeros(1, dtype=torch.long, device=dev), bo["language_features"], bo["language_mask"],
                boxes=boxes, box_labels=labels, box_mask=bmask,
            )
        with stage("postprocess"):
            res = postprocess(out, 0, state["original_height"], state["original_width"], self.confidence_threshold)
        state.update(res)
        return state


class ImagePredictor:
    """Native batched API.

    ``predict(images, prompts)`` runs every prompt on every image: the backbone once per image (as
    one batch), the text encoder once per distinct prompt, the heads once on all pairs. Returns a
    list (per image) of lists (per prompt) of dicts with ``scores`` (N,), ``boxes`` (N, 4) xyxy
    pixels, ``masks`` (N, H, W) bool. ``boxes``: optional per-image list of exemplar boxes
    ([cx, cy, w, h] normalised) with ``box_labels``.
    """

    def __init__(self, model, confidence_threshold: float = 0.5):
        self.model = model
        self.confidence_threshold = _check_threshold(confidence_threshold)
        self._text = _TextCache(model)

    @torch.inference_mode()
    def predict(self, images: Sequence, prompts: Union[str, Sequence[str]],
                boxes: Optional[Sequence[Sequence]] = None, box_labels: Optional[Sequence[Sequence[bool]]] = None):
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not images:
            raise ValueError("images must be a non-empty list")
        if not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"boxes must have one list per image ({len(images)}), got {len(boxes)}")
        m = self.model
        dev = m.device
        res = m.cfg.resolution
        xs, sizes = [], []
        with stage("preprocess"):
            for im in images:
                x, h, w = preprocess(im, res, dev, m.dtype)
                xs.append(x)
                sizes.append((h, w))
        with stage("backbone"):
            image_out = m.encode_image(torch.stack(xs))
        B, P = len(images), len(prompts)
        feats, mask = self._text.get(prompts)
        img_idx = torch.arange(B, device=dev).repeat_interleave(P)
        feats = feats.repeat(B, 1, 1)
        mask = mask.repeat(B, 1)
        bx = bl = bm = None
        if boxes is not None:
            nb = max(len(b) for b in boxes)
            if nb > 0:
                bx = torch.zeros(B, nb, 4, device=dev)
                bl = torch.zeros(B, nb, dtype=torch.bool, device=dev)
                bm = torch.ones(B, nb, dtype=torch.bool, device=dev)
                for i, bs in enumerate(boxes):
                    labs = box_labels[i] if box_labels is not None else [True] * len(bs)
                    if len(labs) != len(bs):
                        raise ValueError(f"image {i}: {len(bs)} boxes but {len(labs)} labels")
                    for j, b in enumerate(bs):
                        bx[i, j] = torch.tensor(_check_box(b))
                        bl[i, j] = bool(labs[j])
                        bm[i, j] = False
                bx, bl, bm = (t.repeat_interleave(P, 0) for t in (bx, bl, bm))
        with stage("heads"):
            out = m.forward_heads(image_out, img_idx, feats, mask, boxes=bx, box_labels=bl, box_mask=bm)
        results = []
        for i in range(B):
            h, w = sizes[i]
            per = []
            for j in range(P):
                r = postprocess(out, i * P + j, h, w, self.confidence_threshold)
                if "masks" in r:
                    r["masks"] = r["masks"][:, 0]
                    r.pop("masks_logits")
                per.append(r)
            results.append(per)
        return results
