"""Parity of the tracker's SAM heads (prompt encoder, two-way mask decoder, object pointer) against
the official ``sam3`` modules of ``Sam3TrackerPredictor`` (float32 CPU).

The official tracker comes from ``build_official_tracker`` at the test's config sizes, re-drawn with
``redraw_``; ours load ``sam_prompt_encoder`` / ``sam_mask_decoder`` / ``obj_ptr_proj`` state dicts with
``strict=True`` and copy ``no_obj_ptr``; the prompt encoder's random-Fourier matrix (a buffer) is
re-drawn from a seeded generator so the test does not depend on the global RNG. The object-score head's last bias is shifted so that one of
the three objects is absent (score < 0, masks -1024, pointer = no_obj_ptr) and two are present.
"""

from __future__ import annotations

import pytest
import torch

from official_ref import build_official_tracker, cpu_mode, redraw_
from sam3fast.config import get_config
from sam3fast.model.common import MLP
from sam3fast.model.sam_heads import NO_OBJ_SCORE, MaskDecoder, PromptEncoder, sam_heads_forward

TOL = 1e-4
B = 3


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _maxrel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _close(a, b, name, tol=TOL):
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    r, m = _rel(a, b), _maxrel(a, b)
    assert r < tol and m < tol, f"{name}: rel {r:.2e}, max-abs/scale {m:.2e}"
    return max(r, m)


class Setup:
    """Official tracker (re-drawn) and our heads loaded from it."""

    def __init__(self, cfg, seed=0):
        self.cfg = cfg
        self.official = redraw_(build_official_tracker(cfg), seed)
        # redraw_ leaves buffers alone and the Fourier matrix is drawn from the global RNG at build
        with torch.no_grad():
            G = self.official.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
            G.copy_(torch.randn(G.shape, generator=torch.Generator().manual_seed(seed + 100)))
        self.pe = PromptEncoder.from_config(cfg).eval()
        self.pe.load_state_dict(self.official.sam_prompt_encoder.state_dict(), strict=True)
        self.md = MaskDecoder.from_config(cfg).eval()
        self.md.load_state_dict(self.official.sam_mask_decoder.state_dict(), strict=True)
        d = cfg.d_model
        self.obj_ptr_proj = MLP(d, d, d, 3).eval()
        self.obj_ptr_proj.load_state_dict(self.official.obj_ptr_proj.state_dict(), strict=True)
        self.no_obj_ptr = self.official.no_obj_ptr.detach().clone()
        self.score_bias = self.md.pred_obj_score_head.layers[2].bias.detach().clone()

    def spread_object_scores(self, x):
        """Shift the score head's last bias (official and ours) so the lowest-scoring object is
        absent and the other two present, with a margin far above float32 noise."""
        with torch.no_grad():
            for head in (self.official.sam_mask_decoder.pred_obj_score_head, self.md.pred_obj_score_head):
                head.layers[2].bias.copy_(self.score_bias)
            s = self.run_official(x, multimask=True)[6].flatten().sort().values
            assert (s[1] - s[0]) > 1e-3, f"object scores too close to split: {s.tolist()}"
            shift = -(s[0] + s[1]) / 2
            self.official.sam_mask_decoder.pred_obj_score_head.layers[2].bias.add_(shift)
            self.md.pred_obj_score_head.layers[2].bias.add_(shift)

    def run_official(self, x, multimask):
        pts = None if x["point_coords"] is None else {
            "point_coords": x["point_coords"], "point_labels": x["point_labels"]}
        with torch.no_grad(), cpu_mode():
            return self.official._forward_sam_heads(
                backbone_features=x["backbone_features"], point_inputs=pts, mask_inputs=x["mask_inputs"],
                high_res_features=x["high_res_features"], multimask_output=multimask,
            )

    def run_ours(self, x, multimask):
        with torch.no_grad():
            return sam_heads_forward(
                self.pe, self.md, self.obj_ptr_proj, self.no_obj_ptr, x["backbone_features"],
                point_coords=x["point_coords"], point_labels=x["point_labels"], mask_inputs=x["mask_inputs"],
                high_res_features=x["high_res_features"], multimask_output=multimask,
            )


