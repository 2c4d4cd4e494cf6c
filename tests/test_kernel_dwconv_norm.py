"""The memory encoder's depthwise convolution + LayerNorm (``sam3fast.kernels.dwconv_norm``) against a
float64 spec, the ``sam3fast::dwconv_norm`` op (opcheck, torch.compile), its entry point, and the
``CXBlock`` with the kernel path forced.

On CPU the Triton launcher runs under ``TRITON_INTERPRET=1`` (set by conftest.py) on small odd
shapes: 7 x 9, 5 x 4 and 8 x 8 grids (the first two not multiples of the tiles), k 7 and 3, C 40 /
64 / 24, two objects, NCHW and channels-last inputs, the default tiles and a 2 x 2 one; outputs are
preallocated full of NaN so an unwritten element fails.

The rule: within the rounding of the convolution's output (an ulp of it either way, the tap order
differing from the reference's), carried through the norm (times rstd |weight|), plus half an ulp
of the result and float32-level terms, of the float64 spec; and at most 2x the error of the
module's PyTorch operations in the dtype.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from kernel_checks import SM90_BUILD, capture_graph, forced_backend_reason, run_compiled

from sam3fast.kernels import dwconv_norm as dn
from sam3fast.model import memory as memory_mod
from sam3fast.model.memory import CXBlock

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not dn.HAS_TRITON, reason=f"triton not importable: {dn.TRITON_IMPORT_ERROR}")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (B, C, H, W, k)
CASES = {"b2_c40_7x9_k7": (2, 40, 7, 9, 7), "b1_c64_5x4_k3": (1, 64, 5, 4, 3), "b1_c24_8x8_k7": (1, 24, 8, 8, 7)}
EPS = 1e-6


def _case(B, C, H, W, k, dtype, seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, C, H, W, generator=g) + 0.3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    cw = (torch.randn(C, 1, k, k, generator=g) / k).to(dtype)
    cb = (0.2 * torch.randn(C, generator=g)).to(dtype)
    nw = (1 + 0.3 * torch.randn(C, generator=g)).to(dtype)
    nb = (0.2 * torch.randn(C, generator=g)).to(dtype)
    return x, cw, cb, nw, nb


def spec64(x, cw, cb, nw, nb):
    """float64 convolution (zero padding, direct sum written here), rounded to the dtype, then the
    float64 norm over C: (want (B, H, W, C), the rounded conv output v, its rstd, sum |x w| + |b|)."""
    B, C, H, W = x.shape
    k = cw.shape[-1]
    xp = torch.nn.functional.pad(x.double(), (k // 2,) * 4)
    conv = torch.zeros(B, C, H, W, dtype=torch.float64)
    mag = torch.zeros_like(conv)
    for dy in range(k):
        for dx in range(k):
            tap = xp[:, :, dy:dy + H, dx:dx + W]
            wt = cw.double()[:, 0, dy, dx].view(1, C, 1, 1)
            conv += tap * wt
            mag += (tap * wt).abs()
    v = (conv + cb.double().view(1, C, 1, 1)).to(x.dtype).double().permute(0, 2, 3, 1)
    mean = v.mean(-1, keepdim=True)
    rstd = 1 / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + EPS)
    want = (v - mean) * rstd * nw.double() + nb.double()
    return want, v, rstd, (mag + cb.double().abs().view(1, C, 1, 1)).permute(0, 2, 3, 1)


def _check(got, x, cw, cb, nw, nb, ref_in_dtype):
    want, v, rstd, mag = spec64(x, cw, cb, nw, nb)
    assert got.shape == want.shape and got.is_contiguous()
    assert not torch.isnan(got).any(), "NaN in the output (an unwritten element?)"
    eps = torch.finfo(got.dtype).eps
    k = cw.shape[-1]
    # the conv output: an ulp either way (tap order) + float32 accumulation, through the norm (its
    # mean moves too: twice); then half an ulp of the result and float32 terms of the norm
    dv = eps * v.abs().amax(-1, keepdim=True) + k * k * 2.0**-24 * mag.amax(-1, keepdim=True)
    bound = 2 * dv * rstd * nw.double().abs() + eps / 2 * want.abs() + 64 * 2.0**-24 * (want.abs() + 1)
    excess = (got.double() - want).abs() - bound
    assert excess.max() <= 0, f"error above the bound by {excess.max().item():.3g}"
    err = (got.double() - want).abs().max().item()
    ref_err = (ref_in_dtype.double() - want).abs().max().item()
    assert err <= 2 * ref_err + 1e-5, (err, ref_err)


def _run(case, dtype, channels_last, **launch):
    B, C, H, W, k = CASES[case]
    args = _case(B, C, H, W, k, dtype, seed=C + k, channels_last=channels_last)
    out = torch.full((B, H, W, C), float("nan"), dtype=args[0].dtype)
    got = dn._dwconv_norm_triton(*args, EPS, out=out, **launch)
    assert got.data_ptr() == out.data_ptr()
    _check(got, *args, dn.dwconv_norm_ref(*args, EPS))


@needs_triton
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_against_spec(case, dtype):
    """NCHW input, the default tile (the interpreter pays per program: the other layout and tile
    run on one case below)."""
    _run(case, DTYPES[dtype], channels_last=False)


@needs_triton
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_kernel_channels_last_and_small_tile(dtype):
    _run("b2_c40_7x9_k7", DTYPES[dtype], channels_last=True)
    _run("b1_c64_5x4_k3", DTYPES[dtype], channels_last=True, block_h=2, block_w=2, num_warps=2)
    # an NCHW input on the pixels-major kernel (the channels-first one is the default there)
    _run("b2_c40_7x9_k7", DTYPES[dtype], channels_last=False, channels_first_tile=False)


def test_int32_extent_rule():
    """The channels-first kernel's int32 offsets: taken while one image's last element offset
    fits (strides of a (B, C, H, W) view, any order), else the pixels-major kernel's int64 ones."""
    x = torch.empty(2, 256, 72, 72)
    assert dn._int32_extent(x) and dn._int32_extent(x[:, :, ::2])
    big = torch.empty_strided((1, 2, 2, 2), (0, 2**31 - 2, 1, 1), device="meta")  # last offset 2**31
    assert not dn._int32_extent(big)
    assert dn._int32_extent(torch.empty_strided((1, 2, 2, 2), (0, 2**31 - 3, 1, 1), device="meta"))


