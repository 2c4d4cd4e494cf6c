"""The ViT's 2-D axial RoPE kernel (``sam3fast.kernels.rope``) against a float64 spec written
independently here (complex128 products), the op's reference against the model's ``apply_rope``, the
``sam3fast::rope`` op (opcheck, torch.compile) and its entry point, and the ViT ``Attention``'s kernel
path against its PyTorch path.

On CPU the Triton launcher runs under ``TRITON_INTERPRET=1`` (set by conftest.py) on tiny odd shapes:
3 x 3 and 4 x 5 grids, hd 16 / 32 / 64 and a non-power-of-two 24, 0-3 head dims, strided views
(``qkv[:, :, :2]`` of a (B, L, 3, H, hd) projection, head dims that do not merge, a non-contiguous
last dim); outputs are preallocated full of NaN so an unwritten element fails.

The rule for the kernel, in every dtype: bit-identical to ``rope_ref`` (and so to ``apply_rope``),
NaN positions included. The kernel does the reference's float32 operations in the reference's order
(x0 cos, x1 sin, their difference; x0 sin, x1 cos, their sum, each rounded) and rounds once to the
output dtype, round-to-nearest-even; it is launched with ``enable_fp_fusion=False``, so no product is
contracted into an FMA (the sm_90 build check below reads the PTX for that), and there is nothing
left to differ. Without that flag the compiler contracts x0 cos - x1 sin into fma(x0, cos, -x1 sin),
one product left unrounded, which moves a bf16 result by an ulp on a small fraction of elements (by
more, relative to the result, under cancellation): the tests would then have to allow that, and
they do not. Both are also checked against the float64
spec, within the rounding of a float32 computation plus half an ulp of the output dtype.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from kernel_checks import SM90_BUILD, capture_graph, forced_backend_reason, run_compiled

from sam3fast.kernels import rope as rp
from sam3fast.model import vit as vit_mod
from sam3fast.model.vit import Attention, ViT, apply_rope, compute_axial_cis

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not rp.HAS_TRITON, reason=f"triton not importable: {rp.TRITON_IMPORT_ERROR}")

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
             torch.float64: torch.int64}


def naive64(x, freqs_cis):
    """The spec in float64: channel pairs as complex numbers times the table row of their token."""
    L, hd = x.shape[1], x.shape[-1]
    cis = freqs_cis.to(torch.complex128).reshape((L,) + (1,) * (x.dim() - 3) + (hd // 2,))
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], hd // 2, 2).contiguous())
    return torch.view_as_real(xc * cis).flatten(-2)


def assert_bitwise(got, want):
    """Same shape, dtype, NaN positions and bits elsewhere (-0.0 and +0.0 differ)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN positions differ"
    g, w = got.contiguous().view(_INT_VIEW[got.dtype]), want.contiguous().view(_INT_VIEW[want.dtype])
    diff = (g != w) & ~nan
    assert not diff.any(), f"{int(diff.sum())} of {got.numel()} elements differ in their bits"


def assert_near64(got, x, want64):
    """Within a float32 computation's rounding (products and sum, ~2 u32 (|x0| + |x1|) per pair, and
    the table's float32 rounding) plus half an ulp of the output dtype, of the float64 spec."""
    fi = torch.finfo(got.dtype)
    xe, xo = x.double().unflatten(-1, (-1, 2)).unbind(-1)
    pair = (xe.abs() + xo.abs()).repeat_interleave(2, dim=-1)
    bound = 4 * 2.0**-24 * pair + fi.eps / 2 * want64.abs() + fi.tiny * fi.eps
    assert not torch.isnan(got).any(), "NaN in the output (an unwritten element?)"
    excess = (got.double() - want64).abs() - bound
    assert excess.max() <= 0, f"error above the bound by {excess.max().item():.3g}"


