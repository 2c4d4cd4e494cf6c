"""Benchmark of the tracker's memory attention (``sam3fast::memory_attention``), after the projections.

Shapes (SAM 3): 1 head of Dh 256, Lq = L = 72 x 72 = 5184 queries, S = frames x 5184 memory tokens
plus 4 tokens per object pointer; B objects. Rows, each timed on the same inputs:
  op (...)               ``sam3fast::memory_attention`` as the model calls it: the Triton kernel, or
                         for many objects in bf16 the "sdpa path" (``ma.uses_sdpa_path``)
  triton ...             the kernel's launcher: default tiles (split-KV chosen from the SM count), a
                         sweep of (BLOCK_M, BLOCK_N, warps, stages), the eager rescale of the online
                         softmax against the default lazy one, invalid keys masked but not skipped,
                         and num_splits=1 (no flash decoding)
  sdpa path              RoPE prepass kernel on q and keys + SDPA with the mask, cuDNN first (GPU)
  eager                  the model's ``RoPEAttention`` with identity projections: ``apply_rope`` on q
                         and on the keys (table broadcast over frames), cat, SDPA with the mask
  compiled               torch.compile of that
  sdpa <backend>         the attention alone on already rotated q/k (RoPE not timed), forced to one
                         SDPA backend (flash / efficient / cudnn; math on CPU only); "unsupported"
                         where the backend refuses the inputs (flash takes no mask)
  xformers               ``memory_efficient_attention`` on rotated q/k with the mask as a bias, if installed
Value fold (cross-attention only; ``RoPEAttention.fold_value``): the values are the raw memory, Dv =
``--value-dim`` (64, mem_dim) wide instead of Dh, and v_proj is folded into out_proj:
  op fold (...)          the op with v (B, S, 1, Dv): Triton, or for many objects SDPA with cuDNN /
                         memory-efficient only, falling back to Triton if both refuse (``SDPA_REFUSED``)
  triton fold (Dv ..)    the launcher at the default tile and at tiles the BLOCK_M x Dv accumulator allows
  sdpa cudnn fold, sdpa efficient fold
                         the attention alone on rotated q/k with the Dv-wide values, one backend each
                         ("unsupported (...)" where it refuses)
  module unfolded / module fold
                         the whole cross-attention as the model runs it (``RoPEAttention`` with
                         kv_in_dim = Dv, random weights: q/k/v projections, attention, out_proj), without
                         and with the fold; the fold's derived (D, Dv) weight is included in its time;
                         q and k projected with RoPE in the epilogue (``sam3fast::rope_projection``,
                         "auto": CUDA bf16/fp16)
  sdpa cudnn (fold), no mask
                         (GPU, with a mask) cuDNN over every key without the mask: what the validity
                         mask of a fixed-capacity bank costs it (counted at S keys, a different result)
  module ..., rope prepass
                         the same with ``fuse_rope_projection = False``: the projections, then the
                         op's RoPE prepass over q and the keys
TFLOP/s counts the attention's FLOPs over the valid keys, 2 * B * H * Lq * S_valid * (Dh + Dv): QK^T at
Dh and PV at Dv, i.e. 4 * ... * Dh for the unfolded rows and Dh + Dv for the fold rows (the module
rows count their attention's only, not the projections). On a GPU the dense bf16 matmul rate
(8192^3) is measured too, and each row's share of it printed.

    python bench/bench_memory_attention.py                     # GPU: B = 1, 4, 16, 7 frames + 16 pointers, bf16
    python bench/bench_memory_attention.py --objects 1,4,16 --frames 10 --self
    python bench/bench_memory_attention.py --no-fold                  # without the value-fold rows
    python bench/bench_memory_attention.py --smoke             # CPU: tiny shapes, Triton interpreter, < 30 s

CPU numbers (``--smoke``) check that the script runs; they are not performance numbers.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench/_common.py, also when run through runpy

from _common import machine_header, print_header, time_ms, use_interpreter_without_cuda, write_results  # noqa: E402

use_interpreter_without_cuda()  # before the kernel import

import torch.nn.functional as F  # noqa: E402

from sam3fast.kernels import memory_attention as ma  # noqa: E402
from sam3fast.model.memory_attention import RoPEAttention  # noqa: E402
from sam3fast.model.vit import apply_rope, compute_axial_cis  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Chosen from sm_90 builds of the real launches
# (bench/kernel_static_report.py; 2026-11-26, after the loop was pipelined again): warp-instructions
# issued per (query, key) pair in the main loop (static count x warps / tile), 64x32 w4 0.97
# (eager rescale; ~0.75 lazy, its rescale block skipped), 64x64 w4 0.75, 128x32 w8 0.89, 128x64 w8
# 0.68. Tiles of 64 rows with 8 warps issue 1.2-1.8 and took 2-3x the default in the second H100 run
# (64x32 w8, 64x64 w8, 64x16 w8): no longer timed. 128x64 w8 s3 and wider need > 227 KiB of shared
# memory (no launch).
TILES = [ma.DEFAULT_TILE, (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2)]
# The value fold's tiles beside the default: its BLOCK_M x Dv float32 accumulator is 4x smaller at
# Dv 64, so wider tiles fit without spilling in the loop (same static builds: 64x32 w4 0.87
# warp-instructions per pair, 64x64 w4 0.64 with two blocks per SM, 128x64 w8 0.59, 64x128 w4 0.49,
# 128x128 w8 0.48 at 224 KiB of shared memory).
FOLD_TILES = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2)]


def make_eager(Dh):
    """``RoPEAttention.forward`` between the projections, as the model runs it: the model's module
    (one head) with identity projections. (B, L, 1, Dh) in and out."""
    m = RoPEAttention(Dh, 1)
    m.q_proj = m.k_proj = m.v_proj = m.out_proj = torch.nn.Identity()
    m.use_kernel = False  # the SDPA path, not the Triton kernel it dispatches to on CUDA

    def eager_rope_attention(q, k, v, freqs, key_valid, n_rope_keys):
        return m(q.flatten(2), k.flatten(2), v.flatten(2), freqs, k.shape[1] - n_rope_keys, key_valid).unflatten(2, (1, -1))

    return eager_rope_attention


def make_inputs(B, grid, Dh, frames, ptr_tokens, pad_frames, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = grid * grid
    S = frames * L + ptr_tokens
    q = torch.randn(B, L, 1, Dh, generator=g)
    k = torch.randn(B, S, 1, Dh, generator=g)
    v = torch.randn(B, S, 1, Dh, generator=g)
    key_valid = torch.ones(B, S, dtype=torch.bool)
    if pad_frames:
        key_valid[:, (frames - pad_frames) * L:frames * L] = False
    freqs = compute_axial_cis(Dh, grid, grid).to(device)
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, freqs, key_valid.to(device)


def dense_matmul_tflops(device, dtype):
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_ms(lambda: a @ b, device, 100) / 1e9


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items() if hasattr(SDPBackend, attr)}


def _xformers():
    try:
        import xformers.ops as xops

        return xops
    except ImportError:
        return None


def make_module_pair(Dh, Dv, device, dtype, seed=0):
    """The cross-attention as the model builds it (one head, kv_in_dim = Dv), random weights, and a
    float32 copy (the reference): (unfolded, folded, reference) sharing one state dict."""
    torch.manual_seed(seed)
    ref = RoPEAttention(Dh, 1, kv_in_dim=Dv).to(device).eval()
    unfolded = RoPEAttention(Dh, 1, kv_in_dim=Dv).to(device).eval()
    unfolded.load_state_dict(ref.state_dict())
    folded = RoPEAttention(Dh, 1, kv_in_dim=Dv, fold_value=True).to(device).eval()
    folded.load_state_dict(ref.state_dict())
    return unfolded.to(dtype), folded.to(dtype), ref


def fold_rows(B, args, device, dtype, q, k, v, rope, freqs, key_valid, n_rope, s_valid, ref, eager_out, qr, k_rot,
              mask, fold_tiles, label, q_rot, k_rot_op):
    """(candidates, gates, flops) of the value-fold rows: v is the first Dv columns of the unfolded
    rows' v, so the fp32 reference and PyTorch's error are those of the same columns there.
    ``q_rot`` / ``k_rot_op``: q and the keys rotated (the module's path: the op rotates nothing)."""
    Dh, Dv = q.shape[-1], args.value_dim
    v_fold = v[..., :Dv].contiguous()  # (B, S, 1, Dv), as the memory the folded module passes
    ref_fold = ref[..., :Dv]
    torch_err = (eager_out[..., :Dv].float() - ref_fold).abs().max().item()
    limit = 1e-4 if dtype == torch.float32 else 2 * torch_err
    cands, gates = {}, {}
    if device.type == "cuda":
        op = torch.ops.sam3fast.memory_attention
        op(q, k, v_fold, rope, key_valid, True, n_rope)  # settles the SDPA try (SDPA_REFUSED)
        key = (dtype, Dh, Dv)
        path = ("sdpa path" if key not in ma.SDPA_REFUSED else "triton, sdpa refused") if ma.uses_sdpa_path(q, Dv) \
            else "triton"
        if key in ma.SDPA_REFUSED:
            print(f"{label:24} op fold: SDPA refused Dv={Dv}: {ma.SDPA_REFUSED[key][:100]}")
        cands[f"op fold ({path}, defaults)"] = lambda: op(q, k, v_fold, rope, key_valid, True, n_rope)
    cands[f"triton fold (Dv {Dv}) default"] = (
        lambda: ma._memory_attention_triton(q, k, v_fold, rope, key_valid, True, n_rope))
    if args.tma and q.shape[2] == 1:
        cands[f"triton fold (Dv {Dv}) default, TMA loads"] = (
            lambda: ma._memory_attention_triton(q, k, v_fold, rope, key_valid, True, n_rope, use_tma=True))
    # the module's path since session 18: q and the keys rotated by their projections (see bench_shape)
    if device.type == "cuda":
        cands[f"op fold rotated ({path}, the module's path)"] = lambda: op(q_rot, k_rot_op, v_fold, rope, key_valid,
                                                                           False, 0)
    for bm, bn, nw, ns in fold_tiles:
        tile = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
        cands[f"triton fold (Dv {Dv}) {bm}x{bn} w{nw} s{ns} rotated"] = (
            lambda tile=tile: ma._memory_attention_triton(q_rot, k_rot_op, v_fold, rope, key_valid, False, 0, **tile))
    for bm, bn, nw, ns in fold_tiles:
        tile = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
        cands[f"triton fold (Dv {Dv}) {bm}x{bn} w{nw} s{ns}"] = (
            lambda tile=tile: ma._memory_attention_triton(q, k, v_fold, rope, key_valid, True, n_rope, **tile))
    for name in cands:
        gates[name] = (ref_fold, limit)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    vt = v_fold.transpose(1, 2)
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qr, k_rot, vt, attn_mask=mask)

        try:
            run()
        except RuntimeError as e:  # this backend refuses Dv != Dh (or the mask): a row saying so
            print(f"{label:24} sdpa {name} fold{' ' * (23 - len(name))} unsupported ({str(e).splitlines()[0][:80]})")
            continue
        cands[f"sdpa {name} fold (attention only)"] = run
    if mask is not None and device.type == "cuda":
        # what the mask costs cuDNN: the same call over every key, no mask (a different result; the
        # official per-frame memory passes no mask)
        def run_no_mask():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qr, k_rot, vt)

        try:
            run_no_mask()
            cands["sdpa cudnn fold, no mask (attention only, every key)"] = run_no_mask
        except RuntimeError as e:
            print(f"{label:24} sdpa cudnn fold, no mask    unsupported ({str(e).splitlines()[0][:80]})")

    # The whole cross-attention, folded vs not (projections included).
    g = torch.Generator().manual_seed(1)
    L, S = q.shape[1], k.shape[1]
    x = torch.randn(B, L, Dh, generator=g).to(device)
    mem_k, mem = (torch.randn(B, S, Dv, generator=g).to(device) for _ in range(2))
    unfolded, folded, ref_module = make_module_pair(Dh, Dv, device, dtype)
    T = S - n_rope
    with torch.no_grad():
        want = ref_module(x, mem_k, mem, freqs, T, key_valid)
        xd, mkd, md = (t.to(dtype) for t in (x, mem_k, mem))
        base_err = (unfolded(xd, mkd, md, freqs, T, key_valid).float() - want).abs().max().item()
    module_limit = 1e-4 * want.abs().max().item() if dtype == torch.float32 else 2 * base_err
    # (the q/k projections with RoPE in their epilogue, RoPEAttention.fuse_rope_projection "auto":
    # on CUDA in bf16/fp16; the "rope prepass" rows set it False: projections, then the op's prepass)
    unfused_rope = []
    for m in (unfolded, folded):
        m2 = copy.deepcopy(m)
        m2.fuse_rope_projection = False
        unfused_rope.append(m2)
    for name, m in (("module unfolded (proj + attention)", unfolded), ("module fold (proj + attention)", folded),
                    ("module unfolded, rope prepass (proj + attention)", unfused_rope[0]),
                    ("module fold, rope prepass (proj + attention)", unfused_rope[1])):
        cands[name] = torch.no_grad()(lambda m=m: m(xd, mkd, md, freqs, T, key_valid))
        gates[name] = (want, module_limit)
    flops = {name: 2 * B * 1 * L * (S if "no mask" in name else s_valid) * (Dh + Dv) for name in cands}
    for name in ("module unfolded (proj + attention)", "module unfolded, rope prepass (proj + attention)"):
        flops[name] = 4 * B * 1 * L * s_valid * Dh
    return cands, gates, flops


