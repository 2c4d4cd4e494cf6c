"""Count the places where code reads tensor values on the host (each one a device sync on a GPU):
``Tensor.item/__bool__/tolist/__int__/__float__/__index__/nonzero/cpu/numpy`` and boolean-mask
indexing. A CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``, which needs a GPU.

A ``TorchFunctionMode`` sees these calls without touching ``torch.Tensor`` (patching its dunder
methods, even temporarily, changes CPython's type slots for good: afterwards a tensor passes
``PySequence_Check`` and ``torch.tensor([0-d tensors])`` fails)."""

from __future__ import annotations

import contextlib
import os
import traceback

import torch
from torch.overrides import TorchFunctionMode

HOST_READS = ("item", "__bool__", "tolist", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


def _bool_index(args):
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


class _Recorder(TorchFunctionMode):
    def __init__(self, armed, hits):
        super().__init__()
        self.armed, self.hits = armed, hits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.armed[0]:
            name = getattr(func, "__name__", "")
            if name in HOST_READS or (name == "__getitem__" and _bool_index(args)):
                frames = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}sam3fast{os.sep}" in f.filename
                          or f"{os.sep}kernels{os.sep}" in f.filename]
                f = frames[-1] if frames else None
                self.hits.append((name, f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" if f else "?"))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def record_host_reads(monkeypatch, armed):
    """While ``armed[0]`` is true, append ``(method, "file:line:function")`` of the innermost
    sam3fast frame ("?" if none) to the yielded list for every host read. ``monkeypatch`` is
    undone at exit (callers patch model methods with it)."""
    hits = []
    try:
        with _Recorder(armed, hits):
            yield hits
    finally:
        monkeypatch.undo()
