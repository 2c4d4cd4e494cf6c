"""Test-only helper: run the official ``sam3==0.1.4`` package on a CPU machine.

The official code is the numerical ground truth for sam3fast. On a machine without a GPU it needs
three things handled (see ../shared/reference/environment-facts.md):

* PyPI's torchvision is a CUDA build whose ``_C`` fails to load beside CPU torch, so
  ``import torchvision`` fails with "operator torchvision::nms does not exist". Defining the
  ``torchvision::nms``/``qnms`` schemas (with a CPU nms kernel) before the first import fixes it;
  ``roi_align`` then runs its pure-PyTorch fallback.
* The official code allocates on ``device="cuda"`` in a few places and pins memory on every prompt:
  :func:`cpu_mode` maps cuda devices to cpu and makes ``.cuda()``/``.pin_memory()`` no-ops.
* Random init leaves the text encoder's ``positional_embedding``/``text_projection`` uninitialised
  and makes most heads degenerate: :func:`redraw_` re-draws every parameter with scales that keep
  the detector numerically stable but make every branch matter.

Nothing here is imported by the ``sam3fast`` package itself.
"""

from __future__ import annotations

import contextlib
from typing import Dict

import torch
import torch.nn as nn

_OFFICIAL = None


def _shim_torchvision() -> None:
    lib = torch.library.Library("torchvision", "FRAGMENT")
    try:
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # already defined (e.g. a working torchvision build)
        return

    def _nms_cpu(dets, scores, iou_threshold):
        order = scores.argsort(descending=True)
        keep = []
        suppressed = torch.zeros(len(order), dtype=torch.bool)
        x1, y1, x2, y2 = dets.unbind(1)
        areas = (x2 - x1) * (y2 - y1)
        for i_, i in enumerate(order.tolist()):
            if suppressed[i_]:
                continue
            keep.append(i)
            rest = order[i_ + 1 :]
            xx1 = torch.maximum(x1[i], x1[rest])
            yy1 = torch.maximum(y1[i], y1[rest])
            xx2 = torch.minimum(x2[i], x2[rest])
            yy2 = torch.minimum(y2[i], y2[rest])
            inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
            iou = inter / (areas[i] + areas[rest] - inter)
            suppressed[i_ + 1 :] |= iou > iou_threshold
        return torch.tensor(keep, dtype=torch.long)

    lib.impl("nms", _nms_cpu, "CPU")
    _shim_torchvision.lib = lib  # keep the library object alive


def official():
    """Import and return the official ``sam3`` package (CPU-ready)."""
    global _OFFICIAL
    if _OFFICIAL is None:
        if not torch.cuda.is_available():  # a GPU machine's torchvision loads its own ops
            _shim_torchvision()
        import sam3  # noqa: F401
        import sam3.model_builder  # noqa: F401

        _OFFICIAL = sam3
    return _OFFICIAL


def _to_cpu_device(dev):
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.device("cpu")
    if isinstance(dev, str) and dev.startswith("cuda"):
        return "cpu"
    return dev


