"""Benchmark of the ViT trunk's attention (SDPA) at SAM 3's shapes, backend by backend.

The trunk runs 28 window blocks (9 windows x 16 heads of 576 tokens per 1008 px image) and 4 global
blocks (16 heads of 5184 tokens), head width 64, in the dtype of the model: 0.78 TFLOP an image. The
H200 eager profile of 2026-11-27 (bf16, one image) put SDPA (cuDNN's flash kernel) at 3.36 ms over
39 launches, 32 of them the trunk's (the trunk's at ~230 TFLOP/s or more): the trunk's attention is
the next cost after its GEMMs.
This script says which backend is fastest at each of the two shapes, so ``ViT.window_sdpa_backend``
/ ``global_sdpa_backend`` can pin it (PyTorch's own choice is cuDNN first on Hopper).

Rows per shape, each checked against float32 math attention before it is timed (within 2x the
bf16 rounding the default backend makes):
  default              F.scaled_dot_product_attention as the trunk calls it (q, k from the RoPE
                       kernel's (n, L, 2, H, hd) output and v from qkv: strided views, no copies)
  <backend>            the same call under ``sdpa_kernel(<backend>)``: cudnn, flash, efficient
  <backend> contiguous the same with contiguous (n, H, L, hd) q, k, v (what a layout costs)
  CUDA graph: ...      the default and each backend replayed from a CUDA graph
  rope + SDPA (the trunk's path)  the whole step as the trunk runs it: the RoPE kernel on q, k of a
                       (n, L, 3, H, hd) qkv tensor, SDPA, the output back to (n, L, C)
  rope_self_attention  ``sam3fast::rope_self_attention`` on the qkv views (RoPE inside the
                       attention; ``ViT.rope_attention_kernel``): the op, then a tile sweep of its
                       launcher (keys rotated by the prepass, and once inline)
TFLOP/s counts 4 n H L^2 hd. The "# trunk" lines add up (window blocks) x window + (global blocks) x
global per backend, against the default.

    python bench/bench_trunk_attention.py            # GPU: bf16, one image
    python bench/bench_trunk_attention.py --images 8
    python bench/bench_trunk_attention.py --smoke    # CPU: tiny shapes, seconds

CPU numbers (``--smoke``) check that the script runs; they are not performance numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench/_common.py, also when run through runpy

from _common import (  # noqa: E402
    graphed, machine_header, print_header, time_ms, use_interpreter_without_cuda, write_results,
)

use_interpreter_without_cuda()  # before the kernel imports

from sam3fast.config import get_config  # noqa: E402
from sam3fast.kernels import rope_attention as ra  # noqa: E402
from sam3fast.kernels.rope import rope as rope_op  # noqa: E402
from sam3fast.model.vit import SDPA_BACKENDS, compute_axial_cis  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for the rope_self_attention tile sweep
TILES = [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2),
         (128, 128, 8, 2)]


def trunk_layout(qkv):
    """q, k, v as ``Attention.forward`` hands them to SDPA from its (n, L, 3, H, hd) projection ``qkv``:
    q, k permuted views of a contiguous (n, L, 2, H, hd) tensor (the RoPE kernel's output), v a view
    of qkv."""
    qk = qkv[:, :, :2].contiguous()
    q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
    v = qkv[:, :, 2].transpose(1, 2)
    return q, k, v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI); numbers are not performance numbers")
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", default=None, help="results path stem (GPU: bench/results/trunk_attention_<gpu>_<date>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vit = get_config("sam3").vit
    H, hd = vit.num_heads, vit.embed_dim // vit.num_heads
    win, grid = vit.window_size, vit.grid
    run_blocks = max(vit.global_att_blocks) + 1
    n_global = len(vit.global_att_blocks)
    n_window = run_blocks - n_global
    backends = ["cudnn", "flash", "efficient"]
    if args.smoke:
        H, hd, win, grid, args.reps = 2, 16, 4, 8, 3
        args.dtype = "float32"
        backends = ["flash", "math"]  # what a CPU build has
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    dtype = getattr(torch, args.dtype)
    shapes = {"window": (args.images * (grid // win) ** 2, win * win), "global": (args.images, grid * grid)}
    header = machine_header(device, {k: f"n={n} L={L} heads={H} hd={hd}" for k, (n, L) in shapes.items()},
                            dtype=args.dtype, sms=True)
    header["blocks"] = f"{n_window} window + {n_global} global"
    print_header("trunk_attention", header)

    g = torch.Generator().manual_seed(0)
    rows = []
    ms = {}
    def check_and_time(shape, cands, want, flops, flatten=False):
        base_err = None
        for impl, fn in cands.items():
            try:
                if impl.startswith("CUDA graph"):
                    fn = graphed(fn)
                y = fn()
            except RuntimeError as e:  # a backend that cannot run this shape
                print(f"{shape:8} {impl:44} unsupported ({str(e).splitlines()[0][:90]})")
                rows.append({"case": shape, "impl": impl, "ms": None, "TFLOPs": None,
                             "note": str(e).splitlines()[0][:200]})
                continue
            y = y.reshape(want.shape) if flatten else y
            err = (y.float() - want).abs().max().item()
            if base_err is None:  # the default's error: the rounding bound of the others
                base_err = max(err, 1e-6)
            assert math.isfinite(err) and err <= 2 * base_err + 1e-6, f"{shape} {impl}: error {err:.3g}"
            t = time_ms(fn, device, args.reps)
            ms[(shape, impl)] = t
            rows.append({"case": shape, "impl": impl, "ms": t, "TFLOPs": flops / t / 1e9})
            print(f"{shape:8} {impl:44} {t:10.4f} ms  {flops / t / 1e9:8.1f} TFLOP/s")

    for shape, (n, L) in shapes.items():
        qkv = torch.randn(n, L, 3, H, hd, generator=g).to(device=device, dtype=dtype)  # the projection
        q, k, v = trunk_layout(qkv)
        qc, kc, vc = (t.contiguous() for t in (q, k, v))
        flops = 4 * n * H * L * L * hd
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float())

        def pinned(name, a=q, b=k, c=v):
            def call():
                with sdpa_kernel(SDPA_BACKENDS[name]):
                    return F.scaled_dot_product_attention(a, b, c)
            return call

        cands = {"default": lambda: F.scaled_dot_product_attention(q, k, v)}
        for name in backends:
            cands[name] = pinned(name)
            cands[f"{name} contiguous"] = pinned(name, qc, kc, vc)
        if device.type == "cuda":
            cands["CUDA graph: default"] = lambda: F.scaled_dot_product_attention(q, k, v)
            for name in backends:
                cands[f"CUDA graph: {name}"] = pinned(name)
        check_and_time(shape, cands, want, flops)

        # The whole RoPE + attention step as the trunk runs it (the RoPE kernel on q, k of the qkv
        # projection, SDPA, the output back to (n, L, C)) against sam3fast::rope_self_attention (the
        # rotation inside the attention, on the qkv views): these rows compare like with like.
        side = win if shape == "window" else grid
        freqs = compute_axial_cis(hd, side, side, scale_pos=1.0 if shape == "window" else win / grid).to(device)
        table = torch.view_as_real(freqs)
        vq, vk, vv = qkv.unbind(2)

        def trunk_path():
            qk = rope_op(qkv[:, :, :2], freqs)
            a, b = qk.permute(2, 0, 3, 1, 4).unbind(0)
            return F.scaled_dot_product_attention(a, b, vv.transpose(1, 2)).transpose(1, 2).reshape(n, L, H * hd)

        want2 = ra.rope_self_attention_ref(*(t.float() for t in (vq, vk, vv)), table).reshape(n, L, H * hd)
        cands = {"rope + SDPA (the trunk's path)": trunk_path,
                 "rope_self_attention op": lambda: torch.ops.sam3fast.rope_self_attention(vq, vk, vv, table)}
        tiles = TILES if not args.smoke else [(16, 16, 4, 2)]
        for bm, bn, nw, ns in tiles:
            for rope_k in ("prepass", "inline"):
                if rope_k == "inline" and (bm, bn, nw, ns) != tiles[0]:
                    continue
                cands[f"rope_self_attention {bm}x{bn} w{nw} s{ns} {rope_k}"] = (
                    lambda t=(bm, bn, nw, ns), rk=rope_k: ra._rope_self_attention_triton(
                        vq, vk, vv, table, block_m=t[0], block_n=t[1], num_warps=t[2], num_stages=t[3], rope_k=rk))
        if device.type == "cuda":
            cands["CUDA graph: rope + SDPA (the trunk's path)"] = trunk_path
            cands["CUDA graph: rope_self_attention op"] = (
                lambda: torch.ops.sam3fast.rope_self_attention(vq, vk, vv, table))
        check_and_time(shape, cands, want2, flops, flatten=True)

    for prefix in ("", "CUDA graph: "):
        base = [ms.get(("window", prefix + "default")), ms.get(("global", prefix + "default"))]
        if None in base:
            continue
        total = n_window * base[0] + n_global * base[1]
        print(f"# trunk {prefix}default: {total:.3f} ms ({n_window} x window + {n_global} x global)")
        for name in backends:
            t = [ms.get(("window", prefix + name)), ms.get(("global", prefix + name))]
            if None not in t:
                print(f"# trunk {prefix}{name}: {n_window * t[0] + n_global * t[1] - total:+.3f} ms against the default")
        path = [ms.get((s_, prefix + "rope + SDPA (the trunk's path)")) for s_ in ("window", "global")]
        op = [ms.get((s_, prefix + "rope_self_attention op")) for s_ in ("window", "global")]
        if None not in path + op:
            print(f"# trunk {prefix}rope_self_attention op against rope + SDPA: "
                  f"{n_window * (op[0] - path[0]) + n_global * (op[1] - path[1]):+.3f} ms")
        for shape in shapes:
            timed = [(ms[(shape, prefix + b)], b) for b in backends if (shape, prefix + b) in ms]
            if timed:
                t, b = min(timed)
                print(f"# {shape} blocks' fastest pinned backend ({prefix or 'eager '}rows): {b} {t:.4f} ms")

    if device.type == "cuda" or args.out:
        write_results(
            "trunk_attention", header, rows, ["case", "impl", "ms", "TFLOP/s"],
            lambda r: [r["case"], r["impl"], "n/a" if r["ms"] is None else f"{r['ms']:.4f}",
                       "n/a" if r["TFLOPs"] is None else f"{r['TFLOPs']:.1f}"],
            args.out,
        )
    assert any(r["ms"] is not None for r in rows)


if __name__ == "__main__":
    main()
