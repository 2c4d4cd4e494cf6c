"""Benchmark of the DETR decoder's image cross-attention with the boxRPB bias (``sam3fast::rpb_attention``).

Shapes (SAM 3): H = 8 heads of Dh 32, L = 201 queries (200 + the presence token), N = 72 x 72 = 5184
image tokens, B prompts; the bias factors dy (B, H, L, 72) and dx (B, H, L, 72). Rows, each timed on
the same inputs:
  triton ...            the kernel, between the projections: through the op (default tile, split-KV
                        chosen from the SM count) and a sweep of (BLOCK_M, BLOCK_N, warps, stages)
                        and num_splits=1 (no flash decoding)
  eager                 what the model does without the kernel, between the projections: the bias
                        materialised from the factors (``Decoder.rpb_bias``'s broadcast add, in the
                        input dtype) and SDPA with it (PyTorch picks the backend)
  compiled              torch.compile of that
  sdpa <backend>        SDPA alone with the bias already materialised (its build not timed), forced
                        to one backend (efficient / cudnn / flash; math on CPU only); "unsupported"
                        where the backend refuses the inputs (flash takes no bias)
  layer eager / layer kernel
                        the decoder layer's whole image cross-attention, projections included:
                        ``cross_attn(q, k, v, attn_bias=dy (+) dx)`` (bias built inside the timing)
                        vs ``DecoderLayer._cross_attn_rpb`` (in_proj chunks, the op, out_proj)
  factors: ...          the bias factors themselves, both axes (``Decoder.rpb_factors``): the PyTorch
                        path (log-deltas, the boxRPB MLPs, permute, pad) against
                        ``sam3fast::rpb_factors`` (one Triton pass per axis), float32 (the decoder's
                        island), eager and graphed; TFLOP/s there counts the MLPs' linears
TFLOP/s counts 4 * B * H * L * N * Dh (QK^T and PV) for every attention row, the layer rows too
(their projections are extra work not counted), so it compares times, not arithmetic.

    python bench/bench_rpb_attention.py                 # GPU: B = 1 and 4, bf16
    python bench/bench_rpb_attention.py --prompts 1,16 --dtype float32
    python bench/bench_rpb_attention.py --smoke         # CPU: tiny shapes, Triton interpreter, seconds

CPU numbers (``--smoke``) check that the script runs; they are not performance numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench/_common.py, also when run through runpy

from _common import (  # noqa: E402
    graphed, machine_header, print_header, time_ms, use_interpreter_without_cuda, write_results,
)

use_interpreter_without_cuda()  # before the kernel import

import torch.nn.functional as F  # noqa: E402

from sam3fast.kernels import rpb_attention as ra  # noqa: E402
from sam3fast.model.decoder import DecoderLayer  # noqa: E402
from sam3fast.model.init import stable_random_init_  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
TILES = [ra.DEFAULT_TILE, (64, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3),
         (128, 128, 8, 2), (32, 64, 4, 3), (16, 64, 4, 3)]


def materialised_bias(dy, dx):
    """``Decoder.rpb_bias``'s broadcast add: (B, H, L, Hf), (B, H, L, Wf) -> (B, H, L, Hf * Wf)."""
    B, H, L, _ = dy.shape
    return (dy.unsqueeze(-1) + dx.unsqueeze(-2)).view(B, H, L, -1)


