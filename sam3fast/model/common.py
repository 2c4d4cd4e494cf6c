"""Building blocks shared by the SAM 3 modules, with the official parameter names.

Letters used across sam3fast: B batch, L query length, S key length, D model width, H heads.
Every sequence tensor is batch-first (B, L, D) inside sam3fast; the official code mixes
seq-first and batch-first, which only matters for how callers lay out their inputs.
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.group_norm import GROUP_NORM_FAST_MIN_NUMEL, group_norm, group_norm_backend, group_norm_fast  # noqa: F401
from ..kernels.layer_norm2d import layer_norm2d, layer_norm2d_backend, layer_norm2d_channels_first  # noqa: F401


def check_switch(name: str, value: Union[bool, str]) -> Union[bool, str]:
    """``value`` if it is True, False or "auto" (the engine's three-way switches: "auto" decides by
    device and dtype), else a ValueError naming the switch."""
    if isinstance(value, bool) or (isinstance(value, str) and value == "auto"):
        return value
    raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")


def size_constant(cache: Dict[Hashable, torch.Tensor], key: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()`` (a tensor that depends on sizes and the device alone, no weight) kept in
    ``cache[key]`` after the first eager call. While torch.compile traces, the cache is neither read
    nor filled: the graph computes the value (a constant to inductor), and no guard on the cache's
    keys makes the region recompile once an earlier call filled it."""
    if torch.compiler.is_compiling():
        return make()
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
    return value


