"""The fused mask post-processing kernel (``sam3fast.kernels.mask_postprocess``) against its float64
reference, plus the ``sam3fast::mask_postprocess`` op (opcheck, torch.compile) and the
``sam3fast.ops`` entry point.

On CPU the Triton launcher runs under ``TRITON_INTERPRET=1`` (set by conftest.py). Outputs are
binary, so "close" means: equal at every pixel whose float64 upsampled logit is not within
``AMBIG`` of 0 for any active object (a float32 rounding can flip those, and through the
non-overlap rule the flip of one object moves that pixel for the others); boxes and areas must
always be exactly those of the kernel's own masks, and equal to the reference's where no pixel is
ambiguous. Each shape asserts there is something to compare (objects non-empty, overlaps present).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import capture_graph, forced_reference_stdout, run_compiled

from sam3fast import ops
from sam3fast.kernels import mask_postprocess as mp

POISON = 0x5A5A5A5A  # neither 0 nor -1: a word the kernel failed to write cannot pass
AMBIG = 1e-5  # float32 interpolation error is ~1e-6 for logits of magnitude ~5
INTERP_TILE = dict(block_h=32, block_words=4)  # the interpreter pays per program iteration: large tiles

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not mp.HAS_TRITON, reason=f"triton not importable: {mp.TRITON_IMPORT_ERROR}")


def _inputs(N, h, w, seed, dtype=torch.float32, device="cpu"):
    """Per-object offsets from mostly-background to mostly-foreground, so areas differ and
    objects overlap; distinct scores with a tie between objects 0 and 1; object 2 inactive."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.linspace(-1.5, 1.0, N).view(N, 1, 1) if N > 1 else torch.zeros(1, 1, 1)
    masks = torch.randn(N, h, w, generator=g) * 3 + offsets
    scores = torch.rand(N, generator=g)
    if N > 1:
        scores[1] = scores[0]
    active = torch.ones(N, dtype=torch.bool)
    if N > 2:
        active[2] = False
    return masks.to(dtype=dtype, device=device), scores.to(device), active.to(device)


def _non_overlap_loop(fg, scores):
    """The rule written the slow obvious way: objects in (score desc, index asc) order claim what is
    still unclaimed. Independent of the reference's rank/argmax formulation."""
    N = fg.shape[0]
    order = sorted(range(N), key=lambda n: (-float(scores[n]), n))
    claimed = torch.zeros_like(fg[0])
    out = torch.zeros_like(fg)
    for n in order:
        out[n] = fg[n] & ~claimed
        claimed |= fg[n]
    return out


