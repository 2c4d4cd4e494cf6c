"""The SAM 3 detector on video frames (official ``Sam3ImageOnVideoMultiGPU``, one process).

Per frame t (one text/visual prompt, Q queries, g feature grid, D = d_model):

1. backbone on frame t (float32) -> SAM 3 FPN and SAM 2 FPN (the dual neck);
2. heads (:meth:`Sam3ImageModel.forward_heads`) -> query logits l (1, Q), presence logit p (1,),
   boxes (1, Q, 4) xyxy in [0, 1], masks (1, Q, 4g, 4g) logits;
3. joint scores (``supervise_joint_box_scores=True``):
   ``logits = clamp(inverse_sigmoid(sigmoid(l) * sigmoid(p)), -10, 10)``;
4. mask NMS (``sam3.perflib.nms.nms_masks``): among queries with sigmoid(logits) > prob_thr, in
   descending score order, a query is dropped when its mask IoU with an already kept query is
   > iou_thr; dropped queries get ``logits -= 1e4``;
5. the SAM 2 FPN levels are rounded to bfloat16 (the official all-gather cast, kept in the
   features' dtype), ready for the tracker.

Frames are processed one ahead (:meth:`forward_video_grounding_multigpu` with world size 1): a
call for frame t returns t from the buffer (computing it if missing), drops t-1 (t+1 in reverse)
and pre-computes t+1 (t-1 in reverse). The next frame is computed with the prompt passed for the
current one, as the official does. sam3fast: with ``defer_next`` the pre-computation is only
queued (:meth:`run_deferred` launches it): the video model launches it right behind the copy that
its planning step reads, so the GPU computes frame t+1's detection while the host waits for that
copy and plans frame t, instead of the host waiting for t+1's detection too and the GPU idling
while it plans.

With W > 1 ranks (``self.dist``, a :class:`~sam3fast.video.distributed.DistContext`) frames go in
chunks of W, as the official ``Sam3ImageOnVideoMultiGPU``: the chunk [b, b + W) holding t (b = t -
t mod W) is computed if missing, rank r running the detector on frame min(b + r, end - 1); the
outputs travel in one asynchronous all-gather of bytes, waited for when a frame is read; the
previous chunk is dropped and the next one is started, so the gather overlaps the tracker's work
on the current chunk. With ``fpn_convs`` the tracker's two projections are applied before the
gather (fewer channels on the wire, same values).

On CUDA with one process (``cuda_graphs``, on by default) a frame's steps 1-5 are one CUDA-graph
replay of the static step of :mod:`sam3fast.video.graphs` (the same code on preallocated buffers,
one graph per prompt shape, geometric prompt or not and dtype), its outputs cloned out.

Module names are the official detector's (``detector.*`` keys of ``sam3.pt``): the image model
with the SAM 2 neck and without the interactive predictor.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..config import Sam3Config
from ..model.decoder import joint_logits
from ..model.sam3_image import Sam3ImageModel
from .side_stream import SideStream


def mask_iou_matrix(masks_a: torch.Tensor, masks_b: torch.Tensor) -> torch.Tensor:
    """``sam3.perflib.masks_ops.mask_iou`` for bool masks (N, H, W), (M, H, W) -> (N, M) float32.

    Counts come from a float32 matmul of 0/1 masks: exact below 2**24 pixels (also with TF32,
    whose 10-bit mantissa holds 0 and 1 exactly), without the official (N, M, H*W) intermediates."""
    a = masks_a.reshape(masks_a.shape[0], -1).float()
    b = masks_b.reshape(masks_b.shape[0], -1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / union.clamp(min=1)


def generic_nms(ious: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS on a precomputed IoU matrix, without host syncs.

    ious (N, N), scores (N,), valid (N,) bool (candidates; invalid ones neither survive nor
    suppress) -> keep (N,) bool. Candidates are visited in descending score order (ties: the
    higher index first, as the official CPU path's ``argsort()[::-1]``); each is kept unless an
    already kept one overlaps it with IoU > ``iou_threshold``. The loop is N steps of small tensor
    ops (a sequential dependency), with no data-dependent Python branch.
    """
    n = scores.shape[0]
    order = torch.argsort(scores, stable=True).flip(0)
    over = ious.index_select(0, order).index_select(1, order) > iou_threshold  # (N, N) in rank order
    valid_s = valid.index_select(0, order)
    keep_s = torch.zeros(n, dtype=torch.bool, device=scores.device)
    for k in range(n):
        suppressed = (keep_s & over[k]).any()
        keep_s[k] = valid_s[k] & ~suppressed
    keep = torch.zeros_like(keep_s)
    keep[order] = keep_s
    return keep


