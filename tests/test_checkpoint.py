"""Checkpoint loading: the official sam3.pt layout, plain and bf16 state dicts, strict errors."""

import os

import pytest
import torch

import sam3fast
from sam3fast import CheckpointError
from sam3fast.checkpoint import float32_islands, model_dtype_parts
from sam3fast.config import get_config
from official_ref import build_official_image_model, official_checkpoint_state, redraw_

CFG = get_config("tiny")


@pytest.fixture(scope="module")
def official_sd():
    m = build_official_image_model(CFG)
    redraw_(m, seed=1)
    return official_checkpoint_state(m)


def _save(tmp_path, obj, name="ckpt.pt"):
    p = os.path.join(tmp_path, name)
    torch.save(obj, p)
    return p


def _build(path, **kw):
    return sam3fast.build_sam3_image_model(checkpoint_path=path, device="cpu", config="tiny", **kw)


def test_official_layout_loads_exactly(tmp_path, official_sd):
    # the released file wraps the state dict under "model" and carries tracker.* keys and the
    # SAM 2 neck, neither of which the plain image model builds: they are set aside.
    extra = {
        "tracker.maskmem_tpos_enc": torch.zeros(7, 1, 1, 64),
        "tracker.no_obj_ptr": torch.zeros(1, 256),
        "detector.backbone.vision_backbone.sam2_convs.2.conv_1x1.weight": torch.zeros(
            CFG.d_model, CFG.vit.embed_dim, 1, 1),
    }
    path = _save(tmp_path, {"model": {**official_sd, **extra}})
    model = _build(path)
    ours = model.state_dict()
    for k, v in official_sd.items():
        kk = k[len("detector."):]
        assert kk in ours, kk
        assert torch.equal(ours[kk], v), kk
    assert not any(t.is_meta for t in ours.values())
    assert not model.training


def test_plain_and_bf16_state_dicts(tmp_path, official_sd):
    model = _build(_save(tmp_path, {"model": official_sd}))
    plain = _save(tmp_path, model.state_dict(), "plain.pt")
    m2 = _build(plain)
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    bf16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in official_sd.items()}
    m3 = _build(_save(tmp_path, bf16, "bf16.pt"))
    for k, v in bf16.items():
        got = m3.state_dict()[k[len("detector."):]]
        assert got.dtype == (torch.float32 if v.is_floating_point() else v.dtype)
        assert torch.equal(got, v.to(got.dtype)), k
    m4 = _build(_save(tmp_path, bf16, "bf16b.pt"), dtype=torch.bfloat16)
    assert m4.dtype == torch.bfloat16
    _assert_island_float32(m4)


def _assert_island_float32(model):
    """A bfloat16 model: every floating tensor in bfloat16 but the float32 islands' (the query decoder,
    the scoring head, the ViT trunk's LayerNorms and pos table), less the decoder's image
    cross-attention (``follows_model_dtype``: computed in the memory's dtype, kept in bfloat16)."""
    islands = float32_islands(model)
    parts = model_dtype_parts(model)
    n_layers = len(model.transformer.decoder.layers)
    assert set(parts) == {f"transformer.decoder.layers.{i}.cross_attn." for i in range(n_layers)}, parts
    trunk = "backbone.vision_backbone.trunk."
    n_ln = len([m for m in model.backbone.vision_backbone.trunk.modules() if isinstance(m, torch.nn.LayerNorm)])
    assert {"transformer.decoder.", "dot_prod_scoring.", trunk + "pos_embed", trunk + "ln_pre.",
            trunk + "blocks.0.norm1.", trunk + "blocks.0.norm2."} <= set(islands)
    assert len(islands) == 3 + n_ln, islands
    n_island = {p: 0 for p in islands}
    n_parts = 0
    for k, v in list(model.named_parameters()) + list(model.named_buffers()):
        if v.is_floating_point():
            island = next((p for p in islands if k.startswith(p)), None)
            if island and k.startswith(parts):
                assert k.startswith("transformer.decoder.layers.") and v.dtype == torch.bfloat16, k
                n_parts += 1
                continue
            if island:
                n_island[island] += 1
            assert v.dtype == (torch.float32 if island else torch.bfloat16), k
    assert n_parts == 4 * n_layers  # in_proj weight and bias, out_proj weight and bias a layer
    assert n_island["dot_prod_scoring."] >= 6 and n_island["transformer.decoder."] >= 50, n_island
    assert n_island[trunk + "pos_embed"] == 1 and n_island[trunk + "ln_pre."] == 2, n_island