def make_inputs(cfg, prompt="points", seed=1, stable_first=False):
    """Unit-scale image embedding and high-res features for B objects; points anywhere in the
    R x R input frame with mixed labels (incl. box corners and padding); optional mask logits.
    ``stable_first`` makes object 0's feat_s0 large and positive (it only feeds the masks, not the
    IoU/score heads; positive so no pixel is GELU-zeroed in every channel, which would leave logits
    at ~0) so its single-mask logits pass the stability test while the others fail it."""
    g_ = torch.Generator().manual_seed(seed)
    D, g, R = cfg.d_model, cfg.feat_size, cfg.resolution
    s0 = torch.randn(B, D // 8, 4 * g, 4 * g, generator=g_)
    if stable_first:
        s0[0] = 50.0 * s0[0].abs()
    x = dict(
        backbone_features=torch.randn(B, D, g, g, generator=g_),
        high_res_features=[s0, torch.randn(B, D // 4, 2 * g, 2 * g, generator=g_)],
        point_coords=None, point_labels=None, mask_inputs=None,
    )
    if prompt in ("points", "points+mask"):
        x["point_coords"] = torch.rand(B, 4, 2, generator=g_) * R
        x["point_labels"] = torch.tensor([[1, 0, 1, 0], [2, 3, 1, -1], [1, 1, -1, -1]], dtype=torch.int32)
    if prompt == "mask":
        x["mask_inputs"] = 4 * torch.randn(B, 1, 4 * g, 4 * g, generator=g_)
    if prompt == "points+mask":  # image-resolution mask: the official resizes it with antialias
        x["mask_inputs"] = (torch.rand(B, 1, R, R, generator=g_) > 0.5).float()
    return x


@pytest.fixture(scope="module")
def tiny():
    return Setup(get_config("tiny"))


# ----------------------------------------------------------------------------------------------
# Prompt encoder


@pytest.mark.parametrize("case", ["points", "box_corners", "box", "mask", "pad_only", "nothing"])
def test_prompt_encoder(tiny, case):
    cfg = tiny.cfg
    g_ = torch.Generator().manual_seed(2)
    R, g = cfg.resolution, cfg.feat_size
    points = boxes = masks = None
    if case == "points":
        coords = torch.rand(B, 5, 2, generator=g_) * R
        labels = torch.tensor([[1, 0, 2, 3, -1], [0, 0, 1, -1, -1], [3, 2, 1, 0, 1]], dtype=torch.int32)
        points = (coords, labels)
    elif case == "box_corners":  # how SAM 3 sends boxes: corners with labels 2/3 before the clicks
        xy0 = torch.rand(B, 1, 2, generator=g_) * R / 2
        coords = torch.cat([xy0, xy0 + R / 3, torch.rand(B, 1, 2, generator=g_) * R], dim=1)
        points = (coords, torch.tensor([[2, 3, 1]] * B, dtype=torch.int32))
    elif case == "box":
        xy0 = torch.rand(B, 2, generator=g_) * R / 2
        boxes = torch.cat([xy0, xy0 + R / 3], dim=1)
        points = (torch.rand(B, 2, 2, generator=g_) * R, torch.tensor([[1, 0]] * B, dtype=torch.int32))
    elif case == "mask":
        masks = 4 * torch.randn(B, 1, 4 * g, 4 * g, generator=g_)
    elif case == "pad_only":
        points = (torch.zeros(B, 1, 2), -torch.ones(B, 1, dtype=torch.int32))
    with torch.no_grad(), cpu_mode():
        ref_sparse, ref_dense = tiny.official.sam_prompt_encoder(points=points, boxes=boxes, masks=masks)
        ref_pe = tiny.official.sam_prompt_encoder.get_dense_pe()
    with torch.no_grad():
        sparse, dense = tiny.pe(points, boxes, masks)
        pe = tiny.pe.get_dense_pe()
    _close(pe, ref_pe, "dense pe")
    _close(dense, ref_dense, "dense")
    assert sparse.shape == ref_sparse.shape
    if sparse.shape[1]:
        _close(sparse, ref_sparse, "sparse")
        if case == "pad_only":  # the point and the appended pad are both "not a point"
            assert torch.equal(sparse, tiny.pe.not_a_point_embed.weight.expand_as(sparse))
        else:
            assert sparse.std(dim=1).mean(dim=-1).min() > 0.1  # tokens differ within each object
    if case == "mask":
        assert dense.std() > 0.1


# ----------------------------------------------------------------------------------------------
# Mask decoder


def test_stability_selection(tiny):
    """Constructed single-mask logits: large (stable), mostly near zero (unstable), all below -delta
    (empty union -> stability 1, stable). The fallback takes the best-IoU multimask output."""
    g = 4 * tiny.cfg.feat_size
    gen = torch.Generator().manual_seed(3)
    masks = torch.randn(B, 4, g, g, generator=gen) * 5
    masks[1, 0] = torch.randn(g, g, generator=gen) * 0.02
    masks[2, 0] = -1.0
    ious = torch.rand(B, 4, generator=gen)
    ref_m, ref_i = tiny.official.sam_mask_decoder._dynamic_multimask_via_stability(masks, ious)
    m, i = tiny.md.select_single_mask(masks, ious)
    stable = tiny.md.stability_scores(masks[:, 0:1]) >= tiny.md.dynamic_multimask_stability_thresh
    assert stable.flatten().tolist() == [True, False, True]
    assert torch.equal(m, ref_m) and torch.equal(i, ref_i)
    best = ious[1, 1:].argmax() + 1
    assert torch.equal(m[1, 0], masks[1, best]) and not torch.equal(m[1, 0], masks[1, 0])


@pytest.mark.parametrize("multimask", [True, False])
def test_mask_decoder(tiny, multimask):
    x = make_inputs(tiny.cfg, "points", stable_first=True)
    od = tiny.official.sam_mask_decoder
    with torch.no_grad():
        sparse, dense = tiny.pe((x["point_coords"], x["point_labels"]), None, None)
        image_pe = tiny.pe.get_dense_pe()
        args = (x["backbone_features"], image_pe, sparse, dense)
        with cpu_mode():
            ref = od(*args, multimask_output=multimask, repeat_image=False,
                     high_res_features=x["high_res_features"])
            all_masks = od.predict_masks(*args, repeat_image=False, high_res_features=x["high_res_features"])[0]
        out = tiny.md(*args, multimask_output=multimask, high_res_features=x["high_res_features"])
    for name, a, b in zip(("masks", "iou", "tokens", "score"), out, ref):
        _close(a, b, name)
    stab = od._get_stability_scores(all_masks[:, 0:1]).flatten()
    assert stab[0] >= 0.99 and (stab[1:] < 0.97).all(), stab  # both branches of the fallback
    m, iou = out.masks, out.iou_pred
    assert (m > 0).any() and (m < 0).any() and iou.std() > 1e-3
    if not multimask:
        assert torch.equal(out.sam_tokens_out, tiny.md.predict_masks(*args, x["high_res_features"])[2][:, 0:1])


def test_mask_decoder_shared_image(tiny):
    """Batch-1 image/high-res features broadcast over 3 prompts (official ``repeat_image=True``)."""
    x = make_inputs(tiny.cfg, "points")
    img = x["backbone_features"][:1]
    hr = [f[:1] for f in x["high_res_features"]]
    od = tiny.official.sam_mask_decoder
    with torch.no_grad():
        sparse, dense = tiny.pe((x["point_coords"], x["point_labels"]), None, None)
        args = (img, tiny.pe.get_dense_pe(), sparse, dense)
        with cpu_mode():
            ref = od(*args, multimask_output=True, repeat_image=True, high_res_features=hr)
        out = tiny.md(*args, multimask_output=True, high_res_features=hr)
    for name, a, b in zip(("masks", "iou", "tokens", "score"), out, ref):
        _close(a, b, name)


# ----------------------------------------------------------------------------------------------
# _forward_sam_heads


NAMES = ("low_res_multimasks", "high_res_multimasks", "ious", "low_res_masks", "high_res_masks", "obj_ptr",
         "object_score_logits")


def _check_sam_heads(setup, x, multimask):
    ref = setup.run_official(x, multimask)
    out = setup.run_ours(x, multimask)
    err = max(_close(a, b, n) for n, a, b in zip(NAMES, out, ref))
    score = out.object_score_logits.flatten()
    assert (score > 0).any() and (score < 0).any(), score
    absent = score < 0
    assert (out.low_res_multimasks[absent] == NO_OBJ_SCORE).all()
    assert torch.equal(out.obj_ptr[absent], setup.no_obj_ptr.expand(int(absent.sum()), -1))
    present = out.low_res_masks[~absent]
    assert (present > 0).any() and (present < 0).any()
    if multimask:
        assert out.ious.std(dim=1).min() > 1e-3  # the best-IoU pick is not a tie
    return err


@pytest.fixture(scope="module")
def tiny_heads():
    return Setup(get_config("tiny"), seed=5)


@pytest.mark.parametrize("prompt", ["points", "none", "mask", "points+mask"])
@pytest.mark.parametrize("multimask", [True, False])
def test_forward_sam_heads(tiny_heads, prompt, multimask):
    x = make_inputs(tiny_heads.cfg, prompt)
    tiny_heads.spread_object_scores(x)
    _check_sam_heads(tiny_heads, x, multimask)


@pytest.mark.slow
def test_forward_sam_heads_full_size():
    s = Setup(get_config("sam3"))
    x = make_inputs(s.cfg, "points")
    s.spread_object_scores(x)
    for multimask in (True, False):
        _check_sam_heads(s, x, multimask)


def test_sam_heads_fullgraph(tiny_heads):
    """No graph breaks (so no host syncs) in the whole head, multimask pick included."""
    x = make_inputs(tiny_heads.cfg, "points")
    s = tiny_heads
    f = torch.compile(sam_heads_forward, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = f(s.pe, s.md, s.obj_ptr_proj, s.no_obj_ptr, x["backbone_features"], x["point_coords"],
                x["point_labels"], None, x["high_res_features"], True)
    for n, a, b in zip(NAMES, out, s.run_ours(x, True)):
        _close(a, b, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_promptless_fast_path_equals_general_path(tiny_heads, dtype):
    """A propagated frame has no prompt: the sparse tokens are the pad point's and the encoder's pad
    (``pad_point_embeddings``, a view of ``not_a_point_embed``) bit for bit what the general point
    embedding gives for them, and the dense position encoding from the cached coordinate grid is
    the one computed from scratch, in the model's dtype."""
    import copy

    pe = copy.deepcopy(tiny_heads.pe).to(dtype)
    Bn = 3
    with torch.no_grad():
        general = pe._embed_points(torch.zeros(Bn, 1, 2), -torch.ones(Bn, 1, dtype=torch.int32), pad=True)
        fast = pe.pad_point_embeddings(Bn)
        assert fast.shape == general.shape == (Bn, 2, pe.embed_dim) and fast.dtype == general.dtype == dtype
        assert torch.equal(fast, general)
        layer = pe.pe_layer
        layer._grids.clear()
        h, w = pe.image_embedding_size
        ones = torch.ones((h, w))
        xy = torch.stack([(ones.cumsum(dim=1) - 0.5) / w, (ones.cumsum(dim=0) - 0.5) / h], dim=-1)
        want = layer._pe_encoding(xy).permute(2, 0, 1)  # the uncached formula
        first, again = pe.get_dense_pe(), pe.get_dense_pe()
        assert len(layer._grids) == 1
        assert torch.equal(first[0], want) and torch.equal(again, first)


def test_sam_heads_fullgraph_promptless_fresh_grid(tiny_heads):
    """The promptless head compiles without graph breaks with the position encoding's grid cache
    empty: the compiled region computes the grid itself and neither reads nor fills the cache (a
    guard on its keys would recompile on the next call), and the next call does not recompile."""
    x = make_inputs(tiny_heads.cfg, "none")
    s = tiny_heads
    want = s.run_ours(x, True)
    s.pe.pe_layer._grids.clear()
    torch._dynamo.reset()
    f = torch.compile(sam_heads_forward, backend="eager", fullgraph=True)
    args = (s.pe, s.md, s.obj_ptr_proj, s.no_obj_ptr, x["backbone_features"], None, None, None,
            x["high_res_features"], True)
    with torch.no_grad():
        out = f(*args)
        assert not s.pe.pe_layer._grids
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = f(*args)
    for n, a, b, c in zip(NAMES, out, want, again):
        _close(a, b, n)
        assert torch.equal(a, c), n