def _case(B, grid, heads, hd, dtype, seed, layout="contiguous", random_table=False):
    """x (B, L, *heads, hd) in ``layout``, the complex table (L, hd/2)."""
    g = torch.Generator().manual_seed(seed)
    gx, gy = grid
    L = gx * gy
    if random_table:  # no axial structure, any angle (hd need not be a multiple of 4)
        ang = torch.rand(L, hd // 2, generator=g) * 2 * math.pi
        freqs = torch.polar(torch.ones_like(ang), ang)
    else:
        freqs = compute_axial_cis(hd, gx, gy)
    if layout == "qkv":  # q and k of a (B, L, 3, *heads[1:], hd) projection: heads[0] must be 2
        assert heads[0] == 2
        x = (3 * torch.randn(B, L, 3, *heads[1:], hd, generator=g)).to(dtype)[:, :, :2]
    elif layout == "unmerged":  # head dims in swapped memory order: they do not merge into one run
        x = (3 * torch.randn(B, L, *heads[::-1], hd, generator=g)).to(dtype).transpose(2, -2)
    elif layout == "stride2":  # last dim not contiguous: the launcher copies it
        x = (3 * torch.randn(B, L, *heads, hd, 2, generator=g)).to(dtype)[..., 0]
    else:
        x = (3 * torch.randn(B, L, *heads, hd, generator=g)).to(dtype)
    return x, freqs


def _run(x, freqs, **launch):
    out = torch.full(x.shape, float("nan"), dtype=x.dtype)
    got = rp._rope_triton(x, torch.view_as_real(freqs), out=out, **launch)
    assert got.data_ptr() == out.data_ptr()
    return got


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (B, grid, head dims, hd, layout)
CASES = {
    "qkv_3x3_h3_hd64": (2, (3, 3), (2, 3), 64, "qkv"),
    "qkv_4x5_h2_hd16": (1, (4, 5), (2, 2), 16, "qkv"),
    "one_head_dim_4x5_hd32": (3, (4, 5), (3,), 32, "contiguous"),
    "three_head_dims_3x3_hd16": (1, (3, 3), (2, 1, 3), 16, "contiguous"),
    "no_head_dim_3x3_hd32": (2, (3, 3), (), 32, "contiguous"),
    "unmerged_4x5_hd16": (2, (4, 5), (3, 2), 16, "unmerged"),
    "stride2_3x3_hd32": (1, (3, 3), (2, 3), 32, "stride2"),
}
LAUNCH = {"default": {}, "small_tiles": dict(block_l=2, block_r=2)}


@needs_triton
@pytest.mark.parametrize("launch", list(LAUNCH), ids=list(LAUNCH))
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_reference_bitwise(case, dtype, launch):
    B, grid, heads, hd, layout = CASES[case]
    dt = DTYPES[dtype]
    x, freqs = _case(B, grid, heads, hd, dt, seed=len(case) + 7 * len(dtype), layout=layout)
    ref = rp.rope_ref(x, torch.view_as_real(freqs))
    got = _run(x, freqs, **LAUNCH[launch])
    assert got.is_contiguous() and ref.is_contiguous()
    assert_bitwise(got, ref)
    assert_bitwise(ref, apply_rope(x, freqs))  # the reference is the model's apply_rope
    want = naive64(x, freqs)
    assert_near64(got, x, want)


@needs_triton
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_kernel_odd_head_dim_and_random_table(dtype):
    """hd 24 (12 pairs: a channel mask, BLOCK_J 16) and hd 6, a table of arbitrary angles."""
    dt = DTYPES[dtype]
    for hd, heads, launch in ((24, (2, 3), {}), (6, (5,), dict(block_l=4, block_r=4))):
        x, freqs = _case(2, (4, 5), heads, hd, dt, seed=hd, random_table=True)
        got = _run(x, freqs, **launch)
        assert_bitwise(got, rp.rope_ref(x, torch.view_as_real(freqs)))
        assert_near64(got, x, naive64(x, freqs))


@needs_triton
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_kernel_special_values_and_ties(dtype):
    """inf, NaN, 0 * inf, overflow past the dtype's largest value, and float32 results exactly halfway
    between two bf16 / fp16 values (round half to even, both ways): bit for bit as the reference."""
    dt = DTYPES[dtype]
    L = 6
    fi = torch.finfo(dt)
    half_ulp = fi.eps / 2  # of 1.0 in the output dtype
    # cos = 1 + half an ulp: 1.0 * cos is a tie that rounds down to 1.0 (even); 1 + 3 half ulps
    # rounds up from 1 + ulp (odd) to 1 + 2 ulp. sin 0 keeps the other channel out of it.
    cos = torch.tensor([1.0, 1 + half_ulp, 1 + 3 * half_ulp, 1 - half_ulp / 2, -1.0, 0.5, 1.0, 0.0])
    sin = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0])
    table = torch.stack((cos, sin), dim=-1).repeat(L, 1, 1)  # (L, 8, 2) float32
    x = torch.tensor([1.0, 0.0, fi.max, 0.0, -fi.max, 2.0, float("inf"), 1.0, float("nan"), 1.0,
                      float("-inf"), float("inf"), 0.0, float("inf"), -0.0, 0.0])
    x = torch.stack([x, x.flip(0), -x, x * 0.5, x.roll(3), x.roll(-5)])[None, :, None].to(dt)  # (1, L, 1, 16)
    out = torch.full(x.shape, float("nan"), dtype=dt)
    got = rp._rope_triton(x, table, out=out)
    ref = rp.rope_ref(x, table)
    assert_bitwise(got, ref)
    assert torch.isnan(ref).any() and torch.isinf(ref).any()
    if dt != torch.float32:  # the ties: 1 * (1 + half ulp) -> 1, and (1 + 3 half ulps) -> 1 + 2 ulp
        y = rp.rope_ref(torch.ones(1, 1, 1, 16, dtype=dt), table[:1])
        assert y[0, 0, 0, 2].item() == 1.0 and y[0, 0, 0, 4].item() == 1 + fi.eps * 2


