"""Multi-device video sessions on ``torch.distributed`` (official ``Sam3VideoPredictorMultiGPU``).

One process per device ("rank"); rank 0 lives in the caller and answers requests, ranks 1..W-1
are workers (``torch.multiprocessing`` spawn, or the other ``torchrun`` ranks). Every rank holds the
whole model and every session, and runs the same per-frame loop on the same request stream:

* detection is frame-parallel: frames are cut in chunks of W; rank r runs the detector on frame
  ``chunk_start + r`` of the chunk (the last frame again where the chunk is short) and the outputs
  are all-gathered asynchronously, one chunk ahead of the frame being tracked, so every rank holds
  every frame's detections and tracker features;
* tracked objects are sharded: a new object goes to the rank holding the fewest objects (ties: the
  lowest rank), each rank runs the tracker on its own objects, and the low-resolution masks and
  object scores are all-gathered (padded to the largest shard) so every rank sees all N objects;
* the update plan (association, hotstart removals, new ids and their ranks, re-conditioning) is
  made on rank 0 and broadcast as one fixed-size int64 device tensor (:func:`encode_plan`); each
  rank then applies it to its own objects. Only rank 0 builds outputs, so rank 0 yields exactly
  what one process yields.

Process groups are built directly on a ``TCPStore`` (no global default group is created or used,
so a caller that runs its own ``torch.distributed`` job is not disturbed and predictors can be
built and shut down repeatedly in one process): "data" (NCCL on CUDA, gloo on CPU) carries the
per-frame tensors, "ctrl" (gloo, host) carries the per-request status word. Requests go from rank
0 to the workers through the store (pickled: they are rare); errors come back the same way.

Bytes on the wire per frame (received by each rank; W ranks, Q detector queries, N objects,
n = max objects on one rank = ceil(N / W), m = low-res mask side 4g (288 at full size), g = 72,
s = size of the model dtype in bytes, 4 in fp32 / 2 in bf16):

=============================  ====================================================  ============================
collective                     bytes per rank per frame                              full size, fp32, Q = 200
=============================  ====================================================  ============================
detector all_gather (1/chunk)  (W-1)/W * [Q s + 8 Q * 4 + Q m^2 s + 32 m^2 s         (W-1)/W * 82.4 MB
                               + 64 (m/2)^2 s + 256 g^2 * 2]
tracker all_gather             (W-1) * n * (m^2 + 1) s                               (W-1) * n * 331.8 KB
plan broadcast                 8 * (7 + W + 5Q + M64), M64 = N rounded up to 64      8.6 KB (N <= 64, W = 8)
status all_gather (1/request)  8 * W                                                 64 B
=============================  ====================================================  ============================

The detector term is per frame whatever the number of objects: Q mask logits (66.4 MB) dominate,
then the tracker's projected FPN levels (conv_s0/conv_s1 outputs, applied before the gather so
32 + 64 channels travel instead of 256 + 256: 15.9 MB) and the last FPN level in bf16 (2.7 MB).
Per object and frame the cost is (W-1)/W-ish of 332 KB (a 288^2 float32 mask and its score)
in each direction. The gathered values are bit-identical to the ones a single process computes.

Faults. Every collective has a timeout (``collective_timeout_s``). Rank 0 waits on a collective by
polling it while watching its workers (process alive, error reported through the store); a worker
that raises reports the exception and, where rank 0 is not in the same place, the request fails
with one :class:`WorkerError` (a ``RuntimeError``) naming the rank and the error. After such a
failure the predictor is broken: its workers are ended and later requests raise. An error that
every rank raises identically (a bad request, checked before any collective) is re-raised as is
and the predictor stays usable. ``shutdown()`` ends the workers (join, then terminate/kill),
destroys the process groups and closes the store, so no process and no port is left.

On CUDA the data group is NCCL: a wait there orders the stream only, so failures are caught by
a watchdog thread on rank 0 that aborts the NCCL group (the blocked host read then raises).
This path is written to the same protocol but has not run on a multi-GPU machine yet.
"""

from __future__ import annotations

import datetime
import os
import pickle
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

DEFAULT_COLLECTIVE_TIMEOUT_S = float(os.environ.get("SAM3_COLLECTIVE_OP_TIMEOUT_SEC", "180"))
DEFAULT_STARTUP_TIMEOUT_S = 1800.0


class WorkerError(RuntimeError):
    """A worker process failed (raised, died, or a collective timed out); the predictor is broken."""


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=float(seconds))


