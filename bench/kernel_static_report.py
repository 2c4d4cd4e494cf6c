"""Static sm_90 report of every Triton kernel in kernels/ at SAM 3's full sizes, compiled without a GPU.

Not a benchmark: nothing runs. Each case calls a kernel module's own launcher on CPU tensors of the
real shapes (bf16, the launcher's default tile) under ``sam3fast.kernels._static_build.capture``,
which compiles every launch for sm_90 (H100) with the specialisation Triton's launcher would derive
from those arguments (16-byte pointer alignment, integers divisible by 16) and records it instead
of running it. Split counts that a launcher picks from the GPU's SM count are passed explicitly, as
the module's own chooser gives them for an H100's 132 SMs. One row per launch:

  case, kernel, grid (as launched), warps, stages
  regs          registers per thread (ptxas, via cuobjdump -res-usage)
  stack         local-memory bytes per thread (register spills or stack arrays)
  smem KiB      shared memory per block (Triton's dynamic allocation; sm_90 allows 227 KiB)
  instrs        SASS instructions in the binary (not executed counts)
  wgmma, mma    Hopper warpgroup MMA (HGMMA) / per-warp MMA (HMMA) instructions
  cp_async      LDGSTS: asynchronous global -> shared copies (software-pipelined loads)
  spill_st/ld   STL / LDL instructions
  loop instrs   instructions inside loops (backward-branch ranges; conditional blocks included)
  loop spills   STL + LDL inside loops: those cost on every iteration, the others once
  barriers      BAR instructions
  loop bars     BAR inside loops, and loop shared: shared-memory loads/stores inside loops; in a
                kernel that stages no operand in shared memory on purpose (no tl.dot), those are
                register layout conversions paid every iteration (the slow spot of three kernels
                the H200 profiled in run 2 of 2026-11-27)
  atomics       ATOM, ATOMG, ATOMS + RED, REDG instructions (as ``sass_stats`` counts them)

Cases (the shapes the engine runs; see each kernel module's docstring):
  memory_attention  the tracker's memory attention, 1 head of 256, 72 x 72 = 5184 queries: cross
                    (7 memory frames x 5184 + 64 object-pointer tokens, key validity mask), self
                    (5184 keys, RoPE on q and k), and the value fold (v = the 64-wide memory shared by
                    the head) at the default tile and 128 x 64 w8 s2; at 1 and 16 objects (from
                    ``SDPA_MIN_BATCH_HEADS`` objects the op hands a bf16 call to SDPA on CUDA: the
                    16-object rows are the Triton path that SDPA replaces); "rotated" rows: the
                    module's calls since ``rope_projection`` (q and keys arrive rotated: no RoPE in
                    the kernel, no prepass), cross / self / fold at both tiles
  rpb_attention     the DETR decoder's image cross-attention: 200 + 1 queries, 5184 keys, 8 heads of 32
  prompt_cross_attention  the fusion encoder's image -> prompt step: 5184 queries, 33 and 64 prompt
                    tokens, D 256, 8 heads
  two_way           the SAM mask decoder: token -> image (+ merge) and image -> token, 8 tokens, 8 heads,
                    internal width 128, 5184 image tokens, at 1 and 16 objects; layer 0 reading the NCHW
                    image embedding as a transposed view, later layers a contiguous (B, S, D) tensor, and
                    the tracker's call (image and positions both contiguous, in both layers)
  residual_norm     the ViT trunk's fused residual add + LayerNorm, 72 x 72 x 1024: the add after a
                    window block's attention (window order in), after a global one, and the add +
                    norm1 before a window block (window order out)
  fused_linear      the trunk's linears with their epilogues, one GEMM each (off by default): the MLP's
                    fc1 + GELU (5184 x 1024 -> 4736) and the attention's qkv + RoPE of q, k (1024 ->
                    3072, window and global blocks)
  rope              the ViT trunk's q, k RoPE: window blocks (9 x 576 tokens) and global blocks (5184),
                    the strided qkv[:, :, :2] view of 16 heads of 64
  dwconv_norm       the memory encoder's CXBlock head: depthwise 7 x 7 + LayerNorm of (B, 256, 72, 72) at 1
                    and 16 objects, NCHW and channels-last input
  mask_postprocess  64 objects 288 x 288 -> 1080 x 1920, without and with non-overlap, list and scan
                    schedules (+ the positive-box pre-kernel and the finalize kernel)
  mask_for_memory   16 objects 288 -> 1008 -> 1152, sigmoid and binarized
  layer_norm2d      the mask downsampler's LayerNorm2d + GELU at 16 objects (4 x 576^2, 16 x 288^2, 64 x 144^2)
  group_norm        the pixel decoder's GroupNorm(8) + ReLU at 144^2 and 288^2 (statistics, apply)
  rpb_factors       the decoder's boxRPB factors, 200 queries, one axis of 72 (float32)
  conv_norm_gelu    the mask downsampler's first two stages at 16 objects (1 -> 4 from 1152^2,
                    4 -> 16 from 576^2): conv 3 x 3 stride 2 + LayerNorm2d + GELU
  rope_projection   the memory attention's projections with RoPE in the epilogue at 16 objects: the
                    cross-attention's keys (7 frames + 64 pointer tokens, 64 -> 256) and a query
                    (5184 x 256 -> 256)
  connected_components  16 masks of 288 x 288: init, merge, count, gather

    env -u TRITON_INTERPRET OMP_NUM_THREADS=1 python bench/kernel_static_report.py
    env -u TRITON_INTERPRET python bench/kernel_static_report.py --no-write --cases memory_attention rope
    env -u TRITON_INTERPRET python bench/kernel_static_report.py --list

Writes bench/results/kernel_static_sm90_<date>.{json,md} (``--out`` for another stem, ``--no-write``
to only print). A case whose launcher or build raises becomes an error row with the exception
printed; the others go on. Compiles are cached by Triton (~/.triton/cache): a second run is faster.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench/_common.py, also when run through runpy

from _common import RESULTS, triton_version, write_results  # noqa: E402

H100_SMS = 132
SM90_SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
DTYPE = torch.bfloat16
OBJECTS = (1, 16)  # tracked objects: one, and a crowded scene
VIDEO_HW = (1080, 1920)  # the mask post-processing's output frame
POSTPROCESS_OBJECTS = 64  # as bench_mask_postprocess.py
NOTE = ("static: compiled without a GPU by sam3fast.kernels._static_build; instruction counts are in the "
        "binary, not executed counts; not timings")

# (column, row key, printed width; negative: left-aligned text) of the table; the markdown has the same.
COLUMNS = [
    ("case", "case", -44), ("kernel", "kernel", -32), ("grid", "grid", -12), ("warps", "warps", 5),
    ("stages", "stages", 6), ("regs", "regs", 4), ("stack", "stack", 5), ("smem KiB", "smem_kib", 8),
    ("instrs", "instructions", 6), ("wgmma", "wgmma", 5), ("mma", "mma", 4), ("cp_async", "cp_async", 8),
    ("spill_st", "spill_stores", 8), ("spill_ld", "spill_loads", 8), ("loop instrs", "loop_instructions", 11),
    ("loop spills", "loop_spills", 11), ("barriers", "barriers", 8), ("loop bars", "loop_barriers", 9),
    ("loop shared", "loop_shared", 11), ("atomics", "atomics", 7), ("notes", "notes", 0),
]


@dataclass
class Case:
    """One launcher call: ``kernels`` are every @triton.jit kernel it launches (all must be captured:
    an uncaptured launch would look for a GPU driver)."""

    name: str
    kernels: tuple
    launch: Callable[[], None]


def _empty(*shape, dtype=DTYPE):
    return torch.empty(shape, dtype=dtype)


def _nchw_tokens(B, D, g):
    """(B, g*g, D) view of an NCHW (B, D, g, g) map, channel stride g*g: how the SAM mask decoder
    hands its image embedding and dense PE to the two-way kernels."""
    return _empty(B, D, g, g).flatten(2).transpose(1, 2)


def build_cases() -> List[Case]:
    """Every case, inputs built lazily (only the cases selected allocate, and ``torch.empty`` of the
    full sizes touches no memory)."""
    from sam3fast.config import get_config
    from sam3fast.kernels import (
        _split_kv, connected_components as cc, conv_norm_gelu as cng, dwconv_norm as dn, group_norm as gn,
        layer_norm2d as ln2d, mask_for_memory as mfm, mask_postprocess as mp, fused_linear as fl,
        memory_attention as ma, prompt_cross_attention as pca, residual_norm as rn, rope as rp,
        rope_projection as rproj, rpb_attention as rpb, rpb_factors as rf, two_way_attention as tw,
    )
    from sam3fast.kernels._triton_compat import cdiv
    from sam3fast.model.vit import compute_axial_cis

    cfg = get_config("sam3")
    g = cfg.feat_size  # 72
    L = g * g  # 5184 image tokens / memory-frame tokens
    D = cfg.d_model  # 256
    trk = cfg.tracker
    # Object pointers: each 256-wide pointer is split into D / mem_dim tokens of mem_dim channels.
    n_ptr_tokens = trk.max_obj_ptrs_in_encoder * (D // trk.mem_dim)  # 16 x 4 = 64
    S_mem = trk.num_maskmem * L + n_ptr_tokens  # 7 x 5184 + 64 = 36352
    many = OBJECTS[-1]
    cases: List[Case] = []

    # ---- memory attention: 1 head of D, RoPE inside --------------------------------------------
    ma_kernels = (ma._memory_attention_kernel, ma._tile_list_kernel, ma._rope_keys_kernel,
                  _split_kv._merge_splits_kernel)

    def ma_rope():  # (L, Dh / 2, 2) float32 (cos, sin), the tracker's table (theta 1e4)
        return torch.view_as_real(compute_axial_cis(D, g, g, 10000.0)).float()

    def ma_case(B, S, n_rope, has_valid, v_width, tile=None, rotated=False):
        bm, bn, nw, ns = tile or ma.DEFAULT_TILE
        splits = ma.choose_num_splits(cdiv(L, bm) * B, cdiv(S, bn), H100_SMS)

        def launch():
            q = _empty(B, L, D).view(B, L, 1, D)  # q_proj(x).view(B, L, H, Dh)
            k = _empty(B, S, D).view(B, S, 1, D)
            if v_width == D:
                v = _empty(B, S, D).view(B, S, 1, D)
            else:  # the value fold: the raw memory, expanded over the heads as RoPEAttention does
                v = _empty(B, S, v_width).unsqueeze(2).expand(B, S, 1, v_width)
            valid = torch.ones(B, S, dtype=torch.bool) if has_valid else None
            # rotated: the module's call since rope_projection (q and k projected already rotated)
            ma._memory_attention_triton(q, k, v, ma_rope(), valid, not rotated, 0 if rotated else n_rope,
                                        block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, num_splits=splits)

        return launch

    for B in OBJECTS:
        cases.append(Case(f"memory_attention cross B={B}", ma_kernels, ma_case(B, S_mem, trk.num_maskmem * L, True, D)))
    for B in OBJECTS:
        cases.append(Case(f"memory_attention self B={B}", ma_kernels, ma_case(B, L, L, False, D)))
    for tile in (None, (128, 64, 8, 2)):
        label = "" if tile is None else " {}x{} w{} s{}".format(*tile)
        for B in OBJECTS:
            cases.append(Case(f"memory_attention fold{label} B={B}", ma_kernels,
                              ma_case(B, S_mem, trk.num_maskmem * L, True, trk.mem_dim, tile)))
    # the module's calls with RoPEAttention.fuse_rope_projection (the default on CUDA in bf16): q and
    # the keys arrive rotated, so neither the in-kernel q rotation nor the key prepass runs
    for tile in (None, (128, 64, 8, 2)):
        label = "" if tile is None else " {}x{} w{} s{}".format(*tile)
        for B in OBJECTS:
            cases.append(Case(f"memory_attention rotated cross{label} B={B}", ma_kernels,
                              ma_case(B, S_mem, trk.num_maskmem * L, True, D, tile, rotated=True)))
            cases.append(Case(f"memory_attention rotated self{label} B={B}", ma_kernels,
                              ma_case(B, L, L, False, D, tile, rotated=True)))
            cases.append(Case(f"memory_attention rotated fold{label} B={B}", ma_kernels,
                              ma_case(B, S_mem, trk.num_maskmem * L, True, trk.mem_dim, tile, rotated=True)))

    # ---- boxRPB attention: the DETR decoder's image cross-attention -----------------------------
    def rpb_launch():
        H, Lq = cfg.num_heads, cfg.num_queries + 1  # 8 heads; 200 queries + the presence token
        q = _empty(1, Lq, D).view(1, Lq, H, D // H)
        k = _empty(1, L, D).view(1, L, H, D // H)
        v = _empty(1, L, D).view(1, L, H, D // H)
        dy, dx = _empty(1, H, Lq, g), _empty(1, H, Lq, g)  # Decoder.rpb_factors: contiguous
        rows, cols = rpb.choose_tile_shape(g, g, rpb.DEFAULT_TILE[1])
        splits = rpb.choose_num_splits(cdiv(Lq, rpb.DEFAULT_TILE[0]) * H, cdiv(g, rows) * cdiv(g, cols), H100_SMS)
        rpb._rpb_attention_triton(q, k, v, dy, dx, num_splits=splits)

    cases.append(Case("rpb_attention B=1", (rpb._rpb_attention_kernel, _split_kv._merge_splits_kernel), rpb_launch))

    # ---- prompt cross-attention: the fusion encoder's image -> prompt step ----------------------
    def pca_case(P):
        def launch():
            kv = _empty(1, P, 2 * D)  # one GEMM; k and v are its two halves (views)
            in_w, in_b = _empty(3 * D, D), _empty(3 * D)
            pca._prompt_cross_attention_triton(
                _empty(1, L, D), kv[..., :D], kv[..., D:], torch.zeros(1, P, dtype=torch.bool), _empty(D), _empty(D),
                1e-5, in_w[:D], in_b[:D], _empty(D, D), _empty(D), cfg.num_heads)

        return launch

    text_and_geo = cfg.text.context_length + 1  # 32 text tokens + the geometry encoder's CLS
    for P in (text_and_geo, 64):
        cases.append(Case(f"prompt_cross_attention P={P}", (pca._prompt_cross_attention_kernel,), pca_case(P)))

    # ---- two-way attention: the SAM mask decoder -------------------------------------------------
    T, H2, C = 8, cfg.num_heads, D // 2  # tracking: 6 output tokens + 2 prompt tokens; downsample rate 2
    t2i_kernels = (tw._token_to_image_attention_kernel, tw._token_to_image_merge_kernel)

    def image_of(B, layout):
        return _nchw_tokens(B, D, g) if layout == "nchw" else _empty(B, L, D)

    def pe_of(layout):  # the tracker passes its positions contiguous (1, L, D), as its image
        return _empty(1, L, D) if layout == "tracker" else _nchw_tokens(1, D, g)

    def t2i_case(B, layout, T=T, H2=H2, C=C):  # bound now, not read when the case runs
        def launch():
            splits = tw.choose_t2i_splits(B, cdiv(L, tw.DEFAULT_T2I_TILE[0]), H100_SMS)
            tw._token_to_image_attention_triton(
                _empty(B, T, C), image_of(B, layout), pe_of(layout), _empty(C, D), _empty(C), _empty(C, D),
                _empty(C), H2, num_splits=splits)

        return launch

    def i2t_case(B, layout, T=T, H2=H2, C=C):
        def launch():
            tw._image_to_token_attention_triton(
                image_of(B, layout), pe_of(layout), _empty(C, D), _empty(C), _empty(B, T, C), _empty(B, T, C),
                _empty(D, C), _empty(D), _empty(D), _empty(D), 1e-5, H2)

        return launch

    # the tracker's mask decoder (static model build, session 20): image and positions contiguous in
    # both layers; the NCHW-view rows are the layer-0 layout of a decoder fed the embedding as is
    for B in OBJECTS:
        for layout, where in (("nchw", "layer 0, NCHW view"), ("contig", "layer 1+, contiguous"),
                              ("tracker", "tracker: image and positions contiguous")):
            cases.append(Case(f"two_way t2i B={B} ({where})", t2i_kernels, t2i_case(B, layout)))
        for layout, where in (("nchw", "layer 0, NCHW view"), ("contig", "layer 1, contiguous"),
                              ("tracker", "tracker: image and positions contiguous")):
            cases.append(Case(f"two_way i2t B={B} ({where})", (tw._image_to_token_attention_kernel,),
                              i2t_case(B, layout)))

    # ---- RoPE of the ViT trunk -----------------------------------------------------------------
    vit = cfg.vit
    hd = vit.embed_dim // vit.num_heads

    def rope_case(B, side, scale):
        def launch():
            qkv = _empty(B, side * side, 3, vit.num_heads, hd)
            rope = torch.view_as_real(compute_axial_cis(hd, side, side, scale_pos=scale)).float()
            rp._rope_triton(qkv[:, :, :2], rope)

        return launch

    n_windows = (g // vit.window_size) ** 2
    cases.append(Case(f"rope window B={n_windows} L={vit.window_size ** 2}", (rp._rope_kernel,),
                      rope_case(n_windows, vit.window_size, 1.0)))
    cases.append(Case(f"rope global B=1 L={L}", (rp._rope_kernel,), rope_case(1, g, vit.window_size / g)))

    # ---- the trunk's fused residual add + LayerNorm --------------------------------------------
    def rn_case(yw, ow):
        def launch():
            x = _empty(1, g, g, vit.embed_dim)
            rn._residual_norm_triton(x, _empty(*rn._window_shape(x, yw)), _empty(vit.embed_dim),
                                     _empty(vit.embed_dim), 1e-6, yw, ow)

        return launch

    w_side = vit.window_size
    for yw, ow, what in ((w_side, 0, "unwindow+add+norm2"), (0, 0, "add+norm2"), (0, w_side, "add+norm1+window")):
        cases.append(Case(f"residual_norm {what} {g}x{g}x{vit.embed_dim}", (rn._residual_norm_kernel,),
                          rn_case(yw, ow)))

    # ---- the trunk's linears with their epilogues (off by default) -----------------------------
    hidden, E = int(vit.embed_dim * vit.mlp_ratio), vit.embed_dim

    def lg_case():
        fl._linear_gelu_triton(_empty(1, g, g, E), _empty(hidden, E), _empty(hidden))

    def lr_case(B, side, scale):
        def launch():
            rope = torch.view_as_real(compute_axial_cis(hd, side, side, scale_pos=scale)).float()
            fl._linear_rope_triton(_empty(B, side * side, E), _empty(3 * E, E), _empty(3 * E), rope, vit.num_heads)

        return launch

    cases.append(Case(f"linear_gelu fc1 {L}x{E}->{hidden}", (fl._fused_linear_kernel,), lg_case))
    cases.append(Case(f"linear_rope qkv window B={n_windows} L={vit.window_size ** 2}", (fl._fused_linear_kernel,),
                      lr_case(n_windows, vit.window_size, 1.0)))
    cases.append(Case(f"linear_rope qkv global B=1 L={L}", (fl._fused_linear_kernel,),
                      lr_case(1, g, vit.window_size / g)))

    # ---- the memory encoder's depthwise 7x7 convolution + LayerNorm (CXBlock) ------------------
    def dn_case(B, channels_last):
        def launch():
            x = _empty(B, D, g, g)
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            dn._dwconv_norm_triton(x, _empty(D, 1, 7, 7), _empty(D), _empty(D), _empty(D), 1e-6)

        return launch

    for B in OBJECTS:
        for channels_last in (False, True):
            cases.append(Case(f"dwconv_norm B={B} {D}x{g}x{g} k7 {'channels-last' if channels_last else 'NCHW'}",
                              (dn._dwconv_norm_kernel if channels_last else dn._dwconv_norm_cf_kernel,),
                              dn_case(B, channels_last)))

    # ---- mask post-processing: 64 objects to a 1080p frame ------------------------------------
    low = 4 * g  # 288

    def mp_case(non_overlap, schedule):
        def launch():
            N = POSTPROCESS_OBJECTS
            mp._mask_postprocess_triton(_empty(N, low, low), _empty(N, dtype=torch.float32),
                                        torch.ones(N, dtype=torch.bool), *VIDEO_HW, non_overlap, schedule=schedule)

        return launch

    mp_main = {"list": mp._mask_postprocess_list_kernel, "scan": mp._mask_postprocess_kernel}
    for schedule in mp.SCHEDULES:
        for non_overlap in (False, True):
            cases.append(Case(f"mask_postprocess N={POSTPROCESS_OBJECTS} non_overlap={non_overlap} {schedule}",
                              (mp._positive_box_kernel, mp_main[schedule], mp._finalize_kernel),
                              mp_case(non_overlap, schedule)))

    # ---- mask for memory: 288 -> 1008 -> 1152 --------------------------------------------------
    def mfm_case(binarize):
        def launch():
            mfm._mask_for_memory_triton(_empty(many, 1, low, low), (cfg.resolution,) * 2, (trk.mem_interpol_size,) * 2,
                                        20.0, -10.0, binarize, DTYPE)

        return launch

    for binarize in (False, True):
        cases.append(Case(f"mask_for_memory B={many} binarize={binarize}", (mfm._mask_for_memory_kernel,),
                          mfm_case(binarize)))

    # ---- the mask downsampler's LayerNorm2d (+ GELU) and the pixel decoder's GroupNorm (+ ReLU) --
    # (its own loop names: the two-way cases' launch closures read T, H2 and C when they run, and a
    # loop rebinding C here once built every two-way row at C = 64 instead of the model's 128)
    for ch, side in ((4, 576), (16, 288), (64, 144)):
        cases.append(Case(f"layer_norm2d B={many} {ch}x{side}x{side} + GELU", (ln2d._layer_norm2d_kernel,),
                          lambda ch=ch, side=side: ln2d._layer_norm2d_triton(
                              _empty(many, ch, side, side), _empty(ch), _empty(ch), 1e-6, gelu=True)))
    for side in (144, 288):
        cases.append(Case(f"group_norm 1x{D}x{side}x{side} + ReLU", (gn._group_stats_kernel, gn._group_apply_kernel),
                          lambda side=side: gn._group_norm_triton(_empty(1, D, side, side), _empty(D), _empty(D), 8,
                                                                  1e-5, relu=True)))

    # ---- the mask downsampler's first two stages: conv 3 x 3 stride 2 + LayerNorm2d + GELU ------
    for ci, co, side in ((1, 4, trk.mem_interpol_size), (4, 16, trk.mem_interpol_size // 2)):
        cases.append(Case(f"conv_norm_gelu B={many} {ci}->{co} from {side}x{side}", (cng._conv_norm_gelu_kernel,),
                          lambda ci=ci, co=co, side=side: cng._conv_norm_gelu_triton(
                              _empty(many, ci, side, side), _empty(co, ci, 3, 3), _empty(co), _empty(co), _empty(co),
                              1e-6, 2)))

    # ---- the memory attention's projections with RoPE in the epilogue, 16 objects ---------------
    mem_table = torch.view_as_real(compute_axial_cis(D, g, g)).float()
    n_frames_rot = trk.num_maskmem * g * g
    for name, S, K, n_rope in (("keys", n_frames_rot + 64, trk.mem_dim, n_frames_rot), ("queries", g * g, D, g * g)):
        cases.append(Case(f"rope_projection B={many} {name} S={S} {K}->{D}", (rproj._rope_projection_kernel,),
                          lambda S=S, K=K, n_rope=n_rope: rproj._rope_projection_triton(
                              _empty(many, S, K), _empty(D, K), _empty(D), mem_table, n_rope, 1)))

    # ---- the decoder's boxRPB factors (float32 island): 200 queries, one axis of 72 --------------
    cases.append(Case("rpb_factors Q=200 n=72", (rf._rpb_factors_kernel,),
                      lambda: rf._rpb_factors_triton(_empty(1, 200, 4, dtype=torch.float32), g,
                                                     *(_empty(*sh, dtype=torch.float32)
                                                       for sh in ((D, 2), (D,), (8, D), (8,))), 1)))

    # ---- connected components: hole filling at 288 x 288 ---------------------------------------
    cc_kernels = (cc._cc_init_kernel, cc._cc_merge_kernel, cc._cc_count_kernel, cc._cc_gather_kernel)
    cases.append(Case(f"connected_components N={many}", cc_kernels,
                      lambda: cc._connected_component_sizes_triton(torch.zeros(many, low, low, dtype=torch.bool))))
    return cases


def _grid(grid) -> str:
    return "x".join(str(int(x)) for x in grid) if isinstance(grid, (tuple, list)) else str(grid)


def _notes(st: dict) -> str:
    notes = []
    if st["smem"] > SM90_SMEM_LIMIT:
        notes.append(f"smem above sm_90's {SM90_SMEM_LIMIT // 1024} KiB: the launch would fail")
    if st["loop_spills"]:
        notes.append("spills in a loop")
    elif st["spill_stores"] or st["stack"]:
        notes.append("spills outside loops")
    return "; ".join(notes)


def build_rows(case: Case, sass_stats) -> List[dict]:
    """Rows of one case's launches; raises what the launcher or a build raised."""
    from sam3fast.kernels._static_build import capture

    with capture(*case.kernels) as builds:
        case.launch()
    if not builds:
        raise RuntimeError("the launcher launched no captured kernel")
    rows = []
    for b in builds:
        st = sass_stats(b.kernel)
        rows.append({
            "case": case.name, "kernel": b.name, "grid": _grid(b.grid),
            "warps": b.kernel.metadata.num_warps, "stages": b.kernel.metadata.num_stages,
            "regs": st["regs"], "stack": st["stack"], "smem_kib": round(st["smem"] / 1024, 1),
            "instructions": st["instructions"], "wgmma": st["wgmma"], "mma": st["mma"], "cp_async": st["cp_async"],
            "spill_stores": st["spill_stores"], "spill_loads": st["spill_loads"],
            "loop_instructions": st["loop_instructions"], "loop_spills": st["loop_spills"], "barriers": st["barriers"],
            "loop_barriers": st["loop_barriers"], "loop_shared": st["loop_shared"],
            "atomics": st["atomics"] + st["reductions_to_memory"], "notes": _notes(st), "error": None,
        })
    return rows