@needs_triton
def test_kernel_empty_and_single_token():
    for shape in ((0, 9, 2, 16), (2, 9, 0, 16), (1, 1, 3, 16)):
        x = torch.randn(shape)
        freqs = compute_axial_cis(16, 1, 1) if shape[1] == 1 else compute_axial_cis(16, 3, 3)
        got = rp._rope_triton(x, torch.view_as_real(freqs))
        assert got.shape == x.shape
        assert_bitwise(got, rp.rope_ref(x, torch.view_as_real(freqs)))


@needs_triton
def test_launcher_turns_off_fp_fusion(monkeypatch):
    """The bit-exactness rule rests on the launch flag (the interpreter ignores it, so it is read
    off the launch itself): enable_fp_fusion=False, and bf16 rounded by hand only when interpreted."""
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.update(kwargs, grid=grid)
            return launch

    monkeypatch.setattr(rp, "_rope_kernel", Recorder())
    x, freqs = _case(9, (3, 3), (2, 3), 64, torch.bfloat16, seed=0, layout="qkv")
    rp._rope_triton(x, torch.view_as_real(freqs))
    assert seen["enable_fp_fusion"] is False
    assert seen["BF16_BY_HAND"] == rp._INTERPRETED
    assert seen["grid"] == (9 * 1, 1) and (seen["BLOCK_L"], seen["BLOCK_R"]) == rp.choose_tile(9, 6, 64)


def test_reference_float64_and_apply_rope():
    """float64 input: the reference rotates in float64 (the spec to float64 rounding); float32 /
    bf16 / fp16: the reference is apply_rope bit for bit, on strided views too."""
    x, freqs = _case(2, (4, 5), (2, 3), 32, torch.float64, seed=1, layout="qkv")
    got = rp.rope_ref(x, torch.view_as_real(freqs))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, naive64(x, freqs), rtol=0, atol=1e-12)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for layout in ("qkv", "unmerged", "contiguous"):
            heads = (2, 3) if layout != "unmerged" else (3, 2)
            x, freqs = _case(2, (3, 3), heads, 16, dt, seed=2, layout=layout)
            assert_bitwise(rp.rope_ref(x, torch.view_as_real(freqs)), apply_rope(x, freqs))


def test_bad_inputs():
    x, freqs = _case(2, (3, 3), (2, 3), 16, torch.float32, seed=0)
    rope = torch.view_as_real(freqs)
    with pytest.raises(ValueError, match="x must be"):
        rp.rope_ref(x[0, 0, 0], rope)
    with pytest.raises(ValueError, match="x must be"):
        rp.rope_ref(x.int(), rope)
    with pytest.raises(ValueError, match="even"):
        rp.rope_ref(x[..., :15], rope)
    with pytest.raises(ValueError, match="rope must be"):
        rp.rope_ref(x, freqs)  # the complex table itself: the op takes view_as_real
    with pytest.raises(ValueError, match="rope must be"):
        rp.rope_ref(x[:, :8], rope)  # L mismatch
    with pytest.raises(ValueError, match="rope must be"):
        rp.rope_ref(x, rope.half())
    if rp.HAS_TRITON:
        with pytest.raises(ValueError, match="float32/bfloat16/float16"):
            rp._rope_triton(x.double(), rope)
        with pytest.raises(ValueError, match="float32 rope table"):
            rp._rope_triton(x, rope.double())
        with pytest.raises(ValueError, match="block_l"):
            rp._rope_triton(x, rope, block_l=3)
        with pytest.raises(ValueError, match="out must be"):
            rp._rope_triton(x, rope, out=torch.empty(2, 9, 6, 16))


def test_choose_tile():
    assert rp.choose_tile(576, 32, 64) == (4, 32)  # SAM 3: 4 tokens x 32 rows x 64 channels
    assert rp.choose_tile(5184, 32, 64) == (4, 32)
    assert rp.choose_tile(9, 6, 16) == (16, 8)  # capped at next_pow2(L)
    assert rp.choose_tile(9, 1000, 64) == (2, 64)  # rows capped at 4096 elements
    assert rp.choose_tile(3, 2, 24) == (4, 2)


