"""ViT trunk of SAM 3: the official ``sam3.model.vitdet.ViT`` with the settings SAM 3 builds it with.

Letters: B batch, S image side, P patch size, g = S // P token grid side, C embed width, nH heads,
hd = C // nH head width, w window side, T = pretrain_img_size // P side of the abs-pos table.

    images (B, 3, S, S)
      -> patch embed: Conv2d(3, C, P, stride P, no bias)                    -> (B, g, g, C)
      -> + abs pos: table (1, 1 + T*T, C), cls entry dropped, (T, T) tiled to (g, g)
      -> ln_pre
      -> blocks 0 .. last global block:  x += attn(norm1(x));  x += fc2(gelu(fc1(norm2(x))))
         window blocks: norm1(x) zero-padded to a multiple of w and split into (B * n_win, w*w, C)
         global blocks (``global_att_blocks``): all g*g tokens attend to each other
      -> (B, C, g, g): a permuted view of a contiguous (B, g, g, C) tensor (channels-last memory)

Attention: qkv Linear -> 2D axial RoPE on q and k (in float32) -> SDPA (scale hd^-0.5) -> proj.
On CUDA (``Attention.use_kernel``, the default) the RoPE of q and k is the ``sam3fast::rope`` Triton
kernel, one pass over ``qkv[:, :, :2]``, bit-identical to ``apply_rope``; elsewhere, or with
``use_kernel = False``, ``apply_rope``'s eager float32 chain.
Residual adds and norms: on CUDA (``ViT.fuse_residual_norm``, the default) each residual add, the
LayerNorm after it and the window permutation between them are one ``sam3fast::residual_norm``
Triton pass (two a block instead of norm, partition, unpartition, add, norm and add); the residual
stream keeps its bits, the norms are within float32 rounding of ``F.layer_norm``. Elsewhere, with
``fuse_residual_norm = False``, on a grid the windows do not divide (padding), or under autocast
(mixed dtypes), the blocks run one by one as the official.
Float32 residual stream (``ViT.fp32_residual``, off by default until an H100 times it): in a bf16
(fp16) model the stream (after the patch embedding, ln_pre and every residual add) stays float32 and
the norms compute in float32 with float32 parameters (the LayerNorms and the pos table are float32
islands), rounding their outputs to the blocks' dtype, as the official bf16 autocast does (its
parameters and residual adds are float32; only matmul inputs are bf16). The attention and the MLP
run in the weights' dtype; the trunk returns its dtype. The fused chain takes the float32 stream
with bf16 branches. On CPU this is the official autocast's trunk computation: bit-identical at the
tiny config, the same feature error at full size (0.0054 against the float32 official, three 1008
px images, against 0.0108 with the bf16 stream). Cost: the stream's bytes double (by arithmetic
~1.4 GB more traffic an image in the fused chain, ~0.4 ms on an H100; unmeasured).
Triton GEMM epilogues (off: slower than cuBLAS + the separate kernel on the H200, 2026-11-27):
``ViT.fused_rope`` runs each attention's qkv projection and the RoPE of q, k as one Triton GEMM
(``sam3fast::linear_rope``), ``ViT.fused_gelu`` each MLP's fc1 and GELU (``sam3fast::linear_gelu``).
``ViT.tanh_gelu_epilogue`` ("auto": on CUDA in bf16 / fp16; an approximation under bf16 rounding,
see :class:`Mlp`) runs fc1 with cuBLASLt's tanh-GELU epilogue.
RoPE: ``freqs_cis`` (N, hd/2) complex64 buffers (in the checkpoint), N = w*w (window blocks) or g*g
(global blocks), row n = token n of the attended grid in row-major order. The channel pair
(x[2j], x[2j+1]) of token n is rotated by angle(freqs_cis[n, j]); for j < hd/4 the angle is
col * scale * theta^(-4j/hd), for j >= hd/4 it is row * scale * theta^(-4(j - hd/4)/hd), theta 1e4.
scale = 1 in window blocks and w / g in global blocks (the official "interp" rope: a global grid is
squeezed into the position range of the window RoPE was trained on).

Blocks after the last global block are built (their weights are in the checkpoint) but not run:
the official trunk runs them and then discards their output.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..kernels.fused_linear import fused_linear_backend, linear_gelu, linear_rope
from ..kernels.residual_norm import residual_norm, residual_norm_backend
from ..kernels.rope import rope, rope_backend
from ..kernels.rope_attention import rope_self_attention_backend
from .common import KeepComplexBuffers, addmm_activation, addmm_epilogue_serves, check_switch


def compute_axial_cis(
    dim: int, end_x: int, end_y: int, theta: float = 10000.0, scale_pos: float = 1.0
) -> torch.Tensor:
    """The official RoPE table: (end_x * end_y, dim // 2) complex64, x frequencies then y."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4)[: (dim // 4)].float() / dim))
    t = torch.arange(end_x * end_y, dtype=torch.float32)
    t_x = (t % end_x).float() * scale_pos
    t_y = torch.div(t, end_x, rounding_mode="floor").float() * scale_pos
    freqs_x = torch.outer(t_x, freqs)
    freqs_y = torch.outer(t_y, freqs)
    cis_x = torch.polar(torch.ones_like(freqs_x), freqs_x)
    cis_y = torch.polar(torch.ones_like(freqs_y), freqs_y)
    return torch.cat([cis_x, cis_y], dim=-1)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` (B, L, ..., hd) by ``freqs_cis`` (L, hd/2) complex.

    Real cos/sin form of the official complex product, in float32 like the official (which casts
    to float32 even under autocast); the result has ``x``'s dtype. ``view_as_real`` reads the
    complex buffer in place, so ``module.half()`` (which leaves complex buffers alone) cannot
    round the table.
    """
    L = x.shape[1]
    cs = torch.view_as_real(freqs_cis).view((L,) + (1,) * (x.dim() - 3) + freqs_cis.shape[-1:] + (2,))
    cos, sin = cs.unbind(-1)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def window_partition(x: torch.Tensor, w: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(B, H, W, C) -> (B * n_win, w, w, C), zero padding bottom/right to multiples of w."""
    B, H, W, C = x.shape
    pad_h, pad_w = (w - H % w) % w, (w - W % w) % w
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w, w, C), (Hp, Wp)


def window_unpartition(x: torch.Tensor, w: int, pad_hw: Tuple[int, int], hw: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * n_win, w, w, C) -> (B, H, W, C)."""
    Hp, Wp = pad_hw
    H, W = hw
    B = x.shape[0] // ((Hp // w) * (Wp // w))
    x = x.view(B, Hp // w, Wp // w, w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :]
    return x


def _no_autocast(x: torch.Tensor) -> bool:
    """Whether no autocast region is active for x's device: the fused trunk kernels take one dtype,
    while under autocast the module's operations mix them (its norms in float32, its linears in the
    autocast dtype), so there the module's own path runs."""
    return not torch.is_autocast_enabled(x.device.type)


def _norm(ln: nn.LayerNorm, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``ln(x)`` computed in x's dtype (the stream's: its affine parameters cast to it) and rounded
    to ``dtype`` (the branch's); exactly ``ln(x)`` when the dtypes agree."""
    if x.dtype == dtype == ln.weight.dtype:
        return ln(x)
    return F.layer_norm(x, ln.normalized_shape, ln.weight.to(x.dtype), ln.bias.to(x.dtype), ln.eps).to(dtype)


class PatchEmbed(nn.Module):
    """Conv2d(3, C, P, stride P) without bias; (B, 3, S, S) -> (B, g, g, C).

    sam3fast: on CUDA the convolution runs as the GEMM it is, (B g g, 3 P P) x (3 P P, C), over
    the non-overlapping patches (one copy of the image into patch rows). With 3 input channels
    cuDNN has no tensor-core kernel for it in bf16: the H100 profile of 2026-11-26 (run 2) shows
    one generic ``implicit_convolve_sgemm`` launch per image, 0.31 ms, for a 6.2 GFLOP product.
    ``gemm``: None (default) = on CUDA, True / False = always / never (tests force it on the CPU).
    Same sums as the convolution; only the order of the float32 accumulation may differ.
    """

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.gemm: Optional[bool] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        P = self.proj.kernel_size[0]
        w = self.proj.weight
        if x.dtype != w.dtype and _no_autocast(x):
            if not x.is_floating_point():
                raise TypeError(f"images must be a floating tensor (normalized pixels), got {x.dtype}")
            x = x.to(w.dtype)  # float32 frames into a bf16 trunk, as the module's callers give them
        use_gemm = x.is_cuda if self.gemm is None else self.gemm
        if not use_gemm or H % P or W % P:
            return self.proj(x).permute(0, 2, 3, 1)
        gh, gw = H // P, W // P
        rows = x.reshape(B, C, gh, P, gw, P).permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, C * P * P)
        return (rows @ w.reshape(w.shape[0], -1).t()).view(B, gh, gw, w.shape[0])


class Mlp(nn.Module):
    """timm ``Mlp`` names: fc1 -> exact GELU -> fc2.

    ``fused_gelu`` (False): on CUDA, fc1 and the GELU as one Triton GEMM with the GELU in its
    epilogue (``sam3fast::linear_gelu``: the (tokens, hidden) activation written once instead of
    written, read and written again). Off until an H100 measures it against cuBLAS + the eager GELU
    (bench/bench_fused_linear.py); ``ViT.fused_gelu`` sets every block's.

    ``tanh_gelu_epilogue`` ("auto" by default, True, False): fc1 and the GELU as one cuBLASLt GEMM
    with its GELU + bias epilogue (``torch._addmm_activation(..., use_gelu=True)``), cuBLAS's own
    kernels instead of a Triton GEMM. That epilogue is the *tanh approximation* of GELU, not the
    exact (erf) GELU of the official model: the two differ by at most 4.7e-4 (at x ~ 2.70, where a
    bf16 value's ulp is 1.6e-2), so in bf16 the change is under the rounding the dtype makes anyway
    (the trunk's error test and the image error budget measure it); in float32 it is a visible
    deviation from the official numbers. "auto" takes it on CUDA for bf16 / fp16 inputs only (on the
    H200, run 2 of 2026-11-27: fc1 + GELU 0.091 ms against 0.117 for cuBLAS + the exact GELU, 0.83 ms
    a trunk of 32 blocks); float32 and the CPU keep the exact GELU. True: wherever it can serve
    (on CPU: fc1 and then the tanh GELU, as PyTorch's CUDA op does where cuBLASLt is not used; the CPU
    ``_addmm_activation`` applies the exact GELU instead, so it is not called there); False: never.
    The epilogue also applies the GELU to the float32 accumulator before the one rounding (eager
    rounds fc1, then the GELU). ``ViT.tanh_gelu_epilogue`` sets every block's. ``fused_gelu`` takes
    precedence where both are on. Where the fused op cannot serve (``addmm_epilogue_serves``:
    autograd recording, since the op has no derivative; mixed dtypes; autocast) the exact path runs."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.fused_gelu = False
        self.tanh_gelu_epilogue = "auto"

    @property
    def tanh_gelu_epilogue(self) -> Union[bool, str]:
        return self._tanh_gelu_epilogue

    @tanh_gelu_epilogue.setter
    def tanh_gelu_epilogue(self, value: Union[bool, str]) -> None:
        self._tanh_gelu_epilogue = check_switch("tanh_gelu_epilogue", value)

    def uses_tanh_epilogue(self, x: torch.Tensor) -> bool:
        """Whether forward runs fc1 + the tanh GELU as one epilogue GEMM for this input (see the
        class docstring: "auto" = CUDA and bf16 / fp16)."""
        return tanh_gelu_epilogue_applies(self._tanh_gelu_epilogue, x, self.fc1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gelu and fused_linear_backend(x)[0] == "triton" and _no_autocast(x):
            return self.fc2(linear_gelu(x, self.fc1.weight, self.fc1.bias))
        if self.uses_tanh_epilogue(x):
            return self.fc2(linear_tanh_gelu(x, self.fc1.weight, self.fc1.bias))
        return self.fc2(self.act(self.fc1(x)))


def tanh_gelu_epilogue_applies(setting: Union[bool, str], x: torch.Tensor, linear: nn.Linear) -> bool:
    """Whether ``linear`` + GELU on ``x`` runs as :func:`linear_tanh_gelu` under a module's
    ``tanh_gelu_epilogue`` setting (True, False or "auto": CUDA and bf16 / fp16), where the epilogue
    GEMM can serve (``addmm_epilogue_serves``)."""
    on = check_switch("tanh_gelu_epilogue", setting)
    if on == "auto":
        on = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    return bool(on) and addmm_epilogue_serves(x, linear.weight, linear.bias)


def linear_tanh_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x W^T + b)`` over the last dim of x (..., K): on CUDA one GEMM with cuBLASLt's
    GELU + bias epilogue (see :class:`Mlp`), (..., N) contiguous; elsewhere the linear and then the
    tanh GELU."""
    if not x.is_cuda:
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")
    return addmm_activation(x, weight, bias, gelu=True)


# SDPA backends a trunk attention can be pinned to (Attention.sdpa_backend), by name.
SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def _check_sdpa_backend(name: Optional[str]) -> Optional[str]:
    if name is not None and name not in SDPA_BACKENDS:
        raise ValueError(f"sdpa backend must be None or one of {sorted(SDPA_BACKENDS)}, got {name!r}")
    return name


class Attention(KeepComplexBuffers, nn.Module):
    """Self-attention over (B, L, C) with 2D axial RoPE on q, k; L must equal side * side.

    ``sdpa_backend`` (None): SDPA's backend as PyTorch picks it, or a name of ``SDPA_BACKENDS`` to
    pin it (``torch.nn.attention.sdpa_kernel`` around the call; PyTorch raises where that backend
    cannot run the call). The trunk's attentions are 9 x 16 heads of 576 tokens (window blocks) and
    16 heads of 5184 (global blocks), head width 64: bench/bench_trunk_attention.py times each
    backend there; the default stays PyTorch's choice until a GPU shows a faster one.

    ``rope_attention_kernel`` (False): on CUDA the RoPE of q and k and the attention as one Triton op
    on the qkv projection's views (``sam3fast::rope_self_attention``; ``sdpa_backend`` then unused),
    no RoPE pass and no transposed copy of the output; off until a GPU times it."""

    def __init__(self, dim: int, num_heads: int, side: int, rope_scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer(
            "freqs_cis", compute_axial_cis(self.head_dim, side, side, scale_pos=rope_scale)
        )
        # False: always apply_rope (the eager chain the kernel is measured against); True: the rope
        # kernel where its backend is Triton (CUDA).
        self.use_kernel = True
        # True (with use_kernel): on CUDA the qkv projection and the RoPE of q, k as one Triton GEMM
        # with the rotation in its epilogue (sam3fast::linear_rope). Off until an H100 measures it
        # against cuBLAS + the rope kernel (bench/bench_fused_linear.py); ViT.fused_rope sets all.
        self.fused_rope = False
        # None: PyTorch picks SDPA's backend (cuDNN first on an H100 in torch 2.11); else one of
        # SDPA_BACKENDS' names, pinned for this attention (ViT.window_sdpa_backend / global_sdpa_backend)
        self.sdpa_backend: Optional[str] = None
        # True (with use_kernel): on CUDA the RoPE of q, k inside the attention, one Triton op from the
        # qkv views (sam3fast::rope_self_attention) instead of the rope kernel + SDPA. Off until a GPU
        # times it against them (bench/bench_trunk_attention.py); ViT.rope_attention_kernel sets all.
        self.rope_attention_kernel = False

    def _rope_table(self) -> torch.Tensor:
        """(L, hd/2, 2) float32 (cos, sin): a view of the complex ``freqs_cis``."""
        return torch.view_as_real(self.freqs_cis)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.sdpa_backend is None:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(SDPA_BACKENDS[self.sdpa_backend]):
            return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        if self.use_kernel and self.fused_rope and fused_linear_backend(x)[0] == "triton" and _no_autocast(x):
            q, k, v = linear_rope(x, self.qkv.weight, self.qkv.bias, self.freqs_cis, self.num_heads).unbind(2)
            out = self._sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return self.proj(out.transpose(1, 2).reshape(B, L, C))
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        if self.rope_attention_kernel and self.use_kernel and _no_autocast(x):
            q, k, v = qkv.unbind(2)  # (B, L, nH, hd) views
            if rope_self_attention_backend(q)[0] == "triton":
                return self.proj(torch.ops.sam3fast.rope_self_attention(q, k, v, self._rope_table()).reshape(B, L, C))
        qk = qkv[:, :, :2]  # q and k in one pass: (B, L, 2, nH, hd), contiguous after the rotation
        if self.use_kernel and rope_backend(qk)[0] == "triton":
            qk = rope(qk, self.freqs_cis)
        else:
            qk = apply_rope(qk, self.freqs_cis)
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
        v = qkv[:, :, 2].transpose(1, 2)
        out = self._sdpa(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    """Pre-norm transformer block on (B, H, W, C); ``window_size`` 0 means global attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, grid: int, rope_scale: float):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, num_heads, window_size if window_size > 0 else grid, rope_scale)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) the residual stream, in the weights' dtype or float32 (``ViT.fp32_residual``:
        the norms in float32, rounded to the weights' dtype for the attention and the MLP)."""
        dtype = self.attn.qkv.weight.dtype
        shortcut = x
        x = _norm(self.norm1, x, dtype)
        H, W = x.shape[1], x.shape[2]
        if self.window_size > 0:
            # Partition before qkv (C wide, not 3C); the official zero-pads *normed* tokens, so
            # padded keys carry qkv's bias and are attended to: keep that order for parity.
            x, pad_hw = window_partition(x, self.window_size)
        n, h, w, C = x.shape
        x = self.attn(x.reshape(n, h * w, C)).view(n, h, w, C)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))
        x = shortcut + x
        return x + self.mlp(_norm(self.norm2, x, dtype))


class ViT(nn.Module):
    """SAM 3 ViT trunk. ``forward(images (B, 3, S, S)) -> (B, C, g, g)`` (channels-last memory).

    Assumes the SAM 3 settings: pos table with a cls entry (dropped), tiled (not interpolated),
    ln_pre, no ln_post, RoPE with interpolation, qkv bias, patch conv without bias.

    The LayerNorms' parameters and the pos table are float32 islands (kept float32 by the builders
    whatever the dtype: ~0.3 M values): a bf16 trunk rounds them to bf16 where its stream is bf16,
    and the float32 stream (``fp32_residual``) uses them as the official autocast does.
    """

    fp32_params = ("pos_embed",)

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
    ):
        super().__init__()
        if not global_att_blocks:
            raise ValueError("the trunk returns the output of the last global block: give at least one")
        if embed_dim % num_heads or (embed_dim // num_heads) % 4:
            raise ValueError("head width must be a multiple of 4 for 2D axial RoPE")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grid = img_size // patch_size
        self.global_att_blocks = tuple(global_att_blocks)
        self.num_run_blocks = max(self.global_att_blocks) + 1
        self.channel_list = [embed_dim]

        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.pretrain_grid = pretrain_img_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pretrain_grid**2 + 1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                window_size=0 if i in self.global_att_blocks else window_size,
                grid=self.grid,
                rope_scale=window_size / self.grid if i in self.global_att_blocks else 1.0,
            )
            for i in range(depth)
        )
        self.ln_pre = nn.LayerNorm(embed_dim, eps=1e-5)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.fp32_island = True
        # True: on CUDA, the residual adds and norms of the blocks fused (module docstring); False:
        # the blocks one by one (the path the fused one is measured against)
        self.fuse_residual_norm = True
        # True: a bf16/fp16 trunk keeps its residual stream in float32 (module docstring)
        self.fp32_residual = False

    @property
    def fused_rope(self) -> bool:
        """Whether every block's attention runs qkv + RoPE as one Triton GEMM on CUDA (:class:`Attention`)."""
        return all(blk.attn.fused_rope for blk in self.blocks)

    @fused_rope.setter
    def fused_rope(self, on: bool) -> None:
        for blk in self.blocks:
            blk.attn.fused_rope = bool(on)

    @property
    def fused_gelu(self) -> bool:
        """Whether every block's MLP runs fc1 + GELU as one Triton GEMM on CUDA (:class:`Mlp`)."""
        return all(blk.mlp.fused_gelu for blk in self.blocks)

    @fused_gelu.setter
    def fused_gelu(self, on: bool) -> None:
        for blk in self.blocks:
            blk.mlp.fused_gelu = bool(on)

    @property
    def rope_attention_kernel(self) -> bool:
        """Whether every block's attention runs RoPE + attention as one Triton op on CUDA
        (``sam3fast::rope_self_attention``, :class:`Attention`)."""
        return all(blk.attn.rope_attention_kernel for blk in self.blocks)

    @rope_attention_kernel.setter
    def rope_attention_kernel(self, on: bool) -> None:
        for blk in self.blocks:
            blk.attn.rope_attention_kernel = bool(on)

    def _sdpa_pin(self, window: bool) -> Optional[str]:
        names = {blk.attn.sdpa_backend for blk in self.blocks if (blk.window_size > 0) == window}
        return names.pop() if len(names) == 1 else None

    def _set_sdpa_pin(self, window: bool, name: Optional[str]) -> None:
        name = _check_sdpa_backend(name)
        for blk in self.blocks:
            if (blk.window_size > 0) == window:
                blk.attn.sdpa_backend = name

    window_sdpa_backend = property(
        lambda self: self._sdpa_pin(True), lambda self, name: self._set_sdpa_pin(True, name),
        doc="""The SDPA backend pinned in the window blocks' attention (:class:`Attention`): their common
        setting, None where it is PyTorch's choice or where they differ; set it to pin all of them.""")
    global_sdpa_backend = property(
        lambda self: self._sdpa_pin(False), lambda self, name: self._set_sdpa_pin(False, name),
        doc="The SDPA backend pinned in the global blocks' attention (as ``window_sdpa_backend``).")

    @property
    def tanh_gelu_epilogue(self) -> Union[bool, str, None]:
        """The blocks' MLP setting for fc1 + the tanh-approximate GELU as one cuBLASLt GEMM
        (:class:`Mlp`: True, False or "auto", the default: CUDA in bf16 / fp16 only); None where the
        blocks differ."""
        values = {blk.mlp.tanh_gelu_epilogue for blk in self.blocks}
        return values.pop() if len(values) == 1 else None

    @tanh_gelu_epilogue.setter
    def tanh_gelu_epilogue(self, value: Union[bool, str]) -> None:
        for blk in self.blocks:
            blk.mlp.tanh_gelu_epilogue = value

    def abs_pos(self, h: int, w: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(1, h, w, C): the pretrain table without its cls entry, tiled (exact copies, no resampling),
        in ``dtype`` (default: the table's; cast before the tiling, on the small table)."""
        T = self.pretrain_grid
        pos = self.pos_embed[:, 1:].to(dtype or self.pos_embed.dtype).view(1, T, T, -1)
        if T != h or T != w:
            pos = pos.repeat(1, h // T + 1, w // T + 1, 1)[:, :h, :w]
        return pos

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        dtype = self.patch_embed.proj.weight.dtype  # the blocks' (under autocast x is bf16 here)
        # the stream from here on: the weights' dtype, or float32 (fp32_residual; and a float32 trunk
        # under autocast, as the official: its bf16 patch embedding plus the float32 pos table)
        stream = torch.float32 if self.fp32_residual else dtype
        x = x.to(stream) + self.abs_pos(x.shape[1], x.shape[2], stream)
        x = _norm(self.ln_pre, x, stream)
        blocks = self.blocks[: self.num_run_blocks]
        if self.fuse_residual_norm and residual_norm_backend(x)[0] == "triton" and _no_autocast(x) and all(
                x.shape[1] % blk.window_size == 0 and x.shape[2] % blk.window_size == 0
                for blk in blocks if blk.window_size > 0):
            x = self._fused_blocks(x, blocks)
        else:
            for blk in blocks:
                x = blk(x)
        return x.to(dtype).permute(0, 3, 1, 2)

    @staticmethod
    def _fused_blocks(x: torch.Tensor, blocks) -> torch.Tensor:
        """The blocks with each residual add fused to the norm after it (``sam3fast::residual_norm``):
        ``pending``, the last MLP output, is added to the stream by the next block's first call, which
        also gives its norm1 in the attention's (window) order; the second call adds the attention
        output (from window order) and gives norm2. Windows must divide the grid (no padding)."""
        pending = None
        for blk in blocks:
            w, ln1, ln2 = blk.window_size, blk.norm1, blk.norm2
            if pending is None:
                s = x
                h = _norm(ln1, x, blk.attn.qkv.weight.dtype)
                h = window_partition(h, w)[0] if w > 0 else h
            else:
                s, h = residual_norm(x, pending, ln1.weight, ln1.bias, ln1.eps, 0, w)
            n, hh, ww, C = h.shape
            a = blk.attn(h.reshape(n, hh * ww, C)).view(n, hh, ww, C)
            x, h = residual_norm(s, a, ln2.weight, ln2.bias, ln2.eps, w, 0)
            pending = blk.mlp(h)
        return x + pending
