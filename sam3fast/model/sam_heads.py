"""SAM heads of the tracker: prompt encoder, two-way mask decoder and the object pointer
(official ``sam3/sam/{prompt_encoder,mask_decoder,transformer}.py`` and
``Sam3TrackerBase._forward_sam_heads``; keys ``tracker.sam_prompt_encoder.*``,
``tracker.sam_mask_decoder.*``, ``tracker.obj_ptr_proj.*``, ``tracker.no_obj_ptr``).

Letters: B objects, N prompt points, T = 6 + N + 1 decoder tokens (obj-score, IoU, 4 mask tokens,
the points, the pad point), D width (256), g the feature grid (72), R the input resolution (1008).

Prompt encoder (random-Fourier PE with G = ``positional_encoding_gaussian_matrix`` (2, D/2)):

    pe(xy)  = [sin(2 pi (2 xy/R - 1) G), cos(...)]                        (..., D)
    sparse  = pe(points + 0.5) + point_embeddings[label]   (label -1 -> not_a_point_embed, no pe)
    dense   = mask_downscaling(mask (B, 1, 4g, 4g))  or  no_mask_embed   (B, D, g, g)
    image_pe = pe(pixel-centre grid of g x g)                             (1, D, g, g)

Mask decoder: tokens = [obj_score, iou, mask x4, sparse] (B, T, D) and image = embedding + dense
go through a depth-2 ``TwoWayTransformer`` (token self-attn, token->image, MLP, image->token; the
cross attentions project to D/2), then

    up     = GELU(ConvT2(GELU(LN2d(ConvT1(image) + feat_s1))) + feat_s0)  (B, D/8, 4g, 4g)
    masks  = hyper_i(mask_token_i) . up                                   (B, 4, 4g, 4g)
    iou    = sigmoid(iou_head(iou_token))                                 (B, 4)
    score  = obj_score_head(obj_score_token)                              (B, 1)

multimask -> masks 1..3; single mask -> token 0 unless its stability
``|logit > 0.05| / |logit > -0.05| < 0.98``, then the best-IoU of 1..3 (tensor-only ``where``).

``sam_heads_forward`` (= ``_forward_sam_heads``): masks of objects with score <= 0 are set to
-1024, upsampled bilinearly to R x R, the best-IoU mask is picked, and
``obj_ptr = obj_ptr_proj(token)`` if score > 0 else ``no_obj_ptr``.
"""

from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.two_way_attention import image_to_token_attention, token_to_image_attention, two_way_attention_backend
from .common import MLP, LayerNorm2d, norm_then_act, size_constant

