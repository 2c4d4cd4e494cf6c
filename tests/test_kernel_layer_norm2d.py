"""LayerNorm2d over few channels, with and without the GELU after it (``sam3fast.kernels.layer_norm2d``),
against a float64 spec; the ``sam3fast::layer_norm2d`` op (opcheck, torch.compile), its entry point,
and the modules that use it (``LayerNorm2d``, the memory encoder's mask downsampler, the SAM mask
decoder's upscaling) with the kernel path forced.

On CPU the Triton launcher runs under ``TRITON_INTERPRET=1`` (set by conftest.py) on small odd
shapes (maps that are no multiple of the pixel block, C not a power of two), NCHW, channels-last and
sliced inputs; outputs are preallocated full of NaN so an unwritten element fails.

The rule: against the float64 spec, the kernel's error is at most the error of the PyTorch path in
the dtype (float32 statistics, one rounding; then ``F.gelu``) plus one ulp of the result's
magnitude (the two roundings may fall on either side of a tie); float32 within 2e-6.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernel_checks import (
    SM90_BUILD, assert_within_eager_rule, capture_graph, forced_backend_reason, run_compiled, ulp,
)

from sam3fast.kernels import layer_norm2d as ln
from sam3fast.model import common as common_mod
from sam3fast.model.common import LayerNorm2d, layer_norm2d_channels_first, norm_then_act
from sam3fast.model.memory import MaskDownSampler

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not ln.HAS_TRITON, reason=f"triton not importable: {ln.TRITON_IMPORT_ERROR}")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (B, C, H, W)
CASES = {"b2_c4_13x17": (2, 4, 13, 17), "b1_c16_9x9": (1, 16, 9, 9), "b2_c64_5x7": (2, 64, 5, 7),
         "b1_c3_6x11": (1, 3, 6, 11), "b1_c100_4x5": (1, 100, 4, 5)}
EPS = 1e-6


def _case(B, C, H, W, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # an offset per pixel that dwarfs the spread over the channels in places (the mean's correction)
    x = (torch.randn(B, C, H, W, generator=g) + 4 * torch.randn(B, 1, H, W, generator=g)).to(dtype)
    w = (1 + 0.3 * torch.randn(C, generator=g)).to(dtype)
    b = (0.2 * torch.randn(C, generator=g)).to(dtype)
    return x, w, b


def spec64(x, w, b, gelu):
    x64 = x.double()
    var, mean = torch.var_mean(x64, dim=1, keepdim=True, correction=0)
    y = (x64 - mean) / torch.sqrt(var + EPS) * w.double().view(-1, 1, 1) + b.double().view(-1, 1, 1)
    return F.gelu(y) if gelu else y


def _check(got, x, w, b, gelu):
    assert got.dtype == x.dtype and got.shape == x.shape and got.is_contiguous()
    assert not got.isnan().any(), "unwritten (NaN) elements"
    eager = layer_norm2d_channels_first(x, w, b, EPS)
    assert_within_eager_rule(got, spec64(x, w, b, gelu), F.gelu(eager) if gelu else eager)


@needs_triton
@pytest.mark.parametrize("gelu", [False, True], ids=["norm", "norm_gelu"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_against_spec(case, dtype, gelu):
    x, w, b = _case(*CASES[case], DTYPES[dtype], seed=len(case))
    out = torch.full(x.shape, float("nan"), dtype=x.dtype)
    got = ln._layer_norm2d_triton(x, w, b, EPS, gelu, out=out)
    assert got is out
    _check(got, x, w, b, gelu)


@needs_triton
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_kernel_strided_inputs_and_small_block(dtype):
    """A channels-last input, a sliced (non-contiguous) one and a 16-pixel block give the spec; the
    output is contiguous NCHW whatever the input's strides."""
    x, w, b = _case(2, 16, 9, 10, DTYPES[dtype], seed=7)
    for xi in (x.contiguous(memory_format=torch.channels_last), x[:, :, 1:8, ::2]):
        for block_p in (None, 16):
            _check(ln._layer_norm2d_triton(xi, w, b, EPS, True, block_p=block_p), xi, w, b, True)


