"""Vision backbone (ViT trunk + dual neck + sine position encodings) vs the official sam3==0.1.4.

The official side is built with exactly the constructor arguments of
``official_ref.build_official_image_model`` (plus ``add_sam2_neck``), wrapped in
``SAM3VLBackbone(scalp=1)`` so that ``forward_image`` (level order, scalp) is the reference.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from official_ref import cpu_mode, official, redraw_
from sam3fast.config import get_config
from sam3fast.model.neck import PositionEmbeddingSine, VisionBackbone
from sam3fast.model.vit import apply_rope, compute_axial_cis


def _official_backbone(img_size, pretrain_img_size, embed_dim, depth, num_heads, mlp_ratio, window_size,
                       global_att_blocks, d_model, scale_factors=(4.0, 2.0, 1.0, 0.5), add_sam2_neck=False):
    official()
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine as OPE
    from sam3.model.vitdet import ViT
    from sam3.model.vl_combiner import SAM3VLBackbone

    with cpu_mode():
        vit = ViT(
            img_size=img_size, pretrain_img_size=pretrain_img_size, patch_size=14,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            norm_layer="LayerNorm", drop_path_rate=0.1, qkv_bias=True, use_abs_pos=True,
            tile_abs_pos=True, global_att_blocks=global_att_blocks, rel_pos_blocks=(),
            use_rope=True, use_interp_rope=True, window_size=window_size,
            pretrain_use_cls_token=True, retain_cls_token=False, ln_pre=True, ln_post=False,
            return_interm_layers=False, bias_patch_embed=False, compile_mode=None,
        )
        pos = OPE(num_pos_feats=d_model, normalize=True, scale=None, temperature=10000,
                  precompute_resolution=img_size)
        neck = Sam3DualViTDetNeck(position_encoding=pos, d_model=d_model, scale_factors=list(scale_factors),
                                  trunk=vit, add_sam2_neck=add_sam2_neck)
        return SAM3VLBackbone(visual=neck, text=None, scalp=1).eval()


def _rel(a, b):
    """(relative L2 error, max abs error / max abs of reference)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item(), ((a - b).abs().max() / b.abs().max()).item()


def _assert_close(a, b, tol=2e-5):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.isfinite(a).all()
    l2, mx = _rel(a, b)
    assert l2 < tol and mx < 5 * tol, (l2, mx)


def _assert_spread(t):
    assert torch.isfinite(t).all()
    assert t.std() > 0.1
    # not constant over space (a broken position path tends to give flat maps)
    assert t.flatten(2).std(dim=2).mean() > 0.05


def _pair(add_sam2_neck, seed=0, **kw):
    cfg = get_config("tiny")
    v = cfg.vit
    args = dict(img_size=v.img_size, pretrain_img_size=v.pretrain_img_size, embed_dim=v.embed_dim, depth=v.depth,
                num_heads=v.num_heads, mlp_ratio=v.mlp_ratio, window_size=v.window_size,
                global_att_blocks=v.global_att_blocks, d_model=cfg.d_model)
    args.update(kw)
    off = redraw_(_official_backbone(add_sam2_neck=add_sam2_neck, **args), seed)
    ours = VisionBackbone(patch_size=14, add_sam2_neck=add_sam2_neck, **args).eval()
    ours.load_state_dict(off.vision_backbone.state_dict(), strict=True)
    return off, ours, args


