"""GroupNorm over large maps, with and without the ReLU after it (``sam3fast.kernels.group_norm``),
against a float64 spec; the ``sam3fast::group_norm`` op (opcheck, torch.compile), its entry point,
and the modules that use it (``FastGroupNorm``, the segmentation head's pixel decoder) with the
kernel path forced.

On CPU the Triton launcher runs under ``TRITON_INTERPRET=1`` (set by conftest.py) on small odd
shapes (maps that are no multiple of the pixel tile, groups of a non-power-of-two channel count,
1 to many statistics splits), NCHW, channels-last and sliced inputs, and maps whose mean dwarfs
their spread (the pairwise statistics); outputs are preallocated full of NaN so an unwritten
element fails.

The rule: against the float64 spec, the kernel's error is at most the error of the PyTorch path in
the dtype (``group_norm_fast``: float32 statistics, one rounding; then ``F.relu``) plus one ulp of
the result's magnitude (the two roundings may fall on either side of a tie); float32 within 2e-6 of
the largest magnitude.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import (
    SM90_BUILD, assert_within_eager_rule, capture_graph, forced_backend_reason, run_compiled, ulp,
)

from sam3fast.kernels import group_norm as gn
from sam3fast.model import common as common_mod
from sam3fast.model.common import FastGroupNorm, group_norm_fast
from sam3fast.model.seg_head import PixelDecoder

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not gn.HAS_TRITON, reason=f"triton not importable: {gn.TRITON_IMPORT_ERROR}")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (B, C, H, W, G)
CASES = {"b2_c12_7x9_g3": (2, 12, 7, 9, 3), "b1_c64_17x33_g8": (1, 64, 17, 33, 8), "b1_c40_6x5_g8": (1, 40, 6, 5, 8),
         "b3_c6_11x4_g1": (3, 6, 11, 4, 1)}
EPS = 1e-5


def _case(B, C, H, W, G, dtype, seed, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    # a mean per (image, group) that exceeds the spread (the statistics' cancellation)
    x = torch.randn(B, C, H, W, generator=g) + offset * torch.randn(B, G, 1, 1, 1, generator=g).expand(
        B, G, C // G, 1, 1).reshape(B, C, 1, 1)
    w = 1 + 0.3 * torch.randn(C, generator=g)
    b = 0.2 * torch.randn(C, generator=g)
    return x.to(dtype), w.to(dtype), b.to(dtype)


def spec64(x, w, b, G, relu):
    B, C = x.shape[:2]
    x64 = x.double().reshape(B, G, -1)
    var, mean = torch.var_mean(x64, dim=-1, keepdim=True, correction=0)
    y = ((x64 - mean) / torch.sqrt(var + EPS)).reshape(x.shape)
    y = y * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
    return y.clamp_min(0) if relu else y


def _check(got, x, w, b, G, relu):
    assert got.dtype == x.dtype and got.shape == x.shape and got.is_contiguous()
    assert not got.isnan().any(), "unwritten (NaN) elements"
    eager = group_norm_fast(x, G, w, b, EPS, min_group_numel=0)
    assert_within_eager_rule(got, spec64(x, w, b, G, relu), F.relu(eager) if relu else eager)


@needs_triton
@pytest.mark.parametrize("relu", [False, True], ids=["norm", "norm_relu"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_against_spec(case, dtype, relu):
    *shape, G = CASES[case]
    x, w, b = _case(*shape, G, DTYPES[dtype], seed=len(case))
    for block_p, splits in ((16, 1), (16, 3), (None, None)):
        out = torch.full(x.shape, float("nan"), dtype=x.dtype)
        got = gn._group_norm_triton(x, w, b, G, EPS, relu, out=out, block_p=block_p, splits=splits)
        assert got is out
        _check(got, x, w, b, G, relu)


@needs_triton
def test_kernel_large_mean_small_spread():
    """A group whose mean is 1000 times its spread, split over many tiles: the pairwise statistics
    keep float32 accuracy (E[x^2] - E[x]^2 would lose every digit of the variance)."""
    g = torch.Generator().manual_seed(3)
    x = 500.0 + 0.5 * torch.randn(1, 16, 31, 29, generator=g)
    w, b = torch.ones(16), torch.zeros(16)
    got = gn._group_norm_triton(x, w, b, 4, EPS, block_p=16, splits=7)
    want = spec64(x, w, b, 4, False)
    assert (got.double() - want).abs().max().item() <= 1e-3  # the input's own rounding (ulp(500) / 0.5)
    eager = group_norm_fast(x, 4, w, b, EPS, min_group_numel=0)
    assert (got.double() - want).abs().max().item() <= 2 * (eager.double() - want).abs().max().item() + 1e-6


@needs_triton
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_kernel_strided_inputs(dtype):
    """A channels-last input and a sliced (non-contiguous) one give the spec; the output is
    contiguous NCHW whatever the input's strides."""
    x, w, b = _case(2, 16, 9, 10, 4, DTYPES[dtype], seed=7)
    for xi in (x.contiguous(memory_format=torch.channels_last), x[:, :, 1:8, ::2]):
        for splits in (None, 2):
            _check(gn._group_norm_triton(xi, w, b, 4, EPS, True, block_p=16, splits=splits), xi, w, b, 4, True)


