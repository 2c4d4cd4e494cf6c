"""Count the places where code reads tensor values on the host (each one a device sync on a GPU):
``Tensor.item/__bool__/tolist/__int__/__float__/__index__/nonzero/cpu/numpy`` and boolean-mask
indexing. A CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``, which needs a GPU."""

from __future__ import annotations

import contextlib
import os
import traceback

import torch

HOST_READS = ("item", "__bool__", "tolist", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


def _bool_index(self, idx, *a):
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


@contextlib.contextmanager
def record_host_reads(monkeypatch, armed):
    """Patch the reading methods; while ``armed[0]`` is true, append ``(method, "file:line:function")``
    of the innermost sam3fast frame ("?" if none) to the yielded list."""
    hits = []

    def wrap(owner, name, when=None):
        orig = getattr(owner, name)

        def counted(*a, _orig=orig, _name=name, **k):
            if armed[0] and (when is None or when(*a, **k)):
                frames = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}sam3fast{os.sep}" in f.filename
                          or f"{os.sep}kernels{os.sep}" in f.filename]
                f = frames[-1] if frames else None
                site = f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" if f else "?"
                hits.append((_name, site))
            return _orig(*a, **k)

        monkeypatch.setattr(owner, name, counted)

    for name in HOST_READS:
        wrap(torch.Tensor, name)
    wrap(torch.Tensor, "__getitem__", _bool_index)
    try:
        yield hits
    finally:
        monkeypatch.undo()
