"""Connected-component sizes of binary masks on the GPU, with no host sync and fixed shapes.

Letters: N masks, (H, W) grid (288 x 288 low-resolution masks in SAM 3 video, N = objects).

Input
    fg      (N, H, W) bool
Output
    sizes   (N, H, W) int64: for a foreground pixel the number of pixels of its 8-connected
            component in the same mask (diagonal neighbours join), 0 on background.

This is what the official hole filling reads from ``connected_components`` (skimage ``label`` with
full connectivity, or its CUDA/Triton kernels) and what ``scipy.ndimage.label`` with a 3x3 ones
structure gives; ``_connected_component_sizes_scipy`` (the op's CPU kernel) is that computation.

Algorithm (union-find label equivalence, Playne & Hawick style) over a fixed grid of
(BLOCK_H x BLOCK_W) tiles, in four launches, each bounded and each a global barrier for the next:

    parent  (N * H * W,) int32 workspace of global pixel indices i = (n H + y) W + x.

1. init     A "run" is a maximal horizontal stretch of foreground inside one tile row segment.
            parent[i] = the run's first pixel (a running max scan along the row), background
            parent[i] = i; sizes are zeroed (they are the per-root counters of step 3).
2. merge    Lock-free unions by atomic_min (the larger root is linked below the smaller one, so
            parent[i] <= i always and every union ends): a run's first pixel joins the run to its
            left across the tile edge and the run above that covers x - 1 or x; any foreground pixel
            whose upper-right neighbour starts a run above joins that run. This joins every pair of
            8-adjacent foreground pixels with at most 3 unions per run start, not 4 per pixel.
            Finds halve the paths they walk (atomic_min to the grandparent), so chains stay short.
3. count    Each run start finds its root, stores it in parent (every run start now points at its
            root) and atomically adds its run length into sizes[root]; when a whole tile feeds one
            root (large blobs) one scalar atomic carries the tile's sum.
4. gather   sizes[i] = sizes[parent[parent[i]]] on foreground (two loads: pixel -> a run start ->
            root). In place: only roots are read, and a root writes back its own value.

Why it is exact under any schedule: parent values only decrease and always name an ancestor in the
same component, so a node that is not a root never becomes one; a union that loses its atomic race
retries with a strictly smaller larger-root, so stale reads only cost iterations. A pixel that does
not start a run always has a smaller parent, so it never passes for a root: roots, union targets and
the parent of every foreground pixel are run starts, and after step 3 every foreground pixel is two
hops from its root. The number of loop iterations depends on the data (a spiral makes long parent
chains) but never the number of launches, the grid or the output shape: the op runs inside a CUDA
graph.

Global indices are int32: N * H * W < 2**31 (larger inputs go to the scipy path).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sam3fast import env as _env

# triton is optional (the "gpu" extra): without it the reference and the CPU op still work.
from ._triton_compat import (
    HAS_TRITON, TRITON_IMPORT_ERROR, check_power_of_two, device_guard, require_triton, tl, triton, why_not_triton,
    output_buffer,
)

MAX_PIXELS = 2**31 - 1  # N * H * W must stay below this: parent pointers are int32 global indices

__all__ = [
    "HAS_TRITON", "TRITON_IMPORT_ERROR", "connected_component_sizes_ref", "connected_component_sizes_backend",
    "connected_component_sizes_gpu",
]


def _check_input(fg: Tensor) -> None:
    if not isinstance(fg, Tensor):
        raise ValueError(f"connected_component_sizes expects a tensor, got {type(fg).__name__}")
    if fg.dim() != 3:
        raise ValueError(f"connected_component_sizes expects fg of shape (N, H, W), got {tuple(fg.shape)}")
    if fg.dtype != torch.bool:
        raise ValueError(f"connected_component_sizes expects a bool fg tensor, got {fg.dtype}")


# ---- references ------------------------------------------------------------------------------


def connected_component_sizes_ref(fg: Tensor) -> Tensor:
    """The spec in pure PyTorch (any device): minimum-label propagation over the 8 neighbours with
    pointer jumping, repeated until nothing changes (a host loop: a test reference, not a fast path).
    Labels are always indices of pixels in the same component and only decrease; at the fixed point
    a label equals its neighbours' labels, so it is constant on each component."""
    _check_input(fg)
    N, H, W = fg.shape
    out = torch.zeros((N, H, W), dtype=torch.int64, device=fg.device)
    if fg.numel() == 0:
        return out
    total = N * H * W
    big = total  # background label, larger than every index
    idx = torch.arange(total, device=fg.device).view(N, H, W)
    lab = torch.where(fg, idx, big)
    while True:
        padded = F.pad(lab, (1, 1, 1, 1), value=big)
        best = lab
        for dy in range(3):
            for dx in range(3):
                best = torch.minimum(best, padded[:, dy:dy + H, dx:dx + W])
        best = torch.where(fg, best, big)
        flat = torch.cat([best.flatten(), best.new_full((1,), big)])
        jumped = torch.where(fg, flat[best.flatten()].view(N, H, W), big)
        if torch.equal(jumped, lab):
            break
        lab = jumped
    counts = torch.bincount(lab.flatten(), minlength=total + 1)
    counts[big] = 0
    return counts[lab]


