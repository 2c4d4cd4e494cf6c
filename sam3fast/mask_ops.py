"""Mask areas, pairwise mask IoU and greedy mask NMS on bit-packed masks (CPU C++ and CUDA kernels).

Letters: N, M masks, (H, W) mask size, WP = ceil(W / 32) words per row, K = H * WP words per mask.

Packed layout (the output of ``sam3fast::mask_postprocess``, and of :func:`pack_masks`):
    packed (N, H, WP) int32, bit j of word k of row y = pixel (y, 32 k + j); bits past W are 0.
    The kernels read the words only, so those padding bits MUST be 0.

Math (what the official ``sam3.perflib`` computes, bit for bit):
    areas[n]   = popcount of mask n                                              (N,) int64
    iou[i, j]  = float32(|a_i & b_j|) / max(float32(|a_i| + |b_j| - |a_i & b_j|), 1)   (N, M) float32
                 as ``sam3.perflib.masks_ops.mask_iou`` (intersection / union.clamp(min=1)): two
                 empty masks have IoU 0, and an empty mask never suppresses anything.
    keep       = mask_nms(packed, scores, iou_threshold, valid)                  (N,) bool
                 greedy NMS as ``sam3.perflib.nms.nms_masks`` after its score prefilter
                 (``valid = probs > prob_threshold``, the detector's video path): visit the valid
                 masks by descending float32 score, keep one unless an already kept mask has
                 ``iou > iou_threshold`` with it (strictly greater, compared in float32, so an IoU
                 equal to float32(iou_threshold) does not suppress). Invalid masks are never kept
                 and suppress nothing. Score ties go to the lower index, as in the official GPU
                 path (``nms_triton``: a stable descending sort); the official CPU path
                 (``generic_nms_cpu``, numpy ``argsort()[::-1]``) puts the higher index first on
                 small inputs and is unspecified on larger ones. NaN scores rank first (as both
                 official sorts do; the official prefilter never lets a NaN through).
    The output has a fixed shape: no host sync, no data-dependent sizes (CUDA-graph friendly).

Kernels (``csrc/cpu/mask_iou.cpp``, ``csrc/cuda/mask_iou.cu``, registered by ``sam3fast._C``):
    torch.ops.sam3fast.mask_areas(masks) -> (N,) int64
    torch.ops.sam3fast.mask_iou(a, b) -> (N, M) float32
    torch.ops.sam3fast.mask_nms(masks, scores, iou_threshold, valid=None) -> (N,) bool
Never materialise (N, M, H, W) (the official ``mask_iou`` builds (N, M, H*W) int64 sums: ~7 GiB
for 100 x 100 masks of 288 x 288). The ``*_ref`` functions below are the pure-PyTorch spec; they
serve when ``sam3fast._C`` is missing or ``SAM3FAST_FORCE_REFERENCE=1``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import env

try:
    from . import _C  # noqa: F401  (registers torch.ops.sam3fast.mask_*)

    NATIVE_IMPORT_ERROR: Optional[str] = None
except ImportError as _e:  # the extension is optional at import time; the backend choice says why
    NATIVE_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"


def _has_kernel(name: str, key: str) -> bool:
    if NATIVE_IMPORT_ERROR is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
    except RuntimeError:  # "operator ... does not exist": a sam3fast._C built before these ops
        return False


# Static facts, read once (the backend choice must not depend on anything dynamo cannot see).
FORCE_REFERENCE: bool = env.FORCE_REFERENCE
NATIVE_CPU: bool = _has_kernel("sam3fast::mask_iou", "CPU")
NATIVE_CUDA: bool = _has_kernel("sam3fast::mask_iou", "CUDA")

__all__ = [
    "pack_masks", "mask_areas", "mask_iou", "mask_nms", "nms_masks", "mask_ops_backend",
    "mask_areas_ref", "mask_iou_ref", "mask_nms_ref",
]


# ---- layout ----


def pack_masks(masks: Tensor) -> Tensor:
    """(N, H, W) bool -> (N, H, ceil(W / 32)) int32, bit j of word k of row y = pixel (y, 32 k + j),
    padding bits 0 (the layout of ``sam3fast::mask_postprocess``). Pure PyTorch, no host sync; works
    under ``torch.compile``. Builds bytes first, so no full-size int32/int64 tensor is made."""
    if masks.dim() != 3 or masks.dtype != torch.bool:
        raise ValueError(f"pack_masks expects (N, H, W) bool masks, got {masks.dtype} {tuple(masks.shape)}")
    N, H, W = masks.shape
    WP = (W + 31) // 32
    if WP * 32 != W:
        masks = torch.cat([masks, masks.new_zeros((N, H, WP * 32 - W))], dim=2)
    shifts = torch.arange(8, device=masks.device, dtype=torch.uint8)
    byte = (masks.reshape(N, H, WP, 4, 8).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)
    # Byte b of a word holds pixels 32 k + 8 b .. + 7: little-endian reinterpretation (every
    # platform torch targets) puts byte 0 in the low bits.
    return byte.contiguous().view(torch.int32).reshape(N, H, WP)


def _unpack_words(packed: Tensor) -> Tensor:
    """(N, H, WP) int32 -> (N, H * WP * 32) bool, padding columns included."""
    N, H, WP = packed.shape
    shifts = torch.arange(32, device=packed.device, dtype=torch.int32)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(N, H * WP * 32).bool()


# ---- pure-PyTorch spec ----


def _counts_ref(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(intersections (N, M), areas a (N,), areas b (M,)) as exact int64, via a float64 matmul."""
    fa = _unpack_words(a).to(torch.float64)
    fb = _unpack_words(b).to(torch.float64)
    inter = (fa @ fb.T).round().to(torch.int64)
    return inter, fa.sum(1).to(torch.int64), fb.sum(1).to(torch.int64)