def _cells(row: dict) -> List[str]:
    if row["error"] is not None:
        return [row["case"], "ERROR"] + ["-"] * (len(COLUMNS) - 3) + [row["error"]]
    return [str(row[key]) for _, key, _ in COLUMNS]


def _print_row(cells: Sequence[str]) -> None:
    print("  ".join(c.ljust(-w) if w < 0 else c.rjust(w) for (_, _, w), c in zip(COLUMNS, cells)).rstrip())


def header() -> dict:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "target": "sm_90 (NVIDIA H100)",
        "compiled on": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), no GPU",
        "dtype": str(DTYPE).replace("torch.", ""),
        "tiles": "each launcher's default; split counts from the module's chooser for an H100's "
                 f"{H100_SMS} SMs",
        "note": NOTE,
        "columns": "regs per thread; stack = local-memory bytes per thread; smem = shared memory per "
                   "block (KiB); instrs = SASS instructions; wgmma = HGMMA, mma = HMMA, cp_async = LDGSTS, "
                   "spill_st/ld = STL/LDL, loop instrs / loop spills = instructions / STL + LDL inside loops, "
                   "barriers = BAR, atomics = ATOM(G/S) + RED(G)",
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=None, metavar="SUBSTRING",
                   help="only the cases whose name contains one of these substrings")
    p.add_argument("--list", action="store_true", help="list the case names and exit")
    p.add_argument("--no-write", action="store_true", help="only print the table")
    p.add_argument("--out", default=None,
                   help="results path stem (default bench/results/kernel_static_sm90_<date>); .json and .md are added")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("static builds need the real Triton compiler: run with `env -u TRITON_INTERPRET python "
                "bench/kernel_static_report.py` (the kernel modules read TRITON_INTERPRET when imported)")

    cases = build_cases()
    if args.cases:
        cases = [c for c in cases if any(s in c.name for s in args.cases)]
        if not cases:
            p.error(f"no case name contains any of {args.cases}")
    if args.list:
        print("\n".join(c.name for c in cases))
        return

    from sam3fast.kernels._static_build import sass_stats

    h = header()
    print("# kernel static report (sm_90)")
    for k, v in h.items():
        print(f"# {k}: {v}")
    _print_row([name for name, _, _ in COLUMNS])
    rows, errors = [], 0
    t0 = time.perf_counter()
    for case in cases:
        try:
            case_rows = build_rows(case, sass_stats)
        except Exception as e:  # noqa: BLE001  a report row, not a fallback: the exception is printed
            errors += 1
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            if "active drivers" in msg:  # Triton looked for a GPU: a launch this case did not capture
                msg += " (a kernel the launcher launches is missing from the case's capture list)"
            case_rows = [{"case": case.name, "error": msg.replace("|", "/")[:200]}]
            _print_row(_cells(case_rows[0]))
            print("\n".join("#   " + line for line in traceback.format_exc().rstrip().splitlines()))
        else:
            for r in case_rows:
                _print_row(_cells(r))
        rows.extend(case_rows)
    builds = sum(r.get("error") is None for r in rows)
    print(f"# {len(cases)} cases, {builds} launches built, {errors} errors, {time.perf_counter() - t0:.0f} s")

    if not args.no_write:
        stem = args.out or os.path.join(RESULTS, f"kernel_static_sm90_{datetime.date.today()}")
        if stem.endswith(".md"):
            stem = stem[:-3]
        write_results("kernel_static_sm90", h, rows, [name for name, _, _ in COLUMNS], _cells, stem)
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
