"""The boxRPB attention kernel (``sam3fast.kernels.rpb_attention``) against a float64 reference
written independently here (the bias built cell by cell from (y, x) grid indices, an explicit
softmax), the op's reference against the model's ``MultiheadAttention`` with the materialised bias,
the decoder's kernel path against its SDPA path, and the ``sam3fast::rpb_attention`` op (opcheck,
torch.compile) and its entry point; the benchmark's --smoke run.

On CPU the Triton launcher runs under ``TRITON_INTERPRET=1`` (set by conftest.py) on tiny odd shapes:
non-square grids (3 x 5, so a swapped y/x cannot pass), grids the key tile does not divide, L not a
multiple of the query block; outputs are preallocated full of NaN so an unwritten element fails.
"""

from __future__ import annotations

import math
import os
import runpy
import sys
import textwrap

import pytest
import torch

from kernel_checks import SM90_BUILD, assert_close_to64, capture_graph, forced_backend_reason, run_compiled

from sam3fast.kernels import rpb_attention as ra
from sam3fast.model import decoder as decoder_mod
from sam3fast.model.common import MultiheadAttention
from sam3fast.model.decoder import Decoder
from sam3fast.model.init import stable_random_init_

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not ra.HAS_TRITON, reason=f"triton not importable: {ra.TRITON_IMPORT_ERROR}")
BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_rpb_attention.py")


def naive64(q, k, v, dy, dx):
    """The spec in float64: key n sits at grid cell (n // Wf, n % Wf) and gets dy[row] + dx[col]."""
    q, k, v, dy, dx = (t.double() for t in (q, k, v, dy, dx))
    B, L, H, Dh = q.shape
    Hf, Wf = dy.shape[-1], dx.shape[-1]
    ys = torch.arange(Hf).repeat_interleave(Wf)  # (N,): 0 0 .. 0 1 1 ..
    xs = torch.arange(Wf).repeat(Hf)  # (N,): 0 1 .. Wf-1 0 1 ..
    bias = dy[..., ys] + dx[..., xs]  # (B, H, L, N)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(Dh) + bias
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    return torch.einsum("bhij,bjhd->bihd", p / p.sum(dim=-1, keepdim=True), v)


def _case(B, L, H, Dh, grid, seed, dtype=torch.float32, bias_scale=2.0):
    """q (B, L, H, Dh), k/v (B, Hf*Wf, H, Dh), dy (B, H, L, Hf), dx (B, H, L, Wf); a bias large
    enough (several units, as the trained model's) to reshape every softmax row."""
    g = torch.Generator().manual_seed(seed)
    Hf, Wf = grid
    N = Hf * Wf
    q = torch.randn(B, L, H, Dh, generator=g) * 1.5
    k = torch.randn(B, N, H, Dh, generator=g) * 1.5
    v = torch.randn(B, N, H, Dh, generator=g)
    dy = torch.randn(B, H, L, Hf, generator=g) * bias_scale
    dx = torch.randn(B, H, L, Wf, generator=g) * bias_scale
    return tuple(t.to(dtype) for t in (q, k, v, dy, dx))


def _run(q, k, v, dy, dx, **launch):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    got = ra._rpb_attention_triton(q, k, v, dy, dx, out=out, **launch)
    assert got.data_ptr() == out.data_ptr()
    return got


_assert_close = assert_close_to64


# (B, L, H, Dh, (Hf, Wf))
CASES = {
    "B1_L5_3x5_dh16": (1, 5, 2, 16, (3, 5)),
    "B2_L13_3x5_dh32": (2, 13, 2, 32, (3, 5)),
    "B2_L13_4x4_dh16": (2, 13, 2, 16, (4, 4)),
    "B1_L5_4x4_dh32": (1, 5, 2, 32, (4, 4)),
    "B2_L19_5x9_dh32": (2, 19, 1, 32, (5, 9)),
}
LAUNCH = {
    "default": {},  # one 64-query block, one split off CUDA
    "small_splits": dict(block_m=16, block_n=16, num_splits=3),  # several query blocks and key splits
    "column_tiles": dict(block_n=16, tile_cols=1, num_splits=2),  # 16 x 1 tiles: rows padded
    "row_tiles": dict(block_n=32, tile_cols=32, num_splits=4),  # 1 x 32 tiles: columns padded
}


