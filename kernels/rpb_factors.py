"""The query decoder's boxRPB factors in one pass per axis: log-spaced box deltas, the two-layer MLP
and the padded head-major layout, without the (B, Q, n, 256) hidden activation in memory.

Letters: B images, Q queries (200), n the feature map's rows (Hf) or columns (Wf), Hd the MLP's
hidden width (d_model, 256), H heads (8).

rpb_factors(boxes, n, w1, b1, w2, b2, axis) -> f
    boxes   (B, Q, 4) cxcywh, float32 (the decoder's box state), any strides
    n       the map's extent along the axis (Hf for axis 1 = y, Wf for axis 0 = x)
    w1, b1  (Hd, 2), (Hd,)    the MLP's first linear (boxRPB_embed_{x,y}.layers.0)
    w2, b2  (H, Hd), (H,)     its second linear (layers.1)
    edges   e0, e1 = c - s / 2, c + s / 2 of the box along the axis (c = cx or cy, s = w or h), as
            ``box_cxcywh_to_xyxy`` computes them
    coords  t = i / n, i = 0 .. n - 1 (float32)
    delta   d_k = (t - e_k) * 8,  g_k = sign(d_k) * log2(|d_k| + 1) / 3       (k = 0, 1)
    f[b, h, 1 + q, i] = b2[h] + sum_j w2[h, j] * relu(b1[j] + g_0 w1[j, 0] + g_1 w1[j, 1]),
    f[b, h, 0, i] = 0 (the presence token's row)
    (B, H, 1 + Q, n) contiguous float32

What it replaces (``Decoder.rpb_factors``, per layer and axis): the deltas (five elementwise ops),
the first linear writing a float32 (B, Q, n, 256) activation (15 MB at Q = 200, n = 72), its ReLU
(an epilogue on CUDA), the second linear reading it back, a permute and a pad: ~7 launches and
~30 MB of traffic, 12 times an image. Here one launch per axis and layer: a program takes BLOCK_R
(query, coordinate) rows and loops over the hidden units, each formed in registers and accumulated
into the rows' H outputs at once, on a (heads, rows) tile whose layout the loop keeps.

The first form of this kernel (session 16) held a BLOCK_R x Hd hidden tile and reduced it against w2
with a float32 ``tl.dot``: 222 registers and 48 KB of shared memory a program in the static sm_90
build, and **57 us a launch** on the H200 (run 2 of 2026-11-27), no faster than the chain it
replaced (the decoder's device time went from 2.79 to 2.84 ms). The loop form does ~37 M FMAs an
axis (201 x 72 rows x 256 hidden x (2 + 1 + 8)) with uniform weight loads; not yet timed on a GPU.

Numerics: float32 throughout, as the decoder's float32 island computes it; the sums run in another
order than cuBLAS's, and the kernel's log2 and division are the GPU's (the interpreter's are
numpy's): float32 rounding differences only. The kernel takes float32 weights (the island); the
entry point sends anything else to the reference.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from sam3fast import env

# triton is optional (the "gpu" extra): without it the reference and the CPU op still work.
from ._triton_compat import (  # noqa: F401  (TRITON_IMPORT_ERROR: read by the tests)
    HAS_TRITON, TRITON_IMPORT_ERROR, cdiv, check_power_of_two, device_guard, output_buffer, require_triton, tl,
    triton, triton_backend,
)

# rows a program and warps: at the decoder's shape (201 x 72 rows an axis) 227 programs for the 132
# SMs, a thread holding 4 heads of one row; static sm_90 build (Triton 3.7): 31 registers, 600
# instructions (165 in the loop, 8 hidden units a trip), no spill, no barrier or shared memory in the
# loop (64 rows at 2 warps: 4 spill stores; 32 rows at 1 warp: 70 registers, 272 in the loop)
DEFAULT_BLOCK_R = 64
DEFAULT_NUM_WARPS = 4
_MAX_HIDDEN = 4096
_MAX_HEADS = 64


def _check_inputs(boxes: Tensor, n: int, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, axis: int) -> None:
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
        raise ValueError(f"boxes must be a floating (B, Q, 4) tensor, got {boxes.dtype} {tuple(boxes.shape)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 (x) or 1 (y), got {axis}")
    hd = w1.shape[0]
    shapes = {"w1": (w1, (hd, 2)), "b1": (b1, (hd,)), "w2": (w2, (w2.shape[0], hd)), "b2": (b2, (w2.shape[0],))}
    for name, (t, want) in shapes.items():
        if tuple(t.shape) != want or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating {want} tensor, got {t.dtype} {tuple(t.shape)}")
        if t.device != boxes.device:
            raise ValueError(f"boxes and {name} must be on one device, got {boxes.device} and {t.device}")


def log_deltas(coords: Tensor, edges: Tensor) -> Tensor:
    """coords (n,), edges (B, Q, 2) -> (B, Q, n, 2): ``sign(d) log2(|d| + 1) / 3`` of d = (c - e) * 8,
    in the official op order (exact numbers)."""
    d = (coords.view(1, 1, -1, 1) - edges.unsqueeze(2)) * 8
    return torch.sign(d) * torch.log2(torch.abs(d) + 1.0) / 3.0  # / log2(8)


def rpb_factors_ref(boxes: Tensor, n: int, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, axis: int) -> Tensor:
    """The spec (and the op's CPU kernel, and ``Decoder.rpb_factors``' path off the kernel): the
    deltas in float32, the MLP in its weights' dtype, (B, H, 1 + Q, n) with a zero first row."""
    _check_inputs(boxes, n, w1, b1, w2, b2, axis)
    c, s = boxes[..., axis], boxes[..., axis + 2]
    edges = torch.stack([c - 0.5 * s, c + 0.5 * s], dim=-1)  # box_cxcywh_to_xyxy's two edges on the axis
    coords = torch.arange(n, dtype=torch.float32, device=boxes.device) / n
    g = log_deltas(coords, edges).to(w1.dtype)
    f = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(g, w1, b1)), w2, b2)  # (B, Q, n, H)
    return torch.nn.functional.pad(f.permute(0, 3, 1, 2), (0, 0, 1, 0)).contiguous()  # (B, H, 1 + Q, n)