def _compare_backbones(off, ours, x):
    with torch.no_grad():
        with cpu_mode():
            ref = off.forward_image(x)
            ref_trunk = off.vision_backbone.trunk(x)[-1]
        out = ours(x)
        trunk = ours.trunk(x)
    _assert_close(trunk, ref_trunk)
    _assert_spread(ref_trunk)
    g = ref_trunk.shape[-1]
    errs = {"trunk": _rel(trunk, ref_trunk)}
    assert len(out["backbone_fpn"]) == len(ref["backbone_fpn"]) == 3
    for i, (a, b, pa, pb) in enumerate(zip(out["backbone_fpn"], ref["backbone_fpn"], out["vision_pos_enc"],
                                            ref["vision_pos_enc"])):
        assert a.shape[-1] == g * (4, 2, 1)[i]  # highest resolution first
        _assert_close(a, b)
        _assert_spread(b)
        _assert_close(pa, pb, tol=1e-6)
        errs[f"fpn{i}"] = _rel(a, b)
    assert ref["vision_features"] is ref["backbone_fpn"][-1]
    sam2 = ref["sam2_backbone_out"]
    if sam2 is None:
        assert out["sam2_backbone_fpn"] is None and out["sam2_pos_enc"] is None
    else:
        for i, (a, b, pa, pb) in enumerate(zip(out["sam2_backbone_fpn"], sam2["backbone_fpn"], out["sam2_pos_enc"],
                                                sam2["vision_pos_enc"])):
            _assert_close(a, b)
            _assert_spread(b)
            _assert_close(pa, pb, tol=1e-6)
            # a distinct neck, not a copy of the SAM 3 one
            assert (a - out["backbone_fpn"][i]).abs().max() > 0.1
            errs[f"sam2_fpn{i}"] = _rel(a, b)
    return errs


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_sam2_neck", [False, True])
def test_tiny_parity(add_sam2_neck):
    off, ours, args = _pair(add_sam2_neck)
    x = torch.randn(2, 3, args["img_size"], args["img_size"], generator=torch.Generator().manual_seed(1))
    _compare_backbones(off, ours, x)


def test_padded_windows_tiling_and_trailing_block():
    """Grid 10 with window 4 (zero-padded windows), abs-pos table 4x4 tiled to 10x10 with a crop,
    RoPE scale 4/10 in the global block, and a block after the last global block (built, unused)."""
    off, ours, args = _pair(True, seed=3, img_size=140, depth=3, global_att_blocks=(1,))
    assert len(ours.trunk.blocks) == 3
    x = torch.randn(1, 3, 140, 140, generator=torch.Generator().manual_seed(2))
    _compare_backbones(off, ours, x)


def test_two_global_blocks_and_batch_three():
    off, ours, args = _pair(False, seed=5, depth=4, global_att_blocks=(1, 3), num_heads=2)
    x = torch.randn(3, 3, args["img_size"], args["img_size"], generator=torch.Generator().manual_seed(4))
    _compare_backbones(off, ours, x)


@pytest.mark.parametrize("add_sam2_neck", [False, True])
def test_state_dict_matches_official(add_sam2_neck):
    cfg = get_config("tiny")
    off = _official_backbone(
        img_size=cfg.vit.img_size, pretrain_img_size=cfg.vit.pretrain_img_size, embed_dim=cfg.vit.embed_dim,
        depth=cfg.vit.depth, num_heads=cfg.vit.num_heads, mlp_ratio=cfg.vit.mlp_ratio,
        window_size=cfg.vit.window_size, global_att_blocks=cfg.vit.global_att_blocks, d_model=cfg.d_model,
        add_sam2_neck=add_sam2_neck,
    )
    ref = off.vision_backbone.state_dict()
    ours = VisionBackbone.from_config(cfg, add_sam2_neck=add_sam2_neck).state_dict()
    assert list(ours) == list(ref)
    for k in ref:
        assert ours[k].shape == ref[k].shape and ours[k].dtype == ref[k].dtype, k
    # RoPE tables are in the checkpoint: ours must be the official ones even before loading
    for k in ref:
        if k.endswith("freqs_cis"):
            assert torch.equal(ours[k], ref[k]), k
    assert any(k.startswith("convs.3.") for k in ours)  # the dropped 0.5x level still loads
    assert list(VisionBackbone.from_config(cfg).position_encoding.state_dict()) == []


