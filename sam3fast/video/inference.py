"""Detect-and-track orchestration for SAM 3 on video (official ``Sam3VideoBase``,
``Sam3VideoInference`` and ``Sam3VideoInferenceWithInstanceInteractivity``, one process).

Per frame t (``_det_track_one_frame``), with N tracked objects in K tracker states and N_det
detections, masks at the low resolution 4g (288 at full size):

1. detector (:class:`~sam3fast.video.detector.Sam3VideoDetector`, one frame ahead, mask NMS,
   joint scores): detections = queries with sigmoid(logit) > ``score_threshold_detection``
   (none when the frame allows no new detection); the tracker features of frame t are cached;
2. tracker propagation of every state to t -> low-res masks (N, 4g, 4g) (hole/sprinkle filled,
   ``fill_hole_area``) and object-score logits (N,);
3. planning: det/track association by mask IoU (``_associate_det_trk``: a track is matched when
   an IoU >= ``trk_assoc_iou_thresh``, or through one-to-one Hungarian matching with
   ``o2o_matching_masklets_enable``; a detection is new when its score >= ``new_det_thresh`` and
   no IoU >= ``assoc_iou_thresh``), hotstart removal (unmatched or duplicated for too many frames
   within ``hotstart_delay`` of first appearance), periodic re-conditioning on high-confidence
   detections, occlusion-based suppression, memory encoding of the tracker masks;
4. execution: new detections become one new tracker state, removed objects leave their state;
5. outputs: per object a (1, H, W) bool mask at video resolution (sam3fast: a
   :class:`~sam3fast.video.frame_masks.FrameMasks`, the frame's (N, 4g, 4g) logits, from which a
   mask is made only when read).

Outputs of ``propagate_in_video`` are held ``hotstart_delay`` frames and then post-processed
(``_postprocess_output``): hidden objects dropped, boxes from the masks, object-wise non-overlap.
sam3fast: from the held logits in one fused pass (``sam3fast::mask_postprocess``), bit-packed for
the copy to the host; frames whose masks came from clicks go the official way.

The tracker is any object with the official ``Sam3TrackerPredictor`` API (``init_state``,
``add_new_mask``, ``add_new_points``, ``propagate_in_video``, ``propagate_in_video_preflight``,
``remove_object``, ``clear_all_points_in_frame``, ``_run_memory_encoder``,
``_add_output_per_object``, ``_obj_id_to_idx``, attributes ``input_mask_size``,
``low_res_mask_size``, ``maskmem_backbone``, ``sam_mask_decoder``); its ``cached_features`` is the
session's ``feature_cache``: frame index -> (frame, {"tracker_backbone_out": {"vision_features",
"vision_pos_enc", "backbone_fpn"}}).

Host copies per frame (counted on the CPU through the host reads of tensor values, tiny config):
one in the steady state, with one sync, where the official makes one per scanned memory frame,
per detection step, per track flag and per output array. Everything the host reads goes through
``host_channel`` (:class:`~sam3fast.video.host_channel.HostChannel`):
- the planning read (``_associate``): detections stay as padded query slots with a validity
  mask, association runs on the device on fixed shapes
  (:func:`~sam3fast.video.association.associate_detections`), and so do the decisions
  (``device_planning``: boundary rule, object limit, hotstart removal and suppression on a
  per-track state, :mod:`~sam3fast.video.device_plan`); one copy brings them, the detection
  scores and the tracker scores to the host, which applies them to its bookkeeping (new ids,
  tracker states). Where ``device_plan_refusal`` names a reason (masklet confirmation, several
  ranks) the official heuristics run on numpy as the official's do;
- the outputs (``_postprocess_launch``): keep flags, boxes and bit-packed masks of all objects,
  filtered and unpacked on the host. With ``pipelined_outputs`` (default) they ride in the next
  frame's planning copy; without, and for the frames held to the end, in a copy of their own.
On several ranks (:meth:`Sam3VideoBase.set_distributed`, see :mod:`sam3fast.video.distributed`):
the detector runs frame-parallel, objects are sharded (``obj_ids_per_gpu``), the tracker's masks
and scores are all-gathered after step 2, rank 0 alone associates and runs the hotstart heuristics
(``rank0_metadata``) and broadcasts the plan as one int64 device tensor, every rank executes it on
its own objects, and rank 0 alone builds outputs.

The tracker step (memory selection on fixed-capacity banks, the rows of one persistent
:class:`~sam3fast.video.memory_bank.ObjectTable` shared by all sessions, one batch) reads nothing;
hole filling uses the Triton connected-components kernel on CUDA; host values reach the device
through pinned memory without a wait (``to_device_async``); the periodic re-condition gate
(``obj_score > 0.8``) compares the logits read with the plan. Left on the host, on the frames that
need them: adding new objects (one batch per frame, ``add_new_masks``) and removing objects
(tracker state edits), ``refined_score.item()`` in partial propagation.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..ops import connected_component_sizes, mask_postprocess
from ..profiling import stage
from .association import associate_detections
from .detector import mask_iou_matrix
from .device_plan import (NO_FRAME, PlanSettings, decode_plan, device_plan_refusal, empty_state, layout_rows,
                          next_state, plan_frame)
from .frame_masks import FrameMasks, to_device_async
from .host_channel import HostChannel

logger = logging.getLogger(__name__)

IMAGE_EXTS = [".jpg", ".jpeg", ".png", ".bmp", ".tiff", ".webp"]


# ----------------------------------------------------------------------------------------------
# Mask helpers (official sam3_tracker_utils / perflib / tracker-base tensor functions)


def fill_holes_in_mask_scores(mask: Tensor, max_area: int, fill_holes: bool = True,
                              remove_sprinkles: bool = True) -> Tensor:
    """Official ``fill_holes_in_mask_scores`` on (N, 1, H, W) logits: background components
    (8-connected, logit <= 0) of area <= ``max_area`` become 0.1; then foreground components of
    area <= min(max_area, foreground area // 2) (per mask) become -0.1."""
    if max_area <= 0 or mask.shape[0] == 0:
        return mask
    N, C, H, W = mask.shape
    if fill_holes:
        mask_bg = mask <= 0
        areas_bg = connected_component_sizes(mask_bg.reshape(N * C, H, W)).reshape(N, C, H, W)
        small_bg = mask_bg & (areas_bg <= max_area)
        mask = torch.where(small_bg, 0.1, mask)  # (a Python scalar: no host-to-device copy)
    if remove_sprinkles:
        mask_fg = mask > 0
        fg_area_thresh = torch.sum(mask_fg, dim=(2, 3), keepdim=True, dtype=torch.int32)
        fg_area_thresh = fg_area_thresh.floor_divide(2).clamp(max=max_area)
        areas_fg = connected_component_sizes(mask_fg.reshape(N * C, H, W)).reshape(N, C, H, W)
        small_fg = mask_fg & (areas_fg <= fg_area_thresh)
        mask = torch.where(small_fg, -0.1, mask)
    return mask


def masks_to_boxes(masks: Tensor) -> Tensor:
    """``sam3.perflib.masks_ops.masks_to_boxes``: (N, H, W) -> (N, 4) float inclusive pixel xyxy
    (an empty mask gives (W, H, 0, 0))."""
    if masks.numel() == 0:
        return torch.zeros((0, 4), device=masks.device, dtype=torch.float)
    N, H, W = masks.shape
    y = torch.arange(H, device=masks.device).view(1, H)
    x = torch.arange(W, device=masks.device).view(1, W)
    m = masks != 0
    mx = m.amax(dim=1)  # (N, W) columns with pixels
    my = m.amax(dim=2)  # (N, H) rows with pixels
    x0 = torch.amin((~mx) * W + mx * x, dim=1)
    y0 = torch.amin((~my) * H + my * y, dim=1)
    x1 = torch.amax(mx * x, dim=1)
    y1 = torch.amax(my * y, dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).to(dtype=torch.float)


def box_xywh_to_cxcywh(x: Tensor) -> Tensor:
    x0, y0, w, h = x.unbind(-1)
    return torch.stack([x0 + 0.5 * w, y0 + 0.5 * h, w, h], dim=-1)


def apply_non_overlapping_constraints(pred_masks: Tensor) -> Tensor:
    """Tracker base ``_apply_non_overlapping_constraints``: (N, 1, H, W) scores; at each pixel only
    the highest-scoring object (first on ties) keeps its score, the others are clamped <= -10."""
    if pred_masks.size(0) == 1:
        return pred_masks
    max_obj_inds = torch.argmax(pred_masks, dim=0, keepdim=True)
    batch_obj_inds = torch.arange(pred_masks.size(0), device=pred_masks.device)[:, None, None, None]
    keep = max_obj_inds == batch_obj_inds
    return torch.where(keep, pred_masks, torch.clamp(pred_masks, max=-10.0))


def suppress_object_pw_area_shrinkage(pred_masks: Tensor, shrink_threshold: float = 0.3) -> Tensor:
    """Tracker ``_suppress_object_pw_area_shrinkage``: objects whose area (logit > 0) shrinks below
    ``shrink_threshold`` of itself under the pixel-wise non-overlap are clamped <= -10."""
    non_overlap = apply_non_overlapping_constraints(pred_masks)
    area_before = (pred_masks > 0).sum(dim=(-1, -2))
    area_after = (non_overlap > 0).sum(dim=(-1, -2))
    area_before = torch.clamp(area_before, min=1.0)
    keep = (area_after / area_before) >= shrink_threshold
    keep_mask = keep[..., None, None].expand_as(pred_masks)
    return torch.where(keep_mask, pred_masks, torch.clamp(pred_masks, max=-10.0))


def apply_object_wise_non_overlapping_constraints(pred_masks: Tensor, obj_scores: Tensor,
                                                  background_value: float = -10.0) -> Tensor:
    """Tracker ``_apply_object_wise_non_overlapping_constraints``: a contested pixel goes to the
    object with the highest score. pred_masks (N, 1, H, W) (bool or logits), obj_scores (N, 1)."""
    single = torch.where(pred_masks > 0, obj_scores[..., None, None], background_value)
    pix = apply_non_overlapping_constraints(single)
    return torch.where(pix > 0, pred_masks, torch.clamp(pred_masks, max=background_value))


def _mem_interpol_size(tracker):
    """(H, W) the tracker's memory encoder resizes masks to (an int in sam3fast, a list officially)."""
    s = tracker.maskmem_backbone.mask_downsampler.interpol_size
    return (s, s) if isinstance(s, int) else tuple(s)


# ----------------------------------------------------------------------------------------------
# Session inputs


@dataclass
class VideoInputBatch:
    """What the official ``BatchedDatapoint`` holds for a video session: the frames
    (T, 3, R, R) (float16, normalised), the prompt strings (``[text or placeholder, "visual"]``)
    and per frame the index of the prompt string it uses."""

    img_batch: Any
    find_text_batch: List[str]
    text_ids: List[int] = field(default_factory=list)


class MaskletConfirmationStatus:
    UNCONFIRMED = 1
    CONFIRMED = 2


def is_image_type(resource_path) -> bool:
    if isinstance(resource_path, list):
        return len(resource_path) == 1
    return isinstance(resource_path, str) and resource_path.lower().endswith(tuple(IMAGE_EXTS))


# ----------------------------------------------------------------------------------------------


def _propagate_states_one_by_one(inference_states, frame_idx, reverse, run_mem_encoder, *, tracker):
    """The official way (any tracker with ``propagate_in_video``, e.g. the official one): one
    one-frame propagation per session -> per session (obj_ids, low_res_masks, obj_scores) or None."""
    results = []
    for inference_state in inference_states:
        if len(inference_state["obj_ids"]) == 0:
            results.append(None)
            continue
        outs = list(tracker.propagate_in_video(inference_state, start_frame_idx=frame_idx, max_frame_num_to_track=0,
                                               reverse=reverse, tqdm_disable=True, run_mem_encoder=run_mem_encoder))
        if len(outs) != 1 or outs[0][0] != frame_idx:
            raise RuntimeError(f"internal error: tracker propagated frames {[o[0] for o in outs]}, "
                               f"expected frame {frame_idx} only")
        _, obj_ids, low_res_masks, _, obj_scores = outs[0]
        results.append((list(obj_ids), low_res_masks, obj_scores))
    return results



# Rows (objects) of one memory-encoder pass over several tracker sessions
# (Sam3VideoBase._tracker_update_memories); a larger session runs alone, as the official runs each.
MEMORY_ENCODER_ROWS = 64


def _row_groups(states, max_rows: int):
    """``states`` (tracker sessions, in order) split into consecutive groups of at most
    ``max_rows`` objects in all (a session with more forms a group of its own)."""
    groups, cur, n = [], [], 0
    for st in states:
        k = len(st["obj_ids"])
        if cur and n + k > max_rows:
            groups.append(cur)
            cur, n = [], 0
        cur.append(st)
        n += k
    if cur:
        groups.append(cur)
    return groups


def _output_reader(channel: HostChannel, keep: Tensor, boxes: Tensor, mask_bytes: Tensor, obj_ids,
                   probs: np.ndarray, frame_stats, masks_from_bytes):
    """Queue a frame's outputs (N keep flags, (N, 4) float32 xywh boxes, the masks as bytes) for the
    host on ``channel`` (they ride in the next planning copy, or in their own copy when read first)
    and return ``read_outputs() -> outputs``, which gets them and keeps the flagged objects;
    ``masks_from_bytes(bytes, keep)`` turns the mask bytes into the kept (K, H, W) bool masks."""
    N = len(obj_ids)
    slot = channel.submit(keep, boxes, mask_bytes)  # (on CUDA: gathered straight into the copy)

    def read_outputs():
        with stage("video_output_read"):
            a = slot.get()  # (no wait when the next frame's planning copy carried it)
        keep_np = a[:N].view(np.bool_)
        return {
            "out_obj_ids": np.asarray(obj_ids, dtype=np.int64)[keep_np],
            "out_probs": probs[keep_np],
            "out_boxes_xywh": a[N:17 * N].view(np.float32).reshape(N, 4)[keep_np],
            "out_binary_masks": masks_from_bytes(a[17 * N:], keep_np),
            "frame_stats": frame_stats,
        }

    return read_outputs


class Sam3VideoBase(nn.Module):
    """``detector`` (:class:`~sam3fast.video.detector.Sam3VideoDetector`) + ``tracker`` and the
    per-frame detect-and-track step. Arguments are the official ones (see the official
    ``Sam3VideoBase`` for their meaning); one process (rank 0, world size 1)."""

    def __init__(
        self,
        detector: nn.Module,
        tracker: nn.Module,
        score_threshold_detection=0.5,
        det_nms_thresh=0.0,
        assoc_iou_thresh=0.5,
        trk_assoc_iou_thresh=0.5,
        new_det_thresh=0.0,
        hotstart_delay=0,
        hotstart_unmatch_thresh=3,
        hotstart_dup_thresh=3,
        suppress_unmatched_only_within_hotstart=True,
        init_trk_keep_alive=0,
        max_trk_keep_alive=8,
        min_trk_keep_alive=-4,
        suppress_overlapping_based_on_recent_occlusion_threshold=0.0,
        decrease_trk_keep_alive_for_empty_masklets=False,
        o2o_matching_masklets_enable=False,
        suppress_det_close_to_boundary=False,
        fill_hole_area=16,
        max_num_objects=-1,
        recondition_every_nth_frame=-1,
        masklet_confirmation_enable=False,
        masklet_confirmation_consecutive_det_thresh=3,
        reconstruction_bbox_iou_thresh=0.0,
        reconstruction_bbox_det_score=0.0,
    ):
        super().__init__()
        self.detector = detector
        self.tracker = tracker
        self.score_threshold_detection = score_threshold_detection
        self.det_nms_thresh = det_nms_thresh
        self.assoc_iou_thresh = assoc_iou_thresh
        self.trk_assoc_iou_thresh = trk_assoc_iou_thresh
        self.new_det_thresh = new_det_thresh
        if hotstart_delay > 0:
            if hotstart_unmatch_thresh > hotstart_delay or hotstart_dup_thresh > hotstart_delay:
                raise ValueError("hotstart_unmatch_thresh and hotstart_dup_thresh must be <= hotstart_delay")
        self.hotstart_delay = hotstart_delay
        self.hotstart_unmatch_thresh = hotstart_unmatch_thresh
        self.hotstart_dup_thresh = hotstart_dup_thresh
        self.suppress_unmatched_only_within_hotstart = suppress_unmatched_only_within_hotstart
        self.init_trk_keep_alive = init_trk_keep_alive
        self.max_trk_keep_alive = max_trk_keep_alive
        self.min_trk_keep_alive = min_trk_keep_alive
        self.suppress_overlapping_based_on_recent_occlusion_threshold = (
            suppress_overlapping_based_on_recent_occlusion_threshold
        )
        self.suppress_det_close_to_boundary = suppress_det_close_to_boundary
        self.decrease_trk_keep_alive_for_empty_masklets = decrease_trk_keep_alive_for_empty_masklets
        self.o2o_matching_masklets_enable = o2o_matching_masklets_enable
        self.fill_hole_area = fill_hole_area
        self.rank = 0
        self.progress = True  # sam3fast: False hides the propagation progress bars (batch jobs draw their own)
        # sam3fast: on CUDA, finished per-frame outputs (cached masks, the tracker's stored frames)
        # move to pinned host memory so device memory stays flat; False keeps them on the device.
        self.retire_finished_outputs = True
        # sam3fast: True: a frame's outputs ride to the host in the next frame's planning copy
        # (host_channel) and are yielded after it: one copy and one sync per frame, the same
        # outputs, yielded one frame of work later. False (the official interleaving): they are
        # read (a copy and a sync of their own) and yielded before the next frame starts.
        self.pipelined_outputs = True
        self.host_channel = HostChannel()
        # sam3fast: the detector's one-ahead frame is launched behind the planning read's copy, not
        # before the tracker step (``Sam3VideoDetector.forward_video_grounding_multigpu`` with
        # ``defer_next``): the host's wait then covers this frame's work only, and the GPU detects
        # the next frame while the host plans this one. The same computations in another order;
        # False: the official order.
        self.overlap_next_detection = True
        # sam3fast: on CUDA, the detector's one-ahead frame is launched at once on a side stream
        # (``forward_video_grounding_multigpu`` with ``ahead_stream``), before this frame's tracker
        # step, so that the next frame's ViT trunk (large GEMMs) runs beside this frame's tracker
        # step, planning and memory encoding (small kernels) instead of between them; the tracker
        # step of the next frame waits for it (it reads its features). Takes precedence over
        # ``overlap_next_detection``. The same computations: the same outputs. False (default
        # until an H100 times it): one stream.
        self.ahead_detection_stream = False
        # sam3fast: the planning decisions (boundary rule, object limit, hotstart removal and
        # suppression) as tensor ops on the device (sam3fast.video.device_plan), read with the
        # association in the one planning copy; where device_plan_refusal names a reason (masklet
        # confirmation, several ranks) the official host path runs. Read when a session's metadata
        # is made. False: the host path (numpy and per-object dicts, as the official).
        self.device_planning = True
        self.world_size = 1
        self.dist = None  # DistContext on several ranks (set_distributed)
        self.max_num_objects = max_num_objects if max_num_objects > 0 else 10000
        self.recondition_every_nth_frame = recondition_every_nth_frame
        self.masklet_confirmation_enable = masklet_confirmation_enable
        self.masklet_confirmation_consecutive_det_thresh = masklet_confirmation_consecutive_det_thresh
        self.reconstruction_bbox_iou_thresh = reconstruction_bbox_iou_thresh
        self.reconstruction_bbox_det_score = reconstruction_bbox_det_score
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_distributed(self, ctx) -> None:
        """Run as rank ``ctx.rank`` of ``ctx.world_size`` (a
        :class:`~sam3fast.video.distributed.DistContext`); None: back to one process."""
        self.dist = ctx
        self.rank = 0 if ctx is None else ctx.rank
        self.world_size = 1 if ctx is None else ctx.world_size
        self.detector.dist = ctx
        self.detector.rank = self.rank
        self.detector.world_size = self.world_size

    # ------------------------------------------------------------------ one frame
    def _det_track_one_frame(
        self,
        frame_idx: int,
        num_frames: int,
        reverse: bool,
        input_batch: VideoInputBatch,
        geometric_prompt: Any,
        tracker_states_local: List[Any],
        tracker_metadata_prev: Dict[str, Any],
        feature_cache: Dict,
        orig_vid_height: int,
        orig_vid_width: int,
        is_image_only: bool = False,
        allow_new_detections: bool = True,
    ):
        with stage("video_detection"):
            det_out = self.run_backbone_and_detection(
                frame_idx=frame_idx, num_frames=num_frames, reverse=reverse, input_batch=input_batch,
                geometric_prompt=geometric_prompt, feature_cache=feature_cache,
                allow_new_detections=allow_new_detections,
            )
        if tracker_metadata_prev == {}:
            tracker_metadata_prev.update(self._initialize_metadata())
        with stage("video_tracker_propagation"):
            tracker_low_res_masks_global, tracker_obj_scores_global = self.run_tracker_propagation(
                frame_idx=frame_idx, num_frames=num_frames, reverse=reverse,
                tracker_states_local=tracker_states_local, tracker_metadata_prev=tracker_metadata_prev,
            )
        # note: planning suppresses occluded objects in ``tracker_low_res_masks_global`` in place;
        # the outputs below see that, as the official's do
        with stage("video_planning"):
            tracker_update_plan, tracker_metadata_new = self.run_tracker_update_planning_phase(
                frame_idx=frame_idx, num_frames=num_frames, reverse=reverse, det_out=det_out,
                tracker_low_res_masks_global=tracker_low_res_masks_global,
                tracker_obj_scores_global=tracker_obj_scores_global,
                tracker_metadata_prev=tracker_metadata_prev, tracker_states_local=tracker_states_local,
                is_image_only=is_image_only,
            )
        reconditioned_obj_ids = tracker_update_plan.get("reconditioned_obj_ids", set())
        det_to_matched_trk_obj_ids = tracker_update_plan.get("det_to_matched_trk_obj_ids", {})
        with stage("video_execution"):
            tracker_states_local_new = self.run_tracker_update_execution_phase(
                frame_idx=frame_idx, num_frames=num_frames, reverse=reverse, det_out=det_out,
                tracker_states_local=tracker_states_local, tracker_update_plan=tracker_update_plan,
                orig_vid_height=orig_vid_height, orig_vid_width=orig_vid_width, feature_cache=feature_cache,
            )
        if self.rank == 0:
            obj_id_to_mask = self.build_outputs(
                frame_idx=frame_idx, num_frames=num_frames, reverse=reverse, det_out=det_out,
                tracker_low_res_masks_global=tracker_low_res_masks_global,
                tracker_obj_scores_global=tracker_obj_scores_global,
                tracker_metadata_prev=tracker_metadata_prev, tracker_update_plan=tracker_update_plan,
                orig_vid_height=orig_vid_height, orig_vid_width=orig_vid_width,
                reconditioned_obj_ids=reconditioned_obj_ids, det_to_matched_trk_obj_ids=det_to_matched_trk_obj_ids,
            )
            obj_id_to_score = tracker_metadata_new["obj_id_to_score"]
        else:  # only rank 0 answers; the others keep no outputs (as the official)
            obj_id_to_mask, obj_id_to_score = {}, {}
        frame_stats = {
            "num_obj_tracked": np.sum(tracker_metadata_new["num_obj_per_gpu"]),
            "num_obj_dropped": tracker_update_plan["num_obj_dropped_due_to_limit"],
        }
        if tracker_obj_scores_global.shape[0] > 0 and self.rank == 0:
            tracker_obj_scores_global = tracker_update_plan["tracker_obj_scores_host"]  # (read with the plan)
            tracker_obj_ids = tracker_metadata_prev["obj_ids_all_gpu"]
            tracker_metadata_new["obj_id_to_tracker_score_frame_wise"][frame_idx].update(
                dict(zip(tracker_obj_ids, tracker_obj_scores_global))
            )
        return (obj_id_to_mask, obj_id_to_score, tracker_states_local_new, tracker_metadata_new, frame_stats,
                tracker_obj_scores_global)

    def _suppress_detections_close_to_boundary(self, boxes: Tensor, margin: float = 0.025) -> Tensor:
        x_min, y_min, x_max, y_max = boxes.unbind(-1)
        x_c = (x_min + x_max) / 2
        y_c = (y_min + y_max) / 2
        return (x_c > margin) & (x_c < 1.0 - margin) & (y_c > margin) & (y_c < 1.0 - margin)

    def _text_features(self, input_batch: VideoInputBatch, feature_cache: Dict):
        key = tuple(input_batch.find_text_batch)
        if "text" not in feature_cache or key not in feature_cache["text"]:
            feats = self.detector.encode_text_batch(list(input_batch.find_text_batch))
            # only the most recent prompt's features are cached
            feature_cache["text"] = {key: feats}
        return feature_cache["text"][key]

    def run_backbone_and_detection(
        self,
        frame_idx: int,
        num_frames: int,
        input_batch: VideoInputBatch,
        geometric_prompt: Any,
        feature_cache: Dict,
        reverse: bool,
        allow_new_detections: bool,
    ) -> Dict[str, Tensor]:
        text_feats, text_mask = self._text_features(input_batch, feature_cache)
        tid = input_batch.text_ids[frame_idx]
        # (read before the detector reads the next frame: a frame store then sees the frames asked
        # for in the direction of travel, and prefetches the right one)
        image = input_batch.img_batch[frame_idx]
        if self.ahead_detection_stream and image.is_cuda:
            # (a frame store may have made it on the detector's side stream: this stream holds it now)
            image.record_stream(torch.cuda.current_stream(image.device))
        if "multigpu_buffer" not in feature_cache:
            feature_cache["multigpu_buffer"] = {}
        out = self.detector.forward_video_grounding_multigpu(
            images=input_batch.img_batch,
            text_feats=text_feats[tid : tid + 1],
            text_mask=text_mask[tid : tid + 1],
            geometric_prompt=geometric_prompt,
            frame_idx=frame_idx,
            num_frames=num_frames,
            multigpu_buffer=feature_cache["multigpu_buffer"],
            track_in_reverse=reverse,
            run_nms=self.det_nms_thresh > 0.0,
            nms_prob_thresh=self.score_threshold_detection,
            nms_iou_thresh=self.det_nms_thresh,
            defer_next=self.overlap_next_detection,
            ahead_stream=self.ahead_detection_stream,
            **({"fpn_convs": (self.tracker.sam_mask_decoder.conv_s0, self.tracker.sam_mask_decoder.conv_s1)}
               if self.world_size > 1 else {}),
        )
        pred_probs = out["pred_logits"].squeeze(-1).sigmoid()
        if not allow_new_detections:
            pred_probs = pred_probs - 1e8
        # All Q query slots stay, with a validity mask (the official selects the detections above
        # the threshold here, a host sync and a data-dependent shape); detection indices below
        # are slot indices, in the same ascending order as the official's.
        det_out = {
            "bbox": out["pred_boxes_xyxy"][0],
            "mask": out["pred_masks"][0],
            "scores": pred_probs[0],
            "valid": pred_probs[0] > self.score_threshold_detection,
        }
        dec = self.tracker.sam_mask_decoder
        if out.get("tracker_fpn_projected", False):  # projected before the all-gather
            fpn = [out["tracker_backbone_fpn_0"], out["tracker_backbone_fpn_1"], out["tracker_backbone_fpn_2"]]
        else:
            fpn = [dec.conv_s0(out["tracker_backbone_fpn_0"]), dec.conv_s1(out["tracker_backbone_fpn_1"]),
                   out["tracker_backbone_fpn_2"]]
        tracker_backbone_out = {
            "vision_features": fpn[-1],
            "vision_pos_enc": out["tracker_backbone_pos_enc"],
            "backbone_fpn": fpn,
        }
        feature_cache[frame_idx] = (image, {"tracker_backbone_out": tracker_backbone_out})
        feature_cache.pop(frame_idx - 1 if not reverse else frame_idx + 1, None)
        return det_out

    def run_tracker_propagation(self, frame_idx: int, num_frames: int, reverse: bool,
                                tracker_states_local: List[Any], tracker_metadata_prev: Dict[str, Any]):
        obj_ids_local, low_res_masks_local, obj_scores_local = self._propogate_tracker_one_frame_local_gpu(
            tracker_states_local, frame_idx=frame_idx, reverse=reverse
        )
        expected = tracker_metadata_prev["obj_ids_per_gpu"][self.rank]
        if not np.array_equal(np.asarray(obj_ids_local, dtype=np.int64), np.asarray(expected, dtype=np.int64)):
            raise RuntimeError(f"internal error: tracker states hold objects {obj_ids_local}, metadata says {expected}")
        if self.world_size > 1:
            return self._gather_tracker_outputs(low_res_masks_local, obj_scores_local,
                                                tracker_metadata_prev["num_obj_per_gpu"])
        return low_res_masks_local, obj_scores_local

    def _gather_tracker_outputs(self, masks_local: Tensor, scores_local: Tensor, counts):
        """All-gather every rank's (n_r, h, w) masks and (n_r,) object-score logits in float32 (as
        the official), one collective: rows of h*w + 1 values padded to max n_r. -> (N, h, w), (N,)
        in rank order (= ``obj_ids_all_gpu``)."""
        n, h, w = masks_local.shape
        rows = torch.cat([masks_local.reshape(n, h * w).float(), scores_local.reshape(n, 1).float()], dim=1)
        allrows = self.dist.all_gather_rows(rows.to(self.device), counts, "tracker masks and scores")
        return allrows[:, :h * w].reshape(-1, h, w), allrows[:, h * w]

    def _recondition_masklets(self, frame_idx, det_out, trk_id_to_max_iou_high_conf_det, tracker_states_local,
                              tracker_metadata, tracker_obj_scores_global, scores_dtype=None):
        """The official periodic re-conditioning. ``tracker_obj_scores_global``: the (N,) object-score
        logits, a tensor (the official; one host sync per compared object) or the host floats read
        with the plan (sam3fast; compared in ``scores_dtype``, the tensor's, as the official's
        ``tensor > 0.8`` does)."""
        HIGH_CONF_THRESH = 0.8
        if not isinstance(tracker_obj_scores_global, Tensor):
            # 0.8 rounded to the logits' dtype, on the host (the official compares in that dtype)
            thresh = float(torch.tensor(HIGH_CONF_THRESH, dtype=scores_dtype or torch.float32))
        for trk_obj_id, det_idx in trk_id_to_max_iou_high_conf_det.items():
            new_mask = det_out["mask"][det_idx : det_idx + 1]
            input_mask_res = self.tracker.input_mask_size
            new_mask_binary = F.interpolate(
                new_mask.unsqueeze(1), size=(input_mask_res, input_mask_res), mode="bilinear", align_corners=False,
            ).squeeze(1)[0] > 0
            reconditioned_states_idx = set()
            obj_idx = np.where(tracker_metadata["obj_ids_all_gpu"] == trk_obj_id)[0].item()
            obj_score = tracker_obj_scores_global[obj_idx]
            # the official compares the object-score *logit* with 0.8 (a host sync on a tensor)
            high = obj_score > HIGH_CONF_THRESH if isinstance(obj_score, Tensor) else obj_score > thresh
            for state_idx, inference_state in enumerate(tracker_states_local):
                if trk_obj_id in inference_state["obj_ids"] and high:
                    self.tracker.add_new_mask(inference_state=inference_state, frame_idx=frame_idx,
                                              obj_id=trk_obj_id, mask=new_mask_binary)
                    reconditioned_states_idx.add(state_idx)
            for idx in reconditioned_states_idx:
                self.tracker.propagate_in_video_preflight(tracker_states_local[idx], run_mem_encoder=True)
        return tracker_states_local

    def run_tracker_update_planning_phase(
        self,
        frame_idx: int,
        num_frames: int,
        reverse: bool,
        det_out: Dict[str, Tensor],
        tracker_low_res_masks_global: Tensor,
        tracker_obj_scores_global: Tensor,
        tracker_metadata_prev: Dict[str, Any],
        tracker_states_local: List[Any],
        is_image_only: bool = False,
    ):
        # Per-frame scores: only this frame's inner dict is written, so the others are shared
        # with the previous metadata instead of deep-copied (the official copies all T frames).
        frame_wise = copy.copy(tracker_metadata_prev["obj_id_to_tracker_score_frame_wise"])
        frame_wise[frame_idx] = dict(frame_wise.get(frame_idx, {}))
        tracker_metadata_new = {
            "obj_ids_per_gpu": [a.copy() for a in tracker_metadata_prev["obj_ids_per_gpu"]],
            "obj_ids_all_gpu": None,
            "num_obj_per_gpu": tracker_metadata_prev["num_obj_per_gpu"].copy(),
            "obj_id_to_score": dict(tracker_metadata_prev["obj_id_to_score"]),
            "obj_id_to_tracker_score_frame_wise": frame_wise,
            "obj_id_to_last_occluded": {},
            "max_obj_id": tracker_metadata_prev["max_obj_id"],
        }
        reconditioned_obj_ids = set()

        det_bbox_xyxy: Tensor = det_out["bbox"]
        if self.rank != 0:
            # the plan comes from rank 0; the hotstart bookkeeping lives there only
            tracker_update_plan, recondition = self._broadcast_plan(frame_idx, None, False, det_out,
                                                                    tracker_metadata_prev)
            tracker_metadata_new["rank0_metadata"] = tracker_metadata_prev["rank0_metadata"]
            return self._planning_tail(frame_idx, reverse, det_out, tracker_low_res_masks_global,
                                       tracker_obj_scores_global, tracker_metadata_prev, tracker_metadata_new,
                                       tracker_states_local, tracker_update_plan, recondition, None)
        # association (and, with a device plan, the decisions) on the device; the host reads the
        # frame's decisions, the detection scores and the tracker scores with one copy
        rank0_prev = tracker_metadata_prev["rank0_metadata"]
        planner = None
        if "plan_state" in rank0_prev:
            planner = functools.partial(
                self._plan_on_device, rank0_prev["plan_state"], det_out, frame_idx=frame_idx, reverse=reverse,
                is_image_only=is_image_only)
        # extra: the tracker scores (as the outputs show them) and logits (the re-condition gate)
        M = tracker_obj_scores_global.shape[0]
        association, det_scores_np, tracker_scores_host, planned = self._associate(
            det_out["mask"], det_out["scores"], det_out["valid"], tracker_low_res_masks_global,
            tracker_metadata_prev["obj_ids_all_gpu"], plan=planner,
            extra=torch.cat([tracker_obj_scores_global.sigmoid().double(), tracker_obj_scores_global.double()]),
        )
        tracker_scores_host, tracker_logits_host = tracker_scores_host[:M], tracker_scores_host[M:]
        (new_det_fa_inds, unmatched_trk_obj_ids, det_to_matched_trk_obj_ids, trk_id_to_max_iou_high_conf_det,
         empty_trk_obj_ids) = association
        prev_obj_num = np.sum(tracker_metadata_prev["num_obj_per_gpu"])
        if planned is not None:  # boundary rule and object limit decided on the device
            new_det_fa_inds = planned[0]["new_det_fa_inds"]
            num_obj_dropped_due_to_limit = planned[0]["num_obj_dropped_due_to_limit"]
            if num_obj_dropped_due_to_limit > 0:
                new_det_num = planned[0]["num_new_before_limit"]
                logger.warning(f"hitting {self.max_num_objects=} with {new_det_num=} and {prev_obj_num=}")
            new_det_num = len(new_det_fa_inds)
        else:
            if self.suppress_det_close_to_boundary:
                keep = self._suppress_detections_close_to_boundary(det_bbox_xyxy[torch.from_numpy(new_det_fa_inds)])
                new_det_fa_inds = new_det_fa_inds[keep.cpu().numpy()]
            new_det_num = len(new_det_fa_inds)
            num_obj_dropped_due_to_limit = 0
            if not is_image_only and prev_obj_num + new_det_num > self.max_num_objects:
                logger.warning(f"hitting {self.max_num_objects=} with {new_det_num=} and {prev_obj_num=}")
                new_det_num_to_keep = self.max_num_objects - prev_obj_num
                num_obj_dropped_due_to_limit = new_det_num - new_det_num_to_keep
                new_det_fa_inds = self._drop_new_det_with_obj_limit(new_det_fa_inds, det_scores_np,
                                                                    new_det_num_to_keep)
                new_det_num = len(new_det_fa_inds)

        new_det_start_obj_id = tracker_metadata_prev["max_obj_id"] + 1
        new_det_obj_ids = new_det_start_obj_id + np.arange(new_det_num)
        new_det_gpu_ids = self._assign_new_det_to_gpus(new_det_num, tracker_metadata_prev["num_obj_per_gpu"])

        if planned is not None:
            obj_ids_newly_removed, rank0_metadata_new = self._apply_device_plan(
                frame_idx, planned, rank0_prev, tracker_metadata_prev["obj_ids_all_gpu"], new_det_num)
        else:
            rank0_metadata_new = copy.deepcopy(rank0_prev)
            obj_ids_newly_removed, rank0_metadata_new = self._process_hotstart(
                frame_idx=frame_idx, num_frames=num_frames, reverse=reverse,
                det_to_matched_trk_obj_ids=det_to_matched_trk_obj_ids, new_det_obj_ids=new_det_obj_ids,
                empty_trk_obj_ids=empty_trk_obj_ids, unmatched_trk_obj_ids=unmatched_trk_obj_ids,
                rank0_metadata=rank0_metadata_new, tracker_metadata=tracker_metadata_prev,
            )
        tracker_metadata_new["rank0_metadata"] = rank0_metadata_new

        tracker_update_plan = {
            "new_det_fa_inds": new_det_fa_inds,
            "new_det_obj_ids": new_det_obj_ids,
            "new_det_gpu_ids": new_det_gpu_ids,
            "unmatched_trk_obj_ids": unmatched_trk_obj_ids,
            "det_to_matched_trk_obj_ids": det_to_matched_trk_obj_ids,
            "obj_ids_newly_removed": obj_ids_newly_removed,
            "num_obj_dropped_due_to_limit": num_obj_dropped_due_to_limit,
            "trk_id_to_max_iou_high_conf_det": trk_id_to_max_iou_high_conf_det,
            "reconditioned_obj_ids": reconditioned_obj_ids,
            "tracker_obj_scores_host": tracker_scores_host,
            "tracker_obj_logits_host": tracker_logits_host,
        }

        should_recondition_iou = False
        if self.reconstruction_bbox_iou_thresh > 0 and len(trk_id_to_max_iou_high_conf_det) > 0:
            should_recondition_iou = self._bbox_mismatch_recondition(
                det_out, trk_id_to_max_iou_high_conf_det, tracker_metadata_prev, tracker_low_res_masks_global,
                reconditioned_obj_ids,
            )
        should_recondition_periodic = (
            self.recondition_every_nth_frame > 0
            and frame_idx % self.recondition_every_nth_frame == 0
            and len(trk_id_to_max_iou_high_conf_det) > 0
        )
        recondition = should_recondition_periodic or should_recondition_iou
        if self.world_size > 1:
            self._broadcast_plan(frame_idx, tracker_update_plan, recondition, det_out, tracker_metadata_prev)
        return self._planning_tail(frame_idx, reverse, det_out, tracker_low_res_masks_global,
                                   tracker_obj_scores_global, tracker_metadata_prev, tracker_metadata_new,
                                   tracker_states_local, tracker_update_plan, recondition, det_scores_np)

    def _plan_on_device(self, state, det_out, assoc, *, frame_idx, reverse, is_image_only):
        """:func:`~sam3fast.video.device_plan.plan_frame` of this frame (queued before the planning
        read, which brings its flat plan with the association)."""
        return plan_frame(state, assoc, det_out["scores"].float(), det_out["bbox"], frame_idx=frame_idx,
                          reverse=reverse, settings=PlanSettings.from_model(self), is_image_only=is_image_only)

    def _apply_device_plan(self, frame_idx, planned, rank0_prev, prev_ids, num_new):
        """The host side of a device plan (:mod:`sam3fast.video.device_plan`): the frame's newly
        removed ids, the new rank-0 metadata (new ``removed_obj_ids`` and suppressed sets, so held
        outputs keep their frame's view, as the official's per-frame deep copy gives them) and the
        plan state in the next frame's track layout (kept rows in order, then the new tracks)."""
        d, updated = planned
        newly_removed = {int(i) for i in prev_ids[d["removed"]]}
        rank0 = dict(rank0_prev)
        rank0["removed_obj_ids"] = rank0_prev["removed_obj_ids"] | newly_removed
        suppressed = defaultdict(set, rank0_prev["suppressed_obj_ids"])
        suppressed[frame_idx] = set(suppressed.get(frame_idx, ())) | {int(i) for i in prev_ids[d["suppressed"]]}
        rank0["suppressed_obj_ids"] = suppressed
        rows = to_device_async(layout_rows(d["removed"], num_new), torch.long, self.device)
        rank0["plan_state"] = next_state(updated, rows, new_first_frame=frame_idx,
                                         new_keep_alive=self.init_trk_keep_alive)
        return newly_removed, rank0

    def _broadcast_plan(self, frame_idx, plan, recondition, det_out, tracker_metadata_prev):
        """Rank 0's plan to every rank as one int64 device tensor
        (:func:`~sam3fast.video.distributed.encode_plan`); ranks > 0 get ``(plan, recondition)``
        with the fields they execute (rank 0's own plan stays as it is)."""
        from .distributed import decode_plan, encode_plan, plan_size

        Q = det_out["mask"].shape[0]
        M = len(tracker_metadata_prev["obj_ids_all_gpu"])
        counts = tracker_metadata_prev["num_obj_per_gpu"]
        if self.rank == 0:
            buf = encode_plan(frame_idx, plan, counts, Q, M, recondition, self.device)
            self.dist.broadcast(buf, 0, "update plan")
            return plan, recondition
        buf = torch.empty(plan_size(self.world_size, Q, M), dtype=torch.int64, device=self.device)
        self.dist.broadcast(buf, 0, "update plan")
        d = decode_plan(buf.cpu().numpy(), self.world_size, Q)  # host read (the plan drives this rank)
        if d["frame_idx"] != frame_idx or d["num_tracks"] != M or not np.array_equal(d["num_obj_per_gpu"], counts):
            raise RuntimeError(
                f"rank {self.rank} is out of step with rank 0: plan for frame {d['frame_idx']} with objects per "
                f"rank {d['num_obj_per_gpu'].tolist()}, here frame {frame_idx} with {np.asarray(counts).tolist()}")
        plan = {k: d[k] for k in ("new_det_fa_inds", "new_det_obj_ids", "new_det_gpu_ids", "obj_ids_newly_removed",
                                  "num_obj_dropped_due_to_limit", "trk_id_to_max_iou_high_conf_det")}
        plan.update(unmatched_trk_obj_ids=np.array([], np.int64), det_to_matched_trk_obj_ids={},
                    reconditioned_obj_ids=set(), tracker_obj_scores_host=None, tracker_obj_logits_host=None)
        return plan, d["recondition"]

    def _planning_tail(self, frame_idx, reverse, det_out, tracker_low_res_masks_global, tracker_obj_scores_global,
                       tracker_metadata_prev, tracker_metadata_new, tracker_states_local, tracker_update_plan,
                       recondition, det_scores_np):
        """The plan's effects every rank applies: re-conditioning, occlusion suppression, memory
        encoding of its own objects, the new object layout. ``det_scores_np``: None off rank 0
        (scores only feed rank 0's outputs)."""
        new_det_fa_inds = tracker_update_plan["new_det_fa_inds"]
        new_det_obj_ids = tracker_update_plan["new_det_obj_ids"]
        new_det_gpu_ids = tracker_update_plan["new_det_gpu_ids"]
        obj_ids_newly_removed = tracker_update_plan["obj_ids_newly_removed"]
        det_to_matched_trk_obj_ids = tracker_update_plan["det_to_matched_trk_obj_ids"]
        if recondition:
            logits = tracker_update_plan.get("tracker_obj_logits_host")
            self._recondition_masklets(frame_idx, det_out, tracker_update_plan["trk_id_to_max_iou_high_conf_det"],
                                       tracker_states_local, tracker_metadata_prev,
                                       tracker_obj_scores_global if logits is None else logits,
                                       tracker_obj_scores_global.dtype)

        batch_size = tracker_low_res_masks_global.size(0)
        if batch_size > 0:
            if self.suppress_overlapping_based_on_recent_occlusion_threshold > 0.0:
                tracker_low_res_masks_global = self._suppress_overlapping_based_on_recent_occlusion(
                    frame_idx, tracker_low_res_masks_global, tracker_metadata_prev, tracker_metadata_new,
                    obj_ids_newly_removed, reverse,
                )
            self._tracker_update_memories(tracker_states_local, frame_idx, tracker_metadata=tracker_metadata_prev,
                                          low_res_masks=tracker_low_res_masks_global)

        for rank in range(self.world_size):
            new_ids_here = new_det_obj_ids[new_det_gpu_ids == rank]
            updated = tracker_metadata_new["obj_ids_per_gpu"][rank]
            if len(new_ids_here) > 0:
                updated = np.concatenate([updated, new_ids_here])
            if len(obj_ids_newly_removed) > 0:
                updated = updated[~np.isin(updated, list(obj_ids_newly_removed))]
            tracker_metadata_new["obj_ids_per_gpu"][rank] = updated
            tracker_metadata_new["num_obj_per_gpu"][rank] = len(updated)
        tracker_metadata_new["obj_ids_all_gpu"] = np.concatenate(tracker_metadata_new["obj_ids_per_gpu"])
        if len(new_det_obj_ids) > 0 and det_scores_np is not None:
            tracker_metadata_new["obj_id_to_score"].update(zip(new_det_obj_ids, det_scores_np[new_det_fa_inds]))
            tracker_metadata_new["obj_id_to_tracker_score_frame_wise"][frame_idx].update(
                zip(new_det_obj_ids, det_scores_np[new_det_fa_inds])
            )
        if len(new_det_obj_ids) > 0:
            tracker_metadata_new["max_obj_id"] = max(tracker_metadata_new["max_obj_id"], np.max(new_det_obj_ids))
        for obj_id in obj_ids_newly_removed:
            tracker_metadata_new["obj_id_to_score"][obj_id] = -1e4
            tracker_metadata_new["obj_id_to_tracker_score_frame_wise"][frame_idx][obj_id] = -1e4
            tracker_metadata_new["obj_id_to_last_occluded"].pop(obj_id, None)
        if self.masklet_confirmation_enable and self.rank == 0:
            tracker_metadata_new["rank0_metadata"] = self.update_masklet_confirmation_status(
                rank0_metadata=tracker_metadata_new["rank0_metadata"],
                obj_ids_all_gpu_prev=tracker_metadata_prev["obj_ids_all_gpu"],
                obj_ids_all_gpu_updated=tracker_metadata_new["obj_ids_all_gpu"],
                det_to_matched_trk_obj_ids=det_to_matched_trk_obj_ids,
                new_det_obj_ids=new_det_obj_ids,
            )
        return tracker_update_plan, tracker_metadata_new

    def _bbox_mismatch_recondition(self, det_out, trk_id_to_max_iou_high_conf_det, tracker_metadata_prev,
                                   tracker_low_res_masks_global, reconditioned_obj_ids) -> bool:
        """Official bbox-IoU re-conditioning trigger (off in the released configs)."""
        should = False
        ids = list(tracker_metadata_prev["obj_ids_all_gpu"])
        for trk_obj_id, det_idx in trk_id_to_max_iou_high_conf_det.items():
            det_box = det_out["bbox"][det_idx]
            det_score = det_out["scores"][det_idx]
            if trk_obj_id not in ids:
                continue
            tracker_mask = tracker_low_res_masks_global[ids.index(trk_obj_id)]
            mask_binary = tracker_mask > 0
            if mask_binary.sum().item() == 0:
                continue
            box = masks_to_boxes(mask_binary[None])[0]  # inclusive pixel corners, as ``mask_to_box``
            h, w = tracker_mask.shape[-2:]
            box = box / torch.tensor([w, h, w, h], dtype=box.dtype, device=box.device)
            lt = torch.maximum(det_box[:2], box[:2])
            rb = torch.minimum(det_box[2:], box[2:])
            wh = (rb - lt).clamp(min=0)
            inter = wh[0] * wh[1]
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            iou = inter / (area(det_box) + area(box) - inter)
            if iou < self.reconstruction_bbox_iou_thresh and det_score >= self.reconstruction_bbox_det_score:
                should = True
                reconditioned_obj_ids.add(trk_obj_id)
        return should

    def _suppress_overlapping_based_on_recent_occlusion(self, frame_idx: int, tracker_low_res_masks_global: Tensor,
                                                        tracker_metadata_prev, tracker_metadata_new,
                                                        obj_ids_newly_removed: Set[int], reverse: bool = False):
        obj_ids_global = tracker_metadata_prev["obj_ids_all_gpu"]
        binary = tracker_low_res_masks_global > 0
        batch_size = tracker_low_res_masks_global.size(0)
        if batch_size > 0:
            NEVER_OCCLUDED = -1
            ALWAYS_OCCLUDED = 100000  # objects removed by hotstart
            dev = binary.device
            last_occluded_prev = torch.cat([
                tracker_metadata_prev["obj_id_to_last_occluded"].get(
                    obj_id,
                    torch.full((1,), NEVER_OCCLUDED if obj_id not in obj_ids_newly_removed else ALWAYS_OCCLUDED,
                               device=dev, dtype=torch.long),
                )
                for obj_id in obj_ids_global
            ], dim=0)
            to_suppress = self._get_objects_to_suppress_based_on_most_recently_occluded(
                binary, last_occluded_prev, obj_ids_global, frame_idx, reverse
            )
            is_obj_occluded = ~(binary.any(dim=(-1, -2)))
            last_occluded_new = torch.where(is_obj_occluded | to_suppress,
                                            torch.full_like(last_occluded_prev, frame_idx), last_occluded_prev)
            tracker_metadata_new["obj_id_to_last_occluded"] = {
                obj_id: last_occluded_new[i : i + 1] for i, obj_id in enumerate(obj_ids_global)
            }
            # in place, as the official: the frame's outputs show the suppression too
            tracker_low_res_masks_global.masked_fill_(to_suppress[:, None, None], -10.0)
        return tracker_low_res_masks_global

    def _get_objects_to_suppress_based_on_most_recently_occluded(self, binary_low_res_masks: Tensor,
                                                                  last_occluded: Tensor, obj_ids, frame_idx=None,
                                                                  reverse: bool = False) -> Tensor:
        to_suppress = torch.zeros(binary_low_res_masks.size(0), device=binary_low_res_masks.device, dtype=torch.bool)
        if len(obj_ids) <= 1:
            return to_suppress
        iou = mask_iou_matrix(binary_low_res_masks, binary_low_res_masks)
        overlapping_pairs = torch.triu(iou >= self.suppress_overlapping_based_on_recent_occlusion_threshold, diagonal=1)
        li = last_occluded.unsqueeze(1)
        lj = last_occluded.unsqueeze(0)
        cmp_op = torch.gt if not reverse else torch.lt
        suppress_i = overlapping_pairs & cmp_op(li, lj) & (lj > -1)
        suppress_j = overlapping_pairs & cmp_op(lj, li) & (li > -1)
        return suppress_i.any(dim=1) | suppress_j.any(dim=0)

    def run_tracker_update_execution_phase(self, frame_idx: int, num_frames: int, reverse: bool,
                                           det_out: Dict[str, Tensor], tracker_states_local: List[Any],
                                           tracker_update_plan: Dict[str, Any], orig_vid_height: int,
                                           orig_vid_width: int, feature_cache: Dict):
        new_det_fa_inds = tracker_update_plan["new_det_fa_inds"]
        new_det_obj_ids = tracker_update_plan["new_det_obj_ids"]
        on_this = tracker_update_plan["new_det_gpu_ids"] == self.rank
        new_det_obj_ids_local = new_det_obj_ids[on_this]
        new_det_fa_inds_local = new_det_fa_inds[on_this]
        obj_ids_newly_removed = tracker_update_plan["obj_ids_newly_removed"]
        if len(new_det_fa_inds_local) > 0:
            new_masks = self._new_det_masks(det_out, tracker_update_plan)
            if not on_this.all():  # (several ranks: this rank's share)
                new_masks = new_masks[to_device_async(np.flatnonzero(on_this), torch.long, new_masks.device)]
            tracker_states_local = self._tracker_add_new_objects(
                frame_idx=frame_idx, num_frames=num_frames, new_obj_ids=new_det_obj_ids_local,
                new_obj_masks=new_masks, tracker_states_local=tracker_states_local,
                orig_vid_height=orig_vid_height, orig_vid_width=orig_vid_width, feature_cache=feature_cache,
            )
        if len(obj_ids_newly_removed) > 0:
            self._tracker_remove_objects(tracker_states_local, obj_ids_newly_removed)
        return tracker_states_local

    @staticmethod
    def _new_det_masks(det_out: Dict[str, Tensor], tracker_update_plan: Dict[str, Any]) -> Tensor:
        """The frame's new detections' low-res mask logits (K, h, w), gathered once (the execution
        phase and :meth:`build_outputs` both read them; nothing writes into them)."""
        masks = tracker_update_plan.get("new_det_masks")
        if masks is None:
            idx = to_device_async(tracker_update_plan["new_det_fa_inds"], torch.long, det_out["mask"].device)
            masks = tracker_update_plan["new_det_masks"] = det_out["mask"][idx]
        return masks

    def build_outputs(self, frame_idx: int, num_frames: int, reverse: bool, det_out: Dict[str, Tensor],
                      tracker_low_res_masks_global: Tensor, tracker_obj_scores_global: Tensor,
                      tracker_metadata_prev: Dict[str, Any], tracker_update_plan: Dict[str, Any],
                      orig_vid_height: int, orig_vid_width: int, reconditioned_obj_ids: Optional[set] = None,
                      det_to_matched_trk_obj_ids: Optional[dict] = None) -> Dict[int, Tensor]:
        """The frame's masks, ``obj_id -> (1, H, W) bool`` as the official's: the tracked objects'
        low-res masks, the new detections' (hole-filled) and the re-conditioning detections',
        resized to the video and thresholded. sam3fast: a :class:`FrameMasks` that holds the
        (N, h, w) logits and makes a mask only when one is read (the output path post-processes
        the logits in one fused pass); ``{}`` without objects."""
        new_det_fa_inds = tracker_update_plan["new_det_fa_inds"]
        new_det_obj_ids = tracker_update_plan["new_det_obj_ids"]
        parts, ids = [], []
        existing_ids = tracker_metadata_prev["obj_ids_all_gpu"]
        if len(existing_ids) > 0:
            parts.append(tracker_low_res_masks_global)
            ids += [int(i) for i in existing_ids]
        if len(new_det_fa_inds) > 0:
            new_low = fill_holes_in_mask_scores(self._new_det_masks(det_out, tracker_update_plan).unsqueeze(1),
                                                max_area=self.fill_hole_area,
                                                fill_holes=True, remove_sprinkles=True)
            parts.append(new_low.squeeze(1))
            ids += [int(i) for i in new_det_obj_ids]
        recondition = {}
        if reconditioned_obj_ids:
            trk_id_to_det = tracker_update_plan.get("trk_id_to_max_iou_high_conf_det", {})
            recondition = {int(i): trk_id_to_det[i] for i in reconditioned_obj_ids if trk_id_to_det.get(i) is not None}
        for obj_id in recondition:
            if obj_id not in ids:  # (a re-conditioned id is a tracked one; the official would add it)
                parts.append(det_out["mask"][:1])
                ids.append(obj_id)
        if not ids:
            return {}
        dtypes = [p.dtype for p in parts] + ([det_out["mask"].dtype] if recondition else [])
        dtype = functools.reduce(torch.promote_types, dtypes)
        low = torch.cat([p.to(dtype) for p in parts])  # a new tensor: later frames write nothing here
        for obj_id, det_idx in recondition.items():
            low[ids.index(obj_id)] = det_out["mask"][det_idx]
        return FrameMasks(low, ids, (orig_vid_height, orig_vid_width))

    def _propogate_tracker_one_frame_local_gpu(self, inference_states: List[Any], frame_idx: int, reverse: bool,
                                               run_mem_encoder: bool = False):
        obj_ids_local, low_res_masks_list, obj_scores_list = [], [], []
        # every session one frame, those on a memory bank as one batch (the official: one
        # propagate_in_video call per session)
        step = getattr(self.tracker, "propagate_states_one_frame", None) or functools.partial(
            _propagate_states_one_by_one, tracker=self.tracker)
        for res in step(inference_states, frame_idx, reverse, run_mem_encoder=run_mem_encoder):
            if res is None:
                continue
            out_obj_ids, out_low_res_masks, out_obj_scores = res
            obj_ids_local.extend(out_obj_ids)
            low_res_masks_list.append(out_low_res_masks.squeeze(1))
            obj_scores_list.append(out_obj_scores.squeeze(1))
        H = W = self.tracker.low_res_mask_size
        if low_res_masks_list:
            low_res_masks_local = torch.cat(low_res_masks_list, dim=0)
            obj_scores_local = torch.cat(obj_scores_list, dim=0)
            low_res_masks_local = fill_holes_in_mask_scores(
                low_res_masks_local.unsqueeze(1), max_area=self.fill_hole_area, fill_holes=True, remove_sprinkles=True,
            ).squeeze(1)
        else:
            low_res_masks_local = torch.zeros(0, H, W, device=self.device)
            obj_scores_local = torch.zeros(0, device=self.device)
        return obj_ids_local, low_res_masks_local, obj_scores_local

    def _associate_det_trk(self, det_masks: Tensor, det_scores_np: np.ndarray, trk_masks: Tensor,
                           trk_obj_ids: np.ndarray):
        """The official signature: match detections (N, H, W) logits with tracks (M, H, W) logits.
        Returns (new detection indices, unmatched non-empty track ids, det index -> matched track
        ids, track id -> high-confidence detection index, empty track ids), as the official."""
        dev = det_masks.device
        scores = torch.as_tensor(det_scores_np, device=dev, dtype=torch.float32)
        return self._associate(det_masks, scores, torch.ones(len(scores), dtype=torch.bool, device=dev), trk_masks,
                               trk_obj_ids)[0]

    def _associate(self, det_masks: Tensor, det_scores: Tensor, det_valid: Tensor, trk_masks: Tensor,
                   trk_obj_ids: np.ndarray, extra: Optional[Tensor] = None, plan=None):
        """:meth:`_associate_det_trk` on Q padded detection slots (``det_valid``; indices are slot
        indices). Matching runs on the device on fixed-shape tensors
        (:func:`~sam3fast.video.association.associate_detections`); the host reads the answer, the
        detection scores, ``extra`` (any 1-d float tensor) and the device plan with one copy.
        ``plan``: None, or ``AssociationResult -> (FramePlan, PlanState)`` (the
        :func:`~sam3fast.video.device_plan.plan_frame` of the frame), queued before the copy.
        Returns ``(official 5-tuple, det_scores (Q,) float32 numpy, extra as a list of floats or
        None, (decoded plan, updated PlanState) or None)``."""
        Q, M = det_masks.size(0), trk_masks.size(0)
        dev = det_masks.device
        res = associate_detections(
            det_masks, det_scores.float(), det_valid, trk_masks.to(dev), torch.ones(M, dtype=torch.bool, device=dev),
            assoc_iou_thresh=self.assoc_iou_thresh, trk_assoc_iou_thresh=self.trk_assoc_iou_thresh,
            new_det_thresh=self.new_det_thresh, o2o=self.o2o_matching_masklets_enable,
        )
        planned = None if plan is None else plan(res)
        parts = [det_valid, det_scores.float(), res.new_det, res.det_high_conf, res.det_best_trk, res.unmatched_trk,
                 res.empty_trk, res.det_matches.flatten()]
        n_extra = 0
        if extra is not None:
            parts.append(extra.reshape(-1))
            n_extra = parts[-1].numel()
        if planned is not None:
            parts.append(planned[0].flat)  # small integers: exact in float64
        packed = self._read_for_planning(torch.cat([x.double() for x in parts]))
        valid, scores, new_det, high, best = packed[:5 * Q].reshape(5, Q)
        unmatched, empty = packed[5 * Q:5 * Q + 2 * M].reshape(2, M).astype(bool)
        matches = packed[5 * Q + 2 * M:5 * Q + 2 * M + Q * M].reshape(Q, M).astype(bool)
        o = 5 * Q + 2 * M + Q * M
        extra_host = packed[o:o + n_extra].tolist() if extra is not None else None
        plan_host = None if planned is None else (decode_plan(packed[o + n_extra:], Q, M), planned[1])
        det_scores_np = scores.astype(np.float32)
        new_det_fa_inds = np.nonzero(new_det)[0]
        if M == 0:
            out = (new_det_fa_inds, np.array([], np.int64), {}, {}, np.array([], np.int64))
            return out, det_scores_np, extra_host, plan_host
        det_to_matched_trk_obj_ids = {int(d): trk_obj_ids[matches[d]] for d in np.nonzero(valid)[0]}
        trk_id_to_max_iou_high_conf_det = {}  # filled in detection order (the last one wins), as the official
        for d in np.nonzero(high)[0]:
            trk_id_to_max_iou_high_conf_det[trk_obj_ids[int(best[d])].item()] = int(d)
        out = (new_det_fa_inds, trk_obj_ids[unmatched], det_to_matched_trk_obj_ids, trk_id_to_max_iou_high_conf_det,
               trk_obj_ids[empty])
        return out, det_scores_np, extra_host, plan_host

    def _read_for_planning(self, flat: Tensor) -> np.ndarray:
        """The frame's one host read, on ``host_channel``: the planning values and every output
        queued since the last read (a held frame's, with ``pipelined_outputs``) in one copy. On
        CUDA: one asynchronous copy into pinned memory and an event, then the next frame's
        detection (queued with ``defer_next``) is launched behind it, then the host waits for the
        event only: the GPU runs that detection while the host plans."""
        return self.host_channel.read(flat, before_wait=self.detector.run_deferred,
                                      wait_range="video_planning_read")

    def _assign_new_det_to_gpus(self, new_det_num, prev_workload_per_gpu):
        workload = np.asarray(prev_workload_per_gpu).copy()
        ids = np.zeros(new_det_num, np.int64)
        for i in range(new_det_num):
            g = np.argmin(workload)
            ids[i] = g
            workload[g] += 1
        return ids

    def _process_hotstart(self, frame_idx: int, num_frames: int, reverse: bool,
                          det_to_matched_trk_obj_ids: Dict[int, np.ndarray], new_det_obj_ids: np.ndarray,
                          empty_trk_obj_ids: np.ndarray, unmatched_trk_obj_ids: np.ndarray,
                          rank0_metadata: Dict[str, Any], tracker_metadata: Dict[str, Any]):
        """Remove tracks unmatched (or duplicating an earlier track) for too many frames within
        their hotstart period; keep-alive counters for the optional suppression."""
        obj_first_frame_idx = rank0_metadata["obj_first_frame_idx"]
        unmatched_frame_inds = rank0_metadata["unmatched_frame_inds"]
        trk_keep_alive = rank0_metadata["trk_keep_alive"]
        overlap_pair_to_frame_inds = rank0_metadata["overlap_pair_to_frame_inds"]
        removed_obj_ids = rank0_metadata["removed_obj_ids"]
        suppressed_obj_ids = rank0_metadata["suppressed_obj_ids"][frame_idx]
        obj_ids_newly_removed = set()
        hotstart_diff = frame_idx - self.hotstart_delay if not reverse else frame_idx + self.hotstart_delay

        def within_hotstart(obj_id) -> bool:
            # objects added by clicks have no first-detection frame: never within hotstart
            # (the official raises KeyError there)
            first = obj_first_frame_idx.get(obj_id)
            if first is None:
                return False
            return (first > hotstart_diff and not reverse) or (first < hotstart_diff and reverse)

        for obj_id in new_det_obj_ids:
            if obj_id not in obj_first_frame_idx:
                obj_first_frame_idx[obj_id] = frame_idx
            trk_keep_alive[obj_id] = self.init_trk_keep_alive
        matched_trks = set()
        for matched in det_to_matched_trk_obj_ids.values():
            matched_trks.update(matched)
        for obj_id in matched_trks:
            trk_keep_alive[obj_id] = min(self.max_trk_keep_alive, trk_keep_alive[obj_id] + 1)
        for obj_id in unmatched_trk_obj_ids:
            unmatched_frame_inds[obj_id].append(frame_idx)
            trk_keep_alive[obj_id] = max(self.min_trk_keep_alive, trk_keep_alive[obj_id] - 1)
        if self.decrease_trk_keep_alive_for_empty_masklets:
            for obj_id in empty_trk_obj_ids:
                trk_keep_alive[obj_id] = max(self.min_trk_keep_alive, trk_keep_alive[obj_id] - 1)

        for obj_id, frame_indices in unmatched_frame_inds.items():
            if obj_id in removed_obj_ids or obj_id in obj_ids_newly_removed:
                continue
            if len(frame_indices) >= self.hotstart_unmatch_thresh and within_hotstart(obj_id):
                obj_ids_newly_removed.add(obj_id)
            if (trk_keep_alive[obj_id] <= 0 and not self.suppress_unmatched_only_within_hotstart
                    and obj_id not in removed_obj_ids and obj_id not in obj_ids_newly_removed):
                suppressed_obj_ids.add(obj_id)

        big = float("inf")
        for _, matched in det_to_matched_trk_obj_ids.items():
            if len(matched) < 2:
                continue
            if not reverse:
                first_appear = min(matched, key=lambda x: obj_first_frame_idx.get(x, -big))
            else:
                first_appear = max(matched, key=lambda x: obj_first_frame_idx.get(x, big))
            for obj_id in matched:
                if obj_id != first_appear:
                    overlap_pair_to_frame_inds[(first_appear, obj_id)].append(frame_idx)
        for (first_obj_id, obj_id), frame_indices in overlap_pair_to_frame_inds.items():
            if obj_id in removed_obj_ids or obj_id in obj_ids_newly_removed:
                continue
            if within_hotstart(obj_id) and len(frame_indices) >= self.hotstart_dup_thresh:
                obj_ids_newly_removed.add(obj_id)
        removed_obj_ids.update(obj_ids_newly_removed)
        return obj_ids_newly_removed, rank0_metadata

    def _tracker_update_memories(self, tracker_inference_states: List[Any], frame_idx: int,
                                 tracker_metadata: Dict[str, Any], low_res_masks: Tensor):
        """Memory encoding of the frame's tracker masks after the global non-overlap heuristics."""
        if len(tracker_inference_states) == 0:
            return
        high_res_H, high_res_W = _mem_interpol_size(self.tracker)
        high_res_masks = F.interpolate(low_res_masks.unsqueeze(1), size=(high_res_H, high_res_W), mode="bilinear",
                                       align_corners=False)
        high_res_masks = suppress_object_pw_area_shrinkage(high_res_masks)
        # mask areas stand in for the object scores
        object_score_logits = torch.where((high_res_masks > 0).any(dim=(-1, -2)), 10.0, -10.0)
        states = [st for st in tracker_inference_states if len(st["obj_ids"]) > 0]
        if not states:
            return
        with stage("video_memory_encoder"):
            self._encode_session_memories(states, frame_idx, tracker_metadata, high_res_masks, object_score_logits)

    def _encode_session_memories(self, states, frame_idx, tracker_metadata, high_res_masks, object_score_logits):
        """:meth:`_tracker_update_memories`'s encoding and storing, for the sessions with objects."""
        # sam3fast: one memory-encoder pass over the objects of several sessions (the official runs
        # one per session; they share the frame's features), each session keeping its rows; passes
        # of at most MEMORY_ENCODER_ROWS rows (or one larger session), which bounds the activations
        start = int(sum(tracker_metadata["num_obj_per_gpu"][: self.rank]))
        for group in _row_groups(states, MEMORY_ENCODER_ROWS):
            total = sum(len(st["obj_ids"]) for st in group)
            features_all, pos_all = self.tracker._run_memory_encoder(
                group[0], frame_idx, total, high_res_masks[start:start + total],
                object_score_logits[start:start + total], is_mask_from_pts=False,
            )
            a = 0
            for tracker_state in group:
                b = a + len(tracker_state["obj_ids"])
                maskmem_features = features_all[a:b]
                maskmem_pos_enc = self.tracker._get_maskmem_pos_enc(
                    tracker_state, {"maskmem_pos_enc": [p[a:b] for p in pos_all]})
                output_dict = tracker_state["output_dict"]
                for storage_key in ["cond_frame_outputs", "non_cond_frame_outputs"]:
                    if frame_idx not in output_dict[storage_key]:
                        continue
                    output_dict[storage_key][frame_idx]["maskmem_features"] = maskmem_features
                    output_dict[storage_key][frame_idx]["maskmem_pos_enc"] = [p for p in maskmem_pos_enc]
                    self.tracker._add_output_per_object(inference_state=tracker_state, frame_idx=frame_idx,
                                                        current_out=output_dict[storage_key][frame_idx],
                                                        storage_key=storage_key)
                a = b
            start += total

    def _tracker_add_new_objects(self, frame_idx: int, num_frames: int, new_obj_ids, new_obj_masks: Tensor,
                                 tracker_states_local: List[Any], orig_vid_height: int, orig_vid_width: int,
                                 feature_cache: Dict):
        """New detections on one frame become one new tracker state (one ``add_new_mask`` each)."""
        prev_state = tracker_states_local[0] if len(tracker_states_local) > 0 else None
        new_state = self.tracker.init_state(cached_features=feature_cache, video_height=orig_vid_height,
                                            video_width=orig_vid_width, num_frames=num_frames)
        new_state["backbone_out"] = prev_state.get("backbone_out", None) if prev_state is not None else None
        res = self.tracker.input_mask_size
        masks = F.interpolate(new_obj_masks.unsqueeze(1), size=(res, res), mode="bilinear",
                              align_corners=False).squeeze(1) > 0
        if hasattr(self.tracker, "add_new_masks"):  # sam3fast's tracker: the new objects as one batch
            self.tracker.add_new_masks(new_state, frame_idx, new_obj_ids, masks)
        else:
            for obj_id, mask in zip(new_obj_ids, masks):
                self.tracker.add_new_mask(inference_state=new_state, frame_idx=frame_idx, obj_id=obj_id, mask=mask,
                                          add_mask_to_memory=True)
        self.tracker.propagate_in_video_preflight(new_state, run_mem_encoder=True)
        tracker_states_local.append(new_state)
        return tracker_states_local

    def _tracker_remove_object(self, tracker_states_local: List[Any], obj_id: int):
        before = tracker_states_local.copy()
        tracker_states_local.clear()
        for state in before:
            new_obj_ids, _ = self.tracker.remove_object(state, obj_id, strict=False, need_output=False)
            if len(new_obj_ids) > 0:
                tracker_states_local.append(state)

    def _tracker_remove_objects(self, tracker_states_local: List[Any], obj_ids):
        for obj_id in obj_ids:
            self._tracker_remove_object(tracker_states_local, obj_id)

    def _initialize_metadata(self) -> Dict[str, Any]:
        md = {
            "obj_ids_per_gpu": [np.array([], np.int64) for _ in range(self.world_size)],
            "obj_ids_all_gpu": np.array([], np.int64),
            "num_obj_per_gpu": np.zeros(self.world_size, np.int64),
            "max_obj_id": -1,
            "obj_id_to_score": {},
            "obj_id_to_tracker_score_frame_wise": defaultdict(dict),
            "obj_id_to_last_occluded": {},
        }
        rank0 = {
            "obj_first_frame_idx": {},
            "unmatched_frame_inds": defaultdict(list),
            "trk_keep_alive": defaultdict(int),
            "overlap_pair_to_frame_inds": defaultdict(list),
            "removed_obj_ids": set(),
            "suppressed_obj_ids": defaultdict(set),
        }
        if self.masklet_confirmation_enable:
            rank0["masklet_confirmation"] = {"status": np.array([], np.int64),
                                             "consecutive_det_num": np.array([], np.int64)}
        if self.device_planning and device_plan_refusal(self) is None:
            # sam3fast: the hotstart counters live on the device (device_plan.PlanState, rows in
            # obj_ids_all_gpu order); the three dicts above stay empty
            rank0["plan_state"] = empty_state(self.device)
        md["rank0_metadata"] = rank0
        return md

    def update_masklet_confirmation_status(self, rank0_metadata, obj_ids_all_gpu_prev, obj_ids_all_gpu_updated,
                                           det_to_matched_trk_obj_ids, new_det_obj_ids):
        data = rank0_metadata["masklet_confirmation"]
        status_prev, num_prev = data["status"], data["consecutive_det_num"]
        idx_of = {obj_id: i for i, obj_id in enumerate(obj_ids_all_gpu_updated)}
        prev_in = np.isin(obj_ids_all_gpu_prev, obj_ids_all_gpu_updated)
        prev_inds = np.array([idx_of[o] for o in obj_ids_all_gpu_prev[prev_in]], dtype=np.int64)
        status = np.full_like(obj_ids_all_gpu_updated, fill_value=MaskletConfirmationStatus.UNCONFIRMED)
        status[prev_inds] = status_prev[prev_in]
        num = np.zeros_like(obj_ids_all_gpu_updated)
        num[prev_inds] = num_prev[prev_in]
        is_matched = np.isin(obj_ids_all_gpu_updated, new_det_obj_ids)
        for matched in det_to_matched_trk_obj_ids.values():
            is_matched |= np.isin(obj_ids_all_gpu_updated, matched)
        num = np.where(is_matched, num + 1, 0)
        status[num >= self.masklet_confirmation_consecutive_det_thresh] = MaskletConfirmationStatus.CONFIRMED
        data["status"] = status
        data["consecutive_det_num"] = num
        return rank0_metadata

    def _drop_new_det_with_obj_limit(self, new_det_fa_inds, det_scores_np, num_to_keep):
        if num_to_keep <= 0:
            return np.array([], np.int64)
        if num_to_keep >= len(new_det_fa_inds):
            return new_det_fa_inds
        order = np.argsort(det_scores_np[new_det_fa_inds])[::-1]
        return new_det_fa_inds[order[:num_to_keep]]


# ----------------------------------------------------------------------------------------------


class Sam3VideoInference(Sam3VideoBase):
    """Sessions on one video: ``init_state``, ``add_prompt`` (text and/or one box), and
    ``propagate_in_video`` (with the hotstart output buffer)."""

    TEXT_ID_FOR_TEXT = 0
    TEXT_ID_FOR_VISUAL = 1

    def __init__(self, image_size=1008, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), compile_model=False,
                 **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.image_mean = image_mean
        self.image_std = image_std
        self.compile_model = compile_model

    def _load_frames(self, resource_path, offload_video_to_cpu, async_loading_frames, video_loader_type):
        """(frames, video height, video width) as the official loaders give them. The frames are a
        :class:`~sam3fast.video.io.FrameStore`: decoded once to host uint8, each handed to the device
        as (3, R, R) float16 when the detector asks for it (values equal the official loader's), so
        device memory does not grow with the video. ``offload_video_to_cpu`` is accepted and changes
        nothing (frames always live on the host); ``async_loading_frames`` decodes in a background
        thread (the official async loader's purpose): the session starts at once and each frame is
        waited for only if tracking reaches it first (not for video files, whose frame count is only
        known once decoded)."""
        from .io import open_frame_store

        if tuple(self.image_mean) != (0.5, 0.5, 0.5) or tuple(self.image_std) != (0.5, 0.5, 0.5):
            raise NotImplementedError("the video loaders implement image_mean = image_std = 0.5 only")
        if video_loader_type not in ("cv2", None):
            raise NotImplementedError(f"video_loader_type={video_loader_type!r}: only 'cv2' is implemented")
        return open_frame_store(resource_path, image_size=self.image_size, device=self.device,
                                background=bool(async_loading_frames))

    @torch.inference_mode()
    def init_state(self, resource_path, offload_video_to_cpu=False, async_loading_frames=False,
                   video_loader_type="cv2"):
        """A new session on ``resource_path`` (an mp4 file, a folder of ``<index>.jpg`` frames, an
        image file, or a list of PIL images)."""
        if isinstance(resource_path, (str, os.PathLike)):
            resource_path = os.fspath(resource_path)
            if not os.path.exists(resource_path):
                raise FileNotFoundError(f"video resource not found: {resource_path}")
        images, orig_height, orig_width = self._load_frames(resource_path, offload_video_to_cpu,
                                                            async_loading_frames, video_loader_type)
        if len(images) == 0:
            raise ValueError(f"no frames could be read from {resource_path!r}")
        inference_state = {
            "image_size": self.image_size,
            "num_frames": len(images),
            "orig_height": orig_height,
            "orig_width": orig_width,
            "constants": {},
        }
        self._construct_initial_input_batch(inference_state, images)
        inference_state["tracker_inference_states"] = []
        inference_state["tracker_metadata"] = {}
        inference_state["feature_cache"] = {}
        inference_state["cached_frame_outputs"] = {}
        inference_state["action_history"] = []
        inference_state["is_image_only"] = is_image_type(resource_path)
        return inference_state

    @torch.inference_mode()
    def reset_state(self, inference_state):
        """Back to the state right after ``init_state``."""
        inference_state["input_batch"].find_text_batch[0] = "<text placeholder>"
        inference_state["text_prompt"] = None
        for t in range(inference_state["num_frames"]):
            inference_state["input_batch"].text_ids[t] = 0
            inference_state["previous_stages_out"][t] = None
            inference_state["per_frame_raw_point_input"][t] = None
            inference_state["per_frame_raw_box_input"][t] = None
            inference_state["per_frame_visual_prompt"][t] = None
            inference_state["per_frame_geometric_prompt"][t] = None
            inference_state["per_frame_cur_step"][t] = 0
        inference_state["visual_prompt_embed"] = None
        inference_state["visual_prompt_mask"] = None
        inference_state["tracker_inference_states"].clear()
        inference_state["tracker_metadata"].clear()
        inference_state["feature_cache"].clear()
        inference_state["cached_frame_outputs"].clear()
        inference_state["action_history"].clear()
        self.detector.drop_deferred()  # (a one-ahead detection queued for the cleared buffer)

    def _construct_initial_input_batch(self, inference_state, images):
        num_frames = len(images)
        inference_state["input_batch"] = VideoInputBatch(
            img_batch=images, find_text_batch=["<text placeholder>", "visual"], text_ids=[0] * num_frames,
        )
        inference_state["constants"]["empty_geometric_prompt"] = None
        inference_state["previous_stages_out"] = [None] * num_frames
        inference_state["text_prompt"] = None
        inference_state["per_frame_raw_point_input"] = [None] * num_frames
        inference_state["per_frame_raw_box_input"] = [None] * num_frames
        inference_state["per_frame_visual_prompt"] = [None] * num_frames
        inference_state["per_frame_geometric_prompt"] = [None] * num_frames
        inference_state["per_frame_cur_step"] = [0] * num_frames
        inference_state["visual_prompt_embed"] = None
        inference_state["visual_prompt_mask"] = None

    def _get_visual_prompt(self, inference_state, frame_idx, boxes_cxcywh, box_labels):
        """The first box on a frame without outputs is the visual prompt (exactly one box); the
        official then drops it from the geometric boxes, and only the visual prompt reaches the
        detector."""
        is_new = (inference_state["per_frame_visual_prompt"][frame_idx] is None
                  and inference_state["previous_stages_out"][frame_idx] is None)
        if is_new:
            if boxes_cxcywh.size(0) != 1:
                raise ValueError("visual prompts (box as an initial prompt) should only have one box, "
                                 f"but got {tuple(boxes_cxcywh.shape)}")
            if not bool(box_labels[0]):
                logger.warning("A negative box is added as a visual prompt.")
            new_visual_prompt = {
                "boxes": boxes_cxcywh[None, 0:1, :].to(self.device),  # (1, 1, 4) batch-first
                "box_labels": box_labels[None, 0:1].to(self.device).bool(),
            }
            inference_state["per_frame_visual_prompt"][frame_idx] = new_visual_prompt
        else:
            new_visual_prompt = None
        if inference_state["per_frame_visual_prompt"][frame_idx] is not None:
            boxes_cxcywh = boxes_cxcywh[1:]
            box_labels = box_labels[1:]
        return boxes_cxcywh, box_labels, new_visual_prompt

    def _get_processing_order(self, inference_state, start_frame_idx, max_frame_num_to_track, reverse):
        num_frames = inference_state["num_frames"]
        previous_stages_out = inference_state["previous_stages_out"]
        if all(out is None for out in previous_stages_out) and start_frame_idx is None:
            raise RuntimeError("No prompts are received on any frames. Please add prompt on at least one frame "
                               "before propagation.")
        if start_frame_idx is None:
            start_frame_idx = min(t for t, out in enumerate(previous_stages_out) if out is not None)
        if max_frame_num_to_track is None:
            max_frame_num_to_track = num_frames
        if reverse:
            end_frame_idx = max(start_frame_idx - max_frame_num_to_track, 0)
            processing_order = range(start_frame_idx - 1, end_frame_idx - 1, -1)
        else:
            end_frame_idx = min(start_frame_idx + max_frame_num_to_track, num_frames - 1)
            processing_order = range(start_frame_idx, end_frame_idx + 1)
        return processing_order, end_frame_idx

    def _check_frame_index(self, inference_state, frame_idx, what="frame_idx"):
        n = inference_state["num_frames"]
        if isinstance(frame_idx, bool) or not isinstance(frame_idx, (int, np.integer)):
            raise TypeError(f"{what} must be an integer, got {type(frame_idx).__name__}")
        if not 0 <= int(frame_idx) < n:
            raise ValueError(f"{what}={frame_idx} is out of range for a video of {n} frames (valid: 0..{n - 1})")

    @torch.inference_mode()
    def propagate_in_video(self, inference_state, start_frame_idx=None, max_frame_num_to_track=None, reverse=False):
        """Generator of ``(frame_idx, outputs)`` over the frames from ``start_frame_idx`` (default:
        the first prompted frame) in the given direction; outputs are held ``hotstart_delay``
        frames so objects removed by hotstart are hidden on the frames before their removal."""
        if start_frame_idx is not None:
            self._check_frame_index(inference_state, start_frame_idx, "start_frame_idx")
        processing_order, end_frame_idx = self._get_processing_order(
            inference_state, start_frame_idx, max_frame_num_to_track, reverse=reverse
        )
        inference_state["feature_cache"]["tracking_bounds"] = {
            "max_frame_num_to_track": max_frame_num_to_track,
            "propagate_in_video_start_frame_idx": start_frame_idx,
        }
        hotstart_buffer = []
        hotstart_removed_obj_ids = set()
        unconfirmed_status_delay = self.masklet_confirmation_consecutive_det_thresh - 1
        unconfirmed_obj_ids_per_frame = {}
        pending = []  # pipelined_outputs: frames whose outputs are on their way to the host
        for frame_idx in tqdm(processing_order, desc="propagate_in_video", disable=self.rank > 0 or not self.progress):
            out = self._run_single_frame_inference(inference_state, frame_idx, reverse)
            if self.hotstart_delay > 0:
                hotstart_buffer.append([frame_idx, self._held_outputs(inference_state, frame_idx, out)])
                hotstart_removed_obj_ids.update(out["removed_obj_ids"])
                unconfirmed_obj_ids = out.get("unconfirmed_obj_ids", None)
                if unconfirmed_obj_ids is not None:
                    unconfirmed_obj_ids_per_frame[frame_idx] = unconfirmed_obj_ids
                if frame_idx == end_frame_idx:
                    yield_list, hotstart_buffer = hotstart_buffer, []
                elif len(hotstart_buffer) >= self.hotstart_delay:
                    yield_list, hotstart_buffer = hotstart_buffer[:1], hotstart_buffer[1:]
                else:
                    yield_list = []
            else:
                yield_list = [(frame_idx, out)]
            # pipelined: the outputs queued after the previous frame came to the host with this
            # frame's planning copy
            while pending:
                yield pending.pop(0)()
            for yield_frame_idx, yield_out in yield_list:
                suppressed_obj_ids = yield_out["suppressed_obj_ids"]
                status_frame = (yield_frame_idx + unconfirmed_status_delay if not reverse
                                else yield_frame_idx - unconfirmed_status_delay)
                status_frame = max(0, min(status_frame, inference_state["num_frames"] - 1))
                unconfirmed_obj_ids = unconfirmed_obj_ids_per_frame.get(status_frame, None)
                with stage("video_postprocess"):
                    finish = self._postprocess_launch(inference_state, self._on_device(yield_out),
                                                      hotstart_removed_obj_ids, suppressed_obj_ids,
                                                      unconfirmed_obj_ids)
                self._cache_frame_outputs(inference_state, yield_frame_idx, yield_out["obj_id_to_mask"],
                                          suppressed_obj_ids=suppressed_obj_ids,
                                          removed_obj_ids=hotstart_removed_obj_ids,
                                          unconfirmed_obj_ids=unconfirmed_obj_ids, refilter=True)
                pending.append(lambda f=yield_frame_idx, fin=finish: (f, fin()))
            if not self.pipelined_outputs or frame_idx == end_frame_idx:
                # (the last frame's held outputs were all queued above: one copy carries them)
                while pending:
                    yield pending.pop(0)()
        while pending:
            yield pending.pop(0)()

    def _run_single_frame_inference(self, inference_state, frame_idx, reverse):
        input_batch = inference_state["input_batch"]
        has_text_prompt = inference_state["text_prompt"] is not None
        geometric_prompt = inference_state["per_frame_geometric_prompt"][frame_idx]
        has_geometric_prompt = geometric_prompt is not None
        (obj_id_to_mask, obj_id_to_score, tracker_states_local_new, tracker_metadata_new, frame_stats,
         _) = self._det_track_one_frame(
            frame_idx=frame_idx, num_frames=inference_state["num_frames"], reverse=reverse,
            input_batch=input_batch, geometric_prompt=geometric_prompt,
            tracker_states_local=inference_state["tracker_inference_states"],
            tracker_metadata_prev=inference_state["tracker_metadata"],
            feature_cache=inference_state["feature_cache"],
            orig_vid_height=inference_state["orig_height"], orig_vid_width=inference_state["orig_width"],
            is_image_only=inference_state["is_image_only"],
            allow_new_detections=has_text_prompt or has_geometric_prompt,
        )
        inference_state["tracker_inference_states"] = tracker_states_local_new
        inference_state["tracker_metadata"] = tracker_metadata_new
        inference_state["previous_stages_out"][frame_idx] = "_THIS_FRAME_HAS_OUTPUTS_"
        self._cache_frame_outputs(inference_state, frame_idx, obj_id_to_mask)
        rank0 = tracker_metadata_new["rank0_metadata"]
        out = {
            "obj_id_to_mask": obj_id_to_mask,
            "obj_id_to_score": obj_id_to_score,
            "obj_id_to_tracker_score": tracker_metadata_new["obj_id_to_tracker_score_frame_wise"][frame_idx],
            "removed_obj_ids": rank0["removed_obj_ids"],
            "suppressed_obj_ids": rank0["suppressed_obj_ids"][frame_idx],
            "frame_stats": frame_stats,
        }
        if self.masklet_confirmation_enable and self.rank == 0:
            is_unconfirmed = rank0["masklet_confirmation"]["status"] == MaskletConfirmationStatus.UNCONFIRMED
            out["unconfirmed_obj_ids"] = tracker_metadata_new["obj_ids_all_gpu"][is_unconfirmed].tolist()
        else:
            out["unconfirmed_obj_ids"] = []
        return out

    def _postprocess_output(self, inference_state, out, removed_obj_ids=None, suppressed_obj_ids=None,
                            unconfirmed_obj_ids=None):
        """Per-object (1, H, W) bool masks -> the official outputs: ``out_obj_ids`` (N,) int64 sorted,
        ``out_probs`` (N,) float32, ``out_boxes_xywh`` (N, 4) float32 normalised (from the masks
        before the non-overlap step), ``out_binary_masks`` (N, H, W) bool (object-wise
        non-overlap by tracker score), ``frame_stats``; empty and hidden objects dropped."""
        return self._postprocess_launch(inference_state, out, removed_obj_ids, suppressed_obj_ids,
                                        unconfirmed_obj_ids)()

    def _postprocess_launch(self, inference_state, out, removed_obj_ids=None, suppressed_obj_ids=None,
                            unconfirmed_obj_ids=None):
        """:meth:`_postprocess_output` in two halves: this one launches the device work and the one
        device-to-host copy of the frame's outputs (into pinned memory, asynchronous, with an event
        on CUDA) and returns ``read_outputs() -> outputs``, which waits for that copy and builds the
        arrays. In between the host may queue the next frame's work (``pipelined_outputs``)."""
        obj_id_to_mask = out["obj_id_to_mask"]
        curr_obj_ids = sorted(obj_id_to_mask.keys())
        H_video, W_video = inference_state["orig_height"], inference_state["orig_width"]
        frame_stats = out.get("frame_stats", None)
        if len(curr_obj_ids) == 0 or self.rank != 0:  # (ranks > 0 answer nothing)
            empty = {
                "out_obj_ids": np.zeros(0, dtype=np.int64),
                "out_probs": np.zeros(0, dtype=np.float32),
                "out_boxes_xywh": np.zeros((0, 4), dtype=np.float32),
                "out_binary_masks": np.zeros((0, H_video, W_video), dtype=np.bool_),
                "frame_stats": frame_stats,
            }
            return lambda: empty
        # Everything is computed on the device for all N objects, hidden and empty ones masked out
        # (a zeroed mask never wins a pixel from a kept object with a positive score, and a kept
        # object with score 0 loses its pixels either way), then read with one device-to-host copy
        # and filtered on the host.
        hide = set()
        for ids in (suppressed_obj_ids, removed_obj_ids, unconfirmed_obj_ids):
            if ids is not None:
                hide.update(int(i) for i in ids)
        trk = out["obj_id_to_tracker_score"]
        scores = out["obj_id_to_score"]
        probs = np.asarray([scores[i] for i in curr_obj_ids], dtype=np.float32)
        if isinstance(obj_id_to_mask, FrameMasks) and obj_id_to_mask.size == (H_video, W_video):
            return self._postprocess_low_res(obj_id_to_mask, curr_obj_ids, hide, trk, probs, frame_stats)
        dev = obj_id_to_mask[curr_obj_ids[0]].device
        masks = torch.cat([obj_id_to_mask[obj_id] for obj_id in curr_obj_ids], dim=0)
        keep = masks.any(dim=(1, 2)) & to_device_async([i not in hide for i in curr_obj_ids], torch.bool, dev)
        masks = masks & keep[:, None, None]
        x0, y0, x1, y1 = masks_to_boxes(masks).unbind(-1)
        boxes = torch.stack([x0 / W_video, y0 / H_video, (x1 - x0) / W_video, (y1 - y0) / H_video], dim=-1)
        tracker_probs = to_device_async([trk[i] if i in trk else 0.0 for i in curr_obj_ids], torch.float32, dev)
        separated = apply_object_wise_non_overlapping_constraints(
            masks.unsqueeze(1), tracker_probs.unsqueeze(1), background_value=0).squeeze(1) > 0
        masks = torch.where(keep.sum() > 1, separated, masks)  # (the official: only for 2+ objects)
        N = len(curr_obj_ids)
        return _output_reader(self.host_channel, keep, boxes, masks.view(torch.uint8).flatten(), curr_obj_ids,
                              probs, frame_stats,
                              lambda b, k: b.view(np.bool_).reshape(N, H_video, W_video)[k])

    def _postprocess_low_res(self, frame_masks: FrameMasks, curr_obj_ids, hide, trk, probs, frame_stats):
        """:meth:`_postprocess_launch` for a :class:`FrameMasks` (``curr_obj_ids`` sorted, ``hide``
        the hidden ids, ``trk`` the tracker scores, ``probs`` the output scores): the same outputs
        from the low-res logits through ``sam3fast::mask_postprocess`` (the Triton kernel on CUDA),
        with no full-resolution float or bool mask on the device and the masks bit-packed on their
        way to the host (8x fewer bytes). Two passes: without the non-overlap rule (keep flags and
        boxes: the official measures both before the rule), then with it on the kept objects, as
        the official applies it (only with 2+ kept objects, where an object with score <= 0 loses
        every pixel)."""
        H, W = frame_masks.size
        low = frame_masks.logits(curr_obj_ids)
        dev = low.device
        N = len(curr_obj_ids)
        visible = to_device_async([i not in hide for i in curr_obj_ids], torch.bool, dev)
        tracker_probs = to_device_async([trk[i] if i in trk else 0.0 for i in curr_obj_ids], torch.float32, dev)
        _, boxes_px, areas = mask_postprocess(low, tracker_probs, (H, W), active=visible, non_overlap=False)
        keep = areas > 0
        contest = keep & ((tracker_probs > 0) | (keep.sum() <= 1))
        packed, _, _ = mask_postprocess(low, tracker_probs, (H, W), active=contest, non_overlap=True)
        x0, y0, x1, y1 = boxes_px.float().unbind(-1)  # (divided by Python scalars: no copy to the device)
        boxes = torch.stack([x0 / W, y0 / H, (x1 - x0) / W, (y1 - y0) / H], dim=-1)
        WP = packed.shape[-1]

        def unpack(b, k):  # bit j of little-endian word w of a row = pixel 32 w + j
            return np.unpackbits(b.reshape(N, H, 4 * WP)[k], axis=-1, bitorder="little")[..., :W].astype(np.bool_)

        return _output_reader(self.host_channel, keep, boxes, packed.contiguous().view(torch.uint8).flatten(),
                              curr_obj_ids, probs, frame_stats, unpack)

    def _cache_frame_outputs(self, inference_state, frame_idx, obj_id_to_mask, suppressed_obj_ids=None,
                             removed_obj_ids=None, unconfirmed_obj_ids=None, refilter=False):
        """Remember a frame's (1, H, W) bool masks for later fetches and clicks. sam3fast: on CUDA
        (``retire_finished_outputs``) the cache holds pinned host copies (asynchronous copies on the
        current stream, so the device readers, which copy them back, are ordered after them): the
        official keeps every frame's video-resolution masks on the device. ``refilter``: the frame
        was cached unfiltered from these same masks; drop the excluded ids from that entry instead
        of copying the masks again."""
        cache = inference_state["cached_frame_outputs"]
        exclude = set()
        for ids in (suppressed_obj_ids, removed_obj_ids, unconfirmed_obj_ids):
            if ids is not None:
                exclude.update(ids)
        if refilter and frame_idx in cache and cache[frame_idx].keys() == obj_id_to_mask.keys():
            entry = cache[frame_idx]
            if isinstance(entry, FrameMasks):
                # the hidden objects' rows leave the cached logits (a gather of the retired host
                # copy stays on the host: _to_host of a host tensor is that tensor)
                fm = entry.subset(k for k in entry if k not in exclude).compact()
                retired = fm.low is not entry.low and self._retires_outputs()
                cache[frame_idx] = fm.with_low(self._to_host(fm.low)) if retired else fm
            else:
                cache[frame_idx] = {k: v for k, v in entry.items() if k not in exclude}
            return
        retire = self._retires_outputs()
        if isinstance(obj_id_to_mask, FrameMasks):  # one copy of the frame's logits
            fm = obj_id_to_mask.subset(k for k in obj_id_to_mask if k not in exclude).compact()
            cache[frame_idx] = fm.with_low(self._to_host(fm.low)) if retire else fm
            return
        cache[frame_idx] = {k: (self._to_host(v) if retire and isinstance(v, Tensor) else v)
                            for k, v in obj_id_to_mask.items() if k not in exclude}

    def _retires_outputs(self) -> bool:
        return self.retire_finished_outputs and self.device.type == "cuda"

    @staticmethod
    def _to_host(v: Tensor) -> Tensor:
        return v.to("cpu", non_blocking=True)  # pinned destination: asynchronous, stream-ordered

    def _cached_masks(self, inference_state, frame_idx):
        """A frame's cached masks, on the device (``{}`` for a frame without outputs)."""
        return self._masks_to_device(inference_state["cached_frame_outputs"].get(frame_idx, {}))

    def _masks_to_device(self, obj_id_to_mask):
        # from pinned memory, asynchronous and after the copy that retired them (same stream)
        if isinstance(obj_id_to_mask, FrameMasks):
            return obj_id_to_mask.to(self.device, non_blocking=True)
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v
                for k, v in obj_id_to_mask.items()}

    def _held_outputs(self, inference_state, frame_idx, out):
        """``out`` as the hotstart buffer keeps it for ``hotstart_delay`` frames. sam3fast: when
        outputs retire, its masks are the cache's host copies (made as the frame ran, same keys):
        otherwise the device holds ``hotstart_delay`` frames of video-resolution masks per object,
        a growth with the objects tracked that the official placement has.
        :meth:`_on_device` copies them back when the frame is post-processed."""
        cached = inference_state["cached_frame_outputs"].get(frame_idx)
        if not self._retires_outputs() or cached is None or cached.keys() != out["obj_id_to_mask"].keys():
            return out
        return dict(out, obj_id_to_mask=cached.copy())

    def _on_device(self, out):
        """A held frame's outputs with its masks on the device again (see :meth:`_held_outputs`)."""
        if not self._retires_outputs():
            return out
        return dict(out, obj_id_to_mask=self._masks_to_device(out["obj_id_to_mask"]))

    def _build_tracker_output(self, inference_state, frame_idx, refined_obj_id_to_mask=None):
        if frame_idx not in inference_state.get("cached_frame_outputs", {}):
            raise RuntimeError(f"no cached outputs for frame {frame_idx}: run propagation over it first")
        obj_id_to_mask = self._cached_masks(inference_state, frame_idx)
        if isinstance(obj_id_to_mask, FrameMasks):
            obj_id_to_mask = obj_id_to_mask.materialize()
        if refined_obj_id_to_mask is not None:
            obj_id_to_mask.update(refined_obj_id_to_mask)
        return obj_id_to_mask

    @torch.inference_mode()
    def add_prompt(self, inference_state, frame_idx, text_str=None, boxes_xywh=None, box_labels=None):
        """A text and/or box prompt on one frame (text applies to all frames; a box only to
        ``frame_idx``). Starts over (``reset_state``) and returns ``(frame_idx, outputs)`` of the
        prompted frame. Boxes: [x, y, w, h] normalised to [0, 1]; exactly one box."""
        if text_str is None and boxes_xywh is None:
            raise ValueError("at least one type of prompt (text, boxes) must be provided")
        self._check_frame_index(inference_state, frame_idx)
        if text_str is not None and not isinstance(text_str, str):
            raise TypeError(f"text must be a string, got {type(text_str).__name__}")
        if (boxes_xywh is None) != (box_labels is None):
            raise ValueError("bounding_boxes and bounding_box_labels must be given together")
        if boxes_xywh is not None:
            boxes_xywh = torch.as_tensor(boxes_xywh, dtype=torch.float32)
            box_labels = torch.as_tensor(box_labels, dtype=torch.long)
            if boxes_xywh.dim() != 2 or boxes_xywh.size(0) == 0 or boxes_xywh.size(-1) != 4:
                raise ValueError(f"bounding_boxes must be (N, 4) [x, y, w, h], got {tuple(boxes_xywh.shape)}")
            if box_labels.dim() != 1 or box_labels.size(0) != boxes_xywh.size(0):
                raise ValueError(f"bounding_box_labels must be ({boxes_xywh.size(0)},), got {tuple(box_labels.shape)}")
            boxes_cxcywh = box_xywh_to_cxcywh(boxes_xywh)
            if not (bool(((boxes_xywh >= 0) & (boxes_xywh <= 1)).all())
                    and bool(((boxes_cxcywh >= 0) & (boxes_cxcywh <= 1)).all())):
                raise ValueError("bounding_boxes must be normalised [x, y, w, h] inside [0, 1]")
            if boxes_cxcywh.size(0) != 1:
                raise ValueError("visual prompts (box as an initial prompt) should only have one box, "
                                 f"but got {boxes_cxcywh.size(0)}")
        self.reset_state(inference_state)
        if text_str is not None and text_str != "visual":
            inference_state["text_prompt"] = text_str
            inference_state["input_batch"].find_text_batch[0] = text_str
            text_id = self.TEXT_ID_FOR_TEXT
        else:
            inference_state["text_prompt"] = None
            inference_state["input_batch"].find_text_batch[0] = "<text placeholder>"
            text_id = self.TEXT_ID_FOR_VISUAL
        for t in range(inference_state["num_frames"]):
            inference_state["input_batch"].text_ids[t] = text_id
        if boxes_xywh is not None:
            inference_state["per_frame_raw_box_input"][frame_idx] = (boxes_cxcywh, box_labels)
            boxes_cxcywh, box_labels, geometric_prompt = self._get_visual_prompt(
                inference_state, frame_idx, boxes_cxcywh, box_labels
            )
            inference_state["per_frame_geometric_prompt"][frame_idx] = geometric_prompt
        out = self._run_single_frame_inference(inference_state, frame_idx, reverse=False)
        return frame_idx, self._postprocess_output(inference_state, out)


