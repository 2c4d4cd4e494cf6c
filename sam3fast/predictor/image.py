"""Image predictors: the drop-in ``Sam3Processor`` and the native batched ``ImagePredictor``.

``Sam3Processor`` has the official calls and state keys (``original_height``/``original_width``,
``masks`` (N, 1, H, W) bool, ``masks_logits`` (N, 1, H, W) probabilities, ``boxes`` (N, 4) xyxy pixels,
``scores`` (N,)); the state is a plain dict users may add keys to.

``ImagePredictor`` is the native API: a batch of images through the backbone once, every distinct
text prompt through the text encoder once, and all (image, prompt) pairs through the heads in one
batched pass.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..profiling import stage
from .preprocess import image_to_uint8_chw, normalize, preprocess, resize_uint8


def _check_threshold(t) -> float:
    t = float(t)
    if not (0.0 <= t <= 1.0) or math.isnan(t):
        raise ValueError(f"confidence_threshold must be in [0, 1], got {t}")
    return t


def _check_box(box) -> List[float]:
    try:
        if isinstance(box, (str, bytes)):
            raise TypeError
        vals = [float(v) for v in (box.tolist() if hasattr(box, "tolist") else box)]
    except (TypeError, ValueError):
        raise ValueError(f"box must be 4 numbers [cx, cy, w, h] normalised to [0, 1], got {box!r}") from None
    if len(vals) != 4:
        raise ValueError(f"box must be 4 numbers [cx, cy, w, h] normalised to [0, 1], got {len(vals)} values")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"box has non-finite values: {vals}")
    cx, cy, w, h = vals
    if w <= 0 or h <= 0:
        raise ValueError(f"box width and height must be positive, got w={w}, h={h}")
    eps = 1e-4
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if x0 < -eps or y0 < -eps or x1 > 1 + eps or y1 > 1 + eps:
        raise ValueError(
            f"box [cx={cx:.4g}, cy={cy:.4g}, w={w:.4g}, h={h:.4g}] extends outside the image "
            f"(corners ({x0:.4g}, {y0:.4g})-({x1:.4g}, {y1:.4g}) must lie in [0, 1]; boxes are "
            "normalised cxcywh, clip them to the image first)"
        )
    return vals


def postprocess(out: Dict[str, torch.Tensor], i: int, height: int, width: int, threshold: float):
    """The official processor's post-processing for pair ``i``: score = sigmoid(logit) *
    sigmoid(presence); keep score > threshold; boxes xyxy in pixels; masks bilinear to the image
    size then sigmoid ("masks_logits", as the official names it) and > 0.5."""
    probs = out["pred_logits"][i].float().sigmoid() * out["presence_logit"][i].float().sigmoid()
    keep = probs > threshold
    scores = probs[keep]
    boxes = out["pred_boxes_xyxy"][i][keep].float()
    scale = torch.tensor([width, height, width, height], device=boxes.device, dtype=boxes.dtype)
    boxes = boxes * scale
    result = {"scores": scores, "boxes": boxes}
    if "pred_masks" in out:
        m = out["pred_masks"][i][keep].float().unsqueeze(1)
        if m.shape[0] > 0:
            m = F.interpolate(m, (height, width), mode="bilinear", align_corners=False)
        else:
            m = m.new_zeros((0, 1, height, width))
        m = m.sigmoid()
        result["masks_logits"] = m
        result["masks"] = m > 0.5
    return result


class _TextCache:
    """Text features per prompt string (the text encoder is 350 M parameters: encode once)."""

    def __init__(self, model, capacity: int = 64):
        self.model = model
        self.capacity = capacity
        self._d: "OrderedDict[str, tuple]" = OrderedDict()

    def get(self, prompts: Sequence[str]):
        missing = [p for p in dict.fromkeys(prompts) if p not in self._d]
        if missing:
            with stage("text_encoder"):
                feats, mask = self.model.encode_text(missing)
            for j, p in enumerate(missing):
                self._d[p] = (feats[j], mask[j])
                if len(self._d) > self.capacity:
                    self._d.popitem(last=False)
        for p in prompts:
            self._d.move_to_end(p)
        feats = torch.stack([self._d[p][0] for p in prompts])
        mask = torch.stack([self._d[p][1] for p in prompts])
        return feats, mask


class Sam3Processor:
    """Drop-in for ``sam3.model.sam3_image_processor.Sam3Processor``.

    sam3fast: ``cuda_graphs`` (keyword only; None = on a CUDA model): the backbone of ``set_image``
    and the heads of each prompt call replay from CUDA graphs
    (:class:`~sam3fast.predictor.graphed_call.GraphedCall`), one per input shape, captured the
    second time a shape is seen (the first call runs eagerly, so a one-off shape costs no capture).
    Eagerly both are host-bound on an H100. The outputs are the eager ones (the same kernels,
    replayed).
    """

    def __init__(self, model, resolution: int = 1008, device=None, confidence_threshold: float = 0.5, *,
                 cuda_graphs: Optional[bool] = None):
        from .graphed_call import GraphedCall

        if resolution != model.cfg.resolution:
            raise ValueError(
                f"resolution {resolution} does not match the model's input size {model.cfg.resolution}"
            )
        self.model = model
        self.resolution = resolution
        self.device = torch.device(device) if device is not None else model.device
        self.confidence_threshold = _check_threshold(confidence_threshold)
        self._text = _TextCache(model)
        # off CUDA the calls go straight to the model (buffers=False): the CPU path is unchanged
        kw = dict(cuda_graphs=cuda_graphs, capture_after=1, buffers=False)
        self._backbone = GraphedCall(model.encode_image, model.device, name="processor backbone", **kw)
        self._heads = GraphedCall(model.forward_heads, model.device, name="processor heads", **kw)

    @property
    def cuda_graphs(self) -> bool:
        return self._backbone.cuda_graphs

    # -------------------------------------------------------------------- images
    @torch.inference_mode()
    def set_image(self, image, state: Optional[dict] = None) -> dict:
        if state is None:
            state = {}
        with stage("preprocess"):
            x, h, w = preprocess(image, self.resolution, self.device, self.model.dtype)
        state["original_height"] = h
        state["original_width"] = w
        with stage("backbone"):
            state["backbone_out"] = dict(self._backbone(x[None]))
        return state

    @torch.inference_mode()
    def set_image_batch(self, images: List, state: Optional[dict] = None) -> dict:
        """As the official: one state for a batch; the concept heads use the first image (the
        official ``_forward_grounding`` always runs on image 0). Use :class:`ImagePredictor` to run
        prompts on every image of a batch."""
        if state is None:
            state = {}
        if not isinstance(images, (list, tuple)):
            raise ValueError("Images must be a list of PIL images or tensors")
        if len(images) == 0:
            raise ValueError("Images list must not be empty")
        xs, hs, ws = [], [], []
        for im in images:
            x, h, w = preprocess(im, self.resolution, self.device, self.model.dtype)
            xs.append(x)
            hs.append(h)
            ws.append(w)
        state["original_heights"] = hs
        state["original_widths"] = ws
        state["backbone_out"] = dict(self._backbone(torch.stack(xs)))
        return state

    # -------------------------------------------------------------------- prompts
    @torch.inference_mode()
    def set_text_prompt(self, prompt: str, state: Dict) -> dict:
        if "backbone_out" not in state:
            raise ValueError("You must call set_image before set_text_prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        feats, mask = self._text.get([prompt])
        state["backbone_out"]["language_features"] = feats
        state["backbone_out"]["language_mask"] = mask
        state.setdefault("geometric_prompt", {"boxes": [], "labels": []})
        return self._forward_grounding(state)

    @torch.inference_mode()
    def add_geometric_prompt(self, box: List, label: bool, state: Dict) -> dict:
        """Add a box [cx, cy, w, h] normalised to [0, 1]; label True = positive, False = negative.
        Without a text prompt the official uses the text "visual"; so does this."""
        if "backbone_out" not in state:
            raise ValueError("You must call set_image before add_geometric_prompt")
        vals = _check_box(box)
        if "language_features" not in state["backbone_out"]:
            feats, mask = self._text.get(["visual"])
            state["backbone_out"]["language_features"] = feats
            state["backbone_out"]["language_mask"] = mask
        gp = state.setdefault("geometric_prompt", {"boxes": [], "labels": []})
        gp["boxes"].append(vals)
        gp["labels"].append(bool(label))
        return self._forward_grounding(state)

    def reset_all_prompts(self, state: Dict) -> None:
        if "backbone_out" in state:
            for k in ("language_features", "language_mask", "language_embeds"):
                state["backbone_out"].pop(k, None)
        for k in ("geometric_prompt", "boxes", "masks", "masks_logits", "scores"):
            state.pop(k, None)

    @torch.inference_mode()
    def set_confidence_threshold(self, threshold: float, state: Optional[dict] = None):
        self.confidence_threshold = _check_threshold(threshold)
        if state is not None and "boxes" in state:
            return self._forward_grounding(state)
        return state

    # -------------------------------------------------------------------- heads
    def _forward_grounding(self, state: Dict) -> dict:
        if "original_height" not in state:
            raise ValueError(
                "this state comes from set_image_batch, which (as in the official processor) cannot "
                "run concept prompts; use set_image, or sam3fast.ImagePredictor for batches"
            )
        bo = state["backbone_out"]
        gp = state.get("geometric_prompt", {"boxes": [], "labels": []})
        dev = self.device
        boxes = labels = bmask = None
        if gp["boxes"]:
            boxes = torch.tensor([gp["boxes"]], dtype=torch.float32, device=dev)
            labels = torch.tensor([gp["labels"]], dtype=torch.bool, device=dev)
            bmask = torch.zeros(labels.shape, dtype=torch.bool, device=dev)
        with stage("heads"):
            out = self._heads(
                bo, torch.zeros(1, dtype=torch.long, device=dev), bo["language_features"], bo["language_mask"],
                boxes=boxes, box_labels=labels, box_mask=bmask,
            )
        with stage("postprocess"):
            res = postprocess(out, 0, state["original_height"], state["original_width"], self.confidence_threshold)
        state.update(res)
        return state


class _Prepared:
    """One batch ready for the step: images (B, 3, R, R) on the device, original sizes, boxes."""

    __slots__ = ("x", "sizes", "boxes", "ready")

    def __init__(self, x, sizes, boxes, ready):
        self.x, self.sizes, self.boxes, self.ready = x, sizes, boxes, ready


def _check_boxes(images, boxes, box_labels):
    """Validate the exemplar boxes of every image up front (before any batch runs) and return them
    as (B, Nb, 4) float32 / (B, Nb) bool labels / (B, Nb) bool padding CPU tensors, or None."""
    if boxes is None:
        if box_labels is not None:
            raise ValueError("box_labels given without boxes")
        return None
    if len(boxes) != len(images):
        raise ValueError(f"boxes must have one list per image ({len(images)}), got {len(boxes)}")
    if box_labels is not None and len(box_labels) != len(images):
        raise ValueError(f"box_labels must have one list per image ({len(images)}), got {len(box_labels)}")
    nb = max(len(b) for b in boxes)
    if nb == 0:
        return None
    B = len(images)
    bx = torch.zeros(B, nb, 4)
    bl = torch.zeros(B, nb, dtype=torch.bool)
    bm = torch.ones(B, nb, dtype=torch.bool)
    for i, bs in enumerate(boxes):
        labs = box_labels[i] if box_labels is not None else [True] * len(bs)
        if len(labs) != len(bs):
            raise ValueError(f"image {i}: {len(bs)} boxes but {len(labs)} labels")
        for j, b in enumerate(bs):
            bx[i, j] = torch.tensor(_check_box(b))
            bl[i, j] = bool(labs[j])
            bm[i, j] = False
    return bx, bl, bm


class ImagePredictor:
    """Native batched API.

    ``predict(images, prompts)`` runs every prompt on every image: the backbone once per image (as
    one batch), the text encoder once per distinct prompt, the heads once on all pairs. Returns a
    list (per image) of lists (per prompt) of dicts with ``scores`` (N,), ``boxes`` (N, 4) xyxy
    pixels, ``masks`` (N, H, W) bool. ``boxes``: optional per-image list of exemplar boxes
    ([cx, cy, w, h] normalised) with ``box_labels``.

    The image step (backbone, heads, fixed-shape post-processing) goes through
    :class:`~sam3fast.predictor.graphs.GraphedImageStep`: on CUDA it is a CUDA graph per (batch
    size, prompt bucket, boxes, mask policy), captured on first use (``cuda_graphs``, default True on
    CUDA); elsewhere it runs eagerly. The rest (which of the Q slots pass the threshold, the resize
    of their masks to each image's size) follows the step, after one small device-to-host copy.

    ``mask_policy``: ``"lowres"`` (default) resizes the kept masks only, after the step;
    ``"original"`` resizes all Q masks inside the step (every image of a batch must share one size).
    ``prompt_buckets``: pad the prompt count to fewer graph shapes (see ``graphs.PADDED_PROMPT_BUCKETS``;
    equal to the unpadded results up to rounding); default None: one graph per prompt count.

    ``batch_size`` (``predict``) or :meth:`predict_batches` split many images into batches and run
    them as a one-ahead pipeline: batch i+1 is decoded, copied to the device (pinned memory, a
    side stream) and resized while batch i runs.
    """

    def __init__(self, model, confidence_threshold: float = 0.5, *, cuda_graphs: Optional[bool] = None,
                 mask_policy: str = "lowres", prompt_buckets: Optional[Sequence[int]] = None):
        from .graphs import GraphedImageStep

        if mask_policy not in ("lowres", "original"):
            raise ValueError(f"mask_policy must be 'lowres' or 'original', got {mask_policy!r}")
        self.model = model
        self.confidence_threshold = _check_threshold(confidence_threshold)
        self.mask_policy = mask_policy
        self._text = _TextCache(model)
        self.runner = GraphedImageStep(model, cuda_graphs=cuda_graphs, prompt_buckets=prompt_buckets)
        self._prep_stream = None

    @property
    def cuda_graphs(self) -> bool:
        return self.runner.cuda_graphs

    @torch.inference_mode()
    def predict(self, images: Sequence, prompts: Union[str, Sequence[str]],
                boxes: Optional[Sequence[Sequence]] = None, box_labels: Optional[Sequence[Sequence[bool]]] = None,
                *, batch_size: Optional[int] = None):
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or not images:
            raise ValueError("images must be a non-empty list")
        prompts = self._check_prompts(prompts)
        n = len(images)
        if batch_size is None:
            batch_size = n
        elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        jobs = [(images[:batch_size], _check_boxes(images, boxes, box_labels))]  # all boxes checked now
        if batch_size < n:
            # each batch as if predicted alone: its boxes padded to its own largest count
            def chunk(x, s):
                return None if x is None else x[s:s + batch_size]

            jobs = [(images[s:s + batch_size], _check_boxes(images[s:s + batch_size], chunk(boxes, s),
                                                            chunk(box_labels, s)))
                    for s in range(0, n, batch_size)]
        results = []
        for r in self._pipeline(jobs, prompts):
            results.extend(r)
        return results

    def predict_batches(self, batches: Iterable[Sequence], prompts: Union[str, Sequence[str]]) -> Iterator[list]:
        """Yield ``predict(batch, prompts)`` for each batch of images, preparing the next batch while
        the current one runs (batches are read one ahead)."""
        prompts = self._check_prompts(prompts)

        def jobs():
            for batch in batches:
                if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence) or not batch:
                    raise ValueError("each batch must be a non-empty list of images")
                yield batch, None

        return self._iter_pipeline(jobs(), prompts)

    @torch.inference_mode()  # on a generator function, torch re-enters the mode at every step
    def _iter_pipeline(self, jobs, prompts):
        yield from self._pipeline(jobs, prompts)

    @staticmethod
    def _check_prompts(prompts) -> List[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        return prompts

    # ------------------------------------------------------------------ pipeline
    def _pipeline(self, jobs, prompts: List[str]):
        """prepare(0); then for each i: step(i) launched, prepare(i+1) while it runs, finish(i)."""
        feats, mask = self._text.get(prompts)
        it = iter(jobs)
        job = next(it, None)
        nxt = self._prepare(*job) if job is not None else None
        while nxt is not None:
            cur = nxt
            launched = self._launch(cur, feats, mask)
            job = next(it, None)
            nxt = self._prepare(*job) if job is not None else None
            yield self._finish(launched, cur.sizes)

    def _prepare(self, images: Sequence, boxes) -> _Prepared:
        m = self.model
        dev, res = m.device, m.cfg.resolution
        if dev.type != "cuda":
            with stage("preprocess"):
                xs, sizes = [], []
                for im in images:
                    x, h, w = preprocess(im, res, dev, m.dtype)
                    xs.append(x)
                    sizes.append((h, w))
                return _Prepared(torch.stack(xs), sizes, boxes, None)
        # CUDA: decode on the host into pinned memory, then copy, resize and normalise on a side
        # stream, so all of it overlaps the step already running on the current stream.
        if self._prep_stream is None:
            self._prep_stream = torch.cuda.Stream(dev)
        s = self._prep_stream
        with stage("preprocess"), torch.cuda.stream(s):
            xs, sizes = [], []
            for im in images:
                t = image_to_uint8_chw(im)
                sizes.append((int(t.shape[1]), int(t.shape[2])))
                # empty_like keeps the strides (a PIL image stays a channels-last view, as
                # preprocess() moves it): the resize below sees the same layout
                if t.device.type == "cpu":
                    pinned = torch.empty_like(t, pin_memory=True).copy_(t)
                    td = pinned.to(dev, non_blocking=True)
                else:  # already on a GPU, written by work on the current stream: wait for it
                    s.wait_stream(torch.cuda.current_stream())
                    td = t.to(dev)
                xs.append(normalize(resize_uint8(td, (res, res)), m.dtype))
            x = torch.stack(xs)
            if boxes is not None:
                boxes = tuple(b.pin_memory().to(dev, non_blocking=True) for b in boxes)
            ready = torch.cuda.Event()
            ready.record(s)
        return _Prepared(x, sizes, boxes, ready)

    def _launch(self, prep: _Prepared, feats, mask):
        if prep.ready is not None:
            cur = torch.cuda.current_stream()
            cur.wait_event(prep.ready)
            # made on the side stream, read on this one: keep the allocator from reusing them early
            for t in (prep.x,) + (prep.boxes or ()):
                t.record_stream(cur)
        bx, bl, bm = prep.boxes if prep.boxes is not None else (None, None, None)
        ms = None
        if self.mask_policy == "original":
            if len(set(prep.sizes)) != 1:
                raise ValueError(
                    f"mask_policy='original' needs every image of a batch to be one size, got {prep.sizes}")
            ms = prep.sizes[0]
        # out="none": _finish gathers what it returns into new tensors before the next run
        return self.runner.run(prep.x, feats, mask, self.confidence_threshold, prep.sizes, bx, bl, bm,
                               mask_size=ms, out="none")

    def _finish(self, out, sizes) -> list:
        with stage("postprocess"):
            keep = out["keep"]  # (B, P, Q)
            B, P, Q = keep.shape
            dev = keep.device
            if dev.type == "cuda":
                # the only host read: a (B, P, Q) bool copied asynchronously, then its event
                keep_h = torch.empty(keep.shape, dtype=torch.bool, pin_memory=True)
                keep_h.copy_(keep, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                ev.synchronize()
            else:
                keep_h = keep
            nz = keep_h.nonzero()  # (N, 3) in the order boolean indexing takes them
            counts = keep_h.sum(-1).tolist()  # [B][P]
            idx = nz.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else nz
            b, p, q = idx.unbind(1)
            scores = out["scores"][b, p, q]
            boxes = out["boxes"][b, p, q]
            per_image = [sum(c) for c in counts]
            scores_i = torch.split(scores, per_image)
            boxes_i = torch.split(boxes, per_image)
            masks_i = None
            if "mask_logits" in out:
                logits_i = torch.split(out["mask_logits"][b, p, q], per_image)
                masks_i = [self._resize_masks(lg, h, w, counts[i])
                           for i, (lg, (h, w)) in enumerate(zip(logits_i, sizes))]
            elif "masks" in out:
                masks_i = torch.split(out["masks"][b, p, q], per_image)
            results = []
            for i in range(B):
                per = []
                sc, bx = torch.split(scores_i[i], counts[i]), torch.split(boxes_i[i], counts[i])
                mk = torch.split(masks_i[i], counts[i]) if masks_i is not None else None
                for j in range(P):
                    r = {"scores": sc[j], "boxes": bx[j]}
                    if mk is not None:
                        r["masks"] = mk[j]
                    per.append(r)
                results.append(per)
        return results

    @staticmethod
    def _resize_masks(lg, h: int, w: int, counts: List[int]):
        """Kept low-res logits of one image (N, m, m) -> (N, h, w) bool, as postprocess() does:
        bilinear, sigmoid, > 0.5. On CPU pair by pair, the shapes postprocess() uses (a SIMD body
        and a scalar tail round sigmoid differently, so the split must match); on CUDA every
        element is computed alike, so the whole image goes at once."""
        if lg.device.type == "cpu":
            parts = torch.split(lg, counts)
        else:
            parts = (lg,)
        out = []
        for part in parts:
            if part.shape[0] > 0:
                mk = F.interpolate(part.float().unsqueeze(1), (h, w), mode="bilinear", align_corners=False)
                out.append((mk.sigmoid() > 0.5)[:, 0])
            else:
                out.append(torch.zeros((0, h, w), dtype=torch.bool, device=lg.device))
        return out[0] if len(out) == 1 else torch.cat(out)
