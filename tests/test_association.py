"""Fixed-shape detection-to-track association (``sam3fast.video.association``) against the
official ``Sam3VideoBase._associate_det_trk`` on the same masks: padded slots must not change
the answer, and the numpy/dict answer that sam3fast's video model builds from it (with one host
copy) must equal the official's exactly."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from official_ref import official
from sam3fast.video.association import associate_detections
from sam3fast.video.host_channel import HostChannel
from sam3fast.video.inference import Sam3VideoBase as OurBase

THRESH = dict(assoc_iou_thresh=0.3, trk_assoc_iou_thresh=0.5, new_det_thresh=0.7)


def _official_associate(o2o):
    official()
    from sam3.model.sam3_video_base import Sam3VideoBase

    fake = types.SimpleNamespace(**THRESH, o2o_matching_masklets_enable=o2o)
    return lambda **kw: Sam3VideoBase._associate_det_trk(fake, **kw)


def _ours_associate(o2o):
    fake = types.SimpleNamespace(**THRESH, o2o_matching_masklets_enable=o2o)
    fake._associate = types.MethodType(OurBase._associate, fake)
    fake._read_for_planning = types.MethodType(OurBase._read_for_planning, fake)
    fake.detector = types.SimpleNamespace(run_deferred=lambda: None)  # (no queued detection here)
    fake.host_channel = HostChannel()
    return lambda **kw: OurBase._associate_det_trk(fake, **kw)


def _blobs(n, h, w, gen, base=None, jitter=0.0):
    """n smooth random mask-logit maps (N, h, w); with ``base``: perturbed copies of its rows (so
    detections overlap tracks with a spread of IoUs)."""
    coarse = torch.randn(n, 1, 4, 4, generator=gen)
    m = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[:, 0] - 0.6
    if base is not None:
        idx = torch.randint(0, base.shape[0], (n,), generator=gen)
        m = base[idx] + jitter * m
    return m


def _case(seed, N, M, det_hw=(24, 24), trk_hw=(24, 24)):
    gen = torch.Generator().manual_seed(seed)
    trk = _blobs(M, *trk_hw, gen)
    if M > 3:
        trk[3] = trk[0] + 0.05 * torch.randn(trk.shape[1:], generator=gen)  # a duplicate: o2o matches one
    if M and N:
        base = F.interpolate(trk[:, None], size=det_hw, mode="bilinear", align_corners=False)[:, 0]
        det = torch.cat([_blobs(N // 2, *det_hw, gen, base=base, jitter=0.15), _blobs(N - N // 2, *det_hw, gen)])
    else:
        det = _blobs(N, *det_hw, gen)
    if M > 2:
        trk[1] = -1.0  # an empty track
    scores = torch.rand(N, generator=gen)
    scores[: N // 3] = 0.85 + 0.1 * scores[: N // 3]  # some high-confidence detections
    return det, scores, trk


def _same(a, b, what):
    (new_a, unm_a, match_a, hc_a, empty_a), (new_b, unm_b, match_b, hc_b, empty_b) = a, b
    assert np.array_equal(np.asarray(new_a), np.asarray(new_b)), (what, "new", new_a, new_b)
    assert np.array_equal(unm_a, unm_b), (what, "unmatched", unm_a, unm_b)
    assert np.array_equal(empty_a, empty_b), (what, "empty", empty_a, empty_b)
    assert list(match_a) == list(match_b), (what, "matched keys")
    for d in match_b:
        assert np.array_equal(match_a[d], match_b[d]), (what, "matched", d)
    assert list(hc_a.items()) == list(hc_b.items()), (what, "high conf", hc_a, hc_b)


CASES = [(0, 6, 4), (1, 9, 5), (2, 0, 3), (3, 5, 0), (4, 1, 1), (5, 12, 7), (6, 3, 8)]


@pytest.mark.parametrize("o2o", [False, True])
@pytest.mark.parametrize("grids", [((24, 24), (24, 24)), ((16, 16), (24, 24)), ((24, 24), (12, 20))])
@pytest.mark.parametrize("seed, N, M", CASES)
def test_wrapper_equals_official(seed, N, M, grids, o2o):
    det, scores, trk = _case(seed, N, M, *grids)
    ids = np.arange(100, 100 + M, dtype=np.int64)
    kw = dict(det_masks=det, det_scores_np=scores.numpy(), trk_masks=trk, trk_obj_ids=ids)
    _same(_ours_associate(o2o)(**kw), _official_associate(o2o)(**kw), (seed, N, M, grids, o2o))


@pytest.mark.parametrize("o2o", [False, True])
@pytest.mark.parametrize("seed, N, M", CASES)
def test_padding_changes_nothing(seed, N, M, o2o):
    """Valid slots scattered among padded ones (whose masks and scores are junk) give the
    official answer on the valid ones."""
    det, scores, trk = _case(seed, N, M)
    gen = torch.Generator().manual_seed(100 + seed)
    Q, K = N + 5, M + 3
    dslots = torch.randperm(Q, generator=gen)[:N].sort().values
    tslots = torch.randperm(K, generator=gen)[:M].sort().values
    det_p = torch.randn(Q, *det.shape[1:], generator=gen) * 3  # junk in padded slots
    trk_p = torch.randn(K, *trk.shape[1:], generator=gen) * 3
    sc_p = torch.rand(Q, generator=gen) + 0.5
    det_p[dslots], trk_p[tslots], sc_p[dslots] = det, trk, scores
    dv = torch.zeros(Q, dtype=torch.bool)
    tv = torch.zeros(K, dtype=torch.bool)
    dv[dslots], tv[tslots] = True, True
    res = associate_detections(det_p, sc_p, dv, trk_p, tv, o2o=o2o, **THRESH)
    ids = np.arange(100, 100 + M, dtype=np.int64)
    new, unm, match, hc, empty = _official_associate(o2o)(det_masks=det, det_scores_np=scores.numpy(),
                                                          trk_masks=trk, trk_obj_ids=ids)
    slot_of_trk = {int(ids[i]): int(tslots[i]) for i in range(M)}
    assert sorted(dslots[res.new_det[dslots]].tolist()) == sorted(dslots[torch.as_tensor(new, dtype=torch.long)].tolist())
    assert not res.new_det[~dv].any() and not res.unmatched_trk[~tv].any() and not res.empty_trk[~tv].any()
    assert sorted(tslots[res.unmatched_trk[tslots]].tolist()) == sorted(slot_of_trk[i] for i in unm.tolist())
    assert sorted(tslots[res.empty_trk[tslots]].tolist()) == sorted(slot_of_trk[i] for i in empty.tolist())
    for d, matched in match.items():
        got = tslots[res.det_matches[dslots[d]][tslots]].tolist()
        assert got == [slot_of_trk[i] for i in matched.tolist()]
    want_hc = torch.full((K,), -1, dtype=torch.long)
    for trk_id, d in hc.items():
        want_hc[slot_of_trk[trk_id]] = dslots[d]
    assert torch.equal(res.trk_high_conf_det, want_hc)
    assert not res.det_matches[~dv].any() and not res.det_matches[:, ~tv].any()


def test_compiles_without_graph_breaks():
    det, scores, trk = _case(5, 12, 7)
    valid_d, valid_t = torch.ones(12, dtype=torch.bool), torch.ones(7, dtype=torch.bool)
    torch._dynamo.reset()
    fn = torch.compile(associate_detections, fullgraph=True, backend="aot_eager")
    for o2o in (False, True):
        got = fn(det, scores, valid_d, trk, valid_t, o2o=o2o, **THRESH)
        want = associate_detections(det, scores, valid_d, trk, valid_t, o2o=o2o, **THRESH)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_bad_shapes():
    det, scores, trk = _case(0, 4, 3)
    with pytest.raises(ValueError, match="det_scores"):
        associate_detections(det, scores[:2], torch.ones(4, dtype=torch.bool), trk, torch.ones(3, dtype=torch.bool))
