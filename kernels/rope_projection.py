"""A linear projection with the tracker's 2-D axial RoPE in its epilogue: the memory attention's q
and k projections write rotated rows, so the RoPE prepass never reads and rewrites them.

Letters: B batch (objects), S rows per batch element (the L frame tokens for a query or a
self-attention key; N * L memory-frame tokens then T object-pointer tokens for a cross-attention
key), K input width, H heads, Dh head dim, J = Dh / 2 channel pairs, L RoPE table rows (the g x g
frame tokens, 72 x 72 = 5184 in SAM 3).

rope_projection(x, weight, bias, rope, n_rope, num_heads) -> y
    x        (B, S, K)       float32 / bfloat16 / float16 (the reference also takes float64); any
                             strides
    weight   (H * Dh, K), bias (H * Dh,)                   x's dtype (an ``nn.Linear``)
    rope     (L, J, 2)       float32 (cos, sin) pairs: ``torch.view_as_real`` of the complex table
                             of ``sam3fast.model.vit.compute_axial_cis``
    n_rope   rows s < n_rope (a multiple of L) are rotated by table row s mod L; rows s >= n_rope
             (object-pointer tokens) are the plain projection
    y        (B, S, H, Dh) contiguous, x's dtype

Math, as the module rounds (``RoPEAttention`` then ``sam3fast::memory_attention``'s rotation): the
float32 accumulator plus the bias rounded once to the dtype (the linear's output), then for a
rotated row the pairs (2j, 2j+1) in float32 from that rounded value, rounded once:
    y[2j]   = v[2j] cos[s mod L, j] - v[2j+1] sin[s mod L, j]
    y[2j+1] = v[2j] sin[s mod L, j] + v[2j+1] cos[s mod L, j]
Only the accumulation order of the dot products differs from cuBLAS's (an ulp of the linear's
output either way). float32 inputs use exact float32 dots (``input_precision="ieee"``).

Why: in the 16-object tracker profile of the H200 (run 2 of 2026-11-27) the memory attention's RoPE
prepass took 3.36 ms a frame (13 calls: the queries and the keys of the self- and cross-attentions),
beside the projections that wrote the same tensors just before (the cross-attention's key
projections alone 0.45 ms a frame: 16 x 36324 rows of 64 -> 256). The prepass reads and writes every
projected row again (by arithmetic 2 x 297 MB a cross-attention at 16 objects in bf16). Here the projection's
epilogue rotates the rows it has in registers and stores them once: the prepass and its traffic are
gone, and the projection itself moves the same bytes as before (K = 64 or 256: a bandwidth-bound
GEMM). Not yet timed on a GPU.

Schedule: grid (cdiv(B S, BLOCK_R), H * J / BLOCK_J). A program owns BLOCK_R rows and BLOCK_J
channel pairs of one head, and runs two dots per K step, one against the pairs' even weight rows and
one against their odd rows (stride-2 row loads of W): the even and odd accumulators come out in one
register layout, so the rotation needs no reshape, split or join (whose layout conversions go
through shared memory), and the two halves are stored as stride-2 columns (the same sectors). The
(cos, sin) pairs are gathered by row (s mod L) in the accumulator's layout.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sam3fast import env

# triton is optional (the "gpu" extra): without it the reference and the CPU op still work.
from ._triton_compat import (  # noqa: F401  (TRITON_IMPORT_ERROR: read by the tests)
    KERNEL_DTYPES, HAS_TRITON, TRITON_IMPORT_ERROR, cdiv, check_power_of_two, device_guard, interpreted,
    output_buffer, require_triton, tl, triton, triton_backend,
)

# (BLOCK_R, BLOCK_J, BLOCK_K, num_warps, num_stages): see the launcher's static-build note.
DEFAULT_TILE = (64, 64, 64, 8, 3)


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor, rope: Tensor, n_rope: int, num_heads: int) -> int:
    """Dh, after the checks."""
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (B, S, K) tensor, got {x.dtype} {tuple(x.shape)}")
    B, S, K = x.shape
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if weight.dim() != 2 or weight.shape[1] != K or weight.shape[0] % num_heads:
        raise ValueError(f"weight must be (H * Dh, {K}) with H = {num_heads}, got {tuple(weight.shape)}")
    Dh = weight.shape[0] // num_heads
    if Dh % 2 or Dh == 0:
        raise ValueError(f"the head dim must be even and positive (RoPE rotates channel pairs), got {Dh}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        raise ValueError(f"x, weight and bias must share one dtype, got {x.dtype}, {weight.dtype}, {bias.dtype}")
    if rope.dim() != 3 or rope.shape[1:] != (Dh // 2, 2) or rope.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"rope must be a float32 (L, {Dh // 2}, 2) (cos, sin) table (torch.view_as_real of the "
                         f"complex freqs_cis), got {rope.dtype} {tuple(rope.shape)}")
    L = rope.shape[0]
    if L < 1:
        raise ValueError("rope must have at least one row")
    if not 0 <= n_rope <= S or n_rope % L:
        raise ValueError(f"n_rope must be a multiple of L={L} in [0, S={S}], got {n_rope}")
    if any(t.device != x.device for t in (weight, bias, rope)):
        raise ValueError("x, weight, bias and rope must be on one device")
    return Dh


def rope_projection_ref(x: Tensor, weight: Tensor, bias: Tensor, rope: Tensor, n_rope: int,
                        num_heads: int) -> Tensor:
    """The spec (and the op's CPU kernel): ``F.linear`` in x's dtype, then the rotation of rows
    s < n_rope in float32 (float64 for float64 input) rounded to x's dtype; (B, S, H, Dh)."""
    Dh = _check_inputs(x, weight, bias, rope, n_rope, num_heads)
    B, S, _ = x.shape
    L = rope.shape[0]
    y = F.linear(x, weight, bias).view(B, S, num_heads, Dh)
    if n_rope == 0:
        return y.contiguous()
    compute = torch.promote_types(x.dtype, torch.float32)
    cos, sin = rope.to(compute)[:, None, :, :].unbind(-1)  # (L, 1, J): broadcast over the heads
    # (B, N, L, H, Dh): the table broadcasts over the N frames instead of being repeated.
    ye, yo = y[:, :n_rope].to(compute).reshape(B, n_rope // L, L, num_heads, Dh // 2, 2).unbind(-1)
    rot = torch.stack((ye * cos - yo * sin, ye * sin + yo * cos), dim=-1).to(x.dtype)
    rot = rot.reshape(B, n_rope, num_heads, Dh)
    return torch.cat((rot, y[:, n_rope:]), dim=1) if n_rope < S else rot


if HAS_TRITON:
    from .rope import _bf16_rtne

    @triton.jit
    def _rope_projection_kernel(
        x_ptr, w_ptr, b_ptr, rope_ptr, y_ptr,
        R, S, K, L, n_rope, sxr, swn, N, j_blocks,
        DH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    ):
        # Grid (cdiv(R, BLOCK_R), H * j_blocks): rows [pid_r * BLOCK_R, +BLOCK_R) of the (B S, K)
        # input, pairs [jb * BLOCK_J, +BLOCK_J) of head h.
        pid_r = tl.program_id(0)
        h = tl.program_id(1) // j_blocks
        jb = tl.program_id(1) % j_blocks
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rows < R
        j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
        j_ok = j < DH // 2
        offs_k = tl.arange(0, BLOCK_K)
        col_e = h * DH + 2 * j  # the pairs' even output channels (weight rows); odd = col_e + 1
        x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * sxr + offs_k[None, :]
        we_ptrs = w_ptr + col_e.to(tl.int64)[None, :] * swn + offs_k[:, None]  # (BLOCK_K, BLOCK_J) of W_e^T
        acc_e = tl.zeros((BLOCK_R, BLOCK_J), dtype=tl.float32)
        acc_o = tl.zeros((BLOCK_R, BLOCK_J), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=r_ok[:, None], other=0.0)
                we = tl.load(we_ptrs, mask=j_ok[None, :], other=0.0)
                wo = tl.load(we_ptrs + swn, mask=j_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < K - k0
                a = tl.load(x_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                we = tl.load(we_ptrs, mask=k_ok[:, None] & j_ok[None, :], other=0.0)
                wo = tl.load(we_ptrs + swn, mask=k_ok[:, None] & j_ok[None, :], other=0.0)
            acc_e = tl.dot(a, we, acc_e, input_precision=DOT_PRECISION)
            acc_o = tl.dot(a, wo, acc_o, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            we_ptrs += BLOCK_K
        ve = acc_e + tl.load(b_ptr + col_e, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        vo = acc_o + tl.load(b_ptr + col_e + 1, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        if BF16_BY_HAND:  # (interpreted: its float32 -> bf16 cast truncates)
            ve = _bf16_rtne(ve)
            vo = _bf16_rtne(vo)
        ve = ve.to(y_ptr.dtype.element_ty).to(tl.float32)  # the linear's output, rounded
        vo = vo.to(y_ptr.dtype.element_ty).to(tl.float32)
        s = rows % S
        rot = (s < n_rope)[:, None]
        m = r_ok[:, None] & j_ok[None, :]
        cs = rope_ptr + ((s % L)[:, None] * (DH // 2) + j[None, :]) * 2
        cos = tl.load(cs, mask=m & rot, other=1.0)
        sin = tl.load(cs + 1, mask=m & rot, other=0.0)
        ye = tl.where(rot, ve * cos - vo * sin, ve)
        yo = tl.where(rot, ve * sin + vo * cos, vo)
        if BF16_BY_HAND:
            ye = _bf16_rtne(ye)
            yo = _bf16_rtne(yo)
        # y (B S, H, DH) contiguous: row r's head h starts at (r H + h) DH = r N + h DH
        dst = y_ptr + rows.to(tl.int64)[:, None] * N + col_e[None, :]
        tl.store(dst, ye.to(y_ptr.dtype.element_ty), mask=m)
        tl.store(dst + 1, yo.to(y_ptr.dtype.element_ty), mask=m)

    _INTERPRETED = interpreted(_rope_projection_kernel)  # (then the kernel rounds bf16 itself: see interpreted)


def _rope_projection_triton(
    x: Tensor, weight: Tensor, bias: Tensor, rope: Tensor, n_rope: int, num_heads: int,
    out: Optional[Tensor] = None, block_r: int = DEFAULT_TILE[0], block_j: int = DEFAULT_TILE[1],
    block_k: int = DEFAULT_TILE[2], num_warps: int = DEFAULT_TILE[3], num_stages: int = DEFAULT_TILE[4],
) -> Tensor:
    """Launcher. ``out``: a preallocated contiguous (B, S, H, Dh) tensor of x's dtype (every element
    is written). Tile sizes are powers of two >= 16 (``tl.dot``); ``block_j`` pairs per program
    (capped at the next power of two >= J).

    Static sm_90 build (Triton 3.7, bf16) at the tracker's shapes, 16 objects (the cross-attention's
    keys, 16 x 36352 x 64 -> 256, and the queries, 16 x 5184 x 256 -> 256): the default 64 rows x 64
    pairs with 8 warps uses 112 registers (2 programs, 16 warps an SM), wgmma, no spill, and in the K
    loop only the two barriers of the dots' shared-memory operands; with 4 warps 222 registers (8
    warps an SM); 128 x 128 spills. A program reads its rows' float32 (cos, sin) pairs (8 bytes a
    pair, from L2: the table is 5.3 MB) beside the 4 bytes a pair it writes: the bench's tiles weigh
    that against the programs in flight. Not yet timed on a GPU (bench/bench_rope_projection.py)."""
    require_triton("rope_projection")
    Dh = _check_inputs(x, weight, bias, rope, n_rope, num_heads)
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32/bfloat16/float16, got {x.dtype}")
    if rope.dtype != torch.float32:
        raise ValueError(f"the Triton kernel takes a float32 rope table, got {rope.dtype}")
    for name, v in (("block_r", block_r), ("block_j", block_j), ("block_k", block_k)):
        check_power_of_two(name, v, minimum=16)
    B, S, K = x.shape
    H = num_heads
    out = output_buffer(out, (B, S, H, Dh), x.dtype, x.device)
    if out.numel() == 0:
        return out
    if K == 0:  # an empty sum: the bias, rotated
        return out.copy_(rope_projection_ref(x, weight, bias, rope, n_rope, num_heads))
    x2 = x.reshape(B * S, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    J = Dh // 2
    block_j = min(block_j, max(16, triton.next_power_of_2(J)))
    j_blocks = cdiv(J, block_j)
    with device_guard(x.device):
        _rope_projection_kernel[(cdiv(B * S, block_r), H * j_blocks)](
            x2, weight, bias.contiguous(), rope.contiguous(), out,
            B * S, S, K, rope.shape[0], n_rope, x2.stride(0), weight.stride(0), H * Dh, j_blocks,
            DH=Dh, BLOCK_R=block_r, BLOCK_J=block_j, BLOCK_K=block_k, EVEN_K=K % block_k == 0,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BF16_BY_HAND=_INTERPRETED and x.dtype == torch.bfloat16, num_warps=num_warps, num_stages=num_stages,
        )
    return out


@torch.library.custom_op("sam3fast::rope_projection", mutates_args=(), device_types="cuda")
def rope_projection_op(x: Tensor, weight: Tensor, bias: Tensor, rope: Tensor, n_rope: int, num_heads: int) -> Tensor:
    """``sam3fast::rope_projection``: the Triton kernel on CUDA, ``rope_projection_ref`` on CPU."""
    return _rope_projection_triton(x, weight, bias, rope, n_rope, num_heads)


rope_projection_op.register_kernel("cpu")(rope_projection_ref)


@rope_projection_op.register_fake
def _rope_projection_fake(x, weight, bias, rope, n_rope, num_heads):
    return x.new_empty((x.shape[0], x.shape[1], num_heads, weight.shape[0] // num_heads))


# ---- typed entry point (re-exported by sam3fast.ops) ------------------------------------------


def rope_projection_backend(x: Tensor) -> Tuple[str, str]:
    """("triton" | "reference", reason) for this input."""
    return triton_backend(x, env.FORCE_REFERENCE)


def rope_projection(x: Tensor, weight: Tensor, bias: Tensor, freqs_cis: Tensor, n_rope: int,
                    num_heads: int = 1) -> Tensor:
    """``x @ weight.T + bias`` as (B, S, H, Dh) with rows s < ``n_rope`` rotated by RoPE table row
    s mod L (see the module docstring). ``freqs_cis``: the complex (L, Dh/2) table or its float32
    ``view_as_real``. The Triton kernel on CUDA, the PyTorch operations elsewhere."""
    rope = torch.view_as_real(freqs_cis) if freqs_cis.is_complex() else freqs_cis
    if rope_projection_backend(x)[0] == "triton":
        return torch.ops.sam3fast.rope_projection(x, weight, bias, rope.float(), int(n_rope), int(num_heads))
    return rope_projection_ref(x, weight, bias, rope, int(n_rope), int(num_heads))
