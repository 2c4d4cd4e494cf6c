"""Geometry prompt encoder (official ``sam3.model.geometry_encoders.SequenceGeometryEncoder`` as
SAM 3 builds it) and a pure-PyTorch, batched ``roi_align``.

Shapes: B batch, Np points, Nb boxes (fixed capacities, padded), H x W feature grid, D width.

Point token (xy normalized to [0, 1], label 0 = negative, 1 = positive):
    Linear(xy) + Linear(grid_sample(LN_img(feats), 2 xy - 1)) + Linear([sin/cos(x) | sin/cos(y)])
    + label_embed[label]
Box token (cxcywh normalized):
    Linear(cxcywh) + Conv7x7(roi_align(LN_img(feats), xyxy * [W, H, W, H], 7x7))
    + Linear([sin/cos(cy) | sin/cos(cx) | h | w]) + label_embed[label]
(note the pos-enc order: x then y for points, y then x plus h, w for boxes.)

Sequence (official ``concat_padded_sequences`` order): the valid points, then the valid boxes, then
a CLS token, then the padding, L_geo = Np + Nb + 1; then LN(Linear(.)), ``geo_layers`` pre-norm
layers (self-attn over the L_geo tokens with the padding mask, cross-attn to the raw image tokens
with the image pos added to the keys, ReLU FFN) and a final LN. With no boxes and no points the
output is the CLS token alone (L_geo = 1).

``roi_align`` reproduces ``torchvision.ops.roi_align(input, boxes, 7)`` (spatial_scale 1,
sampling_ratio -1 = adaptive, aligned False) as torchvision's pure-PyTorch ``_roi_align`` computes
it (the CPU reference path): same sample positions, clamping, bilinear weights and counts. Bilinear
sampling is separable, so each box's average over its samples is Wy @ F @ Wx^T with per-box (7, H)
and (7, W) weight matrices; the adaptive sample count becomes a mask over a static H (W) samples per
bin, the fallback's own bound. The result equals the fallback up to float summation order (~1e-7).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from sam3fast.model.encoder import TransformerEncoderLayer


# ----------------------------------------------------------------------------------------------
# roi_align


def _roi_axis_weights(
    start: torch.Tensor,
    size: torch.Tensor,
    pooled: int,
    length: int,
    grid: Union[torch.Tensor, int],
    zero_outside: bool,
) -> torch.Tensor:
    """Bilinear weights along one axis, summed over each bin's samples: (..., pooled, length).

    ``start``/``size`` (...,) in input-grid units; ``grid`` samples per bin, a tensor (...,) for
    adaptive sampling (masking a static ``length`` samples) or an int."""
    device, dtype = start.device, start.dtype
    adaptive = isinstance(grid, torch.Tensor)
    n_samples = length if adaptive else grid
    p = torch.arange(pooled, device=device)
    i = torch.arange(n_samples, device=device)
    bin_size = size / pooled
    # Same expression and operation order as torchvision's _roi_align, so sample positions agree
    # to the bit: start + p * bin + (i + 0.5) * (bin / grid).
    coord = (
        start[..., None, None]
        + p[:, None] * bin_size[..., None, None]
        + (i + 0.5).to(dtype) * (bin_size / grid)[..., None, None]
    )  # (..., pooled, n_samples)
    if adaptive:
        valid = i < grid[..., None, None]
    else:
        valid = torch.ones_like(coord, dtype=torch.bool)
    c = coord.clamp(min=0)
    low = c.int()
    edge = low >= length - 1
    high = torch.where(edge, length - 1, low + 1)
    low = torch.where(edge, length - 1, low)
    frac = c - low
    if zero_outside:
        # torchvision's C++/CUDA kernels: samples beyond one cell outside the map contribute 0,
        # and a sample in the last cell takes that cell's value (frac 0).
        frac = torch.where(edge, torch.zeros_like(frac), frac)
        valid = valid & (coord >= -1.0) & (coord <= float(length))
    cells = torch.arange(length, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    w = torch.where(low[..., None] == cells, (1.0 - frac)[..., None], zero) + torch.where(
        high[..., None] == cells, frac[..., None], zero
    )
    # where, not multiply: masked samples can hold inf/nan coordinates (aligned, empty boxes).
    w = torch.where(valid[..., None], w, zero)
    return w.sum(-2)


def roi_align(
    input: torch.Tensor,
    boxes: torch.Tensor,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    out_of_bounds: str = "clamp",
) -> torch.Tensor:
    """RoI Align with average pooling on batched boxes.

    input (N, C, H, W); boxes (N, K, 4) x1, y1, x2, y2 in input-pixel units (before
    ``spatial_scale``), K boxes per image (pad with any finite box and ignore the outputs).
    Returns (N, K, C, PH, PW) in ``input.dtype``; ``torchvision.ops.roi_align(input, list(boxes),
    ...)`` is this reshaped to (N * K, C, PH, PW).

    ``out_of_bounds``: ``"clamp"`` reproduces torchvision's pure-PyTorch ``_roi_align`` (used on
    CPU without torchvision's compiled ops; samples past the edge take the edge value);
    ``"zero"`` reproduces its C++/CUDA kernels (samples more than one cell outside the map count
    as 0). They differ only for boxes reaching more than one cell beyond the map. Both bound the
    adaptive samples per bin to H (W), like the fallback; the compiled kernels do not, which only
    matters for boxes taller (wider) than 7H (7W).
    """
    if out_of_bounds not in ("clamp", "zero"):
        raise ValueError(f"out_of_bounds must be 'clamp' or 'zero', got {out_of_bounds!r}")
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    N, C, H, W = input.shape
    if boxes.dim() != 3 or boxes.shape[0] != N or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (N={N}, K, 4), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        boxes = boxes.float()
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[..., j] * spatial_scale - offset for j in range(4))
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = grid_w = sampling_ratio
        count = torch.full_like(roi_h, max(sampling_ratio * sampling_ratio, 1))
    else:
        grid_h = torch.ceil(roi_h / ph)
        grid_w = torch.ceil(roi_w / pw)
        count = torch.clamp(grid_h * grid_w, min=1)
    zero_outside = out_of_bounds == "zero"
    wy = _roi_axis_weights(y1, roi_h, ph, H, grid_h, zero_outside).to(input.dtype)  # (N, K, PH, H)
    wx = _roi_axis_weights(x1, roi_w, pw, W, grid_w, zero_outside).to(input.dtype)  # (N, K, PW, W)
    rows = torch.einsum("nkph,nchw->nkcpw", wy, input)
    out = torch.einsum("nkcpw,nkqw->nkcpq", rows, wx)
    return (out / count[..., None, None, None].to(out.dtype)).to(input.dtype)


# ----------------------------------------------------------------------------------------------
# Geometry encoder


def _sine_xy(
    x: torch.Tensor, y: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Official ``PositionEmbeddingSine._encode_xy`` on any shape: (...) -> 2 x (..., num_pos_feats)
    interleaved [sin, cos, sin, cos, ...] of 2 pi x / t^(2 floor(i/2) / F)."""
    scale = 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = (x * scale)[..., None] / dim_t
    pos_y = (y * scale)[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(-2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(-2)
    return pos_x, pos_y


def _pack_valid_first(x: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stable-partition each row of x (B, L, D): valid tokens first, in order, then the padding.
    Returns (packed x, mask (B, L) bool True=pad). A scatter by a permutation: no host sync."""
    v = valid.long()
    n_valid = v.sum(1, keepdim=True)
    dest = torch.where(valid, v.cumsum(1) - 1, n_valid + (1 - v).cumsum(1) - 1)
    out = torch.empty_like(x).scatter_(1, dest[..., None].expand_as(x), x)
    mask = torch.arange(x.shape[1], device=x.device)[None] >= n_valid
    return out, mask


class GeometryEncoder(nn.Module):
    """Encode box and point prompts into prompt tokens (official ``geometry_encoder.*`` names).

    ``forward(img_feats (B, HW, D), img_pos (B, HW, D), feat_size (H, W), boxes (B, Nb, 4) cxcywh
    normalized or None, box_labels (B, Nb) long/bool (1/True = positive) or None (all positive),
    box_mask (B, Nb) bool True=pad or None, points (B, Np, 2) xy normalized or None, point_labels,
    point_mask) -> (geo_feats (B, Np + Nb + 1, D), geo_mask (B, Np + Nb + 1) bool True=pad)``.

    ``img_feats``/``img_pos`` are the last FPN level flattened row-major (the official takes the
    same tensors seq-first). Padded boxes/points may hold anything finite or not: they are replaced
    before use, and their output tokens are finite padding. Any padding pattern is accepted (the
    official asserts right padding); the output is always right-padded. Every row keeps at least
    the CLS token. ``roi_out_of_bounds``: see :func:`roi_align` (``"clamp"`` = the CPU reference).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        num_layers: int,
        roi_size: int = 7,
        roi_out_of_bounds: str = "clamp",
    ):
        super().__init__()
        d = d_model
        self.d_model = d
        self.roi_size = roi_size
        self.roi_out_of_bounds = roi_out_of_bounds
        self.label_embed = nn.Embedding(2, d)
        self.cls_embed = nn.Embedding(1, d)
        self.points_direct_project = nn.Linear(2, d)
        self.points_pool_project = nn.Linear(d, d)
        self.points_pos_enc_project = nn.Linear(d, d)
        self.boxes_direct_project = nn.Linear(4, d)
        self.boxes_pool_project = nn.Conv2d(d, d, roi_size)
        self.boxes_pos_enc_project = nn.Linear(d + 2, d)
        self.final_proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.img_pre_norm = nn.LayerNorm(d)
        self.encode = nn.ModuleList(
            TransformerEncoderLayer(
                d,
                num_heads,
                dim_feedforward,
                pos_enc_at_attn=False,
                pos_enc_at_cross_attn_queries=False,
                pos_enc_at_cross_attn_keys=True,
            )
            for _ in range(num_layers)
        )
        self.encode_norm = nn.LayerNorm(d)

    @classmethod
    def from_config(cls, cfg) -> "GeometryEncoder":
        return cls(cfg.d_model, cfg.num_heads, cfg.dim_feedforward, cfg.geo_layers, cfg.roi_size)

    def _encode_points(self, points, labels, feat_map):
        embed = self.points_direct_project(points)
        grid = (points * 2 - 1).unsqueeze(2)  # (B, Np, 1, 2)
        sampled = F.grid_sample(feat_map, grid.to(feat_map.dtype), align_corners=False)
        embed = embed + self.points_pool_project(sampled.squeeze(-1).transpose(1, 2))
        enc_x, enc_y = _sine_xy(points[..., 0], points[..., 1], self.d_model // 2)
        embed = embed + self.points_pos_enc_project(torch.cat([enc_x, enc_y], -1).to(embed.dtype))
        return self.label_embed(labels) + embed

    def _encode_boxes(self, boxes, labels, feat_map):
        B, Nb = boxes.shape[:2]
        H, W = feat_map.shape[-2:]
        embed = self.boxes_direct_project(boxes)
        cx, cy, w, h = boxes.unbind(-1)
        xyxy = torch.stack(
            [(cx - 0.5 * w) * W, (cy - 0.5 * h) * H, (cx + 0.5 * w) * W, (cy + 0.5 * h) * H], -1
        )
        # float32 coordinates whatever the feature dtype, as the official (``.float()``).
        rois = roi_align(feat_map, xyxy.float(), self.roi_size, out_of_bounds=self.roi_out_of_bounds)
        # A roi_size x roi_size conv on a roi_size x roi_size map is one matmul.
        conv = self.boxes_pool_project
        embed = embed + F.linear(rois.flatten(2), conv.weight.flatten(1), conv.bias)
        pos_x, pos_y = _sine_xy(cx, cy, self.d_model // 2)
        enc = torch.cat([pos_y, pos_x, h[..., None], w[..., None]], -1)
        embed = embed + self.boxes_pos_enc_project(enc.to(embed.dtype))
        return self.label_embed(labels) + embed

    @staticmethod
    def _prepare(x, labels, mask):
        B, N = x.shape[:2]
        if labels is None:
            labels = torch.ones(B, N, dtype=torch.long, device=x.device)
        labels = labels.long()
        if mask is not None:
            # Padding must stay finite: a NaN value in a masked key still poisons attention.
            x = x.masked_fill(mask[..., None], 0.0)
            labels = labels.masked_fill(mask, 0)
            valid = ~mask
        else:
            valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
        return x, labels, valid

    def forward(
        self,
        img_feats: torch.Tensor,
        img_pos: torch.Tensor,
        feat_size: Tuple[int, int],
        boxes: Optional[torch.Tensor] = None,
        box_labels: Optional[torch.Tensor] = None,
        box_mask: Optional[torch.Tensor] = None,
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        point_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        B, HW, D = img_feats.shape
        H, W = feat_size
        if H * W != HW:
            raise ValueError(f"feat_size {feat_size} does not match {HW} image tokens")
        if boxes is not None and boxes.shape[1] == 0:
            boxes = None
        if points is not None and points.shape[1] == 0:
            points = None

        tokens, valids = [], []
        if points is not None or boxes is not None:
            feat_map = self.img_pre_norm(img_feats).transpose(1, 2).reshape(B, D, H, W)
        if points is not None:
            points, point_labels, valid = self._prepare(points, point_labels, point_mask)
            tokens.append(self._encode_points(points, point_labels, feat_map))
            valids.append(valid)
        if boxes is not None:
            boxes, box_labels, valid = self._prepare(boxes, box_labels, box_mask)
            tokens.append(self._encode_boxes(boxes, box_labels, feat_map))
            valids.append(valid)
        tokens.append(self.cls_embed.weight.to(img_feats.dtype).expand(B, 1, D))
        valids.append(torch.ones(B, 1, dtype=torch.bool, device=img_feats.device))

        x = torch.cat(tokens, 1)
        padded = (points is not None and point_mask is not None) or (
            boxes is not None and box_mask is not None
        )
        if padded:
            x, mask = _pack_valid_first(x, torch.cat(valids, 1))
        else:
            mask = torch.zeros(B, x.shape[1], dtype=torch.bool, device=x.device)

        x = self.norm(self.final_proj(x))
        for layer in self.encode:
            x = layer(x, img_feats, tgt_key_padding_mask=mask if padded else None, pos=img_pos)
        return self.encode_norm(x), mask
