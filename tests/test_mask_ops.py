"""Mask areas / IoU / NMS on bit-packed masks (``sam3fast.mask_ops``, ``torch.ops.sam3fast.mask_*``).

The CPU C++ ops are compared with float64 computations on the unpacked bool masks (exact counts, so
the float32 IoU must be equal, not close), with the pure-PyTorch spec, and with the official
``sam3.perflib`` functions (``mask_iou``, ``generic_nms_cpu``, ``nms_masks``) on the same masks.
Masks are blobs of random size plus speckle, with empty, full and duplicated masks mixed in, on odd
widths (W not a multiple of 32). GPU tests (skipped without CUDA) check CUDA == CPU bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from sam3fast import mask_ops
from sam3fast.mask_ops import (
    mask_areas, mask_iou, mask_iou_ref, mask_nms, mask_nms_ref, nms_masks, pack_masks,
)

needs_native = pytest.mark.skipif(not mask_ops.NATIVE_CPU, reason=f"sam3fast._C mask ops not built ({mask_ops.NATIVE_IMPORT_ERROR})")
needs_cuda_op = pytest.mark.skipif(
    not (torch.cuda.is_available() and mask_ops.NATIVE_CUDA), reason="needs a CUDA device and sam3fast._C built with CUDA"
)


def blobs(N, H, W, seed, empty=(), full=(), dup=()):
    """(N, H, W) bool: discs of random centre/radius (so IoUs spread over [0, 1]) plus 2% speckle;
    masks listed in ``empty``/``full`` are set so, and ``dup`` pairs (i, j) make mask j a copy of i."""
    g = torch.Generator().manual_seed(seed)
    yy = torch.arange(H, dtype=torch.float32).view(1, H, 1)
    xx = torch.arange(W, dtype=torch.float32).view(1, 1, W)
    cy = torch.rand(N, 1, 1, generator=g) * H
    cx = torch.rand(N, 1, 1, generator=g) * W
    r = (0.15 + 0.5 * torch.rand(N, 1, 1, generator=g)) * max(H, W)
    m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) | (torch.rand(N, H, W, generator=g) < 0.02)
    for i in empty:
        m[i] = False
    for i in full:
        m[i] = True
    for i, j in dup:
        m[j] = m[i]
    return m


def iou64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64 IoU of bool masks (exact counts), official 0/0 = 0, rounded once to float32."""
    fa = a.flatten(1).double()
    fb = b.flatten(1).double()
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return (inter / union.clamp(min=1)).float()


def greedy_nms(iou32: torch.Tensor, scores: torch.Tensor, thr: float, valid: torch.Tensor) -> torch.Tensor:
    """The rule written the slow obvious way (independent of the op and of mask_nms_ref)."""
    N = scores.shape[0]
    thr32 = torch.tensor(thr, dtype=torch.float32)
    s = scores.float().tolist()
    order = sorted(range(N), key=lambda n: (0 if s[n] != s[n] else 1, -s[n] if s[n] == s[n] else 0, n))
    keep = torch.zeros(N, dtype=torch.bool)
    for i in order:
        if valid[i] and not any(keep[j] and iou32[j, i] > thr32 for j in range(N)):
            keep[i] = True
    return keep


SHAPES = [  # (N, M, H, W)
    (1, 1, 1, 1), (3, 5, 7, 33), (6, 4, 17, 31), (0, 3, 5, 40), (4, 0, 5, 40), (9, 7, 13, 64),
    (5, 6, 3, 95), (13, 11, 20, 70), (2, 9, 1, 200),
]


# ---- layout ----


def test_pack_masks_layout():
    m = torch.zeros(1, 2, 70, dtype=torch.bool)
    for y, x in [(0, 0), (0, 31), (1, 32), (1, 69)]:
        m[0, y, x] = True
    p = pack_masks(m)
    assert p.dtype == torch.int32 and p.shape == (1, 2, 3)
    assert p[0, 0].tolist() == [1 | -(2**31), 0, 0]  # bit 31 is the sign bit of int32
    assert p[0, 1].tolist() == [0, 1, 1 << 5]
    r = blobs(4, 9, 45, seed=0)
    from sam3fast.kernels.mask_postprocess import unpack_masks

    assert torch.equal(unpack_masks(pack_masks(r), 45), r)
    assert pack_masks(torch.zeros(0, 3, 5, dtype=torch.bool)).shape == (0, 3, 1)