# ----------------------------------------------------------------------------------------------


class Sam3VideoInferenceWithInstanceInteractivity(Sam3VideoInference):
    """Adds per-object interactivity: point prompts (new or refined objects), object removal, and
    partial / cached propagation decided from the action history."""

    def __init__(self, use_prev_mem_frame=False, use_stateless_refinement=False,
                 refinement_detector_cond_frame_removal_window=16, **kwargs):
        super().__init__(**kwargs)
        self.use_prev_mem_frame = use_prev_mem_frame
        self.use_stateless_refinement = use_stateless_refinement
        self.refinement_detector_cond_frame_removal_window = refinement_detector_cond_frame_removal_window

    def _init_new_tracker_state(self, inference_state):
        return self.tracker.init_state(cached_features=inference_state["feature_cache"],
                                       video_height=inference_state["orig_height"],
                                       video_width=inference_state["orig_width"],
                                       num_frames=inference_state["num_frames"])

    @torch.inference_mode()
    def propagate_in_video(self, inference_state, start_frame_idx=None, max_frame_num_to_track=None, reverse=False):
        if start_frame_idx is not None:
            self._check_frame_index(inference_state, start_frame_idx, "start_frame_idx")
        propagation_type, obj_ids = self.parse_action_history_for_propagation(inference_state)
        if propagation_type == "propagation_full":
            # the full path checks its arguments before anything is recorded
            gen = super().propagate_in_video(inference_state, start_frame_idx=start_frame_idx,
                                             max_frame_num_to_track=max_frame_num_to_track, reverse=reverse)
            self._get_processing_order(inference_state, start_frame_idx, max_frame_num_to_track, reverse)
            self.add_action_history(inference_state, action_type=propagation_type, obj_ids=obj_ids,
                                    frame_idx=start_frame_idx)
            yield from gen
            return
        processing_order, _ = self._get_processing_order(inference_state, start_frame_idx=start_frame_idx,
                                                         max_frame_num_to_track=max_frame_num_to_track,
                                                         reverse=reverse)
        self.add_action_history(inference_state, action_type=propagation_type, obj_ids=obj_ids,
                                frame_idx=start_frame_idx)
        tracker_metadata = inference_state["tracker_metadata"]
        if propagation_type == "propagation_fetch":
            for frame_idx in tqdm(processing_order, disable=self.rank > 0 or not self.progress):
                yield self._tracker_frame_output(inference_state, frame_idx,
                                                 self._cached_masks(inference_state, frame_idx), cache=False)
            return

        tracker_states_local = self._get_tracker_inference_states_by_obj_ids(inference_state, obj_ids)
        for tracker_state in tracker_states_local:
            self.tracker.propagate_in_video_preflight(tracker_state, run_mem_encoder=True)
        for frame_idx in tqdm(processing_order, disable=self.rank > 0 or not self.progress):
            self._prepare_backbone_feats(inference_state, frame_idx, reverse)
            obj_ids_local, low_res_masks_local, tracker_scores_local = self._propogate_tracker_one_frame_local_gpu(
                tracker_states_local, frame_idx=frame_idx, reverse=reverse, run_mem_encoder=True
            )
            refined_obj_data = {}
            for obj_id in obj_ids:
                if obj_id in obj_ids_local:
                    i = obj_ids_local.index(obj_id)
                    refined_obj_data[obj_id] = (tracker_scores_local[i], low_res_masks_local[i])
            if self.world_size > 1:
                refined_obj_data = self._share_refined(inference_state, obj_ids, refined_obj_data)
            for obj_id, (refined_score, _) in refined_obj_data.items():
                tracker_metadata["obj_id_to_tracker_score_frame_wise"][frame_idx].update(
                    {obj_id: refined_score.item()}  # host sync
                )
            refined_obj_id_to_mask = {
                obj_id: self._convert_low_res_mask_to_video_res(mask, inference_state)
                for obj_id, (_, mask) in refined_obj_data.items()
            }
            obj_id_to_mask = self._build_tracker_output(inference_state, frame_idx, refined_obj_id_to_mask)
            yield self._tracker_frame_output(inference_state, frame_idx, obj_id_to_mask)

    def _share_refined(self, inference_state, obj_ids, local_data):
        """Several ranks: each refined object's (score, low-res mask) from the rank holding it to
        all ranks, one fixed-size broadcast per object (flag, score, h*w mask logits, float32)."""
        h = w = self.tracker.low_res_mask_size
        out = {}
        for obj_id in obj_ids:
            src = self._get_gpu_id_by_obj_id(inference_state, obj_id)
            if src is None:
                continue
            buf = torch.zeros(2 + h * w, dtype=torch.float32, device=self.device)
            if self.rank == src and obj_id in local_data:
                score, mask = local_data[obj_id]
                buf[0] = 1.0
                buf[1] = score.reshape(()).float()
                buf[2:] = mask.reshape(-1).float()
            self.dist.broadcast(buf, src, "refined object")
            if self.rank == src and obj_id in local_data:
                out[obj_id] = local_data[obj_id]
            elif bool(buf[0] > 0):
                out[obj_id] = (buf[1], buf[2:].reshape(h, w))
        return out

    def _share_click_mask(self, mask, src, inference_state):
        """Several ranks: the clicked object's (1, H, W) bool video-res mask (or None) from its
        rank to all ranks (flag + H*W bytes)."""
        H, W = inference_state["orig_height"], inference_state["orig_width"]
        buf = torch.zeros(1 + H * W, dtype=torch.uint8, device=self.device)
        if self.rank == src and mask is not None:
            buf[0] = 1
            buf[1:] = mask.reshape(-1).to(torch.uint8)
        self.dist.broadcast(buf, src, "clicked object mask")
        if self.rank == src:
            return mask
        return buf[1:].reshape(1, H, W).bool() if bool(buf[0] > 0) else None

    def add_action_history(self, inference_state, action_type, frame_idx=None, obj_ids=None):
        allowed = ["add", "remove", "refine", "propagation_full", "propagation_partial", "propagation_fetch"]
        if action_type not in allowed:
            raise ValueError(f"Invalid action type: {action_type}, must be one of {allowed}")
        inference_state["action_history"].append({"type": action_type, "frame_idx": frame_idx, "obj_ids": obj_ids})

    def _has_object_been_refined(self, inference_state, obj_id):
        for action in inference_state["action_history"]:
            if action["type"] in ["add", "refine"] and action.get("obj_ids") and obj_id in action["obj_ids"]:
                return True
        return False

    def parse_action_history_for_propagation(self, inference_state):
        """("propagation_full" | "propagation_partial" | "propagation_fetch", object ids for a
        partial propagation) from the actions since the last propagation (official rules)."""
        history = inference_state["action_history"]
        if len(history) == 0:
            return "propagation_full", None
        if "propagation" in history[-1]["type"]:
            if history[-1]["type"] == "propagation_fetch":
                return "propagation_fetch", None
            if (len(history) > 1 and history[-2]["type"] in ["propagation_partial", "propagation_full"]) or \
                    history[-1]["frame_idx"] in [0, inference_state["num_frames"] - 1]:
                return "propagation_fetch", None
            return history[-1]["type"], history[-1]["obj_ids"]
        obj_ids = []
        for action in history[::-1]:
            if "propagation" in action["type"]:
                break
            if action["type"] in ["add", "refine"]:
                obj_ids.extend(action["obj_ids"])
        obj_ids = list(set(obj_ids)) if len(obj_ids) > 0 else None
        return ("propagation_partial" if obj_ids is not None else "propagation_fetch"), obj_ids

    def remove_object(self, inference_state, obj_id, is_user_action=False):
        """Remove ``obj_id`` from tracking and from every cached frame output."""
        obj_rank = self._get_gpu_id_by_obj_id(inference_state, obj_id)
        if obj_rank is None:
            known = [] if not inference_state["tracker_metadata"] else \
                inference_state["tracker_metadata"]["obj_ids_all_gpu"].tolist()
            raise ValueError(f"Object {obj_id} not found: the session tracks objects {known}")
        self._tracker_remove_object(inference_state["tracker_inference_states"], obj_id)
        if is_user_action:
            self.add_action_history(inference_state, action_type="remove", obj_ids=[obj_id])
        md = inference_state["tracker_metadata"]
        self._relayout_plan(md, np.flatnonzero(md["obj_ids_all_gpu"] != obj_id))
        ids = md["obj_ids_per_gpu"][obj_rank]
        md["obj_ids_per_gpu"][obj_rank] = ids[ids != obj_id]
        md["num_obj_per_gpu"][obj_rank] = len(md["obj_ids_per_gpu"][obj_rank])
        md["obj_ids_all_gpu"] = np.concatenate(md["obj_ids_per_gpu"])
        md["obj_id_to_score"].pop(obj_id, None)
        for frame_cache in inference_state.get("cached_frame_outputs", {}).values():
            if obj_id in frame_cache:
                del frame_cache[obj_id]

    def _relayout_plan(self, tracker_metadata, rows, new_first_frame=0):
        """After a user edit of the tracks: the device plan state (if the session has one) in the new
        track layout, ``rows`` the old row of each new row (-1: a new track, first detected on
        ``new_first_frame``, keep-alive 0), so its rows keep following ``obj_ids_all_gpu``."""
        rank0 = tracker_metadata.get("rank0_metadata", {})
        if "plan_state" in rank0:
            rank0["plan_state"] = next_state(rank0["plan_state"], to_device_async(rows, torch.long, self.device),
                                             new_first_frame=new_first_frame, new_keep_alive=0)

    def _get_gpu_id_by_obj_id(self, inference_state, obj_id):
        md = inference_state["tracker_metadata"]
        if not md:
            return None
        for rank, obj_ids in enumerate(md["obj_ids_per_gpu"]):
            if obj_id in obj_ids:
                return rank
        return None

    def _get_tracker_inference_states_by_obj_ids(self, inference_state, obj_ids):
        return [s for s in inference_state["tracker_inference_states"] if set(obj_ids) & set(s["obj_ids"])]

    def _prepare_backbone_feats(self, inference_state, frame_idx, reverse):
        self.run_backbone_and_detection(
            frame_idx=frame_idx, num_frames=inference_state["num_frames"],
            input_batch=inference_state["input_batch"],
            geometric_prompt=inference_state["per_frame_geometric_prompt"][frame_idx],
            feature_cache=inference_state["feature_cache"], reverse=reverse, allow_new_detections=True,
        )

    @torch.inference_mode()
    def add_prompt(self, inference_state, frame_idx, text_str=None, boxes_xywh=None, box_labels=None, points=None,
                   point_labels=None, obj_id=None, rel_coordinates=True):
        """Text/box prompts (see :meth:`Sam3VideoInference.add_prompt`) or, with ``points``, clicks
        for object ``obj_id`` (new or existing): points (N, 2) [x, y] relative to the frame
        (``rel_coordinates``) with labels (N,) 1 positive / 0 negative."""
        if points is not None:
            if text_str is not None or boxes_xywh is not None:
                raise ValueError("When points are provided, text and bounding_boxes must be None.")
            if obj_id is None:
                raise ValueError("When points are provided, obj_id must be provided.")
            return self.add_tracker_new_points(inference_state, frame_idx, obj_id=obj_id, points=points,
                                               labels=point_labels, rel_coordinates=rel_coordinates,
                                               use_prev_mem_frame=self.use_prev_mem_frame)
        return super().add_prompt(inference_state, frame_idx, text_str=text_str, boxes_xywh=boxes_xywh,
                                  box_labels=box_labels)

    def _check_points(self, inference_state, points, labels, rel_coordinates):
        if labels is None:
            raise ValueError("point_labels must be given with points")
        pts = torch.as_tensor(points, dtype=torch.float32)
        labs = torch.as_tensor(labels)
        if pts.dim() == 3 and pts.shape[0] == 1:
            pts = pts[0]
        if labs.dim() == 2 and labs.shape[0] == 1:
            labs = labs[0]
        if pts.dim() != 2 or pts.shape[-1] != 2 or pts.shape[0] == 0:
            raise ValueError(f"points must be (N, 2) [x, y], got {tuple(pts.shape)}")
        if labs.dim() != 1 or labs.shape[0] != pts.shape[0]:
            raise ValueError(f"point_labels must be ({pts.shape[0]},), got {tuple(labs.shape)}")
        if not bool(torch.isfinite(pts).all()):
            raise ValueError("points must be finite")
        hi = 1.0 if rel_coordinates else float(self.image_size)
        if bool((pts < 0).any()) or bool((pts > hi).any()):
            where = "relative coordinates in [0, 1]" if rel_coordinates else f"pixels in [0, {self.image_size}]"
            raise ValueError(f"points lie outside the frame: expected {where}, got {pts.tolist()}")

    @torch.inference_mode()
    def add_tracker_new_points(self, inference_state, frame_idx, obj_id, points, labels, rel_coordinates=True,
                               use_prev_mem_frame=False):
        """Clicks on ``frame_idx`` for ``obj_id``: a new object (new tracker state) or a refinement
        of an existing one. Returns ``(frame_idx, outputs)`` of that frame with all objects."""
        self._check_frame_index(inference_state, frame_idx)
        self._check_points(inference_state, points, labels, rel_coordinates)
        obj_id = int(obj_id)
        if frame_idx not in inference_state["cached_frame_outputs"]:
            raise RuntimeError(f"frame {frame_idx} has no outputs yet: add a prompt and propagate over it before "
                               "adding points there")
        tracker_metadata = inference_state["tracker_metadata"]
        if tracker_metadata == {}:
            tracker_metadata.update(self._initialize_metadata())
        obj_rank = self._get_gpu_id_by_obj_id(inference_state, obj_id)
        self._prepare_backbone_feats(inference_state, frame_idx, reverse=False)
        refined_before = self._has_object_been_refined(inference_state, obj_id)
        if obj_rank is not None and self.use_stateless_refinement and not refined_before:
            self.remove_object(inference_state, obj_id, is_user_action=False)
            obj_rank = None
        if obj_rank is None:
            num_prev_obj = np.sum(tracker_metadata["num_obj_per_gpu"])
            if num_prev_obj >= self.max_num_objects:
                logger.warning(f"add_tracker_new_points: cannot add a new object as we are already tracking "
                               f"{num_prev_obj=} masklets (under {self.max_num_objects=})")
                H = W = self.tracker.low_res_mask_size
                return frame_idx, [], torch.zeros(0, 1, H, W), torch.zeros(
                    0, 1, inference_state["orig_height"], inference_state["orig_width"])
            obj_rank = int(self._assign_new_det_to_gpus(1, tracker_metadata["num_obj_per_gpu"])[0])
            tracker_state = None
            if obj_rank == self.rank:
                tracker_state = self._init_new_tracker_state(inference_state)
                inference_state["tracker_inference_states"].append(tracker_state)
            # a clicked track: no first-detection frame (one rank: the last row)
            self._relayout_plan(tracker_metadata, np.append(np.arange(len(tracker_metadata["obj_ids_all_gpu"])), -1),
                                new_first_frame=NO_FRAME)
            tracker_metadata["obj_ids_per_gpu"][obj_rank] = np.concatenate(
                [tracker_metadata["obj_ids_per_gpu"][obj_rank], np.array([obj_id], dtype=np.int64)]
            )
            tracker_metadata["num_obj_per_gpu"][obj_rank] = len(tracker_metadata["obj_ids_per_gpu"][obj_rank])
            tracker_metadata["obj_ids_all_gpu"] = np.concatenate(tracker_metadata["obj_ids_per_gpu"])
            tracker_metadata["max_obj_id"] = max(tracker_metadata["max_obj_id"], obj_id)
            self.add_action_history(inference_state, "add", frame_idx=frame_idx, obj_ids=[obj_id])
        else:
            states = self._get_tracker_inference_states_by_obj_ids(inference_state, [obj_id])
            if len(states) != (1 if obj_rank == self.rank else 0):
                raise RuntimeError(f"internal error: {len(states)} tracker states hold object {obj_id} on rank "
                                   f"{self.rank} (its rank: {obj_rank})")
            tracker_state = states[0] if states else None
            self.add_action_history(inference_state, "refine", frame_idx=frame_idx, obj_ids=[obj_id])

        tracker_metadata["obj_id_to_score"][obj_id] = 1.0
        tracker_metadata["obj_id_to_tracker_score_frame_wise"][frame_idx][obj_id] = 1.0
        rank0 = tracker_metadata.get("rank0_metadata", {})
        if "removed_obj_ids" in rank0:
            rank0["removed_obj_ids"].discard(obj_id)
        if "suppressed_obj_ids" in rank0:
            for fid in rank0["suppressed_obj_ids"]:
                rank0["suppressed_obj_ids"][fid].discard(obj_id)
        if "masklet_confirmation" in rank0:
            inds = np.where(tracker_metadata["obj_ids_all_gpu"] == obj_id)[0]
            if len(inds) > 0 and inds[0] < len(rank0["masklet_confirmation"]["status"]):
                rank0["masklet_confirmation"]["status"][inds[0]] = 1
                rank0["masklet_confirmation"]["consecutive_det_num"][inds[0]] = \
                    self.masklet_confirmation_consecutive_det_thresh

        new_mask_data = None
        if tracker_state is not None:  # on the object's rank
            frame_idx, obj_ids, low_res_masks, video_res_masks = self.tracker.add_new_points(
                inference_state=tracker_state, frame_idx=frame_idx, obj_id=obj_id, points=points, labels=labels,
                clear_old_points=True, rel_coordinates=rel_coordinates, use_prev_mem_frame=use_prev_mem_frame,
            )
            if video_res_masks is not None and len(video_res_masks) > 0:
                video_res_masks = fill_holes_in_mask_scores(video_res_masks, max_area=self.fill_hole_area,
                                                            fill_holes=True, remove_sprinkles=True)
            self.tracker.propagate_in_video_preflight(tracker_state, run_mem_encoder=True)
            self.clear_detector_added_cond_frame_in_tracker(tracker_state, obj_id, frame_idx)
            new_mask_data = (video_res_masks[obj_ids.index(obj_id)] > 0.0) if len(obj_ids) > 0 else None
        if self.world_size > 1:
            new_mask_data = self._share_click_mask(new_mask_data, obj_rank, inference_state)
        obj_id_to_mask = self._build_tracker_output(
            inference_state, frame_idx, {obj_id: new_mask_data} if new_mask_data is not None else None
        )
        return self._tracker_frame_output(inference_state, frame_idx, obj_id_to_mask)

    def _tracker_frame_output(self, inference_state, frame_idx, obj_id_to_mask, cache=True):
        """``(frame_idx, outputs)`` of a frame whose masks came from the tracker alone (a click, a
        partial propagation or a fetch of cached outputs), with the session's scores and the
        frame's suppressed objects hidden; ``cache``: remember the masks for later fetches."""
        tracker_metadata = inference_state["tracker_metadata"]
        out = {
            "obj_id_to_mask": obj_id_to_mask,
            "obj_id_to_score": tracker_metadata["obj_id_to_score"],
            "obj_id_to_tracker_score": tracker_metadata["obj_id_to_tracker_score_frame_wise"][frame_idx],
        }
        suppressed = tracker_metadata["rank0_metadata"]["suppressed_obj_ids"][frame_idx]
        if cache:
            self._cache_frame_outputs(inference_state, frame_idx, obj_id_to_mask, suppressed_obj_ids=suppressed)
        return frame_idx, self._postprocess_output(inference_state, out, suppressed_obj_ids=suppressed)

    def _convert_low_res_mask_to_video_res(self, low_res_mask, inference_state):
        """(h, w) logits -> (1, H_video, W_video) bool (bilinear, > 0)."""
        if low_res_mask is None:
            return None
        size = (inference_state["orig_height"], inference_state["orig_width"])
        m = F.interpolate(low_res_mask[None, None].float(), size=size, mode="bilinear", align_corners=False)
        return m.squeeze(0) > 0.0

    def clear_detector_added_cond_frame_in_tracker(self, tracker_state, obj_id, refined_frame_idx):
        """Drop the detector's mask-only conditioning frames within the refinement window of a
        user-refined frame, so the tracker may update its masks there."""
        obj_idx = self.tracker._obj_id_to_idx(tracker_state, obj_id)
        window = self.refinement_detector_cond_frame_removal_window
        frames = [f for f in tracker_state["mask_inputs_per_obj"][obj_idx]
                  if f not in tracker_state["point_inputs_per_obj"][obj_idx] and abs(f - refined_frame_idx) <= window]
        for f in frames:
            for obj_id2 in list(tracker_state["obj_id_to_idx"].keys()):
                self.tracker.clear_all_points_in_frame(tracker_state, f, obj_id2, need_output=False)
