"""Test-only helper: a small procedural video clip and writers in the official input formats.

The scene is a smooth colour-gradient background with 3 soft-edged coloured blobs moving on
straight lines: red enters from the left and is leaving through the right edge at the end, blue
starts inside and leaves through the left edge (red passes over it about a third of the way in),
yellow enters from the top a third of the way in and stays.
Positions are fractions of the frame, so any (height, width) gives the same motion.

Writers produce what ``Sam3VideoPredictor.start_session(resource_path=...)`` accepts: an ``.mp4``
file (OpenCV, ``mp4v`` fourcc, read back by the official cv2 loader) and a folder of
``<index>.jpg`` frames (the official folder naming, sorted by integer stem).

    python tests/video_clip.py OUT.mp4 [--frames 24 --height 240 --width 320]
"""

from __future__ import annotations

import os
from typing import List, Optional

import numpy as np

# (colour RGB, radius as a fraction of min(H, W), start (y, x), end (y, x), visible frame range as
# fractions of the clip); start/end may lie outside [0, 1] so blobs enter and leave.
_BLOBS = [
    ((230, 40, 40), 0.20, (0.55, -0.25), (0.50, 1.15), (0.0, 1.0)),
    ((40, 90, 230), 0.17, (0.42, 0.75), (0.40, -0.35), (0.0, 1.0)),
    ((240, 210, 30), 0.14, (-0.25, 0.25), (0.55, 0.20), (0.3, 1.0)),
]


def blob_tracks(num_frames: int = 24, seed: int = 0) -> np.ndarray:
    """Blob centres (T, 3, 2) as relative (x, y) in [0, 1] (outside when off-frame), NaN where a
    blob is not in the scene yet: where to click on a frame of :func:`make_clip`."""
    rng = np.random.default_rng(seed)
    rng.uniform(0, 2 * np.pi, size=3)  # background phases (same draw order as make_clip)
    jitter = rng.uniform(-0.05, 0.05, size=(len(_BLOBS), 2, 2))
    out = np.full((num_frames, len(_BLOBS), 2), np.nan)
    for t in range(num_frames):
        s = t / max(num_frames - 1, 1)
        for i, (_, _, start, end, (t0, t1)) in enumerate(_BLOBS):
            if not (t0 <= s <= t1):
                continue
            u = (s - t0) / max(t1 - t0, 1e-6)
            cy = (1 - u) * (start[0] + jitter[i, 0, 0]) + u * (end[0] + jitter[i, 1, 0])
            cx = (1 - u) * (start[1] + jitter[i, 0, 1]) + u * (end[1] + jitter[i, 1, 1])
            out[t, i] = (cx, cy)
    return out


def make_clip(num_frames: int = 24, height: int = 72, width: int = 96, seed: int = 0) -> np.ndarray:
    """uint8 frames (T, H, W, 3) RGB. ``seed`` jitters the background and the blob paths."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0.0, 1.0, height), np.linspace(0.0, 1.0, width), indexing="ij")
    phase = rng.uniform(0, 2 * np.pi, size=3)
    bg = np.stack(
        [
            90 + 50 * xx + 20 * np.sin(2 * np.pi * (0.7 * yy + 0.3 * xx) + phase[0]),
            110 + 40 * yy + 20 * np.sin(2 * np.pi * (0.5 * xx - 0.4 * yy) + phase[1]),
            100 + 30 * (1 - xx) + 15 * np.sin(2 * np.pi * (0.6 * xx + 0.6 * yy) + phase[2]),
        ],
        axis=-1,
    )
    centres = blob_tracks(num_frames, seed)
    scale = min(height, width)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        img = bg.copy()
        for i, (colour, radius, _, _, _) in enumerate(_BLOBS):
            cx, cy = centres[t, i]
            if np.isnan(cx):
                continue
            # slightly elliptic, soft edge over ~1.5 px so resizing does not alias
            dy, dx = (yy - cy) * height / scale, (xx - cx) * width / scale
            r = np.sqrt((dy / 1.15) ** 2 + dx**2) / radius
            alpha = np.clip((1.0 - r) * radius * scale / 1.5 + 0.5, 0.0, 1.0)[..., None]
            shade = 0.8 + 0.2 * np.clip(1.0 - r, 0.0, 1.0)[..., None]  # a little 3-D look
            img = img * (1 - alpha) + np.asarray(colour, dtype=np.float64) * shade * alpha
        frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return frames


def write_mp4(frames: np.ndarray, path: str, fps: float = 12.0) -> str:
    """Write RGB uint8 frames (T, H, W, 3) to ``path`` with OpenCV's ``mp4v`` codec."""
    import cv2

    t, h, w, _ = frames.shape
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV could not open {path} for writing")
    try:
        for f in frames:
            writer.write(np.ascontiguousarray(f[..., ::-1]))
    finally:
        writer.release()
    return path


def write_jpg_folder(frames: np.ndarray, folder: str, quality: int = 95) -> str:
    """Write frames as ``folder/<index>.jpg`` (0.jpg, 1.jpg, ...: the official folder naming)."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(os.path.join(folder, f"{i}.jpg"), quality=quality)
    return folder


def read_mp4(path: str) -> np.ndarray:
    """Decode an mp4 back to RGB uint8 (T, H, W, 3) with OpenCV (what the official loader sees)."""
    import cv2

    cap = cv2.VideoCapture(path)
    out: List[np.ndarray] = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(f[..., ::-1].copy())
    cap.release()
    return np.stack(out)


def main(argv: Optional[List[str]] = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    frames = make_clip(a.frames, a.height, a.width, a.seed)
    if a.out.endswith(".mp4"):
        write_mp4(frames, a.out)
    else:
        write_jpg_folder(frames, a.out)


if __name__ == "__main__":
    main()
