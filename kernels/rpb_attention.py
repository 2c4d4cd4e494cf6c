"""boxRPB attention: flash attention whose additive bias is the DETR decoder's separable box relative-
position bias, summed from its two factors inside the kernel instead of read from a materialised
(B, H, L, N) tensor.

Letters: B batch (prompts), L queries (1 + Q: the presence token and the Q object queries; 201 in
SAM 3), H heads, Dh head dim, (Hf, Wf) the image feature grid, N = Hf * Wf keys (72 x 72 = 5184).

Inputs
    q       (B, L, H, Dh)  float32 / bfloat16 / float16 (the reference also takes float64)
    k, v    (B, N, H, Dh)  q's dtype
    dy      (B, H, L, Hf)  floating: the bias of query l for key row y
    dx      (B, H, L, Wf)  dy's dtype: the bias of query l for key column x
q, k and v may have any strides with the last dim contiguous (views of the projections'
(B, *, H * Dh) outputs pass as is); dy and dx any strides.

Math, per batch and head, with key n at grid cell (y, x) = (n // Wf, n % Wf) (row-major, as the
image tokens are flattened):
    bias[l, n] = dy[l, n // Wf] + dx[l, n % Wf]
    out_l = sum_n softmax_n(q_l . k_n / sqrt(Dh) + bias[l, n]) v_n
Scores, bias sum and softmax in float32 (float64 for float64 input); output in q's dtype,
(B, L, H, Dh) contiguous. The bias is summed in float32 from the factors as stored: where the model
materialises it in bf16 (``Decoder.rpb_bias`` adds in the weights' dtype) that sum is rounded to
bf16 first, so in bf16 the kernel is the more exact of the two.

Against the model: ``sam3fast.model.decoder.DecoderLayer``'s image cross-attention
``cross_attn(x + p, memory + pos, memory, attn_bias=Decoder.rpb_bias(ref, (Hf, Wf)))`` equals
``out_proj(rpb_attention(q, k, v, dy, dx).reshape(B, L, D))`` with q, k, v the in_proj chunks of
its inputs viewed (B, *, H, Dh) and (dy, dx) = ``Decoder.rpb_factors(ref, (Hf, Wf))``. The
materialised bias is 8 x 201 x 5184 values per prompt and layer (16.7 MB in bf16, written once and
read once), several times the 5.3 MB of K and V the attention itself reads; dy and dx are 0.2 MB.

Schedule (flash decoding). Grid (cdiv(L, BLOCK_M), B * H, SPLITS): a program owns BLOCK_M queries
of one (batch, head) and a run of key tiles. A key tile is a ROWS x COLS block of the feature grid
(ROWS * COLS = BLOCK_N keys; 8 x 8 at SAM 3's 72 x 72, which it divides exactly), so its bias is
dy[l, y0:y0+ROWS] and dx[l, x0:x0+COLS] broadcast-added: ROWS + COLS loads per query instead of a
gather of BLOCK_N (a per-element gather of a flat key tile took all 255 registers and spilled when
compiled for sm_90; this takes 185 at the default tile). Each row of a tile is COLS consecutive
keys, read as one contiguous run. SAM 3 has only cdiv(201, 64) * 8 = 32 (query block, head) pairs
per prompt for 132 SMs, so the key tiles are split: each program writes its normalised partial
output and base-2 log-sum-exp to a float32 workspace (SPLITS x B*H x L x (Dh + 1), 1.9 MB at 9
splits) and a second kernel merges them.
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
    HAS_TRITON, TRITON_IMPORT_ERROR, cdiv, check_power_of_two, device_guard, require_triton, tl, triton,
    output_buffer, rows_contiguous,
)
from ._split_kv import attention_backend, check_qkv, merge_splits
from ._split_kv import sm_count as _sm_count

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_HEAD_DIMS = (16, 32, 64, 128)  # powers of two (tl.arange), >= 16 (tl.dot)
_LOG2E = 1.4426950408889634
# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M 64 with 4 warps is one wgmma warpgroup; compiled
# for sm_90 (Triton 3.7, bf16, Dh 32, cuobjdump) it takes 185 registers and no spills with a
# hand-written signature, 123 built as the launcher launches it (bench/kernel_static_report.py), so
# two programs share an SM. Not yet timed on a GPU: bench/bench_rpb_attention.py sweeps the alternatives.
DEFAULT_TILE = (64, 64, 4, 3)
# Programs per SM the split-KV choice aims for: small programs need several per SM to hide the
# latency of their loads.
_PROGRAMS_PER_SM = 2
_MIN_TILES_PER_SPLIT = 4  # below this the merge costs more than the parallelism gains


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, dy: Tensor, dx: Tensor) -> None:
    check_qkv(q, k, v, "N")
    B, L, H, Dh = q.shape
    N = k.shape[1]
    if dy.dim() != 4 or dy.shape[:3] != (B, H, L) or not dy.is_floating_point():
        raise ValueError(f"dy must be a floating (B={B}, H={H}, L={L}, Hf) tensor, got {dy.dtype} {tuple(dy.shape)}")
    if dx.dim() != 4 or dx.shape[:3] != (B, H, L) or dx.dtype != dy.dtype:
        raise ValueError(f"dx must be a (B={B}, H={H}, L={L}, Wf) tensor of dy's dtype {dy.dtype}, got "
                         f"{dx.dtype} {tuple(dx.shape)}")
    Hf, Wf = dy.shape[3], dx.shape[3]
    if Hf * Wf != N:
        raise ValueError(f"the bias grid Hf x Wf = {Hf} x {Wf} does not cover the N={N} keys")
    if any(t.device != q.device for t in (k, v, dy, dx)):
        raise ValueError(f"q, k, v, dy and dx must be on one device, got {[str(t.device) for t in (q, k, v, dy, dx)]}")


def rpb_attention_ref(q: Tensor, k: Tensor, v: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """The spec (and the op's CPU kernel): (B, L, H, Dh) in q's dtype. The bias is materialised in
    float32 (float64 for float64 input) and the attention computed in that precision."""
    _check_inputs(q, k, v, dy, dx)
    B, L, H, _ = q.shape
    compute = torch.promote_types(q.dtype, torch.float32)
    bias = (dy.to(compute).unsqueeze(-1) + dx.to(compute).unsqueeze(-2)).reshape(B, H, L, -1)  # n = y * Wf + x
    out = F.scaled_dot_product_attention(
        q.to(compute).transpose(1, 2), k.to(compute).transpose(1, 2), v.to(compute).transpose(1, 2), attn_mask=bias
    ).transpose(1, 2)
    return out.to(q.dtype).contiguous()


if HAS_TRITON:

    @triton.jit
    def _rpb_attention_kernel(
        q_ptr, k_ptr, v_ptr, dy_ptr, dx_ptr, out_ptr, part_o_ptr, part_lse_ptr,
        L, H, Hf, Wf, x_tiles, n_tiles, tiles_per_split, qk_scale,
        sqb, sqm, sqh, skb, skn, skh, svb, svn, svh,
        sdyb, sdyh, sdyl, sdyy, sdxb, sdxh, sdxl, sdxx,
        SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        DH: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    ):
        # Grid (cdiv(L, BLOCK_M), B * H, splits): BLOCK_M queries of one (batch, head) against the
        # key tiles [pid_s * tiles_per_split, (pid_s + 1) * tiles_per_split). A key tile is a
        # ROWS x COLS block of the feature grid (tile t = (t // x_tiles, t % x_tiles)), flattened
        # row-major to BLOCK_N = ROWS * COLS keys.
        BLOCK_N: tl.constexpr = ROWS * COLS
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        pid_s = tl.program_id(2)
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        dtype = q_ptr.dtype.element_ty
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DH)
        offs_r = tl.arange(0, ROWS)
        offs_c = tl.arange(0, COLS)
        tile_r = tl.arange(0, BLOCK_N) // COLS  # row, column of each key inside a tile
        tile_c = tl.arange(0, BLOCK_N) % COLS
        m_mask = offs_m < L

        q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                    mask=m_mask[:, None], other=0.0)
        # Rows past L read row L - 1's factors (in bounds; those rows are never stored).
        rows = tl.minimum(offs_m, L - 1)
        dy_rows = dy_ptr + b * sdyb + h * sdyh + rows[:, None] * sdyl
        dx_rows = dx_ptr + b * sdxb + h * sdxh + rows[:, None] * sdxl

        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        t_start = pid_s * tiles_per_split
        t_end = tl.minimum(t_start + tiles_per_split, n_tiles)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, DH), dtype=tl.float32)
        for t in range(t_start, t_end):
            y0 = (t // x_tiles) * ROWS
            x0 = (t % x_tiles) * COLS
            yy = y0 + tile_r
            xx = x0 + tile_c
            valid = (yy < Hf) & (xx < Wf)
            offs_n = yy * Wf + xx
            k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            # The tile's bias from ROWS + COLS factor values per query (not ROWS * COLS gathered
            # ones), broadcast to the score tile; in log2 units like the scores. Indices are clamped
            # into the grid: padded keys are masked below.
            by = tl.load(dy_rows + tl.minimum(y0 + offs_r, Hf - 1)[None, :] * sdyy).to(tl.float32)
            bx = tl.load(dx_rows + tl.minimum(x0 + offs_c, Wf - 1)[None, :] * sdxx).to(tl.float32)
            bias = tl.reshape(by[:, :, None] + bx[:, None, :], (BLOCK_M, BLOCK_N))
            s = tl.where(valid[None, :], s + bias * 1.4426950408889634, float("-inf"))
            # A tile's corner key (y0, x0) is always in the grid, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        o = acc / l_i[:, None]
        if SPLIT:
            row = (pid_s * tl.num_programs(1) + pid_bh).to(tl.int64) * L + offs_m
            tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=m_mask)
            tl.store(part_o_ptr + row[:, None] * DH + offs_d[None, :], o, mask=m_mask[:, None])
        else:
            dst = out_ptr + ((b * L + offs_m[:, None]) * H + h) * DH + offs_d[None, :]
            tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])



def choose_num_splits(programs: int, kv_tiles: int, n_sms: int, programs_per_sm: int = _PROGRAMS_PER_SM,
                      min_tiles: int = _MIN_TILES_PER_SPLIT) -> int:
    """KV splits for a grid of ``programs`` (query block, batch-head) pairs: enough for
    ``programs_per_sm`` programs on each of ``n_sms`` SMs, each split keeping >= ``min_tiles`` key
    tiles. SAM 3, B = 1 on 132 SMs: 32 pairs, 81 tiles of 64 keys -> 9 splits of 9 tiles."""
    want = cdiv(programs_per_sm * n_sms, programs)
    return max(1, min(want, kv_tiles // min_tiles))


def choose_tile_shape(Hf: int, Wf: int, block_n: int) -> Tuple[int, int]:
    """(ROWS, COLS) of a ``block_n``-key tile of the Hf x Wf grid: the fewest padded keys (tiles
    cover cdiv(Hf, ROWS) * ROWS x cdiv(Wf, COLS) * COLS cells), ties to wider rows (longer
    contiguous runs of keys). 72 x 72 with 64 keys: 8 x 8, no padding."""
    best = None
    cols = 1
    while cols <= block_n:
        rows = block_n // cols
        cells = cdiv(Hf, rows) * rows * cdiv(Wf, cols) * cols
        if best is None or cells <= best[0]:
            best = (cells, rows, cols)
        cols *= 2
    return best[1], best[2]


def _rpb_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dy: Tensor,
    dx: Tensor,
    out: Optional[Tensor] = None,
    block_m: int = DEFAULT_TILE[0],
    block_n: int = DEFAULT_TILE[1],
    num_splits: Optional[int] = None,
    num_warps: int = DEFAULT_TILE[2],
    num_stages: int = DEFAULT_TILE[3],
    tile_cols: Optional[int] = None,
) -> Tensor:
    """Launcher. ``out`` may be a preallocated contiguous (B, L, H, Dh) tensor of q's dtype (every
    element is written). ``num_splits`` None picks one from the SM count (1 off CUDA); the number
    launched may be lower so that no split is empty. ``block_m``/``block_n`` powers of two >= 16;
    ``tile_cols`` (a power of two dividing ``block_n``) forces the key tile's width, None picks it
    with ``choose_tile_shape``."""
    require_triton("rpb_attention")
    _check_inputs(q, k, v, dy, dx)
    if q.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float32/bfloat16/float16, got {q.dtype}")
    B, L, H, Dh = q.shape
    Hf, Wf = dy.shape[3], dx.shape[3]
    if Dh not in _KERNEL_HEAD_DIMS:
        raise ValueError(f"the Triton kernel takes head dims {_KERNEL_HEAD_DIMS}, got {Dh}")
    check_power_of_two("block_m", block_m, minimum=16)
    check_power_of_two("block_n", block_n, minimum=16)
    if tile_cols is None:
        rows, cols = choose_tile_shape(Hf, Wf, block_n)
    else:
        check_power_of_two("tile_cols", tile_cols)
        if tile_cols > block_n:
            raise ValueError(f"tile_cols must divide block_n={block_n}, got {tile_cols}")
        rows, cols = block_n // tile_cols, tile_cols
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    dev = q.device
    out = output_buffer(out, (B, L, H, Dh), q.dtype, dev)
    if B == 0:
        return out
    # Only the last dim must be contiguous: the projections' (B, *, D) -> (B, *, H, Dh) views pass as is.
    q, k, v = rows_contiguous(q, k, v)

    x_tiles = cdiv(Wf, cols)
    n_tiles = cdiv(Hf, rows) * x_tiles
    if num_splits is None:
        num_splits = 1
        if dev.type == "cuda":
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            num_splits = choose_num_splits(cdiv(L, block_m) * B * H, n_tiles, _sm_count(index))
    tiles_per_split = cdiv(n_tiles, min(num_splits, n_tiles))
    splits = cdiv(n_tiles, tiles_per_split)  # no split left empty
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding
    qk_scale = _LOG2E / math.sqrt(Dh)

    with device_guard(dev):
        if splits > 1:
            part_o = torch.empty((splits, B * H, L, Dh), dtype=torch.float32, device=dev)
            part_lse = torch.empty((splits, B * H, L), dtype=torch.float32, device=dev)
        else:
            part_o = part_lse = out  # unread
        _rpb_attention_kernel[(cdiv(L, block_m), B * H, splits)](
            q, k, v, dy, dx, out, part_o, part_lse,
            L, H, Hf, Wf, x_tiles, n_tiles, tiles_per_split, qk_scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dy.stride(0), dy.stride(1), dy.stride(2), dy.stride(3),
            dx.stride(0), dx.stride(1), dx.stride(2), dx.stride(3),
            SPLIT=splits > 1, DOT_PRECISION=dot_precision,
            DH=Dh, BLOCK_M=block_m, ROWS=rows, COLS=cols,
            num_warps=num_warps, num_stages=num_stages,
        )
        if splits > 1:
            merge_splits(part_o, part_lse, out, splits)
    return out


@torch.library.custom_op("sam3fast::rpb_attention", mutates_args=(), device_types="cuda")
def rpb_attention_op(q: Tensor, k: Tensor, v: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """``sam3fast::rpb_attention``: the Triton kernel on CUDA, ``rpb_attention_ref`` on CPU."""
    return _rpb_attention_triton(q, k, v, dy, dx)


rpb_attention_op.register_kernel("cpu")(rpb_attention_ref)


@rpb_attention_op.register_fake
def _rpb_attention_fake(q, k, v, dy, dx):
    return q.new_empty(q.shape)


# ---- typed entry point ------------------------------------------------------------------------


def rpb_attention_backend(q: Tensor) -> Tuple[str, str]:
    """("triton" | "reference", reason) for (B, L, H, Dh) queries of this device, dtype and head dim."""
    return attention_backend(q, _KERNEL_DTYPES, _KERNEL_HEAD_DIMS, env.FORCE_REFERENCE)


def rpb_attention(q: Tensor, k: Tensor, v: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Attention with the separable boxRPB bias ``dy[b, h, l, n // Wf] + dx[b, h, l, n % Wf]``, after
    the projections.

    q (B, L, H, Dh); k, v (B, N, H, Dh) with N = Hf * Wf; dy (B, H, L, Hf); dx (B, H, L, Wf).
    Returns (B, L, H, Dh) in q's dtype; see ``sam3fast.kernels.rpb_attention`` for the math.
    """
    if rpb_attention_backend(q)[0] == "triton":
        return torch.ops.sam3fast.rpb_attention(q, k, v, dy, dx)
    return rpb_attention_ref(q, k, v, dy, dx)
