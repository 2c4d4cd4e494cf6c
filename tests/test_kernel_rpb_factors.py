"""The query decoder's boxRPB factors in one pass per axis (``sam3fast.kernels.rpb_factors``) against
a float64 spec; the ``sam3fast::rpb_factors`` op (opcheck, torch.compile), its entry point, and the
decoder that uses it.

On CPU the Triton launcher runs under ``TRITON_INTERPRET=1`` (set by conftest.py) on small odd
shapes (row counts that are no multiple of the row block, hidden widths and head counts that are no
power of two, boxes reaching past the map's edges); outputs are preallocated full of NaN so an
unwritten element fails. The rule: against the float64 spec, the kernel's error is at most twice
the error of the PyTorch path in float32, plus 1e-6 of the largest magnitude (the two sum in
different orders).
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from kernel_checks import SM90_BUILD, capture_graph, forced_backend_reason, run_compiled

from sam3fast.kernels import rpb_factors as rf
from sam3fast.model.decoder import Decoder

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not rf.HAS_TRITON, reason=f"triton not importable: {rf.TRITON_IMPORT_ERROR}")

# (B, Q, n, Hd, H)
CASES = {"b2_q7_n9_hd32_h4": (2, 7, 9, 32, 4), "b1_q13_n19_hd256_h8": (1, 13, 19, 256, 8),
         "b3_q5_n11_hd40_h3": (3, 5, 11, 40, 3)}


def _case(B, Q, n, hd, H, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    boxes = torch.rand(B, Q, 4, generator=g)
    boxes[..., 2:] = boxes[..., 2:] * 1.2  # some boxes reach past the map (deltas of both signs)
    w1 = 0.5 * torch.randn(hd, 2, generator=g)
    b1 = 0.1 * torch.randn(hd, generator=g)
    w2 = torch.randn(H, hd, generator=g) / hd ** 0.5
    b2 = 0.1 * torch.randn(H, generator=g)
    return tuple(t.to(device) for t in (boxes, w1, b1, w2, b2))


def spec64(boxes, n, w1, b1, w2, b2, axis):
    """The reference in float64 on the float32 coordinates (the official's are float32)."""
    return rf.rpb_factors_ref(boxes.double(), n, w1.double(), b1.double(), w2.double(), b2.double(), axis)


def _check(got, args, axis):
    boxes, n, w1, b1, w2, b2 = args
    B, Q, _ = boxes.shape
    assert got.shape == (B, w2.shape[0], Q + 1, n) and got.dtype == torch.float32 and got.is_contiguous()
    assert not got.isnan().any(), "unwritten (NaN) elements"
    assert (got[:, :, 0] == 0).all(), "the presence token's row is zero"
    want = spec64(boxes.cpu(), n, w1.cpu(), b1.cpu(), w2.cpu(), b2.cpu(), axis)
    ref = rf.rpb_factors_ref(boxes, n, w1, b1, w2, b2, axis).cpu()
    err = (got.cpu().double() - want).abs().max().item()
    err_ref = (ref.double() - want).abs().max().item()
    assert err <= 2 * err_ref + 1e-6 * want.abs().max().item(), (err, err_ref)


@needs_triton
@pytest.mark.parametrize("axis", [0, 1], ids=["x", "y"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_against_spec(case, axis):
    B, Q, n, hd, H = CASES[case]
    boxes, w1, b1, w2, b2 = _case(B, Q, n, hd, H, seed=len(case) + axis)
    for block_r in (16, 64):
        out = torch.full((B, H, Q + 1, n), float("nan"))
        got = rf._rpb_factors_triton(boxes, n, w1, b1, w2, b2, axis, out=out, block_r=block_r)
        assert got is out
        _check(got, (boxes, n, w1, b1, w2, b2), axis)


@needs_triton
def test_kernel_strided_boxes():
    """Boxes as a strided view (the decoder's expanded reference points) read in place."""
    boxes, w1, b1, w2, b2 = _case(1, 9, 10, 32, 4, seed=5)
    wide = torch.cat([boxes, torch.zeros_like(boxes)], dim=-1)[..., :4].expand(3, 9, 4)
    _check(rf._rpb_factors_triton(wide, 10, w1, b1, w2, b2, 1), (wide, 10, w1, b1, w2, b2), 1)


def test_reference_is_the_decoder_path():
    """The decoder's factors are the reference's, per axis: y from boxRPB_embed_y over the rows,
    x from boxRPB_embed_x over the columns (their MLPs through the module: the same values)."""
    torch.manual_seed(0)
    dec = Decoder(32, 4, 64, 1, 6).eval()
    boxes = torch.rand(2, 6, 4)
    with torch.no_grad():
        dy, dx = dec.rpb_factors(boxes, (5, 7))
        c = boxes.clone()
        xyxy = torch.stack([c[..., 0] - 0.5 * c[..., 2], c[..., 1] - 0.5 * c[..., 3],
                            c[..., 0] + 0.5 * c[..., 2], c[..., 1] + 0.5 * c[..., 3]], -1)
        for f, mlp, n, edges in ((dy, dec.boxRPB_embed_y, 5, xyxy[..., 1::2]), (dx, dec.boxRPB_embed_x, 7, xyxy[..., 0::2])):
            coords = torch.arange(n, dtype=torch.float32) / n
            want = mlp(rf.log_deltas(coords, edges)).permute(0, 3, 1, 2)
            assert torch.equal(f[:, :, 1:], want) and (f[:, :, 0] == 0).all()


@needs_triton
def test_decoder_routes_through_the_op(monkeypatch):
    """``Decoder.rpb_factors`` calls the entry point per axis (y over the rows, then x over the
    columns), here with the launcher standing in for the CUDA op: the reference's values;
    ``use_factors_kernel = False`` computes the reference directly."""
    import sam3fast.model.decoder as dec_mod

    calls = []

    def spy(boxes, n, w1, b1, w2, b2, axis):
        calls.append((n, axis))
        return rf._rpb_factors_triton(boxes, n, w1, b1, w2, b2, axis)

    torch.manual_seed(1)
    dec = Decoder(32, 4, 64, 1, 6).eval()
    boxes = torch.rand(2, 6, 4)
    with torch.no_grad():
        want = dec.rpb_factors(boxes, (5, 7))
        monkeypatch.setattr(dec_mod, "rpb_factors", spy)
        got = dec.rpb_factors(boxes, (5, 7))
        assert calls == [(5, 1), (7, 0)]
        dec.use_factors_kernel = False
        plain = dec.rpb_factors(boxes, (5, 7))
        assert calls == [(5, 1), (7, 0)]
    for g, p, w in zip(got, plain, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        assert torch.equal(p, w)


def test_bad_inputs():
    boxes, w1, b1, w2, b2 = _case(1, 3, 4, 16, 2, seed=10)
    with pytest.raises(ValueError, match=r"boxes must be a floating \(B, Q, 4\)"):
        rf.rpb_factors_ref(boxes[..., :3], 4, w1, b1, w2, b2, 0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        rf.rpb_factors_ref(boxes, 0, w1, b1, w2, b2, 0)
    with pytest.raises(ValueError, match="axis must be 0"):
        rf.rpb_factors_ref(boxes, 4, w1, b1, w2, b2, 2)
    with pytest.raises(ValueError, match=r"w1 must be a floating \(16, 2\)"):
        rf.rpb_factors_ref(boxes, 4, w1[:, :1], b1, w2, b2, 0)
    with pytest.raises(ValueError, match=r"w2 must be a floating \(2, 16\)"):
        rf.rpb_factors_ref(boxes, 4, w1, b1, w2[:, :8], b2, 0)
    if rf.HAS_TRITON:
        with pytest.raises(ValueError, match="takes float32 w1"):
            rf._rpb_factors_triton(boxes, 4, w1.double(), b1, w2, b2, 0)
        with pytest.raises(ValueError, match="block_r"):
            rf._rpb_factors_triton(boxes, 4, w1, b1, w2, b2, 0, block_r=8)
        with pytest.raises(ValueError, match="out must be a contiguous"):
            rf._rpb_factors_triton(boxes, 4, w1, b1, w2, b2, 0, out=torch.empty(1, 2, 4, 5))


def _op_args(axis=1):
    boxes, w1, b1, w2, b2 = _case(2, 5, 6, 16, 4, seed=12)
    return (boxes, 6, w1, b1, w2, b2, axis)


def test_opcheck():
    for axis in (0, 1):
        torch.library.opcheck(torch.ops.sam3fast.rpb_factors.default, _op_args(axis))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    boxes, n, w1, b1, w2, b2, axis = _op_args()

    def via_op(b):
        return torch.ops.sam3fast.rpb_factors(b * 1.0, n, w1, b1, w2, b2, axis) + 1.0

    def via_entry(b):
        return rf.rpb_factors(b, n, w1, b1, w2, b2, axis).sum()

    torch._dynamo.reset()
    for fn in (via_op, via_entry):
        got = torch.compile(fn, fullgraph=True, backend=backend)(boxes)
        torch.testing.assert_close(got, fn(boxes), rtol=0, atol=0)


def test_entry_point_backend():
    boxes, n, w1, b1, w2, b2, axis = _op_args()
    backend, reason = rf.rpb_factors_backend(boxes, w1)
    assert backend == "reference" and "cpu" in reason
    assert torch.equal(rf.rpb_factors(boxes, n, w1, b1, w2, b2, axis), rf.rpb_factors_ref(boxes, n, w1, b1, w2, b2, axis))
    reason = forced_backend_reason("rpb_factors", "rpb_factors_backend(torch.zeros(1, 2, 4), torch.zeros(8, 2))")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


@needs_triton
def test_kernel_compiles_for_sm90():
    """The decoder's launch (Q = 200, 72 x 72 map, 256 hidden, 8 heads) builds for an H100 without a
    GPU, without spills."""
    code = SM90_BUILD + textwrap.dedent(
        """
        import torch
        from sam3fast.kernels import rpb_factors as rf
        from sam3fast.kernels._static_build import assert_no_spills_or_loop_conversions, capture
        e = lambda *s: torch.empty(s, dtype=torch.float32)
        with capture(rf._rpb_factors_kernel) as builds:
            rf._rpb_factors_triton(e(1, 200, 4), 72, e(256, 2), e(256), e(8, 256), e(8), 1)
        (b,) = builds
        assert_no_spills_or_loop_conversions(b.kernel)
        with capture(rf._rpb_factors_kernel) as builds:  # n == 1 arrives as a constant: it still builds
            rf._rpb_factors_triton(e(1, 3, 4), 1, e(256, 2), e(256), e(8, 256), e(8), 0)
        print("ok")
        """
    )
    run_compiled(code)


# ---- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_decoder_shape_and_graph_replay():
    """At the decoder's shape (Q = 200, 72 x 72, 256 hidden, 8 heads) both axes within the rule, and
    a CUDA graph replay on new boxes equals a fresh call."""
    boxes, w1, b1, w2, b2 = _case(1, 200, 72, 256, 8, seed=13, device="cuda")
    assert rf.rpb_factors_backend(boxes, w1)[0] == "triton"
    for axis in (0, 1):
        _check(rf.rpb_factors(boxes, 72, w1, b1, w2, b2, axis), (boxes, 72, w1, b1, w2, b2), axis)
    graph, out = capture_graph(lambda: rf.rpb_factors(boxes, 72, w1, b1, w2, b2, 1))
    boxes.copy_(torch.rand_like(boxes))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, rf.rpb_factors(boxes, 72, w1, b1, w2, b2, 1), rtol=0, atol=0)
