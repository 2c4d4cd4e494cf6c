"""Benchmark of the SAM mask decoder's ``TwoWayTransformer`` with the fused cross-attention kernels
(``sam3fast::token_to_image_attention``, ``sam3fast::image_to_token_attention``).

Shapes (SAM 3 tracker): depth 2, D 256, 8 heads, MLP 2048, cross attentions at C = 128 (8 heads of
16), S = 72 x 72 = 5184 image tokens, T = 8 tokens per object (tracking: 6 output tokens, the
not-a-point and the pad point), B objects sharing one image embedding (expanded, as
``MaskDecoder.predict_masks`` passes it) and one PE. Rows, each timed on the same inputs:
  eager                  the module's PyTorch path (``use_kernel=False``): the official op sequence
  compiled               torch.compile of that (inductor on GPU)
  kernel path            ``_forward_kernel``: the two fused kernels per block + the final one
  module default         ``forward`` as the model calls it eagerly: the kernels from
                         ``sam_heads.EAGER_KERNEL_MIN_BATCH`` objects on, else the PyTorch path
  kernel path compiled   torch.compile of that (the token-side PyTorch ops fused by inductor)
  ... CUDA graph         the eager / kernel path replayed from a CUDA graph (GPU only): the launch floor
  t2i / i2t rows         one cross attention alone (block 1): the op and its tile sweep, and the
                         module's ``Attention`` in eager (+ residual + norm4 for i2t; its q_proj and
                         out_proj on the T token rows are in the t2i eager row, not the op's)
TFLOP/s counts the transformer's matmul FLOPs (2 per multiply-add, attention included). The issue's
target is >= 3x the eager path on an H100 (report only).

    python bench/bench_two_way_attention.py                    # GPU: B = 1, 16, 64, bf16
    python bench/bench_two_way_attention.py --objects 4 --tokens 12
    python bench/bench_two_way_attention.py --smoke            # CPU: tiny shapes, Triton interpreter

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

from _common import (  # noqa: E402
    graphed, machine_header, print_header, time_ms, use_interpreter_without_cuda, write_results,
)

use_interpreter_without_cuda()  # before the kernel import

from sam3fast.kernels import two_way_attention as tw  # noqa: E402
from sam3fast.model.sam_heads import TwoWayTransformer  # noqa: E402

# (BLOCK_N, BLOCK_D, warps, stages) token -> image; (BLOCK_M, BLOCK_D, warps, stages) image -> token
T2I_TILES = [tw.DEFAULT_T2I_TILE, (64, 16, 8, 2), (32, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 3)]
I2T_TILES = [tw.DEFAULT_I2T_TILE, (32, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2)]


def transformer_flops(B, T, S, D, C, mlp, depth):
    """Matmul FLOPs of one TwoWayTransformer forward (2 per multiply-add)."""
    t2i = 2 * (2 * S * D * C + T * D * C + 2 * T * S * C + T * C * D)
    i2t = 2 * (S * D * C + 2 * T * D * C + 2 * S * T * C + S * C * D)
    self_attn = 2 * (4 * T * D * D + 2 * T * T * D)
    mlp_f = 2 * 2 * T * D * mlp
    return B * (depth * (self_attn + t2i + mlp_f + i2t) + t2i)


def make_inputs(B, T, grid, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(1, D, grid, grid, generator=g).to(device=device, dtype=dtype).expand(B, -1, -1, -1)
    pe = torch.randn(1, D, grid, grid, generator=g).to(device=device, dtype=dtype)
    tok = torch.randn(B, T, D, generator=g).to(device=device, dtype=dtype)
    return img, pe, tok


def bench_shape(B, args, device, dtype, compile_backend, modules):
    m_eager, m_kernel, m_ref = modules
    D, H, grid, T = args.dim, args.heads, args.grid, args.tokens
    S, C = grid * grid, D // 2
    img, pe, tok = make_inputs(B, T, grid, D, dtype, device)
    flops = transformer_flops(B, T, S, D, C, args.mlp, 2)
    label = f"B={B} T={T} S={S}"
    cuda = device.type == "cuda"

    # Accuracy gate before any time means something: the fp32 module, and the PyTorch path in dtype.
    with torch.no_grad():
        ref = m_ref(img.float(), pe.float(), tok.float())
        torch_err = max((o.float() - r).abs().max().item() for o, r in zip(m_eager(img, pe, tok), ref))

    def kernel_path():
        if cuda:
            return m_kernel._forward_kernel(img, pe, tok)  # forced: eager forward picks by batch size
        return m_kernel._forward_kernel(img, pe, tok, backend="triton")  # the launchers, interpreted

    cands = {"eager (PyTorch path)": lambda: m_eager(img, pe, tok)}
    if not args.no_compile:
        torch._dynamo.reset()
        comp = torch.compile(m_eager, fullgraph=True, backend=compile_backend)
        cands[f"compiled ({compile_backend})"] = lambda: comp(img, pe, tok)
    cands["kernel path"] = kernel_path
    if cuda:  # what the module does by default eagerly (sam_heads.EAGER_KERNEL_MIN_BATCH)
        cands["module default (eager dispatch)"] = lambda: m_kernel(img, pe, tok)
    if cuda and not args.no_compile:
        comp_k = torch.compile(m_kernel, fullgraph=True, backend=compile_backend)
        cands[f"kernel path compiled ({compile_backend})"] = lambda: comp_k(img, pe, tok)
    if cuda:
        with torch.no_grad():
            cands["eager, CUDA graph"] = graphed(lambda: m_eager(img, pe, tok))
            cands["kernel path, CUDA graph"] = graphed(kernel_path)

    # One cross attention alone: block 1's, on the image tokens as block 0 leaves them.
    blk = m_eager.layers[1]
    keys = torch.randn(B, S, D, device=device, dtype=dtype)
    key_pe = pe.flatten(2).transpose(1, 2)
    a, i = blk.cross_attn_token_to_image, blk.cross_attn_image_to_token
    with torch.no_grad():
        q_t = a.q_proj(tok)
        k_t, v_t = i.k_proj(tok), i.v_proj(tok)
    t2i_args = (q_t, keys, key_pe, a.k_proj.weight, a.k_proj.bias, a.v_proj.weight, a.v_proj.bias, H)
    i2t_args = (keys, key_pe, i.q_proj.weight, i.q_proj.bias, k_t, v_t, i.out_proj.weight, i.out_proj.bias,
                blk.norm4.weight, blk.norm4.bias, blk.norm4.eps, H)
    tiles_t2i = T2I_TILES if cuda else T2I_TILES[:1]
    tiles_i2t = I2T_TILES if cuda else I2T_TILES[:1]
    for bn, bd, nw, ns in tiles_t2i:
        tile = dict(block_n=bn, block_d=bd, num_warps=nw, num_stages=ns)
        cands[f"t2i op {bn}x{bd} w{nw} s{ns}"] = (
            lambda tile=tile: tw._token_to_image_attention_triton(*t2i_args, **tile))
    if cuda:
        cands["t2i op, no split-KV"] = lambda: tw._token_to_image_attention_triton(*t2i_args, num_splits=1)
    cands["t2i eager (Attention)"] = lambda: a(q=tok, k=keys + key_pe, v=keys)
    for bm, bd, nw, ns in tiles_i2t:
        tile = dict(block_m=bm, block_d=bd, num_warps=nw, num_stages=ns)
        cands[f"i2t op {bm}x{bd} w{nw} s{ns}"] = (
            lambda tile=tile: tw._image_to_token_attention_triton(*i2t_args, **tile))
    cands["i2t eager (Attention + norm4)"] = lambda: blk.norm4(keys + i(q=keys + key_pe, k=tok, v=tok))

    rows = []
    with torch.no_grad():
        eager_ms = None
        for name, fn in cands.items():
            out = fn()
            if name.startswith("kernel path") and out is not None:
                err = max((o.float() - r).abs().max().item() for o, r in zip(out, ref))
                limit = 1e-3 if dtype == torch.float32 else 2 * torch_err
                assert err <= limit, f"{name}: max error {err:.3g} vs the fp32 module > {limit:.3g}"
            ms = time_ms(fn, device, args.reps)
            whole = not name.startswith(("t2i", "i2t"))
            if name.startswith("eager (PyTorch"):
                eager_ms = ms
            row = {"shape": label, "impl": name, "ms": ms,
                   "TFLOPs": flops / ms / 1e9 if whole else None,
                   "speedup_vs_eager": eager_ms / ms if whole and eager_ms else None}
            rows.append(row)
            tf = f"{row['TFLOPs']:8.2f} TFLOP/s" if whole else " " * 16
            sp = f"  {row['speedup_vs_eager']:5.2f}x eager" if row["speedup_vs_eager"] else ""
            print(f"{label:20} {name:38} {ms:10.3f} ms  {tf}{sp}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI); numbers are not performance numbers")
    p.add_argument("--objects", default="1,16,64", help="comma-separated batch sizes (objects)")
    p.add_argument("--tokens", type=int, default=8, help="tokens per object (8 when tracking)")
    p.add_argument("--grid", type=int, default=72)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mlp", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--out", default=None, help="results path stem (GPU: bench/results/two_way_attention_<gpu>_<date>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.objects, args.tokens, args.grid, args.dim, args.heads, args.mlp, args.reps = "2", 7, 4, 32, 2, 24, 2
        if device.type == "cpu":
            args.dtype = "float32"  # the interpreter has no bf16 arithmetic
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    dtype = getattr(torch, args.dtype)
    compile_backend = "aot_eager" if device.type == "cpu" else "inductor"  # inductor's CPU cold start is ~20 s

    torch.manual_seed(0)
    m_ref = TwoWayTransformer(2, args.dim, args.heads, args.mlp).eval().to(device)
    m_ref.use_kernel = False  # the fp32 PyTorch path: the accuracy reference
    m_eager = copy.deepcopy(m_ref).to(dtype)
    m_kernel = copy.deepcopy(m_eager)
    m_kernel.use_kernel = True

    shape = {"objects": args.objects, "tokens": args.tokens, "grid": args.grid, "D": args.dim, "heads": args.heads,
             "cross_attention_C": args.dim // 2, "mlp": args.mlp, "depth": 2, "image": "batch-1, expanded"}
    header = machine_header(device, shape, dtype=args.dtype, sms=True)
    header["compile_backend"] = compile_backend
    print_header("two_way_attention", header)

    rows = []
    for B in (int(b) for b in args.objects.split(",")):
        rows += bench_shape(B, args, device, dtype, compile_backend, (m_eager, m_kernel, m_ref))

    if device.type == "cuda" or args.out:
        write_results(
            "two_way_attention", header, rows, ["shape", "impl", "ms", "TFLOP/s", "x eager"],
            lambda r: [r["shape"], r["impl"], f"{r['ms']:.3f}", "" if r["TFLOPs"] is None else f"{r['TFLOPs']:.2f}",
                       "" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}"],
            args.out,
        )
    assert all(math.isfinite(r["ms"]) for r in rows)


if __name__ == "__main__":
    main()
