"""Parity of the geometry encoder, ``roi_align`` and the fusion encoder with the official modules.

Official modules come from the tiny official ``Sam3Image`` (same constructors as the builder),
re-drawn with :func:`redraw_`, and their state dicts load into ours with ``strict=True``. Official
prompts are built the way ``Sam3Processor.add_geometric_prompt`` builds them (a dummy prompt, then
``Prompt.append_boxes`` per box, bool labels) or, for padded batches, as a padded ``Prompt``.
"""

from __future__ import annotations

import math

import pytest
import torch

from official_ref import build_official_image_model, cpu_mode, official, redraw_
from sam3fast.config import get_config
from sam3fast.model.encoder import FusionEncoder
from sam3fast.model.geometry import GeometryEncoder, roi_align

TOL = 1e-5  # measured errors are ~1e-7 (float summation order only)


def _errors(out: torch.Tensor, ref: torch.Tensor):
    out, ref = out.double(), ref.double()
    rel = ((out - ref).norm() / ref.norm()).item()
    max_rel = ((out - ref).abs().max() / ref.abs().max()).item()
    return rel, max_rel


def _assert_close(out, ref, tol=TOL):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    rel, max_rel = _errors(out, ref)
    assert rel < tol and max_rel < tol, f"rel {rel:.3g} max_rel {max_rel:.3g}"


def _assert_spread(x: torch.Tensor):
    assert torch.isfinite(x).all()
    assert x.std() > 0.1
    tokens = x.reshape(-1, x.shape[-1])
    if tokens.shape[0] > 1:  # distinct tokens: every prompt got its own encoding
        d = torch.cdist(tokens, tokens) + torch.eye(tokens.shape[0]) * 1e9
        assert d.min() > 1e-2 * tokens.norm(dim=-1).mean()


# ----------------------------------------------------------------------------------------------
# Official modules (tiny), loaded into ours


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    model = build_official_image_model(cfg, enable_segmentation=False)
    geo_o = redraw_(model.geometry_encoder, seed=11)
    enc_o = redraw_(model.transformer.encoder, seed=12)
    geo = GeometryEncoder.from_config(cfg).eval()
    geo.load_state_dict(geo_o.state_dict(), strict=True)
    enc = FusionEncoder.from_config(cfg).eval()
    enc.load_state_dict(enc_o.state_dict(), strict=True)
    return cfg, geo_o, geo, enc_o, enc


def _image(cfg, batch, seed):
    g = torch.Generator().manual_seed(seed)
    hw = cfg.feat_size
    feats = torch.randn(batch, hw * hw, cfg.d_model, generator=g)
    pos = torch.randn(batch, hw * hw, cfg.d_model, generator=g)
    return feats, pos, (hw, hw)


def _official_geo(geo_o, prompt, feats, pos, size):
    """Official forward on batch-first image tensors; returns batch-first (feats, mask)."""
    with torch.no_grad(), cpu_mode():
        out, mask = geo_o(prompt, [feats.transpose(0, 1)], [size], [pos.transpose(0, 1)])
    return out.transpose(0, 1), mask


def _processor_prompt(boxes, labels, points=None, point_labels=None):
    """One image, prompts added one at a time like ``Sam3Processor.add_geometric_prompt``:
    dummy prompt (0 boxes), then ``append_boxes`` of a (1, 1, 4) box and a (1, 1) bool label."""
    official()
    from sam3.model.geometry_encoders import Prompt

    prompt = Prompt(box_embeddings=torch.zeros(0, 1, 4), box_mask=torch.zeros(1, 0, dtype=torch.bool))
    for box, label in zip(boxes, labels):
        prompt.append_boxes(torch.tensor(box).view(1, 1, 4), torch.tensor([label]).view(1, 1))
    if points is not None:
        for pt, label in zip(points, point_labels):
            prompt.append_points(torch.tensor(pt).view(1, 1, 2), torch.tensor([label]).view(1, 1))
    return prompt


BOXES = [[0.5, 0.45, 0.3, 0.5], [0.22, 0.7, 0.35, 0.3], [0.8, 0.2, 0.3, 0.33]]
BOX_LABELS = [True, False, True]
POINTS = [[0.31, 0.62], [0.72, 0.12]]
POINT_LABELS = [True, False]


