"""A function of tensors replayed from CUDA graphs, one per input signature.

:class:`GraphedCall` wraps ``fn(*args, **kwargs) -> outputs`` where the arguments and the outputs
are pytrees (dicts, lists, tuples) of tensors and plain values. Per signature (the pytree
structure, every tensor's shape, dtype and device, every plain value), on CUDA, it keeps static
copies of the input tensors and a ``torch.cuda.CUDAGraph`` of ``fn`` on them, captured on first use
(:func:`~sam3fast.predictor.graphs.warm_up_and_capture`: warm-up on a side stream, every graph
of the call in one memory pool). A call copies its tensors into those buffers, replays and returns
clones of the outputs, so they stay valid after the next replay, except the tensors that ``fn``
returns without computing them (a cached position encoding, a weight: :func:`persistent_outputs`),
returned as they are (``fn`` must not write into those later). Plain values are baked into the
graph (a different value is a different signature). ``fn`` must not read tensor values on the
host, nor branch on them: what ``torch.cuda.graph`` cannot capture raises there, and that
signature then runs eagerly from then on (logged once).

Off CUDA, or with ``cuda_graphs=False``, the call runs ``fn`` on the same buffers eagerly (the
copy-in/clone-out logic is what the CPU tests cover), unless ``buffers=False``, where it calls
``fn`` directly. The drop-in :class:`~sam3fast.predictor.image.Sam3Processor` uses it for
``set_image`` (the backbone) and for the prompt heads: both are host-bound when run eagerly
(H100, bf16: the ViT trunk took 19.3 ms of host time for 13.6 ms of kernels, the heads ~30 ms of
host time for ~7 ms of kernels; bench/results/profile_image_*_2026-11-26_run2.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils import _pytree as pytree

from .graphs import check_warmup_iters, persistent_outputs, pool_for_capture, resolve_cuda_graphs, warm_up_and_capture

log = logging.getLogger(__name__)


@dataclass
class _Graphed:
    inputs: list  # the static input leaves (tensors; plain values as they were)
    graph: Optional["torch.cuda.CUDAGraph"] = None
    outputs: Any = None
    replays: int = 0
    failed: Optional[str] = None  # why this signature runs eagerly (a capture that failed)
    shared: Optional[List[bool]] = None  # per output leaf: returned without a clone (persistent_outputs)


def _signature(leaves) -> tuple:
    sig = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            sig.append(("T", tuple(x.shape), x.dtype, x.device))
        else:
            try:
                hash(x)
            except TypeError:
                raise TypeError(f"GraphedCall arguments must be tensors or hashable values, got {type(x).__name__}")
            sig.append(("V", type(x).__name__, x))
    return tuple(sig)


def _clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


def _clone_fresh(out, shared: Optional[List[bool]]):
    """``out`` with every tensor leaf cloned but those ``shared`` marks."""
    if shared is None:
        return pytree.tree_map(_clone, out)
    leaves, spec = pytree.tree_flatten(out)
    return pytree.tree_unflatten([x if keep else _clone(x) for x, keep in zip(leaves, shared)], spec)


class GraphedCall:
    """``fn`` replayed from a CUDA graph per input signature (see the module docstring).

    ``device``: where ``fn`` runs; ``cuda_graphs`` None = on CUDA devices, True off CUDA raises;
    ``max_graphs``: signatures captured at most (more run eagerly, with a log line), so that a
    stream of varying shapes cannot fill the device with graphs; ``capture_after``: calls of a
    signature that run eagerly (``fn`` directly) before it is captured. A capture costs about
    ``warmup_iters`` + 1 eager calls, so 1 keeps one-off signatures (an interactive session's
    growing number of boxes) from paying it.
    """

    def __init__(self, fn: Callable, device, *, cuda_graphs: Optional[bool] = None, warmup_iters: int = 2,
                 max_graphs: int = 16, capture_after: int = 0, name: str = "graphed_call", buffers: bool = True):
        self.fn = fn
        self.device = torch.device(device)
        self.cuda_graphs = resolve_cuda_graphs(cuda_graphs, self.device, f"{name} (a model)")
        self.warmup_iters = check_warmup_iters(warmup_iters)
        if max_graphs < 0:
            raise ValueError(f"max_graphs must be >= 0, got {max_graphs}")
        self.max_graphs = int(max_graphs)
        if capture_after < 0:
            raise ValueError(f"capture_after must be >= 0, got {capture_after}")
        self.capture_after = int(capture_after)
        self._seen: Dict[tuple, int] = {}
        self.name = name
        self.buffers = bool(buffers)
        self.entries: Dict[tuple, _Graphed] = {}
        self._warned = set()

    def clear(self) -> None:
        """Forget every signature (graphs and buffers); the next calls capture again."""
        self.entries.clear()
        self._seen.clear()

    def graphs(self) -> int:
        return sum(e.graph is not None for e in self.entries.values())

    def __call__(self, *args, **kwargs):
        if not self.cuda_graphs and not self.buffers:
            return self.fn(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = (str(spec), _signature(leaves))
        e = self.entries.get(key)
        if e is None:
            seen = self._seen.get(key, 0)
            if seen < self.capture_after:
                self._seen[key] = seen + 1
                return self.fn(*args, **kwargs)
            if self.cuda_graphs and self.graphs() >= self.max_graphs:
                if key not in self._warned:
                    self._warned.add(key)
                    log.info("%s: %d graphs captured already (max_graphs); this signature runs eagerly",
                             self.name, self.graphs())
                return self.fn(*args, **kwargs)
            e = _Graphed(inputs=[_clone(x) for x in leaves])
            self.entries[key] = e
            if self.cuda_graphs:
                return self._capture(e, spec)
        else:
            for dst, src in zip(e.inputs, leaves):
                if isinstance(dst, torch.Tensor):
                    dst.copy_(src)
        if e.graph is None:
            a, kw = pytree.tree_unflatten(e.inputs, spec)
            return pytree.tree_map(_clone, self.fn(*a, **kw))  # (eager on the buffers: never aliases them)
        e.graph.replay()
        e.replays += 1
        return _clone_fresh(e.outputs, e.shared)

    def _capture(self, e: _Graphed, spec):
        a, kw = pytree.tree_unflatten(e.inputs, spec)
        pool = pool_for_capture(x.graph for x in self.entries.values())
        try:
            # thread_local, as the video runners capture: a frame loader thread may use CUDA meanwhile
            # (in the default "global" mode its calls would fail, or break this capture)
            g, out, warm = warm_up_and_capture(lambda: self.fn(*a, **kw), self.warmup_iters, pool, self.name,
                                               capture_error_mode="thread_local")
        except RuntimeError as err:
            e.failed = f"capture failed: {type(err).__name__}: {err}"[:300]
            log.warning("%s: %s; this signature runs eagerly", self.name, e.failed)
            return pytree.tree_map(_clone, self.fn(*a, **kw))
        e.graph, e.outputs = g, out
        e.shared = persistent_outputs(out, warm, e.inputs)
        del warm
        # the capture recorded the work but did not run it: replay once for this call's outputs
        g.replay()
        e.replays += 1
        return _clone_fresh(out, e.shared)
