"""The memory attention with its residual adds fused to the LayerNorms after them
(``MemoryAttention.fuse_residual_norm``, ``sam3fast::residual_norm``): against the unfused layers on
the CUDA dispatch taken on CPU (the op's reference CPU kernel: the same operations), with the
Triton launcher under the interpreter (float32, outputs pre-filled with NaN), with the first
layer's one-row self-attention (frame features expanded over the objects), and compiled.
"""

from __future__ import annotations

import pytest
import torch

from kernel_checks import KernelPathsOnCpu

from sam3fast.kernels import residual_norm as rn
from sam3fast.model import memory_attention as mam
from sam3fast.model.memory_attention import MemoryAttention

needs_triton = pytest.mark.skipif(not rn.HAS_TRITON, reason=f"triton not importable: {rn.TRITON_IMPORT_ERROR}")

B, L, T, D, M = 3, 9, 4, 32, 16
S = 2 * L + T


def _module(seed, dtype):
    m = MemoryAttention(d_model=D, mem_dim=M, num_layers=2, dim_feedforward=48, grid=3).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if p.dim() == 1 and p.shape[0] == D else 0.0))
    return m.to(dtype)


def _inputs(seed, dtype, shared):
    g = torch.Generator().manual_seed(seed)
    rows = 1 if shared else B
    curr = torch.randn(rows, L, D, generator=g).to(dtype).expand(B, -1, -1)
    pos = torch.randn(rows, L, D, generator=g).to(dtype).expand(B, -1, -1)
    mem, mem_pos = (torch.randn(B, S, M, generator=g).to(dtype) for _ in range(2))
    valid = torch.rand(B, S, generator=g) > 0.2
    valid[:, 0] = True
    return curr, pos, mem, mem_pos, T, valid


@pytest.mark.parametrize("shared", [False, True], ids=["rows", "shared_frame"])
def test_fused_equals_unfused_on_the_cuda_dispatch(shared):
    """bf16, ``KernelPathsOnCpu``: "auto" fuses (``residual_norm`` is called) and gives bit for bit the
    unfused layers' output (the op's CPU kernel is the same add and ``F.layer_norm``); with the
    frame features shared by the objects the first cross-attention reads the one normed row
    expanded (the unfused layer normed the expanded rows, and CPU GEMMs round a broadcast batch
    differently): then its error against the float64 module is at most twice the unfused one's."""
    m = _module(1, torch.bfloat16)
    args = _inputs(2, torch.bfloat16, shared)
    with torch.no_grad(), KernelPathsOnCpu() as rec:
        assert m.fuse_residual_norm == "auto" and m.fuses_residual_norm(args[0])
        fused = m(*args)
        assert "residual_norm" in rec.ops
        m.fuse_residual_norm = False
        rec.ops.clear()
        unfused = m(*args)
        assert "residual_norm" not in rec.ops
    assert not fused.isnan().any()
    if shared:  # the rule: against the module in float64, at most twice the unfused path's error
        with torch.no_grad():
            want = _module(1, torch.float64)(*(a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                                                for a in args))
        err = (fused.double() - want).abs().max().item()
        base = (unfused.double() - want).abs().max().item()
        assert err <= 2 * base, (err, base)
    else:
        assert torch.equal(fused, unfused)


def test_switch_and_where_it_applies():
    m = _module(3, torch.bfloat16)
    x = torch.zeros(2, L, D, dtype=torch.bfloat16)
    assert not m.fuses_residual_norm(x)  # CPU tensors: the PyTorch path
    with KernelPathsOnCpu():
        assert m.fuses_residual_norm(x) and m.fuses_residual_norm(x.float())  # every kernel dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not m.fuses_residual_norm(x)
        m.fuse_residual_norm = False
        assert not m.fuses_residual_norm(x)
        m.fuse_residual_norm = "yes"
        with pytest.raises(ValueError, match="fuse_residual_norm must be True, False or 'auto'"):
            m.fuses_residual_norm(x)