# ----------------------------------------------------------------------------------------------
# roi_align


def _tv_roi_align(x, boxes, **kw):
    official()  # makes torchvision importable; roi_align then runs its pure-PyTorch fallback
    import torchvision

    with cpu_mode():
        return torchvision.ops.roi_align(x, list(boxes), 7, **kw)


def _box_set(H, W, K, seed, spread):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([W, H, W, H], dtype=torch.float64)
    b = (torch.rand(2, K, 4, generator=g, dtype=torch.float64) * (1 + 2 * spread) - spread) * scale
    return torch.cat([torch.minimum(b[..., :2], b[..., 2:]), torch.maximum(b[..., :2], b[..., 2:])], -1)


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_roi_align_matches_torchvision_fallback(sampling_ratio, aligned, spatial_scale):
    H, W = 12, 10
    x = torch.randn(2, 16, H, W, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned)
    # float64 over wild boxes (far outside, empty, huge): the semantics, to rounding.
    boxes = _box_set(H / spatial_scale, W / spatial_scale, 8, seed=1, spread=1.5)
    boxes[0, 0] = torch.tensor([3.3, 2.1, 3.3, 2.1])  # empty
    boxes[0, 1] = torch.tensor([-40.0, -30.0, 60.0, 70.0])  # larger than the map
    ref = _tv_roi_align(x, boxes, **kw)
    out = roi_align(x, boxes, 7, **kw)
    assert out.shape == (2, 8, 16, 7, 7)
    torch.testing.assert_close(out.flatten(0, 1), ref, rtol=0, atol=1e-9)
    # float32 on boxes that stay within a cell of the map (the fallback cancels catastrophically
    # far outside it: weights like -29 and 30 on one edge value).
    boxes = _box_set(H / spatial_scale, W / spatial_scale, 8, seed=2, spread=0.05).float()
    ref = _tv_roi_align(x.float(), boxes, **kw)
    out = roi_align(x.float(), boxes, 7, **kw)
    torch.testing.assert_close(out.flatten(0, 1), ref, rtol=0, atol=2e-6)
    assert ref.abs().max() > 1.0


def _roi_align_compiled_kernel_loop(x, boxes, pooled, spatial_scale, sampling_ratio, aligned):
    """Scalar transcription of torchvision's C++ ``roi_align_forward_kernel_impl`` (CPU/CUDA)."""
    N, C, H, W = x.shape
    out = torch.zeros(N, boxes.shape[1], C, pooled, pooled, dtype=x.dtype)
    off = 0.5 if aligned else 0.0
    for n in range(N):
        for k in range(boxes.shape[1]):
            x1, y1, x2, y2 = (float(v) * spatial_scale - off for v in boxes[n, k])
            rw, rh = x2 - x1, y2 - y1
            if not aligned:
                rw, rh = max(rw, 1.0), max(rh, 1.0)
            bh, bw = rh / pooled, rw / pooled
            gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / pooled)
            gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pooled)
            count = max(gh * gw, 1)
            for ph in range(pooled):
                for pw in range(pooled):
                    acc = torch.zeros(C, dtype=x.dtype)
                    for iy in range(gh):
                        for ix in range(gw):
                            y = y1 + ph * bh + (iy + 0.5) * bh / gh
                            xx = x1 + pw * bw + (ix + 0.5) * bw / gw
                            if y < -1.0 or y > H or xx < -1.0 or xx > W:
                                continue
                            y, xx = max(y, 0.0), max(xx, 0.0)
                            yl, xl = int(y), int(xx)
                            if yl >= H - 1:
                                yl = yh = H - 1
                                y = float(yl)
                            else:
                                yh = yl + 1
                            if xl >= W - 1:
                                xl = xh = W - 1
                                xx = float(xl)
                            else:
                                xh = xl + 1
                            ly, lx = y - yl, xx - xl
                            hy, hx = 1 - ly, 1 - lx
                            f = x[n]
                            acc += hy * hx * f[:, yl, xl] + hy * lx * f[:, yl, xh]
                            acc += ly * hx * f[:, yh, xl] + ly * lx * f[:, yh, xh]
                    out[n, k, :, ph, pw] = acc / count
    return out