if HAS_TRITON:

    @triton.jit
    def _rpb_factors_kernel(
        boxes_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr,
        Q, n, H, r_blocks, sbb, sbq, sbc, axis,
        HD: tl.constexpr, UNROLL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        # Grid (B * r_blocks,): rows r = qq * n + i of image b, qq = 0 .. Q (0: the presence row).
        # The hidden unit j of the program's rows is formed in registers and accumulated into the
        # rows' H outputs at once (no hidden tile, no matrix-unit layouts); the weights are uniform
        # loads (the same address for every thread of a row group: L1 broadcasts).
        pid = tl.program_id(0)
        b = (pid // r_blocks).to(tl.int64)
        r = (pid % r_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < (Q + 1) * n
        qq = r // n
        i = r % n
        q_ok = r_ok & (qq > 0)
        box = boxes_ptr + b * sbb + (qq - 1).to(tl.int64) * sbq
        c = tl.load(box + axis * sbc, mask=q_ok, other=0.0).to(tl.float32)
        s = tl.load(box + (axis + 2) * sbc, mask=q_ok, other=0.0).to(tl.float32)
        t = tl.math.div_rn(i.to(tl.float32), tl.cast(n, tl.float32))  # (tl.cast: n == 1 arrives as a constant)
        d0 = (t - (c - 0.5 * s)) * 8.0
        d1 = (t - (c + 0.5 * s)) * 8.0
        sg0 = tl.where(d0 > 0, 1.0, tl.where(d0 < 0, -1.0, 0.0))
        sg1 = tl.where(d1 > 0, 1.0, tl.where(d1 < 0, -1.0, 0.0))
        g0 = tl.math.div_rn(sg0 * tl.log2(tl.abs(d0) + 1.0), 3.0)
        g1 = tl.math.div_rn(sg1 * tl.log2(tl.abs(d1) + 1.0), 3.0)
        h = tl.arange(0, BLOCK_H)
        h_ok = h < H
        # (heads, rows) tiles: rows along the fast axis, so a thread holds all heads of its rows and
        # the (rows,) deltas broadcast into the accumulator without a layout conversion; w2[:, j] is
        # loaded as a (heads, rows) tile of stride 0 along the rows for the same reason (an (H,)
        # vector, or a (rows, heads) accumulator, was converted through shared memory every unit)
        acc = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
        g0 = g0[None, :]
        g1 = g1[None, :]
        for j0 in range(0, HD, UNROLL):  # UNROLL hidden units a trip: their loads issue together
            for u in tl.static_range(UNROLL):
                j = j0 + u
                hid = tl.maximum(g0 * tl.load(w1_ptr + 2 * j) + g1 * tl.load(w1_ptr + 2 * j + 1) + tl.load(b1_ptr + j),
                                 0.0)
                w2j = tl.load(w2_ptr + h[:, None] * HD + j + 0 * r[None, :], mask=h_ok[:, None], other=0.0)
                acc += hid * w2j
        f = acc + tl.load(b2_ptr + h, mask=h_ok, other=0.0)[:, None]
        f = tl.where(q_ok[None, :], f, 0.0)
        dst = out_ptr + ((b * H + h.to(tl.int64)[:, None]) * (Q + 1) + qq.to(tl.int64)[None, :]) * n + i[None, :]
        tl.store(dst, f, mask=h_ok[:, None] & r_ok[None, :])


def _unroll(hd: int) -> int:
    """Hidden units a trip of the kernel's loop: the largest power of two <= 8 dividing ``hd``."""
    u = 8
    while hd % u:
        u //= 2
    return u


def _rpb_factors_triton(boxes: Tensor, n: int, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, axis: int,
                        out: Optional[Tensor] = None, block_r: int = DEFAULT_BLOCK_R,
                        num_warps: int = DEFAULT_NUM_WARPS) -> Tensor:
    """Launcher (float32 boxes and weights). ``out``: a preallocated contiguous (B, H, 1 + Q, n)
    float32 tensor (every element is written); ``block_r``: a power of two >= 16, the rows a program."""
    require_triton("rpb_factors")
    _check_inputs(boxes, n, w1, b1, w2, b2, axis)
    for name, t in (("boxes", boxes), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t.dtype != torch.float32:
            raise ValueError(f"the Triton kernel takes float32 {name}, got {t.dtype}")
    check_power_of_two("block_r", block_r, minimum=16)
    B, Q, _ = boxes.shape
    H, HD = w2.shape
    if HD > _MAX_HIDDEN or H > _MAX_HEADS:
        raise ValueError(f"the Triton kernel takes at most {_MAX_HIDDEN} hidden units and {_MAX_HEADS} heads, "
                         f"got {HD} and {H}")
    out = output_buffer(out, (B, H, Q + 1, n), torch.float32, boxes.device)
    if out.numel() == 0:
        return out
    r_blocks = cdiv((Q + 1) * n, block_r)
    with device_guard(boxes.device):
        _rpb_factors_kernel[(B * r_blocks,)](
            boxes, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), out,
            Q, n, H, r_blocks, boxes.stride(0), boxes.stride(1), boxes.stride(2), axis,
            HD=HD, UNROLL=_unroll(HD), BLOCK_R=block_r, BLOCK_H=1 << max(0, H - 1).bit_length(),
            num_warps=num_warps,
        )
    return out


@torch.library.custom_op("sam3fast::rpb_factors", mutates_args=(), device_types="cuda")
def rpb_factors_op(boxes: Tensor, n: int, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, axis: int) -> Tensor:
    """``sam3fast::rpb_factors``: the Triton kernel on CUDA, ``rpb_factors_ref`` on CPU."""
    return _rpb_factors_triton(boxes, n, w1, b1, w2, b2, axis)


rpb_factors_op.register_kernel("cpu")(rpb_factors_ref)


@rpb_factors_op.register_fake
def _rpb_factors_fake(boxes, n, w1, b1, w2, b2, axis):
    return boxes.new_empty((boxes.shape[0], w2.shape[0], boxes.shape[1] + 1, n), dtype=w1.dtype)


# ---- typed entry point (re-exported by sam3fast.ops) ------------------------------------------


def rpb_factors_backend(boxes: Tensor, w1: Tensor) -> Tuple[str, str]:
    """("triton" | "reference", reason) for these boxes and MLP weights."""
    limit = None
    if boxes.dtype != torch.float32 or w1.dtype != torch.float32:
        limit = f"{boxes.dtype} boxes / {w1.dtype} weights (the Triton kernel takes float32: the decoder's island)"
    return triton_backend(boxes, env.FORCE_REFERENCE, limit)


def rpb_factors(boxes: Tensor, n: int, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, axis: int) -> Tensor:
    """One axis's boxRPB factor (B, H, 1 + Q, n) (see the module docstring): the Triton kernel on
    CUDA for float32, ``rpb_factors_ref`` elsewhere."""
    if rpb_factors_backend(boxes, w1)[0] == "triton":
        return torch.ops.sam3fast.rpb_factors(boxes, int(n), w1, b1, w2, b2, int(axis))
    return rpb_factors_ref(boxes, n, w1, b1, w2, b2, axis)