@needs_triton
@pytest.mark.parametrize("shared", [False, True], ids=["rows", "shared_frame"])
def test_fused_triton_launcher_interpreted(shared, monkeypatch):
    """float32, the module's fused path with ``residual_norm`` served by the Triton launcher under
    the interpreter (outputs pre-filled with NaN): within float32 rounding of the PyTorch path."""
    m = _module(4, torch.float32)
    args = _inputs(5, torch.float32, shared)
    with torch.no_grad():
        want = m(*args)  # the CPU path: unfused
    calls = []

    def launcher(x, y, weight, bias, eps, y_window=0, out_window=0):
        calls.append(tuple(x.shape))
        out_s = torch.full(x.shape, float("nan"))
        out_n = torch.full(x.shape, float("nan"))
        return rn._residual_norm_triton(x, y, weight, bias, eps, out_s=out_s, out_n=out_n)

    monkeypatch.setattr(mam, "residual_norm_backend", lambda x: ("triton", "test"))
    monkeypatch.setattr(mam, "residual_norm", launcher)
    with torch.no_grad():
        got = m(*args)
    # per layer: after the self-attention, the cross-attention (not in the shared first layer) and the FFN
    assert len(calls) == (5 if shared else 6), calls
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_fused_compiles_fullgraph(backend, monkeypatch):
    """On the CUDA dispatch (the flag alone: a dispatch mode would keep dynamo out) the fused module
    compiles with ``fullgraph=True``, equals its eager output, and does not recompile on new values."""
    from sam3fast.kernels import _triton_compat

    m = _module(6, torch.bfloat16)
    args = _inputs(7, torch.bfloat16, shared=True)
    monkeypatch.setattr(_triton_compat, "KERNEL_PATHS_ON_CPU", True)
    assert m.fuses_residual_norm(args[0])
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want = m(*args)
            fn = torch.compile(m, fullgraph=True, backend=backend)
            got = fn(*args)
            with torch._dynamo.config.patch(error_on_recompile=True):
                fn((args[0][:1] + 1).expand(B, -1, -1), *args[1:])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


# ---- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("objects", [1, 8])
def test_gpu_fused_paths_bf16(objects):
    """SAM 3 sizes (7 frames + 16 pointers, a padded frame slot), bf16, the frame features shared by
    the objects: the module with its defaults (q/k projected with RoPE in the epilogue, residual
    adds fused to the norms) against the float32 module with both off: its relative error at most
    twice that of the bf16 module with both off; and a CUDA graph replay on new memory equal to a
    fresh call."""
    from kernel_checks import capture_graph, sam3_memory_attention_pair
    from sam3fast.model.memory_attention import RoPEAttention

    cfg, m32, mbf = sam3_memory_attention_pair()
    Lg, D, Mm = cfg.feat_size ** 2, cfg.d_model, cfg.tracker.mem_dim
    Tp = 16 * D // Mm
    Sk = 7 * Lg + Tp
    g = torch.Generator(device="cuda").manual_seed(1)
    curr, curr_pos = (torch.randn(1, Lg, D, device="cuda", generator=g).expand(objects, -1, -1) for _ in range(2))
    mem, mem_pos = (torch.randn(objects, Sk, Mm, device="cuda", generator=g) for _ in range(2))
    valid = torch.ones(objects, Sk, dtype=torch.bool, device="cuda")
    valid[:, 6 * Lg:7 * Lg] = False
    # (the frame rows cast before the expand: a cast of an expanded tensor would copy it)
    bf = [t[:1].bfloat16().expand(objects, -1, -1) for t in (curr, curr_pos)] + [t.bfloat16() for t in (mem, mem_pos)]
    assert mbf.fuses_residual_norm(bf[0]) and mbf.layers[0].cross_attn_image.fuses_rope_projection(bf[0], bf[2])
    with torch.no_grad():
        got = mbf(*bf, Tp, valid).float()
        for m in (m32, mbf):
            m.fuse_residual_norm = False
        try:
            RoPEAttention.fuse_rope_projection = False
            ref = m32(curr, curr_pos, mem, mem_pos, Tp, valid)
            base = mbf(*bf, Tp, valid).float()
        finally:
            RoPEAttention.fuse_rope_projection = "auto"
        mbf.fuse_residual_norm = "auto"
    assert torch.isfinite(got).all()
    rel = lambda a: ((a - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(got) <= 2 * rel(base), (rel(got), rel(base))
    graph, out = capture_graph(torch.no_grad()(lambda: mbf(*bf, Tp, valid)))
    bf[2].copy_(torch.randn_like(bf[2]))
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        assert torch.equal(out, mbf(*bf, Tp, valid))
