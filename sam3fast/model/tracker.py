"""The SAM 2-style tracker (``tracker.*`` keys of ``sam3.pt``).

Owns, under the official names: the SAM prompt encoder and two-way mask decoder
(:mod:`.sam_heads`), the memory encoder (:mod:`.memory`), the memory attention
(``transformer.encoder``, :mod:`.memory_attention`), the object-pointer projections and the
learned embeddings (``maskmem_tpos_enc``, ``no_mem_embed``, ``no_obj_ptr``, ...).

This module holds weights and the per-image interactive step (SAM 1 task: points, box, mask
input on one image, no memory); the video step builds on the same parts.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..config import Sam3Config
from .common import MLP
from .memory import MaskMemoryEncoder
from .memory_attention import MemoryAttention
from .sam_heads import MaskDecoder, PromptEncoder


class _TransformerWrapper(nn.Module):
    def __init__(self, cfg: Sam3Config):
        super().__init__()
        self.encoder = MemoryAttention.from_config(cfg)


class Tracker(nn.Module):
    def __init__(self, cfg: Sam3Config):
        super().__init__()
        d, t = cfg.d_model, cfg.tracker
        self.cfg = cfg
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(t.num_maskmem, 1, 1, t.mem_dim))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, d))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, d))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, d))
        self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, t.mem_dim))
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.transformer = _TransformerWrapper(cfg)
        self.maskmem_backbone = MaskMemoryEncoder.from_config(cfg)
        self.sam_prompt_encoder = PromptEncoder.from_config(cfg)
        self.sam_mask_decoder = MaskDecoder.from_config(cfg)
        self.obj_ptr_proj = MLP(d, d, d, 3)
        self.obj_ptr_tpos_proj = nn.Linear(d, t.mem_dim)

    @classmethod
    def from_config(cls, cfg: Sam3Config) -> "Tracker":
        return cls(cfg)

    # ------------------------------------------------------------------ image (SAM 1 task)
    def image_features(self, sam2_fpn: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """SAM 2-neck features [(B, D, 4g, 4g), (B, D, 2g, 2g), (B, D, g, g)] -> the interactive
        predictor's (image_embed (B, D, g, g) with ``no_mem_embed`` added, high-res features
        [conv_s0 (B, D/8, 4g, 4g), conv_s1 (B, D/4, 2g, 2g)])."""
        high = list(self.sam_mask_decoder.project_high_res(sam2_fpn[0], sam2_fpn[1]))
        embed = sam2_fpn[-1] + self.no_mem_embed.reshape(1, -1, 1, 1)
        return embed, high

    def predict_image(
        self,
        image_embed: torch.Tensor,
        high_res: Sequence[torch.Tensor],
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        mask_input: Optional[torch.Tensor],
        multimask_output: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One image (batch-1 features), B prompts: points (B, N, 2) in input-frame pixels with
        labels (B, N) (boxes already as corner points with labels 2/3), mask_input (B, 1, 4g, 4g)
        logits or None -> (low-res mask logits (B, C, 4g, 4g), IoU predictions (B, C)); C = 3 with
        multimask output, else 1 (chosen by the decoder's stability rule)."""
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.sam_prompt_encoder(points, None, mask_input)
        out = self.sam_mask_decoder(
            image_embed, self.sam_prompt_encoder.get_dense_pe(), sparse, dense,
            multimask_output=multimask_output, high_res_features=list(high_res),
        )
        return out.masks, out.iou_pred
