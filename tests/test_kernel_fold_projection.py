"""sam3fast::fold_out_proj (kernels/fold_projection.py), the memory cross-attention's folded output
projection, under the Triton interpreter on CPU against a float64 reference: one head (SAM 3's 256 x
256 x 64) and several (the atomic bias sum), odd widths, float32 and bf16 outputs, the weight output
poisoned with NaN; its registration (opcheck); and ``RoPEAttention.folded_out_proj`` through it."""

from __future__ import annotations

import pytest
import torch

from sam3fast.kernels import fold_projection as fp
from sam3fast.kernels._triton_compat import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the interpreter on CPU)")


def weights(D, K, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(*s, generator=g) * 0.2).to(dtype) for s in ((D, D), (D,), (D, K), (D,)))


@needs_triton
@pytest.mark.parametrize("H, D, K", [(1, 256, 64), (2, 64, 16), (4, 32, 24), (1, 48, 8), (3, 48, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_against_float64(H, D, K, dtype):
    wo, bo, wv, bv = weights(D, K, seed=H * D + K, dtype=dtype)
    poisoned = torch.full((D, H * K), float("nan"), dtype=dtype)
    w, b = fp._fold_out_proj_triton(wo, bo, wv, bv, H, dtype, block_o=16, out_w=poisoned)
    assert w.data_ptr() == poisoned.data_ptr() and w.dtype == b.dtype == dtype
    args64 = [t.double() for t in (wo, bo, wv, bv)]
    rw, rb = fp.fold_out_proj_ref(*args64, H, torch.float64)
    # error bound: the products' magnitudes (what float32 summation error scales with)
    bw, bb = fp.fold_out_proj_ref(*[t.abs() for t in args64], H, torch.float64)
    if dtype == torch.float32:
        assert ((w.double() - rw).abs() <= 4e-7 * bw).all()
        assert ((b.double() - rb).abs() <= 4e-7 * bb).all()
    else:  # the float32 sum rounded once: within one bf16 step of the exact value (and its own rounding)
        assert ((w.double() - rw).abs() <= 2 ** -8 * rw.abs() + 4e-7 * bw).all()
        assert ((b.double() - rb).abs() <= 2 ** -8 * rb.abs() + 4e-7 * bb).all()
        want_w, want_b = fp.fold_out_proj_ref(wo, bo, wv, bv, H, dtype)  # PyTorch's float32 path, rounded
        assert (w != want_w).float().mean() < 0.01 and (b != want_b).float().mean() < 0.05


def test_reference_and_errors():
    wo, bo, wv, bv = weights(12, 5, seed=1, dtype=torch.float64)
    w, b = fp.fold_out_proj_ref(wo, bo, wv, bv, 3, torch.float64)
    o = torch.randn(7, 3, 5, dtype=torch.float64)  # per-head K-wide attention outputs
    unfolded = torch.nn.functional.linear((o.unsqueeze(-2) @ wv.view(3, 4, 5).transpose(1, 2)).squeeze(-2).flatten(1)
                                          + bv, wo, bo)
    torch.testing.assert_close(torch.nn.functional.linear(o.flatten(1), w, b), unfolded, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="num_heads 5 must divide 12"):
        fp.fold_out_proj_ref(wo, bo, wv, bv, 5, torch.float64)
    with pytest.raises(ValueError, match="square"):
        fp.fold_out_proj_ref(wv, bo, wv, bv, 1, torch.float64)


def test_opcheck():
    wo, bo, wv, bv = weights(32, 8, seed=2)
    torch.library.opcheck(torch.ops.sam3fast.fold_out_proj.default, (wo, bo, wv, bv, 2, torch.bfloat16))


def test_module_takes_the_op_on_the_kernel_path(monkeypatch):
    """``RoPEAttention.folded_out_proj`` calls the op where its backend is Triton (forced on CPU
    tensors: its CPU kernel is the reference, the PyTorch computation before the op), with the same
    values as the reference path."""
    from kernel_checks import KernelPathsOnCpu
    from sam3fast.model.memory_attention import RoPEAttention

    m = RoPEAttention(32, 2, kv_in_dim=8, fold_value=True)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    want = m.folded_out_proj(torch.bfloat16)
    with KernelPathsOnCpu() as rec:
        got = m.folded_out_proj(torch.bfloat16)
    assert rec.ops == {"fold_out_proj"}
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    monkeypatch.setattr(RoPEAttention, "fold_kernel", False)  # the switch back: the PyTorch form
    with KernelPathsOnCpu() as rec:
        again = m.folded_out_proj(torch.bfloat16)
    assert rec.ops == set() and all(torch.equal(a, b) for a, b in zip(again, want))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_gpu_real_shape_bf16_and_in_a_graph():
    """SAM 3's fold (256 x 256 x 64, one head, bf16 weights and output) on the GPU: within one bf16
    step of the float64 value, nearly always PyTorch's own float32 result rounded (the sums' order
    differs), and the same from a CUDA graph replay."""
    from sam3fast.predictor.graphs import warm_up_and_capture

    wo, bo, wv, bv = (t.cuda() for t in weights(256, 64, seed=11, dtype=torch.bfloat16))
    w, b = torch.ops.sam3fast.fold_out_proj(wo, bo, wv, bv, 1, torch.bfloat16)
    rw, rb = fp.fold_out_proj_ref(*(t.double() for t in (wo, bo, wv, bv)), 1, torch.float64)
    assert ((w.double() - rw).abs() <= 2 ** -8 * rw.abs() + 1e-6).all()
    assert ((b.double() - rb).abs() <= 2 ** -8 * rb.abs() + 1e-6).all()
    want_w, _ = fp.fold_out_proj_ref(wo, bo, wv, bv, 1, torch.bfloat16)
    assert (w != want_w).float().mean() < 0.01
    graph, out, _ = warm_up_and_capture(lambda: torch.ops.sam3fast.fold_out_proj(wo, bo, wv, bv, 1, torch.bfloat16),
                                        1, None, "test_fold")
    out[0].fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], w) and torch.equal(out[1], b)