def test_pack_masks_matches_mask_postprocess():
    """pack_masks of a mask equals the packed output of sam3fast::mask_postprocess for it."""
    from sam3fast.kernels import mask_postprocess as mp

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 8, 8, generator=g)
    packed, _, areas = mp.mask_postprocess_ref(logits, torch.rand(3, generator=g), torch.ones(3, dtype=torch.bool), 11, 45, False)
    assert torch.equal(pack_masks(mp.unpack_masks(packed, 45)), packed)
    assert areas.sum() > 0


# ---- CPU ops against float64 ----


@needs_native
@pytest.mark.parametrize("N,M,H,W", SHAPES)
def test_mask_iou_matches_float64(N, M, H, W):
    a = blobs(N, H, W, seed=N * 100 + W, empty=[0] if N > 2 else [], full=[1] if N > 2 else [])
    b = blobs(M, H, W, seed=M * 7 + H, empty=[M - 1] if M > 1 else [])
    if N > 0 and M > 2:
        b[2] = a[N - 1]  # an identical pair
    got = mask_iou(pack_masks(a), pack_masks(b))
    want = iou64(a, b)
    assert got.dtype == torch.float32 and got.shape == (N, M)
    assert torch.equal(got, want)
    assert torch.equal(got, mask_iou_ref(pack_masks(a), pack_masks(b)))
    if N > 2 and M > 2:
        assert got[N - 1, 2] == 1.0 and (got[0] == 0).all(), "identical -> 1, empty -> 0"
        assert ((got > 0.05) & (got < 0.95)).any(), "inputs should give non-trivial IoUs"
    torch.testing.assert_close(mask_areas(pack_masks(a)), a.sum((1, 2)), rtol=0, atol=0)


@needs_native
def test_mask_iou_empty_pairs_and_self():
    m = blobs(5, 6, 37, seed=3, empty=[1, 3])
    iou = mask_iou(pack_masks(m), pack_masks(m))
    assert iou[1, 3] == 0 and iou[1, 1] == 0, "0/0 is 0, as the official union.clamp(min=1)"
    assert torch.equal(iou.diagonal(), torch.tensor([1.0, 0, 1, 0, 1]))
    assert torch.equal(iou, iou.T)


@needs_native
def test_mask_iou_large_counts_and_threads():
    """Many words per mask (tail words, 4x4 tiles plus edges) and several threads."""
    a = blobs(10, 150, 301, seed=5)
    b = blobs(7, 150, 301, seed=6)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = mask_iou(pack_masks(a), pack_masks(b))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(got, iou64(a, b))


@needs_native
def test_mask_iou_noncontiguous_inputs():
    a = blobs(6, 9, 64, seed=8)
    pa = pack_masks(a)
    view = pa.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not view.is_contiguous()
    assert torch.equal(mask_iou(view, pa[::2]), iou64(a, a[::2]))


# ---- NMS ----


