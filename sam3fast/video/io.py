"""Video frame loading, bit-exact with the official ``sam3.model.io_utils`` loaders.

Every source becomes frames of shape (T, 3, R, R) float16 (R = model resolution, 1008 for SAM 3)
plus the original ``(video_height, video_width)``, the values the official ``init_state`` /
``start_session`` puts in ``input_batch.img_batch``. The official code uses a different recipe per
source, and each is reproduced here (u = the resized uint8 pixel, N(x) = (x - 0.5) / 0.5):

===================  ===============================  =========================================
source               resize (uint8 -> R x R)          values stored
===================  ===============================  =========================================
video file (.mp4..)  OpenCV decode, BGR->RGB,         N(u) = 2u - 1 in [-1, 509]: sam3 0.1.4
                     ``cv2.INTER_CUBIC``              has **no /255** on this path (upstream
                                                      issue #493); official dtype float32, but
                                                      the values are integers so float16 is exact
folder of frames     PIL ``BILINEAR`` (torchvision    f16(N(f16(u / 255 in f32))), the N in f16
single image file    ``TF.resize`` default)           same
list of PIL images   PIL ``BICUBIC`` (``Image.resize``  f16(N(f16(u / 255 in f64))), the N in f16
                     default)
(T, H, W, 3) uint8   as a video file (sam3fast        as a video file, so an array of the RGB
array (extension)    extension: RGB, INTER_CUBIC)     frames OpenCV decodes equals the file
===================  ===============================  =========================================

``video_unit_scale=True`` adds the missing /255 on the two OpenCV paths (video files, arrays) with the
folder recipe; it departs from the official numbers and is off by default.

Normalisation always runs on the CPU and frames are then copied to ``device``: CUDA divides by a
scalar as a multiply by its reciprocal, which would change the last bit of u / 255.

``load_video`` returns the whole clip; ``open_video`` returns a :class:`VideoFrames` that reads and
yields one (3, R, R) frame at a time with the same values, for clips too long to hold.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

# Same lists as the official io_utils (matched lower-cased).
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tiff", ".webp")
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm")

_HALF = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float16)[:, None, None]  # official mean == std

Resource = Union[str, os.PathLike, np.ndarray, torch.Tensor, Sequence]


# ----------------------------------------------------------------------------------------------
# Per-frame recipes (uint8 RGB HWC at R x R -> (3, R, R) float16 on CPU)


def _normalize_unit(rgb: np.ndarray) -> torch.Tensor:
    # torchvision to_tensor (float32 true division by 255), then the float16 in-place N of the
    # folder/image loaders.
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255).half()
    return (x - _HALF) / _HALF


def _normalize_cv2_official(rgb: np.ndarray) -> torch.Tensor:
    # float32 N on 0..255 gives the integers 2u - 1, exact in float16.
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()
    return ((x - 0.5) / 0.5).half()


def _cv2_frame(rgb: np.ndarray, image_size: int, unit_scale: bool) -> torch.Tensor:
    import cv2

    rgb = cv2.resize(np.ascontiguousarray(rgb), (image_size, image_size), interpolation=cv2.INTER_CUBIC)
    return _normalize_unit(rgb) if unit_scale else _normalize_cv2_official(rgb)


def _image_file_frame(path: str, image_size: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read image {path!r}: {e}") from e
    rgb = np.asarray(im.resize((image_size, image_size), Image.Resampling.BILINEAR))
    return _normalize_unit(rgb)


def _pil_frame(img, image_size: int) -> torch.Tensor:
    from PIL import Image

    rgb = np.asarray(img.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC))
    # float64 / 255 straight to float16, as the official list path does (no float32 step).
    x = torch.from_numpy(rgb / 255.0).permute(2, 0, 1).to(torch.float16)
    return (x - _HALF) / _HALF


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

    def _frame_cpu(self, i: int) -> torch.Tensor:
        if self.kind in ("image_folder", "image"):
            return _image_file_frame(self._paths[i], self.image_size)
        if self.kind == "pil_list":
            return _pil_frame(self._items[i], self.image_size)
        return _cv2_frame(self._items[i], self.image_size, self.video_unit_scale)  # array

    def _iter_video_file(self, start: int, stop: Optional[int]) -> Iterator[torch.Tensor]:
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
                yield _cv2_frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self.image_size, self.video_unit_scale)
                i += 1
        finally:
            cap.release()

    def iter_frames_cpu(self, start: int = 0, stop: Optional[int] = None) -> Iterator[torch.Tensor]:
        """Frames ``start`` .. ``stop - 1`` as (3, R, R) float16 CPU tensors."""
        if start < 0 or (stop is not None and stop < start):
            raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
        if self.kind == "video_file":
            yield from self._iter_video_file(start, stop)
            return
        stop = self._num_frames if stop is None else min(stop, self._num_frames)
        for i in range(start, stop):
            yield self._frame_cpu(i)

    def iter_frames(self, start: int = 0, stop: Optional[int] = None) -> Iterator[torch.Tensor]:
        """Frames ``start`` .. ``stop - 1`` as (3, R, R) float16 tensors on ``self.device``."""
        for f in self.iter_frames_cpu(start, stop):
            yield f.to(self.device, non_blocking=True) if self.device.type != "cpu" else f

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
            out = torch.empty(self._num_frames, 3, self.image_size, self.image_size, dtype=torch.float16)
            for i, f in enumerate(self.iter_frames_cpu()):
                out[i] = f
        else:
            frames = list(self.iter_frames_cpu())
            if not frames:  # the file changed since it was opened
                raise ValueError(f"video file {self._paths[0]!r} has no decodable frames")
            out = torch.stack(frames)
            self._num_frames = len(frames)
        return out.to(self.device) if self.device.type != "cpu" else out

    def __repr__(self) -> str:
        n = self._num_frames if self._num_frames is not None else f"~{self.frame_count_hint}"
        return (
            f"VideoFrames(kind={self.kind!r}, frames={n}, video={self.video_height}x{self.video_width}, "
            f"image_size={self.image_size}, device={self.device})"
        )


def open_video(resource: Resource, image_size: int = 1008, device=None, *, video_unit_scale: bool = False) -> VideoFrames:
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
