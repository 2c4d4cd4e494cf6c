"""The SAM 3 image model (promptable concept segmentation) assembled from its stages.

Module names follow the official ``Sam3Image`` so the official state dict loads as is:
``backbone.{vision_backbone,language_backbone}``, ``geometry_encoder``,
``transformer.{encoder,decoder}``, ``segmentation_head``, ``dot_prod_scoring``.

Batched design: one backbone pass per image (``encode_image``), one text pass per distinct prompt
(``encode_text``), then the heads run on P (image, prompt) pairs at once (``forward_heads``): image
features are gathered by ``img_idx`` so several prompts on one image share the backbone.
Shapes: B images, P prompt pairs, Q queries, g = feature grid (72 at 1008 px), D = d_model.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..config import Sam3Config
from .decoder import Decoder, DotProductScoring
from .encoder import FusionEncoder
from .geometry import GeometryEncoder
from .neck import VisionBackbone
from .seg_head import SegmentationHead
from .text import TextEncoder
from .tokenizer import SimpleTokenizer
from .tracker import Tracker


def _pair_rows(t: torch.Tensor, img_idx: Optional[torch.Tensor], P: int, name: str) -> torch.Tensor:
    """The (P, ...) rows of the per-image tensor ``t`` (B, ...) that the P pairs use, without a copy
    where none is needed: one image (B == 1) or a stride-0 batch (the cached position encodings) is
    expanded; ``img_idx`` None means pair n uses image n. Otherwise ``index_select`` gathers, each row
    laid out as the image's (the FPN maps are channels-last): every path hands the heads the same
    layout, so a pair's outputs do not depend on how the batch was composed."""
    if t.shape[0] == 1 or (t.stride(0) == 0 and t.shape[0] > 0):
        return t[:1].expand(P, *t.shape[1:])
    if img_idx is None:
        if t.shape[0] != P:
            raise ValueError(f"img_idx=None pairs image n with prompt n, but {name} has {t.shape[0]} "
                             f"images for {P} prompts; pass img_idx")
        return t
    dims = [0] + sorted(range(1, t.dim()), key=lambda d: -t.stride(d))  # the rows' memory order
    return t.permute(*dims).index_select(0, img_idx).permute(*[dims.index(d) for d in range(t.dim())])


class Sam3Backbone(nn.Module):
    def __init__(self, cfg: Sam3Config, add_sam2_neck: bool = False, bpe_path: Optional[str] = None):
        super().__init__()
        t = cfg.text
        self.vision_backbone = VisionBackbone.from_config(cfg, add_sam2_neck=add_sam2_neck)
        self.language_backbone = TextEncoder(
            d_model=cfg.d_model, width=t.width, heads=t.heads, layers=t.layers,
            context_length=t.context_length, vocab_size=t.vocab_size, output_dim=t.output_dim,
        )
        self.tokenizer = SimpleTokenizer(bpe_path, context_length=t.context_length) if bpe_path \
            else SimpleTokenizer(context_length=t.context_length)
        self.context_length = t.context_length


class TransformerWrapper(nn.Module):
    def __init__(self, cfg: Sam3Config):
        super().__init__()
        self.encoder = FusionEncoder.from_config(cfg)
        self.decoder = Decoder.from_config(cfg)


class InstInteractivePredictor(nn.Module):
    """Holds the tracker under the official image-model prefix ``inst_interactive_predictor.model``."""

    def __init__(self, cfg: Sam3Config):
        super().__init__()
        self.model = Tracker.from_config(cfg)


