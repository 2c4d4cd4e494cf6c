"""Memory attention: flash attention with the tracker's 2-D axial RoPE applied inside the op, a key
validity mask for a fixed-capacity memory bank, and a split-KV schedule so one object fills the GPU.

Letters: B batch (objects), Lq queries, S keys, H heads, Dh head dim (queries and keys), Dv value
width, L RoPE table rows (the g x g frame tokens, 72 x 72 = 5184 in SAM 3).

Inputs
    q          (B, Lq, H, Dh)  float32 / bfloat16 / float16 (the reference also takes float64)
    k          (B, S, H, Dh)   q's dtype; any strides with the last dim contiguous
    v          (B, S, H, Dv)   q's dtype; any strides with the last dim contiguous, including stride 0
                               on the head dim (one value tensor shared by every head, ``expand``);
                               Dv == Dh normally, Dv != Dh for the value fold below
    rope       (L, Dh/2, 2)    float32 (cos, sin) pairs: ``torch.view_as_real(freqs_cis)`` of the
                               complex table of ``sam3fast.model.vit.compute_axial_cis`` (a view)
    key_valid  (B, S) bool or None (all valid): False keys are ignored
    rope_q     rotate query i by table row i (needs Lq == L)
    n_rope_keys  keys s < n_rope_keys (a multiple of L) are rotated by row s mod L (memory frames);
                 keys s >= n_rope_keys (object-pointer tokens) are not rotated

Math. RoPE as ``sam3fast.model.vit.apply_rope``: channel pairs (2j, 2j+1) of a row are a complex
number multiplied by table entry j, in float32, the result rounded back to the input dtype:
    rot(x, r)[2j]   = x[2j] cos[r, j] - x[2j+1] sin[r, j]
    rot(x, r)[2j+1] = x[2j] sin[r, j] + x[2j+1] cos[r, j]
    q'_i = rot(q_i, i) if rope_q else q_i;   k'_s = rot(k_s, s mod L) if s < n_rope_keys else k_s
    out_i = sum_{s valid} softmax_s(q'_i . k'_s / sqrt(Dh)) v_s        (per batch and head)
Accumulation in float32 (float64 for float64 input); output in q's dtype, (B, Lq, H, Dv) contiguous.
A row whose keys are all invalid gives zeros, not NaN (the official SDPA would give NaN there; the
tracker never builds such a row, every object has at least its conditioning frame). The repeated
(S, Dh/2) table of the official ``rope_k_repeat`` is never built: the key's row is s mod L.

Against the model: ``sam3fast.model.memory_attention.RoPEAttention.forward(x, m, m, freqs_cis, T,
mask)`` equals ``out_proj(memory_attention(q_proj(x).view(B, L, H, -1), k_proj(m).view(...),
v_proj(m).view(...), view_as_real(freqs_cis), mask, True, S - T).reshape(B, L, -1))``, the
self-attention being ``n_rope_keys = S = L``.

Value fold (Dv != Dh). The values carry no RoPE and softmax rows sum to 1, so for a row with at
least one valid key ``attn(Q, K, M Wv^T + bv) = attn(Q, K, M) Wv^T + bv``: the cross-attention can
attend over the raw (B, S, M) memory (v = memory, Dv = M = 64, shared by the heads) and fold v_proj
into out_proj (``RoPEAttention.fold_value``). P.V then runs 64 wide instead of 256: FLOPs
2 Lq S (Dh + Dv) instead of 4 Lq S Dh (5/8 at Dh 256, Dv 64), and the kernel's float32 accumulator
is BLOCK_M x Dv. The Triton kernel takes Dv in ``_KERNEL_HEAD_DIMS``; the reference any Dv.

Schedule (flash decoding). Grid (cdiv(Lq, BLOCK_M), B * H, SPLITS): a program owns BLOCK_M queries
of one (batch, head) and one BLOCK_N-aligned chunk of the keys. With SPLITS > 1 each program writes
its normalised partial output and base-2 log-sum-exp to a float32 workspace and a second kernel
merges the splits; SPLITS is chosen so the grid fills the SMs (B = 1 at Lq = 5184, BLOCK_M = 64
gives only 81 query blocks for 132 SMs: 3 splits make 243 programs, 92 % of two waves). Keys RoPE, ``rope_k``:
    "prepass" (default) a small kernel writes the rotated keys once, in the input dtype (what the
              official rounds them to anyway): one extra read and write of K (B * S * H * Dh
              elements of workspace) and an attention loop that reads only K and V;
    "inline"  keys are rotated per tile inside the attention loop: no workspace, but every query
              block re-reads the float32 (cos, sin) rows, 4 Dh bytes per key beside 2 Dh for a
              bf16 key, and redoes the rotation. The benchmark compares the two.
Invalid keys (``skip_invalid_tiles``, on by default when ``key_valid`` is given): a small kernel
lists, per batch element, the BLOCK_N-key tiles that hold a valid key, and each split takes its
share of that list (an empty bank slot then costs nothing but its bytes of ``key_valid``). The loop
over the list is indirect but branch-free, so the K/V loads stay software-pipelined (cp.async on
sm_90). The earlier form, an ``if`` around each tile's work, compiled without any pipelining: a
static sm_90 build (``sam3fast.kernels._static_build``) shows it, and a test keeps it so.

Many objects (``uses_sdpa_path``): q and the keys rotated by the prepass kernel, then PyTorch's
SDPA. With Dv == Dh every backend may serve (cuDNN first). With Dv != Dh only cuDNN and
memory-efficient are allowed (the math backend would materialise an Lq x S score matrix per
object, 5184 x 36352 in SAM 3); if both refuse (a RuntimeError) the call goes to the Triton kernel,
and the refusal is remembered per (dtype, Dh, Dv) in ``SDPA_REFUSED`` so SDPA is tried once.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sam3fast import env

# triton is optional (the "gpu" extra): without it the reference and the CPU op still work.
from ._triton_compat import (  # noqa: F401  (TRITON_IMPORT_ERROR: read by the tests)
    HAS_TRITON, TRITON_IMPORT_ERROR, cdiv, check_power_of_two, device_guard, interpreted, require_triton, tl,
    triton, output_buffer, rows_contiguous,
)
from ._split_kv import attention_backend, check_qkv, merge_splits
from ._split_kv import sm_count as _sm_count

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)  # powers of two (tl.arange), >= 16 (tl.dot), <= 256 (registers)
_LOG2E = 1.4426950408889634
# (BLOCK_M, BLOCK_N, num_warps, num_stages) at Dh = 256 on sm_90. Timed on an H100 (2026-11-26,
# bench/results/memory_attention_nvidia-h100-80gb-hbm3_2026-11-26.md; bf16, 7 memory frames + 64
# pointer tokens): 64 x 32 with 4 warps was the fastest tile of the sweep, 0.95 ms at B = 1 and
# 13.8 ms at B = 16, against 1.96 ms and 28.9 ms for the previous default (64 x 32, 8 warps).
# Since session 18 the tracker's modules call the op with q and the keys already rotated (ROPE_Q off,
# no prepass). Static sm_90 builds (Triton 3.7, 1 object, 7 frames + 64 pointer tokens) then change:
# this tile's spill stores go from 42 to 1 (Dv 256) and from 15 to 0 with 100 registers (Dv 64, the
# fold), 128 x 64 w8 loses its 17 in-loop spill stores (8 left outside the loop) and 128 x 32 w8
# builds with 236 registers and none. Untimed: bench_memory_attention's "rotated" rows decide
# whether the default moves.
DEFAULT_TILE = (64, 32, 4, 2)
# From this many (object, head) pairs on, a bf16/fp16 call on CUDA rotates q and the keys with the
# RoPE prepass kernel and hands the attention to PyTorch's SDPA, cuDNN's backend first (set to None
# to always use the Triton kernel). Measured on an H100 (2026-11-26, the kernel before its skip of
# invalid tiles was pipelined): cuDNN took 9.1 ms at B = 16 (the best Triton tile 13.8 ms) but
# 1.67 ms at B = 1 (Triton 0.95 ms): 41 query blocks of one object leave most of the 132 SMs idle
# and cuDNN has no split-KV. On an H200 (2026-11-27, 7 frames + 64 pointer tokens): B = 1 SDPA
# 1.75 ms against Triton 0.66; B = 4 3.73 against 2.87 (DEFAULT_TILE; 2.55 with 128 x 64 w8,
# which spills in its loop on Triton 3.7's sm_90 build); B = 16 9.67 against 10.04 (9.30 with TMA
# loads). SDPA computes masked keys, the kernel skips their tiles: with 4 of 7 frames masked (a
# young or occluded track), B = 5 3.76 against 1.64 ms and B = 16 9.73 against 4.83. So SDPA only
# from 8 pairs on (B = 8 itself unmeasured); values narrower than the keys (the value fold) have
# their own threshold, SDPA_MIN_BATCH_HEADS_FOLD.
SDPA_MIN_BATCH_HEADS: Optional[int] = 8
# The value fold (Dv = 64 < Dh = 256) on the H200: at B = 4 the SDPA path took 1.82 ms (cuDNN alone
# 1.58) against the best Triton tile's 2.36; at B = 1 Triton 0.60 against cuDNN's 0.80.
SDPA_MIN_BATCH_HEADS_FOLD: Optional[int] = 4
# (dtype, Dh, Dv) with Dv != Dh that cuDNN and memory-efficient SDPA both refused -> the first line
# of the refusal; such calls go straight to the Triton kernel (see the module docstring).
SDPA_REFUSED: Dict[Tuple[torch.dtype, int, int], str] = {}


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, rope: Tensor, key_valid: Optional[Tensor], rope_q: bool,
                  n_rope_keys: int) -> None:
    check_qkv(q, k, v, "S", value_dim=True)
    B, Lq, H, Dh = q.shape
    S = k.shape[1]
    if Dh % 2:
        raise ValueError(f"the head dim must be even (RoPE rotates channel pairs), got {Dh}")
    if rope.dim() != 3 or rope.shape[1:] != (Dh // 2, 2) or rope.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"rope must be a float32 (L, {Dh // 2}, 2) (cos, sin) table (torch.view_as_real of the complex "
            f"freqs_cis), got {rope.dtype} {tuple(rope.shape)}"
        )
    L = rope.shape[0]
    if L < 1:
        raise ValueError("rope must have at least one row")
    if key_valid is not None and (key_valid.shape != (B, S) or key_valid.dtype != torch.bool):
        raise ValueError(f"key_valid must be a bool ({B}, {S}) tensor or None, got {key_valid.dtype} "
                         f"{tuple(key_valid.shape)}")
    others = [k, v, rope] + ([] if key_valid is None else [key_valid])
    if any(t.device != q.device for t in others):
        devices = [str(t.device) for t in [q] + others]
        raise ValueError(f"q, k, v, rope and key_valid must be on one device, got {devices}")
    if rope_q and Lq != L:
        raise ValueError(f"rope_q rotates query i by table row i: needs Lq == L, got Lq={Lq}, L={L}")
    if not 0 <= n_rope_keys <= S or n_rope_keys % L:
        raise ValueError(f"n_rope_keys must be a multiple of L={L} in [0, S={S}], got {n_rope_keys}")


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    xe, xo = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((xe * cos - xo * sin, xe * sin + xo * cos), dim=-1).flatten(-2)


def memory_attention_ref(
    q: Tensor, k: Tensor, v: Tensor, rope: Tensor, key_valid: Optional[Tensor], rope_q: bool, n_rope_keys: int
) -> Tensor:
    """The spec (and the op's CPU kernel): (B, Lq, H, Dv) in q's dtype. RoPE in float32 (float64 for
    float64 input) rounded to the input dtype, attention in float32 (float64)."""
    _check_inputs(q, k, v, rope, key_valid, rope_q, n_rope_keys)
    B, Lq, H, Dh = q.shape
    S, L = k.shape[1], rope.shape[0]
    compute = torch.promote_types(q.dtype, torch.float32)
    cos, sin = rope.to(compute)[:, None, :, :].unbind(-1)  # (L, 1, Dh/2): broadcast over heads
    if rope_q:
        q = _rotate(q.to(compute), cos, sin).to(q.dtype)
    if n_rope_keys > 0:
        # (B, N, L, H, Dh): the table broadcasts over the N frames instead of being repeated.
        kr = k[:, :n_rope_keys].to(compute).reshape(B, n_rope_keys // L, L, H, Dh)
        kr = _rotate(kr, cos, sin).to(k.dtype).reshape(B, n_rope_keys, H, Dh)
        k = torch.cat((kr, k[:, n_rope_keys:]), dim=1) if n_rope_keys < S else kr
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.to(compute).transpose(1, 2), k.to(compute).transpose(1, 2), v.to(compute).transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    if key_valid is not None:
        out = torch.where(key_valid.any(dim=1)[:, None, None, None], out, 0.0)  # no valid key -> zeros
    return out.to(q.dtype).contiguous()


if HAS_TRITON:
    from .rope import _bf16_rtne

    # Lazy rescaling (LAZY_RESCALE): the reference maximum of a row moves only when a tile's maximum
    # exceeds it by more than this many log2 units, so exp2 terms stay <= 2**8 (module docstring).
    RESCALE_THRESHOLD = tl.constexpr(8.0)

    @triton.jit
    def _rope_rows(x, cos, sin, M: tl.constexpr, DH: tl.constexpr):
        # x (M, DH) float32, interleaved pairs; cos/sin (M, DH/2).
        xe, xo = tl.split(tl.reshape(x, (M, DH // 2, 2)))
        return tl.reshape(tl.join(xe * cos - xo * sin, xe * sin + xo * cos), (M, DH))

    @triton.jit
    def _rope_keys_kernel(
        k_ptr, rope_ptr, out_ptr,
        B, S, H, L, n_rope,
        skb, skn, skh,
        DH: tl.constexpr, BLOCK_N: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    ):
        # Grid (cdiv(S, BLOCK_N), H): rotated keys for s < n_rope, copies of the others, written
        # (B, S, H, DH) contiguous in the input dtype. A program loads its rows' cos/sin once and
        # loops over the B objects (the table is read once, not B times), and reads and writes
        # the even and odd members of each pair as two stride-2 accesses (the same sectors), so the
        # rotation needs no reshape, split or join (their layout conversions went through shared
        # memory with a barrier each: 63 barriers a program at BLOCK_N 64 before session 17).
        pid_n = tl.program_id(0)
        h = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_j = tl.arange(0, DH // 2)
        n_ok = (offs_n < S)[:, None]
        rot = (offs_n < n_rope)[:, None]
        cs = rope_ptr + (offs_n % L)[:, None] * DH + 2 * offs_j[None, :]
        cos = tl.load(cs, mask=n_ok & rot, other=1.0)
        sin = tl.load(cs + 1, mask=n_ok & rot, other=0.0)
        src = k_ptr + h * skh + offs_n.to(tl.int64)[:, None] * skn + 2 * offs_j[None, :]
        dst = out_ptr + (offs_n.to(tl.int64)[:, None] * H + h) * DH + 2 * offs_j[None, :]
        out_b = tl.cast(S, tl.int64) * H * DH  # (tl.cast: S == 1 arrives as a constant)
        for b in range(B):
            xe = tl.load(src + b * skb, mask=n_ok, other=0.0)
            xo = tl.load(src + b * skb + 1, mask=n_ok, other=0.0)
            xe32 = xe.to(tl.float32)
            xo32 = xo.to(tl.float32)
            ye = tl.where(rot, xe32 * cos - xo32 * sin, xe32)
            yo = tl.where(rot, xe32 * sin + xo32 * cos, xo32)
            if BF16_BY_HAND:  # (interpreted: its float32 -> bf16 cast truncates)
                ye = _bf16_rtne(ye)
                yo = _bf16_rtne(yo)
            tl.store(dst + b * out_b, ye.to(out_ptr.dtype.element_ty), mask=n_ok)
            tl.store(dst + b * out_b + 1, yo.to(out_ptr.dtype.element_ty), mask=n_ok)

    _INTERPRETED = interpreted(_rope_keys_kernel)  # (then the prepass rounds bf16 itself: see interpreted)

    @triton.jit
    def _tile_list_kernel(valid_ptr, tiles_ptr, count_ptr, S, n_tiles, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
        # Grid (B,): the indices of the BLOCK_N-key tiles of key_valid[b] that hold a valid key, in
        # ascending order, to tiles[b, :count_b], and count_b to count[b] (the rest of the row unwritten).
        b = tl.program_id(0).to(tl.int64)
        offs_t = tl.arange(0, CHUNK)
        offs_k = tl.arange(0, BLOCK_N)
        count = tl.sum(tl.zeros((CHUNK,), dtype=tl.int32), axis=0)
        for t0 in range(0, n_tiles, CHUNK):
            tiles = t0 + offs_t
            keys = tiles[:, None] * BLOCK_N + offs_k[None, :]
            v = tl.load(valid_ptr + b * S + keys, mask=keys < S, other=0)
            flag = tl.max((v != 0).to(tl.int32), axis=1)  # (CHUNK,) 1 where the tile has a valid key
            pos = count + tl.cumsum(flag, axis=0) - flag  # exclusive prefix sum: the slot of each listed tile
            tl.store(tiles_ptr + b * n_tiles + pos, tiles, mask=flag > 0)
            count += tl.sum(flag, axis=0)
        tl.store(count_ptr + b, count)

    @triton.jit
    def _attend_tile(
        q, k_base, v_base, k_desc, v_desc, row0, rope_ptr, offs_n, n_mask, keep, offs_d, offs_dv, offs_j,
        m_i, l_i, acc, L, n_rope, skn, svn, qk_scale,
        ROPE_K: tl.constexpr, LAZY_RESCALE: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
        DH: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One online-softmax step over the key tile offs_n; scores in log2 units. m_i is the rows'
        # reference maximum: exact (the running maximum) unless LAZY_RESCALE, which keeps it while no
        # row's maximum grows past it by more than RESCALE_THRESHOLD (see the module docstring).
        dtype = q.dtype
        if USE_TMA:
            # The tile's BLOCK_N keys from row row0 of the (B S, DH) rows, through the tensor-memory
            # accelerator: rows past n_mask's end (the next split's or the next batch element's) are
            # masked below, rows past the last element come back as zeros.
            k = k_desc.load([row0, 0])
        else:
            k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        if ROPE_K:
            rot = (offs_n < n_rope)[:, None]
            cs = rope_ptr + (offs_n % L)[:, None] * DH + 2 * offs_j[None, :]
            cos = tl.load(cs, mask=rot, other=1.0)
            sin = tl.load(cs + 1, mask=rot, other=0.0)
            kf = k.to(tl.float32)
            k = tl.where(rot, _rope_rows(kf, cos, sin, BLOCK_N, DH), kf).to(dtype)
        # Raw scores; the scale (log2 e / sqrt(Dh) > 0) goes into the rows' maxima and, fused, into
        # the exp2 argument below (one FMA per score instead of a multiply and a subtraction).
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = tl.where(keep[None, :], s, float("-inf"))
        m_tile = tl.max(s, axis=1) * qk_scale
        if LAZY_RESCALE:
            # A block-uniform test. A row's first valid key always moves its reference (x - -inf is
            # +inf); a row with none yet (both -inf) does not grow.
            grow = tl.max(tl.where(m_tile > m_i, m_tile - m_i, 0.0), axis=0) > RESCALE_THRESHOLD
            if grow:
                m_new = tl.maximum(m_i, m_tile)
                alpha = tl.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
                l_i = l_i * alpha
                acc = acc * alpha[:, None]
                m_i = m_new
        else:
            m_new = tl.maximum(m_i, m_tile)
            alpha = tl.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        # Every key so far invalid: m_i = -inf; shifting by 0 keeps exp2 at 0 instead of NaN.
        p = tl.exp2(s * qk_scale - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
        l_i = l_i + tl.sum(p, axis=1)
        if USE_TMA:
            v = v_desc.load([row0, 0])
        else:
            v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :], mask=n_mask[:, None], other=0.0)
        acc = tl.dot(p.to(dtype), v, acc, input_precision=DOT_PRECISION)
        return m_i, l_i, acc

    @triton.jit
    def _memory_attention_kernel(
        q_ptr, k_ptr, v_ptr, k_desc, v_desc, rope_ptr, valid_ptr, tiles_ptr, count_ptr, out_ptr, part_o_ptr,
        part_lse_ptr, Lq, S, H, L, n_rope, kv_per_split, n_tiles, qk_scale,
        sqb, sqm, sqh, skb, skn, skh, svb, svn, svh,
        ROPE_Q: tl.constexpr, ROPE_K: tl.constexpr, HAS_VALID: tl.constexpr, SKIP_INVALID: tl.constexpr,
        SPLIT: tl.constexpr, LAZY_RESCALE: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
        DH: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Grid (cdiv(Lq, BLOCK_M), B * H, splits): BLOCK_M queries of one (batch, head) against the
        # keys [pid_s * kv_per_split, (pid_s + 1) * kv_per_split) (kv_per_split a multiple of BLOCK_N),
        # or with SKIP_INVALID against split pid_s's share of the listed tiles (tiles_ptr, count_ptr).
        # q and k are DH wide; v, the accumulator and the output DV wide (DV < DH: the value fold).
        # USE_TMA (one head): K and V tiles through the descriptors k_desc (B S, DH) and v_desc
        # (B S, DV) instead of the pointers.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)
        b32 = pid_bh // H  # the batch element: int32 for the descriptors' row, int64 for offsets
        b = b32.to(tl.int64)
        h = pid_bh % H
        dtype = q_ptr.dtype.element_ty
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DH)
        offs_dv = tl.arange(0, DV)
        offs_j = tl.arange(0, DH // 2)
        m_mask = offs_m < Lq

        q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                    mask=m_mask[:, None], other=0.0)
        if ROPE_Q:
            # Rotated once per program in float32 and rounded to the input dtype, like apply_rope.
            cs = rope_ptr + offs_m[:, None] * DH + 2 * offs_j[None, :]
            cos = tl.load(cs, mask=m_mask[:, None], other=1.0)
            sin = tl.load(cs + 1, mask=m_mask[:, None], other=0.0)
            q = _rope_rows(q.to(tl.float32), cos, sin, BLOCK_M, DH).to(dtype)

        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, DV), dtype=tl.float32)
        if SKIP_INVALID:
            # Only the key tiles that hold a valid key, from the list _tile_list_kernel wrote: the
            # program's share of this batch element's count_b listed tiles. An indirect but
            # branch-free loop, so the compiler still software-pipelines the K/V loads (cp.async);
            # a per-tile `if` around the loads would stop it (a static sm_90 build showed no
            # cp.async at all in that form).
            count = tl.load(count_ptr + b)
            per_split = tl.cdiv(count, tl.num_programs(2))
            t_start = pid_s * per_split
            t_end = tl.minimum(t_start + per_split, count)
            for t in range(t_start, t_end):
                tile = tl.load(tiles_ptr + b * n_tiles + t)
                offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
                n_mask = offs_n < S
                keep = n_mask & (tl.load(valid_ptr + b * S + offs_n, mask=n_mask, other=0) != 0)
                m_i, l_i, acc = _attend_tile(
                    q, k_base, v_base, k_desc, v_desc, b32 * S + tile * BLOCK_N, rope_ptr, offs_n, n_mask, keep, offs_d,
                    offs_dv, offs_j, m_i, l_i, acc, L, n_rope, skn, svn, qk_scale,
                    ROPE_K, LAZY_RESCALE, USE_TMA, DOT_PRECISION, DH, DV, BLOCK_N)
        else:
            n_start = pid_s * kv_per_split
            n_end = tl.minimum(n_start + kv_per_split, S)
            for start_n in range(n_start, n_end, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                n_mask = offs_n < n_end
                if HAS_VALID:
                    keep = n_mask & (tl.load(valid_ptr + b * S + offs_n, mask=n_mask, other=0) != 0)
                else:
                    keep = n_mask
                m_i, l_i, acc = _attend_tile(
                    q, k_base, v_base, k_desc, v_desc, b32 * S + start_n, rope_ptr, offs_n, n_mask, keep, offs_d,
                    offs_dv, offs_j, m_i, l_i, acc, L, n_rope, skn, svn, qk_scale,
                    ROPE_K, LAZY_RESCALE, USE_TMA, DOT_PRECISION, DH, DV, BLOCK_N)

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # no valid key: acc is 0, the output row is 0
        o = acc / l_safe[:, None]
        if SPLIT:
            row = (pid_s * tl.num_programs(1) + pid_bh).to(tl.int64) * Lq + offs_m
            lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(part_lse_ptr + row, lse, mask=m_mask)
            tl.store(part_o_ptr + row[:, None] * DV + offs_dv[None, :], o, mask=m_mask[:, None])
        else:
            dst = out_ptr + ((b * Lq + offs_m[:, None]) * H + h) * DV + offs_dv[None, :]
            tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])



def choose_num_splits(programs: int, kv_tiles: int, n_sms: int, max_splits: int = 16, min_tiles: int = 4) -> int:
    """KV splits for a grid of ``programs`` (query block, batch-head) pairs: the fewest that fill at
    least 90 % of the last wave of ``n_sms``, else the best fill; each split keeps >= ``min_tiles``
    key tiles. Waves are counted at one program per SM (what 8 warps x 255 registers allow at
    Dh = 256); the default tile, 4 warps x 255 registers and 96 KiB of shared memory
    (bench/results/kernel_static_sm90_2026-11-26.md), fits two, so its "waves" are half-waves."""
    best, best_fill = 1, 0.0
    for s in range(1, max_splits + 1):
        if s > 1 and kv_tiles < s * min_tiles:
            break
        total = programs * s
        fill = total / (cdiv(total, n_sms) * n_sms)
        if fill >= 0.9:
            return s
        if fill > best_fill + 1e-9:
            best, best_fill = s, fill
    return best


def _memory_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rope: Tensor,
    key_valid: Optional[Tensor],
    rope_q: bool,
    n_rope_keys: int,
    out: Optional[Tensor] = None,
    block_m: int = DEFAULT_TILE[0],
    block_n: int = DEFAULT_TILE[1],
    num_splits: Optional[int] = None,
    rope_k: str = "prepass",
    skip_invalid_tiles: bool = True,
    lazy_rescale: bool = True,
    use_tma: bool = False,
    num_warps: int = DEFAULT_TILE[2],
    num_stages: int = DEFAULT_TILE[3],
) -> Tensor:
    """Launcher. ``out`` may be a preallocated contiguous (B, Lq, H, Dv) tensor of q's dtype (every
    element is written). ``num_splits`` None picks one from the SM count (1 off CUDA); the number
    launched may be lower so that no split is empty. ``block_m``/``block_n`` powers of two >= 16."""
    require_triton("memory_attention")
    _check_inputs(q, k, v, rope, key_valid, rope_q, n_rope_keys)
    if q.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32/bfloat16/float16, got {q.dtype}")
    B, Lq, H, Dh = q.shape
    S, L, Dv = k.shape[1], rope.shape[0], v.shape[-1]
    if Dh not in _KERNEL_HEAD_DIMS:
        raise ValueError(f"the Triton kernel takes head dims {_KERNEL_HEAD_DIMS}, got {Dh}")
    if Dv not in _KERNEL_HEAD_DIMS:
        raise ValueError(f"the Triton kernel takes value dims Dv in {_KERNEL_HEAD_DIMS}, got {Dv}")
    if rope.dtype != torch.float32:
        raise ValueError(f"the Triton kernel takes a float32 rope table, got {rope.dtype}")
    check_power_of_two("block_m", block_m, minimum=16)
    check_power_of_two("block_n", block_n, minimum=16)
    if rope_k not in ("prepass", "inline"):
        raise ValueError(f"rope_k must be 'prepass' or 'inline', got {rope_k!r}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    dev = q.device
    out = output_buffer(out, (B, Lq, H, Dv), q.dtype, dev)
    if B == 0:
        return out
    # Only the last dim must be contiguous: the projections' (B, L, D) -> (B, L, H, Dh) views pass as
    # is, and so does a v expanded over the heads (stride 0: every head reads the same rows).
    q, k, v = rows_contiguous(q, k, v)
    rope = rope.contiguous()
    valid = key_valid.contiguous().view(torch.uint8) if key_valid is not None else q  # unread when absent

    kv_tiles = cdiv(S, block_n)
    programs = cdiv(Lq, block_m) * B * H
    if num_splits is None:
        num_splits = 1
        if dev.type == "cuda":
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            num_splits = choose_num_splits(programs, kv_tiles, _sm_count(index))
    tiles_per_split = cdiv(kv_tiles, min(num_splits, kv_tiles))
    splits = cdiv(kv_tiles, tiles_per_split)  # no split left empty
    kv_per_split = tiles_per_split * block_n
    skip = bool(skip_invalid_tiles) and key_valid is not None
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding
    qk_scale = _LOG2E / math.sqrt(Dh)

    with device_guard(dev):
        if rope_k == "prepass" and n_rope_keys > 0:
            k = _rope_prepass(k, rope, n_rope_keys)
        if skip:
            # No host sync: the attention loops over a count it reads on the device; splits left
            # without a tile give -inf / zero partials, which the merge ignores.
            tiles, counts = _valid_tiles(valid, S, block_n)
        else:
            tiles = counts = valid  # unread
        if splits > 1:
            part_o = torch.empty((splits, B * H, Lq, Dv), dtype=torch.float32, device=dev)
            part_lse = torch.empty((splits, B * H, Lq), dtype=torch.float32, device=dev)
        else:
            part_o = part_lse = out  # unread
        if use_tma:
            from triton.tools.tensor_descriptor import TensorDescriptor

            why = _tma_refusal(k, v, H, rope_k == "inline" and n_rope_keys > 0)  # k: what the kernel reads
            if why is not None:
                raise ValueError(f"use_tma: {why}")
            k_desc = TensorDescriptor(k, [B * S, Dh], [k.stride(1), 1], [block_n, Dh])
            v_desc = TensorDescriptor(v, [B * S, Dv], [v.stride(1), 1], [block_n, Dv])
        else:
            k_desc, v_desc = k, v  # unread
        _memory_attention_kernel[(cdiv(Lq, block_m), B * H, splits)](
            q, k, v, k_desc, v_desc, rope, valid, tiles, counts, out, part_o, part_lse,
            Lq, S, H, L, n_rope_keys, kv_per_split, kv_tiles, qk_scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            ROPE_Q=bool(rope_q), ROPE_K=(rope_k == "inline" and n_rope_keys > 0),
            HAS_VALID=key_valid is not None, SKIP_INVALID=skip,
            SPLIT=splits > 1, LAZY_RESCALE=bool(lazy_rescale), USE_TMA=bool(use_tma), DOT_PRECISION=dot_precision,
            DH=Dh, DV=Dv, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps, num_stages=num_stages,
        )
        if splits > 1:
            merge_splits(part_o, part_lse, out, splits)
    return out


def _tma_refusal(k: Tensor, v: Tensor, H: int, inline_rope: bool) -> Optional[str]:
    """Why K and V cannot be read through tensor descriptors (None: they can): one head, keys rotated
    by the prepass (the inline RoPE reads raw keys with its own masks), (B S) rows of a 16-byte
    multiple stride from a 16-byte aligned base."""
    if H != 1:
        return f"one head only, got {H}"
    if inline_rope:
        return "not with rope_k='inline'"
    for name, t in (("k", k), ("v", v)):
        e = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(1) * e) % 16:
            return f"{name} needs a 16-byte aligned base and 16-byte multiple strides, got {tuple(t.stride())}"
        if t.shape[0] > 1 and t.stride(0) != t.shape[1] * t.stride(1):
            return f"{name} must be one run of rows over the batch (B S rows), got strides {tuple(t.stride())}"
    return None


def _valid_tiles(valid_u8: Tensor, S: int, block_n: int) -> Tuple[Tensor, Tensor]:
    """(tiles (B, cdiv(S, block_n)) int32, counts (B,) int32) for (B, S) key-validity bytes: row b
    lists, in ascending order, the block_n-key tiles holding a nonzero byte in its first counts[b]
    entries (the rest unwritten). One launch of ``_tile_list_kernel``."""
    B = valid_u8.shape[0]
    n_tiles = cdiv(S, block_n)
    tiles = torch.empty((B, n_tiles), dtype=torch.int32, device=valid_u8.device)
    counts = torch.empty((B,), dtype=torch.int32, device=valid_u8.device)
    if B > 0:
        _tile_list_kernel[(B,)](valid_u8, tiles, counts, S, n_tiles, BLOCK_N=block_n,
                                CHUNK=min(128, triton.next_power_of_2(n_tiles)), num_warps=4)
    return tiles, counts


# Rows a program of the RoPE prepass (_rope_keys_kernel) takes, and its warps: 16 x Dh/2 pairs,
# the cos/sin of each row loaded once for all B objects. Static sm_90 build (Triton 3.7) at the
# tracker's keys (16 x 36352 x 1 x 256, bf16): 128 registers, no barrier, no shared memory, 2272
# programs (32 rows: 254 registers; 64: spills). The kernel before session 17 (a program per 64
# rows and object, reshape/split/join) had 229 registers and 63 barriers, and took 0.257 ms a call
# on average (13 calls a frame, self- and cross-attention) in the 16-object tracker profile (H200,
# 2026-11-27). This kernel is not yet timed on a GPU. Since session 18 the tracker's modules on CUDA in
# bf16/fp16 project q and the keys with RoPE in the projection's epilogue (sam3fast::rope_projection,
# RoPEAttention.fuse_rope_projection) and call the op with nothing to rotate: the prepass then runs
# only where that switch is off (and for direct callers of the op).
ROPE_PREPASS_BLOCK_N = 16
ROPE_PREPASS_WARPS = 4


def _rope_prepass(x: Tensor, rope: Tensor, n_rope: int, block_n: int = ROPE_PREPASS_BLOCK_N,
                  num_warps: int = ROPE_PREPASS_WARPS) -> Tensor:
    """(B, S, H, Dh) contiguous copy of ``x`` with rows s < ``n_rope`` rotated by table row s mod L,
    in x's dtype (the prepass kernel of the Triton path and of the SDPA path)."""
    B, S, H, Dh = x.shape
    out = torch.empty((B, S, H, Dh), dtype=x.dtype, device=x.device)
    if B * S * H == 0:
        return out
    with device_guard(x.device):
        _rope_keys_kernel[(cdiv(S, block_n), H)](
            x, rope, out, B, S, H, rope.shape[0], n_rope, x.stride(0), x.stride(1), x.stride(2),
            DH=Dh, BLOCK_N=block_n, BF16_BY_HAND=_INTERPRETED and x.dtype == torch.bfloat16,
            num_warps=num_warps,
        )
    return out


