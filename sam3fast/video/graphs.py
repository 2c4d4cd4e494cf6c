"""CUDA graphs for the video detector: a static per-frame detector step and a runner that captures it.

Letters: R the input resolution (1008), P prompts per frame (1 in a video session), T text tokens
(32), D d_model, Q query slots (200), g the feature grid (72 at 1008 px), Nb geometric prompt boxes.

:func:`detector_step` is the detector's work on one frame (see :mod:`sam3fast.video.detector`):
backbone with the dual neck, heads with the cached text prompt and an optional geometric prompt,
joint scores, mask NMS (``run_nms`` and its thresholds are capture-time constants), the SAM 2 FPN
rounded through bfloat16. Inputs are preallocated buffers:

    frame       (1, 3, R, R)   model dtype (the session's float16 frame, cast by the copy into it)
    text_feats  (P, T, D), text_mask (P, T) bool (True = pad)
    boxes       (P, Nb, 4) float cxcywh in [0, 1], box_labels (P, Nb) bool, or both None

and it returns the dict ``Sam3VideoDetector._detect_frame`` returns: pred_logits (1, Q, 1),
pred_boxes / pred_boxes_xyxy (1, Q, 4), pred_masks (1, Q, 4g, 4g), tracker_backbone_fpn_{0,1,2}
(1, D, 4g / 2g / g, ...), tracker_backbone_pos_enc (3 position encodings). It is the eager
``forward_frame`` itself, called on the buffers: that code path reads no tensor value on the host
and branches on none (NMS is ``sam3fast::mask_nms`` on CUDA), so one body serves both the eager
path and the graph, and they cannot drift apart.

:class:`GraphedDetector` keeps, per :class:`DetectorKey` (prompt shape and dtype, geometric boxes
or not, NMS constants, model dtype, resolution, device), the input buffers and on CUDA a
``torch.cuda.CUDAGraph`` of the step, captured on first use (warm-up on a side stream, every graph
in one shared pool, as :class:`sam3fast.predictor.graphs.GraphedImageStep` does). A call copies the
frame and prompt into the buffers, replays, and clones the outputs the graph writes into fresh
tensors: the session keeps a frame's outputs across the next replay (the one-ahead buffer holds
frame t + 1 while frame t is used; the tracker's feature cache holds frame t). Outputs the graph
does not write (the position encodings: views of the backbone's cached tables) are handed out as
they are, as the eager path does. On CPU, with ``cuda_graphs=False``, or where the step cannot be
captured (:meth:`GraphedDetector.why_not_graphs`), the step runs eagerly on the same buffers.
"""

from __future__ import annotations

import logging
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..predictor.graphs import (
    _Entry, check_warmup_iters, persistent_outputs, pool_for_capture, resolve_cuda_graphs, warm_up_and_capture,
)
from ..profiling import stage

logger = logging.getLogger(__name__)

OUTPUT_KEYS = ("pred_logits", "pred_boxes", "pred_boxes_xyxy", "pred_masks", "tracker_backbone_fpn_0",
               "tracker_backbone_fpn_1", "tracker_backbone_fpn_2", "tracker_backbone_pos_enc")


def detector_step(
    detector,
    frame: Tensor,
    text_feats: Tensor,
    text_mask: Tensor,
    boxes: Optional[Tensor] = None,
    box_labels: Optional[Tensor] = None,
    *,
    run_nms: bool = False,
    nms_prob_thresh: Optional[float] = None,
    nms_iou_thresh: Optional[float] = None,
) -> Dict[str, object]:
    """The static per-frame detector step on preallocated buffers (see the module docstring)."""
    return detector.forward_frame(frame, text_feats, text_mask, boxes=boxes, box_labels=box_labels,
                                  run_nms=run_nms, nms_prob_thresh=nms_prob_thresh, nms_iou_thresh=nms_iou_thresh)


class DetectorKey(NamedTuple):
    prompts: int  # P
    text_len: int  # T
    text_dim: int  # D
    text_dtype: torch.dtype
    boxes: int  # Nb; -1: no geometric prompt (not the same graph as Nb = 0)
    box_dtype: Optional[torch.dtype]
    run_nms: bool
    nms_prob_thresh: Optional[float]
    nms_iou_thresh: Optional[float]
    dtype: torch.dtype  # the model's (the frame buffer's)
    resolution: int
    device: torch.device


def _flatten(out: Dict[str, object]) -> List[Tensor]:
    """The step's tensors in a fixed order (the position encodings are a list)."""
    flat = [out[k] for k in OUTPUT_KEYS[:-1]]
    return flat + list(out["tracker_backbone_pos_enc"])