def _gloo_group(store, rank: int, world_size: int, timeout_s: float):
    from torch._C._distributed_c10d import ProcessGroupGloo

    opts = ProcessGroupGloo._Options()
    opts._timeout = _td(timeout_s)
    opts._devices = [ProcessGroupGloo.create_default_device()]
    return ProcessGroupGloo(store, rank, world_size, opts)


def _nccl_group(store, rank: int, world_size: int, timeout_s: float):
    from torch._C._distributed_c10d import ProcessGroupNCCL

    opts = ProcessGroupNCCL.Options()
    opts._timeout = _td(timeout_s)
    return ProcessGroupNCCL(store, rank, world_size, opts)


# ----------------------------------------------------------------------------------------------
# Byte packing: one collective for several tensors of static shapes


def pack_bytes(tensors: Sequence[torch.Tensor], wire_dtypes: Sequence[Optional[torch.dtype]]):
    """Tensors -> (flat uint8 tensor, specs). ``wire_dtypes[i]`` (or None: the tensor's dtype) is
    the dtype the tensor travels in (bf16 for values already rounded to bf16: exact)."""
    parts, specs = [], []
    for t, wd in zip(tensors, wire_dtypes):
        w = t if wd is None else t.to(wd)
        w = w.contiguous()
        parts.append(w.reshape(-1).view(torch.uint8))
        specs.append((tuple(t.shape), t.dtype, w.dtype, w.numel() * w.element_size()))
    return torch.cat(parts), specs


def unpack_bytes(flat: torch.Tensor, specs) -> List[torch.Tensor]:
    out, off = [], 0
    for shape, dtype, wire, nbytes in specs:
        t = flat[off:off + nbytes].view(wire).reshape(shape)
        out.append(t if wire == dtype else t.to(dtype))
        off += nbytes
    return out


# ----------------------------------------------------------------------------------------------
# The update plan as one int64 tensor


PLAN_HEADER = 7  # frame_idx, n_new, n_removed, n_dropped, n_high, recondition, M


