"""Tracker memory encoder: a frame's mask prediction + its image features -> one memory frame.

Official pieces: ``sam3.model.memory`` (``SimpleMaskEncoder``, ``SimpleMaskDownSampler``,
``SimpleFuser``, ``CXBlock``), ``sam3.model.model_misc.LayerNorm2d`` and
``Sam3TrackerBase._encode_new_memory`` (``sam3_tracker_base.py`` 797-850). Keys: the
``tracker.maskmem_backbone.*`` of ``sam3.pt`` load into :class:`MaskMemoryEncoder` as is.

Letters: B objects, D d_model (256), M mem_dim (64), g the feature grid (72), I the mask size the
downsampler works at (``mem_interpol_size``, 1152 = 16 g).

    m   = sigmoid(masks) unless skip_mask_sigmoid             (B, 1, Hm, Wm)
    m   = bilinear antialias resize to (I, I), float32, only if (Hm, Wm) != (I, I)
    m   = 4 x [conv3x3 s2 -> LN2d -> GELU] (1 -> 4 -> 16 -> 64 -> 256 ch) -> conv1x1(256, D)
                                                                (B, D, g, g)
    x   = pix_feat_proj(pix_feat) + m                           (B, D, g, g)
    x   = 2 x CXBlock: x + gamma * pw2(GELU(pw1(LN(dwconv7x7(x)))))
    feat = out_proj(x)  (1x1, D -> M)                           (B, M, g, g)
    pos  = DETR sine(M) of a (g, g) map                         (B, M, g, g), batch-broadcast view

:func:`encode_new_memory` adds what the tracker does around it: the mask it feeds is
``sigmoid(logits) * 20 - 10`` (or ``(logits > 0) * 20 - 10`` for masks that came from a prompt,
``is_mask_from_pts``), the encoder is told to skip its own sigmoid, and ``no_obj_embed_spatial``
(1, M) is added to every position of objects whose object-score logit is <= 0.

The official video predictor then stores ``feat`` as bfloat16 (``sam3_tracking_predictor.py``
1098/1149); that rounding belongs to the memory bank, not to this module.

:func:`encode_new_memory_from_low_res` is the same from the heads' low-resolution logits (B, 1, r,
r): on CUDA the op ``sam3fast::mask_for_memory`` (``sam3fast.kernels.mask_for_memory``) builds the
downsampler's (I, I) input in one pass (no (R, R) logits, no float32 (I, I) intermediates) and the
downsampler then skips its resize; elsewhere it is :func:`encode_new_memory` on the bilinear
upsample, exactly.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.dwconv_norm import dwconv_norm, dwconv_norm_backend
from ..kernels.mask_for_memory import mask_for_memory, mask_for_memory_backend
from ..kernels import conv_norm_gelu as _cng
from .common import LayerNorm2d, check_switch, norm_then_act
from .neck import PositionEmbeddingSine
from .vit import linear_tanh_gelu, tanh_gelu_epilogue_applies


def _conv_norm_gelu_call(x, conv_weight, conv_bias, norm_weight, norm_bias, eps, stride):
    return torch.ops.sam3fast.conv_norm_gelu(x, conv_weight, conv_bias, norm_weight, norm_bias, float(eps), stride)


class MaskDownSampler(nn.Module):
    """Official ``SimpleMaskDownSampler`` (kernel 3, stride 2, padding 1, total stride 16).

    ``encoder`` is an ``nn.Sequential`` with the official indices (conv, LN2d, GELU) x n, then the
    1x1 conv at index 3n. ``forward(x (B, 1, Hm, Wm)) -> (B, D, I/16, I/16)``.

    On CUDA (``use_conv_kernel``, the default; not under autocast) a stage with few channels (in x
    out <= 64: SAM 3's 1 -> 4 and 4 -> 16) runs as one Triton pass, ``sam3fast::conv_norm_gelu``
    (the convolution, the LayerNorm2d and the GELU; the map read once and written once), where
    cuDNN took 1.2 ms a frame at 16 objects for the 4 -> 16 convolution alone on the H200 (run 2 of
    2026-11-27); the other stages run the convolution and then ``norm_then_act``.
    """

    use_conv_kernel = True

    def __init__(self, embed_dim: int, interpol_size: Optional[int], kernel_size: int = 3, stride: int = 2,
                 padding: int = 1, total_stride: int = 16):
        super().__init__()
        num_layers = int(math.log2(total_stride) // math.log2(stride))
        if stride ** num_layers != total_stride:
            raise ValueError(f"total_stride {total_stride} is not a power of stride {stride}")
        self.encoder = nn.Sequential()
        cin = 1
        for _ in range(num_layers):
            cout = cin * stride ** 2
            self.encoder.append(nn.Conv2d(cin, cout, kernel_size=kernel_size, stride=stride, padding=padding))
            self.encoder.append(LayerNorm2d(cout))
            self.encoder.append(nn.GELU())
            cin = cout
        self.encoder.append(nn.Conv2d(cin, embed_dim, kernel_size=1))
        self.interpol_size = interpol_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder[-1](self.features(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything but the final 1x1 convolution: the resize and the (conv, LN2d, GELU) stages."""
        s = self.interpol_size
        if s is not None and tuple(x.shape[-2:]) != (s, s):
            # The official resizes in float32 whatever the input dtype (then relies on autocast);
            # cast back so a bf16 module keeps one dtype.
            x = F.interpolate(x.float(), size=(s, s), mode="bilinear", align_corners=False, antialias=True).to(x.dtype)
        enc = self.encoder
        for i in range(0, len(enc) - 1, 3):  # (conv, LayerNorm2d, GELU): the norm and GELU in one pass
            conv, norm, act = enc[i], enc[i + 1], enc[i + 2]
            if self._fused_stage(x, conv, norm, act):
                x = _conv_norm_gelu_call(x, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps, conv.stride[0])
            else:
                x = norm_then_act(norm, act, conv(x))
        return x

    def _fused_stage(self, x: torch.Tensor, conv: nn.Conv2d, norm: nn.Module, act: nn.Module) -> bool:
        """Whether ``sam3fast::conv_norm_gelu`` computes this (conv, LayerNorm2d, GELU) stage (static:
        the modules' settings, x's device and dtype)."""
        k = conv.kernel_size[0]
        return (self.use_conv_kernel and isinstance(norm, LayerNorm2d) and type(act) is nn.GELU
                and act.approximate == "none" and conv.bias is not None and conv.groups == 1
                and conv.kernel_size == (k, k) and k % 2 == 1 and conv.padding == (k // 2, k // 2)
                and conv.stride[0] == conv.stride[1] and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
                and x.dtype == conv.weight.dtype == norm.weight.dtype and not torch.is_autocast_enabled(x.device.type)
                and _cng.conv_norm_gelu_backend(x, conv.weight)[0] == "triton")


class CXBlock(nn.Module):
    """Official ``CXBlock`` (ConvNeXt block, depthwise 7x7, layer scale ``gamma``), (B, D, g, g).

    The LayerNorm runs on the channels-last tensor that the pointwise Linears need anyway, so the
    block permutes once each way (the official permutes after its channels-first LayerNorm2d).
    On CUDA (``use_kernel``, the default; not under autocast) the depthwise convolution and the
    LayerNorm are one Triton pass that writes that channels-last tensor (``sam3fast::dwconv_norm``).
    In the second H100 profile of 2026-11-26 PyTorch's bfloat16 depthwise convolution took 0.73 ms
    a call on its generic kernel (contiguous input) and 1.1 ms on cuDNN's grouped direct kernel, at
    16 objects, for a (16, 256, 72, 72) map of 42 MB (bench/results/profile_tracker_*_run2.md).
    Elsewhere, or with ``use_kernel = False``, the convolution reads a channels-last copy of its
    input on CUDA (``CHANNELS_LAST_DWCONV``: cuDNN rather than the generic kernel) and its output,
    permuted, is the contiguous (B, g, g, D) tensor the LayerNorm reads.

    ``tanh_gelu_epilogue`` (class attribute, settable per instance: "auto", True, False): pwconv1 and
    the GELU as one cuBLASLt GEMM with its GELU + bias epilogue, the *tanh approximation* of the
    official exact GELU (at most 4.7e-4 apart, under bf16's rounding: the trunk's
    ``Mlp.tanh_gelu_epilogue`` has the measurements); "auto" on CUDA in bf16 / fp16 (where
    ``addmm_epilogue_serves``), so the separate GELU pass over the (B, g, g, 4D) hidden map goes
    (0.29 ms a frame at 16 objects in the H200 tracker profile of 2026-11-27). Not yet timed on a
    GPU; False keeps the exact GELU.
    """

    CHANNELS_LAST_DWCONV = True
    tanh_gelu_epilogue = "auto"

    def __init__(self, dim: int, kernel_size: int = 7, padding: int = 3):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=padding, groups=dim)
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))
        self.use_kernel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and dwconv_norm_backend(x)[0] == "triton" and not torch.is_autocast_enabled(x.device.type):
            y = dwconv_norm(x, self.dwconv.weight, self.dwconv.bias, self.norm.weight, self.norm.bias, self.norm.eps)
        else:
            dw_in = x.contiguous(memory_format=torch.channels_last) if x.is_cuda and self.CHANNELS_LAST_DWCONV else x
            y = self.dwconv(dw_in).permute(0, 2, 3, 1)
            y = F.layer_norm(y, self.norm.weight.shape, self.norm.weight, self.norm.bias, self.norm.eps)
        if self.uses_tanh_epilogue(y):
            h = linear_tanh_gelu(y, self.pwconv1.weight, self.pwconv1.bias)
        else:
            h = F.gelu(self.pwconv1(y))
        y = self.pwconv2(h) * self.gamma
        return x + y.permute(0, 3, 1, 2)

    def uses_tanh_epilogue(self, y: torch.Tensor) -> bool:
        """Whether forward runs pwconv1 + the tanh GELU as one epilogue GEMM for the normed map ``y``
        (see the class docstring: "auto" = CUDA and bf16 / fp16)."""
        return tanh_gelu_epilogue_applies(self.tanh_gelu_epilogue, y, self.pwconv1)


