"""LayerNorm2d over a few channels, optionally with the exact GELU after it, in one pass.

Letters: B images (objects), C channels (4, 16, 64 in SAM 3), H x W the map.

layer_norm2d(x, weight, bias, eps, gelu) -> y
    x             (B, C, H, W) float32 / bfloat16 / float16 (the reference also takes float64), any
                  strides
    weight, bias  (C,), any floating dtype (read in float32)
    n[b, :, h, w] = (x[b, :, h, w] - mean) / sqrt(var + eps) * weight + bias   (over the C channels,
                  biased variance), rounded once to x's dtype
    y = n, or with ``gelu`` the exact GELU of the rounded n (0.5 n (1 + erf(n / sqrt 2)) in float32),
                  rounded once: what ``F.gelu(LayerNorm2d(x))`` gives
    (B, C, H, W) contiguous, x's dtype

Where: the tracker's memory encoder downsamples each object's mask through (conv, LayerNorm2d,
GELU) x 4 with C = 4, 16, 64, 256 on 576, 288, 144, 72 px maps, and the SAM mask decoder upscales
through (conv-transpose, LayerNorm2d(64), GELU). PyTorch's layer norm runs one CUDA block per
normalised row: with 4 to 64 channels that is millions of tiny blocks, so the module reduces over
dim 1 with PyTorch's general reductions instead (``layer_norm2d_channels_first``: a float32 copy,
statistics, an elementwise chain); the GELU reads and writes the map once more. On an H200
(2026-11-27, bench/results/norms_nvidia-h200_2026-11-27.md, bf16, 16 objects) that path took 0.56,
0.52 and 0.51 ms at C = 4, 16, 64, where torch.compile's fused LayerNorm2d took 0.063, 0.073 and
0.072 ms. Here a program reads a BLOCK_P-pixel strip of one image with all its C channels (loads
along the pixels, coalesced in NCHW), reduces over C in registers and writes the strip once.

Numerics, as ``layer_norm2d_channels_first`` (then ``F.gelu``): float32 statistics (the mean, corrected
once by the deviations' own mean; the biased variance; 1 / sqrt(var + eps)), the affine in float32,
one rounding to x's dtype; the GELU from that rounded value, rounded once. Float32 rounding
differences only (and erf's: libdevice's against PyTorch's). Under the Triton interpreter (the CPU
tests) float32 -> bf16 casts truncate (Triton 3.7), so there the kernel rounds bf16 by hand.
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

_MAX_CHANNELS = 128  # a strip's C x BLOCK_P values live in registers; LayerNorm2d.SMALL_C is 128
# (BLOCK_P, num_warps). Not yet timed on a GPU: 1024 pixels (C = 4, 16) to 128 pixels (C = 128)
# keep about 4096 values a program (32 a thread at 4 warps).
DEFAULT_VALUES_PER_PROGRAM = 4096
DEFAULT_NUM_WARPS = 4


def default_block_p(C: int) -> int:
    """Pixels a program takes for C channels: DEFAULT_VALUES_PER_PROGRAM values, 16 to 1024 pixels."""
    block_c = 1 << max(0, C - 1).bit_length()
    return max(16, min(1024, DEFAULT_VALUES_PER_PROGRAM // block_c))


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (C,) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating ({C},) tensor, got {t.dtype} {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"x and {name} must be on one device, got {x.device} and {t.device}")


def layer_norm2d_channels_first(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over dim 1 of (B, C, H, W), channels first, in PyTorch (``LayerNorm2d``'s path off
    CUDA, re-exported by ``sam3fast.model.common``): float32 (float64 for float64 input) mean and
    biased variance reduced over dim 1, then ``(x - mean) * rsqrt(var + eps) * weight + bias``
    rounded once to x's dtype. Output in x's layout (contiguous for the contiguous conv outputs it
    follows). Full-size temporaries: the float32 copy of a half-precision x (freed after the
    statistics) and the float32 result, updated in place (inference only: no backward through it),
    never more than two alive."""
    acc = torch.promote_types(x.dtype, torch.float32)
    var, mean = torch.var_mean(x.to(acc), dim=1, keepdim=True, correction=0)
    y = x - mean  # promotes to acc
    y.mul_(torch.rsqrt(var + eps))
    y.mul_(weight.view(-1, 1, 1)).add_(bias.view(-1, 1, 1))
    return y.to(x.dtype)


def layer_norm2d_ref(x: Tensor, weight: Tensor, bias: Tensor, eps: float, gelu: bool = False) -> Tensor:
    """The spec (and the op's CPU kernel): :func:`layer_norm2d_channels_first`, then ``F.gelu`` if
    ``gelu``; (B, C, H, W) contiguous."""
    _check_inputs(x, weight, bias)
    y = layer_norm2d_channels_first(x, weight, bias, eps)
    y = F.gelu(y) if gelu else y
    return y.contiguous()


