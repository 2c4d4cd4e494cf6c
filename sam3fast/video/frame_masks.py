"""One frame's video-resolution object masks, held as their low-resolution logits.

The official ``Sam3VideoBase.build_outputs`` answers a frame with ``obj_id -> (1, H, W) bool``
masks: each object's low-resolution logits (h, w) (the tracker's, a new detection's after hole
filling, or a re-conditioning detection's) resized to the video size (bilinear,
``align_corners=False``) and thresholded at 0. The official keeps every such mask on the device
for the ``hotstart_delay`` frames its outputs are held, caches every frame's masks, and
post-processes them at full resolution (boxes, object-wise non-overlap) before one copy per
array to the host.

:class:`FrameMasks` is that mapping with the masks left unmade: it holds the (N, h, w) logits,
one row per object, and the output size. Reading ``masks[obj_id]`` makes that mask (the same
resize and threshold, in float32) and gives the very values the official builds: float32
bilinear interpolation of float32 logits is the official's computation, and for bfloat16 or
float16 logits it only skips the final rounding of the interpolated value to that dtype, which
keeps its sign unless it underflows to 0 there (below ~6e-8 in float16, ~1e-40 in bfloat16; the
SAM 3 tracker's logits are float32 in a bfloat16 model, the detector's masks bfloat16). The video model's output path does not read the masks one by one: it hands
the logits to ``sam3fast::mask_postprocess`` (:func:`sam3fast.ops.mask_postprocess`), which
resizes, thresholds, applies the non-overlap rule, measures boxes and bit-packs in one pass, so
neither the held frames, the cache, nor the copy to the host carry full-resolution bytes
(at 1080p, 2 MB per object and frame as bool, 0.26 MB packed, 0.33 MB as 288 x 288 float32 logits).

Letters: N objects, (h, w) low-resolution grid, (H, W) video size.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FrameMasks", "resize_threshold", "to_device_async"]


def to_device_async(values, dtype: torch.dtype, device) -> Tensor:
    """Host values (a list or numpy array) as a new ``dtype`` tensor on ``device`` (never a view
    of ``values``). On CUDA through pinned memory without waiting: a copy from pageable memory
    synchronises the stream, i.e. waits for every kernel queued before it (in the video loop, the
    next frame's detection)."""
    t = torch.as_tensor(np.ascontiguousarray(values), dtype=dtype)
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, copy=True)


def resize_threshold(logits: Tensor, size: Tuple[int, int]) -> Tensor:
    """(N, h, w) logits -> (N, 1, H, W) bool: bilinear (``align_corners=False``) in float32, > 0."""
    if logits.shape[0] == 0:
        return torch.zeros((0, 1) + tuple(size), dtype=torch.bool, device=logits.device)
    up = F.interpolate(logits.unsqueeze(1).float(), size=tuple(size), mode="bilinear", align_corners=False)
    return up > 0


class FrameMasks(MutableMapping):
    """``obj_id -> (1, H, W) bool`` for one frame, stored as ``low`` (N, h, w) logits (any floating
    dtype, any device) and ``size`` (H, W). Rows may be shared by several instances (``subset``,
    ``copy``): nothing writes into ``low`` after construction. Deleting a key (``pop``, ``del``)
    forgets that object; setting a key is refused (:meth:`materialize` gives a plain dict). Every
    read of a value makes that mask (``[k]``, ``get``, ``values``, ``items``, ``pop``): the video
    model reads keys and logits only; ``==`` is refused (it would compare masks)."""

    __slots__ = ("low", "size", "_rows")

    def __init__(self, low: Tensor, ids: Sequence[int], size: Tuple[int, int], rows: Optional[Dict[int, int]] = None):
        if low.dim() != 3 or not low.is_floating_point():
            raise ValueError(f"low must be floating (N, h, w) logits, got {low.dtype} {tuple(low.shape)}")
        self.low = low
        self.size = (int(size[0]), int(size[1]))
        if rows is None:
            ids = [int(i) for i in ids]
            if len(ids) != low.shape[0] or len(set(ids)) != len(ids):
                raise ValueError(f"need {low.shape[0]} distinct object ids for {low.shape[0]} rows, got {ids}")
            rows = {i: r for r, i in enumerate(ids)}
        self._rows = rows

    # ------------------------------------------------------------------ Mapping
    def __getitem__(self, obj_id) -> Tensor:
        r = self._rows[obj_id]
        return resize_threshold(self.low[r:r + 1], self.size)[0]

    def __setitem__(self, obj_id, mask) -> None:
        raise TypeError("FrameMasks holds low-resolution logits: call materialize() for a dict to assign masks to")

    def __delitem__(self, obj_id) -> None:
        del self._rows[obj_id]

    def __contains__(self, obj_id) -> bool:  # (Mapping's default reads the value: it would make the mask)
        return obj_id in self._rows

    def clear(self) -> None:  # (MutableMapping's pops every item: it would make every mask)
        self._rows.clear()

    def __eq__(self, other):
        raise TypeError("FrameMasks are not compared (that would make every mask); compare keys or logits")

    __hash__ = None

    def __iter__(self) -> Iterator[int]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (f"FrameMasks(ids={list(self._rows)}, low={tuple(self.low.shape)} {self.low.dtype} on "
                f"{self.low.device}, size={self.size})")

    # ------------------------------------------------------------------ views and copies
    def copy(self) -> "FrameMasks":
        """A new mapping over the same rows (deleting from one leaves the other)."""
        return FrameMasks(self.low, (), self.size, rows=dict(self._rows))

    def subset(self, keys: Iterable[int]) -> "FrameMasks":
        """The objects of ``keys`` (in this mapping's order), sharing ``low``."""
        keep = set(keys)
        return FrameMasks(self.low, (), self.size, rows={k: r for k, r in self._rows.items() if k in keep})

    def compact(self) -> "FrameMasks":
        """The same objects over a ``low`` holding their rows only (a gather when other rows are
        held: objects deleted or left out by ``subset``)."""
        if len(self._rows) == self.low.shape[0]:
            return self
        ids = list(self._rows)
        low = self.logits(ids).clone()  # (a slice would keep the whole storage alive)
        if low.device.type == "cpu" and self.low.is_pinned():
            low = low.pin_memory()  # (retired logits go back to the device without a wait)
        return FrameMasks(low, ids, self.size)

    def with_low(self, low: Tensor) -> "FrameMasks":
        """The same objects over ``low`` (the same rows elsewhere, e.g. a host copy)."""
        if low.shape != self.low.shape:
            raise ValueError(f"low of shape {tuple(low.shape)} for rows of shape {tuple(self.low.shape)}")
        return FrameMasks(low, (), self.size, rows=dict(self._rows))

    def to(self, device, non_blocking: bool = False) -> "FrameMasks":
        return self.with_low(self.low.to(device, non_blocking=non_blocking))

    def logits(self, ids: Sequence[int]) -> Tensor:
        """(len(ids), h, w) logits of ``ids`` in that order (a view when they are the stored rows
        in order, one gather otherwise)."""
        rows = [self._rows[i] for i in ids]
        if not rows:
            return self.low[:0]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            return self.low[rows[0]:rows[0] + len(rows)]
        return self.low.index_select(0, to_device_async(rows, torch.long, self.low.device))

    def materialize(self) -> Dict[int, Tensor]:
        """A plain dict ``obj_id -> (1, H, W) bool`` (one resize for all objects)."""
        ids: List[int] = list(self._rows)
        if not ids:
            return {}
        masks = resize_threshold(self.logits(ids), self.size)
        return dict(zip(ids, masks))
