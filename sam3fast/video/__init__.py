"""SAM 3 on video: detect-and-track sessions and the request API (drop-in for the official
``build_sam3_video_model`` / ``build_sam3_video_predictor``).

    from sam3fast.video import build_sam3_video_predictor
    predictor = build_sam3_video_predictor(checkpoint_path="sam3.pt")
    sid = predictor.handle_request({"type": "start_session", "resource_path": "clip.mp4"})["session_id"]
    predictor.handle_request({"type": "add_prompt", "session_id": sid, "frame_index": 0, "text": "dog"})
    for r in predictor.handle_stream_request({"type": "propagate_in_video", "session_id": sid}):
        r["frame_index"], r["outputs"]["out_obj_ids"], r["outputs"]["out_binary_masks"]

The model (:class:`Sam3VideoInferenceWithInstanceInteractivity`) holds ``detector``
(:class:`Sam3VideoDetector`, the ``detector.*`` keys of ``sam3.pt``) and ``tracker``
(:class:`~sam3fast.video.tracker_predictor.Sam3TrackerPredictor`, the ``tracker.*`` keys); both are
loaded strictly from one checkpoint.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Union

import torch

from ..config import Sam3Config, get_config
from .detector import Sam3VideoDetector, generic_nms, mask_iou_matrix, nms_masks
from .inference import Sam3VideoBase, Sam3VideoInference, Sam3VideoInferenceWithInstanceInteractivity
from .io import VideoFrames, load_video, open_video
from .predictor import Sam3VideoPredictor, Sam3VideoPredictorMultiGPU
from .tracker_predictor import Sam3TrackerPredictor

__all__ = [
    "build_sam3_video_model",
    "build_sam3_video_predictor",
    "build_video_model",
    "video_heuristics",
    "Sam3VideoPredictor",
    "Sam3VideoPredictorMultiGPU",
    "Sam3VideoInferenceWithInstanceInteractivity",
    "Sam3VideoInference",
    "Sam3VideoBase",
    "Sam3VideoDetector",
    "Sam3TrackerPredictor",
    "load_video",
    "open_video",
    "VideoFrames",
    "nms_masks",
    "generic_nms",
    "mask_iou_matrix",
]


def video_heuristics(apply_temporal_disambiguation: bool = True, image_size: int = 1008) -> dict:
    """The official ``build_sam3_video_model`` arguments of ``Sam3VideoInferenceWithInstanceInteractivity``
    (``model_builder.py`` 697-746): with temporal disambiguation (hotstart 15, re-conditioning every
    16th frame) or without any heuristics."""
    common = dict(
        score_threshold_detection=0.5, assoc_iou_thresh=0.1, det_nms_thresh=0.1, new_det_thresh=0.7,
        suppress_unmatched_only_within_hotstart=True, min_trk_keep_alive=-1, max_trk_keep_alive=30,
        init_trk_keep_alive=30, suppress_overlapping_based_on_recent_occlusion_threshold=0.7,
        suppress_det_close_to_boundary=False, fill_hole_area=16, masklet_confirmation_enable=False,
        decrease_trk_keep_alive_for_empty_masklets=False, image_size=image_size, image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    )
    if apply_temporal_disambiguation:
        return dict(common, hotstart_delay=15, hotstart_unmatch_thresh=8, hotstart_dup_thresh=8,
                    recondition_every_nth_frame=16)
    return dict(common, hotstart_delay=0, hotstart_unmatch_thresh=0, hotstart_dup_thresh=0,
                recondition_every_nth_frame=0)


def _assemble(cfg: Sam3Config, apply_temporal_disambiguation: bool, bpe_path: Optional[str], tracker=None,
              **overrides) -> Sam3VideoInferenceWithInstanceInteractivity:
    detector = Sam3VideoDetector(cfg, bpe_path=bpe_path)
    if tracker is None:
        tracker = Sam3TrackerPredictor.from_config(cfg, use_memory_selection=apply_temporal_disambiguation)
    kw = video_heuristics(apply_temporal_disambiguation, image_size=cfg.resolution)
    kw.update(overrides)
    return Sam3VideoInferenceWithInstanceInteractivity(detector=detector, tracker=tracker, **kw)


def build_video_model(
    config: Union[str, Sam3Config] = "sam3",
    checkpoint_path: Optional[str] = None,
    device=None,
    dtype=torch.float32,
    apply_temporal_disambiguation: bool = True,
    random_weights_seed: Optional[int] = None,
    bpe_path: Optional[str] = None,
    compile: Union[bool, str] = False,
    **overrides,
) -> Sam3VideoInferenceWithInstanceInteractivity:
    """Native builder. With ``checkpoint_path``: built on the meta device and loaded strictly
    (``detector.*`` and ``tracker.*`` of ``sam3.pt``; a checkpoint with missing, unexpected or
    mis-shaped keys raises :class:`~sam3fast.checkpoint.CheckpointError` listing them). Without:
    stable random weights (``random_weights_seed``, default 0). ``overrides``: any heuristic
    argument of the official video model (e.g. ``hotstart_delay``). ``compile``: True (inductor)
    or a ``torch.compile`` backend name: the detector's stages (``compile_stages``) and the
    tracker's per-frame step (``compile_step``), each one graph."""
    from ..build import _resolve_device, _resolve_dtype, instantiate
    from ..checkpoint import read_state_dict

    cfg = get_config(config) if isinstance(config, str) else config
    sd = read_state_dict(checkpoint_path) if checkpoint_path is not None else None
    model = instantiate(lambda: _assemble(cfg, apply_temporal_disambiguation, bpe_path, **overrides),
                        sd, _resolve_device(device), _resolve_dtype(dtype), random_weights_seed)
    if compile:
        backend = "inductor" if compile is True else compile
        model.detector.compile_stages(backend=backend)
        model.tracker.compile_step(backend=backend)
    return model