# ---- the op ------------------------------------------------------------------------------------


def _op_args(layout="qkv"):
    x, freqs = _case(2, (3, 3), (2, 3), 16, torch.float32, seed=9, layout=layout)
    return x, torch.view_as_real(freqs)


@pytest.mark.parametrize("layout", ["qkv", "contiguous"])
def test_opcheck(layout):
    torch.library.opcheck(torch.ops.sam3fast.rope.default, _op_args(layout))


def test_op_cpu_is_reference():
    args = _op_args()
    assert_bitwise(torch.ops.sam3fast.rope(*args), rp.rope_ref(*args))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    """A caller of the op and one of the entry point (complex table in) compile with no graph break."""
    x, rope = _op_args()
    freqs = torch.view_as_complex(rope.contiguous())

    def via_op(x):
        return torch.ops.sam3fast.rope(x * 2.0, rope) + 1.0

    def via_entry(qkv):
        return rp.rope(qkv[:, :, :2], freqs) * 2.0

    qkv = torch.randn(2, 9, 3, 3, 16)
    torch._dynamo.reset()
    for fn, arg in ((via_op, x), (via_entry, qkv)):
        got = torch.compile(fn, fullgraph=True, backend=backend)(arg)
        torch.testing.assert_close(got, fn(arg), rtol=0, atol=0)


def test_entry_point_backend_cpu():
    x, freqs = _case(2, (3, 3), (2, 3), 16, torch.bfloat16, seed=4, layout="qkv")
    backend, reason = rp.rope_backend(x)
    assert backend == "reference" and "cpu" in reason
    assert rp.rope_backend(x.double())[0] == "reference"
    assert_bitwise(rp.rope(x, freqs), apply_rope(x, freqs))
    assert_bitwise(rp.rope(x, torch.view_as_real(freqs)), apply_rope(x, freqs))  # the real table in


def test_force_reference_env():
    reason = forced_backend_reason("rope", "rope_backend(torch.zeros(1, 9, 2, 16))")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


@needs_triton
def test_kernel_compiles_for_sm90():
    """The real Triton compiler builds the kernel for an H100 without a GPU (bf16, hd 64, the default
    tile, arguments specialised as a launch on the ViT's qkv view specialises them): no FMA (the
    bit-exactness rule), 16-byte vector loads and stores, no shared memory; fp16 / fp32 and hd 16
    build too."""
    code = SM90_BUILD + textwrap.dedent(
        """
        from sam3fast.kernels import rope as rp
        fn = rp._rope_kernel
        div16 = [["tt.divisibility", 16]]
        attrs = {(fn.arg_names.index(n),): div16 for n in ("x_ptr", "rope_ptr", "out_ptr", "sxb", "sxl", "sxr")}
        for dt, hd in (("bf16", 64), ("fp16", 16), ("fp32", 64)):
            sig = {"x_ptr": "*" + dt, "rope_ptr": "*fp32", "out_ptr": "*" + dt,
                   **{n: i32 for n in "L R l_blocks sxb sxl sxr".split()}}
            bl, br = rp.choose_tile(576, 32, hd)
            cx = dict(HALF=hd // 2, BLOCK_L=bl, BLOCK_R=br, BLOCK_J=hd // 2, BF16_BY_HAND=False)
            sig.update({n: "constexpr" for n in cx})
            k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                               target=T, options={"num_warps": rp.DEFAULT_NUM_WARPS, "enable_fp_fusion": False})
            ptx = k.asm["ptx"]
            assert "fma" not in ptx and "mul.rn.f32" in ptx, dt
            assert "ld.global.v4" in ptx and "st.global.v4" in ptx, dt
            assert k.metadata.shared == 0 and "bar.sync" not in ptx, dt
            if dt == "bf16":
                assert "cvt.rn.bf16x2.f32" in ptx
        print("ok")
        """
    )
    run_compiled(code)


# ---- the ViT -----------------------------------------------------------------------------------


def _tiny_vit():
    """7 x 7 tokens: windows of 3 (padded to 9 x 9, L = 9) and a global block (L = 49), hd 16."""
    torch.manual_seed(0)
    return ViT(img_size=98, pretrain_img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4,
               window_size=3, global_att_blocks=(1,)).eval()