@needs_triton
def test_kernel_float32_params_on_half_input():
    """float32 affine parameters (an fp32 island) on bf16 maps: read in float32."""
    x, w, b = _case(1, 16, 7, 7, 4, torch.bfloat16, seed=8)
    w32, b32 = (w.float() + 1e-3), b.float()
    got = gn._group_norm_triton(x, w32, b32, 4, EPS)
    ref = gn.group_norm_ref(x, w32, b32, 4, EPS)
    assert (got.float() - ref.float()).abs().max().item() <= 2 * ulp(ref).max().item()


def test_reference_is_the_module_ops():
    """The spec's PyTorch form is group_norm_fast (then F.relu), whatever the group size."""
    x, w, b = _case(2, 16, 5, 6, 4, torch.bfloat16, seed=9)
    assert torch.equal(gn.group_norm_ref(x, w, b, 4, EPS), group_norm_fast(x, 4, w, b, EPS))
    assert torch.equal(gn.group_norm_ref(x, w, b, 4, EPS, True), F.relu(group_norm_fast(x, 4, w, b, EPS)))


def test_bad_inputs():
    x, w, b = _case(1, 8, 4, 4, 2, torch.float32, seed=10)
    with pytest.raises(ValueError, match=r"x must be a floating \(B, C, H, W\)"):
        gn.group_norm_ref(x[0], w, b, 2, EPS)
    with pytest.raises(ValueError, match=r"x must be a floating"):
        gn.group_norm_ref(x.to(torch.int32), w, b, 2, EPS)
    with pytest.raises(ValueError, match="num_groups must divide the 8 channels, got 3"):
        gn.group_norm_ref(x, w, b, 3, EPS)
    with pytest.raises(ValueError, match=r"weight must be a floating \(8,\)"):
        gn.group_norm_ref(x, w[:4], b, 2, EPS)
    with pytest.raises(ValueError, match=r"bias must be a floating \(8,\)"):
        gn.group_norm_ref(x, w, b.to(torch.int64), 2, EPS)
    if gn.HAS_TRITON:
        with pytest.raises(ValueError, match="at most 256 channels a group"):
            gn._group_norm_triton(torch.zeros(1, 514, 2, 2), torch.ones(514), torch.zeros(514), 1, EPS)
        with pytest.raises(ValueError, match="block_p"):
            gn._group_norm_triton(x, w, b, 2, EPS, block_p=48)
        with pytest.raises(ValueError, match="splits must be 1 to 128"):
            gn._group_norm_triton(x, w, b, 2, EPS, splits=0)
        with pytest.raises(ValueError, match="out must be a contiguous"):
            gn._group_norm_triton(x, w, b, 2, EPS, out=torch.empty(1, 8, 4, 5))


@needs_triton
def test_kernel_empty_batch():
    x, w, b = _case(1, 8, 4, 4, 2, torch.float32, seed=11)
    assert gn._group_norm_triton(x[:0], w, b, 2, EPS).shape == (0, 8, 4, 4)


def _op_args(relu=True):
    x, w, b = _case(2, 16, 5, 6, 4, torch.float32, seed=12)
    return (x, w, b, 4, EPS, relu)


def test_opcheck():
    for relu in (False, True):
        torch.library.opcheck(torch.ops.sam3fast.group_norm.default, _op_args(relu))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    x, w, b, G, eps, relu = _op_args()

    def via_op(x):
        return torch.ops.sam3fast.group_norm(x * 2.0, w, b, G, eps, relu) + 1.0

    def via_entry(x):
        return gn.group_norm(x, w, b, G, eps, relu).sum()

    torch._dynamo.reset()
    for fn in (via_op, via_entry):
        got = torch.compile(fn, fullgraph=True, backend=backend)(x)
        torch.testing.assert_close(got, fn(x), rtol=0, atol=0)