def _nms_case(N, H, W, seed, ties=False):
    m = blobs(N, H, W, seed=seed, empty=[N // 2] if N > 3 else [], dup=[(0, N - 1)] if N > 4 else [])
    g = torch.Generator().manual_seed(seed + 1)
    scores = torch.rand(N, generator=g)
    if ties:
        scores = (scores * 4).floor() / 4
    valid = torch.rand(N, generator=g) < 0.85
    return m, scores, valid


@needs_native
@pytest.mark.parametrize("N,H,W", [(1, 4, 4), (2, 3, 33), (7, 10, 31), (16, 12, 40), (40, 17, 70), (65, 9, 64)])
@pytest.mark.parametrize("thr", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_mask_nms_matches_greedy(N, H, W, thr, ties):
    m, scores, valid = _nms_case(N, H, W, seed=N + H, ties=ties)
    packed = pack_masks(m)
    keep = mask_nms(packed, scores, thr, valid)
    assert keep.dtype == torch.bool and keep.shape == (N,)
    assert torch.equal(keep, greedy_nms(iou64(m, m), scores, thr, valid))
    assert torch.equal(keep, mask_nms_ref(packed, scores, thr, valid))
    assert not keep[~valid].any()
    if N >= 16 and 0.1 <= thr <= 0.5:
        assert keep.sum() >= 2 and (valid & ~keep).any(), "the case should both keep and suppress"


@needs_native
def test_mask_nms_rules():
    H, W = 4, 40
    m = torch.zeros(6, H, W, dtype=torch.bool)
    m[0, 0, :10] = True  # 10 px
    m[1, 0, 0] = True  # inside 0: IoU 1/10 = float32(0.1) exactly
    m[2, 1, :2] = True
    m[3, 1, :1] = True  # inside 2: IoU 1/2
    # 4 and 5 stay empty: IoU 0 with everything, never suppressed
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95, 0.5])
    assert mask_iou(pack_masks(m[:1]), pack_masks(m[1:2])).item() == torch.tensor(0.1).item()
    keep = mask_nms(pack_masks(m), scores, 0.1)
    assert keep.tolist() == [True, True, True, False, True, True], "IoU == threshold does not suppress"
    keep = mask_nms(pack_masks(m), scores, 0.5)
    assert keep.tolist() == [True] * 6
    keep = mask_nms(pack_masks(m), scores, 0.09)
    assert keep.tolist() == [True, False, True, False, True, True]
    # ties: the lower index wins (official nms_triton: stable descending sort)
    twins = torch.stack([m[0], m[0], m[0]])
    assert mask_nms(pack_masks(twins), torch.tensor([0.5, 0.7, 0.7]), 0.5).tolist() == [False, True, False]
    # NaN ranks first, invalid entries neither kept nor suppressing
    s = torch.tensor([0.5, float("nan"), 0.9])
    assert mask_nms(pack_masks(twins), s, 0.5).tolist() == [False, True, False]
    v = torch.tensor([True, False, True])
    assert mask_nms(pack_masks(twins), s, 0.5, v).tolist() == [False, False, True]
    assert mask_nms(pack_masks(twins[:0]), torch.zeros(0), 0.5).shape == (0,)


# ---- the official functions on the same masks ----


@pytest.fixture(scope="module")
def official_perflib():
    from official_ref import official

    official()
    from sam3.perflib import masks_ops, nms

    return masks_ops, nms


@needs_native
@pytest.mark.parametrize("N,M,H,W", [(7, 5, 16, 33), (20, 20, 24, 72), (3, 0, 5, 9)])
def test_iou_equals_official(official_perflib, N, M, H, W):
    masks_ops, _ = official_perflib
    a = blobs(N, H, W, seed=N, empty=[0])
    b = torch.cat([blobs(M - 1, H, W, seed=M), a[1:2]]) if M else blobs(0, H, W, seed=0)
    assert torch.equal(mask_iou(pack_masks(a), pack_masks(b)), masks_ops.mask_iou(a, b))


@needs_native
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thr", [0.1, 0.5, 0.7])
def test_nms_equals_official(official_perflib, seed, thr):
    """sam3fast.mask_ops.nms_masks == sam3.perflib.nms.nms_masks (the detector's video-path NMS) on
    logits, with the official score prefilter; distinct scores (see test_mask_nms_rules for ties)."""
    masks_ops, nms = official_perflib
    N, H, W = 30 + 7 * seed, 24, 37 + seed
    m = blobs(N, H, W, seed=seed, empty=[3, 4], dup=[(0, N - 1)])
    g = torch.Generator().manual_seed(seed)
    logits = torch.where(m, 1.0, -1.0) * (0.5 + torch.rand(N, H, W, generator=g))
    probs = torch.rand(N, generator=g)
    want = nms.nms_masks(probs, logits, 0.3, thr)
    got = nms_masks(probs, logits, 0.3, thr)
    assert torch.equal(got, want)
    assert want.any() and ((probs > 0.3) & ~want).any(), "the case should both keep and suppress"
    # generic_nms_cpu (kept indices) on every mask: same set
    kept = nms.generic_nms_cpu(masks_ops.mask_iou(m, m), probs, thr)
    assert sorted(kept.tolist()) == mask_nms(pack_masks(m), probs, thr).nonzero().flatten().tolist()


@needs_native
def test_nms_threshold_boundary_equals_official(official_perflib):
    """IoU exactly float32(0.1) (1 px of 10): the official keeps both, so must we."""
    _, nms = official_perflib
    m = torch.zeros(3, 2, 40, dtype=torch.bool)
    m[0, 0, :10] = True
    m[1, 0, 0] = True
    m[2, 1, :3] = True
    logits = torch.where(m, 1.0, -1.0)
    probs = torch.tensor([0.9, 0.8, 0.7])
    for thr in (0.1, 0.0999, 0.5):
        assert torch.equal(nms_masks(probs, logits, 0.5, thr), nms.nms_masks(probs, logits, 0.5, thr)), thr
    assert nms.nms_masks(probs, logits, 0.5, 0.1).all()


@needs_native
@pytest.mark.parametrize("seed", range(3))
def test_nms_ties_equal_official_gpu_path(official_perflib, seed):
    """Tied scores: the official GPU fallback (``nms_triton``: stable descending sort, then its
    Triton suppression kernel) keeps the lower index; run that kernel under the Triton interpreter
    (its autotuner needs a driver, so its single-config function is called with nms_triton's own
    preparation steps) and compare."""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    tn = pytest.importorskip("sam3.perflib.triton.nms")
    masks_ops, _ = official_perflib
    m, scores, _ = _nms_case(24, 12, 40, seed=seed, ties=True)
    assert scores.unique().numel() < 24, "the case should have ties"
    thr = 0.3
    ious = masks_ops.mask_iou(m, m)
    order = torch.sort(scores, dim=0, stable=True, descending=True).indices
    iou_mask = (ious > thr)[order][:, order].contiguous()
    keep_sorted = torch.ones(24, dtype=torch.bool)
    tn._nms_suppression_kernel.fn[(1,)](iou_mask, keep_sorted, 24, iou_mask.stride(0), cxpr_block_size=128)
    want = torch.zeros(24, dtype=torch.bool)
    want[order[keep_sorted]] = True
    assert torch.equal(mask_nms(pack_masks(m), scores, thr), want)
    assert want.sum() >= 2 and not want.all()


# ---- op registration: opcheck, fake shapes, torch.compile ----


def _op_args():
    a = pack_masks(blobs(5, 7, 45, seed=11, empty=[2]))
    b = pack_masks(blobs(3, 7, 45, seed=12))
    scores = torch.rand(5, generator=torch.Generator().manual_seed(0))
    return a, b, scores


@needs_native
def test_opcheck():
    a, b, scores = _op_args()
    torch.library.opcheck(torch.ops.sam3fast.mask_areas.default, (a,))
    torch.library.opcheck(torch.ops.sam3fast.mask_iou.default, (a, b))
    torch.library.opcheck(torch.ops.sam3fast.mask_iou.default, (a[:0], b))
    torch.library.opcheck(torch.ops.sam3fast.mask_nms.default, (a, scores, 0.3, None))
    torch.library.opcheck(torch.ops.sam3fast.mask_nms.default, (a, scores, 0.3, scores > 0.5))


@needs_native
def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, b, scores = _op_args()
    with FakeTensorMode() as mode:
        fa, fb, fs = mode.from_tensor(a), mode.from_tensor(b), mode.from_tensor(scores)
        iou = torch.ops.sam3fast.mask_iou(fa, fb)
        areas = torch.ops.sam3fast.mask_areas(fa)
        keep = torch.ops.sam3fast.mask_nms(fa, fs, 0.5, None)
    assert (iou.shape, iou.dtype) == ((5, 3), torch.float32)
    assert (areas.shape, areas.dtype) == ((5,), torch.int64)
    assert (keep.shape, keep.dtype) == ((5,), torch.bool)


@needs_native
def test_compile_fullgraph():
    torch._dynamo.reset()

    def step(logits, probs):
        packed = pack_masks(logits > 0)
        keep = mask_nms(packed, probs, 0.4, valid=probs > 0.2)
        return keep, mask_iou(packed, packed), mask_areas(packed)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 12, 40, generator=g) + torch.linspace(-2, 1, 9).view(9, 1, 1)
    probs = torch.rand(9, generator=g)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(logits, probs), step(logits, probs)):
        assert torch.equal(got, want)


