"""The trunk's RoPE self-attention op (``sam3fast.kernels.rope_attention``): the memory-attention
Triton kernel with q and every key rotated, called on the qkv projection's strided views, against a
float64 spec written here from ``apply_rope`` and SDPA; the ``sam3fast::rope_self_attention`` op
(opcheck, torch.compile) and the ViT ``Attention``'s switch (``rope_attention_kernel``) against its
RoPE + SDPA path.

On CPU the launcher runs under ``TRITON_INTERPRET=1`` in float32 and float16 (the interpreter has no
bf16 arithmetic) on tiny windows; outputs are preallocated full of NaN so an unwritten element fails.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import assert_close_to64, capture_graph, run_compiled, tiny_trunk

from sam3fast.kernels import rope_attention as ra
from sam3fast.kernels.memory_attention import HAS_TRITON, TRITON_IMPORT_ERROR
from sam3fast.model import vit as vit_mod
from sam3fast.model.vit import compute_axial_cis

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=f"triton not importable: {TRITON_IMPORT_ERROR}")


def _spec(q, k, v, freqs):
    """float64: q and k rotated by the table's complex128 rows (token l by row l), then softmax
    attention with the 1/sqrt(Dh) scale; (B, L, H, Dh)."""
    def rot(x):
        xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
        return torch.view_as_real(xc * freqs.to(torch.complex128)[None, :, None, :]).flatten(-2)

    qr, kr = rot(q), rot(k)
    return F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.double().transpose(1, 2)
                                          ).transpose(1, 2)


def _qkv(B, side, H, Dh, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    L = side * side
    qkv = torch.randn(B, L, 3, H, Dh, generator=g).to(dtype)  # the projection's layout
    freqs = compute_axial_cis(Dh, side, side, scale_pos=scale)
    return qkv.unbind(2), freqs


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 4e-3)])
@pytest.mark.parametrize("B,side,H,Dh,tile", [
    (3, 4, 2, 16, None),              # windows of 16 tokens, the default tile (64 x 64) over them
    (1, 8, 2, 32, (16, 16, 4, 2)),    # a 64-token grid in 4 x 4 tiles of 16
    (2, 5, 3, 64, (32, 16, 4, 2)),    # 25 tokens: ragged tiles, Dh 64 (the trunk's)
])
def test_kernel_against_spec(dtype, tol, B, side, H, Dh, tile):
    (q, k, v), freqs = _qkv(B, side, H, Dh, dtype, seed=B * 7 + side, scale=24 / 72 if side == 8 else 1.0)
    assert not q.is_contiguous()  # the views the ViT passes
    out = torch.full((B, side * side, H, Dh), float("nan"), dtype=dtype)
    launch = {} if tile is None else dict(zip(("block_m", "block_n", "num_warps", "num_stages"), tile))
    got = ra._rope_self_attention_triton(q, k, v, torch.view_as_real(freqs), out=out, **launch)
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    assert_close_to64(got, _spec(q, k, v, freqs), tol)
    ref = ra.rope_self_attention_ref(q, k, v, torch.view_as_real(freqs))
    assert_close_to64(ref, _spec(q, k, v, freqs), tol)


def test_reference_is_apply_rope_then_sdpa():
    """The reference equals the ViT's own path (apply_rope on q, k, then SDPA) in float32."""
    (q, k, v), freqs = _qkv(2, 4, 2, 16, torch.float32, seed=5)
    qr = vit_mod.apply_rope(q, freqs).transpose(1, 2)
    kr = vit_mod.apply_rope(k, freqs).transpose(1, 2)
    want = F.scaled_dot_product_attention(qr, kr, v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(ra.rope_self_attention(q, k, v, freqs), want, rtol=1e-5, atol=1e-6)


def test_bad_inputs():
    (q, k, v), freqs = _qkv(1, 4, 2, 16, torch.float32, seed=1)
    rope = torch.view_as_real(freqs)
    with pytest.raises(ValueError, match="k must have q's 16 tokens"):
        ra.rope_self_attention_ref(q, k[:, :8], v[:, :8], rope)
    with pytest.raises(ValueError, match="rope must be"):
        ra.rope_self_attention_ref(q, k, v, rope[:9])
    with pytest.raises(ValueError, match="share a dtype"):
        ra.rope_self_attention_ref(q, k.double(), v, rope)


def test_opcheck_and_compile():
    (q, k, v), freqs = _qkv(2, 4, 2, 16, torch.float32, seed=3)
    rope = torch.view_as_real(freqs).contiguous()
    torch.library.opcheck(torch.ops.sam3fast.rope_self_attention.default, (q, k, v, rope))
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b, c: torch.ops.sam3fast.rope_self_attention(a, b, c, rope), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(q, k, v), ra.rope_self_attention_ref(q, k, v, rope), rtol=0, atol=0)
    torch._dynamo.reset()


