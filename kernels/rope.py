"""2-D axial RoPE of the ViT trunk's attention in one pass: read q and k, rotate their channel pairs in
float32, write them rounded once to the input dtype.

Letters: B batch (windows x images in the window blocks), L tokens (the RoPE table rows: w * w =
576 in a window block, g * g = 5184 in a global block of SAM 3), R = prod(head dims) rows per token
(2 * nH = 32 for the ViT's q and k), hd head dim (64), J = hd / 2 channel pairs.

Inputs
    x     (B, L, *heads, hd)  float32 / bfloat16 / float16 (the reference also takes float64), hd even,
                              0 or more head dims; any strides with the last dim contiguous: the ViT
                              passes ``qkv[:, :, :2]`` of its (B, L, 3, nH, hd) projection, a
                              (B, L, 2, nH, hd) view whose head dims merge into one run of R rows of
                              stride hd (head dims that do not merge are copied first)
    rope  (L, J, 2)           float32 (cos, sin) pairs: ``torch.view_as_real(freqs_cis)`` of the
                              complex table of ``sam3fast.model.vit.compute_axial_cis`` (a view)
Output: x.shape contiguous, x's dtype.

Math, exactly ``sam3fast.model.vit.apply_rope`` (the official complex product in real form): for
token l, any head row and pair j, in float32 (float64 for float64 input), each product rounded,
then the sum rounded, then the result rounded once to x's dtype:
    out[..., 2j]   = x[..., 2j] cos[l, j] - x[..., 2j+1] sin[l, j]
    out[..., 2j+1] = x[..., 2j] sin[l, j] + x[..., 2j+1] cos[l, j]
The kernel is launched with ``enable_fp_fusion=False``: the compiler may not contract a product and
the sum into one FMA (which rounds once instead of twice), so every float32 operation is the one
PyTorch's eager kernels do and the kernel equals the reference bit for bit, in every dtype (not
"within an ulp"); it costs a few float32 instructions per pair in a memory-bound kernel. Compiled
for sm_90 the PTX has mul.rn / add.rn / sub.rn (explicit rounding: ptxas may not fuse them either)
and cvt.rn.bf16x2.f32. Under the Triton interpreter (the CPU tests) the float32 -> bf16 cast
truncates (Triton 3.7), so there, and only there, the kernel rounds to nearest even in integer
arithmetic (``BF16_BY_HAND``, PyTorch's conversion bit for bit). (float64 input: apply_rope would
round it through float32; the reference keeps float64, the house rule for the float64 spec, and the
model never runs in float64.)

Against the model: in ``sam3fast.model.vit.Attention.forward``
    apply_rope(qkv[:, :, :2], freqs_cis) == rope(qkv[:, :, :2], freqs_cis)     (bit for bit)
In eager PyTorch that chain is ~8 kernels (a float32 copy of q and k, unbind, 4 products, 2 sums,
stack, a cast back) moving ~0.6 GB per block at SAM 3 sizes in bf16; this op reads q, k (bf16) and
the table once and writes q, k once: 2 x 2 x B L nH hd bytes, ~42 MB per block.

Schedule. Grid (B * cdiv(L, BLOCK_L), cdiv(R, BLOCK_R)): a program owns BLOCK_L tokens of one batch
element and BLOCK_R of their head rows, a (BLOCK_L, BLOCK_R, BLOCK_D) tile (BLOCK_D = 2 BLOCK_J,
BLOCK_J the next power of two >= J, masked beyond hd) loaded and stored as 16-byte vectors along the
contiguous channels, split into even/odd channels in registers. The (cos, sin) pairs are gathered
in the tile's own layout (a broadcast over the head rows, L1 hits): compiled for sm_90 (Triton 3.7,
bf16, hd 64) the kernel then uses no shared memory and no barrier (the table loaded once per
program made the compiler move both float32 halves of the tile through 8 KB of shared memory with
11 barriers). The default tile (``choose_tile``) holds about ``TILE_ELEMS`` elements: at SAM 3
sizes 4 tokens x all 32 rows x 64 channels, 16 KB of bf16 in and out per program, 1296 programs per
block (9 windows x 576 tokens, or 5184 tokens). Not yet timed on a GPU: bench/bench_rope.py sweeps
BLOCK_L and the warps.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from sam3fast import env

# triton is optional (the "gpu" extra): without it the reference and the CPU op still work.
from ._triton_compat import (  # noqa: F401  (TRITON_IMPORT_ERROR: read by the tests)
    KERNEL_DTYPES, HAS_TRITON, TRITON_IMPORT_ERROR, cdiv, check_power_of_two, device_guard, interpreted,
    output_buffer, require_triton, tl, triton, triton_backend,
)

_KERNEL_DTYPES = KERNEL_DTYPES
# Elements of x per program at the default tile (16 KB of bf16 at 8192), and the cap on the head
# rows of one tile (so a wide hd still leaves room for several tokens).
TILE_ELEMS = 8192
_MAX_ROW_ELEMS = 4096
DEFAULT_NUM_WARPS = 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _check_inputs(x: Tensor, rope: Tensor) -> None:
    if x.dim() < 3 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (B, L, ..., hd) tensor, got {x.dtype} {tuple(x.shape)}")
    L, hd = x.shape[1], x.shape[-1]
    if hd % 2:
        raise ValueError(f"the head dim must be even (RoPE rotates channel pairs), got {hd}")
    if rope.dim() != 3 or rope.shape != (L, hd // 2, 2) or rope.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"rope must be a float32 (L={L}, {hd // 2}, 2) (cos, sin) table (torch.view_as_real of the complex "
            f"freqs_cis), got {rope.dtype} {tuple(rope.shape)}"
        )
    if rope.device != x.device:
        raise ValueError(f"x and rope must be on one device, got {x.device} and {rope.device}")


def rope_ref(x: Tensor, rope: Tensor) -> Tensor:
    """The spec (and the op's CPU kernel): x.shape contiguous in x's dtype. The same operations in
    the same order as ``sam3fast.model.vit.apply_rope`` (bit-identical to it for float32, bfloat16
    and float16); float64 input is rotated in float64."""
    _check_inputs(x, rope)
    L = x.shape[1]
    compute = torch.promote_types(x.dtype, torch.float32)
    cs = rope.to(compute).reshape((L,) + (1,) * (x.dim() - 3) + (x.shape[-1] // 2, 2))
    cos, sin = cs.unbind(-1)
    x0, x1 = x.to(compute).unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _bf16_rtne(y):
        # float32 -> bfloat16 rounded to nearest even in integer arithmetic, NaN -> 0x7FC0 (PyTorch's
        # c10::BFloat16 conversion, bit for bit).
        u = y.to(tl.uint32, bitcast=True)
        u = tl.where(y != y, 0x7FC00000, u + 0x7FFF + ((u >> 16) & 1))
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _rope_kernel(
        x_ptr, rope_ptr, out_ptr,
        L, R, l_blocks,
        sxb, sxl, sxr,
        HALF: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
        BF16_BY_HAND: tl.constexpr,
    ):
        # Grid (B * cdiv(L, BLOCK_L), cdiv(R, BLOCK_R)): BLOCK_L tokens of batch element b, BLOCK_R
        # head rows each, all channels; out is (B, L, R, 2 HALF) contiguous.
        BLOCK_D: tl.constexpr = 2 * BLOCK_J
        pid = tl.program_id(0)
        b = (pid // l_blocks).to(tl.int64)
        offs_l = (pid % l_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        l3 = offs_l.to(tl.int64)[:, None, None]
        r3 = offs_r[None, :, None]
        d3 = offs_d[None, None, :]
        # Rows of whole channels, so loads and stores are 16-byte vectors along the contiguous dim;
        # the channel mask is only there when hd is not a power of two.
        l_mask = l3 < L
        if BLOCK_J != HALF:
            l_mask = l_mask & (d3 < 2 * HALF)
        mask = l_mask & (r3 < R)

        x = tl.load(x_ptr + b * sxb + l3 * sxl + r3 * sxr + d3, mask=mask, other=0.0).to(tl.float32)
        xe, xo = tl.split(tl.reshape(x, (BLOCK_L, BLOCK_R, BLOCK_J, 2)))
        # The tokens' (cos, sin) rows gathered in the tile's own layout, broadcast over the head rows
        # (L1 hits after the first): loaded once as (BLOCK_L, 1, BLOCK_D) instead, the compiler
        # converted both float32 halves of the tile through shared memory to the table's layout.
        cs_ptr = tl.broadcast_to(rope_ptr + l3 * (2 * HALF) + d3, (BLOCK_L, BLOCK_R, BLOCK_D))
        cs = tl.load(cs_ptr, mask=mask, other=0.0)
        cos, sin = tl.split(tl.reshape(cs, (BLOCK_L, BLOCK_R, BLOCK_J, 2)))
        y = tl.reshape(tl.join(xe * cos - xo * sin, xe * sin + xo * cos), (BLOCK_L, BLOCK_R, BLOCK_D))
        if BF16_BY_HAND:
            y = _bf16_rtne(y)
        dst = out_ptr + ((b * L + l3) * R + r3) * (2 * HALF) + d3
        tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=mask)

    _INTERPRETED = interpreted(_rope_kernel)  # (then the kernel rounds bf16 itself: see interpreted)


def choose_tile(L: int, R: int, hd: int, tile_elems: int = TILE_ELEMS) -> Tuple[int, int]:
    """(BLOCK_L, BLOCK_R), powers of two: all R head rows (up to ``_MAX_ROW_ELEMS`` elements), then
    as many tokens as fit ``tile_elems``. SAM 3 (R 32, hd 64): (4, 32)."""
    row = 2 * _next_pow2(hd // 2)
    block_r = max(1, min(_next_pow2(R), _MAX_ROW_ELEMS // row))
    block_l = max(1, min(_next_pow2(L), tile_elems // (row * block_r)))
    return block_l, block_r


def _merged_head_stride(x: Tensor) -> Optional[int]:
    """The stride of x's head dims (2 .. -2) flattened into one dim of R rows, or None where they do
    not form one run (each dim's stride = the next one's stride x size; size-1 dims ignored)."""
    run = None
    expect = None
    for size, stride in reversed(list(zip(x.shape[2:-1], x.stride()[2:-1]))):
        if size == 1:
            continue
        if expect is not None and stride != expect:
            return None
        if run is None:
            run = stride
        expect = stride * size
    return x.shape[-1] if run is None else run


def _rope_triton(
    x: Tensor,
    rope: Tensor,
    out: Optional[Tensor] = None,
    block_l: Optional[int] = None,
    block_r: Optional[int] = None,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> Tensor:
    """Launcher. ``out`` may be a preallocated contiguous tensor of x's shape and dtype (every element
    is written). ``block_l``/``block_r`` (powers of two) override ``choose_tile``. x needs only a
    contiguous last dim and head dims that merge into one run of rows (else it is copied)."""
    require_triton("rope")
    _check_inputs(x, rope)
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32/bfloat16/float16, got {x.dtype}")
    if rope.dtype != torch.float32:
        raise ValueError(f"the Triton kernel takes a float32 rope table, got {rope.dtype}")
    B, L, hd = x.shape[0], x.shape[1], x.shape[-1]
    R = math.prod(x.shape[2:-1])
    auto_l, auto_r = choose_tile(L, R, hd)
    block_l = auto_l if block_l is None else block_l
    block_r = auto_r if block_r is None else block_r
    check_power_of_two("block_l", block_l)
    check_power_of_two("block_r", block_r)
    out = output_buffer(out, x.shape, x.dtype, x.device)
    if out.numel() == 0:
        return out
    if x.stride(-1) != 1 or _merged_head_stride(x) is None:
        x = x.contiguous()
    sxr = _merged_head_stride(x)
    rope = rope.contiguous()
    l_blocks = cdiv(L, block_l)
    with device_guard(x.device):
        _rope_kernel[(B * l_blocks, cdiv(R, block_r))](
            x, rope, out, L, R, l_blocks, x.stride(0), x.stride(1), sxr,
            HALF=hd // 2, BLOCK_L=block_l, BLOCK_R=block_r, BLOCK_J=_next_pow2(hd // 2),
            BF16_BY_HAND=_INTERPRETED and x.dtype == torch.bfloat16,
            num_warps=num_warps, enable_fp_fusion=False,  # no FMA contraction: bit-equal to the reference
        )
    return out


@torch.library.custom_op("sam3fast::rope", mutates_args=(), device_types="cuda")
def rope_op(x: Tensor, rope: Tensor) -> Tensor:
    """``sam3fast::rope``: the Triton kernel on CUDA, ``rope_ref`` on CPU."""
    return _rope_triton(x, rope)


rope_op.register_kernel("cpu")(rope_ref)


@rope_op.register_fake
def _rope_fake(x, rope):
    return x.new_empty(x.shape)


# ---- typed entry point (re-exported by sam3fast.ops) ------------------------------------------


def rope_backend(x: Tensor) -> Tuple[str, str]:
    """("triton" | "reference", reason) for x (B, L, ..., hd) of this device and dtype."""
    return triton_backend(x, env.FORCE_REFERENCE)


def rope(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """2-D axial RoPE of the ViT: ``sam3fast.model.vit.apply_rope`` in one kernel on CUDA.

    x (B, L, ..., hd), any strides with the last dim contiguous (e.g. ``qkv[:, :, :2]``);
    freqs_cis (L, hd/2) complex64 (``compute_axial_cis``) or its (L, hd/2, 2) float32 ``view_as_real``.
    Returns x.shape contiguous in x's dtype; see ``sam3fast.kernels.rope`` for the math.
    """
    table = torch.view_as_real(freqs_cis) if freqs_cis.is_complex() else freqs_cis
    if rope_backend(x)[0] == "triton":
        return torch.ops.sam3fast.rope(x, table.float())
    return rope_ref(x, table)