def eager_rpb_attention(q, k, v, dy, dx):
    """The model's path without the kernel, between the projections: (B, L, H, Dh) in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=materialised_bias(dy, dx))
    return out.transpose(1, 2)


def make_inputs(B, L, H, Dh, grid, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    Hf, Wf = grid
    q = torch.randn(B, L, H, Dh, generator=g)
    k = torch.randn(B, Hf * Wf, H, Dh, generator=g)
    v = torch.randn(B, Hf * Wf, H, Dh, generator=g)
    dy = torch.randn(B, H, L, Hf, generator=g) * 2
    dx = torch.randn(B, H, L, Wf, generator=g) * 2
    dy[:, :, 0] = 0  # the presence token's zero row
    dx[:, :, 0] = 0
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, dy, dx))


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items() if hasattr(SDPBackend, attr)}


def bench_shape(B, args, device, dtype, tiles, compile_backend):
    L, H, Dh, grid = args.queries, args.heads, args.head_dim, args.grid_hw
    N = grid[0] * grid[1]
    q, k, v, dy, dx = make_inputs(B, L, H, Dh, grid, dtype, device)
    flops = 4 * B * H * L * N * Dh
    label = f"B={B} L={L} N={N}"

    # Accuracy gate before any time means something: the fp32 reference, and PyTorch in this dtype.
    ref = ra.rpb_attention_ref(*(t.float() for t in (q, k, v, dy, dx)))
    torch_err = (eager_rpb_attention(q, k, v, dy, dx).float() - ref).abs().max().item()

    cands = {}
    if device.type == "cuda":
        op = torch.ops.sam3fast.rpb_attention
        cands["triton (op, defaults)"] = lambda: op(q, k, v, dy, dx)
    for bm, bn, nw, ns in tiles:
        tile = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
        cands[f"triton {bm}x{bn} w{nw} s{ns}"] = lambda tile=tile: ra._rpb_attention_triton(q, k, v, dy, dx, **tile)
    cands["triton default, no split-KV"] = lambda: ra._rpb_attention_triton(q, k, v, dy, dx, num_splits=1)
    cands["eager (bias + sdpa)"] = lambda: eager_rpb_attention(q, k, v, dy, dx)
    if device.type == "cuda":  # launch-bound sizes: the same calls replayed from CUDA graphs (GPU time only)
        cands["CUDA graph: op (defaults)"] = graphed(lambda: op(q, k, v, dy, dx))
        cands["CUDA graph: op, no split-KV"] = graphed(lambda: ra._rpb_attention_triton(q, k, v, dy, dx, num_splits=1))
        cands["CUDA graph: eager (bias + sdpa)"] = graphed(lambda: eager_rpb_attention(q, k, v, dy, dx))
    if not args.no_compile:
        torch._dynamo.reset()
        comp = torch.compile(eager_rpb_attention, fullgraph=True, backend=compile_backend)
        cands[f"compiled ({compile_backend})"] = lambda: comp(q, k, v, dy, dx)

    # SDPA alone on the materialised bias, per backend (the bias is built once, outside the timing).
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    bias = materialised_bias(dy, dx)
    from torch.nn.attention import sdpa_kernel

    for name, backend in _sdpa_backends().items():
        if name == "math" and device.type == "cuda":
            continue  # materialises (B, H, L, N) scores in fp32: never the best

        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias).transpose(1, 2)

        try:
            run()
        except RuntimeError as e:  # this backend refuses these inputs: a row saying so, not a fallback
            print(f"{label:22} sdpa {name:33} unsupported ({str(e).splitlines()[0][:80]})")
            continue
        cands[f"sdpa {name} (bias prebuilt)"] = run

    # The decoder layer's whole image cross-attention, projections included.
    layer = DecoderLayer(H * Dh, H, 16)
    stable_random_init_(layer, seed=0)
    layer = layer.to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, H * Dh, generator=g).to(device=device, dtype=dtype)
    mem_k = torch.randn(B, N, H * Dh, generator=g).to(device=device, dtype=dtype)
    mem = torch.randn(B, N, H * Dh, generator=g).to(device=device, dtype=dtype)
    with torch.no_grad():
        layer_ref = layer.float().cross_attn(x.float(), mem_k.float(), mem.float(),
                                             attn_bias=materialised_bias(dy.float(), dx.float()))
        layer = layer.to(dtype)

    def layer_eager():
        with torch.no_grad():
            return layer.cross_attn(x, mem_k, mem, attn_bias=materialised_bias(dy, dx))

    def layer_kernel():  # the op on CUDA; off CUDA the entry point takes the reference (smoke runs)
        with torch.no_grad():
            return layer._cross_attn_rpb(x, mem_k, mem, dy, dx)

    layer_torch_err = (layer_eager().float() - layer_ref).abs().max().item()
    cands["layer eager (bias + sdpa)"] = layer_eager
    cands["layer kernel"] = layer_kernel

    rows = []
    for name, fn in cands.items():
        out = fn()
        if name.startswith("triton") or name.startswith("layer kernel"):
            want, base = (layer_ref, layer_torch_err) if name.startswith("layer") else (ref, torch_err)
            err = (out.float() - want).abs().max().item()
            limit = 1e-4 if dtype == torch.float32 else 2 * base
            assert err <= limit, f"{name}: max error {err:.3g} vs the fp32 reference > {limit:.3g}"
        ms = time_ms(fn, device, args.reps)
        tflops = flops / ms / 1e9
        rows.append({"shape": label, "impl": name, "ms": ms, "TFLOPs": tflops})
        print(f"{label:22} {name:38} {ms:10.4f} ms  {tflops:8.3f} TFLOP/s")
    return rows


def bench_factors(B, args, device):
    """The bias factors themselves, both axes (``Decoder.rpb_factors``): the PyTorch path (deltas,
    MLP, permute, pad) against ``sam3fast::rpb_factors`` (one pass per axis), float32 as the
    decoder's island runs them, eager and (CUDA) graphed. TFLOP/s counts the two MLP linears."""
    from sam3fast.kernels import rpb_factors as rf

    L, H = args.queries, args.heads
    Q, (Hf, Wf), hd = L - 1, args.grid_hw, args.hidden
    g = torch.Generator().manual_seed(B)
    boxes = torch.rand(B, Q, 4, generator=g).to(device)
    mlps = [tuple(t.to(device) for t in (0.5 * torch.randn(hd, 2, generator=g), 0.1 * torch.randn(hd, generator=g),
                                          torch.randn(H, hd, generator=g) / hd ** 0.5, 0.1 * torch.randn(H, generator=g)))
            for _ in range(2)]
    flops = 2 * B * Q * (Hf + Wf) * (2 * hd + hd * H)
    label = f"factors B={B} Q={Q}"

    def both(fn):
        return lambda: (fn(boxes, Hf, *mlps[0], 1), fn(boxes, Wf, *mlps[1], 0))

    cands = {"factors: PyTorch (deltas, MLP, pad)": both(rf.rpb_factors_ref)}
    if device.type == "cuda":
        cands["factors: triton (op)"] = both(lambda *a: torch.ops.sam3fast.rpb_factors(*a))
        cands["CUDA graph: factors PyTorch"] = graphed(cands["factors: PyTorch (deltas, MLP, pad)"])
        cands["CUDA graph: factors triton"] = graphed(cands["factors: triton (op)"])
        for br, nw in ((32, 1), (64, 2), (128, 4), (64, 4)):  # rows a program, warps (default 64, 4)
            cands[f"factors: triton {br} rows w{nw}"] = both(
                lambda *a, br=br, nw=nw: rf._rpb_factors_triton(*a, block_r=br, num_warps=nw))
    elif rf.HAS_TRITON:
        cands["factors: triton (launcher)"] = both(lambda *a: rf._rpb_factors_triton(*a, block_r=64))
    want = cands["factors: PyTorch (deltas, MLP, pad)"]()
    rows = []
    for name, fn in cands.items():
        with torch.no_grad():
            got = fn()
            if got is not None:
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            ms = time_ms(fn, device, args.reps)
        rows.append({"shape": label, "impl": name, "ms": ms, "TFLOPs": flops / ms / 1e9})
        print(f"{label:22} {name:38} {ms:10.4f} ms  {flops / ms / 1e9:8.3f} TFLOP/s")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI); numbers are not performance numbers")
    p.add_argument("--prompts", default="1,4", help="comma-separated batch sizes (prompts)")
    p.add_argument("--queries", type=int, default=201, help="L: object queries + the presence token")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--grid", type=int, default=72)
    p.add_argument("--hidden", type=int, default=256, help="the boxRPB MLPs' hidden width (factor rows)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--out", default=None, help="results path stem (GPU: bench/results/rpb_attention_<gpu>_<date>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.prompts, args.queries, args.heads, args.head_dim, args.grid, args.reps = "2", 9, 2, 16, 3, 3
        args.hidden = 32
        if device.type == "cpu":
            args.dtype = "float32"  # the interpreter has no bf16 arithmetic
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    # Smoke: not square, so a y/x swap would fail the accuracy gate.
    args.grid_hw = (args.grid, args.grid + 2) if args.smoke else (args.grid, args.grid)
    dtype = getattr(torch, args.dtype)
    # The interpreter pays per program iteration: one tile keeps the smoke run short.
    tiles = [(16, 16, 4, 2)] if device.type == "cpu" else TILES
    compile_backend = "aot_eager" if device.type == "cpu" else "inductor"  # inductor's CPU cold start is ~20 s

    shape = {"prompts": args.prompts, "queries": args.queries, "heads": args.heads, "Dh": args.head_dim,
             "grid": "{}x{}".format(*args.grid_hw)}
    header = machine_header(device, shape, dtype=args.dtype, sms=True)
    header["compile_backend"] = compile_backend
    print_header("rpb_attention", header)

    rows = []
    for B in (int(b) for b in args.prompts.split(",")):
        rows += bench_shape(B, args, device, dtype, tiles, compile_backend)
        rows += bench_factors(B, args, device)

    if device.type == "cuda" or args.out:
        write_results(
            "rpb_attention", header, rows, ["shape", "impl", "ms", "TFLOP/s"],
            lambda r: [r["shape"], r["impl"], f"{r['ms']:.4f}", f"{r['TFLOPs']:.3f}"],
            args.out,
        )
    assert all(math.isfinite(r["ms"]) for r in rows)


if __name__ == "__main__":
    main()
