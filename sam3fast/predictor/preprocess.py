"""Image input checks and the official image preprocessing, reproduced without torchvision.

The official ``Sam3Processor`` runs torchvision v2 ``ToDtype(uint8, scale=True)`` ->
``Resize((R, R))`` (bilinear, antialias) -> ``ToDtype(float32, scale=True)`` ->
``Normalize(0.5, 0.5)`` on the device the image was moved to. Resizing a uint8 image is done natively
in uint8 on CPUs with AVX2/AVX512 (or ARM) and in float32 then rounded everywhere else (GPU): both
rules are kept here so the pixels fed to the ViT are the official ones.
"""

from __future__ import annotations

import platform
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F


def _native_uint8_resize(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    if torch.compiler.is_compiling():
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def image_to_uint8_chw(image) -> torch.Tensor:
    """PIL image, HWC numpy array or CHW tensor -> (3, H, W) uint8 tensor, with clear errors.

    Float inputs must be in [0, 1] and are scaled as torchvision's ``ToDtype(uint8, scale=True)``
    does (x * 255.999, truncated). PIL images in another mode ("L", "RGBA", ...) are converted to
    RGB (the official code would fail later inside the ViT with a channel mismatch).
    """
    try:
        import PIL.Image

        is_pil = isinstance(image, PIL.Image.Image)
    except ImportError:  # pragma: no cover
        is_pil = False
    if is_pil:
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image is empty ({image.width}x{image.height})")
        if image.mode != "RGB":
            image = image.convert("RGB")
        # Not made contiguous: torchvision's pil_to_tensor leaves this channels-last view, and the
        # native uint8 resize kernel is chosen by memory format.
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"a numpy image must be HWC with 3 channels (RGB), got shape {tuple(image.shape)}"
            )
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    elif isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                f"a tensor image must be CHW with 3 channels (RGB), got shape {tuple(image.shape)}"
            )
        t = image.detach()
    else:
        raise ValueError(
            f"image must be a PIL image, an HWC numpy array or a CHW tensor, got {type(image).__name__}"
        )
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"image is empty (shape {tuple(t.shape)})")
    if t.dtype == torch.uint8:
        return t
    if t.is_floating_point():
        lo, hi = torch.aminmax(t.float())
        if not (torch.isfinite(lo) and torch.isfinite(hi)) or lo < 0 or hi > 1:
            raise ValueError(
                f"a float image must hold values in [0, 1], got range [{lo.item():.4g}, {hi.item():.4g}]"
            )
        return t.mul(255.0 + 1.0 - 1e-3).to(torch.uint8)
    raise ValueError(f"image dtype must be uint8 or floating point in [0, 1], got {t.dtype}")


def resize_uint8(img: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """torchvision v2 ``Resize`` (bilinear, antialias) of a (N, 3, H, W) or (3, H, W) uint8 image."""
    squeeze = img.dim() == 3
    x = img[None] if squeeze else img
    n, c, h, w = x.shape
    if n == 1 and x.is_contiguous(memory_format=torch.channels_last) and x.numel() != x.stride(0):
        # torchvision's restride so interpolate keeps a single channels-last image channels-last
        x = x.as_strided((1, c, h, w), (x.numel(),) + tuple(x.stride()[1:]))
    if tuple(x.shape[-2:]) != tuple(size):
        if _native_uint8_resize(x.device):
            x = F.interpolate(x, size=list(size), mode="bilinear", align_corners=False, antialias=True)
        else:
            y = F.interpolate(x.float(), size=list(size), mode="bilinear", align_corners=False, antialias=True)
            x = y.round_().to(torch.uint8)
    return x[0] if squeeze else x


def normalize(img_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 -> float in [-1, 1]: ToDtype(float32, scale=True) then Normalize(0.5, 0.5)."""
    x = img_uint8.to(torch.float32).mul_(1.0 / 255)
    return x.sub_(0.5).div_(0.5).to(dtype)


def preprocess(image, resolution: int, device, dtype: torch.dtype = torch.float32):
    """One image -> ((3, R, R) normalized tensor on ``device``, original height, original width)."""
    t = image_to_uint8_chw(image)
    h, w = int(t.shape[1]), int(t.shape[2])
    t = t.to(device)
    return normalize(resize_uint8(t, (resolution, resolution)), dtype), h, w