@needs_triton
def test_kernel_float32_params_on_half_input():
    """float32 affine parameters (an fp32 island) on bf16 maps: read in float32."""
    x, w, b = _case(1, 16, 7, 7, torch.bfloat16, seed=8)
    w32, b32 = (w.float() + 1e-3), b.float()
    got = ln._layer_norm2d_triton(x, w32, b32, EPS, False)
    ref = ln.layer_norm2d_ref(x, w32, b32, EPS, False)
    assert (got.float() - ref.float()).abs().max().item() <= 2 * ulp(ref).max().item()


def test_reference_is_the_module_ops():
    """The spec's PyTorch form is the module's eager small-C path (then F.gelu)."""
    x, w, b = _case(2, 16, 5, 6, torch.bfloat16, seed=9)
    assert torch.equal(ln.layer_norm2d_ref(x, w, b, EPS), layer_norm2d_channels_first(x, w, b, EPS))
    assert torch.equal(ln.layer_norm2d_ref(x, w, b, EPS, True), F.gelu(layer_norm2d_channels_first(x, w, b, EPS)))


def test_bad_inputs():
    x, w, b = _case(1, 8, 4, 4, torch.float32, seed=10)
    with pytest.raises(ValueError, match=r"x must be a floating \(B, C, H, W\)"):
        ln.layer_norm2d_ref(x[0], w, b, EPS)
    with pytest.raises(ValueError, match=r"x must be a floating"):
        ln.layer_norm2d_ref(x.to(torch.int32), w, b, EPS)
    with pytest.raises(ValueError, match=r"weight must be a floating \(8,\)"):
        ln.layer_norm2d_ref(x, w[:4], b, EPS)
    with pytest.raises(ValueError, match=r"bias must be a floating \(8,\)"):
        ln.layer_norm2d_ref(x, w, b.to(torch.int64), EPS)
    if ln.HAS_TRITON:
        with pytest.raises(ValueError, match="at most 128 channels"):
            ln._layer_norm2d_triton(torch.zeros(1, 129, 2, 2), torch.ones(129), torch.zeros(129), EPS)
        with pytest.raises(ValueError, match="block_p"):
            ln._layer_norm2d_triton(x, w, b, EPS, block_p=48)
        with pytest.raises(ValueError, match="out must be a contiguous"):
            ln._layer_norm2d_triton(x, w, b, EPS, out=torch.empty(1, 8, 4, 5))


@needs_triton
def test_kernel_empty_batch():
    x, w, b = _case(1, 8, 4, 4, torch.float32, seed=11)
    assert ln._layer_norm2d_triton(x[:0], w, b, EPS).shape == (0, 8, 4, 4)


def _op_args(gelu=True):
    return (*_case(2, 16, 5, 6, torch.float32, seed=12), EPS, gelu)


def test_opcheck():
    for gelu in (False, True):
        torch.library.opcheck(torch.ops.sam3fast.layer_norm2d.default, _op_args(gelu))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    x, w, b, eps, gelu = _op_args()

    def via_op(x):
        return torch.ops.sam3fast.layer_norm2d(x * 2.0, w, b, eps, gelu) + 1.0

    def via_entry(x):
        return ln.layer_norm2d(x, w, b, eps, gelu).sum()

    torch._dynamo.reset()
    for fn in (via_op, via_entry):
        got = torch.compile(fn, fullgraph=True, backend=backend)(x)
        torch.testing.assert_close(got, fn(x), rtol=0, atol=0)


def test_entry_point_backend_cpu():
    x, w, b, eps, gelu = _op_args()
    backend, reason = ln.layer_norm2d_backend(x)
    assert backend == "reference" and "cpu" in reason
    assert torch.equal(ln.layer_norm2d(x, w, b, eps, gelu), ln.layer_norm2d_ref(x, w, b, eps, gelu))


def test_force_reference_env():
    reason = forced_backend_reason("layer_norm2d", "layer_norm2d_backend(torch.zeros(1, 16, 3, 3))")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


