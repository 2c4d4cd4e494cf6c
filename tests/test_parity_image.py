"""End-to-end parity with the official package: the same re-drawn weights, the same inputs, through
both processors (and per stage through the raw head outputs). Tiny config in seconds; the full
``sam3`` config at 1008 px once (marked slow)."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

import sam3fast
from sam3fast.config import get_config
from kernel_checks import KernelPathsOnCpu
from official_ref import build_official_image_model, cpu_mode, official, official_checkpoint_state, redraw_


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    # smooth random blobs so the features have structure (pure noise makes every query alike)
    base = rng.random((h // 8 + 2, w // 8 + 2, 3))
    img = Image.fromarray((base * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


class Pair:
    """The official model and sam3fast built from the same checkpoint file."""

    def __init__(self, cfg, tmp_path, seed=0):
        official()
        from sam3.model.sam3_image_processor import Sam3Processor as OfficialProcessor

        self.cfg = cfg
        self.ref = build_official_image_model(cfg)
        redraw_(self.ref, seed=seed)
        path = self.path = str(tmp_path / "sam3.pt")
        torch.save({"model": official_checkpoint_state(self.ref)}, path)
        self.ours = sam3fast.build_sam3_image_model(checkpoint_path=path, device="cpu", config=cfg)
        with cpu_mode():
            self.ref_proc = OfficialProcessor(self.ref, resolution=cfg.resolution, device="cpu",
                                              confidence_threshold=0.5)
        self.proc = sam3fast.Sam3Processor(self.ours, resolution=cfg.resolution, device="cpu",
                                           confidence_threshold=0.5)
        self.ref_raw = []
        orig = self.ref.forward_grounding

        def spy(*a, **k):
            out = orig(*a, **k)
            self.ref_raw.append(out)
            return out

        self.ref.forward_grounding = spy

    def run(self, image, steps):
        """steps: list of ("text", prompt) / ("box", [cx, cy, w, h], label) applied in order; returns
        the two final states and the two raw head outputs."""
        with cpu_mode():
            rs = self.ref_proc.set_image(image)
        s = self.proc.set_image(image)
        for st in steps:
            if st[0] == "text":
                with cpu_mode():
                    rs = self.ref_proc.set_text_prompt(st[1], rs)
                s = self.proc.set_text_prompt(st[1], s)
            else:
                with cpu_mode():
                    rs = self.ref_proc.add_geometric_prompt(st[1], st[2], rs)
                s = self.proc.add_geometric_prompt(st[1], st[2], s)
        return rs, s


def _raw_ours(pair, state):
    bo = state["backbone_out"]
    gp = state.get("geometric_prompt", {"boxes": []})
    kw = {}
    if gp["boxes"]:
        kw = dict(boxes=torch.tensor([gp["boxes"]]), box_labels=torch.tensor([gp["labels"]]),
                  box_mask=torch.zeros(1, len(gp["boxes"]), dtype=torch.bool))
    with torch.inference_mode():
        return pair.ours.forward_heads(bo, torch.zeros(1, dtype=torch.long), bo["language_features"],
                                       bo["language_mask"], **kw)


def _compare(pair, rs, s, tol=1e-4, check_spread=True):
    ref = pair.ref_raw[-1]
    ours = _raw_ours(pair, s)
    # per stage: backbone features and text features
    for lvl, (a, b) in enumerate(zip(s["backbone_out"]["backbone_fpn"], rs["backbone_out"]["backbone_fpn"])):
        assert _rel(a, b) < tol, f"fpn level {lvl}: {_rel(a, b)}"
    assert _rel(s["backbone_out"]["language_features"],
                rs["backbone_out"]["language_features"].transpose(0, 1)) < tol
    assert torch.equal(s["backbone_out"]["language_mask"], rs["backbone_out"]["language_mask"])
    # encoder memory (official: seq-first (HW, B, D))
    assert _rel(ours["encoder_hidden_states"], ref["encoder_hidden_states"].transpose(0, 1)) < tol
    # decoder
    assert _rel(ours["pred_logits"], ref["pred_logits"][..., 0]) < tol
    assert _rel(ours["pred_boxes"], ref["pred_boxes"]) < tol
    assert _rel(ours["presence_logit"], ref["presence_logit_dec"].reshape(-1)) < tol
    assert _rel(ours["pred_masks"], ref["pred_masks"]) < tol
    # processor outputs: at the default threshold, then at the median score so that about half
    # the queries are kept (re-drawn weights put most scores on one side of 0.5)
    p_ref = (ref["pred_logits"][0, :, 0].sigmoid() * ref["presence_logit_dec"].sigmoid().reshape(())).double()
    _compare_states(p_ref, rs, s)
    thr = float(p_ref.median()) - 1e-6
    with cpu_mode():
        rs = pair.ref_proc.set_confidence_threshold(thr, dict(rs))
    s = pair.proc.set_confidence_threshold(thr, dict(s))
    _compare_states(p_ref, rs, s, thr)
    pair.proc.set_confidence_threshold(0.5)
    with cpu_mode():
        pair.ref_proc.set_confidence_threshold(0.5)
    if check_spread:
        # a degenerate model could "match" without testing anything: query logits must differ by
        # far more than the parity tolerance (full size, re-drawn weights: std ~0.07)
        assert ref["pred_logits"][0, :, 0].std() > 0.03
        # boxes differ across queries (at full size some coordinates saturate near the image edge,
        # so the spread is taken over all four coordinates)
        assert ref["pred_boxes"][0].std(0).mean() > 0.01
        area = (ref["pred_masks"][0] > 0).float().mean((1, 2))
        # masks differ across queries (relative: at full size the re-drawn masks are small)
        assert 0 < area.mean() < 1 and area.std() > 0.02 * area.mean()
        assert 0 < s["scores"].numel() < pair.cfg.num_queries


def _compare_states(p_ref, rs, s, thr=0.5):
    if ((p_ref - thr).abs() < 1e-5).any():
        return  # a score on the threshold may flip either way
    assert s["scores"].shape == rs["scores"].shape
    assert torch.allclose(s["scores"], rs["scores"], rtol=1e-4, atol=1e-5)
    assert torch.allclose(s["boxes"], rs["boxes"], rtol=1e-4, atol=1e-2)
    assert s["masks"].shape == rs["masks"].shape and s["masks"].dtype == torch.bool
    if s["masks"].numel():
        # per-mask IoU, so small masks cannot hide behind a whole-image flip fraction
        inter = (s["masks"] & rs["masks"]).flatten(1).sum(1).float()
        union = (s["masks"] | rs["masks"]).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
        assert iou.min() > 0.99, iou.min()
    assert torch.allclose(s["masks_logits"], rs["masks_logits"], atol=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Pair(get_config("tiny"), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_wide(tmp_path_factory):
    """The tiny config at d_model 128: 16-wide heads in the fusion encoder and the decoder, which
    their kernels take (the tiny config's 8-wide heads they refuse)."""
    import dataclasses

    return Pair(dataclasses.replace(get_config("tiny"), d_model=128), tmp_path_factory.mktemp("tiny_wide"))


@pytest.mark.parametrize(
    "steps",
    [
        [("text", "yellow bird")],
        [("text", "a cat"), ("box", [0.4, 0.5, 0.3, 0.4], True), ("box", [0.75, 0.3, 0.2, 0.2], False)],
        [("box", [0.5, 0.5, 0.4, 0.6], True)],
        [("box", [0.3, 0.3, 0.2, 0.2], True), ("box", [0.7, 0.6, 0.3, 0.3], True)],
    ],
    ids=["text", "text+pos+neg_boxes", "one_box", "two_boxes"],
)
def test_tiny_processor_parity(tiny, steps):
    image = _image(90, 130, seed=len(steps))  # non-square
    rs, s = tiny.run(image, steps)
    _compare(tiny, rs, s)
    assert s["masks"].shape[-2:] == (90, 130)


def test_tiny_several_prompts_batched(tiny):
    """The native batched API (one backbone pass, prompts batched through the heads) equals the
    official processor run prompt by prompt, on two images of different sizes."""
    images = [_image(100, 70, 5), _image(64, 96, 6)]
    prompts = ["yellow bird", "tree", "a red car on the road"]
    pred = sam3fast.ImagePredictor(tiny.ours, confidence_threshold=0.5)
    res = pred.predict(images, prompts)
    for i, im in enumerate(images):
        for j, p in enumerate(prompts):
            rs, _ = tiny.run(im, [("text", p)])
            ref = tiny.ref_raw[-1]
            p_ref = ref["pred_logits"][0, :, 0].sigmoid() * ref["presence_logit_dec"].sigmoid().reshape(())
            if ((p_ref - 0.5).abs() < 1e-4).any():
                continue
            got = res[i][j]
            assert got["scores"].shape == rs["scores"].shape
            assert torch.allclose(got["scores"], rs["scores"], rtol=1e-4, atol=1e-5)
            assert torch.allclose(got["boxes"], rs["boxes"], rtol=1e-4, atol=1e-2)
            assert (got["masks"] != rs["masks"][:, 0]).float().mean() < 1e-3


N_IMG = 8


@pytest.mark.parametrize("kernel_paths,tanh_gelu", [(False, False), (True, False), (False, True)],
                         ids=["cpu_paths", "cuda_dispatch", "tanh_gelu_epilogue"])
def test_tiny_bf16_error_budget(request, kernel_paths, tanh_gelu):
    """sam3fast in bfloat16 against the float32 official, next to the official's own bfloat16 mode
    (its autocast; on CPU ``torch.autocast("cpu", bfloat16)`` stands in for the CUDA autocast its
    code forces): the mean relative error of the query logits, boxes and mask logits over eight
    images (N_IMG) is at most 2x the official's. (Over four images the logits' ratio was 2.12x on an
    AMD EPYC without AVX-512, 2026-11-27, where the stand-in's own error on those four was
    unusually small: 0.0051 against 0.0073 over eight; over eight, 1.51x.) The scoring head's float32 island is what brings the logits
    inside (without it: 3.0x here). ``cuda_dispatch``: the modules take their CUDA paths (the fused
    trunk, the kernels' ops, whose CPU kernels are the references; ``KernelPathsOnCpu``), which must
    call the ops listed and keep the budget (at d_model 128, where the attention kernels serve).
    ``tanh_gelu_epilogue``: the trunk's tanh-approximate GELU (the default on CUDA in bf16, "auto";
    forced here) keeps the budget too."""
    tiny = request.getfixturevalue("tiny_wide" if kernel_paths else "tiny")
    ours16 = sam3fast.build_sam3_image_model(checkpoint_path=tiny.path, device="cpu", config=tiny.cfg,
                                             dtype=torch.bfloat16)
    trunk = ours16.backbone.vision_backbone.trunk
    trunk.tanh_gelu_epilogue = tanh_gelu
    assert [b.mlp.tanh_gelu_epilogue for b in trunk.blocks] == [tanh_gelu] * len(trunk.blocks)
    proc16 = sam3fast.Sam3Processor(ours16, resolution=tiny.cfg.resolution, device="cpu")
    errs = {k: [[], []] for k in ("pred_logits", "pred_boxes", "pred_masks")}
    record = KernelPathsOnCpu() if kernel_paths else contextlib.nullcontext()
    for seed in range(N_IMG):
        image = _image(120, 160, seed + 20)
        tiny.run(image, [("text", "yellow bird")])
        ref = tiny.ref_raw[-1]
        with cpu_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            tiny.ref_proc.set_text_prompt("yellow bird", tiny.ref_proc.set_image(image))
        ref16 = tiny.ref_raw[-1]
        with record:
            bo = proc16.set_text_prompt("yellow bird", proc16.set_image(image))["backbone_out"]
            with torch.inference_mode():
                ours = ours16.forward_heads(bo, None, bo["language_features"], bo["language_mask"])
        assert ours["pred_logits"].dtype == torch.bfloat16
        for k, e in errs.items():
            want = ref[k][..., 0] if k == "pred_logits" else ref[k]
            off = ref16[k][..., 0] if k == "pred_logits" else ref16[k]
            e[0].append(_rel(ours[k].float(), want.float()))
            e[1].append(_rel(off.float(), want.float()))
    for k, (mine, theirs) in errs.items():
        mine, theirs = sum(mine) / N_IMG, sum(theirs) / N_IMG
        assert 0 < theirs and mine <= 2 * theirs, (k, mine, theirs)
    if kernel_paths:
        print(sorted(record.ops))
        assert {"rope", "residual_norm", "rpb_attention", "prompt_cross_attention"} <= record.ops, record.ops


def test_tiny_threshold_and_reset(tiny):
    image = _image(80, 80, 9)
    rs, s = tiny.run(image, [("text", "yellow bird")])
    with cpu_mode():
        rs = tiny.ref_proc.set_confidence_threshold(0.3, rs)
    s = tiny.proc.set_confidence_threshold(0.3, s)
    assert torch.allclose(s["scores"], rs["scores"], rtol=1e-4, atol=1e-5)
    tiny.proc.set_confidence_threshold(0.5)
    with cpu_mode():
        tiny.ref_proc.set_confidence_threshold(0.5)
    tiny.ref_proc.reset_all_prompts(rs)
    tiny.proc.reset_all_prompts(s)
    assert set(rs) == set(s) - {"geometric_prompt"} or set(rs) == set(s)
    assert "scores" not in s and "language_features" not in s["backbone_out"]


@pytest.mark.slow
def test_full_size_parity(tmp_path):
    """The official sizes (840 M parameters) at 1008 px, text prompt and a box, on CPU."""
    pair = Pair(get_config("sam3"), tmp_path, seed=0)
    image = _image(300, 420, seed=11)
    rs, s = pair.run(image, [("text", "yellow bird"), ("box", [0.5, 0.5, 0.3, 0.4], True)])
    _compare(pair, rs, s, tol=2e-4)
