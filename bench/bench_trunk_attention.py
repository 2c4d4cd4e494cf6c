"""Benchmark of the ViT trunk's attention (SDPA) at SAM 3's shapes, backend by backend.

The trunk runs 28 window blocks (9 windows x 16 heads of 576 tokens per 1008 px image) and 4 global
blocks (16 heads of 5184 tokens), head width 64, in the dtype of the model: 0.78 TFLOP an image. The
H200 profile of 2026-11-27 put SDPA (cuDNN's flash kernel, 39 launches with the heads') at 3.36 ms
of the image's device time, ~230 TFLOP/s: the trunk's attention is the next cost after its GEMMs.
This script says which backend is fastest at each of the two shapes, so ``ViT.window_sdpa_backend``
/ ``global_sdpa_backend`` can pin it (PyTorch's own choice is cuDNN first on Hopper).

Rows per shape, each checked against float32 math attention before it is timed (within 2x the
bf16 rounding the default backend makes):
  default              F.scaled_dot_product_attention as the trunk calls it (q, k from the RoPE
                       kernel's (n, L, 2, H, hd) output and v from qkv: strided views, no copies)
  <backend>            the same call under ``sdpa_kernel(<backend>)``: cudnn, flash, efficient
  <backend> contiguous the same with contiguous (n, H, L, hd) q, k, v (what a layout costs)
  CUDA graph: ...      the default and each backend replayed from a CUDA graph
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

from _common import graphed, machine_header, print_header, time_ms, write_results  # noqa: E402

from sam3fast.config import get_config  # noqa: E402
from sam3fast.model.vit import SDPA_BACKENDS  # noqa: E402


def trunk_layout(n, L, H, hd, g, device, dtype):
    """q, k, v as ``Attention.forward`` hands them to SDPA: q, k permuted views of a contiguous
    (n, L, 2, H, hd) tensor (the RoPE kernel's output), v a view of qkv (n, L, 3, H, hd)."""
    qkv = torch.randn(n, L, 3, H, hd, generator=g).to(device=device, dtype=dtype)
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
    for shape, (n, L) in shapes.items():
        q, k, v = trunk_layout(n, L, H, hd, g, device, dtype)
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
        base_err = None
        for impl, fn in cands.items():
            try:
                if impl.startswith("CUDA graph"):
                    fn = graphed(fn)
                y = fn()
            except RuntimeError as e:  # a backend that cannot run this shape
                print(f"{shape:8} {impl:28} unsupported ({str(e).splitlines()[0][:90]})")
                rows.append({"case": shape, "impl": impl, "ms": None, "TFLOPs": None,
                             "note": str(e).splitlines()[0][:200]})
                continue
            err = (y.float() - want).abs().max().item()
            if base_err is None:  # the default's error: the rounding bound of the others
                base_err = max(err, 1e-6)
            assert math.isfinite(err) and err <= 2 * base_err + 1e-6, f"{shape} {impl}: error {err:.3g}"
            t = time_ms(fn, device, args.reps)
            ms[(shape, impl)] = t
            rows.append({"case": shape, "impl": impl, "ms": t, "TFLOPs": flops / t / 1e9})
            print(f"{shape:8} {impl:28} {t:10.4f} ms  {flops / t / 1e9:8.1f} TFLOP/s")

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
