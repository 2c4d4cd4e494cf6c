"""The prompt cross-attention kernel (``sam3fast.kernels.prompt_cross_attention``) against a float64
reference written independently here (explicit LayerNorm, per-head einsums, an explicit masked
softmax), the ``sam3fast::prompt_cross_attention`` op (opcheck, torch.compile) and its entry point,
the fusion encoder's kernel path against its PyTorch path, and the benchmark's --smoke run.

On CPU the Triton launcher runs under ``TRITON_INTERPRET=1`` (set by conftest.py) on tiny odd shapes:
L = 7 / 37 image rows (partial row blocks), P = 1 / 5 / 9 / 17 prompt tokens (partial key tiles),
D = 32 / 64 with 2-4 heads, random key padding including a batch element whose keys are all padded;
outputs are preallocated full of NaN so an unwritten element fails.
"""

from __future__ import annotations

import math
import os
import runpy
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import sam3fast.model.encoder as encoder_mod
from kernel_checks import assert_close_to64, capture_graph, forced_backend_reason, run_compiled

from sam3fast.kernels import prompt_cross_attention as pca
from sam3fast.model.encoder import FusionEncoder, TransformerEncoderLayer
from sam3fast.model.init import stable_random_init_

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not pca.HAS_TRITON, reason=f"triton not importable: {pca.TRITON_IMPORT_ERROR}")
BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_prompt_cross_attention.py")


def naive64(tgt, k, v, pad, nw, nb, eps, wq, bq, wo, bo, H):
    """The spec in float64 with no intermediate rounding, written the obvious way; a batch element
    whose keys are all padded attends to nothing (zero attention output: tgt + bo)."""
    tgt, k, v, wq, bq, wo, bo = (t.double() for t in (tgt, k, v, wq, bq, wo, bo))
    B, L, D = tgt.shape
    P, Dh = k.shape[1], D // H
    x = tgt
    if nw is not None:
        mean = tgt.mean(-1, keepdim=True)
        var = ((tgt - mean) ** 2).mean(-1, keepdim=True)
        x = (tgt - mean) / torch.sqrt(var + eps) * nw.double() + nb.double()
    q = (x @ wq.T + bq).view(B, L, H, Dh)
    kh, vh = k.view(B, P, H, Dh), v.view(B, P, H, Dh)
    scores = torch.einsum("bihd,bjhd->bhij", q, kh) / math.sqrt(Dh)
    if pad is not None:
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    m = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isfinite(m), m, 0.0))
    l_sum = p.sum(-1, keepdim=True)
    o = torch.einsum("bhij,bjhd->bihd", p / torch.where(l_sum > 0, l_sum, 1.0), vh).reshape(B, L, D)
    return tgt + o @ wo.T + bo