def mask_areas_ref(packed: Tensor) -> Tensor:
    """(N,) int64 set pixels per packed mask."""
    _check_packed("mask_areas", "masks", packed)
    return _unpack_words(packed).sum(1, dtype=torch.int64)


def mask_iou_ref(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) float32 IoU, the official formula on exact counts: float32(inter) / max(float32(union), 1)."""
    _check_pair(a, b)
    inter, area_a, area_b = _counts_ref(a, b)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter.to(torch.float32) / union.to(torch.float32).clamp(min=1)


def _nms_order(scores: Tensor) -> Tensor:
    # A stable descending sort: ties keep the lower index first; NaN sorts first.
    return torch.sort(scores.to(torch.float32), descending=True, stable=True).indices


def mask_nms_ref(packed: Tensor, scores: Tensor, iou_threshold: float, valid: Optional[Tensor] = None) -> Tensor:
    """(N,) bool keep mask of the greedy NMS described in the module docstring. Sync-free: a fixed
    loop of N tensor steps (a spec and a fallback, not a fast path for large N)."""
    _check_nms(packed, scores, iou_threshold, valid)
    N = packed.shape[0]
    dev = packed.device
    if valid is None:
        valid = torch.ones(N, dtype=torch.bool, device=dev)
    suppresses = mask_iou_ref(packed, packed) > torch.tensor(iou_threshold, dtype=torch.float32, device=dev)
    order = _nms_order(scores)
    removed = torch.zeros(N, dtype=torch.bool, device=dev)
    keep = torch.zeros(N, dtype=torch.bool, device=dev)
    for p in range(N):
        i = order[p]
        kept = valid[i] & ~removed[i]
        keep[i] = kept
        removed = removed | (kept & suppresses[i])
    return keep


# ---- argument checks (ValueError naming the problem; only static metadata, so compile-safe) ----


def _check_packed(op: str, name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor) or t.dim() != 3 or t.dtype != torch.int32:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be int32 bit-packed masks (N, H, WP) (see pack_masks), got {got}")
    if t.shape[1] * t.shape[2] >= 2**26:
        raise ValueError(f"{op}: {name} masks of {t.shape[1]} x {t.shape[2]} words hold 2**31 pixels or more")


def _check_pair(a: Tensor, b: Tensor) -> None:
    _check_packed("mask_iou", "a", a)
    _check_packed("mask_iou", "b", b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"mask_iou: a and b must have the same (H, WP), got {tuple(a.shape[1:])} and {tuple(b.shape[1:])}")
    if a.device != b.device:
        raise ValueError(f"mask_iou: a and b must be on one device, got {a.device} and {b.device}")


def _check_nms(packed: Tensor, scores: Tensor, iou_threshold: float, valid: Optional[Tensor]) -> None:
    _check_packed("mask_nms", "masks", packed)
    N = packed.shape[0]
    if not isinstance(scores, Tensor) or scores.shape != (N,) or not scores.is_floating_point():
        got = f"{scores.dtype} {tuple(scores.shape)}" if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"mask_nms: scores must be a floating ({N},) tensor, got {got}")
    if valid is not None and (not isinstance(valid, Tensor) or valid.shape != (N,) or valid.dtype != torch.bool):
        got = f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, Tensor) else type(valid).__name__
        raise ValueError(f"mask_nms: valid must be a bool ({N},) tensor or None, got {got}")
    devices = {packed.device, scores.device} | ({valid.device} if valid is not None else set())
    if len(devices) > 1:
        raise ValueError(f"mask_nms: masks, scores and valid must be on one device, got {sorted(map(str, devices))}")
    if isinstance(iou_threshold, Tensor) or not isinstance(iou_threshold, (int, float)) or math.isnan(iou_threshold):
        raise ValueError(f"mask_nms: iou_threshold must be a Python float (not NaN), got {iou_threshold!r}")


# ---- backend choice and typed entry points ----


def mask_ops_backend(t: Tensor) -> Tuple[str, str]:
    """("native" | "reference", reason) for mask ops on tensors of ``t``'s device."""
    if FORCE_REFERENCE:
        return "reference", "SAM3FAST_FORCE_REFERENCE=1"
    if NATIVE_IMPORT_ERROR is not None:
        return "reference", f"sam3fast._C is not built ({NATIVE_IMPORT_ERROR}); `python -m sam3fast.info` says why"
    dev = t.device.type
    if dev == "cpu":
        if NATIVE_CPU:
            return "native", "C++ CPU kernel"
        return "reference", "this sam3fast._C predates the mask ops: rebuild it (`pip install --no-build-isolation -e .`)"
    if dev == "cuda":
        if NATIVE_CUDA:
            return "native", "CUDA kernel"
        return "reference", "sam3fast._C was built without CUDA kernels (`python -m sam3fast.info` says why)"
    return "reference", f"no native kernel for {dev} tensors"


