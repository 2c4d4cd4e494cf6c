"""The video loop's device-to-host direction, batched into one copy per frame.

A concept-video frame sends the host two things: the planning answer (association and the device
plan, which the host needs before it can queue the frame's tracker work) and, for a frame whose
outputs are due, the outputs (keep flags, boxes, bit-packed masks). Copied on their own that is two
copies and, unless the output read is deferred, two waits per frame.

:class:`HostChannel` holds the outputs' device bytes (:meth:`HostChannel.submit`, which returns a
:class:`HostSlot`) until the next planning read (:meth:`HostChannel.read`), which sends them in the
same copy as the planning answer: one ``torch.cat`` on the device, one asynchronous copy into pinned
memory, one event, one wait. A slot asked for before any read came (the default, non-pipelined
loop, the last frame, a frame without planning) sends what is pending in a copy of its own, so
nothing waits for a read that may never come and nothing is lost.

Off CUDA there is nothing to copy: the host keeps the tensors' bytes as they are, and the channel
still counts one transfer per ``read`` or flush (``transfers``), which the tests check.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
import torch
from torch import Tensor

from ..profiling import stage

__all__ = ["HostChannel", "HostSlot"]

_ALIGN = 16  # every part starts at a multiple of 16 bytes in the copy, so a view of any dtype is aligned


def _as_bytes(t: Tensor) -> Tensor:
    """``t`` as a flat uint8 tensor (a view where ``t`` is contiguous)."""
    t = t.contiguous().reshape(-1)
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


class HostSlot:
    """Submitted tensors on their way to the host. :meth:`get` gives their bytes, back to back, as
    one numpy uint8 array, sending the channel's pending tensors first when no read has carried
    them yet."""

    __slots__ = ("_channel", "_device_bytes", "_host", "_ready")

    def __init__(self, channel: "HostChannel", device_bytes: List[Tensor]):
        self._channel = channel
        self._device_bytes: Optional[List[Tensor]] = device_bytes  # flat uint8 parts
        self._host: Optional[np.ndarray] = None
        self._ready = None  # the CUDA event of the copy that carried it

    @property
    def delivered(self) -> bool:
        """The copy carrying this slot has been queued (its bytes may still be in flight)."""
        return self._device_bytes is None

    def _deliver(self, host: np.ndarray, ready) -> None:
        self._host, self._ready, self._device_bytes = host, ready, None

    def get(self) -> np.ndarray:
        if self._device_bytes is not None:
            self._channel.flush()
        if self._ready is not None:
            self._ready.synchronize()  # (already passed when a planning read carried it)
            self._ready = None
        return self._host


class HostChannel:
    """Device-to-host bytes batched into one copy (see the module doc). Single-threaded, one
    stream: everything submitted and read is ordered on the current stream."""

    def __init__(self):
        self._pending: List[HostSlot] = []
        self._pads = {}
        self.transfers = 0  # copies made (one per read or flush that had something to send)

    def submit(self, *tensors: Tensor) -> HostSlot:
        """Queue ``tensors`` (any dtypes and shapes; their values at this point of the stream) for
        the host as one slot, their bytes back to back: on CUDA they go straight into the gathered
        copy (no concatenation of their own). Off CUDA a single tensor is read where it is: nothing
        may write into it afterwards."""
        if not tensors:
            raise ValueError("HostChannel.submit: nothing to send")
        slot = HostSlot(self, [_as_bytes(t) for t in tensors])
        self._pending.append(slot)
        return slot

    @property
    def pending(self) -> int:
        return len(self._pending)

    def read(self, t: Tensor, before_wait: Optional[Callable[[], None]] = None,
             wait_range: Optional[str] = None) -> np.ndarray:
        """``t`` on the host (numpy, its dtype and shape) with every pending slot in the same copy.
        ``before_wait()`` runs after the copy is queued and before the host waits for it (the video
        loop queues the next frame's detection there); ``wait_range`` names the NVTX range of the
        wait."""
        dtype = _numpy_dtype(t.dtype)
        host = self._transfer([_as_bytes(t)], before_wait, wait_range)
        return host[:t.numel() * t.element_size()].view(dtype).reshape(tuple(t.shape))

    def flush(self) -> None:
        """Send the pending slots now, in one copy, and wait for it."""
        if self._pending:
            self._transfer([], None, None)

    def _pad(self, device, n: int) -> Tensor:
        z = self._pads.get(device)
        if z is None:
            z = self._pads[device] = torch.zeros(_ALIGN, dtype=torch.uint8, device=device)
        return z[:n]

    @staticmethod
    def _gathers(device: torch.device) -> bool:
        """Whether tensors on ``device`` go to the host through one gathered copy (CUDA), or are
        read where they are (the host)."""
        return device.type == "cuda"

    @staticmethod
    def _copy_async(flat: Tensor):
        """``(host, ready)``: ``flat`` copied into pinned memory on the current stream, and the
        event recorded after the copy."""
        host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def _transfer(self, head: List[Tensor], before_wait, wait_range) -> np.ndarray:
        slots, self._pending = self._pending, []
        runs = [head] + [s._device_bytes for s in slots]  # runs of parts, each starting aligned
        self.transfers += 1
        device = next(p.device for run in runs for p in run)
        if not self._gathers(device):  # the bytes are on the host already
            if before_wait is not None:
                before_wait()
            for s in slots:
                parts = s._device_bytes
                s._deliver(parts[0].numpy() if len(parts) == 1 else np.concatenate([p.numpy() for p in parts]), None)
            return head[0].numpy() if head else np.zeros(0, np.uint8)
        pieces, spans, o = [], [], 0
        for run in runs:
            n = sum(p.numel() for p in run)
            spans.append((o, n))
            pieces += run
            pad = -n % _ALIGN
            if pad:
                pieces.append(self._pad(device, pad))
            o += n + pad
        host, ready = self._copy_async(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
        a = host.numpy()
        for s, (off, n) in zip(slots, spans[1:]):
            s._deliver(a[off:off + n], ready)
        if before_wait is not None:
            before_wait()
        if wait_range is None:
            ready.synchronize()  # host sync (the frame's one copy)
        else:
            with stage(wait_range):
                ready.synchronize()
        return a


_NUMPY_DTYPES = {
    torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
    torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
    torch.uint8: np.uint8, torch.bool: np.bool_,
}


def _numpy_dtype(dtype: torch.dtype):
    try:
        return _NUMPY_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"HostChannel.read: no numpy dtype for {dtype}") from None
