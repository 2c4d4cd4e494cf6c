"""sam3fast.video.io against the official ``sam3.model.io_utils`` loaders: bit-exact frames and sizes
for every source, the streaming reader equal to the batch loader, and clear errors on bad input."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from official_ref import official
from sam3fast.video.io import IMAGENET_MEAN, IMAGENET_STD, VideoFrames, load_video, load_video_frames, open_video

T, H, W = 5, 40, 56
FOLDER_INDICES = [0, 1, 2, 10, 11]  # numeric order differs from lexicographic ("10" < "2")


def _official_io():
    official()
    from sam3.model import io_utils

    return io_utils


def _official_load(resource, image_size):
    return _official_io().load_resource_as_video_frames(resource, image_size, offload_video_to_cpu=True)


def _synthetic_frames(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    for t in range(T):
        base = np.stack([(xx * 4 + t * 20) % 256, (yy * 6 + t * 10) % 256, ((xx + yy) * 3 + t) % 256], -1)
        out.append(np.clip(base + rng.integers(-30, 30, (H, W, 3)), 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    frames = _synthetic_frames()
    mp4 = str(d / "clip.mp4")
    writer = cv2.VideoWriter(mp4, cv2.VideoWriter_fourcc(*"mp4v"), 10, (W, H))
    assert writer.isOpened()
    for f in frames:
        writer.write(np.ascontiguousarray(f[..., ::-1]))
    writer.release()

    folder = d / "frames"
    folder.mkdir()
    for i, f in zip(FOLDER_INDICES, frames):
        ext = "png" if i == 2 else "jpg"  # any IMAGE_EXTS file is a frame
        Image.fromarray(f).save(folder / f"{i}.{ext}")
    (folder / "notes.txt").write_text("not a frame")

    # What OpenCV decodes from the mp4 (lossy codec), as an RGB array.
    cap = cv2.VideoCapture(mp4)
    decoded = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        decoded.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return {
        "dir": d,
        "mp4": mp4,
        "folder": str(folder),
        "image": str(folder / "10.jpg"),
        "frames": frames,
        "decoded": np.stack(decoded),
    }


def _assert_same(ours, ours_h, ours_w, ref, ref_h, ref_w):
    assert ours.dtype == torch.float16
    assert ours.shape == ref.shape
    assert (ours_h, ours_w) == (ref_h, ref_w)
    # The official mp4 path returns float32 holding integers; float16 holds them exactly.
    assert torch.equal(ours.float(), ref.float())


# ----------------------------------------------------------------------------------------------
# Parity with the official loaders


@pytest.mark.parametrize("image_size", [112, 1008])
def test_video_file_matches_official(clip, image_size):
    ref, rh, rw = _official_io().load_video_frames_from_video_file_using_cv2(
        clip["mp4"], image_size, offload_video_to_cpu=True
    )
    ours, h, w = load_video(clip["mp4"], image_size)
    _assert_same(ours, h, w, ref, rh, rw)
    assert (h, w) == (H, W) and ours.shape[0] == T
    # sam3 0.1.4 skips the /255 on this path: values are 2u - 1.
    assert ours.min() == -1 and ours.max() > 300 and ours.float().std() > 50


@pytest.mark.parametrize("image_size", [112, 1008])
def test_image_folder_matches_official(clip, image_size):
    ref, rh, rw = _official_load(clip["folder"], image_size)
    ours, h, w = load_video(clip["folder"], image_size)
    _assert_same(ours, h, w, ref, rh, rw)
    assert -1 <= ours.min() < -0.5 and 0.5 < ours.max() <= 1
    # numeric order: frame 3 is "10.jpg"
    single, _, _ = load_video(clip["image"], image_size)
    assert torch.equal(ours[3], single[0])


def test_single_image_and_pil_list_match_official(clip):
    ref, rh, rw = _official_load(clip["image"], 112)
    ours, h, w = load_video(clip["image"], 112)
    _assert_same(ours, h, w, ref, rh, rw)
    assert ours.shape == (1, 3, 112, 112)

    pils = [Image.fromarray(f) for f in clip["frames"]]
    ref, rh, rw = _official_load(pils, 112)
    ours, h, w = load_video(pils, 112)
    _assert_same(ours, h, w, ref, rh, rw)


def test_array_equals_video_file(clip):
    """The (T, H, W, 3) array extension uses the video-file recipe: the RGB frames OpenCV decodes give
    the official mp4 tensor."""
    ref, rh, rw = _official_io().load_video_frames_from_video_file_using_cv2(
        clip["mp4"], 112, offload_video_to_cpu=True
    )
    for arr in (clip["decoded"], torch.from_numpy(clip["decoded"])):
        ours, h, w = load_video(arr, 112)
        _assert_same(ours, h, w, ref, rh, rw)


def test_folder_size_from_last_frame_and_lexicographic_fallback(tmp_path):
    frames = _synthetic_frames(seed=1)
    for name, f in zip(["a", "b", "c"], frames):
        Image.fromarray(f).save(tmp_path / f"{name}.jpg")
    Image.fromarray(frames[3][:30, :20]).save(tmp_path / "d.jpg")  # last frame, another size
    Image.fromarray(frames[4]).save(tmp_path / "10.jpg")  # non-numeric names -> lexicographic
    ref, rh, rw = _official_load(str(tmp_path), 112)
    with pytest.warns(UserWarning, match="lexicographic"):
        ours, h, w = load_video(str(tmp_path), 112)
    _assert_same(ours, h, w, ref, rh, rw)
    assert (h, w) == (30, 20)  # the official loop keeps the last frame's size


def test_video_unit_scale(clip):
    ours, _, _ = load_video(clip["mp4"], 112, video_unit_scale=True)
    official_u, _, _ = load_video(clip["mp4"], 112)
    u = (official_u.float() + 1) / 2  # the resized uint8 pixels
    half = torch.tensor(0.5, dtype=torch.float16)
    expected = (u.div(255).half() - half) / half
    assert torch.equal(ours, expected)
    arr, _, _ = load_video(clip["decoded"], 112, video_unit_scale=True)
    assert torch.equal(arr, ours)


def test_every_pixel_value_matches_official(tmp_path):
    """A 16x16 PNG holding each of the 256 values once per channel, loaded at R = 16 (an identity
    resize): every entry of the folder/image/PIL-list value tables against the official loaders."""
    rng = np.random.default_rng(2)
    chans = [np.arange(256), np.arange(256)[::-1], rng.permutation(256)]
    img = np.stack([c.reshape(16, 16) for c in chans], -1).astype(np.uint8)
    (tmp_path / "frames").mkdir()
    Image.fromarray(img).save(tmp_path / "frames" / "0.png")
    half = torch.tensor(0.5, dtype=torch.float16)
    u = torch.from_numpy(img).permute(2, 0, 1)
    for res in (str(tmp_path / "frames"), str(tmp_path / "frames" / "0.png"), [Image.fromarray(img)]):
        ref, rh, rw = _official_load(res, 16)
        ours, h, w = load_video(res, 16)
        _assert_same(ours, h, w, ref, rh, rw)
        assert torch.equal(ours[0], (u.float().div(255).half() - half) / half)  # all 256 values covered
    # OpenCV paths: the official float32 N of 0..255 without /255.
    arr, _, _ = load_video(img[None], 16)
    assert torch.equal(arr[0].float(), u.float() * 2 - 1)


# ----------------------------------------------------------------------------------------------
# Streaming


@pytest.mark.parametrize("source", ["mp4", "folder", "image", "decoded", "pil"])
def test_streaming_equals_batch(clip, source):
    res = [Image.fromarray(f) for f in clip["frames"]] if source == "pil" else clip[source]
    full, h, w = load_video(res, 112)
    v = open_video(res, 112)
    assert isinstance(v, VideoFrames)
    assert (v.video_height, v.video_width) == (h, w)
    streamed = list(v)
    assert all(f.shape == (3, 112, 112) and f.dtype == torch.float16 for f in streamed)
    assert torch.equal(torch.stack(streamed), full)
    assert len(v) == v.num_frames == full.shape[0]
    if full.shape[0] > 3:
        assert torch.equal(torch.stack(list(v.iter_frames(2, 4))), full[2:4])
        assert torch.equal(v.frame(3), full[3])
        assert list(v.iter_frames(full.shape[0] + 2)) == []
    with pytest.raises(IndexError):
        v.frame(full.shape[0])


def test_video_file_frame_count_hint(clip):
    full, _, _ = load_video(clip["mp4"], 112)
    v = open_video(clip["mp4"], 112)
    assert v.kind == "video_file" and v.frame_count_hint == T
    assert "video_file" in repr(v)
    for wrong_hint in (0, 2, T + 4):  # container counts can be wrong: load() must not trust them
        v = open_video(clip["mp4"], 112)
        v.frame_count_hint = wrong_hint
        assert torch.equal(v.load(), full) and len(v) == T


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_output_equals_cpu(clip):
    for res in (clip["mp4"], clip["folder"]):
        cpu, _, _ = load_video(res, 112)
        gpu, _, _ = load_video(res, 112, device="cuda")
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
        assert torch.equal(torch.stack(list(open_video(res, 112, "cuda"))).cpu(), cpu)


# ----------------------------------------------------------------------------------------------
# The tracker's SAM 2-style loader (sam3/model/utils/sam2_utils.py)


def test_tracker_loader_jpeg_folder_matches_official(clip, tmp_path):
    official()
    from sam3.model.utils import sam2_utils

    gy, gx = np.meshgrid(np.arange(16) * 16, np.arange(16) * 16, indexing="ij")
    grad = np.stack([gy, gx, np.full((16, 16), 77)], -1)
    (tmp_path / "g").mkdir()
    Image.fromarray(grad.astype(np.uint8)).save(tmp_path / "g" / "00000.jpg")
    Image.fromarray(clip["frames"][0][:30, :20]).save(tmp_path / "g" / "00001.JPEG")  # last frame sets the size
    cpu = torch.device("cpu")
    for folder, size in ((clip["folder"], 112), (str(tmp_path / "g"), 16)):
        for kw in ({}, dict(img_mean=(0.5, 0.5, 0.5), img_std=(0.5, 0.5, 0.5))):
            ref, rh, rw = sam2_utils.load_video_frames(
                folder, size, offload_video_to_cpu=True, compute_device=cpu, **kw
            )
            ours, h, w = load_video_frames(folder, size, offload_video_to_cpu=False, compute_device=cpu, **kw)
            assert ours.dtype == torch.float32 and (h, w) == (rh, rw)
            assert torch.equal(ours, ref)
    assert ours.shape[0] == 2 and (h, w) == (30, 20)


def test_tracker_loader_mp4_and_errors(clip, tmp_path):
    frames, h, w = load_video_frames(clip["mp4"], 112, offload_video_to_cpu=True)
    assert frames.dtype == torch.float32 and frames.shape == (T, 3, 112, 112) and (h, w) == (H, W)
    # Same OpenCV pixels as the video-model loader, with the decord path's arithmetic.
    u = (load_video(clip["mp4"], 112)[0].float() + 1) / 2
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.equal(frames, (u / 255.0 - mean) / std)

    (tmp_path / "named").mkdir()
    Image.fromarray(clip["frames"][0]).save(tmp_path / "named" / "frame_a.jpg")
    with pytest.raises(ValueError, match="<frame_index>.jpg"):
        load_video_frames(str(tmp_path / "named"), 112, True)
    (tmp_path / "pngs").mkdir()
    Image.fromarray(clip["frames"][0]).save(tmp_path / "pngs" / "0.png")
    with pytest.raises(ValueError, match="no JPEG frames"):
        load_video_frames(str(tmp_path / "pngs"), 112, True)
    with pytest.raises(FileNotFoundError):
        load_video_frames(str(tmp_path / "missing.mp4"), 112, True)
    with pytest.raises(ValueError, match="unsupported resource"):
        load_video_frames(clip["image"], 112, True)
    with pytest.raises(NotImplementedError):
        load_video_frames(b"\x00\x00", 112, True)


# ----------------------------------------------------------------------------------------------
# Bad input


def test_missing_paths(tmp_path):
    for p in (tmp_path / "nope.mp4", tmp_path / "nope.jpg", tmp_path / "nope_dir"):
        with pytest.raises(FileNotFoundError, match="not found"):
            load_video(str(p), 112)


def test_bad_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no frames found"):
        load_video(str(empty), 112)
    no_images = tmp_path / "no_images"
    no_images.mkdir()
    (no_images / "0.txt").write_text("x")
    (no_images / "1.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="no frames found"):
        open_video(no_images, 112)  # os.PathLike is accepted
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Image.fromarray(_synthetic_frames()[0]).save(corrupt / "0.jpg")
    (corrupt / "1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match="cannot read image"):
        load_video(str(corrupt), 112)


def test_bad_video_files(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(ValueError, match="cannot open video file"):
        load_video(str(garbage), 112)
    # OpenCV cannot open an mp4 with no frames; an .avi with none opens but decodes nothing.
    for ext, fourcc, match in (("mp4", "mp4v", "cannot open video file"), ("avi", "MJPG", "no decodable frames")):
        p = str(tmp_path / f"empty.{ext}")
        writer = cv2.VideoWriter(p, cv2.VideoWriter_fourcc(*fourcc), 10, (W, H))
        writer.release()
        with pytest.raises(ValueError, match=match):
            load_video(p, 112)


def test_unsupported_resources(tmp_path):
    for name in ("clip.gif", "notes.txt", "noext"):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(ValueError, match="unsupported resource"):
            load_video(str(tmp_path / name), 112)
    with pytest.raises(TypeError, match="resource must be"):
        load_video(42, 112)
    with pytest.raises(TypeError, match="PIL images only"):
        load_video([np.zeros((4, 4, 3), np.uint8)], 112)
    with pytest.raises(ValueError, match="empty"):
        load_video([], 112)
    with pytest.raises(ValueError, match="image_size"):
        load_video(_synthetic_frames(), 0)


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
        (torch.zeros(2, 8, 8, 3), "uint8"),
        (np.zeros((8, 8, 3), np.uint8), r"\(T, H, W, 3\)"),
        (np.zeros((2, 8, 8, 4), np.uint8), r"\(T, H, W, 3\)"),
        (np.zeros((2, 3, 8, 8), np.uint8), r"\(T, H, W, 3\)"),
        (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
    ],
)
def test_bad_arrays(arr, match):
    with pytest.raises(ValueError, match=match):
        load_video(arr, 112)


def test_no_warning_on_numbered_folder(clip):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_video(clip["folder"], 112)


# ---- FrameStore: frames on the host, one at a time on the device ----


def _sources(clip):
    return {"mp4": clip["mp4"], "folder": clip["folder"], "image": clip["image"], "array": clip["decoded"],
            "pil": [Image.fromarray(f) for f in clip["frames"]]}


@pytest.mark.parametrize("kind", ["mp4", "folder", "image", "array", "pil"])
def test_frame_store_equals_batch_loader(clip, kind):
    from sam3fast.video.io import open_frame_store

    res = _sources(clip)[kind]
    ref, rh, rw = load_video(res, 112)
    store, h, w = open_frame_store(res, 112)
    assert (h, w) == (rh, rw) and len(store) == ref.shape[0] and store.shape == ref.shape
    assert store.dtype == torch.float16 and store.host_bytes == ref.numel()  # uint8: half the float16 bytes
    order = list(range(len(store))) + list(range(len(store) - 1, -1, -1)) + [len(store) // 2, 0, -1]
    for i in order:  # forward, backward, jumps, a negative index
        assert torch.equal(store[i], ref[i]), i
    assert torch.equal(torch.stack(list(store)), ref)


def test_frame_store_device_cache_is_bounded(clip):
    from sam3fast.video.io import open_frame_store

    store, _, _ = open_frame_store(clip["folder"], 64, cache_size=2)
    one = store[0].numel() * 2
    for i in range(len(store)):
        store[i]
        assert store.device_bytes <= 2 * one
    assert len(store._cache) <= 2


def test_frame_store_bad_input(clip):
    from sam3fast.video.io import FrameStore, open_frame_store

    store, _, _ = open_frame_store(clip["folder"], 32)
    with pytest.raises(IndexError, match="out of range for 5 frames"):
        store[5]
    with pytest.raises(IndexError, match="out of range"):
        store[-6]
    with pytest.raises(TypeError, match="indexed by one int"):
        store[1:3]
    with pytest.raises(ValueError, match=r"\(T, R, R, 3\) uint8"):
        FrameStore(torch.zeros(2, 8, 8, 3), torch.zeros(3, 256))
    with pytest.raises(ValueError, match="per-channel table"):
        FrameStore(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.zeros(256))
    with pytest.raises(ValueError, match="at least one frame"):
        FrameStore(torch.zeros(0, 8, 8, 3, dtype=torch.uint8), torch.zeros(3, 256))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_frame_store_cuda_prefetch_matches(clip):
    """On CUDA the next frame is made ahead on a side stream; the values are the same and the
    device holds at most cache_size frames, whatever the clip length."""
    from sam3fast.video.io import open_frame_store

    ref, _, _ = load_video(clip["mp4"], 1008)
    store, _, _ = open_frame_store(clip["mp4"], 1008, device="cuda")
    assert store._host.is_pinned()
    for i in list(range(len(store))) + list(range(len(store) - 1, -1, -1)):
        f = store[i]
        f.add_(0)  # work on the caller's stream after the prefetch's event
        assert torch.equal(f.cpu(), ref[i])
        assert len(store._cache) <= store.cache_size


@pytest.mark.parametrize("async_loading", [False, True])
def test_sam2_frame_store_equals_tracker_loader(tmp_path, async_loading):
    """The tracker's JPEG-folder loader as a FrameStore gives its frames bit for bit (float32,
    ImageNet mean/std) and its size rule (the last frame, or the first with async loading)."""
    from sam3fast.video.tracker_predictor import load_video_frames as sam2_load
    from sam3fast.video.tracker_predictor import sam2_frame_store

    frames = _synthetic_frames(seed=3)
    for i, f in enumerate(frames):
        img = f if i < len(frames) - 1 else f[:30, :44]  # the last frame has another size
        Image.fromarray(img).save(tmp_path / f"{i}.jpg")
    ref, rh, rw = sam2_load(str(tmp_path), 64, offload_video_to_cpu=True, async_loading_frames=async_loading)
    store, h, w = sam2_frame_store(str(tmp_path), 64, async_loading_frames=async_loading)
    assert (h, w) == (rh, rw) == ((H, W) if async_loading else (30, 44))
    assert store.dtype == torch.float32 and store.shape == ref.shape
    for i in range(len(store)):
        assert torch.equal(store[i], ref[i]), i


@pytest.mark.parametrize("kind", ["folder", "array", "pil", "mp4"])
def test_frame_store_background_decode(clip, kind):
    """Decoding in a background thread gives the same frames (a video file, whose count is only
    known after decoding, is decoded up front either way)."""
    from sam3fast.video.io import open_frame_store

    res = _sources(clip)[kind]
    ref, rh, rw = load_video(res, 48)
    store, h, w = open_frame_store(res, 48, background=True)
    assert (h, w) == (rh, rw) and len(store) == ref.shape[0]
    for i in (0, len(store) - 1, 1, 2):
        assert torch.equal(store[i], ref[i]), i
    assert torch.equal(torch.stack(list(store.wait_all())), ref)


def test_frame_store_background_decode_error_names_the_frame(tmp_path):
    """A corrupt frame in a folder: the frames before it read fine, it and every later frame raise
    a ValueError naming the file (the session is not left hanging)."""
    from sam3fast.video.io import open_frame_store

    frames = _synthetic_frames(seed=4)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"{i}.jpg")
    (tmp_path / "2.jpg").write_bytes(b"not a jpeg")
    store, _, _ = open_frame_store(str(tmp_path), 32, background=True)
    assert len(store) == len(frames)
    store[0], store[1]
    for i in (2, 4):
        with pytest.raises(ValueError, match=r"frame %d could not be decoded: cannot read image .*2\.jpg" % i):
            store[i]
    with pytest.raises(ValueError, match="could not be decoded"):
        store.wait_all()
