"""Benchmark of the fusion encoder's image -> prompt cross-attention step (``sam3fast::prompt_cross_attention``).

Shapes (SAM 3): L = 72 x 72 = 5184 image tokens (queries), D = 256, 8 heads of 32, P prompt tokens
(text 32 + geometry / visual; 33 for text + one box, up to 64), B images. The step, per layer
(6 in the encoder):  tgt + cross_attn_image(norm2(tgt), prompt, prompt, key_padding_mask=mask).
Rows, each timed on the same inputs:
  triton ...          the fused kernel through the entry point (the prompt's K/V GEMM + one launch,
                      what the model runs) and, launcher only, a sweep of (BLOCK_M, BLOCK_O, warps, stages)
  eager (module)      the model's PyTorch path: norm2 + MultiheadAttention (3 projections, SDPA with
                      the additive padding mask, out_proj) + residual, the layer's own modules
  compiled            torch.compile of that
  sdpa <backend>      the attention alone on already projected q/k/v (no norm, projections or
                      residual), forced to one SDPA backend; "unsupported" where it refuses the inputs
TFLOP/s counts 2 B L D^2 (q projection) + 4 B L P_valid D (QK^T, PV) + 2 B L D^2 (out projection)
+ 2 B P D 2D (the prompt's K/V) for every row; GB/s counts the bytes the fused step must move
(tgt read, out written, weights, prompt) for every row, so rows compare by time. Issue #4's
target: the kernel >= 3x the eager module path on an H100.

    python bench/bench_prompt_cross_attention.py                 # GPU: B = 1 and 4, P = 33 and 64, bf16
    python bench/bench_prompt_cross_attention.py --batch 1 --prompt 33 --dtype float32
    python bench/bench_prompt_cross_attention.py --smoke         # CPU: tiny shapes, Triton interpreter, seconds

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

from sam3fast.kernels import prompt_cross_attention as pca  # noqa: E402
from sam3fast.model.encoder import FusionEncoder  # noqa: E402
from sam3fast.model.init import stable_random_init_  # noqa: E402

# (BLOCK_M, BLOCK_O, num_warps, num_stages); see DEFAULT_TILE's comment for the sm_90 register use.
TILES = [pca.DEFAULT_TILE, (64, 256, 8, 2), (64, 64, 8, 2), (32, 256, 4, 2), (32, 128, 4, 2), (128, 128, 8, 2),
         (64, 128, 8, 2)]


def make_layer(D, H, dtype, device, seed=0):
    """One fusion-encoder layer with stable random weights (the cross-attention step reads norm2 and
    cross_attn_image only)."""
    layer = FusionEncoder(D, H, 4 * D, 1).layers[0]
    stable_random_init_(layer, seed=seed)
    return layer.eval().to(device=device, dtype=dtype)


def make_inputs(B, L, P, D, n_pad, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    tgt = torch.randn(B, L, D, generator=g) + 0.3
    prompt = torch.randn(B, P, D, generator=g)
    mask = torch.zeros(B, P, dtype=torch.bool)
    if n_pad:
        mask[:, P - n_pad:] = True  # padded text tokens
    return tgt.to(device=device, dtype=dtype), prompt.to(device=device, dtype=dtype), mask.to(device)


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items() if hasattr(SDPBackend, attr)}


def bench_shape(B, P, args, device, dtype, tiles, compile_backend):
    L, D, H = args.grid * args.grid, args.dim, args.heads
    n_pad = min(args.pad, P - 1)
    layer = make_layer(D, H, dtype, device)
    ca, n = layer.cross_attn_image, layer.norm2
    tgt, prompt, mask = make_inputs(B, L, P, D, n_pad, dtype, device)
    label = f"B={B} L={L} P={P} pad={n_pad}"
    p_valid = P - n_pad
    flops = 4 * B * L * D * D + 4 * B * L * p_valid * D + 4 * B * P * D * D
    size = tgt.element_size()
    nbytes = (2 * B * L * D + 4 * D * D + 4 * D + B * P * D) * size + B * P

    def eager_module():
        return tgt + ca(n(tgt), prompt, prompt, key_padding_mask=mask)

    def entry():
        return pca.prompt_cross_attention(tgt, prompt, mask, ca.in_proj_weight, ca.in_proj_bias, ca.out_proj.weight,
                                          ca.out_proj.bias, H, n.weight, n.bias, n.eps)

    kv = F.linear(prompt, ca.in_proj_weight[D:], ca.in_proj_bias[D:])
    op_args = (tgt, kv[..., :D], kv[..., D:], mask, n.weight, n.bias, n.eps, ca.in_proj_weight[:D],
               ca.in_proj_bias[:D], ca.out_proj.weight, ca.out_proj.bias, H)

    # Accuracy gate before any time means something: the fp32 reference, and PyTorch in this dtype.
    f32 = tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in op_args)
    ref = pca.prompt_cross_attention_ref(*f32)
    torch_err = (eager_module().float() - ref).abs().max().item()

    cands = {}
    if device.type == "cuda":
        cands["triton (entry: K/V GEMM + kernel)"] = entry
    for bm, bo, nw, ns in tiles:
        tile = dict(block_m=bm, block_o=bo, num_warps=nw, num_stages=ns)
        fn = (lambda tile=tile: pca._prompt_cross_attention_triton(*op_args, **tile))
        cands[f"triton {bm}x{bo} w{nw} s{ns}"] = fn
        if device.type == "cuda":
            # a single launch of ~30-100 us: the eager row can carry the Python launch; the graphed
            # row is the kernel's device time (what the tile choice should read)
            fn()  # (compiled before the capture)
            cands[f"CUDA graph: triton {bm}x{bo} w{nw} s{ns}"] = graphed(fn)
    cands["eager (module: norm2 + mha + residual)"] = eager_module
    if device.type == "cuda":  # launch-bound sizes: the same calls replayed from CUDA graphs (GPU time only)
        cands["CUDA graph: entry"] = graphed(entry)
        cands["CUDA graph: eager module"] = graphed(eager_module)
    if not args.no_compile:
        torch._dynamo.reset()
        comp = torch.compile(eager_module, fullgraph=True, backend=compile_backend)
        cands[f"compiled ({compile_backend})"] = comp

    # The attention alone on already projected q/k/v, per SDPA backend.
    q = F.linear(n(tgt), ca.in_proj_weight[:D], ca.in_proj_bias[:D]).view(B, L, H, D // H).transpose(1, 2)
    k, v = (t.reshape(B, P, H, D // H).transpose(1, 2) for t in (kv[..., :D], kv[..., D:]))
    bias = torch.zeros(B, 1, 1, P, dtype=dtype, device=device).masked_fill(mask[:, None, None, :], float("-inf"))
    from torch.nn.attention import sdpa_kernel

    for name, backend in _sdpa_backends().items():
        if name == "math" and device.type == "cuda":
            continue  # materialises the scores: never the best

        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

        try:
            run()
        except RuntimeError as e:  # this backend refuses these inputs: a row saying so, not a fallback
            print(f"{label:28} sdpa {name:36} unsupported ({str(e).splitlines()[0][:80]})")
            continue
        cands[f"sdpa {name} (attention only)"] = run

    rows = []
    eager_ms = None
    for name, fn in cands.items():
        out = fn()
        if name.startswith(("triton", "CUDA graph: triton")):
            err = (out.float() - ref).abs().max().item()
            limit = 1e-4 * max(1.0, ref.abs().max().item()) if dtype == torch.float32 else 2 * torch_err
            assert err <= limit, f"{name}: max error {err:.3g} vs the fp32 reference > {limit:.3g}"
        ms = time_ms(fn, device, args.reps)
        if name.startswith("eager"):
            eager_ms = ms
        row = {"shape": label, "impl": name, "ms": ms, "TFLOPs": flops / ms / 1e9, "GBs": nbytes / ms / 1e6}
        rows.append(row)
        print(f"{label:28} {name:40} {ms:9.4f} ms  {row['TFLOPs']:7.2f} TFLOP/s  {row['GBs']:8.1f} GB/s")
    for row in rows:
        row["x_eager"] = eager_ms / row["ms"]
    best = min((r for r in rows if r["impl"].startswith("triton")), key=lambda r: r["ms"])
    print(f"{label:28} best triton ({best['impl']}): {best['x_eager']:.2f}x the eager module path")
    graphed_rows = [r for r in rows if r["impl"].startswith("CUDA graph: triton")]
    module = next((r for r in rows if r["impl"] == "CUDA graph: eager module"), None)
    if graphed_rows and module is not None:
        best = min(graphed_rows, key=lambda r: r["ms"])
        print(f"{label:28} best graphed tile ({best['impl']}): {best['ms']:.4f} ms, "
              f"{module['ms'] / best['ms']:.2f}x the graphed eager module")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI); numbers are not performance numbers")
    p.add_argument("--batch", default="1,4", help="comma-separated batch sizes (images)")
    p.add_argument("--prompt", default="33,64", help="comma-separated prompt lengths P")
    p.add_argument("--pad", type=int, default=8, help="padded prompt tokens (the last ones of every batch element)")
    p.add_argument("--grid", type=int, default=72)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--out", default=None,
                   help="results path stem (GPU: bench/results/prompt_cross_attention_<gpu>_<date>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.batch, args.prompt, args.pad, args.grid, args.dim, args.heads, args.reps = "2", "9", 3, 5, 32, 2, 3
        if device.type == "cpu":
            args.dtype = "float32"  # the interpreter has no bf16 arithmetic
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    dtype = getattr(torch, args.dtype)
    # The interpreter pays per program: one tile keeps the smoke run short.
    tiles = [(32, 32, 4, 2)] if device.type == "cpu" else TILES
    compile_backend = "aot_eager" if device.type == "cpu" else "inductor"  # inductor's CPU cold start is ~20 s

    shape = {"batch": args.batch, "prompt": args.prompt, "padded": args.pad, "grid": args.grid, "D": args.dim,
             "heads": args.heads}
    header = machine_header(device, shape, dtype=args.dtype, sms=True)
    header["compile_backend"] = compile_backend
    print_header("prompt_cross_attention", header)

    rows = []
    with torch.no_grad():
        for B in (int(b) for b in args.batch.split(",")):
            for P in (int(x) for x in args.prompt.split(",")):
                rows += bench_shape(B, P, args, device, dtype, tiles, compile_backend)

    if device.type == "cuda" or args.out:
        write_results(
            "prompt_cross_attention", header, rows, ["shape", "impl", "ms", "TFLOP/s", "GB/s", "x eager"],
            lambda r: [r["shape"], r["impl"], f"{r['ms']:.4f}", f"{r['TFLOPs']:.2f}", f"{r['GBs']:.1f}",
                       f"{r['x_eager']:.2f}"],
            args.out,
        )
    assert all(math.isfinite(r["ms"]) for r in rows)


if __name__ == "__main__":
    main()
