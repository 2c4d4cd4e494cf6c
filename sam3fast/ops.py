"""Typed entry points over the ``sam3fast::*`` ops, with the backend choice made in one place.

Each entry point picks a backend from static facts only (device, dtype, whether triton imports), so
the choice is the same under ``torch.compile`` and CUDA-graph capture, and ``<op>_backend(...)``
says which one a call would take and why. ``SAM3FAST_FORCE_REFERENCE=1`` (read once, here, at
import) forces the pure-PyTorch references everywhere.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import env
from .kernels import connected_components as _cc
from .kernels import mask_postprocess as _mp
from .kernels._triton_compat import why_not_triton
from .kernels.mask_for_memory import mask_for_memory, mask_for_memory_backend
from .kernels.memory_attention import memory_attention, memory_attention_backend
from .kernels.prompt_cross_attention import prompt_cross_attention, prompt_cross_attention_backend
from .kernels.rpb_attention import rpb_attention, rpb_attention_backend
from .kernels.rpb_factors import rpb_factors, rpb_factors_backend
from .kernels.conv_norm_gelu import conv_norm_gelu, conv_norm_gelu_backend
from .kernels.dwconv_norm import dwconv_norm, dwconv_norm_backend
from .kernels.fused_linear import fused_linear_backend, linear_gelu, linear_rope
from .kernels.fold_projection import fold_out_proj, fold_out_proj_backend
from .kernels.group_norm import group_norm, group_norm_backend
from .kernels.layer_norm2d import layer_norm2d, layer_norm2d_backend
from .kernels.residual_norm import residual_norm, residual_norm_backend
from .kernels.rope import rope, rope_backend
from .kernels.rope_attention import rope_self_attention, rope_self_attention_backend
from .kernels.rope_projection import rope_projection, rope_projection_backend
from .kernels.table_memory import table_kernels_backend  # (registers the object table's ops)
from .kernels.two_way_attention import image_to_token_attention, token_to_image_attention, two_way_attention_backend
from .mask_ops import mask_areas, mask_iou, mask_nms, mask_ops_backend, nms_masks, pack_masks

FORCE_REFERENCE: bool = env.FORCE_REFERENCE

__all__ = ["FORCE_REFERENCE", "MaskPostprocessOutput", "mask_postprocess", "mask_postprocess_backend", "unpack_masks",
           "connected_component_sizes", "fill_holes", "batched_linear_sum_assignment",
           "pack_masks", "mask_areas", "mask_iou", "mask_nms", "nms_masks", "mask_ops_backend",
           "memory_attention", "memory_attention_backend", "connected_component_sizes_backend",
           "rpb_attention", "rpb_attention_backend", "rpb_factors", "rpb_factors_backend", "prompt_cross_attention", "prompt_cross_attention_backend",
           "token_to_image_attention", "image_to_token_attention", "two_way_attention_backend",
           "mask_for_memory", "mask_for_memory_backend", "rope", "rope_backend", "residual_norm",
           "residual_norm_backend", "linear_gelu", "linear_rope", "fused_linear_backend",
           "dwconv_norm", "dwconv_norm_backend", "layer_norm2d", "layer_norm2d_backend",
           "group_norm", "group_norm_backend", "conv_norm_gelu", "conv_norm_gelu_backend",
           "rope_self_attention", "rope_self_attention_backend", "rope_projection", "rope_projection_backend",
           "fold_out_proj", "fold_out_proj_backend", "table_kernels_backend"]

connected_component_sizes_backend = _cc.connected_component_sizes_backend

unpack_masks = _mp.unpack_masks


class MaskPostprocessOutput(NamedTuple):
    packed: Tensor  # (N, H, ceil(W / 32)) int32, bit j of word k = pixel 32 k + j
    boxes: Tensor  # (N, 4) int32 inclusive xyxy, -1s for an empty mask
    areas: Tensor  # (N,) int64


def mask_postprocess_backend(masks: Tensor) -> Tuple[str, str]:
    """("triton" | "reference", reason) for masks of this device and dtype."""
    why = why_not_triton(masks.device, FORCE_REFERENCE)
    if why is not None:
        return "reference", why
    if masks.dtype not in _mp._KERNEL_DTYPES:
        return "reference", f"{masks.dtype} masks (the Triton kernel takes float32/bfloat16/float16)"
    return "triton", "CUDA tensors, triton available"


def mask_postprocess(
    masks: Tensor,
    scores: Tensor,
    size: Tuple[int, int],
    active: Optional[Tensor] = None,
    non_overlap: bool = False,
) -> MaskPostprocessOutput:
    """Low-resolution mask logits -> bit-packed full-resolution masks, boxes and areas.

    masks (N, h, w) float logits; scores (N,) float (used by ``non_overlap``: the highest score
    keeps a contested pixel, ties to the lower index); size (H, W); active (N,) bool or None (all
    active; inactive objects come back empty). Foreground is bilinear (align_corners=False) logit
    > 0, computed in float32. See ``sam3fast.kernels.mask_postprocess`` for the exact math.
    """
    H, W = int(size[0]), int(size[1])
    if active is None:
        active = torch.ones(masks.shape[0], dtype=torch.bool, device=masks.device)
    backend, _ = mask_postprocess_backend(masks)
    if backend == "triton":
        out = torch.ops.sam3fast.mask_postprocess(masks, scores, active, H, W, non_overlap)
    else:
        out = _mp.mask_postprocess_ref(masks, scores, active, H, W, non_overlap)
    return MaskPostprocessOutput(*out)


def connected_component_sizes(fg: Tensor) -> Tensor:
    """fg (N, H, W) bool -> (N, H, W) int64: for each foreground pixel the area of its
    8-connected component, 0 on background (what the official ``connected_components`` yields for
    hole filling: skimage's ``label`` with full connectivity, or its CUDA/Triton kernels).

    CUDA tensors run the sync-free Triton union-find kernels (``sam3fast::connected_component_sizes``,
    CUDA-graph safe); CPU tensors, or any tensor under SAM3FAST_FORCE_REFERENCE=1, use
    ``scipy.ndimage.label`` on the host. See ``sam3fast.kernels.connected_components``.
    """
    return _cc.connected_component_sizes_gpu(fg)


def fill_holes(logits: Tensor, max_hole_area: float, threshold: float = 0.0, max_sprinkle_area: float = 0.0) -> Tensor:
    """The official SAM mask post-processing on low-res logits (..., H, W): background components
    (logit <= threshold) of area <= ``max_hole_area`` become ``threshold + 10``; foreground components
    of area <= ``max_sprinkle_area`` become ``threshold - 10``."""
    shape = logits.shape
    flat = logits.reshape(-1, shape[-2], shape[-1])
    if max_hole_area > 0:
        sizes = connected_component_sizes(flat <= threshold)
        flat = torch.where((sizes > 0) & (sizes <= max_hole_area), flat.new_tensor(threshold + 10.0), flat)
    if max_sprinkle_area > 0:
        sizes = connected_component_sizes(flat > threshold)
        flat = torch.where((sizes > 0) & (sizes <= max_sprinkle_area), flat.new_tensor(threshold - 10.0), flat)
    return flat.reshape(shape)


def batched_linear_sum_assignment(cost: Tensor, *, return_feasible: bool = False):
    """Exact batched linear assignment (see :mod:`sam3fast.assignment`): cost (B, n, m) ->
    (B, n) int64 column per row (-1 unassigned), on the device of ``cost``."""
    from .assignment import batched_linear_sum_assignment as _lsa

    return _lsa(cost, return_feasible=return_feasible)