def bench_shape(B, self_attn, args, device, dtype, tiles, compile_backend, matmul_tflops, fold_tiles):
    grid, Dh = args.grid, args.head_dim
    L = grid * grid
    if self_attn:
        q, k, v, freqs, key_valid = make_inputs(B, grid, Dh, 1, 0, 0, dtype, device)
        key_valid, n_rope = None, L
    else:
        q, k, v, freqs, key_valid = make_inputs(B, grid, Dh, args.frames, args.ptr_tokens, args.pad_frames, dtype,
                                                device)
        n_rope = args.frames * L
    S = k.shape[1]
    rope = torch.view_as_real(freqs)
    s_valid = S if key_valid is None else (args.frames - args.pad_frames) * L + args.ptr_tokens
    flops = 4 * B * 1 * L * s_valid * Dh
    label = f"{'self' if self_attn else 'cross'} B={B} S={S}"

    # Accuracy gate before any time means something: the fp32 reference, and PyTorch in this dtype.
    ref = ma.memory_attention_ref(q.float(), k.float(), v.float(), rope, key_valid, True, n_rope)
    eager_rope_attention = make_eager(Dh)
    eager_out = eager_rope_attention(q, k, v, freqs, key_valid, n_rope)
    torch_err = (eager_out.float() - ref).abs().max().item()

    cands = {}
    if device.type == "cuda":
        op = torch.ops.sam3fast.memory_attention
        path = "sdpa path" if ma.uses_sdpa_path(q) else "triton"
        cands[f"op ({path}, defaults)"] = lambda: op(q, k, v, rope, key_valid, True, n_rope)
    for bm, bn, nw, ns in tiles:
        tile = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
        cands[f"triton {bm}x{bn} w{nw} s{ns}"] = (
            lambda tile=tile: ma._memory_attention_triton(q, k, v, rope, key_valid, True, n_rope, **tile))
    # The module's path since session 18 (RoPEAttention.fuse_rope_projection): q and the keys come
    # rotated from their projections and the op rotates nothing (ROPE_Q off: in the static sm_90
    # build the default tile's 42 spill stores drop to 1, and 128x64 w8 loses its 17 in-loop ones).
    # Rotated once here, outside the timing, as the projections would.
    q_rot, k_rot_op = ma._rope_prepass(q, rope, q.shape[1]), ma._rope_prepass(k, rope, n_rope)
    if device.type == "cuda":
        cands[f"op rotated ({path}, the module's path)"] = lambda: op(q_rot, k_rot_op, v, rope, key_valid, False, 0)
    for bm, bn, nw, ns in tiles:
        tile = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
        cands[f"triton {bm}x{bn} w{nw} s{ns} rotated"] = (
            lambda tile=tile: ma._memory_attention_triton(q_rot, k_rot_op, v, rope, key_valid, False, 0, **tile))
    # (the inline key RoPE, rope_k="inline", took 4.8x the prepass default in the second H100 run of
    # 2026-11-26 at B = 1 and 16: no longer timed)
    cands["triton default, eager rescale"] = (
        lambda: ma._memory_attention_triton(q, k, v, rope, key_valid, True, n_rope, lazy_rescale=False))
    if key_valid is not None:
        cands["triton default, invalid keys masked, not skipped"] = (
            lambda: ma._memory_attention_triton(q, k, v, rope, key_valid, True, n_rope, skip_invalid_tiles=False))
    cands["triton default, no split-KV"] = (
        lambda: ma._memory_attention_triton(q, k, v, rope, key_valid, True, n_rope, num_splits=1))
    if device.type == "cuda" and dtype != torch.float32:  # the op's many-objects path (ma.uses_sdpa_path)
        cands["sdpa path (rope prepass + sdpa, cudnn first)"] = (
            lambda: ma._memory_attention_sdpa(q, k, v, rope, key_valid, True, n_rope))
    cands["eager (rope + sdpa)"] = lambda: eager_rope_attention(q, k, v, freqs, key_valid, n_rope)
    if not args.no_compile:
        torch._dynamo.reset()
        comp = torch.compile(eager_rope_attention, fullgraph=True, backend=compile_backend)
        cands[f"compiled ({compile_backend})"] = lambda: comp(q, k, v, freqs, key_valid, n_rope)

    # The attention alone on rotated q/k, per SDPA backend (the rotation is done once, outside).
    qr = apply_rope(q, freqs).transpose(1, 2)
    k_rot = torch.cat((apply_rope(k[:, :n_rope].view(B, -1, L, 1, Dh).transpose(1, 2), freqs).transpose(1, 2)
                       .reshape(B, n_rope, 1, Dh), k[:, n_rope:]), dim=1).transpose(1, 2)
    vt = v.transpose(1, 2)
    mask = None if key_valid is None else key_valid[:, None, None, :]
    from torch.nn.attention import sdpa_kernel

    for name, backend in _sdpa_backends().items():
        if name == "math" and device.type == "cuda":
            continue  # materialises (B, Lq, S) scores: never the best, and GBs at these sizes

        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qr, k_rot, vt, attn_mask=mask)

        try:
            run()
        except RuntimeError as e:  # this backend refuses these inputs: a row saying so, not a fallback
            print(f"{label:24} sdpa {name:28} unsupported ({str(e).splitlines()[0][:80]})")
            continue
        cands[f"sdpa {name} (attention only)"] = run
    if mask is not None and device.type == "cuda":
        # what the mask costs cuDNN: the same call over every key, no mask (a different result; the
        # official per-frame memory passes no mask)
        def run_no_mask():
            with sdpa_kernel(_sdpa_backends()["cudnn"]):
                return F.scaled_dot_product_attention(qr, k_rot, vt)

        try:
            run_no_mask()
            cands["sdpa cudnn, no mask (attention only, every key)"] = run_no_mask
        except (RuntimeError, KeyError) as e:
            print(f"{label:24} sdpa cudnn, no mask         unsupported ({str(e).splitlines()[0][:80]})")
    xops = _xformers()
    if xops is not None and device.type == "cuda":
        bias = None if mask is None else torch.zeros(B, 1, L, S, device=device, dtype=dtype).masked_fill(
            ~key_valid[:, None, None, :], float("-inf"))

        def run_xformers():
            return xops.memory_efficient_attention(qr.transpose(1, 2), k_rot.transpose(1, 2), vt.transpose(1, 2),
                                                   attn_bias=bias)

        try:
            run_xformers()
            cands["xformers (attention only)"] = run_xformers
        except (RuntimeError, ValueError, NotImplementedError) as e:  # a row saying so, not a fallback
            print(f"{label:24} xformers {' ' * 24} unsupported ({str(e).splitlines()[0][:80]})")

    limit = 1e-4 if dtype == torch.float32 else 2 * torch_err
    gates = {name: (ref, limit) for name in cands if name.startswith(("triton", "sdpa path", "op"))}
    row_flops = {name: flops for name in cands}
    if "sdpa cudnn, no mask (attention only, every key)" in cands:
        row_flops["sdpa cudnn, no mask (attention only, every key)"] = flops * S // s_valid
    if not self_attn and not args.no_fold:
        fc, fg, ff = fold_rows(B, args, device, dtype, q, k, v, rope, freqs, key_valid, n_rope, s_valid, ref,
                               eager_out, qr, k_rot, mask, fold_tiles, label, q_rot, k_rot_op)
        cands.update(fc)
        gates.update(fg)
        row_flops.update(ff)

    if args.tma and q.shape[2] == 1:  # last: a new path (K and V through tensor descriptors, one head)
        cands["triton default, TMA loads"] = (
            lambda: ma._memory_attention_triton(q, k, v, rope, key_valid, True, n_rope, use_tma=True))
        gates["triton default, TMA loads"] = (ref, limit)
        row_flops["triton default, TMA loads"] = flops
    if args.only:
        keep = [w.strip() for w in args.only.split(",") if w.strip()]
        cands = {n: f for n, f in cands.items() if any(w in n for w in keep)}

    rows = []
    for name, fn in cands.items():
        out = fn()
        if name in gates:
            want, lim = gates[name]
            err = (out.float() - want).abs().max().item()
            assert err <= lim, f"{name}: max error {err:.3g} vs the fp32 reference > {lim:.3g}"
        ms = time_ms(fn, device, args.reps)
        tflops = row_flops[name] / ms / 1e9
        row = {"shape": label, "impl": name, "ms": ms, "TFLOPs": tflops}
        if matmul_tflops:
            row["pct_dense_matmul"] = 100 * tflops / matmul_tflops
        rows.append(row)
        pct = f"  {row['pct_dense_matmul']:5.1f} % of matmul" if matmul_tflops else ""
        print(f"{label:24} {name:34} {ms:10.3f} ms  {tflops:8.2f} TFLOP/s{pct}")
        if args.profile:
            profile_row(fn, device, f"{label} {name}")
    return rows