def _records_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd would record an operation on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def addmm_epilogue_serves(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether :func:`addmm_activation` can take ``x (..., K) W^T + b``: a bias, one dtype for x, W
    and b, a non-empty x, no autocast (whose operations mix dtypes) and autograd not recording
    (``torch._addmm_activation`` has no derivative). Where it cannot, callers run the two steps."""
    return (bias is not None and x.dtype == weight.dtype == bias.dtype and x.numel() > 0
            and not torch.is_autocast_enabled(x.device.type) and not _records_grad(x, weight, bias))


def addmm_activation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool) -> torch.Tensor:
    """``act(x W^T + b)`` over x's last dim as one ``torch._addmm_activation``: on CUDA one cuBLASLt
    GEMM with its ReLU (``gelu`` False) or GELU (True: cuBLASLt's is the tanh form) + bias epilogue;
    the CPU kernel applies ReLU or the exact GELU after addmm. (..., N) contiguous. Callers check
    :func:`addmm_epilogue_serves` first."""
    lead = x.shape[:-1]
    y = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=gelu)
    return y.view(*lead, weight.shape[0])


# False: linear_relu runs the linear and then the ReLU everywhere (the plain path back, for a run).
LINEAR_RELU_EPILOGUE = True


def linear_relu(x: torch.Tensor, linear: nn.Linear, epilogue: Optional[bool] = None) -> torch.Tensor:
    """``F.relu(linear(x))`` over x's last dim; on CUDA (``epilogue`` None) as one cuBLASLt GEMM with
    its ReLU + bias epilogue (:func:`addmm_activation`), so the (tokens, hidden) activation is
    written once instead of written, read and written again by a separate ReLU (the tracker's memory
    attention FFN: 5184 x 2048 per object and layer, 42 MB of bf16 traffic each; the fusion
    encoder's FFN the same per image; the hidden layers of every :class:`MLP`, e.g. the query
    decoder's boxRPB MLPs where ``sam3fast::rpb_factors`` does not serve them, whose float32
    (200, 72, 256) activation is 15 MB per layer and axis).
    Same values: ReLU commutes with the rounding to the output dtype (rounding is monotone and
    keeps signs and zero), so applying it to the float32 accumulator before the one rounding gives
    what rounding and then ReLU give; only cuBLASLt's choice of kernel, hence the accumulation
    order, may differ. ``epilogue`` True / False forces the fused op (on any
    device: its CPU kernel is addmm then ReLU) / the two steps. Where the fused op cannot serve
    (:func:`addmm_epilogue_serves`: autocast, mixed dtypes of x, weight and bias, no bias, an empty
    input, autograd recording) the two steps run."""
    use = (x.is_cuda and LINEAR_RELU_EPILOGUE) if epilogue is None else epilogue
    if use and addmm_epilogue_serves(x, linear.weight, linear.bias):
        return addmm_activation(x, linear.weight, linear.bias, gelu=False)
    return F.relu(linear(x))


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
            # hidden layers: the linear and its ReLU as one GEMM on CUDA (linear_relu; the same values)
            y = linear_relu(y, layer) if i < self.num_layers - 1 else layer(y)
        if self.residual:
            y = y + x
        return self.out_norm(y)


def key_padding_bias(key_padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) bool, True = ignore that key -> the additive (B, 1, 1, S) attention bias in ``dtype``
    (0 or -inf) that :class:`MultiheadAttention` builds from ``key_padding_mask``; a caller that
    attends to the same keys in several layers builds it once and passes it as ``attn_bias``."""
    B, S = key_padding_mask.shape
    return torch.zeros(B, 1, 1, S, dtype=dtype, device=key_padding_mask.device).masked_fill(
        key_padding_mask.view(B, 1, 1, S), float("-inf"))


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter names
    (``in_proj_weight`` (3D, D) packed q|k|v, ``in_proj_bias``, ``out_proj``) so official keys load
    as is; computed with ``F.scaled_dot_product_attention`` on batch-first tensors.

    ``key_padding_mask``: (B, S) bool, True = ignore that key. ``attn_bias``: additive float bias
    broadcastable to (B, H, L, S). ``dtype``: compute in that dtype (inputs, weights and bias cast
    to it, the output in it) instead of the weights' (a float32 island's low-precision part).
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
        dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        B, L, D = query.shape
        S = key.shape[1]
        H = self.num_heads
        (w_q, w_k, w_v), (b_q, b_k, b_v), w_o, b_o = self.weights(dtype)
        q = F.linear(query.to(w_q.dtype), w_q, b_q).view(B, L, H, D // H).transpose(1, 2)
        k = F.linear(key.to(w_q.dtype), w_k, b_k).view(B, S, H, D // H).transpose(1, 2)
        v = F.linear(value.to(w_q.dtype), w_v, b_v).view(B, S, H, D // H).transpose(1, 2)
        mask = None if attn_bias is None else attn_bias.to(q.dtype)
        if key_padding_mask is not None:
            pad = key_padding_bias(key_padding_mask, q.dtype)
            mask = pad if mask is None else mask + pad
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.linear(out.transpose(1, 2).reshape(B, L, D), w_o, b_o)

    def weights(self, dtype: Optional[torch.dtype] = None):
        """((w_q, w_k, w_v), (b_q, b_k, b_v), w_out, b_out), cast to ``dtype`` if given (views of the
        parameters when no cast is needed)."""
        w, b = self.in_proj_weight, self.in_proj_bias
        w_o, b_o = self.out_proj.weight, self.out_proj.bias
        if dtype is not None:
            w, b, w_o, b_o = (t.to(dtype) for t in (w, b, w_o, b_o))
        return w.chunk(3), b.chunk(3), w_o, b_o


def layer_norm2d_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over dim 1 of (B, C, H, W) as ``F.layer_norm`` on the channels-last view: one fused
    kernel, one CUDA block per (b, h, w) row of C elements. Returns a channels-last-strided tensor."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), weight.shape, weight, bias, eps)
    return y.permute(0, 3, 1, 2)


class LayerNorm2d(nn.Module):
    """Official ``LayerNorm2d``: normalise over channels of (B, C, H, W), eps 1e-6.

    Two computations of the same math (float32 statistics, float32 rounding differences only), chosen
    by C alone (static, so compiled graphs hold one of them):

    - C >= ``SMALL_C``: ``F.layer_norm`` on the channels-last view (one fused kernel); the output is
      channels-last strided.
    - C < ``SMALL_C``: ``layer_norm2d_channels_first`` (reductions over dim 1, elementwise ops);
      the output is contiguous NCHW. PyTorch's CUDA layer norm launches one block per normalised row,
      so with few channels it runs millions of blocks of 4-64 elements each. Measured on an H100
      (bf16, the tracker's memory-encoder mask downsampler: C = 4, 16, 64 on 576, 288, 144 px maps per
      object, and the SAM decoder's C = 64 upscaling): layer norm took 10.8 ms per frame at 16
      objects against 1.6 ms at 1 object. Only the memory downsampler's last LayerNorm2d (C = 256 at
      72 x 72) keeps the fused kernel; every other one in SAM 3 has C <= 64.

    On CUDA (``use_kernel``, the default; not under autocast) the small-C path is one Triton pass,
    ``sam3fast::layer_norm2d``, which :meth:`forward_gelu` also gives the GELU that follows the norm
    in the memory encoder's mask downsampler and the SAM decoder's upscaling (``F.gelu`` of the
    rounded norm, one read and one write of the map instead of three of each). On an H200
    (2026-11-27) the eager small-C path took 0.51-0.56 ms at 16 objects for each of C = 4, 16, 64,
    where torch.compile's fusion took 0.06-0.07 ms; the kernel is not timed yet.
    """

    SMALL_C = 128  # below: channels-first statistics (bench/bench_norms.py compares both paths)

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps
        self.use_kernel = True

    def _kernel(self, x: torch.Tensor) -> bool:
        return (self.use_kernel and x.shape[1] < self.SMALL_C and layer_norm2d_backend(x)[0] == "triton"
                and not torch.is_autocast_enabled(x.device.type))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel(x):
            return layer_norm2d(x, self.weight, self.bias, self.eps)
        if x.shape[1] < self.SMALL_C:
            return layer_norm2d_channels_first(x, self.weight, self.bias, self.eps)
        return layer_norm2d_channels_last(x, self.weight, self.bias, self.eps)

    def forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """``F.gelu(self(x))`` (the exact GELU), in the same pass on the kernel path."""
        if self._kernel(x):
            return layer_norm2d(x, self.weight, self.bias, self.eps, gelu=True)
        return F.gelu(self(x))


def norm_then_act(norm: nn.Module, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(norm(x))``: one pass where ``norm`` is a :class:`LayerNorm2d` and ``act`` the exact
    ``nn.GELU`` (:meth:`LayerNorm2d.forward_gelu`)."""
    if isinstance(norm, LayerNorm2d) and type(act) is nn.GELU and act.approximate == "none":
        return norm.forward_gelu(x)
    return act(norm(x))


class FastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same arguments, parameters and state-dict keys). On CUDA (``use_kernel``,
    affine, 4-D input, outside autocast) computed by ``sam3fast::group_norm`` (split statistics and
    one apply pass, Triton), which :meth:`forward_relu` also gives the ReLU that follows the norm in
    the pixel decoder; elsewhere by ``group_norm_fast`` (then ``F.relu``). Same values up to float32
    rounding."""

    use_kernel = True

    def _kernel_serves(self, x: torch.Tensor) -> bool:
        return (self.use_kernel and self.affine and x.dim() == 4 and not torch.is_autocast_enabled(x.device.type)
                and group_norm_backend(x, self.num_groups)[0] == "triton")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_serves(x):
            return group_norm(x, self.weight, self.bias, self.num_groups, self.eps)
        return group_norm_fast(x, self.num_groups, self.weight, self.bias, self.eps)

    def forward_relu(self, x: torch.Tensor) -> torch.Tensor:
        """``F.relu(self(x))``, in the same pass on the kernel path."""
        if self._kernel_serves(x):
            return group_norm(x, self.weight, self.bias, self.num_groups, self.eps, relu=True)
        return F.relu(self(x))
