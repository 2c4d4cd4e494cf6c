"""The video request API (official ``Sam3VideoPredictor``): sessions and request dispatch.

``handle_request(request)`` with ``request["type"]`` in ``start_session`` (``resource_path``,
optional ``session_id``) -> ``{"session_id"}``; ``add_prompt`` (``session_id``, ``frame_index``,
``text`` and/or ``bounding_boxes`` + ``bounding_box_labels``, or ``points`` + ``point_labels`` +
``obj_id``) -> ``{"frame_index", "outputs"}``; ``remove_object`` (``session_id``, ``obj_id``) ->
``{"is_success": True}``; ``reset_session``; ``close_session`` (idempotent).
``handle_stream_request({"type": "propagate_in_video", "session_id", "propagation_direction":
"both" | "forward" | "backward", "start_frame_index", "max_frame_num_to_track"})`` -> generator of
``{"frame_index", "outputs"}`` ("both": forward, then backward).

``outputs``: ``out_obj_ids`` (N,) int64, ``out_probs`` (N,) float32, ``out_boxes_xywh`` (N, 4)
float32 normalised, ``out_binary_masks`` (N, H, W) bool at video resolution, ``frame_stats``.

Errors are raised before a session is changed where the official would fail midway: an unknown
session id (RuntimeError, as the official), a frame index outside the video, points outside the
frame, an unknown object id, more than one box (ValueError), a missing or unreadable video
(FileNotFoundError / ValueError). The session stays usable after any of them.
"""

from __future__ import annotations

import gc
import logging
import time
import uuid
from typing import Any, Dict, Optional

import torch

logger = logging.getLogger(__name__)

_REQUEST_TYPES = ("start_session", "add_prompt", "remove_object", "reset_session", "close_session")