def test_float32_island_in_random_weight_builds():
    _assert_island_float32(sam3fast.build_image_model("tiny", device="cpu", dtype=torch.bfloat16))


def test_strict_errors_list_every_key(tmp_path, official_sd):
    sd = dict(official_sd)
    miss = "detector.transformer.decoder.query_embed.weight"
    del sd[miss]
    sd["detector.not_a_module.weight"] = torch.zeros(3)
    shp = "detector.dot_prod_scoring.hs_proj.weight"
    sd[shp] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as ei:
        _build(_save(tmp_path, sd))
    msg = str(ei.value)
    assert "1 missing" in msg and miss[len("detector."):] in msg
    assert "1 unexpected" in msg and "not_a_module.weight" in msg
    assert "1 mis-shaped" in msg and "hs_proj.weight" in msg and "(5, 5)" in msg


@pytest.mark.parametrize("kind", ["truncated", "text", "empty", "directory", "missing", "not_a_dict"])
def test_bad_files(tmp_path, official_sd, kind):
    path = os.path.join(tmp_path, "bad.pt")
    if kind == "truncated":
        good = _save(tmp_path, official_sd, "good.pt")
        data = open(good, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif kind == "text":
        open(path, "w").write("this is not a checkpoint\n")
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "directory":
        os.makedirs(path)
    elif kind == "not_a_dict":
        torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError):
        _build(path)


def test_hub_cache_miss_says_how_to_get_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="facebook/sam3"):
        sam3fast.build_sam3_image_model(device="cpu", config="tiny")


def test_hub_cache_hit_is_used(tmp_path, monkeypatch, official_sd):
    import huggingface_hub.constants as c

    snap = tmp_path / "models--facebook--sam3" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--facebook--sam3" / "refs").mkdir()
    (tmp_path / "models--facebook--sam3" / "refs" / "main").write_text("abc123")
    torch.save(official_sd, snap / "sam3.pt")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    model = sam3fast.build_sam3_image_model(device="cpu", config="tiny")
    k = "transformer.decoder.query_embed.weight"
    assert torch.equal(model.state_dict()[k], official_sd["detector." + k])


def test_interactive_model_needs_tracker_keys(tmp_path, official_sd):
    with pytest.raises(CheckpointError, match="tracker"):
        _build(_save(tmp_path, {"model": official_sd}), enable_inst_interactivity=True)


def test_interactive_layout_loads_exactly(tmp_path):
    m = build_official_image_model(CFG, enable_inst_interactivity=True)
    redraw_(m, seed=2)
    sd = official_checkpoint_state(m)
    assert any(k.startswith("tracker.") for k in sd)
    model = _build(_save(tmp_path, {"model": sd}), enable_inst_interactivity=True)
    ours = model.state_dict()
    ref = m.state_dict()
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k


def test_weights_are_assigned_not_copied(tmp_path, official_sd):
    """Built on the meta device, the memory-mapped checkpoint tensors become the parameters
    themselves (no second copy in RAM) when no dtype cast is needed."""
    from sam3fast.checkpoint import _image_keys_from_official, load_into, read_state_dict
    from sam3fast.model.sam3_image import Sam3ImageModel

    sd = read_state_dict(_save(tmp_path, {"model": official_sd}))
    image_sd, _ = _image_keys_from_official(sd)
    with torch.device("meta"):
        model = Sam3ImageModel(CFG)
    load_into(model, image_sd)
    params = dict(model.named_parameters())
    for k in ("transformer.decoder.query_embed.weight", "backbone.vision_backbone.trunk.pos_embed"):
        assert params[k].data_ptr() == image_sd[k].data_ptr()
