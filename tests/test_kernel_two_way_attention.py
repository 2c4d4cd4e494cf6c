"""The two-way transformer's fused cross-attention kernels (``sam3fast.kernels.two_way_attention``)
against float64 references written independently here (explicit per-head einsums, an explicit
softmax and LayerNorm), the ops ``sam3fast::token_to_image_attention`` and
``sam3fast::image_to_token_attention`` (opcheck, torch.compile), their entry points and backend
choice, and ``TwoWayTransformer``'s kernel path against its PyTorch path.

On CPU the Triton launchers run under ``TRITON_INTERPRET=1`` (set by conftest.py) on tiny odd shapes:
B = 1 / 3 objects, T = 3 / 7 tokens, 3 x 5 / 4 x 4 / 5 x 7 image grids, 2 heads of 8 or 16, widths
that are and are not powers of two, the image and its PE shared by every object (batch 1 or an
expanded stride-0 batch) or per object, as NCHW ``flatten(2).transpose(1, 2)`` views or contiguous;
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

from kernel_checks import (
    SM90_BUILD, assert_close_to64, capture_graph, forced_backend_reason, run_compiled, spread_layer_norms,
)

from sam3fast.kernels import two_way_attention as tw
from sam3fast.model import sam_heads
from sam3fast.model.sam_heads import TwoWayTransformer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not tw.HAS_TRITON, reason=f"triton not importable: {tw.TRITON_IMPORT_ERROR}")
BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_two_way_attention.py")


# ---- float64 specs, written independently of the module ----------------------------------------


def _bcast(x, B):
    return x.double().expand(B, *x.shape[1:])


def naive64_t2i(q, image, image_pe, wk, bk, wv, bv, H):
    B, T, C = q.shape
    Dh = C // H
    x, pe = _bcast(image, B), _bcast(image_pe, B)
    k = torch.einsum("bsd,cd->bsc", x + pe, wk.double()) + bk.double()
    v = torch.einsum("bsd,cd->bsc", x, wv.double()) + bv.double()
    qh, kh, vh = (t.reshape(B, -1, H, Dh) for t in (q.double(), k, v))
    scores = torch.einsum("bthe,bshe->bhts", qh, kh) / math.sqrt(Dh)
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return torch.einsum("bhts,bshe->bthe", p, vh).reshape(B, T, C)


def naive64_i2t(image, image_pe, wq, bq, k, v, wo, bo, nw, nb, eps, H):
    B, T, C = k.shape
    Dh = C // H
    x, pe = _bcast(image, B), _bcast(image_pe, B)
    S, D = x.shape[1:]
    q = torch.einsum("bsd,cd->bsc", x + pe, wq.double()) + bq.double()
    qh, kh, vh = (t.reshape(B, -1, H, Dh) for t in (q, k.double(), v.double()))
    scores = torch.einsum("bshe,bthe->bhst", qh, kh) / math.sqrt(Dh)
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    a = torch.einsum("bhst,bthe->bshe", p, vh).reshape(B, S, C)
    y = x + torch.einsum("bsc,dc->bsd", a, wo.double()) + bo.double()
    if nw is None:
        return y
    mu = y.mean(-1, keepdim=True)
    var = ((y - mu) ** 2).mean(-1, keepdim=True)
    return (y - mu) / torch.sqrt(var + eps) * nw.double() + nb.double()


# ---- cases --------------------------------------------------------------------------------------


def _image(g, B, D, grid, layout):
    """(B|1, S, D) image-like input: "nchw" a (b, D, h, w) map seen as flatten(2).transpose(1, 2) (what
    the transformer passes), "expanded" a batch-1 map expanded to B (stride 0, as predict_masks),
    "shared" batch 1, "contiguous" per object."""
    h, w = grid
    if layout == "shared":
        return torch.randn(1, h * w, D, generator=g)
    if layout == "expanded":
        return torch.randn(1, D, h, w, generator=g).expand(B, -1, -1, -1).flatten(2).transpose(1, 2)
    if layout == "nchw":
        return torch.randn(B, D, h, w, generator=g).flatten(2).transpose(1, 2)
    return torch.randn(B, h * w, D, generator=g)


def _weights(g, C, D, n):
    return [(torch.randn(C, D, generator=g) / math.sqrt(D), 0.3 * torch.randn(C, generator=g)) for _ in range(n)]


def t2i_case(B, T, H, Dh, grid, D, img_layout, pe_layout, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    C = H * Dh
    q = 2.0 * torch.randn(B, T, C, generator=g)  # scale 2: softmaxes far from uniform
    image, pe = _image(g, B, D, grid, img_layout), _image(g, B, D, grid, pe_layout)
    (wk, bk), (wv, bv) = _weights(g, C, D, 2)
    return [t.to(dtype) for t in (q, image, pe, wk, bk, wv, bv)] + [H]


def i2t_case(B, T, H, Dh, grid, D, img_layout, pe_layout, seed, norm=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    C = H * Dh
    image, pe = _image(g, B, D, grid, img_layout), _image(g, B, D, grid, pe_layout)
    ((wq, bq),) = _weights(g, C, D, 1)
    k, v = 2.0 * torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    wo, bo = torch.randn(D, C, generator=g) / math.sqrt(C), 0.3 * torch.randn(D, generator=g)
    nw, nb = (1 + 0.5 * torch.randn(D, generator=g), 0.3 * torch.randn(D, generator=g)) if norm else (None, None)
    ts = [t if t is None else t.to(dtype) for t in (image, pe, wq, bq, k, v, wo, bo, nw, nb)]
    return ts + [1e-5, H]


_assert_close = assert_close_to64


def run_t2i(args, **launch):
    q = args[0]
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    got = tw._token_to_image_attention_triton(*args, out=out, **launch)
    assert got.data_ptr() == out.data_ptr()
    return got


def run_i2t(args, **launch):
    image, k = args[0], args[4]
    out = torch.full((k.shape[0], image.shape[1], image.shape[2]), float("nan"), dtype=k.dtype)
    got = tw._image_to_token_attention_triton(*args, out=out, **launch)
    assert got.data_ptr() == out.data_ptr()
    return got


# (B, T, H, Dh, grid, D, image layout, pe layout)
CASES = {
    "B1_T3_3x5_h2x8_D32": (1, 3, 2, 8, (3, 5), 32, "shared", "shared"),
    "B3_T7_4x4_h2x16_D64_expanded": (3, 7, 2, 16, (4, 4), 64, "expanded", "nchw"),
    "B3_T3_3x5_h2x8_D40_per_object": (3, 3, 2, 8, (3, 5), 40, "contiguous", "shared"),
    "B3_T7_5x7_h2x16_D48_nchw": (3, 7, 2, 16, (5, 7), 48, "nchw", "shared"),
}
T2I_LAUNCH = {
    "default": {},
    "tile16": dict(block_n=16, block_d=16),
    "split2": dict(block_n=16, block_d=32, num_splits=2),
    "split5": dict(block_n=16, num_splits=5),  # more splits than tiles on the small grids: clamped
}
I2T_LAUNCH = {"default": {}, "tile16": dict(block_m=16, block_d=16), "m32": dict(block_m=32, block_d=32)}


@needs_triton
@pytest.mark.parametrize("launch", list(T2I_LAUNCH), ids=list(T2I_LAUNCH))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_t2i_kernel_matches_float64(case, launch):
    args = t2i_case(*CASES[case], seed=len(case))
    want = naive64_t2i(*args)
    _assert_close(run_t2i(args, **T2I_LAUNCH[launch]), want, 2e-5)
    # The reference (the CPU kernel) against the same float64 spec, in float32 and float64.
    _assert_close(tw.token_to_image_attention_ref(*args), want, 2e-5)
    args64 = [a.double() if torch.is_tensor(a) else a for a in args]
    _assert_close(tw.token_to_image_attention_ref(*args64), want, 1e-10)


@needs_triton
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no_norm"])
@pytest.mark.parametrize("launch", list(I2T_LAUNCH), ids=list(I2T_LAUNCH))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_i2t_kernel_matches_float64(case, launch, norm):
    args = i2t_case(*CASES[case], seed=len(case) + 1, norm=norm)
    want = naive64_i2t(*args)
    _assert_close(run_i2t(args, **I2T_LAUNCH[launch]), want, 5e-5)
    _assert_close(tw.image_to_token_attention_ref(*args), want, 5e-5)
    args64 = [a.double() if torch.is_tensor(a) else a for a in args]
    _assert_close(tw.image_to_token_attention_ref(*args64), want, 1e-10)


@needs_triton
def test_t2i_row_blocks_and_many_splits():
    """4 heads x 7 tokens = 28 (head, token) rows in row blocks of 16 (the last one partly empty),
    with 1, 2 and 3 key splits over a 5 x 7 grid."""
    args = t2i_case(3, 7, 4, 8, (5, 7), 48, "nchw", "shared", seed=11)
    want = naive64_t2i(*args)
    for launch in (dict(block_r=16), dict(block_r=16, block_n=16, num_splits=3), dict(block_r=32, num_splits=2,
                                                                                        block_n=16)):
        _assert_close(run_t2i(args, **launch), want, 2e-5)


@needs_triton
def test_token_counts():
    """One head of 16 (the padded token count makes H x TP reach 16), a single token, and 20 tokens
    (TP = 32: the image -> token launcher halves its default BLOCK_M)."""
    for T in (1, 5, 20):
        args = i2t_case(2, T, 1, 16, (3, 5), 32, "shared", "contiguous", seed=T)
        _assert_close(run_i2t(args, block_m=16), naive64_i2t(*args), 5e-5)
        args = t2i_case(2, T, 1, 16, (3, 5), 32, "contiguous", "shared", seed=T)
        _assert_close(run_t2i(args, block_n=16, num_splits=2), naive64_t2i(*args), 2e-5)


@needs_triton
def test_fp16_within_twice_pytorch_error():
    """float16 inputs: the kernels' error against the float64 spec at most 2x that of the reference
    (the module's own op sequence) run in float16."""
    for case in ("B3_T7_4x4_h2x16_D64_expanded", "B3_T3_3x5_h2x8_D40_per_object"):
        args = t2i_case(*CASES[case], seed=3, dtype=torch.float16)
        want = naive64_t2i(*args)
        ref_err = (tw.token_to_image_attention_ref(*args).double() - want).abs().max().item()
        for launch in ({}, dict(block_n=16, num_splits=2)):
            got = run_t2i(args, **launch)
            assert got.dtype == torch.float16
            _assert_close(got, want, max(2 * ref_err, 1e-3))
        args = i2t_case(*CASES[case], seed=4, dtype=torch.float16)
        want = naive64_i2t(*args)
        ref_err = (tw.image_to_token_attention_ref(*args).double() - want).abs().max().item()
        got = run_i2t(args, block_m=16)
        assert got.dtype == torch.float16
        _assert_close(got, want, max(2 * ref_err, 1e-3))


def test_bad_inputs():
    args = t2i_case(3, 7, 2, 16, (4, 4), 64, "contiguous", "shared", seed=0)
    q, image, pe, wk, bk, wv, bv, H = args
    ref = tw.token_to_image_attention_ref
    with pytest.raises(ValueError, match="q must be"):
        ref(q[0], image, pe, wk, bk, wv, bv, H)
    with pytest.raises(ValueError, match="image must be"):
        ref(q, image[:2], pe, wk, bk, wv, bv, H)
    with pytest.raises(ValueError, match="image_pe must be"):
        ref(q, image, pe[:, :5], wk, bk, wv, bv, H)
    with pytest.raises(ValueError, match="num_heads"):
        ref(q, image, pe, wk, bk, wv, bv, 3)
    with pytest.raises(ValueError, match="k_proj"):
        ref(q, image, pe, wk[:, :10], bk, wv, bv, H)
    with pytest.raises(ValueError, match="share one dtype"):
        ref(q, image.double(), pe, wk, bk, wv, bv, H)
    iargs = i2t_case(3, 7, 2, 16, (4, 4), 64, "contiguous", "shared", seed=0)
    iref = tw.image_to_token_attention_ref
    with pytest.raises(ValueError, match="v must have"):
        iref(*iargs[:5], iargs[5][:, :3], *iargs[6:])
    with pytest.raises(ValueError, match="out_proj"):
        iref(*iargs[:6], iargs[6][:, :8], *iargs[7:])
    with pytest.raises(ValueError, match="both be given"):
        iref(*iargs[:8], iargs[8], None, *iargs[10:])
    with pytest.raises(ValueError, match="norm's weight"):
        iref(*iargs[:8], iargs[8][:5], iargs[9][:5], *iargs[10:])
    if tw.HAS_TRITON:
        with pytest.raises(ValueError, match="float32/bfloat16/float16"):
            tw._token_to_image_attention_triton(*[a.double() if torch.is_tensor(a) else a for a in args])
        with pytest.raises(ValueError, match="internal width"):  # C = 24: not a power of two
            tw._token_to_image_attention_triton(*t2i_case(1, 3, 2, 12, (3, 5), 32, "shared", "shared", seed=0))
        with pytest.raises(ValueError, match="block_n"):
            tw._token_to_image_attention_triton(*args, block_n=24)
        with pytest.raises(ValueError, match="block_r"):
            tw._token_to_image_attention_triton(*args, block_r=8)
        with pytest.raises(ValueError, match="out must be"):
            tw._token_to_image_attention_triton(*args, out=torch.empty(3, 7, 16))
        with pytest.raises(ValueError, match="rows"):  # 2 heads x 200 tokens
            tw._image_to_token_attention_triton(*i2t_case(1, 200, 2, 16, (3, 5), 32, "shared", "shared", seed=0))
        with pytest.raises(ValueError, match="block_m"):
            tw._image_to_token_attention_triton(*iargs, block_m=48)
        with pytest.raises(ValueError, match="out must be"):
            tw._image_to_token_attention_triton(*iargs, out=torch.empty(3, 16, 32))


# ---- the ops ------------------------------------------------------------------------------------


def _t2i_op_args():
    return tuple(t2i_case(3, 7, 2, 16, (3, 5), 64, "contiguous", "shared", seed=9))


def _i2t_op_args(norm=True):
    return tuple(i2t_case(3, 7, 2, 16, (3, 5), 64, "contiguous", "shared", seed=9, norm=norm))


def test_opcheck():
    torch.library.opcheck(torch.ops.sam3fast.token_to_image_attention.default, _t2i_op_args())
    for norm in (True, False):
        torch.library.opcheck(torch.ops.sam3fast.image_to_token_attention.default, _i2t_op_args(norm))


def test_op_cpu_is_reference():
    args = _t2i_op_args()
    assert torch.equal(torch.ops.sam3fast.token_to_image_attention(*args), tw.token_to_image_attention_ref(*args))
    args = _i2t_op_args()
    assert torch.equal(torch.ops.sam3fast.image_to_token_attention(*args), tw.image_to_token_attention_ref(*args))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    """Callers of the ops, of the entry points, and the transformer's kernel path compile with no
    graph break."""
    t_args, i_args = _t2i_op_args(), _i2t_op_args()

    def via_ops(q, image):
        a = torch.ops.sam3fast.token_to_image_attention(q * 2.0, image, *t_args[2:])
        b = torch.ops.sam3fast.image_to_token_attention(image, *i_args[1:])
        return a + 1.0, b * 2.0

    def via_entries(q, image):
        a = tw.token_to_image_attention(q, image + 1.0, *t_args[2:])
        b = tw.image_to_token_attention(image, *i_args[1:10], eps=1e-5, num_heads=2)
        return a, b

    torch._dynamo.reset()
    q, image = t_args[0], i_args[0]
    for fn in (via_ops, via_entries):
        got = torch.compile(fn, fullgraph=True, backend=backend)(q, image)
        for g, w in zip(got, fn(q, image)):
            torch.testing.assert_close(g, w, rtol=0, atol=0)

    m, (img, pe, tok) = _transformer(seed=2), _transformer_inputs(3, 7, (3, 5), "expanded", seed=2)
    with torch.no_grad():
        got = torch.compile(m._forward_kernel, fullgraph=True, backend=backend)(img, pe, tok)
        for g, w in zip(got, m._forward_kernel(img, pe, tok)):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_entry_points_backend_cpu():
    assert tw.two_way_attention_backend(torch.zeros(1), 8, 128, 256, 8)[0] == "reference"
    args = _t2i_op_args()
    assert torch.equal(tw.token_to_image_attention(*args), tw.token_to_image_attention_ref(*args))
    args = _i2t_op_args()
    assert torch.equal(tw.image_to_token_attention(*args[:10], eps=args[10], num_heads=args[11]),
                       tw.image_to_token_attention_ref(*args))
    with pytest.raises(ValueError, match="backend must be"):
        tw.token_to_image_attention(*_t2i_op_args(), backend="cuda")


def test_kernel_limits():
    """The static facts the backend choice reads (SAM 3: 8 heads x 16, D 256, T 7-20 pass)."""
    for T in (7, 8, 20, 32):
        assert tw._check_kernel_limits(torch.bfloat16, 128, 256, 8, T) is None
    assert "rows" in tw._check_kernel_limits(torch.bfloat16, 128, 256, 8, 33)
    assert "float64" in tw._check_kernel_limits(torch.float64, 128, 256, 8, 8)
    assert "internal width" in tw._check_kernel_limits(torch.float32, 96, 192, 8, 8)
    assert tw.choose_t2i_splits(1, 81, 132) == 81  # one object: every key tile its own program
    assert tw.choose_t2i_splits(64, 81, 132) == 5  # 320 programs: ~2 waves
    assert tw.choose_t2i_splits(300, 81, 132) == 1


def test_force_reference_env():
    reason = forced_backend_reason(
        "two_way_attention", "two_way_attention_backend(torch.zeros(1), 8, 128, 256, 8)")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


@needs_triton
def test_kernels_compile_for_sm90():
    """The real (not interpreted) Triton compiler builds the GPU variants for an H100 without a GPU
    (bf16, SAM 3 sizes, the launchers' default tiles), and the big dots use Hopper's wgmma. The
    token -> image launches (the launcher on CPU tensors, compiled with the specialisation Triton
    would give them: sam3fast.kernels._static_build) have no register spill inside their loops: with
    the k / v biases in the loop they had 36 spill instructions there."""
    code = SM90_BUILD + textwrap.dedent(
        """
        import torch
        from sam3fast.kernels import two_way_attention as tw
        from sam3fast.kernels._static_build import capture, sass_stats
        B, n_tok, C, D, S = 1, 8, 128, 256, 5184  # (T is SM90_BUILD's GPU target)
        e = lambda *shape: torch.empty(shape, dtype=torch.bfloat16)
        nchw = torch.empty(1, D, S, dtype=torch.bfloat16).transpose(1, 2)  # layer 0's image view
        for image, splits in ((nchw, 41), (e(B, S, D), 41), (e(B, S, D), 1)):
            with capture(tw._token_to_image_attention_kernel, tw._token_to_image_merge_kernel) as builds:
                tw._token_to_image_attention_triton(e(B, n_tok, C), image, nchw, e(C, D), e(C), e(C, D), e(C), 8,
                                                    num_splits=splits)
            attn = [b for b in builds if b.name == "_token_to_image_attention_kernel"]
            assert len(attn) == 1 and len(builds) == (2 if splits > 1 else 1), [b.name for b in builds]
            st = sass_stats(attn[0].kernel)
            assert st["wgmma"] > 0, f"the projections should use wgmma on sm_90: {st}"
            assert st["loop_spills"] == 0, f"spills inside the loop: {st}"
        i2t = {n: "*bf16" for n in "x_ptr pe_ptr wq_ptr bq_ptr k_ptr v_ptr wo_ptr bo_ptr nw_ptr nb_ptr out_ptr".split()}
        i2t.update(qk_scale="fp32", eps="fp32")
        i2t.update({n: i32 for n in "T S sxb sxs sxd spb sps spd skb skt svb svt".split()})
        bm, bd, nw, ns = tw.DEFAULT_I2T_TILE
        for tp, norm in ((8, True), (32, False)):
            k = build(tw._image_to_token_attention_kernel, i2t, dict(H=8, DH=16, C=128, D=256, DP=256, TP=tp,
                      HAS_NORM=norm, DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_D=bd), nw, ns)
            assert "wgmma.mma_async" in k.asm["ptx"], "the projections should use wgmma on sm_90"
        print("ok")
        """
    )
    run_compiled(code)


# ---- the module ---------------------------------------------------------------------------------


def _transformer(seed, D=32, H=2, mlp=24, depth=2):
    torch.manual_seed(seed)
    return spread_layer_norms(TwoWayTransformer(depth, D, H, mlp).eval())


def _transformer_inputs(B, T, grid, layout, seed, D=32):
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    img = torch.randn(B if layout == "per_object" else 1, D, h, w, generator=g)
    if layout == "expanded":
        img = img.expand(B, -1, -1, -1)  # what MaskDecoder.predict_masks passes without mask prompts
    pe = torch.randn(1, D, h, w, generator=g)
    return img, pe, torch.randn(B, T, D, generator=g)


@needs_triton
@pytest.mark.parametrize("B, T, grid, layout, H", [
    (3, 7, (3, 5), "expanded", 2), (1, 3, (4, 4), "per_object", 2), (3, 3, (4, 4), "per_object", 4),
], ids=["B3_T7_expanded", "B1_T3_per_object", "B3_T3_h4x8"])
def test_transformer_kernel_path_matches_pytorch(B, T, grid, layout, H):
    """TwoWayTransformer on random weights: the kernel path with the Triton launchers (interpreter)
    and with the ops' references equals the module's PyTorch path (``use_kernel=False``)."""
    m = _transformer(seed=B + T, H=H)
    img, pe, tok = _transformer_inputs(B, T, grid, layout, seed=B * T)
    m.use_kernel = False
    with torch.no_grad():
        want = m(img, pe, tok)
        for backend, tol in (("triton", 1e-4), ("reference", 1e-6)):
            got = m._forward_kernel(img, pe, tok, backend=backend)
            for g, w in zip(got, want):
                assert g.shape == w.shape and not g.isnan().any()
                torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_transformer_dispatch(monkeypatch):
    """forward takes the kernel path exactly when ``use_kernel`` and the backend says Triton; on CPU
    (the backend says reference) it is the PyTorch path."""
    calls = []
    real = sam_heads.token_to_image_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sam_heads, "token_to_image_attention", spy)
    monkeypatch.setattr(sam_heads, "EAGER_KERNEL_MIN_BATCH", 2)
    m = _transformer(seed=0)
    img, pe, tok = _transformer_inputs(2, 5, (3, 5), "expanded", seed=0)
    with torch.no_grad():
        m(img, pe, tok)
        assert calls == []  # CPU: the exact PyTorch path
        monkeypatch.setattr(sam_heads, "two_way_attention_backend", lambda *a: ("triton", "test"))
        m(img, pe, tok)
        assert len(calls) == 3  # 2 blocks + the final attention
        # eager below EAGER_KERNEL_MIN_BATCH objects: the PyTorch path (host-bound, faster there)
        m(img[:1], pe, tok[:1])
        assert len(calls) == 3
        m.use_kernel = False
        m(img, pe, tok)
        assert len(calls) == 3