class Fuser(nn.Module):
    """Official ``SimpleFuser`` without input projection: ``layers.{i}`` CXBlocks in sequence."""

    def __init__(self, dim: int, num_layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(CXBlock(dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MaskMemoryEncoder(nn.Module):
    """Official ``SimpleMaskEncoder`` (``tracker.maskmem_backbone``).

    ``forward(pix_feat (B, D, g, g), masks (B, 1, Hm, Wm), skip_mask_sigmoid=False)
    -> (maskmem_features (B, M, g, g), maskmem_pos (B, M, g, g))``.

    ``masks`` are logits (sigmoid applied here) or, with ``skip_mask_sigmoid=True``, values used as
    they are (the tracker passes ``sigmoid * 20 - 10``). Any (Hm, Wm) is resized to
    ``interpol_size`` first; with Hm = Wm = ``interpol_size`` there is no resize. The official
    returns ``{"vision_features": feat, "vision_pos_enc": [pos]}``; ``pos`` here is a read-only
    batch-broadcast view (the official returns a copy).

    ``channels_last_fuser`` ("auto" by default: on CUDA; True; False): the fuser's (B, D, g, g) map
    in channels-last memory. The mask downsampler's last 1x1 convolution reads a channels-last copy
    of its (B, D/4, g, g) input (a quarter of the map's bytes) and writes channels-last; the sum with
    the projected frame feature keeps that layout (the mask term first: the same sum, float addition
    commutes), so each CXBlock's depthwise convolution reads along the channels and its residual add
    meets its channels-last branch in the same layout, where the NCHW map added a permuted branch
    (a transposing elementwise pass: 0.97 ms a frame of adds at 16 objects in the H200 tracker
    profile of 2026-11-27, not timed apart). The memory features come out NCHW contiguous either way.
    Same values up to the convolutions' and the depthwise kernel's summation order by layout.
    """

    def __init__(self, in_dim: int = 256, out_dim: int = 64, interpol_size: Optional[int] = 1152,
                 fuser_layers: int = 2):
        super().__init__()
        self.channels_last_fuser = "auto"
        self.mask_downsampler = MaskDownSampler(in_dim, interpol_size)
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = Fuser(in_dim, fuser_layers)
        self.position_encoding = PositionEmbeddingSine(out_dim, temperature=10000, normalize=True)
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1) if out_dim != in_dim else nn.Identity()

    @classmethod
    def from_config(cls, cfg) -> "MaskMemoryEncoder":
        t = cfg.tracker
        return cls(in_dim=cfg.d_model, out_dim=t.mem_dim, interpol_size=t.mem_interpol_size)

    def forward(self, pix_feat: torch.Tensor, masks: torch.Tensor,
                skip_mask_sigmoid: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        if not skip_mask_sigmoid:
            masks = torch.sigmoid(masks)
        cl = check_switch("channels_last_fuser", self.channels_last_fuser)
        if cl == "auto":
            cl = masks.is_cuda
        if cl:
            h = self.mask_downsampler.features(masks).contiguous(memory_format=torch.channels_last)
            m = self.mask_downsampler.encoder[-1](h)  # channels-last out
            x = self.out_proj(self.fuser(m + self.pix_feat_proj(pix_feat))).contiguous()
        else:
            m = self.mask_downsampler(masks)
            x = self.out_proj(self.fuser(self.pix_feat_proj(pix_feat) + m))
        return x, self.position_encoding(x)


def encode_new_memory(
    encoder: MaskMemoryEncoder,
    pix_feat: torch.Tensor,
    pred_masks_high_res: torch.Tensor,
    object_score_logits: torch.Tensor,
    no_obj_embed_spatial: torch.Tensor,
    is_mask_from_pts: bool,
    sigmoid_scale: float = 20.0,
    sigmoid_bias: float = -10.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Official ``Sam3TrackerBase._encode_new_memory`` at inference, tensor-only (no host sync).

    - ``pix_feat`` (B, D, g, g): the frame's top-level tracker feature (the official takes
      ``current_vision_feats[-1]`` (g*g, B, D) and views it as (B, D, g, g)).
    - ``pred_masks_high_res`` (B, 1, Hm, Wm) mask logits (1152^2 per frame; 1008^2 for new objects).
    - ``object_score_logits`` (B, 1); ``no_obj_embed_spatial`` (1, M) = ``tracker.no_obj_embed_spatial``.
    - ``is_mask_from_pts``: binarise (``> 0``) instead of sigmoid (masks from prompts/detections).

    ``non_overlap_masks_for_mem_enc`` is False in SAM 3's builder and is not reproduced.
    Returns ``(maskmem_features (B, M, g, g), maskmem_pos (B, M, g, g))``; the official returns the
    pos as a one-element list.
    """
    if is_mask_from_pts:
        m = (pred_masks_high_res > 0).to(pred_masks_high_res.dtype)
    else:
        m = torch.sigmoid(pred_masks_high_res)
    m = m * sigmoid_scale + sigmoid_bias
    feat, pos = encoder(pix_feat, m, skip_mask_sigmoid=True)
    absent = 1 - (object_score_logits > 0).to(feat.dtype)
    feat = feat + absent[:, :, None, None] * no_obj_embed_spatial[:, :, None, None]
    return feat, pos


def encode_new_memory_from_low_res(
    encoder: MaskMemoryEncoder,
    pix_feat: torch.Tensor,
    low_res_masks: torch.Tensor,
    high_size: Tuple[int, int],
    object_score_logits: torch.Tensor,
    no_obj_embed_spatial: torch.Tensor,
    is_mask_from_pts: bool,
    sigmoid_scale: float = 20.0,
    sigmoid_bias: float = -10.0,
    use_kernel: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_new_memory` of ``F.interpolate(low_res_masks.float(), high_size, bilinear,
    align_corners=False)`` cast to the model dtype, which is what the tracker feeds it when the
    high-res masks come from the SAM heads (not for ``_use_mask_as_output`` masks, nor for masks
    changed at high resolution, e.g. by a non-overlap constraint).

    - ``low_res_masks`` (B, 1, r, r) mask logits (float32 from the heads); ``high_size`` (R, R).
    - The model dtype is the mask downsampler's (its first conv's weights).
    - ``use_kernel`` and a Triton-capable device (CUDA, float32/bf16/fp16): the downsampler input
      comes from ``sam3fast::mask_for_memory`` in float32 math, rounded once to the model dtype (the
      PyTorch path rounds the logits, the sigmoid and the affine to it too); no host sync, no branch
      on values, torch.compile(fullgraph=True) friendly. Otherwise (CPU, ``use_kernel=False``): the
      PyTorch path, bit for bit :func:`encode_new_memory` on the upsampled masks.

    Returns ``(maskmem_features (B, M, g, g), maskmem_pos (B, M, g, g))``.
    """
    dtype = encoder.mask_downsampler.encoder[0].weight.dtype
    high_size = (int(high_size[0]), int(high_size[1]))
    if use_kernel and mask_for_memory_backend(low_res_masks, dtype)[0] == "triton":
        s = encoder.mask_downsampler.interpol_size
        out_size = high_size if s is None else (s, s)
        m = mask_for_memory(low_res_masks, high_size, out_size, scale=sigmoid_scale, bias=sigmoid_bias,
                            binarize=is_mask_from_pts, out_dtype=dtype)
        feat, pos = encoder(pix_feat, m, skip_mask_sigmoid=True)  # m is (I, I): no second resize
        absent = 1 - (object_score_logits > 0).to(feat.dtype)
        feat = feat + absent[:, :, None, None] * no_obj_embed_spatial[:, :, None, None]
        return feat, pos
    high = F.interpolate(low_res_masks.float(), size=high_size, mode="bilinear", align_corners=False)
    return encode_new_memory(encoder, pix_feat, high.to(dtype), object_score_logits, no_obj_embed_spatial,
                             is_mask_from_pts, sigmoid_scale, sigmoid_bias)