def mask_areas(packed: Tensor) -> Tensor:
    """(N, H, WP) int32 packed masks -> (N,) int64 pixel counts."""
    _check_packed("mask_areas", "masks", packed)
    if mask_ops_backend(packed)[0] == "native":
        return torch.ops.sam3fast.mask_areas(packed)
    return mask_areas_ref(packed)


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of packed masks a (N, H, WP) and b (M, H, WP) -> (N, M) float32, equal to the
    official ``mask_iou`` on the unpacked masks (0 for two empty masks)."""
    _check_pair(a, b)
    if mask_ops_backend(a)[0] == "native":
        return torch.ops.sam3fast.mask_iou(a, b)
    return mask_iou_ref(a, b)


def mask_nms(packed: Tensor, scores: Tensor, iou_threshold: float, valid: Optional[Tensor] = None) -> Tensor:
    """Greedy mask NMS with a fixed-size output: packed (N, H, WP) int32, scores (N,) float (compared
    as float32), valid (N,) bool or None (all valid) -> keep (N,) bool. See the module docstring
    for the exact rule (the official ``nms_masks`` after its score prefilter)."""
    _check_nms(packed, scores, iou_threshold, valid)
    scores = scores.to(torch.float32)
    if mask_ops_backend(packed)[0] == "native":
        return torch.ops.sam3fast.mask_nms(packed, scores, float(iou_threshold), valid)
    return mask_nms_ref(packed, scores, float(iou_threshold), valid)


def nms_masks(pred_probs: Tensor, pred_masks: Tensor, prob_threshold: float, iou_threshold: float) -> Tensor:
    """Drop-in for the official ``sam3.perflib.nms.nms_masks``: probs (N,), mask logits (N, H, W)
    (foreground = logit > 0) -> keep (N,) bool, the same answer without its host syncs."""
    if pred_masks.dim() != 3 or pred_probs.shape != pred_masks.shape[:1]:
        raise ValueError(
            f"nms_masks: expects probs (N,) and masks (N, H, W), got {tuple(pred_probs.shape)} and {tuple(pred_masks.shape)}"
        )
    return mask_nms(pack_masks(pred_masks > 0), pred_probs, iou_threshold, valid=pred_probs > prob_threshold)