@pytest.mark.parametrize("sampling_ratio,aligned", [(-1, False), (2, True)])
def test_roi_align_zero_mode_matches_compiled_kernels(sampling_ratio, aligned):
    H, W = 9, 8
    x = torch.randn(2, 4, H, W, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    boxes = _box_set(H, W, 4, seed=4, spread=0.6)
    kw = dict(spatial_scale=1.0, sampling_ratio=sampling_ratio, aligned=aligned)
    ref = _roi_align_compiled_kernel_loop(x, boxes, 7, **kw)
    out = roi_align(x, boxes, 7, out_of_bounds="zero", **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    # these boxes reach more than one cell outside: the two conventions must differ here
    assert (out - roi_align(x, boxes, 7, **kw)).abs().max() > 1e-3


def test_roi_align_no_boxes():
    x = torch.randn(2, 8, 6, 6)
    assert roi_align(x, torch.zeros(2, 0, 4), 7).shape == (2, 0, 8, 7, 7)


# ----------------------------------------------------------------------------------------------
# Geometry encoder


@pytest.mark.parametrize("empty", ["none", "zero_length"])
def test_geometry_no_prompt_is_cls_only(tiny, empty):
    cfg, geo_o, geo, _, _ = tiny
    feats, pos, size = _image(cfg, 2, seed=0)
    official()
    from sam3.model.geometry_encoders import Prompt

    dummy = Prompt(box_embeddings=torch.zeros(0, 2, 4), box_mask=torch.zeros(2, 0, dtype=torch.bool))
    ref, ref_mask = _official_geo(geo_o, dummy, feats, pos, size)
    kw = {}
    if empty == "zero_length":
        kw = dict(boxes=torch.zeros(2, 0, 4), box_mask=torch.zeros(2, 0, dtype=torch.bool))
    with torch.no_grad():
        out, mask = geo(feats, pos, size, **kw)
    assert out.shape == (2, 1, cfg.d_model) and mask.shape == (2, 1) and not mask.any()
    assert torch.equal(mask, ref_mask)
    _assert_close(out, ref)
    _assert_spread(out)
    assert (out[0] - out[1]).abs().max() > 1e-2  # the CLS token attends to its own image


@pytest.mark.parametrize("n_boxes", [1, 3])
def test_geometry_boxes(tiny, n_boxes):
    cfg, geo_o, geo, _, _ = tiny
    feats, pos, size = _image(cfg, 1, seed=1)
    boxes, labels = BOXES[:n_boxes], BOX_LABELS[:n_boxes]
    ref, ref_mask = _official_geo(geo_o, _processor_prompt(boxes, labels), feats, pos, size)
    with torch.no_grad():
        out, mask = geo(feats, pos, size, boxes=torch.tensor([boxes]), box_labels=torch.tensor([labels]))
    assert out.shape == (1, n_boxes + 1, cfg.d_model)
    assert torch.equal(mask, ref_mask)
    _assert_close(out, ref)
    _assert_spread(out)


def test_geometry_box_label_and_pooling_matter(tiny):
    cfg, _, geo, _, _ = tiny
    feats, pos, size = _image(cfg, 1, seed=2)
    box = torch.tensor([[BOXES[0]]])
    with torch.no_grad():
        pos_out, _ = geo(feats, pos, size, boxes=box, box_labels=torch.tensor([[True]]))
        neg_out, _ = geo(feats, pos, size, boxes=box, box_labels=torch.tensor([[False]]))
        other_img, _ = geo(feats.roll(9, 1), pos, size, boxes=box, box_labels=torch.tensor([[True]]))
    for other in (neg_out, other_img):
        assert ((pos_out - other).norm() / pos_out.norm()) > 0.05


def test_geometry_points_and_boxes(tiny):
    cfg, geo_o, geo, _, _ = tiny
    feats, pos, size = _image(cfg, 1, seed=3)
    prompt = _processor_prompt(BOXES[:2], BOX_LABELS[:2], POINTS, POINT_LABELS)
    ref, ref_mask = _official_geo(geo_o, prompt, feats, pos, size)
    with torch.no_grad():
        out, mask = geo(
            feats, pos, size,
            boxes=torch.tensor([BOXES[:2]]), box_labels=torch.tensor([BOX_LABELS[:2]]),
            points=torch.tensor([POINTS]), point_labels=torch.tensor([POINT_LABELS]),
        )
    assert out.shape == (1, 2 + 2 + 1, cfg.d_model)  # points, boxes, CLS
    assert torch.equal(mask, ref_mask)
    _assert_close(out, ref)
    _assert_spread(out)


def test_geometry_points_only(tiny):
    cfg, geo_o, geo, _, _ = tiny
    feats, pos, size = _image(cfg, 1, seed=4)
    official()
    from sam3.model.geometry_encoders import Prompt

    prompt = Prompt(point_embeddings=torch.tensor([POINTS]).transpose(0, 1),
                    point_labels=torch.tensor([POINT_LABELS]).long().transpose(0, 1))
    ref, ref_mask = _official_geo(geo_o, prompt, feats, pos, size)
    with torch.no_grad():
        out, mask = geo(
            feats, pos, size, points=torch.tensor([POINTS]), point_labels=torch.tensor([POINT_LABELS])
        )
    assert out.shape == (1, 3, cfg.d_model)
    _assert_close(out, ref)
    _assert_spread(out)


def test_geometry_padded_batch(tiny):
    """Element 0: 3 boxes, 1 point (+1 pad); element 1: 1 box (+2 pads), 2 points. Pads hold NaN
    and label -1 on our side. Each element must equal the official run on it alone, and the whole
    batch the official padded run (same token order: valid points, valid boxes, CLS, padding)."""
    cfg, geo_o, geo, _, _ = tiny
    feats, pos, size = _image(cfg, 2, seed=5)
    boxes = torch.tensor([BOXES, [BOXES[1], BOXES[0], BOXES[2]]])
    box_labels = torch.tensor([BOX_LABELS, [False, True, True]])
    box_mask = torch.tensor([[False, False, False], [False, True, True]])
    points = torch.tensor([POINTS, [POINTS[1], POINTS[0]]])
    point_labels = torch.tensor([POINT_LABELS, [True, True]])
    point_mask = torch.tensor([[False, True], [False, False]])

    ours_in = dict(
        boxes=boxes.masked_fill(box_mask[..., None], float("nan")),
        box_labels=box_labels.long().masked_fill(box_mask, -1),
        box_mask=box_mask,
        points=points.masked_fill(point_mask[..., None], float("nan")),
        point_labels=point_labels.long().masked_fill(point_mask, -1),
        point_mask=point_mask,
    )
    with torch.no_grad():
        out, mask = geo(feats, pos, size, **ours_in)
    assert out.shape == (2, 2 + 3 + 1, cfg.d_model)
    assert torch.isfinite(out).all()
    n_valid = (~mask).sum(1)
    assert n_valid.tolist() == [1 + 3 + 1, 2 + 1 + 1]
    assert torch.equal(mask, torch.arange(6)[None] >= n_valid[:, None])  # right-padded

    for b in range(2):
        bm, pm = ~box_mask[b], ~point_mask[b]
        prompt = _processor_prompt(
            boxes[b][bm].tolist(), box_labels[b][bm].tolist(),
            points[b][pm].tolist(), point_labels[b][pm].tolist(),
        )
        ref, ref_mask = _official_geo(geo_o, prompt, feats[b : b + 1], pos[b : b + 1], size)
        n = ref.shape[1]
        assert n == n_valid[b] and not ref_mask.any()
        _assert_close(out[b : b + 1, :n], ref)

    official()
    from sam3.model.geometry_encoders import Prompt

    padded = Prompt(
        box_embeddings=boxes.transpose(0, 1), box_labels=box_labels.transpose(0, 1), box_mask=box_mask,
        point_embeddings=points.transpose(0, 1), point_labels=point_labels.long().transpose(0, 1),
        point_mask=point_mask,
    )
    ref, ref_mask = _official_geo(geo_o, padded, feats, pos, size)
    assert torch.equal(mask, ref_mask)
    _assert_close(out[~mask], ref[~ref_mask])
    _assert_spread(out[~mask])


# ----------------------------------------------------------------------------------------------
# Fusion encoder


def _official_fusion(enc_o, feats, pos, size, prompt, prompt_mask):
    with torch.no_grad(), cpu_mode():
        out = enc_o(
            src=[feats.transpose(0, 1)], src_key_padding_mask=None, src_pos=[pos.transpose(0, 1)],
            prompt=prompt.transpose(0, 1), prompt_key_padding_mask=prompt_mask,
            prompt_pos=torch.zeros_like(prompt.transpose(0, 1)), feat_sizes=[size],
        )
    return out


def test_fusion_encoder_text_and_geometry_prompt(tiny):
    cfg, _, geo, enc_o, enc = tiny
    B, D = 2, cfg.d_model
    feats, pos, size = _image(cfg, B, seed=6)
    g = torch.Generator().manual_seed(7)
    text = torch.randn(B, 32, D, generator=g)
    text_mask = torch.arange(32)[None] >= torch.tensor([[5], [12]])  # 5 and 12 valid tokens
    with torch.no_grad():
        geo_feats, geo_mask = geo(
            feats, pos, size, boxes=torch.tensor([BOXES, BOXES[::-1]]),
            box_labels=torch.tensor([BOX_LABELS, BOX_LABELS]),
            box_mask=torch.tensor([[False, False, False], [False, True, True]]),
        )
    prompt = torch.cat([text, geo_feats], 1)
    prompt_mask = torch.cat([text_mask, geo_mask], 1)

    r = _official_fusion(enc_o, feats, pos, size, prompt, prompt_mask)
    with torch.no_grad():
        out = enc(feats, pos, prompt, prompt_mask)
    ref = r["memory"].transpose(0, 1)
    assert out.shape == (B, size[0] * size[1], D)
    _assert_close(out, ref)
    assert torch.isfinite(out).all() and out.std() > 0.1
    # What the official returns besides the memory is the inputs unchanged (nothing to reproduce).
    assert torch.equal(r["pos_embed"], pos.transpose(0, 1))
    assert torch.equal(r["memory_text"], prompt.transpose(0, 1))
    assert r["padding_mask"] is None
    assert r["spatial_shapes"].tolist() == [list(size)] and r["level_start_index"].tolist() == [0]
    assert torch.equal(r["valid_ratios"], torch.ones(B, 1, 2))
    # the prompt matters, the padded prompt tokens do not
    with torch.no_grad():
        no_geo = enc(feats, pos, prompt, prompt_mask | (torch.arange(prompt.shape[1]) >= 32))
        noisy = enc(feats, pos, prompt + 100.0 * prompt_mask[..., None], prompt_mask)
    assert ((no_geo - out).norm() / out.norm()) > 1e-2
    torch.testing.assert_close(noisy, out, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_fusion_encoder_full_size():
    """d_model 256, 8 heads, FFN 2048, 6 layers, 72 x 72 image tokens, 32 text + 4 geometry tokens."""
    tiny_cfg = get_config("tiny")
    cfg = get_config("sam3").replace(vit=tiny_cfg.vit, text=tiny_cfg.text)  # small backbone, full heads
    model = build_official_image_model(cfg, enable_segmentation=False)
    enc_o = redraw_(model.transformer.encoder, seed=13)
    del model
    enc = FusionEncoder.from_config(cfg).eval()
    enc.load_state_dict(enc_o.state_dict(), strict=True)

    g = torch.Generator().manual_seed(8)
    hw, D = 72, cfg.d_model
    feats = torch.randn(1, hw * hw, D, generator=g)
    pos = torch.randn(1, hw * hw, D, generator=g)
    prompt = torch.randn(1, 36, D, generator=g)
    prompt_mask = torch.zeros(1, 36, dtype=torch.bool)
    prompt_mask[:, 9:32] = True  # 9 text tokens, 4 geometry tokens
    r = _official_fusion(enc_o, feats, pos, (hw, hw), prompt, prompt_mask)
    with torch.no_grad():
        out = enc(feats, pos, prompt, prompt_mask)
    _assert_close(out, r["memory"].transpose(0, 1))
    assert torch.isfinite(out).all() and out.std() > 0.1
