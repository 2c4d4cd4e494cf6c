"""The memory encoder's ConvNeXt block head in one pass: the depthwise k x k convolution and the
channels LayerNorm after it, written channels-last for the pointwise Linears that follow.

Letters: B objects, C channels (d_model, 256), H x W the feature grid (72 x 72 in SAM 3), k the
kernel side (7; padding k // 2, stride 1: same size).

dwconv_norm(x, conv_weight, conv_bias, norm_weight, norm_bias, eps) -> y
    x            (B, C, H, W)  float32 / bfloat16 / float16 (the reference also takes float64), any
                               strides (NCHW contiguous or channels-last)
    conv_weight  (C, 1, k, k), conv_bias (C,)   ``CXBlock.dwconv`` (groups = C), x's dtype
    norm_weight, norm_bias (C,)                  ``CXBlock.norm`` (LayerNorm2d, over C)
    y[b, h, w, :] = LayerNorm_eps(conv(x)[b, :, h, w]) * norm_weight + norm_bias
                 (B, H, W, C) contiguous, x's dtype: the tensor ``pwconv1`` reads

Why: PyTorch runs this depthwise convolution in bfloat16 on its generic kernel (NCHW) or on
cuDNN's grouped direct kernel (channels-last); the second H100 profile of 2026-11-26 timed them at
0.73 ms and 1.1 ms a call at 16 objects for a (16, 256, 72, 72) map (2.1 GFLOP; the map itself is
42 MB, ~30 us of HBM traffic). The LayerNorm then reads and writes the map again. Here each program
reads its pixels' k x k neighbourhoods (from L1/L2 after the first touch), accumulates the taps in
float32 on the CUDA cores, and normalises each pixel's C channels in registers before one store.

Numerics, as the module rounds: the float32 sum of the k x k taps plus the bias is rounded once to
the dtype (the convolution's output), the LayerNorm is computed in float32 from that value (mean,
corrected once by the mean of the deviations; biased variance; 1 / sqrt(var + eps); the affine) and
rounded once. The tap order differs from cuDNN's (a result may move by an ulp). Under the Triton
interpreter (the CPU tests) the float32 -> bf16 cast truncates (Triton 3.7), so there the kernel
rounds bf16 itself (``BF16_BY_HAND``, as ``sam3fast.kernels.rope``).

Schedule: grid (B * cdiv(H, BLOCK_H) * cdiv(W, BLOCK_W),); a program owns a BLOCK_H x BLOCK_W tile
of one image's pixels and all C channels (BLOCK_C the next power of two): k x k masked loads of the
shifted tile (zero padding), one FMA each into a float32 accumulator, then the bias, the rounding,
the per-pixel reductions over C and the store of whole C-contiguous rows. Two kernels by the input's
layout: channels-last, a (pixels, channels) tile (loads along C); NCHW, a (channels, pixels) tile
(``_dwconv_norm_cf_kernel``: the tap loads keep the accumulator's layout, the channel stride is a
constant and the offsets int32). Both load the tap's weights in the tile's layout (a stride-0
broadcast along the pixels) rather than as a (C,) vector, which the compiler converted through
shared memory every tap. Default tile 4 x
8 pixels, 8 warps, both layouts.

Measured: on the H200 (tracker profile, run 2 of 2026-11-27), the NCHW input on the (pixels,
channels) tile, which converted each tap's weights through shared memory (two barriers a tap, 183
registers), took 0.67 ms a call at 16 objects (16 x 256 x 72 x 72), near PyTorch's 0.73 ms on the
H100 and far from the ~30 us the map's bytes need. The channels-first kernel has no barrier and no
shared memory in its loop and 99 registers in the static sm_90 build; not yet timed.
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

_KERNEL_DTYPES = KERNEL_DTYPES
_MAX_CHANNELS = 1024  # whole pixel rows of C live in registers
# (BLOCK_H, BLOCK_W, num_warps) by the input's layout, compiled for sm_90 at 16 x 256 x 72 x 72 in bf16,
# the tap's weights loaded in the tile's layout (no barrier, no shared memory in the tap loop):
# channels-last input (loads along C, tap-major weights) 4 x 8 w8, 80 registers on Triton 3.7 and
# 3.6 (the GPU image's; with the (C, K * K) weights: 105 on 3.7, w4 166, and on 3.6 a conversion of
# the tile per tap); NCHW input (the channels-first kernel) 4 x 8 w8, 99 registers on 3.7 (w4: 168),
# while on 3.6 it keeps a conversion of its tile per tap (128 registers, 2 barriers in the loop; no
# variant of its weight load tried avoided it). Neither spills. On CUDA the memory encoder's fuser is
# channels-last (the default), so the channels-last kernel is the one it runs.
DEFAULT_TILE_CHANNELS_LAST = (4, 8, 8)
DEFAULT_TILE_NCHW = (4, 8, 8)


def _check_inputs(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor) -> int:
    """k, after the checks."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (B, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
    C = x.shape[1]
    k = conv_weight.shape[-1] if conv_weight.dim() == 4 else 0
    if conv_weight.dim() != 4 or tuple(conv_weight.shape) != (C, 1, k, k) or k % 2 == 0:
        raise ValueError(f"conv_weight must be a depthwise ({C}, 1, k, k) kernel with k odd, got "
                         f"{tuple(conv_weight.shape)}")
    for name, t in (("conv_bias", conv_bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if tuple(t.shape) != (C,):
            raise ValueError(f"{name} must be ({C},), got {tuple(t.shape)}")
    if any(t.dtype != x.dtype for t in (conv_weight, conv_bias, norm_weight, norm_bias)):
        raise ValueError("x and the convolution and norm parameters must share one dtype")
    if any(t.device != x.device for t in (conv_weight, conv_bias, norm_weight, norm_bias)):
        raise ValueError("x and the convolution and norm parameters must be on one device")
    return k


def dwconv_norm_ref(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                    eps: float) -> Tensor:
    """The spec (and the op's CPU kernel): the block's own operations, ``F.conv2d(groups=C)`` then
    ``F.layer_norm`` over C on the channels-last view; returns (B, H, W, C) contiguous."""
    k = _check_inputs(x, conv_weight, conv_bias, norm_weight, norm_bias)
    y = F.conv2d(x, conv_weight, conv_bias, padding=k // 2, groups=x.shape[1]).permute(0, 2, 3, 1)
    return F.layer_norm(y, (x.shape[1],), norm_weight, norm_bias, eps).contiguous()


if HAS_TRITON:
    from .residual_norm import _layer_norm_rows
    from .rope import _bf16_rtne

    @triton.jit
    def _tile(h_blocks, w_blocks, C, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        # Program -> its image b (int64), its pixels (row ph, column pw) and the channels c.
        pid = tl.program_id(0)
        b = (pid // (h_blocks * w_blocks)).to(tl.int64)
        t = pid % (h_blocks * w_blocks)
        p = tl.arange(0, BLOCK_H * BLOCK_W)
        ph = (t // w_blocks) * BLOCK_H + p // BLOCK_W
        pw = (t % w_blocks) * BLOCK_W + p % BLOCK_W
        c = tl.arange(0, BLOCK_C)
        return b, p, ph, pw, c, c < C

    @triton.jit
    def _norm_store(acc, cb_ptr, nw_ptr, nb_ptr, y_ptr, b, ph, pw, c, c_ok, C, H, W, eps,
                    BF16_BY_HAND: tl.constexpr):
        # acc (pixels, channels): the taps' float32 sums. The bias, the convolution's output rounded
        # as the module's is, the norm from that value, the store of whole channel rows.
        v = acc + tl.load(cb_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if BF16_BY_HAND:
            v = _bf16_rtne(v)
        v = v.to(y_ptr.dtype.element_ty).to(tl.float32)
        pix_ok = (ph < H) & (pw < W)
        m = pix_ok[:, None] & c_ok[None, :]
        y = _layer_norm_rows(tl.where(m, v, 0.0), m, nw_ptr, nb_ptr, c, c_ok, C, eps, BF16_BY_HAND)
        rows = (b * H + ph.to(tl.int64)) * W + pw.to(tl.int64)
        tl.store(y_ptr + rows[:, None] * C + c[None, :], y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _dwconv_norm_kernel(
        x_ptr, cwt_ptr, cb_ptr, nw_ptr, nb_ptr, y_ptr,
        C, H, W, h_blocks, w_blocks, sxb, sxc, sxh, sxw, eps,
        K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
        BF16_BY_HAND: tl.constexpr,
    ):
        # Grid (B * h_blocks * w_blocks,): pixels [th * BLOCK_H, +BLOCK_H) x [tw * BLOCK_W, +BLOCK_W)
        # of image b, all channels.
        b, p, ph, pw, c, c_ok = _tile(h_blocks, w_blocks, C, BLOCK_H, BLOCK_W, BLOCK_C)
        x_base = x_ptr + b * sxb + c.to(tl.int64)[None, :] * sxc
        acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)
        # a loop over the K x K taps, not unrolled: unrolled (tl.static_range) the compiler hoisted
        # the 49 tile loads and spilled ~31 KB a thread at sm_90
        for tap in range(K * K):
            hh = ph + (tap // K - K // 2)
            ww = pw + (tap % K - K // 2)
            ok = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            v = tl.load(x_base + (hh.to(tl.int64) * sxh + ww.to(tl.int64) * sxw)[:, None],
                        mask=ok[:, None] & c_ok[None, :], other=0.0)
            # the tap's weights as a (pixels, channels) load of stride 0 along the pixels, from the
            # tap-major (K * K, C) copy: contiguous along the channels like the tile's load, so both
            # take one layout. From the (C, K * K) weight (stride K * K along the channels) Triton
            # 3.6 (the GPU image's) gave the weights another layout and converted the whole tile
            # through shared memory every tap (Triton 3.7 did not); a (channels,) load was converted
            # every tap on both
            wt = tl.load(cwt_ptr + (tap * C + c)[None, :] + 0 * p[:, None], mask=c_ok[None, :], other=0.0)
            acc += v.to(tl.float32) * wt.to(tl.float32)
        _norm_store(acc, cb_ptr, nw_ptr, nb_ptr, y_ptr, b, ph, pw, c, c_ok, C, H, W, eps, BF16_BY_HAND)

    @triton.jit
    def _dwconv_norm_cf_kernel(
        x_ptr, cw_ptr, cb_ptr, nw_ptr, nb_ptr, y_ptr,
        C, H, W, h_blocks, w_blocks, sxb, sxh, sxw, eps,
        SXC: tl.constexpr, K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
        BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr, BF16_BY_HAND: tl.constexpr,
    ):
        # The same computation for a channels-first (NCHW) input, on a (channels, pixels) tile whose
        # layout the tap loads keep: no shared memory and no barrier in the tap loop (the (pixels,
        # channels) tile converted each tap's weights through shared memory, two barriers a tap).
        # The channel stride is a constant (SXC) and, with EVEN_C (C == BLOCK_C), the channels need
        # no mask: a thread's loads are one pixel offset plus immediate channel offsets. Offsets
        # within an image are int32 (the launcher checks the image's extent).
        b, p, ph, pw, c, c_ok = _tile(h_blocks, w_blocks, C, BLOCK_H, BLOCK_W, BLOCK_C)
        x_img = x_ptr + b * sxb
        acc = tl.zeros((BLOCK_C, BLOCK_H * BLOCK_W), dtype=tl.float32)
        for tap in range(K * K):
            hh = ph + (tap // K - K // 2)
            ww = pw + (tap % K - K // 2)
            ok = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            offs = c[:, None] * SXC + (hh * sxh + ww * sxw)[None, :]
            # the tap's weights as a (channels, pixels) load of stride 0 along the pixels: it takes
            # the tile's layout (a thread loads its own channels' weights; a warp's lanes share an
            # address), where a (channels,) load is converted through shared memory every tap
            w_offs = (c * (K * K) + tap)[:, None] + 0 * p[None, :]
            if EVEN_C:
                v = tl.load(x_img + offs, mask=ok[None, :], other=0.0)
                wt = tl.load(cw_ptr + w_offs)
            else:
                v = tl.load(x_img + offs, mask=c_ok[:, None] & ok[None, :], other=0.0)
                wt = tl.load(cw_ptr + w_offs, mask=c_ok[:, None], other=0.0)
            acc += v.to(tl.float32) * wt.to(tl.float32)
        _norm_store(tl.trans(acc), cb_ptr, nw_ptr, nb_ptr, y_ptr, b, ph, pw, c, c_ok, C, H, W, eps, BF16_BY_HAND)

    _INTERPRETED = interpreted(_dwconv_norm_kernel)  # (then the kernel rounds bf16 itself: see interpreted)


def _int32_extent(x: Tensor) -> bool:
    """Whether every element offset within one image of x (channels, rows, columns; strides >= 0)
    fits int32, as the channels-first kernel computes them."""
    _, C, H, W = x.shape
    return (C - 1) * x.stride(1) + (H - 1) * x.stride(2) + (W - 1) * x.stride(3) < 2 ** 31


def _dwconv_norm_triton(
    x: Tensor, conv_weight: Tensor, conv_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float,
    out: Optional[Tensor] = None, block_h: Optional[int] = None, block_w: Optional[int] = None,
    num_warps: Optional[int] = None, channels_first_tile: bool = True,
) -> Tensor:
    """Launcher. ``out``: a preallocated contiguous (B, H, W, C) tensor of x's dtype (every element is
    written). ``block_h`` / ``block_w``: powers of two, the pixel tile; None: the default tile of x's
    layout (``DEFAULT_TILE_CHANNELS_LAST`` when its channels are contiguous, else ``DEFAULT_TILE_NCHW``)."""
    require_triton("dwconv_norm")
    k = _check_inputs(x, conv_weight, conv_bias, norm_weight, norm_bias)
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32/bfloat16/float16, got {x.dtype}")
    B, C, H, W = x.shape
    if C > _MAX_CHANNELS:
        raise ValueError(f"the Triton kernel takes at most {_MAX_CHANNELS} channels, got {C}")
    tile = DEFAULT_TILE_CHANNELS_LAST if x.stride(1) == 1 else DEFAULT_TILE_NCHW
    block_h = tile[0] if block_h is None else block_h
    block_w = tile[1] if block_w is None else block_w
    num_warps = tile[2] if num_warps is None else num_warps
    check_power_of_two("block_h", block_h)
    check_power_of_two("block_w", block_w)
    out = output_buffer(out, (B, H, W, C), x.dtype, x.device)
    if out.numel() == 0:
        return out
    h_blocks, w_blocks = cdiv(H, block_h), cdiv(W, block_w)
    block_c = 1 << max(0, C - 1).bit_length()
    by_hand = _INTERPRETED and x.dtype == torch.bfloat16
    # (after x and the weights, which each kernel reads in its own layout)
    rest = (conv_bias.contiguous(), norm_weight.contiguous(), norm_bias.contiguous(), out, C, H, W, h_blocks, w_blocks)
    with device_guard(x.device):
        if x.stride(1) != 1 and channels_first_tile and _int32_extent(x):
            _dwconv_norm_cf_kernel[(B * h_blocks * w_blocks,)](
                x, conv_weight.contiguous(), *rest, x.stride(0), x.stride(2), x.stride(3), float(eps),
                SXC=x.stride(1), K=k, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c, EVEN_C=block_c == C,
                BF16_BY_HAND=by_hand, num_warps=num_warps,
            )
        else:
            # the tap-major weights (K * K, C) (see the kernel: 12.5 K elements at SAM 3's size)
            cwt = conv_weight.reshape(C, k * k).t().contiguous()
            _dwconv_norm_kernel[(B * h_blocks * w_blocks,)](
                x, cwt, *rest, x.stride(0), x.stride(1), x.stride(2), x.stride(3), float(eps),
                K=k, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c, BF16_BY_HAND=by_hand, num_warps=num_warps,
            )
    return out


@torch.library.custom_op("sam3fast::dwconv_norm", mutates_args=(), device_types="cuda")
def dwconv_norm_op(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                   eps: float) -> Tensor:
    """``sam3fast::dwconv_norm``: the Triton kernel on CUDA, ``dwconv_norm_ref`` on CPU."""
    return _dwconv_norm_triton(x, conv_weight, conv_bias, norm_weight, norm_bias, eps)


dwconv_norm_op.register_kernel("cpu")(dwconv_norm_ref)


@dwconv_norm_op.register_fake
def _dwconv_norm_fake(x, conv_weight, conv_bias, norm_weight, norm_bias, eps):
    B, C, H, W = x.shape
    return x.new_empty((B, H, W, C))


# ---- typed entry point (re-exported by sam3fast.ops) ------------------------------------------


def dwconv_norm_backend(x: Tensor) -> Tuple[str, str]:
    """("triton" | "reference", reason) for a (B, C, H, W) input of this device and dtype."""
    limit = f"{x.shape[1]} channels (the Triton kernel takes at most {_MAX_CHANNELS})"
    return triton_backend(x, env.FORCE_REFERENCE, limit if x.shape[1] > _MAX_CHANNELS else None)


def dwconv_norm(x: Tensor, conv_weight: Tensor, conv_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                eps: float) -> Tensor:
    """``LayerNorm_C(depthwise_conv(x))`` as (B, H, W, C) (see the module docstring): the Triton
    kernel on CUDA, the block's PyTorch operations elsewhere."""
    if dwconv_norm_backend(x)[0] == "triton":
        return torch.ops.sam3fast.dwconv_norm(x, conv_weight, conv_bias, norm_weight, norm_bias, float(eps))
    return dwconv_norm_ref(x, conv_weight, conv_bias, norm_weight, norm_bias, eps)