def test_entry_point_backend_cpu():
    x, w, b, G, eps, relu = _op_args()
    backend, reason = gn.group_norm_backend(x, G)
    assert backend == "reference" and "cpu" in reason
    assert torch.equal(gn.group_norm(x, w, b, G, eps, relu), gn.group_norm_ref(x, w, b, G, eps, relu))


def test_force_reference_env():
    reason = forced_backend_reason("group_norm", "group_norm_backend(torch.zeros(1, 16, 3, 3), 4)")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


@needs_triton
def test_kernel_compiles_for_sm90():
    """The pixel decoder's two launches (bf16, GroupNorm(8, 256) + ReLU at 144 and 288 px) build for
    an H100 without a GPU, both kernels without spills."""
    code = SM90_BUILD + textwrap.dedent(
        """
        import torch
        from sam3fast.kernels import group_norm as gn
        from sam3fast.kernels._static_build import capture, sass_stats
        e = lambda *s: torch.empty(s, dtype=torch.bfloat16)
        for side in (144, 288):
            with capture(gn._group_stats_kernel) as stats, capture(gn._group_apply_kernel) as apply:
                gn._group_norm_triton(e(1, 256, side, side), e(256), e(256), 8, 1e-5, True)
            for b in stats + apply:
                st = sass_stats(b.kernel)
                assert st["stack"] == 0 and st["spill_stores"] == 0, (side, st)
            assert len(stats) == len(apply) == 1
        print("ok")
        """
    )
    run_compiled(code)


# ---- the modules ------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_modules_kernel_path(dtype, monkeypatch):
    """With the backend forced to "triton" (the launcher under the interpreter): FastGroupNorm and
    its forward_relu call the op, the pixel decoder runs its norms with their ReLUs in it, and the
    outputs match the PyTorch path; ``use_kernel = False``, autocast and a norm without affine keep
    the PyTorch path."""
    calls = []

    def spy(x, w, b, G, eps, relu=False):
        calls.append((x.shape[1], G, relu))
        return gn._group_norm_triton(x, w, b, G, eps, relu, block_p=16)

    torch.manual_seed(0)
    dec = PixelDecoder(32, 3).eval()
    norm = FastGroupNorm(4, 16)
    with torch.no_grad():
        for p in list(dec.parameters()) + list(norm.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    dec, norm = dec.to(dtype), norm.to(dtype)
    feats = [torch.randn(1, 32, 12, 12).to(dtype), torch.randn(1, 32, 6, 6).to(dtype), torch.randn(1, 32, 3, 3).to(dtype)]
    y = torch.randn(2, 16, 5, 9).to(dtype)
    with torch.no_grad():
        want, want_norm, want_relu = dec(feats), norm(y), F.relu(norm(y))
        monkeypatch.setattr(common_mod, "group_norm", spy)
        monkeypatch.setattr(common_mod, "group_norm_backend", lambda x, G: ("triton", "forced by the test"))
        FastGroupNorm.use_kernel = False
        try:
            assert torch.equal(dec(feats), want) and calls == []
        finally:
            FastGroupNorm.use_kernel = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            norm(y)
        plain = FastGroupNorm(4, 16, affine=False).to(dtype)
        plain(y)
        assert calls == []
        got = dec(feats)
        assert calls == [(32, 8, True), (32, 8, True)]  # two levels run (the third norm is for the keys)
        calls.clear()
        got_norm, got_relu = norm(y), norm.forward_relu(y)
        assert calls == [(16, 4, False), (16, 4, True)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_norm, want_norm, **tol)
    torch.testing.assert_close(got_relu, want_relu, **tol)


# ---- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("side", [144, 288])
def test_gpu_real_shape_bf16(side):
    """The pixel decoder's maps in bf16, norm and norm + ReLU: within the rule against the float64
    spec, and the op equals the launcher at another tile and split count."""
    x, w, b = (t.cuda() for t in _case(1, 256, side, side, 8, torch.bfloat16, seed=side))
    assert gn.group_norm_backend(x, 8)[0] == "triton"
    for relu in (False, True):
        got = gn.group_norm(x, w, b, 8, EPS, relu)
        _check(got.cpu(), x.cpu(), w.cpu(), b.cpu(), 8, relu)
        other = gn._group_norm_triton(x, w, b, 8, EPS, relu, block_p=64, splits=5)
        torch.testing.assert_close(other, got, rtol=0.02, atol=0.02)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_cuda_graph_replay():
    x, w, b = (t.cuda() for t in _case(1, 256, 144, 144, 8, torch.bfloat16, seed=13))
    graph, out = capture_graph(lambda: gn.group_norm(x, w, b, 8, EPS, True))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, gn.group_norm_ref(x, w, b, 8, EPS, True), rtol=0.05, atol=0.05)
