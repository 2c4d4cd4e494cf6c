"""torch.compile: every region the image engine compiles is one graph (fullgraph=True fails on a
graph break) and a second call with the same shapes does not recompile."""

import numpy as np
import torch
from PIL import Image

import sam3fast


def test_image_engine_compiles_without_graph_breaks():
    torch._dynamo.reset()
    eager = sam3fast.build_image_model("tiny", device="cpu")
    compiled = sam3fast.build_image_model("tiny", device="cpu").compile_stages(backend="aot_eager")
    images = [Image.fromarray((np.random.default_rng(i).random((40 + i, 50, 3)) * 255).astype(np.uint8))
              for i in range(2)]
    boxes = [[[0.5, 0.5, 0.3, 0.3]], [[0.4, 0.4, 0.2, 0.2]]]
    ref = sam3fast.ImagePredictor(eager, 0.0).predict(images, ["bird", "two cats"], boxes=boxes)
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
