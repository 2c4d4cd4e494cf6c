"""Parity of the query decoder, dot-product scoring, box head and mask head against the official
``sam3`` modules (``Sam3Image._run_decoder`` / ``_run_segmentation_heads``, float32 CPU).

The official modules come from a whole official ``Sam3Image`` built at the test's config sizes and
re-drawn with ``redraw_``; ours load their state dicts with ``strict=True``. Inputs are random tensors
at the scale of the real ones; the prompt has padded tokens and the tiny feature grid is not square
(so an H/W swap in the boxRPB bias cannot pass).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from official_ref import build_official_image_model, cpu_mode, official, redraw_
from sam3fast.config import get_config
from sam3fast.model.decoder import Decoder, DotProductScoring, box_cxcywh_to_xyxy, joint_logits
from sam3fast.model.seg_head import SegmentationHead, add_nearest_upsampled

from compare import close as _close, rel


class Setup:
    def __init__(self, cfg, seed=0):
        self.cfg = cfg
        self.official = redraw_(build_official_image_model(cfg), seed)
        self.decoder = Decoder.from_config(cfg).eval()
        self.decoder.load_state_dict(self.official.transformer.decoder.state_dict(), strict=True)
        self.scoring = DotProductScoring.from_config(cfg).eval()
        self.scoring.load_state_dict(self.official.dot_prod_scoring.state_dict(), strict=True)
        self.seg = SegmentationHead.from_config(cfg).eval()
        self.seg.load_state_dict(self.official.segmentation_head.state_dict(), strict=True)


def make_inputs(cfg, B, feat_size, P, n_valid, seed=1):
    """Encoder-like memory (unit scale), sine-like pos in [-1, 1], prompt tokens with padding
    (``n_valid[b]`` valid tokens then pads, True = pad) and FPN levels at 4x/2x/1x of the grid."""
    g = torch.Generator().manual_seed(seed)
    H, W = feat_size
    D = cfg.d_model
    mask = torch.arange(P).unsqueeze(0) >= torch.tensor(n_valid).unsqueeze(1)
    return dict(
        memory=torch.randn(B, H * W, D, generator=g),
        pos=torch.rand(B, H * W, D, generator=g) * 2 - 1,
        prompt=torch.randn(B, P, D, generator=g),
        prompt_mask=mask,
        fpn=[
            torch.randn(B, D, 4 * H, 4 * W, generator=g),
            torch.randn(B, D, 2 * H, 2 * W, generator=g),
            torch.randn(B, D, H, W, generator=g),
        ],
        feat_size=(H, W),
    )


def run_official(model, x, segment=True):
    """``Sam3Image._run_decoder`` (+ ``_run_segmentation_heads``) on batch-first inputs."""
    B = x["memory"].shape[0]
    H, W = x["feat_size"]
    memory, pos, prompt = (x[k].transpose(0, 1) for k in ("memory", "pos", "prompt"))
    encoder_out = {
        "level_start_index": torch.tensor([0]),
        "spatial_shapes": torch.tensor([[H, W]]),
        "valid_ratios": torch.ones(B, 1, 2),
    }
    with cpu_mode(), torch.no_grad():
        out, hs = model._run_decoder(
            pos_embed=pos, memory=memory, src_mask=None, out={}, prompt=prompt,
            prompt_mask=x["prompt_mask"], encoder_out=encoder_out,
        )
        if segment:
            model._run_segmentation_heads(
                out=out, backbone_out={"backbone_fpn": x["fpn"]}, img_ids=torch.arange(B),
                vis_feat_sizes=[(H, W)], encoder_hidden_states=memory, prompt=prompt,
                prompt_mask=x["prompt_mask"], hs=hs,
            )
    out["hs_all"] = hs
    return out


def run_ours(s: Setup, x, segment=True, return_intermediate=False):
    with torch.no_grad():
        o = s.decoder(x["memory"], x["pos"], x["feat_size"], x["prompt"], x["prompt_mask"], return_intermediate)
        o["pred_logits"] = s.scoring(o["hs"], x["prompt"], x["prompt_mask"])
        if segment:
            o.update(s.seg(x["fpn"], x["memory"], o["hs"], x["prompt"], x["prompt_mask"], semantic=True))
    return o


def check_spread(off):
    boxes = off["pred_boxes"]
    assert boxes.std(dim=1).min() > 0.02, "boxes barely differ across queries"
    assert off["pred_logits"].std() > 0.05, "query logits do not spread"
    if "pred_masks" in off:
        pos_frac = (off["pred_masks"] > 0).float().mean().item()
        assert 0.02 < pos_frac < 0.98, f"masks are one-signed ({pos_frac:.3f} positive)"


# ----------------------------------------------------------------------------------------------
# Tiny config


@pytest.fixture(scope="module")
def tiny():
    return Setup(get_config("tiny"))


@pytest.fixture(scope="module")
def tiny_inputs(tiny):
    # 7 x 9 grid (not square), 2 prompts with 5 and 9 valid tokens out of 11
    return make_inputs(tiny.cfg, B=2, feat_size=(7, 9), P=11, n_valid=[5, 9])


@pytest.fixture(scope="module")
def tiny_outputs(tiny, tiny_inputs):
    return run_official(tiny.official, tiny_inputs), run_ours(tiny, tiny_inputs, return_intermediate=True)


def test_decoder_parity(tiny_outputs):
    off, ours = tiny_outputs
    _close(ours["hs"], off["queries"], "hs")
    _close(ours["hs_all"], off["hs_all"], "hs_all")
    _close(ours["pred_boxes"], off["pred_boxes"], "pred_boxes")
    _close(ours["pred_boxes_xyxy"], off["pred_boxes_xyxy"], "pred_boxes_xyxy")
    _close(ours["presence_logit"], off["presence_logit_dec"], "presence_logit")
    _close(ours["presence_feats"], off["presence_feats"].transpose(0, 1), "presence_feats")
    check_spread(off)


def test_decoder_intermediates(tiny, tiny_inputs, tiny_outputs):
    """Every layer's reference boxes and presence logit against the official decoder's own outputs."""
    _, ours = tiny_outputs
    x = tiny_inputs
    B = x["memory"].shape[0]
    H, W = x["feat_size"]
    dec = tiny.official.transformer.decoder
    with cpu_mode(), torch.no_grad():
        hs, ref, presence, _ = dec(
            tgt=dec.query_embed.weight.unsqueeze(1).repeat(1, B, 1), memory=x["memory"].transpose(0, 1),
            pos=x["pos"].transpose(0, 1), reference_boxes=None, level_start_index=torch.tensor([0]),
            spatial_shapes=torch.tensor([[H, W]]), valid_ratios=torch.ones(B, 1, 2), tgt_mask=None,
            memory_text=x["prompt"].transpose(0, 1), text_attention_mask=x["prompt_mask"], apply_dac=False,
        )
    _close(ours["hs_all"], hs.transpose(1, 2), "hs_all (decoder)")
    _close(ours["ref_boxes_all"], ref.transpose(1, 2), "ref_boxes_all")
    _close(ours["presence_logit_all"], presence.transpose(1, 2), "presence_logit_all")
    assert (ours["ref_boxes_all"][1:] - ours["ref_boxes_all"][:-1]).abs().max() > 1e-3, "boxes are not refined"


def test_prompt_padding_bias_once_equals_the_per_layer_mask(tiny, tiny_inputs, monkeypatch):
    """The decoder builds the text attention's padding bias once a forward and hands it to every
    layer; the outputs are bit for bit those of each layer building it from ``prompt_mask``."""
    import sam3fast.model.decoder as decoder_mod

    x = tiny_inputs
    calls = []
    real = decoder_mod.key_padding_bias

    def counted(mask, dtype):
        calls.append(dtype)
        return real(mask, dtype)

    def run():
        with torch.no_grad():
            return tiny.decoder(x["memory"], x["pos"], x["feat_size"], x["prompt"], x["prompt_mask"], True)

    import sam3fast.model.common as common_mod

    in_layers = []
    layer_real = common_mod.key_padding_bias
    monkeypatch.setattr(common_mod, "key_padding_bias", lambda m, d: in_layers.append(d) or layer_real(m, d))
    monkeypatch.setattr(decoder_mod, "key_padding_bias", counted)
    once = run()
    assert len(calls) == 1 and in_layers == []  # built once; no layer builds its own
    monkeypatch.setattr(decoder_mod, "key_padding_bias", lambda mask, dtype: None)  # each layer: its mask
    per_layer = run()
    assert len(in_layers) == len(tiny.decoder.layers)
    assert once.keys() == per_layer.keys()
    for k in once:
        assert torch.equal(once[k], per_layer[k]), k


@pytest.mark.parametrize("rpb_kernel", [False, True])
def test_bf16_cross_attention_weights_give_the_per_call_cast(rpb_kernel):
    """A bfloat16 build keeps the decoder's image cross-attention weights in bfloat16 (cast once):
    the outputs are bit for bit those of the same decoder with those weights in float32, cast to
    the memory's bfloat16 at each call (the layout before), through both image cross-attention paths
    (the rpb op's wiring, its CUDA dispatch forced on CPU tensors with head dim 16, and the
    materialized bias)."""
    import copy

    from sam3fast.build import _cast_floating_
    from sam3fast.kernels import _triton_compat as tc

    torch.manual_seed(0)
    dec = Decoder(d_model=64, num_heads=4, dim_feedforward=96, num_layers=2, num_queries=12).eval()
    with torch.no_grad():
        for p in dec.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1))
    _cast_floating_(torch.nn.ModuleDict({"decoder": dec}), torch.bfloat16)  # the builders' cast
    assert dec.query_embed.weight.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for layer in dec.layers for p in layer.cross_attn.parameters())
    before = copy.deepcopy(dec)
    for layer in before.layers:
        layer.cross_attn.float()  # exact: bfloat16 values in float32
    g = torch.Generator().manual_seed(1)
    H, W, P = 5, 6, 7
    memory, pos = (torch.randn(2, H * W, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    prompt = torch.randn(2, P, 64, generator=g).to(torch.bfloat16)
    mask = torch.arange(P)[None] >= torch.tensor([[4], [7]])
    old = tc.KERNEL_PATHS_ON_CPU
    tc.KERNEL_PATHS_ON_CPU = rpb_kernel
    try:
        assert dec.use_rpb_kernel(memory) == rpb_kernel
        with torch.no_grad():
            got, want = (d(memory, pos, (H, W), prompt, mask, True) for d in (dec, before))
    finally:
        tc.KERNEL_PATHS_ON_CPU = old
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert got["hs"].float().std(dim=1).mean() > 1e-3 and got["pred_boxes"].std(dim=1).mean() > 1e-2  # queries differ


def test_rpb_bias_matches_official(tiny):
    dec = tiny.official.transformer.decoder
    g = torch.Generator().manual_seed(3)
    ref = torch.rand(2, 5, 4, generator=g) * 0.8 + 0.1
    with cpu_mode(), torch.no_grad():
        want = dec._get_rpb_matrix(ref.transpose(0, 1), (6, 10))  # (B, H, Q, N)
        got = tiny.decoder.rpb_bias(ref, (6, 10))
    assert got.shape == (2, tiny.cfg.num_heads, 6, 60)
    assert torch.equal(got[:, :, 0], torch.zeros_like(got[:, :, 0]))
    _close(got[:, :, 1:], want, "boxRPB bias", tol=1e-6)


@pytest.mark.parametrize("d_model", [256, 64])
def test_box_sine_embedding_bit_exact(d_model):
    """``gen_sineembed_for_position`` (the four coordinates through each step together, the divisors
    cached after the first call) is bit for bit the official function, call after call, on boxes
    inside and outside [0, 1]."""
    from sam3fast.model import decoder as dec

    official()
    from sam3.model.model_misc import gen_sineembed_for_position as official_embed

    dec._BOX_SINE_DIVISORS.pop((d_model // 2, torch.device("cpu")), None)
    g = torch.Generator().manual_seed(d_model)
    for shape in [(2, 200, 4), (1, 7, 4), (3, 1, 4)]:
        pos = torch.rand(shape, generator=g) * 3 - 1
        got = dec.gen_sineembed_for_position(pos, d_model)
        want = official_embed(pos, d_model)
        assert got.shape == want.shape == (*shape[:2], 2 * d_model) and torch.equal(got, want), shape
    assert len([k for k in dec._BOX_SINE_DIVISORS if k[0] == d_model // 2]) == 1


def test_scoring_parity(tiny_outputs):
    off, ours = tiny_outputs
    _close(ours["pred_logits"], off["pred_logits"], "pred_logits")
    assert ours["pred_logits"].abs().max() <= 12.0


def test_scoring_clamps(tiny, tiny_inputs):
    hs = torch.randn(2, 16, tiny.cfg.d_model) * 1e3
    with torch.no_grad():
        logits = tiny.scoring(hs, tiny_inputs["prompt"], tiny_inputs["prompt_mask"])
        want = tiny.official.dot_prod_scoring(
            hs.unsqueeze(0), tiny_inputs["prompt"].transpose(0, 1), tiny_inputs["prompt_mask"]
        )[0]
    assert logits.abs().max() == 12.0
    _close(logits, want, "clamped logits")


def test_seg_head_parity(tiny_outputs):
    off, ours = tiny_outputs
    _close(ours["pred_masks"], off["pred_masks"], "pred_masks")
    _close(ours["semantic_seg"], off["semantic_seg"], "semantic_seg")
    check_spread(off)


def test_padded_prompt_tokens_are_ignored(tiny, tiny_inputs, tiny_outputs):
    _, ours = tiny_outputs
    x = dict(tiny_inputs)
    x["prompt"] = torch.where(x["prompt_mask"].unsqueeze(-1), torch.full_like(x["prompt"], 50.0), x["prompt"])
    again = run_ours(tiny, x)
    for k in ("hs", "pred_boxes", "presence_logit", "pred_logits", "pred_masks"):
        _close(again[k], ours[k], f"{k} with changed padding", tol=1e-6)


def test_seg_head_shared_image_fpn(tiny, tiny_inputs, tiny_outputs):
    """A batch-1 FPN broadcasts over B prompts on one image (official: FPN indexed by image id)."""
    _, ours = tiny_outputs
    x = tiny_inputs
    fpn1 = [f[:1] for f in x["fpn"]]
    with torch.no_grad():
        got = tiny.seg(fpn1, x["memory"], ours["hs"], x["prompt"], x["prompt_mask"])["pred_masks"]
        want = tiny.seg([f.expand(2, -1, -1, -1) for f in fpn1], x["memory"], ours["hs"], x["prompt"],
                        x["prompt_mask"])["pred_masks"]
    _close(got, want, "broadcast fpn", tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_nearest_upsampled_is_the_two_step_sum(dtype):
    """The pixel decoder's one-pass ``f + nearest2x(p)`` equals the official two-step sum bit for bit,
    in the layout the two-step sum gives: both layouts (and mixed), a batch of 1 on either side, and
    sizes that are not an exact 2x (the two-step fallback: 3x, odd, mismatched channels)."""
    gen = torch.Generator().manual_seed(3)
    cl = torch.channels_last
    cases = [((2, 8, 12, 10), (2, 8, 6, 5), None, None), ((1, 8, 12, 10), (3, 8, 6, 5), None, None),
             ((3, 8, 12, 10), (1, 8, 6, 5), cl, cl), ((2, 8, 12, 10), (2, 8, 6, 5), cl, None),
             ((2, 8, 12, 10), (2, 8, 6, 5), None, cl), ((1, 8, 12, 10), (2, 8, 6, 5), cl, cl),
             ((2, 4, 18, 15), (2, 4, 6, 5), None, None), ((2, 4, 13, 10), (2, 4, 6, 5), None, None),
             ((2, 4, 12, 10), (2, 1, 6, 5), None, None)]
    for fs, ps, ffmt, pfmt in cases:
        f = torch.randn(fs, generator=gen).to(dtype)
        p = (torch.randn(ps, generator=gen) * 3).to(dtype)
        f = f.to(memory_format=ffmt) if ffmt else f
        p = p.to(memory_format=pfmt) if pfmt else p
        want = f + torch.nn.functional.interpolate(p, size=f.shape[-2:], mode="nearest")
        got = add_nearest_upsampled(f, p)
        assert torch.equal(got, want), (fs, ps, ffmt, pfmt)
        assert got.dtype == want.dtype and got.stride() == want.stride(), (fs, ps, ffmt, pfmt)
        if fs[-2:] == (2 * ps[-2], 2 * ps[-1]) and fs[1] == ps[1]:  # one pass: the sum, viewed back to 4-D
            assert got._base is not None and got._base.dim() == 6, (fs, ps, ffmt, pfmt)
    f, p = torch.randn(1, 4, 12, 10, dtype=dtype), torch.randn(1, 4, 6, 5, dtype=torch.float32)
    assert torch.equal(add_nearest_upsampled(f, p), f + torch.nn.functional.interpolate(p, size=(12, 10)))
    f = torch.randn(1, 4, 10, 12, dtype=dtype).transpose(-1, -2)  # neither layout: the two-step form
    assert torch.equal(add_nearest_upsampled(f, p), f + torch.nn.functional.interpolate(p, size=(12, 10)))


def test_joint_logits_formula():
    logits = torch.tensor([[[-20.0], [0.0], [3.0]]])
    presence = torch.tensor([[1.0]])
    got = joint_logits(logits, presence)
    official()
    from sam3.model.model_misc import inverse_sigmoid

    # Sam3Image._update_scores_and_boxes with supervise_joint_box_scores=True
    want = inverse_sigmoid(logits.sigmoid() * presence.sigmoid().unsqueeze(2)).clamp(min=-10.0, max=10.0)
    _close(got, want, "joint logits", tol=1e-6)
    assert torch.equal(box_cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])), torch.tensor([0.4, 0.3, 0.6, 0.7]))


# ----------------------------------------------------------------------------------------------
# Full size: 200 queries, 6 layers, d 256, 72 x 72 memory, masks at 288 x 288


def _full_size_heads_cfg():
    """The sam3 config with the ViT and text tower shrunk (only the decoder/scoring/seg head are
    compared; this builds fast), keeping the 1008 px / 14 px grid the decoder is built for."""
    tiny_cfg = get_config("tiny")
    full = get_config("sam3")
    return full.replace(vit=dataclasses.replace(tiny_cfg.vit, img_size=full.vit.img_size, pretrain_img_size=504),
                        text=tiny_cfg.text)


@pytest.mark.slow
def test_full_size_parity():
    cfg = _full_size_heads_cfg()
    s = Setup(cfg)
    x = make_inputs(cfg, B=1, feat_size=(cfg.feat_size, cfg.feat_size), P=33, n_valid=[6])
    off, ours = run_official(s.official, x), run_ours(s, x)
    assert ours["pred_masks"].shape == (1, 200, 288, 288)
    for k, k_off in (("hs", "queries"), ("pred_boxes", "pred_boxes"), ("pred_boxes_xyxy", "pred_boxes_xyxy"),
                     ("presence_logit", "presence_logit_dec"), ("pred_logits", "pred_logits"),
                     ("pred_masks", "pred_masks")):
        _close(ours[k], off[k_off], k)
    check_spread(off)


@pytest.mark.slow
def test_full_size_bf16_decoder_island():
    """The decoder and scoring head of a bfloat16 build (float32 islands: float32 weights, computed
    in float32 but for the decoder's image cross-attention, in the memory's bfloat16; outputs in
    the inputs' dtype) at full size, on bfloat16 inputs, against the float32 official on the same
    values; next to the official's bfloat16 autocast on them and to the decoder cast to bfloat16
    (the mode before the island). The island's error (measured 0.16-0.45x the autocast's) must be at
    most 0.6x the autocast's in hs, the presence logit and the query logits (or no more than the
    reference's own bfloat16 rounding: the presence logit is one number per image, and an output
    that is the correctly rounded reference can do no better, whatever the autocast's error), and
    below the all-bfloat16 decoder's there and in the boxes."""
    from sam3fast.build import _cast_floating_

    cfg = _full_size_heads_cfg()
    s = Setup(cfg)
    x = make_inputs(cfg, B=1, feat_size=(cfg.feat_size, cfg.feat_size), P=33, n_valid=[6], seed=4)
    for k in ("memory", "pos", "prompt"):  # values every side sees exactly
        x[k] = x[k].to(torch.bfloat16).float()
    want = run_official(s.official, x, segment=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = run_official(s.official, x, segment=False)
    x16 = {k: (v.to(torch.bfloat16) if k in ("memory", "pos", "prompt") else v) for k, v in x.items()}
    island = torch.nn.ModuleDict({"decoder": s.decoder, "scoring": s.scoring})
    _cast_floating_(island, torch.bfloat16)  # the builders' cast: the islands stay float32
    assert s.decoder.query_embed.weight.dtype == torch.float32
    ours = run_ours(s, x16, segment=False)
    assert ours["hs"].dtype == torch.bfloat16 and ours["pred_logits"].dtype == torch.bfloat16
    assert ours["pred_boxes"].dtype == torch.float32
    s.decoder.to(torch.bfloat16)  # no island: the decoder in bfloat16 (the scoring island kept)
    plain = run_ours(s, x16, segment=False)
    for k, k_off in (("hs", "queries"), ("presence_logit", "presence_logit_dec"), ("pred_logits", "pred_logits"),
                     ("pred_boxes", "pred_boxes")):
        ref = want[k_off].double()
        e_ours, e_auto, e_plain = (rel(o.double(), ref) for o in (ours[k], auto[k_off], plain[k]))
        assert 0 < e_auto and e_ours < e_plain, (k, e_ours, e_auto, e_plain)
        if k != "pred_boxes":  # the box chain is float32 in every mode
            rounding = rel(ref.to(ours[k].dtype).double(), ref)  # the best a bfloat16 output can do
            assert e_ours <= max(0.6 * e_auto, rounding), (k, e_ours, e_auto, e_plain, rounding)
