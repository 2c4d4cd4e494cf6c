"""GraphedCall (sam3fast.predictor.graphed_call) and the drop-in Sam3Processor wired through it.

On CPU the runner's buffer path runs eagerly (``buffers=True``): its signature keys, copy-in,
clone-out and eager-first rule are what these tests check; the GPU tests (skipped without CUDA)
check that the processor with graphs gives the eager processor's outputs, across calls.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import sam3fast
from sam3fast.predictor.graphed_call import GraphedCall, _clone_fresh
from sam3fast.predictor.graphs import persistent_outputs, pool_for_capture, warm_up_and_capture
from sam3fast.predictor.image import Sam3Processor

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _fn(inputs, scale, *, offset=None, mode="add"):
    """A pytree in (dict of a list of tensors, a tensor, an optional tensor, a plain value), a
    pytree out; records every call."""
    _fn.calls += 1
    a, b = inputs["x"]
    y = a * scale + (b.sum() if mode == "add" else -b.sum())
    return {"y": y, "parts": [y.mean(), inputs["z"] + (0 if offset is None else offset)]}


def _args(seed, n=5):
    g = torch.Generator().manual_seed(seed)
    return ({"x": [torch.randn(n, 3, generator=g), torch.randn(2, generator=g)], "z": torch.randn(4, generator=g)},
            torch.randn(3, generator=g))


def _same(a, b):
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    assert str(sa) == str(sb)
    for x, y in zip(la, lb):
        assert torch.equal(x, y)


def test_buffers_path_equals_the_function_and_never_aliases():
    _fn.calls = 0
    run = GraphedCall(_fn, "cpu", buffers=True)
    assert not run.cuda_graphs
    for seed in range(3):  # the same signature: one entry, inputs copied in each time
        inputs, scale = _args(seed)
        got = run(inputs, scale, offset=torch.ones(4), mode="add")
        _same(got, _fn(inputs, scale, offset=torch.ones(4), mode="add"))
        got["y"].fill_(float("nan"))  # an output is the caller's: the next call is unaffected
    assert len(run.entries) == 1
    again = run(*_args(7), offset=torch.ones(4), mode="add")
    assert not again["y"].isnan().any()
    # every part of the signature makes a new entry: a shape, a None, a plain value
    run(*_args(1, n=6), offset=torch.ones(4), mode="add")
    run(*_args(1), offset=None, mode="add")
    run(*_args(1), offset=torch.ones(4), mode="sub")
    _same(run(*_args(2), offset=torch.ones(4), mode="sub"), _fn(*_args(2), offset=torch.ones(4), mode="sub"))
    assert len(run.entries) == 4
    run.clear()
    assert not run.entries


def test_capture_after_runs_first_calls_directly(monkeypatch):
    _fn.calls = 0
    run = GraphedCall(_fn, "cpu", buffers=True, capture_after=2)
    inputs, scale = _args(0)
    for i in range(2):
        _same(run(inputs, scale), _fn(inputs, scale))
        assert not run.entries  # still eager, no buffers
    run(inputs, scale)
    assert len(run.entries) == 1


def test_capture_asks_for_thread_local_mode(monkeypatch):
    """A capture goes through warm_up_and_capture with capture_error_mode="thread_local" (what the
    video runners use: another thread's CUDA calls must not fail nor break it); the replayed outputs
    are returned as clones. (A stand-in records the call on CPU.)"""
    import sam3fast.predictor.graphed_call as gc

    seen = {}

    class FakeGraph:
        def replay(self):
            seen["replays"] = seen.get("replays", 0) + 1

    def fake_capture(step, warmup_iters, pool, name, **kw):
        seen.update(kw, name=name)
        out = step()
        return FakeGraph(), out, out

    monkeypatch.setattr(gc, "warm_up_and_capture", fake_capture)
    monkeypatch.setattr(gc, "pool_for_capture", lambda graphs: None)
    run = GraphedCall(_fn, "cpu", buffers=True, name="probe")
    run.cuda_graphs = True  # as on CUDA
    inputs, scale = _args(0)
    got = run(inputs, scale)
    assert seen == {"capture_error_mode": "thread_local", "name": "probe", "replays": 1}
    _same(got, _fn(inputs, scale))


def test_plain_mode_and_bad_arguments():
    run = GraphedCall(_fn, "cpu", buffers=False)
    inputs, scale = _args(0)
    _same(run(inputs, scale), _fn(inputs, scale))
    assert not run.entries
    with pytest.raises(TypeError, match="tensors or hashable values"):
        GraphedCall(_fn, "cpu")(inputs, scale, mode=np.zeros(2))
    with pytest.raises(ValueError, match="needs .* on a CUDA device"):
        GraphedCall(_fn, "cpu", cuda_graphs=True)
    for kw, msg in ((dict(max_graphs=-1), "max_graphs"), (dict(capture_after=-1), "capture_after"),
                    (dict(warmup_iters=0), "warmup_iters")):
        with pytest.raises(ValueError, match=msg):
            GraphedCall(_fn, "cpu", **kw)


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    base = rng.random((h // 8 + 2, w // 8 + 2, 3))
    return Image.fromarray((base * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)


def _run_processor(proc, images, prompts, box=None):
    outs = []
    for im in images:
        st = proc.set_image(im)
        for p in prompts:
            r = proc.set_text_prompt(p, st)
            outs.append({k: r[k].clone() for k in ("scores", "boxes", "masks")})
        if box is not None:
            proc.reset_all_prompts(st)
            r = proc.add_geometric_prompt(box, True, st)
            outs.append({k: r[k].clone() for k in ("scores", "boxes", "masks")})
    return outs


def _assert_runs_equal(a, b, exact):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for k in ra:
            assert ra[k].shape == rb[k].shape, k
            if exact or not ra[k].is_floating_point():
                assert torch.equal(ra[k], rb[k]), k
            else:
                torch.testing.assert_close(ra[k], rb[k], msg=k)


def test_processor_through_the_buffers_equals_plain():
    """The processor's backbone and heads through GraphedCall's buffers (what a replay reads) give
    the plain processor's outputs exactly, over several images, prompts and a box prompt."""
    model = sam3fast.build_image_model("tiny", device="cpu")
    images = [_image(50, 70, 0), _image(64, 48, 1), _image(50, 70, 2)]
    plain = Sam3Processor(model, resolution=model.cfg.resolution, confidence_threshold=0.0)
    assert not plain.cuda_graphs
    buffered = Sam3Processor(model, resolution=model.cfg.resolution, confidence_threshold=0.0)
    buffered._backbone.buffers = buffered._heads.buffers = True
    want = _run_processor(plain, images, ["bird", "a tree"], box=[0.5, 0.5, 0.4, 0.3])
    got = _run_processor(buffered, images, ["bird", "a tree"], box=[0.5, 0.5, 0.4, 0.3])
    assert any(r["scores"].numel() for r in want), "threshold 0 keeps every query: something to compare"
    _assert_runs_equal(got, want, exact=True)
    assert buffered._backbone.entries and buffered._heads.entries  # (past the first, eager, call)


def test_persistent_outputs_rule():
    """Leaves returned without being computed (the same storage in the captured and the last warm-up
    outputs, not a static input) are shared; fresh tensors, input aliases, empty tensors, plain
    values and a changed structure are cloned."""
    cache = torch.randn(1, 4, 3)
    weight = torch.randn(5)
    inputs = [torch.randn(2, 3), 7]
    fresh_w, fresh_o = torch.randn(2, 3), torch.randn(2, 3)
    warm = {"y": fresh_w, "pos": [cache.expand(2, 4, 3), weight[1:]], "x": inputs[0][0], "e": torch.empty(0),
            "n": 3}
    out = {"y": fresh_o, "pos": [cache.expand(2, 4, 3), weight[1:]], "x": inputs[0][0], "e": torch.empty(0),
           "n": 3}
    flags = persistent_outputs(out, warm, inputs)
    leaves = torch.utils._pytree.tree_leaves(out)
    assert dict(zip([id(x) for x in leaves], flags)) == {
        id(out["e"]): False, id(out["n"]): False, id(out["pos"][0]): True, id(out["pos"][1]): True,
        id(out["x"]): False, id(out["y"]): False}
    assert persistent_outputs(out, {"y": fresh_w}, inputs) == [False] * len(leaves)
    got = _clone_fresh(out, flags)
    assert got["pos"][0] is out["pos"][0] and got["pos"][1] is out["pos"][1]
    for k in ("y", "x"):
        assert got[k] is not out[k] and torch.equal(got[k], out[k])
        assert got[k].untyped_storage().data_ptr() != out[k].untyped_storage().data_ptr()
    assert got["n"] == 3
    assert all(a is not b for a, b in zip(torch.utils._pytree.tree_leaves(_clone_fresh(out, None))[:-1], leaves[:-1]))


def test_pool_for_capture_shares_a_live_graphs_pool(monkeypatch):
    """A runner's next capture goes into the pool of one of its live graphs; with none alive (no
    key captured yet, or all dropped) into a new pool, never into a handle kept from before."""

    class FakeGraph:
        def __init__(self, pool):
            self._pool = pool

        def pool(self):
            return self._pool

    fresh = iter([(0, 101), (0, 102)])
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: next(fresh))
    assert pool_for_capture([None, FakeGraph((0, 7)), FakeGraph((0, 7))]) == (0, 7)
    assert pool_for_capture(g for g in [None, None]) == (0, 101)
    assert pool_for_capture([]) == (0, 102)