NO_OBJ_SCORE = -1024.0  # official sam3_tracker_base.NO_OBJ_SCORE: mask logit of absent objects


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier position encoding. ``positional_encoding_gaussian_matrix`` (2, F) is a
    persistent buffer (it is in the checkpoint); output width 2F."""

    def __init__(self, num_pos_feats: int = 64):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))
        # (h, w, device) -> the grid's scaled coordinates 2 * xy - 1 (h, w, 2) float32: they depend on
        # the size alone (no weight), so every call after the first skips their 9 operations
        self._grids: Dict[Tuple[int, int, torch.device], torch.Tensor] = {}

    def _pe_encoding(self, coords: torch.Tensor, scaled: bool = False) -> torch.Tensor:
        # coords in [0, 1] (``scaled``: already 2 * coords - 1 in float32); the official op order
        # (scale, matmul, then 2 pi) is kept for parity, computed in float32 whatever the model dtype
        # (the sin/cos of 2 pi x needs it), returned in the buffer's (= the model's) dtype
        m = self.positional_encoding_gaussian_matrix
        if not scaled:
            coords = 2 * coords.float() - 1
        coords = coords @ m.float()
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1).to(m.dtype)

    def _grid(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        def make():
            ones = torch.ones((h, w), device=device, dtype=torch.float32)
            y_embed = (ones.cumsum(dim=0) - 0.5) / h
            x_embed = (ones.cumsum(dim=1) - 0.5) / w
            return 2 * torch.stack([x_embed, y_embed], dim=-1) - 1

        return size_constant(self._grids, (h, w, device), make)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        """Encoding of the pixel-centre grid of ``size`` (h, w): (2F, h, w)."""
        h, w = size
        grid = self._grid(h, w, self.positional_encoding_gaussian_matrix.device)
        return self._pe_encoding(grid, scaled=True).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """(B, N, 2) xy in pixels of an (h, w) image -> (B, N, 2F)."""
        h, w = image_size
        # Divide (not multiply by the reciprocal) as the official does, for identical rounding.
        coords = torch.stack([coords[..., 0] / w, coords[..., 1] / h], dim=-1)
        return self._pe_encoding(coords.float())


class PromptEncoder(nn.Module):
    """Official ``PromptEncoder`` (keys ``tracker.sam_prompt_encoder.*``).

    ``forward(points, boxes, masks)``:

    - ``points``: ``(coords (B, N, 2) float xy in input-image pixels, labels (B, N) int)`` or None;
      labels 1 positive, 0 negative, 2/3 box top-left/bottom-right corner, -1 padding.
      When ``boxes`` is None one pad point (label -1) is appended, as in the official code.
    - ``boxes``: (B, 4) xyxy pixels or None (the tracker never passes boxes: it sends corners as
      points with labels 2/3).
    - ``masks``: (B, 1, 4g, 4g) mask logits or None.

    Returns ``sparse`` (B, N + 1 [+2 with boxes, no pad], D) and ``dense`` (B, D, g, g) (an expanded
    view of ``no_mask_embed`` without a mask). ``B`` is taken from points, else boxes, else masks,
    else 1.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Tuple[int, int],
        input_image_size: Tuple[int, int],
        mask_in_chans: int,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.num_point_embeddings = 4  # neg, pos, box top-left, box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    @classmethod
    def from_config(cls, cfg) -> "PromptEncoder":
        g = cfg.feat_size
        return cls(cfg.d_model, (g, g), (cfg.resolution, cfg.resolution), cfg.tracker.mask_in_chans)

    def get_dense_pe(self) -> torch.Tensor:
        """(1, D, g, g) position encoding of the image-embedding grid."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def pad_point_embeddings(self, B: int) -> torch.Tensor:
        """(B, 2, D): what :meth:`_embed_points` gives for the tracker's promptless frames (one
        point at (0, 0) with label -1, then the pad point): both points are pad points, whose
        encoding is zeroed and replaced by ``not_a_point_embed`` (an expanded view of the weight; the
        general path's 0 + w is w). No operation runs."""
        return self.not_a_point_embed.weight.view(1, 1, -1).expand(B, 2, -1)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel centres
        if pad:
            B = points.shape[0]
            points = torch.cat([points, points.new_zeros(B, 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((B, 1), -1)], dim=1)
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size)
        # One table lookup instead of the official chain of five `where`s: the same single add per
        # point (pad points take not_a_point_embed alone). Labels outside -1..3 keep the bare pe.
        table = torch.cat(
            [self.not_a_point_embed.weight] + [e.weight for e in self.point_embeddings]
            + [pe.new_zeros(1, self.embed_dim)],
            dim=0,
        )  # (6, D): rows -1, 0, 1, 2, 3, other
        idx = torch.where((labels >= -1) & (labels <= 3), labels + 1, 5).long()
        pe = torch.where((labels == -1).unsqueeze(-1), torch.zeros_like(pe), pe)
        return pe + table[idx]

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return pe + corner_embed

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor] = None,
        masks: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if points is not None:
            B = points[0].shape[0]
        elif boxes is not None:
            B = boxes.shape[0]
        elif masks is not None:
            B = masks.shape[0]
        else:
            B = 1
        device = self.no_mask_embed.weight.device
        parts: List[torch.Tensor] = []
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if parts:
            sparse = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        else:
            sparse = torch.empty(B, 0, self.embed_dim, device=device)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(B, -1, h, w)
        return sparse, dense


# ----------------------------------------------------------------------------------------------
# Two-way transformer