@needs_triton
def test_kernel_compiles_for_sm90():
    """The launches of the mask downsampler's three small-C norms (bf16, 16 objects: C = 4 at 288 px,
    16 at 144, 64 at 72; the kernel is shape-generic) build for an H100 without a GPU, without spills."""
    code = SM90_BUILD + textwrap.dedent(
        """
        import torch
        from sam3fast.kernels import layer_norm2d as ln
        from sam3fast.kernels._static_build import capture, sass_stats
        e = lambda *s: torch.empty(s, dtype=torch.bfloat16)
        for C, side in ((4, 288), (16, 144), (64, 72)):
            for gelu in (False, True):
                with capture(ln._layer_norm2d_kernel) as builds:
                    ln._layer_norm2d_triton(e(16, C, side, side), e(C), e(C), 1e-6, gelu)
                (b,) = builds
                st = sass_stats(b.kernel)
                assert st["stack"] == 0 and st["spill_stores"] == 0, (C, gelu, st)
        print("ok")
        """
    )
    run_compiled(code)


# ---- the modules ------------------------------------------------------------------------------


def _spread(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g).to(p.dtype))
    return m


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_modules_kernel_path(dtype, monkeypatch):
    """With the backend forced to "triton" (the launcher under the interpreter): LayerNorm2d and its
    forward_gelu call the op below SMALL_C only, the mask downsampler runs its three small norms with
    their GELUs in the kernel (the 256-channel one stays on F.layer_norm), and the outputs match the
    PyTorch path; ``use_kernel = False`` and autocast keep the PyTorch path."""
    calls = []

    def spy(x, w, b, eps, gelu=False):
        calls.append((x.shape[1], gelu))
        return ln._layer_norm2d_triton(x, w, b, eps, gelu)

    m = _spread(MaskDownSampler(256, None), seed=1).to(dtype).eval()
    x = torch.randn(2, 1, 64, 64).to(dtype)
    norm = _spread(LayerNorm2d(16), seed=2).to(dtype)
    y = torch.randn(2, 16, 5, 9).to(dtype)
    with torch.no_grad():
        want, want_norm, want_gelu = m(x), norm(y), F.gelu(norm(y))
        monkeypatch.setattr(common_mod, "layer_norm2d", spy)
        monkeypatch.setattr(common_mod, "layer_norm2d_backend", lambda x: ("triton", "forced by the test"))
        for mod in m.modules():
            if isinstance(mod, LayerNorm2d):
                mod.use_kernel = False
        assert torch.equal(m(x), want) and calls == []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for mod in m.modules():
                if isinstance(mod, LayerNorm2d):
                    mod.use_kernel = True
            m(x.float() if dtype == torch.float32 else x)
        assert calls == []
        got = m(x)
        assert calls == [(4, True), (16, True), (64, True)]
        calls.clear()
        got_norm, got_gelu = norm(y), norm.forward_gelu(y)
        assert norm_then_act(norm, nn.GELU(), y).equal(got_gelu)
        assert calls == [(16, False), (16, True), (16, True)]
        calls.clear()
        norm_then_act(norm, nn.GELU(approximate="tanh"), y)  # not the exact GELU: norm, then the act
        assert calls == [(16, False)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_norm, want_norm, **tol)
    torch.testing.assert_close(got_gelu, want_gelu, **tol)


# ---- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("C, side", [(4, 576), (16, 288), (64, 144)])
def test_gpu_real_shape_bf16(C, side):
    """The mask downsampler's maps at 16 objects in bf16, norm and norm + GELU: within the rule
    against the float64 spec (on two objects), and the op equals the launcher at another block."""
    x, w, b = (t.cuda() for t in _case(16, C, side, side, torch.bfloat16, seed=C))
    assert ln.layer_norm2d_backend(x)[0] == "triton"
    for gelu in (False, True):
        got = ln.layer_norm2d(x, w, b, EPS, gelu)
        _check(got[:2].cpu(), x[:2].cpu(), w.cpu(), b.cpu(), gelu)
        other = ln._layer_norm2d_triton(x, w, b, EPS, gelu, block_p=64)
        torch.testing.assert_close(other, got, rtol=0.02, atol=0.02)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_cuda_graph_replay():
    x, w, b = (t.cuda() for t in _case(4, 16, 288, 288, torch.bfloat16, seed=13))
    graph, out = capture_graph(lambda: ln.layer_norm2d(x, w, b, EPS, True))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ln.layer_norm2d_ref(x, w, b, EPS, True), rtol=0.05, atol=0.05)
