"""Model configuration: frozen dataclasses and named presets.

One builder (:func:`sam3fast.model.build.build_image_model`) takes a :class:`Sam3Config`; the
official sizes are the ``"sam3"`` preset and the tiny presets exist only so tests run in seconds.
The field names follow the official constructors' keyword names where one exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Tuple


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 1008
    pretrain_img_size: int = 336  # abs pos table is (pretrain/patch)^2 + cls, tiled to the grid
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.625
    window_size: int = 24
    global_att_blocks: Tuple[int, ...] = (7, 15, 23, 31)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    width: int = 1024
    heads: int = 16
    layers: int = 24
    context_length: int = 32
    vocab_size: int = 49408
    output_dim: int = 512  # CLIP text_projection width (unused at inference, kept for the keys)


@dataclass(frozen=True)
class TrackerConfig:
    """The SAM 2-style tracker (``tracker.*`` keys). Its width is ``Sam3Config.d_model``."""

    mem_dim: int = 64
    num_maskmem: int = 7  # 1 conditioning + 6 previous frames
    mem_attn_layers: int = 4
    mem_attn_ffn: int = 2048
    sam_mlp_dim: int = 2048  # two-way transformer MLP
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    mem_interpol_size: int = 1152  # memory encoder resizes masks to this before its strided convs
    max_cond_frames_in_attn: int = 4
    max_obj_ptrs_in_encoder: int = 16


@dataclass(frozen=True)
class Sam3Config:
    vit: ViTConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    d_model: int = 256
    scale_factors: Tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)
    num_heads: int = 8  # geometry encoder, fusion encoder, decoder, seg head
    dim_feedforward: int = 2048
    geo_layers: int = 3
    roi_size: int = 7
    enc_layers: int = 6
    dec_layers: int = 6
    num_queries: int = 200
    scoring_hidden: int = 2048
    seg_upsampling_stages: int = 3

    @property
    def resolution(self) -> int:
        return self.vit.img_size

    @property
    def feat_size(self) -> int:
        return self.vit.grid

    def replace(self, **kw) -> "Sam3Config":
        return dataclasses.replace(self, **kw)


def _tiny(img_size: int = 112) -> Sam3Config:
    # 112 px / 14 = 8x8 tokens, windows of 4 (2x2 windows), one global block; every other width 64.
    return Sam3Config(
        vit=ViTConfig(
            img_size=img_size,
            pretrain_img_size=56,
            patch_size=14,
            embed_dim=64,
            depth=2,
            num_heads=4,
            mlp_ratio=4.625,
            window_size=4,
            global_att_blocks=(1,),
        ),
        text=TextConfig(width=64, heads=4, layers=2, context_length=32, vocab_size=49408, output_dim=512),
        # 1152 / 1008 of the image size, as at full size
        tracker=TrackerConfig(mem_dim=16, mem_attn_layers=2, mem_attn_ffn=128, sam_mlp_dim=128,
                              iou_head_hidden_dim=64, mem_interpol_size=img_size * 8 // 7),
        d_model=64,
        num_heads=8,
        dim_feedforward=128,
        geo_layers=2,
        enc_layers=2,
        dec_layers=2,
        num_queries=16,
        scoring_hidden=128,
    )


PRESETS: Dict[str, Sam3Config] = {
    "sam3": Sam3Config(),
    "tiny": _tiny(),
}


def get_config(name: str) -> Sam3Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown config preset {name!r}; known presets: {sorted(PRESETS)}") from None
