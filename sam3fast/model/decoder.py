"""DETR-style query decoder, dot-product scoring and box head of the SAM 3 image model.

Official modules: ``sam3.model.decoder.TransformerDecoder`` / ``TransformerDecoderLayer`` (keys
``transformer.decoder.*``), ``sam3.model.model_misc.DotProductScoring`` (``dot_prod_scoring.*``) and the
box/score part of ``Sam3Image._update_scores_and_boxes``. Inference only (no DAC/o2m queries).

Shapes: B batch, Q queries, D width, H heads, P prompt tokens, (Hf, Wf) feature grid, N = Hf*Wf.
The presence token is kept as token 0 of a (B, 1+Q, D) stream for the whole stack (the official
concatenates and splits it every layer; every op except attention is per token, so it is the same).

One layer (post-norm), with ``p`` the query position (zeros for the presence token):

    x = norm2(x + SelfAttn(q=k=x+p, v=x))
    x = catext_norm(x + Attn(q=x+p, k=v=prompt, key_padding_mask=prompt_mask))
    x = norm1(x + Attn(q=x+p, k=memory+pos, v=memory, bias=boxRPB(ref)))
    x = norm3(x + linear2(relu(linear1(x))))

Around it, per layer, from the current reference boxes ``ref`` (B, Q, 4) cxcywh in [0, 1]:

    p   = ref_point_head(sine(ref))                          sine: (B, Q, 2D), order (cy, cx, w, h)
    ref = sigmoid(inverse_sigmoid(ref) + bbox_embed(norm(x[:, 1:])))

boxRPB "log": with xyxy = ref in corner form, c_y = y / Hf, c_x = x / Wf and
``f(d) = sign(8d) log2(|8d| + 1) / 3``, ``dy[b,q,y] = MLP_y(f(c_y - y0), f(c_y - y1))`` (H values),
``dx`` likewise, and ``bias[b, h, q, y*Wf + x] = dy[b,q,y,h] + dx[b,q,x,h]``; the presence token
gets a zero bias row. On CUDA (``Decoder.use_kernel``, the default) the image cross-attention is the
``sam3fast::rpb_attention`` Triton kernel, which sums the bias from (dy, dx) inside the attention
(in float32); elsewhere, or with ``use_kernel = False``, the bias is materialized (B, H, 1+Q, N) in
the memory's dtype and SDPA takes it, which is the exact official computation.

Outputs at inference (last layer): ``hs = norm(x[:, 1:])``, boxes as above, presence logit
``presence_token_head(presence_token_out_norm(x[:, 0]))``. The official clamp of the presence logit
(+-10) is a no-op (``.clamp()`` result discarded), so it is not applied here.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.rpb_attention import rpb_attention, rpb_attention_backend
from ..kernels.rpb_factors import rpb_factors, rpb_factors_ref
from .common import MLP, MultiheadAttention, inverse_sigmoid, key_padding_bias, linear_relu, size_constant


def box_cxcywh_to_xyxy(x: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


# (d_model // 2, device) -> gen_sineembed_for_position's divisors (float32): they depend on the size
# alone, so each decoder layer's call after the first skips their 5 operations
_BOX_SINE_DIVISORS: Dict[Tuple[int, torch.device], torch.Tensor] = {}
_BOX_SINE_ORDER = (1, 0, 2, 3)  # the official's block order: cy, cx, w, h


def _box_sine_divisors(half: int, device: torch.device) -> torch.Tensor:
    def make():
        dim_t = torch.arange(half, dtype=torch.float32, device=device)
        return 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)

    return size_constant(_BOX_SINE_DIVISORS, (half, device), make)


def gen_sineembed_for_position(pos: torch.Tensor, d_model: int) -> torch.Tensor:
    """Official ``gen_sineembed_for_position`` for 4-d boxes, any leading dims:
    (..., 4) cxcywh -> (..., 2 * d_model), blocks ordered (cy, cx, w, h), each d_model/2 wide
    with interleaved sin/cos. The four coordinates go through each elementwise step together (the
    official embeds them one by one: the same operation on every element, 6 launches instead of
    21 per call; the divisors are cached)."""
    half = d_model // 2
    e = (pos[..., _BOX_SINE_ORDER] * (2 * math.pi))[..., None] / _box_sine_divisors(half, pos.device)
    return torch.stack((e[..., 0::2].sin(), e[..., 1::2].cos()), dim=-1).flatten(-3)


def predict_boxes(
    bbox_embed: nn.Module, hs: torch.Tensor, reference_boxes: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Box head as in ``Sam3Image._update_scores_and_boxes``: (B, Q, D) normed queries and the
    layer's input reference boxes (B, Q, 4) cxcywh -> (cxcywh, xyxy), both (B, Q, 4) in [0, 1]."""
    boxes = (inverse_sigmoid(reference_boxes) + bbox_embed(hs)).sigmoid()
    return boxes, box_cxcywh_to_xyxy(boxes)


