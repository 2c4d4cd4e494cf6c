"""The object table's per-step bookkeeping in three small Triton kernels instead of ~90 PyTorch ops.

Letters: Cap table rows, n the rows a step runs, C conditioning slots, F ring frames, G ring
pointers, NF = C + F + 1 frame slots (conditioning, ring, last), P = C + G + 1 pointer slots, M
memory channels, L = h * w tokens a frame, D pointer width, ``split`` = D / M tokens a pointer.
The spec is :func:`sam3fast.video.memory_bank.table_apply_staged` and :func:`table_memory`
(``table_memory_ref`` here): these kernels compute exactly its values (copies, integer logic and
one rounding per positional sum, as PyTorch rounds).

table_apply_staged_(ring_feat, ring_ptr, count, last_feat, last_ptr, last_content, last_good,
                    next_feat, next_ptr, next_good, next_content, staged) -> None, in place
    for every row where ``staged``: the last frame enters the ring at slot count % F (count % G
    for its pointer) iff it was good (count += 1 then), ``next_*`` becomes the last frame where it
    holds content, the flags follow; ``staged`` is cleared. Two launches: the feature and pointer
    copies (a program per row and block of elements), then the per-row flags.

table_ptr_slots(count, last_good, last_content, cond_valid, cond_frames, active, frame_idx, rows,
                F, G, sign, no_prev) -> (ptr_tpos (n, P) long, ptr_ok (n, P) bool)
    each pointer slot's temporal position and validity (``table_memory``'s pointer rules).

table_memory_tokens(cond_feats, ring_feat, last_feat, maskmem_pos, cond_ptrs, ring_ptr, last_ptr,
                    count, last_good, last_content, cond_valid, active, tpos_enc, ptr_pos, ptr_ok,
                    rows, num_maskmem, no_prev) -> (memory, memory_pos (n, S, M), valid (n, S) bool)
    S = NF * L + P * split: each frame slot's (M, h, w) features as L tokens of M (a transposing
    copy) with the position ``maskmem_pos + tpos_enc[nm - 1 - t]`` (rounded once to the table's
    dtype), then each pointer as ``split`` tokens with its ``ptr_pos`` row (computed between the two
    kernels by the pointer projection, a GEMM). Free rows (``active`` False) keep one valid key, the
    first. One launch: programs over (row, frame slot, block of tokens), then over (row, pointer).

Where: every tracker step on the object table (``GraphedMemoryStep.run_table``, inside the step's
CUDA graph). The PyTorch version is ~60 launches of a few elements each for the memory and ~30 for
the staged frames (tiny config census: 122 of the graphed step's 326 launches were this
bookkeeping); here it is 3 kernels plus the pointer projection's ~6. At 16 objects the copies are
also one pass: memory and its positions are written once each (no concatenations). Not yet timed on
a GPU.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from sam3fast import env

# triton is optional (the "gpu" extra): without it the reference and the CPU op still work.
from ._triton_compat import (  # noqa: F401  (TRITON_IMPORT_ERROR: read by the tests)
    HAS_TRITON, TRITON_IMPORT_ERROR, cdiv, device_guard, interpreted, output_buffer, require_triton, tl, triton,
    triton_backend,
)

DEFAULT_BLOCK = 1024  # elements a program copies in table_apply_staged_
DEFAULT_BLOCK_L = 64  # tokens a frame program writes in table_memory_tokens


# ---- references (the CPU kernels): the PyTorch bookkeeping, op by op --------------------------


def table_advance_ref(ring_feat: Tensor, ring_ptr: Tensor, count: Tensor, last_feat: Tensor, last_ptr: Tensor,
                      last_content: Tensor, last_good: Tensor, feat: Tensor, ptr: Tensor, good: Tensor,
                      content: Tensor, mask: Tensor) -> None:
    """``sam3fast.video.memory_bank.table_advance`` on the table's tensors (in place): for the rows
    where ``mask``, the last frame enters the ring iff it was good, then ``feat`` / ``ptr`` become
    the last frame where ``content``, with ``good``."""
    Cap, F, G = count.shape[0], ring_feat.shape[1], ring_ptr.shape[1]
    push = last_good & mask
    rows = torch.arange(Cap, device=count.device)
    rf = ring_feat.view(Cap * F, *ring_feat.shape[2:])
    rp = ring_ptr.view(Cap * G, ring_ptr.shape[-1])
    slot_f = rows * F + count % F
    slot_g = rows * G + count % G
    rf.index_copy_(0, slot_f, torch.where(push.view(Cap, *([1] * (rf.dim() - 1))), last_feat, rf.index_select(0, slot_f)))
    rp.index_copy_(0, slot_g, torch.where(push.view(Cap, 1), last_ptr, rp.index_select(0, slot_g)))
    count.add_(push.long())
    take = mask & content
    last_feat.copy_(torch.where(take.view(Cap, *([1] * (last_feat.dim() - 1))), feat, last_feat))
    last_ptr.copy_(torch.where(take.view(Cap, 1), ptr, last_ptr))
    last_content.copy_(torch.where(mask, content, last_content))
    last_good.copy_(torch.where(mask, good & content, last_good))


def table_apply_staged_ref(ring_feat: Tensor, ring_ptr: Tensor, count: Tensor, last_feat: Tensor, last_ptr: Tensor,
                           last_content: Tensor, last_good: Tensor, next_feat: Tensor, next_ptr: Tensor,
                           next_good: Tensor, next_content: Tensor, staged: Tensor) -> None:
    """:func:`table_advance_ref` of the ``next_*`` rows where ``staged``, then ``staged`` cleared."""
    table_advance_ref(ring_feat, ring_ptr, count, last_feat, last_ptr, last_content, last_good, next_feat, next_ptr,
                      next_good, next_content, staged)
    staged.fill_(False)


def _ring_ranks(count: Tensor, g: Tensor, R: int, G: int):
    # (n, R) rank of each ring slot (0 = the newest), and the official list sizes
    rank = (count[:, None] - 1 - torch.arange(R, device=count.device)) % R
    n_good_listed = torch.minimum(count, G - g)[:, None]
    n_list = (torch.clamp(count + g, max=G) + (1 - g))[:, None]
    return rank, n_good_listed, n_list


def table_ptr_slots_ref(count: Tensor, last_good: Tensor, last_content: Tensor, cond_valid: Tensor,
                        cond_frames: Tensor, active: Tensor, frame_idx: Tensor, rows: int, F: int, G: int,
                        sign: int, no_prev: bool) -> Tuple[Tensor, Tensor]:
    """(ptr_tpos (n, P) long, ptr_ok (n, P) bool) of the first ``rows`` rows: conditioning pointers
    at their frame distance (valid when not in the future), ring pointers at rank + 2 (valid as
    the official list keeps them), the last frame's at 1; ``ptr_ok`` also requires ``active``.
    (``F`` is unused: the signature matches the kernel's.)"""
    n = rows
    count, g = count[:n], last_good[:n].long()
    rank_g, n_good_listed, n_list = _ring_ranks(count, g, G, G)
    ptr_ok = (rank_g < n_good_listed) & (rank_g + 2 <= n_list - 1)
    last_ok = last_content[:n, None] & (n_list >= 2)
    if no_prev:
        ptr_ok, last_ok = torch.zeros_like(ptr_ok), torch.zeros_like(last_ok)
    cond_dist = (frame_idx - cond_frames[:n]) * sign
    ptr_tpos = torch.cat((cond_dist.clamp(min=0), rank_g + 2, torch.ones_like(count)[:, None]), dim=1)
    ok = torch.cat((cond_valid[:n] & (cond_dist >= 0), ptr_ok, last_ok), dim=1) & active[:n, None]
    return ptr_tpos, ok


def table_memory_tokens_ref(cond_feats: Tensor, ring_feat: Tensor, last_feat: Tensor, maskmem_pos: Tensor,
                            cond_ptrs: Tensor, ring_ptr: Tensor, last_ptr: Tensor, count: Tensor, last_good: Tensor,
                            last_content: Tensor, cond_valid: Tensor, active: Tensor, tpos_enc: Tensor,
                            ptr_pos: Tensor, ptr_ok: Tensor, rows: int, num_maskmem: int,
                            no_prev: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(memory, memory_pos (n, S, M), valid (n, S) bool) as ``table_memory`` assembles them, from
    the pointer slots' ``ptr_pos`` (n, P, M) and ``ptr_ok`` (n, P)."""
    n = rows
    C, M = cond_feats.shape[1:3]
    F, G, D = ring_feat.shape[1], ring_ptr.shape[1], cond_ptrs.shape[-1]
    L = cond_feats.shape[-1] * cond_feats.shape[-2]
    split = D // M if M < D else 1
    nm = tpos_enc.shape[0]
    count, g = count[:n], last_good[:n].long()
    rank_f, n_good_listed, _ = _ring_ranks(count, g, F, G)
    feat_ok = rank_f < n_good_listed
    last_ok = last_content[:n, None]
    if no_prev:
        feat_ok, last_ok = torch.zeros_like(feat_ok), torch.zeros_like(last_ok)
    t_pos = torch.cat((torch.zeros(n, C, dtype=torch.long, device=count.device),
                       num_maskmem - (rank_f + 2).clamp(max=num_maskmem - 1),
                       torch.full((n, 1), num_maskmem - 1, dtype=torch.long, device=count.device)), dim=1)
    feats = torch.cat((cond_feats[:n], ring_feat[:n], last_feat[:n, None]), dim=1)
    NF = feats.shape[1]
    mem = feats.flatten(3).transpose(2, 3).reshape(n, NF * L, M)
    tpos = tpos_enc.reshape(nm, M)[nm - 1 - t_pos]  # (n, NF, M)
    pos = (maskmem_pos[:n].flatten(2).transpose(1, 2)[:, None] + tpos[:, :, None, :]).reshape(n, NF * L, M)
    ptrs = torch.cat((cond_ptrs[:n], ring_ptr[:n], last_ptr[:n, None]), dim=1)
    P = ptrs.shape[1]
    memory = torch.cat((mem, ptrs.reshape(n, P * split, D // split)), dim=1)
    memory_pos = torch.cat((pos, ptr_pos.repeat_interleave(split, dim=1)), dim=1)
    frame_ok = torch.cat((cond_valid[:n], feat_ok, last_ok), dim=1)
    valid = torch.cat((frame_ok.repeat_interleave(L, dim=1), ptr_ok.repeat_interleave(split, dim=1)), dim=1)
    act = active[:n]
    valid &= act[:, None]
    valid[:, 0] |= ~act
    return memory, memory_pos, valid


# ---- Triton kernels ----------------------------------------------------------------------------


if HAS_TRITON:
    from .rope import _bf16_rtne

    @triton.jit
    def _push_then_take(last_ptr, ring_ptr, next_ptr, r, slot, N, i, push, take):
        # elements i of row r's N values: the last frame's into ring slot ``slot`` (where push), then
        # the next frame's into the last (where take); one thread reads before it writes each element
        m = i < N
        cur = tl.load(last_ptr + r * N + i, mask=m)
        tl.store(ring_ptr + slot * N + i, cur, mask=m & push)
        nxt = tl.load(next_ptr + r * N + i, mask=m & take)
        tl.store(last_ptr + r * N + i, nxt, mask=m & take)

    @triton.jit
    def _apply_staged_copy_kernel(
        ring_feat_ptr, ring_ptr_ptr, count_ptr, last_feat_ptr, last_ptr_ptr, last_good_ptr,
        next_feat_ptr, next_ptr_ptr, next_content_ptr, staged_ptr,
        E, D, F, G, e_blocks, d_blocks, BLOCK: tl.constexpr,
    ):
        # Grid (Cap * (e_blocks + d_blocks),): elements [t * BLOCK, +BLOCK) of row r's features
        # (t < e_blocks) or pointer. Reads the row's flags and count only (kernel 2 updates them),
        # so every program of a row sees the same ones.
        pid = tl.program_id(0)
        per_row = e_blocks + d_blocks
        r = (pid // per_row).to(tl.int64)
        t = pid % per_row
        staged = tl.load(staged_ptr + r).to(tl.int1)
        push = staged & tl.load(last_good_ptr + r).to(tl.int1)
        take = staged & tl.load(next_content_ptr + r).to(tl.int1)
        count = tl.load(count_ptr + r)
        offs = tl.arange(0, BLOCK)
        if t < e_blocks:
            _push_then_take(last_feat_ptr, ring_feat_ptr, next_feat_ptr, r, r * F + count % F, E, t * BLOCK + offs,
                            push, take)
        else:
            _push_then_take(last_ptr_ptr, ring_ptr_ptr, next_ptr_ptr, r, r * G + count % G, D,
                            (t - e_blocks) * BLOCK + offs, push, take)

    @triton.jit
    def _apply_staged_flags_kernel(
        count_ptr, last_content_ptr, last_good_ptr, next_good_ptr, next_content_ptr, staged_ptr, Cap,
        BLOCK_R: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        m = r < Cap
        staged = tl.load(staged_ptr + r, mask=m, other=0).to(tl.int1)
        good = tl.load(last_good_ptr + r, mask=m, other=0).to(tl.int1)
        content = tl.load(last_content_ptr + r, mask=m, other=0).to(tl.int1)
        n_good = tl.load(next_good_ptr + r, mask=m, other=0).to(tl.int1)
        n_content = tl.load(next_content_ptr + r, mask=m, other=0).to(tl.int1)
        count = tl.load(count_ptr + r, mask=m, other=0)
        tl.store(count_ptr + r, count + (staged & good).to(count.dtype), mask=m)
        tl.store(last_content_ptr + r, tl.where(staged, n_content, content), mask=m)
        tl.store(last_good_ptr + r, tl.where(staged, n_good & n_content, good), mask=m)
        tl.store(staged_ptr + r, tl.zeros_like(staged), mask=m)

    @triton.jit
    def _ring_rank(count, j, R):
        # (count - 1 - j) mod R, non-negative (Triton's % truncates like C)
        return ((count - 1 - j) % R + R) % R

    @triton.jit
    def _ptr_slots_kernel(
        count_ptr, last_good_ptr, last_content_ptr, cond_valid_ptr, cond_frames_ptr, active_ptr, frame_ptr,
        tpos_ptr, ok_ptr, rows, C, G, sign, NO_PREV: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        # Grid (rows,): every pointer slot p < P = C + G + 1 of row r.
        r = tl.program_id(0).to(tl.int64)
        P = C + G + 1
        p = tl.arange(0, BLOCK_P)
        count = tl.load(count_ptr + r)
        g = tl.load(last_good_ptr + r).to(tl.int1).to(tl.int64)
        content = tl.load(last_content_ptr + r).to(tl.int1)
        active = tl.load(active_ptr + r).to(tl.int1)
        frame = tl.load(frame_ptr)
        is_cond = p < C
        is_ring = (p >= C) & (p < C + G)
        cp = tl.where(is_cond, p, 0)
        cond_dist = (frame - tl.load(cond_frames_ptr + r * C + cp, mask=is_cond, other=0)) * sign
        cond_ok = tl.load(cond_valid_ptr + r * C + cp, mask=is_cond, other=0).to(tl.int1) & (cond_dist >= 0)
        rank = _ring_rank(count, (p - C).to(tl.int64), G)
        n_good_listed = tl.minimum(count, G - g)
        n_list = tl.minimum(count + g, G) + (1 - g)
        ring_ok = (rank < n_good_listed) & (rank + 2 <= n_list - 1)
        last_ok = content & (n_list >= 2)
        if NO_PREV:  # no earlier frame may be attended: only the conditioning pointers
            ring_ok = ring_ok & (p < 0)
            last_ok = last_ok & (r < 0)
        tpos = tl.where(is_cond, tl.maximum(cond_dist, 0), tl.where(is_ring, rank + 2, 1))
        ok = tl.where(is_cond, cond_ok, tl.where(is_ring, ring_ok, last_ok)) & active
        m = p < P
        tl.store(tpos_ptr + r * P + p, tpos, mask=m)
        tl.store(ok_ptr + r * P + p, ok, mask=m)

    @triton.jit
    def _memory_tokens_kernel(
        cond_feats_ptr, ring_feat_ptr, last_feat_ptr, maskmem_pos_ptr, cond_ptrs_ptr, ring_ptr_ptr, last_ptr_ptr,
        count_ptr, last_good_ptr, last_content_ptr, cond_valid_ptr, active_ptr, tpos_enc_ptr,
        ptr_pos_ptr, ptr_ok_ptr, memory_ptr, memory_pos_ptr, valid_ptr,
        C, F, G, L, S, nm, num_maskmem, l_blocks, D, SPLIT,
        M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
        NO_PREV: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    ):
        # Grid (rows * (NF * l_blocks + P),): per row, NF * l_blocks frame programs (slot s, tokens
        # [t * BLOCK_L, +BLOCK_L)), then P pointer programs.
        pid = tl.program_id(0)
        NF = C + F + 1
        P = C + G + 1
        per_row = NF * l_blocks + P
        r = (pid // per_row).to(tl.int64)
        k = pid % per_row
        active = tl.load(active_ptr + r).to(tl.int1)
        count = tl.load(count_ptr + r)
        g = tl.load(last_good_ptr + r).to(tl.int1).to(tl.int64)
        ML = M * L
        if k < NF * l_blocks:
            s = k // l_blocks
            l0 = (k % l_blocks) * BLOCK_L
            # the slot's source, temporal position t and validity
            f = s - C
            rank = _ring_rank(count, f.to(tl.int64), F)
            if s < C:
                src = cond_feats_ptr + (r * C + s) * ML
                t_pos = count * 0
                ok = tl.load(cond_valid_ptr + r * C + s).to(tl.int1)
            elif s < C + F:
                src = ring_feat_ptr + (r * F + f) * ML
                t_pos = num_maskmem - tl.minimum(rank + 2, num_maskmem - 1)
                ok = rank < tl.minimum(count, G - g)
                if NO_PREV:
                    ok = ok & (s < 0)
            else:
                src = last_feat_ptr + r * ML
                t_pos = count * 0 + (num_maskmem - 1)
                ok = tl.load(last_content_ptr + r).to(tl.int1)
                if NO_PREV:
                    ok = ok & (s < 0)
            ok = ok & active
            l = l0 + tl.arange(0, BLOCK_L)
            c = tl.arange(0, M)
            lm = l < L
            m2 = lm[:, None]
            # (tokens, channels) tile from the (M, L) maps: loads along the tokens, stores along the channels
            feat = tl.load(src + c[None, :] * L + l[:, None], mask=m2)
            dst = (r * S + s * L + l)[:, None] * M + c[None, :]
            tl.store(memory_ptr + dst, feat, mask=m2)
            pos = tl.load(maskmem_pos_ptr + r * ML + c[None, :] * L + l[:, None], mask=m2).to(tl.float32)
            enc = tl.load(tpos_enc_ptr + (nm - 1 - t_pos) * M + c).to(tl.float32)
            y = pos + enc[None, :]
            if BF16_BY_HAND:
                y = _bf16_rtne(y)
            tl.store(memory_pos_ptr + dst, y.to(memory_pos_ptr.dtype.element_ty), mask=m2)
            v = ok | ((s == 0) & (l == 0) & (active == 0))  # a free row keeps its first key
            tl.store(valid_ptr + r * S + s * L + l, v, mask=lm)
        else:
            p = k - NF * l_blocks
            base = r * S + NF * L + p * SPLIT  # the pointer's first token
            if p < C:
                src = cond_ptrs_ptr + (r * C + p) * D
            elif p < C + G:
                src = ring_ptr_ptr + (r * G + (p - C)) * D
            else:
                src = last_ptr_ptr + r * D
            d = tl.arange(0, BLOCK_D)
            dm = d < D
            tl.store(memory_ptr + base * M + d, tl.load(src + d, mask=dm), mask=dm)
            # its position row, once per token of the pointer, and its validity
            q = tl.arange(0, BLOCK_Q)
            c = tl.arange(0, M)
            qm = q < SPLIT
            row = tl.load(ptr_pos_ptr + (r * P + p) * M + c)
            tl.store(memory_pos_ptr + (base + q)[:, None] * M + c[None, :], tl.broadcast_to(row[None, :], (BLOCK_Q, M)),
                     mask=qm[:, None])
            ok = tl.load(ptr_ok_ptr + r * P + p).to(tl.int1)
            tl.store(valid_ptr + base + q, (q >= 0) & ok, mask=qm)

    _INTERPRETED = interpreted(_memory_tokens_kernel)  # (then the kernel rounds bf16 itself: see interpreted)


# ---- launchers ---------------------------------------------------------------------------------


def _table_apply_staged_triton(ring_feat, ring_ptr, count, last_feat, last_ptr, last_content, last_good,
                               next_feat, next_ptr, next_good, next_content, staged, block: int = DEFAULT_BLOCK) -> None:
    require_triton("table_apply_staged")
    Cap, F, G = count.shape[0], ring_feat.shape[1], ring_ptr.shape[1]
    E, D = last_feat[0].numel(), last_ptr.shape[-1]
    for name, t in (("ring_feat", ring_feat), ("ring_ptr", ring_ptr), ("last_feat", last_feat), ("last_ptr", last_ptr),
                    ("next_feat", next_feat), ("next_ptr", next_ptr)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the table's own tensors are)")
    if Cap == 0:
        return
    e_blocks, d_blocks = cdiv(E, block), cdiv(D, block)
    with device_guard(count.device):
        _apply_staged_copy_kernel[(Cap * (e_blocks + d_blocks),)](
            ring_feat, ring_ptr, count, last_feat, last_ptr, last_good, next_feat, next_ptr, next_content, staged,
            E, D, F, G, e_blocks, d_blocks, BLOCK=block,
        )
        _apply_staged_flags_kernel[(cdiv(Cap, 128),)](
            count, last_content, last_good, next_good, next_content, staged, Cap, BLOCK_R=128,
        )


def _table_ptr_slots_triton(count, last_good, last_content, cond_valid, cond_frames, active, frame_idx, rows, F, G,
                            sign, no_prev, out=None) -> Tuple[Tensor, Tensor]:
    """Launcher. ``out``: preallocated (ptr_tpos, ptr_ok) (every element is written)."""
    require_triton("table_ptr_slots")
    C = cond_valid.shape[1]
    P = C + G + 1
    if G < 1 or F < 1:
        raise ValueError(f"the ring needs F >= 1 and G >= 1 slots, got F={F}, G={G}")
    out_tpos, out_ok = out if out is not None else (None, None)
    tpos = output_buffer(out_tpos, (rows, P), torch.long, count.device)
    ok = output_buffer(out_ok, (rows, P), torch.bool, count.device)
    if rows == 0:
        return tpos, ok
    with device_guard(count.device):
        _ptr_slots_kernel[(rows,)](
            count, last_good, last_content, cond_valid.contiguous(), cond_frames.contiguous(), active,
            frame_idx.reshape(1), tpos, ok, rows, C, G, int(sign),
            NO_PREV=bool(no_prev), BLOCK_P=triton.next_power_of_2(P),
        )
    return tpos, ok


def _table_memory_tokens_triton(cond_feats, ring_feat, last_feat, maskmem_pos, cond_ptrs, ring_ptr, last_ptr, count,
                                last_good, last_content, cond_valid, active, tpos_enc, ptr_pos, ptr_ok, rows,
                                num_maskmem, no_prev, block_l: int = DEFAULT_BLOCK_L,
                                out=None) -> Tuple[Tensor, Tensor, Tensor]:
    """Launcher. ``out``: preallocated (memory, memory_pos, valid) (every element is written)."""
    require_triton("table_memory_tokens")
    C, M = cond_feats.shape[1:3]
    F, G, D = ring_feat.shape[1], ring_ptr.shape[1], cond_ptrs.shape[-1]
    L = cond_feats.shape[-1] * cond_feats.shape[-2]
    split = D // M if M < D else 1
    if D != split * M or M & (M - 1):
        raise ValueError(f"the Triton kernel takes pointers of split * M values and a power-of-two M, got D={D}, M={M}")
    NF, P = C + F + 1, C + G + 1
    S = NF * L + P * split
    dtype = cond_feats.dtype
    for name, t in (("cond_feats", cond_feats), ("ring_feat", ring_feat), ("last_feat", last_feat),
                    ("maskmem_pos", maskmem_pos), ("cond_ptrs", cond_ptrs), ("ring_ptr", ring_ptr),
                    ("last_ptr", last_ptr), ("tpos_enc", tpos_enc), ("ptr_pos", ptr_pos)):
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor, got {t.dtype}")
    if F < 1 or G < 1:
        raise ValueError(f"the ring needs F >= 1 and G >= 1 slots, got F={F}, G={G}")
    dev = count.device
    out_mem, out_pos, out_valid = out if out is not None else (None, None, None)
    memory = output_buffer(out_mem, (rows, S, M), dtype, dev)
    memory_pos = output_buffer(out_pos, (rows, S, M), dtype, dev)
    valid = output_buffer(out_valid, (rows, S), torch.bool, dev)
    if rows == 0:
        return memory, memory_pos, valid
    l_blocks = cdiv(L, block_l)
    with device_guard(dev):
        _memory_tokens_kernel[(rows * (NF * l_blocks + P),)](
            cond_feats, ring_feat, last_feat, maskmem_pos, cond_ptrs, ring_ptr, last_ptr,
            count, last_good, last_content, cond_valid.contiguous(), active, tpos_enc,
            ptr_pos, ptr_ok.contiguous(), memory, memory_pos, valid,
            C, F, G, L, S, tpos_enc.shape[0], num_maskmem, l_blocks, D, split,
            M=M, BLOCK_L=block_l, BLOCK_D=triton.next_power_of_2(D), BLOCK_Q=triton.next_power_of_2(split),
            NO_PREV=bool(no_prev), BF16_BY_HAND=_INTERPRETED and dtype == torch.bfloat16,
        )
    return memory, memory_pos, valid


# ---- the ops -----------------------------------------------------------------------------------

_STATE_MUTATED = ("ring_feat", "ring_ptr", "count", "last_feat", "last_ptr", "last_content", "last_good", "staged")


@torch.library.custom_op("sam3fast::table_apply_staged_", mutates_args=_STATE_MUTATED, device_types="cuda")
def table_apply_staged_op(ring_feat: Tensor, ring_ptr: Tensor, count: Tensor, last_feat: Tensor, last_ptr: Tensor,
                          last_content: Tensor, last_good: Tensor, next_feat: Tensor, next_ptr: Tensor,
                          next_good: Tensor, next_content: Tensor, staged: Tensor) -> None:
    """``sam3fast::table_apply_staged_``: the Triton kernels on CUDA, ``table_apply_staged_ref`` on CPU."""
    _table_apply_staged_triton(ring_feat, ring_ptr, count, last_feat, last_ptr, last_content, last_good,
                               next_feat, next_ptr, next_good, next_content, staged)


table_apply_staged_op.register_kernel("cpu")(table_apply_staged_ref)


@table_apply_staged_op.register_fake
def _table_apply_staged_fake(*args) -> None:
    return None


@torch.library.custom_op("sam3fast::table_ptr_slots", mutates_args=(), device_types="cuda")
def table_ptr_slots_op(count: Tensor, last_good: Tensor, last_content: Tensor, cond_valid: Tensor, cond_frames: Tensor,
                       active: Tensor, frame_idx: Tensor, rows: int, F: int, G: int, sign: int,
                       no_prev: bool) -> Tuple[Tensor, Tensor]:
    """``sam3fast::table_ptr_slots``: the Triton kernel on CUDA, ``table_ptr_slots_ref`` on CPU."""
    return _table_ptr_slots_triton(count, last_good, last_content, cond_valid, cond_frames, active, frame_idx, rows,
                                   F, G, sign, no_prev)


table_ptr_slots_op.register_kernel("cpu")(table_ptr_slots_ref)


@table_ptr_slots_op.register_fake
def _table_ptr_slots_fake(count, last_good, last_content, cond_valid, cond_frames, active, frame_idx, rows, F, G,
                          sign, no_prev):
    P = cond_valid.shape[1] + G + 1
    return (torch.empty(rows, P, dtype=torch.long, device=count.device),
            torch.empty(rows, P, dtype=torch.bool, device=count.device))


@torch.library.custom_op("sam3fast::table_memory_tokens", mutates_args=(), device_types="cuda")
def table_memory_tokens_op(cond_feats: Tensor, ring_feat: Tensor, last_feat: Tensor, maskmem_pos: Tensor,
                           cond_ptrs: Tensor, ring_ptr: Tensor, last_ptr: Tensor, count: Tensor, last_good: Tensor,
                           last_content: Tensor, cond_valid: Tensor, active: Tensor, tpos_enc: Tensor,
                           ptr_pos: Tensor, ptr_ok: Tensor, rows: int, num_maskmem: int,
                           no_prev: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``sam3fast::table_memory_tokens``: the Triton kernel on CUDA, ``table_memory_tokens_ref`` on CPU."""
    return _table_memory_tokens_triton(cond_feats, ring_feat, last_feat, maskmem_pos, cond_ptrs, ring_ptr, last_ptr,
                                       count, last_good, last_content, cond_valid, active, tpos_enc, ptr_pos, ptr_ok,
                                       rows, num_maskmem, no_prev)


table_memory_tokens_op.register_kernel("cpu")(table_memory_tokens_ref)  # (fresh outputs: no aliasing)


@table_memory_tokens_op.register_fake
def _table_memory_tokens_fake(cond_feats, ring_feat, last_feat, maskmem_pos, cond_ptrs, ring_ptr, last_ptr, count,
                              last_good, last_content, cond_valid, active, tpos_enc, ptr_pos, ptr_ok, rows,
                              num_maskmem, no_prev):
    C, M = cond_feats.shape[1:3]
    F, G, D = ring_feat.shape[1], ring_ptr.shape[1], cond_ptrs.shape[-1]
    L = cond_feats.shape[-1] * cond_feats.shape[-2]
    split = D // M if M < D else 1
    S = (C + F + 1) * L + (C + G + 1) * split
    return (cond_feats.new_empty(rows, S, M), cond_feats.new_empty(rows, S, M),
            torch.empty(rows, S, dtype=torch.bool, device=cond_feats.device))


# ---- typed entry point -------------------------------------------------------------------------


def table_kernels_backend(x: Tensor) -> Tuple[str, str]:
    """("triton" | "reference", reason) for a table whose features are ``x``."""
    return triton_backend(x, env.FORCE_REFERENCE)
