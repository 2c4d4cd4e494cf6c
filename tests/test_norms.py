"""LayerNorm2d (channels-first statistics below ``SMALL_C``, ``F.layer_norm`` channels-last above) and
group_norm_fast / FastGroupNorm (statistics by ``torch.var_mean``) against float64 references of the
official formulas, and against the implementations they replace (``F.layer_norm`` on the permuted
view, ``F.group_norm``): float32 inputs to float32 rounding, bfloat16 inputs at most 2x the error of
the replaced implementation in bfloat16."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sam3fast.model.common import (
    GROUP_NORM_FAST_MIN_NUMEL, FastGroupNorm, LayerNorm2d, group_norm_fast, layer_norm2d_channels_first,
    layer_norm2d_channels_last,
)
from sam3fast.model.seg_head import SegmentationHead

pytestmark = pytest.mark.usefixtures("one_thread_module")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _ln2d_ref64(x, w, b, eps):
    """The official ``LayerNorm2d`` formula in float64."""
    x, w, b = x.double(), w.double(), b.double()
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return w[:, None, None] * ((x - u) / torch.sqrt(s + eps)) + b[:, None, None]


def _gn_ref64(x, G, w, b, eps):
    """``nn.GroupNorm`` in float64 (biased variance over each (batch, group))."""
    B, C = x.shape[:2]
    xg = x.double().reshape(B, G, -1)
    u = xg.mean(-1, keepdim=True)
    s = (xg - u).pow(2).mean(-1, keepdim=True)
    y = ((xg - u) / torch.sqrt(s + eps)).reshape(x.shape)
    shape = (1, C) + (1,) * (x.dim() - 2)
    return y * w.double().view(shape) + b.double().view(shape)


def _inputs(shape, seed, offset=1.5):
    """3 * N(0, 1) + an offset per position (the mean does not vanish: cancellation is exercised)."""
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(shape, generator=g) + offset * torch.randn(shape[:1] + (1,) + shape[2:], generator=g)


def _affine(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=g))
        module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=g))
    return module


def _err(got, want):
    assert got.dtype != torch.float64 and torch.isfinite(got).all()
    return (got.double() - want).abs().max().item()


# (B, C, H, W): small C (channels-first path) with odd sides, the threshold's both sides, large C.
LN_SHAPES = [(2, 4, 17, 23), (3, 16, 9, 31), (1, 64, 13, 11), (2, 127, 5, 7), (2, 128, 7, 5), (2, 256, 6, 9)]


@pytest.mark.parametrize("shape", LN_SHAPES)
def test_layer_norm2d_fp32(shape):
    C = shape[1]
    m = _affine(LayerNorm2d(C), seed=C)
    x = _inputs(shape, seed=sum(shape))
    want = _ln2d_ref64(x, m.weight, m.bias, m.eps)
    got = m(x)
    old = layer_norm2d_channels_last(x, m.weight, m.bias, m.eps)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert _err(got, want) <= 4e-6
    assert (got - old).abs().max().item() <= 4e-6  # float32 rounding of the replaced path
    # small C: contiguous NCHW out; large C: the fused kernel's channels-last strides, as before
    if C < LayerNorm2d.SMALL_C:
        assert got.is_contiguous()
    else:
        assert got.stride() == old.stride()


@pytest.mark.parametrize("shape", LN_SHAPES)
def test_layer_norm2d_bf16(shape):
    """A bf16 module on bf16 input (model.to(bfloat16)): statistics in float32, one rounding."""
    C = shape[1]
    m = _affine(LayerNorm2d(C), seed=C + 1).to(torch.bfloat16)
    x = _inputs(shape, seed=sum(shape) + 1).to(torch.bfloat16)
    want = _ln2d_ref64(x, m.weight, m.bias, m.eps)
    got = m(x)
    assert got.dtype == torch.bfloat16
    err, err_old = _err(got, want), _err(layer_norm2d_channels_last(x, m.weight, m.bias, m.eps), want)
    assert err <= 2 * err_old + 1e-6, (err, err_old)
    # one rounding of the float32 value: within half a bf16 ulp (2^-9 relative) of the float64 result
    assert ((got.double() - want).abs() <= want.abs() * 2.0 ** -8 + 1e-6).all()


def test_layer_norm2d_channels_first_any_layout_and_float64():
    """Both functions at every C (the bench times them outside the threshold), channels-last input,
    and float64 input kept in float64."""
    m = _affine(LayerNorm2d(32), seed=3)
    x = _inputs((2, 32, 7, 9), seed=4)
    want = _ln2d_ref64(x, m.weight, m.bias, m.eps)
    assert _err(layer_norm2d_channels_first(x.to(memory_format=torch.channels_last), m.weight, m.bias, m.eps),
                want) <= 4e-6
    m_big = _affine(LayerNorm2d(256), seed=5)
    xb = _inputs((1, 256, 5, 6), seed=6)
    assert _err(layer_norm2d_channels_first(xb, m_big.weight, m_big.bias, m_big.eps),
                _ln2d_ref64(xb, m_big.weight, m_big.bias, m_big.eps)) <= 4e-6
    got64 = m.double()(x.double())
    assert got64.dtype == torch.float64
    assert (got64 - want).abs().max().item() <= 1e-12


# (B, C, *spatial), groups, min_group_numel: 0 forces the fast path at small sizes; the default
# threshold at a size above it (32 x 48 x 48 = 73728 per group) and one below (F.group_norm).
GN_CASES = [
    ((2, 256, 24, 29), 8, 0),
    ((3, 12, 11, 5), 4, 0),
    ((2, 12, 301), 3, 0),
    ((1, 256, 48, 48), 8, GROUP_NORM_FAST_MIN_NUMEL),
    ((2, 32, 5, 7), 8, GROUP_NORM_FAST_MIN_NUMEL),
]


@pytest.mark.parametrize("shape, G, min_numel", GN_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_fast(shape, G, min_numel, dtype):
    C = shape[1]
    m = _affine(nn.GroupNorm(G, C), seed=C + G).to(dtype)
    x = _inputs(shape, seed=sum(shape)).to(dtype)
    want = _gn_ref64(x, G, m.weight, m.bias, m.eps)
    got = group_norm_fast(x, G, m.weight, m.bias, m.eps, min_group_numel=min_numel)
    old = F.group_norm(x, G, m.weight, m.bias, m.eps)
    assert got.shape == x.shape and got.dtype == dtype and got.is_contiguous()
    if dtype == torch.float32:
        assert _err(got, want) <= 4e-6
        assert (got - old).abs().max().item() <= 4e-6
    else:
        err, err_old = _err(got, want), _err(old, want)
        assert err <= 2 * err_old + 1e-6, (err, err_old)


@pytest.mark.parametrize("shape, G", [((2, 256, 24, 29), 8), ((3, 12, 11, 5), 4), ((1, 16, 1, 7), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_fast_channels_last(shape, G, dtype):
    """A channels-last map (the pixel decoder's) is reduced through its (B, HW, G, C / G) view: same
    bound against float64 as the contiguous path, the output channels-last too."""
    C = shape[1]
    m = _affine(nn.GroupNorm(G, C), seed=C + G + 1).to(dtype)
    x = _inputs(shape, seed=sum(shape) + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    want = _gn_ref64(x, G, m.weight, m.bias, m.eps)
    got = group_norm_fast(x, G, m.weight, m.bias, m.eps, min_group_numel=0)
    assert got.shape == x.shape and got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        assert _err(got, want) <= 4e-6
    else:
        err, err_old = _err(got, want), _err(F.group_norm(x.contiguous(), G, m.weight, m.bias, m.eps), want)
        assert err <= 2 * err_old + 1e-6, (err, err_old)


def test_group_norm_fast_no_affine():
    x = _inputs((2, 16, 9, 10), seed=7)
    want = _gn_ref64(x, 4, torch.ones(16), torch.zeros(16), 1e-5)
    assert _err(group_norm_fast(x, 4, None, None, 1e-5, min_group_numel=0), want) <= 4e-6


def test_fast_group_norm_module_is_nn_group_norm():
    """Same arguments, parameters, keys and eps as nn.GroupNorm; loads its state dict strictly."""
    ref = _affine(nn.GroupNorm(8, 256), seed=8)
    m = FastGroupNorm(8, 256)
    assert isinstance(m, nn.GroupNorm) and m.eps == ref.eps == 1e-5
    m.load_state_dict(ref.state_dict(), strict=True)
    x = _inputs((1, 256, 48, 48), seed=9)  # above the threshold: the var_mean path
    assert (m(x) - ref(x)).abs().max().item() <= 4e-6


def test_seg_head_state_dict_keys_unchanged():
    """The pixel decoder's norms are FastGroupNorm with nn.GroupNorm's keys: the keys of the head are
    those it had with nn.GroupNorm, and such a state dict loads strictly."""
    head = SegmentationHead(hidden_dim=32, num_heads=4)
    norms = head.pixel_decoder.norms
    assert len(norms) == 3 and all(type(n) is FastGroupNorm for n in norms)
    before = SegmentationHead(hidden_dim=32, num_heads=4)
    before.pixel_decoder.norms = nn.ModuleList(nn.GroupNorm(8, 32) for _ in range(3))
    for n in before.pixel_decoder.norms:
        _affine(n, seed=10)
    sd = before.state_dict()
    assert list(head.state_dict().keys()) == list(sd.keys())
    assert {f"pixel_decoder.norms.{i}.{p}" for i in range(3) for p in ("weight", "bias")} <= set(sd)
    head.load_state_dict(sd, strict=True)
    assert torch.equal(head.pixel_decoder.norms[1].weight, before.pixel_decoder.norms[1].weight)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    """Each path compiles with no graph break and gives the eager answer."""
    ln_small = _affine(LayerNorm2d(8), seed=11)
    ln_large = _affine(LayerNorm2d(128), seed=12)
    gn = _affine(FastGroupNorm(4, 16), seed=13)
    cases = [
        (ln_small, _inputs((2, 8, 5, 7), seed=14)),
        (ln_large, _inputs((1, 128, 3, 5), seed=15)),
        (gn, _inputs((2, 16, 6, 5), seed=16)),  # below the threshold: F.group_norm
        (lambda x: group_norm_fast(x * 1.0, 4, gn.weight, gn.bias, gn.eps, min_group_numel=0),
         _inputs((2, 16, 6, 5), seed=17)),
    ]
    torch._dynamo.reset()
    with torch.no_grad():
        for fn, x in cases:
            got = torch.compile(fn, fullgraph=True, backend=backend)(x)
            torch.testing.assert_close(got, fn(x), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(16, 4, 576, 576), (16, 16, 288, 288), (16, 64, 144, 144), (16, 256, 72, 72)])
def test_gpu_layer_norm2d_bf16_measured_shapes(shape):
    C = shape[1]
    m = _affine(LayerNorm2d(C), seed=C).to("cuda", torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(C)
    x = (3 * torch.randn(shape, generator=g, device="cuda") + 1).to(torch.bfloat16)
    with torch.no_grad():
        want = _ln2d_ref64(x, m.weight, m.bias, m.eps)
        got = m(x)
        err, err_old = _err(got, want), _err(layer_norm2d_channels_last(x, m.weight, m.bias, m.eps), want)
        assert err <= 2 * err_old + 1e-6, (err, err_old)
        assert _err(torch.compile(m, fullgraph=True)(x), want) <= 2 * err_old + 1e-6


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(1, 256, 144, 144), (1, 256, 288, 288)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gpu_group_norm_fast_bf16_seg_head_shapes(shape, layout):
    m = _affine(FastGroupNorm(8, 256), seed=1).to("cuda", torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(2)
    x = (3 * torch.randn(shape, generator=g, device="cuda") + 1).to(torch.bfloat16).contiguous(memory_format=layout)
    with torch.no_grad():
        want = _gn_ref64(x, 8, m.weight, m.bias, m.eps)
        err, err_old = _err(m(x), want), _err(F.group_norm(x, 8, m.weight, m.bias, m.eps), want)
        assert err <= 2 * err_old + 1e-6, (err, err_old)
        assert _err(torch.compile(m, fullgraph=True)(x), want) <= 2 * err_old + 1e-6