def _case(B, L, P, D, H, pad="random", norm=True, seed=0, dtype=torch.float32, strided_kv=True):
    """(tgt, k, v, pad, nw, nb, eps, wq, bq, wo, bo, H): the op's arguments, weights scaled like a
    trained layer's (std 1/sqrt(D)); k and v are views of one (B, P, 2D) tensor like the entry's."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    tgt = 2.0 * r(B, L, D) + 0.5  # a non-zero mean: LayerNorm must remove it
    if strided_kv:
        kv = r(B, P, 2 * D) * 1.5
        k, v = kv[..., :D], kv[..., D:]
    else:
        k, v = r(B, P, D) * 1.5, r(B, P, D)
    mask = None
    if pad is not None:
        mask = torch.rand(B, P, generator=g) < 0.4
        mask[0, 0] = False  # batch 0 keeps a key
        if pad == "full" and B > 1:
            mask[1] = True  # batch 1 attends to nothing
    nw, nb = (1 + 0.2 * r(D), 0.2 * r(D)) if norm else (None, None)
    wq, wo = r(D, D) / math.sqrt(D), r(D, D) / math.sqrt(D)
    bq, bo = 0.2 * r(D), 0.2 * r(D)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return (cast(tgt), cast(k), cast(v), mask, cast(nw), cast(nb), 1e-5, cast(wq), cast(bq), cast(wo), cast(bo), H)


def _run(args, **launch):
    tgt = args[0]
    out = torch.full(tgt.shape, float("nan"), dtype=tgt.dtype)
    got = pca._prompt_cross_attention_triton(*args, out=out, **launch)
    assert got.data_ptr() == out.data_ptr()
    return got


_assert_close = assert_close_to64


# (B, L, P, D, H, padding, LayerNorm)
CASES = {
    "L7_P1_D32_H2": (1, 7, 1, 32, 2, None, True),
    "L37_P5_D64_H4_fullpad": (2, 37, 5, 64, 4, "full", True),
    "L37_P9_D64_H2_nonorm": (2, 37, 9, 64, 2, "random", False),
    "L7_P9_D32_H2": (1, 7, 9, 32, 2, "random", True),
    "L37_P17_D32_H2_fullpad": (2, 37, 17, 32, 2, "full", True),
}
LAUNCH = {
    "default": {},
    "m16_o16": dict(block_m=16, block_o=16),
    "m32_o32_w4": dict(block_m=32, block_o=32, num_warps=4),
}


@needs_triton
@pytest.mark.parametrize("launch", list(LAUNCH), ids=list(LAUNCH))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_float64(case, launch):
    B, L, P, D, H, pad, norm = CASES[case]
    args = _case(B, L, P, D, H, pad=pad, norm=norm, seed=len(case))
    want = naive64(*args)
    got = _run(args, **LAUNCH[launch])
    _assert_close(got, want, 5e-5)
    if pad == "full":  # attends to nothing: exactly tgt + bo (rounded once), not NaN
        assert torch.equal(got[1], args[0][1] + args[10])


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reference_matches_float64(case):
    """The reference (the CPU kernel) against the same float64 spec, in float32 and float64."""
    B, L, P, D, H, pad, norm = CASES[case]
    args = _case(B, L, P, D, H, pad=pad, norm=norm, seed=len(case))
    want = naive64(*args)
    _assert_close(pca.prompt_cross_attention_ref(*args), want, 5e-5)
    a64 = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
    _assert_close(pca.prompt_cross_attention_ref(*a64), want, 1e-10)


@needs_triton
def test_kernel_fp16_within_twice_pytorch_error():
    """fp16 inputs: the kernel's error against the float64 spec is at most 2x that of the model's
    PyTorch path (norm2 + MultiheadAttention + residual) run in fp16."""
    B, L, P, D, H = 2, 37, 9, 64, 4
    layer = _fusion_layer(D, H, seed=3)
    args = _layer_args(layer, B, L, P, seed=4, dtype=torch.float16)
    want = naive64(*args)
    with torch.no_grad():
        torch_out = _layer_pytorch_step(layer.to(torch.float16), args[0], _memory(B, P, D, 4, torch.float16), args[3])
    torch_err = (torch_out.double() - want).abs().max().item()
    got = _run(args)
    assert got.dtype == torch.float16
    _assert_close(got, want, 2 * torch_err)


@needs_triton
def test_kernel_masked_keys_do_not_matter():
    """Changing k and v at padded slots, even to huge values, changes nothing, bit for bit."""
    args = list(_case(2, 37, 9, 32, 2, pad="random", seed=6, strided_kv=False))
    base = _run(tuple(args), block_m=16)
    pad = args[3]
    args[1], args[2] = args[1].clone(), args[2].clone()
    args[1][pad] = 1e4
    args[2][pad] = -1e4
    assert torch.equal(_run(tuple(args), block_m=16), base)


@needs_triton
def test_kernel_strided_inputs():
    """tgt a view of a wider tensor (row strides only), k with a non-unit last-dim stride (copied)."""
    args = list(_case(2, 37, 5, 32, 2, pad="random", seed=7))
    want = naive64(*args)
    wide = torch.randn(2, 37, 48)[..., 8:40]
    wide.copy_(args[0])
    k2 = torch.randn(2, 5, 32, 2)[..., 1]
    k2.copy_(args[1])
    args[0], args[1] = wide, k2
    _assert_close(_run(tuple(args), block_m=16), want, 5e-5)


def test_bad_inputs():
    args = _case(2, 7, 5, 32, 2, seed=0)
    ref = pca.prompt_cross_attention_ref

    def call(i, value, fn=ref):
        a = list(args)
        a[i] = value
        return fn(*a)

    with pytest.raises(ValueError, match="tgt must be"):
        call(0, args[0][0])
    with pytest.raises(ValueError, match="k must be"):
        call(1, args[1][..., :16])
    with pytest.raises(ValueError, match="v must have"):
        call(2, args[2][:, :-1])
    with pytest.raises(ValueError, match="key_padding_mask"):
        call(3, args[3].float())
    with pytest.raises(ValueError, match="key_padding_mask"):
        call(3, args[3][:, 1:])
    with pytest.raises(ValueError, match="both"):
        call(5, None)
    with pytest.raises(ValueError, match="q_weight"):
        call(7, args[7][:, :16])
    with pytest.raises(ValueError, match="share a dtype"):
        call(9, args[9].double())
    with pytest.raises(ValueError, match="num_heads"):
        call(11, 3)
    with pytest.raises(ValueError, match="prompt token"):
        ref(args[0], args[1][:, :0], args[2][:, :0], None, *args[4:])
    if pca.HAS_TRITON:
        launcher = pca._prompt_cross_attention_triton
        with pytest.raises(ValueError, match="float32/bfloat16/float16"):
            launcher(*(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args))
        with pytest.raises(ValueError, match="head dim"):
            call(11, 4, launcher)  # Dh = 8: below tl.dot's 16
        with pytest.raises(ValueError, match="block_m"):
            launcher(*args, block_m=24)
        with pytest.raises(ValueError, match="out must be"):
            launcher(*args, out=torch.empty(2, 7, 16))
        big = _case(1, 7, pca._MAX_P + 1, 32, 2, seed=1)
        with pytest.raises(ValueError, match="prompt tokens"):
            launcher(*big)


def test_backend_choice():
    tgt, mem, w = torch.zeros(1, 7, 32), torch.zeros(1, 5, 32), torch.zeros(96, 32)
    backend, why = pca.prompt_cross_attention_backend(tgt, mem, 2, w)
    assert backend == "reference" and ("cpu tensors" in why or "SAM3FAST_FORCE_REFERENCE" in why)
    # The static limits each reason names (checked after the device on CUDA).
    assert pca._kernel_shape_limits(256, 8, 33) is None
    assert "model width" in pca._kernel_shape_limits(384, 8, 33)
    assert "head dim" in pca._kernel_shape_limits(64, 8, 33)
    assert "prompt tokens" in pca._kernel_shape_limits(256, 8, pca._MAX_P + 1)


def _op_args(pad=True, norm=True):
    return _case(2, 7, 5, 32, 2, pad="random" if pad else None, norm=norm, seed=9)


@pytest.mark.parametrize("pad, norm", [(True, True), (False, True), (True, False)])
def test_opcheck(pad, norm):
    torch.library.opcheck(torch.ops.sam3fast.prompt_cross_attention.default, _op_args(pad, norm))


def test_op_cpu_is_reference():
    args = _op_args()
    assert torch.equal(torch.ops.sam3fast.prompt_cross_attention(*args), pca.prompt_cross_attention_ref(*args))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    """A caller of the op and one of the entry point compile with no graph break."""
    tgt, k, v, pad, nw, nb, eps, wq, bq, wo, bo, H = _op_args()
    w_in, b_in = torch.cat([wq, torch.randn(64, 32) / 6]), torch.cat([bq, torch.randn(64)])
    mem = torch.randn(2, 5, 32)

    def via_op(tgt, k, v, pad):
        return torch.ops.sam3fast.prompt_cross_attention(tgt * 2.0, k, v, pad, nw, nb, eps, wq, bq, wo, bo, H) + 1.0

    def via_entry(tgt, k, v, pad):
        return pca.prompt_cross_attention(tgt, mem * 0.5, pad, w_in, b_in, wo, bo, H, nw, nb, eps) * 2.0

    torch._dynamo.reset()
    for fn in (via_op, via_entry):
        got = torch.compile(fn, fullgraph=True, backend=backend)(tgt, k, v, pad)
        torch.testing.assert_close(got, fn(tgt, k, v, pad), rtol=0, atol=0)


def test_force_reference_env():
    reason = forced_backend_reason(
        "prompt_cross_attention",
        "prompt_cross_attention_backend(torch.zeros(1, 7, 32), torch.zeros(1, 5, 32), 2, torch.zeros(96, 32))")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


@needs_triton
def test_kernel_compiles_for_sm90():
    """The real (not interpreted) Triton compiler builds the kernel for an H100 without a GPU, as the
    launcher launches it (``sam3fast.kernels._static_build``: the call's own arguments, so the
    pointers' 16-byte alignment and the strides' divisibility by 16 are specialised as on a GPU): bf16
    at SAM 3's sizes (5184 image rows, D 256, 8 heads, P 64 with key padding and the norm) with the
    default tile uses wgmma and has no stack and no spill (read from the cubin with cuobjdump /
    nvdisasm: 228 registers with Triton 3.7.1, 230 with 3.6.0). A hand-written signature without
    that specialisation built with 944 bytes of stack on Triton 3.6.0. fp32 without norm and padding
    builds too (only that: it is not the model's dtype, and it spills)."""
    code = textwrap.dedent(
        """
        import torch
        from sam3fast.kernels import prompt_cross_attention as pca
        from sam3fast.kernels._static_build import capture, sass_stats
        def build(dtype, pad, norm, L=5184, P=64, D=256, H=8):
            e = lambda *s: torch.empty(s, dtype=dtype)
            kv = e(1, P, 2 * D)  # k and v are the two halves of one projection (views), as the encoder's
            in_w, in_b = e(3 * D, D), e(3 * D)
            with capture(pca._prompt_cross_attention_kernel) as builds:
                pca._prompt_cross_attention_triton(
                    e(1, L, D), kv[..., :D], kv[..., D:], torch.zeros(1, P, dtype=torch.bool) if pad else None,
                    e(D) if norm else None, e(D) if norm else None, 1e-5, in_w[:D], in_b[:D], e(D, D), e(D), H)
            assert len(builds) == 1, [b.name for b in builds]
            return builds[0].kernel
        st = sass_stats(build(torch.bfloat16, pad=True, norm=True))  # the default tile
        assert st["wgmma"] > 0, f"the projections should use wgmma on sm_90: {st}"
        assert st["stack"] == 0 and st["spill_stores"] == 0, st
        build(torch.float32, pad=False, norm=False)
        print("ok")
        """
    )
    run_compiled(code)


# ---- the model's layer -------------------------------------------------------------------------


def _fusion_layer(D, H, seed, ffn=48):
    layer = FusionEncoder(D, H, ffn, 1).layers[0]
    stable_random_init_(layer, seed=seed)
    return layer.eval()


def _memory(B, P, D, seed, dtype=torch.float32):
    return torch.randn(B, P, D, generator=torch.Generator().manual_seed(seed + 100)).to(dtype)


def _layer_args(layer, B, L, P, seed, dtype=torch.float32):
    """The op's arguments for ``layer``'s cross-attention step on random image tokens and prompt."""
    D, ca = layer.norm2.weight.shape[0], layer.cross_attn_image
    g = torch.Generator().manual_seed(seed)
    tgt = (2.0 * torch.randn(B, L, D, generator=g) + 0.5).to(dtype)
    mask = torch.rand(B, P, generator=g) < 0.4
    mask[:, 0] = False
    p = {n: t.detach().to(dtype) for n, t in layer.named_parameters()}
    mem = _memory(B, P, D, seed, dtype)
    kv = F.linear(mem, p["cross_attn_image.in_proj_weight"][D:], p["cross_attn_image.in_proj_bias"][D:])
    return (tgt, kv[..., :D], kv[..., D:], mask, p["norm2.weight"], p["norm2.bias"], layer.norm2.eps,
            p["cross_attn_image.in_proj_weight"][:D], p["cross_attn_image.in_proj_bias"][:D],
            p["cross_attn_image.out_proj.weight"], p["cross_attn_image.out_proj.bias"], ca.num_heads)


def _layer_pytorch_step(layer, tgt, memory, mask):
    """The layer's cross-attention step as its PyTorch path computes it."""
    return tgt + layer.cross_attn_image(layer.norm2(tgt), memory, memory, key_padding_mask=mask)


def _triton_entry(tgt, memory, mask, w_in, b_in, w_out, b_out, H, nw=None, nb=None, eps=1e-5):
    """The entry point with the Triton launcher (interpreted on CPU) in place of the op."""
    D = tgt.shape[-1]
    kv = F.linear(memory, w_in[D:], b_in[D:])
    out = torch.full_like(tgt, float("nan"))
    return pca._prompt_cross_attention_triton(tgt, kv[..., :D], kv[..., D:], mask, nw, nb, eps, w_in[:D], b_in[:D],
                                              w_out, b_out, H, out=out, block_m=16)


def _encoder(seed=0):
    enc = FusionEncoder(32, 2, 48, 2)
    stable_random_init_(enc, seed=seed)
    return enc.eval()


def _encoder_inputs(B=2, L=37, P=9, D=32):
    g = torch.Generator().manual_seed(5)
    feats, pos = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    prompt = torch.randn(B, P, D, generator=g)
    mask = torch.rand(B, P, generator=g) < 0.4
    mask[:, 0] = False
    return feats, pos, prompt, mask


@needs_triton
def test_fusion_encoder_kernel_path_matches_pytorch_path(monkeypatch):
    """The fusion encoder with its layers' kernel branch taken (the Triton launcher, interpreted)
    equals its PyTorch path (use_kernel False) on random weights."""
    enc = _encoder(seed=1)
    inputs = _encoder_inputs()
    calls = []

    def entry(*a, **kw):
        calls.append(1)
        return _triton_entry(*a, **kw)

    with torch.no_grad():
        enc.use_kernel = False
        want = enc(*inputs)
        enc.use_kernel = True
        monkeypatch.setattr(encoder_mod, "prompt_cross_attention_backend", lambda *a: ("triton", "test"))
        monkeypatch.setattr(encoder_mod, "prompt_cross_attention", entry)
        got = enc(*inputs)
    assert len(calls) == 2  # both layers took the kernel branch
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)


