"""Fixed-capacity memory bank: the tracker's memory selection as tensor ops, with no host sync.

The official ``_prepare_memory_conditioned_features`` (with memory selection, SAM 3's default)
rebuilds the memory every frame from Python dicts: ``frame_filter`` scans the stored frames and
reads each one's ``eff_iou_score`` on the host (a sync per stored frame), then stacks a variable
number of memory frames and pointers. This bank keeps the same information in preallocated
tensors and gives the memory-attention inputs a static shape plus a validity mask, so one frame
of tracking needs no host round trip and is ready for CUDA-graph capture.

Letters (as in ``sam3fast.model.memory_attention``): B objects, M mem_dim, D d_model, (h, w) the
feature grid, L = h * w, C conditioning frames, G = min(num_frames, max_obj_ptrs_in_encoder) - 1
the length cap of the official frame list, F = num_maskmem - 2 ring slots for memory features.

The official list for frame t (forward; reverse mirrors it), ``valid_indices``:
    the (up to G) most recent stored non-conditioning frames in 1 .. t-1 whose eff_iou_score
    > mf_threshold ("good" frames, oldest first), then t-1 appended if it is not among them.
Memory frame ``t_rel`` (1 .. num_maskmem - 1) is ``valid_indices[-t_rel]`` with temporal index
``t_pos = num_maskmem - t_rel``; pointer ``t_diff`` (1 .. len - 1) is ``valid_indices[-t_diff]``.

The key fact: frame t-1 (the "last" frame) is always at position -1, whether it is good (then it
is the newest good frame) or not (then it is appended); it may hold nothing (a conditioning frame,
or a frame never tracked). Every other list entry is a good frame before t-1, at position
-(r + 2) for recency rank r (0 = newest). So the bank keeps:

- a ring of good frames before t-1: features for the F newest (``ring_feat`` (B, F, M, h, w)),
  pointers for the G newest (``ring_ptr`` (B, G, D)), and ``count``, the number pushed;
- the last frame: ``last_feat``, ``last_ptr``, ``last_content`` (holds an output), ``last_good``;
- the conditioning frames (all of them are attended: the fast path requires that).

With g = last_good and n = min(count + g, G) + (1 - g) list entries:
    ring rank r is listed iff r < min(count, G - g)
    memory: ring rank r at t_rel = r + 2 (valid iff listed and r < F); last at t_rel = 1 (valid iff
            it holds content)
    pointers: ring rank r at t_diff = r + 2 (valid iff listed and r + 2 <= n - 1); last at t_diff 1
            (valid iff content and n >= 2); conditioning frame c at (t - c) * sign, valid iff it is
            not in the future (c <= t forward, c >= t reverse)
Moving to frame t+1 (``advance``) pushes the last frame into the ring if it is good (a masked
write at a tensor index: no sync) and makes frame t the last one.

Token order differs from the official (conditioning, ring slots, last; then the pointers in the
same order): attention does not depend on key order, and every key carries its own temporal
encoding, so outputs agree to float rounding. Every row keeps at least one valid key (the
conditioning frames).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..model.memory_attention import assemble_memory

__all__ = ["BankSpec", "BankState", "MemoryBank", "bank_memory"]


class BankSpec(NamedTuple):
    """The bank's static facts (Python ints: part of a compiled graph's key)."""

    num_maskmem: int  # the tracker's num_maskmem (7)
    F: int  # ring slots with features: num_maskmem - 2
    G: int  # length cap of the official list: min(num_frames, max_obj_ptrs_in_encoder) - 1
    ptr_norm: int  # min(num_frames, max_obj_ptrs_in_encoder): pointer distances are divided by it - 1
    sign: int  # 1 forward, -1 reverse


class BankState(NamedTuple):
    """The bank's tensors (all on one device; updated in place between frames)."""

    ring_feat: Tensor  # (B, F, M, h, w) good frames before the last one, ring order
    ring_ptr: Tensor  # (B, G, D)
    count: Tensor  # () long: good frames pushed so far
    last_feat: Tensor  # (B, M, h, w) the last frame handled
    last_ptr: Tensor  # (B, D)
    last_content: Tensor  # () bool: the last frame holds an output
    last_good: Tensor  # () bool: ... whose eff_iou_score passed the threshold
    cond_feats: Tensor  # (B, C, M, h, w) every conditioning frame
    cond_ptrs: Tensor  # (B, C, D)
    cond_frames: Tensor  # (C,) long
    maskmem_pos: Tensor  # (1, M, h, w) the memory's sine position (the same for every frame)


