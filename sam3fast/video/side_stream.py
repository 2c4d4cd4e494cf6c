"""Work launched ahead on a second CUDA stream and handed to the current one.

The video paths run the next frame's backbone (``Sam3TrackerPredictor.prefetch_backbone``) or its
detection (``Sam3VideoInference.ahead_detection_stream``) beside the current frame's work.
:class:`SideStream` holds the one mechanism both need (``FrameStore`` hands its frames converted
ahead on its own stream over with :meth:`SideStream.adopt` too):

- :meth:`SideStream.run` launches ``fn()`` on the side stream, behind the work already queued on
  the current stream, and returns its outputs with an event that marks their end;
- :meth:`SideStream.adopt` hands those outputs to the current stream: it waits for the event and
  marks every tensor as used there (``record_stream``), so that the caching allocator does not
  give their memory to the side stream's next run while the current stream still reads them;
- :meth:`SideStream.wait_last`: before the current stream runs the same work itself, it waits for
  the last side run, read or not (both go through the same CUDA graph's static input buffers).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from torch.utils import _pytree as pytree


class SideStream:
    """A lazily made CUDA stream (one per device in use) and the event of its last run."""

    def __init__(self):
        self.stream: Optional["torch.cuda.Stream"] = None
        self.last: Optional["torch.cuda.Event"] = None

    def run(self, device: torch.device, fn: Callable[[], Any]) -> Tuple[Any, "torch.cuda.Event"]:
        """``fn()`` on the side stream behind the current stream's queued work: ``(outputs, event)``."""
        if self.stream is None or self.stream.device != device:
            self.stream = torch.cuda.Stream(device)
        side = self.stream
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            out = fn()
            done = torch.cuda.Event()
            done.record(side)
        self.last = done
        return out, done

    @staticmethod
    def adopt(tree: Any, done: Optional["torch.cuda.Event"], device: torch.device) -> None:
        """Order the current stream after ``done`` and mark the tensors of ``tree`` as used on it (no
        host sync). ``done`` None (work made on the current stream or off CUDA): nothing to do."""
        if done is None:
            return
        cur = torch.cuda.current_stream(device)
        cur.wait_event(done)
        for t in pytree.tree_leaves(tree):
            if isinstance(t, torch.Tensor):
                t.record_stream(cur)

    def wait_last(self, device: torch.device) -> None:
        """The current stream, unless it is the side one, waits for the last side run."""
        if self.last is None:
            return
        cur = torch.cuda.current_stream(device)
        if cur != self.stream:
            cur.wait_event(self.last)
            self.last = None