def _memory_attention_sdpa(
    q: Tensor, k: Tensor, v: Tensor, rope: Tensor, key_valid: Optional[Tensor], rope_q: bool, n_rope_keys: int
) -> Tensor:
    """Many objects: q and the keys rotated by the prepass kernel (in the input dtype, as the
    official rounds them), then ``F.scaled_dot_product_attention`` with the validity mask, cuDNN's
    backend first, then flash (no mask only), memory-efficient and math. With Dv != Dh only cuDNN
    and memory-efficient: a RuntimeError when both refuse (never the math backend's Lq x S scores).
    Same contract as the Triton launcher (a row with no valid key gives zeros)."""
    require_triton("memory_attention")
    _check_inputs(q, k, v, rope, key_valid, rope_q, n_rope_keys)
    q, k, v = rows_contiguous(q, k, v)
    if v.shape[2] > 1 and v.stride(2) == 0:
        v = v.contiguous()  # a value shared by the heads: SDPA backends are not promised stride-0 heads
    rope = rope.contiguous()
    if rope_q:
        q = _rope_prepass(q, rope, q.shape[1])
    if n_rope_keys > 0:
        k = _rope_prepass(k, rope, n_rope_keys)
    mask = None if key_valid is None else key_valid[:, None, None, :]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if v.shape[-1] == q.shape[-1]:
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
    else:
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(order, set_priority=True):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask).transpose(1, 2)
    if key_valid is not None:
        out = torch.where(key_valid.any(dim=1)[:, None, None, None], out, 0.0)
    return out.contiguous()


