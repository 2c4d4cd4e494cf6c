"""The ViT trunk's linears with the elementwise step after them in the GEMM epilogue, one Triton GEMM
each: the MLP's fc1 with its exact GELU (``sam3fast::linear_gelu``) and the attention's qkv
projection with the 2-D axial RoPE of q and k (``sam3fast::linear_rope``).

Letters: M rows (tokens: 5184 per 1008 px image in SAM 3, as 9 windows of 576 or one grid), K input
width (1024), N output width (fc1: the MLP's hidden width 4736; qkv: 3 C = 3072), C = nH hd the
attention width (16 heads of 64), L tokens per attended sequence (576 or 5184).

linear_gelu(x, weight, bias) -> y
    x       (..., K)  bfloat16 / float16 / float32 (the references also take float64), last dim
                      contiguous
    weight  (N, K), bias (N,)   ``fc1`` of the MLP, x's dtype
    y = gelu(x W^T + b)        (..., N) contiguous, x's dtype; gelu the exact (erf) one
linear_rope(x, weight, bias, rope, num_heads) -> qkv
    x       (B, L, K); weight (3 C, K), bias (3 C,): the attention's ``qkv``
    rope    (L, hd / 2, 2) float32 (cos, sin): ``torch.view_as_real`` of its ``freqs_cis``
    qkv = x W^T + b viewed (B, L, 3, nH, hd), q and k rotated as ``sam3fast.model.vit.apply_rope``
          rotates them (token l of each sequence by row l of the table), v as projected;
          contiguous, x's dtype

Why: in the trunk fc1 writes a (M, 4736) tensor that ``nn.GELU`` then reads and writes again (98 MB
per block in bf16, ~37 us on an H100 at the ~2.6 TB/s the eager GELU kernel reached in run 2: 33
launches, 1.17 ms per image), and the qkv projection writes q, k that the RoPE kernel reads and
writes again (42 MB per block; 32 launches, 0.44 ms per image). Here both steps act on the
accumulator tile before the one store. The cost is the GEMM itself: in the run 2 profile (H100,
bf16) cuBLAS's 32-launch 128 x 256 GEMM, fc1 or fc2 (50 GFLOP each), took ~82 us a launch (613
TFLOP/s), so the fused kernel wins only while it stays under ~119 us (~420 TFLOP/s; arithmetic), and
qkv (33 GFLOP) only while it stays within ~14 us of cuBLAS. Not yet timed on a GPU: ``Mlp.fused_gelu``
and ``Attention.fused_rope`` are off by default until bench/bench_fused_linear.py says so on an H100.

Numerics, as the modules round: the float32 accumulator plus the bias is rounded once to the dtype
(what cuBLAS's bias epilogue does), then the GELU (0.5 v (1 + erf(v / sqrt(2)))) or the rotation
(v_even cos - v_odd sin, v_even sin + v_odd cos) is computed in float32 from that rounded value and
rounded once. Only the accumulation order of the dot products differs from cuBLAS's (a result may
move by an ulp), and the rotation may contract a product into an FMA (the RoPE kernel does not).
float32 inputs use exact float32 dots (``input_precision="ieee"``), not TF32. The Triton 3.7
interpreter (the CPU tests) computes a ``tl.dot`` of bfloat16 tiles on their raw bits, so the CPU
tests cover float32 and float16 and the GPU tests bfloat16.

Schedule: a grid of (cdiv(M, BLOCK_M) x cdiv(N, BLOCK_N)) output tiles, ordered in groups of
GROUP_M row tiles (the programs in flight share W's column tiles and x's row tiles in L2); each
program runs the K loop with ``tl.dot`` (wgmma on sm_90, loads software-pipelined over
``num_stages``), then the bias, the rounding, the epilogue and the store. For RoPE a column tile
lies in one of q, k, v (BLOCK_N divides C) and holds whole channel pairs; the table rows are
gathered by token (row mod L) and pair (column mod hd, halved). Default tile 128 x 128 x 64, 8
warps, 4 stages (``DEFAULT_TILE``; the benchmark sweeps others).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sam3fast import env

# triton is optional (the "gpu" extra): without it the reference and the CPU op still work.
from ._triton_compat import (  # noqa: F401  (TRITON_IMPORT_ERROR: read by the tests)
    KERNEL_DTYPES, HAS_TRITON, TRITON_IMPORT_ERROR, cdiv, check_power_of_two, device_guard, output_buffer,
    require_triton, tl, triton, triton_backend,
)
from .rope import rope_ref

_KERNEL_DTYPES = KERNEL_DTYPES
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
DEFAULT_TILE = (128, 128, 64, 8, 4)
GROUP_M = 8


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor) -> None:
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (..., K) tensor, got {x.dtype} {tuple(x.shape)}")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must be (N, {K}), got {tuple(weight.shape)}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        raise ValueError(f"x, weight and bias must share one dtype, got {x.dtype}, {weight.dtype}, {bias.dtype}")
    if weight.device != x.device or bias.device != x.device:
        raise ValueError("x, weight and bias must be on one device")


def _check_rope(x: Tensor, weight: Tensor, rope: Tensor, num_heads: int) -> Tuple[int, int]:
    """(C, hd) of a linear_rope call, after its checks."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, K), got {tuple(x.shape)}")
    N, L = weight.shape[0], x.shape[1]
    if num_heads < 1 or N % 3 or (N // 3) % num_heads or (N // 3 // num_heads) % 2:
        raise ValueError(f"weight must have 3 C rows, C a multiple of num_heads ({num_heads}) with an even head "
                         f"dim, got {N} rows")
    C = N // 3
    hd = C // num_heads
    if tuple(rope.shape) != (L, hd // 2, 2) or rope.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"rope must be a float32 (L={L}, {hd // 2}, 2) (cos, sin) table, got {rope.dtype} "
                         f"{tuple(rope.shape)}")
    if rope.device != x.device:
        raise ValueError(f"x and rope must be on one device, got {x.device} and {rope.device}")
    return C, hd


def linear_gelu_ref(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The spec (and the op's CPU kernel): the MLP's own operations, ``F.gelu(F.linear(x, w, b))``."""
    _check_inputs(x, weight, bias)
    return F.gelu(F.linear(x, weight, bias))


def linear_rope_ref(x: Tensor, weight: Tensor, bias: Tensor, rope: Tensor, num_heads: int) -> Tensor:
    """The spec (and the op's CPU kernel): the attention's own operations, ``qkv = F.linear(x, w, b)``
    viewed (B, L, 3, nH, hd), then ``rope_ref`` (``apply_rope``'s arithmetic) of its q, k."""
    _check_inputs(x, weight, bias)
    C, hd = _check_rope(x, weight, rope, num_heads)
    B, L = x.shape[:2]
    qkv = F.linear(x, weight, bias).view(B, L, 3, num_heads, hd)
    return torch.cat((rope_ref(qkv[:, :, :2], rope), qkv[:, :, 2:]), dim=2)


if HAS_TRITON:

    @triton.jit
    def _fused_linear_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, rope_ptr,
        M, N, K, sxm, swn, L, C,
        EPILOGUE: tl.constexpr, HALF: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        # Grid (tiles,): tile pid -> (pid_m, pid_n) in groups of GROUP_M row tiles, column-major
        # within a group.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_n
        first_m = (pid // in_group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_m
        pid_n = (pid % in_group) // group_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * sxm + offs_k[None, :]
        w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * swn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) of W^T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
                b = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = offs_k < K - k0
                a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        v = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        # rounded as the linear's output is, then the epilogue in float32 from that value
        v = v.to(y_ptr.dtype.element_ty).to(tl.float32)
        if EPILOGUE == "gelu":
            g = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
        else:  # "rope": q and k column tiles (the tile lies in one of q, k, v: BLOCK_N divides C)
            g = v
            if pid_n * BLOCK_N < 2 * C:
                ve, vo = tl.split(tl.reshape(v, (BLOCK_M, BLOCK_N // 2, 2)))
                pair = (pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)) % HALF
                row = (offs_m % L).to(tl.int64)
                cs = rope_ptr + (row[:, None] * HALF + pair[None, :]) * 2
                cos = tl.load(cs, mask=m_ok[:, None], other=0.0)
                sin = tl.load(cs + 1, mask=m_ok[:, None], other=0.0)
                g = tl.reshape(tl.join(ve * cos - vo * sin, ve * sin + vo * cos), (BLOCK_M, BLOCK_N))
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(y_ptrs, g.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _fused_linear_triton(
    x: Tensor, weight: Tensor, bias: Tensor, epilogue: str, rope: Optional[Tensor] = None, num_heads: int = 1,
    out: Optional[Tensor] = None, block_m: int = DEFAULT_TILE[0], block_n: int = DEFAULT_TILE[1],
    block_k: int = DEFAULT_TILE[2], num_warps: int = DEFAULT_TILE[3], num_stages: int = DEFAULT_TILE[4],
    group_m: int = GROUP_M,
) -> Tensor:
    """Launcher of both ops (``epilogue`` "gelu" or "rope"). ``out``: a preallocated contiguous
    output of x's dtype ((..., N) for gelu, (B, L, 3, nH, hd) for rope; every element is written).
    Tile sizes are powers of two, each >= 16 (``tl.dot``); for rope BLOCK_N must divide C."""
    require_triton(f"linear_{epilogue}")
    _check_inputs(x, weight, bias)
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32/bfloat16/float16, got {x.dtype}")
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        check_power_of_two(name, v, minimum=16)
    if group_m < 1:
        raise ValueError(f"group_m must be >= 1, got {group_m}")
    N, K = weight.shape
    if epilogue == "gelu":
        shape, L, C, half = tuple(x.shape[:-1]) + (N,), 1, N, 1
    elif epilogue == "rope":
        C, hd = _check_rope(x, weight, rope, num_heads)
        if rope.dtype != torch.float32:
            raise ValueError(f"the Triton kernel takes a float32 rope table, got {rope.dtype}")
        if C % block_n:
            raise ValueError(f"block_n ({block_n}) must divide the attention width {C} (a column tile in one of "
                             f"q, k, v)")
        shape, L, half = (x.shape[0], x.shape[1], 3, num_heads, hd), x.shape[1], hd // 2
    else:
        raise ValueError(f"epilogue must be 'gelu' or 'rope', got {epilogue!r}")
    out = output_buffer(out, shape, x.dtype, x.device)
    if out.numel() == 0:
        return out
    if K == 0:  # an empty sum: the epilogue of the bias on every row
        return out.copy_(linear_gelu_ref(x, weight, bias) if epilogue == "gelu"
                         else linear_rope_ref(x, weight, bias, rope, num_heads))
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = bias.contiguous()
    rope = bias if rope is None else rope.contiguous()  # (unread by the gelu epilogue)
    grid = (cdiv(M, block_m) * cdiv(N, block_n),)
    with device_guard(x.device):
        _fused_linear_kernel[grid](
            x2, weight, bias, out, rope, M, N, K, x2.stride(0), weight.stride(0), L, C,
            EPILOGUE=epilogue, HALF=half,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, GROUP_M=group_m, EVEN_K=K % block_k == 0, num_warps=num_warps, num_stages=num_stages,
        )
    return out


def _linear_gelu_triton(x: Tensor, weight: Tensor, bias: Tensor, **launch) -> Tensor:
    """Launcher of ``sam3fast::linear_gelu`` (see :func:`_fused_linear_triton` for ``launch``)."""
    return _fused_linear_triton(x, weight, bias, "gelu", **launch)


def _linear_rope_triton(x: Tensor, weight: Tensor, bias: Tensor, rope: Tensor, num_heads: int, **launch) -> Tensor:
    """Launcher of ``sam3fast::linear_rope`` (see :func:`_fused_linear_triton` for ``launch``)."""
    return _fused_linear_triton(x, weight, bias, "rope", rope=rope, num_heads=num_heads, **launch)


@torch.library.custom_op("sam3fast::linear_gelu", mutates_args=(), device_types="cuda")
def linear_gelu_op(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``sam3fast::linear_gelu``: the Triton kernel on CUDA, ``linear_gelu_ref`` on CPU."""
    return _linear_gelu_triton(x, weight, bias)


linear_gelu_op.register_kernel("cpu")(linear_gelu_ref)


@linear_gelu_op.register_fake
def _linear_gelu_fake(x, weight, bias):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


@torch.library.custom_op("sam3fast::linear_rope", mutates_args=(), device_types="cuda")
def linear_rope_op(x: Tensor, weight: Tensor, bias: Tensor, rope: Tensor, num_heads: int) -> Tensor:
    """``sam3fast::linear_rope``: the Triton kernel on CUDA, ``linear_rope_ref`` on CPU."""
    return _linear_rope_triton(x, weight, bias, rope, num_heads)


linear_rope_op.register_kernel("cpu")(linear_rope_ref)


@linear_rope_op.register_fake
def _linear_rope_fake(x, weight, bias, rope, num_heads):
    C = weight.shape[0] // 3
    return x.new_empty((x.shape[0], x.shape[1], 3, num_heads, C // num_heads))


# ---- typed entry point (re-exported by sam3fast.ops) ------------------------------------------


def fused_linear_backend(x: Tensor) -> Tuple[str, str]:
    """("triton" | "reference", reason) for an input of this device and dtype (both ops)."""
    return triton_backend(x, env.FORCE_REFERENCE)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``gelu(x @ weight^T + bias)`` (exact GELU): one Triton GEMM with the GELU in its epilogue on
    CUDA, ``F.gelu(F.linear(...))`` elsewhere. See ``sam3fast.kernels.linear_gelu``."""
    if fused_linear_backend(x)[0] == "triton":
        return torch.ops.sam3fast.linear_gelu(x, weight, bias)
    return linear_gelu_ref(x, weight, bias)


def linear_rope(x: Tensor, weight: Tensor, bias: Tensor, freqs_cis: Tensor, num_heads: int) -> Tensor:
    """The attention's qkv projection with q, k rotated by the 2-D axial RoPE: (B, L, K) -> (B, L, 3,
    nH, hd). ``freqs_cis`` (L, hd/2) complex (``compute_axial_cis``) or its float32 ``view_as_real``.
    One Triton GEMM with the rotation in its epilogue on CUDA, the module's operations elsewhere."""
    table = torch.view_as_real(freqs_cis) if freqs_cis.is_complex() else freqs_cis
    if fused_linear_backend(x)[0] == "triton":
        return torch.ops.sam3fast.linear_rope(x, weight, bias, table.float(), int(num_heads))
    return linear_rope_ref(x, weight, bias, table, num_heads)
