"""Shared pieces of the split-KV (flash-decoding) attention kernels: the merge of per-split partial
outputs and the SM count their split choice reads.

Partial results of split s for (batch*head) bh and query i sit at row ``(s * BH + bh) * L + i`` of
``part_o`` (rows of DH float32) and ``part_lse`` (base-2 log-sum-exp, float32, -inf for a split
that saw no valid key). DH is the output's (the values') width, which may differ from the query and
key width (``memory_attention`` with a value fold). The merge writes ``out`` (B, L, H, DH) in its dtype:
``out = sum_s 2^lse_s o_s / sum_s 2^lse_s``, a row with no valid key anywhere giving zeros.
Used by ``memory_attention`` and ``rpb_attention``.
"""

from __future__ import annotations

import functools

import torch

from ._triton_compat import HAS_TRITON, tl, triton


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


if HAS_TRITON:

    @triton.jit
    def _merge_splits_kernel(
        part_o_ptr, part_lse_ptr, out_ptr,
        L, H, n_splits,
        DH: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        # Grid (cdiv(L, BLOCK_M), B * H): out = sum_s 2^lse_s o_s / sum_s 2^lse_s over the splits.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        BH = tl.num_programs(1)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DH)
        m_mask = offs_m < L
        lse_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        for s in range(n_splits):
            row = (s * BH + pid_bh).to(tl.int64) * L + offs_m
            lse_max = tl.maximum(lse_max, tl.load(part_lse_ptr + row, mask=m_mask, other=float("-inf")))
        lse_use = tl.where(lse_max == float("-inf"), 0.0, lse_max)
        acc = tl.zeros((BLOCK_M, DH), dtype=tl.float32)
        w_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for s in range(n_splits):
            row = (s * BH + pid_bh).to(tl.int64) * L + offs_m
            w = tl.exp2(tl.load(part_lse_ptr + row, mask=m_mask, other=float("-inf")) - lse_use)
            o = tl.load(part_o_ptr + row[:, None] * DH + offs_d[None, :], mask=m_mask[:, None], other=0.0)
            acc += w[:, None] * o
            w_sum += w
        out = acc / tl.where(w_sum > 0.0, w_sum, 1.0)[:, None]
        dst = out_ptr + ((b * L + offs_m[:, None]) * H + h) * DH + offs_d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def merge_splits(part_o, part_lse, out, n_splits: int) -> None:
    """Launch the merge of ``n_splits`` partial results into ``out`` (B, L, H, DH)."""
    B, L, H, DH = out.shape
    block_m = 32
    _merge_splits_kernel[(triton.cdiv(L, block_m), B * H)](
        part_o, part_lse, out, L, H, n_splits, DH=DH, BLOCK_M=block_m, num_warps=4,
    )


def attention_backend(q, dtypes, head_dims, force_reference: bool):
    """("triton" | "reference", reason) for (B, L, H, Dh) queries: CUDA, triton importable, a kernel
    dtype and head dim (the choice the split-KV attention ops share)."""
    from ._triton_compat import triton_backend

    limit = None if q.dim() == 4 and q.shape[-1] in head_dims else (
        f"head dim {q.shape[-1]} (the Triton kernel takes {head_dims})")
    return triton_backend(q, force_reference, limit, dtypes)


def check_qkv(q, k, v, keys: str = "S", value_dim: bool = False) -> None:
    """q (B, L, H, Dh) floating; k and v (B, S, H, Dh) of q's dtype; at least one query and key
    (``keys``: the name of the key count in the messages). ``value_dim``: v may have its own last
    dim, (B, S, H, Dv) with Dv >= 1."""
    if q.dim() != 4 or not q.is_floating_point():
        raise ValueError(f"q must be a floating (B, L, H, Dh) tensor, got {q.dtype} {tuple(q.shape)}")
    B, L, H, Dh = q.shape
    if k.dim() != 4 or k.shape[0] != B or k.shape[2:] != (H, Dh):
        raise ValueError(f"k must be (B={B}, {keys}, H={H}, Dh={Dh}), got {tuple(k.shape)}")
    if value_dim:
        if v.dim() != 4 or v.shape[:3] != k.shape[:3] or v.shape[3] < 1:
            raise ValueError(f"v must have k's (B, {keys}, H) = {tuple(k.shape[:3])} and a last dim Dv >= 1, "
                             f"got {tuple(v.shape)}")
    elif v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if L < 1 or k.shape[1] < 1:
        raise ValueError(f"need at least one query and one key, got L={L}, {keys}={k.shape[1]}")
