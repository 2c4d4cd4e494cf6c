"""The memory encoder's mask input in one pass: low-resolution mask logits -> the mask downsampler's
(I, I) input, never writing the (R, R) logits nor any float32 (R, R) / (I, I) intermediate.

Letters: P planes (B objects x C channels; C = 1 in the tracker), (h, w) the low-resolution logit
grid (r x r = 288 x 288 in SAM 3), (Hh, Wh) the high-resolution grid (R x R = 1008 x 1008, the
SAM heads' ``high_res_masks``), (Ho, Wo) the downsampler's size (I x I = 1152 x 1152,
``mem_interpol_size``).

What the tracker does today for a mask the SAM heads predicted (``sam_heads_forward``, then
``Sam3TrackerPredictor._encode_new_memory`` -> ``sam3fast.model.memory.encode_new_memory`` ->
``MaskDownSampler.forward``), each step a full-size tensor:
    z = F.interpolate(low.float(), (Hh, Wh), bilinear, align_corners=False)      (P, Hh, Wh) float32
    z = z.to(dtype)                                                               model dtype
    m = sigmoid(z)  or  (z > 0).to(dtype) with ``binarize`` (is_mask_from_pts)    dtype
    m = m * scale + bias                      (scale 20, bias -10)                 dtype
    m = F.interpolate(m.float(), (Ho, Wo), bilinear, align_corners=False, antialias=True).to(dtype)
        only if (Ho, Wo) != (Hh, Wh)                                              (P, Ho, Wo)
``mask_for_memory_ref`` is exactly this composition (out_dtype = the model dtype); it is the spec
and the op's CPU kernel.

Inputs
    low_res    (B, C, h, w) float32 / bfloat16 / float16 logits (the reference also takes float64)
    high_size  (Hh, Wh) >= 1: the first (plain bilinear) stage's size; any ratio
    out_size   (Ho, Wo) with Ho >= Hh and Wo >= Wh: the second stage upsamples (see below)
    scale, bias, binarize, out_dtype  as above (out_dtype float32 / bfloat16 / float16 for the kernel)
Output (B, C, Ho, Wo) contiguous, out_dtype.

Math of the kernel, per plane and output pixel (y, x), in float32, one rounding at the end. One
bilinear stage (F.interpolate with an explicit size, align_corners=False) from n_in to n_out samples:
    s = max((n_in / n_out) * (i + 0.5) - 0.5, 0),  i0 = floor(s),  i1 = i0 + (i0 < n_in - 1),
    l1 = s - i0,  l0 = 1 - l1                                  (the same along the other axis)
    v(i, j) = l0_i (k0_j u[i0, j0] + k1_j u[i0, j1]) + l1_i (k0_j u[i1, j0] + k1_j u[i1, j1])
Stage 1 (h, w) -> (Hh, Wh) on the low-res logits gives z; f(z) = scale * sigmoid(z) + bias (or
scale * [z > 0] + bias); stage 2 (Hh, Wh) -> (Ho, Wo) on f(z) gives the output. Each output pixel
reads the 2 x 2 high-resolution pixels stage 2 needs and recomputes each from its 2 x 2 low-res
logits (16 cached gathers, 4 sigmoids per output pixel): nothing between the two stages is stored.
With (Ho, Wo) == (Hh, Wh) stage 2 is the identity exactly (s = i, l1 = 0), as the downsampler skips
its resize. The kernel is more accurate than the model in bf16: the model rounds z, sigmoid(z),
m * scale and m + bias to bf16 before stage 2; the kernel rounds once.

Antialiased bilinear upsampling is plain bilinear (the second stage). F.interpolate(antialias=True)
with n_out >= n_in uses support 1 and the triangle filter on the unscaled source axis: with
center = (n_in / n_out)(i + 0.5), the source samples j in [trunc(center - 0.5), min(trunc(center +
1.5), n_in)) get weights max(0, 1 - |j + 0.5 - center|) / (their sum). With s = center - 0.5 >= -0.5
that window is {floor(s), floor(s) + 1} with weights 1 - (s - floor(s)) and s - floor(s), i.e.
(l0, l1) with sum 1: plain bilinear. Borders: s < 0 (first half pixel) keeps only sample 0
(weight 1 + s, normalised to 1), which is plain bilinear's clamp to s = 0; s > n_in - 1 (last half
pixel) keeps only sample n_in - 1, plain bilinear's i1 = i0. An axis with n_out == n_in is the
identity in both. Only the rounding differs (the antialiased weights are normalised by their
float sum): in float64 the two agree to ~1e-15 |u|max at every size tested (1008 -> 1152 included),
in float32 (PyTorch's CPU kernels) to within 8 ulps of |u|max (measured; the GPU's not measured
here). Downsampling (n_out < n_in) widens the antialiased filter: the op refuses it.

Schedule. A 1-D grid of P * cdiv(Ho, BLOCK_H) * cdiv(Wo, BLOCK_W) programs, plane-major, column
tiles fastest (neighbouring programs share low-res rows in L2); a program owns a BLOCK_H x BLOCK_W
output tile of one plane. Source indices and weights of both stages depend on the row or the
column only and are computed once per tile as vectors.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sam3fast import env

# triton is optional (the "gpu" extra): without it the reference and the CPU op still work.
from ._triton_compat import (  # noqa: F401  (TRITON_IMPORT_ERROR: read by the tests)
    HAS_TRITON, TRITON_IMPORT_ERROR, cdiv, check_power_of_two, device_guard, require_triton, tl, triton,
    why_not_triton,
    output_buffer,
)

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (BLOCK_H, BLOCK_W, num_warps): 128 columns = 256 contiguous bytes of a bf16 output row per store.
# Not yet timed on a GPU: bench/bench_mask_for_memory.py sweeps the alternatives.
DEFAULT_TILE = (8, 128, 4)


def _size2(name: str, size: Sequence[int]) -> Tuple[int, int]:
    if len(size) != 2:
        raise ValueError(f"{name} must be (H, W), got {tuple(size)}")
    return int(size[0]), int(size[1])


def _check_inputs(low_res: Tensor, high_size: Sequence[int], out_size: Sequence[int], out_dtype: torch.dtype) -> None:
    if low_res.dim() != 4 or not low_res.is_floating_point():
        raise ValueError(f"low_res must be a floating (B, C, h, w) tensor, got {low_res.dtype} {tuple(low_res.shape)}")
    if low_res.shape[2] < 1 or low_res.shape[3] < 1:
        raise ValueError(f"low_res must have a non-empty grid, got {tuple(low_res.shape)}")
    Hh, Wh = _size2("high_size", high_size)
    Ho, Wo = _size2("out_size", out_size)
    if Hh < 1 or Wh < 1:
        raise ValueError(f"high_size must be >= 1, got ({Hh}, {Wh})")
    if Ho < Hh or Wo < Wh:
        raise ValueError(
            f"out_size ({Ho}, {Wo}) must be >= high_size ({Hh}, {Wh}) in both dims: the antialiased second "
            "stage equals plain bilinear only when it upsamples"
        )
    if Ho * Wo >= 2**31 or low_res.shape[2] * low_res.shape[3] >= 2**31:
        raise ValueError("planes must have < 2**31 elements")
    if not out_dtype.is_floating_point:
        raise ValueError(f"out_dtype must be a floating dtype, got {out_dtype}")


def mask_for_memory_ref(
    low_res: Tensor,
    high_size: Sequence[int],
    out_size: Sequence[int],
    scale: float,
    bias: float,
    binarize: bool,
    out_dtype: torch.dtype,
) -> Tensor:
    """The spec (and the op's CPU kernel): the model's composition, step by step, with its roundings
    to ``out_dtype`` (the model dtype). (B, C, Ho, Wo) contiguous in ``out_dtype``."""
    _check_inputs(low_res, high_size, out_size, out_dtype)
    Hh, Wh = _size2("high_size", high_size)
    Ho, Wo = _size2("out_size", out_size)
    B, C = low_res.shape[:2]
    if B * C == 0:  # F.interpolate refuses an empty batch
        return low_res.new_empty((B, C, Ho, Wo), dtype=out_dtype)
    # sam_heads_forward: float32 logits upsampled in float32; _encode_new_memory: cast to the model dtype.
    z = F.interpolate(low_res.to(torch.promote_types(low_res.dtype, torch.float32)), size=(Hh, Wh),
                      mode="bilinear", align_corners=False).to(out_dtype)
    # encode_new_memory
    m = (z > 0).to(out_dtype) if binarize else torch.sigmoid(z)
    m = m * scale + bias
    # MaskDownSampler.forward: resized in float32 (float64 stays float64 here), cast back.
    if (Ho, Wo) != (Hh, Wh):
        m = F.interpolate(m.to(torch.promote_types(out_dtype, torch.float32)), size=(Ho, Wo), mode="bilinear",
                          align_corners=False, antialias=True).to(out_dtype)
    return m.contiguous()


if HAS_TRITON:

    @triton.jit
    def _source_index(offs, scale, n_in):
        # PyTorch's area_pixel_compute_source_index (align_corners=False) and upsample_bilinear2d
        # neighbours. The clamp of i0 only matters for lanes past the output edge (never stored):
        # it keeps their gathers in bounds.
        s = tl.maximum(scale * (offs.to(tl.float32) + 0.5) - 0.5, 0.0)
        i0 = tl.minimum(s.to(tl.int32), n_in - 1)
        i1 = tl.where(i0 < n_in - 1, i0 + 1, i0)
        l1 = s - i0.to(tl.float32)
        return i0, i1, 1.0 - l1, l1

    @triton.jit
    def _high_res_value(base, w, r0, r1, wr0, wr1, c0, c1, wc0, wc1, scale, bias, BINARIZE: tl.constexpr):
        # One stage-1 pixel per lane (rows r*, columns c* broadcast to the tile), PyTorch's CUDA
        # order of operations, then the sigmoid (or threshold) and the affine, all in float32.
        v00 = tl.load(base + (r0 * w)[:, None] + c0[None, :]).to(tl.float32)
        v01 = tl.load(base + (r0 * w)[:, None] + c1[None, :]).to(tl.float32)
        v10 = tl.load(base + (r1 * w)[:, None] + c0[None, :]).to(tl.float32)
        v11 = tl.load(base + (r1 * w)[:, None] + c1[None, :]).to(tl.float32)
        z = wr0[:, None] * (wc0[None, :] * v00 + wc1[None, :] * v01) + wr1[:, None] * (
            wc0[None, :] * v10 + wc1[None, :] * v11)
        if BINARIZE:
            f = tl.where(z > 0.0, 1.0, 0.0)
        else:
            f = tl.sigmoid(z)
        return f * scale + bias

    @triton.jit
    def _mask_for_memory_kernel(
        low_ptr, out_ptr,
        h, w, Hh, Wh, Ho, Wo, tiles_h, tiles_w,
        scale1_h, scale1_w, scale2_h, scale2_w, scale, bias,
        BINARIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        # 1-D grid, plane-major then row tiles then column tiles: BLOCK_H x BLOCK_W outputs of one plane.
        pid = tl.program_id(0)
        tx = pid % tiles_w
        ty = (pid // tiles_w) % tiles_h
        p = (pid // (tiles_w * tiles_h)).to(tl.int64)
        offs_y = ty * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_x = tx * BLOCK_W + tl.arange(0, BLOCK_W)

        # Stage 2 (high-res rows/columns each output needs), then stage 1 for each of those.
        ya, yb, ly0, ly1 = _source_index(offs_y, scale2_h, Hh)
        xa, xb, lx0, lx1 = _source_index(offs_x, scale2_w, Wh)
        ra0, ra1, wra0, wra1 = _source_index(ya, scale1_h, h)
        rb0, rb1, wrb0, wrb1 = _source_index(yb, scale1_h, h)
        ca0, ca1, wca0, wca1 = _source_index(xa, scale1_w, w)
        cb0, cb1, wcb0, wcb1 = _source_index(xb, scale1_w, w)

        base = low_ptr + p * h * w
        m00 = _high_res_value(base, w, ra0, ra1, wra0, wra1, ca0, ca1, wca0, wca1, scale, bias, BINARIZE)
        m01 = _high_res_value(base, w, ra0, ra1, wra0, wra1, cb0, cb1, wcb0, wcb1, scale, bias, BINARIZE)
        m10 = _high_res_value(base, w, rb0, rb1, wrb0, wrb1, ca0, ca1, wca0, wca1, scale, bias, BINARIZE)
        m11 = _high_res_value(base, w, rb0, rb1, wrb0, wrb1, cb0, cb1, wcb0, wcb1, scale, bias, BINARIZE)
        out = ly0[:, None] * (lx0[None, :] * m00 + lx1[None, :] * m01) + ly1[:, None] * (
            lx0[None, :] * m10 + lx1[None, :] * m11)

        mask = (offs_y < Ho)[:, None] & (offs_x < Wo)[None, :]
        dst = out_ptr + p * Ho * Wo + offs_y[:, None] * Wo + offs_x[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)


def _mask_for_memory_triton(
    low_res: Tensor,
    high_size: Sequence[int],
    out_size: Sequence[int],
    scale: float,
    bias: float,
    binarize: bool,
    out_dtype: torch.dtype,
    out: Optional[Tensor] = None,
    block_h: int = DEFAULT_TILE[0],
    block_w: int = DEFAULT_TILE[1],
    num_warps: int = DEFAULT_TILE[2],
) -> Tensor:
    """Launcher. ``out`` may be a preallocated contiguous (B, C, Ho, Wo) tensor of ``out_dtype``
    (every element is written). Tile = ``block_h`` x ``block_w`` outputs (powers of two)."""
    require_triton("mask_for_memory")
    _check_inputs(low_res, high_size, out_size, out_dtype)
    if low_res.dtype not in _KERNEL_DTYPES or out_dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes and gives float32/bfloat16/float16, got {low_res.dtype} -> "
                         f"{out_dtype}")
    check_power_of_two("block_h", block_h)
    check_power_of_two("block_w", block_w)
    Hh, Wh = _size2("high_size", high_size)
    Ho, Wo = _size2("out_size", out_size)
    B, C, h, w = low_res.shape
    dev = low_res.device
    out = output_buffer(out, (B, C, Ho, Wo), out_dtype, dev)
    P = B * C
    if P == 0:
        return out
    low_res = low_res.contiguous()
    tiles_h, tiles_w = cdiv(Ho, block_h), cdiv(Wo, block_w)
    # Host divisions of two ints rounded to float32 equal PyTorch's float32 n_in / n_out (double
    # rounding of a quotient through float64 is innocuous).
    with device_guard(dev):
        _mask_for_memory_kernel[(P * tiles_h * tiles_w,)](
            low_res, out,
            h, w, Hh, Wh, Ho, Wo, tiles_h, tiles_w,
            h / Hh, w / Wh, Hh / Ho, Wh / Wo, float(scale), float(bias),
            BINARIZE=bool(binarize), BLOCK_H=block_h, BLOCK_W=block_w,
            num_warps=num_warps,
        )
    return out


@torch.library.custom_op("sam3fast::mask_for_memory", mutates_args=(), device_types="cuda")
def mask_for_memory_op(
    low_res: Tensor,
    high_size: Sequence[int],
    out_size: Sequence[int],
    scale: float,
    bias: float,
    binarize: bool,
    out_dtype: torch.dtype,
) -> Tensor:
    """``sam3fast::mask_for_memory``: the Triton kernel on CUDA, ``mask_for_memory_ref`` on CPU."""
    return _mask_for_memory_triton(low_res, high_size, out_size, scale, bias, binarize, out_dtype)


mask_for_memory_op.register_kernel("cpu")(mask_for_memory_ref)


@mask_for_memory_op.register_fake
def _mask_for_memory_fake(low_res, high_size, out_size, scale, bias, binarize, out_dtype):
    return low_res.new_empty((low_res.shape[0], low_res.shape[1], out_size[0], out_size[1]), dtype=out_dtype)


# ---- typed entry point -------------------------------------------------------------------------


def mask_for_memory_backend(low_res: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tuple[str, str]:
    """("triton" | "reference", reason) for logits of this device and dtype (``out_dtype`` None:
    the logits' dtype)."""
    why = why_not_triton(low_res.device, env.FORCE_REFERENCE)
    if why is not None:
        return "reference", why
    out_dtype = low_res.dtype if out_dtype is None else out_dtype
    if low_res.dtype not in _KERNEL_DTYPES or out_dtype not in _KERNEL_DTYPES:
        return "reference", f"{low_res.dtype} -> {out_dtype} (the Triton kernel takes float32/bfloat16/float16)"
    return "triton", "CUDA tensors, triton available"


def mask_for_memory(
    low_res: Tensor,
    high_size: Sequence[int],
    out_size: Sequence[int],
    *,
    scale: float = 20.0,
    bias: float = -10.0,
    binarize: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """The memory encoder's mask input from low-res logits: (B, C, h, w) -> (B, C, Ho, Wo) in
    ``out_dtype`` (None: the logits' dtype); the math is in ``sam3fast.kernels.mask_for_memory``."""
    out_dtype = low_res.dtype if out_dtype is None else out_dtype
    high_size = list(_size2("high_size", high_size))
    out_size = list(_size2("out_size", out_size))
    backend, _ = mask_for_memory_backend(low_res, out_dtype)
    if backend == "triton":
        return torch.ops.sam3fast.mask_for_memory(low_res, high_size, out_size, float(scale), float(bias),
                                                  bool(binarize), out_dtype)
    return mask_for_memory_ref(low_res, high_size, out_size, float(scale), float(bias), bool(binarize), out_dtype)
