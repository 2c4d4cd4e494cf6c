"""``sam3fast.model.common.linear_relu``: the ReLU FFNs' first linear with cuBLASLt's ReLU + bias
epilogue on CUDA (the tracker's memory attention and the fusion encoder), the same values as the
linear and then the ReLU."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sam3fast.model import common
from sam3fast.model.common import linear_relu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24), (2, 3, 4, 24)])
def test_fused_equals_linear_then_relu(dtype, shape):
    """The fused op (forced on CPU, where its kernel is addmm then ReLU) gives the two steps' bits,
    on inputs of any rank with a hidden width that is not the input's; the default on CPU is the two
    steps."""
    g = torch.Generator().manual_seed(sum(shape))
    lin = nn.Linear(24, 40).to(dtype)
    x = torch.randn(*shape, generator=g).to(dtype)
    called = []
    real = torch._addmm_activation

    def spy(*a, **k):
        called.append(k)
        return real(*a, **k)

    with torch.no_grad():  # inference (where autograd records, the two steps run)
        want = F.relu(lin(x))
        torch._addmm_activation = spy
        try:
            got = linear_relu(x, lin, epilogue=True)
        finally:
            torch._addmm_activation = real
    assert called == [{"use_gelu": False}]  # the fused op ran
    assert got.shape == shape[:-1] + (40,) and got.dtype == dtype
    assert torch.equal(got, want)
    assert (want == 0).any() and (want > 0).any()  # the ReLU did something
    assert torch.equal(linear_relu(x, lin), want)


def test_fallbacks_no_bias_autocast_empty_mixed_dtype(monkeypatch):
    """Where the epilogue cannot serve (no bias, autocast, an empty input, mixed dtypes, autograd
    recording) the module's two steps run: checked by making the fused op raise."""
    def boom(*a, **k):
        raise AssertionError("the fused op ran")

    monkeypatch.setattr(torch, "_addmm_activation", boom)
    x = torch.randn(4, 8)
    lin = nn.Linear(8, 16)
    nobias = nn.Linear(8, 16, bias=False)
    assert torch.equal(linear_relu(x, lin, epilogue=True), F.relu(lin(x)))  # autograd records: two steps
    with torch.no_grad():  # inference, as the engine runs
        assert torch.equal(linear_relu(x, nobias, epilogue=True), F.relu(nobias(x)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(linear_relu(x, lin, epilogue=True), F.relu(lin(x)))
        assert linear_relu(x[:0], lin, epilogue=True).shape == (0, 16)
        with pytest.raises(RuntimeError):  # mixed dtypes: the linear itself refuses, as before
            linear_relu(x.bfloat16(), lin, epilogue=True)
        mixed = nn.Linear(8, 16).bfloat16()
        mixed.bias.data = mixed.bias.data.float()  # a float32 bias beside bf16 weights: the two steps,
        with pytest.raises(RuntimeError, match="dtype"):  # whose linear refuses it (not the stand-in)
            linear_relu(x.bfloat16(), mixed, epilogue=True)
        with pytest.raises(AssertionError, match="fused op ran"):
            linear_relu(x, lin, epilogue=True)  # the stand-in is reached where the epilogue serves


def test_compiles_without_graph_breaks_and_autograd_falls_back():
    """Compiled with fullgraph (inference, as the engine runs), the fused op's result; with grad
    enabled and parameters that require it (the op has no derivative) the two steps run, and
    gradients flow."""
    lin = nn.Linear(16, 32)
    x = torch.randn(2, 5, 16)
    fn = lambda t: linear_relu(t, lin, epilogue=True)  # noqa: E731
    torch._dynamo.reset()
    with torch.no_grad():
        want = F.relu(lin(x))
        for backend in ("eager", "aot_eager"):
            out = torch.compile(fn, backend=backend, fullgraph=True)(x)
            torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch._dynamo.reset()
    y = linear_relu(x, lin, epilogue=True)
    y.sum().backward()
    assert lin.weight.grad is not None and torch.equal(y.detach(), want)


def _forcing_spy(real):
    """A stand-in for linear_relu that records each call's linear in ``.seen`` and runs the fused
    op (``epilogue=True``)."""
    def spy(x, linear, epilogue=None):
        spy.seen.append(linear)
        return real(x, linear, epilogue=True)

    spy.seen = []
    return spy


def test_ffn_modules_route_through_it(monkeypatch):
    """The memory attention's, the fusion encoder's and the query decoder's FFNs call linear_relu
    with their linear1 (a spy records the calls); the fused op gives the same output (CPU: the same
    kernels)."""
    from sam3fast.model.encoder import TransformerEncoderLayer
    from sam3fast.model.memory_attention import MemoryAttentionLayer

    spy = _forcing_spy(common.linear_relu)
    seen = spy.seen

    import sam3fast.model.encoder as enc_mod
    import sam3fast.model.memory_attention as ma_mod

    torch.manual_seed(0)
    mal = MemoryAttentionLayer(32, 16, 64).eval()
    with torch.no_grad():
        for p in mal.parameters():
            p.normal_(0, 0.2)
    from sam3fast.model.vit import compute_axial_cis

    x = torch.randn(2, 16, 32)
    mem = torch.randn(2, 2 * 16 + 4, 16)
    freqs = compute_axial_cis(32, 4, 4)
    with torch.no_grad():
        want = mal(x, mem, mem, freqs, 4, None)
        monkeypatch.setattr(ma_mod, "linear_relu", spy)
        got = mal(x, mem, mem, freqs, 4, None)
    assert seen == [mal.linear1] and torch.isfinite(want).all() and torch.equal(got, want)

    seen.clear()
    layer = TransformerEncoderLayer(32, 4, 64, pos_enc_at_attn=True, pos_enc_at_cross_attn_queries=False,
                                    pos_enc_at_cross_attn_keys=False, memory_is_prompt=True).eval()
    tgt, prompt, pos = torch.randn(2, 9, 32), torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    with torch.no_grad():
        for p in layer.parameters():  # (some are allocated uninitialised: a checkpoint fills them)
            p.normal_(0, 0.2)
        want = layer(tgt, prompt, query_pos=pos)
        monkeypatch.setattr(enc_mod, "linear_relu", spy)
        got = layer(tgt, prompt, query_pos=pos)
    assert seen == [layer.linear1] and torch.isfinite(want).all() and torch.equal(got, want)

    import sam3fast.model.decoder as dec_mod
    from sam3fast.model.decoder import DecoderLayer

    seen.clear()
    dl = DecoderLayer(32, 4, 64).eval()
    x, qpos, mem, prompt = torch.randn(2, 7, 32), torch.randn(2, 7, 32), torch.randn(2, 12, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        for p in dl.parameters():
            p.normal_(0, 0.2)
        want = dl(x, qpos, mem, mem, prompt, None, None)
        monkeypatch.setattr(dec_mod, "linear_relu", spy)
        got = dl(x, qpos, mem, mem, prompt, None, None)
    assert seen == [dl.linear1] and torch.isfinite(want).all() and torch.equal(got, want)


def test_mlp_hidden_layers_route_through_it(monkeypatch):
    """Every MLP's hidden layers (not its output layer) call linear_relu; with the fused op forced
    the output is the same (CPU: the same kernels), residual and output norm included."""
    from sam3fast.model.common import MLP

    real = common.linear_relu
    spy = _forcing_spy(real)
    seen = spy.seen
    torch.manual_seed(0)
    for mlp, x in ((MLP(2, 32, 8, 2), torch.randn(1, 5, 7, 2)),
                   (MLP(16, 24, 16, 3, residual=True, out_norm=nn.LayerNorm(16)), torch.randn(3, 16))):
        mlp.eval()
        with torch.no_grad():
            want = mlp(x)
            monkeypatch.setattr(common, "linear_relu", spy)
            got = mlp(x)
            monkeypatch.setattr(common, "linear_relu", real)
        assert seen == list(mlp.layers[:-1]) and torch.equal(got, want) and torch.isfinite(want).all()
        seen.clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_mlp_epilogue_at_decoder_shapes(dtype, monkeypatch):
    """On CUDA (the epilogue by default) the query decoder's MLPs at their shapes: boxRPB (200 x 72
    rows, 2 -> 256 -> 8) and the box head (200 rows, 256 -> 256 -> 256 -> 4), in float32 (the
    decoder's island) and bf16, against float64 within 1.25x the two-step path's error."""
    import copy

    from sam3fast.model.common import MLP

    torch.manual_seed(4)
    for mlp, x in ((MLP(2, 256, 8, 2), torch.randn(1, 200, 72, 2)), (MLP(256, 256, 4, 3), torch.randn(1, 200, 256))):
        mlp, x = mlp.cuda().eval(), x.cuda()
        with torch.no_grad():
            ref = copy.deepcopy(mlp).double()(x.double())
            mlp, x = mlp.to(dtype), x.to(dtype)
            got = mlp(x)
            with monkeypatch.context() as m:  # the two steps
                m.setattr(common, "LINEAR_RELU_EPILOGUE", False)
                two = mlp(x)
        err, err_two = ((got.double() - ref).abs().max().item(), (two.double() - ref).abs().max().item())
        assert torch.isfinite(got).all() and err <= 1.25 * err_two + 1e-6, (dtype, err, err_two)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [5184, 16 * 5184, 333])
def test_cuda_relu_epilogue_bf16(rows):
    """On CUDA in bf16 at the memory attention FFN's shape (5184 tokens per object, 256 -> 2048):
    the epilogue (the default there) against the float64 product within the two-step path's error
    (both round once, the same value in exact arithmetic; only the kernel may differ), exact zeros
    where the reference is negative, and a CUDA graph replay equal to a fresh call."""
    torch.manual_seed(3)
    lin = nn.Linear(256, 2048).cuda().bfloat16()
    x = torch.randn(rows, 256, device="cuda").bfloat16()
    ref = F.relu(F.linear(x.double(), lin.weight.double(), lin.bias.double()))
    got = linear_relu(x, lin)
    two = linear_relu(x, lin, epilogue=False)
    assert got.shape == (rows, 2048) and torch.isfinite(got).all()
    err, err_two = ((got.double() - ref).abs().max().item(), (two.double() - ref).abs().max().item())
    assert err <= 1.25 * err_two + 1e-6, (err, err_two)
    assert (got[ref == 0] == 0).all()
    static = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        linear_relu(static, lin)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = linear_relu(static, lin)
    static.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, linear_relu(static, lin))