def uses_sdpa_path(q: Tensor, value_dim: Optional[int] = None) -> bool:
    """Whether ``sam3fast::memory_attention`` on CUDA hands these queries, with values
    ``value_dim`` wide (None: q's head dim), to SDPA (see ``SDPA_MIN_BATCH_HEADS`` and
    ``SDPA_MIN_BATCH_HEADS_FOLD``) rather than the Triton kernel."""
    Dv = q.shape[-1] if value_dim is None else value_dim
    limit = SDPA_MIN_BATCH_HEADS if Dv >= q.shape[-1] else SDPA_MIN_BATCH_HEADS_FOLD
    return (limit is not None and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[0] * q.shape[2] >= limit)


@torch.library.custom_op("sam3fast::memory_attention", mutates_args=(), device_types="cuda")
def memory_attention_op(
    q: Tensor, k: Tensor, v: Tensor, rope: Tensor, key_valid: Optional[Tensor], rope_q: bool, n_rope_keys: int
) -> Tensor:
    """``sam3fast::memory_attention``: on CUDA the Triton kernel, or for many objects in bf16/fp16
    the RoPE prepass + SDPA (``uses_sdpa_path``); ``memory_attention_ref`` on CPU."""
    return _memory_attention_dispatch(q, k, v, rope, key_valid, rope_q, n_rope_keys)