def test_fusion_encoder_op_path_matches_pytorch_path(monkeypatch):
    """The same through the real entry point and ``torch.ops.sam3fast.prompt_cross_attention`` (its
    CPU kernel, the reference), with the backend choice forced to "triton"."""
    enc = _encoder(seed=2)
    inputs = _encoder_inputs()
    with torch.no_grad():
        enc.use_kernel = False
        want = enc(*inputs)
        enc.use_kernel = True
        forced = lambda *a: ("triton", "test")  # noqa: E731
        monkeypatch.setattr(encoder_mod, "prompt_cross_attention_backend", forced)
        monkeypatch.setattr(pca, "prompt_cross_attention_backend", forced)
        got = enc(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-5)


def test_cpu_keeps_pytorch_path():
    """On CPU use_kernel changes nothing, bit for bit; the geometry encoder's direction (image memory,
    pos on the keys) never takes the kernel; the flags are not state."""
    enc = _encoder(seed=3)
    inputs = _encoder_inputs()
    with torch.no_grad():
        on = enc(*inputs)
        enc.use_kernel = False
        assert torch.equal(enc(*inputs), on)
    assert all(layer.memory_is_prompt for layer in enc.layers)
    geo_like = TransformerEncoderLayer(32, 2, 48, pos_enc_at_attn=False, pos_enc_at_cross_attn_queries=False,
                                       pos_enc_at_cross_attn_keys=True, memory_is_prompt=True)
    assert not geo_like.memory_is_prompt
    default = TransformerEncoderLayer(32, 2, 48, False, False, True)
    assert not default.memory_is_prompt and default.use_kernel
    assert not any("kernel" in k or "prompt" in k for k in enc.state_dict())