def profile_row(fn, device, title: str, calls: int = 5) -> None:
    """The kernels (or CPU ops, off CUDA) of ``calls`` calls of a row under torch.profiler: the ten
    largest by device time, per call, so a row's time can be split without Nsight."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:10]
    print(f"# profile of {title} ({calls} calls; us per call, launches per call)")
    for e in events:
        print(f"#   {getattr(e, key, 0.0) / calls:10.1f} us  {e.count / calls:6.1f}x  {e.key[:90]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI); numbers are not performance numbers")
    p.add_argument("--objects", default="1,4,16", help="comma-separated batch sizes (objects)")
    p.add_argument("--grid", type=int, default=72)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--frames", type=int, default=7)
    p.add_argument("--ptr-tokens", type=int, default=64, help="pointer tokens (4 per object pointer)")
    p.add_argument("--pad-frames", type=int, default=0, help="memory frames marked invalid (a fixed-capacity bank)")
    p.add_argument("--self", action="store_true", help="also the self-attention over the L frame tokens")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--value-dim", type=int, default=64, help="Dv of the value-fold rows (mem_dim)")
    p.add_argument("--no-fold", action="store_true", help="skip the value-fold rows")
    p.add_argument("--out", default=None, help="results path stem (GPU: bench/results/memory_attention_<gpu>_<date>)")
    p.add_argument("--tma", action="store_true",
                   help="also the Triton kernel with K and V through tensor descriptors (use_tma), default tile")
    p.add_argument("--only", default=None,
                   help="comma-separated substrings: time only the rows whose name holds one (e.g. 'TMA,op (')")
    p.add_argument("--profile", action="store_true",
                   help="after each row, its ten largest kernels under torch.profiler (with --only: a few rows)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.objects, args.grid, args.head_dim, args.frames, args.ptr_tokens = "2", 4, 32, 2, 4
        args.value_dim = 16
        args.pad_frames, args.self, args.reps, args.tma = 1, True, 3, True
        if device.type == "cpu":
            args.dtype = "float32"  # the interpreter has no bf16 arithmetic
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    dtype = getattr(torch, args.dtype)
    objects = [int(b) for b in args.objects.split(",")]
    # The interpreter pays per program iteration: one large tile keeps the smoke run short.
    tiles = [(64, 32, 8, 2)] if device.type == "cpu" else TILES
    fold_tiles = [] if device.type == "cpu" else FOLD_TILES
    compile_backend = "aot_eager" if device.type == "cpu" else "inductor"  # inductor's CPU cold start is ~20 s

    shape = {"objects": args.objects, "grid": args.grid, "Dh": args.head_dim,
             "Dv_fold": None if args.no_fold else args.value_dim, "frames": args.frames,
             "pointer_tokens": args.ptr_tokens, "padded_frames": args.pad_frames, "self_attention": args.self}
    header = machine_header(device, shape, dtype=args.dtype, sms=True)
    header["compile_backend"] = compile_backend
    matmul_tflops = dense_matmul_tflops(device, dtype) if device.type == "cuda" else None
    header["dense_matmul_TFLOPs"] = matmul_tflops
    print_header("memory_attention", header)

    rows = []
    for B in objects:
        for self_attn in ((False, True) if args.self else (False,)):
            rows += bench_shape(B, self_attn, args, device, dtype, tiles, compile_backend, matmul_tflops, fold_tiles)

    if device.type == "cuda" or args.out:
        write_results(
            "memory_attention", header, rows, ["shape", "impl", "ms", "TFLOP/s", "% dense matmul"],
            lambda r: [r["shape"], r["impl"], f"{r['ms']:.3f}", f"{r['TFLOPs']:.2f}",
                       f"{r['pct_dense_matmul']:.1f}" if "pct_dense_matmul" in r else ""],
            args.out,
        )
    assert all(math.isfinite(r["ms"]) for r in rows)


if __name__ == "__main__":
    main()
