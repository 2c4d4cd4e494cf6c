"""The trunk's linears with their epilogues (``sam3fast.kernels.fused_linear``): the MLP's fc1 +
exact GELU and the attention's qkv + RoPE of q, k, each one GEMM, against float64 specs; the
``sam3fast::linear_gelu`` / ``linear_rope`` ops (opcheck, torch.compile), their entry points, and the
ViT's MLP with ``fused_gelu`` and attention with ``fused_rope`` on.

On CPU the Triton launcher runs under ``TRITON_INTERPRET=1`` (set by conftest.py) on small odd
shapes: M, N and K not multiples of the tiles (K also a multiple, the EVEN_K path), a 3-D input,
row-strided inputs; outputs are preallocated full of NaN so an unwritten element fails. float32 and
float16 only there: the Triton 3.7 interpreter computes ``tl.dot`` of bfloat16 tiles on their raw
bits (a 16 x 16 product comes out ~1e10 off), so bfloat16 is tested on the GPU.

The rule: within a float32 GEMM's rounding (K u32 |x| |w| per output) propagated through the GELU,
plus an ulp of the dtype for each of the two roundings (the linear's output, then the GELU's), of
the float64 spec of the same roundings; and at most 2x the error of ``F.gelu(F.linear(...))`` in
the dtype (plus a float32-level floor).
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import SM90_BUILD, capture_graph, forced_backend_reason, run_compiled

from sam3fast.kernels import fused_linear as lg
from sam3fast.model import vit as vit_mod
from sam3fast.model.vit import Attention, Mlp, compute_axial_cis

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not lg.HAS_TRITON, reason=f"triton not importable: {lg.TRITON_IMPORT_ERROR}")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # (bf16: the GPU tests, see the docstring)
# (x shape, N)
CASES = {"odd_2d": ((37, 40), 50), "even_k_3d": ((2, 9, 64), 72), "tiny": ((1, 16), 16)}
SMALL_TILE = dict(block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=2, group_m=2)


def _case(shape, N, dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    K = shape[-1]
    x = torch.randn(*shape[:-1], 2 * K if strided else K, generator=g)
    x = (x[..., ::2] if strided else x).to(dtype)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype)
    b = (0.5 * torch.randn(N, generator=g)).to(dtype)
    return x, w, b


def _gelu64(v):
    return 0.5 * v * (1 + torch.special.erf(v / math.sqrt(2)))


def spec64(x, w, b):
    """float64 linear, rounded to the dtype as the module rounds it, then the float64 GELU."""
    lin = (x.double() @ w.double().t() + b.double()).to(x.dtype)
    return _gelu64(lin.double()), x.double().abs() @ w.double().abs().t()


def _assert_within(got, want, bound, ref_in_dtype):
    """Every element within ``bound`` of the float64 ``want``, and the largest error at most 2x that
    of the module's PyTorch operations in the dtype (plus a float32-level floor)."""
    assert got.shape == want.shape and not torch.isnan(got).any(), "NaN in the output (an unwritten element?)"
    excess = (got.double() - want).abs() - bound
    assert excess.max() <= 0, f"error above the bound by {excess.max().item():.3g}"
    err = (got.double() - want).abs().max().item()
    ref_err = (ref_in_dtype.double() - want).abs().max().item()
    assert err <= 2 * ref_err + 1e-5, (err, ref_err)


def _check(got, x, w, b, ref_in_dtype):
    want, mag = spec64(x, w, b)
    eps = torch.finfo(got.dtype).eps
    K = x.shape[-1]
    # the GELU's slope is within [-0.17, 1.13]: an input error e moves the output by <= 1.13 e; the
    # linear's rounding may differ by an ulp when the accumulation order moves it across a tie
    lin_err = 4 * K * 2.0**-24 * mag + eps * (mag + b.double().abs())
    _assert_within(got, want, 1.13 * lin_err + eps * want.abs() + 1e-6, ref_in_dtype)


