"""The memory attention's projection with RoPE in its epilogue (``sam3fast.kernels.rope_projection``)
against a float64 spec; the ``sam3fast::rope_projection`` op (opcheck, torch.compile), its entry
point, and ``RoPEAttention`` with the fused projections (``fuse_rope_projection``) against its
unfused path.

On CPU the Triton launcher runs under ``TRITON_INTERPRET=1`` (conftest.py) on small odd shapes
(rows no multiple of the row block, K no multiple of the K block, a head dim whose pair count is no
power of two, pointer rows after the rotated ones, two heads) and strided inputs; outputs are
preallocated full of NaN so an unwritten element fails. The interpreter computes a ``tl.dot`` of
bfloat16 tiles on their raw bits (Triton 3.7), so the CPU tests cover float32 and float16 and the
GPU test bfloat16.

The rule: against the float64 spec (the projection exact, then the rotation), the kernel's largest
error is at most twice that of the module's own operations in the dtype (the linear rounded, the
rotation in float32 rounded: the kernel rounds at the same places, its dot products summed in
another order) plus one ulp of the largest output.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from kernel_checks import (SM90_BUILD, KernelPathsOnCpu, capture_graph, forced_backend_reason, randomize_,
                           run_compiled, ulp)

from sam3fast.kernels import rope_projection as rp
from sam3fast.model import memory_attention as mam
from sam3fast.model.memory_attention import MemoryAttention, RoPEAttention
from sam3fast.model.vit import compute_axial_cis

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not rp.HAS_TRITON, reason=f"triton not importable: {rp.TRITON_IMPORT_ERROR}")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# (B, frames rotated, pointer rows, K, H, Dh, grid side): S = frames * side^2 + pointer rows
CASES = {"b2_2f_5p_k16": (2, 2, 5, 16, 1, 32, 4), "b1_1f_h2_k40": (1, 1, 0, 40, 2, 32, 3),
         "b3_3f_7p_k64_dh64": (3, 3, 7, 64, 1, 64, 4), "b2_no_rope_k24_dh48": (2, 0, 11, 24, 1, 48, 3),
         "b1_2f_3p_dh48_h2": (1, 2, 3, 32, 2, 48, 3)}
# a small launch so the shapes above have several row, pair and K blocks
SMALL = dict(block_r=16, block_j=16, block_k=16)


def _case(B, N, T, K, H, Dh, side, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    S = N * side * side + T
    x = torch.randn(B, S, K, generator=g).to(dtype)
    w = (torch.randn(H * Dh, K, generator=g) / K ** 0.5).to(dtype)
    b = (0.3 * torch.randn(H * Dh, generator=g)).to(dtype)
    rope = torch.view_as_real(compute_axial_cis(Dh, side, side)).float()
    return x, w, b, rope, N * side * side, H


def _check(got, x, w, b, rope, n_rope, H):
    want = rp.rope_projection_ref(x.double(), w.double(), b.double(), rope.double(), n_rope, H)
    assert got.dtype == x.dtype and got.shape == want.shape and got.is_contiguous()
    assert not got.isnan().any(), "unwritten (NaN) elements"
    err = (got.double() - want).abs().max().item()
    eager_err = (rp.rope_projection_ref(x, w, b, rope, n_rope, H).double() - want).abs().max().item()
    assert err <= 2 * eager_err + ulp(want.abs().max().to(got.dtype)).item() + 1e-6, (err, eager_err)


def test_spec_is_linear_then_rotation():
    """The reference is ``F.linear`` then the rotation the memory attention applies (its own
    reference rotates keys s < n_rope by row s mod L and leaves the pointer rows)."""
    from sam3fast.kernels import memory_attention as ma

    x, w, b, rope, n_rope, H = _case(2, 2, 5, 16, 1, 32, 4, torch.float32, seed=1)
    got = rp.rope_projection_ref(x, w, b, rope, n_rope, H)
    lin = torch.nn.functional.linear(x, w, b).view(2, -1, 1, 32)
    torch.testing.assert_close(got[:, n_rope:], lin[:, n_rope:], rtol=0, atol=0)
    L = rope.shape[0]
    for f in range(n_rope // L):
        rows = slice(f * L, (f + 1) * L)
        want = ma._rotate(lin[:, rows], rope[:, None, :, 0], rope[:, None, :, 1])
        torch.testing.assert_close(got[:, rows], want, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_against_spec(case, dtype):
    args = _case(*CASES[case], DTYPES[dtype], seed=len(case))
    x, w = args[0], args[1]
    out = torch.full((*x.shape[:2], args[5], w.shape[0] // args[5]), float("nan"), dtype=x.dtype)
    got = rp._rope_projection_triton(*args, out=out, **SMALL)
    assert got is out
    _check(got, *args)


@needs_triton
def test_kernel_default_launch_and_strided_input():
    """The default tile (one row block, K in one step) and a sliced (non-contiguous) x."""
    x, w, b, rope, n_rope, H = _case(2, 2, 3, 64, 1, 64, 4, torch.float32, seed=3)
    xs = torch.randn(2, x.shape[1], 80)[:, :, 8:72]
    xs.copy_(x)
    assert not xs.is_contiguous()
    _check(rp._rope_projection_triton(xs, w, b, rope, n_rope, H), x, w, b, rope, n_rope, H)


def test_bad_inputs():
    x, w, b, rope, n_rope, H = _case(1, 1, 2, 16, 1, 32, 3, torch.float32, seed=1)
    with pytest.raises(ValueError, match="x must be"):
        rp.rope_projection_ref(x[0], w, b, rope, n_rope, H)
    with pytest.raises(ValueError, match="weight must be"):
        rp.rope_projection_ref(x, w[:, :8], b, rope, n_rope, H)
    with pytest.raises(ValueError, match="weight must be"):
        rp.rope_projection_ref(x, w, b, rope, n_rope, 3)
    with pytest.raises(ValueError, match="head dim must be even"):
        rp.rope_projection_ref(x, w[:30], b[:30], rope, n_rope, 2)
    with pytest.raises(ValueError, match="bias must be"):
        rp.rope_projection_ref(x, w, b[:8], rope, n_rope, H)
    with pytest.raises(ValueError, match="share one dtype"):
        rp.rope_projection_ref(x, w.double(), b, rope, n_rope, H)
    with pytest.raises(ValueError, match="rope must be"):
        rp.rope_projection_ref(x, w, b, rope[:, :8], n_rope, H)
    with pytest.raises(ValueError, match="n_rope must be a multiple"):
        rp.rope_projection_ref(x, w, b, rope, n_rope - 1, H)
    with pytest.raises(ValueError, match="n_rope must be a multiple"):
        rp.rope_projection_ref(x, w, b, rope, x.shape[1] + 9, H)
    with pytest.raises(ValueError, match="num_heads"):
        rp.rope_projection_ref(x, w, b, rope, n_rope, 0)
    if rp.HAS_TRITON:
        with pytest.raises(ValueError, match="float32/bfloat16/float16"):
            rp._rope_projection_triton(x.double(), w.double(), b.double(), rope, n_rope, H)
        with pytest.raises(ValueError, match="float32 rope table"):
            rp._rope_projection_triton(x, w, b, rope.double(), n_rope, H)
        with pytest.raises(ValueError, match="block_r"):
            rp._rope_projection_triton(x, w, b, rope, n_rope, H, block_r=24)


@needs_triton
def test_kernel_empty_inputs():
    x, w, b, rope, n_rope, H = _case(1, 1, 0, 16, 1, 32, 3, torch.float32, seed=2)
    assert rp._rope_projection_triton(x[:0], w, b, rope, n_rope, H).shape == (0, 9, 1, 32)
    # K == 0: the bias alone, rotated
    got = rp._rope_projection_triton(x[..., :0], w[:, :0], b, rope, n_rope, H)
    torch.testing.assert_close(got, rp.rope_projection_ref(x[..., :0], w[:, :0], b, rope, n_rope, H))


def test_opcheck():
    args = _case(1, 1, 3, 16, 2, 16, 3, torch.float32, seed=4)
    torch.library.opcheck(torch.ops.sam3fast.rope_projection.default, args)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    args = _case(2, 1, 3, 16, 1, 32, 3, torch.float32, seed=5)
    fn = torch.compile(lambda *a: torch.ops.sam3fast.rope_projection(*a) * 2.0, backend=backend, fullgraph=True)
    torch._dynamo.reset()
    try:
        torch.testing.assert_close(fn(*args), rp.rope_projection_ref(*args) * 2.0, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_entry_point_backend_cpu():
    """On CPU the entry point is the reference; it takes the complex table too."""
    x, w, b, rope, n_rope, H = _case(1, 1, 3, 16, 1, 32, 3, torch.float32, seed=6)
    assert rp.rope_projection_backend(x)[0] == "reference"
    want = rp.rope_projection_ref(x, w, b, rope, n_rope, H)
    torch.testing.assert_close(rp.rope_projection(x, w, b, torch.view_as_complex(rope), n_rope, H), want,
                               rtol=0, atol=0)


def test_force_reference_env():
    reason = forced_backend_reason("rope_projection", "rope_projection_backend(torch.zeros(1, 9, 16))")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


def test_kernel_compiles_for_sm90():
    """The tracker's projections at 16 objects (bf16, the default launch) build for an H100 without
    a GPU: the cross-attention's keys (36324 rows of 64 -> 256, 64 pointer rows) and the queries
    (5184 rows of 256 -> 256): no spill, and no barrier or shared-memory traffic outside what the
    dots' operands need (the rotation works in the accumulators' layout)."""
    code = SM90_BUILD + textwrap.dedent(
        """
        import torch
        from sam3fast.kernels import rope_projection as rp
        from sam3fast.kernels._static_build import capture, sass_stats
        from sam3fast.model.vit import compute_axial_cis
        e = lambda *s: torch.empty(s, dtype=torch.bfloat16)
        rope = torch.view_as_real(compute_axial_cis(256, 72, 72)).float()
        for S, K, n_rope in ((7 * 5184 + 64, 64, 7 * 5184), (5184, 256, 5184)):
            with capture(rp._rope_projection_kernel) as builds:
                rp._rope_projection_triton(e(16, S, K), e(256, K), e(256), rope, n_rope, 1)
            st = sass_stats(builds[0].kernel)
            assert st["spill_stores"] == 0 and st["spill_loads"] == 0, st
            assert st["wgmma"] > 0 or st["mma"] > 0, st
        # sizes of 1 (Triton passes such integers as constants: one object, one row, one table row,
        # one pair block, K of one) build too
        one = torch.view_as_real(compute_axial_cis(32, 1, 1)).float()
        for B, S, K, n_rope in ((1, 1, 16, 1), (1, 3, 1, 0), (2, 1, 16, 0)):
            with capture(rp._rope_projection_kernel) as builds:
                rp._rope_projection_triton(e(B, S, K), e(32, K), e(32), one, n_rope, 1)
            assert sass_stats(builds[0].kernel)["spill_stores"] == 0
        print("ok")
        """
    )
    run_compiled(code)


# ---- RoPEAttention with the fused projections -------------------------------------------------


def _attention_inputs(B, D, M, side, frames, T, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    L = side * side
    S = frames * L + T
    x = torch.randn(B, L, D, generator=g).to(dtype)
    mem_k = torch.randn(B, S, M, generator=g).to(dtype)
    mem = torch.randn(B, S, M, generator=g).to(dtype)
    valid = torch.rand(B, S, generator=g) > 0.3
    valid[:, 0] = True
    valid[0, L:2 * L] = False
    return x, mem_k, mem, valid


@pytest.mark.parametrize("objects", [1, 4], ids=["1obj", "4obj_fold"])
def test_fused_projections_equal_the_unfused_cuda_path(objects, monkeypatch):
    """bf16 on the CUDA dispatch taken on CPU (``KernelPathsOnCpu``: the ops run their references):
    "auto" fuses the projections of the self- and cross-attention (the op is called with rope_q
    False and no rotated keys) and gives bit for bit what the unfused path gives (the op's rotation
    and the projection's are the same float32 operations on the same rounded linear output), with
    and without the value fold (set on both sides alike: "auto" folds wherever the projections are
    fused); False calls no rope_projection; float32 "auto" does not fuse."""
    D, M, side, T = 32, 16, 3, 4
    cross = randomize_(RoPEAttention(D, 1, kv_in_dim=M, fold_value="auto"), seed=7).to(torch.bfloat16)
    self_attn = randomize_(RoPEAttention(D, 1), seed=8).to(torch.bfloat16)
    x, mem_k, mem, valid = _attention_inputs(objects, D, M, side, 2, T, seed=9, dtype=torch.bfloat16)
    freqs = compute_axial_cis(D, side, side)
    calls = []
    real_op = mam.memory_attention

    def spy(q, k, v, freqs_cis, key_valid=None, *, rope_q=True, n_rope_keys=None):
        calls.append((rope_q, n_rope_keys))
        return real_op(q, k, v, freqs_cis, key_valid, rope_q=rope_q, n_rope_keys=n_rope_keys)

    monkeypatch.setattr(mam, "memory_attention", spy)
    with torch.no_grad(), KernelPathsOnCpu() as rec:
        assert cross.folds_for(x.unflatten(-1, (1, -1)))  # "auto" folds on the fused path
        for fold in (True, False):
            cross.fold_value = fold
            calls.clear()
            rec.ops.clear()
            fused = (cross(x, mem_k, mem, freqs, T, valid), self_attn(x, x, x, freqs))
            assert "rope_projection" in rec.ops and calls == [(False, 0), (False, 0)], (rec.ops, calls)
            assert cross.fuses_rope_projection(x, mem_k)
            calls.clear()
            monkeypatch.setattr(RoPEAttention, "fuse_rope_projection", False)
            rec.ops.clear()
            unfused = (cross(x, mem_k, mem, freqs, T, valid), self_attn(x, x, x, freqs))
            assert "rope_projection" not in rec.ops and calls == [(True, 2 * side * side), (True, side * side)]
            monkeypatch.setattr(RoPEAttention, "fuse_rope_projection", "auto")
            assert all(torch.equal(a, b) for a, b in zip(fused, unfused)), fold
        cross.fold_value = "auto"
        x32, m32 = x.float(), mem_k.float()
        assert not cross.float().fuses_rope_projection(x32, m32)
        assert cross.float().to(torch.bfloat16).fuses_rope_projection(x, mem_k)
    with pytest.raises(ValueError, match="fuse_rope_projection must be True, False or 'auto'"):
        cross.fuse_rope_projection = "yes"
        cross.fuses_rope_projection(x, mem_k)


def test_fusion_stays_off_on_the_cpu_path_and_under_autocast():
    cross = RoPEAttention(32, 1, kv_in_dim=16).to(torch.bfloat16)
    x = torch.zeros(1, 9, 32, dtype=torch.bfloat16)
    m = torch.zeros(1, 22, 16, dtype=torch.bfloat16)
    assert not cross.fuses_rope_projection(x, m)  # CPU tensors: the PyTorch path
    with KernelPathsOnCpu():
        assert cross.fuses_rope_projection(x, m)
        cross.use_kernel = False
        assert not cross.fuses_rope_projection(x, m)
        cross.use_kernel = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cross.fuses_rope_projection(x, m)
        cross.fuse_rope_projection = True
        assert cross.float().fuses_rope_projection(x.float(), m.float())  # True: every kernel dtype


@needs_triton
@pytest.mark.parametrize("H", [1, 2])
def test_module_kernel_path_interpreted(monkeypatch, H):
    """``MemoryAttention`` (2 layers, pointer tokens, a padded frame) with the kernel path forced
    and ``fuse_rope_projection = True`` in float32: the projections run the Triton launcher under
    the interpreter (outputs pre-filled with NaN) and the module matches its PyTorch path."""
    from sam3fast.kernels import memory_attention as ma

    m = randomize_(MemoryAttention(d_model=32, mem_dim=16, num_layers=2, dim_feedforward=48, grid=3,
                                    num_heads=H, fold_value=False), seed=11).eval()
    g = torch.Generator().manual_seed(12)
    B, L, T = 2, 9, 4
    S = 2 * L + T
    curr, curr_pos = (torch.randn(B, L, 32, generator=g) for _ in range(2))
    memory, memory_pos = (torch.randn(B, S, 16, generator=g) for _ in range(2))
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, L:2 * L] = False
    with torch.no_grad():
        want = m(curr, curr_pos, memory, memory_pos, T, valid)
    launched = []

    def projection(x, weight, bias, freqs_cis, n_rope, num_heads=1):
        launched.append(n_rope)
        Dh = weight.shape[0] // num_heads
        out = torch.full((*x.shape[:2], num_heads, Dh), float("nan"), dtype=x.dtype)
        return rp._rope_projection_triton(x, weight, bias, torch.view_as_real(freqs_cis), n_rope, num_heads,
                                          out=out, **SMALL)

    def attention(q, k, v, freqs_cis, key_valid=None, *, rope_q=True, n_rope_keys=None):
        return ma.memory_attention_ref(q, k, v, torch.view_as_real(freqs_cis), key_valid, rope_q, n_rope_keys)

    monkeypatch.setattr(mam, "memory_attention_backend", lambda q, dv=None: ("triton", "test"))
    monkeypatch.setattr(mam, "rope_projection_backend", lambda x: ("triton", "test"))
    monkeypatch.setattr(mam, "rope_projection", projection)
    monkeypatch.setattr(mam, "memory_attention", attention)
    monkeypatch.setattr(RoPEAttention, "fuse_rope_projection", True)
    with torch.no_grad():
        got = m(curr, curr_pos, memory, memory_pos, T, valid)
    assert launched == [L, L, L, 2 * L] * 2  # per layer: self q, self k, cross q, cross k
    assert not got.isnan().any()
    assert (got - want).abs().max().item() <= 2e-5


# ---- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("S,K,n_rope", [(7 * 5184 + 64, 64, 7 * 5184), (5184, 256, 5184)], ids=["keys", "queries"])
def test_gpu_real_shape_bf16(S, K, n_rope):
    """The tracker's projections at 16 objects in bf16 on the GPU, against the float64 spec within
    the rule, and a CUDA graph replay on new input equal to a fresh call."""
    g = torch.Generator().manual_seed(K)
    x = torch.randn(16, S, K, generator=g).bfloat16().cuda()
    w = (torch.randn(256, K, generator=g) / K ** 0.5).bfloat16().cuda()
    b = (0.3 * torch.randn(256, generator=g)).bfloat16().cuda()
    rope = torch.view_as_real(compute_axial_cis(256, 72, 72)).float().cuda()
    assert rp.rope_projection_backend(x)[0] == "triton"
    got = rp.rope_projection(x, w, b, rope, n_rope, 1)
    rows = slice(0, 2)  # two objects: the float64 spec of all 16 is large on the host
    _check(got[rows].cpu(), x[rows].cpu(), w.cpu(), b.cpu(), rope.cpu(), n_rope, 1)
    graph, out = capture_graph(lambda: rp.rope_projection(x, w, b, rope, n_rope, 1))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, rp.rope_projection(x, w, b, rope, n_rope, 1))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_module_with_fused_projections_compiles_fullgraph(backend, monkeypatch):
    """The memory attention on the CUDA dispatch (taken on CPU; the flag alone: the op-recording
    dispatch mode would keep dynamo out) in bf16, with the fused projections, compiles with
    ``fullgraph=True`` (the switch and backend checks trace) and gives the eager module's output; a
    second call of the same shapes does not recompile."""
    from sam3fast.kernels import _triton_compat

    m = randomize_(MemoryAttention(d_model=32, mem_dim=16, num_layers=2, dim_feedforward=48, grid=3),
                    seed=13).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(14)
    B, L, T = 2, 9, 4
    S = 2 * L + T
    args = [torch.randn(B, L, 32, generator=g).bfloat16(), torch.randn(B, L, 32, generator=g).bfloat16(),
            torch.randn(B, S, 16, generator=g).bfloat16(), torch.randn(B, S, 16, generator=g).bfloat16()]
    valid = torch.rand(B, S, generator=g) > 0.2
    valid[:, 0] = True
    monkeypatch.setattr(_triton_compat, "KERNEL_PATHS_ON_CPU", True)
    assert m.layers[0].cross_attn_image.fuses_rope_projection(args[0], args[2])
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = m(*args, T, valid)
            fn = torch.compile(m, fullgraph=True, backend=backend)
            got = fn(*args, T, valid)
            with torch._dynamo.config.patch(error_on_recompile=True):
                fn(*[a + 1 for a in args], T, valid)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()