class _CpuMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in ("cuda", "pin_memory"):
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if name == "to":
            args = tuple(_to_cpu_device(a) for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_mode():
    """Run official code that hard-codes CUDA on the CPU (and without torch.compile: torchvision's
    pure-PyTorch ``roi_align`` fallback compiles itself on first call otherwise, 5-12 s)."""
    import torch._dynamo

    with _CpuMode(), torch._dynamo.config.patch(disable=True):
        yield


# ----------------------------------------------------------------------------------------------
# Re-drawn random weights


def redraw_(module: nn.Module, seed: int = 0, score_gain: float = 6.0, presence_shift: float = 3.0):
    """Re-draw every parameter of an official (or sam3fast) module: see
    :func:`sam3fast.model.init.stable_random_init_`."""
    from sam3fast.model.init import stable_random_init_

    return stable_random_init_(module, seed=seed, score_gain=score_gain, presence_shift=presence_shift)


def state_dict_cpu(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# The official image model at any config size (same constructors as sam3/model_builder.py)


def bpe_path() -> str:
    from sam3fast.model.tokenizer import DEFAULT_BPE_PATH

    return DEFAULT_BPE_PATH


def build_official_image_model(cfg, enable_segmentation: bool = True, enable_inst_interactivity: bool = False,
                               compile_mode=None):
    """Build ``sam3.model.sam3_image.Sam3Image`` exactly as ``model_builder.build_sam3_image_model``
    does, with the sizes of ``cfg`` (a :class:`sam3fast.config.Sam3Config`). Random weights.
    ``compile_mode``: the option ``build_sam3_image_model(compile=True)`` sets to "default" on the
    ViT and the pixel decoder (their forwards wrapped in ``torch.compile``)."""
    official()
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder
    from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
    from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
    from sam3.model.model_misc import MultiheadAttentionWrapper as MHA
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vitdet import ViT
    from sam3.model.vl_combiner import SAM3VLBackbone

    d, h, ff, v = cfg.d_model, cfg.num_heads, cfg.dim_feedforward, cfg.vit

    def pos_enc(precompute_resolution=None):
        return PositionEmbeddingSine(
            num_pos_feats=d, normalize=True, scale=None, temperature=10000,
            precompute_resolution=precompute_resolution,
        )

    with cpu_mode():
        vit = ViT(
            img_size=v.img_size, pretrain_img_size=v.pretrain_img_size, patch_size=v.patch_size,
            embed_dim=v.embed_dim, depth=v.depth, num_heads=v.num_heads, mlp_ratio=v.mlp_ratio,
            norm_layer="LayerNorm", drop_path_rate=0.1, qkv_bias=True, use_abs_pos=True,
            tile_abs_pos=True, global_att_blocks=v.global_att_blocks, rel_pos_blocks=(),
            use_rope=True, use_interp_rope=True, window_size=v.window_size,
            pretrain_use_cls_token=True, retain_cls_token=False, ln_pre=True, ln_post=False,
            return_interm_layers=False, bias_patch_embed=False, compile_mode=compile_mode,
        )
        neck = Sam3DualViTDetNeck(
            position_encoding=pos_enc(precompute_resolution=v.img_size), d_model=d,
            scale_factors=list(cfg.scale_factors), trunk=vit, add_sam2_neck=enable_inst_interactivity,
        )
        t = cfg.text
        text = VETextEncoder(
            tokenizer=SimpleTokenizer(bpe_path=bpe_path()), d_model=d, width=t.width,
            heads=t.heads, layers=t.layers, context_length=t.context_length, vocab_size=t.vocab_size,
        )
        backbone = SAM3VLBackbone(visual=neck, text=text, scalp=1)
        enc_layer = TransformerEncoderLayer(
            activation="relu", d_model=d, dim_feedforward=ff, dropout=0.1, pos_enc_at_attn=True,
            pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False, pre_norm=True,
            self_attention=MHA(num_heads=h, dropout=0.1, embed_dim=d, batch_first=True),
            cross_attention=MHA(num_heads=h, dropout=0.1, embed_dim=d, batch_first=True),
        )
        encoder = TransformerEncoderFusion(
            layer=enc_layer, num_layers=cfg.enc_layers, d_model=d, num_feature_levels=1,
            frozen=False, use_act_checkpoint=True, add_pooled_text_to_img_feat=False,
            pool_text_with_mask=True,
        )
        dec_layer = TransformerDecoderLayer(
            activation="relu", d_model=d, dim_feedforward=ff, dropout=0.1,
            cross_attention=MHA(num_heads=h, dropout=0.1, embed_dim=d), n_heads=h,
            use_text_cross_attention=True,
        )
        decoder = TransformerDecoder(
            layer=dec_layer, num_layers=cfg.dec_layers, num_queries=cfg.num_queries,
            return_intermediate=True, box_refine=True, num_o2m_queries=0, dac=True, boxRPB="log",
            d_model=d, frozen=False, interaction_layer=None, dac_use_selfatt_ln=True,
            resolution=v.img_size, stride=v.patch_size, use_act_checkpoint=True, presence_token=True,
        )
        transformer = TransformerWrapper(encoder=encoder, decoder=decoder, d_model=d)
        scoring = DotProductScoring(
            d_model=d, d_proj=d,
            prompt_mlp=MLP(
                input_dim=d, hidden_dim=cfg.scoring_hidden, output_dim=d, num_layers=2,
                dropout=0.1, residual=True, out_norm=nn.LayerNorm(d),
            ),
        )
        seg = None
        if enable_segmentation:
            seg = UniversalSegmentationHead(
                hidden_dim=d, upsampling_stages=cfg.seg_upsampling_stages, aux_masks=False,
                presence_head=False, dot_product_scorer=None, act_ckpt=True,
                cross_attend_prompt=MHA(num_heads=h, dropout=0, embed_dim=d),
                pixel_decoder=PixelDecoder(
                    num_upsampling_stages=cfg.seg_upsampling_stages, interpolation_mode="nearest",
                    hidden_dim=d, compile_mode=compile_mode,
                ),
            )
        geo_layer = TransformerEncoderLayer(
            activation="relu", d_model=d, dim_feedforward=ff, dropout=0.1, pos_enc_at_attn=False,
            pre_norm=True,
            self_attention=MHA(num_heads=h, dropout=0.1, embed_dim=d, batch_first=False),
            pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
            cross_attention=MHA(num_heads=h, dropout=0.1, embed_dim=d, batch_first=False),
        )
        geo = SequenceGeometryEncoder(
            pos_enc=pos_enc(), encode_boxes_as_points=False, points_direct_project=True,
            points_pool=True, points_pos_enc=True, boxes_direct_project=True, boxes_pool=True,
            boxes_pos_enc=True, d_model=d, num_layers=cfg.geo_layers, layer=geo_layer,
            use_act_ckpt=True, add_cls=True, add_post_encode_proj=True, roi_size=cfg.roi_size,
        )
        inst = None
        if enable_inst_interactivity:
            from sam3.model.sam1_task_predictor import SAM3InteractiveImagePredictor

            inst = SAM3InteractiveImagePredictor(build_official_tracker(cfg, apply_temporal_disambiguation=False))
            g = cfg.feat_size
            inst._bb_feat_sizes = [(4 * g, 4 * g), (2 * g, 2 * g), (g, g)]  # hard-coded 288/144/72 officially
        model = Sam3Image(
            backbone=backbone, transformer=transformer, input_geometry_encoder=geo,
            segmentation_head=seg, num_feature_levels=1, o2m_mask_predict=True,
            dot_prod_scoring=scoring, use_instance_query=False, multimask_output=True,
            inst_interactive_predictor=inst, matcher=None,
        )
    return model.eval()


def official_checkpoint_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The image model's state dict in the released ``sam3.pt`` layout: ``detector.*`` keys, and
    ``tracker.*`` for an interactive model (the official loader's mapping, reversed)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("inst_interactive_predictor.model."):
            out["tracker." + k[len("inst_interactive_predictor.model."):]] = v.detach().clone()
        else:
            out["detector." + k] = v.detach().clone()
    return out


def build_official_tracker(cfg, apply_temporal_disambiguation: bool = False):
    """``sam3.model_builder.build_tracker`` (a ``Sam3TrackerPredictor``, no backbone) at the sizes of
    ``cfg``. The official builder hard-codes the two-way MLP (2048) and IoU-head width (256) inside
    ``Sam3TrackerBase._build_sam_heads``; for other sizes they are patched on the built modules'
    constructors here. Random weights."""
    official()
    from sam3.model.memory import CXBlock, SimpleFuser, SimpleMaskDownSampler, SimpleMaskEncoder
    from sam3.model.decoder import TransformerDecoderLayerv2, TransformerEncoderCrossAttention
    from sam3.model.model_misc import TransformerWrapper
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.sam3_tracking_predictor import Sam3TrackerPredictor
    from sam3.sam import mask_decoder as md, transformer as sam_tf
    from sam3.sam.transformer import RoPEAttention
    import sam3.model.sam3_tracker_base as tb

    d, t, g = cfg.d_model, cfg.tracker, cfg.feat_size
    with cpu_mode():
        maskmem = SimpleMaskEncoder(
            out_dim=t.mem_dim,
            position_encoding=PositionEmbeddingSine(num_pos_feats=t.mem_dim, normalize=True, scale=None,
                                                    temperature=10000, precompute_resolution=cfg.resolution),
            mask_downsampler=SimpleMaskDownSampler(kernel_size=3, stride=2, padding=1,
                                                   interpol_size=[t.mem_interpol_size] * 2, embed_dim=d),
            fuser=SimpleFuser(layer=CXBlock(dim=d, kernel_size=7, padding=3, layer_scale_init_value=1.0e-06,
                                            use_dwconv=True), num_layers=2),
            in_dim=d,
        )
        layer = TransformerDecoderLayerv2(
            cross_attention_first=False, activation="relu", dim_feedforward=t.mem_attn_ffn, dropout=0.1,
            pos_enc_at_attn=False, pre_norm=True,
            self_attention=RoPEAttention(embedding_dim=d, num_heads=1, downsample_rate=1, dropout=0.1,
                                         rope_theta=10000.0, feat_sizes=[g, g], use_fa3=False,
                                         use_rope_real=False),
            d_model=d, pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
            cross_attention=RoPEAttention(embedding_dim=d, num_heads=1, downsample_rate=1, dropout=0.1,
                                          kv_in_dim=t.mem_dim, rope_theta=10000.0, feat_sizes=[g, g],
                                          rope_k_repeat=True, use_fa3=False, use_rope_real=False),
        )
        encoder = TransformerEncoderCrossAttention(
            remove_cross_attention_layers=[], batch_first=True, d_model=d, frozen=False,
            pos_enc_at_input=True, layer=layer, num_layers=t.mem_attn_layers, use_act_checkpoint=False,
        )
        transformer = TransformerWrapper(encoder=encoder, decoder=None, d_model=d)

        orig_tw, orig_md = tb.TwoWayTransformer, tb.MaskDecoder

        def two_way(**kw):
            kw["mlp_dim"] = t.sam_mlp_dim
            return orig_tw(**kw)

        def mask_decoder(**kw):
            kw["iou_head_hidden_dim"] = t.iou_head_hidden_dim
            return orig_md(**kw)

        tb.TwoWayTransformer, tb.MaskDecoder = two_way, mask_decoder
        try:
            model = Sam3TrackerPredictor(
                image_size=cfg.resolution, num_maskmem=t.num_maskmem, backbone=None,
                backbone_stride=cfg.vit.patch_size, transformer=transformer, maskmem_backbone=maskmem,
                multimask_output_in_sam=True, forward_backbone_per_frame_for_eval=True,
                trim_past_non_cond_mem_for_eval=False, multimask_output_for_tracking=True,
                multimask_min_pt_num=0, multimask_max_pt_num=1, always_start_from_first_ann_frame=False,
                non_overlap_masks_for_mem_enc=False, non_overlap_masks_for_output=False,
                max_cond_frames_in_attn=t.max_cond_frames_in_attn, offload_output_to_cpu_for_eval=False,
                sam_mask_decoder_extra_args={
                    "dynamic_multimask_via_stability": True,
                    "dynamic_multimask_stability_delta": 0.05,
                    "dynamic_multimask_stability_thresh": 0.98,
                },
                clear_non_cond_mem_around_input=True, fill_hole_area=0,
                use_memory_selection=apply_temporal_disambiguation,
            )
        finally:
            tb.TwoWayTransformer, tb.MaskDecoder = orig_tw, orig_md
    del md, sam_tf
    return model.eval()


def move_official_model(model, device):
    """``model.to(device)`` plus its plain tensor attributes: ``.to()`` moves parameters and
    buffers only, and the official builder (run under :func:`cpu_mode`) leaves position-encoding
    and decoder coordinate caches as plain CPU tensors. For benchmarks that build on CPU and run
    on a GPU."""
    model = model.to(device)
    def mv(v):
        if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
            return v.to(device)
        if type(v) is dict:  # in place: the dict may be shared
            for k, x in v.items():
                v[k] = mv(x)
            return v
        if type(v) is tuple and any(isinstance(x, torch.Tensor) for x in v):
            return tuple(mv(x) for x in v)
        return v

    for m in model.modules():
        for k, v in list(vars(m).items()):
            if not k.startswith("_") and isinstance(v, (torch.Tensor, dict, tuple)):
                m.__dict__[k] = mv(v)
    return model
