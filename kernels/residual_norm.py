"""The ViT trunk's residual add and the LayerNorm after it in one pass, with the window partition or
unpartition that sits between them folded into the addressing.

Letters: B images, H x W token grid (72 x 72 in SAM 3), N = B H W tokens, C width (1024), w the
window side of a window block (24; 0 = a global block, no windows).

residual_norm(x, y, weight, bias, eps, y_window=0, out_window=0) -> (s, n)
    x      (B, H, W, C)              the residual stream, grid order, contiguous
    y      what is added to it: (B, H, W, C) (y_window 0) or (B * H/w * W/w, w, w, C) in window
           order (y_window w, the attention output of a window block), contiguous
    weight, bias (C,)                the LayerNorm's affine parameters
    s = x + y                                             (B, H, W, C), rounded to x's dtype
    n = LayerNorm_eps(s) * weight + bias                  (B, H, W, C), or in window order
                                                          (out_window w: the next attention's input),
                                                          rounded to y's dtype
y has x's dtype, or x is float32 and y lower precision: a float32 residual stream (the official bf16
autocast's rule, ``ViT.fp32_residual``) whose branches and norms run in bf16.
H and W must be multiples of every window side given (SAM 3: 72 = 3 x 24): the trunk pads nothing
then; with padding the ViT keeps its unfused path.

In the trunk (``sam3fast.model.vit.ViT``) a block does
    shortcut = x;  x = window(norm1(x));  x = attn(x);  x = shortcut + unwindow(x);  x = x + mlp(norm2(x))
i.e. per window block a norm, a partition copy, an unpartition copy, an add, a norm and an add: ~14
passes over an (N, C) tensor (21 MB in bf16 at SAM 3 sizes). Fused, a block is two calls:
    (x, n2) = residual_norm(s, attn(n1), norm2, y_window=w)            # unpartition + add + norm2
    (s', n1') = residual_norm(x, mlp(n2), next norm1, out_window=w')    # add + next norm1 + partition
8 passes: ~64 MB less traffic per window block, ~1.9 GB per image over the 32 blocks (arithmetic,
not measured), and 4 launches instead of 6 to 8.

Numerics: s is exactly PyTorch's ``x + y`` in the dtype (a float32 sum of the two inputs rounded
once, round-to-nearest-even), so the residual stream has the same bits as the unfused trunk's. n is
the LayerNorm of the rounded s in float32 (the mean, corrected once by the mean of the deviations
from it; the biased variance; 1 / sqrt(var + eps); the affine), rounded once: within float32
rounding of ``F.layer_norm`` in the dtype, not bit-equal to PyTorch's CUDA kernel (its Welford
reduction order differs). Under the Triton interpreter (the CPU tests) the float32 -> bf16 cast
truncates (Triton 3.7), so there the kernel rounds bf16 itself (``BF16_BY_HAND``, as
``sam3fast.kernels.rope``).

Schedule: grid cdiv(N, BLOCK_T); a program owns BLOCK_T tokens of the grid order, whole rows of C
(BLOCK_C the next power of two): it reads x and the tokens' rows of y (window order when y_window),
writes s, reduces each row in registers and writes n to the tokens' rows (window order when
out_window). Rows are C-contiguous, so every load and store is a run of C elements whatever the
permutation. Not yet timed on a GPU.
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
_MAX_WIDTH = 8192  # C: whole rows live in registers
TILE_ELEMS = 4096  # elements of x per program at the default tile (4 tokens x 1024 in SAM 3)
DEFAULT_NUM_WARPS = 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def to_windows(t: Tensor, w: int) -> Tensor:
    """(B, H, W, C) grid order -> (B * H/w * W/w, w, w, C) window order (H, W multiples of w)."""
    B, H, W, C = t.shape
    return t.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, C)


def from_windows(t: Tensor, w: int, B: int, H: int, W: int) -> Tensor:
    """Inverse of :func:`to_windows`: -> (B, H, W, C) grid order."""
    C = t.shape[-1]
    return t.view(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def _window_shape(x: Tensor, w: int) -> Tuple[int, ...]:
    B, H, W, C = x.shape
    return (B * (H // w) * (W // w), w, w, C) if w else tuple(x.shape)


def _check_inputs(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, y_window: int, out_window: int) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (B, H, W, C) tensor, got {x.dtype} {tuple(x.shape)}")
    B, H, W, C = x.shape
    for name, w in (("y_window", y_window), ("out_window", out_window)):
        if w < 0 or (w and (H % w or W % w)):
            raise ValueError(f"{name} must be 0 or a window side dividing the {H} x {W} grid, got {w}")
    want = _window_shape(x, y_window)
    if tuple(y.shape) != want or not y.is_floating_point():
        raise ValueError(f"y must be a floating {want} tensor (y_window {y_window}), got {y.dtype} {tuple(y.shape)}")
    if y.dtype != x.dtype and not (x.dtype == torch.float32 and y.dtype in (torch.bfloat16, torch.float16)):
        raise ValueError(f"y must have x's dtype, or be bfloat16/float16 with a float32 x (a float32 stream), "
                         f"got x {x.dtype}, y {y.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (C,):
            raise ValueError(f"{name} must be ({C},), got {tuple(t.shape)}")
    if len({t.device for t in (x, y, weight, bias)}) != 1:
        raise ValueError("x, y, weight and bias must be on one device")


def residual_norm_ref(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, eps: float, y_window: int = 0,
                      out_window: int = 0) -> Tuple[Tensor, Tensor]:
    """The spec (and the op's CPU kernel): the trunk's own operations (the add, ``F.layer_norm`` in
    the stream's dtype rounded to y's, the window permutations), so on CPU the fused trunk is the
    unfused one bit for bit."""
    _check_inputs(x, y, weight, bias, y_window, out_window)
    B, H, W, C = x.shape
    s = x + (from_windows(y, y_window, B, H, W) if y_window else y)
    n = F.layer_norm(s, (C,), weight.to(s.dtype), bias.to(s.dtype), eps).to(y.dtype)
    return s, (to_windows(n, out_window) if out_window else n)


if HAS_TRITON:
    from .rope import _bf16_rtne

    @triton.jit
    def _layer_norm_rows(v, m, w_ptr, b_ptr, cols, c_mask, C, eps, BF16_BY_HAND: tl.constexpr):
        # LayerNorm of each row of v (float32, 0 where not m) over its C columns, the affine of
        # (w, b) at ``cols``: the mean, corrected once by the deviations' own mean (what float32 lost
        # of it when a row's offset dwarfs its spread, so no Welford pass is needed), the biased
        # variance, 1 / sqrt(var + eps). float32 out (bf16-rounded by hand when interpreted).
        mean = tl.sum(v, axis=1) / C
        d = tl.where(m, v - mean[:, None], 0.0)
        d = tl.where(m, d - (tl.sum(d, axis=1) / C)[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        g = tl.load(w_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
        n = d * rstd[:, None] * g[None, :] + b[None, :]
        if BF16_BY_HAND:
            n = _bf16_rtne(n)
        return n

    @triton.jit
    def _window_row(t, H, W, WIN: tl.constexpr):
        # Grid-order token t (b, r, c) -> its row in the (B * H/WIN * W/WIN, WIN, WIN) window order.
        # (An else, not an early return: Triton passes H or W equal to 1 as a constant, and the
        # frontend still folded the divisions by WIN = 0 after the return, a compile error.)
        if WIN == 0:
            row = t
        else:
            hw = H * W
            b = t // hw
            r = (t % hw) // W
            c = t % W
            row = ((b * (H // WIN) + r // WIN) * (W // WIN) + c // WIN) * (WIN * WIN) + (r % WIN) * WIN + c % WIN
        return row

    @triton.jit
    def _residual_norm_kernel(
        x_ptr, y_ptr, w_ptr, b_ptr, s_ptr, n_ptr,
        N, C, H, W, eps,
        Y_WIN: tl.constexpr, OUT_WIN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
        S_BF16_BY_HAND: tl.constexpr, N_BF16_BY_HAND: tl.constexpr,
    ):
        # Grid (cdiv(N, BLOCK_T),): tokens [pid * BLOCK_T, +BLOCK_T) of the grid order, whole rows.
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_C)
        c_mask = cols < C
        m = (t < N)[:, None] & c_mask[None, :]
        row_x = t.to(tl.int64)[:, None] * C + cols[None, :]
        row_y = _window_row(t, H, W, Y_WIN).to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + row_x, mask=m, other=0.0)
        y = tl.load(y_ptr + row_y, mask=m, other=0.0)
        s = x.to(tl.float32) + y.to(tl.float32)
        if S_BF16_BY_HAND:
            s = _bf16_rtne(s)
        s = s.to(s_ptr.dtype.element_ty)  # the residual stream, rounded as PyTorch's add rounds it
        tl.store(s_ptr + row_x, s, mask=m)

        # (masked columns hold 0: they add nothing to the sums)
        n = _layer_norm_rows(s.to(tl.float32), m, w_ptr, b_ptr, cols, c_mask, C, eps, N_BF16_BY_HAND)
        row_n = _window_row(t, H, W, OUT_WIN).to(tl.int64)[:, None] * C + cols[None, :]
        tl.store(n_ptr + row_n, n.to(n_ptr.dtype.element_ty), mask=m)

    _INTERPRETED = interpreted(_residual_norm_kernel)  # (then the kernel rounds bf16 itself: see interpreted)


def choose_block_t(C: int, tile_elems: int = TILE_ELEMS) -> int:
    """Tokens per program: as many whole rows (C padded to a power of two) as fit ``tile_elems``."""
    return max(1, tile_elems // _next_pow2(C))


def _residual_norm_triton(
    x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, eps: float, y_window: int = 0, out_window: int = 0,
    out_s: Optional[Tensor] = None, out_n: Optional[Tensor] = None, block_t: Optional[int] = None,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> Tuple[Tensor, Tensor]:
    """Launcher. ``out_s`` / ``out_n``: preallocated contiguous outputs (every element is written).
    ``block_t`` (a power of two) overrides :func:`choose_block_t`."""
    require_triton("residual_norm")
    _check_inputs(x, y, weight, bias, y_window, out_window)
    if x.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32/bfloat16/float16, got {x.dtype}")
    B, H, W, C = x.shape
    if C > _MAX_WIDTH:
        raise ValueError(f"the Triton kernel takes a width of at most {_MAX_WIDTH}, got {C}")
    block_t = choose_block_t(C) if block_t is None else block_t
    check_power_of_two("block_t", block_t)
    s = output_buffer(out_s, x.shape, x.dtype, x.device)
    n = output_buffer(out_n, _window_shape(x, out_window), y.dtype, x.device)
    N = B * H * W
    if N == 0:
        return s, n
    x, y, weight, bias = (t.contiguous() for t in (x, y, weight, bias))
    with device_guard(x.device):
        _residual_norm_kernel[(cdiv(N, block_t),)](
            x, y, weight, bias, s, n, N, C, H, W, float(eps),
            Y_WIN=int(y_window), OUT_WIN=int(out_window), BLOCK_T=block_t, BLOCK_C=_next_pow2(C),
            S_BF16_BY_HAND=_INTERPRETED and x.dtype == torch.bfloat16,
            N_BF16_BY_HAND=_INTERPRETED and y.dtype == torch.bfloat16, num_warps=num_warps,
        )
    return s, n


@torch.library.custom_op("sam3fast::residual_norm", mutates_args=(), device_types="cuda")
def residual_norm_op(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, eps: float, y_window: int,
                     out_window: int) -> Tuple[Tensor, Tensor]:
    """``sam3fast::residual_norm``: the Triton kernel on CUDA, ``residual_norm_ref`` on CPU."""
    return _residual_norm_triton(x, y, weight, bias, eps, y_window, out_window)


residual_norm_op.register_kernel("cpu")(residual_norm_ref)


@residual_norm_op.register_fake
def _residual_norm_fake(x, y, weight, bias, eps, y_window, out_window):
    return x.new_empty(x.shape), y.new_empty(_window_shape(x, out_window))


# ---- typed entry point (re-exported by sam3fast.ops) ------------------------------------------


def residual_norm_backend(x: Tensor) -> Tuple[str, str]:
    """("triton" | "reference", reason) for a (B, H, W, C) residual stream of this device and dtype."""
    limit = f"width {x.shape[-1]} (the Triton kernel takes at most {_MAX_WIDTH})"
    return triton_backend(x, env.FORCE_REFERENCE, limit if x.shape[-1] > _MAX_WIDTH else None)


def residual_norm(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, eps: float, y_window: int = 0,
                  out_window: int = 0) -> Tuple[Tensor, Tensor]:
    """``(x + y, LayerNorm(x + y))`` with y and/or the norm in window order (see the module
    docstring): the Triton kernel on CUDA, the trunk's own PyTorch operations elsewhere."""
    if residual_norm_backend(x)[0] == "triton":
        return torch.ops.sam3fast.residual_norm(x, y, weight, bias, float(eps), int(y_window), int(out_window))
    return residual_norm_ref(x, y, weight, bias, eps, y_window, out_window)
