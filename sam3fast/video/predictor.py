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
            self.model.detector.drop_deferred()  # (a one-ahead detection queued for this session)
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


# ----------------------------------------------------------------------------------------------
# Several devices


class Sam3VideoPredictorMultiGPU(Sam3VideoPredictor):
    """The request API on several devices (official ``Sam3VideoPredictorMultiGPU``; see
    :mod:`sam3fast.video.distributed` for the design, the bytes on the wire and the faults).

    ``devices``: one device per rank (``["cuda:0", "cuda:1"]``, or ``["cpu", "cpu"]`` to run the
    same code with gloo on CPU), or ``gpus_to_use`` (CUDA indices). ``launcher="spawn"`` (default):
    rank 0 is this process, ranks 1.. are spawned here and load the same model arguments.
    ``launcher="torchrun"``: every ``torchrun`` process builds the predictor (device = the
    ``LOCAL_RANK``-th of ``devices``/``gpus_to_use``, default ``cuda:LOCAL_RANK``); rank 0 sends
    requests, the others call :meth:`serve` (returns when rank 0 shuts down).
    ``collective_timeout_s``: the limit on every collective (default
    ``SAM3_COLLECTIVE_OP_TIMEOUT_SEC`` or 180 s, as the official)."""

    def __init__(self, *model_args, gpus_to_use=None, devices=None, launcher: str = "spawn",
                 collective_timeout_s: Optional[float] = None, startup_timeout_s: Optional[float] = None,
                 _worker_store=None, _worker_rank=None, **model_kwargs):
        from . import distributed as D

        if "model" in model_kwargs:
            raise ValueError("a multi-device predictor builds its model on every rank: pass the builder arguments, "
                             "not model=")
        if launcher not in ("spawn", "torchrun"):
            raise ValueError(f"launcher must be 'spawn' or 'torchrun', got {launcher!r}")
        self._timeout_s = float(collective_timeout_s if collective_timeout_s is not None
                                else D.DEFAULT_COLLECTIVE_TIMEOUT_S)
        startup_s = float(startup_timeout_s if startup_timeout_s is not None else D.DEFAULT_STARTUP_TIMEOUT_S)
        self._procs: Dict[int, Any] = {}
        self._ctx = None
        self._broken: Optional[str] = None
        self._seq = 0
        self.launcher = launcher
        if launcher == "torchrun":
            import os

            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            local = int(os.environ.get("LOCAL_RANK", rank))
            if devices is None and gpus_to_use is None:
                devs = [torch.device("cuda", local)] if torch.cuda.is_available() else [torch.device("cpu")]
                local = 0
            else:
                devs = D.resolve_devices(gpus_to_use, devices)
            device = devs[local % len(devs)]
            store, _, _ = next(torch.distributed.rendezvous("env://", rank, world))
            store = torch.distributed.PrefixStore("sam3fast_video", store)
        elif _worker_store is not None:
            rank, world, device, store = _worker_rank, _worker_store[1], _worker_store[2], _worker_store[0]
        else:
            devs = D.resolve_devices(gpus_to_use, devices)
            rank, world, device = 0, len(devs), devs[0]
        self.rank, self.world_size, self.device = rank, world, torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if model_kwargs.pop("device", None) is not None:
            raise ValueError("a multi-device predictor takes devices= or gpus_to_use=, not device=")
        super().__init__(*model_args, device=self.device, **model_kwargs)
        if world == 1:
            return
        if launcher == "spawn" and rank == 0:
            import datetime

            store = torch.distributed.TCPStore("127.0.0.1", 0, world, True, timeout=datetime.timedelta(seconds=startup_s),
                                               wait_for_workers=False)
            self._store = store
            self._spawn_workers(devs, model_args, model_kwargs, startup_s)
        self._store = store
        if rank > 0:
            D.store_put(store, f"ready/{rank}", __import__("os").getpid())
        ctx = D.DistContext(rank, world, self.device, store, self._timeout_s)
        self._ctx = ctx
        if rank == 0:
            ctx.monitor = self._monitor
            ctx.start_watchdog()
        self.model.set_distributed(ctx)

    # ------------------------------------------------------------------ workers (rank 0)
    def _spawn_workers(self, devs, model_args, model_kwargs, startup_s):
        import os

        import torch.multiprocessing as mp

        from . import distributed as D

        ctx = mp.get_context("spawn")
        spec = dict(port=self._store.port, world=self.world_size, devices=[str(d) for d in devs],
                    timeout_s=self._timeout_s, startup_s=startup_s, num_threads=torch.get_num_threads(),
                    parent_pid=os.getpid())
        for r in range(1, self.world_size):
            p = ctx.Process(target=_worker_main, args=(r, spec, model_args, model_kwargs), daemon=True,
                            name=f"sam3fast-video-rank{r}")
            p.start()
            self._procs[r] = p
        deadline = time.monotonic() + startup_s
        pending = set(self._procs)
        while pending:
            for r in list(pending):
                if D.store_has(self._store, f"ready/{r}"):
                    pending.discard(r)
            reason = self._monitor()
            if reason is not None:
                self._kill_workers()
                raise D.WorkerError(f"starting the workers failed: {reason}")
            if time.monotonic() > deadline:
                self._kill_workers()
                raise D.WorkerError(f"workers {sorted(pending)} did not load the model within {startup_s:g} s")
            time.sleep(0.02)

    @property
    def worker_pids(self) -> Dict[int, int]:
        return {r: p.pid for r, p in self._procs.items()}

    def _monitor(self) -> Optional[str]:
        """A failed worker (rank 0): one that reported an exception, or a process that ended."""
        from . import distributed as D

        store = getattr(self, "_store", None)
        for r in range(1, self.world_size):
            key = f"error/{r}"
            if store is not None and D.store_has(store, key):
                rep = D.store_get(store, key)
                return (f"worker rank {r} raised {rep['type']}: {rep['message']}\n"
                        f"--- traceback on rank {r} ---\n{rep['traceback']}")
            p = self._procs.get(r)
            if p is not None and not p.is_alive():
                return f"worker rank {r} (pid {p.pid}) died with exit code {p.exitcode}"
        return None

    def _kill_workers(self, grace_s: float = 5.0):
        deadline = time.monotonic() + grace_s
        for p in self._procs.values():
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self._procs.values():
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=2.0)
        self._procs.clear()

    def _break(self, reason: str):
        """After a failure: end the workers, free the groups; later requests raise."""
        self._broken = reason
        self._teardown(graceful=False)

    def _teardown(self, graceful: bool):
        from . import distributed as D

        if self.rank == 0 and self.world_size > 1 and getattr(self, "_store", None) is not None:
            if graceful:
                try:
                    D.store_put(self._store, f"req/{self._seq}", ("shutdown", None))
                    self._seq += 1
                except Exception:  # noqa: BLE001
                    pass
            self._kill_workers(grace_s=10.0 if graceful else 0.5)
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if getattr(self, "model", None) is not None and self.world_size > 1:
            self.model.set_distributed(None)
        self._store = None
        gc.collect()

    # ------------------------------------------------------------------ requests
    def _check_not_shut_down(self):
        super()._check_not_shut_down()
        if self._broken is not None:
            raise RuntimeError(f"the multi-device video predictor is broken by an earlier failure ({self._broken.splitlines()[0]}); "
                               "build a new predictor")

    def _dispatch(self, request, stream: bool):
        from . import distributed as D

        if self.world_size > 1 and self.rank == 0:
            D.store_put(self._store, f"req/{self._seq}", ("request", (request, stream)))
            self._seq += 1

    def _finish(self, error: Optional[BaseException]):
        """Every rank's status after a request. All ranks raised (the same kind of error, before
        any collective): re-raise, the predictor stays usable. Otherwise: one WorkerError."""
        from . import distributed as D

        if self.world_size == 1:
            if error is not None:
                raise error
            return
        ctx = self._ctx
        try:
            # reports of a uniform error are expected here, not failures
            ctx.monitor = self._liveness
            codes = ctx.exchange_status(0 if error is None else 1)
        except D.WorkerError as e:
            self._break(str(e))
            raise D.WorkerError(str(e)) from error
        finally:
            if self._ctx is not None:
                self._ctx.monitor = self._monitor
        if not any(codes):
            return
        reports = {}
        for r in range(1, self.world_size):
            if codes[r]:
                reports[r] = D.store_get(self._store, f"error/{r}")
                self._store.delete_key(f"error/{r}")
        if all(codes) and error is not None and all(rep["type"] == type(error).__name__ for rep in reports.values()):
            raise error
        r, rep = next(iter(reports.items())) if reports else (0, D.format_exception(error))
        msg = (f"worker rank {r} raised {rep['type']}: {rep['message']}\n--- traceback on rank {r} ---\n"
               f"{rep['traceback']}" if r else f"rank 0 raised {rep['type']}: {rep['message']} (the workers did not)")
        self._break(msg)
        raise D.WorkerError(msg) from error

    def _liveness(self) -> Optional[str]:
        for r, p in self._procs.items():
            if not p.is_alive():
                return f"worker rank {r} (pid {p.pid}) died with exit code {p.exitcode}"
        return None

    def handle_request(self, request):
        from . import distributed as D

        self._check_not_shut_down()
        if self.world_size == 1 or self.rank != 0:
            return super().handle_request(request)
        if isinstance(request, dict) and request.get("type") == "start_session" and not request.get("session_id"):
            request = dict(request, session_id=str(uuid.uuid4()))  # the same id on every rank
        self._dispatch(request, False)
        try:
            out = super().handle_request(request)
        except D.WorkerError as e:
            self._break(str(e))
            raise
        except Exception as e:  # noqa: BLE001 - decided with the workers' status
            self._finish(e)
            raise
        self._finish(None)
        return out

    def handle_stream_request(self, request):
        from . import distributed as D

        self._check_not_shut_down()
        if self.world_size == 1 or self.rank != 0:
            yield from super().handle_stream_request(request)
            return
        self._dispatch(request, True)
        gen = super().handle_stream_request(request)
        error = None
        try:
            try:
                for item in gen:
                    yield item
            except GeneratorExit:
                # the caller stopped early: the workers run the whole propagation, so rank 0 does
                # too (outputs dropped) to keep the collectives in step
                for _ in gen:
                    pass
                raise
        except D.WorkerError as e:
            self._break(str(e))
            raise
        except GeneratorExit:
            self._finish(None)
            raise
        except Exception as e:  # noqa: BLE001
            error = e
        self._finish(error)

    # ------------------------------------------------------------------ worker side
    def serve(self):
        """Ranks > 0: run rank 0's requests until it shuts down (``launcher="torchrun"``; spawned
        workers run this too)."""
        from . import distributed as D

        if self.rank == 0:
            raise RuntimeError("serve() runs on ranks > 0; rank 0 sends the requests")
        seq, last_check = 0, time.monotonic()
        while True:
            key = f"req/{seq}"
            try:
                ready = self._store.check([key])
            except Exception:  # noqa: BLE001 - the store is gone (rank 0 ended)
                return
            if not ready:  # idle: poll (a blocking store wait logs a warning at each timeout)
                if time.monotonic() - last_check > 1.0:
                    last_check = time.monotonic()
                    if not _parent_alive(getattr(self, "_parent_pid", None)):
                        return
                time.sleep(0.002)
                continue
            kind, payload = D.store_get(self._store, key)
            seq += 1
            if kind == "shutdown":
                self._teardown(graceful=False)
                self.has_shutdown = True
                return
            if kind == "fault":  # test hook: raise at the n-th next collective
                if payload[0] == self.rank:
                    self._ctx.fail_in = int(payload[1])
                continue
            request, stream = payload
            code = 0
            try:
                if stream:
                    for _ in Sam3VideoPredictor.handle_stream_request(self, request):
                        pass
                else:
                    Sam3VideoPredictor.handle_request(self, request)
            except Exception as e:  # noqa: BLE001 - reported to rank 0 before the status exchange
                D.store_put(self._store, f"error/{self.rank}", D.format_exception(e))
                code = 1
            try:
                self._ctx.exchange_status(code)
            except Exception:  # noqa: BLE001 - rank 0 is gone or broke the job
                return

    def inject_fault(self, rank: int, after_collectives: int = 1):
        """Test hook (rank 0): make worker ``rank`` raise at its ``after_collectives``-th next
        collective."""
        from . import distributed as D

        D.store_put(self._store, f"req/{self._seq}", ("fault", (int(rank), int(after_collectives))))
        self._seq += 1

    def shutdown(self):
        """End the workers (no process and no port left), clear all sessions."""
        self._ALL_INFERENCE_STATES.clear()  # (sessions may hold pending collectives)
        if self.world_size > 1 and self.rank == 0:
            self._teardown(graceful=self._broken is None and not self.has_shutdown)
        super().shutdown()

    def __del__(self):
        try:
            if self.rank == 0 and self._procs:
                self._teardown(graceful=False)
        except Exception:  # noqa: BLE001
            pass


def _parent_alive(pid) -> bool:
    if pid is None:
        return True
    import os

    if os.getppid() != pid:
        return False
    return True


def _worker_main(rank, spec, model_args, model_kwargs):
    """A spawned rank: connect to rank 0's store, load the model, serve requests."""
    import datetime
    import os

    from . import distributed as D

    torch.set_num_threads(spec["num_threads"])
    store = torch.distributed.TCPStore("127.0.0.1", spec["port"], spec["world"], False,
                                       timeout=datetime.timedelta(seconds=spec["startup_s"]))
    try:
        pred = Sam3VideoPredictorMultiGPU(*model_args, devices=None, collective_timeout_s=spec["timeout_s"],
                                          _worker_store=(store, spec["world"], torch.device(spec["devices"][rank])),
                                          _worker_rank=rank, **model_kwargs)
    except Exception as e:  # noqa: BLE001
        D.store_put(store, f"error/{rank}", D.format_exception(e))
        raise
    pred._parent_pid = spec["parent_pid"]
    pred.serve()
    os._exit(0)
