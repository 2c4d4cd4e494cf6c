"""CUDA graphs for the tracker's per-frame step: :meth:`Sam3TrackerPredictor.memory_step` captured
per static shape and replayed, with no inductor compile.

Letters: B objects (padded to a power-of-two bucket Bb by the caller, as for ``compile_step``), S
memory tokens (conditioning frames + ring slots + last frame, then the pointer tokens), M the
memory dim, D d_model, g the feature grid.

:meth:`memory_step` is the model part of a propagated frame (memory attention over a
fixed-capacity bank with a validity mask, the SAM heads without prompts, the memory encoder). It
reads no tensor value on the host and branches on none (``tests/test_tracker_predictor.py``
checks a steady-state frame under ``set_sync_debug_mode("error")``), so one body serves the eager
path and the graph. :class:`GraphedMemoryStep` keeps, per :class:`StepKey` (bucket, the three
feature levels' shapes, the position encoding's, S, M, the pointer-token count, dtypes, device,
whether the memory encoder runs), input buffers

    feats      three (1 or Bb, D_l, g_l, g_l) levels, top level last
    top_pos    (1 or Bb, D, g, g)
    memory, memory_pos  (Bb, S, M);  valid (Bb, S) bool

and on CUDA a ``torch.cuda.CUDAGraph`` of the step captured on first use (warm-up on a side
stream, one memory pool for every key, as :class:`sam3fast.video.graphs.GraphedDetector`). A call
copies its inputs into the buffers, replays, and clones the outputs: the session stores a frame's
outputs (memory features, masks, pointers) across the next replays. On CPU, with
``cuda_graphs=False``, or after a capture failed for a key (logged once; that key then runs
eagerly), the step runs on the same buffers eagerly.

Between the eager step and the replay nothing differs but the launch: the same kernels on the same
shapes. (The padded rows are the caller's: zeros attending to one valid key, as the compiled path.)

:meth:`GraphedMemoryStep.run_table` is the object table's step (``Sam3TrackerPredictor.
table_track_step``): the graph also holds the memory assembly from the table
(:func:`~sam3fast.video.memory_bank.table_memory`) and the per-session memory score (83 small
operations a frame launched from Python eagerly before: a CPU count, tiny config, 1 object), reading
the table's tensors where they are, so the memory (Bb, S, M) is neither assembled on the host's time
nor copied into a buffer. Its key (:class:`TableKey`) holds the address and shape of every table
tensor: a table that grew (new tensors) is a new key, and the entries of a table that changed or
died are dropped. Buffers: the three feature levels, ``top_pos`` and the frame index (a 0-d long
tensor). The graph begins with the table's memory update, the frames the sessions staged since the
last step (:func:`~sam3fast.video.memory_bank.table_apply_staged`: ~25 in-place operations a frame
launched eagerly before). That update is masked by the table's ``staged`` flags and clears them, so
the capture's warm-up, which runs the step more than once, applies each frame once. On CUDA both
are Triton kernels (``sam3fast.kernels.table_memory``: 3 launches plus the pointer projection's
~6, for ~90 small PyTorch operations; 122 of the tiny graphed step's 326 launches were this
bookkeeping, by a CPU census of session 22).
"""

from __future__ import annotations

import logging
import weakref
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..predictor.graphs import _Entry, check_warmup_iters, pool_for_capture, resolve_cuda_graphs, warm_up_and_capture
from ..profiling import stage

logger = logging.getLogger(__name__)

STEP_OUTPUTS = ("low_res_masks", "high_res_masks", "obj_ptr", "object_score_logits", "iou_score",
                "maskmem_features", "maskmem_pos")


class StepKey(NamedTuple):
    feat_shapes: Tuple[Tuple[int, ...], ...]
    pos_shape: Tuple[int, ...]
    memory_shape: Tuple[int, ...]  # (Bb, S, M)
    num_obj_ptr_tokens: int
    dtype: torch.dtype  # the features' (the model's)
    memory_dtype: torch.dtype
    run_mem_encoder: bool
    device: torch.device


class TableKey(NamedTuple):
    """A table step's key: the bucket (``rows``), ``no_prev``, the features, and every table tensor's
    (address, shape), so that a replay reads the tensors it was captured on."""
    feat_shapes: Tuple[Tuple[int, ...], ...]
    pos_shape: Tuple[int, ...]
    rows: int
    no_prev: bool
    dtype: torch.dtype
    run_mem_encoder: bool
    device: torch.device
    state: Tuple[Tuple[int, Tuple[int, ...]], ...]


def _state_layout(state) -> Tuple[Tuple[int, Tuple[int, ...]], ...]:
    return tuple((t.data_ptr(), tuple(t.shape)) for t in state)


