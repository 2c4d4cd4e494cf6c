"""GroupNorm over large maps, optionally with the ReLU after it: split statistics, one apply pass.

Letters: B images, C channels in G groups of Cg = C / G, H x W the map (HW pixels).

group_norm(x, weight, bias, num_groups, eps, relu) -> y
    x             (B, C, H, W) float32 / bfloat16 / float16 (the reference also takes float64), any
                  strides
    weight, bias  (C,), any floating dtype (read in float32)
    over each (b, group): mean and biased variance of its Cg * HW values, in float32;
    scale[c] = rsqrt(var + eps) * weight[c]
    n = (x - mean) * scale + bias[c] in float32, rounded once to x's dtype; with ``relu`` max(n, 0) (ReLU
                  commutes with the rounding: what ``F.relu(group_norm(x))`` gives)
    (B, C, H, W) contiguous, x's dtype

Where: the image model's pixel decoder runs ``relu(GroupNorm(8, 256)(conv(...)))`` on (1, 256, 144,
144) and (1, 256, 288, 288) maps, per image and per video frame. PyTorch's CUDA group norm reduces
a (batch, group) row per block: 8 blocks for 2.65 M values each. ``group_norm_fast`` (the module's
path off this kernel) splits the statistics over PyTorch's general reduction, but materialises a
float32 copy of the map for them and writes the affine in float32 before rounding: on an H200
(2026-11-27, bench/results/norms_nvidia-h200_2026-11-27.md, bf16) 0.19 and 0.26 ms, where
torch.compile's fused form took 0.15 and 0.16 ms; then the ReLU reads and writes the map again.
Here: a statistics kernel, (B * G * S) programs, each reducing a slice of one group's pixels (all
its Cg channels) to (count, mean, M2), tile by tile with Chan's pairwise update (no E[x^2] - E[x]^2
cancellation); then an apply kernel, one program per (b, group, pixel block), that combines the S
partials of its group, normalises its tile, applies the ReLU and writes once. Traffic: the map read
twice and written once, in x's dtype.

Numerics against ``group_norm_fast`` (then ``F.relu``): float32 statistics either way (PyTorch's
Welford reduction against this pairwise one, here of x less the group's first value, so a mean far
from zero costs no digits), the affine in float32 as (x - mean) * scale + bias (PyTorch's
x * scale + shift cancels two large terms there), one rounding; float32 rounding differences only,
smaller than PyTorch's where the mean dwarfs the spread. Under the Triton interpreter (the CPU tests) float32 -> bf16 casts truncate
(Triton 3.7), so there the kernel rounds bf16 by hand.
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
    KERNEL_DTYPES, HAS_TRITON, TRITON_IMPORT_ERROR, cdiv, check_power_of_two, device_guard, interpreted,
    output_buffer, require_triton, tl, triton, triton_backend,
)
from .layer_norm2d import _check_inputs as _check_map_affine
from .layer_norm2d import default_block_p

# Groups of fewer values than this go to F.group_norm in group_norm_fast (one block per row is
# enough there); the op has no such limit.
GROUP_NORM_FAST_MIN_NUMEL = 65536
_MAX_GROUP_CHANNELS = 256  # a tile holds BLOCK_P pixels x all of a group's channels
# BLOCK_P: layer_norm2d's default_block_p of a group's channel count (~4096 values a tile)
DEFAULT_PROGRAMS = 512  # statistics programs to aim for (B * G * S): ~4 per SM on an H100
_MAX_SPLITS = 128
DEFAULT_NUM_WARPS = 4


def group_norm_fast(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float, min_group_numel: int = GROUP_NORM_FAST_MIN_NUMEL) -> Tensor:
    """``F.group_norm`` of (B, C, *) with the statistics computed by PyTorch's general reduction
    (``FastGroupNorm``'s path off the kernel, re-exported by ``sam3fast.model.common``).

    PyTorch's CUDA group norm reduces each (batch, group) row in one block (RowwiseMomentsCUDAKernel):
    the segmentation head's GroupNorm(8, 256) on (1, 256, 288, 288) runs 8 blocks on 132 SMs, each
    reducing 2.65 M elements; its two calls took 2.4 ms of a ~22 ms image forward on an H100 (bf16).
    ``torch.var_mean`` over the last dim of x.view(B, G, -1) splits a long row over many blocks.
    Then, as PyTorch's own kernels do, per-(b, c) ``scale = rsqrt(var + eps) * weight`` and
    ``shift = bias - mean * scale`` and one elementwise ``x * scale + shift`` in float32 (float64 for
    float64 input), rounded once to x's dtype. Groups of fewer than ``min_group_numel`` elements
    (where one block per row is enough) go to ``F.group_norm``.
    """
    B, C = x.shape[:2]
    if C // num_groups * math.prod(x.shape[2:]) < min_group_numel:
        return F.group_norm(x, num_groups, weight, bias, eps)
    acc = torch.promote_types(x.dtype, torch.float32)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        # channels-last (the pixel decoder's maps): reduce the (B, HW, G, C / G) view over pixels and
        # the group's channels, where reshape(B, G, -1) would copy the map first
        rows = x.permute(0, 2, 3, 1).reshape(B, -1, num_groups, C // num_groups)
        var, mean = torch.var_mean(rows.to(acc), dim=(1, 3), correction=0)
        var, mean = var[..., None], mean[..., None]
    else:
        var, mean = torch.var_mean(x.reshape(B, num_groups, -1).to(acc), dim=-1, keepdim=True, correction=0)
    scale = torch.rsqrt(var + eps).expand(B, num_groups, C // num_groups)  # (B, G, C / G)
    if weight is not None:
        scale = scale * weight.to(acc).view(1, num_groups, -1)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(acc).view(1, num_groups, -1)
    per_channel = (B, C) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.reshape(per_channel), x, scale.reshape(per_channel)).to(x.dtype)


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int) -> None:
    _check_map_affine(x, weight, bias)  # (B, C, H, W) floating, (C,) weight and bias on x's device
    C = x.shape[1]
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"num_groups must divide the {C} channels, got {num_groups}")


def group_norm_ref(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float,
                   relu: bool = False) -> Tensor:
    """The spec (and the op's CPU kernel): :func:`group_norm_fast`, then ``F.relu`` if ``relu``;
    (B, C, H, W) contiguous."""
    _check_inputs(x, weight, bias, num_groups)
    y = group_norm_fast(x, num_groups, weight, bias, eps)
    y = F.relu(y) if relu else y
    return y.contiguous()


if HAS_TRITON:
    from .rope import _bf16_rtne

    @triton.jit
    def _tile(x_ptr, b, g, t, Cg, W, HW, sxb, sxc, sxh, sxw, BLOCK_P: tl.constexpr, BLOCK_CG: tl.constexpr):
        # pixels [t * BLOCK_P, +BLOCK_P) of image b, the Cg channels of group g: (values float32, mask,
        # pixel indices, channel indices)
        p = t * BLOCK_P + tl.arange(0, BLOCK_P)
        c = g * Cg + tl.arange(0, BLOCK_CG)
        m = (p < HW)[:, None] & (tl.arange(0, BLOCK_CG) < Cg)[None, :]
        ph = (p // W).to(tl.int64)
        pw = (p % W).to(tl.int64)
        src = x_ptr + b * sxb + (ph * sxh + pw * sxw)[:, None] + c.to(tl.int64)[None, :] * sxc
        return tl.load(src, mask=m, other=0.0).to(tl.float32), m, p, c

    @triton.jit
    def _group_stats_kernel(
        x_ptr, part_ptr,
        G, Cg, W, HW, S, tiles_per_split, sxb, sxc, sxh, sxw,
        BLOCK_P: tl.constexpr, BLOCK_CG: tl.constexpr,
    ):
        # Grid (B * G * S,): split s of group (b, g) covers pixel tiles [s * tiles_per_split, +tiles_per_split)
        # and writes (count, mean, M2) of its values to part[(b * G + g) * S + s].
        pid = tl.program_id(0)
        bg = pid // S
        s = pid % S
        b = (bg // G).to(tl.int64)
        g = bg % G
        # statistics of x - k0 (k0: the group's first value, the same for every split): sums of
        # values near zero, where a mean far from zero would cost digits
        k0 = tl.load(x_ptr + b * sxb + (g * Cg).to(tl.int64) * sxc).to(tl.float32)
        n = 0.0
        mean = 0.0
        m2 = 0.0
        for i in range(0, tiles_per_split):
            v, m, _, _ = _tile(x_ptr, b, g, s * tiles_per_split + i, Cg, W, HW, sxb, sxc, sxh, sxw, BLOCK_P,
                               BLOCK_CG)
            v = tl.where(m, v - k0, 0.0)
            nb = tl.sum(m.to(tl.float32))
            mean_b = tl.sum(v) / tl.maximum(nb, 1.0)
            d = tl.where(m, v - mean_b, 0.0)
            m2_b = tl.sum(d * d)
            # Chan et al.'s pairwise update of (n, mean, M2) by the tile's (nb, mean_b, m2_b)
            tot = n + nb
            delta = mean_b - mean
            frac = nb / tl.maximum(tot, 1.0)
            mean = mean + delta * frac
            m2 = m2 + m2_b + delta * delta * n * frac
            n = tot
        out = part_ptr + pid.to(tl.int64) * 3
        tl.store(out, n)
        tl.store(out + 1, mean)
        tl.store(out + 2, m2)

    @triton.jit
    def _group_apply_kernel(
        x_ptr, part_ptr, w_ptr, b_ptr, y_ptr,
        G, C, Cg, W, HW, S, p_blocks, sxb, sxc, sxh, sxw, eps,
        RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr,
        BF16_BY_HAND: tl.constexpr,
    ):
        # Grid (B * G * p_blocks,): pixel tile t of group (b, g). The S partials of the group are
        # combined here (a few hundred bytes, cached), then the tile is normalised and written.
        pid = tl.program_id(0)
        bg = pid // p_blocks
        t = pid % p_blocks
        b = (bg // G).to(tl.int64)
        g = bg % G
        k = tl.arange(0, BLOCK_S)
        ok = k < S
        src = part_ptr + (bg.to(tl.int64) * S + k) * 3
        n_i = tl.load(src, mask=ok, other=0.0)
        mean_i = tl.load(src + 1, mask=ok, other=0.0)
        m2_i = tl.load(src + 2, mask=ok, other=0.0)
        n = tl.sum(n_i)
        mean = tl.sum(n_i * mean_i) / n  # of x - k0
        d = mean_i - mean
        var = (tl.sum(m2_i) + tl.sum(n_i * d * d)) / n
        rstd = 1.0 / tl.sqrt(var + eps)
        k0 = tl.load(x_ptr + b * sxb + (g * Cg).to(tl.int64) * sxc).to(tl.float32)
        v, m, p, c = _tile(x_ptr, b, g, t, Cg, W, HW, sxb, sxc, sxh, sxw, BLOCK_P, BLOCK_CG)
        c_ok = tl.arange(0, BLOCK_CG) < Cg
        scale = rstd * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        # (x - mean) * scale + bias: the deviation first (PyTorch's x * scale + shift cancels two
        # large terms when the mean is far from zero)
        y = ((v - k0) - mean) * scale[None, :] + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if RELU:
            y = tl.maximum(y, 0.0)
        if BF16_BY_HAND:
            y = _bf16_rtne(y)
        dst = y_ptr + b * C * HW + c.to(tl.int64)[None, :] * HW + p.to(tl.int64)[:, None]
        tl.store(dst, y.to(y_ptr.dtype.element_ty), mask=m)

    _INTERPRETED = interpreted(_group_apply_kernel)  # (then the kernel rounds bf16 itself: see interpreted)


def _group_norm_triton(
    x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float, relu: bool = False,
    out: Optional[Tensor] = None, block_p: Optional[int] = None, splits: Optional[int] = None,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> Tensor:
    """Launcher. ``out``: a preallocated contiguous (B, C, H, W) tensor of x's dtype (every element is
    written). ``block_p``: a power of two, the pixels of a tile (None: layer_norm2d's
    ``default_block_p(Cg)``);
    ``splits``: statistics programs per group, 1 to 128 (None: about DEFAULT_PROGRAMS in all, fewer
    where a group has fewer tiles)."""
    require_triton("group_norm")
    _check_inputs(x, weight, bias, num_groups)
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32/bfloat16/float16, got {x.dtype}")
    B, C, H, W = x.shape
    Cg = C // num_groups
    if Cg > _MAX_GROUP_CHANNELS:
        raise ValueError(f"the Triton kernel takes at most {_MAX_GROUP_CHANNELS} channels a group, got {Cg}")
    block_p = default_block_p(Cg) if block_p is None else block_p
    check_power_of_two("block_p", block_p)
    out = output_buffer(out, (B, C, H, W), x.dtype, x.device)
    HW = H * W
    if out.numel() == 0:
        return out
    tiles = cdiv(HW, block_p)
    if splits is None:
        splits = max(1, min(_MAX_SPLITS, DEFAULT_PROGRAMS // (B * num_groups)))
    if not 1 <= splits <= _MAX_SPLITS:
        raise ValueError(f"splits must be 1 to {_MAX_SPLITS}, got {splits}")
    per = cdiv(tiles, min(splits, tiles))  # tiles a split
    S = cdiv(tiles, per)  # (no empty split)
    part = torch.empty(B * num_groups * S * 3, dtype=torch.float32, device=x.device)
    strides = (x.stride(0), x.stride(1), x.stride(2), x.stride(3))
    block_cg = 1 << max(0, Cg - 1).bit_length()
    with device_guard(x.device):
        _group_stats_kernel[(B * num_groups * S,)](
            x, part, num_groups, Cg, W, HW, S, per, *strides,
            BLOCK_P=block_p, BLOCK_CG=block_cg, num_warps=num_warps,
        )
        _group_apply_kernel[(B * num_groups * tiles,)](
            x, part, weight.contiguous(), bias.contiguous(), out,
            num_groups, C, Cg, W, HW, S, tiles, *strides, float(eps),
            RELU=bool(relu), BLOCK_P=block_p, BLOCK_CG=block_cg, BLOCK_S=max(2, 1 << (S - 1).bit_length()),
            BF16_BY_HAND=_INTERPRETED and x.dtype == torch.bfloat16, num_warps=num_warps,
        )
    return out


@torch.library.custom_op("sam3fast::group_norm", mutates_args=(), device_types="cuda")
def group_norm_op(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float, relu: bool) -> Tensor:
    """``sam3fast::group_norm``: the Triton kernels on CUDA, ``group_norm_ref`` on CPU."""
    return _group_norm_triton(x, weight, bias, num_groups, eps, relu)


group_norm_op.register_kernel("cpu")(group_norm_ref)


@group_norm_op.register_fake
def _group_norm_fake(x, weight, bias, num_groups, eps, relu):
    return torch.empty(tuple(x.shape), dtype=x.dtype, device=x.device)


# ---- typed entry point (re-exported by sam3fast.ops) ------------------------------------------


def group_norm_backend(x: Tensor, num_groups: int) -> Tuple[str, str]:
    """("triton" | "reference", reason) for a (B, C, H, W) input of this device and dtype."""
    Cg = x.shape[1] // max(1, num_groups)
    limit = f"{Cg} channels a group (the Triton kernel takes at most {_MAX_GROUP_CHANNELS})"
    return triton_backend(x, env.FORCE_REFERENCE, limit if Cg > _MAX_GROUP_CHANNELS else None)


def group_norm(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float, relu: bool = False) -> Tensor:
    """GroupNorm of (B, C, H, W), then the ReLU if ``relu`` (see the module docstring): the Triton
    kernels on CUDA, ``group_norm_ref`` elsewhere."""
    if group_norm_backend(x, num_groups)[0] == "triton":
        return torch.ops.sam3fast.group_norm(x, weight, bias, int(num_groups), float(eps), bool(relu))
    return group_norm_ref(x, weight, bias, num_groups, eps, relu)