def test_reference_backend_matches_native(monkeypatch):
    """SAM3FAST_FORCE_REFERENCE routes to the pure-PyTorch spec (same answers)."""
    a, b, scores = _op_args()
    native = (mask_iou(a, b), mask_areas(a), mask_nms(a, scores, 0.2))
    monkeypatch.setattr(mask_ops, "FORCE_REFERENCE", True)
    assert mask_ops.mask_ops_backend(a) == ("reference", "SAM3FAST_FORCE_REFERENCE=1")
    ref = (mask_iou(a, b), mask_areas(a), mask_nms(a, scores, 0.2))
    for x, y in zip(native, ref):
        assert torch.equal(x, y)


# ---- bad input ----


def test_bad_inputs():
    a, b, scores = _op_args()
    with pytest.raises(ValueError, match="int32 bit-packed"):
        mask_iou(a.long(), b)
    with pytest.raises(ValueError, match=r"\(N, H, WP\)"):
        mask_areas(a[0])
    with pytest.raises(ValueError, match="same \\(H, WP\\)"):
        mask_iou(a, b[:, :3])
    with pytest.raises(ValueError, match="scores must be a floating \\(5,\\)"):
        mask_nms(a, scores[:4], 0.5)
    with pytest.raises(ValueError, match="scores must be a floating"):
        mask_nms(a, torch.arange(5), 0.5)
    with pytest.raises(ValueError, match="valid must be a bool"):
        mask_nms(a, scores, 0.5, valid=torch.ones(5))
    with pytest.raises(ValueError, match="NaN"):
        mask_nms(a, scores, float("nan"))
    with pytest.raises(ValueError, match="pack_masks expects"):
        pack_masks(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="nms_masks: expects"):
        nms_masks(scores, torch.zeros(4, 3, 3), 0.5, 0.5)


