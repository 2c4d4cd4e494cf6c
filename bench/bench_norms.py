"""Benchmark of the two normalisations replaced for their CUDA launch pattern (sam3fast/model/common.py).

LayerNorm2d at the tracker memory encoder's mask downsampler shapes, N objects: (N, C, S, S) with
C = 4, 16, 64, 256 on S = I/2, I/4, I/8, I/16 (I = ``mem_interpol_size``, 1152: 576, 288, 144, 72);
(N, 64, 144, 144) is also the SAM mask decoder's upscaling norm. Rows:
  channels-last F.layer_norm   the previous LayerNorm2d (``layer_norm2d_channels_last``): one CUDA
                               block per (n, h, w) row of C elements
  channels-first               ``layer_norm2d_channels_first``: float32 statistics reduced over dim 1
  compiled LayerNorm2d         torch.compile of the module (whichever path its C selects)
  triton layer_norm2d          ``sam3fast::layer_norm2d``'s kernel (C < SMALL_C; the module's path on CUDA)
  ... + GELU                   the norm then the exact GELU, as the mask downsampler and the SAM
                               decoder run them: channels-first + F.gelu, compiled, and the kernel's
                               fused form (LayerNorm2d.forward_gelu)
GroupNorm(8, D) at the segmentation head's pixel-decoder shapes, B images: (B, D, 2g, 2g) and
(B, D, 4g, 4g) (144 and 288 at 1008 px). Rows:
  F.group_norm                 nn.GroupNorm's forward (one block per (batch, group) row)
  group_norm_fast              statistics by torch.var_mean, one elementwise pass
  compiled FastGroupNorm       torch.compile of the module
  triton group_norm            ``sam3fast::group_norm``'s kernels (split statistics, one apply pass; the
                               module's path on CUDA)
  ... + ReLU                   the norm then the ReLU, as the pixel decoder runs them: group_norm_fast +
                               F.relu, compiled, and the kernels' fused form (FastGroupNorm.forward_relu)
The mask downsampler's first two stages with their convolution (conv 3 x 3 stride 2 from 1 and 4
channels to 4 and 16, LayerNorm2d, GELU), N objects. Rows:
  conv + LayerNorm2d + F.gelu        the modules' operations (cuDNN's convolution, then the norm's path)
  conv + triton layer_norm2d + GELU  the path before session 17 on CUDA
  triton conv_norm_gelu              ``sam3fast::conv_norm_gelu``: all three in one pass (the
                                     downsampler's path on CUDA), and other pixel blocks / warps
The row LayerNorm2d / FastGroupNorm itself runs is marked "*" (LayerNorm2d.SMALL_C,
GROUP_NORM_FAST_MIN_NUMEL). Each row is checked against the previous implementation before it is
timed. GB/s counts x read once and the output written once. The last lines add up one frame's
mask downsampler and one image's pixel decoder, previous vs what the modules run now.

    python bench/bench_norms.py                  # GPU: 16 objects, 1 image, bf16
    python bench/bench_norms.py --objects 1 --dtype float32
    python bench/bench_norms.py --smoke          # CPU: the tiny config's shapes, seconds

CPU numbers (``--smoke``) check that the script runs; they are not performance numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench/_common.py, also when run through runpy

from _common import (  # noqa: E402
    machine_header, print_header, time_ms, use_interpreter_without_cuda, write_results,
)

use_interpreter_without_cuda()  # before the kernel import

from sam3fast.config import get_config  # noqa: E402
from sam3fast.kernels import conv_norm_gelu as cng  # noqa: E402
from sam3fast.kernels import group_norm as gn  # noqa: E402
from sam3fast.kernels import layer_norm2d as ln2d  # noqa: E402
from sam3fast.model.common import (  # noqa: E402
    GROUP_NORM_FAST_MIN_NUMEL, FastGroupNorm, LayerNorm2d, group_norm_fast, layer_norm2d_channels_first,
    layer_norm2d_channels_last,
)


def _affine(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=g))
        module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=g))
    return module


def _input(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=g) + 1).to(device=device, dtype=dtype)


def _name(row):
    return row["impl"] + (" *" if row["chosen"] else "")


def _run_rows(label, x, cands, want, chosen, args, device, atol=2e-2):
    nbytes = 2 * x.numel() * x.element_size()
    rows = []
    for impl, fn in cands.items():
        with torch.no_grad():
            torch.testing.assert_close(fn().float(), want.float(), rtol=2e-2, atol=atol)
            ms = time_ms(fn, device, args.reps)
        rows.append({"shape": label, "impl": impl, "chosen": impl == chosen, "ms": ms, "GBs": nbytes / ms / 1e6})
        print(f"{label:28} {_name(rows[-1]):30} {ms:10.4f} ms  {nbytes / ms / 1e6:9.1f} GB/s")
    return rows


def bench_layer_norm(shape, args, device, dtype, compile_backend):
    C = shape[1]
    m = _affine(LayerNorm2d(C), seed=C).to(device=device, dtype=dtype)
    x = _input(shape, dtype, device, seed=C)
    w, b, eps = m.weight, m.bias, m.eps
    cands = {
        "channels-last F.layer_norm": lambda: layer_norm2d_channels_last(x, w, b, eps),
        "channels-first": lambda: layer_norm2d_channels_first(x, w, b, eps),
    }
    if not args.no_compile:
        comp = torch.compile(m, fullgraph=True, backend=compile_backend)
        cands["compiled LayerNorm2d"] = lambda: comp(x)
    small = C < LayerNorm2d.SMALL_C
    kernel = small and ln2d.HAS_TRITON
    if kernel:
        cands["triton layer_norm2d"] = lambda: ln2d._layer_norm2d_triton(x, w, b, eps)
    chosen = "channels-last F.layer_norm"
    if small:
        chosen = "triton layer_norm2d" if kernel and device.type == "cuda" else "channels-first"
    with torch.no_grad():
        want = layer_norm2d_channels_last(x, w, b, eps)
    rows = _run_rows(f"LN2d {tuple(shape)}", x, cands, want, chosen, args, device)
    if not small:
        return rows
    # the norm and the GELU after it (the mask downsampler, the SAM decoder's upscaling)
    cands = {"channels-first + F.gelu": lambda: F.gelu(layer_norm2d_channels_first(x, w, b, eps))}
    if not args.no_compile:
        torch._dynamo.reset()
        comp_g = torch.compile(lambda t: F.gelu(m(t)), fullgraph=True, backend=compile_backend)
        cands["compiled LayerNorm2d + GELU"] = lambda: comp_g(x)
    if kernel:
        cands["triton layer_norm2d + GELU"] = lambda: ln2d._layer_norm2d_triton(x, w, b, eps, True)
    chosen = "triton layer_norm2d + GELU" if kernel and device.type == "cuda" else "channels-first + F.gelu"
    with torch.no_grad():
        want = F.gelu(layer_norm2d_channels_last(x, w, b, eps))
    return rows + _run_rows(f"LN2d+GELU {tuple(shape)}", x, cands, want, chosen, args, device)


def bench_group_norm(shape, args, device, dtype, compile_backend):
    G = 8
    m = _affine(FastGroupNorm(G, shape[1]), seed=shape[-1]).to(device=device, dtype=dtype)
    x = _input(shape, dtype, device, seed=shape[-1])
    w, b, eps = m.weight, m.bias, m.eps
    cands = {
        "F.group_norm": lambda: F.group_norm(x, G, w, b, eps),
        "group_norm_fast": lambda: group_norm_fast(x, G, w, b, eps, min_group_numel=0),
    }
    if not args.no_compile:
        comp = torch.compile(m, fullgraph=True, backend=compile_backend)
        cands["compiled FastGroupNorm"] = lambda: comp(x)
    kernel = gn.HAS_TRITON
    if kernel:
        cands["triton group_norm"] = lambda: gn._group_norm_triton(x, w, b, G, eps)
    fast = shape[1] // G * math.prod(shape[2:]) >= GROUP_NORM_FAST_MIN_NUMEL
    chosen = "group_norm_fast" if fast else "F.group_norm"
    if kernel and device.type == "cuda":
        chosen = "triton group_norm"
    with torch.no_grad():
        want = F.group_norm(x, G, w, b, eps)
    rows = _run_rows(f"GN8 {tuple(shape)}", x, cands, want, chosen, args, device)
    # the norm and the ReLU after it (the pixel decoder): FastGroupNorm.forward_relu
    cands = {"group_norm_fast + F.relu": lambda: F.relu(group_norm_fast(x, G, w, b, eps, min_group_numel=0))}
    if not args.no_compile:
        torch._dynamo.reset()
        comp_r = torch.compile(lambda t: F.relu(m(t)), fullgraph=True, backend=compile_backend)
        cands["compiled FastGroupNorm + ReLU"] = lambda: comp_r(x)
    if kernel:
        cands["triton group_norm + ReLU"] = lambda: gn._group_norm_triton(x, w, b, G, eps, True)
    chosen = "triton group_norm + ReLU" if kernel and device.type == "cuda" else "group_norm_fast + F.relu"
    with torch.no_grad():
        want = F.relu(F.group_norm(x, G, w, b, eps))
    return rows + _run_rows(f"GN8+ReLU {tuple(shape)}", x, cands, want, chosen, args, device)


def bench_conv_norm_gelu(in_shape, co, args, device, dtype):
    """A mask-downsampler stage (conv 3 x 3 stride 2, LayerNorm2d, GELU) with few channels: the
    module's path (cuDNN's convolution, then the LayerNorm2d + GELU kernel or PyTorch's chain)
    against ``sam3fast::conv_norm_gelu`` (one pass)."""
    B, ci, side, _ = in_shape
    g = torch.Generator().manual_seed(co)
    x = _input(in_shape, dtype, device, seed=co)
    cw = (torch.randn(co, ci, 3, 3, generator=g) / (3 * ci)).to(device=device, dtype=dtype)
    cb = (0.3 * torch.randn(co, generator=g)).to(device=device, dtype=dtype)
    m = _affine(LayerNorm2d(co), seed=co).to(device=device, dtype=dtype)
    w, b, eps = m.weight, m.bias, m.eps

    def module_path():
        return F.gelu(m(F.conv2d(x, cw, cb, stride=2, padding=1)))

    cands = {"conv + LayerNorm2d + F.gelu": module_path}
    if ln2d.HAS_TRITON:
        cands["conv + triton layer_norm2d + GELU"] = lambda: ln2d._layer_norm2d_triton(
            F.conv2d(x, cw, cb, stride=2, padding=1), w, b, eps, True)
        cands["triton conv_norm_gelu"] = lambda: cng._conv_norm_gelu_triton(x, cw, cb, w, b, eps, 2)
        for bp, nw in () if args.smoke else ((32, 4), (128, 4), (64, 8)):  # (the default: 64 pixels, 4 warps)
            cands[f"triton conv_norm_gelu {bp}p w{nw}"] = lambda bp=bp, nw=nw: cng._conv_norm_gelu_triton(
                x, cw, cb, w, b, eps, 2, block_p=bp, num_warps=nw)
    chosen = "triton conv_norm_gelu" if ln2d.HAS_TRITON and device.type == "cuda" else "conv + LayerNorm2d + F.gelu"
    with torch.no_grad():
        want = F.gelu(m.float()(F.conv2d(x.float(), cw.float(), cb.float(), stride=2, padding=1)))
        m.to(dtype)
        # the norm over few channels magnifies the convolution's rounding where a pixel's channels
        # nearly agree: a candidate may be off the float32 chain by twice the module path's own error
        atol = 2 * (module_path().float() - want).abs().max().item() + 2e-2
    return _run_rows(f"conv{ci}>{co}+LN2d+GELU {tuple(in_shape)}", x, cands, want, chosen, args, device, atol)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the tiny config's shapes on CPU (CI); not performance numbers")
    p.add_argument("--objects", type=int, default=16, help="tracked objects (LayerNorm2d batch)")
    p.add_argument("--images", type=int, default=1, help="image batch (GroupNorm batch)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--out", default=None, help="results path stem (GPU: bench/results/norms_<gpu>_<date>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = get_config("tiny" if args.smoke else "sam3")
    if args.smoke:
        args.objects, args.images, args.reps = 2, 1, 3
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    dtype = getattr(torch, args.dtype)
    compile_backend = "aot_eager" if device.type == "cpu" else "inductor"  # inductor's CPU cold start is ~20 s

    # The mask downsampler: 4 stride-2 convs from 1 channel, x4 channels each, each followed by LayerNorm2d.
    size = cfg.tracker.mem_interpol_size
    ln_shapes = [(args.objects, 4 ** (i + 1), size >> (i + 1), size >> (i + 1)) for i in range(4)]
    g, D = cfg.feat_size, cfg.d_model
    gn_shapes = [(args.images, D, 2 * g, 2 * g), (args.images, D, 4 * g, 4 * g)]  # pixel decoder, coarse first
    header = machine_header(device, {"layer_norm2d": ln_shapes, "group_norm": gn_shapes}, dtype=args.dtype, sms=True)
    header["compile_backend"] = None if args.no_compile else compile_backend
    header["small_c"] = LayerNorm2d.SMALL_C
    header["group_norm_fast_min_numel"] = GROUP_NORM_FAST_MIN_NUMEL
    print_header("norms", header)

    rows = []
    for shape in ln_shapes:
        torch._dynamo.reset()
        rows += bench_layer_norm(shape, args, device, dtype, compile_backend)
    for shape in gn_shapes:
        torch._dynamo.reset()
        rows += bench_group_norm(shape, args, device, dtype, compile_backend)
    # the downsampler's first two stages, convolution included (the ones conv_norm_gelu serves)
    for i in range(2):  # (smoke: a 32 x 32 map, the interpreter runs a program per 64 output pixels)
        side = 32 if args.smoke else size >> i
        rows += bench_conv_norm_gelu((args.objects, 4 ** i, side, side), 4 ** (i + 1), args, device, dtype)

    def total(prefix, old):
        sel = [r for r in rows if r["shape"].startswith(prefix)]
        return sum(r["ms"] for r in sel if (r["impl"] == old if old else r["chosen"]))

    ln_old, ln_now = total("LN2d (", "channels-last F.layer_norm"), total("LN2d (", None)
    lg_old, lg_now = total("LN2d+GELU", "channels-first + F.gelu"), total("LN2d+GELU", None)
    gn_old, gn_now = total("GN8 (", "F.group_norm"), total("GN8 (", None)
    gr_old, gr_now = total("GN8+ReLU", "group_norm_fast + F.relu"), total("GN8+ReLU", None)
    print(f"# mask downsampler LayerNorm2d, {args.objects} objects: previous {ln_old:.3f} ms, now {ln_now:.3f} ms")
    print(f"# mask downsampler LayerNorm2d + GELU (C < {LayerNorm2d.SMALL_C}), {args.objects} objects: "
          f"channels-first + F.gelu {lg_old:.3f} ms, now {lg_now:.3f} ms")
    print(f"# pixel decoder GroupNorm, {args.images} image(s): previous {gn_old:.3f} ms, now {gn_now:.3f} ms")
    print(f"# pixel decoder GroupNorm + ReLU, {args.images} image(s): group_norm_fast + F.relu {gr_old:.3f} ms, "
          f"now {gr_now:.3f} ms")

    if device.type == "cuda" or args.out:
        write_results(
            "norms", header, rows, ["shape", "impl", "ms", "GB/s"],
            lambda r: [r["shape"], _name(r), f"{r['ms']:.4f}", f"{r['GBs']:.1f}"],
            args.out,
        )
    assert all(math.isfinite(r["ms"]) for r in rows)


if __name__ == "__main__":
    main()