class Sam3VideoPredictor:
    """Holds the video model and the live sessions (per predictor instance; the official keeps
    them in a class-level dict shared by all predictors of the process)."""

    def __init__(
        self,
        checkpoint_path=None,
        bpe_path=None,
        has_presence_token=True,
        geo_encoder_use_img_cross_attn=True,
        strict_state_dict_loading=True,
        async_loading_frames=False,
        video_loader_type="cv2",
        apply_temporal_disambiguation: bool = True,
        *,
        load_from_HF: bool = True,
        config="sam3",
        device=None,
        dtype=torch.float32,
        model=None,
        **model_kwargs,
    ):
        self.async_loading_frames = async_loading_frames
        self.video_loader_type = video_loader_type
        if model is None:
            from . import build_sam3_video_model

            model = build_sam3_video_model(
                checkpoint_path=checkpoint_path, load_from_HF=load_from_HF, bpe_path=bpe_path,
                has_presence_token=has_presence_token, geo_encoder_use_img_cross_attn=geo_encoder_use_img_cross_attn,
                strict_state_dict_loading=strict_state_dict_loading,
                apply_temporal_disambiguation=apply_temporal_disambiguation, device=device, config=config,
                dtype=dtype, **model_kwargs,
            )
        self.model = model.eval()
        self._ALL_INFERENCE_STATES: Dict[str, Dict[str, Any]] = {}
        self.has_shutdown = False

    # ------------------------------------------------------------------ dispatch
    @torch.inference_mode()
    def handle_request(self, request):
        """Dispatch a request dict by its ``type`` (see the module docstring)."""
        self._check_not_shut_down()
        request_type = self._request_type(request)
        if request_type == "start_session":
            return self.start_session(resource_path=self._field(request, "resource_path"),
                                      session_id=request.get("session_id", None))
        if request_type == "add_prompt":
            return self.add_prompt(
                session_id=self._field(request, "session_id"),
                frame_idx=self._field(request, "frame_index"),
                text=request.get("text", None),
                points=request.get("points", None),
                point_labels=request.get("point_labels", None),
                bounding_boxes=request.get("bounding_boxes", None),
                bounding_box_labels=request.get("bounding_box_labels", None),
                obj_id=request.get("obj_id", None),
            )
        if request_type == "remove_object":
            return self.remove_object(session_id=self._field(request, "session_id"),
                                      obj_id=self._field(request, "obj_id"),
                                      is_user_action=request.get("is_user_action", True))
        if request_type == "reset_session":
            return self.reset_session(session_id=self._field(request, "session_id"))
        if request_type == "close_session":
            return self.close_session(session_id=self._field(request, "session_id"))
        raise RuntimeError(f"invalid request type: {request_type!r} (expected one of {_REQUEST_TYPES}; "
                           "propagate_in_video goes through handle_stream_request)")

    @torch.inference_mode()
    def handle_stream_request(self, request):
        """Dispatch a streaming request (``propagate_in_video``): a generator of outputs."""
        self._check_not_shut_down()
        request_type = self._request_type(request)
        if request_type != "propagate_in_video":
            raise RuntimeError(f"invalid request type: {request_type!r} (handle_stream_request serves "
                               "propagate_in_video)")
        yield from self.propagate_in_video(
            session_id=self._field(request, "session_id"),
            propagation_direction=request.get("propagation_direction", "both"),
            start_frame_idx=request.get("start_frame_index", None),
            max_frame_num_to_track=request.get("max_frame_num_to_track", None),
        )

    @staticmethod
    def _request_type(request):
        if not isinstance(request, dict) or "type" not in request:
            raise ValueError(f"a request is a dict with a 'type' key, got {request!r}")
        return request["type"]

    @staticmethod
    def _field(request, key):
        if key not in request:
            raise ValueError(f"{request.get('type')} request is missing {key!r}")
        return request[key]

    # ------------------------------------------------------------------ requests
    def start_session(self, resource_path, session_id=None):
        """Load ``resource_path`` (mp4, folder of ``<index>.jpg`` frames, image file) into a new
        session; returns ``{"session_id"}`` (``session_id`` if given, else a new uuid4)."""
        try:
            inference_state = self.model.init_state(
                resource_path=resource_path, async_loading_frames=self.async_loading_frames,
                video_loader_type=self.video_loader_type,
            )
        except (FileNotFoundError, ValueError, TypeError, NotImplementedError):
            raise
        except Exception as e:  # decoder libraries raise their own types: re-raised as one clear error
            raise ValueError(f"could not read video frames from {resource_path!r}: {type(e).__name__}: {e}") from e
        if not session_id:
            session_id = str(uuid.uuid4())
        self._ALL_INFERENCE_STATES[session_id] = {"state": inference_state, "session_id": session_id,
                                                  "start_time": time.time()}
        return {"session_id": session_id}

    def add_prompt(self, session_id: str, frame_idx: int, text: Optional[str] = None, points=None,
                   point_labels=None, bounding_boxes=None, bounding_box_labels=None, obj_id: Optional[int] = None):
        """Text, box and/or point prompt on one frame -> ``{"frame_index", "outputs"}``."""
        inference_state = self._get_session(session_id)["state"]
        frame_idx, outputs = self.model.add_prompt(
            inference_state=inference_state, frame_idx=frame_idx, text_str=text, points=points,
            point_labels=point_labels, boxes_xywh=bounding_boxes, box_labels=bounding_box_labels, obj_id=obj_id,
        )
        return {"frame_index": frame_idx, "outputs": outputs}

    def remove_object(self, session_id: str, obj_id: int, is_user_action: bool = True):
        inference_state = self._get_session(session_id)["state"]
        self.model.remove_object(inference_state=inference_state, obj_id=obj_id, is_user_action=is_user_action)
        return {"is_success": True}

    def propagate_in_video(self, session_id, propagation_direction, start_frame_idx, max_frame_num_to_track):
        """Generator of ``{"frame_index", "outputs"}``: forward, backward, or both (forward first)."""
        inference_state = self._get_session(session_id)["state"]
        if propagation_direction not in ["both", "forward", "backward"]:
            raise ValueError(f"invalid propagation direction: {propagation_direction!r} "
                             "(expected 'both', 'forward' or 'backward')")
        if propagation_direction in ["both", "forward"]:
            for frame_idx, outputs in self.model.propagate_in_video(
                inference_state=inference_state, start_frame_idx=start_frame_idx,
                max_frame_num_to_track=max_frame_num_to_track, reverse=False,
            ):
                yield {"frame_index": frame_idx, "outputs": outputs}
        if propagation_direction in ["both", "backward"]:
            for frame_idx, outputs in self.model.propagate_in_video(
                inference_state=inference_state, start_frame_idx=start_frame_idx,
                max_frame_num_to_track=max_frame_num_to_track, reverse=True,
            ):
                yield {"frame_index": frame_idx, "outputs": outputs}

    def reset_session(self, session_id):
        self.model.reset_state(self._get_session(session_id)["state"])
        return {"is_success": True}

    def close_session(self, session_id):
        session = self._ALL_INFERENCE_STATES.pop(session_id, None)
        if session is None:
            logger.warning(f"cannot close session {session_id} as it does not exist (it might have expired)")
        else:
            del session
            gc.collect()
        return {"is_success": True}

    def _get_session(self, session_id):
        session = self._ALL_INFERENCE_STATES.get(session_id, None)
        if session is None:
            raise RuntimeError(f"Cannot find session {session_id}; it might have expired "
                               f"(live sessions: {sorted(self._ALL_INFERENCE_STATES)})")
        return session

    def shutdown(self):
        """Clear all sessions; later requests raise RuntimeError (as the official multi-GPU
        predictor, which ``build_sam3_video_predictor`` returns). One process: no workers to end."""
        self._ALL_INFERENCE_STATES.clear()
        self.has_shutdown = True

    def _check_not_shut_down(self):
        if self.has_shutdown:
            raise RuntimeError("cannot handle request after the predictor has shutdown; please create a new predictor")
