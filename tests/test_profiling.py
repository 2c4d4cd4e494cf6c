"""NVTX ranges: off by default (a shared no-op context), on with enable_nvtx; the engine runs either way."""

import numpy as np
from PIL import Image

import sam3fast
from sam3fast import profiling


def test_nvtx_ranges_off_and_on():
    assert not profiling.nvtx_enabled()
    assert profiling.stage("x") is profiling.stage("y")  # shared nullcontext: no allocation per call
    model = sam3fast.build_image_model("tiny", device="cpu")
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    ref = sam3fast.ImagePredictor(model, 0.0).predict([image], ["bird"])[0][0]["scores"]
    profiling.enable_nvtx(True)
    try:
        with profiling.stage("outer"):
            got = sam3fast.ImagePredictor(model, 0.0).predict([image], ["bird"])[0][0]["scores"]
        proc = sam3fast.Sam3Processor(model, resolution=112)
        proc.set_text_prompt("bird", proc.set_image(image))
    finally:
        profiling.enable_nvtx(False)
    assert (got == ref).all()
