"""torch.compile: every region the image engine compiles is one graph (fullgraph=True fails on a
graph break) and a second call with the same shapes does not recompile."""

import numpy as np
import torch
from PIL import Image

import sam3fast


def test_image_engine_compiles_without_graph_breaks():
    from sam3fast.model.decoder import _BOX_SINE_DIVISORS

    torch._dynamo.reset()
    eager = sam3fast.build_image_model("tiny", device="cpu")
    compiled = sam3fast.build_image_model("tiny", device="cpu").compile_stages(backend="aot_eager")
    images = [Image.fromarray((np.random.default_rng(i).random((40 + i, 50, 3)) * 255).astype(np.uint8))
              for i in range(2)]
    boxes = [[[0.5, 0.5, 0.3, 0.3]], [[0.4, 0.4, 0.2, 0.2]]]
    ref = sam3fast.ImagePredictor(eager, 0.0).predict(images, ["bird", "two cats"], boxes=boxes)
    _BOX_SINE_DIVISORS.clear()  # the first compiled call fills the decoder's box-embedding cache
    got = sam3fast.ImagePredictor(compiled, 0.0).predict(images, ["bird", "two cats"], boxes=boxes)
    # same shapes again (other values): must not recompile
    images2 = [Image.fromarray((np.random.default_rng(9 + i).random((40 + i, 50, 3)) * 255).astype(np.uint8))
               for i in range(2)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        sam3fast.ImagePredictor(compiled, 0.0).predict(images2, ["dog", "a tree"], boxes=boxes)
    for a, b in zip(ref, got):
        for ra, rb in zip(a, b):
            assert torch.allclose(ra["scores"], rb["scores"], rtol=1e-4, atol=1e-5)
            assert torch.allclose(ra["boxes"], rb["boxes"], rtol=1e-4, atol=1e-3)


def _two_object_session(p, pred):
    st = p.state(pred)
    pred.add_new_points_or_box(st, 0, 1, points=[[0.1, 0.5]], labels=[1])
    pred.add_new_points_or_box(st, 0, 2, points=[[0.8, 0.3]], labels=[1])
    pred.propagate_in_video_preflight(st)
    return st


def test_tracker_step_compiles_without_graph_breaks():
    """The tracker's per-frame step on the fixed-capacity memory bank (memory selection, memory
    attention, SAM heads, memory encoder) is one graph; later frames of the run, whose bank
    contents differ but whose shapes do not, reuse it."""
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_tracker_predictor import Pair

    from sam3fast.config import get_config
    from sam3fast.model.memory_attention import _SINE_DIVISORS

    torch._dynamo.reset()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        p = Pair(get_config("tiny"), score_shift=-0.515, num_frames=12)
        pred = p.ours

        def run(max_frames=None):
            st = _two_object_session(p, pred)
            return list(pred.propagate_in_video(st, 0, max_frames, False, tqdm_disable=True))

        ref = run()
        _SINE_DIVISORS.clear()  # the first compiled frame fills the temporal encoding's cache
        pred.compile_step(backend="aot_eager")
        try:
            assert len(run(max_frames=2)) == 3  # compiles here (frames 1 and 2)
            with torch._dynamo.config.patch(error_on_recompile=True):
                got = run()
        finally:
            pred._memory_step_compiled = None
        assert pred.step_counts["reference"] == 0
        for (f, ids, lo, vid, sc), (f2, ids2, lo2, vid2, sc2) in zip(ref, got):
            assert f == f2 and list(ids) == list(ids2)
            assert torch.allclose(lo2, lo, rtol=1e-4, atol=1e-4), f
            assert torch.allclose(sc2, sc, rtol=1e-4, atol=1e-4), f
    finally:
        torch.set_num_threads(n)