def test_full_size_state_dict_shapes_against_checkpoint_keys():
    """Shapes of every ``backbone.vision_backbone.*`` key of the released checkpoint, built on meta."""
    import pathlib

    tsv = pathlib.Path(__file__).resolve().parents[2] / "shared/reference/sam3-checkpoint-keys.tsv"
    if not tsv.exists():
        pytest.skip("checkpoint key list not available")
    prefix = "detector.backbone.vision_backbone."
    want = {}
    for line in tsv.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, shape, dtype = line.split("\t")
        if name.startswith(prefix):
            want[name[len(prefix):]] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    with torch.device("meta"):
        m = VisionBackbone.from_config(get_config("sam3"), add_sam2_neck=True)
    got = {k: (tuple(v.shape), str(v.dtype)) for k, v in m.state_dict().items()}
    assert got == want


def test_rope_real_form_matches_official_complex():
    official()
    from sam3.model.vitdet import apply_rotary_enc, compute_axial_cis as off_cis

    g = torch.Generator().manual_seed(0)
    for side, scale in ((4, 1.0), (10, 0.4), (24, 1.0), (72, 1 / 3)):
        freqs = off_cis(dim=64, end_x=side, end_y=side, theta=10000.0, scale_pos=scale)
        assert torch.equal(compute_axial_cis(64, side, side, scale_pos=scale), freqs)
        for dtype in (torch.float32, torch.bfloat16):
            q = (3 * torch.randn(2, 3, side * side, 64, generator=g)).to(dtype)
            k = (3 * torch.randn(2, 3, side * side, 64, generator=g)).to(dtype)
            rq, rk = apply_rotary_enc(q, k, freqs_cis=freqs)
            # ours takes token-major (B, L, ..., hd)
            oq = apply_rope(q.transpose(1, 2), freqs).transpose(1, 2)
            ok = apply_rope(k.transpose(1, 2), freqs).transpose(1, 2)
            assert oq.dtype == dtype
            for a, b in ((oq, rq), (ok, rk)):
                if dtype == torch.float32:
                    assert (a - b).abs().max() <= 1e-6 * b.abs().max()
                else:  # float32 results within 1e-6, rounded to bf16: at most one ulp apart
                    assert ((a.float() - b.float()).abs() <= b.float().abs() * 2**-7).all()