def test_bench_smoke(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [BENCH, "--smoke"])
    runpy.run_path(BENCH, run_name="__main__")
    out = capsys.readouterr().out
    assert "prompt_cross_attention benchmark" in out
    assert "triton" in out and "eager" in out


# ---- GPU only --------------------------------------------------------------------------------


def _gpu_layer_case(B, P, seed, n_pad=0, dtype=torch.bfloat16):
    """A SAM 3 sized fusion layer (D 256, 8 heads) and its cross-attention inputs on CUDA: 72 x 72
    image tokens, P prompt tokens of which the last ``n_pad`` are padded (batch 0 keeps them all)."""
    layer = FusionEncoder(256, 8, 2048, 1).layers[0]
    stable_random_init_(layer, seed=seed)
    layer = layer.eval().cuda().to(dtype)
    g = torch.Generator(device="cuda").manual_seed(seed)
    tgt = (torch.randn(B, 5184, 256, device="cuda", generator=g) + 0.3).to(dtype)
    memory = torch.randn(B, P, 256, device="cuda", generator=g).to(dtype)
    mask = torch.zeros(B, P, dtype=torch.bool, device="cuda")
    if n_pad:
        mask[1:, P - n_pad:] = True
    return layer, tgt, memory, mask


def _entry(layer, tgt, memory, mask):
    ca, n = layer.cross_attn_image, layer.norm2
    return pca.prompt_cross_attention(tgt, memory, mask, ca.in_proj_weight, ca.in_proj_bias, ca.out_proj.weight,
                                      ca.out_proj.bias, ca.num_heads, n.weight, n.bias, n.eps)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("B, P, n_pad", [(1, 33, 0), (2, 64, 20), (3, 37, 4)],
                         ids=["B1_P33", "B2_P64_pad", "B3_P37_pad"])