if HAS_TRITON:
    from .residual_norm import _layer_norm_rows
    from .rope import _bf16_rtne

    @triton.jit
    def _gelu_store_nchw(n, y_ptr, b, C, HW, c, p, m, GELU: tl.constexpr, BF16_BY_HAND: tl.constexpr):
        # n (pixels, channels) float32, the norm; with GELU the exact GELU of its rounded value (as
        # F.gelu reads the norm's output); rounded once and stored at y[b, c, p] of a contiguous
        # (B, C, HW) map.
        if GELU:
            n = n.to(y_ptr.dtype.element_ty).to(tl.float32)
            n = 0.5 * n * (1.0 + tl.math.erf(n * 0.7071067811865476))
            if BF16_BY_HAND:
                n = _bf16_rtne(n)
        dst = y_ptr + b * C * HW + c.to(tl.int64)[None, :] * HW + p.to(tl.int64)[:, None]
        tl.store(dst, n.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _layer_norm2d_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr,
        C, W, HW, p_blocks, sxb, sxc, sxh, sxw, eps,
        GELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    ):
        # Grid (B * p_blocks,): pixels [t * BLOCK_P, +BLOCK_P) of image b (row-major over H x W), all
        # C channels; the (pixels, channels) tile is reduced over its channels.
        pid = tl.program_id(0)
        b = (pid // p_blocks).to(tl.int64)
        p = (pid % p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.arange(0, BLOCK_C)
        p_ok = p < HW
        c_ok = c < C
        m = p_ok[:, None] & c_ok[None, :]
        ph = (p // W).to(tl.int64)
        pw = (p % W).to(tl.int64)
        src = x_ptr + b * sxb + (ph * sxh + pw * sxw)[:, None] + c.to(tl.int64)[None, :] * sxc
        v = tl.load(src, mask=m, other=0.0).to(tl.float32)
        n = _layer_norm_rows(v, m, w_ptr, b_ptr, c, c_ok, C, eps, BF16_BY_HAND)
        _gelu_store_nchw(n, y_ptr, b, C, HW, c, p, m, GELU, BF16_BY_HAND)

    _INTERPRETED = interpreted(_layer_norm2d_kernel)  # (then the kernel rounds bf16 itself: see interpreted)


def _layer_norm2d_triton(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, gelu: bool = False, out: Optional[Tensor] = None,
    block_p: Optional[int] = None, num_warps: int = DEFAULT_NUM_WARPS,
) -> Tensor:
    """Launcher. ``out``: a preallocated contiguous (B, C, H, W) tensor of x's dtype (every element is
    written). ``block_p``: a power of two, the pixels of a program (None: ``default_block_p(C)``)."""
    require_triton("layer_norm2d")
    _check_inputs(x, weight, bias)
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32/bfloat16/float16, got {x.dtype}")
    B, C, H, W = x.shape
    if C > _MAX_CHANNELS:
        raise ValueError(f"the Triton kernel takes at most {_MAX_CHANNELS} channels, got {C}")
    block_p = default_block_p(C) if block_p is None else block_p
    check_power_of_two("block_p", block_p)
    out = output_buffer(out, (B, C, H, W), x.dtype, x.device)
    if out.numel() == 0:
        return out
    HW = H * W
    p_blocks = cdiv(HW, block_p)
    with device_guard(x.device):
        _layer_norm2d_kernel[(B * p_blocks,)](
            x, weight.contiguous(), bias.contiguous(), out,
            C, W, HW, p_blocks, x.stride(0), x.stride(1), x.stride(2), x.stride(3), float(eps),
            GELU=bool(gelu), BLOCK_P=block_p, BLOCK_C=1 << max(0, C - 1).bit_length(),
            BF16_BY_HAND=_INTERPRETED and x.dtype == torch.bfloat16, num_warps=num_warps,
        )
    return out


@torch.library.custom_op("sam3fast::layer_norm2d", mutates_args=(), device_types="cuda")
def layer_norm2d_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float, gelu: bool) -> Tensor:
    """``sam3fast::layer_norm2d``: the Triton kernel on CUDA, ``layer_norm2d_ref`` on CPU."""
    return _layer_norm2d_triton(x, weight, bias, eps, gelu)


layer_norm2d_op.register_kernel("cpu")(layer_norm2d_ref)


@layer_norm2d_op.register_fake
def _layer_norm2d_fake(x, weight, bias, eps, gelu):
    return torch.empty(tuple(x.shape), dtype=x.dtype, device=x.device)


# ---- typed entry point (re-exported by sam3fast.ops) ------------------------------------------


def layer_norm2d_backend(x: Tensor) -> Tuple[str, str]:
    """("triton" | "reference", reason) for a (B, C, H, W) input of this device and dtype."""
    limit = f"{x.shape[1]} channels (the Triton kernel takes at most {_MAX_CHANNELS})"
    return triton_backend(x, env.FORCE_REFERENCE, limit if x.shape[1] > _MAX_CHANNELS else None)


def layer_norm2d(x: Tensor, weight: Tensor, bias: Tensor, eps: float, gelu: bool = False) -> Tensor:
    """LayerNorm over the channels of (B, C, H, W), then the exact GELU if ``gelu`` (see the module
    docstring): the Triton kernel on CUDA, ``layer_norm2d_ref`` elsewhere."""
    if layer_norm2d_backend(x)[0] == "triton":
        return torch.ops.sam3fast.layer_norm2d(x, weight, bias, float(eps), bool(gelu))
    return layer_norm2d_ref(x, weight, bias, eps, gelu)

