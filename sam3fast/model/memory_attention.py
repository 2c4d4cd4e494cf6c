"""Tracker memory attention: condition the current frame's features on the memory bank.

Official pieces: ``sam3.model.decoder.TransformerEncoderCrossAttention`` (614-723) with
``TransformerDecoderLayerv2`` layers (886-956, pre-norm, self-attention first),
``sam3.sam.transformer.RoPEAttention`` (266-358), ``sam3.sam.rope`` and the memory assembly of
``Sam3TrackerBase._prepare_memory_conditioned_features`` (``sam3_tracker_base.py`` 560-795).
Keys: ``tracker.transformer.encoder.*`` load into :class:`MemoryAttention` as is.

Letters: B objects, D d_model (256), M mem_dim (64), g grid (72), L = g*g frame tokens,
N memory frames, P object pointers, T = P * D / M pointer tokens, S = N * L + T memory tokens.

    x = curr + 0.1 * curr_pos                                       (B, L, D)
    for each layer (x4):
        y = LN1(x);  x = x + SelfAttn(rope(q(y)), rope(k(y)), v(y))       1 head of width D
        y = LN2(x);  x = x + CrossAttn(rope(q(y)), rope*(k(memory + memory_pos)), v(memory))
        y = LN3(x);  x = x + W2 relu(W1 y)
    out = LN(x)                                                     (B, L, D)

RoPE is the official 2-D axial table of the g x g grid (``compute_axial_cis``, theta 1e4, head
dim D). rope* rotates memory key s < N * L by the table row of its frame-local index s mod L (the
official repeats the table N times, ``rope_k_repeat``); the trailing T pointer keys are not
rotated (``num_k_exclude_rope``). Here the repetition is a broadcast: no N-times table exists.
``memory_pos`` is added to the keys only; queries carry no position besides RoPE and the 0.1 *
curr_pos added once at the input.

The official module runs seq-first ((L, B, D) in, (L, B, D) out); everything here is batch-first:
``official(src=[curr.transpose(0, 1)], src_pos=[curr_pos.transpose(0, 1)],
prompt=memory.transpose(0, 1), prompt_pos=memory_pos.transpose(0, 1))["memory"].transpose(0, 1)``
equals ``MemoryAttention(curr, curr_pos, memory, memory_pos, T)``.

``memory_valid`` (B, S) bool masks keys (False = not attended), so a fixed-capacity memory bank
with padded frame or pointer slots gives the same result as the official run on the valid slots
alone (RoPE depends only on a key's frame-local index, so padded slots can sit anywhere). Every
row needs at least one valid key.

Value fold (``MemoryAttention.fold_value``: "auto" by default, True, False). The cross-attention's values carry no
RoPE and softmax rows sum to 1, so ``attn(Q, K, M Wv^T + bv) = attn(Q, K, M) Wv^T + bv`` for a
row with a valid key: with the fold on, it attends over the raw M-wide memory (one value tensor
for every head) and applies ``out_proj . v_proj`` as one linear, W = concat_h(Wo[:, h] Wv[h, :])
(D, H * M), b = Wo bv + bo, both derived from the parameters at each call. The attention's P.V
then runs M = 64 wide instead of D = 256 (FLOPs 5/8 in SAM 3). Exact in real arithmetic; rounding
differs (the attention output is rounded at width M, W once in the compute dtype). "auto" folds
on the op's kernel path (CUDA, bf16/fp16) where it hands the folded call to SDPA (at least
``SDPA_MIN_BATCH_HEADS_FOLD`` (object, head) pairs: ``uses_sdpa_path``), and where its Triton
kernel gets q and the keys projected already rotated (``fuse_rope_projection``; the tracker's 1-3
objects). On an H200 (2026-11-27) the folded module took 1.94 ms at 4 objects against the unfolded
one's 3.85 (cuDNN's attention alone 1.58 against 3.48 ms). At 1 object the folded module was slower
then (1.33 against 0.91 ms eagerly; the op alone 0.60 against 0.67 ms): its Triton kernel still
rotated q and the keys itself (255 registers and 152 bytes of stack in the static sm_90 build),
and the folded weight's casts and launch gaps were eager. With q and the keys rotated in their
projections (since session 18) the folded kernel builds with 102 registers and no stack against
242 unfolded, computes 5/8 of the FLOPs and skips v_proj over every memory key; inside the
tracker's graphed step the casts cost no launch gap. Untimed in that form (session 21):
``fold_value = False`` restores the unfolded kernel. Elsewhere (CPU, float32) "auto" does not fold.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.fold_projection import fold_out_proj, fold_out_proj_ref
from ..kernels.memory_attention import memory_attention, memory_attention_backend, uses_sdpa_path
from ..kernels.residual_norm import residual_norm, residual_norm_backend
from ..kernels.rope_projection import rope_projection, rope_projection_backend
from .common import KeepComplexBuffers, check_switch, linear_relu, size_constant
from .vit import apply_rope, compute_axial_cis


def _check_fold(value: Union[bool, str]) -> Union[bool, str]:
    return check_switch("fold_value", value)


def _rope_table(freqs_cis: torch.Tensor, L: int, head_dim: int, theta: float) -> torch.Tensor:
    if freqs_cis.shape[0] == L:
        return freqs_cis
    # Same fallback as the official (a square grid of side sqrt(L)); a Python-int shape check only.
    side = math.isqrt(L)
    if side * side != L:
        raise ValueError(f"RoPE needs a square token grid, got {L} query tokens")
    return compute_axial_cis(head_dim, side, side, theta).to(freqs_cis.device)


class RoPEAttention(nn.Module):
    """Official ``RoPEAttention`` (downsample_rate 1): ``q_proj`` D->D, ``k_proj``/``v_proj``
    kv_in_dim->D, ``out_proj`` D->D, batch-first.

    ``forward(q (B, L, D), k (B, S, kv_in), v (B, S, kv_in), freqs_cis (L, hd/2) complex,
    num_k_exclude_rope=0, key_valid=None (B, S) bool True = attend) -> (B, L, D)``.
    The first S - num_k_exclude_rope keys (a multiple of L) are rotated by their index mod L.
    Between the projections: the ``sam3fast::memory_attention`` Triton kernel (RoPE inside, no
    repeated table) where ``memory_attention_backend`` picks it (CUDA), else SDPA on rotated q/k.

    ``fold_value`` (False, True or "auto"): for a cross-attention (kv_in_dim != embedding_dim)
    attend over the kv_in-wide ``v`` itself and fold ``v_proj`` into ``out_proj`` (module docstring of
    ``sam3fast.model.memory_attention``), always (True) or where the op then runs SDPA ("auto",
    :meth:`folds_for`); ignored for a self-attention.

    ``fuse_rope_projection`` (class attribute, settable per instance: "auto", True, False): on the
    kernel path, q_proj and k_proj run as ``sam3fast::rope_projection``, which rotates the rows in
    its epilogue, and the op is told to rotate nothing (no RoPE prepass reading and rewriting q and
    the keys); "auto" in bfloat16 / float16 (:meth:`fuses_rope_projection`). Not yet timed on a GPU:
    False restores the projections + the op's own rotation.
    """

    fuse_rope_projection: Union[bool, str] = "auto"
    # the folded out-projection's weights by sam3fast::fold_out_proj on CUDA (one launch); False:
    # the PyTorch casts and products (the path before session 23)
    fold_kernel: bool = True

    def __init__(self, embedding_dim: int, num_heads: int = 1, kv_in_dim: Optional[int] = None,
                 fold_value: Union[bool, str] = False):
        super().__init__()
        kv_in_dim = embedding_dim if kv_in_dim is None else kv_in_dim
        if embedding_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide {embedding_dim}")
        self.num_heads = num_heads
        self.embedding_dim = embedding_dim
        self.kv_in_dim = kv_in_dim
        self.q_proj = nn.Linear(embedding_dim, embedding_dim)
        self.k_proj = nn.Linear(kv_in_dim, embedding_dim)
        self.v_proj = nn.Linear(kv_in_dim, embedding_dim)
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)
        self.use_kernel = True  # False: always SDPA (the baseline the kernel is measured against)
        self.fold_value = fold_value

    @property
    def fold_value(self) -> Union[bool, str]:
        """False, True or "auto" (see the class docstring)."""
        return self._fold_value

    @fold_value.setter
    def fold_value(self, value: Union[bool, str]) -> None:
        self._fold_value = _check_fold(value)

    @property
    def folds_value(self) -> bool:
        """Whether forward folds v_proj into out_proj whatever the input: ``fold_value`` True on a
        cross-attention ("auto" decides per call: :meth:`folds_for`)."""
        return self.fold_value is True and self.kv_in_dim != self.embedding_dim

    def folds_for(self, q: torch.Tensor) -> bool:
        """Whether forward folds for the projected queries ``q`` (B, L, H, Dh): True always on a
        cross-attention; "auto" on the kernel op's path where it takes these queries with kv_in-wide
        values to SDPA, or to its Triton kernel with q and the keys projected already rotated
        (``fuse_rope_projection``; static: device, dtype, B * H)."""
        if self.kv_in_dim == self.embedding_dim or self.fold_value is False:
            return False
        if self.fold_value is True:
            return True
        if not (self.use_kernel and memory_attention_backend(q, self.kv_in_dim)[0] == "triton"):
            return False
        # (the keys' dtype is not known here: the tracker's memory has the weights' dtype)
        return uses_sdpa_path(q, self.kv_in_dim) or self._fuses_rope_projection(q.flatten(-2), None, True)

    def fuses_rope_projection(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        """Whether forward projects q (B, L, D) and k (B, S, kv_in) with ``sam3fast::rope_projection``
        (RoPE in the projections' epilogue) before the kernel op: on the op's kernel path (its
        backend for these queries, and the projection's), without autocast (the op takes one dtype
        for x and the weights), where ``fuse_rope_projection`` is True, or "auto" and the dtype is
        bfloat16 / float16."""
        qh = q.unflatten(-1, (self.num_heads, -1))  # (a view: the projected q's shape, dtype, device)
        return self._fuses_rope_projection(q, k, self.folds_for(qh))

    def _fuses_rope_projection(self, q: torch.Tensor, k: Optional[torch.Tensor], fold: bool) -> bool:
        mode = check_switch("fuse_rope_projection", self.fuse_rope_projection)
        if mode is False or not self.use_kernel or torch.is_autocast_enabled(q.device.type):
            return False
        if q.dtype != self.q_proj.weight.dtype or (k is not None and k.dtype != self.k_proj.weight.dtype):
            return False
        qh = q.unflatten(-1, (self.num_heads, -1))
        if (memory_attention_backend(qh, self.kv_in_dim if fold else None)[0] != "triton"
                or rope_projection_backend(q)[0] != "triton"):
            return False
        return mode is True or q.dtype in (torch.bfloat16, torch.float16)

    def folded_out_proj(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(W (D, H * kv_in), b (D,))`` in ``dtype``: out_proj(concat_h(o_h Wv_h^T + bv_h)) =
        concat_h(o_h) W^T + b for per-head kv_in-wide o_h. Computed from the current parameters in
        float32 (float64 for float64) each call: a D x D x kv_in product, nothing cached to go stale.
        On CUDA one launch (``sam3fast::fold_out_proj``, for ~10 casts and products a layer; the
        class attribute ``fold_kernel = False`` keeps the PyTorch form)."""
        args = (self.out_proj.weight, self.out_proj.bias, self.v_proj.weight, self.v_proj.bias, self.num_heads, dtype)
        return fold_out_proj(*args) if self.fold_kernel else fold_out_proj_ref(*args)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        freqs_cis: torch.Tensor,
        num_k_exclude_rope: int = 0,
        key_valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, L, _ = q.shape
        S = k.shape[1]
        H = self.num_heads
        n_rope = S - num_k_exclude_rope
        if n_rope % L:
            raise ValueError(f"{n_rope} rotated keys are not a whole number of {L}-token frames")
        # (the projected q has the input's (B, L, H, Dh) shape, dtype and device: decided on a view)
        fold = self.folds_for(q.unflatten(-1, (H, -1)))
        fused = self._fuses_rope_projection(q, k, fold)
        if fused:  # the projections write rotated rows (sam3fast::rope_projection): the op rotates nothing
            q = rope_projection(q, self.q_proj.weight, self.q_proj.bias, freqs_cis, L, H)
            k = rope_projection(k, self.k_proj.weight, self.k_proj.bias, freqs_cis, n_rope, H)
        else:
            q = self.q_proj(q).view(B, L, H, -1)
            k = self.k_proj(k).view(B, S, H, -1)
        # Folded: every head attends over the same kv_in-wide values (stride 0 over the heads).
        v = v.unsqueeze(2).expand(B, S, H, v.shape[-1]) if fold else self.v_proj(v).view(B, S, H, -1)
        if fused or (self.use_kernel and memory_attention_backend(q, v.shape[-1])[0] == "triton"):
            out = memory_attention(q, k, v, freqs_cis, key_valid, rope_q=not fused,
                                   n_rope_keys=0 if fused else n_rope)
            return self._project_out(out.reshape(B, L, -1), fold, key_valid)
        q = apply_rope(q, freqs_cis)
        if n_rope == S and n_rope == L:
            k = apply_rope(k, freqs_cis)
        elif n_rope > 0:
            # (B, N, L, H, hd) -> (B, L, N, H, hd): the table broadcasts over the N frames.
            kr = k[:, :n_rope].view(B, n_rope // L, L, H, -1).transpose(1, 2)
            kr = apply_rope(kr, freqs_cis).transpose(1, 2).reshape(B, n_rope, H, -1)
            k = torch.cat((kr, k[:, n_rope:]), dim=1) if n_rope < S else kr
        attn_mask = None if key_valid is None else key_valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_mask)
        return self._project_out(out.transpose(1, 2).reshape(B, L, -1), fold, key_valid)

    def _project_out(self, out: torch.Tensor, fold: bool, key_valid: Optional[torch.Tensor]) -> torch.Tensor:
        if not fold:
            return self.out_proj(out)
        w, b = self.folded_out_proj(out.dtype)
        y = F.linear(out, w, b)
        if key_valid is None:
            return y
        # A row with no valid key: the attention gives zeros, the unfolded path out_proj(0) = bo
        # (not the folded bias Wo bv + bo, which assumes softmax weights summing to 1).
        return torch.where(key_valid.any(dim=1)[:, None, None], y, self.out_proj.bias.to(y.dtype))


class MemoryAttentionLayer(nn.Module):
    """Official ``TransformerDecoderLayerv2`` as SAM 3 builds it (pre-norm, self-attention first,
    no position on queries, ``memory_pos`` on keys, ReLU FFN). Takes the keys' input
    ``memory + memory_pos`` precomputed once for all layers."""

    def __init__(self, d_model: int, mem_dim: int, dim_feedforward: int, num_heads: int = 1,
                 fold_value: Union[bool, str] = "auto"):
        super().__init__()
        self.self_attn = RoPEAttention(d_model, num_heads)
        self.cross_attn_image = RoPEAttention(d_model, num_heads, kv_in_dim=mem_dim, fold_value=fold_value)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        x: torch.Tensor,
        memory_k: torch.Tensor,
        memory: torch.Tensor,
        freqs_cis: torch.Tensor,
        num_k_exclude_rope: int,
        key_valid: Optional[torch.Tensor],
        batch: Optional[int] = None,
    ) -> torch.Tensor:
        """``batch``: x is one row standing for ``batch`` equal rows (the first layer, before any
        memory: every object starts from the same frame features), so the self-attention runs once
        and its result is broadcast to the objects for the cross-attention."""
        y = self.norm1(x)
        x = x + self.self_attn(y, y, y, freqs_cis)
        if batch is not None:
            x = x.expand(batch, -1, -1)
        y = self.norm2(x)
        x = x + self.cross_attn_image(y, memory_k, memory, freqs_cis, num_k_exclude_rope, key_valid)
        y = self.norm3(x)
        return x + self.linear2(linear_relu(y, self.linear1))