def _memory_attention_dispatch(
    q: Tensor, k: Tensor, v: Tensor, rope: Tensor, key_valid: Optional[Tensor], rope_q: bool, n_rope_keys: int
) -> Tensor:
    """The CUDA op's body (callable on any device the launchers take): SDPA for many objects, where
    it accepts a Dv != Dh (tried once per (dtype, Dh, Dv), see ``SDPA_REFUSED``), else Triton."""
    if uses_sdpa_path(q, v.shape[-1]):
        Dh, Dv = q.shape[-1], v.shape[-1]
        if Dv == Dh:
            return _memory_attention_sdpa(q, k, v, rope, key_valid, rope_q, n_rope_keys)
        key = (q.dtype, Dh, Dv)
        if key not in SDPA_REFUSED:
            try:
                return _memory_attention_sdpa(q, k, v, rope, key_valid, rope_q, n_rope_keys)
            except torch.OutOfMemoryError:
                raise  # not a refusal
            except RuntimeError as e:  # cuDNN and memory-efficient both refused these widths
                SDPA_REFUSED[key] = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return _memory_attention_triton(q, k, v, rope, key_valid, rope_q, n_rope_keys)


memory_attention_op.register_kernel("cpu")(memory_attention_ref)


@memory_attention_op.register_fake
def _memory_attention_fake(q, k, v, rope, key_valid, rope_q, n_rope_keys):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


