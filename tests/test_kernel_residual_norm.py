"""The ViT's fused residual add + LayerNorm (``sam3fast.kernels.residual_norm``) against a float64
spec written here, the ``sam3fast::residual_norm`` op (opcheck, torch.compile), its entry point, and
the ViT trunk's fused block chain against its block-by-block path.

On CPU the Triton launcher runs under ``TRITON_INTERPRET=1`` (set by conftest.py) on small odd
shapes: widths 40 / 64 / 100 (not powers of two among them), grids of 6 x 9 and 4 x 4 with windows
of 3, 2 and 4, two images, every pairing of the input and output orders; outputs are preallocated
full of NaN so an unwritten element fails.

The rules: s (the residual stream) equals PyTorch's ``x + y`` in the dtype bit for bit; n is within
one float32 computation's rounding plus half an ulp of the dtype of the float64 LayerNorm of that s,
and its error against the float64 spec is at most 2x that of ``F.layer_norm`` in the same dtype
(plus a float32-level floor).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import SM90_BUILD, capture_graph, forced_backend_reason, run_compiled, spread_layer_norms

from sam3fast.kernels import residual_norm as rn
from sam3fast.model import vit as vit_mod
from sam3fast.model.vit import ViT, window_partition, window_unpartition

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not rn.HAS_TRITON, reason=f"triton not importable: {rn.TRITON_IMPORT_ERROR}")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (B, H, W, C, y_window, out_window)
CASES = {
    "grid_to_grid_6x9_c40": (2, 6, 9, 40, 0, 0),
    "window3_in_6x9_c64": (1, 6, 9, 64, 3, 0),
    "window3_out_6x9_c100": (2, 6, 9, 100, 0, 3),
    "window2_in_window4_out_4x4_c64": (1, 4, 4, 64, 2, 4),
    "window4_in_out_4x4_c40": (2, 4, 4, 40, 4, 4),
}


def _case(B, H, W, C, y_window, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(B, H, W, C, generator=g) + 0.5).to(dtype)
    y = torch.randn(B, H, W, C, generator=g).to(dtype)
    if y_window:
        y = rn.to_windows(y, y_window)
    w = (1 + 0.3 * torch.randn(C, generator=g)).to(dtype)
    b = (0.2 * torch.randn(C, generator=g)).to(dtype)
    return x, y, w, b


def spec64(x, y, w, b, eps, y_window, out_window):
    """The float64 spec, with the permutations written independently: token (b, r, c) of the grid is
    row (b, r // k, c // k, r % k, c % k) of the window order."""
    B, H, W, C = x.shape

    def win_index(k):
        r = torch.arange(H)[:, None].expand(H, W)
        c = torch.arange(W)[None, :].expand(H, W)
        idx = ((r // k) * (W // k) + c // k) * k * k + (r % k) * k + c % k  # within one image
        return (torch.arange(B)[:, None, None] * H * W + idx).reshape(-1)

    yg = y.reshape(-1, C)[win_index(y_window)] if y_window else y.reshape(-1, C)
    s = (x.reshape(-1, C).double() + yg.double()).to(x.dtype)  # the rounded stream, as the rule says
    v = s.double()
    z = (v - v.mean(1, keepdim=True)) / torch.sqrt(v.var(1, unbiased=False, keepdim=True) + eps)
    n = z * w.double() + b.double()
    if out_window:
        out = torch.empty_like(n)
        out[win_index(out_window)] = n
        n = out
    return s.reshape(B, H, W, C), n


def _run(x, y, w, b, eps, yw, ow, **launch):
    s_out = torch.full(x.shape, float("nan"), dtype=x.dtype)
    n_out = torch.full(rn._window_shape(x, ow), float("nan"), dtype=x.dtype)
    s, n = rn._residual_norm_triton(x, y, w, b, eps, yw, ow, out_s=s_out, out_n=n_out, **launch)
    assert s.data_ptr() == s_out.data_ptr() and n.data_ptr() == n_out.data_ptr()
    return s, n


def _check_n(got, want64, b, ref_in_dtype):
    """got within float32 rounding + half an ulp of want64, and at most 2x F.layer_norm's error.
    (want64 = z w + b, so |z w| <= |want64| + |b| bounds the float32 terms.)"""
    fi = torch.finfo(got.dtype)
    assert not torch.isnan(got).any(), "NaN in the output (an unwritten element?)"
    g = got.reshape(want64.shape).double()
    scale = want64.abs() + 2 * b.double().abs() + 1.0
    bound = fi.eps / 2 * want64.abs() + 64 * 2.0**-24 * scale
    excess = (g - want64).abs() - bound
    assert excess.max() <= 0, f"error above the bound by {excess.max().item():.3g}"
    err = (g - want64).abs().max().item()
    ref_err = (ref_in_dtype.reshape(want64.shape).double() - want64).abs().max().item()
    assert err <= 2 * ref_err + 64 * 2.0**-24, (err, ref_err)


@needs_triton
@pytest.mark.parametrize("block_t", [None, 1, 4], ids=["default_tile", "block_t1", "block_t4"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_against_spec(case, dtype, block_t):
    B, H, W, C, yw, ow = CASES[case]
    x, y, w, b = _case(B, H, W, C, yw, DTYPES[dtype], seed=len(case) + C)
    eps = 1e-5
    s, n = _run(x, y, w, b, eps, yw, ow, block_t=block_t)
    s64, n64 = spec64(x, y, w, b, eps, yw, ow)
    s_ref, n_ref = rn.residual_norm_ref(x, y, w, b, eps, yw, ow)
    assert torch.equal(s, s_ref) and torch.equal(s, s64)  # the stream: PyTorch's add, bit for bit
    assert n.shape == n_ref.shape
    _check_n(n, n64, b, n_ref)


@needs_triton
@pytest.mark.parametrize("branch", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["window3_in_6x9_c64", "window3_out_6x9_c100", "window2_in_window4_out_4x4_c64"])
def test_kernel_float32_stream(case, branch):
    """A float32 stream x with a bf16/fp16 branch y (``ViT.fp32_residual``): s is PyTorch's float32
    ``x + y`` bit for bit, n is the float32 norm rounded to y's dtype (the same bounds as above)."""
    B, H, W, C, yw, ow = CASES[case]
    x, y, w, b = _case(B, H, W, C, yw, torch.float32, seed=C + yw)
    y, w, b = y.to(branch), w.to(branch), b.to(branch)
    s_out = torch.full(x.shape, float("nan"))
    n_out = torch.full(rn._window_shape(x, ow), float("nan"), dtype=branch)
    s, n = rn._residual_norm_triton(x, y, w, b, 1e-5, yw, ow, out_s=s_out, out_n=n_out, block_t=4)
    s_ref, n_ref = rn.residual_norm_ref(x, y, w, b, 1e-5, yw, ow)
    s64, n64 = spec64(x, y, w, b, 1e-5, yw, ow)
    assert s.dtype == s_ref.dtype == torch.float32 and n.dtype == n_ref.dtype == branch
    assert torch.equal(s, s_ref) and torch.equal(s, s64)
    _check_n(n, n64, b, n_ref)
    # the op and its fake agree on the dtypes
    torch.library.opcheck(torch.ops.sam3fast.residual_norm.default, (x, y, w, b, 1e-5, yw, ow))


def test_reference_is_the_trunk_ops():
    """The op's reference (its CPU kernel) is the unfused block's own chain, bit for bit: the add
    after window_unpartition, then F.layer_norm, then window_partition."""
    x, y, w, b = _case(2, 6, 9, 40, 3, torch.bfloat16, seed=2)
    s, n = rn.residual_norm_ref(x, y, w, b, 1e-6, 3, 3)
    s_want = x + window_unpartition(y, 3, (6, 9), (6, 9))
    assert torch.equal(s, s_want)
    assert torch.equal(n, window_partition(F.layer_norm(s_want, (40,), w, b, 1e-6), 3)[0])


@needs_triton
def test_kernel_special_values():
    """A constant row (variance 0: the norm is the bias), a row with a huge offset (cancellation in
    the mean), a NaN in x (its row only is NaN), infinities in y."""
    C = 48
    x = torch.randn(1, 2, 3, C, generator=torch.Generator().manual_seed(1))
    y = torch.zeros_like(x)
    x[0, 0, 0] = 3.0
    x[0, 0, 1] = x[0, 0, 1] + 1e4
    x[0, 1, 0, 5] = float("nan")
    y[0, 1, 1, 7] = float("inf")
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    s, n = _run(x, y, w, b, 1e-5, 0, 0)
    s_ref, n_ref = rn.residual_norm_ref(x, y, w, b, 1e-5, 0, 0)
    assert torch.equal(s.isnan(), s_ref.isnan()) and torch.equal(s.nan_to_num(), s_ref.nan_to_num())
    torch.testing.assert_close(n[0, 0, 0], b, rtol=0, atol=1e-6)
    # the offset row: the float64 norm of the same (rounded) row; F.layer_norm on the CPU is 1e-3
    # off it here, the kernel's corrected mean is not
    _, n64 = spec64(x[:, :1, 1:2], y[:, :1, 1:2], w, b, 1e-5, 0, 0)
    torch.testing.assert_close(n[0, 0, 1].double(), n64[0], rtol=0, atol=2e-5)
    assert n[0, 1, 0].isnan().all() and n[0, 1, 1].isnan().all()  # inf - inf in the row's mean
    torch.testing.assert_close(n[0, 0, 2], n_ref[0, 0, 2], rtol=1e-5, atol=1e-5)


@needs_triton
def test_kernel_empty():
    x = torch.zeros(0, 3, 3, 16)
    s, n = rn._residual_norm_triton(x, x.clone(), torch.ones(16), torch.zeros(16), 1e-5, 3, 3)
    assert s.shape == (0, 3, 3, 16) and n.shape == (0, 3, 3, 16)


def test_bad_inputs():
    x, y, w, b = _case(1, 6, 9, 40, 0, torch.float32, seed=3)
    with pytest.raises(ValueError, match="x must be a floating"):
        rn.residual_norm_ref(x[0], y, w, b, 1e-5)
    with pytest.raises(ValueError, match="y_window must be 0 or a window side dividing the 6 x 9 grid, got 4"):
        rn.residual_norm_ref(x, y, w, b, 1e-5, y_window=4)
    with pytest.raises(ValueError, match="out_window must be 0 or a window side"):
        rn.residual_norm_ref(x, y, w, b, 1e-5, out_window=-3)
    with pytest.raises(ValueError, match=r"y must be a floating \(6, 3, 3, 40\) tensor \(y_window 3\)"):
        rn.residual_norm_ref(x, y, w, b, 1e-5, y_window=3)
    with pytest.raises(ValueError, match="y must have x's dtype, or be bfloat16/float16 with a float32 x"):
        rn.residual_norm_ref(x, y.double(), w, b, 1e-5)
    with pytest.raises(ValueError, match="y must have x's dtype, or be bfloat16/float16 with a float32 x"):
        rn.residual_norm_ref(x.bfloat16(), y, w, b, 1e-5)  # a bf16 stream, a float32 branch
    with pytest.raises(ValueError, match=r"weight must be \(40,\)"):
        rn.residual_norm_ref(x, y, w[:-1], b, 1e-5)
    if rn.HAS_TRITON:
        with pytest.raises(ValueError, match="block_t must be a power of two"):
            rn._residual_norm_triton(x, y, w, b, 1e-5, block_t=3)
        with pytest.raises(ValueError, match="the Triton kernel takes float32/bfloat16/float16"):
            rn._residual_norm_triton(x.double(), y.double(), w.double(), b.double(), 1e-5)


def test_choose_block_t():
    assert rn.choose_block_t(1024) == 4 and rn.choose_block_t(100) == 32 and rn.choose_block_t(8192) == 1


def _op_args(yw=3, ow=0):
    x, y, w, b = _case(2, 6, 9, 40, yw, torch.float32, seed=9)
    return x, y, w, b, 1e-5, yw, ow


@pytest.mark.parametrize("windows", [(3, 0), (0, 3)], ids=["window_in", "window_out"])
def test_opcheck(windows):
    torch.library.opcheck(torch.ops.sam3fast.residual_norm.default, _op_args(*windows))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    """Callers of the op and of the entry point compile with no graph break."""
    x, y, w, b, eps, yw, ow = _op_args()

    def via_op(x, y):
        s, n = torch.ops.sam3fast.residual_norm(x * 2.0, y, w, b, eps, yw, 3)
        return s + 1.0, n * 2.0

    def via_entry(x, y):
        s, n = rn.residual_norm(x, y + 1.0, w, b, eps, y_window=yw)
        return s.sum() + n.sum()

    torch._dynamo.reset()
    for fn in (via_op, via_entry):
        got = torch.compile(fn, fullgraph=True, backend=backend)(x, y)
        torch.testing.assert_close(got, fn(x, y), rtol=0, atol=0)


def test_entry_point_backend_cpu():
    x, y, w, b, eps, yw, ow = _op_args()
    backend, reason = rn.residual_norm_backend(x)
    assert backend == "reference" and "cpu" in reason
    s, n = rn.residual_norm(x, y, w, b, eps, yw, ow)
    s_ref, n_ref = rn.residual_norm_ref(x, y, w, b, eps, yw, ow)
    assert torch.equal(s, s_ref) and torch.equal(n, n_ref)


def test_force_reference_env():
    reason = forced_backend_reason("residual_norm", "residual_norm_backend(torch.zeros(1, 3, 3, 16))")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


@needs_triton
def test_kernel_compiles_for_sm90():
    """The real Triton compiler builds the kernel for an H100 without a GPU at the trunk's size (bf16,
    C 1024, the default tile, the launcher's own launches with the specialisation Triton gives them):
    every combination of window orders, 16-byte vector loads and stores, no register spill; the
    bf16 stream and the float32 one (``ViT.fp32_residual``: bf16 branches), both with the float32
    norm parameters the builders keep."""
    code = SM90_BUILD + textwrap.dedent(
        """
        import torch
        from sam3fast.kernels import residual_norm as rn
        from sam3fast.kernels._static_build import capture, sass_stats
        wf = torch.empty(1024, dtype=torch.float32)
        for stream in (torch.bfloat16, torch.float32):
            x = torch.empty(1, 72, 72, 1024, dtype=stream)
            for yw, ow in ((0, 0), (24, 0), (0, 24)):
                y = torch.empty(rn._window_shape(x, yw), dtype=torch.bfloat16)
                with capture(rn._residual_norm_kernel) as builds:
                    rn._residual_norm_triton(x, y, wf, wf, 1e-6, yw, ow)
                (b,) = builds
                st = sass_stats(b.kernel)
                assert st["stack"] == 0 and st["spill_stores"] == 0, (stream, yw, ow, st)
                ptx = b.kernel.asm["ptx"]
                assert "ld.global.v4" in ptx and "st.global.v4" in ptx, (stream, yw, ow)
        # the tracker's memory attention passes its (B, L, 256) stream as (B, 1, L, 256): a grid
        # side of 1 arrives as a constant, which once made the window addressing divide by 0 at
        # compile time (found by this build, session 18); and a batch of one token
        for shape in ((16, 1, 5184, 256), (1, 1, 1, 256), (2, 5, 1, 256)):
            e = torch.empty(shape, dtype=torch.bfloat16)
            with capture(rn._residual_norm_kernel) as builds:
                rn._residual_norm_triton(e, e, e[0, 0, 0], e[0, 0, 0], 1e-6)
            st = sass_stats(builds[0].kernel)
            assert st["stack"] == 0 and st["spill_stores"] == 0, (shape, st)
        print("ok")
        """
    )
    run_compiled(code)


# ---- the ViT -----------------------------------------------------------------------------------


def _tiny_vit(window=3, side=98):
    """6 x 6 tokens with windows of 3 (no padding) and a global block, two window blocks after it."""
    torch.manual_seed(0)
    return spread_layer_norms(ViT(img_size=side, pretrain_img_size=56, patch_size=14, embed_dim=64, depth=4,
                                  num_heads=4, window_size=window, global_att_blocks=(1, 3)).eval())


@needs_triton
@pytest.mark.filterwarnings("ignore:Casting complex values:UserWarning")  # .to(dtype): the tables stay complex
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vit_fused_chain_matches_block_by_block(dtype, monkeypatch):
    """The trunk with the fused chain forced (backend "triton", the launcher under the interpreter)
    against its block-by-block path: every residual add and norm after the first norm went through
    the op, with the window orders of each block, and the output is within the norms' rounding
    (float32: 1e-5; bf16: at most 2x the block-by-block path's error against a float64 trunk)."""
    m = _tiny_vit(side=84)  # 6 x 6 tokens: windows of 3 divide it
    x = torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want64 = m.double()(x.double())
    m = m.to(dtype)
    xd = x.to(dtype)
    m.fuse_residual_norm = False
    with torch.no_grad():
        plain = m(xd)
    calls = []

    def spy(x, y, w, b, eps, y_window=0, out_window=0):
        calls.append((y_window, out_window))
        return rn._residual_norm_triton(x, y, w, b, eps, y_window, out_window)

    monkeypatch.setattr(vit_mod, "residual_norm_backend", lambda x: ("triton", "forced by the test"))
    monkeypatch.setattr(vit_mod, "residual_norm", spy)
    with torch.no_grad():
        assert torch.equal(m(xd), plain) and calls == []  # fuse_residual_norm False: block by block
        m.fuse_residual_norm = True
        got = m(xd)
    # blocks: window 3, global, window 3, global; the first norm1 is unfused
    assert calls == [(3, 0), (0, 0), (0, 0), (0, 3), (3, 0), (0, 0), (0, 0)], calls
    assert got.shape == plain.shape and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    else:
        err = (got.double() - want64).abs().max().item()
        ref_err = (plain.double() - want64).abs().max().item()
        assert err <= 2 * ref_err, (err, ref_err)


@pytest.mark.filterwarnings("ignore:Casting complex values:UserWarning")
def test_vit_fp32_residual_precision():
    """A bf16 trunk as the builders cast it (its LayerNorms and pos table float32 islands) with
    ``fp32_residual`` (a float32 stream, float32 norms) computes what the float32 trunk under bf16
    autocast computes (the official bf16 mode's rule), rounded to bf16 at its output: within 1e-3
    of it (bit-identical on the CPUs measured), with an error against the float64 trunk ~0.6x that
    of the all-bf16 stream. Off, the trunk is the all-bf16 one."""
    from sam3fast.build import _cast_floating_

    m = _tiny_vit(side=84)
    x = torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want64 = m.double()(x.double())
        m = m.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = m(x).to(torch.bfloat16)
        _cast_floating_(torch.nn.ModuleDict({"trunk": m}), torch.bfloat16)
        assert m.pos_embed.dtype == m.ln_pre.weight.dtype == m.blocks[0].norm2.bias.dtype == torch.float32
        assert m.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
        plain = m(x.bfloat16())
        m.fp32_residual = True
        wide = m(x.bfloat16())
        m.fp32_residual = False
        again = m(x.bfloat16())
    assert wide.dtype == plain.dtype == torch.bfloat16 and torch.equal(again, plain)

    def err(t, ref):
        return ((t.double() - ref.double()).norm() / ref.double().norm()).item()

    assert err(wide, auto) <= 1e-3, err(wide, auto)
    assert err(wide, want64) <= 0.8 * err(plain, want64), (err(wide, want64), err(plain, want64))


@needs_triton
@pytest.mark.filterwarnings("ignore:Casting complex values:UserWarning")
def test_vit_fp32_residual_fused_chain(monkeypatch):
    """With ``fp32_residual`` the fused chain (forced, the launcher under the interpreter) carries
    the float32 stream with bf16 branches: every call gets a float32 x and a bf16 y, and the output
    is within bf16 rounding of the block-by-block path's (at most 2x its error against float64)."""
    m = _tiny_vit(side=84)
    x = torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want64 = m.double()(x.double())
    m = m.to(torch.bfloat16)
    m.fp32_residual = True
    m.fuse_residual_norm = False
    xb = x.bfloat16()
    with torch.no_grad():
        plain = m(xb)
    calls = []

    def spy(x, y, w, b, eps, y_window=0, out_window=0):
        calls.append((x.dtype, y.dtype))
        return rn._residual_norm_triton(x, y, w, b, eps, y_window, out_window)

    monkeypatch.setattr(vit_mod, "residual_norm_backend", lambda x: ("triton", "forced by the test"))
    monkeypatch.setattr(vit_mod, "residual_norm", spy)
    m.fuse_residual_norm = True
    with torch.no_grad():
        got = m(xb)
    assert calls == [(torch.float32, torch.bfloat16)] * 7, calls
    assert got.dtype == torch.bfloat16
    err = (got.double() - want64).abs().max().item()
    ref_err = (plain.double() - want64).abs().max().item()
    assert err <= 2 * ref_err, (err, ref_err)


def test_vit_cpu_and_padding_keep_blocks(monkeypatch):
    """On CPU the trunk never calls the fused op, and neither would it on a grid the windows do not
    divide (7 x 7 tokens, windows of 3): the official padding path."""
    def fail(*args, **kwargs):
        raise AssertionError("residual_norm called")

    m = _tiny_vit()  # 7 x 7 tokens
    monkeypatch.setattr(vit_mod, "residual_norm", fail)
    with torch.no_grad():
        m(torch.randn(1, 3, 98, 98))
    monkeypatch.setattr(vit_mod, "residual_norm_backend", lambda x: ("triton", "forced by the test"))
    with torch.no_grad():
        m(torch.randn(1, 3, 98, 98))  # padding: block by block


# ---- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("windows", [(0, 0), (24, 0), (0, 24)], ids=["grid", "window_in", "window_out"])
def test_gpu_real_shape(windows, dtype):
    """The trunk's shape (72 x 72 x 1024): s is PyTorch's add bit for bit; n's error against the
    float64 spec is at most 2x that of F.layer_norm in the dtype."""
    yw, ow = windows
    g = torch.Generator(device="cuda").manual_seed(yw + ow + 1)
    x = (2 * torch.randn(1, 72, 72, 1024, device="cuda", generator=g)).to(dtype)
    y = torch.randn(rn._window_shape(x, yw), device="cuda", generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(1024, device="cuda", generator=g)).to(dtype)
    b = (0.2 * torch.randn(1024, device="cuda", generator=g)).to(dtype)
    assert rn.residual_norm_backend(x)[0] == "triton"
    s, n = rn.residual_norm(x, y, w, b, 1e-6, yw, ow)
    s_ref, n_ref = rn.residual_norm_ref(x, y, w, b, 1e-6, yw, ow)
    assert torch.equal(s, s_ref)
    s64, n64 = spec64(x.cpu(), y.cpu(), w.cpu(), b.cpu(), 1e-6, yw, ow)
    _check_n(n.cpu(), n64, b.cpu(), n_ref.cpu())


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("windows", [(24, 0), (0, 24)], ids=["window_in", "window_out"])
def test_gpu_real_shape_float32_stream(windows):
    """The trunk's shape with a float32 stream and bf16 branches (``ViT.fp32_residual``)."""
    yw, ow = windows
    g = torch.Generator(device="cuda").manual_seed(yw + ow + 7)
    x = 2 * torch.randn(1, 72, 72, 1024, device="cuda", generator=g)
    y = torch.randn(rn._window_shape(x, yw), device="cuda", generator=g).bfloat16()
    w = (1 + 0.3 * torch.randn(1024, device="cuda", generator=g)).bfloat16()
    b = (0.2 * torch.randn(1024, device="cuda", generator=g)).bfloat16()
    s, n = rn.residual_norm(x, y, w, b, 1e-6, yw, ow)
    s_ref, n_ref = rn.residual_norm_ref(x, y, w, b, 1e-6, yw, ow)
    assert s.dtype == torch.float32 and n.dtype == torch.bfloat16
    assert torch.equal(s, s_ref)
    s64, n64 = spec64(x.cpu(), y.cpu(), w.cpu(), b.cpu(), 1e-6, yw, ow)
    _check_n(n.cpu(), n64, b.cpu(), n_ref.cpu())


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_cuda_graph_replay():
    x = torch.randn(1, 72, 72, 1024, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(9, 24, 24, 1024, device="cuda", dtype=torch.bfloat16)
    w, b = torch.ones(1024, device="cuda", dtype=torch.bfloat16), torch.zeros(1024, device="cuda", dtype=torch.bfloat16)
    graph, (s, n) = capture_graph(lambda: rn.residual_norm(x, y, w, b, 1e-6, 24, 24))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    s_ref, n_ref = rn.residual_norm_ref(x, y, w, b, 1e-6, 24, 24)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(n, n_ref, rtol=0.02, atol=0.02)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_vit_fused_chain():
    """A SAM 3 width trunk (2 window blocks and a global one, 72 x 72 tokens) in bf16: the fused
    chain's error against the float32 trunk is at most 2x the block-by-block path's."""
    torch.manual_seed(0)
    m = ViT(img_size=1008, pretrain_img_size=336, patch_size=14, embed_dim=1024, depth=3, num_heads=16,
            window_size=24, global_att_blocks=(2,)).cuda().eval()
    x = torch.randn(1, 3, 1008, 1008, device="cuda")
    with torch.no_grad():
        m.fuse_residual_norm = False
        want = m(x).double()  # float32, block by block
        m = m.to(torch.bfloat16)
        plain = m(x.to(torch.bfloat16)).double()
        m.fuse_residual_norm = True
        got = m(x.to(torch.bfloat16)).double()
    err, ref_err = (got - want).abs().max().item(), (plain - want).abs().max().item()
    assert err <= 2 * ref_err, (err, ref_err)
    with torch.no_grad():  # the float32 stream (fp32_residual), fused and block by block
        m.fp32_residual = True
        wide = m(x.to(torch.bfloat16)).double()
        m.fuse_residual_norm = False
        wide_plain = m(x.to(torch.bfloat16)).double()
    err_w, ref_w = (wide - want).abs().max().item(), (wide_plain - want).abs().max().item()
    assert err_w <= 2 * ref_w and ref_w < ref_err, (err_w, ref_w, ref_err)
