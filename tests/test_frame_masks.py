"""FrameMasks (a frame's video-resolution masks held as low-res logits) and the video model's
fused output path (``Sam3VideoInference._postprocess_low_res``), against the official-port path on
the same masks made eagerly (``_postprocess_launch`` on a plain dict), which the video parity
tests hold to the official package."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam3fast.video.frame_masks import FrameMasks, resize_threshold, to_device_async
from sam3fast.video.host_channel import HostChannel
from sam3fast.video.inference import Sam3VideoInference

CUDA = torch.cuda.is_available()


def _blobs(n, h, w, gen, dtype=torch.float32, device="cpu", empty=()):
    """(n, h, w) logits: overlapping elliptic blobs (positive inside) plus noise; rows ``empty``
    all negative."""
    ys = torch.arange(h, dtype=torch.float64).view(h, 1)
    xs = torch.arange(w, dtype=torch.float64).view(1, w)
    out = []
    for i in range(n):
        cy, cx = torch.rand(2, generator=gen, dtype=torch.float64) * torch.tensor([h, w])
        ry, rx = 2 + torch.rand(2, generator=gen, dtype=torch.float64) * torch.tensor([h / 2, w / 2])
        d = 1 - ((ys - cy) / ry) ** 2 - ((xs - cx) / rx) ** 2
        m = 6 * d + 0.3 * torch.randn(h, w, generator=gen, dtype=torch.float64)
        out.append(-1 - m.abs() if i in empty else m)
    return torch.stack(out).to(dtype=dtype, device=device)


class _Model:
    """The two output methods of the video model on their own (they read ``rank`` and send their
    outputs to the host on ``host_channel``)."""
    rank = 0

    def __init__(self):
        self.host_channel = HostChannel()

    _postprocess_launch = Sam3VideoInference._postprocess_launch
    _postprocess_low_res = Sam3VideoInference._postprocess_low_res


def _outputs(masks, ids_scores, trk, size, hidden=()):
    H, W = size
    out = {"obj_id_to_mask": masks, "obj_id_to_score": ids_scores, "obj_id_to_tracker_score": trk,
           "frame_stats": {"num_obj_tracked": len(ids_scores)}}
    state = {"orig_height": H, "orig_width": W}
    return _Model()._postprocess_launch(state, out, removed_obj_ids=set(hidden[:1]),
                                        suppressed_obj_ids=set(hidden[1:2]), unconfirmed_obj_ids=list(hidden[2:]))()


def _assert_same(a, b):
    assert a["out_obj_ids"].tolist() == b["out_obj_ids"].tolist()
    np.testing.assert_array_equal(a["out_probs"], b["out_probs"])
    np.testing.assert_array_equal(a["out_boxes_xywh"], b["out_boxes_xywh"])
    assert a["out_binary_masks"].dtype == np.bool_ and a["out_binary_masks"].shape == b["out_binary_masks"].shape
    np.testing.assert_array_equal(a["out_binary_masks"], b["out_binary_masks"])
    assert a["frame_stats"] == b["frame_stats"]


def test_mask_is_the_official_resize_and_threshold():
    gen = torch.Generator().manual_seed(0)
    low = _blobs(5, 17, 23, gen)
    fm = FrameMasks(low, [7, 3, 11, 2, 9], (61, 45))
    ref = F.interpolate(low.double().unsqueeze(1), size=(61, 45), mode="bilinear", align_corners=False) > 0
    for r, obj_id in enumerate([7, 3, 11, 2, 9]):
        m = fm[obj_id]
        assert m.shape == (1, 61, 45) and m.dtype == torch.bool
        torch.testing.assert_close(m, ref[r])
    assert list(fm) == [7, 3, 11, 2, 9] and len(fm) == 5 and 4 not in fm
    full = fm.materialize()
    assert list(full) == [7, 3, 11, 2, 9] and all(torch.equal(full[k], fm[k]) for k in fm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_resize_keeps_the_sign_of_a_low_precision_resize(dtype):
    """The official resizes bf16/fp16 logits in their dtype; FrameMasks in float32: same signs."""
    gen = torch.Generator().manual_seed(1)
    low = _blobs(6, 32, 32, gen, dtype=dtype)
    low[2, 5:9, 5:9] = 0.0  # exact zeros: background either way
    ours = resize_threshold(low, (97, 131))
    theirs = F.interpolate(low.unsqueeze(1), size=(97, 131), mode="bilinear", align_corners=False) > 0
    assert torch.equal(ours, theirs)


def test_views_copies_and_refusals():
    gen = torch.Generator().manual_seed(2)
    low = _blobs(4, 8, 8, gen)
    fm = FrameMasks(low, [1, 2, 3, 4], (16, 16))
    sub = fm.subset([4, 2, 99])
    assert list(sub) == [2, 4] and sub.low is low and torch.equal(sub[4], fm[4])
    cp = fm.copy()
    del cp[1]
    assert 1 in fm and 1 not in cp
    torch.testing.assert_close(fm.logits([3, 1]), low[[2, 0]])
    assert fm.logits([2, 3]).data_ptr() == low[1].data_ptr()  # consecutive rows: a view
    assert fm.logits([]).shape == (0, 8, 8)
    moved = fm.with_low(low.clone())
    assert moved.low is not low and torch.equal(moved[3], fm[3])
    with pytest.raises(TypeError, match="materialize"):
        fm[1] = torch.zeros(1, 16, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="distinct object ids"):
        FrameMasks(low, [1, 1, 2, 3], (16, 16))
    with pytest.raises(ValueError, match="distinct object ids"):
        FrameMasks(low, [1, 2], (16, 16))
    with pytest.raises(ValueError, match="floating"):
        FrameMasks(low > 0, [1, 2, 3, 4], (16, 16))
    with pytest.raises(ValueError, match="shape"):
        fm.with_low(low[:2])


CASES = {
    # name: (ids, tracker scores by id (missing: 0), hidden ids); the first id's mask is empty
    "many": ([5, 2, 9, 14, 3, 7], {5: 0.9, 2: 0.4, 9: 0.9, 14: 0.7, 3: 0.2}, ()),  # 7 has no tracker score
    "hidden": ([5, 2, 9, 14, 3, 7], {5: 0.9, 2: 0.4, 9: 0.6, 14: 0.7, 3: 0.2, 7: 0.5}, (9, 14, 3)),
    "one_kept_score_0": ([2, 4, 8, 1], {4: 0.9, 1: 0.3}, (4, 1)),  # only 8 kept, score 0: keeps its pixels
    "two_kept_one_score_0": ([2, 4, 8, 1], {4: 0.9}, (1,)),  # 8 (score 0) kept with 4: loses its pixels
    "ties": ([3, 1, 2, 6], {3: 0.5, 1: 0.5, 2: 0.5, 6: 0.5}, ()),
    "all_hidden": ([3, 1], {3: 0.5, 1: 0.5}, (3, 1)),
    "removed_score": ([3, 1, 2], {3: -1e4, 1: 0.5, 2: 0.8}, ()),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("size", [(45, 70), (64, 33)], ids=["45x70", "64x33"])
def test_fused_outputs_equal_the_official_port(case, size):
    ids, trk, hidden = CASES[case]
    gen = torch.Generator().manual_seed(len(ids) * 7 + size[1])
    low = _blobs(len(ids), 24, 24, gen, empty=(0,))
    scores = {i: float(torch.rand((), generator=gen)) for i in ids}
    fm = FrameMasks(low, ids, size)
    ours = _outputs(fm, scores, trk, size, hidden)
    ref = _outputs(fm.materialize(), scores, trk, size, hidden)  # the eager official-port path
    _assert_same(ours, ref)
    assert ids[0] not in ours["out_obj_ids"]
    if case in ("many", "two_kept_one_score_0"):  # the contest happens: pixels claimed by 2+ objects
        both = torch.stack([fm[i][0] for i in ids]).sum(0) >= 2
        assert both.any() and len(ours["out_obj_ids"]) >= 2


def test_fused_outputs_bfloat16_logits():
    gen = torch.Generator().manual_seed(5)
    ids = [3, 1, 2, 6]
    low = _blobs(4, 32, 32, gen, dtype=torch.bfloat16)
    trk = {3: 0.6, 1: 0.5, 2: 0.9, 6: 0.1}
    scores = {i: 0.5 for i in ids}
    fm = FrameMasks(low, ids, (50, 81))
    # the official-port path on masks resized in bf16, as the official does
    eager = {i: (F.interpolate(low[r:r + 1, None], size=(50, 81), mode="bilinear", align_corners=False) > 0)[0]
             for r, i in enumerate(ids)}
    _assert_same(_outputs(fm, scores, trk, (50, 81)), _outputs(eager, scores, trk, (50, 81)))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_outputs_on_cuda_equal_the_official_port(dtype):
    """The Triton ``sam3fast::mask_postprocess`` path against the eager path on the same device."""
    gen = torch.Generator().manual_seed(6)
    ids = list(range(40, 0, -3))
    low = _blobs(len(ids), 288, 288, gen, dtype=dtype, device="cuda")
    trk = {i: float(torch.rand((), generator=gen)) for i in ids[:-2]}
    scores = {i: 0.5 for i in ids}
    for size in ((540, 960), (1080, 1920), (37, 1001)):
        fm = FrameMasks(low, ids, size)
        hidden = tuple(ids[3:6])
        _assert_same(_outputs(fm, scores, trk, size, hidden), _outputs(fm.materialize(), scores, trk, size, hidden))


def test_clear_compact_and_no_equality():
    gen = torch.Generator().manual_seed(7)
    low = _blobs(4, 8, 8, gen)
    fm = FrameMasks(low, [1, 2, 3, 4], (16, 16))
    sub = fm.subset([2, 4])
    small = sub.compact()
    assert list(small) == [2, 4] and small.low.shape[0] == 2 and torch.equal(small.low, low[[1, 3]])
    assert fm.compact() is fm
    with pytest.raises(TypeError, match="not compared"):
        fm == fm.copy()  # noqa: B015
    cp = fm.copy()
    cp.clear()
    assert len(cp) == 0 and len(fm) == 4


def test_to_device_async_copies():
    a = np.arange(6)[::-1]  # negative strides
    t = to_device_async(a, torch.long, "cpu")
    assert t.tolist() == [5, 4, 3, 2, 1, 0]
    b = np.arange(3)
    t = to_device_async(b, torch.long, "cpu")
    b[0] = 9
    assert t.tolist() == [0, 1, 2]  # a copy, not a view of the caller's array
