"""Builders: the drop-in ``build_sam3_image_model`` and the native one.

The model is built on the meta device and the checkpoint's (memory-mapped) tensors are assigned to
it, so the 840 M parameters are never allocated twice. Without a checkpoint (``load_from_HF=False``
and no path) the model is materialised with random weights, as the official builder does.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Union

import torch

from .checkpoint import (
    CheckpointError, float32_islands, keeps_float32, load_into, model_dtype_parts, read_state_dict,
    resolve_checkpoint_path, _image_keys_from_official,
)
from .config import Sam3Config, get_config
from .model.sam3_image import Sam3ImageModel

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use float32 or bfloat16")


def _resolve_device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA device is available")
    return device


def _cast_floating_(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and buffers only (``Module.to(dtype)`` would also touch the complex
    RoPE tables); those of float32 islands (less their parts that follow the model's dtype) stay
    float32."""
    islands, parts = float32_islands(model), model_dtype_parts(model)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        want = torch.float32 if keeps_float32(name, islands, parts) else dtype
        if t.is_floating_point() and t.dtype != want:
            t.data = t.data.to(want)


def _materialize_nonpersistent(model: torch.nn.Module, device: torch.device) -> None:
    """Modules keep derived, non-checkpoint buffers; after a meta build they are re-derived."""
    for m in model.modules():
        fn = getattr(m, "reset_derived_buffers", None)
        if fn is not None:
            fn(device)
    left = [n for n, b in model.named_buffers() if b.is_meta] + [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensors left on the meta device after loading: {left[:10]}")


def instantiate(factory, state_dict, device: torch.device, dtype: torch.dtype,
                random_weights_seed: Optional[int] = None):
    """Build ``factory()`` with weights: with a ``state_dict``, on the meta device and then the
    (memory-mapped) tensors assigned strictly; without, stable random weights, reproducibly (buffers
    drawn at construction, like the prompt encoder's random-Fourier matrix, come from a seeded fork
    of the global generator, which is left untouched)."""
    if state_dict is not None:
        with torch.device("meta"):
            model = factory()
        load_into(model, state_dict, dtype=dtype, device=device)
    else:
        from .model.init import stable_random_init_

        seed = 0 if random_weights_seed is None else random_weights_seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory()
        stable_random_init_(model, seed=seed)
        model = model.to(device=device)
        _cast_floating_(model, dtype)
    _materialize_nonpersistent(model, device)
    model.random_weights = state_dict is None
    return model.eval().requires_grad_(False)


def build_image_model(
    config: Union[str, Sam3Config] = "sam3",
    checkpoint_path: Optional[str] = None,
    device=None,
    dtype=torch.float32,
    enable_segmentation: bool = True,
    enable_inst_interactivity: bool = False,
    random_weights_seed: Optional[int] = None,
    bpe_path: Optional[str] = None,
) -> Sam3ImageModel:
    """Native builder. With ``checkpoint_path`` the weights are loaded strictly; otherwise the model
    gets stable random weights drawn with ``random_weights_seed`` (default 0)."""
    cfg = get_config(config) if isinstance(config, str) else config
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype)
    image_sd = None
    if checkpoint_path is not None:
        image_sd, tracker_sd = _image_keys_from_official(read_state_dict(checkpoint_path))
        if enable_inst_interactivity:
            if not tracker_sd:
                raise CheckpointError(
                    f"{checkpoint_path} has no tracker weights (tracker.* keys), which "
                    "enable_inst_interactivity=True needs"
                )
            image_sd.update({"inst_interactive_predictor.model." + k: v for k, v in tracker_sd.items()})
        # Without interactivity the tracker's keys (tracker.*) are set aside; nothing else is
        # dropped: every other key is matched strictly.
        if not enable_segmentation:
            image_sd = {k: v for k, v in image_sd.items() if not k.startswith("segmentation_head.")}
    return instantiate(
        lambda: Sam3ImageModel(cfg, enable_segmentation=enable_segmentation,
                               enable_inst_interactivity=enable_inst_interactivity, bpe_path=bpe_path),
        image_sd, device, dtype, random_weights_seed,
    )


def build_sam3_image_model(
    bpe_path=None,
    device="cuda" if torch.cuda.is_available() else "cpu",
    eval_mode=True,
    checkpoint_path=None,
    load_from_HF=True,
    enable_segmentation=True,
    enable_inst_interactivity=False,
    compile=False,
    *,
    config: Union[str, Sam3Config] = "sam3",
    dtype=torch.float32,
):
    """Drop-in for ``sam3.build_sam3_image_model`` (same arguments), plus ``config`` and ``dtype``.

    With ``load_from_HF=True`` and no ``checkpoint_path`` the checkpoint is taken from the Hugging
    Face hub cache; when it is not there a :class:`~sam3fast.checkpoint.CheckpointError` says how to
    get it (nothing is downloaded at build time here: the weights are gated).
    """
    if bpe_path is not None and not os.path.exists(bpe_path):
        raise FileNotFoundError(f"bpe_path does not exist: {bpe_path}")
    if not eval_mode:
        warnings.warn("sam3fast is inference-only: eval_mode=False is ignored", stacklevel=2)
    path = resolve_checkpoint_path(checkpoint_path, load_from_HF)
    model = build_image_model(config=config, checkpoint_path=path, device=device, dtype=dtype,
                              enable_segmentation=enable_segmentation,
                              enable_inst_interactivity=enable_inst_interactivity, bpe_path=bpe_path)
    if compile:
        model.compile_stages()
    return model