def build_sam3_video_model(
    checkpoint_path: Optional[str] = None,
    load_from_HF=True,
    bpe_path: Optional[str] = None,
    has_presence_token: bool = True,
    geo_encoder_use_img_cross_attn: bool = True,
    strict_state_dict_loading: bool = True,
    apply_temporal_disambiguation: bool = True,
    device=None,
    compile=False,
    *,
    config: Union[str, Sam3Config] = "sam3",
    dtype=torch.float32,
    **overrides,
) -> Sam3VideoInferenceWithInstanceInteractivity:
    """Drop-in for ``sam3.model_builder.build_sam3_video_model`` (same arguments), plus ``config``,
    ``dtype`` and heuristic ``overrides``. With ``load_from_HF=True`` and no path the checkpoint
    comes from the Hugging Face hub cache (never downloaded here: the weights are gated); with
    neither, random weights. Loading is always strict."""
    from ..checkpoint import resolve_checkpoint_path

    if not has_presence_token:
        raise NotImplementedError("has_presence_token=False: sam3fast builds the released model (presence token on)")
    if not strict_state_dict_loading:
        warnings.warn("sam3fast loads checkpoints strictly: strict_state_dict_loading=False is ignored",
                      stacklevel=2)
    if bpe_path is not None and not os.path.exists(bpe_path):
        raise FileNotFoundError(f"bpe_path does not exist: {bpe_path}")
    path = resolve_checkpoint_path(checkpoint_path, load_from_HF)
    return build_video_model(config=config, checkpoint_path=path, device=device, dtype=dtype,
                             apply_temporal_disambiguation=apply_temporal_disambiguation, bpe_path=bpe_path,
                             compile=compile, **overrides)


def build_sam3_video_predictor(*model_args, gpus_to_use=None, **model_kwargs) -> Sam3VideoPredictor:
    """Drop-in for ``sam3.model_builder.build_sam3_video_predictor``. ``model_args``/``model_kwargs``
    are the official predictor's (``checkpoint_path``, ``bpe_path``, ...) plus ``load_from_HF``,
    ``config``, ``device``, ``dtype``.

    One device (``gpus_to_use`` with at most one GPU, or ``device``): :class:`Sam3VideoPredictor`
    in this process. Several (``gpus_to_use=[0, 1, ...]``, or ``devices=["cpu", "cpu"]`` to run the
    same code with gloo on CPU), or ``launcher="torchrun"`` (every torchrun process calls this; ranks
    > 0 then call ``predictor.serve()``): :class:`~sam3fast.video.predictor.Sam3VideoPredictorMultiGPU`
    (extra keywords ``collective_timeout_s``, ``startup_timeout_s``)."""
    from .predictor import Sam3VideoPredictorMultiGPU

    # (keywords, not parameters: the signature stays the official one, which the drop-in tests pin)
    devices = model_kwargs.pop("devices", None)
    launcher = model_kwargs.pop("launcher", None)
    several = (devices is not None and len(devices) > 1) or (
        gpus_to_use is not None and len(set(gpus_to_use)) > 1) or launcher == "torchrun"
    if several:
        return Sam3VideoPredictorMultiGPU(*model_args, gpus_to_use=gpus_to_use, devices=devices,
                                          launcher=launcher or "spawn", **model_kwargs)
    if devices is not None:
        if "device" in model_kwargs:
            raise ValueError("give devices or device, not both")
        if devices:
            model_kwargs["device"] = devices[0]
    if gpus_to_use is not None:
        gpus = sorted(set(gpus_to_use))
        if gpus and "device" not in model_kwargs:
            model_kwargs["device"] = f"cuda:{gpus[0]}"
    return Sam3VideoPredictor(*model_args, **model_kwargs)