def test_vit_switch_takes_the_op_and_keeps_the_output(monkeypatch):
    """With ``rope_attention_kernel`` on and the backend forced to "triton", every block's attention
    calls the op (a spy; on CPU tensors the op runs its reference kernel) and the RoPE kernel path is
    not taken; the trunk's output equals the default's within float32 rounding; off by default; the
    trunk compiles without graph breaks with it on."""
    vit, x = tiny_trunk()
    with torch.no_grad():
        want = vit(x)
    assert not vit.rope_attention_kernel
    calls = []
    real = torch.ops.sam3fast.rope_self_attention

    class Spy:
        def __call__(self, *a):
            calls.append(a[0].shape)
            return real(*a)

    monkeypatch.setattr(vit_mod, "rope_self_attention_backend", lambda q: ("triton", "forced by the test"))
    monkeypatch.setattr(vit_mod, "apply_rope", lambda *a: (_ for _ in ()).throw(AssertionError("rope path")))
    vit.rope_attention_kernel = True
    assert vit.rope_attention_kernel and all(b.attn.rope_attention_kernel for b in vit.blocks)
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(vit, backend="eager", fullgraph=True)(x)
        torch._dynamo.reset()
        monkeypatch.setattr(torch.ops.sam3fast, "rope_self_attention", Spy())
        got = vit(x)
    # a grid of 8 x 8 tokens: window blocks see 4 windows of 4 x 4, global blocks the 64 tokens
    assert calls == [(4, 16, 4, 16), (1, 64, 4, 16)] * 2, calls
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, got, rtol=0, atol=0)


@needs_triton
def test_default_tile_compiles_for_sm90():
    """At the trunk's shapes in bf16 (9 windows of 576 tokens and one grid of 5184, 16 heads of 64,
    q, k, v views of one qkv tensor) the default launch builds for an H100 with wgmma and pipelined
    (cp.async) K/V loads and no spills inside its loop."""
    code = textwrap.dedent(
        """
        import torch
        from sam3fast.kernels import memory_attention as ma, rope_attention as ra
        from sam3fast.kernels._static_build import capture, sass_stats
        from sam3fast.model.vit import compute_axial_cis
        for n, side, scale in ((9, 24, 1.0), (1, 72, 24 / 72)):
            qkv = torch.empty(n, side * side, 3, 16, 64, dtype=torch.bfloat16)
            q, k, v = qkv.unbind(2)
            rope = torch.view_as_real(compute_axial_cis(64, side, side, scale_pos=scale)).float()
            with capture(ma._memory_attention_kernel, ma._rope_keys_kernel) as builds:
                ra._rope_self_attention_triton(q, k, v, rope)
            names = [b.name for b in builds]
            assert names == ["_rope_keys_kernel", "_memory_attention_kernel"], names
            st = sass_stats(builds[1].kernel)
            assert st["wgmma"] > 0 and st["cp_async"] > 0 and st["loop_spills"] == 0, st
        print("ok")
        """
    )
    run_compiled(code)


@needs_cuda
@pytest.mark.parametrize("n,side,scale", [(9, 24, 1.0), (1, 72, 24 / 72)], ids=["window", "global"])
def test_gpu_real_shape_bf16(n, side, scale):
    """At the trunk's shapes in bf16: the op's error against the float64 spec is at most 2x that of
    the path it replaces (the RoPE kernel + SDPA in bf16), and it replays in a CUDA graph."""
    (q, k, v), freqs = _qkv(n, side, 16, 64, torch.bfloat16, seed=side, scale=scale)
    q, k, v = (t.cuda() for t in (q, k, v))
    freqs = freqs.cuda()
    want = _spec(q, k, v, freqs)
    got = ra.rope_self_attention(q, k, v, freqs)
    from sam3fast.kernels.rope import rope

    qk = rope(torch.stack((q, k), dim=2), freqs)
    base = F.scaled_dot_product_attention(qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2),
                                          v.transpose(1, 2)).transpose(1, 2)
    err = (got.double() - want).abs().max().item()
    err_base = (base.double() - want).abs().max().item()
    assert torch.isfinite(got).all() and err <= 2 * err_base, (err, err_base)
    static = [t.clone() for t in (q, k, v)]
    graph, out = capture_graph(lambda: ra.rope_self_attention(*static, freqs))
    static[0].copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, ra.rope_self_attention(*static, freqs), rtol=0, atol=0)
