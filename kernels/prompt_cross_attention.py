"""Prompt cross-attention: the fusion encoder's image -> prompt cross-attention step in one kernel,
LayerNorm, query projection, attention over all prompt keys, output projection and residual fused.

Letters: B batch, L image tokens (queries; 72 x 72 = 5184 in SAM 3), P prompt tokens (keys; text
32 + geometry / visual, <= 64 in practice), D model width (256), H heads, Dh = D / H (32).

Inputs
    tgt          (B, L, D)  float32 / bfloat16 / float16 (the reference also takes float64); any
                            strides with the last dim contiguous
    k, v         (B, P, D)  tgt's dtype: the prompt already projected, ``k = memory Wk^T + bk`` and
                            ``v = memory Wv^T + bv`` (tiny: done outside with one F.linear); any
                            strides with the last dim contiguous (two views of one (B, P, 2D) GEMM)
    key_padding_mask  (B, P) bool, True = padded key (ignored), or None (all keys valid)
    norm_weight, norm_bias  (D,) or both None (no LayerNorm: the queries are tgt itself)
    eps          LayerNorm epsilon
    q_weight (D, D), q_bias (D,)      the query rows of ``in_proj_weight`` / ``in_proj_bias``
    out_weight (D, D), out_bias (D,)  ``out_proj``
    num_heads    H; all weights in tgt's dtype

Math, per batch b and image token i (the model's rounding points: each step is rounded to the
input dtype, as the PyTorch modules do in that dtype; accumulation in float32, float64 for float64):
    x_i   = LN(tgt_i) = (tgt_i - mean) / sqrt(var + eps) * norm_weight + norm_bias   (or tgt_i)
    q_i   = x_i Wq^T + bq                                               head h: columns h Dh ..
    o_i^h = sum_{s not padded} softmax_s(q_i^h . k_s^h / sqrt(Dh)) v_s^h
    out_i = tgt_i + (concat_h o_i^h) Wo^T + bo                          (B, L, D) contiguous
A batch element whose keys are all padded gives o = 0, so out_i = tgt_i + bo (the reference too):
what sam3fast's SDPA path gives on CPU (torch 2.13's CPU SDPA returns 0 for a fully masked row);
the official nn.MultiheadAttention gives NaN there, and SDPA's CUDA backends are not promised to
agree. The fusion encoder never builds such a row (the text prompt always has valid tokens).

Against the model: in ``sam3fast.model.encoder.TransformerEncoderLayer`` with the fusion encoder's
settings (no position on the cross-attention's queries or keys, the memory = the prompt)
    tgt + cross_attn_image(norm2(tgt), memory, memory, key_padding_mask=mask)
    == prompt_cross_attention(tgt, memory, mask, cross_attn_image.in_proj_weight, ...in_proj_bias,
                              ...out_proj.weight, ...out_proj.bias, H, norm2.weight, norm2.bias, norm2.eps)
It replaces the (B, L, D) normalised x, q, attention output and out-projection intermediates and
about ten launches per layer by one launch (plus the prompt's K/V GEMM).

Schedule. Grid (cdiv(L, BLOCK_M), B, D / BLOCK_O): a program owns BLOCK_M image rows of one batch
element and BLOCK_O of the D output columns. It loads the (BLOCK_M, D) rows once and normalises them
in float32; for each head (a loop, not unrolled: unrolled, the compiler hoists all heads' weight
loads and spills) it projects q^h with the (Dh, D) slice of Wq, attends to all P keys in one tile
(BLOCK_P = next power of two >= 16; exact softmax, no online rescaling), and accumulates
o^h Wo[cols, h]^T into a (BLOCK_M, BLOCK_O) float32 tile; then adds bo and the residual (re-read,
not kept live across the loop) and stores. BLOCK_O < D recomputes q and the attention per column
block (D / BLOCK_O times: ~1 GFLOP more per layer at SAM 3 sizes, nothing at H100 rates) to keep
the output tile in registers: on sm_90 (Triton 3.7, bf16, D 256, H 8, P 64; ptxas usage read with
cuobjdump, no GPU) BLOCK_M 64 with 8 warps spills 224 bytes per thread at BLOCK_O = 256 and none at
128, and it doubles the grid (B = 1, L = 5184: 162 programs for 132 SMs). Weights are re-read from
L2 by every program (~2 D^2 elements). Kernel limits: D a power of two in [16, 256], Dh a power of
two >= 16 (tl.dot), 1 <= P <= 128 (one key tile: P = 64 uses 255 registers, 128 spills 80 bytes,
256 1.2 KB; SAM 3's prompts have ~33-64 tokens).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sam3fast import env

# triton is optional (the "gpu" extra): without it the reference and the CPU op still work.
from ._triton_compat import (  # noqa: F401  (TRITON_IMPORT_ERROR: read by the tests)
    HAS_TRITON, TRITON_IMPORT_ERROR, cdiv, check_power_of_two, device_guard, require_triton, tl, triton,
    why_not_triton,
    output_buffer, rows_contiguous,
)

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_D = 256  # the (BLOCK_M, D) float32 output tile lives in registers
_MAX_P = 128  # all keys in one tile; at 256 (D 256, sm_90) the score tile spills ~1.2 KB per thread
_LOG2E = 1.4426950408889634
# (BLOCK_M, BLOCK_O, num_warps, num_stages) at D = 256, H = 8, P <= 64 on sm_90 (Triton 3.7, bf16,
# ptxas resource usage read with cuobjdump, no GPU): 255 registers, no spill, wgmma. Spills: 64 x 256
# w8 224 bytes, 64 x 128 w4 272, 128 x 128 w8 288; none at 64 x 64 w8, 32 x 128 / 32 x 256 w4 (those
# two use mma.sync, not wgmma). Those builds used a hand-written signature; built as the launcher
# launches it (bench/kernel_static_report.py: aligned pointers, strides divisible by 16), the
# default 64 x 128 w4 takes 232 registers at P 33 and 228 at P 64 and does not spill
# (bench/results/kernel_static_sm90_2026-11-26.md). Timed on an H100 (2026-11-26, bench/results/prompt_cross_attention_*):
# 64 x 128 with 4 warps was the fastest of the sweep despite its small spill, 0.026 / 0.065 / 0.066 ms
# at B = 1 (P 33) / 4 (P 33) / 4 (P 64) against 0.050 / 0.116 / 0.119 ms for 64 x 128 w8, the
# previous default.
DEFAULT_TILE = (64, 128, 4, 2)


def _check_inputs(
    tgt: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor], q_weight: Tensor, q_bias: Tensor, out_weight: Tensor, out_bias: Tensor,
    num_heads: int,
) -> None:
    if tgt.dim() != 3 or not tgt.is_floating_point():
        raise ValueError(f"tgt must be a floating (B, L, D) tensor, got {tgt.dtype} {tuple(tgt.shape)}")
    B, L, D = tgt.shape
    if k.dim() != 3 or k.shape[0] != B or k.shape[2] != D:
        raise ValueError(f"k must be (B={B}, P, D={D}), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    P = k.shape[1]
    if P < 1:
        raise ValueError("need at least one prompt token")
    if num_heads < 1 or D % num_heads:
        raise ValueError(f"num_heads {num_heads} must divide D = {D}")
    if key_padding_mask is not None and (key_padding_mask.shape != (B, P) or key_padding_mask.dtype != torch.bool):
        raise ValueError(f"key_padding_mask must be a bool ({B}, {P}) tensor or None, got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("norm_weight and norm_bias must both be given or both be None")
    shapes = {"q_weight": (q_weight, (D, D)), "q_bias": (q_bias, (D,)), "out_weight": (out_weight, (D, D)),
              "out_bias": (out_bias, (D,))}
    if norm_weight is not None:
        shapes.update(norm_weight=(norm_weight, (D,)), norm_bias=(norm_bias, (D,)))
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape}, got {tuple(t.shape)}")
    floats = [k, v] + [t for t, _ in shapes.values()]
    if any(t.dtype != tgt.dtype for t in floats):
        raise ValueError(f"tgt, k, v and every weight must share a dtype, got {[str(t.dtype) for t in [tgt] + floats]}")
    others = floats + ([] if key_padding_mask is None else [key_padding_mask])
    if any(t.device != tgt.device for t in others):
        raise ValueError(f"all inputs must be on one device, got {sorted({str(t.device) for t in [tgt] + others})}")


def prompt_cross_attention_ref(
    tgt: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor], eps: float, q_weight: Tensor, q_bias: Tensor, out_weight: Tensor,
    out_bias: Tensor, num_heads: int,
) -> Tensor:
    """The spec (and the op's CPU kernel): (B, L, D) in tgt's dtype. Each step in float32 (float64 for
    float64 input) rounded to the input dtype where the model's modules round it."""
    _check_inputs(tgt, k, v, key_padding_mask, norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias,
                  num_heads)
    B, L, D = tgt.shape
    P, H = k.shape[1], num_heads
    dt = tgt.dtype
    c = torch.promote_types(dt, torch.float32)
    x = tgt
    if norm_weight is not None:
        x = F.layer_norm(tgt.to(c), (D,), norm_weight.to(c), norm_bias.to(c), eps).to(dt)
    q = F.linear(x.to(c), q_weight.to(c), q_bias.to(c)).to(dt)
    heads = lambda t, n: t.to(c).reshape(B, n, H, D // H).transpose(1, 2)  # noqa: E731
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    o = F.scaled_dot_product_attention(heads(q, L), heads(k, P), heads(v, P), attn_mask=mask)
    if key_padding_mask is not None:
        o = torch.where(key_padding_mask.all(dim=1)[:, None, None, None], 0.0, o)  # no valid key -> zeros
    o = o.transpose(1, 2).reshape(B, L, D).to(dt)
    y = F.linear(o.to(c), out_weight.to(c), out_bias.to(c)).to(dt)
    return (tgt.to(c) + y.to(c)).to(dt)


if HAS_TRITON:

    @triton.jit
    def _prompt_cross_attention_kernel(
        tgt_ptr, k_ptr, v_ptr, pad_ptr, nw_ptr, nb_ptr, wq_ptr, bq_ptr, wo_ptr, bo_ptr, out_ptr,
        L, P, eps, qk_scale,
        stb, stm, skb, skn, svb, svn,
        HAS_PAD: tl.constexpr, HAS_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr,
        D: tl.constexpr, H: tl.constexpr, DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        # Grid (cdiv(L, BLOCK_M), B, D / BLOCK_O): BLOCK_M image rows of batch element pid 1, all heads,
        # all keys, output columns [pid 2 * BLOCK_O, (pid 2 + 1) * BLOCK_O).
        pid_m = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_o = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
        dtype = tgt_ptr.dtype.element_ty
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_h = tl.arange(0, DH)
        offs_p = tl.arange(0, BLOCK_P)
        m_mask = (offs_m < L)[:, None]
        p_mask = offs_p < P

        x = tl.load(tgt_ptr + b * stb + offs_m[:, None] * stm + offs_d[None, :], mask=m_mask, other=0.0)
        if HAS_NORM:
            xf = x.to(tl.float32)
            mean = tl.sum(xf, axis=1) / D
            xc = xf - mean[:, None]
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
            w = tl.load(nw_ptr + offs_d).to(tl.float32)
            nb = tl.load(nb_ptr + offs_d).to(tl.float32)
            x = (xc * rstd[:, None] * w[None, :] + nb[None, :]).to(dtype)  # rounded like norm2's output
        if HAS_PAD:
            keep = p_mask & (tl.load(pad_ptr + b * P + offs_p, mask=p_mask, other=1) == 0)
        else:
            keep = p_mask

        acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
        for h in range(H):
            cols = h * DH + offs_h
            wq = tl.load(wq_ptr + cols[:, None] * D + offs_d[None, :])  # (DH, D): rows of Wq
            bq = tl.load(bq_ptr + cols).to(tl.float32)
            q = (tl.dot(x, tl.trans(wq), input_precision=DOT_PRECISION) + bq[None, :]).to(dtype)
            kh = tl.load(k_ptr + b * skb + offs_p[:, None] * skn + cols[None, :], mask=p_mask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(kh), input_precision=DOT_PRECISION) * qk_scale  # log2 units
            s = tl.where(keep[None, :], s, float("-inf"))
            m = tl.max(s, axis=1)
            m = tl.where(m == float("-inf"), 0.0, m)  # every key padded: exp2 gives 0, not NaN
            p = tl.exp2(s - m[:, None])
            l_sum = tl.sum(p, axis=1)
            vh = tl.load(v_ptr + b * svb + offs_p[:, None] * svn + cols[None, :], mask=p_mask[:, None], other=0.0)
            o = tl.dot(p.to(dtype), vh, input_precision=DOT_PRECISION)
            o = (o / tl.where(l_sum > 0.0, l_sum, 1.0)[:, None]).to(dtype)  # no valid key: o = 0
            wo = tl.load(wo_ptr + offs_o[:, None] * D + cols[None, :])  # (BLOCK_O, DH): columns of Wo
            acc = tl.dot(o, tl.trans(wo), acc, input_precision=DOT_PRECISION)

        bo = tl.load(bo_ptr + offs_o).to(tl.float32)
        y = (acc + bo[None, :]).to(dtype)  # out_proj's output, rounded before the residual add
        t = tl.load(tgt_ptr + b * stb + offs_m[:, None] * stm + offs_o[None, :], mask=m_mask, other=0.0)
        dst = out_ptr + (b * L + offs_m[:, None]) * D + offs_o[None, :]
        tl.store(dst, (t.to(tl.float32) + y.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m_mask)


def _prompt_cross_attention_triton(
    tgt: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    eps: float,
    q_weight: Tensor,
    q_bias: Tensor,
    out_weight: Tensor,
    out_bias: Tensor,
    num_heads: int,
    out: Optional[Tensor] = None,
    block_m: int = DEFAULT_TILE[0],
    block_o: int = DEFAULT_TILE[1],
    num_warps: int = DEFAULT_TILE[2],
    num_stages: int = DEFAULT_TILE[3],
) -> Tensor:
    """Launcher. ``out`` may be a preallocated contiguous (B, L, D) tensor of tgt's dtype (every
    element is written). ``block_m``, ``block_o`` powers of two >= 16; ``block_o`` above D means D."""
    require_triton("prompt_cross_attention")
    _check_inputs(tgt, k, v, key_padding_mask, norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias,
                  num_heads)
    B, L, D = tgt.shape
    P = k.shape[1]
    if tgt.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32/bfloat16/float16, got {tgt.dtype}")
    why = _kernel_shape_limits(D, num_heads, P)
    if why is not None:
        raise ValueError(f"the Triton kernel does not take this shape: {why}")
    check_power_of_two("block_m", block_m, minimum=16)
    check_power_of_two("block_o", block_o, minimum=16)
    block_o = min(block_o, D)  # both powers of two: block_o divides D
    dev = tgt.device
    out = output_buffer(out, (B, L, D), tgt.dtype, dev)
    if B == 0 or L == 0:
        return out
    # Only the last dim must be contiguous: k and v are views of one (B, P, 2D) projection.
    tgt, k, v = rows_contiguous(tgt, k, v)
    q_weight, q_bias, out_weight, out_bias = (t.contiguous() for t in (q_weight, q_bias, out_weight, out_bias))
    has_norm = norm_weight is not None
    nw, nb = (norm_weight.contiguous(), norm_bias.contiguous()) if has_norm else (q_bias, q_bias)  # unread
    pad = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else tgt  # unread
    Dh = D // num_heads
    dot_precision = "ieee" if tgt.dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding
    with device_guard(dev):
        _prompt_cross_attention_kernel[(cdiv(L, block_m), B, D // block_o)](
            tgt, k, v, pad, nw, nb, q_weight, q_bias, out_weight, out_bias, out,
            L, P, float(eps), _LOG2E / math.sqrt(Dh),
            tgt.stride(0), tgt.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            HAS_PAD=key_padding_mask is not None, HAS_NORM=has_norm, DOT_PRECISION=dot_precision,
            D=D, H=num_heads, DH=Dh, BLOCK_M=block_m, BLOCK_P=max(16, triton.next_power_of_2(P)),
            BLOCK_O=block_o, num_warps=num_warps, num_stages=num_stages,
        )
    return out


@torch.library.custom_op("sam3fast::prompt_cross_attention", mutates_args=(), device_types="cuda")
def prompt_cross_attention_op(
    tgt: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor], eps: float, q_weight: Tensor, q_bias: Tensor, out_weight: Tensor,
    out_bias: Tensor, num_heads: int,
) -> Tensor:
    """``sam3fast::prompt_cross_attention``: the Triton kernel on CUDA, ``prompt_cross_attention_ref`` on CPU."""
    return _prompt_cross_attention_triton(tgt, k, v, key_padding_mask, norm_weight, norm_bias, eps, q_weight,
                                          q_bias, out_weight, out_bias, num_heads)


prompt_cross_attention_op.register_kernel("cpu")(prompt_cross_attention_ref)


@prompt_cross_attention_op.register_fake
def _prompt_cross_attention_fake(tgt, k, v, key_padding_mask, norm_weight, norm_bias, eps, q_weight, q_bias,
                                 out_weight, out_bias, num_heads):
    return tgt.new_empty(tgt.shape)


# ---- typed entry point --------------------------------------------------------------------------


def _kernel_shape_limits(D: int, num_heads: int, P: int) -> Optional[str]:
    if D < 16 or D > _MAX_D or D & (D - 1):
        return f"model width {D} (the Triton kernel takes a power of two in [16, {_MAX_D}])"
    Dh = D // num_heads if num_heads > 0 and D % num_heads == 0 else 0
    if Dh < 16 or Dh & (Dh - 1):
        return f"head dim {D}/{num_heads} (the Triton kernel takes a power of two >= 16)"
    if not 1 <= P <= _MAX_P:
        return f"{P} prompt tokens (the Triton kernel takes 1 to {_MAX_P}: one key tile)"
    return None


def prompt_cross_attention_backend(tgt: Tensor, memory: Tensor, num_heads: int, weight: Tensor) -> Tuple[str, str]:
    """("triton" | "reference", reason) for image tokens ``tgt`` (B, L, D) attending to the prompt
    ``memory`` (B, P, D) with ``num_heads`` heads and weights of ``weight``'s dtype."""
    why = why_not_triton(tgt.device, env.FORCE_REFERENCE)
    if why is not None:
        return "reference", why
    if tgt.dtype not in _KERNEL_DTYPES:
        return "reference", f"{tgt.dtype} inputs (the Triton kernel takes float32/bfloat16/float16)"
    if memory.dtype != tgt.dtype or weight.dtype != tgt.dtype:
        return "reference", f"mixed dtypes {tgt.dtype}, {memory.dtype}, {weight.dtype} (the kernel takes one)"
    if tgt.dim() != 3 or memory.dim() != 3:
        return "reference", f"shapes {tuple(tgt.shape)}, {tuple(memory.shape)} (the kernel takes (B, L, D), (B, P, D))"
    why = _kernel_shape_limits(tgt.shape[-1], num_heads, memory.shape[1])
    if why is not None:
        return "reference", why
    return "triton", "CUDA tensors, triton available"


def prompt_cross_attention(
    tgt: Tensor,
    memory: Tensor,
    key_padding_mask: Optional[Tensor],
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_weight: Tensor,
    out_bias: Tensor,
    num_heads: int,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """``tgt + MHA(LN(tgt), memory, memory, key_padding_mask)`` for a short ``memory`` (the prompt).

    tgt (B, L, D); memory (B, P, D); key_padding_mask (B, P) bool True = pad, or None;
    in_proj_weight (3D, D) / in_proj_bias (3D,) packed q|k|v and out_proj's (D, D) / (D,), as
    ``sam3fast.model.common.MultiheadAttention``; norm_weight/norm_bias (D,) (None: no LayerNorm).
    Returns (B, L, D) in tgt's dtype; see ``sam3fast.kernels.prompt_cross_attention`` for the math.
    """
    D = tgt.shape[-1]
    # One GEMM for the prompt's keys and values; the kernel reads the two halves as strided views.
    kv = F.linear(memory, in_proj_weight[D:], in_proj_bias[D:])
    k, v = kv[..., :D], kv[..., D:]
    args = (tgt, k, v, key_padding_mask, norm_weight, norm_bias, float(eps), in_proj_weight[:D], in_proj_bias[:D],
            out_weight, out_bias, int(num_heads))
    backend, _ = prompt_cross_attention_backend(tgt, memory, num_heads, in_proj_weight)
    if backend == "triton":
        return torch.ops.sam3fast.prompt_cross_attention(*args)
    return prompt_cross_attention_ref(*args)