def test_kernel_path_pays_when_compiled_or_large():
    """The eager size rule, and compiled code always takes the kernels (what a capture does too)."""
    x1 = torch.zeros(1, 4, 2, 2)
    big = torch.zeros(sam_heads.EAGER_KERNEL_MIN_BATCH, 4, 2, 2)
    assert not sam_heads._kernel_path_pays(x1) and sam_heads._kernel_path_pays(big)
    seen = []

    def f(x):
        seen.append(sam_heads._kernel_path_pays(x))
        return x + 1

    torch.compile(f, fullgraph=True, backend="eager")(x1)
    assert seen == [True]


def test_bench_smoke(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [BENCH, "--smoke"])
    runpy.run_path(BENCH, run_name="__main__")
    assert "two_way_attention benchmark" in capsys.readouterr().out


# ---- GPU only -----------------------------------------------------------------------------------


def _gpu_t2i(B, T, shared, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    C, D, S = 128, 256, 5184
    q = 2.0 * torch.randn(B, T, C, device="cuda", generator=g)
    image = torch.randn(1 if shared else B, D, 72, 72, device="cuda", generator=g).flatten(2).transpose(1, 2)
    pe = torch.randn(1, S, D, device="cuda", generator=g)
    wk, wv = (torch.randn(C, D, device="cuda", generator=g) / 16 for _ in range(2))
    bk, bv = (0.3 * torch.randn(C, device="cuda", generator=g) for _ in range(2))
    return [q, image, pe, wk, bk, wv, bv, 8]


def _gpu_i2t(B, T, shared, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    C, D, S = 128, 256, 5184
    image = torch.randn(1 if shared else B, S, D, device="cuda", generator=g)
    pe = torch.randn(1, S, D, device="cuda", generator=g)
    wq, bq = torch.randn(C, D, device="cuda", generator=g) / 16, 0.3 * torch.randn(C, device="cuda", generator=g)
    k, v = 2.0 * torch.randn(B, T, C, device="cuda", generator=g), torch.randn(B, T, C, device="cuda", generator=g)
    wo, bo = torch.randn(D, C, device="cuda", generator=g) / 11.3, 0.3 * torch.randn(D, device="cuda", generator=g)
    nw, nb = 1 + 0.3 * torch.randn(D, device="cuda", generator=g), 0.3 * torch.randn(D, device="cuda", generator=g)
    return [image, pe, wq, bq, k, v, wo, bo, nw, nb, 1e-5, 8]


def _bf16(args):
    return [a.bfloat16() if torch.is_tensor(a) else a for a in args]


def _up(args):  # the bf16 inputs in float32: the reference then sees exactly the kernel's inputs
    return [a.float() if torch.is_tensor(a) else a for a in args]


def _twice_rule(got, ref, torch_out):
    assert not got.isnan().any()
    err, torch_err = (got.float() - ref).abs(), (torch_out.float() - ref).abs()
    assert err.max() <= 2 * torch_err.max(), (err.max().item(), torch_err.max().item())
    assert err.pow(2).mean().sqrt() <= 2 * torch_err.pow(2).mean().sqrt()


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("B, T, shared", [(1, 8, True), (16, 8, True), (3, 20, False)],
                         ids=["B1_T8_shared", "B16_T8_shared", "B3_T20_per_object"])
def test_gpu_real_shape_bf16(B, T, shared):
    """bf16 at SAM 3 sizes (72 x 72 image, D 256, 8 heads of 16): error vs the fp32 reference at most
    2x that of PyTorch (the module's op sequence) in bf16, for both ops and the split variants."""
    args = _bf16(_gpu_t2i(B, T, shared, seed=B + T))
    ref, torch_out = tw.token_to_image_attention_ref(*_up(args)), tw.token_to_image_attention_ref(*args)
    assert tw.two_way_attention_backend(args[0], 8, 128, 256, T)[0] == "triton"
    for got in (tw.token_to_image_attention(*args), tw._token_to_image_attention_triton(*args, num_splits=1),
                tw._token_to_image_attention_triton(*args, block_r=16)):
        assert got.dtype == torch.bfloat16
        _twice_rule(got, ref, torch_out)
    args = _bf16(_gpu_i2t(B, T, shared, seed=B + T))
    ref, torch_out = tw.image_to_token_attention_ref(*_up(args)), tw.image_to_token_attention_ref(*args)
    for got in (tw.image_to_token_attention(*args[:10], eps=1e-5, num_heads=8),
                tw._image_to_token_attention_triton(*args, block_m=32)):
        assert got.dtype == torch.bfloat16
        _twice_rule(got, ref, torch_out)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_fp32_matches_reference():
    args = _gpu_t2i(2, 7, False, seed=1)
    torch.testing.assert_close(tw.token_to_image_attention(*args).double(), naive64_t2i(*args), rtol=0, atol=1e-4)
    args = _gpu_i2t(2, 7, True, seed=2)
    got = tw.image_to_token_attention(*args[:10], eps=1e-5, num_heads=8)
    torch.testing.assert_close(got.double(), naive64_i2t(*args), rtol=0, atol=2e-4)


def _gpu_transformer(seed):
    m = _transformer(seed, D=256, H=8, mlp=2048).cuda()
    g = torch.Generator(device="cuda").manual_seed(seed)
    img = torch.randn(1, 256, 72, 72, device="cuda", generator=g)
    pe = torch.randn(1, 256, 72, 72, device="cuda", generator=g)
    return m, img, pe, g


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("B", [1, 16])
def test_gpu_transformer_bf16(B):
    """The whole TwoWayTransformer in bf16 at SAM 3 sizes: the kernel path's error vs the module in
    fp32 at most 2x the PyTorch path's in bf16."""
    m, img, pe, g = _gpu_transformer(seed=B)
    tok = torch.randn(B, 8, 256, device="cuda", generator=g)
    img = img.expand(B, -1, -1, -1)
    with torch.no_grad():
        m.use_kernel = False
        ref = m(img, pe, tok)
        mb = m.bfloat16()
        ib, pb, tb = img.bfloat16(), pe.bfloat16(), tok.bfloat16()
        torch_out = mb(ib, pb, tb)
        mb.use_kernel = True
        got = mb._forward_kernel(ib, pb, tb)
    for gt, r, t in zip(got, ref, torch_out):
        assert gt.dtype == torch.bfloat16
        _twice_rule(gt, r, t)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_cuda_graph_replay():
    m, img, pe, g = _gpu_transformer(seed=3)
    m = m.bfloat16()
    static = [img.bfloat16().expand(4, -1, -1, -1).contiguous(), pe.bfloat16(),
              torch.randn(4, 8, 256, device="cuda", generator=g).bfloat16()]

    def fn():
        with torch.no_grad():
            return m(*static)

    graph, out = capture_graph(fn)
    for seed in (5, 6):
        gg = torch.Generator(device="cuda").manual_seed(seed)
        new = [torch.randn(t.shape, device="cuda", generator=gg).bfloat16() for t in static]
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        with torch.no_grad():
            want = m._forward_kernel(*static)  # (eager at 4 objects forward takes the PyTorch path)
        for o, w in zip(out, want):
            assert torch.equal(o, w)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_compile_inductor():
    m, img, pe, g = _gpu_transformer(seed=4)
    m = m.bfloat16()
    tok = torch.randn(3, 8, 256, device="cuda", generator=g).bfloat16()
    img = img.bfloat16().expand(3, -1, -1, -1)
    import copy

    ref_m = copy.deepcopy(m).float()
    ref_m.use_kernel = False
    with torch.no_grad():
        got = torch.compile(m, fullgraph=True)(img, pe.bfloat16(), tok)
        want = m._forward_kernel(img, pe.bfloat16(), tok)
        ref = ref_m(img.float(), pe.float(), tok.float())
    # inductor fuses and reorders the token-side bf16 ops, so single elements differ from eager by an
    # ulp of bf16 (measured on an H200: 2 of 6144 past 2e-2); held to the house rule instead: the
    # compiled error against float32 at most twice the eager kernel path's, in relative RMSE
    for a, b, r in zip(got, want, ref):
        r = r.float()
        err = lambda x: float((x.float() - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt())  # noqa: E731
        assert err(a) <= 2 * err(b) + 1e-4, (err(a), err(b))
