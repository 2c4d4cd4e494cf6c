"""Device memory of a concept-video session does not grow with the frames when finished outputs
retire (sam3fast.video: the tracker's stored frames, the cached masks, the hotstart buffer).

The CPU stand-in for ``test_video_graphs.test_gpu_session_memory_is_flat_and_outputs_unchanged``:
retiring is forced through its seams (``_retires_outputs`` / ``_retires``, ``_to_host``), with
clones standing in for the pinned host copies. Every clone is kept alive, so no tensor allocated
later can take a clone's address, and "on the device" means: a live tensor whose storage is not
a clone. The device bytes are summed over every live tensor (found by the garbage collector, so
tensors held only by the propagation generators count too), each storage once, rounded up to the
CUDA caching allocator's 512-byte blocks: what ``torch.cuda.memory_allocated`` reads on a GPU.

Same recipe as the GPU test (its weights, a 48-frame 72x96 clip, growth from frame 16 to 48):
the session that keeps everything on the device (the official placement) is the reference; the
retiring one must grow by at most 5% of it and give the same outputs. The objects tracked change
along the clip (up to 16 tracker states), so per-object state (memory banks, conditioning frames)
is in both growths; what scales with the frames must not be.
"""

from __future__ import annotations

import gc
from collections import Counter

import numpy as np
import pytest
import torch

from test_video_graphs import CFG, _recipe_state_dict
from test_video_parity import _session_frames, to_numpy_outputs
from video_clip import make_clip, write_jpg_folder

from sam3fast.video import build_sam3_video_predictor

NUM_FRAMES = 48
BLOCK = 512  # the CUDA caching allocator's smallest block


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    return write_jpg_folder(make_clip(NUM_FRAMES, 72, 96), str(tmp_path_factory.mktemp("long") / "frames"))


@pytest.fixture(scope="module")
def recipe_weights():
    return _recipe_state_dict()


def _force_retiring(pred, host):
    """Finished outputs retire on the CPU: ``host`` keeps every copy (and so its address)."""

    def to_host(v):
        c = v.clone()
        host.append(c)
        return c

    model = pred.model
    model._retires_outputs = lambda: True
    model._to_host = to_host
    model.tracker._retires = lambda st: True
    model.tracker._to_host = to_host
    model.tracker._mark_retired = lambda: None


def _device_census(host):
    """(bytes in 512-byte blocks, Counter of (shape, dtype) -> storages) of the live tensors whose
    storage is not a host copy."""
    gc.collect()
    host_ptrs = {t.untyped_storage().data_ptr() for t in host}
    seen, total, kinds = set(), 0, Counter()
    for o in gc.get_objects():
        # plain tensors and parameters only (type(): no __class__ lookups): tensor subclasses left
        # alive by other tests in this process (torch.compile's FakeTensors) have no data
        if type(o) not in (torch.Tensor, torch.nn.Parameter) or o.is_meta:
            continue
        try:
            s = o.untyped_storage()
            p = s.data_ptr()
        except RuntimeError:  # a storage without data (e.g. a functionalized wrapper)
            continue
        if p == 0 or p in seen or p in host_ptrs:
            continue
        seen.add(p)
        total += -(-max(s.nbytes(), 1) // BLOCK) * BLOCK
        kinds[(tuple(o.shape), o.dtype)] += 1
    return total, kinds


def _run(weights, clip, retire, pipelined=False):
    pred = build_sam3_video_predictor(config=CFG, device="cpu", load_from_HF=False)
    pred.model.load_state_dict(weights)
    pred.model.progress = False
    pred.model.pipelined_outputs = pipelined
    host = []
    if retire:
        _force_retiring(pred, host)
    sid = _session_frames(pred, clip)
    outs, census = [], {}
    for i, r in enumerate(pred.handle_stream_request({"type": "propagate_in_video", "session_id": sid})):
        outs.append(to_numpy_outputs(r["outputs"]))
        del r
        if i in (NUM_FRAMES // 3, NUM_FRAMES - 1):  # the GPU test's mem[n // 3] and mem[-1]
            census[i] = _device_census(host)
    pred.handle_request({"type": "close_session", "session_id": sid})
    (b0, k0), (b1, k1) = census[NUM_FRAMES // 3], census[NUM_FRAMES - 1]
    grown = {k: k1[k] - k0[k] for k in k1 if k1[k] > k0[k]}
    return outs, b1 - b0, grown


@pytest.fixture(scope="module")
def reference_run(recipe_weights, long_clip):
    return _run(recipe_weights, long_clip, retire=False)


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
def test_retired_session_device_memory_is_flat(recipe_weights, long_clip, reference_run, pipelined):
    ref_outs, ref_growth, _ = reference_run
    outs, growth, grown = _run(recipe_weights, long_clip, retire=True, pipelined=pipelined)
    assert len(outs) == len(ref_outs) == NUM_FRAMES
    assert sum(len(o["out_obj_ids"]) for o in outs) >= NUM_FRAMES  # objects were tracked
    for t, (a, b) in enumerate(zip(ref_outs, outs)):
        assert a["out_obj_ids"].tolist() == b["out_obj_ids"].tolist(), t
        assert np.array_equal(a["out_binary_masks"], b["out_binary_masks"]), t
        assert np.array_equal(a["out_probs"], b["out_probs"]), t
        assert np.array_equal(a["out_boxes_xywh"], b["out_boxes_xywh"]), t
    assert ref_growth > 0, ref_growth  # the official placement grows with the video
    assert growth <= 0.05 * ref_growth, (growth, ref_growth, grown)
