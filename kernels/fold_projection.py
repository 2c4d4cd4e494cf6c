"""The memory cross-attention's folded output projection, out_proj . v_proj, in one launch.

Letters: D the attention width (256), H heads, Dh = D / H, K the values' input width (the memory's
64 channels).

fold_out_proj(wo, bo, wv, bv, num_heads, out_dtype) -> (w, b)
    wo (D, D), bo (D,): out_proj's weight and bias; wv (D, K), bv (D,): v_proj's (any floating
    dtypes, read in float32; float64 inputs are computed in float64 by the reference)
    w[o, h * K + k] = sum_d wo[o, h * Dh + d] * wv[h * Dh + d, k]       (D, H * K)
    b[o]            = bo[o] + sum_j wo[o, j] * bv[j]                     (D,)
    both accumulated in float32 and rounded once to ``out_dtype``

Where: ``RoPEAttention.folded_out_proj`` (the tracker's memory cross-attention with ``fold_value``:
every head attends over the raw K-wide memory and out_proj . v_proj is applied as one linear). The
PyTorch form casts the four parameters to float32, multiplies, adds and casts back: ~10 launches a
layer, 40 a tracker step (4 layers) and graphed steps replay them every frame, for a 256 x 256 x 64
product. Recomputed at each call from the current parameters (nothing cached to go stale). The
same values to float32 rounding (the products are summed in another order than cuBLAS's), then one
rounding to the output dtype. Not yet timed on a GPU.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from sam3fast import env

# triton is optional (the "gpu" extra): without it the reference and the CPU op still work.
from ._triton_compat import (  # noqa: F401  (TRITON_IMPORT_ERROR: read by the tests)
    KERNEL_DTYPES, HAS_TRITON, TRITON_IMPORT_ERROR, cdiv, device_guard, interpreted, output_buffer, require_triton,
    tl, triton, triton_backend,
)

DEFAULT_BLOCK_O = 32  # output rows a program
_MAX_K = 256  # the value width K a program holds in one tile (SAM 3: K = 64; Dh is looped over)


def _check(wo: Tensor, bo: Tensor, wv: Tensor, bv: Tensor, num_heads: int) -> Tuple[int, int, int]:
    if wo.dim() != 2 or wo.shape[0] != wo.shape[1]:
        raise ValueError(f"wo must be a square (D, D) weight, got {tuple(wo.shape)}")
    D = wo.shape[0]
    if wv.dim() != 2 or wv.shape[0] != D or tuple(bo.shape) != (D,) or tuple(bv.shape) != (D,):
        raise ValueError(f"expected bo ({D},), wv ({D}, K), bv ({D},); got {tuple(bo.shape)}, {tuple(wv.shape)}, "
                         f"{tuple(bv.shape)}")
    if num_heads < 1 or D % num_heads:
        raise ValueError(f"num_heads {num_heads} must divide {D}")
    return D, num_heads, wv.shape[1]


def fold_out_proj_ref(wo: Tensor, bo: Tensor, wv: Tensor, bv: Tensor, num_heads: int,
                      out_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """The spec (and the op's CPU kernel): the product in float32 (float64 for float64 outputs),
    rounded once."""
    D, H, _ = _check(wo, bo, wv, bv, num_heads)
    acc = torch.promote_types(out_dtype, torch.float32)
    wo, bo, wv, bv = (t.to(acc) for t in (wo, bo, wv, bv))
    w = torch.einsum("ohd,hdm->ohm", wo.view(D, H, D // H), wv.view(H, D // H, -1)).flatten(1)
    return w.to(out_dtype), (bo + wo @ bv).to(out_dtype)


if HAS_TRITON:
    from .rope import _bf16_rtne

    @triton.jit
    def _fold_out_proj_kernel(
        wo_ptr, bo_ptr, wv_ptr, bv_ptr, w_ptr, b_ptr, D, DH, K, H,
        BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    ):
        # Grid (cdiv(D, BLOCK_O), H): rows [i * BLOCK_O, +BLOCK_O) of w's head-h block, summed over
        # the head's Dh inputs BLOCK_D at a time, and the head's part of b (head 0 adds bo; with
        # several heads the parts are added atomically into the launcher's zero-filled float32 b).
        i = tl.program_id(0)
        h = tl.program_id(1)
        o = i * BLOCK_O + tl.arange(0, BLOCK_O)
        k = tl.arange(0, BLOCK_K)
        om, km = o < D, k < K
        acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
        part = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for d0 in range(0, DH, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < DH
            j = h * DH + d
            a = tl.load(wo_ptr + o[:, None] * D + j[None, :], mask=om[:, None] & dm[None, :], other=0.0).to(tl.float32)
            v = tl.load(wv_ptr + j[:, None] * K + k[None, :], mask=dm[:, None] & km[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(a, v, acc, input_precision="ieee")
            bvh = tl.load(bv_ptr + j, mask=dm, other=0.0).to(tl.float32)
            part += tl.sum(a * bvh[None, :], axis=1)
        if BF16_BY_HAND:
            acc = _bf16_rtne(acc)
        tl.store(w_ptr + o[:, None] * (H * K) + h * K + k[None, :], acc.to(w_ptr.dtype.element_ty),
                 mask=om[:, None] & km[None, :])
        if h == 0:
            part += tl.load(bo_ptr + o, mask=om, other=0.0).to(tl.float32)
        if H == 1:
            if BF16_BY_HAND:
                part = _bf16_rtne(part)
            tl.store(b_ptr + o, part.to(b_ptr.dtype.element_ty), mask=om)
        else:
            tl.atomic_add(b_ptr + o, part, mask=om)


def _fold_out_proj_triton(wo: Tensor, bo: Tensor, wv: Tensor, bv: Tensor, num_heads: int, out_dtype: torch.dtype,
                          block_o: int = DEFAULT_BLOCK_O, out_w: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Launcher: (w (D, H * K), b (D,)) in ``out_dtype``. ``out_w``: a preallocated contiguous w (tests
    pass one filled with NaN; every element is written)."""
    require_triton("fold_out_proj")
    D, H, K = _check(wo, bo, wv, bv, num_heads)
    DH = D // H
    if out_dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel writes float32/bfloat16/float16, got {out_dtype}")
    if K > _MAX_K:
        raise ValueError(f"the Triton kernel takes value widths up to {_MAX_K}, got {K}")
    wo, bo, wv, bv = (t.contiguous() for t in (wo, bo, wv, bv))
    w = output_buffer(out_w, (D, H * K), out_dtype, wo.device)
    # several heads sum their partial biases atomically (in float32, rounded after)
    b = torch.empty(D, dtype=out_dtype, device=wo.device) if H == 1 else torch.zeros(D, dtype=torch.float32,
                                                                                         device=wo.device)
    with device_guard(wo.device):
        _fold_out_proj_kernel[(cdiv(D, block_o), H)](
            wo, bo, wv, bv, w, b, D, DH, K, H,
            BLOCK_O=block_o, BLOCK_D=min(64, max(16, triton.next_power_of_2(DH))),
            BLOCK_K=max(16, triton.next_power_of_2(K)),
            BF16_BY_HAND=interpreted(_fold_out_proj_kernel) and out_dtype == torch.bfloat16,
        )
    return w, b.to(out_dtype)


@torch.library.custom_op("sam3fast::fold_out_proj", mutates_args=(), device_types="cuda")
def fold_out_proj_op(wo: Tensor, bo: Tensor, wv: Tensor, bv: Tensor, num_heads: int,
                     out_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``sam3fast::fold_out_proj``: the Triton kernel on CUDA, ``fold_out_proj_ref`` on CPU."""
    return _fold_out_proj_triton(wo, bo, wv, bv, num_heads, out_dtype)


fold_out_proj_op.register_kernel("cpu")(fold_out_proj_ref)


@fold_out_proj_op.register_fake
def _fold_out_proj_fake(wo, bo, wv, bv, num_heads, out_dtype):
    D, H, K = _check(wo, bo, wv, bv, num_heads)
    return wo.new_empty(D, H * K, dtype=out_dtype), wo.new_empty(D, dtype=out_dtype)


def fold_out_proj_backend(wo: Tensor, out_dtype: torch.dtype, K: int = 0) -> Tuple[str, str]:
    """("triton" | "reference", reason) for these weights (their device), output dtype and value
    width ``K``."""
    limit = None
    if out_dtype not in KERNEL_DTYPES:
        limit = f"{out_dtype} outputs (the kernel writes float32/bf16/fp16)"
    elif K > _MAX_K:
        limit = f"value width {K} (the kernel takes up to {_MAX_K})"
    return triton_backend(wo, env.FORCE_REFERENCE, limit)


def fold_out_proj(wo: Tensor, bo: Tensor, wv: Tensor, bv: Tensor, num_heads: int,
                  out_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(w, b) of out_proj . v_proj (see the module docstring): the Triton kernel on CUDA,
    ``fold_out_proj_ref`` elsewhere."""
    if fold_out_proj_backend(wo, out_dtype, wv.shape[-1])[0] == "triton":
        return torch.ops.sam3fast.fold_out_proj(wo, bo, wv, bv, int(num_heads), out_dtype)
    return fold_out_proj_ref(wo, bo, wv, bv, num_heads, out_dtype)