def joint_logits(pred_logits: torch.Tensor, presence_logit: torch.Tensor) -> torch.Tensor:
    """``supervise_joint_box_scores=True`` (video detector only): fold presence into the query logits.
    pred_logits (B, Q, 1), presence_logit (B, 1) -> (B, Q, 1). The image model does not do this."""
    prob = pred_logits.sigmoid() * presence_logit.sigmoid().unsqueeze(1)
    return inverse_sigmoid(prob).clamp(min=-10.0, max=10.0)


class DecoderLayer(nn.Module):
    """Official ``TransformerDecoderLayer`` (text cross-attention on, DAC off), batch-first."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int):
        super().__init__()
        self.cross_attn = MultiheadAttention(d_model, num_heads)
        # the image cross-attention computes in the memory's dtype: its weights are kept in the
        # model's dtype inside the decoder's float32 island (the same values the per-call cast of
        # float32 weights gave, without 4 casts a layer)
        self.cross_attn.follows_model_dtype = True
        self.norm1 = nn.LayerNorm(d_model)
        self.ca_text = MultiheadAttention(d_model, num_heads)
        self.catext_norm = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, num_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D)
        query_pos: torch.Tensor,  # (B, L, D)
        memory: torch.Tensor,  # (B, N, D)
        memory_key: torch.Tensor,  # (B, N, D) memory + pos
        prompt: torch.Tensor,  # (B, P, D)
        prompt_mask: Optional[torch.Tensor],  # (B, P) True = pad
        attn_bias: Optional[torch.Tensor],  # (B, H, L, N)
        rpb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,  # (dy (B, H, L, Hf), dx (B, H, L, Wf))
        prompt_bias: Optional[torch.Tensor] = None,  # (B, 1, 1, P): key_padding_bias(prompt_mask, x.dtype)
    ) -> torch.Tensor:
        """The image cross-attention takes its bias materialized (``attn_bias``) or, with ``rpb``
        given, as its separable factors through the ``sam3fast::rpb_attention`` op (then
        ``attn_bias`` is unused). It runs in ``memory``'s dtype (its projections, the attention and
        the output projection), the rest in ``x``'s (the weights'); its output joins the residual
        stream in ``x``'s dtype. ``prompt_bias``, when given, stands for ``prompt_mask`` (the
        decoder builds it once for its six layers)."""
        q = x + query_pos
        x = self.norm2(x + self.self_attn(q, q, x))
        mask = prompt_mask if prompt_bias is None else None  # (the bias stands for the mask)
        text = self.ca_text(x + query_pos, prompt, prompt, key_padding_mask=mask, attn_bias=prompt_bias)
        x = self.catext_norm(x + text)
        if rpb is None:
            ca = self.cross_attn(x + query_pos, memory_key, memory, attn_bias=attn_bias, dtype=memory.dtype)
        else:
            ca = self._cross_attn_rpb(x + query_pos, memory_key, memory, *rpb)
        x = self.norm1(x + ca.to(x.dtype))
        return self.norm3(x + self.linear2(linear_relu(x, self.linear1)))

    def _cross_attn_rpb(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor
    ) -> torch.Tensor:
        """``self.cross_attn(query, key, value, attn_bias=dy (+) dx, dtype=key.dtype)`` with the
        attention between the projections done by ``rpb_attention`` on (B, *, H, Dh) views (no copy);
        the bias factors in their own dtype (the kernel sums them in float32)."""
        attn = self.cross_attn
        B, L, D = query.shape
        N, H = key.shape[1], attn.num_heads
        (w_q, w_k, w_v), (b_q, b_k, b_v), w_o, b_o = attn.weights(key.dtype)
        q = F.linear(query.to(key.dtype), w_q, b_q).view(B, L, H, D // H)
        k = F.linear(key, w_k, b_k).view(B, N, H, D // H)
        v = F.linear(value, w_v, b_v).view(B, N, H, D // H)
        return F.linear(rpb_attention(q, k, v, dy, dx).reshape(B, L, D), w_o, b_o)


class Decoder(nn.Module):
    """Official ``TransformerDecoder`` as built for the image model (box refine, boxRPB "log",
    presence token, text cross-attention), batch-first and without host syncs.

    ``forward(memory (B, N, D), pos (B, N, D), feat_size (Hf, Wf) python ints, prompt (B, P, D),
    prompt_mask (B, P) bool True = pad or None)`` returns a dict:

    - ``hs`` (B, Q, D): last layer's normed queries (= official ``hs[-1]`` / ``out["queries"]``)
    - ``ref_boxes`` (B, Q, 4): reference boxes fed to the last layer (official ``reference_boxes[-1]``)
    - ``pred_boxes`` (B, Q, 4) cxcywh and ``pred_boxes_xyxy`` (B, Q, 4), normalized to [0, 1]
    - ``presence_logit`` (B, 1): official ``presence_logit_dec``
    - ``presence_feats`` (B, 1, D): last layer's presence token before its norm
    - with ``return_intermediate=True`` also ``hs_all`` (L, B, Q, D), ``ref_boxes_all`` (L, B, Q, 4)
      (input boxes of each layer) and ``presence_logit_all`` (L, B, 1)

    The official seq-first tensors map as memory/pos (N, B, D) -> (B, N, D), memory_text (P, B, D) ->
    prompt (B, P, D); the official ``hs``/``reference_boxes`` outputs (L, Q, B, *) are transposed by
    ``Sam3Image._run_decoder`` to the (L, B, Q, *) returned here.

    A float32 island (``fp32_island``) but for its image cross-attention: the builders keep its
    weights in float32 whatever the model's dtype; the 1+Q query stream, the prompt attention, the
    FFNs, the norms and the box MLPs compute in float32, while the image cross-attention (the
    memory's K/V projections, the attention, where the FLOPs are: ~2.4 GFLOP a layer) runs in
    ``memory``'s dtype, its weights held in the model's dtype (``follows_model_dtype``: the values a
    per-call cast of float32 weights gives, cast once at load). ``hs``, the presence logit and
    ``presence_feats`` are returned in ``memory``'s dtype (the boxes are float32 always).
    Measured on CPU at full size (840 M, 1008 px, three images, the scoring head already an island;
    mean relative error of the query logits against the float32 official, as a multiple of the
    official's own bfloat16 autocast's): this decoder in bfloat16 2.0x (one image 3.1x), this island
    1.5x, the decoder wholly in float32 1.4x (its cross-attention in float32 too would add ~15 GFLOP
    an image in float32, by arithmetic), float32 residual streams with bfloat16 matmul inputs (the
    autocast's rule; one image) 2.3x.
    """

    fp32_island = True

    def __init__(
        self,
        d_model: int = 256,
        num_heads: int = 8,
        dim_feedforward: int = 2048,
        num_layers: int = 6,
        num_queries: int = 200,
    ):
        super().__init__()
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_queries = num_queries
        self.layers = nn.ModuleList(DecoderLayer(d_model, num_heads, dim_feedforward) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.reference_points = nn.Embedding(num_queries, 4)
        self.boxRPB_embed_x = MLP(2, d_model, num_heads, 2)
        self.boxRPB_embed_y = MLP(2, d_model, num_heads, 2)
        self.presence_token = nn.Embedding(1, d_model)
        self.presence_token_head = MLP(d_model, d_model, 1, 3)
        self.presence_token_out_norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        # False: always the materialized bias + SDPA (the exact official path, and the baseline the
        # kernel is measured against); True: the rpb_attention kernel where its backend is Triton.
        self.use_kernel = True
        # True: the boxRPB factors through sam3fast::rpb_factors (one Triton pass per axis on CUDA for
        # the float32 island); False: the same math in PyTorch (deltas, the MLPs, permute, pad).
        self.use_factors_kernel = True

    @classmethod
    def from_config(cls, cfg) -> "Decoder":
        return cls(cfg.d_model, cfg.num_heads, cfg.dim_feedforward, cfg.dec_layers, cfg.num_queries)

    def rpb_factors(self, ref_boxes: torch.Tensor, feat_size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The separable factors of the boxRPB "log" bias, each with a zero row for the presence token:
        (B, Q, 4) -> dy (B, H, 1+Q, Hf), dx (B, H, 1+Q, Wf), contiguous, in the MLP weights' dtype.
        Deltas in float32 (as the official: its coords are float32 even under autocast), the MLP in the
        weights' dtype (``sam3fast.kernels.rpb_factors``: one Triton pass per axis on CUDA for the
        float32 island, the same math in PyTorch elsewhere). Zero-padding the factors gives the
        presence token's zero row in the same single broadcast add (rpb_bias), written straight in the
        (B, H, L, N) layout attention wants."""
        Hf, Wf = feat_size
        ly, lx = self.boxRPB_embed_y.layers, self.boxRPB_embed_x.layers
        fn = rpb_factors if self.use_factors_kernel else rpb_factors_ref
        dy = fn(ref_boxes, Hf, ly[0].weight, ly[0].bias, ly[1].weight, ly[1].bias, 1)
        dx = fn(ref_boxes, Wf, lx[0].weight, lx[0].bias, lx[1].weight, lx[1].bias, 0)
        return dy, dx

    def rpb_bias(self, ref_boxes: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        """boxRPB "log" bias with a zero row for the presence token: (B, Q, 4) -> (B, H, 1+Q, Hf*Wf)."""
        Hf, Wf = feat_size
        B, Q, _ = ref_boxes.shape
        dy, dx = self.rpb_factors(ref_boxes, feat_size)
        return (dy.unsqueeze(-1) + dx.unsqueeze(-2)).view(B, self.num_heads, Q + 1, Hf * Wf)

    def use_rpb_kernel(self, memory: torch.Tensor) -> bool:
        """Whether the image cross-attention runs the rpb_attention Triton kernel for this memory:
        ``use_kernel`` and the op's backend choice for (B, N, H, Dh) tensors of memory's device and
        dtype (static facts only: the same answer under torch.compile and CUDA-graph capture)."""
        q_like = memory.unflatten(-1, (self.num_heads, -1))  # a view: only its metadata is read
        return self.use_kernel and rpb_attention_backend(q_like)[0] == "triton"

    def forward(
        self,
        memory: torch.Tensor,
        pos: torch.Tensor,
        feat_size: Tuple[int, int],
        prompt: torch.Tensor,
        prompt_mask: Optional[torch.Tensor] = None,
        return_intermediate: bool = False,
    ) -> Dict[str, torch.Tensor]:
        B = memory.shape[0]
        D, Q = self.d_model, self.num_queries
        # A float32 island (see the class doc): computes in its weights' dtype, returns hs and the
        # presence logit in memory's. Box state is float32 in every dtype (the official keeps fp32
        # parameters under bf16 autocast, so its sigmoid/inverse-sigmoid refinement chain is fp32).
        io_dtype = memory.dtype
        wdt = self.query_embed.weight.dtype
        pos, prompt = pos.to(io_dtype), prompt.to(wdt)
        ref = self.reference_points.weight.float().sigmoid().unsqueeze(0).expand(B, Q, 4)
        presence = self.presence_token.weight.unsqueeze(0).expand(B, 1, D)
        x = torch.cat((presence, self.query_embed.weight.unsqueeze(0).expand(B, Q, D)), dim=1)
        memory_key = memory + pos
        zero_pos = x.new_zeros(B, 1, D)
        use_kernel = self.use_rpb_kernel(memory)
        # the text attention's padding bias, once for the six layers (2 launches each before)
        prompt_bias = None if prompt_mask is None else key_padding_bias(prompt_mask, wdt)
        hs_all, ref_all, presence_all = [], [], []
        for layer in self.layers:
            query_pos = torch.cat((zero_pos, self.ref_point_head(gen_sineembed_for_position(ref, D).to(wdt))), dim=1)
            if use_kernel:
                rpb = self.rpb_factors(ref, feat_size)
                x = layer(x, query_pos, memory, memory_key, prompt, prompt_mask, None, rpb, prompt_bias)
            else:
                x = layer(x, query_pos, memory, memory_key, prompt, prompt_mask, self.rpb_bias(ref, feat_size),
                          prompt_bias=prompt_bias)
            hs = self.norm(x[:, 1:])
            ref_in = ref
            ref = (inverse_sigmoid(ref_in) + self.bbox_embed(hs).float()).sigmoid()  # = predict_boxes(...)[0]
            if return_intermediate:
                hs_all.append(hs)
                ref_all.append(ref_in)
                presence_all.append(self._presence_logit(x))
        out = {
            "hs": hs.to(io_dtype),
            "ref_boxes": ref_in,
            "pred_boxes": ref,
            "pred_boxes_xyxy": box_cxcywh_to_xyxy(ref),
            "presence_logit": (presence_all[-1] if return_intermediate else self._presence_logit(x)).to(io_dtype),
            "presence_feats": x[:, :1].to(io_dtype),
        }
        if return_intermediate:
            out["hs_all"] = torch.stack(hs_all).to(io_dtype)
            out["ref_boxes_all"] = torch.stack(ref_all)
            out["presence_logit_all"] = torch.stack(presence_all).to(io_dtype)
        return out

    def _presence_logit(self, x: torch.Tensor) -> torch.Tensor:
        return self.presence_token_head(self.presence_token_out_norm(x[:, 0]))  # (B, 1)


class DotProductScoring(nn.Module):
    """Official ``DotProductScoring`` (``dot_prod_scoring.*``): query logits against the mean-pooled
    prompt.

        pooled = masked_mean_P(LN(prompt + MLP(prompt)))                       (B, D)
        logits = clamp((hs_proj(hs) . prompt_proj(pooled)) / sqrt(d_proj), +-12)  (B, Q, 1)

    ``forward(hs (B, Q, D), prompt (B, P, D), prompt_mask (B, P) bool True = pad) -> (B, Q, 1)``.
    The official takes (L, B, Q, D) and seq-first prompt (P, B, D); any leading dims before (B, Q, D)
    work here too.

    A float32 island (``fp32_island``): the builders keep its weights in float32 whatever the model's
    dtype, and it computes in its weights' dtype, returning the logits in ``hs``'s. It is tiny (a
    prompt MLP over <= 64 tokens, two projections, a dot product per query) and it sets the scores
    that the threshold reads: in bfloat16 the logits' error against the float32 official was
    2.2-4.2x that of the official's own bfloat16 autocast (tiny config, CPU autocast as its stand-in,
    four images), and this island halves it (tests/test_parity_image.py).
    """

    fp32_island = True

    def __init__(self, d_model: int = 256, d_proj: int = 256, hidden_dim: int = 2048, clamp_max_val: float = 12.0):
        super().__init__()
        self.prompt_mlp = MLP(d_model, hidden_dim, d_model, 2, residual=True, out_norm=nn.LayerNorm(d_model))
        self.prompt_proj = nn.Linear(d_model, d_proj)
        self.hs_proj = nn.Linear(d_model, d_proj)
        self.scale = float(1.0 / math.sqrt(d_proj))
        self.clamp_max_val = clamp_max_val

    @classmethod
    def from_config(cls, cfg) -> "DotProductScoring":
        return cls(cfg.d_model, cfg.d_model, cfg.scoring_hidden)

    def forward(self, hs: torch.Tensor, prompt: torch.Tensor, prompt_mask: Optional[torch.Tensor]) -> torch.Tensor:
        out_dtype = hs.dtype
        hs, prompt = hs.to(self.hs_proj.weight.dtype), prompt.to(self.hs_proj.weight.dtype)
        prompt = self.prompt_mlp(prompt)
        if prompt_mask is None:
            pooled = prompt.mean(dim=1)
        else:
            valid = (~prompt_mask).to(prompt.dtype).unsqueeze(-1)  # (B, P, 1)
            pooled = (prompt * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)
        proj_prompt = self.prompt_proj(pooled)  # (B, d_proj)
        scores = torch.matmul(self.hs_proj(hs), proj_prompt.unsqueeze(-1)) * self.scale
        return scores.clamp(min=-self.clamp_max_val, max=self.clamp_max_val).to(out_dtype)
