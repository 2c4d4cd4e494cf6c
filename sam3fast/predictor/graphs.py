"""CUDA graphs for the image pipeline: a static-shape image step and a runner that captures it.

Letters: B images, P prompts (Pb: P padded up to its bucket), Q query slots (200 in SAM 3), R the
input resolution (1008), T text tokens (32), D d_model, m the low-resolution mask grid (4 g = 288
at 1008 px), Nb exemplar boxes per image, (H, W) a mask output size.

:func:`image_step` is the whole image pipeline after preprocessing and the (cached) text encoder:
backbone, heads (geometry, fusion encoder, decoder, scoring, segmentation head) and the part of the
official post-processing that has a fixed shape, for every one of the Q query slots:

    probs[b, p, q]  = sigmoid(logit) * sigmoid(presence)             (float32, as the processor)
    keep[b, p, q]   = probs > threshold  and  prompt p is not padding
    boxes[b, p, q]  = xyxy in [0, 1] * (W_b, H_b, W_b, H_b)          (float32 pixels)
    masks, by the mask-size policy (part of the bucket key):
      ``mask_size=None``   mask_logits[b, p, q] (m, m) in the model dtype: the official bilinear
                           resize to each image's own size is left to the caller, for the kept
                           slots only (usually a handful of the Q = 200; resizing all of them
                           writes Q * H * W floats per pair);
      ``mask_size=(H, W)`` masks[b, p, q] (H, W) bool = sigmoid(bilinear(logits)) > 0.5, every
                           image of the call being H x W (memory: B * Pb * Q * H * W floats).

It reads no tensor value on the host and branches on none, so it can be captured. Padding prompt
rows are copies of prompt 0 (real features: no all-masked attention row, no NaN) and are dropped
by ``keep``. Each (image, prompt) pair is independent in the heads, so padding the prompts does not
change the real rows beyond rounding (see PADDED_PROMPT_BUCKETS: by default prompts are not padded);
the image batch is never padded. On CPU the scores are computed pair by pair, the shapes the
processor's ``postprocess`` uses, so that they are bit-equal to it (see the comment in the code).

:class:`GraphedImageStep` keeps, per bucket (B, Pb, Nb, mask size, dtype, R), preallocated input
buffers and, on CUDA, a ``torch.cuda.CUDAGraph`` of the step, captured on first use (warm-up on a
side stream as the CUDA-graphs notes ask, every graph in one shared memory pool). A call copies its
inputs into the buffers and replays. On CPU, or with ``cuda_graphs=False``, the step runs eagerly on
the same buffers: only capture and replay are skipped, so the CPU tests cover the buffer handling.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _pytree

from ..profiling import stage

# Prompt buckets for GraphedImageStep(prompt_buckets=...): fewer graphs when the prompt count varies.
# Not the default: padding changes the heads' batch size, and CPU and GPU matmul/conv kernels pick
# their blocking by size, so the real rows then equal an unpadded run only up to rounding (~1e-6
# relative in float32). The default (None) keys on the exact P and equals the eager path bit for bit.
PADDED_PROMPT_BUCKETS: Tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def image_step(
    model,
    images: Tensor,
    text_feats: Tensor,
    text_mask: Tensor,
    prompt_valid: Tensor,
    threshold: Tensor,
    scale: Tensor,
    boxes: Optional[Tensor] = None,
    box_labels: Optional[Tensor] = None,
    box_mask: Optional[Tensor] = None,
    mask_size: Optional[Tuple[int, int]] = None,
) -> Dict[str, Tensor]:
    """The static-shape image step (see the module docstring).

    images (B, 3, R, R) normalised, model dtype; text_feats (Pb, T, D), text_mask (Pb, T) bool (True =
    pad token); prompt_valid (Pb,) bool; threshold 0-d float32; scale (B, 4) float32 = (W, H, W, H) of
    each image; boxes (B, Nb, 4) float32 normalised cxcywh, box_labels (B, Nb) bool, box_mask (B, Nb)
    bool (True = padding), the same for every prompt of an image, or all None.
    Returns scores (B, Pb, Q) float32, keep (B, Pb, Q) bool, boxes (B, Pb, Q, 4) float32 pixels and,
    with a segmentation head, mask_logits (B, Pb, Q, m, m) or masks (B, Pb, Q, H, W) bool.
    """
    B, Pb = images.shape[0], text_feats.shape[0]
    dev = images.device
    image_out = model.encode_image(images)
    # pair n = b * Pb + p, as ImagePredictor.predict orders them. arange + expand instead of
    # repeat_interleave(int), which computes its output size on the host on some versions.
    # One prompt: pair n is image n (no gather). One image: forward_heads broadcasts it.
    img_idx = None if Pb == 1 else torch.arange(B, device=dev).view(B, 1).expand(B, Pb).reshape(B * Pb)
    feats = text_feats.repeat(B, 1, 1)
    tmask = text_mask.repeat(B, 1)
    bx = bl = bm = None
    if boxes is not None:
        nb = boxes.shape[1]
        bx = boxes[:, None].expand(B, Pb, nb, 4).reshape(B * Pb, nb, 4)
        bl = box_labels[:, None].expand(B, Pb, nb).reshape(B * Pb, nb)
        bm = box_mask[:, None].expand(B, Pb, nb).reshape(B * Pb, nb)
    out = model.forward_heads(image_out, img_idx, feats, tmask, boxes=bx, box_labels=bl, box_mask=bm)
    Q = out["pred_logits"].shape[1]
    logits, presence = out["pred_logits"], out["presence_logit"]
    if logits.device.type == "cpu":
        # CPU elementwise kernels run SIMD on the body of a tensor and a scalar loop on its tail,
        # and the two exp()s may round differently: per pair, as the processor's postprocess()
        # computes it, every element takes the same path as there and the scores are bit-equal.
        # (CUDA computes every element alike whatever the shape.)
        probs = torch.stack([logits[n].float().sigmoid() * presence[n].float().sigmoid() for n in range(B * Pb)])
    else:
        probs = logits.float().sigmoid() * presence.float().sigmoid()[:, None]
    probs = probs.view(B, Pb, Q)
    # threshold is a 0-d float32 tensor: compared in float32, as a Python float is (0-d tensors and
    # Python scalars do not promote the other operand's dtype)
    keep = (probs > threshold) & prompt_valid.view(1, Pb, 1)
    boxes_px = out["pred_boxes_xyxy"].float().view(B, Pb, Q, 4) * scale.view(B, 1, 1, 4)
    res = {"scores": probs, "keep": keep, "boxes": boxes_px}
    if "pred_masks" in out:
        pm = out["pred_masks"]
        m_h, m_w = pm.shape[-2:]
        if mask_size is None:
            res["mask_logits"] = pm.view(B, Pb, Q, m_h, m_w)
        else:
            H, W = mask_size
            up = F.interpolate(pm.float().reshape(B * Pb * Q, 1, m_h, m_w), (H, W), mode="bilinear",
                               align_corners=False)
            res["masks"] = (up.sigmoid() > 0.5).view(B, Pb, Q, H, W)
    return res


class BucketKey(NamedTuple):
    batch: int  # B
    prompts: int  # Pb
    boxes: int  # Nb; -1: no boxes at all (not the same graph as Nb = 0)
    mask_size: Optional[Tuple[int, int]]  # None: low-resolution mask logits
    dtype: torch.dtype
    resolution: int


@dataclass
class _Entry:
    """One bucket: its input buffers, and on CUDA its graph and the outputs the graph writes."""

    key: BucketKey
    inputs: Dict[str, Tensor]
    graph: Optional["torch.cuda.CUDAGraph"] = None
    outputs: Optional[Dict[str, Tensor]] = None
    replays: int = 0


def resolve_cuda_graphs(cuda_graphs: Optional[bool], device: torch.device, what: str) -> bool:
    """A graph runner's ``cuda_graphs`` argument: None = on CUDA devices; True on another device
    raises (``what``: "a model", "a tracker")."""
    if cuda_graphs is None:
        return device.type == "cuda"
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs {what} on a CUDA device; this one is on {device}")
    return bool(cuda_graphs)


def check_warmup_iters(warmup_iters: int) -> int:
    if warmup_iters < 1:
        raise ValueError(f"warmup_iters must be >= 1, got {warmup_iters}")
    return int(warmup_iters)


def pool_for_capture(graphs) -> tuple:
    """The memory pool a graph runner captures its next graph into: the pool of one of its live
    graphs (``graphs``: the runner's graphs, None for keys without one), so that all its graphs
    share one pool, or a new pool when none is alive.

    A runner must not keep a pool handle across the loss of all its graphs: when the last graph
    of a pool is destroyed, PyTorch keeps the pool with no user (use_count 0) until its memory is
    freed, and a capture into it then fails with "use_count > 0 INTERNAL ASSERT FAILED" in
    CUDACachingAllocator. The tracker's step runner drops the graphs of an object table that grew
    (the concept video adds objects), and the H200 run of 2026-11-27 saw that capture fail."""
    for g in graphs:
        if g is not None:
            return g.pool()
    return torch.cuda.graph_pool_handle()


def warm_up_and_capture(step, warmup_iters: int, pool, stage_name: str, **graph_kw):
    """The recipe of the CUDA-graphs notes, shared by the graph runners: ``step()`` run
    ``warmup_iters`` times on a side stream (lazy initialisation, Triton and inductor compilation,
    cuBLAS workspaces happen there, not in the capture), then captured into ``pool``. Returns
    ``(graph, captured outputs, the last warm-up's outputs)``; a failed capture raises the
    RuntimeError of ``torch.cuda.graph``."""
    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        for _ in range(warmup_iters):
            warm = step()
    cur.wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with stage(stage_name), torch.cuda.graph(g, pool=pool, **graph_kw):
        out = step()
    return g, out, warm


def _storage(x) -> Optional[int]:
    return x.untyped_storage().data_ptr() if isinstance(x, torch.Tensor) and x.numel() > 0 else None


def persistent_outputs(out, warm, inputs=()) -> List[bool]:
    """Per leaf of a graph's captured outputs ``out``: True where the step returned memory it did
    not allocate (a cache's tensor, a weight, or views of them), which a replay never writes and so
    needs no clone. The test: the leaf's storage is the same in ``out`` and in ``warm``, the last
    warm-up's outputs, which are alive during the capture (so memory allocated there cannot repeat
    their addresses), and it is none of the static ``inputs`` (which the next call's copy-in
    overwrites). Pytrees of another structure, plain values and empty tensors: False (cloned)."""
    out_leaves, out_spec = _pytree.tree_flatten(out)
    warm_leaves, warm_spec = _pytree.tree_flatten(warm)
    if str(out_spec) != str(warm_spec):
        return [False] * len(out_leaves)
    taken = {_storage(x) for x in _pytree.tree_leaves(inputs)} - {None}
    return [_storage(o) is not None and _storage(o) == _storage(w) and _storage(o) not in taken
            for o, w in zip(out_leaves, warm_leaves)]


@dataclass
class StepOutputs:
    """The step's outputs for the real prompts: scores (B, P, Q), keep (B, P, Q), boxes (B, P, Q, 4),
    mask_logits (B, P, Q, m, m) or masks (B, P, Q, H, W). ``ready``: on CUDA, an event recorded after
    the outputs were written (for host copies: wait on it, or call :meth:`wait`, before reading)."""

    tensors: Dict[str, Tensor]
    key: BucketKey
    ready: Optional["torch.cuda.Event"] = None

    def __getitem__(self, k: str) -> Tensor:
        return self.tensors[k]

    def __contains__(self, k: str) -> bool:
        return k in self.tensors

    def wait(self) -> "StepOutputs":
        if self.ready is not None:
            self.ready.synchronize()
        return self


_OUT_MODES = ("clone", "host", "none")


class GraphedImageStep:
    """Runs :func:`image_step` per bucket, through a CUDA graph on CUDA (see the module docstring).

    ``run(..., out=...)`` chooses how the outputs are handed over, since a replay rewrites the
    graph's output tensors in place:

    - ``"clone"`` (default): device copies made on the stream right after the replay, so the next
      replay cannot overwrite what the caller holds;
    - ``"host"``: copies into fresh pinned host tensors, asynchronously; ``StepOutputs.ready`` is
      the event to wait on before reading them;
    - ``"none"``: views of the graph's own outputs, valid until the next ``run`` of this runner
      (for a caller that consumes them first, as ImagePredictor does).

    Eagerly (CPU, ``cuda_graphs=False``) every call's outputs are new tensors: nothing is copied.

    All graphs share one memory pool. That is safe for any replay order because each replay's
    outputs are copied out or consumed (stream-ordered) before another graph of the pool runs; the
    input buffers live outside the pool.
    """

    def __init__(self, model, cuda_graphs: Optional[bool] = None,
                 prompt_buckets: Optional[Sequence[int]] = None, warmup_iters: int = 3):
        cuda_graphs = resolve_cuda_graphs(cuda_graphs, model.device, "a model")
        buckets = None
        if prompt_buckets is not None:
            buckets = tuple(sorted(set(int(b) for b in prompt_buckets)))
            if not buckets or buckets[0] < 1:
                raise ValueError(f"prompt_buckets must be positive integers, got {tuple(prompt_buckets)}")
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.prompt_buckets = buckets
        self.warmup_iters = check_warmup_iters(warmup_iters)
        self.entries: Dict[BucketKey, _Entry] = {}

    # ------------------------------------------------------------------ buckets
    def prompt_bucket(self, P: int) -> int:
        """Pb for P prompts: P itself without buckets; else the next bucket, or past the largest,
        the next multiple of it."""
        if self.prompt_buckets is None:
            return P
        i = bisect.bisect_left(self.prompt_buckets, P)
        if i < len(self.prompt_buckets):
            return self.prompt_buckets[i]
        step = self.prompt_buckets[-1]
        return -(-P // step) * step

    def clear(self) -> None:
        """Drop every bucket (graphs, buffers, the memory pool)."""
        self.entries.clear()

    def _new_entry(self, key: BucketKey, text_feats: Tensor, box_dtype: Optional[torch.dtype]) -> _Entry:
        dev = self.model.device
        B, Pb, nb, R = key.batch, key.prompts, key.boxes, key.resolution
        T, D = text_feats.shape[1:]
        inp = {
            "images": torch.zeros((B, 3, R, R), dtype=key.dtype, device=dev),
            "text_feats": torch.zeros((Pb, T, D), dtype=text_feats.dtype, device=dev),
            "text_mask": torch.zeros((Pb, T), dtype=torch.bool, device=dev),
            "prompt_valid": torch.zeros((Pb,), dtype=torch.bool, device=dev),
            "threshold": torch.zeros((), dtype=torch.float32, device=dev),
            "scale": torch.ones((B, 4), dtype=torch.float32, device=dev),
        }
        if nb >= 0:
            inp["boxes"] = torch.zeros((B, nb, 4), dtype=box_dtype, device=dev)
            inp["box_labels"] = torch.zeros((B, nb), dtype=torch.bool, device=dev)
            inp["box_mask"] = torch.ones((B, nb), dtype=torch.bool, device=dev)
        return _Entry(key, inp)

    def _step(self, e: _Entry) -> Dict[str, Tensor]:
        i = e.inputs
        return image_step(self.model, i["images"], i["text_feats"], i["text_mask"], i["prompt_valid"],
                          i["threshold"], i["scale"], i.get("boxes"), i.get("box_labels"), i.get("box_mask"),
                          mask_size=e.key.mask_size)

    def _capture(self, e: _Entry) -> None:
        pool = pool_for_capture(x.graph for x in self.entries.values())
        try:
            g, e.outputs, _ = warm_up_and_capture(lambda: self._step(e), self.warmup_iters, pool,
                                                  "graph_capture")
        except RuntimeError as err:
            del self.entries[e.key]
            raise RuntimeError(
                f"capturing the image step as a CUDA graph failed for bucket {e.key} (a host sync or a "
                "CPU-to-GPU copy inside the model?); run with cuda_graphs=False to go eagerly"
            ) from err
        e.graph = g

    # ------------------------------------------------------------------ run
    def _check(self, images, text_feats, text_mask, threshold, sizes, boxes, box_labels, box_mask, mask_size, out):
        m = self.model
        dev, R = m.device, m.cfg.resolution
        if out not in _OUT_MODES:
            raise ValueError(f"out must be one of {_OUT_MODES}, got {out!r}")
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, R, R):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 3, {R}, {R}) tensor (preprocessed), got {got}")
        if images.shape[0] < 1:
            raise ValueError("images must hold at least one image")
        if images.dtype != m.dtype or images.device != dev:
            raise ValueError(f"images must be {m.dtype} on {dev} (the model's), got {images.dtype} on {images.device}")
        if not isinstance(text_feats, Tensor) or text_feats.dim() != 3 or text_feats.shape[0] < 1:
            got = tuple(text_feats.shape) if isinstance(text_feats, Tensor) else type(text_feats).__name__
            raise ValueError(f"text_feats must be a (P, T, D) tensor with P >= 1, got {got}")
        P, T = text_feats.shape[:2]
        if text_feats.device != dev or text_feats.dtype != m.dtype:
            raise ValueError(f"text_feats must be {m.dtype} on {dev} (the model's), got {text_feats.dtype} on "
                             f"{text_feats.device}")
        if not isinstance(text_mask, Tensor) or tuple(text_mask.shape) != (P, T) or text_mask.dtype != torch.bool \
                or text_mask.device != dev:
            raise ValueError(f"text_mask must be a ({P}, {T}) bool tensor on {dev}, got "
                             f"{getattr(text_mask, 'dtype', None)} {tuple(getattr(text_mask, 'shape', ()))}")
        B = images.shape[0]
        if len(sizes) != B:
            raise ValueError(f"sizes must give (height, width) for each of the {B} images, got {len(sizes)}")
        for s in sizes:
            if len(s) != 2 or int(s[0]) < 1 or int(s[1]) < 1:
                raise ValueError(f"each size must be a positive (height, width), got {tuple(s)}")
        if isinstance(threshold, Tensor):
            if threshold.numel() != 1:
                raise ValueError(f"threshold must be one number, got shape {tuple(threshold.shape)}")
        else:
            t = float(threshold)
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"threshold must be in [0, 1], got {t}")
        given = [x is not None for x in (boxes, box_labels, box_mask)]
        if any(given) and not all(given):
            raise ValueError("boxes, box_labels and box_mask go together: give all three or none")
        if boxes is not None:
            if boxes.dim() != 3 or boxes.shape[0] != B or boxes.shape[2] != 4 or not boxes.is_floating_point():
                raise ValueError(f"boxes must be a float (B={B}, Nb, 4) tensor, got {boxes.dtype} {tuple(boxes.shape)}")
            nb = boxes.shape[1]
            for name, t in (("box_labels", box_labels), ("box_mask", box_mask)):
                if tuple(t.shape) != (B, nb) or t.dtype != torch.bool:
                    raise ValueError(f"{name} must be a ({B}, {nb}) bool tensor, got {t.dtype} {tuple(t.shape)}")
            if any(t.device != dev for t in (boxes, box_labels, box_mask)):
                raise ValueError(f"boxes, box_labels and box_mask must be on {dev}")
        if mask_size is not None:
            if len(mask_size) != 2 or int(mask_size[0]) < 1 or int(mask_size[1]) < 1:
                raise ValueError(f"mask_size must be None or a positive (H, W), got {mask_size!r}")
            bad = [tuple(s) for s in sizes if (int(s[0]), int(s[1])) != (int(mask_size[0]), int(mask_size[1]))]
            if bad:
                raise ValueError(f"mask_size={tuple(mask_size)} needs every image to be that size; got {bad[:3]}")

    @torch.inference_mode()
    def run(
        self,
        images: Tensor,
        text_feats: Tensor,
        text_mask: Tensor,
        threshold,
        sizes: Sequence[Tuple[int, int]],
        boxes: Optional[Tensor] = None,
        box_labels: Optional[Tensor] = None,
        box_mask: Optional[Tensor] = None,
        *,
        mask_size: Optional[Tuple[int, int]] = None,
        out: str = "clone",
    ) -> StepOutputs:
        """One step. images (B, 3, R, R) preprocessed on the model's device in its dtype; text_feats
        (P, T, D) / text_mask (P, T) for the P real prompts (padded here); threshold a float or a
        one-element tensor; sizes the (height, width) of each original image; boxes / box_labels /
        box_mask as :func:`image_step` takes them, or None; mask_size the mask policy."""
        self._check(images, text_feats, text_mask, threshold, sizes, boxes, box_labels, box_mask, mask_size, out)
        dev = self.model.device
        B, P = images.shape[0], text_feats.shape[0]
        Pb = self.prompt_bucket(P)
        nb = -1 if boxes is None else boxes.shape[1]
        ms = None if mask_size is None else (int(mask_size[0]), int(mask_size[1]))
        key = BucketKey(B, Pb, nb, ms, self.model.dtype, self.model.cfg.resolution)
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = self._new_entry(key, text_feats, None if boxes is None else boxes.dtype)
        inp = e.inputs
        # Fill the buffers: device-to-device copies and fills, nothing read back on the host.
        inp["images"].copy_(images)
        inp["text_feats"][:P].copy_(text_feats)
        inp["text_mask"][:P].copy_(text_mask)
        if Pb > P:  # padding rows: copies of prompt 0, dropped by prompt_valid
            inp["text_feats"][P:].copy_(text_feats[:1].expand(Pb - P, -1, -1))
            inp["text_mask"][P:].copy_(text_mask[:1].expand(Pb - P, -1))
        inp["prompt_valid"].fill_(False)
        inp["prompt_valid"][:P].fill_(True)
        if isinstance(threshold, Tensor):
            inp["threshold"].copy_(threshold.reshape(()))
        else:
            inp["threshold"].fill_(float(threshold))
        scale = torch.tensor([[float(w), float(h), float(w), float(h)] for h, w in sizes], dtype=torch.float32)
        if dev.type == "cuda":
            scale = scale.pin_memory()  # an asynchronous copy from pinned memory: no sync
        inp["scale"].copy_(scale, non_blocking=True)
        if boxes is not None:
            inp["boxes"].copy_(boxes)
            inp["box_labels"].copy_(box_labels)
            inp["box_mask"].copy_(box_mask)

        if not self.cuda_graphs:
            with stage("image_step"):
                res = self._step(e)
            res = {k: v[:, :P] for k, v in res.items()}
            ready = None
            if dev.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
            if out == "host":
                res, ready = _to_host(res) if dev.type == "cuda" else (res, None)
            return StepOutputs(res, key, ready)

        if e.graph is None:
            self._capture(e)
        with stage("graph_replay"):
            e.graph.replay()
        e.replays += 1
        views = {k: v[:, :P] for k, v in e.outputs.items()}
        if out == "none":
            ready = torch.cuda.Event()
            ready.record()
            return StepOutputs(views, key, ready)
        if out == "host":
            res, ready = _to_host(views)
            return StepOutputs(res, key, ready)
        res = {k: v.clone() for k, v in views.items()}
        ready = torch.cuda.Event()
        ready.record()
        return StepOutputs(res, key, ready)


def _to_host(tensors: Dict[str, Tensor]):
    """Asynchronous device-to-host copies into fresh pinned tensors, and the event that marks them
    done (the caching host allocator keeps each pinned block until its copy has run)."""
    res = {}
    for k, v in tensors.items():
        h = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        h.copy_(v, non_blocking=True)
        res[k] = h
    ev = torch.cuda.Event()
    ev.record()
    return res, ev
