"""Interactive image prompts (the SAM 1 task): ``model.predict_inst`` / ``predict_inst_batch``.

Same calls, inputs and outputs as the official ``Sam3Image.predict_inst`` (through its
``SAM3InteractiveImagePredictor``): points in pixels with labels (1 positive, 0 negative), a box
xyxy in pixels (several boxes give a batch of prompts), a previous low-res mask logit as
``mask_input``; returns numpy ``(masks (C, H, W) float32 0/1 or logits, ious (C,), low_res_logits
(C, 4g, 4g))``. Post-processing as the official: holes of area <= 256 in the low-res mask are
filled, masks are resized bilinearly to the image and thresholded at 0, low-res logits clamped to
+-32.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..ops import fill_holes

MASK_THRESHOLD = 0.0
MAX_HOLE_AREA = 256.0


def _features(model, state: dict, img_idx: int):
    bo = state.get("backbone_out")
    if bo is None:
        raise RuntimeError("An image must be set with processor.set_image(...) before predict_inst")
    if bo.get("sam2_backbone_fpn") is None:
        raise RuntimeError("predict_inst needs a model built with enable_inst_interactivity=True")
    cache = bo.get("_inst_features")
    if cache is None:
        cache = model.inst_interactive_predictor.model.image_features(bo["sam2_backbone_fpn"])
        bo["_inst_features"] = cache
    embed, high = cache
    return embed[img_idx: img_idx + 1], [h[img_idx: img_idx + 1] for h in high]


def _as_tensor(x, dtype, device, name):
    try:
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=dtype, device=device)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric array-like: {e}") from None
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite values")
    return t


def _prep(model, point_coords, point_labels, box, mask_input, normalize_coords, hw, device):
    """The official ``_prep_prompts`` + the box-as-corner-points merge of ``_predict``, with input
    checks. Returns (coords (B, N, 2) in input-frame pixels or None, labels (B, N) or None,
    mask_input (B, 1, 4g, 4g) or None)."""
    h, w = hw
    res = model.cfg.resolution
    low = 4 * model.cfg.feat_size
    coords = labels = None
    if point_coords is not None:
        if point_labels is None:
            raise ValueError("point_labels must be supplied if point_coords is supplied.")
        coords = _as_tensor(point_coords, torch.float32, device, "point_coords")
        labels = _as_tensor(point_labels, torch.int32, device, "point_labels")
        if coords.dim() == 2:
            coords, labels = coords[None], labels[None]
        if coords.dim() != 3 or coords.shape[-1] != 2:
            raise ValueError(f"point_coords must be (N, 2) or (B, N, 2), got {tuple(coords.shape)}")
        if tuple(labels.shape) != tuple(coords.shape[:2]):
            raise ValueError(f"point_labels shape {tuple(labels.shape)} does not match point_coords "
                             f"{tuple(coords.shape)}")
        if not torch.isin(labels, torch.tensor([-1, 0, 1, 2, 3], device=device, dtype=labels.dtype)).all():
            raise ValueError("point_labels must be 1 (positive) or 0 (negative) (-1, 2, 3: padding, box corners)")
        lim = torch.tensor([w, h] if normalize_coords else [1.0, 1.0], device=device)
        if ((coords < 0) | (coords > lim)).any():
            raise ValueError(
                f"point_coords outside the image: points must lie in [0, {w}] x [0, {h}]"
                if normalize_coords else "point_coords outside the image: normalized points must lie in [0, 1]"
            )
        if normalize_coords:
            coords = coords / torch.tensor([w, h], device=device, dtype=coords.dtype)
        coords = coords * res
    if box is not None:
        b = _as_tensor(box, torch.float32, device, "box")
        if b.shape[-1] != 4:
            raise ValueError(f"box must be xyxy (4 numbers) or (B, 4), got shape {tuple(b.shape)}")
        b = b.reshape(-1, 4)
        if ((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).any():
            raise ValueError("box must be x0, y0, x1, y1 with x1 >= x0 and y1 >= y0")
        lim = torch.tensor([w, h, w, h] if normalize_coords else [1.0] * 4, device=device)
        if ((b < 0) | (b > lim)).any():
            raise ValueError("box extends outside the image")
        corners = b.reshape(-1, 2, 2)
        if normalize_coords:
            corners = corners / torch.tensor([w, h], device=device, dtype=corners.dtype)
        corners = corners * res
        blab = torch.tensor([[2, 3]], dtype=torch.int32, device=device).repeat(corners.shape[0], 1)
        if coords is not None:
            if coords.shape[0] != corners.shape[0]:
                raise ValueError(f"{corners.shape[0]} boxes but {coords.shape[0]} point sets")
            coords = torch.cat([corners, coords], dim=1)
            labels = torch.cat([blab, labels], dim=1)
        else:
            coords, labels = corners, blab
    m = None
    if mask_input is not None:
        m = _as_tensor(mask_input, torch.float32, device, "mask_input")
        if m.dim() == 3:
            m = m[None]
        if m.dim() != 4 or m.shape[1] != 1 or tuple(m.shape[-2:]) != (low, low):
            raise ValueError(f"mask_input must be (1, {low}, {low}) low-res logits (a previous "
                             f"predict_inst logits[i][None]), got {tuple(m.shape)}")
    return coords, labels, m


@torch.inference_mode()
def _predict_one(model, state, img_idx, hw, point_coords, point_labels, box, mask_input,
                 multimask_output, return_logits, normalize_coords):
    tracker = model.inst_interactive_predictor.model
    device = model.device
    embed, high = _features(model, state, img_idx)
    coords, labels, m = _prep(model, point_coords, point_labels, box, mask_input, normalize_coords, hw, device)
    if coords is not None:
        coords, labels = coords.to(embed.dtype), labels
    low_res, ious = tracker.predict_image(
        embed, high, coords, labels, None if m is None else m.to(embed.dtype), multimask_output
    )
    low_res = low_res.float()
    masks = fill_holes(low_res, MAX_HOLE_AREA, MASK_THRESHOLD)
    masks = F.interpolate(masks, hw, mode="bilinear", align_corners=False)
    low_res = low_res.clamp(-32.0, 32.0)
    if not return_logits:
        masks = masks > MASK_THRESHOLD
    # The official squeezes a leading batch of one and returns float32 numpy arrays (0/1 masks).
    return (masks.squeeze(0).float().cpu().numpy(), ious.squeeze(0).float().cpu().numpy(),
            low_res.squeeze(0).float().cpu().numpy())


def predict_inst(model, inference_state: dict, point_coords=None, point_labels=None, box=None, mask_input=None,
                 multimask_output: bool = True, return_logits: bool = False, normalize_coords: bool = True):
    if "original_height" not in inference_state:
        raise RuntimeError("An image must be set with processor.set_image(...) before predict_inst")
    hw = (inference_state["original_height"], inference_state["original_width"])
    return _predict_one(model, inference_state, 0, hw, point_coords, point_labels, box, mask_input,
                        multimask_output, return_logits, normalize_coords)


def predict_inst_batch(model, inference_state: dict, point_coords_batch: Optional[List] = None,
                       point_labels_batch: Optional[List] = None, box_batch: Optional[List] = None,
                       mask_input_batch: Optional[List] = None, multimask_output: bool = True,
                       return_logits: bool = False, normalize_coords: bool = True):
    if "original_heights" not in inference_state:
        raise RuntimeError("predict_inst_batch needs a state from processor.set_image_batch(...)")
    hs, ws = inference_state["original_heights"], inference_state["original_widths"]
    n = len(hs)
    for name, lst in (("point_coords_batch", point_coords_batch), ("point_labels_batch", point_labels_batch),
                      ("box_batch", box_batch), ("mask_input_batch", mask_input_batch)):
        if lst is not None and len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} entries for {n} images")
    all_masks, all_ious, all_low = [], [], []
    for i in range(n):
        pick = (lambda lst: None if lst is None else lst[i])
        m, s, lr = _predict_one(model, inference_state, i, (hs[i], ws[i]), pick(point_coords_batch),
                                pick(point_labels_batch), pick(box_batch), pick(mask_input_batch),
                                multimask_output, return_logits, normalize_coords)
        all_masks.append(m)
        all_ious.append(s)
        all_low.append(lr)
    return all_masks, all_ious, all_low
