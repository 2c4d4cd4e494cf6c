"""The official plotting helpers the examples call (``sam3.visualization_utils``,
``sam3.model.box_ops``), run unchanged on sam3fast's outputs and on the official outputs of the
same example programs (replayed by the other ``test_example_*`` modules), with matplotlib's Agg
backend.

They must not raise, and must draw the same figures: the same axes, images (mask overlays as
RGBA arrays, each disagreeing on at most 0.1% of its pixels), rectangles within 0.5 px, the same
texts and point markers; the rendered canvases then differ on at most 0.5% of their pixels.

* image concepts: ``plot_results(img, state)`` after each prompt cell; the example's input helpers
  ``box_xywh_to_cxcywh``, ``normalize_bbox``, ``draw_box_on_image``;
* video predictor: ``load_frame``, ``prepare_masks_for_visualization`` and
  ``visualize_formatted_frame_output`` on the prompt outputs (with the clicks drawn) and on every
  propagation;
* SAM 2-style tracker: ``show_mask`` / ``show_points`` / ``show_box`` as the example calls them on
  the returned tensors and on its ``video_segments``.

The helpers need matplotlib, pandas and scikit-learn (imported by ``sam3.visualization_utils``);
without them this module is skipped.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("pandas")
pytest.importorskip("sklearn")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from official_ref import official  # noqa: E402
from official_video_ref import save_official_video_checkpoint  # noqa: E402
from test_example_image_concepts import (BOX_TOL_PX, CFG, EXAMPLE_BOX, IMAGE_H, IMAGE_W, MASK_FRAC, SCALE,  # noqa: E402
                                         flip_pixels, image_predictor_example, normalize_bbox, tiny_apis)
from test_example_image_concepts import _one_thread, tiny_checkpoint  # noqa: E402,F401 - fixtures
from test_example_sam2_tracker import HEIGHT as TRK_H, NUM_FRAMES as TRK_FRAMES, S, WIDTH as TRK_W  # noqa: E402
from test_example_sam2_tracker import sam2_task_example, tracker_apis  # noqa: E402
from test_example_video_predictor import (CLICK, NUM_FRAMES, REFINE_CLICKS, REFINE_LABELS, HEIGHT, WIDTH,  # noqa: E402
                                          frames_for_vis, video_apis, video_predictor_example)
from test_parity_image import _image  # noqa: E402
from test_video_parity import RICH_SEED, SIMPLE_SEED, _official_model  # noqa: E402
from video_clip import make_clip, write_jpg_folder  # noqa: E402

CANVAS_FRAC = 5e-3


@pytest.fixture(scope="module")
def vis():
    official()
    import sam3.visualization_utils as vis

    return vis


@pytest.fixture(scope="module", autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ----------------------------------------------------------------------------------------------
# Figures as comparable data


def figure_contents(fig):
    """Everything drawn on ``fig``: per axes its images (arrays), rectangles, texts, scatter
    offsets and colours, title; and the rendered canvas (H, W, 3) uint8."""
    fig.canvas.draw()
    canvas = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    axes = []
    for ax in fig.axes:
        axes.append({
            "title": ax.get_title(),
            "images": [np.asarray(im.get_array()) for im in ax.images],
            "rects": [(np.array([*p.get_xy(), p.get_width(), p.get_height()], np.float64), p.get_edgecolor())
                      for p in ax.patches],
            "texts": [t.get_text() for t in ax.texts],
            "scatter": [(np.asarray(c.get_offsets()), np.asarray(c.get_facecolor())) for c in ax.collections],
        })
    return {"axes": axes, "canvas": canvas}


def assert_figures_match(ref, got, where):
    assert len(got["axes"]) == len(ref["axes"]), where
    for i, (a, b) in enumerate(zip(ref["axes"], got["axes"])):
        w = f"{where} axes {i}"
        assert b["title"] == a["title"] and b["texts"] == a["texts"], (w, b["texts"], a["texts"])
        assert len(b["images"]) == len(a["images"]), w
        for j, (x, y) in enumerate(zip(a["images"], b["images"])):
            assert (y.shape, y.dtype) == (x.shape, x.dtype), (w, j)
            differ = np.abs(y.astype(np.float64) - x).reshape(x.shape[0], x.shape[1], -1).max(-1) > 1e-3
            assert differ.mean() <= MASK_FRAC, f"{w} image {j}: {differ.mean():.2%} of pixels differ"
        assert len(b["rects"]) == len(a["rects"]), w
        for (x, cx), (y, cy) in zip(a["rects"], b["rects"]):
            assert np.abs(y - x).max() <= BOX_TOL_PX and cy == cx, (w, x, y)
        assert len(b["scatter"]) == len(a["scatter"]), w
        for (x, cx), (y, cy) in zip(a["scatter"], b["scatter"]):
            assert np.array_equal(x, y) and np.array_equal(cx, cy), w
    diff = np.abs(got["canvas"].astype(int) - ref["canvas"]).max(-1) > 8
    assert got["canvas"].shape == ref["canvas"].shape and diff.mean() <= CANVAS_FRAC, \
        f"{where}: rendered figures differ on {diff.mean():.2%} of pixels"


def drawn(plot):
    """Run ``plot()`` (which draws on new figures, as the examples do) -> contents of each figure."""
    plt.close("all")
    plot()
    out = [figure_contents(plt.figure(n)) for n in plt.get_fignums()]
    plt.close("all")
    return out


def assert_plots_match(ref_plot, our_plot, where):
    ref, got = drawn(ref_plot), drawn(our_plot)
    assert len(got) == len(ref) >= 1, where
    for i, (a, b) in enumerate(zip(ref, got)):
        assert_figures_match(a, b, f"{where} figure {i}")
    return ref


def test_figure_comparison_catches_differences(vis):
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(60, 80, generator=g) > 0.5
    img = (torch.rand(60, 80, 3, generator=g) * 255).to(torch.uint8).numpy()

    def plot(m, box=(10.0, 5.0, 40.0, 30.0), text="(id=0)", pts=((20.0, 20.0),)):
        plt.figure(figsize=(4, 3))
        plt.imshow(img)
        vis.plot_mask(m.numpy(), color="r")
        vis.plot_bbox(60, 80, box, text=text, box_format="XYXY", relative_coords=False)
        vis.show_points(np.array(pts), np.array([1] * len(pts)), plt.gca())

    variants = {"1% of the mask": lambda: plot(flip_pixels(mask, 1e-2)), "box +1 px": lambda: plot(mask, box=(11.0, 5.0, 41.0, 30.0)),
                "text": lambda: plot(mask, text="(id=1)"), "point": lambda: plot(mask, pts=((21.0, 20.0),)),
                "a figure more": lambda: (plot(mask), plot(mask))}
    assert_plots_match(lambda: plot(mask), lambda: plot(mask), "itself")
    for name, bad in variants.items():
        with pytest.raises(AssertionError):
            assert_plots_match(lambda: plot(mask), bad, name)


# ----------------------------------------------------------------------------------------------
# Image concepts


def test_plot_results_on_concept_outputs(vis, tiny_checkpoint):
    from sam3.model.box_ops import box_xywh_to_cxcywh

    ref_api, our_api = tiny_apis(*tiny_checkpoint)
    image = _image(IMAGE_H, IMAGE_W, seed=4)
    kw = dict(processor_kw=dict(resolution=CFG.resolution))
    ref, got = image_predictor_example(ref_api, image, **kw), image_predictor_example(our_api, image, **kw)
    for (step, r), (_, g) in zip(ref[1:], got[1:]):
        figs = assert_plots_match(lambda: vis.plot_results(image, r), lambda: vis.plot_results(image, g), step)
        assert len(figs[0]["axes"][0]["images"]) == 1 + r["scores"].numel()  # the image, one overlay per object

    # the example's input helpers, on the example's box
    width, height = image.size
    box_input_xywh = torch.tensor(EXAMPLE_BOX).view(-1, 4) * SCALE
    box_input_cxcywh = box_xywh_to_cxcywh(box_input_xywh)
    assert torch.equal(vis.normalize_bbox(box_input_cxcywh, width, height), normalize_bbox(box_input_cxcywh, width,
                                                                                           height))
    image_with_box = vis.draw_box_on_image(image, box_input_xywh.flatten().tolist())
    assert image_with_box.size == image.size and image_with_box.getpixel((int(box_input_xywh[0, 0]), 200)) == (0, 255, 0)


# ----------------------------------------------------------------------------------------------
# Video predictor


@pytest.fixture(scope="module")
def video_records(tmp_path_factory):
    d = tmp_path_factory.mktemp("plotvid")
    video_path = write_jpg_folder(make_clip(NUM_FRAMES, HEIGHT, WIDTH), str(d / "0001"))
    apis = video_apis(save_official_video_checkpoint(_official_model(RICH_SEED), str(d / "sam3.pt")))
    return video_path, [dict(video_predictor_example(api, video_path)) for api in apis]


def test_video_visualization_on_predictor_outputs(vis, video_records):
    video_path, (ref, got) = video_records
    video_frames_for_vis = frames_for_vis(video_path)
    sample = vis.load_frame(video_frames_for_vis[0])
    assert sample.shape == (HEIGHT, WIDTH, 3)
    clicks = {"text prompt": None, "click": (np.array(CLICK), np.array([1])),
              "refine clicks": (np.array(REFINE_CLICKS), np.array(REFINE_LABELS))}
    for cell, pts in clicks.items():
        frame_idx = ref[cell]["frame_index"]

        def plot(records):
            out = records[cell]["outputs"]
            extra = {} if pts is None else dict(points_list=[pts[0]], points_labels_list=[pts[1]])
            vis.visualize_formatted_frame_output(frame_idx, video_frames_for_vis,
                                                 outputs_list=[vis.prepare_masks_for_visualization({frame_idx: out})],
                                                 titles=["SAM 3 Dense Tracking outputs"], figsize=(6, 4), **extra)

        assert_plots_match(lambda: plot(ref), lambda: plot(got), cell)
    for cell in ("propagate", "propagate after removal", "propagate after click", "propagate after refine clicks"):
        per_frame = {}
        for name, records in (("official", ref), ("sam3fast", got)):
            # (prepare_masks_for_visualization rewrites the dict it is given)
            per_frame[name] = vis.prepare_masks_for_visualization(copy.copy(records[cell]))
        assert list(per_frame["sam3fast"]) == list(per_frame["official"]) == list(range(NUM_FRAMES))
        for frame_idx in range(0, len(per_frame["official"]), 3):
            assert_plots_match(*[(lambda p=per_frame[name]: vis.visualize_formatted_frame_output(
                frame_idx, video_frames_for_vis, outputs_list=[p], titles=["SAM 3 Dense Tracking outputs"],
                figsize=(6, 4))) for name in ("official", "sam3fast")], f"{cell} frame {frame_idx}")


# ----------------------------------------------------------------------------------------------
# SAM 2-style tracker


@pytest.fixture(scope="module")
def tracker_records(tmp_path_factory):
    d = tmp_path_factory.mktemp("plottrk")
    video_path = write_jpg_folder(make_clip(TRK_FRAMES, TRK_H, TRK_W, seed=3), str(d / "f"))
    model = _official_model(SIMPLE_SEED)
    apis = tracker_apis(model, save_official_video_checkpoint(model, str(d / "sam3.pt")), CFG)
    return video_path, [dict(sam2_task_example(api, video_path)) for api in apis]


def test_show_helpers_on_tracker_outputs(vis, tracker_records):
    video_path, (ref, got) = tracker_records
    frames = [vis.load_frame(p) for p in frames_for_vis(video_path)]
    points = np.array([[210, 350], [250, 220]], dtype=np.float32) * S
    labels = np.array([1, 1], np.int32)
    box = np.array([[300, 0, 500, 400]], dtype=np.float32) * S

    def interacted(records, cell, frame_idx=0, with_box=False):
        _, out_obj_ids, low_res_masks, video_res_masks = records[cell]
        plt.figure(figsize=(9, 6))
        plt.title(f"frame {frame_idx}")
        plt.imshow(frames[frame_idx])
        vis.show_points(points, labels, plt.gca())
        if with_box:
            vis.show_box(box[0], plt.gca())
        for i, out_obj_id in enumerate(out_obj_ids):
            vis.show_mask((video_res_masks[i][0] > 0.0).cpu().numpy(), plt.gca(), obj_id=out_obj_id)

    for cell, kw in (("click", {}), ("second click", {}), ("box", dict(with_box=True)),
                     ("box + click", dict(with_box=True)), ("object 3", {})):
        figs = assert_plots_match(lambda: interacted(ref, cell, **kw), lambda: interacted(got, cell, **kw), cell)
        assert len(figs[0]["axes"][0]["images"]) == 1 + len(ref[cell][1])

    def segments(records, cell):
        video_segments = records[f"{cell} segments"]
        for out_frame_idx in range(0, len(frames), 3):
            plt.figure(figsize=(6, 4))
            plt.title(f"frame {out_frame_idx}")
            plt.imshow(frames[out_frame_idx])
            for out_obj_id, out_mask in video_segments[out_frame_idx].items():
                vis.show_mask(out_mask, plt.gca(), obj_id=out_obj_id)

    for cell in ("propagate", "propagate again", "propagate box", "propagate two objects"):
        assert_plots_match(lambda: segments(ref, cell), lambda: segments(got, cell), cell)