class Sam3ImageModel(nn.Module):
    def __init__(self, cfg: Sam3Config, enable_segmentation: bool = True,
                 enable_inst_interactivity: bool = False, bpe_path: Optional[str] = None):
        super().__init__()
        self.cfg = cfg
        # interactivity needs the SAM 2 neck (the tracker's features) as well as the tracker
        self.backbone = Sam3Backbone(cfg, add_sam2_neck=enable_inst_interactivity, bpe_path=bpe_path)
        self.geometry_encoder = GeometryEncoder.from_config(cfg)
        self.transformer = TransformerWrapper(cfg)
        self.segmentation_head = SegmentationHead.from_config(cfg) if enable_segmentation else None
        self.dot_prod_scoring = DotProductScoring.from_config(cfg)
        self.inst_interactive_predictor = InstInteractivePredictor(cfg) if enable_inst_interactivity else None

    # ------------------------------------------------------------------ interactive (SAM 1 task)
    def predict_inst(self, inference_state, **kwargs):
        """Drop-in for the official ``predict_inst``: see :mod:`sam3fast.predictor.interactive`."""
        if self.inst_interactive_predictor is None:
            raise RuntimeError("predict_inst needs a model built with enable_inst_interactivity=True")
        from ..predictor.interactive import predict_inst

        return predict_inst(self, inference_state, **kwargs)

    def predict_inst_batch(self, inference_state, *args, **kwargs):
        if self.inst_interactive_predictor is None:
            raise RuntimeError("predict_inst_batch needs a model built with enable_inst_interactivity=True")
        from ..predictor.interactive import predict_inst_batch

        return predict_inst_batch(self, inference_state, *args, **kwargs)

    def compile_stages(self, backend: str = "inductor", mode: Optional[str] = None, dynamic: bool = False):
        """torch.compile the vision backbone, the text encoder and the heads, each as one graph
        (``fullgraph=True``: a graph break is an error, not a silent slowdown)."""
        kw = dict(backend=backend, mode=mode, dynamic=dynamic, fullgraph=True)
        self.backbone.vision_backbone.compile(**kw)
        self.backbone.language_backbone.compile(**kw)
        self.forward_heads = torch.compile(self.forward_heads, **kw)
        return self

    # ------------------------------------------------------------------ stages
    @property
    def device(self) -> torch.device:
        return self._dtype_probe.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype (that of the fusion encoder's weights; float32 islands such as
        the decoder and the scoring head keep float32 weights in every dtype)."""
        return self._dtype_probe.dtype

    @property
    def _dtype_probe(self) -> torch.Tensor:
        return self.transformer.encoder.layers[0].linear1.weight

    def encode_image(self, images: torch.Tensor) -> Dict[str, List[torch.Tensor]]:
        """images (B, 3, R, R) normalized -> backbone outputs (``backbone_fpn``, ``vision_pos_enc``:
        lists of (B, D, 4g, 4g), (B, D, 2g, 2g), (B, D, g, g); SAM 2 neck outputs if built)."""
        return self.backbone.vision_backbone(images)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.backbone.tokenizer(list(prompts), context_length=self.backbone.context_length).to(self.device)

    def encode_text(self, prompts: Sequence[str]):
        """prompts -> (language_features (P, 32, D), language_mask (P, 32) True = pad)."""
        feats, mask, _ = self.backbone.language_backbone(self.tokenize(prompts))
        return feats, mask

    def forward_heads(
        self,
        image_out: Dict[str, List[torch.Tensor]],
        img_idx: torch.Tensor,
        text_feats: torch.Tensor,
        text_mask: torch.Tensor,
        boxes: Optional[torch.Tensor] = None,
        box_labels: Optional[torch.Tensor] = None,
        box_mask: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Run geometry encoder, fusion encoder, decoder, scoring and segmentation head on P pairs.

        img_idx (P,) long: which image of ``image_out`` each pair uses, or None when pair n uses
        image n (P images). Rows are gathered only where that needs a copy: one image (or the
        position encodings, stride-0 batch views of one cached tensor) is broadcast to the P pairs
        as a view, and None takes the features as they are. text_feats (P, T, D),
        text_mask (P, T). boxes (P, Nb, 4) normalized cxcywh, box_labels (P, Nb) bool (True =
        positive), box_mask (P, Nb) bool (True = padding), or None for no boxes.
        Returns pred_logits (P, Q), pred_boxes (P, Q, 4) cxcywh in [0, 1], pred_boxes_xyxy,
        presence_logit (P,), pred_masks (P, Q, 4g, 4g) logits (when the seg head is built).
        """
        P = text_feats.shape[0]
        fpn = [_pair_rows(f, img_idx, P, "backbone_fpn") for f in image_out["backbone_fpn"]]
        pos = [_pair_rows(p, img_idx, P, "vision_pos_enc") for p in image_out["vision_pos_enc"]]
        g_h, g_w = fpn[-1].shape[-2:]
        img_feats = fpn[-1].flatten(2).transpose(1, 2)  # (P, HW, D)
        img_pos = pos[-1].flatten(2).transpose(1, 2)

        geo_feats, geo_mask = self.geometry_encoder(
            img_feats, img_pos, (g_h, g_w), boxes=boxes, box_labels=box_labels, box_mask=box_mask,
        )
        prompt = torch.cat([text_feats, geo_feats], dim=1)
        prompt_mask = torch.cat([text_mask, geo_mask], dim=1)

        memory = self.transformer.encoder(img_feats, img_pos, prompt, prompt_mask)
        dec = self.transformer.decoder(memory, img_pos, (g_h, g_w), prompt, prompt_mask)
        hs = dec["hs"]
        logits = self.dot_prod_scoring(hs, prompt, prompt_mask).squeeze(-1)
        out = {
            "pred_logits": logits,
            "pred_boxes": dec["pred_boxes"],
            "pred_boxes_xyxy": dec["pred_boxes_xyxy"],
            "presence_logit": dec["presence_logit"].reshape(-1),
            "queries": hs,
            "encoder_hidden_states": memory,
        }
        if self.segmentation_head is not None:
            out["pred_masks"] = self.segmentation_head(fpn, memory, hs, prompt, prompt_mask)["pred_masks"]
        return out
