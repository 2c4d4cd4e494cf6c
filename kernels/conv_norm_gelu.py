"""A strided k x k convolution over few channels, then LayerNorm2d and the exact GELU, in one pass.

Letters: B images (objects), CI / CO input / output channels, H x W the input map, OH x OW the
output map, k the kernel side (odd), s the stride, padding k // 2.

conv_norm_gelu(x, conv_weight, conv_bias, norm_weight, norm_bias, eps, stride) -> y
    x            (B, CI, H, W) float32 / bfloat16 / float16 (the reference also takes float64), any
                 strides
    conv_weight  (CO, CI, k, k), conv_bias (CO,)      the convolution (groups 1), x's dtype
    norm_weight, norm_bias (CO,)                      ``LayerNorm2d`` over the CO channels, x's dtype
    c = conv(x) rounded to x's dtype; n = LayerNorm_eps(c) over the channels, rounded; y = GELU(n)
                 (exact, of the rounded n), rounded: what ``F.gelu(LayerNorm2d(conv(x)))`` gives
    (B, CO, OH, OW) contiguous, x's dtype; OH = (H - 1) // s + 1 (likewise OW)

Where: the tracker's memory encoder downsamples each object's 1152 x 1152 mask through (conv 3 x 3
stride 2, LayerNorm2d, GELU) x 4 with 1 -> 4 -> 16 -> 64 -> 256 channels. The first two stages are
almost all bytes: 16 objects move 42 MB in and 42 MB out per stage for 36 and 576 multiply-adds a
pixel. In the 16-object tracker profile of the H200 (run 2 of 2026-11-27), cuDNN ran the 4 -> 16
convolution (16 x 4 x 576^2 in) on its grouped direct kernel at 1.2 ms a frame, with layout
conversion kernels beside it, and the LayerNorm2d + GELU after each stage read and wrote the map
again. Here a program takes BLOCK_P output pixels of one image and all CO channels: for each input
channel and tap, the shifted input pixels and the tap's weights (both loaded in the (channels,
pixels) tile's layout: a stride-0 broadcast along the other axis, so no layout conversion happens
inside the loop), one FMA each into a float32 accumulator; then the bias, the rounding, the
per-pixel norm over the CO channels in registers, the GELU and one store. Used where CI * CO <= 64
(``MAX_CHANNEL_PRODUCT``: SAM 3's first two stages); the later stages (16 x 64, 64 x 256
multiply-adds a tap) stay cuDNN's, which is a GEMM there. Not yet timed on a GPU.

Numerics, as the module rounds: the float32 sum of the CI * k * k products plus the bias, rounded
once to the dtype (the convolution's output; the order differs from cuDNN's: an ulp either way),
then ``layer_norm2d``'s norm and GELU (float32 statistics, one rounding each). Under the Triton
interpreter float32 -> bf16 casts truncate (Triton 3.7), so there the kernel rounds bf16 itself.
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
from .layer_norm2d import layer_norm2d_ref

# The kernel serves CI * CO <= this (the taps' loads and FMAs per output pixel grow with it).
MAX_CHANNEL_PRODUCT = 64
# Output pixels a program and warps (see the launcher's static-build note).
DEFAULT_BLOCK_P = 64
DEFAULT_NUM_WARPS = 4


def _check_inputs(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                  stride: int) -> int:
    """k, after the checks."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (B, CI, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    CI = x.shape[1]
    if conv_weight.dim() != 4 or conv_weight.shape[1] != CI or conv_weight.shape[2] != conv_weight.shape[3] \
            or conv_weight.shape[2] % 2 == 0:
        raise ValueError(f"conv_weight must be a (CO, {CI}, k, k) kernel with k odd, got {tuple(conv_weight.shape)}")
    CO = conv_weight.shape[0]
    for name, t in (("conv_bias", conv_bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if tuple(t.shape) != (CO,):
            raise ValueError(f"{name} must be ({CO},), got {tuple(t.shape)}")
    if any(t.dtype != x.dtype for t in (conv_weight, conv_bias, norm_weight, norm_bias)):
        raise ValueError("x and the convolution and norm parameters must share one dtype")
    if any(t.device != x.device for t in (conv_weight, conv_bias, norm_weight, norm_bias)):
        raise ValueError("x and the convolution and norm parameters must be on one device")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return conv_weight.shape[-1]


def conv_norm_gelu_ref(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                       eps: float, stride: int) -> Tensor:
    """The spec (and the op's CPU kernel): the module's own operations, ``F.conv2d`` (padding k // 2)
    then ``layer_norm2d_ref`` with the GELU; (B, CO, OH, OW) contiguous."""
    k = _check_inputs(x, conv_weight, conv_bias, norm_weight, norm_bias, stride)
    c = F.conv2d(x, conv_weight, conv_bias, stride=stride, padding=k // 2)
    return layer_norm2d_ref(c, norm_weight, norm_bias, eps, gelu=True)


if HAS_TRITON:
    from .layer_norm2d import _gelu_store_nchw
    from .residual_norm import _layer_norm_rows
    from .rope import _bf16_rtne

    @triton.jit
    def _conv_norm_gelu_kernel(
        x_ptr, cwt_ptr, cb_ptr, nw_ptr, nb_ptr, y_ptr,
        CI, CO, H, W, OW, OHW, p_blocks, sxb, sxc, sxh, sxw, eps,
        K: tl.constexpr, STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr,
        BF16_BY_HAND: tl.constexpr,
    ):
        # Grid (B * p_blocks,): output pixels [t * BLOCK_P, +BLOCK_P) of image b (row-major), all
        # CO channels, on a (channels, pixels) tile.
        pid = tl.program_id(0)
        b = (pid // p_blocks).to(tl.int64)
        p = (pid % p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < OHW
        oh = p // OW
        ow = p % OW
        co = tl.arange(0, BLOCK_CO)
        co_ok = co < CO
        x_img = x_ptr + b * sxb
        acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
        for ci in range(CI):
            for tap in tl.static_range(K * K):
                ih = oh * STRIDE + (tap // K - K // 2)
                iw = ow * STRIDE + (tap % K - K // 2)
                ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                src = x_img + ci * sxc + (ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)
                # both operands in the tile's (channels, pixels) shape, stride 0 along the other axis;
                # the weights from the tap-major (CI * K * K, CO) copy, contiguous along the output
                # channels: from the (CO, CI, K, K) weight (stride CI * K * K along them) the 4 -> 16
                # stage built at 128 registers (Triton 3.7; 3.6, the GPU image's: 234 and twice the
                # instructions), now 56 on both (4 warps, 64 pixels a program, sm_90)
                v = tl.load(src[None, :], mask=ok[None, :], other=0.0)
                wt = tl.load(cwt_ptr + ((ci * (K * K) + tap) * CO + co)[:, None] + 0 * p[None, :],
                             mask=co_ok[:, None], other=0.0)
                acc += v.to(tl.float32) * wt.to(tl.float32)
        v = tl.trans(acc + tl.load(cb_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[:, None])  # (pixels, ch)
        if BF16_BY_HAND:
            v = _bf16_rtne(v)
        v = v.to(y_ptr.dtype.element_ty).to(tl.float32)  # the convolution's output, rounded
        m = p_ok[:, None] & co_ok[None, :]
        n = _layer_norm_rows(tl.where(m, v, 0.0), m, nw_ptr, nb_ptr, co, co_ok, CO, eps, BF16_BY_HAND)
        _gelu_store_nchw(n, y_ptr, b, CO, OHW, co, p, m, True, BF16_BY_HAND)

    _INTERPRETED = interpreted(_conv_norm_gelu_kernel)  # (then the kernel rounds bf16 itself: see interpreted)


def _conv_norm_gelu_triton(
    x: Tensor, conv_weight: Tensor, conv_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
    stride: int, out: Optional[Tensor] = None, block_p: int = DEFAULT_BLOCK_P, num_warps: int = DEFAULT_NUM_WARPS,
) -> Tensor:
    """Launcher. ``out``: a preallocated contiguous (B, CO, OH, OW) tensor of x's dtype (every element
    is written). ``block_p``: a power of two, the output pixels of a program."""
    require_triton("conv_norm_gelu")
    k = _check_inputs(x, conv_weight, conv_bias, norm_weight, norm_bias, stride)
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32/bfloat16/float16, got {x.dtype}")
    B, CI, H, W = x.shape
    CO = conv_weight.shape[0]
    if CI * CO > MAX_CHANNEL_PRODUCT:
        raise ValueError(f"the Triton kernel takes CI * CO <= {MAX_CHANNEL_PRODUCT}, got {CI} x {CO}")
    check_power_of_two("block_p", block_p)
    OH, OW = (H - 1) // stride + 1, (W - 1) // stride + 1
    out = output_buffer(out, (B, CO, OH, OW), x.dtype, x.device)
    if out.numel() == 0:
        return out
    p_blocks = cdiv(OH * OW, block_p)
    cwt = conv_weight.permute(1, 2, 3, 0).reshape(CI * k * k, CO).contiguous()  # tap-major (see the kernel)
    with device_guard(x.device):
        _conv_norm_gelu_kernel[(B * p_blocks,)](
            x, cwt, conv_bias.contiguous(), norm_weight.contiguous(), norm_bias.contiguous(), out,
            CI, CO, H, W, OW, OH * OW, p_blocks, x.stride(0), x.stride(1), x.stride(2), x.stride(3), float(eps),
            K=k, STRIDE=int(stride), BLOCK_P=block_p, BLOCK_CO=1 << max(0, CO - 1).bit_length(),
            BF16_BY_HAND=_INTERPRETED and x.dtype == torch.bfloat16, num_warps=num_warps,
        )
    return out


@torch.library.custom_op("sam3fast::conv_norm_gelu", mutates_args=(), device_types="cuda")
def conv_norm_gelu_op(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                      eps: float, stride: int) -> Tensor:
    """``sam3fast::conv_norm_gelu``: the Triton kernel on CUDA, ``conv_norm_gelu_ref`` on CPU."""
    return _conv_norm_gelu_triton(x, conv_weight, conv_bias, norm_weight, norm_bias, eps, stride)


conv_norm_gelu_op.register_kernel("cpu")(conv_norm_gelu_ref)


@conv_norm_gelu_op.register_fake
def _conv_norm_gelu_fake(x, conv_weight, conv_bias, norm_weight, norm_bias, eps, stride):
    B, _, H, W = x.shape
    return x.new_empty((B, conv_weight.shape[0], (H - 1) // stride + 1, (W - 1) // stride + 1))


# ---- typed entry point (re-exported by sam3fast.ops) ------------------------------------------


def conv_norm_gelu_backend(x: Tensor, conv_weight: Tensor) -> Tuple[str, str]:
    """("triton" | "reference", reason) for this input and convolution."""
    CI, CO = conv_weight.shape[1], conv_weight.shape[0]
    limit = (f"{CI} x {CO} channels (the Triton kernel takes CI * CO <= {MAX_CHANNEL_PRODUCT})"
             if CI * CO > MAX_CHANNEL_PRODUCT else None)
    return triton_backend(x, env.FORCE_REFERENCE, limit)


def conv_norm_gelu(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                   eps: float, stride: int) -> Tensor:
    """``GELU(LayerNorm2d(conv(x)))`` (see the module docstring): the Triton kernel on CUDA for few
    channels, the module's PyTorch operations elsewhere."""
    if conv_norm_gelu_backend(x, conv_weight)[0] == "triton":
        return torch.ops.sam3fast.conv_norm_gelu(x, conv_weight, conv_bias, norm_weight, norm_bias, float(eps),
                                                 int(stride))
    return conv_norm_gelu_ref(x, conv_weight, conv_bias, norm_weight, norm_bias, eps, stride)