@needs_native
def test_op_rejects_bad_arguments():
    a, b, scores = _op_args()
    with pytest.raises(RuntimeError, match="int32 bit-packed"):
        torch.ops.sam3fast.mask_iou(a.float(), b)
    with pytest.raises(RuntimeError, match="same \\(H, WP\\)"):
        torch.ops.sam3fast.mask_iou(a, b[:, 1:])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.sam3fast.mask_nms(a, scores.double(), 0.5, None)
    with pytest.raises(RuntimeError, match="valid must have 5"):
        torch.ops.sam3fast.mask_nms(a, scores, 0.5, torch.ones(4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="NaN"):
        torch.ops.sam3fast.mask_nms(a, scores, float("nan"), None)


# ---- GPU (skipped without CUDA) ----


@pytest.mark.gpu
@needs_cuda_op
@pytest.mark.parametrize("N,M,H,W", SHAPES + [(200, 200, 288, 288), (64, 48, 1080, 1920), (130, 70, 36, 100)])
def test_cuda_iou_matches_cpu(N, M, H, W):
    a = pack_masks(blobs(N, H, W, seed=N, empty=[0] if N else []))
    b = pack_masks(blobs(M, H, W, seed=M + 1))
    want = mask_iou(a, b)
    got = mask_iou(a.cuda(), b.cuda())
    assert torch.equal(got.cpu(), want)
    assert torch.equal(mask_areas(a.cuda()).cpu(), mask_areas(a))


@pytest.mark.gpu
@needs_cuda_op
@pytest.mark.parametrize("N,H,W", [(1, 4, 4), (7, 10, 31), (33, 17, 70), (200, 288, 288), (700, 64, 64), (20, 1080, 1920)])
@pytest.mark.parametrize("ties", [False, True])
def test_cuda_nms_matches_cpu(N, H, W, ties):
    m, scores, valid = _nms_case(N, H, W, seed=N, ties=ties)
    packed = pack_masks(m)
    for thr in (0.0, 0.1, 0.5, 0.9):
        want = mask_nms(packed, scores, thr, valid)
        got = mask_nms(packed.cuda(), scores.cuda(), thr, valid.cuda())
        assert torch.equal(got.cpu(), want), thr
        assert torch.equal(mask_nms(packed.cuda(), scores.cuda(), thr).cpu(), mask_nms(packed, scores, thr))


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_graph_capture():
    m, scores, valid = _nms_case(150, 72, 72, seed=4)
    packed, scores, valid = pack_masks(m).cuda(), scores.cuda(), valid.cuda()
    want = (mask_nms(packed, scores, 0.3, valid), mask_iou(packed, packed))
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):  # fails if an op synchronises with the host
        out = (mask_nms(packed, scores, 0.3, valid), mask_iou(packed, packed))
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(out, want):
        assert torch.equal(x, y)