@needs_triton
@pytest.mark.filterwarnings("ignore:Casting complex values:UserWarning")  # .to(dtype): the tables stay complex
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vit_kernel_path_matches_pytorch_path(dtype, monkeypatch):
    """The trunk with the kernel path forced (backend "triton", the launcher under the interpreter)
    equals its PyTorch path (use_kernel = False) bit for bit; every block took the kernel, on the
    (B, L, 2, nH, hd) view of qkv."""
    m = _tiny_vit().to(dtype)
    x = torch.randn(1, 3, 98, 98, generator=torch.Generator().manual_seed(1)).to(dtype)
    for blk in m.blocks:
        blk.attn.use_kernel = False
    with torch.no_grad():
        want = m(x)

    calls = []

    def spy(qk, freqs_cis):
        calls.append((tuple(qk.shape), qk.is_contiguous()))
        return rp._rope_triton(qk, torch.view_as_real(freqs_cis))

    monkeypatch.setattr(vit_mod, "rope_backend", lambda x: ("triton", "forced by the test"))
    monkeypatch.setattr(vit_mod, "rope", spy)
    with torch.no_grad():
        assert_bitwise(m(x), want)  # use_kernel False: the PyTorch path whatever the backend says
        assert calls == []
        for blk in m.blocks:
            blk.attn.use_kernel = True
        got = m(x)
    assert calls == [((9, 9, 2, 4, 16), False), ((1, 49, 2, 4, 16), False)]
    assert_bitwise(got, want)


def test_vit_cpu_keeps_apply_rope(monkeypatch):
    """On CPU the attention never calls the rope op (CPU numbers unchanged), use_kernel True by
    default, and the state-dict keys do not change."""
    m = _tiny_vit()
    assert all(blk.attn.use_kernel for blk in m.blocks)

    def fail(*args):
        raise AssertionError("rope called on CPU")

    monkeypatch.setattr(vit_mod, "rope", fail)
    keys = set(m.state_dict())
    with torch.no_grad():
        m(torch.randn(1, 3, 98, 98))
    assert set(m.state_dict()) == keys


# ---- GPU only --------------------------------------------------------------------------------


def _gpu_qkv(B, side, dtype, seed, scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = (3 * torch.randn(B, side * side, 3, 16, 64, device="cuda", generator=g)).to(dtype)
    return qkv, compute_axial_cis(64, side, side, scale_pos=scale).cuda()


GPU_SHAPES = {"window_9x576": (9, 24, 1.0), "global_1x5184": (1, 72, 24 / 72)}


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_gpu_real_shapes(shape, dtype):
    """The ViT's shapes on qkv[:, :, :2]: the op equals apply_rope (the eager chain on the GPU) and
    the float32 reference rounded once, bit for bit, and is within the float64 spec's bound."""
    B, side, scale = GPU_SHAPES[shape]
    qkv, freqs = _gpu_qkv(B, side, dtype, seed=side, scale=scale)
    x = qkv[:, :, :2]
    assert rp.rope_backend(x)[0] == "triton"
    got = rp.rope(x, freqs)
    assert got.shape == x.shape and got.is_contiguous()
    assert_bitwise(got, apply_rope(x, freqs))
    ref32 = rp.rope_ref(x.float(), torch.view_as_real(freqs))  # float32 result, unrounded
    assert_bitwise(got, ref32.to(dtype))
    assert_bitwise(rp._rope_triton(x, torch.view_as_real(freqs), block_l=1, num_warps=8), got)
    sub = x[:, :64]  # the float64 spec on a slice (memory)
    assert_near64(got[:, :64], sub, naive64(sub, freqs[:64]))


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_cuda_graph_replay():
    qkv, freqs = _gpu_qkv(9, 24, torch.bfloat16, seed=3)
    static = qkv.clone()

    def fn():
        return rp.rope(static[:, :, :2], freqs)

    graph, out = capture_graph(fn)
    static.copy_(torch.randn_like(qkv, dtype=torch.float32).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert_bitwise(out, apply_rope(static[:, :, :2], freqs))


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("side, scale", [(24, 1.0), (72, 24 / 72)], ids=["window", "global"])
def test_gpu_attention_kernel_path(side, scale):
    """The ViT's Attention at SAM 3 width in bf16: use_kernel True (the op) and False (apply_rope)
    give the same output bit for bit (same q, k bits and layout into the same SDPA)."""
    torch.manual_seed(0)
    m = Attention(1024, 16, side, scale).cuda().to(torch.bfloat16)
    x = torch.randn(9 if side == 24 else 1, side * side, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        m.use_kernel = False
        want = m(x)
        m.use_kernel = True
        got = m(x)
    assert_bitwise(got, want)
