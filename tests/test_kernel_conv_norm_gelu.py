"""The mask downsampler's strided convolution + LayerNorm2d + GELU for few channels
(``sam3fast.kernels.conv_norm_gelu``) against a float64 spec; the ``sam3fast::conv_norm_gelu`` op
(opcheck, torch.compile), its entry point, and the mask downsampler with the kernel path forced.

On CPU the Triton launcher runs under ``TRITON_INTERPRET=1`` (conftest.py) on small odd shapes
(output maps no multiple of the pixel block, channel counts no power of two, stride 1 and 2, k 3
and 5) and strided inputs; outputs are preallocated full of NaN so an unwritten element fails.

The rule: against the float64 spec (the convolution exact, then the norm and the GELU), the
kernel's largest error is at most twice that of the module's own operations in the dtype (the
convolution rounded, the norm rounded, the GELU rounded: the kernel rounds at the same places, its
taps summed in another order) plus one ulp of the largest output.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import SM90_BUILD, capture_graph, forced_backend_reason, run_compiled, ulp

from sam3fast.kernels import conv_norm_gelu as cn
from sam3fast.model.memory import MaskDownSampler

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not cn.HAS_TRITON, reason=f"triton not importable: {cn.TRITON_IMPORT_ERROR}")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (B, CI, CO, H, W, k, stride)
CASES = {"b2_1to4_13x17_s2": (2, 1, 4, 13, 17, 3, 2), "b1_4to16_12x9_s2": (1, 4, 16, 12, 9, 3, 2),
         "b1_3to5_7x10_s1": (1, 3, 5, 7, 10, 3, 1), "b2_2to8_11x11_k5_s2": (2, 2, 8, 11, 11, 5, 2)}
EPS = 1e-6


def _case(B, CI, CO, H, W, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, CI, H, W, generator=g).to(dtype)
    cw = (torch.randn(CO, CI, k, k, generator=g) / (CI * k)).to(dtype)
    cb = (0.3 * torch.randn(CO, generator=g)).to(dtype)
    nw = (1 + 0.3 * torch.randn(CO, generator=g)).to(dtype)
    nb = (0.2 * torch.randn(CO, generator=g)).to(dtype)
    return x, cw, cb, nw, nb


def spec64(x, cw, cb, nw, nb, stride):
    c = F.conv2d(x.double(), cw.double(), cb.double(), stride=stride, padding=cw.shape[-1] // 2)
    var, mean = torch.var_mean(c, dim=1, keepdim=True, correction=0)
    n = (c - mean) / torch.sqrt(var + EPS) * nw.double().view(-1, 1, 1) + nb.double().view(-1, 1, 1)
    return F.gelu(n)


def _check(got, x, cw, cb, nw, nb, stride):
    want = spec64(x, cw, cb, nw, nb, stride)
    assert got.dtype == x.dtype and got.shape == want.shape and got.is_contiguous()
    assert not got.isnan().any(), "unwritten (NaN) elements"
    err = (got.double() - want).abs().max().item()
    eager = cn.conv_norm_gelu_ref(x, cw, cb, nw, nb, EPS, stride)
    eager_err = (eager.double() - want).abs().max().item()
    assert err <= 2 * eager_err + ulp(want.abs().max().to(got.dtype)).item() + 1e-6, (err, eager_err)


@needs_triton
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_against_spec(case, dtype):
    B, CI, CO, H, W, k, stride = CASES[case]
    args = _case(B, CI, CO, H, W, k, DTYPES[dtype], seed=len(case))
    OH, OW = (H - 1) // stride + 1, (W - 1) // stride + 1
    out = torch.full((B, CO, OH, OW), float("nan"), dtype=DTYPES[dtype])
    got = cn._conv_norm_gelu_triton(*args, EPS, stride, out=out)
    assert got is out
    _check(got, *args, stride)


@needs_triton
def test_kernel_strided_input_and_small_block():
    """A sliced (non-contiguous) input and another pixel block and warp count."""
    x, cw, cb, nw, nb = _case(2, 4, 16, 14, 20, 3, torch.bfloat16, seed=3)
    xs = torch.randn(2, 6, 14, 23).to(torch.bfloat16)[:, 1:5, :, 2:22]
    xs.copy_(x)
    assert not xs.is_contiguous()
    got = cn._conv_norm_gelu_triton(xs, cw, cb, nw, nb, EPS, 2, block_p=16, num_warps=1)
    _check(got, x, cw, cb, nw, nb, 2)


def test_reference_is_the_module_ops():
    """The reference is the mask downsampler stage's own operations: conv, LayerNorm2d, GELU."""
    torch.manual_seed(0)
    ds = MaskDownSampler(256, None)
    conv, norm = ds.encoder[3], ds.encoder[4]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
        x = torch.randn(2, 4, 20, 20)
        want = F.gelu(norm(conv(x)))
        got = cn.conv_norm_gelu_ref(x, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    x, cw, cb, nw, nb = _case(1, 4, 16, 8, 8, 3, torch.float32, seed=1)
    with pytest.raises(ValueError, match="x must be"):
        cn.conv_norm_gelu_ref(x[0], cw, cb, nw, nb, EPS, 2)
    with pytest.raises(ValueError, match="conv_weight must be"):
        cn.conv_norm_gelu_ref(x, cw[:, :3], cb, nw, nb, EPS, 2)
    with pytest.raises(ValueError, match="k odd"):
        cn.conv_norm_gelu_ref(x, torch.zeros(16, 4, 2, 2), cb, nw, nb, EPS, 2)
    with pytest.raises(ValueError, match="norm_bias must be"):
        cn.conv_norm_gelu_ref(x, cw, cb, nw, nb[:3], EPS, 2)
    with pytest.raises(ValueError, match="share one dtype"):
        cn.conv_norm_gelu_ref(x, cw.double(), cb, nw, nb, EPS, 2)
    with pytest.raises(ValueError, match="stride"):
        cn.conv_norm_gelu_ref(x, cw, cb, nw, nb, EPS, 0)
    if cn.HAS_TRITON:
        big = torch.zeros(32, 4, 3, 3)
        with pytest.raises(ValueError, match="CI \\* CO"):
            cn._conv_norm_gelu_triton(x, big, torch.zeros(32), torch.zeros(32), torch.zeros(32), EPS, 2)
        with pytest.raises(ValueError, match="float32/bfloat16/float16"):
            cn._conv_norm_gelu_triton(*(t.double() for t in (x, cw, cb, nw, nb)), EPS, 2)


@needs_triton
def test_kernel_empty_batch():
    x, cw, cb, nw, nb = _case(1, 1, 4, 6, 6, 3, torch.float32, seed=2)
    got = cn._conv_norm_gelu_triton(x[:0], cw, cb, nw, nb, EPS, 2)
    assert got.shape == (0, 4, 3, 3)


def test_opcheck():
    args = _case(1, 2, 4, 7, 9, 3, torch.float32, seed=4)
    torch.library.opcheck(torch.ops.sam3fast.conv_norm_gelu.default, (*args, EPS, 2))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    args = _case(1, 4, 16, 10, 10, 3, torch.float32, seed=5)
    fn = torch.compile(lambda *a: torch.ops.sam3fast.conv_norm_gelu(*a, EPS, 2), backend=backend, fullgraph=True)
    torch._dynamo.reset()
    try:
        torch.testing.assert_close(fn(*args), cn.conv_norm_gelu_ref(*args, EPS, 2), rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_entry_point_backend_cpu():
    """On CPU the entry point is the reference."""
    x, cw, cb, nw, nb = _case(1, 4, 16, 8, 8, 3, torch.float32, seed=6)
    assert cn.conv_norm_gelu_backend(x, cw)[0] == "reference"
    torch.testing.assert_close(cn.conv_norm_gelu(x, cw, cb, nw, nb, EPS, 2),
                               cn.conv_norm_gelu_ref(x, cw, cb, nw, nb, EPS, 2), rtol=0, atol=0)


def test_force_reference_env():
    reason = forced_backend_reason("conv_norm_gelu",
                                   "conv_norm_gelu_backend(torch.zeros(1, 4, 8, 8), torch.zeros(16, 4, 3, 3))")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


def test_kernel_compiles_for_sm90():
    """The mask downsampler's first two stages at 16 objects (1 -> 4 from 1152^2, 4 -> 16 from 576^2,
    bf16, the default launch) build for an H100 without a GPU: no spill, and no barrier or
    shared-memory traffic inside the channel loop (the operands load in the tile's layout)."""
    code = SM90_BUILD + textwrap.dedent(
        """
        import torch
        from sam3fast.kernels import conv_norm_gelu as cn
        from sam3fast.kernels._static_build import assert_no_spills_or_loop_conversions, capture
        e = lambda *s: torch.empty(s, dtype=torch.bfloat16)
        for CI, CO, side in ((1, 4, 1152), (4, 16, 576)):
            with capture(cn._conv_norm_gelu_kernel) as builds:
                cn._conv_norm_gelu_triton(e(16, CI, side, side), e(CO, CI, 3, 3), e(CO), e(CO), e(CO), 1e-6, 2)
            assert_no_spills_or_loop_conversions(builds[0].kernel)
        print("ok")
        """
    )
    run_compiled(code)


# ---- the mask downsampler ----------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mask_downsampler_kernel_path(dtype, monkeypatch):
    """The downsampler with the kernels' backends forced to "triton" (their launchers under the
    interpreter): its first two stages call ``conv_norm_gelu`` (CI * CO <= 64) and the rest the
    convolution + ``layer_norm2d``, and the output matches the PyTorch path; ``use_conv_kernel =
    False`` keeps the convolutions out of it."""
    from sam3fast.kernels import layer_norm2d as ln
    from sam3fast.model import memory as memory_mod

    torch.manual_seed(0)
    ds = MaskDownSampler(64, None).to(dtype).eval()
    with torch.no_grad():
        for m in ds.encoder:
            if hasattr(m, "eps"):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 1, 64, 64).to(dtype)
    with torch.no_grad():
        want = ds(x)
    calls = []

    def spy(x, cw, *rest):
        calls.append((x.shape[1], cw.shape[0]))
        return cn._conv_norm_gelu_triton(x, cw, *rest)

    monkeypatch.setattr(cn, "conv_norm_gelu_backend", lambda x, w: ("triton", "forced")
                        if w.shape[0] * w.shape[1] <= cn.MAX_CHANNEL_PRODUCT else ("reference", "size"))
    monkeypatch.setattr(ln, "layer_norm2d_backend", lambda x: ("triton", "forced"))
    monkeypatch.setattr(memory_mod, "_conv_norm_gelu_call", spy)
    with torch.no_grad():
        got = ds(x)
    assert calls == [(1, 4), (4, 16)], calls
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    calls.clear()
    monkeypatch.setattr(MaskDownSampler, "use_conv_kernel", False)
    with torch.no_grad():
        ds(x)
    assert calls == []


# ---- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("CI,CO,side", [(1, 4, 1152), (4, 16, 576)])
def test_gpu_real_shape_bf16(CI, CO, side):
    """The downsampler's first two stages at 16 objects in bf16 on the GPU, against the float64
    spec within the rule, and a CUDA graph replay on new input equal to a fresh call."""
    x, cw, cb, nw, nb = (t.cuda() for t in _case(16, CI, CO, side, side, 3, torch.bfloat16, seed=CO))
    assert cn.conv_norm_gelu_backend(x, cw)[0] == "triton"
    got = cn.conv_norm_gelu(x, cw, cb, nw, nb, EPS, 2)
    _check(got.cpu(), x.cpu(), cw.cpu(), cb.cpu(), nw.cpu(), nb.cpu(), 2)
    graph, out = capture_graph(lambda: cn.conv_norm_gelu(x, cw, cb, nw, nb, EPS, 2))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, cn.conv_norm_gelu(x, cw, cb, nw, nb, EPS, 2))