def test_reference_is_the_block_ops():
    """The op's reference is the block's own chain: the grouped convolution, then F.layer_norm on the
    channels-last view (so the CPU CXBlock is unchanged)."""
    x, cw, cb, nw, nb = _case(2, 24, 8, 8, 7, torch.float32, seed=1)
    conv = torch.nn.functional.conv2d(x, cw, cb, padding=3, groups=24).permute(0, 2, 3, 1)
    want = torch.nn.functional.layer_norm(conv, (24,), nw, nb, EPS)
    assert torch.equal(dn.dwconv_norm_ref(x, cw, cb, nw, nb, EPS), want)


def test_bad_inputs():
    x, cw, cb, nw, nb = _case(1, 24, 5, 5, 3, torch.float32, seed=2)
    with pytest.raises(ValueError, match="x must be a floating"):
        dn.dwconv_norm_ref(x[0], cw, cb, nw, nb, EPS)
    with pytest.raises(ValueError, match=r"conv_weight must be a depthwise \(24, 1, k, k\) kernel with k odd"):
        dn.dwconv_norm_ref(x, cw[:, :, :2, :2], cb, nw, nb, EPS)
    with pytest.raises(ValueError, match=r"conv_weight must be a depthwise"):
        dn.dwconv_norm_ref(x, cw.expand(24, 2, 3, 3), cb, nw, nb, EPS)
    with pytest.raises(ValueError, match=r"norm_bias must be \(24,\)"):
        dn.dwconv_norm_ref(x, cw, cb, nw, nb[:3], EPS)
    with pytest.raises(ValueError, match="share one dtype"):
        dn.dwconv_norm_ref(x, cw.double(), cb, nw, nb, EPS)
    if dn.HAS_TRITON:
        with pytest.raises(ValueError, match="block_w must be a power of two"):
            dn._dwconv_norm_triton(x, cw, cb, nw, nb, EPS, block_w=3)
        with pytest.raises(ValueError, match="float32/bfloat16/float16"):
            dn._dwconv_norm_triton(*(t.double() for t in (x, cw, cb, nw, nb)), EPS)


@needs_triton
def test_kernel_empty_batch():
    x, cw, cb, nw, nb = _case(1, 24, 5, 5, 3, torch.float32, seed=3)
    assert dn._dwconv_norm_triton(x[:0], cw, cb, nw, nb, EPS).shape == (0, 5, 5, 24)


def _op_args():
    return (*_case(2, 24, 5, 6, 3, torch.float32, seed=4), EPS)


