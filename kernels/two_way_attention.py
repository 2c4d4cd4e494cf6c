"""The two cross-attentions of the SAM mask decoder's ``TwoWayTransformer``, with the projections of
the image tokens fused in: token -> image (the tokens read the image) and image -> token (the
image reads the tokens, then out_proj, the residual and the block's LayerNorm ``norm4``).

Letters: B objects, T tokens per object (6 output tokens + prompt points + the pad point: 7-20),
S image tokens (g x g = 72 x 72 = 5184 in SAM 3), D width (256), C internal width of the cross
attentions (D / attention_downsample_rate = 128), H heads (8), Dh = C / H head dim (16).

token_to_image_attention(q, image, image_pe, wk, bk, wv, bv, H) -> (B, T, C)
    q          (B, T, C)     the projected queries ``q_proj(tokens + token_pe)`` (T rows: F.linear)
    image      (Bi, S, D)    the image tokens (the keys' values), Bi = 1 (shared by every object) or B;
                             any strides (the NCHW ``flatten(2).transpose(1, 2)`` view passes as is)
    image_pe   (Bp, S, D)    their position encoding, Bp = 1 or B, any strides
    wk, wv     (C, D), bk, bv (C,)   ``k_proj`` / ``v_proj`` of the module
    k = (image + image_pe) wk^T + bk,  v = image wv^T + bv                  (Bi|Bp, S, C)
    out[b, t, h] = sum_s softmax_s(q[b, t, h] . k[b, s, h] / sqrt(Dh)) v[b, s, h]   per head h
    The module then applies ``out_proj``, the residual and ``norm2`` on the T rows (PyTorch).

image_to_token_attention(image, image_pe, wq, bq, k, v, wo, bo, norm_w, norm_b, eps, H) -> (B, S, D)
    k, v       (B, T, C)     the projected tokens ``k_proj(tokens + token_pe)``, ``v_proj(tokens)``
    image, image_pe as above; wq (C, D), bq (C,), wo (D, C), bo (D,); norm_w, norm_b (D,) or None
    q = (image + image_pe) wq^T + bq                                          (Bi|Bp, S, C)
    a[b, s, h] = sum_t softmax_t(q[b, s, h] . k[b, t, h] / sqrt(Dh)) v[b, t, h]
    out = LayerNorm_eps(image + a wo^T + bo) with (norm_w, norm_b), or without the norm when None.

Dtypes: float32 / bfloat16 / float16 in the kernels (the references also take float64), every
input in one dtype (the model's). The references are the module's own op sequence in the input
dtype (``F.linear``, SDPA, ``F.layer_norm``), so on CPU the op is the PyTorch path. The kernels round
where the module rounds before a matmul (image + pe, the projected k / v / q, the probabilities and
the attention output are fed to the tensor cores in the input dtype) and keep everything else in
float32: softmax, accumulators, the residual and the LayerNorm (more accurate than the module in
bf16, which rounds the out_proj output and the residual sum too). One exception, token -> image:
its k and v are rounded without their biases, which the kernel never adds to the key tiles: bk
only shifts each score row by the constant q . bk (softmax ignores it), and bv is added to the
normalised output (the rows of P / l sum to 1). Same result in exact arithmetic; it keeps the
kernel's loop free of register spills.

Why fuse the projections: in the module each cross attention writes ``image + pe`` (B, S, D), the
projected k, v or q (B, S, C) each, SDPA's (B, S, C) output, out_proj's (B, S, D), the residual
(B, S, D) and the norm's (B, S, D): ~10 passes over B x 5184 x 128-256 elements for ~1-2 GFLOP of
math per object. Here the token -> image kernel reads image and pe once (D = 256 wide) and keeps
k, v in registers; the image -> token kernel reads them once and writes the normed output once.
Recomputing k, v from the (B, S, D) input costs 2 S D C FLOPs per object each, which the module
pays too; the weights (C x D, 64 KB in bf16) stay in L2.

Heads in one program (both kernels): the H heads share one tensor-core dot through block-diagonal
operands. Token -> image: row r = h T + t of a (ROWS, C) query tile holds q[t] on head h's columns
and zeros elsewhere, so ``Q_bd k^T`` is every (head, token) score row at once and each row has its
own online softmax; ``P v`` gives (ROWS, C) of which row r keeps head h's columns (the others are
discarded). Image -> token: column r = h TP + t of the (ROWS, C) key/value tiles holds token t on
head h's columns, TP = T padded to a power of two, so ``q K_bd^T`` is (BLOCK_M, H, TP) scores with
a softmax over each head's TP columns (padded columns -inf) and ``P V_bd`` is exactly the (BLOCK_M,
C) attention output. The zero blocks cost H x the QK^T / PV FLOPs, which are tiny next to the
projections (Dh = 16 is below the tensor-core K minimum anyway).

Schedules.
  token -> image (flash decoding): grid (B, SPLITS, row blocks); a program owns one object, a
      BLOCK_N-aligned chunk of the S keys and up to 64 (head, token) rows (T > 8 at H = 8 takes
      more row blocks, each projecting its keys again: cheaper than spilling); per key tile it
      loads image and pe (BLOCK_N, BLOCK_D) chunks, projects k and v on the tensor cores, and runs
      one online-softmax step for all its (head, token) rows.
      With SPLITS > 1 the normalised partial outputs and base-2 log-sum-exps go to a float32
      workspace (SPLITS x B x T x C, small: no (B, S, C) tensor exists) and a merge kernel with grid
      (B,) combines them. SPLITS fills the SMs: B = 1 has one object and 81 key tiles.
  image -> token: grid (cdiv(S, BLOCK_M), B); a program owns BLOCK_M image tokens of one object:
      q projection (chunked over D), scores against the object's T tokens (one tile: T <= 32),
      the softmax, P V, out_proj over the whole row (D padded to a power of two), residual,
      LayerNorm, one store.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sam3fast import env

# triton is optional (the "gpu" extra): without it the references and the CPU ops still work.
from ._triton_compat import (  # noqa: F401  (TRITON_IMPORT_ERROR: read by the tests)
    HAS_TRITON, TRITON_IMPORT_ERROR, cdiv, check_power_of_two, device_guard, require_triton, tl, triton,
    why_not_triton,
    output_buffer, rows_contiguous,
)

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_ROWS = 256  # (head, token) rows of one program: 8 heads x 32 tokens; more would spill registers
_MAX_INTERNAL = 256  # C: the (rows, C) accumulators live in registers
_MAX_WIDTH = 1024  # D: the image -> token kernel holds whole (BLOCK_M, D) rows for the LayerNorm
_LOG2E = 1.4426950408889634
# (BLOCK_N, BLOCK_D, num_warps, num_stages) token -> image and (BLOCK_M, BLOCK_D, num_warps,
# num_stages) image -> token at D = 256, C = 128, H = 8, T = 8 in bf16, compiled for sm_90 (Triton
# 3.7, ptxas usage read with cuobjdump): image -> token 64 x 32 with 8 warps uses 218 registers and
# does not spill up to 16 tokens (64 x 64 w4: 448 bytes of stack, 128 x 64 w8: 360; 32 tokens: 96,
# 0 at 32 x 32, which the launcher then takes); token -> image 64 x 32 w8 uses
# 255 and spills 184 bytes (64 x 16: 48, 32 x 32: 88, 64 x 64 w4: 1592; 256 (head, token) rows in
# one program: 2152, hence row blocks of 64). Timed on an H100 (2026-11-26, bf16, T = 8,
# bench/results/two_way_attention_nvidia-h100-80gb-hbm3_2026-11-26.md): 128 x 32 with 8 warps was
# as fast or faster than 64 x 32 (the previous default) at 1, 16 and 64 objects in both directions:
# token -> image 0.126 / 0.119 / 0.308 ms (was 0.126 / 0.121 / 0.442), image -> token 0.049 / 0.102 /
# 0.375 ms (was 0.077 / 0.151 / 0.568). Below ~0.15 ms these times include the host's launch.
DEFAULT_T2I_TILE = (128, 32, 8, 2)
DEFAULT_I2T_TILE = (128, 32, 8, 2)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _t2i_rows(num_heads: int, T: int) -> int:
    return max(16, _next_pow2(num_heads * T))


def _i2t_tokens_padded(num_heads: int, T: int) -> int:
    # H * TP >= 16: the tensor-core dots need N >= 16
    return max(_next_pow2(T), _next_pow2(cdiv(16, num_heads)))


def _check_common(name: str, x: Tensor, B: int, S: Optional[int], D: Optional[int]) -> Tuple[int, int]:
    if x.dim() != 3 or x.shape[0] not in (1, B):
        raise ValueError(f"{name} must be (1 or B={B}, S, D), got {tuple(x.shape)}")
    if (S is not None and x.shape[1] != S) or (D is not None and x.shape[2] != D):
        raise ValueError(f"{name} must be (1 or B={B}, S={S}, D={D}), got {tuple(x.shape)}")
    return x.shape[1], x.shape[2]


def _check_same(tensors: dict) -> None:
    first = next(iter(tensors.values()))
    for n, t in tensors.items():
        if t.dtype != first.dtype or t.device != first.device:
            got = {k: (str(v.dtype), str(v.device)) for k, v in tensors.items()}
            raise ValueError(f"all inputs must share one dtype and device, got {got}")


def _check_linear(name: str, w: Tensor, b: Tensor, out_f: int, in_f: int) -> None:
    if w.shape != (out_f, in_f) or b.shape != (out_f,):
        raise ValueError(f"{name} must be a ({out_f}, {in_f}) weight and a ({out_f},) bias, got "
                         f"{tuple(w.shape)} and {tuple(b.shape)}")


def _check_heads(C: int, num_heads: int) -> None:
    if num_heads < 1 or C % num_heads:
        raise ValueError(f"num_heads {num_heads} must divide the internal width {C}")


def _check_t2i(q, image, image_pe, wk, bk, wv, bv, num_heads) -> None:
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"q must be a floating (B, T, C) tensor, got {q.dtype} {tuple(q.shape)}")
    B, T, C = q.shape
    S, D = _check_common("image", image, B, None, None)
    _check_common("image_pe", image_pe, B, S, D)
    if T < 1 or S < 1:
        raise ValueError(f"need at least one token and one image token, got T={T}, S={S}")
    _check_heads(C, num_heads)
    _check_linear("k_proj", wk, bk, C, D)
    _check_linear("v_proj", wv, bv, C, D)
    _check_same(dict(q=q, image=image, image_pe=image_pe, wk=wk, bk=bk, wv=wv, bv=bv))


def _check_i2t(image, image_pe, wq, bq, k, v, wo, bo, norm_weight, norm_bias, num_heads) -> None:
    if k.dim() != 3 or not k.is_floating_point():
        raise ValueError(f"k must be a floating (B, T, C) tensor, got {k.dtype} {tuple(k.shape)}")
    B, T, C = k.shape
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    S, D = _check_common("image", image, B, None, None)
    _check_common("image_pe", image_pe, B, S, D)
    if T < 1 or S < 1:
        raise ValueError(f"need at least one token and one image token, got T={T}, S={S}")
    _check_heads(C, num_heads)
    _check_linear("q_proj", wq, bq, C, D)
    _check_linear("out_proj", wo, bo, D, C)
    tensors = dict(image=image, image_pe=image_pe, wq=wq, bq=bq, k=k, v=v, wo=wo, bo=bo)
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("norm_weight and norm_bias must both be given or both be None")
    if norm_weight is not None:
        if norm_weight.shape != (D,) or norm_bias.shape != (D,):
            raise ValueError(f"the norm's weight and bias must be ({D},), got {tuple(norm_weight.shape)} "
                             f"and {tuple(norm_bias.shape)}")
        tensors.update(norm_weight=norm_weight, norm_bias=norm_bias)
    _check_same(tensors)


def _heads(x: Tensor, B: int, num_heads: int) -> Tensor:
    """(1|B, n, C) -> (B, H, n, C/H), a batch-1 input expanded (as the module does)."""
    b, n, c = x.shape
    x = x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)
    return x.expand(B, -1, -1, -1) if b != B else x


def token_to_image_attention_ref(
    q: Tensor, image: Tensor, image_pe: Tensor, wk: Tensor, bk: Tensor, wv: Tensor, bv: Tensor, num_heads: int
) -> Tensor:
    """The spec (and the op's CPU kernel): ``Attention.forward`` of the module between ``q_proj`` and
    ``out_proj``, in the input dtype: (B, T, C)."""
    _check_t2i(q, image, image_pe, wk, bk, wv, bv, num_heads)
    B, T, C = q.shape
    k = F.linear(image + image_pe, wk, bk)
    v = F.linear(image, wv, bv)
    out = F.scaled_dot_product_attention(_heads(q, B, num_heads), _heads(k, B, num_heads), _heads(v, B, num_heads))
    return out.transpose(1, 2).reshape(B, T, C)


def image_to_token_attention_ref(
    image: Tensor, image_pe: Tensor, wq: Tensor, bq: Tensor, k: Tensor, v: Tensor, wo: Tensor, bo: Tensor,
    norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float, num_heads: int,
) -> Tensor:
    """The spec (and the op's CPU kernel): ``norm4(image + Attention(image + pe, tokens + pe,
    tokens))`` of the module after the token projections, in the input dtype: (B, S, D)."""
    _check_i2t(image, image_pe, wq, bq, k, v, wo, bo, norm_weight, norm_bias, num_heads)
    B, T, C = k.shape
    S, D = image.shape[1:]
    q = F.linear(image + image_pe, wq, bq)
    a = F.scaled_dot_product_attention(_heads(q, B, num_heads), _heads(k, B, num_heads), _heads(v, B, num_heads))
    y = image + F.linear(a.transpose(1, 2).reshape(B, S, C), wo, bo)
    if norm_weight is not None:
        y = F.layer_norm(y, (D,), norm_weight, norm_bias, eps)
    return y


if HAS_TRITON:

    @triton.jit
    def _token_to_image_attention_kernel(
        q_ptr, x_ptr, pe_ptr, wk_ptr, wv_ptr, bv_ptr, out_ptr, part_o_ptr, part_lse_ptr,
        T, S, kv_per_split, qk_scale,
        sqb, sqt, sxb, sxs, sxd, spb, sps, spd,
        H: tl.constexpr, DH: tl.constexpr, C: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr,
        SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Grid (B, splits, row blocks): object pid 0 against the keys [pid_1 * kv_per_split,
        # +kv_per_split), (head, token) rows [pid_2 * ROWS, +ROWS); row r = h * T + t of the
        # block-diagonal query tile is (head h, token t).
        b = tl.program_id(0).to(tl.int64)
        pid_s = tl.program_id(1)
        dtype = q_ptr.dtype.element_ty
        rows = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
        r_head = rows // T
        r_tok = rows % T
        r_valid = rows < H * T
        cols = tl.arange(0, C)
        own = (r_head[:, None] == (cols // DH)[None, :]) & r_valid[:, None]  # (ROWS, C)
        q = tl.load(q_ptr + b * sqb + r_tok[:, None] * sqt + cols[None, :], mask=own, other=0.0)
        bv = tl.load(bv_ptr + cols).to(tl.float32)

        x_base = x_ptr + b * sxb
        pe_base = pe_ptr + b * spb
        n_start = pid_s * kv_per_split
        n_end = tl.minimum(n_start + kv_per_split, S)
        m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((ROWS,), dtype=tl.float32)
        acc = tl.zeros((ROWS, C), dtype=tl.float32)
        for start_n in range(n_start, n_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_end
            k = tl.zeros((BLOCK_N, C), dtype=tl.float32)
            v = tl.zeros((BLOCK_N, C), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D
                xm = n_mask[:, None] & d_mask[None, :]
                x = tl.load(x_base + offs_n[:, None] * sxs + offs_d[None, :] * sxd, mask=xm, other=0.0)
                pe = tl.load(pe_base + offs_n[:, None] * sps + offs_d[None, :] * spd, mask=xm, other=0.0)
                xk = (x.to(tl.float32) + pe.to(tl.float32)).to(dtype)  # the module rounds image + pe
                w_off = cols[None, :] * D + offs_d[:, None]  # (BLOCK_D, C): W^T chunk
                wk = tl.load(wk_ptr + w_off, mask=d_mask[:, None], other=0.0)
                wv = tl.load(wv_ptr + w_off, mask=d_mask[:, None], other=0.0)
                k = tl.dot(xk, wk, k, input_precision=DOT_PRECISION)
                v = tl.dot(x, wv, v, input_precision=DOT_PRECISION)
            # no biases here: q . bk is one constant per score row (softmax ignores it) and the
            # rows of P / l sum to 1, so bv is added once to the output. With them in the loop
            # (two (BLOCK_N, C) bias tiles in the accumulator layout) the kernel spilled in the
            # loop at 128 x 32 w8 (sm_90: 36 spill instructions there; none without).
            k = k.to(dtype)
            v = v.to(dtype)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (ROWS, BLOCK_N), log2 units
            s = tl.where(n_mask[None, :], s, float("-inf"))
            # every tile holds at least one key (start_n < n_end): m_new is finite
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        o = acc / l_i[:, None] + bv[None, :]
        if SPLIT:
            B = tl.num_programs(0)
            dst = part_o_ptr + ((pid_s * B + b) * T + r_tok[:, None]) * C + cols[None, :]
            tl.store(dst, o, mask=own)
            lse_dst = part_lse_ptr + ((pid_s * B + b) * H + r_head) * T + r_tok
            tl.store(lse_dst, m_i + tl.log2(l_i), mask=r_valid)
        else:
            dst = out_ptr + (b * T + r_tok[:, None]) * C + cols[None, :]
            tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=own)

    @triton.jit
    def _token_to_image_merge_kernel(
        part_o_ptr, part_lse_ptr, out_ptr,
        T, n_splits,
        H: tl.constexpr, DH: tl.constexpr, C: tl.constexpr, TP: tl.constexpr,
    ):
        # Grid (B,): out[b, t, c] = sum_s 2^lse_s o_s / sum_s 2^lse_s over the splits, with the lse of
        # (head c // DH, token t).
        b = tl.program_id(0).to(tl.int64)
        B = tl.num_programs(0)
        offs_t = tl.arange(0, TP)
        cols = tl.arange(0, C)
        tm = (offs_t < T)[:, None] & (cols < C)[None, :]
        lse_off = (cols // DH)[None, :] * T + offs_t[:, None]  # (TP, C)
        o_off = offs_t[:, None] * C + cols[None, :]
        lse_max = tl.full((TP, C), float("-inf"), dtype=tl.float32)
        for s in range(n_splits):
            lse = tl.load(part_lse_ptr + (s * B + b) * H * T + lse_off, mask=tm, other=float("-inf"))
            lse_max = tl.maximum(lse_max, lse)
        lse_max = tl.where(tm, lse_max, 0.0)  # padded tokens: keep exp2 finite
        acc = tl.zeros((TP, C), dtype=tl.float32)
        w_sum = tl.zeros((TP, C), dtype=tl.float32)
        for s in range(n_splits):
            w = tl.exp2(tl.load(part_lse_ptr + (s * B + b) * H * T + lse_off, mask=tm, other=float("-inf")) - lse_max)
            acc += w * tl.load(part_o_ptr + (s * B + b) * T * C + o_off, mask=tm, other=0.0)
            w_sum += w
        out = acc / tl.where(tm, w_sum, 1.0)
        tl.store(out_ptr + b * T * C + o_off, out.to(out_ptr.dtype.element_ty), mask=tm)

    @triton.jit
    def _image_to_token_attention_kernel(
        x_ptr, pe_ptr, wq_ptr, bq_ptr, k_ptr, v_ptr, wo_ptr, bo_ptr, nw_ptr, nb_ptr, out_ptr,
        T, S, qk_scale, eps,
        sxb, sxs, sxd, spb, sps, spd, skb, skt, svb, svt,
        H: tl.constexpr, DH: tl.constexpr, C: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
        TP: tl.constexpr, HAS_NORM: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Grid (cdiv(S, BLOCK_M), B): image tokens [pid_0 * BLOCK_M, +BLOCK_M) of object pid_1, all
        # heads; column r = h * TP + t of the block-diagonal key/value tiles is (head h, token t).
        pid_m = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        dtype = k_ptr.dtype.element_ty
        ROWS: tl.constexpr = H * TP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < S
        cols = tl.arange(0, C)
        rows = tl.arange(0, ROWS)
        r_tok = rows % TP
        own = ((rows // TP)[:, None] == (cols // DH)[None, :]) & (r_tok < T)[:, None]  # (ROWS, C)
        kbd = tl.load(k_ptr + b * skb + r_tok[:, None] * skt + cols[None, :], mask=own, other=0.0)
        vbd = tl.load(v_ptr + b * svb + r_tok[:, None] * svt + cols[None, :], mask=own, other=0.0)

        x_base = x_ptr + b * sxb + offs_m[:, None] * sxs
        pe_base = pe_ptr + b * spb + offs_m[:, None] * sps
        q = tl.zeros((BLOCK_M, C), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            xm = m_mask[:, None] & d_mask[None, :]
            x = tl.load(x_base + offs_d[None, :] * sxd, mask=xm, other=0.0)
            pe = tl.load(pe_base + offs_d[None, :] * spd, mask=xm, other=0.0)
            xq = (x.to(tl.float32) + pe.to(tl.float32)).to(dtype)  # the module rounds image + pe
            wq = tl.load(wq_ptr + cols[None, :] * D + offs_d[:, None], mask=d_mask[:, None], other=0.0)
            q = tl.dot(xq, wq, q, input_precision=DOT_PRECISION)
        q = (q + tl.load(bq_ptr + cols).to(tl.float32)[None, :]).to(dtype)

        s = tl.dot(q, tl.trans(kbd), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, ROWS), log2 units
        s = tl.where((r_tok < T)[None, :], s, float("-inf"))
        s3 = tl.reshape(s, (BLOCK_M, H, TP))
        # token 0 is valid for every head: the max is finite
        p3 = tl.exp2(s3 - tl.max(s3, axis=2)[:, :, None])
        p3 = p3 / tl.sum(p3, axis=2)[:, :, None]
        p = tl.reshape(p3, (BLOCK_M, ROWS))
        a = tl.dot(p.to(dtype), vbd, input_precision=DOT_PRECISION).to(dtype)  # (BLOCK_M, C): SDPA's output

        offs_dp = tl.arange(0, DP)
        dp_mask = offs_dp < D
        wo = tl.load(wo_ptr + offs_dp[None, :] * C + cols[:, None], mask=dp_mask[None, :], other=0.0)  # (C, DP)
        y = tl.dot(a, wo, input_precision=DOT_PRECISION)
        y += tl.load(bo_ptr + offs_dp, mask=dp_mask, other=0.0).to(tl.float32)[None, :]
        xm = m_mask[:, None] & dp_mask[None, :]
        y += tl.load(x_base + offs_dp[None, :] * sxd, mask=xm, other=0.0).to(tl.float32)  # the residual
        if HAS_NORM:
            mean = tl.sum(y, axis=1) / D  # padded columns hold 0
            yc = tl.where(dp_mask[None, :], y - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(yc * yc, axis=1) / D + eps)
            nw = tl.load(nw_ptr + offs_dp, mask=dp_mask, other=0.0).to(tl.float32)
            nb = tl.load(nb_ptr + offs_dp, mask=dp_mask, other=0.0).to(tl.float32)
            y = yc * rstd[:, None] * nw[None, :] + nb[None, :]
        dst = out_ptr + (b * S + offs_m[:, None]) * D + offs_dp[None, :]
        tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=xm)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_t2i_splits(B: int, kv_tiles: int, n_sms: int, waves: int = 2) -> int:
    """Key splits of the token -> image kernel: about ``waves`` programs per SM over the B objects,
    never more than one split per key tile. A split's overhead is one (T, C) float32 partial and its
    share of the merge, against BLOCK_N x D x C x 4 FLOPs of projection per key tile."""
    return max(1, min(kv_tiles, cdiv(waves * n_sms, max(B, 1))))


def _check_kernel_limits(dtype: torch.dtype, C: int, D: int, num_heads: int, T: int) -> Optional[str]:
    """Why the Triton kernels cannot take these sizes (None if they can)."""
    if dtype not in _KERNEL_DTYPES:
        return f"{dtype} inputs (the Triton kernels take float32/bfloat16/float16)"
    if C & (C - 1) or not 16 <= C <= _MAX_INTERNAL:
        return f"internal width {C} (the Triton kernels take a power of two in [16, {_MAX_INTERNAL}])"
    if D > _MAX_WIDTH:
        return f"width {D} (the Triton kernels take at most {_MAX_WIDTH})"
    if max(_t2i_rows(num_heads, T), num_heads * _i2t_tokens_padded(num_heads, T)) > _MAX_ROWS:
        return f"{num_heads} heads x {T} tokens (the Triton kernels take at most {_MAX_ROWS} (head, token) rows)"
    return None


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding


def _batch_stride(x: Tensor) -> int:
    return 0 if x.shape[0] == 1 else x.stride(0)  # a shared batch-1 input is read by every object


def _token_to_image_attention_triton(
    q: Tensor,
    image: Tensor,
    image_pe: Tensor,
    wk: Tensor,
    bk: Tensor,
    wv: Tensor,
    bv: Tensor,
    num_heads: int,
    out: Optional[Tensor] = None,
    block_n: int = DEFAULT_T2I_TILE[0],
    block_d: int = DEFAULT_T2I_TILE[1],
    num_splits: Optional[int] = None,
    block_r: Optional[int] = None,
    num_warps: int = DEFAULT_T2I_TILE[2],
    num_stages: int = DEFAULT_T2I_TILE[3],
) -> Tensor:
    """Launcher. ``out`` may be a preallocated contiguous (B, T, C) tensor of q's dtype (every element
    is written). ``num_splits`` None picks one from the SM count (1 off CUDA); the number launched
    may be lower so that no split is empty. ``block_n``/``block_d`` powers of two >= 16; ``block_r``
    (head, token) rows per program (a power of two >= 16; None: all H T rows up to 64, more rows
    take more programs, each recomputing its keys' projections rather than spilling registers)."""
    require_triton("token_to_image_attention")
    _check_t2i(q, image, image_pe, wk, bk, wv, bv, num_heads)
    B, T, C = q.shape
    S, D = image.shape[1:]
    why = _check_kernel_limits(q.dtype, C, D, num_heads, T)
    if why is not None:
        raise ValueError(f"the Triton kernel cannot take {why}")
    check_power_of_two("block_n", block_n, minimum=16)
    check_power_of_two("block_d", block_d, minimum=16)
    block_r = min(_t2i_rows(num_heads, T), 64) if block_r is None else block_r
    check_power_of_two("block_r", block_r, minimum=16)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    dev = q.device
    out = output_buffer(out, (B, T, C), q.dtype, dev)
    if B == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    wk, bk, wv, bv = (t.contiguous() for t in (wk, bk, wv, bv))

    kv_tiles = cdiv(S, block_n)
    if num_splits is None:
        num_splits = 1
        if dev.type == "cuda":
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            num_splits = choose_t2i_splits(B, kv_tiles, _sm_count(index))
    tiles_per_split = cdiv(kv_tiles, min(num_splits, kv_tiles))
    splits = cdiv(kv_tiles, tiles_per_split)  # no split left empty
    H = num_heads
    with device_guard(dev):
        if splits > 1:
            part_o = torch.empty((splits, B, T, C), dtype=torch.float32, device=dev)
            part_lse = torch.empty((splits, B, H, T), dtype=torch.float32, device=dev)
        else:
            part_o = part_lse = out  # unread
        _token_to_image_attention_kernel[(B, splits, cdiv(H * T, block_r))](
            q, image, image_pe, wk, wv, bv, out, part_o, part_lse,
            T, S, tiles_per_split * block_n, _LOG2E / math.sqrt(C // H),
            q.stride(0), q.stride(1), _batch_stride(image), image.stride(1), image.stride(2),
            _batch_stride(image_pe), image_pe.stride(1), image_pe.stride(2),
            H=H, DH=C // H, C=C, D=D, ROWS=block_r, SPLIT=splits > 1,
            DOT_PRECISION=_dot_precision(q.dtype), BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=num_stages,
        )
        if splits > 1:
            _token_to_image_merge_kernel[(B,)](
                part_o, part_lse, out, T, splits, H=H, DH=C // H, C=C, TP=_next_pow2(T), num_warps=4,
            )
    return out


def _image_to_token_attention_triton(
    image: Tensor,
    image_pe: Tensor,
    wq: Tensor,
    bq: Tensor,
    k: Tensor,
    v: Tensor,
    wo: Tensor,
    bo: Tensor,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    eps: float,
    num_heads: int,
    out: Optional[Tensor] = None,
    block_m: Optional[int] = None,
    block_d: int = DEFAULT_I2T_TILE[1],
    num_warps: int = DEFAULT_I2T_TILE[2],
    num_stages: int = DEFAULT_I2T_TILE[3],
) -> Tensor:
    """Launcher. ``out`` may be a preallocated contiguous (B, S, D) tensor of the inputs' dtype (every
    element is written). ``block_m``/``block_d`` powers of two >= 16; ``block_m`` None: the default
    tile's, halved above 16 tokens (the (BLOCK_M, H x TP) scores would spill)."""
    require_triton("image_to_token_attention")
    _check_i2t(image, image_pe, wq, bq, k, v, wo, bo, norm_weight, norm_bias, num_heads)
    B, T, C = k.shape
    S, D = image.shape[1:]
    why = _check_kernel_limits(k.dtype, C, D, num_heads, T)
    if why is not None:
        raise ValueError(f"the Triton kernel cannot take {why}")
    TP = _i2t_tokens_padded(num_heads, T)
    if block_m is None:
        block_m = DEFAULT_I2T_TILE[0] if TP <= 16 else DEFAULT_I2T_TILE[0] // 2
    check_power_of_two("block_m", block_m, minimum=16)
    check_power_of_two("block_d", block_d, minimum=16)
    dev = k.device
    out = output_buffer(out, (B, S, D), k.dtype, dev)
    if B == 0:
        return out
    k, v = rows_contiguous(k, v)
    wq, bq, wo, bo = (t.contiguous() for t in (wq, bq, wo, bo))
    has_norm = norm_weight is not None
    nw, nb = (norm_weight.contiguous(), norm_bias.contiguous()) if has_norm else (bo, bo)  # unread without norm
    H = num_heads
    with device_guard(dev):
        _image_to_token_attention_kernel[(cdiv(S, block_m), B)](
            image, image_pe, wq, bq, k, v, wo, bo, nw, nb, out,
            T, S, _LOG2E / math.sqrt(C // H), float(eps),
            _batch_stride(image), image.stride(1), image.stride(2),
            _batch_stride(image_pe), image_pe.stride(1), image_pe.stride(2),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            H=H, DH=C // H, C=C, D=D, DP=max(16, _next_pow2(D)), TP=TP,
            HAS_NORM=has_norm, DOT_PRECISION=_dot_precision(k.dtype), BLOCK_M=block_m, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out


@torch.library.custom_op("sam3fast::token_to_image_attention", mutates_args=(), device_types="cuda")
def token_to_image_attention_op(
    q: Tensor, image: Tensor, image_pe: Tensor, wk: Tensor, bk: Tensor, wv: Tensor, bv: Tensor, num_heads: int
) -> Tensor:
    """``sam3fast::token_to_image_attention``: the Triton kernels on CUDA, the reference on CPU."""
    return _token_to_image_attention_triton(q, image, image_pe, wk, bk, wv, bv, num_heads)


token_to_image_attention_op.register_kernel("cpu")(token_to_image_attention_ref)


@token_to_image_attention_op.register_fake
def _token_to_image_attention_fake(q, image, image_pe, wk, bk, wv, bv, num_heads):
    return q.new_empty(q.shape)


@torch.library.custom_op("sam3fast::image_to_token_attention", mutates_args=(), device_types="cuda")
def image_to_token_attention_op(
    image: Tensor, image_pe: Tensor, wq: Tensor, bq: Tensor, k: Tensor, v: Tensor, wo: Tensor, bo: Tensor,
    norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float, num_heads: int,
) -> Tensor:
    """``sam3fast::image_to_token_attention``: the Triton kernel on CUDA, the reference on CPU."""
    return _image_to_token_attention_triton(image, image_pe, wq, bq, k, v, wo, bo, norm_weight, norm_bias, eps,
                                            num_heads)


image_to_token_attention_op.register_kernel("cpu")(image_to_token_attention_ref)


@image_to_token_attention_op.register_fake
def _image_to_token_attention_fake(image, image_pe, wq, bq, k, v, wo, bo, norm_weight, norm_bias, eps, num_heads):
    return k.new_empty((k.shape[0], image.shape[1], image.shape[2]))


# ---- typed entry points (for sam3fast.ops) ------------------------------------------------------


def two_way_attention_backend(x: Tensor, num_heads: int, internal_dim: int, embed_dim: int,
                              num_tokens: int) -> Tuple[str, str]:
    """("triton" | "reference", reason) for inputs of ``x``'s device and dtype at these sizes."""
    why = why_not_triton(x.device, env.FORCE_REFERENCE)
    if why is None:
        why = _check_kernel_limits(x.dtype, internal_dim, embed_dim, num_heads, num_tokens)
    if why is not None:
        return "reference", why
    return "triton", "CUDA tensors, triton available"


def _pick(backend: Optional[str], q: Tensor, num_heads: int, C: int, D: int, T: int) -> str:
    if backend is None:
        return two_way_attention_backend(q, num_heads, C, D, T)[0]
    if backend not in ("triton", "reference"):
        raise ValueError(f"backend must be None, 'triton' or 'reference', got {backend!r}")
    return backend


def token_to_image_attention(
    q: Tensor, image: Tensor, image_pe: Tensor, wk: Tensor, bk: Tensor, wv: Tensor, bv: Tensor, num_heads: int,
    *, backend: Optional[str] = None,
) -> Tensor:
    """Token -> image attention of the two-way transformer after ``q_proj``: (B, T, C); see the module
    docstring. ``backend`` None picks with ``two_way_attention_backend``; "triton" forces the kernels
    (through the op on CUDA, the launcher elsewhere: the interpreter), "reference" the reference."""
    B, T, C = q.shape
    backend = _pick(backend, q, num_heads, C, image.shape[-1], T)
    if backend == "reference":
        return token_to_image_attention_ref(q, image, image_pe, wk, bk, wv, bv, num_heads)
    if q.is_cuda:
        return torch.ops.sam3fast.token_to_image_attention(q, image, image_pe, wk, bk, wv, bv, num_heads)
    return _token_to_image_attention_triton(q, image, image_pe, wk, bk, wv, bv, num_heads)


def image_to_token_attention(
    image: Tensor, image_pe: Tensor, wq: Tensor, bq: Tensor, k: Tensor, v: Tensor, wo: Tensor, bo: Tensor,
    norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None, eps: float = 1e-5,
    num_heads: int = 8, *, backend: Optional[str] = None,
) -> Tensor:
    """Image -> token attention of the two-way transformer after the token projections, with
    ``out_proj``, the residual and the LayerNorm: (B, S, D); see the module docstring. ``backend`` as
    in :func:`token_to_image_attention`."""
    B, T, C = k.shape
    backend = _pick(backend, k, num_heads, C, image.shape[-1], T)
    if backend == "reference":
        return image_to_token_attention_ref(image, image_pe, wq, bq, k, v, wo, bo, norm_weight, norm_bias, eps,
                                            num_heads)
    if k.is_cuda:
        return torch.ops.sam3fast.image_to_token_attention(image, image_pe, wq, bq, k, v, wo, bo, norm_weight,
                                                           norm_bias, float(eps), num_heads)
    return _image_to_token_attention_triton(image, image_pe, wq, bq, k, v, wo, bo, norm_weight, norm_bias, eps,
                                            num_heads)