def nms_masks(pred_probs: torch.Tensor, pred_masks: torch.Tensor, prob_threshold: float,
              iou_threshold: float) -> torch.Tensor:
    """``sam3.perflib.nms.nms_masks``: pred_probs (Q,), pred_masks (Q, H, W) logits -> keep (Q,)
    bool: above ``prob_threshold`` and surviving mask NMS at ``iou_threshold``. Static shapes: the
    IoU matrix covers all Q queries (invalid ones are masked), so no host sync. On CUDA the
    bit-packed ``sam3fast::mask_nms`` op does it in a few kernels (ties: the lower index first,
    as the official GPU path); elsewhere the loop below (ties as the official CPU path)."""
    if pred_masks.is_cuda:
        from ..mask_ops import nms_masks as nms_masks_packed

        return nms_masks_packed(pred_probs, pred_masks, prob_threshold, iou_threshold)
    valid = pred_probs > prob_threshold
    binary = pred_masks > 0
    ious = mask_iou_matrix(binary, binary)
    return generic_nms(ious, pred_probs, valid, iou_threshold)


class Sam3VideoDetector(Sam3ImageModel):
    """The video detector. ``detector.*`` keys: the image model's, with ``sam2_convs``, without
    ``inst_interactive_predictor``."""

    def __init__(self, cfg: Sam3Config, bpe_path: Optional[str] = None, supervise_joint_box_scores: bool = True):
        # The dual neck comes with the interactive build; the video detector has no interactive
        # predictor of its own (its tracker lives beside it as ``tracker.*``).
        super().__init__(cfg, enable_segmentation=True, enable_inst_interactivity=True, bpe_path=bpe_path)
        self.inst_interactive_predictor = None
        self.supervise_joint_box_scores = supervise_joint_box_scores
        self.rank = 0
        self.world_size = 1
        self.dist = None  # DistContext when running on several ranks
        # One process on CUDA: each frame's detector step is one CUDA-graph replay
        # (:mod:`sam3fast.video.graphs`); False: the eager path. W > 1 ranks always run eagerly.
        self.cuda_graphs = True
        self._graph_runner = None
        self._deferred = None  # the queued one-ahead detection (forward_video_grounding_multigpu)
        self._ahead = SideStream()  # ahead_stream launches: the stream, the last one's event

    # ------------------------------------------------------------------ one frame
    def forward_frame(
        self,
        image: torch.Tensor,
        text_feats: torch.Tensor,
        text_mask: torch.Tensor,
        boxes: Optional[torch.Tensor] = None,
        box_labels: Optional[torch.Tensor] = None,
        run_nms: bool = False,
        nms_prob_thresh: Optional[float] = None,
        nms_iou_thresh: Optional[float] = None,
    ) -> Dict[str, torch.Tensor]:
        """One frame (1, 3, R, R) (any float dtype; run in the model dtype) with one prompt:
        text_feats (1, T, D), text_mask (1, T) True = pad, optional boxes (1, Nb, 4) cxcywh in
        [0, 1] with box_labels (1, Nb) bool.

        Returns ``pred_logits`` (1, Q, 1) joint logits (NMS-suppressed ones lowered by 1e4),
        ``pred_boxes`` (1, Q, 4) cxcywh, ``pred_boxes_xyxy`` (1, Q, 4), ``pred_masks`` (1, Q, 4g, 4g)
        logits, ``tracker_backbone_fpn_{0,1,2}`` (1, D, 4g/2g/g, ...) bf16-rounded SAM 2 FPN (in
        the model dtype) and ``tracker_backbone_pos_enc`` (list of 3 position encodings).
        """
        image = image.to(device=self.device, dtype=self.dtype)
        image_out = self.encode_image(image)
        out = self.forward_heads(image_out, None, text_feats, text_mask, boxes=boxes, box_labels=box_labels)
        logits = out["pred_logits"].unsqueeze(-1)  # (1, Q, 1)
        if self.supervise_joint_box_scores:
            logits = joint_logits(logits, out["presence_logit"].unsqueeze(-1))
        if run_nms:
            probs = logits.squeeze(-1).sigmoid()
            for p in range(probs.shape[0]):
                keep = nms_masks(probs[p], out["pred_masks"][p], nms_prob_thresh, nms_iou_thresh)
                logits[p, :, 0] -= 1e4 * (~keep).to(logits.dtype)
        # The official casts the SAM 2 FPN to bf16 for its all-gather; the tracker then reads the
        # rounded values. Rounding here keeps that precision step in a float32 run.
        fpn = [f.to(torch.bfloat16).to(f.dtype) for f in image_out["sam2_backbone_fpn"]]
        return {
            "pred_logits": logits,
            "pred_boxes": out["pred_boxes"],
            "pred_boxes_xyxy": out["pred_boxes_xyxy"],
            "pred_masks": out["pred_masks"],
            "tracker_backbone_fpn_0": fpn[0],
            "tracker_backbone_fpn_1": fpn[1],
            "tracker_backbone_fpn_2": fpn[2],
            "tracker_backbone_pos_enc": list(image_out["sam2_pos_enc"]),
        }

    # ------------------------------------------------------------------ one frame ahead
    def forward_video_grounding_multigpu(
        self,
        images,
        text_feats: torch.Tensor,
        text_mask: torch.Tensor,
        geometric_prompt: Optional[Dict[str, torch.Tensor]],
        frame_idx: int,
        num_frames: int,
        multigpu_buffer: Dict[int, Dict[str, torch.Tensor]],
        track_in_reverse: bool = False,
        run_nms: bool = False,
        nms_prob_thresh: Optional[float] = None,
        nms_iou_thresh: Optional[float] = None,
        defer_next: bool = False,
        ahead_stream: bool = False,
        **kwargs,
    ) -> Dict[str, torch.Tensor]:
        """Detector outputs for ``frame_idx`` (see :meth:`forward_frame`), through the one-ahead
        buffer ``multigpu_buffer`` (frame index -> outputs; the caller keeps it between calls).

        images: indexable frames (T, 3, R, R) (float16 normalised, as the loaders store them);
        geometric_prompt: None or ``{"boxes": (1, Nb, 4) cxcywh, "box_labels": (1, Nb) bool}``.
        ``defer_next`` (world size 1): queue the next frame's detection for :meth:`run_deferred`
        instead of launching it now (a queued one still pending is launched first).
        ``ahead_stream`` (world size 1, CUDA): launch the next frame's detection now on a side
        stream (``defer_next`` is then not used), so that it runs beside the work the caller queues
        on the current stream for this frame (the tracker step, planning, memory encoding); its
        outputs wait for an event when their frame is read. Elsewhere it runs inline, as without it.
        """
        self.run_deferred()
        args = dict(images=images, text_feats=text_feats, text_mask=text_mask, geometric_prompt=geometric_prompt,
                    run_nms=run_nms, nms_prob_thresh=nms_prob_thresh, nms_iou_thresh=nms_iou_thresh)
        if self.world_size > 1:
            return self._forward_chunked(frame_idx, num_frames, multigpu_buffer, track_in_reverse,
                                         kwargs.get("fpn_convs"), args)
        if frame_idx not in multigpu_buffer:
            multigpu_buffer[frame_idx] = self._detect_frame(frame_idx, **args)
        out = self._take_ready(multigpu_buffer[frame_idx])
        # world size 1: a chunk is one frame; drop the previous one, compute the next one
        prev = frame_idx + 1 if track_in_reverse else frame_idx - 1
        if 0 <= prev < num_frames:
            multigpu_buffer.pop(prev, None)
        nxt = frame_idx - 1 if track_in_reverse else frame_idx + 1
        if 0 <= nxt < num_frames and nxt not in multigpu_buffer:
            if ahead_stream and self.device.type == "cuda":
                multigpu_buffer[nxt] = self._detect_ahead(nxt, args)
            elif defer_next and not ahead_stream:
                self._deferred = (nxt, multigpu_buffer, args)
            else:
                multigpu_buffer[nxt] = self._detect_frame(nxt, **args)
        return out

    def _detect_ahead(self, frame_idx: int, args) -> Dict[str, object]:
        """:meth:`_detect_frame` on the side stream, behind the work queued on the current stream
        (the prompt's features, the previous replay of the graph's buffers); the entry carries the
        event that ends it under ``"_ready"`` (see :meth:`_take_ready`)."""
        out, done = self._ahead.run(self.device, lambda: dict(self._detect_frame(frame_idx, **args)))
        out["_ready"] = done
        return out

    def _take_ready(self, entry: Dict[str, object]) -> Dict[str, object]:
        """A buffer entry's outputs for the current stream. An entry made on the side stream
        (:meth:`_detect_ahead`) is read once that work ends (the current stream waits for its
        event, the first time it is read), and its tensors are marked as used on this stream: the
        allocator must not hand their memory to the side stream's next detection while this
        stream's work still reads them."""
        SideStream.adopt(entry, entry.pop("_ready", None), self.device)
        return dict(entry)

    def run_deferred(self) -> None:
        """Launch the one-ahead detection that ``defer_next`` queued, if any (asynchronous on CUDA:
        its outputs are the buffer's next entry, as without deferring)."""
        if self._deferred is None:
            return
        nxt, buf, args = self._deferred
        self._deferred = None
        if nxt not in buf:
            buf[nxt] = self._detect_frame(nxt, **args)

    def drop_deferred(self) -> None:
        """Forget a queued one-ahead detection (a session that ends or resets: nothing launches it)."""
        self._deferred = None

    # ------------------------------------------------------------------ W ranks
    def _forward_chunked(self, frame_idx, num_frames, buf, reverse, fpn_convs, args):
        W = self.world_size
        b = frame_idx - frame_idx % W
        e = min(b + W, num_frames)
        if frame_idx not in buf:
            self._build_chunk(b, e, buf, fpn_convs, args)
        out = self._read(buf[frame_idx])
        if not reverse and b - W >= 0:
            prev = range(b - W, b)
        elif reverse and e < num_frames:
            prev = range(e, min(e + W, num_frames))
        else:
            prev = range(0)
        for t in prev:
            buf.pop(t, None)
        if not reverse and e < num_frames:
            nxt = (e, min(e + W, num_frames))
        elif reverse and b - W >= 0:
            nxt = (b - W, b)
        else:
            nxt = None
        if nxt is not None and nxt[0] not in buf:
            self._build_chunk(nxt[0], nxt[1], buf, fpn_convs, args)
        return out

    def _build_chunk(self, begin, end, buf, fpn_convs, args):
        """This rank's frame of the chunk, then one asynchronous all-gather of its outputs."""
        local = self._detect_frame(min(begin + self.rank, end - 1), **args)
        fpn = [local["tracker_backbone_fpn_0"], local["tracker_backbone_fpn_1"], local["tracker_backbone_fpn_2"]]
        if fpn_convs is not None:
            fpn = [fpn_convs[0](fpn[0]), fpn_convs[1](fpn[1]), fpn[2]]
        keys = ["pred_logits", "pred_boxes", "pred_boxes_xyxy", "pred_masks",
                "tracker_backbone_fpn_0", "tracker_backbone_fpn_1", "tracker_backbone_fpn_2"]
        tensors = [local[k] for k in keys[:4]] + fpn
        # the last FPN level is already rounded to bf16 (exact in bf16); the rest travels as is
        wire = [None] * 6 + [torch.bfloat16]
        from .distributed import pack_bytes

        flat, specs = pack_bytes(tensors, wire)
        parts, work = self.dist.all_gather_async(flat, "detector outputs")
        pending = {"work": work, "parts": parts, "specs": specs}
        for r in range(self.world_size):
            if begin + r < end:
                buf[begin + r] = {"_pending": pending, "_slot": r, "_keys": keys,
                                  "tracker_backbone_pos_enc": local["tracker_backbone_pos_enc"],
                                  "tracker_fpn_projected": fpn_convs is not None}

    def _read(self, entry):
        if "_pending" in entry:
            from .distributed import unpack_bytes

            pending = entry["_pending"]
            if pending["work"] is not None:
                self.dist.wait_data(pending["work"], "detector outputs")
                pending["work"] = None
            vals = unpack_bytes(pending["parts"][entry["_slot"]], pending["specs"])
            keys = entry["_keys"]
            for k in ("_pending", "_slot", "_keys"):
                entry.pop(k)
            entry.update(zip(keys, vals))
        return dict(entry)

    def _uses_graphed_step(self) -> bool:
        """Whether :meth:`_detect_frame` goes through the static step of :mod:`sam3fast.video.graphs`
        (captured and replayed as a CUDA graph where the step allows it). A seam: CPU tests force
        it, and the runner then runs the same step eagerly on its buffers. On several ranks each
        rank replays its own graph for its frame of the chunk (the all-gather stays outside the
        graph; this combination has not run on GPUs yet)."""
        return self.cuda_graphs and self.device.type == "cuda"

    def graph_runner(self):
        """The :class:`~sam3fast.video.graphs.GraphedDetector` of this detector (made on first use,
        remade when the model moved to another device or dtype: captured graphs read the weights
        at the addresses they had; after replacing weights otherwise than in place, call its
        ``clear()``)."""
        from .graphs import GraphedDetector

        r = self._graph_runner
        if r is None or r.device != self.device or r.dtype != self.dtype:
            r = self._graph_runner = GraphedDetector(self)
        return r

    def _detect_frame(self, frame_idx: int, images, text_feats, text_mask, geometric_prompt, run_nms,
                      nms_prob_thresh, nms_iou_thresh) -> Dict[str, torch.Tensor]:
        boxes = labels = None
        if geometric_prompt is not None:
            boxes, labels = geometric_prompt["boxes"], geometric_prompt["box_labels"]
        if self.device.type == "cuda":
            # a detection here, unless on the side stream, waits for the last side one, read or not
            # (both run through the graph runner's static buffers)
            self._ahead.wait_last(self.device)
        if self._uses_graphed_step():
            return self.graph_runner().run(
                images[frame_idx], text_feats, text_mask, boxes, labels,
                run_nms=run_nms, nms_prob_thresh=nms_prob_thresh, nms_iou_thresh=nms_iou_thresh,
            )
        return self.forward_frame(
            images[frame_idx][None], text_feats, text_mask, boxes=boxes, box_labels=labels,
            run_nms=run_nms, nms_prob_thresh=nms_prob_thresh, nms_iou_thresh=nms_iou_thresh,
        )

    def encode_text_batch(self, prompts: List[str]):
        """The official ``backbone.forward_text`` on the prompt list (one batch): (features
        (P, T, D), mask (P, T) True = pad)."""
        return self.encode_text(prompts)