class GraphedMemoryStep:
    """Runs ``tracker.memory_step`` per :class:`StepKey`, through a CUDA graph on CUDA (see the
    module docstring). ``cuda_graphs``: None = on CUDA devices; True on a non-CUDA model raises."""

    def __init__(self, tracker, cuda_graphs: Optional[bool] = None, warmup_iters: int = 2):
        self.tracker = tracker
        self.cuda_graphs = resolve_cuda_graphs(cuda_graphs, tracker.device, "a tracker")
        self.warmup_iters = check_warmup_iters(warmup_iters)
        self.entries: Dict[StepKey, _Entry] = {}
        self._present: Dict[StepKey, Tuple[bool, ...]] = {}  # which of the 7 outputs the step returns
        self._failed: Dict[StepKey, str] = {}  # keys whose capture failed: eager from then on
        self._tables: Dict[TableKey, tuple] = {}  # table keys -> (weakref to the table, spec, state)

    def clear(self) -> None:
        """Drop every key (graphs, buffers, the memory pool)."""
        self.entries.clear()
        self._present.clear()
        self._failed.clear()
        self._tables.clear()

    @staticmethod
    def key(feats: Sequence[Tensor], top_pos: Tensor, memory: Tensor, num_obj_ptr_tokens: int,
            run_mem_encoder: bool) -> StepKey:
        return StepKey(tuple(tuple(f.shape) for f in feats), tuple(top_pos.shape), tuple(memory.shape),
                       int(num_obj_ptr_tokens), feats[-1].dtype, memory.dtype, bool(run_mem_encoder), memory.device)

    def why_not_graphs(self, key: Union[StepKey, TableKey]) -> Optional[str]:
        """None when ``key``'s step is captured and replayed; else why it runs eagerly."""
        if not self.cuda_graphs:
            return "cuda_graphs is off" if key.device.type == "cuda" else f"the tracker is on {key.device}"
        return self._failed.get(key)

    @staticmethod
    def _feature_buffers(feats, top_pos) -> Dict[str, Tensor]:
        inp = {f"feat{i}": torch.empty_like(f, memory_format=torch.contiguous_format) for i, f in enumerate(feats)}
        inp["top_pos"] = torch.empty_like(top_pos, memory_format=torch.contiguous_format)
        return inp

    @staticmethod
    def _copy_features(inp: Dict[str, Tensor], feats, top_pos) -> None:
        for n, f in enumerate(feats):
            inp[f"feat{n}"].copy_(f)
        inp["top_pos"].copy_(top_pos)

    def _new_entry(self, key: StepKey, feats, top_pos, memory_pos, valid) -> _Entry:
        inp = self._feature_buffers(feats, top_pos)
        inp["memory"] = torch.empty(key.memory_shape, dtype=key.memory_dtype, device=key.device)
        inp["memory_pos"] = torch.empty(tuple(memory_pos.shape), dtype=memory_pos.dtype, device=key.device)
        inp["valid"] = torch.empty(tuple(valid.shape), dtype=torch.bool, device=key.device)
        return _Entry(key, inp)

    def _step(self, e: _Entry):
        i, k = e.inputs, e.key
        feats = tuple(i[f"feat{n}"] for n in range(len(k.feat_shapes)))
        if isinstance(k, TableKey):
            return self._table_step(e, feats)
        return self.tracker.memory_step(feats, i["top_pos"], i["memory"], i["memory_pos"], i["valid"],
                                        k.num_obj_ptr_tokens, run_mem_encoder=k.run_mem_encoder)

    def _table_step(self, e: _Entry, feats):
        from .memory_bank import table_apply_staged, table_memory

        i, k, tr = e.inputs, e.key, self.tracker
        _, spec, state = self._tables[k]
        table_apply_staged(spec, state)  # the staged frames (a no-op once applied)
        memory, memory_pos, n_ptr, valid = table_memory(spec, state, i["frame_t"], k.no_prev, tr.maskmem_tpos_enc,
                                                        tr.obj_ptr_tpos_proj, k.rows)
        out = tr.memory_step(feats, i["top_pos"], memory, memory_pos, valid, n_ptr, run_mem_encoder=k.run_mem_encoder)
        eff = tr.segment_mem_score(out[3], out[4], state.segment[:k.rows], state.segment.shape[0] + 1)
        return (*out[:5], eff, *out[5:])  # table_track_step's order

    def _capture(self, e: _Entry) -> bool:
        """Capture ``e``'s step; False (logged, the key marked eager) if the capture fails."""
        # (not one handle kept for good: _drop_stale_tables may have dropped every graph of it)
        pool = pool_for_capture(x.graph for x in self.entries.values())
        try:
            g, out, _ = warm_up_and_capture(lambda: self._step(e), self.warmup_iters, pool,
                                            "tracker_graph_capture", capture_error_mode="thread_local")
        except RuntimeError as err:
            why = f"capture failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            self._failed[e.key] = why
            logger.warning("tracker step runs eagerly for %s: %s", e.key, why)
            return False
        self._present[e.key] = tuple(x is not None for x in out)
        e.graph, e.outputs = g, [x for x in out if x is not None]
        return True

    @torch.inference_mode()
    def run(self, feats: Sequence[Tensor], top_pos: Tensor, memory: Tensor, memory_pos: Tensor, valid: Tensor,
            num_obj_ptr_tokens: int, *, run_mem_encoder: bool = True):
        """``tracker.memory_step`` on these inputs (already padded to the bucket): the same tuple of
        7 (some None), every tensor valid after later calls."""
        if memory.dim() != 3 or memory_pos.shape != memory.shape or tuple(valid.shape) != tuple(memory.shape[:2]) \
                or valid.dtype != torch.bool:
            raise ValueError(f"memory/memory_pos must be (B, S, M) and valid (B, S) bool, got "
                             f"{tuple(memory.shape)}, {tuple(memory_pos.shape)}, {valid.dtype} {tuple(valid.shape)}")
        if len(feats) != 3:
            raise ValueError(f"feats must be the three tracker levels, got {len(feats)}")
        key = self.key(feats, top_pos, memory, num_obj_ptr_tokens, run_mem_encoder)
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = self._new_entry(key, feats, top_pos, memory_pos, valid)
        inp = e.inputs
        self._copy_features(inp, feats, top_pos)
        inp["memory"].copy_(memory)
        inp["memory_pos"].copy_(memory_pos)
        inp["valid"].copy_(valid)
        return self._launch(e)

    def _launch(self, e: _Entry):
        key = e.key
        if self.why_not_graphs(key) is not None or (e.graph is None and not self._capture(e)):
            with stage("tracker_step"):
                return self._step(e)  # fresh tensors
        with stage("tracker_graph_replay"):
            e.graph.replay()
        e.replays += 1
        outs = iter(t.clone() for t in e.outputs)
        return tuple(next(outs) if p else None for p in self._present[key])

    @torch.inference_mode()
    def run_table(self, table, frame_t: Tensor, feats: Sequence[Tensor], top_pos: Tensor, rows: int, *,
                  no_prev: bool = False, run_mem_encoder: bool = True):
        """The object table's step over its first ``rows`` rows (already the bucket, <= its capacity):
        the staged frames of ``table`` (an :class:`~sam3fast.video.memory_bank.ObjectTable`)
        applied, :func:`table_memory` at ``frame_t`` (0-d long), :meth:`memory_step`, and the
        per-session memory score, in one graph on CUDA. Returns ``table_track_step``'s 8 outputs: those
        of ``run`` with the scores (Cap + 1,) after ``iou_score``."""
        if len(feats) != 3:
            raise ValueError(f"feats must be the three tracker levels, got {len(feats)}")
        if frame_t.dim() != 0 or frame_t.dtype != torch.long:
            raise ValueError(f"frame_t must be a 0-d long tensor, got {frame_t.dtype} {tuple(frame_t.shape)}")
        state = table.state
        cap = state.segment.shape[0]
        if not 1 <= rows <= cap:
            raise ValueError(f"rows must be in 1 .. the table's capacity {cap}, got {rows}")
        key = TableKey(tuple(tuple(f.shape) for f in feats), tuple(top_pos.shape), int(rows), bool(no_prev),
                       feats[-1].dtype, bool(run_mem_encoder), feats[-1].device, _state_layout(state))
        e = self.entries.get(key)
        if e is None:
            self._drop_stale_tables()
            inp = self._feature_buffers(feats, top_pos)
            inp["frame_t"] = torch.empty((), dtype=torch.long, device=key.device)
            e = self.entries[key] = _Entry(key, inp)
            self._tables[key] = (weakref.ref(table), table.spec, state)
        self._copy_features(e.inputs, feats, top_pos)
        e.inputs["frame_t"].copy_(frame_t)
        table.hand_over_staged()  # the step applies them
        return self._launch(e)

    def _drop_stale_tables(self) -> None:
        """Forget the table entries whose table died or now holds other tensors (it grew): their
        graphs would read tensors the table no longer uses."""
        for key, (ref, _, state) in list(self._tables.items()):
            table = ref()
            if table is None or table.state is not state:
                del self._tables[key]
                self.entries.pop(key, None)
                self._present.pop(key, None)
                self._failed.pop(key, None)