@needs_cuda
def test_gpu_capture_after_every_graph_of_the_pool_was_dropped():
    """Graphs captured through pool_for_capture share a pool while one of them lives; after all
    are destroyed the next capture gets a new pool and works. (Capturing into the old handle then
    hits PyTorch's "use_count > 0" assert: the pool outlives its graphs with no user.)"""
    import gc

    x = torch.randn(64, device="cuda")

    def capture(pool):
        return warm_up_and_capture(lambda: x * 2 + 1, 1, pool, "test")

    g1, out1, _ = capture(pool_for_capture([]))
    g2, out2, _ = capture(pool_for_capture([None, g1]))
    old = g1.pool()
    assert g2.pool() == old
    del g1, g2, out1, out2
    gc.collect()
    g3, out3, _ = capture(pool_for_capture([None]))
    assert g3.pool() != old
    x.copy_(torch.arange(64, device="cuda", dtype=x.dtype))
    g3.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out3, x * 2 + 1, rtol=0, atol=0)


@needs_cuda
def test_gpu_persistent_outputs_are_not_cloned():
    """A cached tensor the function returns comes back as that tensor (no copy a replay), the computed
    outputs as clones that survive the next replay."""
    cache = torch.randn(1, 8, 16, device="cuda")

    def fn(x):
        return x * 2, cache.expand(x.shape[0], 8, 16)

    call = GraphedCall(fn, "cuda", name="test")
    x1, x2 = torch.randn(3, 8, 16, device="cuda"), torch.randn(3, 8, 16, device="cuda")
    y1, p1 = call(x1)
    y2, p2 = call(x2)
    assert call.graphs() == 1 and next(iter(call.entries.values())).shared == [False, True]
    for p in (p1, p2):
        assert p.untyped_storage().data_ptr() == cache.untyped_storage().data_ptr() and p.stride(0) == 0
    torch.testing.assert_close(y1, x1 * 2, rtol=0, atol=0)
    torch.testing.assert_close(y2, x2 * 2, rtol=0, atol=0)


@needs_cuda
def test_gpu_processor_graphs_equal_eager():
    model = sam3fast.build_image_model("tiny", device="cuda")
    images = [_image(50, 70, 0), _image(64, 48, 1), _image(50, 70, 2)]
    eager = Sam3Processor(model, resolution=model.cfg.resolution, confidence_threshold=0.0, cuda_graphs=False)
    graphed = Sam3Processor(model, resolution=model.cfg.resolution, confidence_threshold=0.0)
    assert graphed.cuda_graphs and not eager.cuda_graphs
    want = _run_processor(eager, images, ["bird", "a tree"], box=[0.5, 0.5, 0.4, 0.3])
    got = _run_processor(graphed, images, ["bird", "a tree"], box=[0.5, 0.5, 0.4, 0.3])
    _assert_runs_equal(got, want, exact=False)
    assert graphed._backbone.graphs() == 1 and graphed._heads.graphs() >= 1
    assert sum(e.replays for e in graphed._backbone.entries.values()) == 2  # images 2 and 3