def bank_memory(
    spec: BankSpec,
    st: BankState,
    frame_idx: Tensor,
    no_prev: bool,
    maskmem_tpos_enc: Tensor,
    obj_ptr_tpos_proj: nn.Module,
) -> Tuple[Tensor, Tensor, int, Tensor]:
    """Memory-attention inputs for ``frame_idx`` (a 0-d long tensor):
    ``(memory (B, S, M), memory_pos (B, S, M), num_obj_ptr_tokens, memory_valid (B, S) bool)``
    with S = (C + F + 1) * L + (C + G + 1) * D / M. ``no_prev``: the official frame list is
    empty (frame 0 forward / the last frame in reverse): only conditioning frames count.
    Tensor ops only (no host sync; static shapes)."""
    B, C, M = st.cond_feats.shape[:3]
    L = st.cond_feats.shape[-1] * st.cond_feats.shape[-2]
    D = st.cond_ptrs.shape[-1]
    split = D // M if M < D else 1
    dev = st.count.device
    count, g = st.count, st.last_good.long()
    ring_rank_f = (count - 1 - torch.arange(spec.F, device=dev)) % spec.F
    ring_rank_g = (count - 1 - torch.arange(spec.G, device=dev)) % spec.G
    n_good_listed = torch.minimum(count, spec.G - g)  # ring ranks < this are listed
    n_list = torch.clamp(count + g, max=spec.G) + (1 - g)
    feat_ok = ring_rank_f < n_good_listed
    ptr_ok = (ring_rank_g < n_good_listed) & (ring_rank_g + 2 <= n_list - 1)
    last_feat_ok = st.last_content.view(1)
    last_ptr_ok = (st.last_content & (n_list >= 2)).view(1)
    if no_prev:
        feat_ok, ptr_ok = torch.zeros_like(feat_ok), torch.zeros_like(ptr_ok)
        last_feat_ok, last_ptr_ok = torch.zeros_like(last_feat_ok), torch.zeros_like(last_ptr_ok)

    feats = torch.cat((st.cond_feats, st.ring_feat, st.last_feat.unsqueeze(1)), dim=1)
    t_pos = torch.cat((torch.zeros(C, dtype=torch.long, device=dev),
                       spec.num_maskmem - (ring_rank_f + 2).clamp(max=spec.num_maskmem - 1),
                       torch.full((1,), spec.num_maskmem - 1, dtype=torch.long, device=dev)))
    ptrs = torch.cat((st.cond_ptrs, st.ring_ptr, st.last_ptr.unsqueeze(1)), dim=1)
    cond_dist = (frame_idx - st.cond_frames) * spec.sign
    ptr_tpos = torch.cat((cond_dist.clamp(min=0), ring_rank_g + 2, torch.ones(1, dtype=torch.long, device=dev)))
    memory, memory_pos, n_ptr_tok = assemble_memory(
        maskmem_features=feats, maskmem_pos=st.maskmem_pos.unsqueeze(1), mem_tpos=t_pos,
        obj_ptrs=ptrs, ptr_tpos=ptr_tpos, maskmem_tpos_enc=maskmem_tpos_enc,
        obj_ptr_tpos_proj=obj_ptr_tpos_proj, max_obj_ptrs_in_encoder=spec.ptr_norm,
    )
    frame_ok = torch.cat((torch.ones(C, dtype=torch.bool, device=dev), feat_ok, last_feat_ok))
    ptr_valid = torch.cat((cond_dist >= 0, ptr_ok, last_ptr_ok))
    valid = torch.cat((frame_ok.repeat_interleave(L), ptr_valid.repeat_interleave(split)))
    return memory, memory_pos, n_ptr_tok, valid.unsqueeze(0).expand(B, -1)


