"""Test-only helper: the official ``sam3==0.1.4`` video model and request API on a CPU machine.

Builds exactly the object graph of ``sam3.model_builder.build_sam3_video_model`` (a
``Sam3VideoInferenceWithInstanceInteractivity`` whose ``detector`` is a ``Sam3ImageOnVideoMultiGPU``
with the dual (SAM 3 + SAM 2) neck and ``supervise_joint_box_scores=True``, and whose ``tracker``
is the official ``Sam3TrackerPredictor`` with ``use_memory_selection=True``), at the sizes of any
:class:`sam3fast.config.Sam3Config`, and serves it through the official predictor
(``Sam3VideoPredictorMultiGPU``, what ``build_sam3_video_predictor`` returns) so another engine can
be compared request by request.

Every official video call must run inside :func:`official_video_mode` (build and requests; the
stream of ``handle_stream_request`` too). Its patches, and why:

1. ``cpu_mode`` of :mod:`official_ref`: cuda devices -> cpu, ``.cuda()``/``.pin_memory()`` no-ops,
   torch.compile disabled (the video code calls ``.cuda()`` on frames, masks and memories,
   ``pin_memory()`` on every output frame, and allocates on ``device="cuda"`` in the decoder).
2. bf16 casts round but stay float32: the tracker casts the FPN features (``sam3_image.py`` 839)
   and the memory bank (``sam3_tracking_predictor.py`` 1098, 1149) to bf16 and relies on a global
   bf16 autocast (a no-op on CPU torch) to mix them with float32; on CPU the next conv fails with
   mixed dtypes. ``x.to(torch.bfloat16)`` of a float32 tensor is answered with
   ``x.to(bf16).to(float32)``: the official values, float32 storage.
3. ``torch.cuda.current_device/device_count/set_device/get_device_properties`` answer as one
   device 0: the predictor queries them on build and on every ``start_session`` (its log line).
   ``torch.cuda.is_available()`` stays False so no CUDA-only branch is taken. World size is 1:
   no NCCL/gloo group, no worker process.
4. ``mask_iou`` (``sam3_video_base``, ``perflib.associate_det_trk``): the official version
   materialises (N, M, H*W) int64 tensors (100x100 masks at 288x288: 7 GiB); replaced by the
   same counts from a float32 matmul of 0/1 masks (exact: counts < 2**24) and the same division.
5. ``perflib.connected_components.connected_components_cpu`` (the scikit-image fallback used for
   hole/sprinkle filling) fails on an empty batch ("stack expects a non-empty TensorList"), which
   happens on every frame without a new detection; an empty batch returns empty labels/counts.
6. ``os.environ`` RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, which the predictor's constructor
   sets globally, are restored afterwards (the model reads them only at construction).

Weights: :func:`video_weights_` with :data:`VIDEO_RECIPE` (``redraw_`` plus four knobs) and the
prompt :data:`VIDEO_TEXT`, chosen by a search on ``video_clip.make_clip(24, 72, 96)`` at the tiny
config, give (measured): on the jpg folder 4 object ids, objects on 11 of 24 frames (2 at once on
6), one id over 7 frames, first-detection scores 0.85-0.89, objects appearing and disappearing; on the mp4 (which the
official cv2 loader feeds as 0-255 values) 8 ids, up to 7 objects per frame. Outputs move by
~1e-6 when the weights move by 1e-6 (no chaos). Random weights do not make a tracker: a propagated
mask overlaps its conditioning mask by IoU ~0.2, so ids churn more than with trained weights.

Nothing here is imported by the ``sam3fast`` package itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.nn as nn

from official_ref import _CpuMode, build_official_image_model, build_official_tracker, official, redraw_

# Heuristics of build_sam3_video_model (model_builder.py 697-746), by apply_temporal_disambiguation.
_HEURISTICS_COMMON = dict(
    score_threshold_detection=0.5,
    assoc_iou_thresh=0.1,
    det_nms_thresh=0.1,
    new_det_thresh=0.7,
    suppress_unmatched_only_within_hotstart=True,
    min_trk_keep_alive=-1,
    max_trk_keep_alive=30,
    init_trk_keep_alive=30,
    suppress_overlapping_based_on_recent_occlusion_threshold=0.7,
    suppress_det_close_to_boundary=False,
    fill_hole_area=16,
    masklet_confirmation_enable=False,
    decrease_trk_keep_alive_for_empty_masklets=False,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
)
HEURISTICS = {
    True: dict(_HEURISTICS_COMMON, hotstart_delay=15, hotstart_unmatch_thresh=8, hotstart_dup_thresh=8,
               recondition_every_nth_frame=16),
    False: dict(_HEURISTICS_COMMON, hotstart_delay=0, hotstart_unmatch_thresh=0, hotstart_dup_thresh=0,
                recondition_every_nth_frame=0),
}

# The video weight recipe (see video_weights_), chosen by a search on video_clip at the tiny config
# so that a text prompt tracks several objects on both the mp4 and the jpg-folder inputs.
VIDEO_RECIPE = dict(seed=20, score_gain=6.0, presence_shift=3.0, pos_embed_scale=0.1, decoder_branch_scale=1.0,
                    mask_sign=-1.0, tracker_obj_shift=0.0)
VIDEO_TEXT = "blob"  # the text prompt the recipe was chosen with


# ----------------------------------------------------------------------------------------------
# Patches


class _VideoCpuMode(_CpuMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "to" and args and isinstance(args[0], torch.Tensor):
            kw = kwargs or {}
            if (kw.get("dtype") is torch.bfloat16 or torch.bfloat16 in args[1:]) and args[0].dtype == torch.float32:
                # keep the official bf16 rounding, but in float32 so CPU ops do not mix dtypes
                rest = tuple(a for a in args[1:] if a is not torch.bfloat16)
                kw = {k: v for k, v in kw.items() if k != "dtype"}
                x = args[0].to(torch.bfloat16).to(torch.float32)
                return super().__torch_function__(func, types, (x,) + rest, kw) if (rest or kw) else x
        return super().__torch_function__(func, types, args, kwargs)


def mask_iou_exact(pred_masks: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """``sam3.perflib.masks_ops.mask_iou`` without the (N, M, H*W) intermediates: same counts
    (float32 sums of 0/1 products are exact below 2**24 pixels), same division."""
    assert pred_masks.dtype == gt_masks.dtype == torch.bool
    n, m = pred_masks.shape[0], gt_masks.shape[0]
    a = pred_masks.reshape(n, -1).float()
    b = gt_masks.reshape(m, -1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / union.clamp(min=1)


def _connected_components_cpu_safe(input_tensor: torch.Tensor):
    import sam3.perflib.connected_components as cc

    if input_tensor.shape[0] == 0:
        # skimage labels are int32 on this platform; counts are zeros_like(labels)
        z = torch.zeros(input_tensor.shape, dtype=torch.int32, device=input_tensor.device)
        return z, z.clone()
    return cc._official_connected_components_cpu(input_tensor)


class _FakeDeviceProps:
    name = "cpu (official_video_ref: one fake device 0)"
    total_memory = 0
    major, minor = 8, 0  # (the official tracker reads the capability; on a GPU machine too)

    def __repr__(self):
        return f"_CudaDeviceProperties(name='{self.name}')"


_ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "IS_MAIN_PROCESS")


@contextlib.contextmanager
def official_video_mode():
    """Context in which the official video model, tracker and predictor run on CPU: build them
    and call them (requests, and the whole iteration of a propagate stream) inside it. Re-entrant;
    see the module docstring for each patch."""
    official()
    import torch._dynamo
    import sam3.model.sam3_video_base as vb
    import sam3.perflib.associate_det_trk as adt
    import sam3.perflib.connected_components as cc

    if not hasattr(cc, "_official_connected_components_cpu"):
        cc._official_connected_components_cpu = cc.connected_components_cpu
    saved = [
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "device_count", lambda: 1),
        (torch.cuda, "set_device", lambda device: None),
        (torch.cuda, "get_device_properties", lambda device=None: _FakeDeviceProps()),
        (vb, "mask_iou", mask_iou_exact),
        (adt, "mask_iou", mask_iou_exact),
        (cc, "connected_components_cpu", _connected_components_cpu_safe),
    ]
    olds = [(obj, name, getattr(obj, name)) for obj, name, _ in saved]
    env = {k: os.environ.get(k) for k in _ENV_KEYS}
    try:
        for obj, name, new in saved:
            setattr(obj, name, new)
        with _VideoCpuMode(), torch._dynamo.config.patch(disable=True):
            yield
    finally:
        for obj, name, old in olds:
            setattr(obj, name, old)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------------
# The official video model at any config size


def video_weights_(model: nn.Module, seed: int = 0, score_gain: float = 6.0, presence_shift: float = 3.0,
                   pos_embed_scale: float = 1.0, decoder_branch_scale: float = 1.0, mask_sign: float = 1.0,
                   tracker_obj_shift: float = 0.0) -> nn.Module:
    """Re-draw the video model's weights so the reference detects and tracks several objects.

    ``redraw_`` (stable scales; averaged ConvTranspose2d kernels; ``score_gain`` on
    ``dot_prod_scoring.hs_proj``; ``presence_shift`` on the presence head's last bias), then:

    * ``pos_embed_scale`` on the ViT's absolute position table: drawn with std 1 it outweighs the
      patch embedding of smooth frames (|x| <= 1), so every query mask is the same position-driven
      speckle that does not move with the objects;
    * ``decoder_branch_scale`` on the detector decoder's residual branches (self/text/image
      attention ``out_proj``, FFN ``linear2``): its post-norm layers add the same image/text summary
      to every query, and after 2 layers the queries differ by ~13% only (same scores, same masks,
      so mask NMS keeps one detection); smaller branches keep the queries apart;
    * ``mask_sign`` on the segmentation head's ``instance_seg_head`` (flips every query mask to
      its complement: the draw's masks covered most of the background);
    * ``tracker_obj_shift`` on the tracker's object-score head bias (a negative draw marks every
      tracked or clicked object absent: masks of -1024).
    """
    redraw_(model, seed=seed, score_gain=score_gain, presence_shift=presence_shift)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("vision_backbone.trunk.pos_embed"):
                p.mul_(pos_embed_scale)
            elif re.search(r"^detector\.transformer\.decoder\.layers\.\d+\."
                           r"(self_attn\.out_proj|ca_text\.out_proj|cross_attn\.out_proj|linear2)\.weight$", name):
                p.mul_(decoder_branch_scale)
            elif name.startswith("detector.segmentation_head.instance_seg_head."):
                p.mul_(mask_sign)
            elif name == "tracker.sam_mask_decoder.pred_obj_score_head.layers.2.bias":
                p.add_(tracker_obj_shift)
    return model


def build_official_video_model(cfg, seed: Optional[int] = VIDEO_RECIPE["seed"], apply_temporal_disambiguation: bool = True,
                               has_presence_token: bool = True, recipe: Optional[Dict[str, float]] = None,
                               **overrides):
    """``sam3.model_builder.build_sam3_video_model`` at the sizes of ``cfg`` (no checkpoint).

    The detector reuses :func:`official_ref.build_official_image_model`'s constructor mapping
    (dual neck: ``enable_inst_interactivity=True``, as ``_create_vision_backbone()``'s default in the
    video builder) and is re-assembled as ``Sam3ImageOnVideoMultiGPU`` with the video builder's
    arguments; the tracker is :func:`official_ref.build_official_tracker`. ``seed``: weights by
    :func:`video_weights_` with :data:`VIDEO_RECIPE` (``None``: the official random init, e.g.
    before loading a checkpoint; ``recipe``: overrides of the recipe's other settings).
    ``overrides``: replace any heuristic argument of the video builder (e.g. ``hotstart_delay``).
    Returns the model in eval mode on CPU.
    """
    official()
    from sam3.model.sam3_image import Sam3ImageOnVideoMultiGPU
    from sam3.model.sam3_video_inference import Sam3VideoInferenceWithInstanceInteractivity

    # The one random checkpoint buffer (tracker.sam_prompt_encoder.pe_layer.positional_encoding_
    # gaussian_matrix, torch.randn at construction) is not re-drawn by redraw_: seed construction so
    # the same seed gives the same checkpoint, without touching the caller's RNG stream.
    with official_video_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        tracker = build_official_tracker(cfg, apply_temporal_disambiguation=apply_temporal_disambiguation)
        image = build_official_image_model(cfg, enable_segmentation=True, enable_inst_interactivity=True)
        detector = Sam3ImageOnVideoMultiGPU(
            num_feature_levels=1,
            backbone=image.backbone,
            transformer=image.transformer,
            segmentation_head=image.segmentation_head,
            semantic_segmentation_head=None,
            input_geometry_encoder=image.geometry_encoder,
            use_early_fusion=True,
            use_dot_prod_scoring=True,
            dot_prod_scoring=image.dot_prod_scoring,
            supervise_joint_box_scores=has_presence_token,
        )
        del image  # its interactive predictor is not part of the video graph
        kw = dict(HEURISTICS[bool(apply_temporal_disambiguation)], image_size=cfg.resolution, compile_model=False)
        kw.update(overrides)
        model = Sam3VideoInferenceWithInstanceInteractivity(detector=detector, tracker=tracker, **kw)
        if seed is not None:
            video_weights_(model, **{**VIDEO_RECIPE, **(recipe or {}), "seed": seed})
        model.to(device="cpu")
    return model.eval()


def official_video_checkpoint_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The video model's state dict in the released ``sam3.pt`` layout (``detector.*``,
    ``tracker.*``: the attribute names of ``Sam3VideoInference``, which the official builder loads
    with ``strict=True``)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_official_video_checkpoint(model: nn.Module, path: str) -> str:
    """Write the model's weights as a ``sam3.pt``-style file (``{"model": state_dict}``)."""
    torch.save({"model": official_video_checkpoint_state(model)}, path)
    return path


CHECKPOINT_KEYS_TSV = "/work/shared/reference/sam3-checkpoint-keys.tsv"


def checkpoint_keys_tsv(path: str = CHECKPOINT_KEYS_TSV) -> Dict[str, tuple]:
    """Released ``sam3.pt`` key -> shape (the reference listing ``sam3-checkpoint-keys.tsv``)."""
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2 or not (parts[0].startswith("detector.") or parts[0].startswith("tracker.")):
                continue
            shape = parts[1].strip("[]() ")
            out[parts[0]] = tuple(int(s) for s in shape.replace("x", ",").split(",") if s.strip())
    return out


def build_official_video_predictor(cfg, checkpoint_path: str, **predictor_kwargs):
    """``sam3.model_builder.build_sam3_video_predictor(checkpoint_path=...)`` with the model built
    at the sizes of ``cfg``: the official ``Sam3VideoPredictorMultiGPU`` (world size 1), its model
    loaded from ``checkpoint_path`` exactly as ``build_sam3_video_model`` loads it (``torch.load``,
    the ``"model"`` entry if present, ``load_state_dict(strict=True)``). Call it and its requests
    inside :func:`official_video_mode` (:func:`run_official_session` does)."""
    official()
    import sam3.model_builder as mb

    def build_video_model_at_cfg(checkpoint_path=None, load_from_HF=True, bpe_path=None, has_presence_token=True,
                                 geo_encoder_use_img_cross_attn=True, strict_state_dict_loading=True,
                                 apply_temporal_disambiguation=True, device="cpu", compile=False):
        model = build_official_video_model(cfg, seed=None, apply_temporal_disambiguation=apply_temporal_disambiguation,
                                           has_presence_token=has_presence_token)
        assert checkpoint_path is not None, "build_official_video_predictor needs a checkpoint file"
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if "model" in ckpt and isinstance(ckpt["model"], dict):
            ckpt = ckpt["model"]
        missing, unexpected = model.load_state_dict(ckpt, strict=strict_state_dict_loading)
        assert not missing and not unexpected, (missing, unexpected)
        return model.to(device=device)

    orig = mb.build_sam3_video_model
    mb.build_sam3_video_model = build_video_model_at_cfg
    try:
        with official_video_mode():
            predictor = mb.build_sam3_video_predictor(checkpoint_path=checkpoint_path, **predictor_kwargs)
    finally:
        mb.build_sam3_video_model = orig
    return predictor


# ----------------------------------------------------------------------------------------------
# Running sessions

OUTPUT_KEYS = ("out_obj_ids", "out_probs", "out_boxes_xywh", "out_binary_masks")


def to_numpy_outputs(outputs: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """The four per-frame output arrays, as numpy (int64, float32, float32 (N, 4), bool (N, H, W))."""
    out = {}
    for k in OUTPUT_KEYS:
        v = outputs[k]
        out[k] = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    return out


def _as_request_value(v):
    return v.tolist() if isinstance(v, np.ndarray) else v


def run_official_session(predictor, resource, steps: Iterable[Dict[str, Any]], close: bool = True,
                         session_id: Optional[str] = None) -> List[Dict[str, Any]]:
    """Start a session on ``resource`` (mp4 path, ``<index>.jpg`` folder or image path), run
    ``steps`` and return one record per request, in order:

    ``steps``: request dicts as the official API takes them, without ``session_id``:
      ``{"type": "add_prompt", "frame_index": 0, "text": "blob"}``,
      ``{"type": "add_prompt", "frame_index": 3, "points": [[x, y]], "point_labels": [1], "obj_id": 5}``
      (relative coordinates), ``{"type": "add_prompt", "frame_index": 0, "bounding_boxes": [[x, y, w, h]],
      "bounding_box_labels": [1]}``, ``{"type": "propagate_in_video", "propagation_direction":
      "forward"|"backward"|"both", "start_frame_index": None, "max_frame_num_to_track": None}``,
      ``{"type": "remove_object", "obj_id": 1}``, ``{"type": "reset_session"}``.

    Each record: ``{"type", "request" (as sent, with session_id), "seconds", "response"}`` where
    ``response`` is: for ``start_session`` ``{"session_id"}``; for ``add_prompt`` ``{"frame_index",
    "outputs"}``; for ``propagate_in_video`` a list of ``{"frame_index", "outputs"}`` in the order
    yielded; otherwise the official dict. ``outputs`` holds :data:`OUTPUT_KEYS` as numpy.
    Requests run inside :func:`official_video_mode`. ``close``: close the session at the end.
    """
    records: List[Dict[str, Any]] = []
    with official_video_mode():
        req = {"type": "start_session", "resource_path": str(resource)}
        if session_id is not None:
            req["session_id"] = session_id
        t0 = time.perf_counter()
        resp = predictor.handle_request(request=dict(req))
        sid = resp["session_id"]
        records.append({"type": "start_session", "request": req, "seconds": time.perf_counter() - t0,
                        "response": dict(resp)})
        for step in steps:
            req = {k: _as_request_value(v) for k, v in step.items()}
            req["session_id"] = sid
            t0 = time.perf_counter()
            if req["type"] == "propagate_in_video":
                response = [
                    {"frame_index": r["frame_index"], "outputs": to_numpy_outputs(r["outputs"])}
                    for r in predictor.handle_stream_request(request=dict(req))
                ]
            else:
                r = predictor.handle_request(request=dict(req))
                if "outputs" in r:
                    response = {"frame_index": r["frame_index"], "outputs": to_numpy_outputs(r["outputs"])}
                else:
                    response = dict(r)
            records.append({"type": req["type"], "request": req, "seconds": time.perf_counter() - t0,
                            "response": response})
        if close:
            predictor.handle_request(request={"type": "close_session", "session_id": sid})
    return records


def frames_of(records: List[Dict[str, Any]]) -> Dict[int, Dict[str, np.ndarray]]:
    """Latest outputs per frame index over a session's records (add_prompt and propagations)."""
    out: Dict[int, Dict[str, np.ndarray]] = {}
    for rec in records:
        r = rec["response"]
        if isinstance(r, list):
            for fr in r:
                out[fr["frame_index"]] = fr["outputs"]
        elif isinstance(r, dict) and "outputs" in r:
            out[r["frame_index"]] = r["outputs"]
    return out
