"""Fused mask post-processing: bilinear upsampling, threshold, object-wise non-overlap, bit packing,
boxes and areas in one pass, never writing full-resolution float masks.

Letters: N objects, (h, w) low-resolution mask grid (288 x 288 in SAM 3), (H, W) output image,
WP = ceil(W / 32) packed words per row.

Inputs
    masks   (N, h, w)  mask logits, float32 / bfloat16 / float16 (the reference also takes float64)
    scores  (N,)       per-object scores, any float dtype, compared as float32
    active  (N,)       bool; an inactive object claims no pixel (empty mask, -1 box, area 0)
    H, W               output size (>= 1, H * W < 2**31)
    non_overlap        apply the object-wise non-overlap rule

Math, per object n and output pixel (y, x), all in float32 (float64 for float64 input):
    F.interpolate(mode="bilinear", align_corners=False) with an explicit size:
        sy = max((h / H) * (y + 0.5) - 0.5, 0),  y0 = floor(sy),  y1 = y0 + (y0 < h - 1),  ly = sy - y0
        (same for x with w / W)
        logit = (1 - ly) * ((1 - lx) m[y0, x0] + lx m[y0, x1]) + ly * ((1 - lx) m[y1, x0] + lx m[y1, x1])
    fg[n] = active[n] and logit > 0
    non_overlap: among the objects with fg at a pixel, only the one with the highest score keeps it
                 (ties: lowest index); the others lose that pixel.

Against the official code: the video path thresholds the same way (``F.interpolate(...) > 0``,
``Sam3VideoBase.build_outputs``). The image processor's ``sigmoid(logit) > 0.5`` is not quite
``logit > 0``: a rounded sigmoid equals 0.5 for small positive logits, so it needs logit > ~8.9e-8
in float32 and > ~7.9e-3 in bfloat16. The non-overlap rule equals
``Sam3TrackerPredictor._apply_object_wise_non_overlapping_constraints(..., background_value=0)`` for
positive scores (the official also drops every pixel of an object whose score is <= 0). The
official video output computes boxes before that rule and gives empty masks (W, H, 0, 0);
here boxes follow the rule and empty masks give -1s.

Outputs
    packed  (N, H, WP) int32   bit j of word k of row y is pixel (y, 32 k + j); bits past W are 0
    boxes   (N, 4) int32       inclusive xyxy (min x, min y, max x, max y) of the kept pixels; -1s if empty
    areas   (N,) int64         number of kept pixels
Boxes and areas are those of the masks after the non-overlap rule. ``unpack_masks`` turns ``packed``
back into (N, H, W) bool.

Skipping empty (object, tile) pairs (the Triton kernel; exact, outputs bit for bit those without it).
Real masks are compact: most output tiles of most objects are background, yet without the skip the
kernel (instruction-bound) interpolates and packs every pair. For y < H, sy < h (it is at most
h - 0.5 - h / (2 H), and float32 moves it by less than 0.5 while h < 2**21), so y0 = floor(sy)
is never clamped and both weights 1 - ly and ly lie in [0, 1]; the same holds for x. The logit is
then a sum of products of non-negative weights and the 4 taps, and in IEEE float32 (fused or not)
such a sum is <= 0 or NaN when every tap is <= 0 (-inf included) or NaN: that pixel is background
(NaN > 0 is false). The launcher turns the skip off for grids of 2**21 or more rows or columns,
where that bound is not shown. So an object
can be foreground in a tile only if the rectangle of taps the tile reads, [min y0, max y1] x
[min x0, max x1] over its valid pixels (reduced in the kernel from the very indices it gathers
with), meets the bounding box of the object's positive logits (masks[n] > 0; empty for an object
with none, or inactive). A small pre-kernel computes those boxes on the device (no host sync, a
fixed grid: CUDA-graph safe); the main kernel neither interpolates nor packs a pair whose box misses
the tile: it writes its zero words. Under the non-overlap rule such an object cannot win any pixel of
the tile, so it is left out of the per-pixel contest as well. ``skip_empty=False`` in the launcher
evaluates every active object at every pixel (the kernel before the skip; tests and benchmarks).

Two schedules walk a tile's objects, with the same outputs bit for bit. "scan" tests each object in
turn (four scalar loads and a branch per object, dead or not: 2 x 64 dependent steps a tile for 64
objects, whatever is live). "list" (the default) tests up to 64 objects at once with one vector
load of their boxes, writes the zero words of every dead one with one store, and loops over the
live ones only, in index order (the lowest set bit of the chunk's live bits, read from the float32
exponent of the isolated bit), so a tile pays per live object. Boxes and areas are decoded by a
small finalize kernel: the op is four launches (a memset, the box pre-kernel, the main kernel, the
finalize kernel) whatever N, down from a dozen with the PyTorch decode it replaced.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# triton is optional (the "gpu" extra): without it the reference and the CPU op still work.
from ._triton_compat import (  # noqa: F401  (TRITON_IMPORT_ERROR: read by sam3fast.ops and the tests)
    HAS_TRITON, TRITON_IMPORT_ERROR, cdiv, check_power_of_two, device_guard, require_triton, tl, triton,
)

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(masks: Tensor, scores: Tensor, active: Tensor, H: int, W: int) -> None:
    if masks.dim() != 3 or not masks.is_floating_point():
        raise ValueError(f"masks must be a floating (N, h, w) tensor, got {masks.dtype} {tuple(masks.shape)}")
    N = masks.shape[0]
    if scores.shape != (N,) or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating ({N},) tensor, got {scores.dtype} {tuple(scores.shape)}")
    if active.shape != (N,) or active.dtype != torch.bool:
        raise ValueError(f"active must be a bool ({N},) tensor, got {active.dtype} {tuple(active.shape)}")
    if scores.device != masks.device or active.device != masks.device:
        devices = f"{masks.device}, {scores.device}, {active.device}"
        raise ValueError(f"masks, scores and active must be on one device, got {devices}")
    if H < 1 or W < 1 or H * W >= 2**31:
        raise ValueError(f"output size must be >= 1 and H * W < 2**31, got ({H}, {W})")
    if masks.shape[1] < 1 or masks.shape[2] < 1:
        raise ValueError(f"masks must have a non-empty grid, got {tuple(masks.shape)}")


def unpack_masks(packed: Tensor, W: int) -> Tensor:
    """(N, H, WP) int32 bit-packed masks -> (N, H, W) bool (bit j of word k = pixel 32 k + j)."""
    N, H, WP = packed.shape
    shifts = torch.arange(32, device=packed.device, dtype=torch.int32)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(N, H, WP * 32)[..., :W].bool()


def _pack_bits(keep: Tensor) -> Tensor:
    """(N, H, W) bool -> (N, H, WP) int32, through bytes so no full-size int32/int64 tensor is made."""
    N, H, W = keep.shape
    WP = cdiv(W, 32)
    if WP * 32 != W:
        keep = torch.cat([keep, keep.new_zeros((N, H, WP * 32 - W))], dim=2)
    dev = keep.device
    bit_w = torch.arange(8, device=dev, dtype=torch.uint8)
    byte = (keep.reshape(N, H, WP, 4, 8).to(torch.uint8) << bit_w).sum(-1, dtype=torch.uint8)
    byte_w = torch.arange(0, 32, 8, device=dev, dtype=torch.int32)
    # Partial sums of distinct bits stay inside int32 (bit 31 is the only negative term): no overflow.
    return (byte.to(torch.int32) << byte_w).sum(-1, dtype=torch.int32)


def _boxes_areas(keep: Tensor) -> Tuple[Tensor, Tensor]:
    N, H, W = keep.shape
    dev = keep.device
    areas = keep.sum(dim=(1, 2))
    cols = keep.any(dim=1)  # (N, W)
    rows = keep.any(dim=2)  # (N, H)
    xs = torch.arange(W, device=dev)
    ys = torch.arange(H, device=dev)
    x0 = torch.where(cols, xs, W).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1)
    y0 = torch.where(rows, ys, H).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    boxes = torch.where((areas > 0).unsqueeze(1), boxes, -1).to(torch.int32)
    return boxes, areas.to(torch.int64)


def mask_postprocess_ref(
    masks: Tensor, scores: Tensor, active: Tensor, H: int, W: int, non_overlap: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    """The spec (and the op's CPU kernel): returns (packed (N, H, WP) int32, boxes (N, 4) int32,
    areas (N,) int64). Computes in float32, or float64 for float64 masks."""
    _check_inputs(masks, scores, active, H, W)
    N = masks.shape[0]
    dev = masks.device
    compute = torch.promote_types(masks.dtype, torch.float32)
    if N == 0:  # F.interpolate refuses an empty batch
        fg = torch.zeros((0, H, W), dtype=torch.bool, device=dev)
    else:
        logits = F.interpolate(masks.to(compute).unsqueeze(1), size=(H, W), mode="bilinear", align_corners=False)
        fg = (logits.squeeze(1) > 0) & active.view(N, 1, 1)
    if non_overlap and N > 1:
        # rank 0 = highest score; a stable sort puts the lower index first among equal scores.
        order = torch.sort(scores.float(), descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(N, device=dev))
        key = torch.where(fg, (N - rank).to(torch.int32).view(N, 1, 1), 0)
        winner = key.argmax(dim=0)  # unclaimed pixels give 0, where fg is False anyway
        fg = fg & (winner.unsqueeze(0) == torch.arange(N, device=dev).view(N, 1, 1))
    boxes, areas = _boxes_areas(fg)
    return _pack_bits(fg), boxes, areas


if HAS_TRITON:

    @triton.jit
    def _popcount32(v):
        # SWAR popcount of int32 words; the masks after each arithmetic shift drop the sign fill.
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        v = v + (v >> 8)
        v = v + (v >> 16)
        return v & 0x3F

    @triton.jit
    def _positive_box_kernel(masks_ptr, active_ptr, pbox_ptr, h, w, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # Grid (objects, row blocks): a program scans BLOCK_R rows of one object's logits and merges
        # its bounds of masks[n] > 0 into a zero-filled (N, 4) int32 buffer with atomic_max, encoded
        # like the stats below: h - first row, last row + 1, w - first column, last column + 1 (0: none).
        n = tl.program_id(0)
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_c = tl.arange(0, BLOCK_C)
        # An inactive object loads nothing and so gets the empty box.
        row_ok = (offs_r < h) & (tl.load(active_ptr + n) != 0)
        base = masks_ptr + tl.cast(n, tl.int64) * h * w
        row_any = tl.zeros((BLOCK_R,), dtype=tl.int32)
        col_first = tl.zeros((BLOCK_C,), dtype=tl.int32)
        col_last = tl.zeros((BLOCK_C,), dtype=tl.int32)
        for c0 in range(0, w, BLOCK_C):
            cols = c0 + offs_c
            m = row_ok[:, None] & (cols < w)[None, :]
            # float32 compare (exact for every input dtype; NaN is not positive, like the kernel's v > 0).
            v = tl.load(base + offs_r[:, None] * w + cols[None, :], mask=m, other=0.0).to(tl.float32)
            pos = (v > 0.0).to(tl.int32)
            row_any = tl.maximum(row_any, tl.max(pos, axis=1))
            col_any = tl.max(pos, axis=0)
            col_first = tl.maximum(col_first, tl.where(col_any > 0, w - cols, 0))
            col_last = tl.maximum(col_last, tl.where(col_any > 0, cols + 1, 0))
        if tl.max(row_any, axis=0) > 0:
            st = pbox_ptr + n * 4
            tl.atomic_max(st + 0, tl.max(tl.where(row_any > 0, h - offs_r, 0), axis=0))
            tl.atomic_max(st + 1, tl.max(tl.where(row_any > 0, offs_r + 1, 0), axis=0))
            tl.atomic_max(st + 2, tl.max(col_first, axis=0))
            tl.atomic_max(st + 3, tl.max(col_last, axis=0))

    @triton.jit
    def _box_meets_tile(pbox_ptr, n, ok, h, w, ty_lo, ty_hi, tx_lo, tx_hi):
        # Whether object(s) n (a scalar or a vector, loaded where ``ok``) can be foreground in this
        # tile: the positive box meets the tile's taps. An empty box (or one not loaded) decodes to
        # rows [h, -1], columns [w, -1] and meets nothing.
        st = pbox_ptr + n * 4
        r_lo = h - tl.load(st + 0, mask=ok, other=0)
        r_hi = tl.load(st + 1, mask=ok, other=0) - 1
        c_lo = w - tl.load(st + 2, mask=ok, other=0)
        c_hi = tl.load(st + 3, mask=ok, other=0) - 1
        return ok & (r_lo <= ty_hi) & (r_hi >= ty_lo) & (c_lo <= tx_hi) & (c_hi >= tx_lo)

    @triton.jit
    def _object_live(n, N, active_ptr, pbox_ptr, h, w, ty_lo, ty_hi, tx_lo, tx_hi, SKIP_EMPTY: tl.constexpr):
        # Whether object n can be foreground in this tile (scan schedule).
        if SKIP_EMPTY:
            live = _box_meets_tile(pbox_ptr, n, n < N, h, w, ty_lo, ty_hi, tx_lo, tx_hi)
        else:
            live = tl.load(active_ptr + n) != 0
        return live

    @triton.jit
    def _bilinear_tile(base, r0, r1, c0, c1, ly0, ly1, lx0, lx1):
        # PyTorch's CUDA upsample_bilinear2d order of operations, accumulated in float32.
        v00 = tl.load(base + r0 + c0).to(tl.float32)
        v01 = tl.load(base + r0 + c1).to(tl.float32)
        v10 = tl.load(base + r1 + c0).to(tl.float32)
        v11 = tl.load(base + r1 + c1).to(tl.float32)
        return ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)

    @triton.jit
    def _tile_taps(h, w, H, W, scale_h, scale_w, BLOCK_H: tl.constexpr, BLOCK_WORDS: tl.constexpr):
        # The tile of program (pid_k, pid_y): BLOCK_H rows x BLOCK_WORDS * 32 columns. Source
        # coordinates depend on the row or the column only: computed once, outside the object loops.
        # Indices are clamped so lanes past H or W read in-bounds values (they are masked later) and
        # the gathers need no mask.
        offs_y = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BH,)
        offs_k = tl.program_id(0) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)  # (BK,)
        offs_x = offs_k[:, None] * 32 + tl.arange(0, 32)[None, :]  # (BK, 32)
        valid = (offs_y < H)[:, None, None] & (offs_x < W)[None, :, :]  # (BH, BK, 32)
        sy = tl.maximum(scale_h * (offs_y.to(tl.float32) + 0.5) - 0.5, 0.0)
        y0 = tl.minimum(sy.to(tl.int32), h - 1)
        y1 = tl.where(y0 < h - 1, y0 + 1, y0)
        ly1 = sy - y0.to(tl.float32)
        sx = tl.maximum(scale_w * (offs_x.to(tl.float32) + 0.5) - 0.5, 0.0)
        x0 = tl.minimum(sx.to(tl.int32), w - 1)
        x1 = tl.where(x0 < w - 1, x0 + 1, x0)
        lx1 = sx - x0.to(tl.float32)
        # The taps the tile's valid pixels read, reduced from the indices the gathers use (not
        # re-derived), so the skip test cannot disagree with the interpolation by a rounding.
        ty_lo = tl.min(tl.where(offs_y < H, y0, h), axis=0)
        ty_hi = tl.max(tl.where(offs_y < H, y1, -1), axis=0)
        tx_lo = tl.min(tl.min(tl.where(offs_x < W, x0, w), axis=1), axis=0)
        tx_hi = tl.max(tl.max(tl.where(offs_x < W, x1, -1), axis=1), axis=0)
        return (offs_y, offs_k, offs_x, valid,
                (y0 * w)[:, None, None], (y1 * w)[:, None, None], x0[None, :, :], x1[None, :, :],
                (1.0 - ly1)[:, None, None], ly1[:, None, None], (1.0 - lx1)[None, :, :], lx1[None, :, :],
                ty_lo, ty_hi, tx_lo, tx_hi)

    @triton.jit
    def _emit_object(n, keep, word_ptrs, word_mask, stats_ptr, offs_y, offs_x, H, W):
        # Packs object n's kept pixels of the tile into words, stores them, and merges the tile's
        # box and area into the zero-filled (N, 5) int32 stats with atomics.
        keep_i = keep.to(tl.int32)
        # Distinct bits: their sum is their OR, and bit 31 wraps to the sign bit as intended.
        words = tl.sum(keep_i << tl.arange(0, 32)[None, None, :], axis=2)  # (BH, BK)
        tl.store(word_ptrs, words, mask=word_mask)
        # Most (tile, object) pairs are empty: count on the 32x smaller word tile, and do the box
        # reductions and atomics only where something was kept.
        row_count = tl.sum(_popcount32(words), axis=1)  # (BH,)
        area = tl.sum(row_count, axis=0)
        if area > 0:
            # Encoded so that larger is better and 0 means "nothing here", which lets one zero-filled
            # buffer and atomic_max merge the tiles: W - x0, H - y0, x1 + 1, y1 + 1.
            col_any = tl.max(keep_i, axis=0)  # (BK, 32)
            st = stats_ptr + n * 5
            tl.atomic_max(st + 0, tl.max(tl.max(tl.where(col_any > 0, W - offs_x, 0), axis=1), axis=0))
            tl.atomic_max(st + 1, tl.max(tl.where(row_count > 0, H - offs_y, 0), axis=0))
            tl.atomic_max(st + 2, tl.max(tl.max(tl.where(col_any > 0, offs_x + 1, 0), axis=1), axis=0))
            tl.atomic_max(st + 3, tl.max(tl.where(row_count > 0, offs_y + 1, 0), axis=0))
            tl.atomic_add(st + 4, area)

    @triton.jit
    def _contest(n, scores_ptr, base, r0, r1, c0, c1, ly0, ly1, lx0, lx1, valid, best_s, best_n):
        # Object n (logits at base) enters the non-overlap contest of the tile: it takes the pixels
        # where it is foreground and beats the best so far. Visiting objects in increasing index
        # with a strict ">" leaves ties to the lowest index.
        s = tl.load(scores_ptr + n).to(tl.float32)
        v = _bilinear_tile(base, r0, r1, c0, c1, ly0, ly1, lx0, lx1)
        better = (v > 0.0) & valid & ((best_n < 0) | (s > best_s))
        return tl.where(better, s, best_s), tl.where(better, n, best_n)

    @triton.jit
    def _mask_postprocess_kernel(
        masks_ptr, scores_ptr, active_ptr, pbox_ptr, packed_ptr, stats_ptr,
        N, h, w, H, W, WP,
        scale_h, scale_w,
        NON_OVERLAP: tl.constexpr, SKIP_EMPTY: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_WORDS: tl.constexpr,
    ):
        # Grid (word tiles, row tiles): a program owns BLOCK_H rows x BLOCK_WORDS * 32 columns of every
        # object, so the non-overlap winner of each pixel is resolved in registers without a
        # full-resolution intermediate; tile stats are merged across programs with int32 atomics.
        # Objects are visited one by one, each with its own test (the "scan" schedule).
        (offs_y, offs_k, offs_x, valid, r0, r1, c0, c1, ly0, ly1, lx0, lx1,
         ty_lo, ty_hi, tx_lo, tx_hi) = _tile_taps(h, w, H, W, scale_h, scale_w, BLOCK_H, BLOCK_WORDS)
        hw = h * w

        if NON_OVERLAP:
            best_s = tl.zeros((BLOCK_H, BLOCK_WORDS, 32), dtype=tl.float32)
            best_n = tl.full((BLOCK_H, BLOCK_WORDS, 32), -1, dtype=tl.int32)
            for n in range(N):
                if _object_live(n, N, active_ptr, pbox_ptr, h, w, ty_lo, ty_hi, tx_lo, tx_hi, SKIP_EMPTY):
                    best_s, best_n = _contest(n, scores_ptr, masks_ptr + tl.cast(n, tl.int64) * hw,
                                              r0, r1, c0, c1, ly0, ly1, lx0, lx1, valid, best_s, best_n)

        word_mask = (offs_y < H)[:, None] & (offs_k < WP)[None, :]
        word_offs = offs_y[:, None] * WP + offs_k[None, :]
        for n in range(N):
            word_ptrs = packed_ptr + tl.cast(n, tl.int64) * H * WP + word_offs
            if _object_live(n, N, active_ptr, pbox_ptr, h, w, ty_lo, ty_hi, tx_lo, tx_hi, SKIP_EMPTY):
                if NON_OVERLAP:
                    keep = best_n == n
                else:
                    v = _bilinear_tile(masks_ptr + tl.cast(n, tl.int64) * hw, r0, r1, c0, c1, ly0, ly1, lx0, lx1)
                    keep = (v > 0.0) & valid
                _emit_object(n, keep, word_ptrs, word_mask, stats_ptr, offs_y, offs_x, H, W)
            else:
                tl.store(word_ptrs, tl.zeros((BLOCK_H, BLOCK_WORDS), dtype=tl.int32), mask=word_mask)

    @triton.jit
    def _live_chunk(pbox_ptr, n0, offs_n, N, h, w, ty_lo, ty_hi, tx_lo, tx_hi):
        # Objects nn = n0 + offs_n (offs_n = arange(BLOCK_N), BLOCK_N <= 64) -> (nn, live mask, live
        # bits as one int64 (bit i: object n0 + i), live count):
        # an object is live in the tile when its positive box meets the tile's taps (the scan
        # schedule's test, for a chunk of objects at once; objects past N are not).
        nn = n0 + offs_n
        live = _box_meets_tile(pbox_ptr, nn, nn < N, h, w, ty_lo, ty_hi, tx_lo, tx_hi)
        # Distinct bits: their sum is their OR (bit 63 wraps to the sign bit as intended).
        bits = tl.sum(tl.where(live, tl.full((1,), 1, dtype=tl.int64) << offs_n.to(tl.int64), 0), axis=0)
        return nn, live, bits, tl.sum(live.to(tl.int32), axis=0)

    @triton.jit
    def _pop_lowest(bits):
        # (index of the lowest set bit of a non-zero int64, bits without it). The index is read from
        # the float32 exponent of the isolated bit, a power of two that converts exactly (bit 63:
        # -2**63, the sign masked off).
        low = bits & (0 - bits)
        idx = ((low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        return idx, bits ^ low

    @triton.jit
    def _mask_postprocess_list_kernel(
        masks_ptr, scores_ptr, pbox_ptr, packed_ptr, stats_ptr,
        N, h, w, H, W, WP,
        scale_h, scale_w,
        NON_OVERLAP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_WORDS: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # The "list" schedule of the same tile (the skip of empty pairs always on): objects are
        # tested BLOCK_N at a time with one vector load of their positive boxes, every dead object of
        # the chunk gets its zero words from one store, and the loop runs over the live ones only,
        # in index order (popping the lowest bit of the chunk's live bits), so the per-object chain
        # of scalar loads and branches of the scan schedule is paid only where there is work.
        (offs_y, offs_k, offs_x, valid, r0, r1, c0, c1, ly0, ly1, lx0, lx1,
         ty_lo, ty_hi, tx_lo, tx_hi) = _tile_taps(h, w, H, W, scale_h, scale_w, BLOCK_H, BLOCK_WORDS)
        hw = h * w
        offs_n = tl.arange(0, BLOCK_N)

        if NON_OVERLAP:
            # Live objects in increasing index within increasing chunks: ties go to the lowest
            # index, as in the scan schedule.
            best_s = tl.zeros((BLOCK_H, BLOCK_WORDS, 32), dtype=tl.float32)
            best_n = tl.full((BLOCK_H, BLOCK_WORDS, 32), -1, dtype=tl.int32)
            for n0 in range(0, N, BLOCK_N):
                _, _, bits, n_live = _live_chunk(pbox_ptr, n0, offs_n, N, h, w, ty_lo, ty_hi, tx_lo, tx_hi)
                for _i in range(n_live):
                    idx, bits = _pop_lowest(bits)
                    n = n0 + idx
                    best_s, best_n = _contest(n, scores_ptr, masks_ptr + tl.cast(n, tl.int64) * hw,
                                              r0, r1, c0, c1, ly0, ly1, lx0, lx1, valid, best_s, best_n)

        word_mask = (offs_y < H)[:, None] & (offs_k < WP)[None, :]
        word_offs = offs_y[:, None] * WP + offs_k[None, :]
        plane = H * WP
        for n0 in range(0, N, BLOCK_N):
            nn, live, bits, n_live = _live_chunk(pbox_ptr, n0, offs_n, N, h, w, ty_lo, ty_hi, tx_lo, tx_hi)
            dead = (nn < N) & (live == 0)
            dead_ptrs = packed_ptr + nn.to(tl.int64)[:, None, None] * plane + word_offs[None, :, :]
            tl.store(dead_ptrs, tl.zeros((BLOCK_N, BLOCK_H, BLOCK_WORDS), dtype=tl.int32),
                     mask=dead[:, None, None] & word_mask[None, :, :])
            for _i in range(n_live):
                idx, bits = _pop_lowest(bits)
                n = n0 + idx
                if NON_OVERLAP:
                    keep = best_n == n
                else:
                    v = _bilinear_tile(masks_ptr + tl.cast(n, tl.int64) * hw, r0, r1, c0, c1, ly0, ly1, lx0, lx1)
                    keep = (v > 0.0) & valid
                word_ptrs = packed_ptr + tl.cast(n, tl.int64) * plane + word_offs
                _emit_object(n, keep, word_ptrs, word_mask, stats_ptr, offs_y, offs_x, H, W)

    @triton.jit
    def _finalize_kernel(stats_ptr, boxes_ptr, areas_ptr, N, H, W, BLOCK: tl.constexpr):
        # (N, 5) encoded stats -> (N, 4) int32 inclusive xyxy boxes (-1s for an empty mask) and (N,)
        # int64 areas: one launch instead of a handful of small PyTorch ops.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        st = stats_ptr + offs * 5
        area = tl.load(st + 4, mask=m, other=0)
        some = area > 0
        tl.store(boxes_ptr + offs * 4 + 0, tl.where(some, W - tl.load(st + 0, mask=m, other=0), -1), mask=m)
        tl.store(boxes_ptr + offs * 4 + 1, tl.where(some, H - tl.load(st + 1, mask=m, other=0), -1), mask=m)
        tl.store(boxes_ptr + offs * 4 + 2, tl.where(some, tl.load(st + 2, mask=m, other=0) - 1, -1), mask=m)
        tl.store(boxes_ptr + offs * 4 + 3, tl.where(some, tl.load(st + 3, mask=m, other=0) - 1, -1), mask=m)
        tl.store(areas_ptr + offs, area.to(tl.int64), mask=m)


def _positive_boxes(masks: Tensor, active: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """(N, h, w) logits, (N,) bool -> (N, 4) int32 bounds of ``masks[n] > 0`` for active objects,
    encoded h - first row, last row + 1, w - first column, last column + 1 (all 0 when there is none).
    One Triton launch, no host sync, a grid fixed by the shapes. ``out``: a zero-filled contiguous
    (N, 4) int32 buffer to merge into (else one is made)."""
    require_triton("mask_postprocess")
    N, h, w = masks.shape
    pbox = torch.zeros((N, 4), dtype=torch.int32, device=masks.device) if out is None else out
    if N > 0:
        # ~4K logits a program (rows x the next power of two of w, capped).
        block_c = min(triton.next_power_of_2(w), 512)
        block_r = max(1, 4096 // block_c)
        grid = (N, triton.cdiv(h, block_r))
        with device_guard(masks.device):
            _positive_box_kernel[grid](
                masks.contiguous(), active.contiguous().view(torch.uint8), pbox, h, w,
                BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
            )
    return pbox


SCHEDULES = ("list", "scan")
MAX_BLOCK_N = 64  # the list schedule keeps a chunk's live objects as the bits of one int64


def _mask_postprocess_triton(
    masks: Tensor,
    scores: Tensor,
    active: Tensor,
    H: int,
    W: int,
    non_overlap: bool,
    packed: Optional[Tensor] = None,
    block_h: int = 8,
    block_words: int = 2,
    num_warps: int = 4,
    skip_empty: bool = True,
    schedule: str = "list",
    block_n: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Launcher. ``packed`` may be a preallocated (N, H, WP) int32 contiguous output (every word is
    written). Tile = ``block_h`` rows x ``block_words`` * 32 columns (powers of two). The default,
    8 x 64 with 4 warps, was the fastest tile of the sweep with the skip of empty pairs for 64
    objects, 288^2 -> 1080 x 1920 bf16 on an H100 (second run of 2026-11-26, bench/results, the scan
    schedule): 0.320 ms without the overlap rule and 0.226 ms with it, against 0.379 / 0.227-0.392 ms
    for the previous default 4 x 128 (two timings of the same tile in that run).

    ``schedule``: how a program walks the objects of its tile. "scan" tests them one by one (a chain
    of scalar loads and a branch per object, dead or not); "list" (the default, not yet timed on a
    GPU) tests ``block_n`` (default min(64, N) rounded up to a power of two, at least 16) at once,
    zero-fills the dead ones with one store and loops over the live ones only. Same outputs, bit
    for bit. ``skip_empty=False`` evaluates every active object at every pixel (the scan kernel
    without the skip: same outputs; for the tests and the benchmark's before/after rows).

    Launches: one memset (the box and stats buffers), the positive-box kernel, the main kernel, and a
    finalize kernel that decodes boxes and areas: four, whatever N."""
    require_triton("mask_postprocess")
    _check_inputs(masks, scores, active, H, W)
    if masks.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32/bfloat16/float16 masks, got {masks.dtype}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    check_power_of_two("block_h", block_h)
    check_power_of_two("block_words", block_words)
    N, h, w = masks.shape
    if block_n is None:
        block_n = min(MAX_BLOCK_N, max(16, triton.next_power_of_2(max(N, 1))))
    check_power_of_two("block_n", block_n)
    if block_n > MAX_BLOCK_N:
        raise ValueError(f"block_n must be at most {MAX_BLOCK_N} (the live bits of a chunk are one int64), got {block_n}")
    WP = cdiv(W, 32)
    dev = masks.device
    if packed is None:
        packed = torch.empty((N, H, WP), dtype=torch.int32, device=dev)
    elif (packed.shape, packed.dtype, packed.device) != ((N, H, WP), torch.int32, dev) or not packed.is_contiguous():
        raise ValueError(f"packed must be a contiguous ({N}, {H}, {WP}) int32 tensor on {dev}")
    boxes = torch.empty((N, 4), dtype=torch.int32, device=dev)
    areas = torch.empty((N,), dtype=torch.int64, device=dev)
    if N == 0:
        return packed, boxes, areas
    # One zero-filled buffer (one memset) holds the positive boxes (N, 4) and the tile stats (N, 5).
    scratch = torch.zeros((9 * N,), dtype=torch.int32, device=dev)
    pbox, stats = scratch[: 4 * N].view(N, 4), scratch[4 * N:].view(N, 5)
    masks = masks.contiguous()
    scores = scores.contiguous()
    active_u8 = active.contiguous().view(torch.uint8)  # bool pointers are avoided: plain bytes
    # Past 2**21 source rows or columns float32 source coordinates could clamp and give a weight
    # outside [0, 1] (module docstring): the skip would no longer be exact.
    skip_empty = skip_empty and max(h, w) < 2**21
    if skip_empty:
        _positive_boxes(masks, active, out=pbox)
    grid = (triton.cdiv(WP, block_words), triton.cdiv(H, block_h))
    # Host division of two ints rounded once to float32 equals PyTorch's float32 h / H.
    with device_guard(dev):
        if skip_empty and schedule == "list":
            _mask_postprocess_list_kernel[grid](
                masks, scores, pbox, packed, stats,
                N, h, w, H, W, WP,
                h / H, w / W,
                NON_OVERLAP=bool(non_overlap), BLOCK_H=block_h, BLOCK_WORDS=block_words, BLOCK_N=block_n,
                num_warps=num_warps,
            )
        else:  # without the skip the kernel never reads the boxes
            _mask_postprocess_kernel[grid](
                masks, scores, active_u8, pbox, packed, stats,
                N, h, w, H, W, WP,
                h / H, w / W,
                NON_OVERLAP=bool(non_overlap), SKIP_EMPTY=bool(skip_empty), BLOCK_H=block_h, BLOCK_WORDS=block_words,
                num_warps=num_warps,
            )
        _finalize_kernel[(triton.cdiv(N, 128),)](stats, boxes, areas, N, H, W, BLOCK=128, num_warps=4)
    return packed, boxes, areas


@torch.library.custom_op("sam3fast::mask_postprocess", mutates_args=(), device_types="cuda")
def mask_postprocess_op(
    masks: Tensor, scores: Tensor, active: Tensor, H: int, W: int, non_overlap: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    """``sam3fast::mask_postprocess``: the Triton kernel on CUDA, ``mask_postprocess_ref`` on CPU."""
    return _mask_postprocess_triton(masks, scores, active, H, W, non_overlap)


mask_postprocess_op.register_kernel("cpu")(mask_postprocess_ref)


@mask_postprocess_op.register_fake
def _mask_postprocess_fake(masks, scores, active, H, W, non_overlap):
    N = masks.shape[0]
    return (
        masks.new_empty((N, H, (W + 31) // 32), dtype=torch.int32),
        masks.new_empty((N, 4), dtype=torch.int32),
        masks.new_empty((N,), dtype=torch.int64),
    )