def test_gpu_real_shape_bf16(B, P, n_pad):
    """bf16 at SAM 3 sizes: error vs the fp32 reference at most 2x that of the PyTorch path in bf16."""
    layer, tgt, memory, mask = _gpu_layer_case(B, P, seed=B + P, n_pad=n_pad)
    ca, n = layer.cross_attn_image, layer.norm2
    with torch.no_grad():
        kv = F.linear(memory, ca.in_proj_weight[256:], ca.in_proj_bias[256:])
        args = (tgt, kv[..., :256], kv[..., 256:], mask, n.weight, n.bias, n.eps, ca.in_proj_weight[:256],
                ca.in_proj_bias[:256], ca.out_proj.weight, ca.out_proj.bias, 8)
        # The fp32 reference on the same (bf16-valued) inputs, and the kernel in fp32 against it.
        args32 = tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
        ref = pca.prompt_cross_attention_ref(*args32)
        torch.testing.assert_close(pca._prompt_cross_attention_triton(*args32), ref, rtol=0, atol=1e-4)
        torch_err = (_layer_pytorch_step(layer, tgt, memory, mask).float() - ref).abs()
        assert pca.prompt_cross_attention_backend(tgt, memory, 8, ca.in_proj_weight)[0] == "triton"
        assert (_entry(layer, tgt, memory, mask).float() - ref).abs().max() <= 2 * torch_err.max()
        for launch in ({}, dict(block_o=256), dict(block_m=32, block_o=256, num_warps=4)):
            got = pca._prompt_cross_attention_triton(*args, **launch)
            assert got.dtype == torch.bfloat16 and not got.isnan().any()
            err = (got.float() - ref).abs()
            assert err.max() <= 2 * torch_err.max(), (launch, err.max().item(), torch_err.max().item())
            assert err.pow(2).mean().sqrt() <= 2 * torch_err.pow(2).mean().sqrt()


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_fusion_encoder_bf16():
    """The whole fusion encoder (2 layers) in bf16 with and without the kernel, against fp32."""
    enc = FusionEncoder(256, 8, 2048, 2)
    stable_random_init_(enc, seed=4)
    enc = enc.eval().cuda()
    g = torch.Generator(device="cuda").manual_seed(4)
    feats = torch.randn(2, 5184, 256, device="cuda", generator=g)
    pos = torch.randn(2, 5184, 256, device="cuda", generator=g)
    prompt = torch.randn(2, 40, 256, device="cuda", generator=g)
    mask = torch.zeros(2, 40, dtype=torch.bool, device="cuda")
    mask[1, 30:] = True
    with torch.no_grad():
        enc.use_kernel = False
        ref = enc(feats, pos, prompt, mask)
        encb = enc.to(torch.bfloat16)
        args = (feats.bfloat16(), pos.bfloat16(), prompt.bfloat16(), mask)
        torch_err = (encb(*args).float() - ref).abs()
        encb.use_kernel = True
        got = encb(*args)
    err = (got.float() - ref).abs()
    assert err.max() <= 2 * torch_err.max() and err.pow(2).mean() <= 4 * torch_err.pow(2).mean()


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_cuda_graph_replay():
    layer, tgt, memory, mask = _gpu_layer_case(2, 40, seed=5, n_pad=8)
    static = [tgt.clone(), memory.clone(), mask.clone()]

    def fn():
        return _entry(layer, *static)

    with torch.no_grad():
        graph, out = capture_graph(fn)
        for seed in (6, 7):
            _, nt, nm, nmask = _gpu_layer_case(2, 40, seed=seed, n_pad=seed)
            for dst, src in zip(static, (nt, nm, nmask)):
                dst.copy_(src)
            graph.replay()
            assert torch.equal(out, _entry(layer, nt, nm, nmask))


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_compile_inductor():
    layer, tgt, memory, mask = _gpu_layer_case(2, 40, seed=8, n_pad=5)
    with torch.no_grad():
        got = torch.compile(lambda t, m, k: _entry(layer, t, m, k), fullgraph=True)(tgt, memory, mask)
        # Inductor may compile the prompt's K/V GEMM differently: bf16 rounding differences only.
        torch.testing.assert_close(got, _entry(layer, tgt, memory, mask), rtol=2e-2, atol=2e-2)