@needs_triton
@pytest.mark.parametrize("launch", list(LAUNCH), ids=list(LAUNCH))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_float64(case, launch):
    B, L, H, Dh, grid = CASES[case]
    q, k, v, dy, dx = _case(B, L, H, Dh, grid, seed=len(case))
    want = naive64(q, k, v, dy, dx)
    _assert_close(_run(q, k, v, dy, dx, **LAUNCH[launch]), want, 2e-5)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reference_matches_float64(case):
    """The reference (the CPU kernel) against the same spec, in float32 and float64."""
    B, L, H, Dh, grid = CASES[case]
    q, k, v, dy, dx = _case(B, L, H, Dh, grid, seed=len(case))
    want = naive64(q, k, v, dy, dx)
    _assert_close(ra.rpb_attention_ref(q, k, v, dy, dx), want, 2e-5)
    _assert_close(ra.rpb_attention_ref(*(t.double() for t in (q, k, v, dy, dx))), want, 1e-12)


def test_bias_orientation_matters():
    """The cases above tell the grid's orientation apart: a kernel that took the keys column-major
    (key n at cell (n % Hf, n // Hf)) on the 3 x 5 grid, which equals the spec on keys re-ordered so,
    or one that dropped the bias, would be far off."""
    q, k, v, dy, dx = _case(1, 5, 2, 16, (3, 5), seed=0)
    want = naive64(q, k, v, dy, dx)

    def column_major(t):  # key n moves to the cell (n % 3, n // 3)
        return t.view(1, 5, 3, 2, 16).transpose(1, 2).reshape(1, 15, 2, 16)

    assert (naive64(q, column_major(k), column_major(v), dy, dx) - want).abs().max() > 1e-1
    no_bias = naive64(q, k, v, dy * 0, dx * 0)
    assert (no_bias - want).abs().max() > 1e-1


@needs_triton
def test_kernel_strided_inputs():
    """Views of packed projections (only the last dim contiguous), factors as permuted views of the
    MLP's (B, L, grid, H) outputs, and a q with a non-contiguous last dim (the launcher copies it)."""
    q, k, v, dy, dx = _case(2, 13, 2, 32, (3, 5), seed=3)
    wide = torch.randn(2, 15, 2, 96)
    k2, v2 = wide[..., :32], wide[..., 40:72]
    k2.copy_(k)
    v2.copy_(v)
    dy2 = dy.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # strides of (B, L, Hf, H)
    dx2 = dx.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    q2 = q.transpose(1, 2).contiguous().transpose(1, 2)
    q3 = torch.randn(2, 13, 2, 32, 2)[..., 0]
    q3.copy_(q)
    want = naive64(q, k, v, dy, dx)
    for qq in (q2, q3):
        for launch in ({}, dict(block_m=16, block_n=16, num_splits=2)):
            _assert_close(_run(qq, k2, v2, dy2, dx2, **launch), want, 2e-5)


@needs_triton
def test_kernel_fp16_and_mixed_factor_dtype():
    """fp16 q/k/v with fp16 factors: error vs float64 at most 2x that of the reference computed on the
    same fp16 inputs; float32 q/k/v with fp16 factors (the bias summed in float32 from them); fp16
    q/k/v with float32 factors."""
    q, k, v, dy, dx = _case(2, 13, 2, 32, (4, 4), seed=7)
    h = [t.half() for t in (q, k, v, dy, dx)]
    want = naive64(*h)
    ref_err = (ra.rpb_attention_ref(*h).double() - want).abs().max().item()
    for launch in ({}, dict(block_m=16, block_n=16, num_splits=3)):
        got = _run(*h, **launch)
        assert got.dtype == torch.float16
        _assert_close(got, want, max(2 * ref_err, 2e-3))
    dyh, dxh = dy.half(), dx.half()
    _assert_close(_run(q, k, v, dyh, dxh), naive64(q, k, v, dyh, dxh), 2e-5)
    # fp16 q/k/v with float32 factors (the decoder island's call, in bf16 on a GPU)
    want = naive64(*h[:3], dy, dx)
    ref_err = (ra.rpb_attention_ref(*h[:3], dy, dx).double() - want).abs().max().item()
    _assert_close(_run(*h[:3], dy, dx, block_m=16, block_n=16, num_splits=2), want, max(2 * ref_err, 2e-3))