def test_to_bfloat16_keeps_complex_rope_tables():
    m = VisionBackbone.from_config(get_config("tiny"))
    ref = {k: v.clone() for k, v in m.state_dict().items() if k.endswith("freqs_cis")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = m.to(torch.bfloat16)
    assert m.trunk.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    for k, v in m.state_dict().items():
        if k.endswith("freqs_cis"):
            assert torch.equal(v, ref[k]), k
    with torch.no_grad():
        out = m(torch.randn(1, 3, 112, 112, dtype=torch.bfloat16))
    assert out["backbone_fpn"][0].dtype == out["vision_pos_enc"][0].dtype == torch.bfloat16


def test_position_encoding_matches_official_and_caches():
    official()
    from sam3.model.position_encoding import PositionEmbeddingSine as OPE

    ref = OPE(num_pos_feats=64, normalize=True, scale=None, temperature=10000)
    ours = PositionEmbeddingSine(64)
    for shape in ((2, 5, 7, 9), (1, 64, 32, 32), (3, 1, 2, 3)):
        x = torch.zeros(shape)
        a, b = ours(x), ref(x)
        assert a.shape == b.shape == (shape[0], 64, shape[2], shape[3])
        assert torch.equal(a, b)
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(ours(x.to(dtype)), b.to(dtype))
    # cached per (H, W, device, dtype): the same storage every call, for any batch
    p1 = ours(torch.zeros(1, 1, 7, 9))
    p2 = ours(torch.zeros(4, 1, 7, 9))
    assert p1.data_ptr() == p2.data_ptr() and p2.shape[0] == 4
    # prompt-coordinate helpers
    g = torch.Generator().manual_seed(0)
    cx, cy, w, h = torch.rand(4, 5, generator=g)
    assert torch.equal(ours.encode_boxes(cx, cy, w, h), ref.encode_boxes(cx, cy, w, h))
    px, py = torch.rand(2, 3, 4, generator=g)
    lab = torch.randint(0, 2, (3, 4), generator=g).float()
    assert torch.equal(ours.encode_points(px, py, lab), ref.encode_points(px, py, lab))


def test_compiles_without_graph_breaks():
    m = VisionBackbone.from_config(get_config("tiny"), add_sam2_neck=True).eval()
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad():
        ref = m(x)
        out = torch.compile(m, backend="eager", fullgraph=True)(x)
    for k in ("backbone_fpn", "vision_pos_enc", "sam2_backbone_fpn", "sam2_pos_enc"):
        for a, b in zip(out[k], ref[k]):
            assert torch.equal(a, b)
    torch._dynamo.reset()


def test_bad_sizes_raise():
    with pytest.raises(ValueError):
        VisionBackbone.from_config(get_config("tiny").replace(scale_factors=(1.0,)))  # scalp drops all
    with pytest.raises(ValueError):
        VisionBackbone(embed_dim=64, num_heads=4, global_att_blocks=())
    with pytest.raises(NotImplementedError):
        VisionBackbone(embed_dim=64, num_heads=4, depth=2, global_att_blocks=(1,), scale_factors=(3.0, 1.0))


@pytest.mark.slow
def test_full_size_parity(monkeypatch):
    """1008 px, 32 blocks, width 1024, both necks' SAM 3 half; ~1.5-3 min on 2 cores, ~3.3 GB RSS.

    The official modules are built with their weight init turned off (it costs ~15 s for 450 M
    parameters and ``redraw_`` overwrites every parameter anyway); ours is built on meta and takes
    the official tensors with ``assign=True`` (no second copy)."""
    official()
    import sam3.model.vitdet as ov

    cfg = get_config("sam3")
    v = cfg.vit

    def noop(t, *a, **k):
        return t

    with monkeypatch.context() as mp:
        mp.setattr(torch.nn.init, "kaiming_uniform_", noop)
        mp.setattr(torch.nn.init, "uniform_", noop)
        mp.setattr(ov, "trunc_normal_", noop)
        off = _official_backbone(
            img_size=v.img_size, pretrain_img_size=v.pretrain_img_size, embed_dim=v.embed_dim, depth=v.depth,
            num_heads=v.num_heads, mlp_ratio=v.mlp_ratio, window_size=v.window_size,
            global_att_blocks=v.global_att_blocks, d_model=cfg.d_model,
        )
    redraw_(off, seed=0)
    with torch.device("meta"):
        ours = VisionBackbone.from_config(cfg)
    ours.load_state_dict(off.vision_backbone.state_dict(), strict=True, assign=True)
    ours.eval()

    x = torch.randn(1, 3, v.img_size, v.img_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = ours(x)
        ref = off.forward_image(x)
    g = v.grid
    for i, (a, b, pa, pb) in enumerate(zip(out["backbone_fpn"], ref["backbone_fpn"], out["vision_pos_enc"],
                                            ref["vision_pos_enc"])):
        assert b.shape == (1, cfg.d_model, g * (4, 2, 1)[i], g * (4, 2, 1)[i])
        _assert_close(a, b)
        _assert_spread(b)
        _assert_close(pa, pb, tol=1e-6)
    assert out["sam2_backbone_fpn"] is None and ref["sam2_backbone_out"] is None


def test_patch_embed_gemm_form_equals_the_convolution():
    """The GEMM form of the patch embedding (on CUDA by default, forced here) computes the
    convolution: float64, 14-pixel patches, batch 2, a non-square image; an image whose size is not
    a multiple of the patch falls back to the convolution (which drops the remainder)."""
    from sam3fast.model.vit import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(14, 48).double()
    x = torch.randn(2, 3, 56, 70, dtype=torch.float64)
    pe.gemm = False
    want = pe(x)
    assert want.shape == (2, 4, 5, 48)
    pe.gemm = True
    got = pe(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    odd = torch.randn(1, 3, 60, 70, dtype=torch.float64)
    torch.testing.assert_close(pe(odd), torch.nn.functional.conv2d(odd, pe.proj.weight, stride=14).permute(0, 2, 3, 1))
    pe.gemm = None  # the default: the convolution off CUDA
    assert torch.equal(pe(x), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_patch_embed_gemm_form_bf16():
    """On CUDA the default is the GEMM form; at SAM 3's 1008-pixel input in bf16 it is within bf16
    rounding of the convolution (both against a float64 convolution)."""
    from sam3fast.model.vit import PatchEmbed

    torch.manual_seed(1)
    pe = PatchEmbed(14, 1024).cuda()
    x = torch.randn(1, 3, 1008, 1008, device="cuda")
    want = torch.nn.functional.conv2d(x.double(), pe.proj.weight.double(), stride=14).permute(0, 2, 3, 1)
    pe = pe.bfloat16()
    xb = x.bfloat16()
    got = pe(xb)  # gemm None: the GEMM form on CUDA
    pe.gemm = False
    conv = pe(xb)
    err_gemm = (got.double() - want).abs().max().item()
    err_conv = (conv.double() - want).abs().max().item()
    assert got.shape == conv.shape == (1, 72, 72, 1024)
    assert err_gemm <= 2 * err_conv + 1e-6, (err_gemm, err_conv)


# ----------------------------------------------------------------------------------------------
# The MLP's fc1 with the tanh-GELU epilogue (ViT.tanh_gelu_epilogue: "auto" = CUDA in bf16 / fp16)


def test_tanh_gelu_epilogue_is_the_tanh_gelu_and_auto_on_cuda_half():
    """``linear_tanh_gelu`` computes gelu_tanh(x W^T + b) (float64, a 4-D input, a weight that is
    not square), which differs from the exact GELU by at most 4.8e-4; the MLP uses it with the
    switch True, and under the default "auto" only on CUDA in bf16 / fp16 (so on CPU, in every
    dtype, the official exact GELU runs); the switch takes True, False, "auto" only; the ViT
    property sets and reads every block's (None where they differ)."""
    from sam3fast.model.vit import Mlp, ViT, linear_tanh_gelu

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 16, generator=g, dtype=torch.float64) * 2
    w = torch.randn(40, 16, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(40, generator=g, dtype=torch.float64)
    h = x @ w.t() + b
    got = linear_tanh_gelu(x, w, b)
    assert got.shape == (2, 3, 5, 40)
    torch.testing.assert_close(got, torch.nn.functional.gelu(h, approximate="tanh"), rtol=1e-12, atol=1e-12)
    gap = (got - torch.nn.functional.gelu(h)).abs().max().item()
    assert 1e-6 < gap < 4.8e-4  # an approximation: not the exact GELU, and close to it

    mlp = Mlp(16, 40).double().requires_grad_(False)  # (autograd recording: the exact path runs)
    assert mlp.tanh_gelu_epilogue == "auto"
    exact = mlp(x)
    assert torch.equal(exact, mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x))))
    m16 = Mlp(16, 40).bfloat16().requires_grad_(False)
    x16 = x.bfloat16()
    assert not m16.uses_tanh_epilogue(x16)  # "auto" off CUDA
    assert torch.equal(m16(x16), m16.fc2(torch.nn.functional.gelu(m16.fc1(x16))))
    for bad in (1, 0, "on", None):
        with pytest.raises(ValueError, match="tanh_gelu_epilogue"):
            mlp.tanh_gelu_epilogue = bad
    assert mlp.tanh_gelu_epilogue == "auto"
    mlp.tanh_gelu_epilogue = True
    approx = mlp(x)
    torch.testing.assert_close(approx, mlp.fc2(linear_tanh_gelu(x, mlp.fc1.weight, mlp.fc1.bias)), rtol=0, atol=0)
    assert (approx - exact).abs().max() > 0
    # under autocast the module's own path (the official's, exact GELU) runs
    m32, x32 = mlp.float(), x.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_on = m32(x32)
        m32.tanh_gelu_epilogue = False
        auto_off = m32(x32)
    assert torch.equal(auto_on, auto_off)

    vit = ViT(img_size=56, pretrain_img_size=28, embed_dim=32, depth=2, num_heads=2, window_size=2,
              global_att_blocks=(1,))
    assert vit.tanh_gelu_epilogue == "auto" and all(b.mlp.tanh_gelu_epilogue == "auto" for b in vit.blocks)
    vit.tanh_gelu_epilogue = True
    assert vit.tanh_gelu_epilogue is True and all(b.mlp.tanh_gelu_epilogue is True for b in vit.blocks)
    vit.blocks[0].mlp.tanh_gelu_epilogue = False
    assert vit.tanh_gelu_epilogue is None


def test_tanh_gelu_epilogue_trunk_error_and_compile():
    """The tiny trunk in bf16 with the tanh epilogue, against the float32 trunk with the exact GELU
    (the official's): its error is within 1.1x that of the bf16 trunk with the exact GELU (the
    approximation adds less than bf16 rounding does); and the trunk compiles without graph breaks
    with the switch on, giving the eager result."""
    from sam3fast.model.vit import ViT

    torch.manual_seed(0)
    vit = ViT(img_size=112, pretrain_img_size=56, embed_dim=64, depth=4, num_heads=4, window_size=4,
              global_att_blocks=(1, 3)).eval()
    with torch.no_grad():  # fc1's outputs spread over +-4, where the two GELUs part
        for name, p in vit.named_parameters():
            if "norm" not in name and "ln_pre" not in name:
                p.normal_(0, 0.2 if "fc1" in name else 0.05)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ref = vit(x).double()
        vit.tanh_gelu_epilogue = True
        tanh32 = vit(x).double()  # the approximation alone, in float32
        vit.tanh_gelu_epilogue = False
        v16 = vit.to(torch.bfloat16)
        exact16 = v16(x).double()
        v16.tanh_gelu_epilogue = True
        tanh16 = v16(x).double()
        torch._dynamo.reset()
        compiled = torch.compile(v16, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()
    assert torch.equal(compiled.double(), tanh16)
    err_exact = ((exact16 - ref).norm() / ref.norm()).item()
    err_tanh = ((tanh16 - ref).norm() / ref.norm()).item()
    assert not torch.equal(tanh16, exact16)
    assert 0 < err_tanh <= 1.1 * err_exact, (err_tanh, err_exact)
    err_approx = ((tanh32 - ref).norm() / ref.norm()).item()
    assert 0 < err_approx < 0.1 * err_exact, (err_approx, err_exact)  # ~2e-4 against ~8e-3 here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [5184, 577])
def test_cuda_tanh_gelu_epilogue_bf16(rows):
    """On CUDA (cuBLASLt's GELU + bias epilogue) at the trunk's fc1 shape in bf16: against the
    float64 tanh GELU within 1.5x the error of the eager chain (fc1 rounded, then the GELU), which it
    rounds once less; poisoned output buffers cannot pass (a fresh tensor is returned); replays in a
    CUDA graph."""
    from sam3fast.model.vit import linear_tanh_gelu

    torch.manual_seed(2)
    x = torch.randn(rows, 1024, device="cuda").bfloat16()
    w = (torch.randn(4736, 1024, device="cuda") * 0.03).bfloat16()
    b = (torch.randn(4736, device="cuda") * 0.1).bfloat16()
    want = torch.nn.functional.gelu(x.double() @ w.double().t() + b.double(), approximate="tanh")
    got = linear_tanh_gelu(x, w, b)
    eager = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b), approximate="tanh")
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 4736) and torch.isfinite(got).all()
    err = (got.double() - want).abs().max().item()
    err_eager = (eager.double() - want).abs().max().item()
    assert err <= 1.5 * err_eager, (err, err_eager)
    static_x = x.clone()
    out = torch.full_like(got, float("nan"))
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        linear_tanh_gelu(static_x, w, b)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out = linear_tanh_gelu(static_x, w, b)
    static_x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, linear_tanh_gelu(static_x, w, b))
    # the MLP's default ("auto") takes the epilogue here, in bf16, and not in float32
    from sam3fast.model.vit import Mlp

    mlp = Mlp(1024, 4736).cuda().requires_grad_(False)
    x32 = torch.randn(64, 1024, device="cuda")
    assert mlp.tanh_gelu_epilogue == "auto" and not mlp.uses_tanh_epilogue(x32)
    assert torch.equal(mlp(x32), mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x32))))
    mlp = mlp.bfloat16()
    x16 = x32.bfloat16()
    assert mlp.uses_tanh_epilogue(x16)
    assert torch.equal(mlp(x16), mlp.fc2(linear_tanh_gelu(x16, mlp.fc1.weight, mlp.fc1.bias)))