def _unflatten(flat: List[Tensor]) -> Dict[str, object]:
    n = len(OUTPUT_KEYS) - 1
    res: Dict[str, object] = dict(zip(OUTPUT_KEYS[:-1], flat[:n]))
    res["tracker_backbone_pos_enc"] = list(flat[n:])
    return res


class GraphedDetector:
    """Runs :func:`detector_step` per :class:`DetectorKey`, through a CUDA graph on CUDA (see the
    module docstring). ``cuda_graphs``: None = on CUDA devices; True on a non-CUDA model raises."""

    def __init__(self, detector, cuda_graphs: Optional[bool] = None, warmup_iters: int = 2):
        dev = detector.device
        self.detector = detector
        self.device, self.dtype = dev, detector.dtype
        self.cuda_graphs = resolve_cuda_graphs(cuda_graphs, dev, "a model")
        self.warmup_iters = check_warmup_iters(warmup_iters)
        self.entries: Dict[DetectorKey, _Entry] = {}
        # per captured key: which outputs the graph writes (cloned per call) and which it only
        # hands through (persistent tensors, e.g. the cached position encodings)
        self._written: Dict[DetectorKey, Tuple[bool, ...]] = {}
        self._why_not: Dict[DetectorKey, Optional[str]] = {}
        self._warned: set = set()

    def clear(self) -> None:
        """Drop every key (graphs, buffers, the memory pool)."""
        self.entries.clear()
        self._written.clear()

    # ------------------------------------------------------------------ keys and buffers
    def key(self, text_feats: Tensor, boxes: Optional[Tensor], run_nms: bool, nms_prob_thresh, nms_iou_thresh
            ) -> DetectorKey:
        d = self.detector
        P, T, D = text_feats.shape
        nb = -1 if boxes is None else int(boxes.shape[1])
        nms = (float(nms_prob_thresh), float(nms_iou_thresh)) if run_nms else (None, None)
        return DetectorKey(P, T, D, text_feats.dtype, nb, None if boxes is None else boxes.dtype, bool(run_nms),
                           *nms, d.dtype, d.cfg.resolution, d.device)

    def why_not_graphs(self, key: DetectorKey) -> Optional[str]:
        """None when ``key``'s step is captured and replayed; else why it runs eagerly."""
        if not self.cuda_graphs:
            return "cuda_graphs is off" if key.device.type == "cuda" else f"the model is on {key.device}"
        if key.run_nms:
            if key not in self._why_not:
                from ..mask_ops import mask_ops_backend

                backend, why = mask_ops_backend(torch.empty(0, device=key.device))
                # the reference NMS builds a CUDA tensor from a Python float: a copy from host
                # memory, which a capture does not allow
                self._why_not[key] = None if backend == "native" else f"mask NMS has no CUDA kernel ({why})"
            return self._why_not[key]
        return None

    def _new_entry(self, key: DetectorKey) -> _Entry:
        dev, R = key.device, key.resolution
        inp = {
            "frame": torch.zeros((1, 3, R, R), dtype=key.dtype, device=dev),
            "text_feats": torch.zeros((key.prompts, key.text_len, key.text_dim), dtype=key.text_dtype, device=dev),
            "text_mask": torch.zeros((key.prompts, key.text_len), dtype=torch.bool, device=dev),
        }
        if key.boxes >= 0:
            inp["boxes"] = torch.zeros((key.prompts, key.boxes, 4), dtype=key.box_dtype, device=dev)
            inp["box_labels"] = torch.ones((key.prompts, key.boxes), dtype=torch.bool, device=dev)
        return _Entry(key, inp)

    def _step(self, e: _Entry) -> Dict[str, object]:
        i, k = e.inputs, e.key
        return detector_step(self.detector, i["frame"], i["text_feats"], i["text_mask"], i.get("boxes"),
                             i.get("box_labels"), run_nms=k.run_nms, nms_prob_thresh=k.nms_prob_thresh,
                             nms_iou_thresh=k.nms_iou_thresh)

    def _capture(self, e: _Entry) -> None:
        # (warm-up on a side stream also fills the position encoding cache outside the capture)
        pool = pool_for_capture(x.graph for x in self.entries.values())
        try:
            # thread_local: a frame loader thread may use CUDA while this thread captures
            g, out, warm = warm_up_and_capture(lambda: _flatten(self._step(e)), self.warmup_iters, pool,
                                               "detector_graph_capture", capture_error_mode="thread_local")
        except RuntimeError as err:
            del self.entries[e.key]
            raise RuntimeError(
                f"capturing the video detector step as a CUDA graph failed for {e.key} (a host sync or a "
                "host-to-device copy inside the model?); set detector.cuda_graphs = False to run it eagerly"
            ) from err
        # outputs the graph only hands through (the cached position encodings) are not rewritten by
        # a replay and need no copy
        self._written[e.key] = tuple(not shared for shared in persistent_outputs(out, warm))
        e.graph, e.outputs = g, out

    # ------------------------------------------------------------------ run
    def _check(self, frame: Tensor, text_feats: Tensor, text_mask: Tensor, boxes, box_labels, run_nms,
               nms_prob_thresh, nms_iou_thresh) -> None:
        d = self.detector
        R, dev = d.cfg.resolution, d.device
        if not isinstance(frame, Tensor) or tuple(frame.shape[-3:]) != (3, R, R) or frame.dim() not in (3, 4) \
                or (frame.dim() == 4 and frame.shape[0] != 1) or not frame.is_floating_point():
            got = f"{frame.dtype} {tuple(frame.shape)}" if isinstance(frame, Tensor) else type(frame).__name__
            raise ValueError(f"frame must be a float (3, {R}, {R}) or (1, 3, {R}, {R}) tensor, got {got}")
        if not isinstance(text_feats, Tensor) or text_feats.dim() != 3 or text_feats.shape[0] != 1:
            got = tuple(text_feats.shape) if isinstance(text_feats, Tensor) else type(text_feats).__name__
            raise ValueError(f"text_feats must be one prompt (1, T, D), got {got}")
        if not isinstance(text_mask, Tensor) or tuple(text_mask.shape) != tuple(text_feats.shape[:2]) \
                or text_mask.dtype != torch.bool:
            raise ValueError(f"text_mask must be a {tuple(text_feats.shape[:2])} bool tensor, got "
                             f"{getattr(text_mask, 'dtype', None)} {tuple(getattr(text_mask, 'shape', ()))}")
        if (boxes is None) != (box_labels is None):
            raise ValueError("boxes and box_labels go together: give both or neither")
        if boxes is not None:
            if boxes.dim() != 3 or boxes.shape[0] != 1 or boxes.shape[2] != 4 or not boxes.is_floating_point():
                raise ValueError(f"boxes must be a float (1, Nb, 4) tensor, got {boxes.dtype} {tuple(boxes.shape)}")
            if tuple(box_labels.shape) != tuple(boxes.shape[:2]):
                raise ValueError(f"box_labels must be {tuple(boxes.shape[:2])}, got {tuple(box_labels.shape)}")
        if run_nms and (nms_prob_thresh is None or nms_iou_thresh is None):
            raise ValueError("run_nms needs nms_prob_thresh and nms_iou_thresh")
        for name, t in (("text_feats", text_feats), ("text_mask", text_mask), ("boxes", boxes),
                        ("box_labels", box_labels)):
            if t is not None and t.device != dev:
                raise ValueError(f"{name} must be on {dev} (the model's), got {t.device}")

    @torch.inference_mode()
    def run(
        self,
        frame: Tensor,
        text_feats: Tensor,
        text_mask: Tensor,
        boxes: Optional[Tensor] = None,
        box_labels: Optional[Tensor] = None,
        *,
        run_nms: bool = False,
        nms_prob_thresh: Optional[float] = None,
        nms_iou_thresh: Optional[float] = None,
    ) -> Dict[str, object]:
        """One frame: frame (3, R, R) or (1, 3, R, R) (any float dtype, cast into the model's by the
        copy), the prompt as :func:`detector_step` takes it. Returns the step's dict; every tensor in
        it stays valid after later calls."""
        self._check(frame, text_feats, text_mask, boxes, box_labels, run_nms, nms_prob_thresh, nms_iou_thresh)
        key = self.key(text_feats, boxes, run_nms, nms_prob_thresh, nms_iou_thresh)
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = self._new_entry(key)
        inp = e.inputs
        # Fill the buffers: device copies (the frame's cast included), nothing read on the host.
        inp["frame"].copy_(frame.reshape(inp["frame"].shape))
        inp["text_feats"].copy_(text_feats)
        inp["text_mask"].copy_(text_mask)
        if boxes is not None:
            inp["boxes"].copy_(boxes)
            inp["box_labels"].copy_(box_labels)

        why = self.why_not_graphs(key)
        if why is not None:
            if self.cuda_graphs and key not in self._warned:
                self._warned.add(key)
                logger.warning("video detector step runs eagerly for %s: %s", key, why)
            with stage("detector_step"):
                return self._step(e)  # fresh tensors: nothing to copy

        if e.graph is None:
            self._capture(e)
        with stage("detector_graph_replay"):
            e.graph.replay()
        e.replays += 1
        written = self._written[key]
        return _unflatten([t.clone() if w else t for t, w in zip(e.outputs, written)])
