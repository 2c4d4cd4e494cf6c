"""``python -m sam3fast.info``: versions, GPUs, and which native ops are built (and why not).

``collect()`` returns the same facts as a dict (for bug reports and tests).
"""

from __future__ import annotations

import importlib
import platform
import sys

import torch

# sam3fast._C.CUDA_SKIP codes, set by setup.py (keep the two tables in step).
CUDA_SKIP_REASONS = {
    0: "",
    1: "left out at build time: SAM3FAST_BUILD_CUDA=0",
    2: "left out at build time: torch was a CPU build (torch.version.cuda is None)",
    3: "left out at build time: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)",
}
_DISPATCH_KEYS = ("CPU", "CUDA", "Meta")


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except ImportError:
        return "not installed"


def _gpus() -> list[str]:
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    return out


def collect() -> dict:
    from . import __version__
    from .assignment import NATIVE_IMPORT_ERROR

    info = {
        "sam3fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "gpus": _gpus(),
    }

    native = {"built": NATIVE_IMPORT_ERROR is None}
    if NATIVE_IMPORT_ERROR is not None:
        native["reason"] = (
            f"sam3fast._C does not import ({NATIVE_IMPORT_ERROR}); build it with "
            "`pip install --no-build-isolation -e .`"
        )
    else:
        from . import _C

        native["path"] = _C.__file__
        native["cuda_kernels"] = bool(_C.WITH_CUDA)
        if not _C.WITH_CUDA:
            native["cuda_reason"] = CUDA_SKIP_REASONS.get(_C.CUDA_SKIP, f"unknown code {_C.CUDA_SKIP}")
        elif not torch.cuda.is_available():
            native["cuda_reason"] = "built, but no CUDA device is visible now"
    try:  # registers the Triton-backed ops too, so that they are listed
        importlib.import_module("sam3fast.ops")
    except ImportError as e:
        native["ops_import_error"] = f"{type(e).__name__}: {e}"
    ops = {}
    for name in sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("sam3fast::")):
        ops[name] = [k for k in _DISPATCH_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
    native["ops"] = ops
    info["native"] = native
    return info


def main() -> None:
    info = collect()
    width = 12
    for key in ("sam3fast", "python", "platform", "torch", "torch_cuda", "triton", "numpy", "scipy"):
        print(f"{key:<{width}} {info[key]}")
    print(f"{'gpus':<{width}} {', '.join(info['gpus']) or 'none visible'}")
    native = info["native"]
    if not native["built"]:
        print(f"{'native ops':<{width}} NOT BUILT: {native['reason']}")
    else:
        cuda = "with CUDA kernels" if native["cuda_kernels"] else "CPU only"
        print(f"{'native ops':<{width}} sam3fast._C, {cuda} ({native['path']})")
        if "cuda_reason" in native:
            print(f"{'':<{width}} CUDA: {native['cuda_reason']}")
    if "ops_import_error" in native:
        print(f"{'':<{width}} sam3fast.ops does not import: {native['ops_import_error']}")
    if native["ops"]:
        print(f"{'op':<{width}} kernels registered ({'/'.join(_DISPATCH_KEYS)})")
        for name, keys in native["ops"].items():
            print(f"  {name:<40} {', '.join(keys) or 'none'}")


if __name__ == "__main__":
    main()
