"""Random weights for models built without a checkpoint (``--random-weights``, tests).

The official random init is degenerate for inspection and for parity tests: the box head's last
layer is zero, query scores are nearly constant and almost no mask pixel passes the threshold.
:func:`stable_random_init_` re-draws every parameter with scales that keep the detector numerically
stable (measured: a 1e-6 relative input change moves scores by ~1e-7) while making every branch
matter. It works on sam3fast modules and on the official ones (same parameter names).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def stable_random_init_(module: nn.Module, seed: int = 0, score_gain: float = 6.0, presence_shift: float = 3.0):
    """Re-draw every parameter so that every branch of the detector matters, stably.

    Matrices that multiply activations: std 1/sqrt(fan_in); embeddings, queries, tokens and position
    tables: std 1; norm weights 1 + 0.2 N(0,1); biases and other vectors 0.2 N(0,1). Then spread the
    query scores (gain on the scoring projection, shift of the presence head's last bias) and smooth
    transposed-conv kernels (averaging each 2x2 kernel over its taps) so masks are not speckle.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g)

    mods = dict(module.named_modules())
    with torch.no_grad():
        for name, p in module.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            owner = mods.get(owner_name)
            if p.is_complex():
                continue
            if (isinstance(owner, (nn.LayerNorm, nn.GroupNorm)) or type(owner).__name__ == "LayerNorm2d"
                    or "norm" in owner_name.split(".")[-1]):
                if leaf == "weight":
                    p.copy_(1 + 0.2 * randn(p.shape))
                else:
                    p.copy_(0.2 * randn(p.shape))
            elif p.dim() >= 2 and (
                isinstance(owner, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.MultiheadAttention))
                or leaf in ("text_projection", "in_proj_weight")
            ):
                if isinstance(owner, nn.ConvTranspose2d):
                    fan_in = p.shape[0] * p.shape[2] * p.shape[3] // 4  # stride-2 taps: each output sees 1/4
                    w = randn(p.shape) / math.sqrt(max(fan_in, 1))
                    w = w.mean(dim=(2, 3), keepdim=True).expand_as(w) * 2.0
                    p.copy_(w)
                elif leaf == "text_projection":
                    p.copy_(randn(p.shape) / math.sqrt(p.shape[0]))
                else:
                    fan_in = p[0].numel()
                    p.copy_(randn(p.shape) / math.sqrt(fan_in))
            elif p.dim() >= 2:
                p.copy_(randn(p.shape))
            else:
                p.copy_(0.2 * randn(p.shape))
        for name, p in module.named_parameters():
            if name.endswith("dot_prod_scoring.hs_proj.weight"):
                p.mul_(score_gain)
            if name.endswith("presence_token_head.layers.2.bias"):
                p.add_(presence_shift)
    return module
