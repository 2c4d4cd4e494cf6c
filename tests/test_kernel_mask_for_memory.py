"""The memory encoder's fused mask input (``sam3fast.kernels.mask_for_memory``): the Triton kernel and
the reference against a float64 spec written independently here (explicit interpolation matrices,
no F.interpolate), the documented equivalence of antialiased and plain bilinear upsampling, the
``sam3fast::mask_for_memory`` op (opcheck, torch.compile), its entry point, the model's
``encode_new_memory_from_low_res`` against ``encode_new_memory``, GPU-only checks at SAM 3 sizes
and the benchmark's --smoke run.

On CPU the launcher runs under ``TRITON_INTERPRET=1`` (set by conftest.py) on tiny odd shapes;
outputs are preallocated full of NaN so an unwritten element fails.

Binarised masks (``is_mask_from_pts``): a high-res logit within rounding of 0 may fall on either
side of the threshold depending on the order of float32 operations (the kernel's vs PyTorch's), so
those are compared against bounds: the float64 spec thresholded at +eps (fewest pixels on) and at
-eps (most pixels on), eps a rounding budget of the first stage. Every other pixel must match.
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

import sam3fast.model.memory as memory_mod
from kernel_checks import capture_graph, forced_backend_reason, run_compiled

from sam3fast.config import get_config
from sam3fast.kernels import mask_for_memory as mfm
from sam3fast.model.memory import MaskMemoryEncoder, encode_new_memory, encode_new_memory_from_low_res

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not mfm.HAS_TRITON, reason=f"triton not importable: {mfm.TRITON_IMPORT_ERROR}")

# sigmoid(-1024) = 1 / (1 + exp(1024)) = 1 / inf = 0 exactly, as intended; numpy (the interpreter) warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")


# ---- the float64 spec --------------------------------------------------------------------------


def interp_matrix(n_in, n_out, device="cpu"):
    """(n_out, n_in) float64 rows of bilinear weights, align_corners=False: sample i reads the source
    at s = (n_in / n_out)(i + 0.5) - 0.5 clamped to [0, n_in - 1], split between floor and ceil."""
    A = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        s = min(max((n_in / n_out) * (i + 0.5) - 0.5, 0.0), n_in - 1)
        i0 = math.floor(s)
        i1 = min(i0 + 1, n_in - 1)
        A[i, i0] += 1.0 - (s - i0)
        A[i, i1] += s - i0
    return A.to(device)


def spec64(low, high_size, out_size, scale, bias, binarize, threshold=0.0):
    """(out (B, C, Ho, Wo), high-res logits z (B, C, Hh, Wh)) in float64, the stages as matrix
    products; ``binarize`` counts z > threshold as on."""
    x = low.double()
    h, w = x.shape[-2:]
    dev = x.device
    z = interp_matrix(h, high_size[0], dev) @ x @ interp_matrix(w, high_size[1], dev).T
    f = (z > threshold).double() if binarize else torch.sigmoid(z)
    m = f * scale + bias
    if tuple(out_size) != tuple(high_size):
        m = interp_matrix(high_size[0], out_size[0], dev) @ m @ interp_matrix(high_size[1], out_size[1], dev).T
    return m, z


def binarized_bounds(low, high_size, out_size, scale, bias):
    """(lo, hi, exact): the spec with the threshold at +eps and -eps, and where the two agree; eps
    per plane, a float32 rounding budget of stage 1 (relative to the plane's largest logit)."""
    eps = 1e-5 * low.double().abs().amax(dim=(-2, -1), keepdim=True).clamp(min=1.0)
    lo, _ = spec64(low, high_size, out_size, scale, bias, True, threshold=eps)
    hi, _ = spec64(low, high_size, out_size, scale, bias, True, threshold=-eps)
    return lo, hi, lo == hi


def _logits(B, C, h, w, seed, dtype=torch.float32):
    """Random logits with an exact-zero row (z exactly 0 there: not > 0 in every implementation)
    and, with B > 1, an absent object (NO_OBJ_SCORE = -1024 everywhere, as the heads give it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, h, w, generator=g) * 4
    if h >= 3:
        x[0, 0, h // 2] = 0.0
    if B > 1:
        x[-1] = -1024.0
    return x.to(dtype)


def _run(low, high_size, out_size, binarize, out_dtype=torch.float32, scale=20.0, bias=-10.0, **launch):
    B, C = low.shape[:2]
    out = torch.full((B, C, *out_size), float("nan"), dtype=out_dtype)
    got = mfm._mask_for_memory_triton(low, high_size, out_size, scale, bias, binarize, out_dtype, out=out, **launch)
    assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(got).any(), "NaN in the output (an unwritten element?)"
    return got


# (B, C, (h, w), (Hh, Wh), (Ho, Wo))
CASES = {
    "5x7_13x11_17x19": (1, 1, (5, 7), (13, 11), (17, 19)),
    "6x6_21x21_24x24_B3": (3, 1, (6, 6), (21, 21), (24, 24)),
    "stage1_identity_4x3_9x5_B2": (2, 1, (4, 3), (4, 3), (9, 5)),
    "stage1_down_stage2_identity_C2": (1, 2, (7, 5), (6, 4), (6, 4)),
    "1x1_3x2_5x2": (2, 1, (1, 1), (3, 2), (5, 2)),
}
LAUNCH = {"default": {}, "small_tiles": dict(block_h=4, block_w=8, num_warps=2)}


@needs_triton
@pytest.mark.parametrize("launch", list(LAUNCH), ids=list(LAUNCH))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_sigmoid_matches_float64(case, launch):
    B, C, low_hw, high, out = CASES[case]
    low = _logits(B, C, *low_hw, seed=len(case))
    want, _ = spec64(low, high, out, 20.0, -10.0, False)
    got = _run(low, high, out, False, **LAUNCH[launch])
    err = (got.double() - want).abs().max().item()
    assert err <= 5e-5, f"max abs error {err:.3g}"  # |m| <= 10: a few float32 ulps through two stages
    if B > 1:  # an absent object: sigmoid(-1024) = 0 exactly, every pixel the bias (up to l0 + l1 != 1)
        assert (got[-1] + 10.0).abs().max().item() <= 1e-5
    # The reference (the CPU kernel) against the same spec, in float32 and in float64.
    ref = mfm.mask_for_memory_ref(low, high, out, 20.0, -10.0, False, torch.float32)
    assert (ref.double() - want).abs().max().item() <= 5e-5
    ref64 = mfm.mask_for_memory_ref(low.double(), high, out, 20.0, -10.0, False, torch.float64)
    assert (ref64 - want).abs().max().item() <= 1e-12


@needs_triton
@pytest.mark.parametrize("launch", list(LAUNCH), ids=list(LAUNCH))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_binarize_matches_float64(case, launch):
    B, C, low_hw, high, out = CASES[case]
    low = _logits(B, C, *low_hw, seed=len(case) + 100)
    lo, hi, exact = binarized_bounds(low, high, out, 20.0, -10.0)
    # The bounds pin most pixels (the test can fail); those left are the band of the exact-zero row,
    # where z is 0 up to how float32 rounds the source coordinate: either side is right there.
    assert exact.double().mean() > 0.7
    for got in (_run(low, high, out, True, **LAUNCH[launch]),
                mfm.mask_for_memory_ref(low, high, out, 20.0, -10.0, True, torch.float32)):
        g = got.double()
        assert (g[exact] - lo[exact]).abs().max().item() <= 5e-5
        assert (g >= lo - 5e-5).all() and (g <= hi + 5e-5).all()
    # The exact-zero row upsamples to z = 0 exactly: off, as (z > 0) is in the model.
    z0 = torch.zeros(1, 1, *low_hw)
    assert (_run(z0, high, out, True, **LAUNCH[launch]) + 10.0).abs().max().item() <= 1e-5
    assert (_run(z0, high, out, False, **LAUNCH[launch]) == 0.0).all()  # sigmoid(0) * 20 - 10


@needs_triton
@pytest.mark.parametrize("binarize", [False, True])
def test_kernel_scale_bias_and_16bit(binarize):
    """Another affine; bf16 logits in; bf16 and fp16 out: error vs the float64 spec at most 2x that
    of the model's PyTorch path in the same dtype (which rounds at every step)."""
    low = _logits(3, 1, 6, 6, seed=7, dtype=torch.bfloat16)
    high, out = (21, 21), (24, 24)
    if not binarize:
        want, _ = spec64(low, high, out, 3.0, 0.5, False)
        assert (_run(low, high, out, False, scale=3.0, bias=0.5).double() - want).abs().max().item() <= 1e-5
    want, _ = spec64(low, high, out, 20.0, -10.0, binarize)
    if binarize:
        _, _, exact = binarized_bounds(low, high, out, 20.0, -10.0)
    else:
        exact = torch.ones_like(want, dtype=torch.bool)
    for dt in (torch.bfloat16, torch.float16):
        got = _run(low, high, out, binarize, out_dtype=dt)
        assert got.dtype == dt
        torch_err = (mfm.mask_for_memory_ref(low, high, out, 20.0, -10.0, binarize, dt).double() - want)[exact]
        err = (got.double() - want)[exact].abs().max().item()
        # One rounding of |m| <= 10 to the output dtype: half an ulp at 8..16, a whole one for bf16
        # under the interpreter, which truncates float32 -> bf16 (a GPU rounds to nearest even).
        ulp = 2 ** -4 if dt == torch.bfloat16 else 2 ** -7
        one_rounding = ulp if dt == torch.bfloat16 and INTERPRETED else ulp / 2
        assert err <= max(2 * torch_err.abs().max().item(), one_rounding)


def test_antialias_upsampling_is_plain_bilinear():
    """The documented identity: F.interpolate(antialias=True) upsampling (and n_out == n_in) equals
    plain bilinear, align_corners=False, at every pixel including both borders; in float64 up to
    ~1e-15 of the values, and both equal the explicit spec."""
    g = torch.Generator().manual_seed(0)
    for (h, w), (H, W) in [((13, 11), (17, 19)), ((21, 21), (24, 24)), ((5, 7), (5, 9)), ((1, 4), (3, 9)),
                           ((3, 3), (7, 3)), ((126, 126), (144, 144))]:  # 126 -> 144 = 1008 -> 1152 / 8
        x = torch.randn(2, 1, h, w, generator=g, dtype=torch.float64) * 10
        aa = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False, antialias=True)
        plain = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        spec = interp_matrix(h, H) @ x @ interp_matrix(w, W).T
        tol = 1e-14 * x.abs().max().item()
        assert (aa - plain).abs().max().item() <= tol
        assert (plain - spec).abs().max().item() <= tol
    # ... and not when downsampling, which is why the op refuses out_size < high_size.
    x = torch.randn(1, 1, 9, 9, generator=g, dtype=torch.float64)
    aa = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False, antialias=True)
    assert (aa - F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)).abs().max() > 1e-3