class MemoryBank:
    """Preallocated memory of one tracking session for a run of consecutive frames.

    ``MemoryBank(cond_feats (B, C, M, h, w), cond_ptrs (B, C, D), cond_frames, maskmem_pos (1, M, h, w),
    num_maskmem, max_list=G, ptr_norm, reverse)``. Built by the predictor at the start of a run;
    then per frame :func:`bank_memory` (``spec``, ``state``) gives the memory-attention inputs and
    ``advance(feat, ptr, good)`` records the frame just tracked. All state is on the features'
    device.
    """

    def __init__(
        self,
        cond_feats: Tensor,
        cond_ptrs: Tensor,
        cond_frames: Sequence[int],
        maskmem_pos: Tensor,
        num_maskmem: int,
        max_list: int,
        ptr_norm: int,
        reverse: bool,
    ):
        B, C, M, h, w = cond_feats.shape
        if C < 1:
            raise ValueError("the memory bank needs at least one conditioning frame")
        if num_maskmem < 3:
            raise ValueError(f"the memory bank needs num_maskmem >= 3, got {num_maskmem}")
        if max_list < 1:
            raise ValueError(f"max_list must be >= 1, got {max_list}")
        device, dtype = cond_feats.device, cond_feats.dtype
        D = cond_ptrs.shape[-1]
        self.spec = BankSpec(num_maskmem=num_maskmem, F=num_maskmem - 2, G=max_list, ptr_norm=ptr_norm,
                             sign=-1 if reverse else 1)
        F, G = self.spec.F, self.spec.G
        self.state = BankState(
            ring_feat=torch.zeros(B, F, M, h, w, device=device, dtype=dtype),
            ring_ptr=torch.zeros(B, G, D, device=device, dtype=cond_ptrs.dtype),
            count=torch.zeros((), dtype=torch.long, device=device),
            last_feat=torch.zeros(B, M, h, w, device=device, dtype=dtype),
            last_ptr=torch.zeros(B, D, device=device, dtype=cond_ptrs.dtype),
            last_content=torch.zeros((), dtype=torch.bool, device=device),
            last_good=torch.zeros((), dtype=torch.bool, device=device),
            cond_feats=cond_feats,
            cond_ptrs=cond_ptrs,
            cond_frames=torch.tensor(list(cond_frames), dtype=torch.long, device=device),
            maskmem_pos=maskmem_pos,
        )
        self.batch_size = B

    def advance(self, feat: Optional[Tensor], ptr: Optional[Tensor], good) -> None:
        """Frame just handled becomes the last one: ``feat`` (B, M, h, w) / ``ptr`` (B, D) its
        memory (None: it holds nothing, e.g. a conditioning frame), ``good`` a 0-d bool tensor or
        a Python bool (its eff_iou_score > mf_threshold, and scanned by the official filter).
        In-place tensor ops: the previous last frame enters the ring iff it was good."""
        st, spec = self.state, self.spec
        g = st.last_good
        idx_f = (st.count % spec.F).view(1)
        idx_g = (st.count % spec.G).view(1)
        st.ring_feat.index_copy_(1, idx_f, torch.where(g, st.last_feat.unsqueeze(1), st.ring_feat.index_select(1, idx_f)))
        st.ring_ptr.index_copy_(1, idx_g, torch.where(g, st.last_ptr.unsqueeze(1), st.ring_ptr.index_select(1, idx_g)))
        st.count.add_(g.long())
        if feat is None:
            st.last_content.fill_(False)
            st.last_good.fill_(False)
            return
        st.last_feat.copy_(feat)
        st.last_ptr.copy_(ptr)
        st.last_content.fill_(True)
        if isinstance(good, Tensor):
            st.last_good.copy_(good.reshape(()))
        else:
            st.last_good.fill_(bool(good))
