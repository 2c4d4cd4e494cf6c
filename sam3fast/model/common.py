"""Building blocks shared by the SAM 3 modules, with the official parameter names.

Letters used across sam3fast: B batch, L query length, S key length, D model width, H heads.
Every sequence tensor is batch-first (B, L, D) inside sam3fast; the official code mixes
seq-first and batch-first, which only matters for how callers lay out their inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """The official ``inverse_sigmoid`` (eps 1e-3; clamps x to [0, 1] first)."""
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)


class KeepComplexBuffers:
    """Mixin for modules holding complex64 RoPE tables in ``freqs_cis``: ``module.to(bfloat16)``
    would cast them to real, silently dropping the sin half. Keep the complex table (RoPE runs in
    float32, as the official code does even under bf16 autocast) and let only device moves through."""

    def _apply(self, fn, recurse=True):
        freqs = self.freqs_cis
        super()._apply(fn, recurse)
        if self.freqs_cis.dtype != freqs.dtype:
            self.freqs_cis = freqs.to(self.freqs_cis.device)
        return self


class MLP(nn.Module):
    """``layers.{i}`` Linear stack with ReLU between layers, optional residual and output norm
    (official ``sam3.model.model_misc.MLP``; dropout dropped: inference only)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        residual: bool = False,
        out_norm: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))
        if residual and input_dim != output_dim:
            raise ValueError("residual MLP needs input_dim == output_dim")
        self.residual = residual
        self.out_norm = out_norm if out_norm is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for i, layer in enumerate(self.layers):
            y = layer(y)
            if i < self.num_layers - 1:
                y = F.relu(y)
        if self.residual:
            y = y + x
        return self.out_norm(y)


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter names
    (``in_proj_weight`` (3D, D) packed q|k|v, ``in_proj_bias``, ``out_proj``) so official keys load
    as is; computed with ``F.scaled_dot_product_attention`` on batch-first tensors.

    ``key_padding_mask``: (B, S) bool, True = ignore that key. ``attn_bias``: additive float bias
    broadcastable to (B, H, L, S).
    """

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        attn_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, L, D = query.shape
        S = key.shape[1]
        H = self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(B, L, H, D // H).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(B, S, H, D // H).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(B, S, H, D // H).transpose(1, 2)
        mask = attn_bias
        if key_padding_mask is not None:
            pad = torch.zeros(B, 1, 1, S, dtype=q.dtype, device=q.device).masked_fill(
                key_padding_mask.view(B, 1, 1, S), float("-inf")
            )
            mask = pad if mask is None else mask + pad
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class LayerNorm2d(nn.Module):
    """Official ``LayerNorm2d``: normalise over channels of (B, C, H, W), eps 1e-6.

    Computed with ``F.layer_norm`` on a channels-last view (one fused kernel) instead of the
    official mean/var/sqrt sequence: same math, float32 rounding differences only.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