def plan_size(world_size: int, num_queries: int, num_tracks: int) -> int:
    m64 = -(-max(num_tracks, 1) // 64) * 64
    return PLAN_HEADER + world_size + 5 * num_queries + m64


def encode_plan(frame_idx: int, plan: Dict[str, Any], num_obj_per_gpu, num_queries: int, num_tracks: int,
                recondition: bool, device) -> torch.Tensor:
    """Rank 0's plan -> int64 (plan_size,) tensor (padding -1). Fields: new detection slots, their
    object ids and ranks (in plan order), removed object ids, the (track id, detection slot)
    re-conditioning pairs in insertion order, and the previous per-rank object counts (checked by
    every rank: all ranks must agree on the object layout)."""
    W, Q = len(num_obj_per_gpu), num_queries
    buf = np.full(plan_size(W, Q, num_tracks), -1, dtype=np.int64)
    new_inds = np.asarray(plan["new_det_fa_inds"], np.int64)
    removed = np.asarray(sorted(int(i) for i in plan["obj_ids_newly_removed"]), np.int64)
    high = list(plan["trk_id_to_max_iou_high_conf_det"].items())
    if len(removed) > num_tracks:
        raise RuntimeError(f"internal error: {len(removed)} objects removed out of {num_tracks}")
    buf[:PLAN_HEADER] = [frame_idx, len(new_inds), len(removed), int(plan["num_obj_dropped_due_to_limit"]),
                         len(high), int(bool(recondition)), num_tracks]
    o = PLAN_HEADER
    buf[o:o + W] = np.asarray(num_obj_per_gpu, np.int64)
    o += W
    n = len(new_inds)
    buf[o:o + n] = new_inds
    buf[o + Q:o + Q + n] = np.asarray(plan["new_det_obj_ids"], np.int64)
    buf[o + 2 * Q:o + 2 * Q + n] = np.asarray(plan["new_det_gpu_ids"], np.int64)
    o += 3 * Q
    buf[o:o + len(high)] = [int(k) for k, _ in high]
    buf[o + Q:o + Q + len(high)] = [int(v) for _, v in high]
    o += 2 * Q
    buf[o:o + len(removed)] = removed
    return torch.from_numpy(buf).to(device)


def decode_plan(buf: np.ndarray, world_size: int, num_queries: int) -> Dict[str, Any]:
    W, Q = world_size, num_queries
    frame_idx, n_new, n_rm, n_drop, n_high, recond, num_tracks = (int(x) for x in buf[:PLAN_HEADER])
    o = PLAN_HEADER
    num_obj_per_gpu = buf[o:o + W].copy()
    o += W
    new_inds, new_ids, new_gpus = buf[o:o + n_new], buf[o + Q:o + Q + n_new], buf[o + 2 * Q:o + 2 * Q + n_new]
    o += 3 * Q
    high = {int(k): int(v) for k, v in zip(buf[o:o + n_high], buf[o + Q:o + Q + n_high])}
    o += 2 * Q
    removed = set(int(i) for i in buf[o:o + n_rm])
    return {
        "frame_idx": frame_idx, "num_tracks": num_tracks, "num_obj_per_gpu": num_obj_per_gpu,
        "recondition": bool(recond),
        "new_det_fa_inds": new_inds.copy(), "new_det_obj_ids": new_ids.copy(), "new_det_gpu_ids": new_gpus.copy(),
        "obj_ids_newly_removed": removed, "num_obj_dropped_due_to_limit": n_drop,
        "trk_id_to_max_iou_high_conf_det": high,
    }


# ----------------------------------------------------------------------------------------------
# The per-rank context


class DistContext:
    """Rank, world size, device and the two process groups of one rank. Collectives go through
    :meth:`wait` (timeouts, fault detection on rank 0). ``stats`` counts the bytes each collective
    received on this rank (for the documented per-frame figures and the tests)."""

    def __init__(self, rank: int, world_size: int, device: torch.device, store, timeout_s: float):
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.store = store
        self.timeout_s = float(timeout_s)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        prefix = torch.distributed.PrefixStore
        if self.backend == "nccl":
            self.pg_data = _nccl_group(prefix("data", store), rank, world_size, timeout_s)
        else:
            self.pg_data = _gloo_group(prefix("data", store), rank, world_size, timeout_s)
        self.pg_ctrl = _gloo_group(prefix("ctrl", store), rank, world_size, timeout_s)
        self.monitor = None  # rank 0: callable() -> Optional[str] (a failure description)
        self.failure: Optional[str] = None  # set by the watchdog (NCCL) or a failed wait
        self.fail_in: Optional[int] = None  # test hook: raise at the n-th next collective
        self.stats: Dict[str, int] = {}
        self._watchdog = None

    # ------------------------------------------------------------------ waiting
    def _tick(self, what: str):
        if self.fail_in is not None:
            self.fail_in -= 1
            if self.fail_in <= 0:
                self.fail_in = None
                raise RuntimeError(f"injected fault on rank {self.rank} before collective {what!r}")

    def _check(self):
        if self.failure is not None:
            raise WorkerError(self.failure)
        if self.monitor is not None:
            reason = self.monitor()
            if reason is not None:
                self.failure = reason
                raise WorkerError(reason)

    def wait_data(self, work, what: str):
        """:meth:`wait` for a data-group collective."""
        self.wait(work, what, stream_only=self.backend == "nccl")

    def wait(self, work, what: str, stream_only: bool = False):
        """Wait for ``work``. Gloo: poll it (rank 0 checks its workers between polls), raise
        :class:`WorkerError` on a failure or after ``timeout_s``. NCCL: order the current stream
        after it (the host does not block; the watchdog catches failures)."""
        if stream_only:
            self._check()
            work.wait()
            return
        deadline = time.monotonic() + self.timeout_s
        sleep = 2e-5
        while True:
            try:
                done = work.is_completed()
                if done:
                    work.wait()
                    return
            except Exception as e:  # noqa: BLE001 - a collective failed (a peer closed its connection)
                self._fail(f"collective {what!r} on rank {self.rank} failed: {type(e).__name__}: {e}")
            self._check()
            if time.monotonic() > deadline:
                self._fail(f"collective {what!r} on rank {self.rank} timed out after {self.timeout_s:g} s")
            time.sleep(sleep)
            sleep = min(sleep * 2, 2e-3)

    def _fail(self, message: str):
        # a worker that died or raised explains a failed collective better than the collective
        if self.monitor is not None:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                reason = self.monitor()
                if reason is not None:
                    message = reason
                    break
                time.sleep(0.02)
        self.failure = message
        raise WorkerError(message)

    def _count(self, what: str, nbytes: int):
        self.stats[what] = self.stats.get(what, 0) + int(nbytes)

    # ------------------------------------------------------------------ collectives
    def all_gather_async(self, t: torch.Tensor, what: str):
        """All-gather a contiguous tensor of the same shape on every rank -> (list, work)."""
        self._tick(what)
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        work = self.pg_data.allgather([out], [t])
        self._count(what, t.numel() * t.element_size() * (self.world_size - 1))
        return out, work

    def all_gather(self, t: torch.Tensor, what: str) -> List[torch.Tensor]:
        out, work = self.all_gather_async(t, what)
        self.wait_data(work, what)
        return out

    def all_gather_rows(self, t: torch.Tensor, counts: Sequence[int], what: str) -> torch.Tensor:
        """Each rank holds ``counts[rank]`` rows of ``t`` (same trailing shape and dtype): pad to
        the largest count, all-gather, drop the padding -> rows of rank 0, then rank 1, ..."""
        n_max = int(max(counts))
        if n_max == 0:
            return t[:0]
        pad = t.new_zeros((n_max - t.shape[0],) + tuple(t.shape[1:]))
        parts = self.all_gather(torch.cat([t, pad]) if pad.shape[0] else t, what)
        return torch.cat([p[:int(c)] for p, c in zip(parts, counts)])

    def broadcast(self, t: torch.Tensor, src: int, what: str) -> torch.Tensor:
        """In place on ``t`` (the same shape and dtype on every rank)."""
        from torch._C._distributed_c10d import BroadcastOptions

        self._tick(what)
        t = t.contiguous()
        opts = BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        work = self.pg_data.broadcast([t], opts)
        if self.rank != src:
            self._count(what, t.numel() * t.element_size())
        self.wait_data(work, what)
        return t

    def exchange_status(self, code: int) -> List[int]:
        """Every rank's status word (0 ok, 1 raised) on the host group."""
        t = torch.tensor([code], dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        work = self.pg_ctrl.allgather([out], [t])
        self.wait(work, "request status")
        return [int(x) for x in out]

    # ------------------------------------------------------------------ CUDA watchdog
    def start_watchdog(self, interval_s: float = 0.1):
        """Rank 0 on NCCL: watch the workers from a thread; on a failure, abort the NCCL group so
        that a host read blocked on it raises."""
        if self.backend != "nccl" or self.monitor is None:
            return
        stop = threading.Event()

        def run():
            while not stop.wait(interval_s):
                reason = self.monitor()
                if reason is not None:
                    self.failure = reason
                    try:
                        self.pg_data.abort()
                    except Exception:  # noqa: BLE001
                        pass
                    return

        th = threading.Thread(target=run, name="sam3fast-dist-watchdog", daemon=True)
        th.start()
        self._watchdog = (th, stop)

    def close(self):
        if self._watchdog is not None:
            th, stop = self._watchdog
            stop.set()
            th.join(timeout=5)
            self._watchdog = None
        for name in ("pg_data", "pg_ctrl"):
            pg = getattr(self, name, None)
            if pg is not None and self.backend == "nccl" and name == "pg_data":
                try:
                    pg.shutdown()
                except Exception:  # noqa: BLE001
                    pass
            setattr(self, name, None)
        self.store = None


# ----------------------------------------------------------------------------------------------
# Requests through the store


def store_put(store, key: str, obj: Any):
    store.set(key, pickle.dumps(obj))


def store_get(store, key: str) -> Any:
    return pickle.loads(store.get(key))


def store_has(store, key: str) -> bool:
    return store.check([key])


def format_exception(e: BaseException) -> Dict[str, str]:
    return {"type": type(e).__name__, "message": str(e),
            "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__))}


def resolve_devices(gpus_to_use=None, devices=None) -> List[torch.device]:
    """``devices`` (e.g. ``["cpu", "cpu"]`` or ``["cuda:0", "cuda:1"]``) or ``gpus_to_use`` (CUDA
    indices) -> one device per rank (rank 0 first)."""
    if devices is not None:
        if gpus_to_use is not None:
            raise ValueError("give gpus_to_use or devices, not both")
        devs = [torch.device(d) for d in devices]
    else:
        gpus = sorted(set(int(g) for g in gpus_to_use))
        if not torch.cuda.is_available():
            raise ValueError(f"gpus_to_use={list(gpus_to_use)} but no CUDA device is available; use devices=['cpu', ...]")
        bad = [g for g in gpus if not 0 <= g < torch.cuda.device_count()]
        if bad:
            raise ValueError(f"gpus_to_use names GPUs {bad}, but only {torch.cuda.device_count()} are visible")
        devs = [torch.device("cuda", g) for g in gpus]
    if not devs:
        raise ValueError("no device given")
    kinds = {d.type for d in devs}
    if len(kinds) != 1 or kinds - {"cpu", "cuda"}:
        raise ValueError(f"all ranks must use CPU, or all CUDA, got {devs}")
    if "cuda" in kinds and len({d.index for d in devs}) != len(devs):
        raise ValueError(f"one rank per GPU: {devs} names a GPU twice (NCCL cannot run two ranks on one GPU)")
    return devs
