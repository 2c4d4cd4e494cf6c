"""Pre-norm transformer encoder layer and the image/prompt fusion encoder
(official ``sam3.model.encoder.TransformerEncoderLayer`` / ``TransformerEncoderFusion``).

One layer, on a query sequence x (B, L, D) attending to a memory m (B, S, D):

    x = x + SelfAttn(q = k = LN1(x) [+ query_pos], v = LN1(x), key_padding_mask = x_mask)
    x = x + CrossAttn(q = LN2(x) [+ query_pos], k = m [+ pos], v = m, key_padding_mask = m_mask)
    x = x + W2 relu(W1 LN3(x))

The bracketed position terms are switched per use:
  fusion encoder   (image queries, prompt memory): pos on self-attn q/k only;
  geometry encoder (prompt queries, image memory): pos on cross-attn keys only.

Fusion encoder: L = HW image tokens (one feature level), S = P prompt tokens (text, geometry,
visual), ``enc_layers`` layers. The official flattens (B, C, H, W) maps, adds no level embedding
(``num_feature_levels=1``), no image padding mask, no pooled text (``add_pooled_text_to_img_feat
=False``); it returns the memory seq-first (HW, B, D) together with values a caller can rebuild
without the encoder: ``pos_embed`` = the image pos unchanged, ``memory_text`` = the prompt unchanged,
``padding_mask`` None, ``spatial_shapes`` [[H, W]], ``level_start_index`` [0], ``valid_ratios``
ones (B, 1, 2). Here the forward returns only the memory, batch-first (B, HW, D).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from sam3fast.kernels.prompt_cross_attention import prompt_cross_attention, prompt_cross_attention_backend
from sam3fast.model.common import MultiheadAttention, linear_relu


class TransformerEncoderLayer(nn.Module):
    """Pre-norm self-attn -> cross-attn -> ReLU FFN layer (official ``forward_pre`` only).

    ``forward(tgt (B, L, D), memory (B, S, D), tgt_key_padding_mask (B, L) bool True=pad,
    memory_key_padding_mask (B, S) bool True=pad, pos (B, S, D) memory pos, query_pos (B, L, D))
    -> (B, L, D)``.

    ``memory_is_prompt`` (the fusion encoder: a short prompt memory, no position on the
    cross-attention) lets the cross-attention step use the fused ``prompt_cross_attention`` kernel
    where its backend choice picks Triton (CUDA); ``use_kernel = False`` forces the PyTorch path
    (the baseline the kernel is measured against). Neither is a parameter: state dicts are unchanged.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        pos_enc_at_attn: bool,
        pos_enc_at_cross_attn_queries: bool,
        pos_enc_at_cross_attn_keys: bool,
        memory_is_prompt: bool = False,
    ):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, num_heads)
        self.cross_attn_image = MultiheadAttention(d_model, num_heads)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.pos_enc_at_attn = pos_enc_at_attn
        self.pos_enc_at_cross_attn_queries = pos_enc_at_cross_attn_queries
        self.pos_enc_at_cross_attn_keys = pos_enc_at_cross_attn_keys
        # The kernel computes CrossAttn(LN2(x), m, m): no position term on either side.
        self.memory_is_prompt = memory_is_prompt and not (pos_enc_at_cross_attn_queries or pos_enc_at_cross_attn_keys)
        self.use_kernel = True

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_key_padding_mask: Optional[torch.Tensor] = None,
        memory_key_padding_mask: Optional[torch.Tensor] = None,
        pos: Optional[torch.Tensor] = None,
        query_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        x = self.norm1(tgt)
        qk = x + query_pos if self.pos_enc_at_attn else x
        tgt = tgt + self.self_attn(qk, qk, x, key_padding_mask=tgt_key_padding_mask)
        ca = self.cross_attn_image
        if (self.memory_is_prompt and self.use_kernel
                and prompt_cross_attention_backend(tgt, memory, ca.num_heads, ca.in_proj_weight)[0] == "triton"):
            tgt = prompt_cross_attention(
                tgt, memory, memory_key_padding_mask, ca.in_proj_weight, ca.in_proj_bias, ca.out_proj.weight,
                ca.out_proj.bias, ca.num_heads, self.norm2.weight, self.norm2.bias, self.norm2.eps,
            )
        else:
            x = self.norm2(tgt)
            tgt = tgt + ca(
                x + query_pos if self.pos_enc_at_cross_attn_queries else x,
                memory + pos if self.pos_enc_at_cross_attn_keys else memory,
                memory,
                key_padding_mask=memory_key_padding_mask,
            )
        x = self.norm3(tgt)
        return tgt + self.linear2(linear_relu(x, self.linear1))


class FusionEncoder(nn.Module):
    """Image tokens self-attend (with pos) and cross-attend to the prompt, ``num_layers`` times.

    ``forward(img_feats (B, HW, D), img_pos (B, HW, D), prompt (B, P, D), prompt_mask (B, P) bool
    True=pad) -> memory (B, HW, D)``. Row-major HW flattening (index y*W + x), as the official.
    The official forward is seq-first: ``memory_official = memory.transpose(0, 1)``, and its
    ``prompt`` argument is ``prompt.transpose(0, 1)`` of ours. The pos and the prompt come out of
    the official unchanged, so they are not returned.
    """

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                d_model,
                num_heads,
                dim_feedforward,
                pos_enc_at_attn=True,
                pos_enc_at_cross_attn_queries=False,
                pos_enc_at_cross_attn_keys=False,
                memory_is_prompt=True,
            )
            for _ in range(num_layers)
        )

    @property
    def use_kernel(self) -> bool:
        """Whether the layers may use the fused prompt cross-attention kernel (CUDA only); set it to
        False for the PyTorch path on every layer."""
        return all(layer.use_kernel for layer in self.layers)

    @use_kernel.setter
    def use_kernel(self, value: bool) -> None:
        for layer in self.layers:
            layer.use_kernel = bool(value)

    @classmethod
    def from_config(cls, cfg) -> "FusionEncoder":
        return cls(cfg.d_model, cfg.num_heads, cfg.dim_feedforward, cfg.enc_layers)

    def forward(
        self,
        img_feats: torch.Tensor,
        img_pos: torch.Tensor,
        prompt: torch.Tensor,
        prompt_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        x = img_feats
        for layer in self.layers:
            x = layer(x, prompt, memory_key_padding_mask=prompt_mask, query_pos=img_pos)
        return x