def test_reference_is_the_model_composition():
    """The reference is what encode_new_memory hands the mask downsampler's convs, from the heads'
    upsample: sigmoid and binarised, float32 and bf16 model dtypes, bit for bit."""
    low = _logits(2, 1, 6, 6, seed=3)
    high, s = (21, 21), 24
    ds = memory_mod.MaskDownSampler(4, s)
    seen = []
    ds.encoder = torch.nn.Sequential(torch.nn.Identity())
    ds.encoder[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))  # the first conv's input
    for dt in (torch.float32, torch.bfloat16):
        for binarize in (False, True):
            zh = F.interpolate(low, size=high, mode="bilinear", align_corners=False).to(dt)
            m = (zh > 0).to(dt) if binarize else torch.sigmoid(zh)
            ds(m * 20.0 + -10.0)
            ref = mfm.mask_for_memory_ref(low, high, (s, s), 20.0, -10.0, binarize, dt)
            assert ref.dtype == seen[-1].dtype == dt
            assert torch.equal(ref, seen[-1])


def test_bad_inputs():
    low = _logits(1, 1, 5, 7, seed=0)
    ref = mfm.mask_for_memory_ref
    with pytest.raises(ValueError, match="low_res must be"):
        ref(low[0], (13, 11), (17, 19), 20.0, -10.0, False, torch.float32)
    with pytest.raises(ValueError, match="low_res must be"):
        ref(low.int(), (13, 11), (17, 19), 20.0, -10.0, False, torch.float32)
    with pytest.raises(ValueError, match="must be >= high_size"):
        ref(low, (13, 11), (12, 19), 20.0, -10.0, False, torch.float32)
    with pytest.raises(ValueError, match="high_size must be"):
        ref(low, (13,), (17, 19), 20.0, -10.0, False, torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        ref(low, (13, 11), (17, 19), 20.0, -10.0, False, torch.int32)
    if mfm.HAS_TRITON:
        tri = mfm._mask_for_memory_triton
        with pytest.raises(ValueError, match="float32/bfloat16/float16"):
            tri(low.double(), (13, 11), (17, 19), 20.0, -10.0, False, torch.float32)
        with pytest.raises(ValueError, match="float32/bfloat16/float16"):
            tri(low, (13, 11), (17, 19), 20.0, -10.0, False, torch.float64)
        with pytest.raises(ValueError, match="out must be"):
            tri(low, (13, 11), (17, 19), 20.0, -10.0, False, torch.float32, out=torch.empty(1, 1, 17, 18))
        with pytest.raises(ValueError, match="block_w"):
            tri(low, (13, 11), (17, 19), 20.0, -10.0, False, torch.float32, block_w=24)


def test_empty_batch():
    low = torch.zeros(0, 1, 5, 7)
    assert mfm.mask_for_memory_ref(low, (13, 11), (17, 19), 20.0, -10.0, False, torch.float32).shape == (0, 1, 17, 19)
    if mfm.HAS_TRITON:
        got = mfm._mask_for_memory_triton(low, (13, 11), (17, 19), 20.0, -10.0, False, torch.float32)
        assert got.shape == (0, 1, 17, 19)


# ---- the op and its entry point ----------------------------------------------------------------


def _op_args(binarize=False, out_dtype=torch.float32):
    return (_logits(2, 1, 5, 7, seed=9), [13, 11], [17, 19], 20.0, -10.0, binarize, out_dtype)


@pytest.mark.parametrize("binarize, out_dtype", [(False, torch.float32), (True, torch.float32),
                                                 (False, torch.bfloat16)])
def test_opcheck(binarize, out_dtype):
    torch.library.opcheck(torch.ops.sam3fast.mask_for_memory.default, _op_args(binarize, out_dtype))


def test_op_cpu_is_reference():
    args = _op_args(True)
    assert torch.equal(torch.ops.sam3fast.mask_for_memory(*args), mfm.mask_for_memory_ref(*args))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    """A caller of the op and one of the entry point compile with no graph break."""
    low = _op_args()[0]

    def via_op(x):
        return torch.ops.sam3fast.mask_for_memory(x * 2.0, [13, 11], [17, 19], 20.0, -10.0, False, torch.float32) + 1.0

    def via_entry(x):
        return mfm.mask_for_memory(x - 0.5, (13, 11), (17, 19), binarize=True, out_dtype=torch.bfloat16) * 2.0

    torch._dynamo.reset()
    for fn in (via_op, via_entry):
        got = torch.compile(fn, fullgraph=True, backend=backend)(low)
        torch.testing.assert_close(got, fn(low), rtol=0, atol=0)


def test_entry_point_backend_cpu():
    low = _op_args()[0]
    backend, why = mfm.mask_for_memory_backend(low)
    assert backend == "reference" and "cpu" in why
    got = mfm.mask_for_memory(low, (13, 11), (17, 19), binarize=True)
    assert torch.equal(got, mfm.mask_for_memory_ref(low, (13, 11), (17, 19), 20.0, -10.0, True, torch.float32))


def test_force_reference_env():
    reason = forced_backend_reason("mask_for_memory", "mask_for_memory_backend(torch.zeros(1, 1, 4, 4))")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


@needs_triton
def test_kernel_compiles_for_sm90():
    """The real (not interpreted) Triton compiler builds the kernel for an H100 without a GPU, both
    modes, float32 logits in and bf16 out, the launcher's default tile."""
    code = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from sam3fast.kernels import mask_for_memory as mfm
        bh, bw, nw = mfm.DEFAULT_TILE
        sig = {"low_ptr": "*fp32", "out_ptr": "*bf16"}
        sig.update({n: "i32" for n in "h w Hh Wh Ho Wo tiles_h tiles_w".split()})
        sig.update({n: "fp32" for n in "scale1_h scale1_w scale2_h scale2_w scale bias".split()})
        for binarize in (False, True):
            cx = dict(BINARIZE=binarize, BLOCK_H=bh, BLOCK_W=bw)
            triton.compile(triton.compiler.ASTSource(fn=mfm._mask_for_memory_kernel,
                                                     signature=dict(sig, **{n: "constexpr" for n in cx}),
                                                     constexprs=cx),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})
        print("ok")
        """
    )
    run_compiled(code)


# ---- the model function ------------------------------------------------------------------------


def _tiny_memory_inputs(seed=0, B=3):
    cfg = get_config("tiny")
    torch.manual_seed(seed)
    enc = MaskMemoryEncoder.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    r, R = 4 * cfg.feat_size, cfg.resolution  # 32 -> 112 -> mem_interpol_size 128
    coarse = torch.randn(B, 1, r // 8, r // 8, generator=g) * 6
    low = F.interpolate(coarse, size=(r, r), mode="bilinear", align_corners=False)  # blobs, not speckle
    low[-1] = -1024.0  # an absent object, as the heads give it
    pix = torch.randn(B, cfg.d_model, cfg.feat_size, cfg.feat_size, generator=g)
    obj = torch.tensor([[2.0], [0.0], [-3.0]])[:B]
    no_obj = torch.randn(1, cfg.tracker.mem_dim, generator=g)
    return enc, pix, low, (R, R), obj, no_obj


@pytest.mark.parametrize("is_mask_from_pts", [False, True])
def test_encode_from_low_res_cpu_is_encode_new_memory(is_mask_from_pts):
    """On CPU (and with use_kernel=False) the function is encode_new_memory on the heads' upsample,
    bit for bit; with the op forced (its CPU kernel: the reference) too."""
    enc, pix, low, high, obj, no_obj = _tiny_memory_inputs()
    with torch.no_grad():
        up = F.interpolate(low, size=high, mode="bilinear", align_corners=False)
        want = encode_new_memory(enc, pix, up, obj, no_obj, is_mask_from_pts)
        assert want[0].float().std() > 1e-2
        for use_kernel in (True, False):
            got = encode_new_memory_from_low_res(enc, pix, low, high, obj, no_obj, is_mask_from_pts,
                                                 use_kernel=use_kernel)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memory_mod, "mask_for_memory_backend", lambda *a: ("triton", "forced by the test"))
        mp.setattr(memory_mod, "mask_for_memory", lambda x, hs, os_, **kw: torch.ops.sam3fast.mask_for_memory(
            x, list(hs), list(os_), kw["scale"], kw["bias"], kw["binarize"], kw["out_dtype"]))
        with torch.no_grad():
            got = encode_new_memory_from_low_res(enc, pix, low, high, obj, no_obj, is_mask_from_pts)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_triton
@pytest.mark.parametrize("is_mask_from_pts", [False, True])
def test_encode_from_low_res_kernel_path(is_mask_from_pts):
    """The kernel path (the Triton launcher under the interpreter standing in for the CUDA op)
    against the PyTorch path, float32: the downsampler input differs by float32 rounding only."""
    enc, pix, low, high, obj, no_obj = _tiny_memory_inputs(seed=4)
    calls = []

    def launcher(x, hs, os_, *, scale, bias, binarize, out_dtype):
        calls.append((tuple(hs), tuple(os_), binarize, out_dtype))
        return mfm._mask_for_memory_triton(x, hs, os_, scale, bias, binarize, out_dtype)

    with torch.no_grad():
        want = encode_new_memory_from_low_res(enc, pix, low, high, obj, no_obj, is_mask_from_pts, use_kernel=False)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(memory_mod, "mask_for_memory_backend", lambda *a: ("triton", "forced by the test"))
            mp.setattr(memory_mod, "mask_for_memory", launcher)
            got = encode_new_memory_from_low_res(enc, pix, low, high, obj, no_obj, is_mask_from_pts)
    assert calls == [((112, 112), (128, 128), is_mask_from_pts, torch.float32)]
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(got[1], want[1])


def test_encode_from_low_res_compiles_fullgraph():
    """The kernel path (the op, forced; its CPU kernel runs) traces with no graph break."""
    enc, pix, low, high, obj, no_obj = _tiny_memory_inputs(B=2)

    def step(pix, low, obj):
        return encode_new_memory_from_low_res(enc, pix, low, high, obj, no_obj, False)[0]

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(memory_mod, "mask_for_memory_backend", lambda *a: ("triton", "forced by the test"))
        mp.setattr(memory_mod, "mask_for_memory", lambda x, hs, os_, **kw: torch.ops.sam3fast.mask_for_memory(
            x, list(hs), list(os_), kw["scale"], kw["bias"], kw["binarize"], kw["out_dtype"]))
        torch._dynamo.reset()
        got = torch.compile(step, fullgraph=True, backend="eager")(pix, low, obj)
        torch.testing.assert_close(got, step(pix, low, obj), rtol=0, atol=0)


# ---- benchmark --------------------------------------------------------------------------------


def test_bench_smoke(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_mask_for_memory.py", "--smoke"])
    runpy.run_path(os.path.join(BENCH, "bench_mask_for_memory.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "mask_for_memory benchmark" in out and "triton" in out and "eager" in out


# ---- GPU only --------------------------------------------------------------------------------


def _gpu_logits(B, seed):
    """(B, 1, 288, 288) float32 blob logits on the GPU, one absent object (-1024)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    coarse = torch.randn(B, 1, 18, 18, device="cuda", generator=g) * 8
    low = F.interpolate(coarse, size=(288, 288), mode="bilinear", align_corners=False)
    low = low + 0.5 * torch.randn(low.shape, device="cuda", generator=g)
    low[-1] = -1024.0
    return low


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("binarize", [False, True], ids=["sigmoid", "binarize"])
def test_gpu_real_shape(dtype, binarize):
    """SAM 3 sizes (288 -> 1008 -> 1152, B = 16) through the op: error vs the float64 spec at most
    2x that of the model's PyTorch path in the same dtype (fp32: or 1e-5); binarised pixels within
    rounding of the threshold only within the bounds."""
    low = _gpu_logits(16, seed=int(binarize))
    high, out = (1008, 1008), (1152, 1152)
    assert mfm.mask_for_memory_backend(low, dtype)[0] == "triton"
    got = mfm.mask_for_memory(low, high, out, binarize=binarize, out_dtype=dtype)
    assert got.shape == (16, 1, 1152, 1152) and got.dtype == dtype and torch.isfinite(got).all()
    if binarize:
        want, hi, exact = binarized_bounds(low, high, out, 20.0, -10.0)
        assert exact.double().mean() > 0.99
        slack = 0.04 if dtype == torch.bfloat16 else 1e-5  # one rounding to the output dtype
        assert (got.double() >= want - slack).all() and (got.double() <= hi + slack).all()
    else:
        want, _ = spec64(low, high, out, 20.0, -10.0, False)
        exact = torch.ones_like(want, dtype=torch.bool)
    torch_err = (mfm.mask_for_memory_ref(low, high, out, 20.0, -10.0, binarize, dtype).double() - want)[exact]
    err = (got.double() - want)[exact].abs().max().item()
    floor = 1e-5 if dtype == torch.float32 else 0.0
    assert err <= max(2 * torch_err.abs().max().item(), floor), (err, torch_err.abs().max().item())
    assert (got[-1].float() + 10.0).abs().max().item() <= 1e-5  # absent object: the bias (l0 + l1 = 1 +- ulp)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_cuda_graph_replay():
    """The op captured in a CUDA graph replays on new inputs (no host sync, no allocation by the
    launcher outside the graph pool) and gives what an eager call gives."""
    low = _gpu_logits(16, seed=3)
    static = low.clone()

    def call():
        return torch.ops.sam3fast.mask_for_memory(static, [1008, 1008], [1152, 1152], 20.0, -10.0, False,
                                                  torch.bfloat16)

    graph, out = capture_graph(call)
    for seed in (4, 5):
        static.copy_(_gpu_logits(16, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, call())


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_encode_from_low_res_uses_kernel(dtype):
    """SAM 3 sizes, random weights: the model function with the kernel against its PyTorch path."""
    cfg = get_config("sam3")
    torch.manual_seed(0)
    enc = MaskMemoryEncoder.from_config(cfg).cuda().to(dtype).eval()
    B = 4
    low = _gpu_logits(B, seed=6)
    pix = torch.randn(B, cfg.d_model, cfg.feat_size, cfg.feat_size, device="cuda", dtype=dtype)
    obj = torch.tensor([[2.0], [1.0], [-1.0], [-5.0]], device="cuda")
    no_obj = torch.randn(1, cfg.tracker.mem_dim, device="cuda", dtype=dtype)
    high = (cfg.resolution, cfg.resolution)
    with torch.no_grad():
        for pts in (False, True):
            got = encode_new_memory_from_low_res(enc, pix, low, high, obj, no_obj, pts)
            ref = encode_new_memory_from_low_res(enc, pix, low, high, obj, no_obj, pts, use_kernel=False)
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            assert torch.isfinite(got[0]).all()
            assert ((got[0].float() - ref[0].float()).norm() / ref[0].float().norm()).item() < tol
