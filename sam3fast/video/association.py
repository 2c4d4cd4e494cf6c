"""Detection-to-track association on fixed-shape tensors, with no host sync.

The official ``Sam3VideoBase._associate_det_trk`` (and its sam3fast port in
``sam3fast.video.inference``) takes the thresholded detections and the current tracks, moves the
IoU matrix to the host and answers with numpy index arrays and dicts, whose sizes depend on the
data. This function answers the same questions for padded inputs (a capacity of Q detection slots
and K track slots, each with a validity mask) with tensors of fixed shapes, so the video step can
consume them on the device; the host reads them, if at all, with one copy.

Letters: Q detection slots, K track slots, (H, W) mask grid.

Inputs
    det_masks  (Q, H, W) mask logits (foreground = logit > 0); det_scores (Q,); det_valid (Q,) bool
    trk_masks  (K, h, w) mask logits; trk_valid (K,) bool
    The larger of the two grids is resized (bilinear, align_corners=False) to the smaller, as the
    official does (which measures track emptiness on the original grid when no detection is
    valid).

Rules (the official's, with D the valid detections and T the valid tracks):
    iou[d, t]          mask IoU (intersection / max(union, 1)); 0 outside D x T
    trk_nonempty[t]    t in T and its mask has a foreground pixel
    trk_matched[t]     greedy: some d in D with iou >= trk_assoc_iou_thresh; one-to-one
                       (``o2o``): t is paired with some d by a minimum-cost assignment of
                       1 - iou on D x T and that pair's iou >= trk_assoc_iou_thresh
    unmatched_trk[t]   trk_nonempty & ~trk_matched;  empty_trk[t]: t in T & ~trk_nonempty
    new_det[d]         d in D and (no valid track at all, or score >= new_det_thresh and no t with
                       iou >= assoc_iou_thresh)  (the official returns every detection as new
                       when there is no track, whatever its score)
    det_matches[d, t]  iou >= assoc_iou_thresh on D x T (``det_to_matched_trk_obj_ids``)
    trk_high_conf_det[t]  the detection used to re-condition t, -1 if none: among the d in D with
                       score >= 0.8, not new, and max_t iou >= 0.8, the one with the largest index
                       whose argmax track (first maximum) is t (the official fills a dict in
                       detection order, so the last one wins)

One-to-one matching with padding: invalid rows and columns cost a constant larger than any sum
of valid costs, so the assignment first pairs as many valid detections with valid tracks as
possible (all of the smaller set, as scipy on the D x T sub-matrix does), then minimises their
cost: the same optimum. Among several optimal assignments (exact ties in IoU) the pick may differ
from scipy's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AssociationResult", "associate_detections", "HIGH_CONF_THRESH", "HIGH_IOU_THRESH"]

HIGH_CONF_THRESH = 0.8
HIGH_IOU_THRESH = 0.8


class AssociationResult(NamedTuple):
    iou: Tensor  # (Q, K) float32
    new_det: Tensor  # (Q,) bool
    det_matches: Tensor  # (Q, K) bool
    trk_matched: Tensor  # (K,) bool
    trk_nonempty: Tensor  # (K,) bool
    unmatched_trk: Tensor  # (K,) bool
    empty_trk: Tensor  # (K,) bool
    trk_high_conf_det: Tensor  # (K,) int64, -1 = none
    det_high_conf: Tensor  # (Q,) bool: the detections that re-condition their best track
    det_best_trk: Tensor  # (Q,) int64: each detection's best track (first maximum of its IoU row)


def _mask_iou(a: Tensor, b: Tensor) -> Tensor:
    if a.is_cuda:
        from ..mask_ops import mask_iou, pack_masks

        return mask_iou(pack_masks(a), pack_masks(b))
    from .detector import mask_iou_matrix

    return mask_iou_matrix(a, b)


def associate_detections(
    det_masks: Tensor,
    det_scores: Tensor,
    det_valid: Tensor,
    trk_masks: Tensor,
    trk_valid: Tensor,
    *,
    assoc_iou_thresh: float = 0.5,
    trk_assoc_iou_thresh: float = 0.5,
    new_det_thresh: float = 0.0,
    o2o: bool = False,
) -> AssociationResult:
    """See the module docstring. All outputs live on the inputs' device; no host sync (the
    one-to-one mode uses ``sam3fast.ops.batched_linear_sum_assignment``, sync-free on CUDA)."""
    Q, K = det_masks.shape[0], trk_masks.shape[0]
    if det_scores.shape != (Q,) or det_valid.shape != (Q,) or trk_valid.shape != (K,):
        raise ValueError(f"associate_detections: det_scores/det_valid must be ({Q},), trk_valid ({K},); got "
                         f"{tuple(det_scores.shape)}, {tuple(det_valid.shape)}, {tuple(trk_valid.shape)}")
    device = det_masks.device
    orig_trk = None
    if K and Q and det_masks.shape[-2:] != trk_masks.shape[-2:]:
        if det_masks.shape[-2] * det_masks.shape[-1] < trk_masks.shape[-2] * trk_masks.shape[-1]:
            orig_trk = trk_masks
            trk_masks = F.interpolate(trk_masks.unsqueeze(1).float(), size=det_masks.shape[-2:], mode="bilinear",
                                      align_corners=False).squeeze(1)
        else:
            det_masks = F.interpolate(det_masks.unsqueeze(1).float(), size=trk_masks.shape[-2:], mode="bilinear",
                                      align_corners=False).squeeze(1)
    det_bin = det_masks > 0
    trk_bin = trk_masks > 0
    pair_valid = det_valid[:, None] & trk_valid[None, :]
    if Q and K:
        iou = torch.where(pair_valid, _mask_iou(det_bin, trk_bin), 0.0)
    else:
        iou = torch.zeros(Q, K, device=device)
    trk_nonempty = trk_valid & trk_bin.flatten(1).any(1)
    if orig_trk is not None:
        # the official measures emptiness on the resized tracks only when there are detections
        trk_nonempty = torch.where(det_valid.any(), trk_nonempty, trk_valid & (orig_trk > 0).flatten(1).any(1))

    if o2o and Q and K:
        from ..ops import batched_linear_sum_assignment

        big = float(min(Q, K) + 1)  # > any sum of valid costs (each <= 1)
        cost = torch.where(pair_valid, 1.0 - iou.double(), big)
        assign = batched_linear_sum_assignment(cost)  # (Q,) column per row, -1 = none
        rows = torch.arange(Q, device=device)
        col = assign.clamp(min=0)
        paired = (assign >= 0) & pair_valid[rows, col] & (iou[rows, col] >= trk_assoc_iou_thresh)
        trk_matched = torch.zeros(K, dtype=torch.bool, device=device).index_put_((col,), paired, accumulate=True)
    else:
        trk_matched = (pair_valid & (iou >= trk_assoc_iou_thresh)).any(0)
    unmatched_trk = trk_nonempty & ~trk_matched
    empty_trk = trk_valid & ~trk_nonempty

    det_matches = pair_valid & (iou >= assoc_iou_thresh)
    no_track = ~trk_valid.any()
    new_det = det_valid & (no_track | ((det_scores >= new_det_thresh) & ~det_matches.any(1)))

    # re-conditioning: per track, the last high-confidence, high-IoU detection whose best track it is
    if K:
        best_iou, best_trk = iou.amax(1), iou.argmax(1)  # (argmax: the first maximum, as numpy's)
    else:
        best_iou, best_trk = torch.zeros(Q, device=device), torch.zeros(Q, dtype=torch.long, device=device)
    high = det_valid & (det_scores >= HIGH_CONF_THRESH) & ~new_det & (best_iou >= HIGH_IOU_THRESH)
    det_idx = torch.where(high, torch.arange(Q, device=device), -1)
    trk_high_conf_det = torch.full((K,), -1, dtype=torch.long, device=device)
    if Q and K:
        trk_high_conf_det = trk_high_conf_det.scatter_reduce(0, best_trk, det_idx, reduce="amax")
    return AssociationResult(iou, new_det, det_matches, trk_matched, trk_nonempty, unmatched_trk, empty_trk,
                             trk_high_conf_det, high, best_trk)
