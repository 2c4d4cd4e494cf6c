"""Checkpoint loading: the official ``sam3.pt`` (and plain state dicts) into sam3fast modules.

Layouts accepted:
* the released ``sam3.pt``: ``detector.*`` (image model) and ``tracker.*`` keys, optionally under a
  top-level ``"model"`` entry;
* a plain image-model state dict (the keys of ``sam3fast``'s image model, no prefix), e.g. what
  ``Sam3ImageModel.state_dict()`` saves;
* either of them saved in bfloat16 (or float16): floating tensors are cast to the model's dtype.

Loading is strict: missing, unexpected or mis-shaped keys raise one :class:`CheckpointError` that
lists them all. Keys of components that were not built (the tracker when interactivity is off, the
SAM 2 neck) are set aside, not errors, so the full ``sam3.pt`` loads into the image model. The file
is memory-mapped and the model is built on the meta device, so weights are never held twice in RAM.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

HF_REPO_ID = "facebook/sam3"
HF_CKPT_NAME = "sam3.pt"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model."""


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a checkpoint file memory-mapped on the CPU and return its flat state dict."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint file is empty: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (expected the zip format written by torch.save; "
            "the file may be truncated or corrupt)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"could not read checkpoint {path} (truncated or corrupt?): {e}") from e
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a flat state dict of tensors; offending entries: {bad[:10]}")
    return dict(obj)


def _image_keys_from_official(sd: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Split a state dict into (image-model keys, tracker keys) in sam3fast's image-model naming."""
    if any(k.startswith("detector.") for k in sd):
        image = {k[len("detector."):]: v for k, v in sd.items() if k.startswith("detector.")}
        tracker = {k[len("tracker."):]: v for k, v in sd.items() if k.startswith("tracker.")}
        other = [k for k in sd if not k.startswith(("detector.", "tracker."))]
        if other:
            raise CheckpointError(
                "checkpoint mixes the official detector./tracker. layout with other keys: "
                + ", ".join(sorted(other)[:20])
            )
        return image, tracker
    tracker = {k[len("inst_interactive_predictor.model."):]: v for k, v in sd.items()
               if k.startswith("inst_interactive_predictor.model.")}
    image = {k: v for k, v in sd.items() if not k.startswith("inst_interactive_predictor.model.")}
    return image, tracker


# Prefixes of optional components: when the model did not build them, their keys are set aside.
OPTIONAL_PREFIXES = ("backbone.vision_backbone.sam2_convs.",)


def _fmt(keys: Iterable[str], limit: int = 40) -> str:
    keys = sorted(keys)
    s = "\n    ".join(keys[:limit])
    if len(keys) > limit:
        s += f"\n    ... and {len(keys) - limit} more"
    return s


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor],
                     optional_prefixes: Tuple[str, ...] = OPTIONAL_PREFIXES) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Strictly match ``sd`` against ``model``'s state-dict keys and shapes.

    Returns (the entries to load, the keys set aside because their component was not built).
    Raises :class:`CheckpointError` listing every missing, unexpected and mis-shaped key.
    """
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in sd]
    set_aside, unexpected = [], []
    for k in sd:
        if k in expected:
            continue
        if any(k.startswith(p) for p in optional_prefixes):
            set_aside.append(k)
        else:
            unexpected.append(k)
    misshaped = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    badtype = [
        f"{k}: checkpoint {sd[k].dtype} vs model {expected[k].dtype}"
        for k in expected if k in sd and sd[k].is_complex() != expected[k].is_complex()
    ]
    if missing or unexpected or misshaped or badtype:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s):\n    {_fmt(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s):\n    {_fmt(unexpected)}")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped key(s):\n    {_fmt(misshaped)}")
        if badtype:
            parts.append(f"{len(badtype)} key(s) of the wrong kind:\n    {_fmt(badtype)}")
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(parts))
    return {k: sd[k] for k in expected}, set_aside


def float32_islands(model: nn.Module) -> Tuple[str, ...]:
    """The state-dict prefixes whose floating tensors stay float32 whatever the model's dtype: "name."
    of each submodule marked ``fp32_island = True``, and the full names of the parameters a module
    lists in ``fp32_params``."""
    out = []
    for name, m in model.named_modules():
        if getattr(m, "fp32_island", False) and name:
            out.append(name + ".")
        out.extend((name + "." if name else "") + p for p in getattr(m, "fp32_params", ()))
    return tuple(out)


def model_dtype_parts(model: nn.Module) -> Tuple[str, ...]:
    """The state-dict prefixes ("name.") of the submodules marked ``follows_model_dtype = True``
    inside a float32 island: their floating tensors take the model's dtype all the same (the query
    decoder's image cross-attention, which computes in the memory's dtype)."""
    return tuple(name + "." for name, m in model.named_modules() if name and getattr(m, "follows_model_dtype", False))


def keeps_float32(name: str, islands: Tuple[str, ...], parts: Tuple[str, ...]) -> bool:
    """Whether the tensor ``name`` stays float32 in a model of another dtype: inside one of the
    ``islands`` (:func:`float32_islands`) and not inside one of its ``parts`` that follow the model's
    dtype (:func:`model_dtype_parts`)."""
    return name.startswith(islands) and not name.startswith(parts)


def load_into(model: nn.Module, sd: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
              device: Optional[torch.device] = None) -> List[str]:
    """Assign ``sd`` to ``model`` (which may live on the meta device) strictly.

    Floating tensors are cast to ``dtype`` (default: float32), those of float32 islands
    (:func:`float32_islands`, less their :func:`model_dtype_parts`) to float32; complex buffers keep
    their dtype. Returns the keys set aside (components not built).
    """
    dtype = dtype or torch.float32
    islands, parts = float32_islands(model), model_dtype_parts(model)
    entries, set_aside = check_state_dict(model, sd)
    out = {}
    for k, v in entries.items():
        if v.is_floating_point():
            v = v.to(dtype=torch.float32 if keeps_float32(k, islands, parts) else dtype)
        if device is not None:
            v = v.to(device)
        out[k] = v
    # assign=True keeps the (memory-mapped) tensors themselves when no cast or move was needed.
    model.load_state_dict(out, strict=True, assign=True)
    return set_aside


def resolve_checkpoint_path(checkpoint_path: Optional[str], load_from_HF: bool) -> Optional[str]:
    """The official builder's rule: an explicit path wins; else with ``load_from_HF`` use the hub
    cache (offline: this never downloads); else no checkpoint."""
    if checkpoint_path is not None:
        return os.fspath(checkpoint_path)
    if not load_from_HF:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError("huggingface_hub is needed to find sam3.pt in the hub cache") from e
    cached = try_to_load_from_cache(HF_REPO_ID, HF_CKPT_NAME)
    if isinstance(cached, str) and os.path.exists(cached):
        return cached
    raise CheckpointError(
        f"no checkpoint_path was given and {HF_REPO_ID}/{HF_CKPT_NAME} is not in the Hugging Face hub "
        "cache. The SAM 3 weights are gated: accept the license at https://huggingface.co/facebook/sam3, "
        "then `huggingface-cli login` and `huggingface-cli download facebook/sam3 sam3.pt` (or pass "
        "checkpoint_path=/path/to/sam3.pt, or load_from_HF=False for random weights)."
    )
