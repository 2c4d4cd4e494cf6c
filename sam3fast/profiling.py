"""NVTX ranges around the engine's stages, for Nsight Systems timelines.

Off by default at (near) zero cost: ``stage(name)`` is then a shared ``nullcontext``. Turn on with
``SAM3FAST_NVTX=1`` or :func:`enable_nvtx`. Ranges sit at stage boundaries in the predictors, never
inside compiled regions (a Python call there would break the graph).
"""

from __future__ import annotations

import contextlib

from . import env

_NULL = contextlib.nullcontext()
_enabled = env.NVTX
_nvtx = None


def enable_nvtx(on: bool = True) -> None:
    global _enabled, _nvtx
    if on and _nvtx is None:
        try:
            import nvtx
        except ImportError as e:
            raise RuntimeError("NVTX ranges need the `nvtx` package (pip install nvtx)") from e
        _nvtx = nvtx
    _enabled = on


def nvtx_enabled() -> bool:
    return _enabled


def stage(name: str):
    """Context manager: an NVTX range ``name`` in the ``sam3fast`` domain when enabled."""
    if not _enabled:
        return _NULL
    if _nvtx is None:
        enable_nvtx(True)
    return _nvtx.annotate(name, domain="sam3fast", color="green")
