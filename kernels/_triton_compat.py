"""What the Triton kernel files share: the optional ``triton`` import and small launcher helpers.

triton is the optional "gpu" extra: without it ``HAS_TRITON`` is False, ``TRITON_IMPORT_ERROR`` says
why, ``triton`` and ``tl`` are None, and the references and CPU ops still work. Each kernel file
imports these names, so ``<kernel module>.HAS_TRITON`` keeps working. The Triton interpreter
(TRITON_INTERPRET=1) is read when a kernel is decorated, i.e. when a kernel file is imported, not
here: importing triton earlier does not fix the choice.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = ""
except ImportError as _e:
    triton = tl = None
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

__all__ = ["HAS_TRITON", "TRITON_IMPORT_ERROR", "triton", "tl", "cdiv", "require_triton", "check_power_of_two",
           "device_guard", "why_not_triton", "triton_backend", "KERNEL_DTYPES", "interpreted"]


def interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function, as its module decorated it) runs under the
    Triton interpreter (TRITON_INTERPRET=1 when that module was imported). The interpreter casts
    float32 -> bf16 by truncation (Triton 3.7), so the kernels that round to bf16 take a
    ``BF16_BY_HAND`` flag and round to nearest even themselves when interpreted."""
    return HAS_TRITON and not isinstance(kernel, triton.runtime.JITFunction)


def cdiv(a, b):
    return (a + b - 1) // b


def require_triton(op: str) -> None:
    """Raises RuntimeError naming ``op`` and the import error when triton is missing (launchers)."""
    if not HAS_TRITON:
        raise RuntimeError(f"the Triton {op} kernel needs triton ({TRITON_IMPORT_ERROR})")


def check_power_of_two(name: str, value: int, minimum: int = 1) -> None:
    """Block sizes feed ``tl.arange``: powers of two, at least ``minimum`` (16 where ``tl.dot`` needs it)."""
    if value < minimum or value & (value - 1):
        at_least = "" if minimum == 1 else f" >= {minimum}"
        raise ValueError(f"{name} must be a power of two{at_least}, got {value}")


def device_guard(device: torch.device):
    """Launch on ``device``'s CUDA context (the caller's current device may be another GPU); no-op off
    CUDA (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# Tests only: take the modules' CUDA dispatch (each op's kernel path) with CPU tensors too, where each
# registered op runs its CPU kernel (the reference) and the few entry points that launch directly off
# CUDA run their Triton kernels under the interpreter. The bf16 error-budget tests run whole sessions
# so, to catch what only the CUDA path's wiring gets wrong (a dtype the kernels refuse, a float32
# island's parameters, shapes): the first H200 run of 2026-11-27 found such a bug on the device.
KERNEL_PATHS_ON_CPU = False


def why_not_triton(device: torch.device, force_reference: bool) -> Optional[str]:
    """The checks every backend choice starts with, in order: the reason a Triton kernel cannot serve
    tensors on ``device`` (``force_reference``: SAM3FAST_FORCE_REFERENCE, read by the caller from
    ``sam3fast.env``), or None; each op then adds its own limits (dtype, size)."""
    if force_reference:
        return "SAM3FAST_FORCE_REFERENCE=1"
    if device.type != "cuda" and not (KERNEL_PATHS_ON_CPU and device.type == "cpu"):
        return f"{device.type} tensors (the Triton kernel runs on CUDA)"
    if not HAS_TRITON:
        return f"triton is not importable ({TRITON_IMPORT_ERROR})"
    return None


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_backend(x: torch.Tensor, force_reference: bool, limit: Optional[str] = None,
                   dtypes=KERNEL_DTYPES):
    """The backend choice the ops share: ("reference", reason) for ``why_not_triton``'s reasons, a
    dtype not in ``dtypes``, or ``limit`` (the op's own size check: why it cannot take x, or None);
    else ("triton", "CUDA tensors, triton available")."""
    why = why_not_triton(x.device, force_reference)
    if why is not None:
        return "reference", why
    if x.dtype not in dtypes:
        return "reference", f"{x.dtype} inputs (the Triton kernel takes float32/bfloat16/float16)"
    if limit is not None:
        return "reference", limit
    return "triton", "CUDA tensors, triton available"


def output_buffer(out, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A launcher's output: a fresh contiguous tensor, or the caller's ``out`` checked to be one of
    that shape, dtype and device (tests pass one pre-filled with NaN)."""
    shape = tuple(shape)
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if (tuple(out.shape), out.dtype, out.device) != (shape, dtype, torch.device(device)) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {shape} {dtype} tensor on {device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def rows_contiguous(*tensors: torch.Tensor):
    """Each tensor with a contiguous last dim (views from projections pass as they are)."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)