def _run_kernel(masks, scores, active, H, W, non_overlap, **launch):
    N = masks.shape[0]
    packed = torch.full((N, H, (W + 31) // 32), POISON, dtype=torch.int32, device=masks.device)
    out = mp._mask_postprocess_triton(masks, scores, active, H, W, non_overlap, packed=packed, **launch)
    assert out[0].data_ptr() == packed.data_ptr()
    return out


def _check(masks, scores, active, H, W, non_overlap, **launch):
    """Kernel vs the float64 reference; returns the number of ambiguous pixels, the float64
    foreground and the kernel's outputs."""
    N = masks.shape[0]
    packed, boxes, areas = _run_kernel(masks, scores, active, H, W, non_overlap, **launch)
    assert packed.shape == (N, H, (W + 31) // 32) and packed.dtype == torch.int32
    assert boxes.shape == (N, 4) and boxes.dtype == torch.int32
    assert areas.shape == (N,) and areas.dtype == torch.int64

    m64 = masks.double().cpu()
    s, a = scores.cpu(), active.cpu()
    ref_packed, ref_boxes, ref_areas = mp.mask_postprocess_ref(m64, s, a, H, W, non_overlap)
    logits = F.interpolate(m64.unsqueeze(1), size=(H, W), mode="bilinear", align_corners=False).squeeze(1)
    fg = (logits > 0) & a.view(N, 1, 1)
    # The reference is itself checked against the rule written as a loop.
    expect = _non_overlap_loop(fg, s) if non_overlap else fg
    ref = mp.unpack_masks(ref_packed, W)
    assert torch.equal(ref, expect)

    got = mp.unpack_masks(packed.cpu(), W)
    ambiguous = ((logits.abs() < AMBIG) & a.view(N, 1, 1)).any(dim=0)
    bad = (got != ref) & ~ambiguous
    assert not bad.any(), f"{int(bad.sum())} pixels differ outside the {int(ambiguous.sum())} ambiguous ones"
    # Every word written, padding bits past W zero: repacking the unpacked masks gives the same words.
    assert torch.equal(mp._pack_bits(got), packed.cpu())
    own_boxes, own_areas = mp._boxes_areas(got)
    assert torch.equal(boxes.cpu(), own_boxes) and torch.equal(areas.cpu(), own_areas)
    if not ambiguous.any():
        assert torch.equal(packed.cpu(), ref_packed)
        assert torch.equal(boxes.cpu(), ref_boxes) and torch.equal(areas.cpu(), ref_areas)
    return int(ambiguous.sum()), fg, (packed, boxes, areas)


# (N, h, w, H, W): odd sizes, W not a multiple of 32 or of the tile, up- and down-sampling.
SHAPES = [
    (1, 7, 9, 37, 45),  # up
    (3, 16, 16, 50, 70),  # up
    (5, 40, 40, 29, 100),  # down in H, up in W, 4 words a row
    (3, 40, 33, 17, 20),  # down both, a single partial word
    (5, 9, 7, 64, 33),  # 2 words, the second holds one pixel
    (3, 16, 16, 16, 16),  # same size
    (1, 1, 1, 5, 40),  # a 1x1 grid: every output pixel is the one value
]


@needs_triton
@pytest.mark.parametrize("non_overlap", [False, True], ids=["overlap", "non_overlap"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(shape, non_overlap):
    N, h, w, H, W = shape
    masks, scores, active = _inputs(N, h, w, seed=sum(shape))
    if shape[1:3] == (1, 1):
        masks.fill_(0.75)
    n_ambig, fg, _ = _check(masks, scores, active, H, W, non_overlap, **INTERP_TILE)
    assert n_ambig < 0.001 * H * W
    assert fg[active].flatten(1).any(dim=1).all(), "an active object is empty: the test proves little"
    if N >= 3 and not non_overlap:
        assert (fg.sum(dim=0) > 1).any(), "no overlap between objects: non-overlap is untested here"


@needs_triton
@pytest.mark.parametrize(
    "tile, size",
    [((1, 1, 1), (9, 70)), ((4, 1, 4), (21, 100)), ((16, 2, 4), (45, 100)), ((8, 4, 8), (45, 100))],
    ids=["1x1", "4x1", "16x2", "gpu-default"],
)
def test_kernel_tilings(tile, size):
    """Several programs per row and column, partial tiles in both directions, the GPU default."""
    bh, bk, nw = tile
    masks, scores, active = _inputs(5, 12, 20, seed=7)
    _check(masks, scores, active, *size, True, block_h=bh, block_words=bk, num_warps=nw)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kernel_low_precision_inputs(dtype):
    # The kernel only loads and converts these (no bf16 arithmetic, which the interpreter lacks).
    masks, scores, active = _inputs(3, 16, 16, seed=3, dtype=dtype)
    _check(masks, scores, active, 50, 70, True, **INTERP_TILE)


@needs_triton
def test_kernel_exact_dyadic():
    """2x upsampling of small integers is exact in float32: kernel, float32 and float64 references
    agree bit for bit, and exact zeros (a +1/-1 midpoint) are background."""
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(-3, 4, (3, 12, 10), generator=g).float()
    scores = torch.tensor([0.5, 0.9, 0.5])
    active = torch.ones(3, dtype=torch.bool)
    H, W = 24, 20
    logits = F.interpolate(masks.unsqueeze(1), size=(H, W), mode="bilinear", align_corners=False)
    assert (logits == 0).any()
    for non_overlap in (False, True):
        got = _run_kernel(masks, scores, active, H, W, non_overlap, **INTERP_TILE)
        r32 = mp.mask_postprocess_ref(masks, scores, active, H, W, non_overlap)
        r64 = mp.mask_postprocess_ref(masks.double(), scores, active, H, W, non_overlap)
        for x, y, z in zip(got, r32, r64):
            assert torch.equal(x, y) and torch.equal(x, z)


@needs_triton
def test_kernel_ties_and_inactive():
    masks = torch.ones(5, 4, 4)  # every object covers every pixel
    scores = torch.tensor([0.2, 0.7, 0.9, 0.7, 0.9])
    active = torch.tensor([True, True, False, True, True])
    H, W = 6, 35
    packed, boxes, areas = _run_kernel(masks, scores, active, H, W, True, **INTERP_TILE)
    # 2 is inactive; 4 has the top score among the active ones and takes everything.
    assert areas.tolist() == [0, 0, 0, 0, H * W]
    assert boxes.tolist() == [[-1] * 4] * 4 + [[0, 0, W - 1, H - 1]]
    scores[4] = 0.7  # a three-way tie 1 = 3 = 4: the lowest index wins
    packed, boxes, areas = _run_kernel(masks, scores, active, H, W, True, **INTERP_TILE)
    assert areas.tolist() == [0, H * W, 0, 0, 0]
    # A -inf score still claims what nobody else wants.
    scores = torch.tensor([float("-inf"), 0.5, 0.5, 0.5, 0.5])
    active = torch.tensor([True, False, False, False, False])
    packed, boxes, areas = _run_kernel(masks, scores, active, H, W, True, **INTERP_TILE)
    assert areas.tolist() == [H * W, 0, 0, 0, 0]
    # Without non-overlap every active object keeps everything; the inactive one nothing.
    active = torch.tensor([True, False, True, True, True])
    packed, boxes, areas = _run_kernel(masks, scores, active, H, W, False, **INTERP_TILE)
    assert areas.tolist() == [H * W, 0, H * W, H * W, H * W]
    words = mp.unpack_masks(packed, W)
    assert words[0].all() and not words[1].any()
    assert (packed[0, :, 0] == -1).all() and (packed[0, :, 1] == 0b111).all()  # 35 = 32 + 3 pixels


@needs_triton
def test_kernel_empty_and_zero_objects():
    masks = -torch.rand(3, 9, 9) - 0.1
    scores, active = torch.rand(3), torch.ones(3, dtype=torch.bool)
    for non_overlap in (False, True):
        packed, boxes, areas = _run_kernel(masks, scores, active, 13, 40, non_overlap, **INTERP_TILE)
        assert (packed == 0).all() and (boxes == -1).all() and (areas == 0).all()
        packed, boxes, areas = _run_kernel(masks.abs(), scores, torch.zeros(3, dtype=torch.bool), 13, 40, non_overlap)
        assert (packed == 0).all() and (boxes == -1).all() and (areas == 0).all()
    packed, boxes, areas = mp._mask_postprocess_triton(masks[:0], scores[:0], active[:0], 13, 40, True)
    assert packed.shape == (0, 13, 2) and boxes.shape == (0, 4) and areas.shape == (0,)


# ---- the skip of (object, tile) pairs that cannot hold foreground ------------------------------


def _compact_inputs(h, w, seed, integer=False, dtype=torch.float32):
    """Nine objects made to stress the skip: blobs in two corners, a single positive low-res pixel on
    the border, one with no positive logit (but exact zeros), an inactive one, a positive pixel ringed
    by exact zeros, a random interior blob, a random single pixel, a one-column strip. ``integer``:
    small integers (with a dyadic scale factor the interpolation is exact)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    N = 9
    if integer:
        bg = -torch.randint(1, 4, (N, h, w), generator=g).float()
        fg = torch.randint(1, 4, (N, h, w), generator=g).float()
    else:
        bg = -(torch.rand(N, h, w, generator=g) * 4 + 0.05)
        fg = torch.rand(N, h, w, generator=g) * 4 + 0.05
    masks = bg.clone()

    def put(n, r0, r1, c0, c1):
        masks[n, r0:r1 + 1, c0:c1 + 1] = fg[n, r0:r1 + 1, c0:c1 + 1]

    r1, c1 = rnd(0, (h - 1) // 2), rnd(0, (w - 1) // 2)
    masks[0, : r1 + 2, : c1 + 2] = 0  # exact zeros just outside the blob
    put(0, 0, r1, 0, c1)
    put(1, rnd(h // 2, h - 1), h - 1, rnd(w // 2, w - 1), w - 1)
    c = rnd(0, w - 1)
    put(2, h - 1, h - 1, c, c)
    masks[3][torch.rand(h, w, generator=g) < 0.3] = 0
    masks[4] = fg[4]
    r, c = rnd(0, h - 1), rnd(0, w - 1)
    masks[5, max(r - 1, 0): r + 2, max(c - 1, 0): c + 2] = 0
    put(5, r, r, c, c)
    r0, c0 = rnd(0, h - 1), rnd(0, w - 1)
    put(6, r0, rnd(r0, h - 1), c0, rnd(c0, w - 1))
    r, c = rnd(0, h - 1), rnd(0, w - 1)
    put(7, r, r, c, c)
    put(8, 0, h - 1, 0, 0)
    scores = torch.rand(N, generator=g)
    scores[6] = scores[0]
    active = torch.ones(N, dtype=torch.bool)
    active[4] = False
    return masks.to(dtype), scores, active


def _positive_boxes_brute(masks, active):
    """(N, 4) first row, last row, first column, last column of masks[n] > 0 by a loop over objects;
    h, -1, w, -1 where there is none or the object is inactive."""
    N, h, w = masks.shape
    out = []
    for n in range(N):
        idx = (masks[n].float() > 0).nonzero()
        if not active[n] or len(idx) == 0:
            out.append([h, -1, w, -1])
        else:
            out.append([int(idx[:, 0].min()), int(idx[:, 0].max()), int(idx[:, 1].min()), int(idx[:, 1].max())])
    return torch.tensor(out, dtype=torch.int32)


def _taps(n_in, n_out):
    """(i0, i1) source taps of every output index: the module docstring's float32 formula."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    s = torch.clamp(scale * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5, min=0)
    i0 = s.to(torch.int32).clamp(max=n_in - 1)
    return i0, torch.where(i0 < n_in - 1, i0 + 1, i0)


def _pairs_skipped(masks, active, H, W, block_h, block_words):
    """(skipped, evaluated) (active object, tile) pairs by the rule the kernel applies, so a test can
    show its inputs take both branches."""
    N, h, w = masks.shape
    box = _positive_boxes_brute(masks, active)
    y0, y1 = _taps(h, H)
    x0, x1 = _taps(w, W)
    skipped = evaluated = 0
    for ty in range(0, H, block_h):
        rows = slice(ty, min(ty + block_h, H))
        for tx in range(0, W, 32 * block_words):
            cols = slice(tx, min(tx + 32 * block_words, W))
            lo_y, hi_y, lo_x, hi_x = int(y0[rows].min()), int(y1[rows].max()), int(x0[cols].min()), int(x1[cols].max())
            for n in range(N):
                if active[n]:
                    r_lo, r_hi, c_lo, c_hi = box[n].tolist()
                    meets = r_lo <= hi_y and r_hi >= lo_y and c_lo <= hi_x and c_hi >= lo_x
                    skipped, evaluated = skipped + (not meets), evaluated + meets
    return skipped, evaluated


@needs_triton
@pytest.mark.parametrize(
    "shape", [(7, 13), (20, 600), (9, 1000), (1, 1), (300, 3)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_positive_boxes_brute_force(shape, dtype):
    """The pre-kernel's boxes (several row blocks and column chunks merged by atomics for the wide
    shapes) against a loop; NaN and -inf are not positive, +inf is."""
    h, w = shape
    masks, _, active = _compact_inputs(h, w, seed=h * w, dtype=dtype)
    g = torch.Generator().manual_seed(w)
    noisy = torch.randn(3, h, w, generator=g).to(dtype)
    noisy[0].view(-1)[torch.randint(0, h * w, (3,), generator=g)] = float("nan")
    noisy[1] = -noisy[1].abs()
    noisy[1].view(-1)[torch.randint(0, h * w, (2,), generator=g)] = float("-inf")
    noisy[1].view(-1)[torch.randint(0, h * w, (1,), generator=g)] = float("inf")
    masks = torch.cat([masks, noisy])
    active = torch.cat([active, torch.ones(3, dtype=torch.bool)])
    pbox = mp._positive_boxes(masks, active)
    assert pbox.shape == (masks.shape[0], 4) and pbox.dtype == torch.int32
    got = torch.stack([h - pbox[:, 0], pbox[:, 1] - 1, w - pbox[:, 2], pbox[:, 3] - 1], dim=1)
    want = _positive_boxes_brute(masks, active)
    assert torch.equal(got, want)
    assert (want[:, 1] == -1).any() and (want[:, 1] >= 0).any()
    assert mp._positive_boxes(masks[:0], active[:0]).shape == (0, 4)


# (h, w, H, W): up, down in both, down in H and up in W, same size, a one-row grid.
SKIP_SHAPES = [(7, 13, 37, 70), (40, 33, 17, 20), (24, 40, 11, 100), (13, 13, 13, 13), (1, 9, 6, 40)]


@needs_triton
@pytest.mark.parametrize("tile", [(32, 4), (4, 1), (2, 2)], ids=lambda t: f"{t[0]}x{t[1] * 32}")
@pytest.mark.parametrize("non_overlap", [False, True], ids=["overlap", "non_overlap"])
@pytest.mark.parametrize("shape", SKIP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_skip_compact(shape, non_overlap, tile):
    """Compact objects at the borders and corners: the reference's masks (exactly where no pixel is
    ambiguous) and, bit for bit, the kernel's own outputs with the skip turned off."""
    h, w, H, W = shape
    bh, bk = tile
    masks, scores, active = _compact_inputs(h, w, seed=sum(shape) + bh)
    skipped, evaluated = _pairs_skipped(masks, active, H, W, bh, bk)
    assert skipped > 0 and evaluated > 0, (skipped, evaluated)
    _, _, got = _check(masks, scores, active, H, W, non_overlap, block_h=bh, block_words=bk)
    full = _run_kernel(masks, scores, active, H, W, non_overlap, block_h=bh, block_words=bk, skip_empty=False)
    for x, y in zip(got, full):
        assert torch.equal(x, y)
    assert (got[2][active] > 0).sum() >= 3 and (got[2][~active] == 0).all()


@needs_triton
@pytest.mark.parametrize("shape", [(7, 13, 14, 26), (6, 10, 24, 40), (12, 14, 6, 7)], ids=["up2", "up4", "down2"])
def test_kernel_skip_exact_dyadic(shape):
    """Integer logits and power-of-two scales: every interpolated logit is exact, ties at 0
    included, so the kernel equals the float32 and float64 references bit for bit, with and without
    the skip, for both rules and several tiles."""
    h, w, H, W = shape
    masks, scores, active = _compact_inputs(h, w, seed=h + w, integer=True)
    logits = F.interpolate(masks.unsqueeze(1), size=(H, W), mode="bilinear", align_corners=False)
    assert (logits == 0).any()
    for non_overlap in (False, True):
        r32 = mp.mask_postprocess_ref(masks, scores, active, H, W, non_overlap)
        r64 = mp.mask_postprocess_ref(masks.double(), scores, active, H, W, non_overlap)
        for (bh, bk), skip in [((32, 4), True), ((4, 1), True), ((32, 4), False)]:
            got = _run_kernel(masks, scores, active, H, W, non_overlap, block_h=bh, block_words=bk, skip_empty=skip)
            for x, y, z in zip(got, r32, r64):
                assert torch.equal(x, y) and torch.equal(x, z)


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's 0 * inf
@pytest.mark.parametrize("non_overlap", [False, True], ids=["overlap", "non_overlap"])
def test_kernel_skip_nonfinite(non_overlap):
    """NaN and infinite logits: a skipped pair is background exactly when the full evaluation says
    so (NaN and -inf taps are not positive and give NaN or <= 0; +inf is inside the box)."""
    masks, scores, active = _compact_inputs(7, 13, seed=3)
    g = torch.Generator().manual_seed(4)
    for value in (float("nan"), float("-inf"), float("inf")):
        n = int(torch.randint(0, 9, (1,), generator=g))
        masks[n].view(-1)[torch.randint(0, 7 * 13, (2,), generator=g)] = value
    got = _run_kernel(masks, scores, active, 21, 40, non_overlap, block_h=4, block_words=1)
    full = _run_kernel(masks, scores, active, 21, 40, non_overlap, block_h=4, block_words=1, skip_empty=False)
    for x, y in zip(got, full):
        assert torch.equal(x, y)


@needs_triton
@pytest.mark.parametrize("non_overlap", [False, True], ids=["overlap", "non_overlap"])
@pytest.mark.parametrize(
    "block_n, tile", [(None, (8, 2)), (16, (4, 2)), (2, (16, 1))], ids=["default", "16", "2"]
)
def test_list_schedule_chunks(block_n, tile, non_overlap):
    """The list schedule over 72 compact objects in chunks (64 + 8 by default, 16 + 16 + 16 + 16 + 8,
    or 36 chunks of 2), objects 63 and 64 (bit 63 of a chunk, the sign bit, and
    the first of the next) live: bit for bit the scan schedule's outputs and the no-skip kernel's,
    and the reference's where no pixel is ambiguous."""
    h, w, H, W = 9, 15, 23, 70
    parts = [_compact_inputs(h, w, seed=40 + k) for k in range(8)]
    masks = torch.cat([p[0] for p in parts])
    scores = torch.cat([p[1] for p in parts])
    active = torch.cat([p[2] for p in parts])
    scores[64] = scores[63]  # a tie across chunks: the lower index must win
    for n in (63, 64):  # both cover the whole grid, so they meet every tile and overlap each other
        masks[n] = masks[n].abs() + 0.5
        active[n] = True
    bh, bk = tile
    skipped, evaluated = _pairs_skipped(masks, active, H, W, bh, bk)
    assert skipped > 0 and evaluated > 0, (skipped, evaluated)
    launch = dict(block_h=bh, block_words=bk)
    _, _, got = _check(masks, scores, active, H, W, non_overlap, schedule="list", block_n=block_n, **launch)
    scan = _run_kernel(masks, scores, active, H, W, non_overlap, schedule="scan", **launch)
    full = _run_kernel(masks, scores, active, H, W, non_overlap, skip_empty=False, **launch)
    for x, y, z in zip(got, scan, full):
        assert torch.equal(x, y) and torch.equal(x, z)
    areas = got[2]
    if non_overlap:  # 63 wins every pixel over 64 (same score, lower index) unless a higher score has it
        assert areas[63] > 0 and areas[63] > areas[64]
    else:
        assert areas[63] == areas[64] == H * W


@needs_triton
def test_list_schedule_refusals():
    masks, scores, active = _inputs(3, 8, 8, seed=0)
    with pytest.raises(ValueError, match="schedule"):
        mp._mask_postprocess_triton(masks, scores, active, 10, 10, True, schedule="tiles")
    with pytest.raises(ValueError, match="block_n must be at most 64"):
        mp._mask_postprocess_triton(masks, scores, active, 10, 10, True, block_n=128)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        mp._mask_postprocess_triton(masks, scores, active, 10, 10, True, block_n=3)


def test_bit_layout():
    """Bit j of word k is pixel 32 k + j, little-endian within the int32 word."""
    keep = torch.zeros(1, 2, 70, dtype=torch.bool)
    keep[0, 0, 0] = keep[0, 0, 31] = keep[0, 1, 33] = keep[0, 1, 69] = True
    packed = mp._pack_bits(keep)
    assert packed.tolist() == [[[1 - 2**31, 0, 0], [0, 2, 1 << 5]]]
    assert torch.equal(mp.unpack_masks(packed, 70), keep)
    boxes, areas = mp._boxes_areas(keep)
    assert boxes.tolist() == [[0, 0, 69, 1]] and areas.tolist() == [4]


def test_reference_float32_matches_float64():
    """The op's CPU kernel (the float32 reference) against the same spec in float64."""
    masks, scores, active = _inputs(5, 24, 20, seed=11)
    logits = F.interpolate(masks.double().unsqueeze(1), size=(61, 47), mode="bilinear", align_corners=False)
    assert (logits.abs() < AMBIG).sum() == 0  # so the comparison below is exact
    for non_overlap in (False, True):
        r32 = mp.mask_postprocess_ref(masks, scores, active, 61, 47, non_overlap)
        r64 = mp.mask_postprocess_ref(masks.double(), scores, active, 61, 47, non_overlap)
        for x, y in zip(r32, r64):
            assert torch.equal(x, y)


def test_bad_inputs():
    masks, scores, active = _inputs(3, 8, 8, seed=0)
    with pytest.raises(ValueError, match="active"):
        mp.mask_postprocess_ref(masks, scores, active.float(), 10, 10, False)
    with pytest.raises(ValueError, match="scores"):
        mp.mask_postprocess_ref(masks, scores[:2], active, 10, 10, False)
    with pytest.raises(ValueError, match="output size"):
        mp.mask_postprocess_ref(masks, scores, active, 0, 10, False)
    with pytest.raises(ValueError, match="masks"):
        mp.mask_postprocess_ref(masks[0], scores, active, 10, 10, False)


def test_non_overlap_and_boxes_match_official():
    """The official rule: ``Sam3TrackerPredictor._apply_object_wise_non_overlapping_constraints`` on the
    binary video-resolution masks (background 0, as ``Sam3VideoInference._postprocess_output`` calls
    it) and ``sam3.perflib.masks_ops.masks_to_boxes`` / torchvision's. Same masks for scores in
    (0, 1] with ties; the official drops every pixel of an object whose score is <= 0 (not a case for
    its probabilities), and gives empty masks the box (W, H, 0, 0) where we give -1s."""
    from official_ref import official

    official()
    from sam3.model.sam3_tracking_predictor import Sam3TrackerPredictor
    from sam3.perflib.masks_ops import masks_to_boxes as perf_masks_to_boxes
    from torchvision.ops import masks_to_boxes as tv_masks_to_boxes

    tracker = object.__new__(Sam3TrackerPredictor)  # the method needs no module state
    N, H, W = 6, 37, 53
    masks, scores, _ = _inputs(N, 16, 16, seed=12)
    scores[3] = scores[2]
    active = torch.ones(N, dtype=torch.bool)
    binary = F.interpolate(masks.unsqueeze(1), size=(H, W), mode="bilinear", align_corners=False) > 0
    theirs = tracker._apply_object_wise_non_overlapping_constraints(binary, scores.unsqueeze(1), background_value=0)
    theirs = theirs.squeeze(1) > 0
    assert (binary.squeeze(1).sum(0) > 1).any() and theirs.flatten(1).any(1).all()
    packed, boxes, areas = _run_kernel(masks, scores, active, H, W, True, **INTERP_TILE)
    assert torch.equal(mp.unpack_masks(packed, W), theirs)
    assert torch.equal(boxes.float(), perf_masks_to_boxes(theirs, list(range(N))))
    assert torch.equal(boxes.float(), tv_masks_to_boxes(theirs))


def _op_args(non_overlap):
    masks, scores, active = _inputs(3, 9, 11, seed=5)
    return (masks, scores, active, 23, 37, non_overlap)


@pytest.mark.parametrize("non_overlap", [False, True])
def test_opcheck(non_overlap):
    torch.library.opcheck(torch.ops.sam3fast.mask_postprocess.default, _op_args(non_overlap))


def test_op_cpu_is_reference():
    args = _op_args(True)
    for x, y in zip(torch.ops.sam3fast.mask_postprocess(*args), mp.mask_postprocess_ref(*args)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    """A caller of the op and one of ``ops.mask_postprocess`` compile with no graph break."""

    def via_op(masks, scores, active):
        packed, boxes, areas = torch.ops.sam3fast.mask_postprocess(masks, scores, active, 23, 37, True)
        return packed, boxes + 1, areas * 2

    def via_ops(masks, scores, active):
        out = ops.mask_postprocess(masks * 2.0, scores, (23, 37), active, non_overlap=True)
        return out.packed, out.boxes + 1, out.areas * 2

    masks, scores, active = _op_args(True)[:3]
    torch._dynamo.reset()
    for fn in (via_op, via_ops):
        got = torch.compile(fn, fullgraph=True, backend=backend)(masks, scores, active)
        want = fn(masks, scores, active)
        for x, y in zip(got, want):
            assert torch.equal(x, y)


def test_ops_entry_point_cpu():
    masks, scores, active = _inputs(3, 9, 11, seed=2)
    assert ops.mask_postprocess_backend(masks)[0] == "reference"
    out = ops.mask_postprocess(masks, scores, (23, 37), active, non_overlap=True)
    for x, y in zip(out, mp.mask_postprocess_ref(masks, scores, active, 23, 37, True)):
        assert torch.equal(x, y)
    all_active = ops.mask_postprocess(masks, scores, (23, 37))
    ref = mp.mask_postprocess_ref(masks, scores, torch.ones(3, dtype=torch.bool), 23, 37, False)
    assert torch.equal(all_active.packed, ref[0]) and torch.equal(all_active.areas, ref[2])


def test_force_reference_env():
    code = (
        "import torch, sam3fast.ops as o; "
        "print(o.FORCE_REFERENCE, o.mask_postprocess_backend(torch.zeros(1, 2, 2))[1])"
    )
    out = forced_reference_stdout(code)
    assert out.strip() == "True SAM3FAST_FORCE_REFERENCE=1"


@needs_triton
def test_kernel_compiles_for_sm90():
    """The real (not interpreted) Triton compiler builds every variant for an H100 without a GPU,
    so a frontend or type error of the GPU path fails here rather than on the first GPU run."""
    code = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from sam3fast.kernels import mask_postprocess as mp
        T = GPUTarget("cuda", 90, 32)
        for dt in ("bf16", "fp32"):
            for no in (False, True):
                for skip in (False, True):
                    sig = {"masks_ptr": "*" + dt, "scores_ptr": "*fp32", "active_ptr": "*u8", "pbox_ptr": "*i32",
                           "packed_ptr": "*i32", "stats_ptr": "*i32", "N": "i32", "h": "i32", "w": "i32",
                           "H": "i32", "W": "i32", "WP": "i32", "scale_h": "fp32", "scale_w": "fp32"}
                    cx = {"NON_OVERLAP": no, "SKIP_EMPTY": skip, "BLOCK_H": 8, "BLOCK_WORDS": 4}
                    sig.update({n: "constexpr" for n in cx})
                    src = triton.compiler.ASTSource(fn=mp._mask_postprocess_kernel, signature=sig, constexprs=cx)
                    k = triton.compile(src, target=T, options={"num_warps": 8})
                    assert k.asm["ptx"].count("atom.global") == 5, "expected 5 predicated scalar atomics"
            for no in (False, True):
                sig = {"masks_ptr": "*" + dt, "scores_ptr": "*fp32", "pbox_ptr": "*i32", "packed_ptr": "*i32",
                       "stats_ptr": "*i32", "N": "i32", "h": "i32", "w": "i32", "H": "i32", "W": "i32",
                       "WP": "i32", "scale_h": "fp32", "scale_w": "fp32"}
                cx = {"NON_OVERLAP": no, "BLOCK_H": 8, "BLOCK_WORDS": 2, "BLOCK_N": 64}
                sig.update({n: "constexpr" for n in cx})
                src = triton.compiler.ASTSource(fn=mp._mask_postprocess_list_kernel, signature=sig, constexprs=cx)
                k = triton.compile(src, target=T, options={"num_warps": 4})
                assert k.asm["ptx"].count("atom.global") == 5, "expected 5 predicated scalar atomics (list)"
            sig = {"masks_ptr": "*" + dt, "active_ptr": "*u8", "pbox_ptr": "*i32", "h": "i32", "w": "i32",
                   "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
            src = triton.compiler.ASTSource(fn=mp._positive_box_kernel, signature=sig,
                                            constexprs={"BLOCK_R": 8, "BLOCK_C": 512})
            k = triton.compile(src, target=T, options={"num_warps": 4})
            assert k.asm["ptx"].count("atom.global") == 4, "expected 4 predicated scalar atomics (the box)"
        sig = {"stats_ptr": "*i32", "boxes_ptr": "*i32", "areas_ptr": "*i64", "N": "i32", "H": "i32", "W": "i32",
               "BLOCK": "constexpr"}
        src = triton.compiler.ASTSource(fn=mp._finalize_kernel, signature=sig, constexprs={"BLOCK": 128})
        triton.compile(src, target=T, options={"num_warps": 4})
        print("ok")
        """
    )
    run_compiled(code)


# ---- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("non_overlap", [False, True])
def test_gpu_real_shape_bf16(non_overlap):
    """bf16 logits at the real sizes: 64 objects, 288 x 288 -> 1080 x 1920."""
    masks, scores, active = _inputs(64, 288, 288, seed=1, dtype=torch.bfloat16, device="cuda")
    H, W = 1080, 1920
    packed, boxes, areas = torch.ops.sam3fast.mask_postprocess(masks, scores, active, H, W, non_overlap)
    ref_packed, ref_boxes, ref_areas = mp.mask_postprocess_ref(masks.double(), scores, active, H, W, non_overlap)
    f32_packed, _, _ = mp.mask_postprocess_ref(masks.float(), scores, active, H, W, non_overlap)
    got, ref = mp.unpack_masks(packed, W), mp.unpack_masks(ref_packed, W)
    # At 288 -> 1080 x 1920 float32 source coordinates ((h / H)(y + 0.5) - 0.5) are off by up to
    # ~3e-6 pixels, which moves logits by more than the AMBIG band used at small sizes (on an H200
    # the kernel flipped pixels outside it): held to the house rule instead, its pixels that
    # differ from the float64 answer at most twice those of PyTorch's own float32 interpolation.
    wrong = int((got != ref).sum())
    wrong_torch = int((mp.unpack_masks(f32_packed, W) != ref).sum())
    assert wrong <= 2 * wrong_torch + 16, (wrong, wrong_torch)
    assert wrong < 1e-5 * got.numel(), wrong
    own_boxes, own_areas = mp._boxes_areas(got)
    assert torch.equal(boxes, own_boxes) and torch.equal(areas, own_areas)
    assert (areas[~active] == 0).all()
    # The op's list schedule equals the scan schedule and the kernel without the skip, bit for bit.
    for launch in (dict(schedule="scan"), dict(skip_empty=False)):
        other = mp._mask_postprocess_triton(masks, scores, active, H, W, non_overlap, **launch)
        for x, y in zip((packed, boxes, areas), other):
            assert torch.equal(x, y), launch
    if non_overlap:  # disjoint masks; 64 noisy overlapping objects: low scorers may keep nothing
        assert (got.sum(dim=0) <= 1).all() and (areas[active] > 0).sum() >= 8
    else:
        assert (areas[active] > 0).all()


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_cuda_graph_replay():
    masks, scores, active = _inputs(16, 288, 288, seed=4, dtype=torch.bfloat16, device="cuda")
    H, W = 720, 1280
    static = [masks.clone(), scores.clone(), active.clone()]
    assert ops.mask_postprocess_backend(static[0])[0] == "triton"
    fn = lambda: ops.mask_postprocess(static[0], static[1], (H, W), static[2], non_overlap=True)  # noqa: E731
    graph, out = capture_graph(fn)
    for seed in (5, 6):
        new_masks, new_scores, new_active = _inputs(16, 288, 288, seed=seed, dtype=torch.bfloat16, device="cuda")
        static[0].copy_(new_masks)
        static[1].copy_(new_scores)
        static[2].copy_(new_active)
        graph.replay()
        want = mp._mask_postprocess_triton(new_masks, new_scores, new_active, H, W, True)
        for x, y in zip(out, want):
            assert torch.equal(x, y)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_compile_inductor():
    masks, scores, active = _inputs(8, 288, 288, seed=8, dtype=torch.bfloat16, device="cuda")

    def fn(m, s, a):
        return ops.mask_postprocess(m, s, (1080, 1920), a, non_overlap=True)

    got = torch.compile(fn, fullgraph=True)(masks, scores, active)
    want = fn(masks, scores, active)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
