"""SAM 3 text encoder: a CLIP-style causal transformer plus a linear resizer to d_model.

Official: ``sam3.model.text_encoder_ve.VETextEncoder`` (``TextTransformer``, ``Transformer``,
``ResidualAttentionBlock``) as called by ``SAM3VLBackbone.forward_text``. Token ids t (B, T), T <= 32:

    e = token_embedding(t)                                  (B, T, W)   -> language_embeds
    x = e + positional_embedding[:T]
    x = x + attn(ln_1(x)),  x = x + mlp(ln_2(x))  x layers  (causal softmax attention, no padding mask)
    language_features = resizer(ln_final(x))                (B, T, D)
    language_mask     = t == 0                              (B, T) bool, True = padding

mlp = c_proj(gelu(c_fc(.))) with hidden 4W, exact GELU; LayerNorm eps 1e-5. The official returns
``language_features`` (T, B, D) and ``language_embeds`` (T, B, W) seq-first and the mask (B, T);
here all three are batch-first: ``official_features == ours_features.transpose(0, 1)``.
``language_embeds`` is the bare token embedding (no positional embedding, before the transformer).
The official also computes ``ln_final(x) @ text_projection`` (B, T, 512) (its pool_type is "none")
and drops it; it is skipped here, ``text_projection`` is kept only so checkpoints load strictly.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tokenizer import SimpleTokenizer


class CausalSelfAttention(nn.Module):
    """Causal self-attention with ``nn.MultiheadAttention``'s parameter names (``in_proj_weight``
    (3W, W) packed q|k|v, ``in_proj_bias``, ``out_proj``); batch-first (B, T, W) -> (B, T, W)."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, W = x.shape
        H = self.num_heads
        # One packed GEMM for q, k, v; is_causal (instead of the official's additive -inf mask, same
        # result) lets SDPA take its flash/causal kernels.
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, T, 3, H, W // H).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, W))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))`` then ``+ mlp(ln_2(x))`` (official names; the official's
    LayerScale ``ls_1``/``ls_2`` are identities at SAM 3's settings and have no parameters)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = CausalSelfAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class TextTransformer(nn.Module):
    """CLIP text tower without pooling: ids (B, T) -> per-token features ``ln_final(x)`` (B, T, W)."""

    def __init__(self, context_length: int = 32, vocab_size: int = 49408, width: int = 1024, heads: int = 16,
                 layers: int = 24, output_dim: int = 512):
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.width = width
        self.output_dim = output_dim
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width=width, layers=layers, heads=heads)
        self.ln_final = nn.LayerNorm(width)
        # Projection of the pooled (EOT) feature for CLIP's contrastive loss: unused by SAM 3.
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, token_ids: torch.Tensor, token_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        T = token_ids.shape[1]
        if token_embeds is None:
            token_embeds = self.token_embedding(token_ids)
        x = self.transformer(token_embeds + self.positional_embedding[:T])
        return self.ln_final(x)


class TextEncoder(nn.Module):
    """``backbone.language_backbone``: token ids -> (language_features, language_mask, language_embeds).

    forward(token_ids (B, T) int64, T <= context_length, pad id 0) ->
      language_features (B, T, d_model) float, language_mask (B, T) bool True = pad (``ids == 0``),
      language_embeds (B, T, width) float (token embedding only).
    ``encode(prompts, device)`` tokenizes with the official-equivalent tokenizer (T = 32) and runs.
    """

    def __init__(self, d_model: int, width: int = 1024, heads: int = 16, layers: int = 24,
                 context_length: int = 32, vocab_size: int = 49408, output_dim: int = 512,
                 tokenizer: Optional[SimpleTokenizer] = None):
        super().__init__()
        self.context_length = context_length
        self.encoder = TextTransformer(context_length=context_length, vocab_size=vocab_size, width=width,
                                       heads=heads, layers=layers, output_dim=output_dim)
        self.resizer = nn.Linear(width, d_model)
        self._tokenizer = tokenizer  # not a module: loaded on first use of encode()

    @property
    def tokenizer(self) -> SimpleTokenizer:
        if self._tokenizer is None:
            self._tokenizer = SimpleTokenizer(context_length=self.context_length)
        return self._tokenizer

    def forward(self, token_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeds = self.encoder.token_embedding(token_ids)
        features = self.resizer(self.encoder(token_ids, embeds))
        # The official's mask is `tokens == 0`: the pad id, but also BPE id 0 ("!" inside a word).
        return features, token_ids == 0, embeds

    def encode(self, prompts: Sequence[str], device: Optional[torch.device] = None):
        """prompts (list of P str) -> ``forward`` of their (P, 32) ids, on ``device`` (default: the
        parameters' device)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if device is None:
            device = self.resizer.weight.device
        return self(self.tokenizer(list(prompts), context_length=self.context_length).to(device))