def test_opcheck():
    torch.library.opcheck(torch.ops.sam3fast.dwconv_norm.default, _op_args())


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    x, cw, cb, nw, nb, eps = _op_args()

    def via_op(x):
        return torch.ops.sam3fast.dwconv_norm(x * 2.0, cw, cb, nw, nb, eps) + 1.0

    def via_entry(x):
        return dn.dwconv_norm(x, cw, cb, nw, nb, eps).sum()

    torch._dynamo.reset()
    for fn in (via_op, via_entry):
        got = torch.compile(fn, fullgraph=True, backend=backend)(x)
        torch.testing.assert_close(got, fn(x), rtol=0, atol=0)


def test_entry_point_backend_cpu():
    args = _op_args()
    backend, reason = dn.dwconv_norm_backend(args[0])
    assert backend == "reference" and "cpu" in reason
    assert torch.equal(dn.dwconv_norm(*args), dn.dwconv_norm_ref(*args))


def test_force_reference_env():
    reason = forced_backend_reason("dwconv_norm", "dwconv_norm_backend(torch.zeros(1, 16, 3, 3))")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


@needs_triton
def test_kernel_compiles_for_sm90():
    """The launcher's launch at the memory encoder's size (bf16, 16 x 256 x 72 x 72, k 7, NCHW and
    channels-last input, the default tile) builds for an H100 without a GPU, with no register spill;
    an NCHW input takes the channels-first kernel; neither tap loop has a barrier or shared-memory
    traffic (the layout conversions of the tap's weights the kernel paid every tap before session 17)."""
    code = SM90_BUILD + textwrap.dedent(
        """
        import torch
        from sam3fast.kernels import dwconv_norm as dn
        from sam3fast.kernels._static_build import assert_no_spills_or_loop_conversions, capture
        e = lambda *s: torch.empty(s, dtype=torch.bfloat16)
        for x, kern in ((e(16, 256, 72, 72), dn._dwconv_norm_cf_kernel),
                        (e(16, 256, 72, 72).contiguous(memory_format=torch.channels_last), dn._dwconv_norm_kernel)):
            with capture(kern) as builds:
                dn._dwconv_norm_triton(x, e(256, 1, 7, 7), e(256), e(256), e(256), 1e-6)
            (b,) = builds
            assert_no_spills_or_loop_conversions(b.kernel)
        print("ok")
        """
    )
    run_compiled(code)


# ---- the CXBlock -----------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cxblock_kernel_path(dtype, monkeypatch):
    """The block with the backend forced to "triton" (the launcher under the interpreter) calls the
    op with its dwconv and norm parameters and matches the PyTorch path; ``use_kernel = False`` and
    autocast keep the PyTorch path."""
    torch.manual_seed(0)
    m = CXBlock(32).to(dtype)
    with torch.no_grad():
        for p in (m.norm.weight, m.norm.bias, m.gamma):
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 32, 6, 7).to(dtype)
    calls = []

    def spy(*args):
        calls.append(tuple(args[0].shape))
        return dn._dwconv_norm_triton(*args)

    monkeypatch.setattr(memory_mod, "dwconv_norm", spy)
    with torch.no_grad():
        want = m(x)  # CPU backend: the PyTorch path
        monkeypatch.setattr(memory_mod, "dwconv_norm_backend", lambda x: ("triton", "forced by the test"))
        m.use_kernel = False
        assert torch.equal(m(x), want) and calls == []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m.use_kernel = True
            m(x.float() if dtype == torch.float32 else x)
        assert calls == []
        got = m(x)
    assert calls == [(2, 32, 6, 7)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(got, want, **tol)


# ---- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gpu_real_shape_bf16(layout):
    """16 objects, 256 x 72 x 72, k 7, bf16: within the rule against the float64 spec (on two objects
    for the float64 direct sum), and the op equals the launcher at another tile."""
    args = [t.cuda() for t in _case(16, 256, 72, 72, 7, torch.bfloat16, seed=5, channels_last=layout == "channels_last")]
    assert dn.dwconv_norm_backend(args[0])[0] == "triton"
    got = dn.dwconv_norm(*args, EPS)
    ref = dn.dwconv_norm_ref(*args, EPS)
    sub = [args[0][:2].cpu()] + [t.cpu() for t in args[1:]]
    _check(got[:2].cpu(), *sub, ref[:2].cpu())
    other = dn._dwconv_norm_triton(*args, EPS, block_h=8, block_w=8)
    torch.testing.assert_close(other, got, rtol=0.02, atol=0.02)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_cuda_graph_replay():
    args = [t.cuda() for t in _case(4, 256, 72, 72, 7, torch.bfloat16, seed=6)]
    x = args[0]
    graph, out = capture_graph(lambda: dn.dwconv_norm(x, *args[1:], EPS))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, dn.dwconv_norm_ref(x, *args[1:], EPS), rtol=0.05, atol=0.05)
