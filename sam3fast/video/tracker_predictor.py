"""SAM 2-style video tracking (the official ``Sam3TrackerPredictor``) on :class:`sam3fast.model.tracker.Tracker`.

A port of ``sam3/model/sam3_tracking_predictor.py`` together with the inference half of
``Sam3TrackerBase`` (``sam3_tracker_base.py``) and the helpers it uses from
``sam3_tracker_utils.py``. Public methods, their signatures, their outputs and the layout of the
``inference_state`` dict are the official ones, so an instance is a drop-in for
``build_sam3_video_model().tracker`` (SAM 2 task) and for the detect-and-track orchestration
(``Sam3VideoBase`` calls ``init_state``, ``add_new_mask``, ``add_new_points``,
``propagate_in_video_preflight``, ``propagate_in_video``, ``remove_object``,
``clear_all_points_in_frame``, ``_run_memory_encoder``, ``_add_output_per_object``,
``_suppress_object_pw_area_shrinkage``, ``_apply_object_wise_non_overlapping_constraints``,
``_obj_id_to_idx`` and reads ``input_mask_size``, ``low_res_mask_size``, ``sam_mask_decoder``,
``maskmem_backbone``, ``max_cond_frames_in_attn``, ``num_maskmem``, ``max_obj_ptrs_in_encoder``).

Letters: B objects in a state, D d_model (256), M mem_dim (64), g feature grid (72), R input
resolution (1008), r = 4g low-res mask side (288), I = 4r mask-input side (1152), H x W video size.

One frame, ``track_step`` (no mask input):

    feat      = tracker features of the frame: [s0 (B, D/8, 4g, 4g), s1 (B, D/4, 2g, 2g), top (B, D, g, g)]
                (s0/s1 already through ``conv_s0``/``conv_s1``), sine pos of each level
    pix       = top + no_mem_embed                           on an initial conditioning frame
              = MemoryAttention(top, pos, memory, memory_pos) otherwise, where the memory holds
                <= 4 closest conditioning frames (t_pos 0), <= 6 previous frames (``frame_filter``:
                the last ones whose eff_iou_score > 0.01 when ``use_memory_selection``) and the
                object pointers of those frames (split into D/M tokens, 1-D sine temporal pos)
    heads     = sam_heads_forward(pix, points | pad, prev mask logits, s0, s1, multimask)
                -> low-res (B, 1, r, r), high-res (B, 1, R, R), obj_ptr (B, D), score (B, 1), ious
    memory    = encode_new_memory(top, high-res, score)  (B, M, g, g), stored as bfloat16

A mask input skips the memory and the heads' mask: ``_use_mask_as_output`` turns it into
+-10 logits and gets the pointer from the heads on ``mask_downsample(mask)``.

State layout (``init_state``; the official keys, read by the orchestration):

- ``output_dict`` {"cond_frame_outputs", "non_cond_frame_outputs"}: {frame_idx: out} with out =
  {"maskmem_features" (B, M, g, g) bf16 or None, "maskmem_pos_enc" [(B, M, g, g) expanded view]
  or None, "pred_masks" (B, 1, r, r) float32 logits, "obj_ptr" (B, D), "object_score_logits"
  (B, 1), "iou_score" (B,) and "eff_iou_score" () with memory selection}; consolidated outputs
  (frames with prompts) carry "iou_score" (B, 1) and no "eff_iou_score", as in the official.
- ``output_dict_per_obj`` {obj_idx: same two dicts of per-object slices (views)};
  ``temp_output_dict_per_obj`` (prompt outputs before ``propagate_in_video_preflight``).
- ``point_inputs_per_obj`` {obj_idx: {frame_idx: {"point_coords" (1, N, 2) R-pixels,
  "point_labels" (1, N) int32}}}; ``mask_inputs_per_obj`` {obj_idx: {frame_idx: (1, 1, H, W) bool}}.
- ``obj_id_to_idx``, ``obj_idx_to_id``, ``obj_ids``, ``consolidated_frame_inds``,
  ``frames_already_tracked``, ``first_ann_frame_idx``, ``tracking_has_started``, ``constants``
  ({"maskmem_pos_enc": [(1, M, g, g)]}), ``cached_features`` ({frame_idx: (image, backbone_out)}),
  ``num_frames``, ``video_height``, ``video_width``, ``device``, ``storage_device``, ``images``.

Internally the per-frame features are batch-first maps (B, C, h, w) (the official flattens them
to (h*w, B, C)); ``_get_image_feature`` and ``track_step`` take and return that layout.

Numerics: the official stores the memory bank as bfloat16 (``maskmem_features.to(bfloat16)``,
``sam3_tracking_predictor.py`` 1098/1149) and its detector hands the tracker bf16 SAM 2-neck
features (``sam3_image.py`` 839). With ``bf16_casts=True`` (default) this module stores the bank
as bfloat16 at the same two places and :meth:`make_tracker_backbone_out` rounds the neck levels to
bf16 before ``conv_s0``/``conv_s1``, so a float32 run reproduces the official values; the bank is
cast back to the compute dtype when the memory is assembled (what ``torch.cat`` promotion does in
the official). With ``bf16_casts=False`` nothing is rounded.

Where this port departs from the official code (each only where the official fails or does
dead work; values are otherwise the official's):

- ``_get_empty_mask_ptr`` (an object without output on a prompted frame, when memory is encoded)
  returns ``no_obj_ptr``: the official passes ``gt_masks`` to ``track_step``, which does not take
  it, so it raises TypeError; what it means to compute (``_use_mask_as_output`` on an empty mask)
  is ``no_obj_ptr`` exactly.
- A memory without any object pointer (e.g. tracking backwards from the last frame with no
  conditioning frame at or after it) is cast to the compute dtype; the official's all-bf16 memory
  fails in a float32 run without autocast.
- ``add_new_points_or_box`` takes a list ``box`` with relative coordinates (the official multiplies
  the list by the image size). ``remove_object`` tolerates stored outputs without memory.
- ``reset_state`` (SAM 2's name) is :meth:`clear_all_points_in_video`;
  ``init_state(video_path=..., async_loading_frames=True)`` loads eagerly (same values).
- ``backbone`` is not registered as a submodule, so the state dict holds tracker weights only.

Host syncs: ``propagate_in_video`` tracks on a preallocated
:class:`~sam3fast.video.memory_bank.MemoryBank` kept in the state (memory selection as tensor ops,
static shapes and a validity mask): after the first tracked frame of a run of consecutive frames no
step reads a tensor value on the host (tested), also across one-frame calls (the SAM 3 video
model's way). The bank is built with the official scan (``frame_filter`` reads each scanned
frame's ``eff_iou_score``) at the start of such a run and after each conditioning frame;
``fixed_capacity_step=False`` and the settings listed in ``_fixed_capacity_refusal`` keep the
official per-frame selection (a sync per scanned frame, a host-to-device copy of the temporal
positions). ``remove_object`` indexes every stored frame with a Python list, as the official.
With ``object_table`` (default) the banks live as rows of an
:class:`~sam3fast.video.memory_bank.ObjectTable` shared by the sessions that propagate together
(``propagate_states_one_frame``): one step over the table's rows, its memory read from the table
with no per-frame concatenation; ``object_table = False`` keeps one bank per session.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import Sam3Config
from ..kernels.mask_for_memory import mask_for_memory_backend
from ..model.common import check_switch
from ..model.memory import encode_new_memory, encode_new_memory_from_low_res
from ..model.memory_attention import assemble_memory
from ..model.neck import VisionBackbone
from ..model.sam_heads import NO_OBJ_SCORE, sam_heads_forward
from ..model.tracker import Tracker
from .memory_bank import (BankSpec, BankState, MemoryBank, ObjectTable, TableRows, TableState, bank_memory,
                          table_memory)
from .side_stream import SideStream

__all__ = [
    "NO_OBJ_SCORE",
    "Sam3TrackerPredictor",
    "concat_points",
    "fill_holes_in_mask_scores",
    "load_video_frames",
    "select_closest_cond_frames",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Helpers from sam3_tracker_base.py / sam3_tracker_utils.py


def concat_points(old_point_inputs, new_points, new_labels):
    """Official ``concat_points``: append points (B, N, 2) and labels (B, N) to a point-input dict."""
    if old_point_inputs is None:
        points, labels = new_points, new_labels
    else:
        points = torch.cat([old_point_inputs["point_coords"], new_points], dim=1)
        labels = torch.cat([old_point_inputs["point_labels"], new_labels], dim=1)
    return {"point_coords": points, "point_labels": labels}


def select_closest_cond_frames(frame_idx, cond_frame_outputs, max_cond_frame_num, keep_first_cond_frame=False):
    """Official ``select_closest_cond_frames``: up to ``max_cond_frame_num`` conditioning frames, the
    closest before and after ``frame_idx`` first, then the temporally closest others.
    Returns ``(selected_outputs, unselected_outputs)`` dicts."""
    if max_cond_frame_num == -1 or len(cond_frame_outputs) <= max_cond_frame_num:
        return cond_frame_outputs, {}
    if max_cond_frame_num < 2:
        raise ValueError("we should allow using 2+ conditioning frames")
    selected = {}
    if keep_first_cond_frame:
        idx_first = min((t for t in cond_frame_outputs if t < frame_idx), default=None)
        if idx_first is None:
            idx_first = max((t for t in cond_frame_outputs if t > frame_idx), default=None)
        if idx_first is not None:
            selected[idx_first] = cond_frame_outputs[idx_first]
    idx_before = max((t for t in cond_frame_outputs if t < frame_idx), default=None)
    if idx_before is not None:
        selected[idx_before] = cond_frame_outputs[idx_before]
    idx_after = min((t for t in cond_frame_outputs if t >= frame_idx), default=None)
    if idx_after is not None:
        selected[idx_after] = cond_frame_outputs[idx_after]
    num_remain = max_cond_frame_num - len(selected)
    inds_remain = sorted((t for t in cond_frame_outputs if t not in selected), key=lambda x: abs(x - frame_idx))
    selected.update((t, cond_frame_outputs[t]) for t in inds_remain[:num_remain])
    unselected = {t: v for t, v in cond_frame_outputs.items() if t not in selected}
    return selected, unselected


def fill_holes_in_mask_scores(mask: torch.Tensor, max_area: float, fill_holes: bool = True,
                              remove_sprinkles: bool = True) -> torch.Tensor:
    """Official ``fill_holes_in_mask_scores`` (video post-processing) on (N, 1, H, W) logits:
    background components (logit <= 0, 8-connected) of area <= ``max_area`` become 0.1; foreground
    components of area <= min(max_area, fg_area // 2) become -0.1. (``sam3fast.ops.fill_holes`` is
    the image-predictor variant, with +-10 and no half-area rule.)"""
    from ..ops import connected_component_sizes

    if max_area <= 0:
        return mask
    N, C, H, W = mask.shape
    if fill_holes:
        bg = mask <= 0
        areas = connected_component_sizes(bg.reshape(N * C, H, W)).reshape(mask.shape)
        mask = torch.where(bg & (areas <= max_area), 0.1, mask)
    if remove_sprinkles:
        fg = mask > 0
        thresh = torch.sum(fg, dim=(2, 3), keepdim=True, dtype=torch.int32)
        thresh = thresh.floor_divide(2).clamp(max=max_area)
        areas = connected_component_sizes(fg.reshape(N * C, H, W)).reshape(mask.shape)
        mask = torch.where(fg & (areas <= thresh), -0.1, mask)
    return mask


# The SAM 2 loader the official tracker's init_state(video_path=...) uses (sam3/model/utils/
# sam2_utils.py): ImageNet mean/std and PIL's default resize, unlike the SAM 3 video loaders.
SAM2_IMG_MEAN = (0.485, 0.456, 0.406)
SAM2_IMG_STD = (0.229, 0.224, 0.225)


def _load_sam2_frame(path: str, image_size: int):
    import numpy as np
    from PIL import Image

    img_pil = Image.open(path)
    img_np = np.array(img_pil.convert("RGB").resize((image_size, image_size)))
    if img_np.dtype != np.uint8:
        raise RuntimeError(f"Unknown image dtype: {img_np.dtype} on {path}")
    img = torch.from_numpy(img_np / 255.0).permute(2, 0, 1)  # float64, as the official
    video_width, video_height = img_pil.size
    return img, video_height, video_width


def load_video_frames(video_path, image_size, offload_video_to_cpu, img_mean=SAM2_IMG_MEAN, img_std=SAM2_IMG_STD,
                      async_loading_frames=False, compute_device=torch.device("cpu")):
    """Official SAM 2 ``load_video_frames``: a folder of ``<index>.jpg`` frames (PIL resize to
    ``image_size`` squared, /255, ImageNet mean/std) or an .mp4 (decord, as the official) ->
    ``(images (T, 3, S, S) float32, video_height, video_width)``. ``async_loading_frames`` loads
    eagerly with the official asynchronous loader's values (float64 arithmetic per frame, the
    first frame's size); the synchronous path normalises in float32 and reports the last frame's
    size, as the official."""
    import os

    if isinstance(video_path, bytes) or (isinstance(video_path, str)
                                         and os.path.splitext(video_path)[-1] in (".mp4", ".MP4")):
        import decord

        mean = torch.tensor(img_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(img_std, dtype=torch.float32)[:, None, None]
        decord.bridge.set_bridge("torch")
        video_height, video_width, _ = decord.VideoReader(video_path).next().shape
        frames = [f.permute(2, 0, 1) for f in decord.VideoReader(video_path, width=image_size, height=image_size)]
        images = torch.stack(frames, dim=0).float() / 255.0
        if not offload_video_to_cpu:
            images, mean, std = images.to(compute_device), mean.to(compute_device), std.to(compute_device)
        images -= mean
        images /= std
        return images, video_height, video_width
    if not (isinstance(video_path, str) and os.path.isdir(video_path)):
        raise NotImplementedError("Only MP4 video and JPEG folder are supported at this moment")
    names = [p for p in os.listdir(video_path) if os.path.splitext(p)[-1] in (".jpg", ".jpeg", ".JPG", ".JPEG")]
    names.sort(key=lambda p: int(os.path.splitext(p)[0]))
    if not names:
        raise RuntimeError(f"no images found in {video_path}")
    paths = [os.path.join(video_path, n) for n in names]
    mean = torch.tensor(img_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(img_std, dtype=torch.float32)[:, None, None]
    images = torch.zeros(len(paths), 3, image_size, image_size, dtype=torch.float32)
    for n, path in enumerate(paths):
        img, h, w = _load_sam2_frame(path, image_size)
        if async_loading_frames:
            images[n] = (img - mean) / std  # float64 per frame, rounded once
            if n == 0:
                video_height, video_width = h, w
        else:
            images[n] = img
            video_height, video_width = h, w
    if not offload_video_to_cpu:
        images, mean, std = images.to(compute_device), mean.to(compute_device), std.to(compute_device)
    if not async_loading_frames:
        images -= mean
        images /= std
    return images, video_height, video_width


def sam2_frame_store(video_path, image_size, async_loading_frames=False, img_mean=SAM2_IMG_MEAN,
                     img_std=SAM2_IMG_STD, device=None):
    """sam3fast: the JPEG-folder case of :func:`load_video_frames` as a
    :class:`~sam3fast.video.io.FrameStore`: ``(store, video_height, video_width)`` where ``store[i]``
    equals ``load_video_frames(...)[0][i]`` bit for bit (the resized uint8 pixels stay on the host,
    the normalisation is a per-channel table on the device: 3 B per pixel on the host instead of
    12 B per pixel of float32 frames on the device). ``async_loading_frames``: decoded in a
    background thread, returned at once."""
    import os

    from PIL import Image

    from .io import FrameStore

    names = [p for p in os.listdir(video_path) if os.path.splitext(p)[-1] in (".jpg", ".jpeg", ".JPG", ".JPEG")]
    names.sort(key=lambda p: int(os.path.splitext(p)[0]))
    if not names:
        raise RuntimeError(f"no images found in {video_path}")
    sizes = []

    def frames():
        for name in names:
            with Image.open(os.path.join(video_path, name)) as im:
                sizes.append((im.size[1], im.size[0]))
                yield np.array(im.convert("RGB").resize((image_size, image_size)))

    mean = torch.tensor(img_mean, dtype=torch.float32)[:, None]
    std = torch.tensor(img_std, dtype=torch.float32)[:, None]
    u = torch.arange(256, dtype=torch.float64)[None] / 255.0
    if async_loading_frames:  # float64 arithmetic, one rounding (the official async loader)
        lut = ((u - mean.double()) / std.double()).float()
    else:  # float32 frames, then float32 -= mean, /= std
        lut = (u.float() - mean) / std
    if async_loading_frames:
        # the official async loader's point: frames decode in a background thread while tracking
        # runs (FrameStore waits for a frame not yet decoded); the size is the first frame's
        with Image.open(os.path.join(video_path, names[0])) as im:
            video_width, video_height = im.size
        store = FrameStore.from_frames_background(frames(), len(names), (image_size, image_size), lut, device,
                                                  name=f"JPEG frames of {video_path!r}")
        return store, video_height, video_width
    store = FrameStore.from_frames(frames(), len(names), lut, device)
    video_height, video_width = sizes[-1]
    return store, video_height, video_width


# ----------------------------------------------------------------------------------------------


def _first_weight(bb) -> Optional[torch.Tensor]:
    """A parameter of a backbone's vision part in its compute dtype: the first one outside the
    float32 islands (the first that is not float32; in a float32 backbone, the first), None for a
    module without parameters or a non-module backbone. (The first parameter itself is the ViT's
    pos table, a float32 island in a bf16 trunk: casting the frames to its dtype fed float32 frames
    to the bf16 patch embedding, which failed on the first H200 run of 2026-11-27.)"""
    vb = getattr(bb, "vision_backbone", bb)
    if not isinstance(vb, nn.Module):
        return None
    first = None
    for p in vb.parameters():
        if p.dtype != torch.float32:
            return p
        first = first if first is not None else p
    return first


def _backbone_fpn_pos(bb, img_batch: torch.Tensor):
    """(SAM 2 neck FPN levels, their position encodings) of ``bb`` on (B, 3, R, R) frames: a
    backbone with ``forward_image`` (the official's), or a vision backbone (or a module holding one
    as ``vision_backbone``) returning ``sam2_backbone_fpn`` / ``sam2_pos_enc``."""
    if hasattr(bb, "forward_image"):
        out = bb.forward_image(img_batch)["sam2_backbone_out"]
        if out is None:
            raise RuntimeError("the backbone has no SAM 2 neck")
        return out["backbone_fpn"], out["vision_pos_enc"]
    w = _first_weight(bb)
    if w is not None:
        img_batch = img_batch.to(w.dtype)  # frames are stored float16/float32; a bf16 backbone
    vb = getattr(bb, "vision_backbone", bb)
    # sam3fast's vision backbone skips the SAM 3 neck, which nothing here reads
    out = vb(img_batch, sam3_neck=False) if isinstance(vb, VisionBackbone) else vb(img_batch)
    fpn, pos = out["sam2_backbone_fpn"], out["sam2_pos_enc"]
    if fpn is None:
        raise RuntimeError("the backbone was built without the SAM 2 neck (add_sam2_neck=True)")
    return fpn, pos


# ``cuda_graphs="auto"`` graphs the propagation step up to this many objects. Measured on an H100
# (bf16, 24 frames 540 x 960, bench/results/video_fps_tracker_sam3_NVIDIA_H100_80GB_HBM3_2026-11-26):
# 1 object, tracker step alone 7.1 ms graphed against 10.5 ms eager (host-bound), 22.2 against
# 24.2 ms with the backbone; 5 objects (padded to a bucket of 8) 38.8 against 25.2 ms, 16 objects
# 69.6 against 66.5 ms (device-bound: the graph saves nothing and padding costs). 2 is unmeasured:
# a bucket of 2 pads nothing and is still mostly launch-bound.
GRAPH_AUTO_MAX_ROWS = 2


def _pad_rows(x, n, fill):
    """``x`` with rows appended (filled with ``fill``) up to ``n`` rows."""
    return torch.cat((x, x.new_full((n - x.shape[0],) + x.shape[1:], fill)))


STEP_BUCKETS = ("pow2", "exact")


def bucket_rows(rows: int, buckets: str) -> int:
    """The rows a compiled or graphed step runs for ``rows`` objects: the next power of two
    ("pow2": a video whose objects come and go captures a few buckets) or ``rows`` itself ("exact":
    one capture per object count, no padded row computed)."""
    if buckets not in STEP_BUCKETS:
        raise ValueError(f"step_buckets must be one of {STEP_BUCKETS}, got {buckets!r}")
    rows = max(int(rows), 1)
    return rows if buckets == "exact" else 1 << (rows - 1).bit_length()


def _pad_to_bucket(memory, memory_pos, valid, feats, top_pos, Bb):
    """Rows padded to ``Bb`` (compiled and graphed steps, :func:`bucket_rows`): zeros attending to
    one (zero) key, so no row divides 0 by 0; batch-1 feature levels and positions broadcast as they
    are."""
    B = memory.shape[0]
    if Bb > B:
        memory, memory_pos = _pad_rows(memory, Bb, 0), _pad_rows(memory_pos, Bb, 0)
        valid = _pad_rows(valid, Bb, False)
        valid[B:, 0] = True
        feats = [f if f.shape[0] == 1 else _pad_rows(f, Bb, 0) for f in feats]
        top_pos = top_pos if top_pos.shape[0] == 1 else _pad_rows(top_pos, Bb, 0)
    return memory, memory_pos, valid, feats, top_pos


def _batch_memories(parts, conds, L, split):
    """Stack the memory-attention inputs of several banks (``bank_memory`` outputs: memory,
    memory_pos, num_ptr_tokens, valid) on the batch dim. A bank with fewer conditioning frames
    (``conds``) gets invalid padding: whole frames (L tokens) in front of its frame tokens and
    ``split`` tokens per missing pointer after its pointer tokens (pointers stay last; RoPE
    positions are frame-local, so whole padded frames shift nothing)."""
    if len(parts) == 1:
        return parts[0]
    c_max = max(conds)
    n_ptr_max = max(p[2] for p in parts)
    mems, poss, valids = [], [], []
    for (memory, memory_pos, n_ptr, valid), c in zip(parts, conds):
        pad_f, pad_p = (c_max - c) * L, (c_max - c) * split
        if pad_f:
            n_frame = memory.shape[1] - n_ptr

            def pad(x, fill):
                head = x.new_full((x.shape[0], pad_f) + x.shape[2:], fill)
                tail = x.new_full((x.shape[0], pad_p) + x.shape[2:], fill)
                return torch.cat((head, x[:, :n_frame], x[:, n_frame:], tail), dim=1)

            memory, memory_pos, valid = pad(memory, 0), pad(memory_pos, 0), pad(valid, False)
        mems.append(memory)
        poss.append(memory_pos)
        valids.append(valid)
    return torch.cat(mems), torch.cat(poss), n_ptr_max, torch.cat(valids)


class Sam3TrackerPredictor(nn.Module):
    """The official ``Sam3TrackerPredictor`` (SAM 2-style video API) over a :class:`Tracker`.

    ``Sam3TrackerPredictor(tracker, cfg=None, *, backbone=None, <official heuristics>,
    bf16_casts=True)``. The tracker's parameters and submodules are adopted under their own names
    (shared, not copied), so ``state_dict()`` has exactly the ``tracker.*`` checkpoint keys without
    the prefix, like the official module. The defaults are those of ``model_builder.build_tracker``
    (``use_memory_selection`` = ``apply_temporal_disambiguation``, True in
    ``build_sam3_video_model``); ``max_cond_frames_in_attn`` / ``max_obj_ptrs_in_encoder`` default
    to ``cfg.tracker``.

    ``backbone`` (settable later, as ``predictor.backbone = model.detector.backbone``): only used
    when a frame's features are not in ``inference_state["cached_features"]``. Accepted: an object
    with the official ``forward_image(images) -> {"sam2_backbone_out": {...}}``; an object with a
    ``vision_backbone`` (sam3fast's ``Sam3Backbone``); or a callable returning sam3fast's
    ``VisionBackbone`` dict (``sam2_backbone_fpn``/``sam2_pos_enc``, built with
    ``add_sam2_neck=True``). It is kept out of the module tree: its weights belong to the detector.
    """

    def __init__(
        self,
        tracker: Tracker,
        cfg: Optional[Sam3Config] = None,
        *,
        backbone: Any = None,
        clear_non_cond_mem_around_input: bool = True,
        clear_non_cond_mem_for_multi_obj: bool = False,
        fill_hole_area: int = 0,
        always_start_from_first_ann_frame: bool = False,
        max_point_num_in_prompt_enc: int = 16,
        non_overlap_masks_for_output: bool = False,
        multimask_output_in_sam: bool = True,
        multimask_min_pt_num: int = 0,
        multimask_max_pt_num: int = 1,
        multimask_output_for_tracking: bool = True,
        memory_temporal_stride_for_eval: int = 1,
        trim_past_non_cond_mem_for_eval: bool = False,
        non_overlap_masks_for_mem_enc: bool = False,
        max_cond_frames_in_attn: Optional[int] = None,
        keep_first_cond_frame: bool = False,
        max_obj_ptrs_in_encoder: Optional[int] = None,
        use_memory_selection: bool = True,
        mf_threshold: float = 0.01,
        bf16_casts: bool = True,
        fixed_capacity_step: bool = True,
        retire_finished_outputs: bool = True,
    ):
        super().__init__()
        cfg = tracker.cfg if cfg is None else cfg
        # Adopt the tracker's weights (same objects): official state-dict names, no prefix.
        for name, p in tracker._parameters.items():
            self.register_parameter(name, p)
        for name, b in tracker._buffers.items():
            self.register_buffer(name, b, persistent=name not in tracker._non_persistent_buffers_set)
        for name, m in tracker._modules.items():
            self.add_module(name, m)
        self.cfg = cfg
        self.backbone = backbone

        t = cfg.tracker
        self.hidden_dim = cfg.d_model
        self.mem_dim = t.mem_dim
        self.num_maskmem = t.num_maskmem
        self.num_feature_levels = 3
        self.image_size = cfg.resolution
        self.backbone_stride = cfg.vit.patch_size
        self.sam_prompt_embed_dim = cfg.d_model
        self.sam_image_embedding_size = self.image_size // self.backbone_stride
        self.low_res_mask_size = self.image_size // self.backbone_stride * 4
        self.input_mask_size = self.low_res_mask_size * 4
        self.sigmoid_scale_for_mem_enc = 20.0
        self.sigmoid_bias_for_mem_enc = -10.0

        self.clear_non_cond_mem_around_input = clear_non_cond_mem_around_input
        self.clear_non_cond_mem_for_multi_obj = clear_non_cond_mem_for_multi_obj
        self.fill_hole_area = fill_hole_area
        self.always_start_from_first_ann_frame = always_start_from_first_ann_frame
        self.max_point_num_in_prompt_enc = max_point_num_in_prompt_enc
        self.non_overlap_masks_for_output = non_overlap_masks_for_output
        self.multimask_output_in_sam = multimask_output_in_sam
        self.multimask_min_pt_num = multimask_min_pt_num
        self.multimask_max_pt_num = multimask_max_pt_num
        self.multimask_output_for_tracking = multimask_output_for_tracking
        self.memory_temporal_stride_for_eval = memory_temporal_stride_for_eval
        self.trim_past_non_cond_mem_for_eval = trim_past_non_cond_mem_for_eval
        self.non_overlap_masks_for_mem_enc = non_overlap_masks_for_mem_enc
        self.max_cond_frames_in_attn = t.max_cond_frames_in_attn if max_cond_frames_in_attn is None \
            else max_cond_frames_in_attn
        self.keep_first_cond_frame = keep_first_cond_frame
        self.max_obj_ptrs_in_encoder = t.max_obj_ptrs_in_encoder if max_obj_ptrs_in_encoder is None \
            else max_obj_ptrs_in_encoder
        self.use_memory_selection = use_memory_selection
        self.mf_threshold = mf_threshold
        self.bf16_casts = bf16_casts
        # sam3fast: propagation runs on a preallocated MemoryBank (no host sync per frame) when the
        # session allows it (see _fixed_capacity_refusal); False = the official per-frame selection.
        self.fixed_capacity_step = fixed_capacity_step
        self.step_counts = {"fixed_capacity": 0, "reference": 0}
        # sam3fast: the banks of every session that propagates together live in one ObjectTable
        # (fixed row capacity, active mask, per-row conditioning slots): the step reads its memory
        # straight from the table, with no per-frame concatenation of per-session banks (and no
        # bucket padding: the table's rows are the bucket). False = one MemoryBank per session,
        # concatenated per frame.
        self.object_table = True
        # sam3fast: a new session (a new video, or objects added in a new batch) takes an object
        # table that no session holds any more, of the same shapes, before it allocates one: its
        # tensors, and the step graphs captured on their addresses, serve the new session with no
        # recapture. Up to ``spare_tables`` such tables stay allocated between sessions (the
        # newest); 0 = every new session allocates its own table (and captures its step again);
        # setting it frees the unheld tables beyond the new value at once.
        self.spare_tables = 1
        self._tables: List[ObjectTable] = []  # the tables this predictor made, newest last
        # sam3fast: on CUDA, a tracked frame's stored output moves to pinned host memory once the
        # bank has taken it (see _retire_output); False = every output stays on the device (official).
        self.retire_finished_outputs = retire_finished_outputs
        # sam3fast: the propagation step's memory-encoder input from the low-res masks in one fused
        # pass on CUDA (sam3fast::mask_for_memory); False = the official upsample/sigmoid/resize chain.
        self.use_mask_kernel = True
        self._retire_event = None
        self._memory_step_compiled = None
        # sam3fast: on CUDA, the propagation step (memory_step) captured as a CUDA graph per object
        # bucket and replayed (sam3fast.video.tracker_graphs), without an inductor compile; on CPU
        # (True) the same padded buffers run eagerly. "auto" (default): graphed on CUDA while the
        # step has at most GRAPH_AUTO_MAX_ROWS objects, where it is host-bound; True: always;
        # False: never. compile_step(mode="reduce-overhead") is the compiled alternative.
        self.cuda_graphs = "auto"
        # sam3fast: the object counts a graphed or compiled step runs: "pow2" (default) pads the
        # objects to the next power of two (padded rows cost a full row of memory attention: 5
        # objects as 8 on an H100 took 38.8 ms a frame graphed against 25.2 eager); "exact" captures
        # (compiles) one step per object count and computes no padded row.
        self.step_buckets = "pow2"
        self._graph_runner = None
        # sam3fast: on CUDA, forward_image (the backbone on each frame the feature cache misses:
        # every frame of a propagation, then the mask decoder's conv_s0 / conv_s1 on two levels)
        # replays from a CUDA graph per frame shape (sam3fast.predictor.graphed_call.GraphedCall,
        # captured on the second frame of a shape); eagerly the ViT trunk is host-bound (H100 bf16,
        # run 2 profile: 19.3 ms of host time for 13.6 ms of kernels). "auto" (default): on CUDA;
        # True: always (CUDA only, else an error); False: never. The graphs hold the backbone's
        # activations (one memory pool) while the predictor lives; a new backbone, or weights
        # moved to new storage, are captured afresh.
        self.backbone_cuda_graphs = "auto"
        self._backbone_call = None
        self._backbone_call_key = None
        # sam3fast: on CUDA, the memory encoder that runs outside the tracking step (the concept
        # video encodes every frame's masks after its planning step; prompts and consolidation)
        # replays from a CUDA graph per object count and settings (GraphedCall, captured on the
        # second call of a shape; object counts padded to powers of two): eagerly it is ~100 small
        # kernels a call. "auto" (default): on CUDA; True: always (CUDA only); False: never.
        self.memory_encoder_cuda_graphs = "auto"
        self._memory_encoder_call = None
        self._memory_encoder_call_key = None
        # sam3fast: propagate_in_video runs the backbone on the next frame it will track before the
        # current frame's step (see _prefetch_features). On CUDA it runs on a side stream, so the
        # ViT trunk of frame t+1 (large GEMMs) shares the GPU with the step of frame t (at a few
        # objects, small latency-bound kernels) instead of following it; elsewhere it only changes
        # the order. The same computations on the same inputs: the same outputs. Costs one more
        # frame of features on the device. False (default until an H100 times it): the official
        # order, the backbone inline on each frame.
        self.prefetch_backbone = False
        self._prefetch = SideStream()  # its stream and the event of the last backbone run there
        self.iter_use_prev_mask_pred = True
        self.add_all_frames_to_correct_as_cond = True
        self.eval()

    @classmethod
    def from_config(cls, cfg: Sam3Config, tracker: Optional[Tracker] = None, **kwargs) -> "Sam3TrackerPredictor":
        return cls(Tracker.from_config(cfg) if tracker is None else tracker, cfg, **kwargs)

    def __setattr__(self, name, value):
        # The backbone is the detector's (its weights are not the tracker's): keep it out of
        # _modules so state_dict() / .to() / load_state_dict() only see tracker.* weights.
        if name == "backbone":
            self.__dict__["backbone"] = value
            return
        super().__setattr__(name, value)

    @property
    def device(self) -> torch.device:
        return self.no_obj_ptr.device

    @property
    def dtype(self) -> torch.dtype:
        return self.no_obj_ptr.dtype

    @property
    def mem_interpol_size(self) -> Tuple[int, int]:
        """(H, W) the memory encoder resizes masks to (official
        ``maskmem_backbone.mask_downsampler.interpol_size``, a list there; an int in sam3fast)."""
        s = self.maskmem_backbone.mask_downsampler.interpol_size
        return (s, s) if isinstance(s, int) else tuple(s)

    def _to_memory_bank(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.bfloat16) if self.bf16_casts else x

    def _from_memory_bank(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype, non_blocking=True)

    # ------------------------------------------------------------------------------------------
    # Session state

    @torch.inference_mode()
    def init_state(
        self,
        video_height=None,
        video_width=None,
        num_frames=None,
        video_path=None,
        cached_features=None,
        offload_video_to_cpu=False,
        offload_state_to_cpu=False,
        async_loading_frames=False,
    ):
        """Initialize an inference state (official layout; see the module docstring)."""
        inference_state = {}
        inference_state["offload_video_to_cpu"] = offload_video_to_cpu
        inference_state["offload_state_to_cpu"] = offload_state_to_cpu
        inference_state["device"] = self.device
        inference_state["storage_device"] = torch.device("cpu") if offload_state_to_cpu else self.device
        if video_path is not None:
            images, video_height, video_width = self._load_video_frames(
                video_path, offload_video_to_cpu, async_loading_frames, inference_state["storage_device"]
            )
            inference_state["images"] = images
            inference_state["num_frames"] = len(images)
        else:
            inference_state["num_frames"] = num_frames
        inference_state["video_height"] = video_height
        inference_state["video_width"] = video_width
        inference_state["point_inputs_per_obj"] = {}
        inference_state["mask_inputs_per_obj"] = {}
        inference_state["cached_features"] = {} if cached_features is None else cached_features
        inference_state["constants"] = {}
        inference_state["obj_id_to_idx"] = OrderedDict()
        inference_state["obj_idx_to_id"] = OrderedDict()
        inference_state["obj_ids"] = []
        inference_state["output_dict"] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        inference_state["first_ann_frame_idx"] = None
        inference_state["output_dict_per_obj"] = {}
        inference_state["temp_output_dict_per_obj"] = {}
        inference_state["consolidated_frame_inds"] = {"cond_frame_outputs": set(), "non_cond_frame_outputs": set()}
        inference_state["tracking_has_started"] = False
        inference_state["frames_already_tracked"] = {}
        self.clear_all_points_in_video(inference_state)
        return inference_state

    def _load_video_frames(self, video_path, offload_video_to_cpu, async_loading_frames, compute_device):
        """A JPEG folder streams from the host (:func:`sam2_frame_store`, values unchanged, the
        device holds a frame or two whatever the video's length; ``offload_video_to_cpu`` changes
        nothing then); an .mp4 goes through the official loader (decord)."""
        import os

        if isinstance(video_path, str) and os.path.isdir(video_path):
            return sam2_frame_store(video_path, self.image_size, async_loading_frames, device=self.device)
        return load_video_frames(
            video_path=video_path, image_size=self.image_size, offload_video_to_cpu=offload_video_to_cpu,
            async_loading_frames=async_loading_frames, compute_device=compute_device,
        )

    def _obj_id_to_idx(self, inference_state, obj_id):
        """Map a client-side object id to the model-side index (new ids only before tracking starts)."""
        obj_idx = inference_state["obj_id_to_idx"].get(obj_id, None)
        if obj_idx is not None:
            return obj_idx
        if inference_state["tracking_has_started"]:
            raise RuntimeError(
                f"Cannot add new object id {obj_id} after tracking starts. "
                f"All existing object ids: {inference_state['obj_ids']}."
            )
        obj_idx = len(inference_state["obj_id_to_idx"])
        inference_state["obj_id_to_idx"][obj_id] = obj_idx
        inference_state["obj_idx_to_id"][obj_idx] = obj_id
        inference_state["obj_ids"] = list(inference_state["obj_id_to_idx"])
        inference_state["point_inputs_per_obj"][obj_idx] = {}
        inference_state["mask_inputs_per_obj"][obj_idx] = {}
        inference_state["output_dict_per_obj"][obj_idx] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        inference_state["temp_output_dict_per_obj"][obj_idx] = {"cond_frame_outputs": {},
                                                                "non_cond_frame_outputs": {}}
        return obj_idx

    def _obj_idx_to_id(self, inference_state, obj_idx):
        return inference_state["obj_idx_to_id"][obj_idx]

    def _get_obj_num(self, inference_state):
        return len(inference_state["obj_idx_to_id"])

    # ------------------------------------------------------------------------------------------
    # Prompts

    @staticmethod
    def _check_frame_idx(inference_state, frame_idx):
        num_frames = inference_state["num_frames"]
        if isinstance(frame_idx, bool) or not isinstance(frame_idx, (int, np.integer)) or not 0 <= frame_idx < num_frames:
            # IndexError: the type the official raises (from deep inside, after recording the prompt)
            raise IndexError(f"frame_idx {frame_idx!r} is out of range for a video of {num_frames} frames")

    @torch.inference_mode()
    def add_new_points_or_box(
        self,
        inference_state,
        frame_idx,
        obj_id,
        points=None,
        labels=None,
        clear_old_points=True,
        rel_coordinates=True,
        use_prev_mem_frame=False,
        normalize_coords=True,
        box=None,
    ):
        """Add clicks (and/or a box, xyxy) for one object on one frame. Coordinates are relative
        (0-1) with ``rel_coordinates=True``, else in R-pixels. Returns ``(frame_idx, obj_ids, None,
        video_res_masks (B, 1, H, W) logits)`` for all objects of the state."""
        # (checked before anything is recorded, so a bad call leaves the session as it was)
        self._check_frame_idx(inference_state, frame_idx)
        if (points is not None) != (labels is not None):
            raise ValueError("points and labels must be provided together")
        if points is None and box is None:
            raise ValueError("at least one of points or box must be provided as input")
        obj_idx = self._obj_id_to_idx(inference_state, obj_id)
        point_inputs_per_frame = inference_state["point_inputs_per_obj"][obj_idx]
        mask_inputs_per_frame = inference_state["mask_inputs_per_obj"][obj_idx]

        if points is None:
            points = torch.zeros(0, 2, dtype=torch.float32)
        elif not isinstance(points, torch.Tensor):
            points = torch.tensor(points, dtype=torch.float32)
        if labels is None:
            labels = torch.zeros(0, dtype=torch.int32)
        elif not isinstance(labels, torch.Tensor):
            labels = torch.tensor(labels, dtype=torch.int32)
        if points.dim() == 2:
            points = points.unsqueeze(0)
        if labels.dim() == 1:
            labels = labels.unsqueeze(0)
        if box is not None and not isinstance(box, torch.Tensor):
            # (the official multiplies a list box by image_size below, which only works for tensors)
            box = torch.tensor(box, dtype=torch.float32, device=points.device)

        if rel_coordinates:
            points = points * self.image_size
            if box is not None:
                box = box * self.image_size

        # A box goes first, as two corner points with labels 2 and 3 (as SAM 2 is trained).
        if box is not None:
            if not clear_old_points:
                raise ValueError(
                    "cannot add box without clearing old points, since "
                    "box prompt must be provided before any point prompt "
                    "(please use clear_old_points=True instead)"
                )
            box_coords = box.reshape(1, 2, 2).to(points.device, points.dtype)
            box_labels = torch.tensor([2, 3], dtype=torch.int32, device=labels.device).reshape(1, 2)
            points = torch.cat([box_coords, points], dim=1)
            labels = torch.cat([box_labels, labels.to(torch.int32)], dim=1)

        points = points.to(inference_state["device"])
        labels = labels.to(inference_state["device"])

        point_inputs = None if clear_old_points else point_inputs_per_frame.get(frame_idx, None)
        point_inputs = concat_points(point_inputs, points, labels)
        point_inputs_per_frame[frame_idx] = point_inputs
        mask_inputs_per_frame.pop(frame_idx, None)
        # A frame not tracked yet is an initial conditioning frame (SAM-like, no memory); on a
        # tracked frame the clicks correct the tracked mask.
        is_init_cond_frame = frame_idx not in inference_state["frames_already_tracked"]
        reverse = False if is_init_cond_frame else inference_state["frames_already_tracked"][frame_idx]["reverse"]
        obj_output_dict = inference_state["output_dict_per_obj"][obj_idx]
        obj_temp_output_dict = inference_state["temp_output_dict_per_obj"][obj_idx]
        is_cond = is_init_cond_frame or self.add_all_frames_to_correct_as_cond
        storage_key = "cond_frame_outputs" if is_cond else "non_cond_frame_outputs"

        # Keep the first and last points only (training saw at most 8); the stored dict is trimmed
        # too, as in the official.
        num_points = point_inputs["point_coords"].size(1)
        if num_points > self.max_point_num_in_prompt_enc > 0:
            num_first = self.max_point_num_in_prompt_enc // 2
            num_last = self.max_point_num_in_prompt_enc - num_first
            for key in ("point_coords", "point_labels"):
                v = point_inputs[key]
                point_inputs[key] = torch.cat([v[:, :num_first], v[:, -num_last:]], dim=1)
            logger.warning(
                f"Too many points ({num_points}) are provided on frame {frame_idx}. Only "
                f"the first {num_first} points and the last {num_last} points will be used."
            )
        # The latest mask logits of this object on this frame go in with the clicks.
        prev_sam_mask_logits = None
        if self.iter_use_prev_mask_pred:
            prev_out = obj_temp_output_dict[storage_key].get(frame_idx)
            if prev_out is None:
                prev_out = obj_output_dict["cond_frame_outputs"].get(frame_idx)
                if prev_out is None:
                    prev_out = obj_output_dict["non_cond_frame_outputs"].get(frame_idx)
            if prev_out is not None and prev_out["pred_masks"] is not None:
                prev_sam_mask_logits = prev_out["pred_masks"].to(self.device, non_blocking=True)
                prev_sam_mask_logits = torch.clamp(prev_sam_mask_logits, -32.0, 32.0)
        current_out, _ = self._run_single_frame_inference(
            inference_state=inference_state,
            output_dict=obj_output_dict,
            frame_idx=frame_idx,
            batch_size=1,
            is_init_cond_frame=is_init_cond_frame,
            point_inputs=point_inputs,
            mask_inputs=None,
            reverse=reverse,
            # memory is encoded in propagate_in_video_preflight, after non-overlap on all objects
            run_mem_encoder=False,
            prev_sam_mask_logits=prev_sam_mask_logits,
            use_prev_mem_frame=use_prev_mem_frame,
        )
        obj_temp_output_dict[storage_key][frame_idx] = current_out

        obj_ids = inference_state["obj_ids"]
        consolidated_out = self._consolidate_temp_output_across_obj(
            inference_state, frame_idx, is_cond=is_cond, run_mem_encoder=False, consolidate_at_video_res=True,
        )
        _, video_res_masks = self._get_orig_video_res_output(inference_state, consolidated_out["pred_masks_video_res"])
        return frame_idx, obj_ids, None, video_res_masks

    def add_new_points(self, *args, **kwargs):
        """Deprecated alias of :meth:`add_new_points_or_box` (the orchestration still calls it)."""
        return self.add_new_points_or_box(*args, **kwargs)

    @torch.inference_mode()
    def add_new_mask(self, inference_state, frame_idx, obj_id, mask, add_mask_to_memory=False):
        """Add a mask (Hm, Wm) bool/float (0-1) for one object on one frame. The output mask is the
        input itself at video resolution (+-1024). Returns ``(frame_idx, obj_ids, None,
        video_res_masks (B, 1, H, W))``. ``add_mask_to_memory`` is accepted and unused (official)."""
        self._check_frame_idx(inference_state, frame_idx)
        if mask.dim() != 2:
            raise ValueError(f"mask must be (H, W), got {tuple(mask.shape)}")
        obj_idx = self._obj_id_to_idx(inference_state, obj_id)
        point_inputs_per_frame = inference_state["point_inputs_per_obj"][obj_idx]
        mask_inputs_per_frame = inference_state["mask_inputs_per_obj"][obj_idx]
        mask_H, mask_W = mask.shape
        mask_inputs_orig = mask[None, None].float().to(inference_state["device"])
        if mask_H != self.input_mask_size or mask_W != self.input_mask_size:
            mask_inputs = F.interpolate(mask_inputs_orig, size=(self.input_mask_size, self.input_mask_size),
                                        align_corners=False, mode="bilinear", antialias=True)
        else:
            mask_inputs = mask_inputs_orig

        video_H = inference_state["video_height"]
        video_W = inference_state["video_width"]
        if mask_H != video_H or mask_W != video_W:
            mask_inputs_video_res = F.interpolate(mask_inputs_orig, size=(video_H, video_W), align_corners=False,
                                                  mode="bilinear", antialias=True)
        else:
            mask_inputs_video_res = mask_inputs_orig
        mask_inputs_video_res = mask_inputs_video_res > 0.5

        mask_inputs_per_frame[frame_idx] = mask_inputs_video_res
        point_inputs_per_frame.pop(frame_idx, None)
        is_init_cond_frame = frame_idx not in inference_state["frames_already_tracked"]
        reverse = False if is_init_cond_frame else inference_state["frames_already_tracked"][frame_idx]["reverse"]
        obj_output_dict = inference_state["output_dict_per_obj"][obj_idx]
        obj_temp_output_dict = inference_state["temp_output_dict_per_obj"][obj_idx]
        is_cond = is_init_cond_frame or self.add_all_frames_to_correct_as_cond
        storage_key = "cond_frame_outputs" if is_cond else "non_cond_frame_outputs"

        current_out, _ = self._run_single_frame_inference(
            inference_state=inference_state,
            output_dict=obj_output_dict,
            frame_idx=frame_idx,
            batch_size=1,
            is_init_cond_frame=is_init_cond_frame,
            point_inputs=None,
            mask_inputs=mask_inputs,
            reverse=reverse,
            run_mem_encoder=False,
        )
        # The input mask at video resolution is the output (masks don't change after brushing).
        current_out["pred_masks"] = None
        current_out["pred_masks_video_res"] = torch.where(mask_inputs_video_res, -NO_OBJ_SCORE, NO_OBJ_SCORE)
        obj_temp_output_dict[storage_key][frame_idx] = current_out
        # Other objects' input masks on this frame lose the overlapping part.
        for obj_idx2, obj_temp_output_dict2 in inference_state["temp_output_dict_per_obj"].items():
            if obj_idx2 == obj_idx:
                continue
            current_out2 = obj_temp_output_dict2[storage_key].get(frame_idx, None)
            if current_out2 is not None and "pred_masks_video_res" in current_out2:
                current_out2["pred_masks_video_res"] = torch.where(
                    mask_inputs_video_res, NO_OBJ_SCORE, current_out2["pred_masks_video_res"]
                )

        obj_ids = inference_state["obj_ids"]
        consolidated_out = self._consolidate_temp_output_across_obj(
            inference_state, frame_idx, is_cond=is_cond, run_mem_encoder=False, consolidate_at_video_res=True,
        )
        _, video_res_masks = self._get_orig_video_res_output(inference_state, consolidated_out["pred_masks_video_res"])
        return frame_idx, obj_ids, None, video_res_masks

    @torch.inference_mode()
    def add_new_masks(self, inference_state, frame_idx, obj_ids, masks):
        """sam3fast: :meth:`add_new_mask` for several objects on one frame, as one batch (the SAM 3
        video model adds each frame's new detections this way). ``masks`` (B, Hm, Wm) bool/float
        (0-1), one per id of ``obj_ids``. The state is left as B ``add_new_mask`` calls in this
        order leave it: each object's input mask becomes its output (heads run once, on the batch,
        for the pointers), its video-resolution output loses the pixels of the masks added after
        it, and the objects that already hold an input on this frame lose those of all B masks.
        Each official call also consolidates the frame for its return value, which the video model
        drops (B consolidations at video resolution); this returns nothing:
        :meth:`propagate_in_video_preflight` consolidates once."""
        self._check_frame_idx(inference_state, frame_idx)
        obj_ids = [int(i) for i in obj_ids]
        if masks.dim() != 3 or masks.shape[0] != len(obj_ids):
            raise ValueError(f"masks must be (B, H, W) with B = {len(obj_ids)} object ids, got {tuple(masks.shape)}")
        if len(set(obj_ids)) != len(obj_ids):
            raise ValueError(f"object ids must be distinct, got {obj_ids}")
        B = len(obj_ids)
        if B == 0:
            return
        if self.trim_past_non_cond_mem_for_eval:  # (each official call trims its object's memory)
            for obj_id, mask in zip(obj_ids, masks):
                self.add_new_mask(inference_state, frame_idx, obj_id, mask)
            return
        obj_idxs = [self._obj_id_to_idx(inference_state, obj_id) for obj_id in obj_ids]
        orig = masks[:, None].float().to(inference_state["device"])
        size_in = (self.input_mask_size, self.input_mask_size)
        mask_inputs = orig if tuple(orig.shape[-2:]) == size_in else F.interpolate(
            orig, size=size_in, align_corners=False, mode="bilinear", antialias=True)
        video = (inference_state["video_height"], inference_state["video_width"])
        video_res = (orig if tuple(orig.shape[-2:]) == video else F.interpolate(
            orig, size=video, align_corners=False, mode="bilinear", antialias=True)) > 0.5  # (B, 1, H, W)
        is_init_cond_frame = frame_idx not in inference_state["frames_already_tracked"]
        reverse = False if is_init_cond_frame else inference_state["frames_already_tracked"][frame_idx]["reverse"]
        storage_key = ("cond_frame_outputs" if is_init_cond_frame or self.add_all_frames_to_correct_as_cond
                       else "non_cond_frame_outputs")
        image, _, feats, pos, feat_sizes = self._get_image_feature(inference_state, frame_idx, B)
        out = self.track_step(  # a mask input: no memory is read (_use_mask_as_output)
            frame_idx=frame_idx, is_init_cond_frame=is_init_cond_frame, current_vision_feats=feats,
            current_vision_pos_embeds=pos, feat_sizes=feat_sizes, image=image, point_inputs=None,
            mask_inputs=mask_inputs, output_dict=inference_state["output_dict"],
            num_frames=inference_state["num_frames"], track_in_reverse=reverse, run_mem_encoder=False)
        # object i loses the pixels of every object added after it: a suffix OR over the batch
        later = torch.flip(torch.cummax(torch.flip(video_res.to(torch.uint8), (0,)), dim=0).values, (0,)).bool()
        later = torch.cat([later[1:], torch.zeros_like(later[:1])])
        own = torch.where(video_res, -NO_OBJ_SCORE, NO_OBJ_SCORE)
        video_res_out = torch.where(later, NO_OBJ_SCORE, own)
        batch = set(obj_idxs)
        any_new = video_res.any(dim=0, keepdim=True)
        for obj_idx2, temp2 in inference_state["temp_output_dict_per_obj"].items():
            prev = temp2[storage_key].get(frame_idx, None)
            if obj_idx2 not in batch and prev is not None and "pred_masks_video_res" in prev:
                prev["pred_masks_video_res"] = torch.where(any_new[0], NO_OBJ_SCORE, prev["pred_masks_video_res"])
        for i, obj_idx in enumerate(obj_idxs):
            inference_state["mask_inputs_per_obj"][obj_idx][frame_idx] = video_res[i:i + 1]
            inference_state["point_inputs_per_obj"][obj_idx].pop(frame_idx, None)
            sl = slice(i, i + 1)
            current_out = {"maskmem_features": None, "maskmem_pos_enc": None, "pred_masks": None,
                           "obj_ptr": out["obj_ptr"][sl], "object_score_logits": out["object_score_logits"][sl]}
            if self.use_memory_selection:
                current_out["iou_score"] = out["iou_score"][sl]
                current_out["eff_iou_score"] = self.cal_mem_score(out["object_score_logits"][sl], out["iou_score"][sl])
            current_out["pred_masks_video_res"] = video_res_out[sl]
            inference_state["temp_output_dict_per_obj"][obj_idx][storage_key][frame_idx] = current_out

    # ------------------------------------------------------------------------------------------
    # Output assembly

    def _get_orig_video_res_output(self, inference_state, any_res_masks):
        """Masks (B, 1, h, w) -> ``(any_res_masks on device, video_res_masks (B, 1, H, W))``,
        bilinear, with the optional non-overlap and hole filling."""
        video_H = inference_state["video_height"]
        video_W = inference_state["video_width"]
        any_res_masks = any_res_masks.to(inference_state["device"], non_blocking=True)
        if any_res_masks.shape[-2:] == (video_H, video_W):
            video_res_masks = any_res_masks
        else:
            video_res_masks = F.interpolate(any_res_masks, size=(video_H, video_W), mode="bilinear",
                                            align_corners=False)
        if self.non_overlap_masks_for_output:
            video_res_masks = self._apply_non_overlapping_constraints(video_res_masks)
        if self.fill_hole_area > 0:
            video_res_masks = fill_holes_in_mask_scores(video_res_masks, self.fill_hole_area)
        return any_res_masks, video_res_masks

    def _consolidate_temp_output_across_obj(self, inference_state, frame_idx, is_cond, run_mem_encoder,
                                            consolidate_at_video_res=False):
        """Merge the per-object outputs of one frame (temporary outputs first, then stored ones)
        into one batched output; objects without output get NO_OBJ_SCORE masks. With
        ``run_mem_encoder`` the masks are resized to R, made non-overlapping and encoded."""
        batch_size = self._get_obj_num(inference_state)
        storage_key = "cond_frame_outputs" if is_cond else "non_cond_frame_outputs"
        if consolidate_at_video_res:
            if run_mem_encoder:
                raise ValueError("memory encoder cannot run at video resolution")
            consolidated_H, consolidated_W = inference_state["video_height"], inference_state["video_width"]
            consolidated_mask_key = "pred_masks_video_res"
        else:
            consolidated_H = consolidated_W = self.low_res_mask_size
            consolidated_mask_key = "pred_masks"

        device = inference_state["device"]
        consolidated_out = {
            "maskmem_features": None,
            "maskmem_pos_enc": None,
            consolidated_mask_key: torch.full((batch_size, 1, consolidated_H, consolidated_W), NO_OBJ_SCORE,
                                              dtype=torch.float32, device=inference_state["storage_device"]),
            "obj_ptr": torch.full((batch_size, self.hidden_dim), NO_OBJ_SCORE, dtype=torch.float32, device=device),
            # present by default (sigmoid(10) ~ 1), as the official mask decoder assumes
            "object_score_logits": torch.full((batch_size, 1), 10.0, dtype=torch.float32, device=device),
        }
        if self.use_memory_selection:
            consolidated_out["iou_score"] = torch.full((batch_size, 1), 0.0, dtype=torch.float32, device=device)
        empty_mask_ptr = None
        for obj_idx in range(batch_size):
            obj_temp_output_dict = inference_state["temp_output_dict_per_obj"][obj_idx]
            obj_output_dict = inference_state["output_dict_per_obj"][obj_idx]
            out = obj_temp_output_dict[storage_key].get(frame_idx, None)
            if out is None:
                out = obj_output_dict["cond_frame_outputs"].get(frame_idx, None)
            if out is None:
                out = obj_output_dict["non_cond_frame_outputs"].get(frame_idx, None)
            if out is None:
                if run_mem_encoder:
                    if empty_mask_ptr is None:
                        empty_mask_ptr = self._get_empty_mask_ptr(inference_state, frame_idx)
                    consolidated_out["obj_ptr"][obj_idx: obj_idx + 1] = empty_mask_ptr
                continue
            obj_mask = out["pred_masks_video_res"] if "pred_masks_video_res" in out else out["pred_masks"]
            consolidated_pred_masks = consolidated_out[consolidated_mask_key]
            if obj_mask.shape[-2:] == consolidated_pred_masks.shape[-2:]:
                consolidated_pred_masks[obj_idx: obj_idx + 1] = obj_mask
            else:
                is_downsampling = "pred_masks_video_res" in out
                consolidated_pred_masks[obj_idx: obj_idx + 1] = F.interpolate(
                    obj_mask, size=consolidated_pred_masks.shape[-2:], mode="bilinear", align_corners=False,
                    antialias=is_downsampling,
                )
            consolidated_out["obj_ptr"][obj_idx: obj_idx + 1] = out["obj_ptr"]
            consolidated_out["object_score_logits"][obj_idx: obj_idx + 1] = out["object_score_logits"]
            if self.use_memory_selection:
                consolidated_out["iou_score"][obj_idx: obj_idx + 1] = out["iou_score"]

        if run_mem_encoder:
            high_res_masks = F.interpolate(consolidated_out["pred_masks"].to(device, non_blocking=True),
                                           size=(self.image_size, self.image_size), mode="bilinear",
                                           align_corners=False)
            high_res_masks = self._apply_non_overlapping_constraints(high_res_masks)
            maskmem_features, maskmem_pos_enc = self._run_memory_encoder(
                inference_state=inference_state,
                frame_idx=frame_idx,
                batch_size=batch_size,
                high_res_masks=high_res_masks,
                object_score_logits=consolidated_out["object_score_logits"],
                is_mask_from_pts=True,  # frames the user interacted with
            )
            consolidated_out["maskmem_features"] = maskmem_features
            consolidated_out["maskmem_pos_enc"] = maskmem_pos_enc
        return consolidated_out

    def _get_empty_mask_ptr(self, inference_state, frame_idx):
        """The pointer of an empty mask on this frame, (1, D). The official runs ``track_step`` on
        an all-zero mask input; ``_use_mask_as_output`` then blends the heads' pointer with weight 0
        and ``no_obj_ptr`` with weight 1, which is ``no_obj_ptr`` exactly (0 * finite = 0), so the
        heads pass is skipped."""
        return self.no_obj_ptr.detach().to(torch.float32).clone()

    @torch.inference_mode()
    def propagate_in_video_preflight(self, inference_state, run_mem_encoder=True):
        """Consolidate the prompt outputs into ``output_dict`` (encoding their memory) before tracking."""
        inference_state["tracking_has_started"] = True
        batch_size = self._get_obj_num(inference_state)
        temp_output_dict_per_obj = inference_state["temp_output_dict_per_obj"]
        output_dict = inference_state["output_dict"]
        consolidated_frame_inds = inference_state["consolidated_frame_inds"]
        for is_cond in [False, True]:
            storage_key = "cond_frame_outputs" if is_cond else "non_cond_frame_outputs"
            temp_frame_inds = set()
            for obj_temp_output_dict in temp_output_dict_per_obj.values():
                temp_frame_inds.update(obj_temp_output_dict[storage_key].keys())
            consolidated_frame_inds[storage_key].update(temp_frame_inds)
            for frame_idx in temp_frame_inds:
                consolidated_out = self._consolidate_temp_output_across_obj(
                    inference_state, frame_idx, is_cond=is_cond, run_mem_encoder=run_mem_encoder
                )
                output_dict[storage_key][frame_idx] = consolidated_out
                self._add_output_per_object(inference_state, frame_idx, consolidated_out, storage_key)
                clear_non_cond_mem = self.clear_non_cond_mem_around_input and (
                    self.clear_non_cond_mem_for_multi_obj or batch_size <= 1
                )
                if clear_non_cond_mem:
                    self._clear_non_cond_mem_around_input(inference_state, frame_idx)
            for obj_temp_output_dict in temp_output_dict_per_obj.values():
                obj_temp_output_dict[storage_key].clear()

        # A frame that became a conditioning frame loses its non-conditioning output.
        for frame_idx in output_dict["cond_frame_outputs"]:
            output_dict["non_cond_frame_outputs"].pop(frame_idx, None)
        for obj_output_dict in inference_state["output_dict_per_obj"].values():
            for frame_idx in obj_output_dict["cond_frame_outputs"]:
                obj_output_dict["non_cond_frame_outputs"].pop(frame_idx, None)
        for frame_idx in consolidated_frame_inds["cond_frame_outputs"]:
            assert frame_idx in output_dict["cond_frame_outputs"]
            consolidated_frame_inds["non_cond_frame_outputs"].discard(frame_idx)

        all_consolidated_frame_inds = (consolidated_frame_inds["cond_frame_outputs"]
                                       | consolidated_frame_inds["non_cond_frame_outputs"])
        input_frames_inds = set()
        for point_inputs_per_frame in inference_state["point_inputs_per_obj"].values():
            input_frames_inds.update(point_inputs_per_frame.keys())
        for mask_inputs_per_frame in inference_state["mask_inputs_per_obj"].values():
            input_frames_inds.update(mask_inputs_per_frame.keys())
        assert all_consolidated_frame_inds == input_frames_inds
        if inference_state["first_ann_frame_idx"] is None:
            inference_state["first_ann_frame_idx"] = min(input_frames_inds, default=None)
        if inference_state["first_ann_frame_idx"] not in output_dict["cond_frame_outputs"]:
            inference_state["first_ann_frame_idx"] = min(output_dict["cond_frame_outputs"], default=None)

    def _get_processing_order(self, inference_state, start_frame_idx, max_frame_num_to_track, reverse):
        num_frames = inference_state["num_frames"]
        if self.always_start_from_first_ann_frame:
            start_frame_idx = inference_state["first_ann_frame_idx"]
        if start_frame_idx is None:
            start_frame_idx = min(inference_state["output_dict"]["cond_frame_outputs"])
        if max_frame_num_to_track is None:
            max_frame_num_to_track = num_frames
        if reverse:
            end_frame_idx = max(start_frame_idx - max_frame_num_to_track, 0)
            if start_frame_idx > 0:
                processing_order = range(start_frame_idx, end_frame_idx - 1, -1)
            else:
                processing_order = [0]  # reverse from frame 0: that frame alone
        else:
            end_frame_idx = min(start_frame_idx + max_frame_num_to_track, num_frames - 1)
            processing_order = range(start_frame_idx, end_frame_idx + 1)
        return processing_order

    @torch.inference_mode()
    def propagate_in_video(
        self,
        inference_state,
        start_frame_idx,
        max_frame_num_to_track,
        reverse,
        tqdm_disable=False,
        obj_ids=None,
        run_mem_encoder=True,
        propagate_preflight=False,
    ):
        """Track all objects of the state frame by frame. Yields ``(frame_idx, obj_ids,
        low_res_masks (B, 1, r, r), video_res_masks (B, 1, H, W), obj_scores (B, 1))``, all logits.
        Frames with prompts return their consolidated outputs. A tqdm progress bar is drawn
        unless ``tqdm_disable``."""
        if propagate_preflight:
            self.propagate_in_video_preflight(inference_state)
        output_dict = inference_state["output_dict"]
        if obj_ids is not None:
            raise NotImplementedError("Per-object tracking yet for batched inference if not implemented.")
        obj_ids = inference_state["obj_ids"]
        batch_size = self._get_obj_num(inference_state)
        if len(output_dict["cond_frame_outputs"]) == 0:
            raise RuntimeError("No points are provided; please add points first")
        clear_non_cond_mem = self.clear_non_cond_mem_around_input and (
            self.clear_non_cond_mem_for_multi_obj or batch_size <= 1
        )
        processing_order = list(self._get_processing_order(inference_state, start_frame_idx,
                                                           max_frame_num_to_track, reverse))
        try:
            yield from self._propagate(inference_state, processing_order, batch_size, reverse, run_mem_encoder,
                                       clear_non_cond_mem, obj_ids, tqdm_disable)
        finally:  # (a stream closed early leaves no prefetched frame behind)
            self._drop_prefetched(inference_state)

    def _propagate(self, inference_state, processing_order, batch_size, reverse, run_mem_encoder,
                   clear_non_cond_mem, obj_ids, tqdm_disable):
        output_dict = inference_state["output_dict"]
        consolidated_frame_inds = inference_state["consolidated_frame_inds"]
        prefetch = self.prefetch_backbone
        if not isinstance(prefetch, bool):
            raise ValueError(f"tracker.prefetch_backbone must be True or False, got {prefetch!r}")

        def needs_step(t):
            return (t not in consolidated_frame_inds["cond_frame_outputs"]
                    and t not in consolidated_frame_inds["non_cond_frame_outputs"])

        # Tracking runs on a MemoryBank kept in the state across calls: built (with host syncs) at
        # the first tracked frame of a run of consecutive frames, then updated with tensor ops only
        # (see _bank_for_step).
        for i, frame_idx in enumerate(tqdm(processing_order, desc="propagate in video", disable=tqdm_disable)):
            if frame_idx in consolidated_frame_inds["cond_frame_outputs"]:
                storage_key = "cond_frame_outputs"
                current_out = output_dict[storage_key][frame_idx]
                pred_masks = current_out["pred_masks"]
                obj_scores = current_out["object_score_logits"]
                if clear_non_cond_mem:
                    self._clear_non_cond_mem_around_input(inference_state, frame_idx)
                self._drop_bank(inference_state)  # rebuilt after a conditioning frame
            elif frame_idx in consolidated_frame_inds["non_cond_frame_outputs"]:
                storage_key = "non_cond_frame_outputs"
                current_out = output_dict[storage_key][frame_idx]
                pred_masks = current_out["pred_masks"]
                obj_scores = current_out["object_score_logits"]
                if self._bank_for_step(inference_state, frame_idx, reverse, seed=False) is not None:
                    self._bank_stored(inference_state, frame_idx)
            else:
                storage_key = "non_cond_frame_outputs"
                if prefetch and self.backbone is not None:
                    # this frame's features first (prefetched one frame ago, or run here), then the
                    # next tracked frame's backbone, queued beside this frame's step
                    self._frame_features(inference_state, frame_idx)
                    # (frames with stored outputs run no backbone: the next one without)
                    nxt = next((t for t in itertools.islice(processing_order, i + 1, None) if needs_step(t)), None)
                    if nxt is not None:
                        try:
                            self._prefetch_features(inference_state, nxt)
                        except Exception:  # noqa: BLE001 -- e.g. a frame that fails to decode: raised
                            # at its own turn, as without the prefetch, after this frame's outputs
                            logger.debug("prefetch of frame %d failed; it runs at its turn", nxt, exc_info=True)
                bank = self._bank_for_step(inference_state, frame_idx, reverse)
                current_out, pred_masks = self._run_single_frame_inference(
                    inference_state=inference_state,
                    output_dict=output_dict,
                    frame_idx=frame_idx,
                    batch_size=batch_size,
                    is_init_cond_frame=False,
                    point_inputs=None,
                    mask_inputs=None,
                    reverse=reverse,
                    run_mem_encoder=run_mem_encoder,
                    memory_bank=bank,
                )
                self.step_counts["reference" if bank is None else "fixed_capacity"] += 1
                obj_scores = current_out["object_score_logits"]
                output_dict[storage_key][frame_idx] = current_out
                if bank is not None:
                    self._bank_stored(inference_state, frame_idx)
            self._add_output_per_object(inference_state, frame_idx, current_out, storage_key)
            inference_state["frames_already_tracked"][frame_idx] = {"reverse": reverse}
            low_res_masks, video_res_masks = self._get_orig_video_res_output(inference_state, pred_masks)
            yield frame_idx, obj_ids, low_res_masks, video_res_masks, obj_scores

    @torch.inference_mode()
    def propagate_states_one_frame(self, inference_states, frame_idx, reverse, run_mem_encoder=True):
        """Track ``frame_idx`` in several sessions at once (the SAM 3 video model keeps one session
        per batch of objects added together). Sessions on a :class:`MemoryBank` that share their
        feature cache run as one batch (:meth:`bank_track_step`); the others (a prompted frame,
        settings the bank does not model) as one-frame ``propagate_in_video`` calls. Each session
        ends as ``propagate_in_video(state, frame_idx, 0, reverse, run_mem_encoder=...)`` leaves
        it. Returns per session ``(obj_ids, low_res_masks (B, 1, r, r), obj_scores (B, 1))``, None
        for a session without objects."""
        results = [None] * len(inference_states)
        groups = {}
        # object table: the sessions of one feature cache share one table, the one they sit in
        tables = {}
        if self.object_table:
            for st in inference_states:
                cur = st.get("memory_bank")
                h = None if cur is None else cur["bank"]
                if (isinstance(h, TableRows) and h.alive and cur["reverse"] == reverse
                        and all(t is not h.table for t in tables.values())):
                    tables.setdefault(id(st["cached_features"]), h.table)
        for i, st in enumerate(inference_states):
            if len(st["obj_ids"]) == 0:
                self._drop_bank(st)
                continue
            consolidated = st["consolidated_frame_inds"]
            bank = None
            key = id(st["cached_features"])
            if (st["output_dict"]["cond_frame_outputs"] and frame_idx not in consolidated["cond_frame_outputs"]
                    and frame_idx not in consolidated["non_cond_frame_outputs"]):
                bank = self._bank_for_step(st, frame_idx, reverse, table=tables.get(key))
            if bank is None:
                for _, ids, low, _, scores in self.propagate_in_video(st, frame_idx, 0, reverse, tqdm_disable=True,
                                                                      run_mem_encoder=run_mem_encoder):
                    results[i] = (list(ids), low, scores)
            else:
                if isinstance(bank, TableRows):
                    tables.setdefault(key, bank.table)
                    key = (key, id(bank.table))
                groups.setdefault(key, []).append((i, st, bank))
        if tables:
            # sessions that left the batch (not passed, or without objects) free their rows
            held = {id(t): [] for t in tables.values()}
            for st in inference_states:
                cur = st.get("memory_bank")
                h = None if cur is None else cur["bank"]
                if isinstance(h, TableRows) and h.alive and id(h.table) in held:
                    held[id(h.table)].append(h.sid)
            for t in tables.values():
                t.retain(held[id(t)])
        for members in groups.values():
            st0 = members[0][1]
            _, _, feats, pos, _ = self._get_image_feature(st0, frame_idx, 1)
            outs = self._track_on_banks([b for _, _, b in members], frame_idx, st0["num_frames"], reverse, feats, pos,
                                        run_mem_encoder)
            for (i, st, _), out in zip(members, outs):
                compact, pred_masks = self._compact_output(st, out)
                st["output_dict"]["non_cond_frame_outputs"][frame_idx] = compact
                self._bank_stored(st, frame_idx)
                self.step_counts["fixed_capacity"] += 1
                self._add_output_per_object(st, frame_idx, compact, "non_cond_frame_outputs")
                st["frames_already_tracked"][frame_idx] = {"reverse": reverse}
                results[i] = (list(st["obj_ids"]), pred_masks, compact["object_score_logits"])
        return results

    # ------------------------------------------------------------------------------------------
    # Fixed-capacity memory (sam3fast)

    def _bank_for_step(self, inference_state, frame_idx, reverse, seed=True, table=None):
        """The :class:`MemoryBank` ready to track ``frame_idx``, or None (the official selection).

        The bank lives in ``inference_state["memory_bank"]`` with the frame stored last
        (``pending``). It is advanced lazily, when the next consecutive frame in the same direction
        asks for it, so memory encoded after tracking (the SAM 3 video model encodes it after its
        planning step) is what goes in. Anything else (a gap, another direction, changed objects
        or conditioning frames, a different number of stored frames) rebuilds it (``seed``).

        With ``object_table`` the bank is the session's :class:`TableRows` in an :class:`ObjectTable`
        (``table``: the one its batch uses; None: its own, or a new one): the same decisions, the
        seeded bank is written into the session's rows and the advance is staged in the table."""
        if not self.fixed_capacity_step:
            return None
        cur = inference_state.get("memory_bank")
        sign = -1 if reverse else 1
        if (cur is not None and cur["reverse"] == reverse and cur["pending"] == frame_idx - sign
                and cur["key"] == self._bank_key(inference_state) and self._bank_usable(cur["bank"], table)):
            out = inference_state["output_dict"]["non_cond_frame_outputs"].get(cur["pending"])
            if out is not None and out.get("maskmem_features") is not None:
                self._advance_bank(cur["bank"], out, cur["pending"], reverse)
                self._retire_output(inference_state, cur["pending"])
                cur["pending"] = None
                return cur["bank"]
        if table is None and cur is not None and isinstance(cur["bank"], TableRows):
            table = cur["bank"].table  # (a session on its own keeps its table: no new allocation)
        self._drop_bank(inference_state)
        if not seed:
            return None
        bank = self._seed_memory_bank(inference_state, frame_idx, reverse)
        if bank is not None:
            if self.object_table:
                if table is None or not table.fits(bank):
                    table = self._table_for(bank)
                bank = table.add(bank)
            inference_state["memory_bank"] = {"bank": bank, "reverse": reverse, "pending": None, "key": None}
        return bank

    @property
    def spare_tables(self) -> int:
        """The object tables no session holds that stay allocated for the next sessions (see
        ``__init__``); 0 = a new table per session."""
        return self._spare_tables

    @spare_tables.setter
    def spare_tables(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"tracker.spare_tables must be an int >= 0 (unheld object tables kept), got {value!r}")
        self._spare_tables = value
        if hasattr(self, "_tables"):  # (not in __init__) the unheld tables beyond it go now
            self._trim_tables()

    def _table_for(self, bank: MemoryBank) -> ObjectTable:
        """A table for a seeded ``bank`` that joins no batch: an unheld table of this predictor
        that :meth:`ObjectTable.reusable_for` it (the smallest, the newest of equals; none with
        ``spare_tables`` 0), else a new one."""
        free = [t for t in self._tables if t.reclaim()]
        fit = [t for t in reversed(free) if t.reusable_for(bank)] if self.spare_tables else []
        table = min(fit, key=lambda t: t.capacity) if fit else ObjectTable.for_bank(bank)
        self._tables = [t for t in self._tables if t is not table] + [table]
        self._trim_tables(taken=table)
        return table

    @torch.inference_mode()  # (reclaim frees rows in place: the tables are inference tensors)
    def _trim_tables(self, taken: Optional[ObjectTable] = None) -> None:
        """Forget the tables no session holds beyond ``spare_tables``, the oldest first (``taken``,
        about to be held, is not counted): their memory is freed once nothing else refers to it."""
        free = [t for t in self._tables if t is not taken and t.reclaim()]
        drop = {id(t) for t in free[:max(len(free) - self.spare_tables, 0)]}
        if drop:
            self._tables = [t for t in self._tables if id(t) not in drop]

    def _bank_usable(self, bank, table) -> bool:
        """Whether a session's kept bank serves this step (the kind ``object_table`` asks for; a
        table's rows still held, in the batch's table)."""
        if isinstance(bank, TableRows):
            return self.object_table and bank.alive and (table is None or bank.table is table)
        return not self.object_table

    @staticmethod
    def _drop_bank(inference_state) -> None:
        """The session's bank is gone (rebuilt when next needed); its table rows are freed."""
        cur = inference_state.pop("memory_bank", None)
        if cur is not None and isinstance(cur["bank"], TableRows) and cur["bank"].alive:
            cur["bank"].free()

    _RETIRED_KEYS = ("maskmem_features", "pred_masks", "obj_ptr", "object_score_logits", "iou_score",
                     "eff_iou_score")

    def _retire_output(self, inference_state, frame_idx):
        """sam3fast: ``frame_idx``'s stored (non-conditioning) output leaves the device. The bank
        has just copied what tracking needs of it (its memory and pointer) into its ring, so the
        stored tensors (about 1 MB per object: memory features, low-res mask, pointer, scores) move
        to pinned host memory and device memory stays flat as the video grows. The copies are
        asynchronous and on the current stream, so whatever later copies them back to the device
        (a rebuilt bank, the official selection, consolidation, a re-visited frame's output) is
        ordered after them; host-side readers wait on one event (:meth:`_host_outputs_ready`).
        Conditioning frames stay on the device (their number is bounded by the prompts)."""
        if not self._retires(inference_state):
            return
        out = inference_state["output_dict"]["non_cond_frame_outputs"].get(frame_idx)
        retired = inference_state.setdefault("retired_outputs", {})  # frame -> id of the retired dict
        if out is None or retired.get(frame_idx) == id(out):
            return
        for key in self._RETIRED_KEYS:
            v = out.get(key)
            if isinstance(v, torch.Tensor):
                out[key] = self._to_host(v)
        retired[frame_idx] = id(out)
        # the per-object views pointed into the device tensors: re-slice the host copies
        self._add_output_per_object(inference_state, frame_idx, out, "non_cond_frame_outputs")
        self._mark_retired()

    def _retires(self, inference_state) -> bool:
        """Whether finished outputs of this session leave the device (CUDA storage only)."""
        return self.retire_finished_outputs and inference_state["storage_device"].type == "cuda"

    @staticmethod
    def _to_host(v: torch.Tensor) -> torch.Tensor:
        return v.to("cpu", non_blocking=True)  # pinned destination: asynchronous

    def _mark_retired(self) -> None:
        self._retire_event = torch.cuda.Event()
        self._retire_event.record()

    def _host_outputs_ready(self):
        """Before host code reads a stored output: the retired copies have landed."""
        if self._retire_event is not None:
            self._retire_event.synchronize()
            self._retire_event = None

    def _bank_stored(self, inference_state, frame_idx):
        """``frame_idx``'s output is stored: the bank takes it at the next frame."""
        cur = inference_state["memory_bank"]
        cur["pending"], cur["key"] = frame_idx, self._bank_key(inference_state)

    def _fixed_capacity_refusal(self, inference_state) -> Optional[str]:
        """Why this session cannot track on a :class:`MemoryBank` (None: it can). The bank models
        the official selection exactly under these conditions; otherwise the official path runs."""
        cond = inference_state["output_dict"]["cond_frame_outputs"]
        if not self.use_memory_selection:
            return "use_memory_selection=False"
        if self.memory_temporal_stride_for_eval != 1:
            return f"memory_temporal_stride_for_eval={self.memory_temporal_stride_for_eval}"
        if self.trim_past_non_cond_mem_for_eval:
            return "trim_past_non_cond_mem_for_eval=True"
        if self.num_maskmem < 3:
            return f"num_maskmem={self.num_maskmem}"
        if inference_state["num_frames"] < 2:
            return "a one-frame video"
        if self.max_cond_frames_in_attn != -1 and len(cond) > self.max_cond_frames_in_attn:
            return f"{len(cond)} conditioning frames > max_cond_frames_in_attn={self.max_cond_frames_in_attn}"
        if any(out.get("maskmem_features") is None for out in cond.values()):
            return "a conditioning frame without memory"
        return None

    @staticmethod
    def _bank_key(inference_state):
        """What the bank was built from, as cheap host facts: the objects, the conditioning
        outputs and the number of stored frames. A change (the session edited between frames)
        rebuilds the bank."""
        od = inference_state["output_dict"]
        return (len(inference_state["obj_ids"]), tuple((t, id(o)) for t, o in od["cond_frame_outputs"].items()),
                len(od["non_cond_frame_outputs"]))

    def _bank_entry(self, out):
        feat = out.get("maskmem_features")
        if feat is None:
            return None, None
        return self._from_memory_bank(feat), out["obj_ptr"].to(self.device, self.dtype)

    def _advance_bank(self, bank, out, frame_idx, reverse):
        feat, ptr = self._bank_entry(out)
        if feat is None:
            bank.advance(None, None, False)
            return
        if "eff_iou_score" not in out or (frame_idx == 0 and not reverse):
            good = False  # the official scan skips such frames (and stops before frame 0)
        else:
            good = out["eff_iou_score"] > self.mf_threshold
        bank.advance(feat, ptr, good)

    def _seed_memory_bank(self, inference_state, frame_idx, reverse):
        """A :class:`MemoryBank` ready to track ``frame_idx``, built from the stored outputs with
        the official scan (host syncs, once per run). None when the session does not allow it."""
        reason = self._fixed_capacity_refusal(inference_state)
        if reason is not None:
            logger.debug("official memory selection for this run: %s", reason)
            return None
        output_dict = inference_state["output_dict"]
        num_frames = inference_state["num_frames"]
        cond = output_dict["cond_frame_outputs"]
        non_cond = output_dict["non_cond_frame_outputs"]
        max_ptrs = min(num_frames, self.max_obj_ptrs_in_encoder)
        sign = -1 if reverse else 1
        last = frame_idx - sign
        good = self._scan_good_frames(output_dict, reverse, last - sign, num_frames, 1, max_ptrs - 1)
        if any(non_cond[t].get("maskmem_features") is None for t in good + ([last] if last in non_cond else [])):
            logger.debug("official memory selection for this run: a stored frame without memory")
            return None  # (the official fails if it needs that memory; its path says so)
        cond_frames = sorted(cond)
        cond_feats = torch.stack([self._from_memory_bank(cond[t]["maskmem_features"]) for t in cond_frames], dim=1)
        cond_ptrs = torch.stack([cond[t]["obj_ptr"].to(self.device, self.dtype) for t in cond_frames], dim=1)
        pos_enc = inference_state["constants"].get("maskmem_pos_enc")
        if pos_enc is None:
            pos_enc = next(iter(cond.values()))["maskmem_pos_enc"]
        bank = MemoryBank(
            cond_feats, cond_ptrs, cond_frames, pos_enc[-1][:1].to(self.device, self.dtype), self.num_maskmem,
            max_list=max_ptrs - 1, ptr_norm=max_ptrs, reverse=reverse,
        )
        # the good frames before the last one, oldest first (each promoted to the ring by the next
        # advance), then the last frame itself: its output, or nothing (a conditioning frame or an
        # untracked one; that advance still promotes the newest good frame)
        for t in good:
            self._advance_bank(bank, non_cond[t], t, reverse)
        if last in non_cond:
            self._advance_bank(bank, non_cond[last], last, reverse)
        else:
            bank.advance(None, None, False)
        return bank

    def _track_on_banks(self, banks, frame_idx, num_frames, reverse, feats, pos, run_mem_encoder):
        """``track_step`` for a propagated frame (no prompt) of the objects of several sessions
        (one :class:`MemoryBank` each, the same frame features), as one batch. Returns one
        output dict per bank, each holding views of the batched tensors. Banks that are
        :class:`TableRows` (of one table) run on the table (:meth:`table_track_step`)."""
        no_prev = (frame_idx == 0 and not reverse) or (frame_idx == num_frames - 1 and reverse)
        frame_t = torch.full((), frame_idx, dtype=torch.long, device=feats[-1].device)
        if isinstance(banks[0], TableRows):
            return self._track_on_table(banks, frame_t, feats, pos, no_prev, run_mem_encoder)
        low, high, obj_ptr, score, iou, effs, maskmem, maskmem_pos = self.bank_track_step(
            tuple(b.spec for b in banks), tuple(b.state for b in banks), frame_t, tuple(feats), tuple(pos),
            no_prev=no_prev, run_mem_encoder=run_mem_encoder)
        outs, a = [], 0
        for bank, eff in zip(banks, effs):
            sl = slice(a, a + bank.batch_size)
            a = sl.stop
            outs.append({
                "point_inputs": None, "mask_inputs": None, "pred_masks": low[sl], "pred_masks_high_res": None if high is None else high[sl],
                "obj_ptr": obj_ptr[sl], "object_score_logits": score[sl], "iou_score": iou[sl],
                "eff_iou_score": eff, "maskmem_features": None if maskmem is None else maskmem[sl],
                "maskmem_pos_enc": None if maskmem_pos is None else [maskmem_pos[sl]],
            })
        return outs

    def bank_track_step(self, specs: Tuple[BankSpec, ...], states: Tuple[BankState, ...], frame_t: torch.Tensor,
                        feats, pos, *, no_prev: bool = False, run_mem_encoder: bool = True):
        """One propagated frame of every object of one or more sessions, each on its
        fixed-capacity bank, as one batch; tensors in, tensors out.

        ``feats``/``pos``: the frame's three tracker levels (1 or B, D, *, *), top level last, B
        the total number of objects; ``frame_t`` a 0-d long tensor. Returns ``(low_res_masks
        (B, 1, r, r), high_res_masks (B, 1, R, R), obj_ptr (B, D), object_score_logits (B, 1),
        iou_score (B,), eff_iou_scores (one 0-d tensor per session), maskmem_features (B, M, g, g)
        or None, maskmem_pos or None)`` as the official ``track_step`` computes them for a frame
        without prompts, session by session (the memory-selection score is a per-session mean,
        as the official computes it over one session's batch). Static shapes and no host sync.
        The memory assembly runs eagerly (small ops); the model part is :meth:`memory_step`, which
        :meth:`compile_step` compiles.
        """
        parts = [bank_memory(sp, st, frame_t, no_prev, self.maskmem_tpos_enc, self.obj_ptr_tpos_proj)
                 for sp, st in zip(specs, states)]
        st0 = states[0]
        memory, memory_pos, n_ptr, valid = _batch_memories(
            parts, [st.cond_feats.shape[1] for st in states], st0.cond_feats.shape[-1] * st0.cond_feats.shape[-2],
            max(1, st0.cond_ptrs.shape[-1] // st0.cond_feats.shape[2]))
        if not self._step_is_bucketed(memory.shape[0]):
            low, high, obj_ptr, score, iou, maskmem, maskmem_pos = self.memory_step(
                tuple(feats), pos[-1], memory, memory_pos, valid, n_ptr, run_mem_encoder=run_mem_encoder)
        else:
            # compiled or graphed: the object count padded to its bucket (step_buckets "pow2": a
            # video whose objects come and go compiles (and captures) a few buckets, not one per count)
            B = memory.shape[0]
            memory, memory_pos, valid, feats, top_pos = _pad_to_bucket(
                memory, memory_pos, valid, feats, pos[-1], bucket_rows(B, self.step_buckets))
            out = self._bucketed_step(feats, top_pos, memory, memory_pos, valid, n_ptr, run_mem_encoder)
            low, high, obj_ptr, score, iou, maskmem, maskmem_pos = (None if x is None else x[:B] for x in out)
        effs, a = [], 0
        for st in states:
            b = st.cond_feats.shape[0]
            effs.append(self.cal_mem_score(score[a:a + b], iou[a:a + b]))
            a += b
        return low, high, obj_ptr, score, iou, tuple(effs), maskmem, maskmem_pos

    def _step_is_bucketed(self, rows: int) -> bool:
        """Whether a step of ``rows`` objects runs compiled or graphed (on rows padded to their
        bucket, ``step_buckets``): compiled always; ``cuda_graphs`` True always, False never, "auto" on CUDA up to
        ``GRAPH_AUTO_MAX_ROWS`` rows."""
        if self._memory_step_compiled is not None:
            return True
        graphs = check_switch("tracker.cuda_graphs", self.cuda_graphs)
        if graphs == "auto":
            return self.device.type == "cuda" and rows <= GRAPH_AUTO_MAX_ROWS
        return graphs

    def _bucketed_step(self, feats, top_pos, memory, memory_pos, valid, n_ptr, run_mem_encoder):
        if self._memory_step_compiled is None:
            return self.step_graphs().run(tuple(feats), top_pos, memory, memory_pos, valid, n_ptr,
                                          run_mem_encoder=run_mem_encoder)
        # one graph per (bucket, conditioning frames, run_mem_encoder): up to ~7 x 4 x 2, more
        # than dynamo's default limit of 8 per function; raised for this call only
        with torch._dynamo.config.patch(recompile_limit=64):
            return self._memory_step_compiled(tuple(feats), top_pos, memory, memory_pos, valid, n_ptr,
                                              run_mem_encoder=run_mem_encoder)

    def _track_on_table(self, banks, frame_t, feats, pos, no_prev, run_mem_encoder):
        """:meth:`_track_on_banks` for sessions of one :class:`ObjectTable`: one step over the
        table's rows (staged frames applied first), each session's outputs views of its rows."""
        table = banks[0].table
        if any(b.table is not table for b in banks):
            raise ValueError("the banks of one step must be rows of one object table")
        feats = tuple(f[:1] for f in feats)  # one frame's features, shared by every row
        pos = tuple(p[:1] for p in pos)
        low, high, obj_ptr, score, iou, eff, maskmem, maskmem_pos = self.table_track_step(
            table.spec, table.state, frame_t, feats, pos, table.used, no_prev=no_prev, run_mem_encoder=run_mem_encoder,
            table=table)
        outs = []
        for bank in banks:
            sl = bank.rows
            outs.append({
                "point_inputs": None, "mask_inputs": None, "pred_masks": low[sl],
                "pred_masks_high_res": None if high is None else high[sl],
                "obj_ptr": obj_ptr[sl], "object_score_logits": score[sl], "iou_score": iou[sl],
                "eff_iou_score": eff[sl.start], "maskmem_features": None if maskmem is None else maskmem[sl],
                "maskmem_pos_enc": None if maskmem_pos is None else [maskmem_pos[sl]],
            })
        return outs

    def table_track_step(self, spec: BankSpec, state: TableState, frame_t: torch.Tensor, feats, pos, rows: int, *,
                         no_prev: bool = False, run_mem_encoder: bool = True, table=None):
        """:meth:`bank_track_step` on an :class:`ObjectTable` (its ``spec`` and ``state``): one
        propagated frame of the objects in the first ``rows`` rows (free rows among them run as
        zero rows). ``feats``/``pos``: the frame's three levels (1, D, *, *). Compiled or graphed,
        the step runs the first ``rows`` rounded up to their bucket (``step_buckets``; <= the table's capacity):
        the table is the bucket, nothing is padded or concatenated. Returns ``(low_res_masks,
        high_res_masks, obj_ptr, object_score_logits, iou_score, eff_iou_scores (Cap + 1,) (entry
        "first row of a session" is that session's score), maskmem_features or None, maskmem_pos
        or None)``, row tensors over the rows run. Static shapes and no host sync. ``table``: the
        :class:`ObjectTable` of ``state``; given, its staged frames are applied first, and a graphed
        step also holds that update, the memory assembly and the scores
        (:meth:`GraphedMemoryStep.run_table`). Without it, the caller applies them."""
        if table is not None and table.state is not state:
            raise ValueError("state must be the table's state")
        bucketed = self._step_is_bucketed(rows)
        if bucketed:
            rows = min(bucket_rows(rows, self.step_buckets), state.segment.shape[0])
            if table is not None and self._memory_step_compiled is None:
                return self.step_graphs().run_table(table, frame_t, feats, pos[-1], rows, no_prev=no_prev,
                                                    run_mem_encoder=run_mem_encoder)
        if table is not None:
            table.advance()
        memory, memory_pos, n_ptr, valid = table_memory(spec, state, frame_t, no_prev, self.maskmem_tpos_enc,
                                                        self.obj_ptr_tpos_proj, rows)
        if not bucketed:
            out = self.memory_step(tuple(feats), pos[-1], memory, memory_pos, valid, n_ptr,
                                   run_mem_encoder=run_mem_encoder)
        else:
            out = self._bucketed_step(feats, pos[-1], memory, memory_pos, valid, n_ptr, run_mem_encoder)
        low, high, obj_ptr, score, iou, maskmem, maskmem_pos = out
        eff = self.segment_mem_score(score, iou, state.segment[:rows], state.segment.shape[0] + 1)
        return low, high, obj_ptr, score, iou, eff, maskmem, maskmem_pos

    @staticmethod
    def segment_mem_score(object_score_logits, iou_score, segment, num_segments):
        """:meth:`cal_mem_score` of every session at once: rows grouped by ``segment`` (n,) long,
        the official (B, B)-broadcast mean as mean(score) * mean(iou) per segment (float32 sums,
        cast back). Returns (num_segments,); a segment without rows holds 0."""
        norm = torch.where(object_score_logits > 0, object_score_logits.sigmoid() * 2 - 1,
                           torch.zeros_like(object_score_logits)).reshape(-1)
        vals = torch.stack((norm.float(), iou_score.reshape(-1).float(), torch.ones_like(norm, dtype=torch.float32)))
        sums = vals.new_zeros(3, num_segments).index_add_(1, segment, vals)
        return (sums[0] * sums[1] / (sums[2] * sums[2]).clamp(min=1)).to(object_score_logits.dtype)

    def memory_step(self, feats, top_pos, memory, memory_pos, memory_valid, num_obj_ptr_tokens, *,
                    run_mem_encoder: bool = True):
        """The model part of a propagated frame for B objects: memory attention over
        ``memory`` (B, S, M) (``memory_valid`` (B, S)), the SAM heads without prompts (multimask
        with the official choice) and the memory encoder. ``feats``: the frame's three tracker
        levels (1 or B, D, *, *), top level last; ``top_pos`` the top level's position (1 or B, D,
        g, g). Returns ``(low_res_masks, high_res_masks (None on the fused CUDA path), obj_ptr,
        object_score_logits, iou_score, maskmem_features or None, maskmem_pos or None)``."""
        B = memory.shape[0]
        feats = [f.expand(B, -1, -1, -1) for f in feats]
        feat = feats[-1]
        _, C, H, W = feat.shape
        curr = feat.flatten(2).transpose(1, 2)
        curr_pos = top_pos.expand(B, -1, -1, -1).flatten(2).transpose(1, 2)
        pix = self.transformer.encoder(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens,
                                       memory_valid=memory_valid)
        pix = pix.transpose(1, 2).reshape(B, C, H, W)
        # With the fused memory input (CUDA) nothing reads the (B, 1, R, R) upsampled masks: the
        # heads skip them and the step returns None for them (stored outputs never keep them).
        fused = (self.use_mask_kernel and not self.non_overlap_masks_for_mem_enc
                 and mask_for_memory_backend(pix, self.dtype)[0] == "triton")
        _, _, ious, low, high, obj_ptr, score = self._forward_sam_heads(
            pix, high_res_features=list(feats[:-1]), multimask_output=self._use_multimask(False, None),
            need_high_res=not fused)
        iou = ious.max(-1)[0]
        maskmem = maskmem_pos = None
        if run_mem_encoder:
            if fused:
                # `high` is the heads' bilinear upsample of `low`: the memory encoder's input is
                # built from `low` in one fused pass (sam3fast::mask_for_memory)
                maskmem, maskmem_pos = encode_new_memory_from_low_res(
                    self.maskmem_backbone, feats[-1], low, (self.image_size, self.image_size), score,
                    self.no_obj_embed_spatial, is_mask_from_pts=False,
                    sigmoid_scale=self.sigmoid_scale_for_mem_enc, sigmoid_bias=self.sigmoid_bias_for_mem_enc)
            else:
                maskmem, pos_list = self._encode_new_memory(None, feats, None, high, score, is_mask_from_pts=False)
                maskmem_pos = pos_list[0]
        return low, high, obj_ptr, score, iou, maskmem, maskmem_pos

    def step_graphs(self):
        """The :class:`~sam3fast.video.tracker_graphs.GraphedMemoryStep` of this tracker (made on
        first use; it captures on CUDA, and runs the same buffers eagerly elsewhere)."""
        if self._graph_runner is None:
            from .tracker_graphs import GraphedMemoryStep

            self._graph_runner = GraphedMemoryStep(self, cuda_graphs=self.device.type == "cuda")
        return self._graph_runner

    def compile_step(self, backend: str = "inductor", mode: Optional[str] = None):
        """torch.compile :meth:`memory_step` (``fullgraph=True``: a graph break is an error,
        static shapes). Object counts are padded to their bucket (``step_buckets``: by default the
        next power of two), so the frames of a run reuse one graph and a video whose objects come
        and go compiles one per bucket (and per number of conditioning frames). ``mode="reduce-overhead"`` adds CUDA graphs on GPU."""
        self._memory_step_compiled = torch.compile(self.memory_step, backend=backend, mode=mode, fullgraph=True,
                                                   dynamic=False)
        return self

    def _add_output_per_object(self, inference_state, frame_idx, current_out, storage_key):
        """Store per-object slices (views) of a batched output in ``output_dict_per_obj``."""
        maskmem_features = current_out["maskmem_features"]
        assert maskmem_features is None or isinstance(maskmem_features, torch.Tensor)
        maskmem_pos_enc = current_out["maskmem_pos_enc"]
        assert maskmem_pos_enc is None or isinstance(maskmem_pos_enc, list)
        for obj_idx, obj_output_dict in inference_state["output_dict_per_obj"].items():
            obj_slice = slice(obj_idx, obj_idx + 1)
            obj_out = {
                "maskmem_features": None,
                "maskmem_pos_enc": None,
                "pred_masks": current_out["pred_masks"][obj_slice],
                "obj_ptr": current_out["obj_ptr"][obj_slice],
                "object_score_logits": current_out["object_score_logits"][obj_slice],
            }
            if self.use_memory_selection:
                obj_out["iou_score"] = current_out["iou_score"][obj_slice]
            if maskmem_features is not None:
                obj_out["maskmem_features"] = maskmem_features[obj_slice]
            if maskmem_pos_enc is not None:
                obj_out["maskmem_pos_enc"] = [x[obj_slice] for x in maskmem_pos_enc]
            obj_output_dict[storage_key][frame_idx] = obj_out

    # ------------------------------------------------------------------------------------------
    # Clearing and removal

    @torch.inference_mode()
    def clear_all_points_in_frame(self, inference_state, frame_idx, obj_id, need_output=True):
        """Remove an object's points or mask on one frame. Returns ``(frame_idx, obj_ids, None,
        video_res_masks)`` with ``need_output``, else None."""
        self._check_frame_idx(inference_state, frame_idx)
        obj_idx = self._obj_id_to_idx(inference_state, obj_id)
        inference_state["point_inputs_per_obj"][obj_idx].pop(frame_idx, None)
        inference_state["mask_inputs_per_obj"][obj_idx].pop(frame_idx, None)
        temp_output_dict_per_obj = inference_state["temp_output_dict_per_obj"]
        temp_output_dict_per_obj[obj_idx]["cond_frame_outputs"].pop(frame_idx, None)
        temp_output_dict_per_obj[obj_idx]["non_cond_frame_outputs"].pop(frame_idx, None)

        batch_size = self._get_obj_num(inference_state)
        frame_has_input = any(
            frame_idx in inference_state["point_inputs_per_obj"][i]
            or frame_idx in inference_state["mask_inputs_per_obj"][i]
            for i in range(batch_size)
        )
        if not frame_has_input:
            output_dict = inference_state["output_dict"]
            consolidated_frame_inds = inference_state["consolidated_frame_inds"]
            consolidated_frame_inds["cond_frame_outputs"].discard(frame_idx)
            consolidated_frame_inds["non_cond_frame_outputs"].discard(frame_idx)
            # no input left: the frame's output is downgraded to a non-conditioning one
            out = output_dict["cond_frame_outputs"].pop(frame_idx, None)
            if out is not None:
                output_dict["non_cond_frame_outputs"][frame_idx] = out
                inference_state["frames_already_tracked"].pop(frame_idx, None)
            for obj_idx2 in range(batch_size):
                obj_output_dict = inference_state["output_dict_per_obj"][obj_idx2]
                obj_out = obj_output_dict["cond_frame_outputs"].pop(frame_idx, None)
                if obj_out is not None:
                    obj_output_dict["non_cond_frame_outputs"][frame_idx] = obj_out
            if len(output_dict["cond_frame_outputs"]) == 0:
                self._reset_tracking_results(inference_state)

        if not need_output:
            return
        obj_ids = inference_state["obj_ids"]
        is_cond = any(frame_idx in d["cond_frame_outputs"] for d in temp_output_dict_per_obj.values())
        consolidated_out = self._consolidate_temp_output_across_obj(
            inference_state, frame_idx, is_cond=is_cond, run_mem_encoder=False, consolidate_at_video_res=True,
        )
        _, video_res_masks = self._get_orig_video_res_output(inference_state, consolidated_out["pred_masks_video_res"])
        return frame_idx, obj_ids, None, video_res_masks

    @torch.inference_mode()
    def clear_all_points_in_video(self, inference_state):
        """Remove every input, output and object id (cached features are kept)."""
        self._reset_tracking_results(inference_state)
        inference_state["obj_id_to_idx"].clear()
        inference_state["obj_idx_to_id"].clear()
        inference_state["obj_ids"].clear()
        inference_state["point_inputs_per_obj"].clear()
        inference_state["mask_inputs_per_obj"].clear()
        inference_state["output_dict_per_obj"].clear()
        inference_state["temp_output_dict_per_obj"].clear()

    def reset_state(self, inference_state):
        """SAM 2's ``reset_state`` (not in the SAM 3 tracker; the SAM 3 video model's own
        ``reset_state`` is another method): same as :meth:`clear_all_points_in_video`."""
        self.clear_all_points_in_video(inference_state)

    def _reset_tracking_results(self, inference_state):
        self._drop_bank(inference_state)
        for v in inference_state["point_inputs_per_obj"].values():
            v.clear()
        for v in inference_state["mask_inputs_per_obj"].values():
            v.clear()
        for v in inference_state["output_dict_per_obj"].values():
            v["cond_frame_outputs"].clear()
            v["non_cond_frame_outputs"].clear()
        for v in inference_state["temp_output_dict_per_obj"].values():
            v["cond_frame_outputs"].clear()
            v["non_cond_frame_outputs"].clear()
        inference_state["output_dict"]["cond_frame_outputs"].clear()
        inference_state["output_dict"]["non_cond_frame_outputs"].clear()
        inference_state["consolidated_frame_inds"]["cond_frame_outputs"].clear()
        inference_state["consolidated_frame_inds"]["non_cond_frame_outputs"].clear()
        inference_state["tracking_has_started"] = False
        inference_state["frames_already_tracked"].clear()
        inference_state["first_ann_frame_idx"] = None

    @torch.inference_mode()
    def remove_object(self, inference_state, obj_id, strict=False, need_output=True):
        """Remove an object id from every frame of the state. Returns ``(obj_ids, updated_frames)``
        with ``updated_frames`` a list of ``(frame_idx, video_res_masks)`` for the frames where the
        object had inputs (with ``need_output``)."""
        old_obj_idx_to_rm = inference_state["obj_id_to_idx"].get(obj_id, None)
        updated_frames = []
        self._host_outputs_ready()  # the stored outputs are sliced on the host below
        if old_obj_idx_to_rm is None:
            if not strict:
                return inference_state["obj_ids"], updated_frames
            raise RuntimeError(
                f"Cannot remove object id {obj_id} as it doesn't exist. "
                f"All existing object ids: {inference_state['obj_ids']}."
            )
        self._drop_bank(inference_state)  # the session leaves its batch (rebuilt at its next frame)
        if len(inference_state["obj_id_to_idx"]) == 1:
            self.clear_all_points_in_video(inference_state)
            return inference_state["obj_ids"], updated_frames

        # Step 0: clear the object's inputs (may downgrade conditioning frames).
        obj_input_frames_inds = set()
        obj_input_frames_inds.update(inference_state["point_inputs_per_obj"][old_obj_idx_to_rm])
        obj_input_frames_inds.update(inference_state["mask_inputs_per_obj"][old_obj_idx_to_rm])
        for frame_idx in obj_input_frames_inds:
            self.clear_all_points_in_frame(inference_state, frame_idx, obj_id, need_output=False)

        # Step 1: new id mappings.
        old_obj_ids = inference_state["obj_ids"]
        old_obj_inds = list(range(len(old_obj_ids)))
        remain_old_obj_inds = old_obj_inds.copy()
        remain_old_obj_inds.remove(old_obj_idx_to_rm)
        new_obj_ids = [old_obj_ids[i] for i in remain_old_obj_inds]
        new_obj_inds = list(range(len(new_obj_ids)))
        old_idx_to_new_idx = dict(zip(remain_old_obj_inds, new_obj_inds))
        inference_state["obj_id_to_idx"] = dict(zip(new_obj_ids, new_obj_inds))
        inference_state["obj_idx_to_id"] = dict(zip(new_obj_inds, new_obj_ids))
        inference_state["obj_ids"] = new_obj_ids

        # Step 2: shift the per-object dict keys.
        def _map_keys(container):
            new_kvs = []
            for k in old_obj_inds:
                v = container.pop(k)
                if k in old_idx_to_new_idx:
                    new_kvs.append((old_idx_to_new_idx[k], v))
            container.update(new_kvs)

        _map_keys(inference_state["point_inputs_per_obj"])
        _map_keys(inference_state["mask_inputs_per_obj"])
        _map_keys(inference_state["output_dict_per_obj"])
        _map_keys(inference_state["temp_output_dict_per_obj"])

        # Step 3: slice the batched outputs and rebuild the per-object slices.
        keep = torch.tensor(remain_old_obj_inds, dtype=torch.long)

        def _take(x):
            return x.index_select(0, keep.to(x.device))

        def _slice_state(output_dict, storage_key):
            for frame_idx, out in output_dict[storage_key].items():
                if out["maskmem_features"] is not None:
                    out["maskmem_features"] = _take(out["maskmem_features"])
                if out["maskmem_pos_enc"] is not None:
                    # every row is the same constant: a batch-sized view is enough to re-expand it
                    out["maskmem_pos_enc"] = [x[: len(remain_old_obj_inds)] for x in out["maskmem_pos_enc"]]
                    out["maskmem_pos_enc"] = self._get_maskmem_pos_enc(inference_state, out)
                out["pred_masks"] = _take(out["pred_masks"])
                out["obj_ptr"] = _take(out["obj_ptr"])
                out["object_score_logits"] = _take(out["object_score_logits"])
                if self.use_memory_selection:
                    out["iou_score"] = _take(out["iou_score"])
                    out["eff_iou_score"] = self.cal_mem_score(out["object_score_logits"], out["iou_score"])
                self._add_output_per_object(inference_state, frame_idx, out, storage_key)

        _slice_state(inference_state["output_dict"], "cond_frame_outputs")
        _slice_state(inference_state["output_dict"], "non_cond_frame_outputs")

        # Step 4: outputs of the frames where the object had inputs (other objects may show more).
        if need_output:
            temp_output_dict_per_obj = inference_state["temp_output_dict_per_obj"]
            for frame_idx in obj_input_frames_inds:
                is_cond = any(frame_idx in d["cond_frame_outputs"] for d in temp_output_dict_per_obj.values())
                consolidated_out = self._consolidate_temp_output_across_obj(
                    inference_state, frame_idx, is_cond=is_cond, run_mem_encoder=False,
                    consolidate_at_video_res=True,
                )
                _, video_res_masks = self._get_orig_video_res_output(inference_state,
                                                                     consolidated_out["pred_masks_video_res"])
                updated_frames.append((frame_idx, video_res_masks))
        return inference_state["obj_ids"], updated_frames

    def _clear_non_cond_mem_around_input(self, inference_state, frame_idx):
        """Drop the non-conditioning memory of the frames around a prompted frame (outdated after
        correction clicks)."""
        r = self.memory_temporal_stride_for_eval
        frame_idx_begin = frame_idx - r * self.num_maskmem
        frame_idx_end = frame_idx + r * self.num_maskmem
        for obj_idx in range(self._get_obj_num(inference_state)):
            non_cond_frame_outputs = inference_state["output_dict_per_obj"][obj_idx]["non_cond_frame_outputs"]
            for t in range(frame_idx_begin, frame_idx_end + 1):
                non_cond_frame_outputs.pop(t, None)

    # ------------------------------------------------------------------------------------------
    # Mask constraints (also called by the detect-and-track orchestration)

    def _apply_non_overlapping_constraints(self, pred_masks):
        """Keep, at each pixel, only the highest-scoring object; others are clamped to <= -10."""
        batch_size = pred_masks.size(0)
        if batch_size == 1:
            return pred_masks
        max_obj_inds = torch.argmax(pred_masks, dim=0, keepdim=True)
        batch_obj_inds = torch.arange(batch_size, device=pred_masks.device)[:, None, None, None]
        keep = max_obj_inds == batch_obj_inds
        return torch.where(keep, pred_masks, torch.clamp(pred_masks, max=-10.0))

    def _suppress_shrinked_masks(self, pred_masks, new_pred_masks, shrink_threshold=0.3):
        area_before = (pred_masks > 0).sum(dim=(-1, -2))
        area_after = (new_pred_masks > 0).sum(dim=(-1, -2))
        area_before = torch.clamp(area_before, min=1.0)
        keep = area_after / area_before >= shrink_threshold
        keep_mask = keep[..., None, None].expand_as(pred_masks)
        return torch.where(keep_mask, pred_masks, torch.clamp(pred_masks, max=-10.0))

    def _suppress_object_pw_area_shrinkage(self, pred_masks):
        """(N, 1, h, w) logits: objects whose area shrinks below 30 % under the pixel-wise
        non-overlap are clamped to <= -10 (the returned masks may still overlap)."""
        return self._suppress_shrinked_masks(pred_masks, self._apply_non_overlapping_constraints(pred_masks))

    def _apply_object_wise_non_overlapping_constraints(self, pred_masks, obj_scores, background_value=-10.0):
        """Only the highest-scoring object claims an overlap region (scores (N,) per object)."""
        pred_masks_single_score = torch.where(pred_masks > 0, obj_scores[..., None, None], background_value)
        pixel_level = self._apply_non_overlapping_constraints(pred_masks_single_score)
        return torch.where(pixel_level > 0, pred_masks, torch.clamp(pred_masks, max=background_value))

    # ------------------------------------------------------------------------------------------
    # Features

    def make_tracker_backbone_out(self, sam2_fpn: Sequence[torch.Tensor], sam2_pos: Sequence[torch.Tensor],
                                  round_fpn_bf16: Optional[bool] = None) -> Dict[str, Any]:
        """SAM 2-neck levels [(1, D, 4g, 4g), (1, D, 2g, 2g), (1, D, g, g)] (+ their pos) -> the
        tracker's ``backbone_out`` (``conv_s0``/``conv_s1`` applied to the first two levels), as
        ``Sam3VideoBase.run_backbone_and_detection`` builds it. Store it in a feature cache as
        ``cache[frame_idx] = (image, {"tracker_backbone_out": out})``.

        ``round_fpn_bf16`` (default ``bf16_casts``) rounds the levels to bfloat16 first: the
        official detector casts them to bf16 before handing them over (``sam3_image.py`` 839);
        the SAM 2-task path through ``backbone`` (:meth:`forward_image`) does not round."""
        if round_fpn_bf16 is None:
            round_fpn_bf16 = self.bf16_casts
        fpn = list(sam2_fpn)[-self.num_feature_levels:]
        pos = list(sam2_pos)[-self.num_feature_levels:]
        if round_fpn_bf16:
            fpn = [x.to(torch.bfloat16).to(x.dtype) for x in fpn]
        dec = self.sam_mask_decoder
        fpn = [dec.conv_s0(fpn[0]), dec.conv_s1(fpn[1]), fpn[2]]
        return {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": fpn}

    def forward_image(self, img_batch: torch.Tensor) -> Dict[str, Any]:
        """Run ``self.backbone`` on (B, 3, R, R) frames -> the tracker's ``backbone_out`` (from a CUDA
        graph on CUDA: see ``backbone_cuda_graphs``)."""
        bb = self.backbone
        if bb is None:
            raise RuntimeError("no backbone set: assign predictor.backbone or pass cached_features")
        if img_batch.is_cuda:
            # a run here waits for the last prefetch (prefetch_backbone), read or not: both go
            # through the backbone graph's static input buffers
            self._prefetch.wait_last(img_batch.device)
        fpn, pos = self._backbone_runner(bb)(img_batch)
        return {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": fpn}

    def _tracker_levels(self, bb, img_batch: torch.Tensor):
        """``(backbone_fpn, vision_pos_enc)`` of :meth:`make_tracker_backbone_out` (not rounded) for
        ``bb`` on (B, 3, R, R) frames: the backbone, then the mask decoder's conv_s0 / conv_s1."""
        out = self.make_tracker_backbone_out(*_backbone_fpn_pos(bb, img_batch), round_fpn_bf16=False)
        return out["backbone_fpn"], out["vision_pos_enc"]

    def _backbone_runner(self, bb):
        """forward_image's call: :meth:`_tracker_levels` of ``bb`` directly, or through a
        :class:`GraphedCall` (``backbone_cuda_graphs``), which then holds the mask decoder's two
        level projections too. The graphed call is made again when the backbone object, or the
        storage, dtype or device of its first weight or of those projections' weights, changed: a
        graph replays the weights it captured."""
        fn = functools.partial(self._tracker_levels, bb)
        w = _first_weight(bb)
        dec = self.sam_mask_decoder
        device = w.device if w is not None else self.device
        call = self._graphed_call("backbone_cuda_graphs", "_backbone_call", fn, device, bb,
                                  (w, dec.conv_s0.weight, dec.conv_s1.weight), "tracker backbone")
        return fn if call is None else call

    def _graphed_call(self, option, slot, fn, device, owner, weights, name):
        """The :class:`GraphedCall` of ``fn`` kept in ``self.<slot>`` (its key in ``<slot>_key``), or
        None where the option ``self.<option>`` (True, False or "auto": on CUDA) runs ``fn`` directly.
        The call is made again when the ``owner`` object, or the storage, dtype or device of one of
        ``weights`` (tensors or None), changed: a graph replays the weights it captured."""
        mode = check_switch(f"tracker.{option}", getattr(self, option))
        if mode is False or (mode == "auto" and device.type != "cuda"):
            return None
        key = (id(owner),) + tuple(None if t is None else (t.data_ptr(), t.dtype, t.device) for t in weights)
        if getattr(self, slot) is None or getattr(self, slot + "_key") != key:
            from ..predictor.graphed_call import GraphedCall

            setattr(self, slot, None)  # (its graphs and pool are freed before the new capture)
            setattr(self, slot, GraphedCall(fn, device, cuda_graphs=True if mode is True else None, capture_after=1,
                                            name=name))
            setattr(self, slot + "_key", key)
        return getattr(self, slot)

    def _get_image_feature(self, inference_state, frame_idx, batch_size):
        """Features of one frame, expanded (views) to ``batch_size`` objects:
        ``(image (B, 3, R, R) or None, backbone_out, feats [s0, s1, top] (B, C, h, w),
        pos (same shapes), feat_sizes [(h, w)] * 3)``. A cache miss runs the backbone on
        ``inference_state["images"][frame_idx]`` and caches that frame alone (official)."""
        image, backbone_out = self._frame_features(inference_state, frame_idx)
        if "tracker_backbone_out" in backbone_out:
            backbone_out = backbone_out["tracker_backbone_out"]
        n = self.num_feature_levels
        dtype = self.dtype
        feats = [x.to(dtype).expand(batch_size, -1, -1, -1) for x in backbone_out["backbone_fpn"][-n:]]
        pos = [x.to(dtype).expand(batch_size, -1, -1, -1) for x in backbone_out["vision_pos_enc"][-n:]]
        feat_sizes = [(x.shape[-2], x.shape[-1]) for x in pos]
        expanded_image = None if image is None else image.expand(batch_size, -1, -1, -1)
        return expanded_image, backbone_out, feats, pos, feat_sizes

    def _frame_features(self, inference_state, frame_idx):
        """``(image (1, 3, R, R) or None, backbone_out)`` of one frame from the feature cache; a
        miss takes the prefetched features (:meth:`_prefetch_features`) or runs the backbone on
        ``inference_state["images"][frame_idx]``, and caches that frame alone (official)."""
        image, backbone_out = inference_state["cached_features"].get(frame_idx, (None, None))
        if backbone_out is None:
            if self.backbone is None:
                raise RuntimeError(
                    f"Image features for frame {frame_idx} are not cached. Please run inference on this frame first."
                )
            hit = self._take_prefetched(inference_state, frame_idx)
            if hit is None:
                image = self._frame_image(inference_state, frame_idx)
                backbone_out = self.forward_image(image)
            else:
                image, backbone_out = hit
            inference_state["cached_features"] = {frame_idx: (image, backbone_out)}
        return image, backbone_out

    def _prefetch_features(self, inference_state, frame_idx) -> bool:
        """Launch the backbone on ``frame_idx`` ahead of its turn (``prefetch_backbone``): its
        features wait in ``inference_state["prefetched_features"]`` (one frame at most) until
        :meth:`_get_image_feature` misses the cache on that frame. On CUDA the frame's read and
        :meth:`forward_image` run on a side stream behind the work already queued on the current
        one, and an event marks their end. Returns whether it launched: not for a frame already
        cached or prefetched, nor without a backbone or frames."""
        if (self.backbone is None or "images" not in inference_state
                or frame_idx in inference_state["cached_features"]):
            return False
        held = inference_state.get("prefetched_features") or {}
        if frame_idx in held:
            return False
        self._drop_prefetched(inference_state)  # (another frame's, never read: at most one is held)
        def run():
            image = self._frame_image(inference_state, frame_idx)
            return image, self.forward_image(image)

        # on CUDA behind the queued work (the frame store's table, the backbone graph's last replay)
        (image, out), done = self._prefetch.run(self.device, run) if self.device.type == "cuda" else (run(), None)
        inference_state["prefetched_features"] = {frame_idx: (image, out, done)}
        return True

    def _frame_image(self, inference_state, frame_idx):
        """Frame ``frame_idx`` of the state as the backbone takes it: (1, 3, R, R) float32 on the device."""
        return inference_state["images"][frame_idx].to(self.device).float().unsqueeze(0)

    def _take_prefetched(self, inference_state, frame_idx):
        """``(image, backbone_out)`` prefetched for ``frame_idx``, ordered before the current
        stream's next work, or None (another frame's stays held; a backbone run on the current
        stream waits for it in :meth:`forward_image`)."""
        held = inference_state.get("prefetched_features")
        hit = held.pop(frame_idx, None) if held else None
        if hit is None:
            return None
        image, out, done = hit
        SideStream.adopt((image, out), done, self.device)  # (made on the side stream, read on this one)
        return image, out

    def _drop_prefetched(self, inference_state) -> None:
        """Forget prefetched features that were not read (a stream closed early, or another frame
        came first). Their memory was allocated on the side stream and never used on another, so
        the allocator hands it out again behind the side stream's work only."""
        inference_state.pop("prefetched_features", None)

    # ------------------------------------------------------------------------------------------
    # One frame

    def _run_single_frame_inference(
        self,
        inference_state,
        output_dict,
        frame_idx,
        batch_size,
        is_init_cond_frame,
        point_inputs,
        mask_inputs,
        reverse,
        run_mem_encoder,
        prev_sam_mask_logits=None,
        use_prev_mem_frame=True,
        memory_bank=None,
    ):
        """Track one frame from its inputs and the memory. Returns ``(compact_out, pred_masks)``:
        the stored output (memory bank in bf16 with ``bf16_casts``) and the low-res logits.
        ``memory_bank`` (sam3fast): take the memory from this :class:`MemoryBank` instead of
        the official per-frame selection over ``output_dict``."""
        image, _, feats, pos, feat_sizes = self._get_image_feature(
            inference_state, frame_idx, 1 if isinstance(memory_bank, TableRows) else batch_size)
        assert point_inputs is None or mask_inputs is None
        if memory_bank is not None:
            assert point_inputs is None and mask_inputs is None and not is_init_cond_frame
            current_out = self._track_on_banks([memory_bank], frame_idx, inference_state["num_frames"], reverse,
                                               feats, pos, run_mem_encoder)[0]
            return self._compact_output(inference_state, current_out)
        current_out = self.track_step(
            frame_idx=frame_idx,
            is_init_cond_frame=is_init_cond_frame,
            current_vision_feats=feats,
            current_vision_pos_embeds=pos,
            feat_sizes=feat_sizes,
            image=image,
            point_inputs=point_inputs,
            mask_inputs=mask_inputs,
            output_dict=output_dict,
            num_frames=inference_state["num_frames"],
            track_in_reverse=reverse,
            run_mem_encoder=run_mem_encoder,
            prev_sam_mask_logits=prev_sam_mask_logits,
            use_prev_mem_frame=use_prev_mem_frame,
        )
        return self._compact_output(inference_state, current_out)

    def _compact_output(self, inference_state, current_out):
        storage_device = inference_state["storage_device"]
        maskmem_features = current_out["maskmem_features"]
        if maskmem_features is not None:
            maskmem_features = self._to_memory_bank(maskmem_features).to(storage_device, non_blocking=True)
        pred_masks_gpu = current_out["pred_masks"]
        pred_masks = pred_masks_gpu.to(storage_device, non_blocking=True)
        maskmem_pos_enc = self._get_maskmem_pos_enc(inference_state, current_out)
        compact_current_out = {
            "maskmem_features": maskmem_features,
            "maskmem_pos_enc": maskmem_pos_enc,
            "pred_masks": pred_masks,
            "obj_ptr": current_out["obj_ptr"],
            "object_score_logits": current_out["object_score_logits"],
        }
        if self.use_memory_selection:
            compact_current_out["iou_score"] = current_out["iou_score"]
            compact_current_out["eff_iou_score"] = current_out["eff_iou_score"]
        return compact_current_out, pred_masks_gpu

    def _run_memory_encoder(self, inference_state, frame_idx, batch_size, high_res_masks, object_score_logits,
                            is_mask_from_pts):
        """Encode (B, 1, h, w) mask logits of a frame into memory (after constraints changed them).
        Returns ``(maskmem_features (B, M, g, g) [bf16 with bf16_casts], maskmem_pos_enc [view])``."""
        _, _, feats, _, _ = self._get_image_feature(inference_state, frame_idx, batch_size)
        maskmem_features, pos = self._encode_memory_outside_step(feats[-1], high_res_masks, object_score_logits,
                                                                 is_mask_from_pts)
        maskmem_pos_enc = [pos]
        maskmem_features = self._to_memory_bank(maskmem_features).to(inference_state["storage_device"],
                                                                      non_blocking=True)
        maskmem_pos_enc = self._get_maskmem_pos_enc(inference_state, {"maskmem_pos_enc": maskmem_pos_enc})
        return maskmem_features, maskmem_pos_enc

    def _get_maskmem_pos_enc(self, inference_state, current_out):
        """The memory pos enc is the same for every frame and object: one (1, M, g, g) copy lives
        in ``inference_state["constants"]``; outputs hold batch-expanded views of it."""
        model_constants = inference_state["constants"]
        out_maskmem_pos_enc = current_out["maskmem_pos_enc"]
        if out_maskmem_pos_enc is None:
            return None
        if "maskmem_pos_enc" not in model_constants:
            assert isinstance(out_maskmem_pos_enc, list)
            model_constants["maskmem_pos_enc"] = [x[0:1].clone() for x in out_maskmem_pos_enc]
        maskmem_pos_enc = model_constants["maskmem_pos_enc"]
        batch_size = out_maskmem_pos_enc[0].size(0)
        return [x.expand(batch_size, -1, -1, -1) for x in maskmem_pos_enc]

    def track_step(
        self,
        frame_idx,
        is_init_cond_frame,
        current_vision_feats,
        current_vision_pos_embeds,
        feat_sizes,
        image,
        point_inputs,
        mask_inputs,
        output_dict,
        num_frames,
        track_in_reverse=False,
        run_mem_encoder=True,
        prev_sam_mask_logits=None,
        use_prev_mem_frame=True,
    ):
        """Official ``track_step`` (inference). ``current_vision_feats`` / ``_pos_embeds``: lists of
        batch-first maps [s0 (B, D/8, 4g, 4g), s1 (B, D/4, 2g, 2g), top (B, D, g, g)] (the official
        passes (h*w, B, C)). Returns the full output dict ("pred_masks" (B, 1, r, r),
        "pred_masks_high_res" (B, 1, R, R), "obj_ptr", "object_score_logits", "maskmem_*", ...)."""
        current_out = {"point_inputs": point_inputs, "mask_inputs": mask_inputs}
        high_res_features = list(current_vision_feats[:-1]) if len(current_vision_feats) > 1 else None
        if mask_inputs is not None:
            sam_outputs = self._use_mask_as_output(current_vision_feats[-1], high_res_features, mask_inputs)
        else:
            pix_feat_with_mem = self._prepare_memory_conditioned_features(
                frame_idx=frame_idx,
                is_init_cond_frame=is_init_cond_frame,
                current_vision_feats=current_vision_feats[-1:],
                current_vision_pos_embeds=current_vision_pos_embeds[-1:],
                feat_sizes=feat_sizes[-1:],
                output_dict=output_dict,
                num_frames=num_frames,
                track_in_reverse=track_in_reverse,
                use_prev_mem_frame=use_prev_mem_frame,
            )
            # previously predicted logits go in as the mask prompt together with new clicks
            if prev_sam_mask_logits is not None:
                assert point_inputs is not None and mask_inputs is None
                mask_inputs = prev_sam_mask_logits
            multimask_output = self._use_multimask(is_init_cond_frame, point_inputs)
            sam_outputs = self._forward_sam_heads(
                backbone_features=pix_feat_with_mem,
                point_inputs=point_inputs,
                mask_inputs=mask_inputs,
                high_res_features=high_res_features,
                multimask_output=multimask_output,
            )
        _, _, ious, low_res_masks, high_res_masks, obj_ptr, object_score_logits = sam_outputs
        current_out["pred_masks"] = low_res_masks
        current_out["pred_masks_high_res"] = high_res_masks
        current_out["obj_ptr"] = obj_ptr
        if self.use_memory_selection:
            iou_score = ious.max(-1)[0]
            current_out["iou_score"] = iou_score
            current_out["eff_iou_score"] = self.cal_mem_score(object_score_logits, iou_score)
        current_out["object_score_logits"] = object_score_logits

        if run_mem_encoder and self.num_maskmem > 0:
            maskmem_features, maskmem_pos_enc = self._encode_new_memory(
                image=image,
                current_vision_feats=current_vision_feats,
                feat_sizes=feat_sizes,
                pred_masks_high_res=high_res_masks,
                object_score_logits=object_score_logits,
                is_mask_from_pts=(point_inputs is not None),
                output_dict=output_dict,
                is_init_cond_frame=is_init_cond_frame,
            )
            current_out["maskmem_features"] = maskmem_features
            current_out["maskmem_pos_enc"] = maskmem_pos_enc
        else:
            current_out["maskmem_features"] = None
            current_out["maskmem_pos_enc"] = None

        if self.trim_past_non_cond_mem_for_eval:
            self._trim_past_non_cond_mem(output_dict, frame_idx)
        return current_out

    def _trim_past_non_cond_mem(self, output_dict, frame_idx):
        # official trim_past_non_cond_mem_for_eval (off in SAM 3): old non-cond outputs keep only
        # pred_masks, obj_ptr and object_score_logits
        def _trim(past_out):
            return {k: past_out[k] for k in ("pred_masks", "obj_ptr", "object_score_logits")}

        non_cond = output_dict["non_cond_frame_outputs"]
        past_frame_idx = frame_idx - self.memory_temporal_stride_for_eval * self.num_maskmem
        past_out = non_cond.get(past_frame_idx, None)
        if past_out is not None:
            if not self.use_memory_selection or past_out.get("eff_iou_score", 0) < self.mf_threshold:
                non_cond[past_frame_idx] = _trim(past_out)
        if self.use_memory_selection:
            far_old_frame_idx = frame_idx - 20 * self.max_obj_ptrs_in_encoder
            past_out = non_cond.get(far_old_frame_idx, None)
            if past_out is not None:
                non_cond[far_old_frame_idx] = _trim(past_out)

    def _use_multimask(self, is_init_cond_frame, point_inputs):
        num_pts = 0 if point_inputs is None else point_inputs["point_labels"].size(1)
        return (
            self.multimask_output_in_sam
            and (is_init_cond_frame or self.multimask_output_for_tracking)
            and (self.multimask_min_pt_num <= num_pts <= self.multimask_max_pt_num)
        )

    def _forward_sam_heads(self, backbone_features, point_inputs=None, mask_inputs=None, high_res_features=None,
                           multimask_output=False, gt_masks=None, need_high_res=True):
        """Official ``_forward_sam_heads`` (see :func:`sam3fast.model.sam_heads.sam_heads_forward`):
        returns ``(low_res_multimasks, high_res_multimasks, ious, low_res_masks, high_res_masks,
        obj_ptr, object_score_logits)``."""
        coords = labels = None
        if point_inputs is not None:
            coords, labels = point_inputs["point_coords"], point_inputs["point_labels"]
        return tuple(sam_heads_forward(
            self.sam_prompt_encoder, self.sam_mask_decoder, self.obj_ptr_proj, self.no_obj_ptr,
            backbone_features, point_coords=coords, point_labels=labels, mask_inputs=mask_inputs,
            high_res_features=high_res_features, multimask_output=multimask_output, need_high_res=need_high_res,
        ))

    def _use_mask_as_output(self, backbone_features, high_res_features, mask_inputs):
        """A binary mask input (B, 1, I, I) as the output: +-10 logits, a low-res (antialiased)
        copy, IoU 1, object present iff any pixel is set, pointer from the heads on
        ``mask_downsample(mask)`` (``no_obj_ptr`` for an empty mask)."""
        out_scale, out_bias = 20.0, -10.0  # sigmoid(-10) = 4.5e-5
        mask_inputs_float = mask_inputs.float()
        high_res_masks = mask_inputs_float * out_scale + out_bias
        low_res_masks = F.interpolate(
            high_res_masks,
            size=(high_res_masks.size(-2) // self.backbone_stride * 4,
                  high_res_masks.size(-1) // self.backbone_stride * 4),
            align_corners=False, mode="bilinear", antialias=True,
        )
        ious = mask_inputs.new_ones(mask_inputs.size(0), 1).float()
        obj_ptr = self._forward_sam_heads(
            backbone_features=backbone_features,
            mask_inputs=self.mask_downsample(mask_inputs_float.to(self.dtype)),
            high_res_features=high_res_features,
            gt_masks=mask_inputs,
        )[5]
        is_obj_appearing = torch.any(mask_inputs.flatten(1).float() > 0.0, dim=1)[..., None]
        lambda_is_obj_appearing = is_obj_appearing.float()
        object_score_logits = out_scale * lambda_is_obj_appearing + out_bias
        obj_ptr = lambda_is_obj_appearing * obj_ptr
        obj_ptr = obj_ptr + (1 - lambda_is_obj_appearing) * self.no_obj_ptr
        return low_res_masks, high_res_masks, ious, low_res_masks, high_res_masks, obj_ptr, object_score_logits

    def _encode_new_memory(self, image, current_vision_feats, feat_sizes, pred_masks_high_res, object_score_logits,
                           is_mask_from_pts, output_dict=None, is_init_cond_frame=False):
        """Official ``_encode_new_memory`` on the top-level features (B, D, g, g): returns
        ``(maskmem_features (B, M, g, g), [maskmem_pos_enc (B, M, g, g)])`` (not yet rounded)."""
        feat, pos = self._encode_memory(current_vision_feats[-1], pred_masks_high_res, object_score_logits,
                                        is_mask_from_pts, **self._memory_encoder_settings())
        return feat, [pos]

    def _memory_encoder_settings(self) -> Dict[str, Any]:
        """The settings :meth:`_encode_memory` reads, passed as plain arguments (a graph of it
        bakes them in: another value is another graph)."""
        return {"non_overlap": bool(self.non_overlap_masks_for_mem_enc),
                "sigmoid_scale": float(self.sigmoid_scale_for_mem_enc),
                "sigmoid_bias": float(self.sigmoid_bias_for_mem_enc)}

    def _encode_memory(self, pix_feat, pred_masks_high_res, object_score_logits, is_mask_from_pts, *,
                       non_overlap, sigmoid_scale, sigmoid_bias):
        """:meth:`_encode_new_memory` on the top-level features ``pix_feat`` (B, D, g, g), or (1, D,
        g, g) for the same features under every object: returns ``(maskmem_features (B, M, g, g),
        maskmem_pos_enc (B, M, g, g))``. Tensor ops only."""
        B = pred_masks_high_res.shape[0]
        if pix_feat.shape[0] == 1 and B != 1:
            pix_feat = pix_feat.expand(B, -1, -1, -1)  # (what the callers' batch views are)
        if non_overlap:
            pred_masks_high_res = self._apply_non_overlapping_constraints(pred_masks_high_res)
        return encode_new_memory(
            self.maskmem_backbone, pix_feat, pred_masks_high_res.to(self.dtype), object_score_logits,
            self.no_obj_embed_spatial, is_mask_from_pts=is_mask_from_pts,
            sigmoid_scale=sigmoid_scale, sigmoid_bias=sigmoid_bias,
        )

    def _encode_memory_outside_step(self, pix_feat, masks, object_score_logits, is_mask_from_pts):
        """:meth:`_encode_memory` of one frame's objects (``pix_feat``: that frame's features,
        batch views of one (1, D, g, g) tensor) as :meth:`_run_memory_encoder` runs it: directly, or
        on CUDA through the graphed call (:meth:`_memory_encoder_runner`) with the objects padded to
        a power of two (padded rows: empty masks, absent; sliced off), so a session whose object
        count changes replays a few graphs and holds a few buffers instead of one per count. Each
        object is encoded alone, so the padding changes no real row; the non-overlap rule, which
        compares objects, is applied to the real rows before the padding."""
        settings = self._memory_encoder_settings()
        call = self._memory_encoder_runner()
        if call is None:
            return self._encode_memory(pix_feat, masks, object_score_logits, is_mask_from_pts, **settings)
        B = masks.shape[0]
        if settings["non_overlap"]:
            masks = self._apply_non_overlapping_constraints(masks)
            settings["non_overlap"] = False
        Bb = 1 << (max(B, 1) - 1).bit_length()
        if Bb > B:
            masks = torch.cat([masks, masks.new_zeros((Bb - B,) + tuple(masks.shape[1:]))])
            object_score_logits = torch.cat([object_score_logits, object_score_logits.new_full(
                (Bb - B,) + tuple(object_score_logits.shape[1:]), -10.0)])
        feat, pos = call(pix_feat[:1], masks, object_score_logits, bool(is_mask_from_pts), **settings)
        return feat[:B], pos[:B]

    def _memory_encoder_runner(self):
        """The :class:`GraphedCall` of :meth:`_encode_memory` that :meth:`_encode_memory_outside_step`
        uses (``memory_encoder_cuda_graphs``), or None (a direct call). It is made again when the
        memory encoder object, or the storage, dtype or device of its first weight or of
        ``no_obj_embed_spatial``, changed: a graph replays the weights it captured."""
        enc = self.maskmem_backbone
        return self._graphed_call("memory_encoder_cuda_graphs", "_memory_encoder_call", self._encode_memory,
                                  self.device, enc, (next(enc.parameters(), None), self.no_obj_embed_spatial),
                                  "tracker memory encoder")

    # ------------------------------------------------------------------------------------------
    # Memory

    def cal_mem_score(self, object_score_logits, iou_score):
        """Official ``cal_mem_score``: mean of (rescaled object score * IoU) as a 0-d tensor. With
        (B, 1) scores and (B,) IoUs (``track_step``) the product broadcasts to (B, B), i.e.
        mean(score) * mean(iou); the official relies on that, so it is kept."""
        object_score_norm = torch.where(object_score_logits > 0, object_score_logits.sigmoid() * 2 - 1,
                                        torch.zeros_like(object_score_logits))
        return (object_score_norm * iou_score).mean()

    def frame_filter(self, output_dict, track_in_reverse, frame_idx, num_frames, r):
        """Memory selection (SAM2Long): the last (up to ``min(num_frames, max_obj_ptrs) - 1``)
        previous non-cond frames whose ``eff_iou_score`` > ``mf_threshold``, oldest first, plus
        always the adjacent frame. Scans back to frame 1 (forward) / the last frame (reverse)."""
        if (frame_idx == 0 and not track_in_reverse) or (frame_idx == num_frames - 1 and track_in_reverse):
            return []
        max_num = min(num_frames, self.max_obj_ptrs_in_encoder)
        must_include = frame_idx + 1 if track_in_reverse else frame_idx - 1
        valid_indices = self._scan_good_frames(output_dict, track_in_reverse, must_include, num_frames, r,
                                               max_num - 1)
        if must_include not in valid_indices:
            valid_indices.append(must_include)
        return valid_indices

    def _scan_good_frames(self, output_dict, track_in_reverse, start, num_frames, r, max_count):
        """The official scan of ``frame_filter`` from frame ``start`` away from the current frame
        (down to frame 1 forward, up to the last frame in reverse): the frames with
        ``eff_iou_score`` > ``mf_threshold``, oldest first, stopping once ``max_count`` are found."""
        step, end = (r, num_frames) if track_in_reverse else (-r, 0)
        non_cond = output_dict["non_cond_frame_outputs"]
        self._host_outputs_ready()
        valid_indices = []
        for i in range(start, end, step):
            if i not in non_cond or "eff_iou_score" not in non_cond[i]:
                continue
            if non_cond[i]["eff_iou_score"] > self.mf_threshold:  # host sync (official)
                valid_indices.insert(0, i)
            if len(valid_indices) >= max_count:
                break
        return valid_indices

    def _prepare_memory_conditioned_features(
        self,
        frame_idx,
        is_init_cond_frame,
        current_vision_feats,
        current_vision_pos_embeds,
        feat_sizes,
        output_dict,
        num_frames,
        track_in_reverse=False,
        use_prev_mem_frame=True,
    ):
        """Condition the frame's top-level features (B, D, g, g) on the memory bank ->
        ``pix_feat_with_mem`` (B, D, g, g). The frame selection is the official one verbatim;
        the tensor half is :func:`assemble_memory` + :class:`MemoryAttention`."""
        feat = current_vision_feats[-1]
        B, C, H, W = feat.shape
        if self.num_maskmem == 0:
            return feat
        if is_init_cond_frame or not use_prev_mem_frame:
            return feat + self.no_mem_embed.reshape(1, C, 1, 1)
        curr = feat.flatten(2).transpose(1, 2)
        curr_pos = current_vision_pos_embeds[-1].flatten(2).transpose(1, 2)

        tpos_sign_mul = -1 if track_in_reverse else 1
        cond_outputs = output_dict["cond_frame_outputs"]
        assert len(cond_outputs) > 0
        selected_cond_outputs, unselected_cond_outputs = select_closest_cond_frames(
            frame_idx, cond_outputs, self.max_cond_frames_in_attn, keep_first_cond_frame=self.keep_first_cond_frame
        )
        t_pos_and_prevs = [((frame_idx - t) * tpos_sign_mul, out, True) for t, out in selected_cond_outputs.items()]
        r = self.memory_temporal_stride_for_eval
        if self.use_memory_selection:
            valid_indices = self.frame_filter(output_dict, track_in_reverse, frame_idx, num_frames, r)
        for t_pos in range(1, self.num_maskmem):
            t_rel = self.num_maskmem - t_pos  # frames before the current one
            if self.use_memory_selection:
                if t_rel > len(valid_indices):
                    continue
                prev_frame_idx = valid_indices[-t_rel]
            elif t_rel == 1:
                prev_frame_idx = frame_idx + t_rel if track_in_reverse else frame_idx - t_rel
            elif not track_in_reverse:
                prev_frame_idx = ((frame_idx - 2) // r) * r - (t_rel - 2) * r
            else:
                prev_frame_idx = -(-(frame_idx + 2) // r) * r + (t_rel - 2) * r
            out = output_dict["non_cond_frame_outputs"].get(prev_frame_idx, None)
            if out is None:
                # an unselected cond frame among the last frames is attended as a non-cond one
                out = unselected_cond_outputs.get(prev_frame_idx, None)
            t_pos_and_prevs.append((t_pos, out, False))

        mem_feats, mem_pos, mem_tpos = [], [], []
        for t_pos, prev, is_selected_cond_frame in t_pos_and_prevs:
            if prev is None:
                continue
            if prev["maskmem_features"] is None:
                raise RuntimeError(f"memory frame {t_pos} has no encoded memory (maskmem_features is None)")
            mem_feats.append(self._from_memory_bank(prev["maskmem_features"]))
            mem_pos.append(prev["maskmem_pos_enc"][-1].to(self.device, self.dtype))
            mem_tpos.append(0 if is_selected_cond_frame else t_pos)

        max_obj_ptrs_in_encoder = min(num_frames, self.max_obj_ptrs_in_encoder)
        ptr_cond_outputs = {
            t: out for t, out in selected_cond_outputs.items()
            if (t >= frame_idx if track_in_reverse else t <= frame_idx)
        }
        ptrs = [out["obj_ptr"].to(self.device) for out in ptr_cond_outputs.values()]
        ptr_tpos = [(frame_idx - t) * tpos_sign_mul for t in ptr_cond_outputs]
        for t_diff in range(1, max_obj_ptrs_in_encoder):
            if not self.use_memory_selection:
                t = frame_idx + t_diff if track_in_reverse else frame_idx - t_diff
                if t < 0 or (num_frames is not None and t >= num_frames):
                    break
            else:
                # (the official stops one short: the oldest selected frame gives no pointer)
                if -t_diff <= -len(valid_indices):
                    break
                t = valid_indices[-t_diff]
            out = output_dict["non_cond_frame_outputs"].get(t, unselected_cond_outputs.get(t, None))
            if out is not None:
                ptrs.append(out["obj_ptr"].to(self.device))  # (retired outputs live on the host)
                ptr_tpos.append(t_diff)

        memory, memory_pos, num_obj_ptr_tokens = assemble_memory(
            maskmem_features=torch.stack(mem_feats, dim=1),
            maskmem_pos=torch.stack(mem_pos, dim=1),
            mem_tpos=mem_tpos,
            obj_ptrs=torch.stack([p.to(self.dtype) for p in ptrs], dim=1) if ptrs else None,
            ptr_tpos=ptr_tpos if ptrs else None,
            maskmem_tpos_enc=self.maskmem_tpos_enc,
            obj_ptr_tpos_proj=self.obj_ptr_tpos_proj,
            max_obj_ptrs_in_encoder=max_obj_ptrs_in_encoder,
        )
        out = self.transformer.encoder(curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens)
        return out.transpose(1, 2).reshape(B, C, H, W)