def _connected_component_sizes_scipy(fg: Tensor) -> Tensor:
    """scipy.ndimage.label with full (8-) connectivity, mask by mask, on the host (the op's CPU
    kernel; a CUDA input is copied to the host and back: one sync)."""
    from scipy import ndimage

    _check_input(fg)
    arr = fg.detach().cpu().numpy()
    out = np.zeros(arr.shape, dtype=np.int64)
    structure = np.ones((3, 3), dtype=bool)
    for i in range(arr.shape[0]):
        labels, n = ndimage.label(arr[i], structure=structure)
        if n:
            counts = np.bincount(labels.ravel())
            counts[0] = 0
            out[i] = counts[labels]
    return torch.from_numpy(out).to(fg.device)


# ---- Triton kernels --------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _max_fn(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _min_fn(a, b):
        return tl.minimum(a, b)

    @triton.jit
    def _tile(H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        # Grid (N * row tiles, column tiles): program (r, c) owns rows of mask r // row_tiles.
        row_tiles = tl.cdiv(H, BLOCK_H)
        pid_r = tl.program_id(0)
        n = pid_r // row_tiles
        y = ((pid_r % row_tiles) * BLOCK_H + tl.arange(0, BLOCK_H))[:, None]  # (BH, 1)
        x0 = tl.program_id(1) * BLOCK_W
        x = (x0 + tl.arange(0, BLOCK_W))[None, :]  # (1, BW)
        valid = (y < H) & (x < W)
        idx = (n * H + y) * W + x  # int32: N * H * W < 2**31 is checked on the host
        return y, x, x0, valid, idx

    @triton.jit
    def _find(parent_ptr, a, todo):
        # Follow parent pointers to a node that is its own parent, halving the path on the way
        # (each visited node is pointed at its grandparent). atomic_min keeps that safe beside
        # concurrent unions: it only ever lowers a parent, to an ancestor. Volatile loads: other
        # programs link roots meanwhile; a fresh value saves iterations, a stale one is still correct.
        par = tl.load(parent_ptr + a, mask=todo, other=0, volatile=True)
        walk = todo & (par != a)
        while tl.max(walk.to(tl.int32)) > 0:
            grand = tl.load(parent_ptr + par, mask=walk, other=0, volatile=True)
            tl.atomic_min(parent_ptr + a, grand, mask=walk & (grand != par), sem="relaxed")
            a = tl.where(walk, grand, a)
            par = tl.load(parent_ptr + a, mask=walk, other=0, volatile=True)
            walk = walk & (par != a)
        return a

    @triton.jit
    def _union(parent_ptr, a, b, todo):
        # Lock-free union: link the larger root below the smaller one with atomic_min. A lost race
        # (the larger root got a parent meanwhile) retries from that parent; the larger root of the
        # pair strictly decreases each retry, so the loop ends.
        while tl.max(todo.to(tl.int32)) > 0:
            a = _find(parent_ptr, a, todo)
            b = _find(parent_ptr, b, todo)
            todo = todo & (a != b)
            hi = tl.maximum(a, b)
            lo = tl.minimum(a, b)
            old = tl.atomic_min(parent_ptr + hi, lo, mask=todo)
            todo = todo & (old != hi)
            a = tl.where(todo, old, a)
            b = lo

    @triton.jit
    def _cc_init_kernel(fg_ptr, parent_ptr, sizes_ptr, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        y, x, x0, valid, idx = _tile(H, W, BLOCK_H, BLOCK_W)
        fg = tl.load(fg_ptr + idx, mask=valid, other=0) != 0
        # Runs are cut at the tile's left edge (merge joins them again), so the scan stays in the tile.
        left = tl.load(fg_ptr + idx - 1, mask=valid & (x > x0), other=0) != 0
        start_x = tl.associative_scan(tl.where(fg & ~left, x, -1), 1, _max_fn)
        tl.store(parent_ptr + idx, tl.where(fg, idx - x + start_x, idx), mask=valid)
        tl.store(sizes_ptr + idx, tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.int64), mask=valid)

    @triton.jit
    def _cc_merge_kernel(fg_ptr, parent_ptr, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        y, x, x0, valid, idx = _tile(H, W, BLOCK_H, BLOCK_W)
        fg = tl.load(fg_ptr + idx, mask=valid, other=0) != 0
        has_up = valid & (y > 0)
        left = tl.load(fg_ptr + idx - 1, mask=valid & (x > 0), other=0) != 0
        up = tl.load(fg_ptr + idx - W, mask=has_up, other=0) != 0
        up_left = tl.load(fg_ptr + idx - W - 1, mask=has_up & (x > 0), other=0) != 0
        up_right = tl.load(fg_ptr + idx - W + 1, mask=has_up & (x + 1 < W), other=0) != 0
        run_start = fg & ((x == x0) | ~left)
        # (a) the run continues from the tile on the left
        _union(parent_ptr, idx, idx - 1, fg & left & (x == x0))
        # (b) an upper run covering x - 1 or x (if it covers x - 1 it is the same run at x)
        _union(parent_ptr, idx, tl.where(up_left, idx - W - 1, idx - W), run_start & (up_left | up))
        # (c) an upper run starting at x + 1; with (b) every upper run touching [start - 1, end + 1]
        _union(parent_ptr, idx, idx - W + 1, fg & up_right & ~up)

    @triton.jit
    def _cc_count_kernel(fg_ptr, parent_ptr, sizes_ptr, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        y, x, x0, valid, idx = _tile(H, W, BLOCK_H, BLOCK_W)
        fg = tl.load(fg_ptr + idx, mask=valid, other=0) != 0
        left = tl.load(fg_ptr + idx - 1, mask=valid & (x > x0), other=0) != 0
        right = tl.load(fg_ptr + idx + 1, mask=valid & (x + 1 < x0 + BLOCK_W) & (x + 1 < W), other=0) != 0
        start = fg & ~left
        # The run's last pixel (in the tile): a reverse running min over run ends.
        end_x = tl.associative_scan(tl.where(fg & ~right, x, W), 1, _min_fn, reverse=True)
        length = tl.where(start, end_x - x + 1, 0)
        root = _find(parent_ptr, idx, start)
        tl.store(parent_ptr + idx, root, mask=start)
        r_min = tl.min(tl.where(start, root, 2147483647))
        r_max = tl.max(tl.where(start, root, -1))
        if r_min == r_max:
            # One root for the whole tile (blobs, all-foreground): one atomic instead of one per run.
            tl.atomic_add(sizes_ptr + r_min, tl.sum(length).to(tl.int64))
        else:
            tl.atomic_add(sizes_ptr + root, length.to(tl.int64), mask=start)

    @triton.jit
    def _cc_gather_kernel(fg_ptr, parent_ptr, sizes_ptr, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        y, x, x0, valid, idx = _tile(H, W, BLOCK_H, BLOCK_W)
        fg = (tl.load(fg_ptr + idx, mask=valid, other=0) != 0) & valid
        run = tl.load(parent_ptr + idx, mask=fg, other=0)
        root = tl.load(parent_ptr + run, mask=fg, other=0)
        size = tl.load(sizes_ptr + root, mask=fg, other=0)
        tl.store(sizes_ptr + idx, size, mask=fg)  # background keeps the 0 written by init


def _connected_component_sizes_triton(
    fg: Tensor,
    out: Optional[Tensor] = None,
    block_h: int = 16,
    block_w: int = 32,
    num_warps: int = 4,
) -> Tensor:
    """Launcher: four launches over a (N * cdiv(H, block_h), cdiv(W, block_w)) grid, no sync.
    ``out`` may be a preallocated contiguous (N, H, W) int64 tensor (every element is written)."""
    require_triton("connected_component_sizes")
    _check_input(fg)
    check_power_of_two("block_h", block_h)
    check_power_of_two("block_w", block_w)
    N, H, W = fg.shape
    if N * H * W > MAX_PIXELS:
        raise ValueError(f"the Triton kernel needs N * H * W < 2**31, got {tuple(fg.shape)}")
    dev = fg.device
    out = output_buffer(out, (N, H, W), torch.int64, dev)
    if fg.numel() == 0:
        return out
    fg_u8 = fg.contiguous().view(torch.uint8)  # bool pointers are avoided: plain bytes
    parent = torch.empty(N * H * W, dtype=torch.int32, device=dev)
    grid = (N * triton.cdiv(H, block_h), triton.cdiv(W, block_w))
    if grid[0] > 2**31 - 1 or grid[1] > 65535:
        raise ValueError(f"grid {grid} too large for a CUDA launch: use a larger block_h/block_w")
    meta = dict(BLOCK_H=block_h, BLOCK_W=block_w, num_warps=num_warps)
    with device_guard(dev):
        _cc_init_kernel[grid](fg_u8, parent, out, H, W, **meta)
        _cc_merge_kernel[grid](fg_u8, parent, H, W, **meta)
        _cc_count_kernel[grid](fg_u8, parent, out, H, W, **meta)
        _cc_gather_kernel[grid](fg_u8, parent, out, H, W, **meta)
    return out


# ---- the custom op ---------------------------------------------------------------------------


@torch.library.custom_op("sam3fast::connected_component_sizes", mutates_args=(), device_types="cuda")
def connected_component_sizes_op(fg: Tensor) -> Tensor:
    """``sam3fast::connected_component_sizes``: the Triton kernels on CUDA, scipy on CPU."""
    return _connected_component_sizes_triton(fg)


# The CPU kernel is scipy (exact, and far faster on the host than the iterative torch reference).
connected_component_sizes_op.register_kernel("cpu")(_connected_component_sizes_scipy)


@connected_component_sizes_op.register_fake
def _connected_component_sizes_fake(fg):
    _check_input(fg)
    return torch.empty_like(fg, dtype=torch.int64, memory_format=torch.contiguous_format)


# ---- typed entry point and backend choice -----------------------------------------------------


def connected_component_sizes_backend(fg: Tensor) -> Tuple[str, str]:
    """("triton" | "scipy", reason) for this input, from static facts only (device, size, triton
    importable, ``SAM3FAST_FORCE_REFERENCE``). "scipy" on a CUDA tensor means a host round trip."""
    why = why_not_triton(fg.device, _env.FORCE_REFERENCE)
    if why is not None:
        return "scipy", why
    if fg.numel() > MAX_PIXELS:
        return "scipy", f"N * H * W = {fg.numel()} >= 2**31 (the kernel uses int32 pixel indices)"
    return "triton", "CUDA tensors, triton available"


def connected_component_sizes_gpu(fg: Tensor) -> Tensor:
    """fg (N, H, W) bool -> (N, H, W) int64 sizes of 8-connected components (0 on background).
    CUDA tensors stay on the device (no sync, CUDA-graph safe); otherwise scipy on the host."""
    _check_input(fg)
    backend, _ = connected_component_sizes_backend(fg)
    if backend == "triton":
        return torch.ops.sam3fast.connected_component_sizes(fg)
    if fg.device.type == "cpu":
        return torch.ops.sam3fast.connected_component_sizes(fg)  # the op's CPU kernel: scipy, compiles
    return _connected_component_sizes_scipy(fg)