# ----------------------------------------------------------------------------------------------
# The trunk attention's SDPA backend, pinned (ViT.window_sdpa_backend / global_sdpa_backend)


def test_sdpa_backend_pin_is_used_validated_and_compiles(monkeypatch):
    """Pinning the window and the global blocks' SDPA backend: each block's attention runs under
    ``sdpa_kernel`` with the named backend (recorded by a stand-in), the trunk's output is the
    default's (CPU math against CPU flash: float32 rounding), a bad name is refused, None restores
    PyTorch's choice, and the trunk compiles without graph breaks with a pin."""
    import sam3fast.model.vit as vit_mod
    from kernel_checks import tiny_trunk

    vit, x = tiny_trunk()
    with torch.no_grad():
        want = vit(x)
    assert vit.window_sdpa_backend is None and vit.global_sdpa_backend is None
    seen = []
    real = vit_mod.sdpa_kernel

    def spy(backends):
        seen.append(backends)
        return real(backends)

    monkeypatch.setattr(vit_mod, "sdpa_kernel", spy)
    vit.window_sdpa_backend = "math"
    vit.global_sdpa_backend = "flash"
    assert [b.attn.sdpa_backend for b in vit.blocks] == ["math", "flash", "math", "flash"]
    assert vit.window_sdpa_backend == "math" and vit.global_sdpa_backend == "flash"
    with torch.no_grad():
        got = vit(x)
    from torch.nn.attention import SDPBackend

    assert seen == [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION] * 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sdpa backend"):
        vit.window_sdpa_backend = "fastest"
    assert vit.window_sdpa_backend == "math"  # a refused name changes nothing
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(vit, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, got, rtol=0, atol=0)
    vit.window_sdpa_backend = vit.global_sdpa_backend = None
    seen.clear()
    with torch.no_grad():
        assert torch.equal(vit(x), want)
    assert seen == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_trunk_sdpa_backend_pins_bf16():
    """On CUDA in bf16 the trunk's attention with each backend pinned that runs its shapes (window
    blocks of 16 x 16 tokens, global ones over 32 x 32, head width 64) stays within 2x the default
    backend's error against the float32 trunk; the backends that cannot run are reported by
    PyTorch, not silently replaced."""
    from sam3fast.model.vit import SDPA_BACKENDS, ViT

    torch.manual_seed(0)
    vit = ViT(img_size=448, pretrain_img_size=224, embed_dim=256, depth=4, num_heads=4, window_size=16,
              global_att_blocks=(1, 3)).cuda().eval()
    x = torch.randn(1, 3, 448, 448, device="cuda")
    with torch.no_grad():
        ref = vit(x).double()
        v16 = vit.bfloat16()
        err = lambda a: ((a.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        base = err(v16(x))
        ran = []
        for name in SDPA_BACKENDS:
            if name == "math":
                continue
            v16.window_sdpa_backend = v16.global_sdpa_backend = name
            try:
                out = v16(x)
            except RuntimeError as e:  # a backend that cannot run these shapes says so
                assert "kernel" in str(e).lower() or "support" in str(e).lower(), e
                continue
            ran.append(name)
            assert err(out) <= 2 * base, (name, err(out), base)
    assert ran, "no SDPA backend ran the trunk's shapes"
