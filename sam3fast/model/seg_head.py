"""Mask head of the SAM 3 image model (official ``UniversalSegmentationHead`` + ``PixelDecoder`` +
``MaskPredictor``, keys ``segmentation_head.*``).

Shapes: B batch, Q queries, D width, P prompt tokens, g the encoder grid (72 at 1008 px).

    enc    = memory + Attn(q=LN(memory), k=v=prompt, key_padding_mask)    (B, g*g, D)
    p      = enc as (B, D, g, g)            # replaces the backbone's g x g FPN level
    p      = relu(GN_0(conv_0(fpn[1] + nearest2x(p))))                     (B, D, 2g, 2g)
    p      = relu(GN_1(conv_1(fpn[0] + nearest2x(p))))                     (B, D, 4g, 4g)
    masks  = einsum("bqc,bchw->bqhw", mask_embed(hs), instance_seg_head(p))  (B, Q, 4g, 4g)
    semantic_seg = semantic_seg_head(p)                                    (B, 1, 4g, 4g)

The pixel decoder builds ``num_upsampling_stages`` (3) conv/GroupNorm(8) pairs but with three FPN
levels only the first two run; ``conv_layers.2``/``norms.2`` exist only for the checkpoint keys.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import MLP, FastGroupNorm, MultiheadAttention


def add_nearest_upsampled(f: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``f + F.interpolate(p, size=f.shape[-2:], mode="nearest")`` for (B, C, H, W) ``f`` and
    (B|1, C, h, w) ``p``. Where (H, W) is exactly (2h, 2w) (SAM 3's pixel decoder: 144 -> 288 and
    72 -> 144 at 1008 px), PyTorch's nearest picks source index ``dst >> 1``, so the sum is one
    broadcast add of ``p`` over 2 x 2 blocks of ``f``: the same additions of the same values, one
    kernel instead of two, and the upsampled map is never written. The output takes ``f``'s layout
    (contiguous or channels-last). Other sizes: the two-step form."""
    (H, W), (h, w) = f.shape[-2:], p.shape[-2:]
    channels_last = not f.is_contiguous() and f.is_contiguous(memory_format=torch.channels_last)
    if (f.dim() != 4 or p.dim() != 4 or (H, W) != (2 * h, 2 * w) or p.shape[1] != f.shape[1]
            or not (f.is_contiguous() or channels_last)):
        return f + F.interpolate(p, size=(H, W), mode="nearest")
    C = f.shape[1]
    out = f.view(f.shape[0], C, h, 2, w, 2) + p[:, :, :, None, :, None]
    # the sum takes f's dense layout over the six dims (PyTorch's elementwise rule), so merging the
    # 2 x 2 blocks back is a view; reshape would copy only in a layout this rule does not give
    return out.reshape(out.shape[0], C, H, W)


class PixelDecoder(nn.Module):
    """Official ``PixelDecoder`` (nearest upsampling, no shared conv): top-down from the coarsest
    level, ``p = relu(GN_i(conv_i(fpn + up(p))))``. Input list finest first; output (B, D, h0, w0)."""

    def __init__(self, hidden_dim: int, num_upsampling_stages: int = 3):
        super().__init__()
        n = num_upsampling_stages
        self.conv_layers = nn.ModuleList(nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1) for _ in range(n))
        # nn.GroupNorm's keys and eps; its CUDA kernel reduces a (batch, group) row per block (8 blocks
        # at 288 x 288): see group_norm_fast and sam3fast::group_norm (kernels/group_norm.py).
        self.norms = nn.ModuleList(FastGroupNorm(8, hidden_dim) for _ in range(n))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        p = feats[-1]
        for i, f in enumerate(reversed(feats[:-1])):
            p = add_nearest_upsampled(f, p)  # f + nearest 2x upsampling of p, one pass
            p = self.norms[i].forward_relu(self.conv_layers[i](p))  # relu(GN(conv)), one pass on CUDA
        return p


class MaskPredictor(nn.Module):
    def __init__(self, hidden_dim: int, mask_dim: int):
        super().__init__()
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, queries: torch.Tensor, pixel_embed: torch.Tensor) -> torch.Tensor:
        # queries (B, Q, C), pixel_embed (B, C, h, w) -> (B, Q, h, w)
        return torch.einsum("bqc,bchw->bqhw", self.mask_embed(queries), pixel_embed)


class SegmentationHead(nn.Module):
    """``forward(backbone_fpn, encoder_memory, hs, prompt, prompt_mask, semantic=False)``:

    - ``backbone_fpn``: [(B|1, D, 4g, 4g), (B|1, D, 2g, 2g), (B|1, D, g, g)] finest first; the last
      level's values are not used (the encoder output replaces it), only its (g, g) size. A batch of 1
      broadcasts over B prompts on one image (the official indexes the features by image id instead).
    - ``encoder_memory`` (B, g*g, D): fusion-encoder output (official seq-first (g*g, B, D)).
    - ``hs`` (B, Q, D): the decoder's last-layer normed queries (official ``obj_queries[-1]``).
    - ``prompt`` (B, P, D), ``prompt_mask`` (B, P) bool True = pad.

    Returns ``{"pred_masks": (B, Q, 4g, 4g)}`` mask logits, plus ``"semantic_seg"`` (B, 1, 4g, 4g)
    when ``semantic=True`` (the image processor does not use it).
    """

    def __init__(self, hidden_dim: int = 256, num_heads: int = 8, upsampling_stages: int = 3):
        super().__init__()
        self.d_model = hidden_dim
        self.pixel_decoder = PixelDecoder(hidden_dim, upsampling_stages)
        self.mask_predictor = MaskPredictor(hidden_dim, mask_dim=hidden_dim)
        self.cross_attend_prompt = MultiheadAttention(hidden_dim, num_heads)
        self.cross_attn_norm = nn.LayerNorm(hidden_dim)
        self.semantic_seg_head = nn.Conv2d(hidden_dim, 1, kernel_size=1)
        self.instance_seg_head = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=1)

    @classmethod
    def from_config(cls, cfg) -> "SegmentationHead":
        return cls(cfg.d_model, cfg.num_heads, cfg.seg_upsampling_stages)

    def forward(
        self,
        backbone_fpn: List[torch.Tensor],
        encoder_memory: torch.Tensor,
        hs: torch.Tensor,
        prompt: torch.Tensor,
        prompt_mask: Optional[torch.Tensor],
        semantic: bool = False,
    ) -> Dict[str, torch.Tensor]:
        B, N, D = encoder_memory.shape
        h, w = backbone_fpn[-1].shape[-2:]
        q = self.cross_attn_norm(encoder_memory)
        enc = encoder_memory + self.cross_attend_prompt(q, prompt, prompt, key_padding_mask=prompt_mask)
        enc = enc.transpose(1, 2).reshape(B, D, h, w)
        pixel_embed = self.pixel_decoder([*backbone_fpn[:-1], enc])
        out = {"pred_masks": self.mask_predictor(hs, self.instance_seg_head(pixel_embed))}
        if semantic:
            out["semantic_seg"] = self.semantic_seg_head(pixel_embed)
        return out
