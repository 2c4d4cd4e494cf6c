"""The concept-video planning decisions (boundary rule, object limit, new ids, hotstart removal and
suppression) as fixed-shape tensor ops on the device, with no host sync.

``Sam3VideoBase.run_tracker_update_planning_phase`` reads the frame's association to the host and
decides there, on numpy and per-object dicts (``_suppress_detections_close_to_boundary``,
``_drop_new_det_with_obj_limit``, ``_process_hotstart``). :func:`plan_frame` makes the same
decisions from the device association (:class:`~sam3fast.video.association.AssociationResult`)
and a small per-track state (:class:`PlanState`), and packs what the host needs in one flat int64
tensor (:func:`decode_plan`), so the host learns the whole plan with the one planning read.

Letters: Q detection slots, M current tracks (rows in ``obj_ids_all_gpu`` order), M' tracks of the
next frame (kept rows in order, then the new tracks in id order).

Rules (sam3fast's host code, which is the official's; t = frame_idx, "new" = ``assoc.new_det``)
    boundary       with ``suppress_det_close_to_boundary``: a new detection stays new only when its
                   box (normalised xyxy) has its centre strictly inside [0.025, 0.975]^2
    limit          n = number of new detections; when not ``is_image_only`` and M + n >
                   ``max_num_objects``: the kept ones are the max(max_num_objects - M, 0) first
                   in the order ``np.argsort(scores)[::-1]`` and the dropped count is
                   n - (max_num_objects - M); otherwise all are kept, in slot order, 0 dropped
    new ids        max_obj_id + 1 + rank, rank = position in the order above (the host adds them)
    keep-alive     new tracks: ``init_trk_keep_alive``; then, in this order, tracks matched by some
                   valid detection (``det_matches``): min(max, k + 1); unmatched tracks: max(min,
                   k - 1); with ``decrease_trk_keep_alive_for_empty_masklets``, empty tracks:
                   max(min, k - 1)
    within(j)      j has a first-detection frame f and f > t - hotstart_delay (forward),
                   f < t + hotstart_delay (reverse); never for clicked objects (no f)
    unmatched(j)   frames on which j was unmatched (this one included); removed when
                   unmatched(j) >= max(hotstart_unmatch_thresh, 1) and within(j)
    suppressed(j)  unless ``suppress_unmatched_only_within_hotstart``: unmatched(j) >= 1,
                   keep-alive(j) <= 0 and j not removed by the rule above (a track removed by
                   the duplicate rule below on this frame is suppressed too, as officially)
    pairs          each valid detection matched to >= 2 tracks names its first-appearing track i
                   (smallest f forward, largest reverse, no f counting as -inf / +inf, ties: the
                   first in row order) and adds one frame to pair (i, j) for every other matched j;
                   j is removed when some pair (i, j) has >= max(hotstart_dup_thresh, 1) frames
                   and within(j) (and it was not removed by the unmatched rule)
The max(thresh, 1) reads the official ``len(frame_indices) >= thresh`` over dict keys that exist
only once a frame was appended (thresholds of 0, as in the no-heuristics preset, still need one).

Tie order of the object limit: ``np.argsort`` (numpy's default ``quicksort`` kind) leaves the
order of equal scores open, and what it gives depends on the numpy build and the CPU: numpy 2.3.5
on an AVX-512 CPU (float32, SIMD sorting networks) reorders ties among as few as 4 elements, the
scalar path sorts up to 16 elements by insertion (stable). No device rule can follow that, so the
device takes the stable reading, ``np.argsort(s, kind="stable")[::-1]``: descending score, and
among equal scores the larger slot first (what every path gives when all scores are equal).
Scores of saturated logits are exactly 1.0, so ties at the top do occur; then which of the tied
detections gets which id, or is dropped at the cut, can differ from the host path (the kept
scores, in id order, cannot).

Why counts over the current tracks are enough. The official ``rank0_metadata`` keys everything by
object id over the whole session: ``obj_first_frame_idx``, ``unmatched_frame_inds`` (id -> list
of frames), ``trk_keep_alive`` (defaultdict(int)), ``overlap_pair_to_frame_inds`` ((first, id)
-> list of frames). The rules read the lists only by their length, and a key exists only once a
frame was appended to it, so a count per track (``unmatched``, ``pairs``) holds the same
information; "ever unmatched" is ``unmatched > 0``. A keep-alive never set reads as 0 (the
default), which is what a clicked track gets. What the state drops and why no decision changes:

* entries of ids removed by hotstart: every rule skips ids in ``removed_obj_ids``, and planning
  never brings an id back (new ids are max_obj_id + 1 + rank, above every id ever used);
* entries of an id the user removed (``remove_object``: not in ``removed_obj_ids``) or of an id a
  click re-adds (the official resumes its old counts): after either edit the interactive action
  history (``parse_action_history_for_propagation``) allows only partial propagations and
  fetches, which do not plan, until ``add_prompt`` resets the session; and a user-removed id that
  the official would still list as removed or suppressed on a later frame is not tracked, so no
  output changes;
* pairs (i, j) whose second j has left: the rule reads a pair only for its second;
* first frames of ids that left: read only for tracked objects (``within`` and first-appearance).

Kept instead of dropped: the counts of pairs (i, j) whose first-appearing track i has left while
j is still tracked. The official goes on reading them in j's removal rule; they can no longer
grow (i is matched to nothing), so their maximum per j (``pairs_orphan``) is all the rule needs.
They can change a decision: ``within`` only turns false along one run (forward, f > t - delay
fails as t grows; reverse, f < t + delay fails as t falls), but a later run can make it true
again. E.g. (delay 15, thresholds 8) a reverse run from frame 60 detects i at 60 and j at 50 and
counts 8 duplicate frames of (i, j) on frames 35..28, where j is out of its hotstart; a forward
run from 65 removes i (unmatched on 8 frames, i within, j not); a third run, reverse from 60, has
j within again, and the official removes j on its first frame for the pair (i, j).

Device-side, no host sync and no Python branch on tensor values (branches on shapes and settings
only): every output has a fixed shape given (Q, M); the re-layout takes a host-built index tensor.

Memory: the pair counts are an (M, M) int64 matrix, and a frame makes a few temporaries of that
size: 8 MB each at 1000 tracks, 200 MB at 5000 (the official's dict grows with the pairs seen
only). SAM 3 videos track tens of objects; ``device_planning = False`` is the way out for
thousands.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .association import AssociationResult

__all__ = ["NO_FRAME", "PlanSettings", "PlanState", "FramePlan", "device_plan_refusal", "empty_state",
           "plan_frame", "plan_size", "decode_plan", "layout_rows", "next_state"]

NO_FRAME = -1  # first-detection frame of a track that has none (an object added by clicks)
_BIG = 1 << 62  # first-appearance key of a track without a first frame: beyond every frame index
_PLAN_HEADER = 3  # num_new, num_dropped, num_new_before_limit


@dataclass(frozen=True)
class PlanSettings:
    """The planning attributes of ``Sam3VideoBase`` (defaults: its constructor's).
    ``max_num_objects`` as the model holds it (10000 stands for "no limit")."""

    hotstart_delay: int = 0
    hotstart_unmatch_thresh: int = 3
    hotstart_dup_thresh: int = 3
    suppress_unmatched_only_within_hotstart: bool = True
    init_trk_keep_alive: int = 0
    max_trk_keep_alive: int = 8
    min_trk_keep_alive: int = -4
    decrease_trk_keep_alive_for_empty_masklets: bool = False
    max_num_objects: int = 10000
    suppress_det_close_to_boundary: bool = False

    @classmethod
    def from_model(cls, model) -> "PlanSettings":
        return cls(**{f.name: getattr(model, f.name) for f in fields(cls)})


class PlanState(NamedTuple):
    """Hotstart bookkeeping of the M current tracks (rows in ``obj_ids_all_gpu`` order), int64."""

    first_frame: Tensor  # (M,) first-detection frame, NO_FRAME for none
    unmatched: Tensor  # (M,) frames on which the track was unmatched
    keep_alive: Tensor  # (M,)
    pairs: Tensor  # (M, M) [i, j]: frames on which j duplicated first-appearing i
    pairs_orphan: Tensor  # (M,) most frames of a pair (i, j) whose first i is no longer tracked


class FramePlan(NamedTuple):
    """One frame's decisions (see the module docstring); ``flat`` packs them for the host."""

    new_det: Tensor  # (Q,) bool: the kept new detections
    new_rank: Tensor  # (Q,) int64: the kept detection's position among the new ids, -1 elsewhere
    removed: Tensor  # (M,) bool: tracks removed by hotstart on this frame
    suppressed: Tensor  # (M,) bool: tracks added to this frame's suppressed set
    num_new: Tensor  # () int64
    num_dropped: Tensor  # () int64: ``num_obj_dropped_due_to_limit``
    num_new_before_limit: Tensor  # () int64: new detections after the boundary rule
    flat: Tensor  # (plan_size(Q, M),) int64, see :func:`decode_plan`


def device_plan_refusal(model) -> Optional[str]:
    """Why ``model`` (a ``Sam3VideoBase``) cannot plan on the device, None when it can: the
    integration then keeps the host path."""
    from .inference import Sam3VideoBase

    if getattr(model, "masklet_confirmation_enable", False):
        return "masklet confirmation (masklet_confirmation_enable=True) keeps per-object status on the host"
    if getattr(model, "world_size", 1) > 1:
        return f"world_size={model.world_size}: rank 0 plans on the host and broadcasts the plan"
    for name in ("_process_hotstart", "_drop_new_det_with_obj_limit", "_suppress_detections_close_to_boundary"):
        if getattr(type(model), name, None) is not getattr(Sam3VideoBase, name):
            return f"{type(model).__name__} does not use Sam3VideoBase.{name}"
    return None


def empty_state(device) -> PlanState:
    """The state of a session without tracks (M = 0)."""
    z = torch.zeros(0, dtype=torch.long, device=device)
    return PlanState(z, z, z, z.reshape(0, 0), z)


def _inside_boundary(boxes_xyxy: Tensor, margin: float = 0.025) -> Tensor:
    # the same elementwise ops as Sam3VideoBase._suppress_detections_close_to_boundary
    x_min, y_min, x_max, y_max = boxes_xyxy.unbind(-1)
    x_c = (x_min + x_max) / 2
    y_c = (y_min + y_max) / 2
    return (x_c > margin) & (x_c < 1.0 - margin) & (y_c > margin) & (y_c < 1.0 - margin)


def plan_frame(
    state: PlanState,
    assoc: AssociationResult,
    det_scores: Tensor,
    det_boxes_xyxy: Optional[Tensor] = None,
    *,
    frame_idx: Union[int, Tensor],
    reverse: bool,
    settings: PlanSettings,
    is_image_only: bool = False,
) -> tuple[FramePlan, PlanState]:
    """One frame's plan from the association of Q detection slots with the M tracks of ``state``
    (``assoc`` from ``associate_detections`` with every one of the M tracks valid, as
    ``Sam3VideoBase._associate`` calls it; its ``new_det`` and ``det_matches`` already exclude
    invalid slots). ``det_scores`` (Q,) as the host reads them (compared in float32);
    ``det_boxes_xyxy`` (Q, 4) normalised, read only with ``suppress_det_close_to_boundary``;
    ``frame_idx`` an int or a 0-d int64 tensor on the device (one graph for every frame).

    Returns ``(plan, updated)``: ``updated`` is ``state`` after this frame over the same M rows
    (removed tracks still in it); :func:`next_state` moves it to the next frame's layout. The
    number of tracks M is the state's (``np.sum(num_obj_per_gpu)`` on one process)."""
    s = settings
    dev = assoc.new_det.device
    Q, M = assoc.new_det.shape[0], state.first_frame.shape[0]
    if assoc.det_matches.shape != (Q, M) or det_scores.shape != (Q,):
        raise ValueError(f"plan_frame: state of {M} tracks, association {tuple(assoc.det_matches.shape)}, "
                         f"scores {tuple(det_scores.shape)}; expected ({Q}, {M}) and ({Q},)")
    if s.suppress_det_close_to_boundary and det_boxes_xyxy is None:
        raise ValueError("plan_frame: suppress_det_close_to_boundary needs det_boxes_xyxy")
    slots = torch.arange(Q, device=dev)

    # new detections: boundary rule, then the object limit
    new_det = assoc.new_det
    if s.suppress_det_close_to_boundary:
        new_det = new_det & _inside_boundary(det_boxes_xyxy)
    num_before = new_det.sum()
    rank_slot = torch.cumsum(new_det.long(), 0) - 1
    if is_image_only:
        hit = torch.zeros((), dtype=torch.bool, device=dev)
    else:
        hit = num_before + M > s.max_num_objects
    cap = s.max_num_objects - M
    num_keep = torch.where(hit, max(cap, 0), num_before)
    num_dropped = torch.where(hit, num_before - cap, 0)
    sc = det_scores.float()
    # [d, e]: new detection e comes before d in np.argsort(scores, kind="stable")[::-1]
    ahead = new_det[None, :] & ((sc[None, :] > sc[:, None])
                                | ((sc[None, :] == sc[:, None]) & (slots[None, :] > slots[:, None])))
    rank = torch.where(hit, ahead.sum(1), rank_slot)
    kept = new_det & (rank < num_keep)
    new_rank = torch.where(kept, rank, -1)
    num_new = kept.sum()

    # hotstart
    first = state.first_frame
    has_first = first != NO_FRAME
    if reverse:
        within = has_first & (first < frame_idx + s.hotstart_delay)
    else:
        within = has_first & (first > frame_idx - s.hotstart_delay)
    matched = assoc.det_matches.any(0)
    keep_alive = torch.where(matched, (state.keep_alive + 1).clamp(max=s.max_trk_keep_alive), state.keep_alive)
    keep_alive = torch.where(assoc.unmatched_trk, (keep_alive - 1).clamp(min=s.min_trk_keep_alive), keep_alive)
    if s.decrease_trk_keep_alive_for_empty_masklets:
        keep_alive = torch.where(assoc.empty_trk, (keep_alive - 1).clamp(min=s.min_trk_keep_alive), keep_alive)
    unmatched = state.unmatched + assoc.unmatched_trk.long()
    removed_unmatched = (unmatched >= max(s.hotstart_unmatch_thresh, 1)) & within
    if s.suppress_unmatched_only_within_hotstart:
        suppressed = torch.zeros(M, dtype=torch.bool, device=dev)
    else:
        suppressed = (unmatched > 0) & (keep_alive <= 0) & ~removed_unmatched

    pairs = state.pairs
    if M > 0:
        matches = assoc.det_matches
        if reverse:
            key = torch.where(matches, torch.where(has_first, first, _BIG)[None, :], -_BIG - 1)
            first_row = key.argmax(1)  # (the first maximum, as Python's max)
        else:
            key = torch.where(matches, torch.where(has_first, first, -_BIG)[None, :], _BIG + 1)
            first_row = key.argmin(1)
        # (a detection matched to one track adds only to the diagonal, which is cleared)
        eye = torch.eye(M, dtype=torch.bool, device=dev)
        pairs = pairs + torch.zeros_like(pairs).index_add_(0, first_row, matches.long()).masked_fill_(eye, 0)
        dup_frames = torch.maximum(pairs.amax(0), state.pairs_orphan)
        removed = removed_unmatched | ((dup_frames >= max(s.hotstart_dup_thresh, 1)) & within)
    else:
        removed = removed_unmatched

    order = torch.full((Q + 1,), -1, dtype=torch.long, device=dev).scatter_(0, torch.where(kept, rank, Q), slots)
    flat = torch.cat([torch.stack([num_new, num_dropped, num_before]), order[:Q], removed.long(), suppressed.long()])
    plan = FramePlan(kept, new_rank, removed, suppressed, num_new, num_dropped, num_before, flat)
    return plan, PlanState(first, unmatched, keep_alive, pairs, state.pairs_orphan)


def plan_size(Q: int, M: int) -> int:
    return _PLAN_HEADER + Q + 2 * M


def decode_plan(flat: np.ndarray, Q: int, M: int) -> Dict[str, Any]:
    """The host's view of ``FramePlan.flat`` (int64, or float64 after a concatenation with other
    values read in the same copy: every entry is a small integer). Layout, (plan_size(Q, M),):

    ====================  =====  ======================================================
    offset                size   value
    ====================  =====  ======================================================
    0                     1      num_new: new tracks on this frame
    1                     1      num_obj_dropped_due_to_limit
    2                     1      new detections before the object limit
    3                     Q      detection slot of the k-th new id (k < num_new), then -1
    3 + Q                 M      removed (0/1) per track row
    3 + Q + M             M      suppressed (0/1) per track row
    ====================  =====  ======================================================

    Returns ``new_det_fa_inds`` (num_new,) int64 in id order, ``num_obj_dropped_due_to_limit``,
    ``num_new_before_limit``, ``removed`` and ``suppressed`` (M,) bool."""
    flat = np.asarray(flat)
    if flat.shape != (plan_size(Q, M),):
        raise ValueError(f"decode_plan: expected ({plan_size(Q, M)},) for Q={Q}, M={M}, got {flat.shape}")
    flat = flat.astype(np.int64)
    num_new, num_dropped, num_before = (int(x) for x in flat[:_PLAN_HEADER])
    o = _PLAN_HEADER
    return {
        "new_det_fa_inds": flat[o:o + num_new].copy(),
        "num_obj_dropped_due_to_limit": num_dropped,
        "num_new_before_limit": num_before,
        "removed": flat[o + Q:o + Q + M].astype(bool),
        "suppressed": flat[o + Q + M:o + Q + 2 * M].astype(bool),
    }


def layout_rows(removed: np.ndarray, num_new: int) -> np.ndarray:
    """The next frame's rows for :func:`next_state`: the indices of the rows not ``removed`` (M,)
    in order, then -1 for each of the ``num_new`` new tracks. (M',) int64."""
    return np.concatenate([np.flatnonzero(~np.asarray(removed, bool)), np.full(num_new, -1)]).astype(np.int64)


def next_state(state: PlanState, rows: Tensor, *, new_first_frame: int, new_keep_alive: int) -> PlanState:
    """``state`` (M rows, after :func:`plan_frame`) in the layout ``rows`` (M',) int64: row i of the
    result is row ``rows[i]`` of ``state``, or a new track where ``rows[i] == -1``, with first frame
    ``new_first_frame`` (the frame index for detected tracks, NO_FRAME for clicked ones),
    keep-alive ``new_keep_alive`` (``init_trk_keep_alive`` for detected tracks, 0 for clicked
    ones), no unmatched frame and no pair. ``rows`` may live on the host (pinned): it is copied
    without a sync. The count of a pair (i, j) whose first row i is left out folds into
    ``pairs_orphan`` of j."""
    dev = state.first_frame.device
    rows = rows.to(dev, non_blocking=True)
    M, M_next = state.first_frame.shape[0], rows.shape[0]
    new = rows < 0
    if M == 0:
        z = torch.zeros(M_next, dtype=torch.long, device=dev)
        return PlanState(z + new_first_frame, z, z + new_keep_alive, z[:, None] * z[None, :], z)
    kept = torch.zeros(M + 1, dtype=torch.bool, device=dev).scatter_(0, torch.where(new, M, rows), True)[:M]
    orphan = torch.maximum(state.pairs_orphan, state.pairs.masked_fill(kept[:, None], 0).amax(0))
    idx = rows.clamp(min=0)
    both = ~new[:, None] & ~new[None, :]
    return PlanState(
        first_frame=torch.where(new, new_first_frame, state.first_frame[idx]),
        unmatched=torch.where(new, 0, state.unmatched[idx]),
        keep_alive=torch.where(new, new_keep_alive, state.keep_alive[idx]),
        pairs=torch.where(both, state.pairs[idx][:, idx], 0),
        pairs_orphan=torch.where(new, 0, orphan[idx]),
    )