class Attention(nn.Module):
    """Official ``sam3.sam.transformer.Attention``: q/k/v projected to ``D // downsample_rate``
    (k/v from ``kv_in_dim``), split into heads, SDPA, ``out_proj`` back to D. Batch-first
    (B, L, D) x (B|1, S, Dkv) -> (B, L, D)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1,
                 kv_in_dim: Optional[int] = None):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.kv_in_dim = kv_in_dim if kv_in_dim is not None else embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide the internal width {self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.v_proj = nn.Linear(self.kv_in_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q_proj(q))
        k = self._heads(self.k_proj(k))
        v = self._heads(self.v_proj(v))
        if k.shape[0] != q.shape[0]:  # batch-1 keys shared by every object (static shapes)
            k = k.expand(q.shape[0], -1, -1, -1)
            v = v.expand(q.shape[0], -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class MLPBlock(nn.Module):
    """``lin2(act(lin1(x)))`` (official ``sam3.sam.common.MLPBlock``; ReLU in the two-way blocks)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type = nn.ReLU):
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """Post-norm block: token self-attn (no PE in the first block), token->image cross-attn, MLP,
    image->token cross-attn. Queries (B, T, D) with PE ``query_pe``; keys (B, S, D) with ``key_pe``
    (B|1, S, D)."""

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int = 2048,
                 attention_downsample_rate: int = 2, skip_first_layer_pe: bool = False):
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            # the first block replaces the tokens (no residual): the official SAM behaviour
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys

    def _forward_kernel(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                        key_pe: torch.Tensor, backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``forward`` with the two cross attentions through the fused kernels
        (``sam3fast.kernels.two_way_attention``): ``keys + key_pe``, the image-side projections and
        ``norm4`` never exist as (B, S, .) tensors. The token-side work (T rows) stays in PyTorch."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        t2i = self.cross_attn_token_to_image
        attn = token_to_image_attention(
            t2i.q_proj(queries + query_pe), keys, key_pe, t2i.k_proj.weight, t2i.k_proj.bias, t2i.v_proj.weight,
            t2i.v_proj.bias, t2i.num_heads, backend=backend)
        queries = self.norm2(queries + t2i.out_proj(attn))

        queries = self.norm3(queries + self.mlp(queries))

        i2t = self.cross_attn_image_to_token
        keys = image_to_token_attention(
            keys, key_pe, i2t.q_proj.weight, i2t.q_proj.bias, i2t.k_proj(queries + query_pe), i2t.v_proj(queries),
            i2t.out_proj.weight, i2t.out_proj.bias, self.norm4.weight, self.norm4.bias, self.norm4.eps,
            i2t.num_heads, backend=backend)
        return queries, keys


# Objects from which the fused kernels also run outside CUDA graphs and compiled code. Measured on an
# H100 (bf16, 72 x 72 image, 8 tokens; bench/results/two_way_attention_nvidia-h100-80gb-hbm3_2026-11-26):
# eager, both paths are bound by host launches: the kernel path 1.77 / 1.81 / 1.80 ms at 1 / 16 / 64
# objects, the PyTorch path 1.37 / 2.22 / 8.18 ms; inside a CUDA graph the kernel path wins at every
# size (0.28 / 0.60 / 1.68 ms against 0.46 / 2.17 / 8.15). So: always when captured or compiled, and
# eagerly from this batch on (the crossover lies between 1 and 16; 8 is a guess inside it).
EAGER_KERNEL_MIN_BATCH = 8


def _kernel_path_pays(image_embedding: torch.Tensor) -> bool:
    """Whether the fused two-way kernels beat the PyTorch path for this call (see
    ``EAGER_KERNEL_MIN_BATCH``): inside torch.compile or a CUDA-graph capture, or a batch that large."""
    if torch.compiler.is_compiling():
        return True
    if image_embedding.is_cuda and torch.cuda.is_current_stream_capturing():
        return True
    return image_embedding.shape[0] >= EAGER_KERNEL_MIN_BATCH


class TwoWayTransformer(nn.Module):
    """Official ``TwoWayTransformer``: ``forward(image_embedding (B, D, h, w), image_pe (B|1, D, h, w),
    point_embedding (B, T, D))`` -> (queries (B, T, D), keys (B, h*w, D)). A batch-1 ``image_pe``
    broadcasts (the official repeats it B times).

    ``use_kernel`` (True): where ``two_way_attention_backend`` picks Triton (CUDA) and the kernels
    pay (captured, compiled, or at least ``EAGER_KERNEL_MIN_BATCH`` objects), the cross attentions
    run through the fused kernels of ``sam3fast.kernels.two_way_attention`` (same weights, same math,
    float32 softmax/LayerNorm inside); False, or on CPU, the exact PyTorch path (the baseline the
    kernels are measured against). ``_forward_kernel`` forces the kernel path."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int,
                 attention_downsample_rate: int = 2):
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, attention_downsample_rate,
                                 skip_first_layer_pe=(i == 0))
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)
        self.use_kernel = True  # False: always the PyTorch path

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                point_embedding: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.use_kernel and _kernel_path_pays(image_embedding):
            a = self.final_attn_token_to_image
            backend, _ = two_way_attention_backend(image_embedding, a.num_heads, a.internal_dim, self.embedding_dim,
                                                   point_embedding.shape[1])
            if backend == "triton":
                return self._forward_kernel(image_embedding, image_pe, point_embedding)
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)
        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q=q, k=k, v=keys))
        return queries, keys

    def _forward_kernel(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor,
                        backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``forward`` through the fused cross-attention kernels; ``backend`` None lets each op pick
        (the tests force "triton" for the launchers under the interpreter, or "reference")."""
        # (B, S, D) views of the NCHW maps, channel stride S: the kernels read them as they are (a
        # key tile is contiguous along S), so no transposed copy; a batch-1 or expanded (stride-0)
        # map is read once per object, never repeated in memory.
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer._forward_kernel(queries, keys, point_embedding, key_pe, backend=backend)
        a = self.final_attn_token_to_image
        attn = token_to_image_attention(
            a.q_proj(queries + point_embedding), keys, key_pe, a.k_proj.weight, a.k_proj.bias, a.v_proj.weight,
            a.v_proj.bias, a.num_heads, backend=backend)
        queries = self.norm_final_attn(queries + a.out_proj(attn))
        return queries, keys


# ----------------------------------------------------------------------------------------------
# Mask decoder


class MaskDecoderOutput(NamedTuple):
    masks: torch.Tensor  # (B, M, 4g, 4g) logits, M = 3 (multimask) or 1
    iou_pred: torch.Tensor  # (B, M) sigmoid IoU estimates
    sam_tokens_out: torch.Tensor  # (B, 3, D) multimask tokens 1..3, or (B, 1, D) token 0
    object_score_logits: torch.Tensor  # (B, 1)


class MaskDecoder(nn.Module):
    """Official ``MaskDecoder`` as the SAM 3 tracker builds it (keys ``tracker.sam_mask_decoder.*``):
    3 multimask outputs, high-res features (``conv_s0``/``conv_s1``), sigmoid IoU head, MLP
    object-score head, multimask tokens for the object pointer, dynamic multimask via stability.
    Other official options are not built (no caller in SAM 3 uses them).

    ``forward(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
    multimask_output, high_res_features)``:

    - ``image_embeddings`` (B|1, D, g, g); ``image_pe`` (1, D, g, g) from ``get_dense_pe()``;
    - ``sparse_prompt_embeddings`` (B, N, D); ``dense_prompt_embeddings`` (B|1, D, g, g);
    - ``high_res_features`` [feat_s0 (B|1, D/8, 4g, 4g), feat_s1 (B|1, D/4, 2g, 2g)], already passed
      through ``conv_s0``/``conv_s1`` (the official projects them once per frame: see
      :meth:`project_high_res`).

    A batch-1 image/high-res input broadcasts over B prompts (the official ``repeat_image=True``).
    Returns :class:`MaskDecoderOutput`.
    """

    def __init__(
        self,
        transformer_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        depth: int = 2,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
    ):
        super().__init__()
        d = transformer_dim
        self.transformer_dim = d
        self.transformer = TwoWayTransformer(depth, d, num_heads, mlp_dim, attention_downsample_rate=2)
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, d)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, d)
        self.obj_score_token = nn.Embedding(1, d)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, kernel_size=2, stride=2),
            LayerNorm2d(d // 4),
            nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.conv_s0 = nn.Conv2d(d, d // 8, kernel_size=1, stride=1)
        self.conv_s1 = nn.Conv2d(d, d // 4, kernel_size=1, stride=1)
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(d, d, d // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(d, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)
        self.pred_obj_score_head = MLP(d, d, 1, 3)
        self.dynamic_multimask_stability_delta = dynamic_multimask_stability_delta
        self.dynamic_multimask_stability_thresh = dynamic_multimask_stability_thresh

    @classmethod
    def from_config(cls, cfg) -> "MaskDecoder":
        t = cfg.tracker
        return cls(cfg.d_model, num_heads=8, mlp_dim=t.sam_mlp_dim, depth=2,
                   iou_head_hidden_dim=t.iou_head_hidden_dim)

    def project_high_res(self, fpn_s0: torch.Tensor, fpn_s1: torch.Tensor) -> List[torch.Tensor]:
        """SAM2-neck levels (B, D, 4g, 4g), (B, D, 2g, 2g) -> [conv_s0 (B, D/8, ..), conv_s1 (B, D/4, ..)]."""
        return [self.conv_s0(fpn_s0), self.conv_s1(fpn_s1)]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: Sequence[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All 4 outputs: masks (B, 4, 4g, 4g), iou (B, 4), mask tokens (B, 4, D), score (B, 1)."""
        B = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(B, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings + dense_prompt_embeddings
        if src.shape[0] != B:
            src = src.expand(B, -1, -1, -1)
        _, c, h, w = src.shape

        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 1, :]
        mask_tokens_out = hs[:, 2 : 2 + self.num_mask_tokens, :]

        src = src.transpose(1, 2).reshape(B, c, h, w)
        dc1, ln1, act1, dc2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        up = norm_then_act(ln1, act1, dc1(src) + feat_s1)
        up = act2(dc2(up) + feat_s0)

        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, 4, D/8)
        b, c8, uh, uw = up.shape
        masks = (hyper_in @ up.view(b, c8, uh * uw)).view(b, -1, uh, uw)
        iou_pred = torch.sigmoid(self.iou_prediction_head(iou_token_out))
        object_score_logits = self.pred_obj_score_head(hs[:, 0, :])
        return masks, iou_pred, mask_tokens_out, object_score_logits

    def stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """|logit > delta| / |logit > -delta| over the last two dims (1 where the union is empty)."""
        mask_logits = mask_logits.flatten(-2)
        delta = self.dynamic_multimask_stability_delta
        area_i = torch.sum(mask_logits > delta, dim=-1).float()
        area_u = torch.sum(mask_logits > -delta, dim=-1).float()
        return torch.where(area_u > 0, area_i / area_u, 1.0)

    def select_single_mask(self, all_masks: torch.Tensor, all_ious: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token 0's mask if it is stable, else the best-IoU of tokens 1..3: (B, 1, h, w), (B, 1)."""
        best = torch.argmax(all_ious[:, 1:], dim=-1, keepdim=True) + 1  # (B, 1)
        best_masks = torch.take_along_dim(all_masks, best[:, :, None, None], dim=1)
        best_ious = torch.take_along_dim(all_ious, best, dim=1)
        single_masks, single_ious = all_masks[:, 0:1], all_ious[:, 0:1]
        is_stable = self.stability_scores(single_masks) >= self.dynamic_multimask_stability_thresh  # (B, 1)
        masks = torch.where(is_stable[..., None, None], single_masks, best_masks)
        ious = torch.where(is_stable, single_ious, best_ious)
        return masks, ious

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: Sequence[torch.Tensor],
    ) -> MaskDecoderOutput:
        masks, iou_pred, mask_tokens_out, score = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, high_res_features
        )
        if multimask_output:
            return MaskDecoderOutput(masks[:, 1:], iou_pred[:, 1:], mask_tokens_out[:, 1:], score)
        masks, iou_pred = self.select_single_mask(masks, iou_pred)
        # the pointer token is token 0 even when the stability fallback picked another mask
        return MaskDecoderOutput(masks, iou_pred, mask_tokens_out[:, 0:1], score)


# ----------------------------------------------------------------------------------------------
# _forward_sam_heads


class SamHeadsOutput(NamedTuple):
    """The official ``_forward_sam_heads`` tuple, same order."""

    low_res_multimasks: torch.Tensor  # (B, M, 4g, 4g), -1024 where the object is absent
    high_res_multimasks: torch.Tensor  # (B, M, R, R) bilinear upsample of the above
    ious: torch.Tensor  # (B, M)
    low_res_masks: torch.Tensor  # (B, 1, 4g, 4g) best-IoU mask (= the only one when M = 1)
    high_res_masks: torch.Tensor  # (B, 1, R, R)
    obj_ptr: torch.Tensor  # (B, D)
    object_score_logits: torch.Tensor  # (B, 1)


def sam_heads_forward(
    sam_prompt_encoder: PromptEncoder,
    sam_mask_decoder: MaskDecoder,
    obj_ptr_proj: nn.Module,
    no_obj_ptr: torch.Tensor,
    backbone_features: torch.Tensor,
    point_coords: Optional[torch.Tensor] = None,
    point_labels: Optional[torch.Tensor] = None,
    mask_inputs: Optional[torch.Tensor] = None,
    high_res_features: Optional[Sequence[torch.Tensor]] = None,
    multimask_output: bool = False,
    image_pe: Optional[torch.Tensor] = None,
    need_high_res: bool = True,
) -> SamHeadsOutput:
    """``Sam3TrackerBase._forward_sam_heads`` on the tracker's own modules (pass the tracker's
    ``sam_prompt_encoder``, ``sam_mask_decoder``, ``obj_ptr_proj`` (MLP(3)) and ``no_obj_ptr`` (1, D)).

    - ``backbone_features`` (B, D, g, g): the image embedding (memory-conditioned, or + no_mem_embed).
    - ``point_coords`` (B, N, 2) float xy in R-pixel input frame, ``point_labels`` (B, N) int
      (1 pos, 0 neg, 2/3 box corners, -1 pad); None -> one pad point per object, as the official.
    - ``mask_inputs`` (B, 1, h, w) logits or None; resized to (4g, 4g) (bilinear, antialias) unless
      already that size.
    - ``high_res_features`` [(B, D/8, 4g, 4g), (B, D/4, 2g, 2g)] after conv_s0/conv_s1.
    - ``image_pe`` (1, D, g, g): optional cached ``sam_prompt_encoder.get_dense_pe()``.
    - ``need_high_res=False``: the (B, M, R, R) float32 upsampled masks are not made (12 MB per
      object with multimask at R = 1008) and both high-res outputs are None, for callers that only
      use the low-res masks (the propagation step whose memory input is fused from them).

    Returns :class:`SamHeadsOutput`. Host-sync free: the object gate, best-IoU pick and the
    stability fallback are all tensor ops.
    """
    B = backbone_features.shape[0]
    if mask_inputs is not None:
        if tuple(mask_inputs.shape[-2:]) != tuple(sam_prompt_encoder.mask_input_size):
            mask_inputs = F.interpolate(mask_inputs.float(), size=sam_prompt_encoder.mask_input_size,
                                        mode="bilinear", align_corners=False, antialias=True)
        mask_inputs = mask_inputs.to(backbone_features.dtype)  # (float32 logits into a bf16 model)
    if point_coords is None:
        # the official's pad point (0, 0) with label -1 (then the encoder's own pad point): both
        # embed as not_a_point_embed, so the sparse tokens are that weight (every propagated frame)
        _, dense = sam_prompt_encoder(None, None, mask_inputs)
        if mask_inputs is None:
            dense = dense.expand(B, -1, -1, -1)
        sparse = sam_prompt_encoder.pad_point_embeddings(B)
    else:
        sparse, dense = sam_prompt_encoder((point_coords, point_labels), None, mask_inputs)
    if image_pe is None:
        image_pe = sam_prompt_encoder.get_dense_pe()
    low_res_multimasks, ious, sam_output_tokens, object_score_logits = sam_mask_decoder(
        backbone_features, image_pe, sparse, dense, multimask_output, high_res_features
    )

    is_obj_appearing = object_score_logits > 0  # (B, 1)
    low_res_multimasks = torch.where(is_obj_appearing[:, :, None, None], low_res_multimasks, NO_OBJ_SCORE)
    low_res_multimasks = low_res_multimasks.float()
    image_size = sam_prompt_encoder.input_image_size
    high_res_multimasks = high_res_masks = None
    if need_high_res:
        high_res_multimasks = F.interpolate(low_res_multimasks, size=image_size, mode="bilinear",
                                            align_corners=False)

    if multimask_output:
        best = torch.argmax(ious, dim=-1, keepdim=True)  # (B, 1)
        low_res_masks = torch.take_along_dim(low_res_multimasks, best[:, :, None, None], dim=1)
        if need_high_res:
            high_res_masks = torch.take_along_dim(high_res_multimasks, best[:, :, None, None], dim=1)
        sam_output_token = torch.take_along_dim(sam_output_tokens, best[:, :, None], dim=1)[:, 0]
    else:
        low_res_masks, high_res_masks = low_res_multimasks, high_res_multimasks
        sam_output_token = sam_output_tokens[:, 0]

    obj_ptr = obj_ptr_proj(sam_output_token)
    lam = is_obj_appearing.float()
    obj_ptr = lam * obj_ptr + (1 - lam) * no_obj_ptr
    return SamHeadsOutput(low_res_multimasks, high_res_multimasks, ious, low_res_masks, high_res_masks,
                          obj_ptr, object_score_logits)