# ---- typed entry point (re-exported by sam3fast.ops) ------------------------------------------


def memory_attention_backend(q: Tensor, value_dim: Optional[int] = None) -> Tuple[str, str]:
    """("triton" | "reference", reason) for queries of this device, dtype and head dim, and values
    ``value_dim`` wide (None: q's head dim)."""
    backend, why = attention_backend(q, _KERNEL_DTYPES, _KERNEL_HEAD_DIMS, env.FORCE_REFERENCE)
    if backend == "triton" and value_dim is not None and value_dim not in _KERNEL_HEAD_DIMS:
        return "reference", f"value dim {value_dim} (the Triton kernel takes {_KERNEL_HEAD_DIMS})"
    return backend, why


def memory_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    freqs_cis: Tensor,
    key_valid: Optional[Tensor] = None,
    *,
    rope_q: bool = True,
    n_rope_keys: Optional[int] = None,
) -> Tensor:
    """RoPE attention of the tracker's memory attention, after its projections.

    q (B, Lq, H, Dh); k (B, S, H, Dh); v (B, S, H, Dv), Dv == Dh or not (the value fold; stride 0
    on the head dim allowed); freqs_cis (L, Dh/2) complex64 (``compute_axial_cis``) or its
    (L, Dh/2, 2) float32 ``view_as_real``; key_valid (B, S) bool or None (all valid). Query i is
    rotated by row i when ``rope_q``; keys s < ``n_rope_keys`` (None: all S) by row s mod L.
    Returns (B, Lq, H, Dv) in q's dtype; see ``sam3fast.kernels.memory_attention`` for the math.
    """
    rope = torch.view_as_real(freqs_cis) if freqs_cis.is_complex() else freqs_cis
    n_rope_keys = k.shape[1] if n_rope_keys is None else int(n_rope_keys)
    backend, _ = memory_attention_backend(q, v.shape[-1])
    if backend == "triton":
        return torch.ops.sam3fast.memory_attention(q, k, v, rope.float(), key_valid, bool(rope_q), n_rope_keys)
    return memory_attention_ref(q, k, v, rope, key_valid, bool(rope_q), n_rope_keys)