class MemoryAttention(KeepComplexBuffers, nn.Module):
    """Official ``TransformerEncoderCrossAttention`` (``tracker.transformer.encoder``).

    ``forward(curr (B, L, D), curr_pos (B, L, D), memory (B, S, M), memory_pos (B, S, M),
    num_obj_ptr_tokens: int, memory_valid: Optional[(B, S) bool] = None) -> (B, L, D)``

    - ``curr``: the frame's top-level tracker features, row-major g x g tokens (official
      ``current_vision_feats[-1]`` transposed to batch-first); ``curr_pos`` its sine position.
    - ``memory``/``memory_pos``: N frames of L tokens each, then ``num_obj_ptr_tokens`` pointer
      tokens, as built by :func:`assemble_memory` (or a fixed-capacity bank in that layout).
    - ``memory_valid``: False keys are ignored; None = all valid.

    The output is the final LayerNorm'd features; the tracker reshapes it to (B, D, g, g) as
    ``out.transpose(1, 2).view(B, D, g, g)`` (``pix_feat_with_mem``).

    ``fold_value`` (constructor argument and settable property: "auto" by default, True, False):
    whether every layer's cross-attention folds v_proj into out_proj (see the module docstring); the
    state dict is the same either way.

    ``fuse_residual_norm`` (class attribute, settable per instance: "auto" by default, True, False):
    on CUDA without autocast each
    residual add and the LayerNorm after it (the next sublayer's pre-norm, the next layer's norm1,
    the final norm) are one ``sam3fast::residual_norm`` pass (:meth:`fuses_residual_norm`): 12
    LayerNorm launches and 12 adds become 12 launches for the 4 layers. In the 16-object tracker
    profile of the H200 (2026-11-27) the memory attention's LayerNorms took 1.17 ms a frame
    (~100 us a launch for 42 MB in and out). The sums are PyTorch's bit for bit, the norms within
    float32 rounding. Not yet timed on a GPU: False restores the separate adds and norms.
    """

    fuse_residual_norm: Union[bool, str] = "auto"

    def __init__(self, d_model: int = 256, mem_dim: int = 64, num_layers: int = 4, dim_feedforward: int = 2048,
                 grid: int = 72, num_heads: int = 1, rope_theta: float = 10000.0,
                 fold_value: Union[bool, str] = "auto"):
        super().__init__()
        self.d_model = d_model
        self.head_dim = d_model // num_heads
        self.rope_theta = rope_theta
        self.grid = grid
        self.layers = nn.ModuleList(
            MemoryAttentionLayer(d_model, mem_dim, dim_feedforward, num_heads, fold_value) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        # Not in the checkpoint (the official recomputes it at build); one table shared by every
        # self- and cross-attention, since all of them rotate head_dim-wide heads on the same grid.
        self.register_buffer("freqs_cis", compute_axial_cis(self.head_dim, grid, grid, rope_theta), persistent=False)

    @property
    def fold_value(self) -> Union[bool, str]:
        """The layers' cross-attention setting (True, False or "auto") where they all share one,
        else False; set it to switch all."""
        values = {layer.cross_attn_image.fold_value for layer in self.layers}
        return values.pop() if len(values) == 1 else False

    @fold_value.setter
    def fold_value(self, value: Union[bool, str]) -> None:
        value = _check_fold(value)
        for layer in self.layers:
            layer.cross_attn_image.fold_value = value

    @classmethod
    def from_config(cls, cfg) -> "MemoryAttention":
        t = cfg.tracker
        return cls(d_model=cfg.d_model, mem_dim=t.mem_dim, num_layers=t.mem_attn_layers,
                   dim_feedforward=t.mem_attn_ffn, grid=cfg.feat_size)

    def reset_derived_buffers(self, device) -> None:
        """Re-derive the RoPE table after a meta-device build (it is not in the checkpoint)."""
        self.freqs_cis = compute_axial_cis(self.head_dim, self.grid, self.grid, self.rope_theta).to(device)

    def forward(
        self,
        curr: torch.Tensor,
        curr_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        num_obj_ptr_tokens: int,
        memory_valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, L = curr.shape[:2]
        freqs_cis = _rope_table(self.freqs_cis, L, self.head_dim, self.rope_theta)
        # The tracker passes one frame's features expanded over the objects (batch stride 0): then
        # every row is the same until the first cross-attention, and the first layer's
        # self-attention runs on one row (exact: the rows would be computed alike; a static
        # stride check, so a compiled graph holds one branch).
        shared = B > 1 and curr.stride(0) == 0 and (curr_pos.shape[0] == 1 or curr_pos.stride(0) == 0)
        if shared:
            curr, curr_pos = curr[:1], curr_pos[:1]
        x = curr + 0.1 * curr_pos
        memory_k = memory + memory_pos
        if self.fuses_residual_norm(x):
            return self._forward_fused(x, memory_k, memory, freqs_cis, num_obj_ptr_tokens, memory_valid,
                                       B if shared else None)
        for i, layer in enumerate(self.layers):
            x = layer(x, memory_k, memory, freqs_cis, num_obj_ptr_tokens, memory_valid,
                      batch=B if shared and i == 0 else None)
        return self.norm(x)

    def fuses_residual_norm(self, x: torch.Tensor) -> bool:
        """Whether forward runs each residual add and the LayerNorm after it as one
        ``sam3fast::residual_norm`` (``fuse_residual_norm``: True / "auto" on its kernel path, i.e.
        CUDA, without autocast; False never)."""
        mode = check_switch("fuse_residual_norm", self.fuse_residual_norm)
        return (mode is not False and residual_norm_backend(x)[0] == "triton"
                and not torch.is_autocast_enabled(x.device.type))

    def _forward_fused(self, x, memory_k, memory, freqs_cis, num_obj_ptr_tokens, memory_valid, batch):
        """The layers with every residual add fused to the norm that follows it: the next sublayer's
        pre-norm, or the next layer's norm1, or the final norm (the same operations as
        :class:`MemoryAttentionLayer`, values within float32 rounding of the norms). ``batch``: x is
        one row standing for that many (the first layer's self-attention runs once)."""

        def add_norm(x, r, norm):
            B, L, D = x.shape
            s, n = residual_norm(x.view(B, 1, L, D), r.view(B, 1, L, D), norm.weight, norm.bias, norm.eps)
            return s.view(B, L, D), n.view(B, L, D)

        y = self.layers[0].norm1(x)
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].norm1 if i + 1 < len(self.layers) else self.norm
            x, y = add_norm(x, layer.self_attn(y, y, y, freqs_cis), layer.norm2)
            c = layer.cross_attn_image(y.expand(batch, -1, -1) if i == 0 and batch else y, memory_k, memory,
                                       freqs_cis, num_obj_ptr_tokens, memory_valid)
            if i == 0 and batch:  # x is one row: the broadcast add, then the norm (the unfused pair)
                x = x + c
                y = layer.norm3(x)
            else:
                x, y = add_norm(x, c, layer.norm3)
            x, y = add_norm(x, layer.linear2(linear_relu(y, layer.linear1)), nxt)
        return y


# ----------------------------------------------------------------------------------------------
# Memory assembly (the tensor half of _prepare_memory_conditioned_features)


# (dim // 2, temperature, device) -> get_1d_sine_pe's frequency divisors (float32): they depend on
# the size alone, so every call after the first (each tracker step) skips their 5 operations
_SINE_DIVISORS: Dict[Tuple[int, float, torch.device], torch.Tensor] = {}


def _sine_divisors(pe_dim: int, temperature: float, device: torch.device) -> torch.Tensor:
    def make():
        return temperature ** (2 * (torch.arange(pe_dim, dtype=torch.float32, device=device) // 2) / pe_dim)

    return size_constant(_SINE_DIVISORS, (pe_dim, float(temperature), device), make)


def get_1d_sine_pe(pos: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Official ``get_1d_sine_pe``: (...,) positions -> (..., dim) as [sin | cos] halves."""
    pe = pos.unsqueeze(-1) / _sine_divisors(dim // 2, temperature, pos.device)
    return torch.cat([pe.sin(), pe.cos()], dim=-1)


IntSeq = Union[torch.Tensor, Sequence[int]]


def assemble_memory(
    maskmem_features: torch.Tensor,
    maskmem_pos: torch.Tensor,
    mem_tpos: IntSeq,
    obj_ptrs: Optional[torch.Tensor],
    ptr_tpos: Optional[IntSeq],
    maskmem_tpos_enc: torch.Tensor,
    obj_ptr_tpos_proj: nn.Module,
    max_obj_ptrs_in_encoder: int,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Build the memory-attention keys/values exactly as ``_prepare_memory_conditioned_features``
    does for already selected frames. Returns ``(memory (B, S, M), memory_pos (B, S, M),
    num_obj_ptr_tokens)`` for :class:`MemoryAttention`.

    Official variable -> argument (each list in the official's order):

    - ``maskmem_features`` (B, N, M, g, g): ``prev["maskmem_features"]`` of each non-None ``prev``
      in ``t_pos_and_prevs`` (selected cond frames first, then t_pos = 1 .. num_maskmem-1, i.e.
      oldest non-cond frame first), stacked on dim 1.
    - ``maskmem_pos`` (B|1, N|1, M, g, g): ``prev["maskmem_pos_enc"][-1]`` of the same frames (the
      same sine table for every frame; broadcast dims allowed).
    - ``mem_tpos`` (N,) ints: ``t`` of each frame: 0 for a selected cond frame, else its ``t_pos``.
      Frame n's pos gets ``maskmem_tpos_enc[num_maskmem - 1 - t]``.
    - ``obj_ptrs`` (B, P, D): ``out["obj_ptr"]`` of each entry of ``pos_and_ptrs`` (cond frames with
      t <= frame_idx first, then non-cond frames t_diff = 1, 2, ...), stacked on dim 1; None or
      P = 0 for no pointer.
    - ``ptr_tpos`` (P,) ints: ``pos_list``: ``(frame_idx - t) * tpos_sign_mul`` for cond pointers,
      ``t_diff`` for the others.
    - ``maskmem_tpos_enc`` (num_maskmem, 1, 1, M): ``tracker.maskmem_tpos_enc``.
    - ``obj_ptr_tpos_proj``: ``tracker.obj_ptr_tpos_proj`` (Linear D -> M).
    - ``max_obj_ptrs_in_encoder``: ``min(num_frames, tracker.max_obj_ptrs_in_encoder)``: pointer
      distances are divided by it minus 1 before the sine embedding.

    Each pointer (D) becomes D / M consecutive tokens of M channels, all with that pointer's
    temporal pos ``obj_ptr_tpos_proj(get_1d_sine_pe(dist / (max - 1), D))``. Tensor-only: with
    tensor ``mem_tpos``/``ptr_tpos`` nothing syncs with the host. Mixed dtypes follow
    ``torch.cat`` promotion, as in the official (its bank is bf16, its pointers float32).
    """
    B, N, M = maskmem_features.shape[:3]
    L = maskmem_features.shape[-2] * maskmem_features.shape[-1]
    device = maskmem_features.device
    num_maskmem = maskmem_tpos_enc.shape[0]

    mem = maskmem_features.flatten(3).transpose(2, 3).reshape(B, N * L, M)
    mem_tpos = torch.as_tensor(mem_tpos, device=device)
    tpos = maskmem_tpos_enc.reshape(num_maskmem, M)[num_maskmem - 1 - mem_tpos]  # (N, M)
    pos = maskmem_pos.flatten(3).transpose(2, 3) + tpos[None, :, None, :]
    pos = pos.expand(B, N, L, M).reshape(B, N * L, M)

    if obj_ptrs is None or obj_ptrs.shape[1] == 0:
        return mem, pos, 0
    P, D = obj_ptrs.shape[1:]
    split = D // M if M < D else 1
    ptr_tpos = torch.as_tensor(ptr_tpos, device=device)
    # The official divides an int64 tensor by an int: true division in the default float dtype.
    rel = ptr_tpos / (max_obj_ptrs_in_encoder - 1)
    # (the sine table is float32; in a bf16 model the projection runs in bf16, as under the
    # official's autocast)
    ptr_pos = obj_ptr_tpos_proj(get_1d_sine_pe(rel, dim=D).to(obj_ptr_tpos_proj.weight.dtype))  # (P, M)
    ptr_pos = ptr_pos.repeat_interleave(split, dim=0)[None].expand(B, -1, -1)
    ptr_tok = obj_ptrs.reshape(B, P * split, D // split)
    memory = torch.cat((mem, ptr_tok), dim=1)
    memory_pos = torch.cat((pos, ptr_pos), dim=1)
    return memory, memory_pos, P * split
