"""HostChannel: device-to-host bytes batched into one copy (sam3fast/video/host_channel.py).

The gathered path (CUDA) is run on the CPU through a subclass whose "device" is the host and whose
asynchronous copy is a clone into a poisoned buffer with an event stand-in that records when it is
waited on."""

import numpy as np
import pytest
import torch

from sam3fast.video.host_channel import HostChannel


class _Event:
    def __init__(self, log):
        self.log = log

    def synchronize(self):
        self.log.append("wait")


class _Gathering(HostChannel):
    """The CUDA path on the host: every read and flush is one gathered copy."""

    def __init__(self):
        super().__init__()
        self.log, self.copied = [], []

    @staticmethod
    def _gathers(device):
        return True

    def _copy_async(self, flat):
        host = torch.full(flat.shape, 0xAB, dtype=torch.uint8)  # poison: every byte must be written
        host.copy_(flat)
        self.log.append("copy")
        self.copied.append(flat.numel())
        return host, _Event(self.log)


def _values(rng):
    return [
        torch.from_numpy(rng.standard_normal(7).astype(np.float32)),
        torch.from_numpy(rng.random(5) > 0.5),
        torch.from_numpy(rng.integers(0, 255, 33).astype(np.uint8)),
        torch.from_numpy(rng.standard_normal((3, 5)).astype(np.float32)),
        torch.from_numpy(rng.integers(-9, 9, 3).astype(np.int64)),
    ]


@pytest.mark.parametrize("kind", [HostChannel, _Gathering], ids=["host", "gathered"])
def test_read_carries_every_pending_slot_in_one_transfer(kind):
    rng = np.random.default_rng(0)
    ch = kind()
    tensors = _values(rng)
    slots = [ch.submit(t) for t in tensors]
    assert ch.pending == len(tensors) and ch.transfers == 0
    head = torch.from_numpy(rng.standard_normal(3))  # float64, 24 bytes: the parts after it are padded
    calls = []
    got = ch.read(head, before_wait=lambda: calls.append("before_wait"))
    assert ch.transfers == 1 and ch.pending == 0 and calls == ["before_wait"]
    assert got.dtype == np.float64 and got.shape == (3,) and np.array_equal(got, head.numpy())
    for t, s in zip(tensors, slots):
        assert s.delivered
        b = s.get()
        assert b.dtype == np.uint8 and b.size == t.numel() * t.element_size()
        assert np.array_equal(b, t.reshape(-1).view(torch.uint8).numpy())
    assert ch.transfers == 1  # the slots came with the read
    if kind is _Gathering:
        assert ch.log[:2] == ["copy", "wait"]  # before_wait ran between the copy and the wait
        sizes = [t.numel() * t.element_size() for t in [head] + tensors]
        assert ch.copied == [sum(-(-n // 16) * 16 for n in sizes)]  # one copy, each part 16-aligned


@pytest.mark.parametrize("kind", [HostChannel, _Gathering], ids=["host", "gathered"])
def test_slot_read_first_sends_what_is_pending(kind):
    rng = np.random.default_rng(1)
    ch = kind()
    a, b = _values(rng)[:2]
    sa, sb = ch.submit(a), ch.submit(b)
    assert np.array_equal(sb.get(), b.view(torch.uint8).numpy())  # its own copy, with a in it
    assert ch.transfers == 1 and sa.delivered and ch.pending == 0
    assert np.array_equal(sa.get(), a.view(torch.uint8).numpy()) and ch.transfers == 1
    ch.flush()  # nothing pending: no copy
    assert ch.transfers == 1
    c = ch.submit(a * 2)  # after a read: goes with the next one
    head = torch.arange(4, dtype=torch.float32)
    assert np.array_equal(ch.read(head), head.numpy()) and ch.transfers == 2
    assert np.array_equal(c.get().view(np.float32), (a * 2).numpy()) and ch.transfers == 2


def test_gathered_views_of_every_dtype_are_aligned():
    """A read's head keeps its dtype and shape; slots start at multiples of 16 bytes, so the reader's
    float32 and bool views of them are aligned."""
    ch = _Gathering()
    s = ch.submit(torch.arange(5, dtype=torch.uint8))
    t = ch.submit(torch.tensor([1.5, -2.0], dtype=torch.float32))
    head = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    got = ch.read(head)
    assert got.shape == (2, 3) and got.dtype == np.int32 and np.array_equal(got, head.numpy())
    for slot in (s, t):
        assert slot.get().ctypes.data % 16 == got.ctypes.data % 16
    assert np.array_equal(t.get().view(np.float32), [1.5, -2.0])


def test_read_of_an_unsupported_dtype_is_refused():
    ch = HostChannel()
    with pytest.raises(TypeError, match="no numpy dtype"):
        ch.read(torch.zeros(2, dtype=torch.bfloat16))


@pytest.mark.parametrize("kind", [HostChannel, _Gathering], ids=["host", "gathered"])
def test_a_slot_of_several_tensors_gets_their_bytes_back_to_back(kind):
    """``submit(a, b, c)``: one slot, the parts' bytes in order with no gap (on the gathered path
    straight from the parts into the one copy, padded only after the slot)."""
    rng = np.random.default_rng(2)
    ch = kind()
    keep = torch.from_numpy(rng.random(3) > 0.5)
    boxes = torch.from_numpy(rng.standard_normal((3, 4)).astype(np.float32))
    masks = torch.from_numpy(rng.integers(0, 255, 29).astype(np.uint8))
    slot = ch.submit(keep, boxes, masks)
    other = ch.submit(masks)
    head = torch.arange(3, dtype=torch.float64)
    assert np.array_equal(ch.read(head), head.numpy()) and ch.transfers == 1
    got = slot.get()
    want = np.concatenate([keep.numpy().view(np.uint8), boxes.numpy().reshape(-1).view(np.uint8), masks.numpy()])
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert np.array_equal(got[3:51].view(np.float32).reshape(3, 4), boxes.numpy())
    assert np.array_equal(other.get(), masks.numpy()) and ch.transfers == 1
    if kind is _Gathering:
        assert ch.copied == [32 + 80 + 32]  # head 24 -> 32, slot 3 + 48 + 29 = 80 (aligned), other 29 -> 32
    with pytest.raises(ValueError, match="nothing to send"):
        ch.submit()
