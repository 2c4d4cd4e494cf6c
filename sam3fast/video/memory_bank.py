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

Object table (:class:`ObjectTable`): the banks of every session that propagates together (the SAM 3
video model keeps one tracker session per batch of objects added together) in ONE set of
preallocated tensors, one row per object (:class:`TableState`): Cap rows (a power of two, doubled
when a new session does not fit) of which the first ``used`` hold objects (``active``; the rows of a
session are contiguous, and freeing a session moves the rows after it down, so the objects stay
packed), and Cmax conditioning-frame slots per row with their own frame indices and a validity
mask (sessions have different numbers of conditioning frames). The per-session scalars of the bank
(``count``, ``last_content``, ``last_good``) are per row. :func:`table_memory` gives the
memory-attention inputs of the first ``rows`` rows with static shapes (a free row attends to one
valid zero key), :func:`table_advance` records a frame for the rows of a mask (each row with its
own good flag), both tensor ops only. ``segment`` (the first row of the row's session, Cap for a
free row) lets per-session reductions (the memory-selection score, a mean over one session's
objects) run as one segment sum.
"""

from __future__ import annotations

import copy
import weakref
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..kernels import table_memory as tk
from ..model.memory_attention import assemble_memory, get_1d_sine_pe

__all__ = ["BankSpec", "BankState", "MemoryBank", "ObjectTable", "TableRows", "TableState", "bank_memory",
           "table_advance", "table_memory"]


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


# ----------------------------------------------------------------------------------------------
# Object table: the banks of several sessions as one set of fixed-capacity tensors


class TableState(NamedTuple):
    """The object table's tensors, one row per object (Cap rows; all on one device, updated in
    place). The ``next_*`` / ``staged`` rows hold the frames recorded per session until
    :meth:`ObjectTable.advance` applies them to every row at once."""

    ring_feat: Tensor  # (Cap, F, M, h, w)
    ring_ptr: Tensor  # (Cap, G, D)
    count: Tensor  # (Cap,) long
    last_feat: Tensor  # (Cap, M, h, w)
    last_ptr: Tensor  # (Cap, D)
    last_content: Tensor  # (Cap,) bool
    last_good: Tensor  # (Cap,) bool
    cond_feats: Tensor  # (Cap, Cmax, M, h, w)
    cond_ptrs: Tensor  # (Cap, Cmax, D)
    cond_frames: Tensor  # (Cap, Cmax) long
    cond_valid: Tensor  # (Cap, Cmax) bool
    maskmem_pos: Tensor  # (Cap, M, h, w)
    active: Tensor  # (Cap,) bool
    segment: Tensor  # (Cap,) long: the first row of the row's session; Cap for a free row
    next_feat: Tensor  # (Cap, M, h, w)
    next_ptr: Tensor  # (Cap, D)
    next_good: Tensor  # (Cap,) bool
    next_content: Tensor  # (Cap,) bool
    staged: Tensor  # (Cap,) bool


_COND_FIELDS = ("cond_feats", "cond_ptrs", "cond_frames", "cond_valid")


# The object table's Triton kernels on CUDA (table_memory, table_apply_staged); False: the PyTorch
# references everywhere (the path before session 23, for A/B runs: bench/bench_table_memory.py)
TABLE_KERNELS = True


def table_memory(
    spec: BankSpec,
    st: TableState,
    frame_idx: Tensor,
    no_prev: bool,
    maskmem_tpos_enc: Tensor,
    obj_ptr_tpos_proj: nn.Module,
    rows: int,
) -> Tuple[Tensor, Tensor, int, Tensor]:
    """:func:`bank_memory` for the first ``rows`` rows of an object table, every row with its own
    bank state and conditioning frames: ``(memory (rows, S, M), memory_pos, num_obj_ptr_tokens,
    memory_valid (rows, S) bool)`` with S = (Cmax + F + 1) * L + (Cmax + G + 1) * D / M (frame
    tokens first, conditioning slots, ring slots, last frame; then the pointers in that order). A
    free row (``active`` False) has exactly one valid key, the first (zero) one. Tensor ops only.

    Three steps (``sam3fast.kernels.table_memory``): the pointer slots' temporal positions and
    validity, their positions through ``obj_ptr_tpos_proj`` (a GEMM), then every token, its
    position and validity. On CUDA (the table, the encodings and the projection in one dtype,
    ``frame_idx`` a tensor on the table's device) the first and last are the
    ``sam3fast::table_ptr_slots`` and ``sam3fast::table_memory_tokens`` Triton kernels (the same
    values); elsewhere their PyTorch references."""
    n = rows
    M = st.cond_feats.shape[2]
    D = st.cond_ptrs.shape[-1]
    split = D // M if M < D else 1
    nm = maskmem_tpos_enc.shape[0]
    dt = st.cond_feats.dtype
    use = (TABLE_KERNELS and isinstance(frame_idx, Tensor) and frame_idx.device == st.count.device
           and tk.table_kernels_backend(st.cond_feats)[0] == "triton"
           and maskmem_tpos_enc.dtype == dt and obj_ptr_tpos_proj.weight.dtype == dt and D == split * M
           and M & (M - 1) == 0 and spec.F >= 1 and spec.G >= 1)  # (the kernels' limits; SAM 3: M = 64)
    slots = torch.ops.sam3fast.table_ptr_slots if use else tk.table_ptr_slots_ref
    ptr_tpos, ptr_ok = slots(st.count, st.last_good, st.last_content, st.cond_valid, st.cond_frames, st.active,
                             frame_idx, n, spec.F, spec.G, spec.sign, no_prev)
    rel = ptr_tpos / (spec.ptr_norm - 1)  # (true division in the default float dtype, as the official)
    ptr_pos = obj_ptr_tpos_proj(get_1d_sine_pe(rel, dim=D).to(obj_ptr_tpos_proj.weight.dtype))  # (n, P, M)
    tokens = torch.ops.sam3fast.table_memory_tokens if use else tk.table_memory_tokens_ref
    memory, memory_pos, valid = tokens(st.cond_feats, st.ring_feat, st.last_feat, st.maskmem_pos, st.cond_ptrs,
                                       st.ring_ptr, st.last_ptr, st.count, st.last_good, st.last_content,
                                       st.cond_valid, st.active, maskmem_tpos_enc.reshape(nm, M), ptr_pos, ptr_ok,
                                       n, spec.num_maskmem, no_prev)
    return memory, memory_pos, ptr_tpos.shape[1] * split, valid


def table_advance(spec: BankSpec, st: TableState, feat: Tensor, ptr: Tensor, good: Tensor, content: Tensor,
                  mask: Tensor) -> None:
    """:meth:`MemoryBank.advance` for the rows where ``mask`` (Cap,) is True, all at once: the
    last frame enters the ring iff it was good, then ``feat`` (Cap, M, h, w) / ``ptr`` (Cap, D)
    become the last frame where ``content`` (the frame holds an output; elsewhere nothing, the
    old last features stay as they were), with ``good`` (Cap,) bool, each row its own. In-place
    tensor ops, no host sync (``sam3fast.kernels.table_memory.table_advance_ref``)."""
    tk.table_advance_ref(st.ring_feat, st.ring_ptr, st.count, st.last_feat, st.last_ptr, st.last_content,
                         st.last_good, feat, ptr, good, content, mask)


def table_apply_staged(spec: BankSpec, st: TableState) -> None:
    """Apply every staged frame of an object table (:func:`table_advance` of the ``next_*`` rows
    where ``staged``), then clear ``staged``. Tensor ops only: a no-op when nothing is staged, so a
    step that runs it more than once (a CUDA graph capture's warm-up runs its step twice) applies
    each frame once. The graphed table step (``GraphedMemoryStep.run_table``) starts with it. On
    CUDA it is the ``sam3fast::table_apply_staged_`` Triton kernels (2 launches for ~27)."""
    args = (st.ring_feat, st.ring_ptr, st.count, st.last_feat, st.last_ptr, st.last_content, st.last_good,
            st.next_feat, st.next_ptr, st.next_good, st.next_content, st.staged)
    if TABLE_KERNELS and tk.table_kernels_backend(st.last_feat)[0] == "triton":
        torch.ops.sam3fast.table_apply_staged_(*args)
    else:
        tk.table_apply_staged_ref(*args)


class TableRows:
    """One session's rows in an :class:`ObjectTable` (what the predictor keeps in the session in
    place of a :class:`MemoryBank`): ``rows`` (a slice, valid until the table changes),
    ``batch_size``, ``alive`` (False once the table freed it), ``advance`` as
    :meth:`MemoryBank.advance` (staged; the table applies it before the next memory)."""

    __slots__ = ("table", "sid", "__weakref__")

    def __init__(self, table: "ObjectTable", sid: int):
        self.table, self.sid = table, sid

    @property
    def alive(self) -> bool:
        return self.sid in self.table._sessions

    @property
    def rows(self) -> slice:
        start, n = self.table._sessions[self.sid]
        return slice(start, start + n)

    @property
    def batch_size(self) -> int:
        return self.table._sessions[self.sid][1]

    def advance(self, feat: Optional[Tensor], ptr: Optional[Tensor], good) -> None:
        self.table.stage(self.sid, feat, ptr, good)

    def free(self) -> None:
        self.table.free(self.sid)

    def __deepcopy__(self, memo) -> "TableRows":
        # the copy holds its rows in the copied table (as this handle holds them in this one)
        table = copy.deepcopy(self.table, memo)
        rows = memo[id(self)] = TableRows(table, self.sid)
        table._register(rows)
        return rows


class ObjectTable:
    """The memory banks of several sessions as one preallocated object table (see the module
    docstring).

    ``ObjectTable(spec, feat_shape (M, h, w), ptr_dim D, dtype, device, capacity=1, cond_capacity=1)``
    (capacity rounded up to a power of two). :meth:`add` copies a seeded :class:`MemoryBank` into
    new rows and returns its :class:`TableRows`; :meth:`free` / :meth:`retain` release sessions;
    :meth:`stage` (through ``TableRows.advance``) records a session's frame and :meth:`advance`
    applies every staged row at once; :meth:`memory` gives the memory-attention inputs. Rows and
    conditioning slots only grow (doubling / to the largest session), so the step's shapes change
    only when a session does not fit. Host bookkeeping (which rows a session holds) changes only
    in ``add`` / ``free``; nothing here reads a tensor value.

    The table knows which :class:`TableRows` handles are still held (weakly): :meth:`reclaim`
    frees the rows of sessions whose handle is gone (a session dropped without freeing them) and
    says whether no handle is left, so the table can serve a new session with its tensors, and
    with them the step graphs captured on their addresses (:meth:`reusable_for`).
    """

    def __init__(self, spec: BankSpec, feat_shape: Tuple[int, int, int], ptr_dim: int, dtype: torch.dtype,
                 device, capacity: int = 1, cond_capacity: int = 1):
        if capacity < 1 or cond_capacity < 1:
            raise ValueError(f"capacity and cond_capacity must be >= 1, got {capacity}, {cond_capacity}")
        self.spec = spec
        self.feat_shape = tuple(feat_shape)
        self.ptr_dim = int(ptr_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.used = 0
        self._sessions: Dict[int, List[int]] = {}  # sid -> [first row, rows], in row order
        self._staged: set = set()
        self._next_sid = 0
        self._owners: Dict[int, weakref.ref] = {}  # sid -> its handle, while the sid holds rows
        self._handles = weakref.WeakSet()  # every TableRows of this table still held (freed or not)
        self.capacity = 1 << (capacity - 1).bit_length()
        self.cond_capacity = cond_capacity
        self.state = self._alloc(self.capacity, self.cond_capacity)

    @classmethod
    def for_bank(cls, bank: MemoryBank, capacity: int = 1) -> "ObjectTable":
        st = bank.state
        return cls(bank.spec, tuple(st.cond_feats.shape[2:5]), st.cond_ptrs.shape[-1], st.cond_feats.dtype,
                   st.cond_feats.device, capacity=max(capacity, bank.batch_size),
                   cond_capacity=st.cond_feats.shape[1])

    def _alloc(self, cap: int, cmax: int) -> TableState:
        M, h, w = self.feat_shape
        D, F, G = self.ptr_dim, self.spec.F, self.spec.G

        def z(*shape, dtype=self.dtype):
            return torch.zeros(shape, dtype=dtype, device=self.device)

        b, i = torch.bool, torch.long
        return TableState(
            ring_feat=z(cap, F, M, h, w), ring_ptr=z(cap, G, D), count=z(cap, dtype=i),
            last_feat=z(cap, M, h, w), last_ptr=z(cap, D), last_content=z(cap, dtype=b), last_good=z(cap, dtype=b),
            cond_feats=z(cap, cmax, M, h, w), cond_ptrs=z(cap, cmax, D), cond_frames=z(cap, cmax, dtype=i),
            cond_valid=z(cap, cmax, dtype=b), maskmem_pos=z(cap, M, h, w), active=z(cap, dtype=b),
            segment=torch.full((cap,), cap, dtype=i, device=self.device),
            next_feat=z(cap, M, h, w), next_ptr=z(cap, D), next_good=z(cap, dtype=b), next_content=z(cap, dtype=b),
            staged=z(cap, dtype=b),
        )

    # -- host bookkeeping ---------------------------------------------------------------------

    @property
    def sessions(self) -> Dict[int, slice]:
        """sid -> its rows."""
        return {sid: slice(a, a + n) for sid, (a, n) in self._sessions.items()}

    def bucket(self) -> int:
        """The rows a compiled or graphed step runs: ``used`` rounded up to a power of two (<= Cap)."""
        return 1 << (max(self.used, 1) - 1).bit_length()

    def fits(self, bank: MemoryBank) -> bool:
        """Whether ``bank`` can join this table (same spec, feature shape, dtype and device)."""
        st = bank.state
        return (bank.spec == self.spec and tuple(st.cond_feats.shape[2:5]) == self.feat_shape
                and st.cond_ptrs.shape[-1] == self.ptr_dim and st.cond_feats.dtype == self.dtype
                and st.cond_feats.device == self.device)

    def _grow(self, cap: int, cmax: int) -> None:
        old, u, c0 = self.state, self.used, self.cond_capacity
        new = self._alloc(cap, cmax)
        for name, t in zip(TableState._fields, new):
            if name == "segment":
                continue
            src = getattr(old, name)[:u]
            (t[:u, :c0] if name in _COND_FIELDS else t[:u]).copy_(src)
        self.state, self.capacity, self.cond_capacity = new, cap, cmax
        for a, n in self._sessions.values():
            new.segment[a:a + n].fill_(a)

    def add(self, bank: MemoryBank) -> TableRows:
        """Copy a seeded bank into new rows (grown if needed); its :class:`TableRows`."""
        if not self.fits(bank):
            raise ValueError(f"this bank (spec {bank.spec}, features {tuple(bank.state.cond_feats.shape[2:])}) "
                             f"does not fit the table (spec {self.spec}, features {self.feat_shape})")
        b, bs = bank.batch_size, bank.state
        C = bs.cond_feats.shape[1]
        cap, cmax = self.capacity, max(self.cond_capacity, C)
        while cap < self.used + b:
            cap *= 2
        if cap != self.capacity or cmax != self.cond_capacity:
            self._grow(cap, cmax)
        st, a = self.state, self.used
        r = slice(a, a + b)
        st.ring_feat[r].copy_(bs.ring_feat)
        st.ring_ptr[r].copy_(bs.ring_ptr)
        st.count[r].copy_(bs.count)
        st.last_feat[r].copy_(bs.last_feat)
        st.last_ptr[r].copy_(bs.last_ptr)
        st.last_content[r].copy_(bs.last_content)
        st.last_good[r].copy_(bs.last_good)
        st.cond_feats[r, :C].copy_(bs.cond_feats)
        st.cond_feats[r, C:].zero_()
        st.cond_ptrs[r, :C].copy_(bs.cond_ptrs)
        st.cond_ptrs[r, C:].zero_()
        st.cond_frames[r, :C].copy_(bs.cond_frames)
        st.cond_frames[r, C:].zero_()
        st.cond_valid[r, :C].fill_(True)
        st.cond_valid[r, C:].fill_(False)
        st.maskmem_pos[r].copy_(bs.maskmem_pos)
        st.active[r].fill_(True)
        st.segment[r].fill_(a)
        st.staged[r].fill_(False)
        sid = self._next_sid
        self._next_sid += 1
        self._sessions[sid] = [a, b]
        self.used += b
        rows = TableRows(self, sid)
        self._register(rows)
        return rows

    def _register(self, rows: TableRows) -> None:
        if rows.sid in self._sessions:
            self._owners[rows.sid] = weakref.ref(rows)
        self._handles.add(rows)

    def __deepcopy__(self, memo) -> "ObjectTable":
        """A copy with its own tensors; its sessions are held only by the copied :class:`TableRows`
        (a table copied without them, e.g. with a predictor's spare tables, holds orphans that
        :meth:`reclaim` frees)."""
        new = memo[id(self)] = type(self).__new__(type(self))
        for name, value in self.__dict__.items():
            if name not in ("_owners", "_handles"):
                setattr(new, name, copy.deepcopy(value, memo))
        new._owners, new._handles = {}, weakref.WeakSet()
        return new

    def free(self, sid: int) -> None:
        """Release a session's rows; the rows after them move down (the objects stay packed) and
        the vacated rows are zeroed (a free row attends to one zero key)."""
        a, n = self._sessions.pop(sid)
        self._staged.discard(sid)
        self._owners.pop(sid, None)
        u, st = self.used, self.state
        if a + n < u:
            for t in st:
                t[a:u - n] = t[a + n:u].clone()
        for name, t in zip(TableState._fields, st):
            if name == "segment":
                t[u - n:u].fill_(self.capacity)
            else:
                t[u - n:u].zero_()
        self.used = u - n
        for other in self._sessions.values():
            if other[0] > a:
                other[0] -= n
                st.segment[other[0]:other[0] + other[1]].fill_(other[0])

    def retain(self, sids: Iterable[int]) -> None:
        """Free every session not in ``sids`` (those that left the batch)."""
        keep = set(sids)
        for sid in [s for s in self._sessions if s not in keep]:
            self.free(sid)

    def reclaim(self) -> bool:
        """Free the rows of every session whose :class:`TableRows` is gone (its session was dropped
        while it held rows); True when no handle of this table is held any more, i.e. no session
        can come back to it (then ``used`` is 0 and every tensor is back to its allocated zeros)."""
        for sid in [s for s in self._sessions if s not in self._owners or self._owners[s]() is None]:
            self.free(sid)
        return len(self._handles) == 0

    def reusable_for(self, bank: MemoryBank) -> bool:
        """Whether an empty table (see :meth:`reclaim`) gives ``bank`` what a new
        :meth:`for_bank` table would: it fits, has room for its rows, and the same conditioning
        slots (so the step's memory, and each output bit, is the same)."""
        return (self.used == 0 and self.fits(bank) and self.capacity >= bank.batch_size
                and self.cond_capacity == bank.state.cond_feats.shape[1])

    # -- per frame ----------------------------------------------------------------------------

    def stage(self, sid: int, feat: Optional[Tensor], ptr: Optional[Tensor], good) -> None:
        """Record the frame a session just handled (as :meth:`MemoryBank.advance`): its memory
        ``feat`` (B, M, h, w) / ``ptr`` (B, D) or None (nothing), ``good`` a 0-d bool tensor or a
        bool. Applied to the rows by the next :meth:`advance` (a second frame of the same session
        applies the first one before)."""
        if sid in self._staged:
            self.advance()
        a, n = self._sessions[sid]
        st, r = self.state, slice(a, a + n)
        st.staged[r].fill_(True)
        if feat is None:
            st.next_content[r].fill_(False)
            st.next_good[r].fill_(False)
        else:
            st.next_feat[r].copy_(feat)
            st.next_ptr[r].copy_(ptr)
            st.next_content[r].fill_(True)
            if isinstance(good, Tensor):
                st.next_good[r].copy_(good.reshape(()))
            else:
                st.next_good[r].fill_(bool(good))
        self._staged.add(sid)

    def advance(self) -> None:
        """Apply every staged frame (one :func:`table_apply_staged` over the table)."""
        if not self._staged:
            return
        table_apply_staged(self.spec, self.state)
        self._staged.clear()

    def hand_over_staged(self) -> None:
        """Forget the staged frames on the host: the caller is about to launch a step that begins
        with :func:`table_apply_staged` (the graphed table step), which applies them on the device.
        Nothing may read the table in between."""
        self._staged.clear()

    def memory(self, frame_idx: Tensor, no_prev: bool, maskmem_tpos_enc: Tensor, obj_ptr_tpos_proj: nn.Module,
               rows: Optional[int] = None) -> Tuple[Tensor, Tensor, int, Tensor]:
        """:func:`table_memory` of the first ``rows`` rows (default: the used ones), staged frames applied."""
        self.advance()
        return table_memory(self.spec, self.state, frame_idx, no_prev, maskmem_tpos_enc, obj_ptr_tpos_proj,
                            self.used if rows is None else rows)