@needs_triton
def test_kernel_extreme_bias():
    """A bias of +-30 (softmax rows dominated by a few keys, exp of very negative scores underflows)
    stays finite and exact: the online max sees the bias."""
    q, k, v, dy, dx = _case(1, 13, 2, 16, (4, 4), seed=11, bias_scale=15.0)
    _assert_close(_run(q, k, v, dy, dx, block_m=16, block_n=16, num_splits=4), naive64(q, k, v, dy, dx), 2e-5)


def test_choose_tile_shape_and_splits():
    assert ra.choose_tile_shape(72, 72, 64) == (8, 8)  # SAM 3: divides the grid exactly
    assert ra.choose_tile_shape(72, 72, 128) == (8, 16)
    for Hf, Wf, bn in ((3, 5, 16), (5, 9, 32), (1, 7, 16), (72, 72, 16)):
        rows, cols = ra.choose_tile_shape(Hf, Wf, bn)
        assert rows * cols == bn
        best = min(ra.cdiv(Hf, bn // c) * (bn // c) * ra.cdiv(Wf, c) * c for c in (1, 2, 4, 8, 16, 32, 64) if c <= bn)
        assert ra.cdiv(Hf, rows) * rows * ra.cdiv(Wf, cols) * cols == best
    # SAM 3 on an H100 (132 SMs): 32 (query block, head) pairs, 81 tiles of 64 keys.
    assert ra.choose_num_splits(32, 81, 132) == 9
    assert ra.choose_num_splits(32 * 16, 81, 132) == 1  # 16 prompts fill the GPU already
    assert ra.choose_num_splits(32, 6, 132) == 1  # too few key tiles to split


def test_reference_matches_multihead_attention():
    """The op's math equals the model's MultiheadAttention with the materialised bias, after its
    packed projections."""
    torch.manual_seed(0)
    B, L, D, H, Hf, Wf = 2, 7, 32, 2, 3, 5
    attn = MultiheadAttention(D, H)
    with torch.no_grad():
        attn.in_proj_weight.normal_(0, D ** -0.5)
        attn.in_proj_bias.normal_(0, 0.2)
        x, mem_k, mem = torch.randn(B, L, D), torch.randn(B, Hf * Wf, D), torch.randn(B, Hf * Wf, D)
        dy, dx = torch.randn(B, H, L, Hf) * 2, torch.randn(B, H, L, Wf) * 2
        bias = (dy.unsqueeze(-1) + dx.unsqueeze(-2)).view(B, H, L, Hf * Wf)
        want = attn(x, mem_k, mem, attn_bias=bias)
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        q = torch.nn.functional.linear(x, w_q, b_q).view(B, L, H, -1)
        k = torch.nn.functional.linear(mem_k, w_k, b_k).view(B, -1, H, D // H)
        v = torch.nn.functional.linear(mem, w_v, b_v).view(B, -1, H, D // H)
        for fn in (ra.rpb_attention_ref, ra.rpb_attention):  # the entry point takes the reference on CPU
            got = attn.out_proj(fn(q, k, v, dy, dx).reshape(B, L, D))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- the decoder's kernel path ----------------------------------------------------------------


def _decoder_case(num_heads, seed=0):
    """A small decoder (Dh = 32 / 16: head dims the kernel takes), random stable weights, a 3 x 5 grid."""
    torch.manual_seed(seed)
    dec = Decoder(d_model=64, num_heads=num_heads, dim_feedforward=64, num_layers=2, num_queries=6).eval()
    stable_random_init_(dec, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    B, P, feat = 2, 4, (3, 5)
    inputs = (torch.randn(B, 15, 64, generator=g), torch.rand(B, 15, 64, generator=g) * 2 - 1, feat,
              torch.randn(B, P, 64, generator=g), torch.tensor([[False, False, True, True], [False] * 4]))
    return dec, inputs


def _decoder_outputs(dec, inputs):
    with torch.no_grad():
        return dec(*inputs, return_intermediate=True)


@pytest.mark.parametrize("num_heads", [2, 4])
@pytest.mark.parametrize("attention", ["entry_point", "launcher"])
def test_decoder_kernel_path_matches_sdpa_path(num_heads, attention, monkeypatch):
    """With the backend forced to "triton" on CPU the decoder takes its kernel path (factors to the
    layers, projections by hand, rpb_attention); the attention is the public entry point (the
    reference on CPU) or the Triton launcher under the interpreter. Every output equals the
    materialised-bias SDPA path (``use_kernel = False``) to float32 rounding."""
    if attention == "launcher" and not ra.HAS_TRITON:
        pytest.skip(f"triton not importable: {ra.TRITON_IMPORT_ERROR}")
    dec, inputs = _decoder_case(num_heads)
    dec.use_kernel = False
    want = _decoder_outputs(dec, inputs)

    calls = []

    def spy(q, k, v, dy, dx):
        calls.append((q.shape, dy.shape, dx.shape))
        if attention == "launcher":
            return ra._rpb_attention_triton(q, k, v, dy, dx, block_m=16, block_n=16, num_splits=2)
        return ra.rpb_attention(q, k, v, dy, dx)

    monkeypatch.setattr(decoder_mod, "rpb_attention_backend", lambda q: ("triton", "forced by the test"))
    monkeypatch.setattr(decoder_mod, "rpb_attention", spy)
    dec.use_kernel = True
    got = _decoder_outputs(dec, inputs)
    Dh = 64 // num_heads
    assert calls == [((2, 7, num_heads, Dh), (2, num_heads, 7, 3), (2, num_heads, 7, 5))] * 2  # both layers
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-5, atol=2e-5, msg=name)
    assert (want["ref_boxes_all"][1:] - want["ref_boxes_all"][:-1]).abs().max() > 1e-3, "boxes not refined"


@pytest.mark.parametrize("attention, lowp", [("entry_point", torch.bfloat16), ("launcher", torch.float16)])
def test_island_decoder_on_low_precision_memory(attention, lowp, monkeypatch):
    """The decoder as a bfloat16 build has it (a float32 island: float32 weights) on bfloat16 memory:
    its image cross-attention runs in the memory's dtype, so the kernel gets q/k/v in that dtype and
    the float32 bias factors; hs and the presence logit come back in it, the boxes in float32.
    Against the decoder on the same values in float32, the kernel path's error is at most 2x
    (+ 1e-3) that of the materialised-bias SDPA path (the bias rounded to the low precision there).
    The Triton launcher runs under the interpreter, which has no bf16 arithmetic: fp16 there."""
    if attention == "launcher" and not ra.HAS_TRITON:
        pytest.skip(f"triton not importable: {ra.TRITON_IMPORT_ERROR}")
    calls = []

    def spy(q, k, v, dy, dx):
        calls.append((q.dtype, k.dtype, v.dtype, dy.dtype, dx.dtype))
        if attention == "launcher":
            return ra._rpb_attention_triton(q, k, v, dy, dx, block_m=16, block_n=16, num_splits=2)
        return ra.rpb_attention(q, k, v, dy, dx)

    monkeypatch.setattr(decoder_mod, "rpb_attention_backend", lambda q: ("triton", "forced by the test"))
    monkeypatch.setattr(decoder_mod, "rpb_attention", spy)
    _check_island_decoder(torch.device("cpu"), lowp)
    assert calls == [(lowp,) * 3 + (torch.float32,) * 2] * 2


def _check_island_decoder(device, lowp):
    dec, inputs = _decoder_case(2, seed=5)
    dec = dec.to(device)
    inputs = tuple(t.to(device) if torch.is_tensor(t) else t for t in inputs)
    memory, pos = inputs[0].to(lowp), inputs[1].to(lowp)
    dec.use_kernel = False
    exact = _decoder_outputs(dec, (memory.float(), pos.float()) + inputs[2:])
    lowp_inputs = (memory, pos) + inputs[2:]
    sdpa = _decoder_outputs(dec, lowp_inputs)
    dec.use_kernel = True
    assert dec.use_rpb_kernel(memory)
    got = _decoder_outputs(dec, lowp_inputs)
    for name in ("hs", "hs_all", "presence_logit", "presence_logit_all", "presence_feats"):
        assert got[name].dtype == sdpa[name].dtype == lowp, name
    for name in ("pred_boxes", "ref_boxes_all"):
        assert got[name].dtype == torch.float32, name
    for name in exact:
        ref = exact[name].double()
        err_k = (got[name].double() - ref).abs().max().item()
        err_s = (sdpa[name].double() - ref).abs().max().item()
        assert err_k <= 2 * err_s + 1e-3, (name, err_k, err_s)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_island_decoder_on_bf16_memory():
    """The same on CUDA with the real kernel: bf16 q/k/v, float32 bias factors."""
    _check_island_decoder(torch.device("cuda"), torch.bfloat16)


def test_decoder_cpu_keeps_sdpa_path(monkeypatch):
    """On CPU the decoder never calls rpb_attention (its CPU numbers stay the official ones), with
    use_kernel True or False, and the state-dict keys are unchanged by the kernel switch."""
    dec, inputs = _decoder_case(2)
    assert dec.use_kernel and not dec.use_rpb_kernel(inputs[0])

    def fail(*args):
        raise AssertionError("rpb_attention called on CPU")

    monkeypatch.setattr(decoder_mod, "rpb_attention", fail)
    keys = set(dec.state_dict())
    _decoder_outputs(dec, inputs)
    assert set(dec.state_dict()) == keys and not any("rpb_attention" in k for k in keys)


# ---- the op ------------------------------------------------------------------------------------


def test_bad_inputs():
    q, k, v, dy, dx = _case(2, 5, 2, 16, (3, 5), seed=0)
    ref = ra.rpb_attention_ref
    with pytest.raises(ValueError, match="q must be"):
        ref(q[0], k, v, dy, dx)
    with pytest.raises(ValueError, match="k must be"):
        ref(q, k[..., :8], v, dy, dx)
    with pytest.raises(ValueError, match="v must have"):
        ref(q, k, v[:, :-1], dy, dx)
    with pytest.raises(ValueError, match="share a dtype"):
        ref(q, k.double(), v, dy, dx)
    with pytest.raises(ValueError, match="dy must be"):
        ref(q, k, v, dy[:, :, :4], dx)
    with pytest.raises(ValueError, match="dx must be"):
        ref(q, k, v, dy, dx.double())
    with pytest.raises(ValueError, match="does not cover"):
        ref(q, k, v, dy, dx[..., :4])  # 3 x 4 grid for 15 keys
    if ra.HAS_TRITON:
        with pytest.raises(ValueError, match="head dims"):
            ra._rpb_attention_triton(q[..., :8], k[..., :8], v[..., :8], dy, dx)
        with pytest.raises(ValueError, match="float32/bfloat16/float16"):
            ra._rpb_attention_triton(q.double(), k.double(), v.double(), dy, dx)
        with pytest.raises(ValueError, match="block_n"):
            ra._rpb_attention_triton(q, k, v, dy, dx, block_n=24)
        with pytest.raises(ValueError, match="tile_cols"):
            ra._rpb_attention_triton(q, k, v, dy, dx, block_n=16, tile_cols=32)
        with pytest.raises(ValueError, match="out must be"):
            ra._rpb_attention_triton(q, k, v, dy, dx, out=torch.empty(2, 5, 2, 8))


def _op_args():
    return _case(2, 5, 2, 16, (3, 5), seed=9)


def test_opcheck():
    torch.library.opcheck(torch.ops.sam3fast.rpb_attention.default, _op_args())


def test_op_cpu_is_reference():
    args = _op_args()
    assert torch.equal(torch.ops.sam3fast.rpb_attention(*args), ra.rpb_attention_ref(*args))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    """A caller of the op and one of the entry point compile with no graph break."""
    q, k, v, dy, dx = _op_args()

    def via_op(q, k, v, dy, dx):
        return torch.ops.sam3fast.rpb_attention(q * 2.0, k, v, dy, dx) + 1.0

    def via_entry(q, k, v, dy, dx):
        return ra.rpb_attention(q, k * 0.5, v, dy, dx - 1.0) * 2.0

    torch._dynamo.reset()
    for fn in (via_op, via_entry):
        got = torch.compile(fn, fullgraph=True, backend=backend)(q, k, v, dy, dx)
        torch.testing.assert_close(got, fn(q, k, v, dy, dx), rtol=0, atol=0)


def test_entry_point_backend_cpu():
    q = torch.zeros(1, 5, 2, 32)
    assert ra.rpb_attention_backend(q)[0] == "reference"
    args = _op_args()
    assert torch.equal(ra.rpb_attention(*args), ra.rpb_attention_ref(*args))


def test_force_reference_env():
    reason = forced_backend_reason("rpb_attention", "rpb_attention_backend(torch.zeros(1, 5, 2, 32))")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


@needs_triton
def test_kernels_compile_for_sm90():
    """The real (not interpreted) Triton compiler builds the GPU variants for an H100 without a GPU
    (bf16, Dh 32, the launcher's default tile at SAM 3's grid), and the attention uses wgmma."""
    code = SM90_BUILD + textwrap.dedent(
        """
        from sam3fast.kernels import rpb_attention as ra
        from sam3fast.kernels import _split_kv
        main = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16",
                "out_ptr": "*bf16", "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "qk_scale": "fp32"}
        names = "L H Hf Wf x_tiles n_tiles tiles_per_split sqb sqm sqh skb skn skh svb svn svh"
        names += " sdyb sdyh sdyl sdyy sdxb sdxh sdxl sdxx"
        main.update({n: i32 for n in names.split()})
        bm, bn, nw, ns = ra.DEFAULT_TILE
        rows, cols = ra.choose_tile_shape(72, 72, bn)
        for split in (True, False):
            cx = dict(SPLIT=split, DOT_PRECISION="tf32", DH=32, BLOCK_M=bm, ROWS=rows, COLS=cols)
            k = build(ra._rpb_attention_kernel, main, cx, nw, ns)
            assert "wgmma.mma_async" in k.asm["ptx"], "the attention should use wgmma on sm_90"
        build(_split_kv._merge_splits_kernel, {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16",
              "L": i32, "H": i32, "n_splits": i32}, dict(DH=32, BLOCK_M=32), 4)
        print("ok")
        """
    )
    run_compiled(code)


def test_bench_smoke(monkeypatch, capsys):
    """The benchmark's --smoke mode (tiny shapes, CPU, interpreter) runs; timing is not checked."""
    monkeypatch.setattr(sys, "argv", [BENCH, "--smoke"])
    runpy.run_path(BENCH, run_name="__main__")
    out = capsys.readouterr().out
    assert "rpb_attention benchmark" in out and "triton" in out and "eager" in out and "factors: triton" in out


# ---- GPU only --------------------------------------------------------------------------------


def _gpu_case(B, seed, L=201, H=8, Dh=32, grid=(72, 72)):
    g = torch.Generator(device="cuda").manual_seed(seed)
    Hf, Wf = grid
    q = torch.randn(B, L, H, Dh, device="cuda", generator=g)
    k = torch.randn(B, Hf * Wf, H, Dh, device="cuda", generator=g)
    v = torch.randn(B, Hf * Wf, H, Dh, device="cuda", generator=g)
    dy = torch.randn(B, H, L, Hf, device="cuda", generator=g) * 2
    dx = torch.randn(B, H, L, Wf, device="cuda", generator=g) * 2
    dy[:, :, 0] = 0  # the presence token's zero row, as the decoder builds it
    dx[:, :, 0] = 0
    return q, k, v, dy, dx


def _torch_bf16(q, k, v, dy, dx):
    """What the model does in bf16: the bias materialised in bf16 (dy + dx in the weights' dtype), then
    SDPA with it (``MultiheadAttention`` between its projections)."""
    B, L, H, _ = q.shape
    bias = (dy.unsqueeze(-1) + dx.unsqueeze(-2)).view(B, H, L, -1)
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias).transpose(1, 2)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("B", [1, 3])
def test_gpu_real_shape_bf16(B):
    """bf16 at SAM 3 sizes: error vs the fp32 reference at most 2x that of PyTorch in bf16."""
    q, k, v, dy, dx = _gpu_case(B, seed=B)
    ref = ra.rpb_attention_ref(q, k, v, dy, dx)  # float32 inputs: the fp32 reference
    qb, kb, vb, dyb, dxb = (t.bfloat16() for t in (q, k, v, dy, dx))
    torch_err = (_torch_bf16(qb, kb, vb, dyb, dxb).float() - ref).abs()
    assert ra.rpb_attention_backend(qb)[0] == "triton"
    for got in (ra.rpb_attention(qb, kb, vb, dyb, dxb),
                ra.rpb_attention(qb, kb, vb, dy, dx),  # float32 factors: the decoder island's call
                ra._rpb_attention_triton(qb, kb, vb, dyb, dxb, num_splits=1),
                ra._rpb_attention_triton(qb, kb, vb, dyb, dxb, block_m=128, block_n=128, num_warps=8)):
        assert got.dtype == torch.bfloat16 and not got.isnan().any()
        err = (got.float() - ref).abs()
        assert err.max() <= 2 * torch_err.max(), (err.max().item(), torch_err.max().item())
        assert err.pow(2).mean().sqrt() <= 2 * torch_err.pow(2).mean().sqrt()


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_fp32_matches_float64():
    q, k, v, dy, dx = _gpu_case(2, seed=3)
    want = naive64(*(t.cpu() for t in (q, k, v, dy, dx))).cuda()
    for launch in ({}, dict(num_splits=1), dict(block_m=16, block_n=16, num_splits=7)):
        got = ra._rpb_attention_triton(q, k, v, dy, dx, **launch)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_cuda_graph_replay():
    static = [t.bfloat16() for t in _gpu_case(2, seed=4)]

    def fn():
        return ra.rpb_attention(*static)

    graph, out = capture_graph(fn)
    for seed in (5, 6):
        new = [t.bfloat16() for t in _gpu_case(2, seed=seed)]
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        assert torch.equal(out, ra._rpb_attention_triton(*new))


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_decoder_kernel_path():
    """The decoder on CUDA takes the kernel path by default and matches its SDPA path (fp32; the
    bias sum is the only rounding that differs), also compiled with fullgraph=True."""
    dec, inputs = _decoder_case(2)
    dec = dec.cuda()
    inputs = tuple(t.cuda() if torch.is_tensor(t) else t for t in inputs)
    assert dec.use_rpb_kernel(inputs[0])
    got = _decoder_outputs(dec, inputs)
    dec.use_kernel = False
    want = _decoder_outputs(dec, inputs)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4, msg=name)
    dec.use_kernel = True
    with torch.no_grad():
        comp = torch.compile(dec, fullgraph=True)(*inputs)
    torch.testing.assert_close(comp["pred_boxes"], got["pred_boxes"], rtol=1e-4, atol=1e-4)
