"""The ViT MLP's first layer with its exact GELU in the epilogue: ``gelu(x @ W^T + b)`` in one GEMM.

Letters: M rows (tokens: 5184 per 1008 px image in SAM 3), K input width (1024), N output width
(the MLP's hidden width, 4736).

linear_gelu(x, weight, bias) -> y
    x       (..., K)  bfloat16 / float16 / float32 (the reference also takes float64), last dim
                      contiguous
    weight  (N, K), bias (N,)   ``fc1`` of the MLP, x's dtype
    y = gelu(x W^T + b)        (..., N) contiguous, x's dtype; gelu the exact (erf) one

Why: in the trunk ``fc1`` writes an (M, N) tensor that ``nn.GELU`` then reads and writes again:
2 x M x N x 2 bytes = 98 MB per block in bf16, ~37 us on an H100 at the measured ~2.6 TB/s of the
eager GELU kernel (run 2 profile: 33 GELU launches, 1.17 ms per image). Here the GELU is applied to
the accumulator tile before the one store. The cost is the GEMM itself: cuBLAS ran this product
(M 5184, N 4736, K 1024, 50 GFLOP) in ~82 us (613 TFLOP/s), so the fused kernel wins only while it
stays under ~119 us (~420 TFLOP/s). Not yet timed on a GPU: ``Mlp.fused_gelu`` is off by default
until bench/bench_linear_gelu.py says so on an H100.

Numerics, as the module rounds: the float32 accumulator plus the bias is rounded once to the dtype
(what cuBLAS's bias epilogue does), the GELU is computed in float32 from that rounded value,
0.5 v (1 + erf(v / sqrt(2))), and rounded once. Only the accumulation order of the dot products
differs from cuBLAS's (so a result may move by an ulp). float32 inputs use exact float32 dots
(``input_precision="ieee"``), not TF32. The Triton 3.7 interpreter (the CPU tests) computes a
``tl.dot`` of bfloat16 tiles on their raw bits, so the CPU tests cover float32 and float16 and the
GPU tests bfloat16.

Schedule: a grid of (cdiv(M, BLOCK_M) x cdiv(N, BLOCK_N)) output tiles, ordered in groups of
GROUP_M row tiles (the programs in flight share W's column tiles and x's row tiles in L2); each
program runs the K loop with ``tl.dot`` (wgmma on sm_90, loads software-pipelined over
``num_stages``), then bias, rounding, GELU and the store. Default tile 128 x 128 x 64, 8 warps, 4
stages (``DEFAULT_TILE``; the benchmark sweeps others).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sam3fast import env

# triton is optional (the "gpu" extra): without it the reference and the CPU op still work.
from ._triton_compat import (  # noqa: F401  (TRITON_IMPORT_ERROR: read by the tests)
    HAS_TRITON, TRITON_IMPORT_ERROR, cdiv, check_power_of_two, device_guard, output_buffer, require_triton, tl,
    triton, why_not_triton,
)

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
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


def linear_gelu_ref(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The spec (and the op's CPU kernel): the MLP's own operations, ``F.gelu(F.linear(x, w, b))``."""
    _check_inputs(x, weight, bias)
    return F.gelu(F.linear(x, weight, bias))


if HAS_TRITON:

    @triton.jit
    def _linear_gelu_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr,
        M, N, K, sxm, swn,
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
        # rounded as the linear's output is, then the exact GELU in float32 from that value
        v = v.to(y_ptr.dtype.element_ty).to(tl.float32)
        g = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(y_ptrs, g.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _linear_gelu_triton(
    x: Tensor, weight: Tensor, bias: Tensor, out: Optional[Tensor] = None,
    block_m: int = DEFAULT_TILE[0], block_n: int = DEFAULT_TILE[1], block_k: int = DEFAULT_TILE[2],
    num_warps: int = DEFAULT_TILE[3], num_stages: int = DEFAULT_TILE[4], group_m: int = GROUP_M,
) -> Tensor:
    """Launcher. ``out``: a preallocated contiguous (..., N) tensor of x's dtype (every element is
    written). Tile sizes are powers of two, each >= 16 (``tl.dot``)."""
    require_triton("linear_gelu")
    _check_inputs(x, weight, bias)
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32/bfloat16/float16, got {x.dtype}")
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        check_power_of_two(name, v, minimum=16)
    if group_m < 1:
        raise ValueError(f"group_m must be >= 1, got {group_m}")
    N, K = weight.shape
    out = output_buffer(out, tuple(x.shape[:-1]) + (N,), x.dtype, x.device)
    if out.numel() == 0:
        return out
    if K == 0:  # an empty sum: gelu(bias) on every row
        return out.copy_(F.gelu(bias).expand(out.shape))
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = bias.contiguous()
    grid = (cdiv(M, block_m) * cdiv(N, block_n),)
    with device_guard(x.device):
        _linear_gelu_kernel[grid](
            x2, weight, bias, out, M, N, K, x2.stride(0), weight.stride(0),
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, GROUP_M=group_m, EVEN_K=K % block_k == 0, num_warps=num_warps, num_stages=num_stages,
        )
    return out


@torch.library.custom_op("sam3fast::linear_gelu", mutates_args=(), device_types="cuda")
def linear_gelu_op(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``sam3fast::linear_gelu``: the Triton kernel on CUDA, ``linear_gelu_ref`` on CPU."""
    return _linear_gelu_triton(x, weight, bias)


linear_gelu_op.register_kernel("cpu")(linear_gelu_ref)


@linear_gelu_op.register_fake
def _linear_gelu_fake(x, weight, bias):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


# ---- typed entry point (re-exported by sam3fast.ops) ------------------------------------------


def linear_gelu_backend(x: Tensor) -> Tuple[str, str]:
    """("triton" | "reference", reason) for an input of this device and dtype."""
    why = why_not_triton(x.device, env.FORCE_REFERENCE)
    if why is not None:
        return "reference", why
    if x.dtype not in _KERNEL_DTYPES:
        return "reference", f"{x.dtype} inputs (the Triton kernel takes float32/bfloat16/float16)"
    return "triton", "CUDA tensors, triton available"


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``gelu(x @ weight^T + bias)`` (exact GELU): one Triton GEMM with the GELU in its epilogue on
    CUDA, ``F.gelu(F.linear(...))`` elsewhere. See ``sam3fast.kernels.linear_gelu``."""
    if linear_gelu_backend(x)[0] == "triton":
        return torch.ops.sam3fast.linear_gelu(x, weight, bias)
    return linear_gelu_ref(x, weight, bias)