@needs_triton
@pytest.mark.parametrize("tile", ["default", "small"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_against_spec(case, dtype, tile):
    shape, N = CASES[case]
    x, w, b = _case(shape, N, DTYPES[dtype], seed=N)
    out = torch.full(tuple(shape[:-1]) + (N,), float("nan"), dtype=x.dtype)
    got = lg._linear_gelu_triton(x, w, b, out=out, **(SMALL_TILE if tile == "small" else {}))
    assert got.data_ptr() == out.data_ptr()
    _check(got, x, w, b, lg.linear_gelu_ref(x, w, b))


@needs_triton
def test_kernel_strided_rows_and_k_zero():
    x, w, b = _case((5, 24), 20, torch.float32, seed=3, strided=True)  # last dim stride 2: copied
    _check(lg._linear_gelu_triton(x, w, b, **SMALL_TILE), x, w, b, lg.linear_gelu_ref(x, w, b))
    rows = torch.randn(7, 48)[:, :24]  # row stride 48, last dim contiguous: read in place
    _check(lg._linear_gelu_triton(rows, w, b, **SMALL_TILE), rows, w, b, lg.linear_gelu_ref(rows, w, b))
    empty = lg._linear_gelu_triton(torch.zeros(3, 0), torch.zeros(4, 0), b[:4])
    torch.testing.assert_close(empty, F.gelu(b[:4]).expand(3, 4))
    assert lg._linear_gelu_triton(torch.zeros(0, 24), w, b).shape == (0, 20)


def test_bad_inputs():
    x, w, b = _case((4, 16), 8, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"weight must be \(N, 16\)"):
        lg.linear_gelu_ref(x, w[:, :8], b)
    with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
        lg.linear_gelu_ref(x, w, b[:4])
    with pytest.raises(ValueError, match="share one dtype"):
        lg.linear_gelu_ref(x, w.double(), b)
    with pytest.raises(ValueError, match="x must be a floating"):
        lg.linear_gelu_ref(x.long(), w, b)
    if lg.HAS_TRITON:
        with pytest.raises(ValueError, match="block_k must be a power of two >= 16"):
            lg._linear_gelu_triton(x, w, b, block_k=8)
        with pytest.raises(ValueError, match="group_m must be >= 1"):
            lg._linear_gelu_triton(x, w, b, group_m=0)


def _op_args():
    return _case((6, 32), 24, torch.float32, seed=5)


def test_opcheck():
    torch.library.opcheck(torch.ops.sam3fast.linear_gelu.default, _op_args())


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    x, w, b = _op_args()

    def via_op(x):
        return torch.ops.sam3fast.linear_gelu(x * 2.0, w, b) + 1.0

    def via_entry(x):
        return lg.linear_gelu(x, w, b).sum()

    torch._dynamo.reset()
    for fn in (via_op, via_entry):
        got = torch.compile(fn, fullgraph=True, backend=backend)(x)
        torch.testing.assert_close(got, fn(x), rtol=0, atol=0)


def test_entry_point_backend_cpu():
    x, w, b = _op_args()
    backend, reason = lg.fused_linear_backend(x)
    assert backend == "reference" and "cpu" in reason
    assert torch.equal(lg.linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))


def test_force_reference_env():
    reason = forced_backend_reason("fused_linear", "fused_linear_backend(torch.zeros(2, 16))")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


@needs_triton
def test_kernel_compiles_for_sm90():
    """The real Triton compiler builds the launcher's launch at the trunk's fc1 (bf16, 5184 x 1024 ->
    4736, the default tile) for an H100 without a GPU: wgmma, software-pipelined loads (cp.async),
    no register spill; a K that the tile does not divide builds too (without cp.async: its rows are
    not 16-byte aligned)."""
    code = SM90_BUILD + textwrap.dedent(
        """
        import torch
        from sam3fast.kernels import fused_linear as lg
        from sam3fast.kernels._static_build import capture, sass_stats
        for K in (1024, 1000):
            x = torch.empty(1, 72, 72, K, dtype=torch.bfloat16)
            w = torch.empty(4736, K, dtype=torch.bfloat16)
            with capture(lg._fused_linear_kernel) as builds:
                lg._linear_gelu_triton(x, w, torch.empty(4736, dtype=torch.bfloat16))
            (b,) = builds
            st = sass_stats(b.kernel)
            assert st["wgmma"] > 0 and st["stack"] == 0 and st["spill_stores"] == 0, (K, st)
            # (rows of 1000 elements are not 16-byte aligned: no cp.async there, plain loads)
            assert (st["cp_async"] > 0) == (K == 1024), (K, st)
        print("ok")
        """
    )
    run_compiled(code)


# ---- qkv + RoPE (linear_rope) ------------------------------------------------------------------

# (B, L grid side x side, heads, hd, K)
ROPE_CASES = {"window_3x3_h2_hd16": (3, 3, 2, 16, 24), "grid_4x4_h1_hd32_k40": (1, 4, 1, 32, 40)}
ROPE_TILE = dict(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2, group_m=2)


def _rope_case(B, side, H, hd, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    C = H * hd
    x = torch.randn(B, side * side, K, generator=g).to(dtype)
    w = (torch.randn(3 * C, K, generator=g) / math.sqrt(K)).to(dtype)
    b = (0.5 * torch.randn(3 * C, generator=g)).to(dtype)
    return x, w, b, torch.view_as_real(compute_axial_cis(hd, side, side)).float()


def rope_spec64(x, w, b, rope, H):
    """float64 linear rounded to the dtype (the module's qkv output), then the float64 rotation of q, k."""
    B, L, _ = x.shape
    lin = (x.double() @ w.double().t() + b.double()).to(x.dtype).double().view(B, L, 3, H, -1)
    mag = (x.double().abs() @ w.double().abs().t() + b.double().abs()).view(B, L, 3, H, -1)
    cs = rope.double().view(L, 1, 1, -1, 2)
    ve, vo = lin[:, :, :2].unflatten(-1, (-1, 2)).unbind(-1)
    rot = torch.stack((ve * cs[..., 0] - vo * cs[..., 1], ve * cs[..., 1] + vo * cs[..., 0]), dim=-1).flatten(-2)
    pair = mag[:, :, :2].unflatten(-1, (-1, 2)).sum(-1).repeat_interleave(2, dim=-1)  # |v_e| + |v_o| bound
    return torch.cat((rot, lin[:, :, 2:]), dim=2), torch.cat((pair, mag[:, :, 2:]), dim=2), x.shape[-1]


def _check_rope(got, x, w, b, rope, H, ref_in_dtype):
    want, mag, K = rope_spec64(x, w, b, rope, H)
    eps = torch.finfo(got.dtype).eps
    # the linear (accumulation order: an ulp of the rounded value either way), the rotation's float32
    # products and sum, then half an ulp of the result
    bound = (4 * K * 2.0**-24 + eps) * mag + 4 * 2.0**-24 * mag + eps / 2 * want.abs() + 1e-6
    _assert_within(got, want, bound, ref_in_dtype)


@needs_triton
@pytest.mark.parametrize("tile", ["default", "small"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(ROPE_CASES), ids=list(ROPE_CASES))
def test_rope_kernel_against_spec(case, dtype, tile):
    B, side, H, hd, K = ROPE_CASES[case]
    x, w, b, rope = _rope_case(B, side, H, hd, K, DTYPES[dtype], seed=hd + K)
    C = H * hd
    launch = dict(ROPE_TILE) if tile == "small" else dict(block_n=min(128, C))
    out = torch.full((B, side * side, 3, H, hd), float("nan"), dtype=x.dtype)
    got = lg._linear_rope_triton(x, w, b, rope, H, out=out, **launch)
    assert got.data_ptr() == out.data_ptr()
    ref = lg.linear_rope_ref(x, w, b, rope, H)
    _check_rope(got, x, w, b, rope, H, ref)
    # v is the projection itself: the same value as the gelu-free linear's (up to accumulation order)
    torch.testing.assert_close(got[:, :, 2], ref[:, :, 2], rtol=2 * torch.finfo(x.dtype).eps, atol=1e-5)


def test_rope_reference_is_the_attention_ops():
    """The op's reference is the attention's own chain: the qkv linear, then rope_ref (bit-equal to
    apply_rope) of q, k."""
    x, w, b, rope = _rope_case(2, 3, 2, 16, 24, torch.float32, seed=1)
    qkv = F.linear(x, w, b).view(2, 9, 3, 2, 16)
    want = torch.cat((vit_mod.apply_rope(qkv[:, :, :2], compute_axial_cis(16, 3, 3)), qkv[:, :, 2:]), dim=2)
    assert torch.equal(lg.linear_rope_ref(x, w, b, rope, 2), want)


def test_rope_bad_inputs():
    x, w, b, rope = _rope_case(1, 3, 2, 16, 24, torch.float32, seed=2)
    with pytest.raises(ValueError, match="weight must have 3 C rows"):
        lg.linear_rope_ref(x, w[:-1], b[:-1], rope, 2)
    with pytest.raises(ValueError, match="weight must have 3 C rows"):
        lg.linear_rope_ref(x, w, b, rope, 5)
    with pytest.raises(ValueError, match=r"rope must be a float32 \(L=9, 8, 2\)"):
        lg.linear_rope_ref(x, w, b, rope[:4], 2)
    with pytest.raises(ValueError, match=r"x must be \(B, L, K\)"):
        lg.linear_rope_ref(x[0], w, b, rope, 2)
    if lg.HAS_TRITON:
        with pytest.raises(ValueError, match="block_n \\(64\\) must divide the attention width 32"):
            lg._linear_rope_triton(x, w, b, rope, 2, block_n=64)
        with pytest.raises(ValueError, match="epilogue must be 'gelu' or 'rope'"):
            lg._fused_linear_triton(x, w, b, "relu")


def test_rope_opcheck_and_entry_point():
    x, w, b, rope = _rope_case(2, 3, 2, 16, 24, torch.float32, seed=3)
    torch.library.opcheck(torch.ops.sam3fast.linear_rope.default, (x, w, b, rope, 2))
    freqs = compute_axial_cis(16, 3, 3)
    assert torch.equal(lg.linear_rope(x, w, b, freqs, 2), lg.linear_rope_ref(x, w, b, rope, 2))

    def fn(x):
        return lg.linear_rope(x, w, b, freqs, 2).sum()

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x), fn(x), rtol=0, atol=0)


@needs_triton
def test_rope_kernel_compiles_for_sm90():
    """The launcher's launches at the trunk's qkv (bf16, 1024 -> 3072, window 9 x 576 and global
    5184 tokens, the default tile) build for an H100 without a GPU: wgmma, cp.async, no spill."""
    code = SM90_BUILD + textwrap.dedent(
        """
        import torch
        from sam3fast.kernels import fused_linear as lg
        from sam3fast.kernels._static_build import capture, sass_stats
        from sam3fast.model.vit import compute_axial_cis
        for B, side in ((9, 24), (1, 72)):
            x = torch.empty(B, side * side, 1024, dtype=torch.bfloat16)
            rope = torch.view_as_real(compute_axial_cis(64, side, side)).float()
            with capture(lg._fused_linear_kernel) as builds:
                lg._linear_rope_triton(x, torch.empty(3072, 1024, dtype=torch.bfloat16),
                                       torch.empty(3072, dtype=torch.bfloat16), rope, 16)
            (b,) = builds
            st = sass_stats(b.kernel)
            assert st["wgmma"] > 0 and st["cp_async"] > 0, (side, st)
            assert st["stack"] == 0 and st["spill_stores"] == 0, (side, st)
        print("ok")
        """
    )
    run_compiled(code)


@needs_triton
@pytest.mark.filterwarnings("ignore:Casting complex values:UserWarning")  # .to(dtype): the tables stay complex
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_attention_fused_rope(dtype, monkeypatch):
    """The attention with ``fused_rope`` and the backend forced to "triton" (the launcher under the
    interpreter) calls the op with qkv's parameters and its table and matches the unfused attention;
    off (the default), or on CPU, the op is never called."""
    torch.manual_seed(0)
    m = Attention(32, 2, 3, 1.0).to(dtype)
    x = torch.randn(2, 9, 32).to(dtype)
    calls = []

    def spy(x, w, b, freqs, H):
        calls.append((tuple(x.shape), H))
        return lg._linear_rope_triton(x, w, b, torch.view_as_real(freqs).float(), H, **ROPE_TILE)

    monkeypatch.setattr(vit_mod, "linear_rope", spy)
    with torch.no_grad():
        assert not m.fused_rope
        want = m(x)
        m.fused_rope = True
        assert torch.equal(m(x), want) and calls == []  # CPU backend: the unfused path
        monkeypatch.setattr(vit_mod, "fused_linear_backend", lambda x: ("triton", "forced by the test"))
        got = m(x)
    assert calls == [((2, 9, 32), 2)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.01, atol=0.01)
    torch.testing.assert_close(got, want, **tol)


# ---- the ViT's MLP ---------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_mlp_fused_gelu(dtype, monkeypatch):
    """The MLP with ``fused_gelu`` and the backend forced to "triton" (the launcher under the
    interpreter) calls the op with fc1's parameters and matches the unfused MLP; off (the default),
    or on CPU, the op is never called."""
    torch.manual_seed(0)
    m = Mlp(40, 72).to(dtype)
    x = torch.randn(2, 3, 5, 40).to(dtype)
    calls = []

    def spy(x, w, b):
        calls.append(tuple(x.shape))
        return lg._linear_gelu_triton(x, w, b, **SMALL_TILE)

    monkeypatch.setattr(vit_mod, "linear_gelu", spy)
    with torch.no_grad():
        assert not m.fused_gelu
        want = m(x)
        m.fused_gelu = True
        assert torch.equal(m(x), want) and calls == []  # CPU backend: the unfused MLP
        monkeypatch.setattr(vit_mod, "fused_linear_backend", lambda x: ("triton", "forced by the test"))
        got = m(x)
    assert calls == [(2, 3, 5, 40)]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    torch.testing.assert_close(got, want, **tol)


def test_vit_fused_linear_switches():
    m = vit_mod.ViT(img_size=98, pretrain_img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4,
                    window_size=7, global_att_blocks=(1,))
    assert not m.fused_gelu and not m.fused_rope
    m.fused_gelu = True
    assert m.fused_gelu and all(blk.mlp.fused_gelu for blk in m.blocks) and not m.fused_rope
    m.fused_rope = True
    assert m.fused_rope and all(blk.attn.fused_rope for blk in m.blocks)


# ---- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_real_shape(dtype):
    """The trunk's fc1 (5184 x 1024 -> 4736): error against the float64 spec at most 2x that of
    F.gelu(F.linear(...)) in the dtype (on a slice of rows for the float64 product)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 72, 72, 1024, device="cuda", generator=g).to(dtype)
    w = (torch.randn(4736, 1024, device="cuda", generator=g) / 32).to(dtype)
    b = (0.5 * torch.randn(4736, device="cuda", generator=g)).to(dtype)
    assert lg.fused_linear_backend(x)[0] == "triton"
    got = lg.linear_gelu(x, w, b)
    ref = lg.linear_gelu_ref(x, w, b)
    rows = x[0, :4].reshape(-1, 1024)  # 288 tokens
    _check(got[0, :4].reshape(-1, 4736).cpu(), rows.cpu(), w.cpu(), b.cpu(), ref[0, :4].reshape(-1, 4736).cpu())


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_cuda_graph_replay():
    x = torch.randn(5184, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4736, 1024, device="cuda", dtype=torch.bfloat16) / 32
    b = torch.randn(4736, device="cuda", dtype=torch.bfloat16)
    graph, out = capture_graph(lambda: lg.linear_gelu(x, w, b))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, lg.linear_gelu_ref(x, w, b), rtol=0.02, atol=0.02)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.filterwarnings("ignore:Casting complex values:UserWarning")
@pytest.mark.parametrize("side, scale, B", [(24, 1.0, 9), (72, 24 / 72, 1)], ids=["window", "global"])
def test_gpu_attention_fused_rope(side, scale, B):
    """The trunk's attention at SAM 3 width in bf16: fused_rope on against off (cuBLAS + the rope
    kernel) within bf16 rounding, and the op's q, k, v against the float64 spec on a slice of tokens."""
    torch.manual_seed(0)
    m = Attention(1024, 16, side, scale).cuda().to(torch.bfloat16)
    x = torch.randn(B, side * side, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = m(x)
        m.fused_rope = True
        got = m(x)
        rope = torch.view_as_real(m.freqs_cis).float()
        qkv = lg.linear_rope(x, m.qkv.weight, m.qkv.bias, m.freqs_cis, 16)
        ref = lg.linear_rope_ref(x, m.qkv.weight, m.qkv.bias, rope, 16)
    torch.testing.assert_close(got, want, rtol=0.03, atol=0.03)
    sub = slice(0, 1)
    _check_rope(qkv[sub].cpu(), x[sub].cpu(), m.qkv.weight.cpu(), m.qkv.bias.cpu(), rope.cpu(), 16, ref[sub].cpu())


def _force_trunk_ops(monkeypatch, residual_norm, linear_rope, linear_gelu):
    """The ViT's fused-op backends forced to "triton" and its three fused ops replaced."""
    forced = lambda x: ("triton", "forced by the test")  # noqa: E731
    for name, fn in (("residual_norm_backend", forced), ("fused_linear_backend", forced),
                     ("residual_norm", residual_norm), ("linear_rope", linear_rope), ("linear_gelu", linear_gelu)):
        monkeypatch.setattr(vit_mod, name, fn)


@needs_triton
def test_vit_trunk_with_every_kernel_forced(monkeypatch):
    """The trunk with the fused residual chain, qkv + RoPE and fc1 + GELU all forced to their
    launchers (float32, under the interpreter) equals the block-by-block PyTorch trunk to float32
    rounding: the three compose (window orders, the strided q, k, v views, the MLP's input)."""
    from sam3fast.kernels import residual_norm as rn

    torch.manual_seed(0)
    m = vit_mod.ViT(img_size=84, pretrain_img_size=56, patch_size=14, embed_dim=32, depth=3, num_heads=2,
                    window_size=3, global_att_blocks=(1, 2)).eval()
    x = torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = m(x)
    used = set()

    def rn_spy(*a):
        used.add("residual_norm")
        return rn._residual_norm_triton(*a)

    def rope_spy(x, w, b, freqs, H):
        used.add("linear_rope")
        return lg._linear_rope_triton(x, w, b, torch.view_as_real(freqs).float(), H, **ROPE_TILE)

    def gelu_spy(x, w, b):
        used.add("linear_gelu")
        return lg._linear_gelu_triton(x, w, b, **SMALL_TILE)

    _force_trunk_ops(monkeypatch, rn_spy, rope_spy, gelu_spy)
    m.fused_rope = m.fused_gelu = True
    with torch.no_grad():
        got = m(x)
    assert used == {"residual_norm", "linear_rope", "linear_gelu"}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_rope_cuda_graph_replay():
    x = torch.randn(9, 576, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3072, 1024, device="cuda", dtype=torch.bfloat16) / 32
    b = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
    freqs = compute_axial_cis(64, 24, 24).cuda()
    graph, out = capture_graph(lambda: lg.linear_rope(x, w, b, freqs, 16))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, lg.linear_rope_ref(x, w, b, torch.view_as_real(freqs).float(), 16),
                               rtol=0.02, atol=0.02)


def test_vit_autocast_keeps_the_module_path(monkeypatch):
    """Under autocast (mixed dtypes: the norms in float32, the linears in bf16) none of the fused
    trunk ops is called, even with their backends forced: the module's own operations run, as the
    official's do under its bf16 autocast (the fused ops take one dtype)."""
    def fail(*args, **kwargs):
        raise AssertionError("a fused trunk op was called under autocast")

    _force_trunk_ops(monkeypatch, fail, fail, fail)
    torch.manual_seed(0)
    m = vit_mod.ViT(img_size=84, pretrain_img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2,
                    window_size=3, global_att_blocks=(1,)).eval()
    m.fused_rope = m.fused_gelu = True
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(1, 3, 84, 84))
    assert out.shape == (1, 32, 6, 6)
    with pytest.raises(AssertionError, match="under autocast"), torch.no_grad():
        m(torch.randn(1, 3, 84, 84))  # (outside autocast the forced backends do reach the ops)
