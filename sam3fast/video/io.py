"""Video frame loading, bit-exact with the official ``sam3.model.io_utils`` loaders.

Every source becomes frames of shape (T, 3, R, R) float16 (R = model resolution, 1008 for SAM 3)
plus the original ``(video_height, video_width)``, the values the official ``init_state`` /
``start_session`` puts in ``input_batch.img_batch``. The official code uses a different recipe per
source, and each is reproduced here (u = the resized uint8 pixel, N(x) = (x - 0.5) / 0.5):

- video file (.mp4 .mov .avi .mkv .webm): OpenCV decode, BGR->RGB, ``cv2.INTER_CUBIC`` on uint8;
  values N(u) = 2u - 1 in [-1, 509]. sam3 0.1.4 has **no /255** on this path (upstream issue #493);
  its dtype is float32, but the values are integers, so float16 holds them exactly. Sizes come from
  the container (``CAP_PROP_FRAME_HEIGHT/WIDTH``).
- folder of ``<frame_index>.<ext>`` images, or one image file: PIL ``BILINEAR`` (torchvision
  ``TF.resize`` default on a PIL image); values f16(N(f16(u / 255 in float32))), N in float16.
  A folder's size is the last frame's (the official loop keeps the last one it read).
- list of PIL images: PIL ``BICUBIC`` (``Image.resize`` default); values f16(N(f16(u / 255.0 in
  float64))), N in float16 (equal to the folder values for every u). Size from the first image.
- (T, H, W, 3) uint8 RGB array or tensor (sam3fast extension): the video-file recipe, so the frames
  OpenCV decodes from a file, passed as an array, give that file's tensor.

``video_unit_scale=True`` adds the missing /255 on the two OpenCV paths (video files, arrays) with the
folder recipe; it departs from the official numbers and is off by default.

After the uint8 resize (always on the CPU, with the official library) each recipe is a per-pixel
function of u, held as a 256-entry float16 table built with the official arithmetic; a frame is then an
uint8 upload and one gather on ``device``, so results are bit-identical on every device.

``load_video`` returns the whole clip; ``open_video`` returns a :class:`VideoFrames` that reads and
yields one (3, R, R) frame at a time with the same values, for clips too long to hold.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .side_stream import SideStream

# Same lists as the official io_utils (matched lower-cased).
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tiff", ".webp")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm")

Resource = Union[str, os.PathLike, np.ndarray, torch.Tensor, Sequence]


# ----------------------------------------------------------------------------------------------
# Per-frame recipes
#
# After the uint8 resize every official recipe maps each pixel value u on its own, so each is a
# 256-entry float16 table built here with the official arithmetic (same ops, dtypes and order). A
# frame is then the uint8 upload plus one gather on the target device: bit-exact on any device and
# ~3x faster than the float16 arithmetic on a CPU. (The order matters: rounding u / 255 to float16
# *before* subtracting 0.5, as the official does, differs from a float32 normalise in 140 of 256 values.)

_HALF = torch.tensor(0.5, dtype=torch.float16)  # the official image_mean == image_std == 0.5


def _lut_unit() -> torch.Tensor:
    # folder / image file: torchvision to_tensor (float32 u / 255), .half(), then the in-place
    # float16 `-= mean`, `/= std`.
    u = torch.arange(256, dtype=torch.uint8)
    return (u.float().div(255).half() - _HALF) / _HALF


def _lut_pil_list() -> torch.Tensor:
    # list of PIL images: numpy float64 u / 255.0 straight to float16, then float16 N.
    # Equal to _lut_unit for every u; kept separate because it is a separate official recipe.
    u = torch.arange(256, dtype=torch.uint8)
    return (u.double().div(255.0).to(torch.float16) - _HALF) / _HALF


def _lut_cv2_official() -> torch.Tensor:
    # OpenCV video file: float32 N of 0..255 (no /255): the integers 2u - 1, exact in float16.
    u = torch.arange(256, dtype=torch.uint8)
    return ((u.float() - _HALF.float()) / _HALF.float()).half()


def _apply_lut(rgb: np.ndarray, lut: torch.Tensor) -> torch.Tensor:
    """(R, R, 3) uint8 RGB on the CPU -> (3, R, R) float16 on ``lut.device``."""
    r, c = rgb.shape[:2]
    x = torch.from_numpy(rgb).to(lut.device)
    idx = x.permute(2, 0, 1).reshape(-1).int()
    return lut.index_select(0, idx).view(3, r, c)


def _cv2_resize(rgb: np.ndarray, image_size: int) -> np.ndarray:
    import cv2

    return cv2.resize(np.ascontiguousarray(rgb), (image_size, image_size), interpolation=cv2.INTER_CUBIC)


def _image_file_resize(path: str, image_size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read image {path!r}: {e}") from e
    # torchvision TF.resize on a PIL image (default interpolation) is PIL bilinear.
    return np.array(im.resize((image_size, image_size), Image.Resampling.BILINEAR))


def _pil_resize(img, image_size: int) -> np.ndarray:
    from PIL import Image

    # The official `Image.resize((R, R))` without a filter: PIL's default for RGB is bicubic.
    return np.array(img.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC))


# ----------------------------------------------------------------------------------------------
# Sources


def _sorted_frame_names(folder: str) -> List[str]:
    names = [p for p in os.listdir(folder) if os.path.splitext(p)[-1].lower() in IMAGE_EXTS]
    try:
        names.sort(key=lambda p: int(os.path.splitext(p)[0]))
    except ValueError:
        # The official loader also falls back to lexicographic order ("10.jpg" before "2.jpg").
        warnings.warn(
            f'frame names in {folder!r} are not all "<frame_index>.<ext>" (e.g. {sorted(names)[:3]}); '
            "using lexicographic order as the official loader does",
            stacklevel=3,
        )
        names.sort()
    return names


def _image_size_of(path: str) -> Tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:  # header only
            w, h = im.size
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from e
    return h, w


def _open_capture(path: str):
    import cv2

    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        cap.release()
        raise ValueError(f"cannot open video file {path!r}: OpenCV could not open it (corrupt or unsupported codec)")
    return cap


class VideoFrames:
    """An opened video source: size and frame count known, frames read on demand.

    Attributes: ``kind`` ("video_file", "image_folder", "image", "pil_list" or "array"),
    ``image_size`` (R), ``video_height``/``video_width`` (the official ``orig_height``/``orig_width``),
    ``frame_count_hint`` (the container's frame count for video files, else the exact count).

    ``iter_frames(start, stop)`` yields (3, R, R) float16 frames on ``device``, each equal to the
    matching row of :func:`load_video`. Video files are decoded sequentially on each pass (frames
    before ``start`` are decoded and dropped); ``len()`` of a video file decodes it once to count.
    """

    def __init__(self, resource: Resource, image_size: int = 1008, device=None, video_unit_scale: bool = False):
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.image_size = int(image_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.video_unit_scale = bool(video_unit_scale)
        self._num_frames: Optional[int] = None
        self._paths: List[str] = []
        self._items = None

        if isinstance(resource, (str, os.PathLike)):
            self._open_path(os.fspath(resource))
        elif isinstance(resource, (np.ndarray, torch.Tensor)):
            self._open_array(resource)
        elif isinstance(resource, (list, tuple)):
            self._open_pil_list(resource)
        else:
            raise TypeError(
                "resource must be a path (video file, frame folder or image), a (T, H, W, 3) uint8 array "
                f"or a list of PIL images, got {type(resource).__name__}"
            )
        if self._num_frames is not None:
            self.frame_count_hint = self._num_frames
        if self.kind == "pil_list":
            lut = _lut_pil_list()
        elif self.kind in ("video_file", "array") and not self.video_unit_scale:
            lut = _lut_cv2_official()
        else:
            lut = _lut_unit()
        self._lut = lut.to(self.device)

    # -- opening ---------------------------------------------------------------------------------

    def _open_path(self, path: str) -> None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"video resource not found: {path!r}")
        ext = os.path.splitext(path)[-1].lower()
        if os.path.isdir(path):
            self.kind = "image_folder"
            names = _sorted_frame_names(path)
            if not names:
                raise ValueError(
                    f"no frames found in folder {path!r}: expected image files named <frame_index><ext> "
                    f"with ext in {IMAGE_EXTS}"
                )
            self._paths = [os.path.join(path, n) for n in names]
            self._num_frames = len(self._paths)
            # The official loop keeps the size of the last frame it read.
            self.video_height, self.video_width = _image_size_of(self._paths[-1])
        elif ext in IMAGE_EXTS:
            self.kind = "image"
            self._paths = [path]
            self._num_frames = 1
            self.video_height, self.video_width = _image_size_of(path)
        elif ext in VIDEO_EXTS:
            import cv2

            self.kind = "video_file"
            self._paths = [path]
            cap = _open_capture(path)
            try:
                # Official sizes come from the container metadata, not the decoded frames.
                self.video_height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
                self.video_width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
                self.frame_count_hint = max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
                ok, _ = cap.read()
            finally:
                cap.release()
            if not ok:
                raise ValueError(f"video file {path!r} has no decodable frames")
        else:
            raise ValueError(
                f"unsupported resource {path!r}: expected a frame folder, an image ({', '.join(IMAGE_EXTS)}) "
                f"or a video file ({', '.join(VIDEO_EXTS)})"
            )

    def _open_array(self, arr) -> None:
        self.kind = "array"
        if isinstance(arr, torch.Tensor):
            if arr.dtype != torch.uint8:
                raise ValueError(f"frame array must be uint8 RGB, got dtype {arr.dtype}")
            arr = arr.detach().cpu().numpy()
        if arr.dtype != np.uint8:
            raise ValueError(f"frame array must be uint8 RGB, got dtype {arr.dtype}")
        if arr.ndim != 4 or arr.shape[3] != 3:
            raise ValueError(f"frame array must have shape (T, H, W, 3) (RGB), got {tuple(arr.shape)}")
        if 0 in arr.shape:
            raise ValueError(f"frame array is empty: shape {tuple(arr.shape)}")
        self._items = arr
        self._num_frames = arr.shape[0]
        self.video_height, self.video_width = int(arr.shape[1]), int(arr.shape[2])

    def _open_pil_list(self, images) -> None:
        from PIL import Image

        self.kind = "pil_list"
        if len(images) == 0:
            raise ValueError("the list of frames is empty")
        bad = [type(im).__name__ for im in images if not isinstance(im, Image.Image)]
        if bad:
            raise TypeError(f"a list resource must hold PIL images only, got {bad[0]}")
        self._items = list(images)
        self._num_frames = len(self._items)
        self.video_width, self.video_height = self._items[0].size

    # -- reading ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        if self._num_frames is None:  # video file: container counts can be wrong, decode to count
            cap = _open_capture(self._paths[0])
            n = 0
            try:
                while cap.grab():
                    n += 1
            finally:
                cap.release()
            self._num_frames = n
        return self._num_frames

    @property
    def num_frames(self) -> int:
        return len(self)

    def _resized_uint8(self, start: int, stop: Optional[int]) -> Iterator[np.ndarray]:
        """Frames ``start`` .. ``stop - 1`` resized to (R, R, 3) uint8 RGB, on the CPU."""
        if start < 0 or (stop is not None and stop < start):
            raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
        if self.kind == "video_file":
            import cv2

            cap = _open_capture(self._paths[0])
            try:
                for _ in range(start):
                    if not cap.grab():
                        return
                i = start
                while stop is None or i < stop:
                    ok, bgr = cap.read()
                    if not ok:
                        return
                    yield _cv2_resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self.image_size)
                    i += 1
            finally:
                cap.release()
            return
        stop = self._num_frames if stop is None else min(stop, self._num_frames)
        for i in range(start, stop):
            if self.kind == "array":
                yield _cv2_resize(self._items[i], self.image_size)
            elif self.kind == "pil_list":
                yield _pil_resize(self._items[i], self.image_size)
            else:
                yield _image_file_resize(self._paths[i], self.image_size)

    def iter_frames(self, start: int = 0, stop: Optional[int] = None) -> Iterator[torch.Tensor]:
        """Frames ``start`` .. ``stop - 1`` (clipped to the clip) as (3, R, R) float16 on ``self.device``."""
        for rgb in self._resized_uint8(start, stop):
            yield _apply_lut(rgb, self._lut)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.iter_frames()

    def frame(self, index: int) -> torch.Tensor:
        """One (3, R, R) float16 frame on ``self.device`` (a video file is decoded up to it)."""
        n = self._num_frames
        if index < 0 or (n is not None and index >= n):
            raise IndexError(f"frame index {index} out of range for {n} frames")
        for f in self.iter_frames(index, index + 1):
            return f
        raise IndexError(f"frame index {index} out of range for video file {self._paths[0]!r}")

    def load(self) -> torch.Tensor:
        """All frames, (T, 3, R, R) float16 on ``self.device``."""
        if self._num_frames is not None:
            out = torch.empty(
                self._num_frames, 3, self.image_size, self.image_size, dtype=torch.float16, device=self.device
            )
            for i, f in enumerate(self.iter_frames()):
                out[i] = f
            return out
        # Video file: the container's count is a hint (it can be wrong); fill that much, then adapt.
        out = torch.empty(
            max(self.frame_count_hint, 1), 3, self.image_size, self.image_size, dtype=torch.float16, device=self.device
        )
        extra, n = [], 0
        for f in self.iter_frames():
            if n < out.shape[0]:
                out[n] = f
            else:
                extra.append(f)
            n += 1
        if n == 0:  # the file changed since it was opened
            raise ValueError(f"video file {self._paths[0]!r} has no decodable frames")
        self._num_frames = n
        if extra:
            return torch.cat([out, torch.stack(extra)])
        return out if n == out.shape[0] else out[:n].clone()

    def __repr__(self) -> str:
        n = self._num_frames if self._num_frames is not None else f"~{self.frame_count_hint}"
        return (
            f"VideoFrames(kind={self.kind!r}, frames={n}, video={self.video_height}x{self.video_width}, "
            f"image_size={self.image_size}, device={self.device})"
        )


class FrameStore:
    """Every frame of a clip decoded once into host memory and handed to the device one frame at a
    time, so device memory does not grow with the video (the official loaders put all T frames on
    the GPU as (T, 3, R, R) float16: 6.1 MB a frame at R = 1008).

    Host side: (T, R, R, 3) uint8, resized exactly as the official loader resizes (3 B/pixel, half
    of the official float16 store; pinned when ``device`` is CUDA so copies are asynchronous).
    ``store[i]`` is frame i as (3, R, R) ``dtype`` on ``device``: the normalisation is a (3, 256)
    per-channel table applied on the device, so values equal those of :func:`load_video` bit for
    bit. The device keeps the ``cache_size`` frames asked for last; on CUDA the next frame in the
    direction of travel is copied and normalised ahead on a side stream (decode and copy overlap
    the model's work on the current frame). ``len``, ``shape``, ``dtype`` and ``device`` are those
    of the (T, 3, R, R) tensor it stands for; ``host_bytes``/``device_bytes`` say what it holds.
    """

    def __init__(self, frames_uint8: torch.Tensor, lut: torch.Tensor, device=None, cache_size: int = 2):
        if frames_uint8.dtype != torch.uint8 or frames_uint8.dim() != 4 or frames_uint8.shape[-1] != 3:
            raise ValueError(f"FrameStore needs (T, R, R, 3) uint8 frames, got {frames_uint8.dtype} "
                             f"{tuple(frames_uint8.shape)}")
        if frames_uint8.shape[0] == 0:
            raise ValueError("FrameStore needs at least one frame")
        if lut.shape != (3, 256):
            raise ValueError(f"FrameStore needs a (3, 256) per-channel table, got {tuple(lut.shape)}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._host = frames_uint8
        self._lut = lut.to(self.device).reshape(-1).contiguous()
        self._chan = torch.arange(0, 768, 256, dtype=torch.int32, device=self.device)[:, None, None]
        self.cache_size = int(cache_size)
        self._cache: "OrderedDict[int, Tuple[torch.Tensor, object]]" = OrderedDict()
        self._last: Optional[int] = None
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        # background decoding (from_frames_background): frames [0, _ready) are in the host buffer
        self._ready = frames_uint8.shape[0]
        self._error: Optional[BaseException] = None
        self._cond: Optional[threading.Condition] = None
        self._stop = False

    @classmethod
    def from_frames(cls, frames: Iterator[np.ndarray], count_hint: int, lut: torch.Tensor, device=None,
                    cache_size: int = 2) -> "FrameStore":
        """Fill from (R, R, 3) uint8 arrays; ``count_hint`` preallocates (a video container's count
        may be wrong either way: the store is trimmed or grown to what was decoded)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        pin = device.type == "cuda"
        host, n, extra = None, 0, []
        for rgb in frames:
            if host is None:
                host = torch.empty((max(count_hint, 1),) + tuple(rgb.shape), dtype=torch.uint8, pin_memory=pin)
            if n < host.shape[0]:
                host[n] = torch.from_numpy(rgb)
            else:
                extra.append(torch.from_numpy(rgb))
            n += 1
        if host is None:
            raise ValueError("no frames could be decoded")
        if extra:
            host = torch.cat([host, torch.stack(extra)])
            host = host.pin_memory() if pin else host
        elif n < host.shape[0]:
            host = host[:n]
        return cls(host, lut, device, cache_size)

    @classmethod
    def from_frames_background(cls, frames: Iterator[np.ndarray], count: int, size: Tuple[int, int],
                               lut: torch.Tensor, device=None, cache_size: int = 2,
                               name: str = "frames") -> "FrameStore":
        """A store of exactly ``count`` (R, R, 3) frames filled by a background thread in order,
        returned at once: ``store[i]`` waits until frame i is decoded, so decoding overlaps the
        work on the frames before it (and a session starts without waiting for the whole video).
        A frame that fails to decode raises ValueError when it is asked for (and for every frame
        after it), naming the cause; :meth:`close` stops the thread."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if count < 1:
            raise ValueError("FrameStore needs at least one frame")
        host = torch.empty((count, size[0], size[1], 3), dtype=torch.uint8, pin_memory=device.type == "cuda")
        store = cls(host, lut, device, cache_size)
        store._ready = 0
        store._cond = threading.Condition()

        def fill():
            done = 0
            try:
                # the buffer made under inference_mode (as in init_state) takes writes only in that
                # mode, which is per thread
                with torch.inference_mode(host.is_inference()):
                    for rgb in frames:
                        if store._stop or done == count:
                            break
                        host[done] = torch.from_numpy(rgb)
                        done += 1
                        with store._cond:
                            store._ready = done
                            store._cond.notify_all()
                if done < count and not store._stop:
                    raise ValueError(f"only {done} of {count} {name} could be decoded")
            except BaseException as e:  # handed to the reader of the frame that failed
                with store._cond:
                    store._error = e
                    store._cond.notify_all()

        threading.Thread(target=fill, name="sam3fast-frame-decode", daemon=True).start()
        return store

    def _wait_decoded(self, index: int) -> None:
        if index < self._ready:
            return
        with self._cond:
            while index >= self._ready and self._error is None:
                self._cond.wait()
            if index >= self._ready:
                raise ValueError(f"frame {index} could not be decoded: {self._error}") from self._error

    def wait_all(self) -> "FrameStore":
        """Block until every frame is decoded (raises as ``store[i]`` would)."""
        self._wait_decoded(len(self) - 1)
        return self

    def close(self) -> None:
        """Stop a background decode (frames not yet decoded can no longer be read)."""
        self._stop = True

    def __len__(self) -> int:
        return self._host.shape[0]

    @property
    def shape(self) -> torch.Size:
        T, R, C, _ = self._host.shape
        return torch.Size((T, 3, R, C))

    @property
    def dtype(self) -> torch.dtype:
        return self._lut.dtype

    @property
    def host_bytes(self) -> int:
        return self._host.numel()

    @property
    def device_bytes(self) -> int:
        return sum(f.numel() * f.element_size() for f, _ in self._cache.values())

    def _convert(self, index: int) -> torch.Tensor:
        x = self._host[index].to(self.device, non_blocking=True).permute(2, 0, 1).int() + self._chan
        return self._lut.index_select(0, x.reshape(-1)).view(3, *self._host.shape[1:3])

    def _fetch(self, index: int, ahead: bool):
        if ahead and index >= self._ready:
            return None  # not decoded yet: no prefetch (never wait for it here)
        self._wait_decoded(index)
        if self._stream is None or not ahead:
            return self._convert(index), None
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the LUT and earlier work
        with torch.cuda.stream(self._stream):
            frame = self._convert(index)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return frame, ready

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = int(index)
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"frames are indexed by one int, got {type(index).__name__}")
        T = len(self)
        index = int(index)
        if index < 0:
            index += T
        if not 0 <= index < T:
            raise IndexError(f"frame index {index} out of range for {T} frames")
        hit = self._cache.pop(index, None)
        if hit is None:
            frame, ready = self._fetch(index, ahead=False)
        else:
            frame, ready = hit
            SideStream.adopt(frame, ready, self.device)  # (made on the side stream: before the caller's work)
        self._cache[index] = (frame, None)
        step = 0 if self._last is None else index - self._last
        self._last = index
        if step in (1, -1) and 0 <= index + step < T and index + step not in self._cache:
            ahead = self._fetch(index + step, ahead=True)
            if ahead is not None:
                self._cache[index + step] = ahead
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return frame

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        T, R, C, _ = self._host.shape
        return (f"FrameStore(frames={T}, size={R}x{C}, host={self.host_bytes / 2**20:.1f} MiB uint8, "
                f"device={self.device}, cache_size={self.cache_size})")


def open_frame_store(resource: Resource, image_size: int = 1008, device=None, *, video_unit_scale: bool = False,
                     cache_size: int = 2, background: bool = False) -> Tuple[FrameStore, int, int]:
    """``resource`` (see :func:`load_video`) decoded into a :class:`FrameStore`: returns ``(store,
    video_height, video_width)``; ``store[i]`` equals ``load_video(resource, ...)[0][i]``.

    ``background``: return at once and decode in a background thread
    (:meth:`FrameStore.from_frames_background`) where the frame count is exact before decoding
    (frame folders, images, arrays, PIL lists); a video file's container count can be wrong, so it
    is decoded before returning either way."""
    v = open_video(resource, image_size, device, video_unit_scale=video_unit_scale)
    lut = v._lut.reshape(1, 256).expand(3, 256)
    if background and v.kind != "video_file":
        name = "frames of " + (repr(resource) if isinstance(resource, (str, os.PathLike)) else f"the {v.kind}")
        store = FrameStore.from_frames_background(v._resized_uint8(0, None), len(v), (v.image_size, v.image_size),
                                                  lut, v.device, cache_size, name=name)
        return store, v.video_height, v.video_width
    try:
        store = FrameStore.from_frames(v._resized_uint8(0, None), v.frame_count_hint, lut, v.device, cache_size)
    except ValueError:
        raise ValueError(f"no decodable frames in {resource if isinstance(resource, str) else v.kind}") from None
    return store, v.video_height, v.video_width


def open_video(
    resource: Resource, image_size: int = 1008, device=None, *, video_unit_scale: bool = False
) -> VideoFrames:
    """Open ``resource`` for streaming; see :class:`VideoFrames`. Bad input raises here:
    FileNotFoundError (missing path), ValueError (unsupported extension, empty folder, unreadable video,
    wrong array dtype/shape), TypeError (unsupported resource type)."""
    return VideoFrames(resource, image_size, device, video_unit_scale)


def load_video(
    resource: Resource, image_size: int = 1008, device=None, *, video_unit_scale: bool = False
) -> Tuple[torch.Tensor, int, int]:
    """Load every frame as the official ``load_resource_as_video_frames`` does.

    resource: a video file path (.mp4 .mov .avi .mkv .webm), a folder of ``<frame_index>.<ext>`` images,
    an image file path, a list of PIL images, or a (T, H, W, 3) uint8 RGB numpy array / tensor.
    Returns ``(frames, video_height, video_width)`` with frames (T, 3, R, R) float16 on ``device``
    (CPU by default).
    """
    v = open_video(resource, image_size, device, video_unit_scale=video_unit_scale)
    return v.load(), v.video_height, v.video_width


# ----------------------------------------------------------------------------------------------
# The tracker's own loader (SAM 2 style)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TRACKER_JPG_EXTS = (".jpg", ".jpeg", ".JPG", ".JPEG")  # case-sensitive, as the official


def _apply_channel_lut(rgb: np.ndarray, lut: torch.Tensor) -> torch.Tensor:
    """(R, R, 3) uint8 RGB on the CPU -> (3, R, R) ``lut.dtype`` on ``lut.device``; lut is (3, 256)."""
    r, c = rgb.shape[:2]
    x = torch.from_numpy(rgb).to(lut.device).permute(2, 0, 1).int()
    x = x + torch.arange(0, 768, 256, dtype=torch.int32, device=lut.device)[:, None, None]
    return lut.reshape(-1).index_select(0, x.reshape(-1)).view(3, r, c)


def load_video_frames(
    video_path,
    image_size: int,
    offload_video_to_cpu: bool,
    img_mean=IMAGENET_MEAN,
    img_std=IMAGENET_STD,
    async_loading_frames: bool = False,
    compute_device=torch.device("cuda"),
) -> Tuple[torch.Tensor, int, int]:
    """``sam3/model/utils/sam2_utils.py`` ``load_video_frames``: what the official
    ``Sam3TrackerPredictor.init_state(video_path=...)`` loads (not the SAM 3 video model's loader).

    Note the official defaults: **ImageNet mean/std** (the SAM 3 backbone is trained with 0.5/0.5;
    ``init_state`` does not pass them) and **float32** frames.

    - folder: only ``.jpg .jpeg .JPG .JPEG`` files, which must all be named ``<frame_index>.<ext>``
      (no lexicographic fallback here); PIL ``BICUBIC`` (``Image.resize`` default) to R x R; values
      (f32(u / 255.0 in float64) - mean) / std in float32, mean/std as float32. Bit-exact. Size: last frame.
    - ``.mp4``/``.MP4`` file: the official decodes and resizes with decord (not installed, not a sam3
      dependency); here OpenCV decodes and ``INTER_CUBIC`` resizes, then (f32(u) / 255 - mean) / std
      as the official. Not bit-exact (the resize kernel differs). Size: the first decoded frame.

    ``async_loading_frames`` is accepted and ignored (frames are loaded eagerly; the official async path
    would hold float64 frames). Returns ``(frames (T, 3, R, R) float32, video_height, video_width)``, on
    the CPU if ``offload_video_to_cpu`` else on ``compute_device``.
    """
    if isinstance(video_path, bytes):
        raise NotImplementedError("video bytes need decord in the official loader; write them to an .mp4 file")
    if not isinstance(video_path, (str, os.PathLike)):
        raise TypeError(f"video_path must be a path, got {type(video_path).__name__}")
    video_path = os.fspath(video_path)
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not os.path.exists(video_path):
        raise FileNotFoundError(f"video resource not found: {video_path!r}")
    device = torch.device("cpu") if offload_video_to_cpu else torch.device(compute_device)
    mean = torch.tensor(img_mean, dtype=torch.float32)[:, None]
    std = torch.tensor(img_std, dtype=torch.float32)[:, None]
    u = np.arange(256, dtype=np.uint8)

    if os.path.splitext(video_path)[-1] in (".mp4", ".MP4"):
        import cv2

        lut = ((torch.from_numpy(u).float() / 255.0 - mean) / std).to(device)
        cap = _open_capture(video_path)
        frames, size = [], None
        try:
            while True:
                ok, bgr = cap.read()
                if not ok:
                    break
                size = size or bgr.shape[:2]
                frames.append(_apply_channel_lut(_cv2_resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), image_size), lut))
        finally:
            cap.release()
        if not frames:
            raise ValueError(f"video file {video_path!r} has no decodable frames")
        return torch.stack(frames), int(size[0]), int(size[1])

    if not os.path.isdir(video_path):
        raise ValueError(f"unsupported resource {video_path!r}: the tracker loader takes an .mp4 file or a JPEG folder")
    names = [p for p in os.listdir(video_path) if os.path.splitext(p)[-1] in _TRACKER_JPG_EXTS]
    try:
        names.sort(key=lambda p: int(os.path.splitext(p)[0]))
    except ValueError:
        raise ValueError(
            f"JPEG frames in {video_path!r} must be named <frame_index>.jpg, got e.g. {sorted(names)[:3]}"
        ) from None
    if not names:
        raise ValueError(f"no JPEG frames (.jpg/.jpeg) found in folder {video_path!r}")
    paths = [os.path.join(video_path, n) for n in names]
    # numpy float64 u / 255.0, stored into a float32 tensor, then float32 (x - mean) / std.
    lut = ((torch.from_numpy(u / 255.0).float() - mean) / std).to(device)
    out = torch.empty(len(paths), 3, image_size, image_size, dtype=torch.float32, device=device)
    from PIL import Image

    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image {p!r}: {e}") from e
        out[i] = _apply_channel_lut(_pil_resize(im, image_size), lut)
    video_height, video_width = im.height, im.width  # the official keeps the last frame's size
    return out, video_height, video_width
