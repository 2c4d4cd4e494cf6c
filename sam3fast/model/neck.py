"""SAM 3 vision backbone: ViT trunk + dual SimpleFPN neck + sine position encodings.

Official pieces: ``sam3.model.necks.Sam3DualViTDetNeck`` (which owns the trunk),
``sam3.model.position_encoding.PositionEmbeddingSine`` and the image half of
``sam3.model.vl_combiner.SAM3VLBackbone.forward_image`` (scalp: drop the lowest-resolution levels).

Letters: B batch, C trunk width, D d_model, g trunk grid side.

Neck, one ``nn.Sequential`` per scale factor applied to the trunk output x (B, C, g, g):
    4.0: ConvT2x2(C, C/2) -> GELU -> ConvT2x2(C/2, C/4) -> 1x1(C/4, D) -> 3x3(D, D)   (B, D, 4g, 4g)
    2.0: ConvT2x2(C, C/2) -> 1x1(C/2, D) -> 3x3(D, D)                                  (B, D, 2g, 2g)
    1.0: 1x1(C, D) -> 3x3(D, D)                                                         (B, D, g, g)
    0.5: maxpool 2x2 -> 1x1(C, D) -> 3x3(D, D)                                          (B, D, g/2, g/2)
``sam2_convs`` is an identically shaped second neck (the tracker's features). The last ``scalp``
levels are dropped by the official code after computing them; here they are never computed, but
their weights exist so the checkpoint loads.

Position encoding (DETR sine, normalised), for a (H, W) map, F = D / 2, eps 1e-6:
    y_i = i / (H + eps) * 2 pi,  x_j = j / (W + eps) * 2 pi   (i, j from 1)
    dim_t[k] = 10000 ** (2 * (k // 2) / F)
    pos[:F]  (y part) = [sin(y / dim_t[0]), cos(y / dim_t[1]), sin(y / dim_t[2]), ...]
    pos[F:]  (x part) = same with x
It depends only on (H, W): cached per (H, W, device, dtype), computed in float32 and then cast to
the features' dtype like the official.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .vit import ViT


class PositionEmbeddingSine(nn.Module):
    """Official ``PositionEmbeddingSine`` (normalize=True); ``num_pos_feats`` is the full width D.

    ``forward(x (B, *, H, W)) -> (B, D, H, W)`` in ``x.dtype``: a batch-broadcast (stride 0) view
    of a cached (D, H, W) tensor; do not write into it. ``encode_boxes``/``encode_points`` are the
    official helpers for prompt coordinates (normalised to [0, 1]).
    """

    def __init__(self, num_pos_feats: int, temperature: int = 10000, normalize: bool = True, scale: Optional[float] = None):
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError("PositionEmbeddingSine needs an even width")
        if not normalize:
            raise NotImplementedError("SAM 3 only uses normalize=True")
        self.num_pos_feats = num_pos_feats // 2
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.cache: Dict[Tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def _dim_t(self, device) -> torch.Tensor:
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        return self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)

    def _sincos(self, t: torch.Tensor, dim_t: torch.Tensor) -> torch.Tensor:
        p = t[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    @torch.no_grad()
    def compute(self, h: int, w: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(D, H, W) encoding, uncached. Same float32 ops as the official, on 1-D coordinates
        (the official repeats each coordinate over the other axis first: same values)."""
        eps = 1e-6
        y = torch.arange(1, h + 1, dtype=torch.float32, device=device)
        x = torch.arange(1, w + 1, dtype=torch.float32, device=device)
        y = y / (y[-1:] + eps) * self.scale
        x = x / (x[-1:] + eps) * self.scale
        dim_t = self._dim_t(device)
        pos_y = self._sincos(y, dim_t).t()[:, :, None].expand(-1, h, w)
        pos_x = self._sincos(x, dim_t).t()[:, None, :].expand(-1, h, w)
        return torch.cat((pos_y, pos_x), dim=0).to(dtype)

    def get(self, h: int, w: int, device, dtype: torch.dtype) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # inside a compiled graph the encoding is traced (and constant-folded); mutating the
            # Python cache there would add a guard on it and force a recompile on the next call
            return self.compute(h, w, device, dtype)
        key = (h, w, torch.device(device), dtype)
        pos = self.cache.get(key)
        if pos is None:
            pos = self.compute(h, w, device, dtype)
            self.cache[key] = pos
        return pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.get(x.shape[-2], x.shape[-1], x.device, x.dtype)
        return pos[None].expand(x.shape[0], -1, -1, -1)

    @torch.no_grad()
    def _encode_xy(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        dim_t = self._dim_t(x.device)
        return self._sincos(x * self.scale, dim_t), self._sincos(y * self.scale, dim_t)

    @torch.no_grad()
    def encode_boxes(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Boxes (N,) each of cx, cy, w, h -> (N, D + 2): [pos_y, pos_x, h, w]."""
        pos_x, pos_y = self._encode_xy(x, y)
        return torch.cat((pos_y, pos_x, h[:, None], w[:, None]), dim=1)

    @torch.no_grad()
    def encode_points(self, x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Points (B, N) x, y, labels -> (B, N, D + 1): [pos_y, pos_x, label]."""
        b, n = x.shape
        pos_x, pos_y = self._encode_xy(x.flatten(), y.flatten())
        return torch.cat((pos_y.view(b, n, -1), pos_x.view(b, n, -1), labels[:, :, None]), dim=2)


def build_fpn_convs(dim: int, d_model: int, scale_factors: Sequence[float]) -> nn.ModuleList:
    """One ``nn.Sequential`` per scale with the official child names (``dconv_2x2_0``, ``gelu``,
    ``dconv_2x2_1``, ``dconv_2x2``, ``maxpool_2x2``, ``conv_1x1``, ``conv_3x3``)."""
    convs = nn.ModuleList()
    for scale in scale_factors:
        cur = nn.Sequential()
        if scale == 4.0:
            cur.add_module("dconv_2x2_0", nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
            cur.add_module("gelu", nn.GELU())
            cur.add_module("dconv_2x2_1", nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2))
            out_dim = dim // 4
        elif scale == 2.0:
            cur.add_module("dconv_2x2", nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
            out_dim = dim // 2
        elif scale == 1.0:
            out_dim = dim
        elif scale == 0.5:
            cur.add_module("maxpool_2x2", nn.MaxPool2d(kernel_size=2, stride=2))
            out_dim = dim
        else:
            raise NotImplementedError(f"scale_factor={scale} is not supported")
        cur.add_module("conv_1x1", nn.Conv2d(out_dim, d_model, kernel_size=1))
        cur.add_module("conv_3x3", nn.Conv2d(d_model, d_model, kernel_size=3, padding=1))
        convs.append(cur)
    return convs


class VisionBackbone(nn.Module):
    """``backbone.vision_backbone`` of SAM 3: keys ``trunk.*``, ``convs.*``, ``sam2_convs.*``
    (only with ``add_sam2_neck``); ``position_encoding`` holds no state.

    ``forward(images (B, 3, S, S) float, normalised like the official processor) -> dict``:
        backbone_fpn:      [(B, D, 4g, 4g), (B, D, 2g, 2g), (B, D, g, g)]  highest resolution first
        vision_pos_enc:    same shapes (stride-0 batch views of cached tensors)
        sam2_backbone_fpn: the same three levels from ``sam2_convs``, or None
        sam2_pos_enc:      same shapes, or None
    (shapes for the default scale factors (4, 2, 1, 0.5) and scalp 1). These are the official
    ``forward_image`` outputs ``backbone_fpn``, ``vision_pos_enc`` and
    ``sam2_backbone_out["backbone_fpn"/"vision_pos_enc"]``; its ``vision_features`` is
    ``backbone_fpn[-1]``. S must equal ``img_size``: the RoPE tables are built for that grid.
    """

    def __init__(
        self,
        img_size: int = 1008,
        pretrain_img_size: int = 336,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 32,
        num_heads: int = 16,
        mlp_ratio: float = 4.625,
        window_size: int = 24,
        global_att_blocks: Sequence[int] = (7, 15, 23, 31),
        d_model: int = 256,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        add_sam2_neck: bool = False,
        scalp: int = 1,
    ):
        super().__init__()
        if not 0 <= scalp < len(scale_factors):
            raise ValueError(f"scalp {scalp} must keep at least one of {len(scale_factors)} levels")
        self.trunk = ViT(
            img_size=img_size,
            pretrain_img_size=pretrain_img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            window_size=window_size,
            global_att_blocks=global_att_blocks,
        )
        self.position_encoding = PositionEmbeddingSine(d_model)
        self.scale_factors = tuple(scale_factors)
        self.num_levels = len(scale_factors) - scalp
        self.convs = build_fpn_convs(embed_dim, d_model, scale_factors)
        self.sam2_convs = build_fpn_convs(embed_dim, d_model, scale_factors) if add_sam2_neck else None

    @classmethod
    def from_config(cls, cfg, add_sam2_neck: bool = False) -> "VisionBackbone":
        """From a :class:`sam3fast.config.Sam3Config`."""
        v = cfg.vit
        return cls(
            img_size=v.img_size,
            pretrain_img_size=v.pretrain_img_size,
            patch_size=v.patch_size,
            embed_dim=v.embed_dim,
            depth=v.depth,
            num_heads=v.num_heads,
            mlp_ratio=v.mlp_ratio,
            window_size=v.window_size,
            global_att_blocks=v.global_att_blocks,
            d_model=cfg.d_model,
            scale_factors=cfg.scale_factors,
            add_sam2_neck=add_sam2_neck,
        )

    def forward(self, images: torch.Tensor, sam3_neck: bool = True) -> Dict[str, Optional[List[torch.Tensor]]]:
        """``sam3_neck=False`` (sam3fast; a backbone with the SAM 2 neck only): the SAM 3 neck is
        skipped and ``backbone_fpn`` / ``vision_pos_enc`` are None. The SAM 2-style tracker reads the
        SAM 2 levels alone; the official computes both necks for it (at 1008 px the SAM 3 neck's
        3 x 3 convolution at 288 x 288 alone is ~98 GFLOP a frame)."""
        x = self.trunk(images)
        fpn = pos = None
        if sam3_neck or self.sam2_convs is None:
            fpn = [self.convs[i](x) for i in range(self.num_levels)]
            pos = [self.position_encoding(f) for f in fpn]
        sam2_fpn = sam2_pos = None
        if self.sam2_convs is not None:
            sam2_fpn = [self.sam2_convs[i](x) for i in range(self.num_levels)]
            # same shapes and dtype as the SAM 3 levels: the same cached encodings
            sam2_pos = list(pos) if pos is not None else [self.position_encoding(f) for f in sam2_fpn]
        return dict(backbone_fpn=fpn, vision_pos_enc=pos, sam2_backbone_fpn=sam2_fpn, sam2_pos_enc=sam2_pos)
