"""The static-shape image step and its CUDA-graph runner (sam3fast.predictor.graphs), and the
ImagePredictor wired through them.

On CPU the step runs eagerly through the runner's buffers: it must equal, exactly, the image path
as it was before the runner (backbone, heads, then the processor's ``postprocess`` pair by pair),
written out independently here. GPU-only tests (replay = eager, outputs safe from the next replay,
buckets captured on demand, no host sync during a replay) skip cleanly without CUDA.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import sam3fast
from sam3fast.predictor.graphs import GraphedImageStep, image_step
from sam3fast.predictor.image import ImagePredictor, postprocess
from sam3fast.predictor.preprocess import preprocess

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["yellow bird", "tree", "a red car on the road", "sky", "x"]


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def model():
    return sam3fast.build_image_model("tiny", device="cpu")


def _image(h, w, seed):
    rng = np.random.default_rng(seed)
    # smooth blobs: pure noise makes every query alike
    base = rng.random((h // 8 + 2, w // 8 + 2, 3))
    img = Image.fromarray((base * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


IMAGES = [(50, 70, 0), (90, 60, 1), (112, 112, 2)]


def _raw_reference(model, images, prompts, boxes=None):
    """The pre-runner path of ImagePredictor.predict: one backbone batch, text once, pairs
    (image i, prompt j) at i * P + j through the heads."""
    xs, sizes = [], []
    for im in images:
        x, h, w = preprocess(im, model.cfg.resolution, model.device, model.dtype)
        xs.append(x)
        sizes.append((h, w))
    B, P = len(images), len(prompts)
    image_out = model.encode_image(torch.stack(xs))
    feats, mask = model.encode_text(prompts)
    kw = {}
    if boxes is not None:
        bx, bl, bm = boxes
        kw = dict(boxes=bx.repeat_interleave(P, 0), box_labels=bl.repeat_interleave(P, 0),
                  box_mask=bm.repeat_interleave(P, 0))
    img_idx = torch.arange(B, device=model.device).repeat_interleave(P)
    out = model.forward_heads(image_out, img_idx, feats.repeat(B, 1, 1), mask.repeat(B, 1), **kw)
    return out, sizes, torch.stack(xs), feats, mask


def _reference(model, images, prompts, threshold, boxes=None):
    out, sizes, *_ = _raw_reference(model, images, prompts, boxes)
    res = []
    for i, (h, w) in enumerate(sizes):
        per = []
        for j in range(len(prompts)):
            r = postprocess(out, i * len(prompts) + j, h, w, threshold)
            r["masks"] = r.pop("masks")[:, 0]
            r.pop("masks_logits")
            per.append(r)
        res.append(per)
    return res


def _median_threshold(model, images, prompts):
    """A threshold that keeps about half of the slots (random weights put scores anywhere)."""
    out, *_ = _raw_reference(model, images, prompts)
    probs = out["pred_logits"].float().sigmoid() * out["presence_logit"].float().sigmoid()[:, None]
    return float(probs.flatten().median())


def _assert_same(got, ref):
    assert len(got) == len(ref)
    kept = 0
    for gi, ri in zip(got, ref):
        assert len(gi) == len(ri)
        for g, r in zip(gi, ri):
            assert set(g) == set(r)
            for k in r:
                assert g[k].dtype == r[k].dtype and g[k].shape == r[k].shape, k
                assert torch.equal(g[k], r[k]), k
            kept += r["scores"].shape[0]
    return kept


@pytest.fixture(scope="module")
def images():
    return [_image(*a) for a in IMAGES]


@pytest.fixture(scope="module")
def threshold(model, images):
    return _median_threshold(model, images, PROMPTS)


# ---------------------------------------------------------------- the static step
def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@torch.inference_mode()
def test_static_step_equals_reference(model, images, threshold):
    """image_step (three images of different sizes, five prompts): scores, keep, pixel boxes and
    the low-res mask logits of every slot equal the reference exactly."""
    out, sizes, x, feats, mask = _raw_reference(model, images, PROMPTS)
    B, P = len(images), len(PROMPTS)
    scale = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=torch.float32)
    st = image_step(model, x, feats, mask, torch.ones(P, dtype=torch.bool), torch.tensor(threshold), scale)
    Q = out["pred_logits"].shape[1]
    assert st["scores"].shape == (B, P, Q) and st["keep"].shape == (B, P, Q)
    assert st["boxes"].shape == (B, P, Q, 4)
    assert st["mask_logits"].shape == (B, P, Q) + tuple(out["pred_masks"].shape[-2:])
    n_kept = 0
    for i, (h, w) in enumerate(sizes):
        for j in range(P):
            n = i * P + j
            ref = postprocess(out, n, h, w, threshold)
            k = st["keep"][i, j]
            assert torch.equal(st["scores"][i, j][k], ref["scores"])
            assert torch.equal(st["boxes"][i, j][k], ref["boxes"])
            assert torch.equal(st["mask_logits"][i, j], out["pred_masks"][n])
            n_kept += int(k.sum())
    assert 0 < n_kept < B * P * Q  # the threshold splits the slots: keep is not trivially all/none


@torch.inference_mode()
def test_forward_heads_pairs_without_copies(model, images):
    """forward_heads gathers image rows only where it must: one image broadcast to several prompts,
    img_idx=None (pair n = image n) and the stride-0 position encodings all equal the heads run on
    materialised contiguous copies of the rows, exactly; a None whose counts disagree is refused."""
    xs = torch.stack([preprocess(im, model.cfg.resolution, model.device, model.dtype)[0] for im in images[:2]])
    feats, mask = model.encode_text(PROMPTS[:3])
    image_out = model.encode_image(xs)
    assert all(p.stride(0) == 0 for p in image_out["vision_pos_enc"])  # what the broadcast relies on

    def copy_rows(t, idx):  # a real copy of the rows, each laid out as the backbone's (channels-last)
        dims = [0] + sorted(range(1, t.dim()), key=lambda d: -t.stride(d))
        rows = t.index_select(0, idx).permute(*dims).contiguous()
        return rows.permute(*[dims.index(d) for d in range(t.dim())])

    def materialised(idx):
        rows = {k: [copy_rows(t, idx) for t in image_out[k]] for k in ("backbone_fpn", "vision_pos_enc")}
        for k in rows:
            for r, t in zip(rows[k], image_out[k]):
                assert r.stride(0) != 0 and r[0].stride() == t[0].stride()
        return rows

    def same(a, b):
        assert set(a) == set(b)
        for k in b:
            assert torch.equal(a[k], b[k]), k

    # one image, three prompts: image 0 broadcast (no gather) == three real copies
    one = {k: [t[1:2] for t in image_out[k]] for k in ("backbone_fpn", "vision_pos_enc")}
    idx = torch.tensor([1, 1, 1])
    ref = model.forward_heads(materialised(idx), torch.arange(3), feats, mask)
    same(model.forward_heads(one, torch.zeros(3, dtype=torch.long), feats, mask), ref)
    # pair n = image n: None == the explicit identity gather
    idx = torch.tensor([1, 0])
    ref = model.forward_heads(materialised(idx), torch.arange(2), feats[:2], mask[:2])
    same(model.forward_heads(image_out, idx, feats[:2], mask[:2]), ref)
    swapped = {k: [t.flip(0) for t in image_out[k]] for k in ("backbone_fpn", "vision_pos_enc")}
    same(model.forward_heads(swapped, None, feats[:2], mask[:2]), ref)
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        model.forward_heads(image_out, None, feats, mask)


@torch.inference_mode()
def test_static_step_padding_rows_ignored(model, images, threshold):
    """Five prompts padded to eight (copies of prompt 0, prompt_valid False): the padding rows keep
    nothing, and the real rows equal the unpadded step up to rounding (the heads' kernels block by
    batch size, so bit equality is not promised; a padding row leaking into a real one would be
    an O(1) error)."""
    _, sizes, x, feats, mask = _raw_reference(model, images, PROMPTS)
    P = len(PROMPTS)
    scale = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=torch.float32)
    thr = torch.tensor(threshold)
    ref = image_step(model, x, feats, mask, torch.ones(P, dtype=torch.bool), thr, scale)
    pf = torch.cat([feats, feats[:1].expand(3, -1, -1)])
    pm = torch.cat([mask, mask[:1].expand(3, -1)])
    valid = torch.arange(8) < P
    got = image_step(model, x, pf, pm, valid, thr, scale)
    assert got["keep"].shape[1] == 8 and not got["keep"][:, P:].any()
    assert got["scores"][:, P:].gt(threshold).any()  # the padding rows would have kept slots
    for k in ("scores", "boxes", "mask_logits"):
        assert _rel(got[k][:, :P], ref[k]) < 1e-5, k
    near = (ref["scores"] - threshold).abs() < 1e-5
    assert torch.equal(got["keep"][:, :P] | near, ref["keep"] | near)


@torch.inference_mode()
def test_static_step_full_size_masks(model):
    """mask_size=(H, W): every slot's mask at the images' own size inside the step equals the
    processor's post-processed mask for the kept slots."""
    ims = [_image(40, 56, 7), _image(40, 56, 8)]
    prompts = ["bird", "two cats"]
    out, sizes, x, feats, mask = _raw_reference(model, ims, prompts)
    thr = _median_threshold(model, ims, prompts)
    scale = torch.tensor([[56.0, 40.0, 56.0, 40.0]] * 2)
    st = image_step(model, x, feats, mask, torch.ones(2, dtype=torch.bool), torch.tensor(thr), scale,
                    mask_size=(40, 56))
    assert st["masks"].shape[-2:] == (40, 56) and st["masks"].dtype == torch.bool
    for i in range(2):
        for j in range(2):
            ref = postprocess(out, i * 2 + j, 40, 56, thr)
            k = st["keep"][i, j]
            assert torch.equal(st["masks"][i, j][k], ref["masks"][:, 0])


# ---------------------------------------------------------------- predictor through the runner
def test_predict_equals_reference(model, images, threshold):
    """Three images of different sizes, five prompts, on CPU: exactly the
    pre-runner predict path, with the same dtypes and shapes."""
    pred = ImagePredictor(model, threshold)
    assert not pred.cuda_graphs
    got = pred.predict(images, PROMPTS)
    ref = _reference(model, images, PROMPTS, threshold)
    kept = _assert_same(got, ref)
    assert 0 < kept < len(images) * len(PROMPTS) * model.cfg.num_queries


def test_predict_with_boxes_equals_reference(model, images, threshold):
    boxes = [[[0.5, 0.5, 0.3, 0.3]], [], [[0.4, 0.4, 0.2, 0.2], [0.7, 0.6, 0.2, 0.3]]]
    labels = [[True], [], [True, False]]
    bx = torch.zeros(3, 2, 4)
    bl = torch.zeros(3, 2, dtype=torch.bool)
    bm = torch.ones(3, 2, dtype=torch.bool)
    for i, bs in enumerate(boxes):
        for j, b in enumerate(bs):
            bx[i, j] = torch.tensor(b)
            bl[i, j] = labels[i][j]
            bm[i, j] = False
    got = ImagePredictor(model, threshold).predict(images, PROMPTS[:3], boxes=boxes, box_labels=labels)
    with torch.inference_mode():
        ref = _reference(model, images, PROMPTS[:3], threshold, boxes=(bx, bl, bm))
    assert _assert_same(got, ref) > 0


def test_predict_mask_policy_original(model):
    ims = [_image(40, 56, 7), _image(40, 56, 8)]
    prompts = ["bird", "two cats", "sun"]
    thr = _median_threshold(model, ims, prompts)
    got = ImagePredictor(model, thr, mask_policy="original").predict(ims, prompts)
    with torch.inference_mode():
        ref = _reference(model, ims, prompts, thr)
    assert _assert_same(got, ref) > 0
    with pytest.raises(ValueError, match="one size"):
        ImagePredictor(model, thr, mask_policy="original").predict([ims[0], _image(30, 30, 1)], prompts)


def test_threshold_edges(model, images):
    """Threshold 1.0 keeps nothing (empty results with the right shapes); 0.0 keeps every slot."""
    pred = ImagePredictor(model, 1.0)
    for per, (h, w, _) in zip(pred.predict(images, PROMPTS[:2]), IMAGES):
        for r in per:
            assert r["scores"].shape == (0,) and r["boxes"].shape == (0, 4) and r["masks"].shape == (0, h, w)
    got = ImagePredictor(model, 0.0).predict(images[:1], PROMPTS[:2])
    with torch.inference_mode():
        ref = _reference(model, images[:1], PROMPTS[:2], 0.0)
    assert _assert_same(got, ref) == 2 * model.cfg.num_queries


# ---------------------------------------------------------------- buckets
def test_bucket_reuse_and_new_buckets(model, images, threshold):
    pred = ImagePredictor(model, threshold)
    r = pred.runner
    pred.predict(images[:2], PROMPTS[:3])
    assert len(r.entries) == 1
    (key,) = r.entries
    assert (key.batch, key.prompts, key.boxes, key.mask_size) == (2, 3, -1, None)
    pred.predict(images[1:], PROMPTS[2:])  # same B and P, other images and prompts: same entry
    assert list(r.entries) == [key]
    pred.predict(images, PROMPTS[:3])  # another B: a new bucket
    assert len(r.entries) == 2
    pred.predict(images[:2], PROMPTS[:4])  # another P (no padding by default): a new bucket
    pred.predict(images[:2], PROMPTS[:3], boxes=[[[0.5, 0.5, 0.2, 0.2]], []])  # boxes: another graph
    assert sorted((k.batch, k.prompts, k.boxes) for k in r.entries) == [(2, 3, -1), (2, 3, 1), (2, 4, -1),
                                                                      (3, 3, -1)]
    r.clear()
    assert not r.entries
    padded = ImagePredictor(model, threshold, prompt_buckets=(2, 6))
    padded.predict(images[:2], PROMPTS)  # P = 5 pads to 6
    padded.predict(images[:2], PROMPTS + ["one more"])  # P = 6: the same bucket
    assert [(k.batch, k.prompts) for k in padded.runner.entries] == [(2, 6)]
    assert [padded.runner.prompt_bucket(p) for p in (1, 2, 3, 6, 7, 12, 13)] == [2, 2, 6, 6, 12, 12, 18]
    assert [r.prompt_bucket(p) for p in (1, 5, 33)] == [1, 5, 33]


@torch.inference_mode()
def test_runner_buffers_do_not_leak_between_calls(model, images):
    """A call with fewer real prompts in a bucket used before by more (6 then 5 -> both Pb = 6)
    gives the same outputs as a fresh runner: padding rows are rewritten, not left over."""
    _, sizes, x, feats, mask = _raw_reference(model, images, PROMPTS + ["one more"])
    r = GraphedImageStep(model, prompt_buckets=(6,))
    r.run(x, feats, mask, 0.5, sizes)
    a = r.run(x, feats[:5], mask[:5], 0.5, sizes)
    b = GraphedImageStep(model, prompt_buckets=(6,)).run(x, feats[:5], mask[:5], 0.5, sizes)
    assert len(r.entries) == 1 and a["scores"].shape[1] == 5
    for k in b.tensors:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- the one-ahead pipeline
def test_batched_pipeline_equals_batch_by_batch(model, threshold, monkeypatch):
    """predict(batch_size=2) over 5 images equals predict on each chunk of 2 (backbone results
    depend on the batch size, so chunks, not the whole batch, are the reference); batch i+1 is
    prepared before batch i is finished (the overlap)."""
    ims = [_image(48 + 4 * i, 64 - 2 * i, 20 + i) for i in range(5)]
    pred = ImagePredictor(model, threshold)
    ref = []
    for s in range(0, 5, 2):
        ref.extend(pred.predict(ims[s:s + 2], PROMPTS[:2]))
    calls = []
    for name in ("_prepare", "_launch", "_finish"):
        orig = getattr(pred, name)

        def spy(*a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(pred, name, spy)
    got = pred.predict(ims, PROMPTS[:2], batch_size=2)
    assert _assert_same(got, ref) > 0
    assert calls == ["_prepare", "_launch", "_prepare", "_finish", "_launch", "_prepare", "_finish",
                     "_launch", "_finish"]
    streamed = [r for batch in pred.predict_batches([ims[:2], ims[2:4], ims[4:]], PROMPTS[:2]) for r in batch]
    assert _assert_same(streamed, ref) > 0
    # boxes: each batch padded to its own box count (the middle one has none), as if alone
    boxes = [[[0.5, 0.5, 0.3, 0.3]], [], [], [], [[0.4, 0.4, 0.2, 0.2], [0.6, 0.6, 0.2, 0.2]]]
    ref = []
    for s in range(0, 5, 2):
        ref.extend(pred.predict(ims[s:s + 2], PROMPTS[:2], boxes=boxes[s:s + 2]))
    got = pred.predict(ims, PROMPTS[:2], boxes=boxes, batch_size=2)
    assert _assert_same(got, ref) > 0


def test_step_reads_nothing_on_the_host(model, images, monkeypatch):
    """The runner's call (buffer fills and the step) reads no tensor value on the host: the CPU
    stand-in for set_sync_debug_mode("error"). Control: the predictor's tail does read keep."""
    from host_reads import record_host_reads

    _, sizes, x, feats, mask = _raw_reference(model, images, PROMPTS)
    r = GraphedImageStep(model)
    armed = [False]
    with record_host_reads(monkeypatch, armed) as hits:
        armed[0] = True
        r.run(x, feats, mask, 0.5, sizes, mask_size=None)
        armed[0] = False
    assert hits == []
    with record_host_reads(monkeypatch, armed) as hits:
        armed[0] = True
        ImagePredictor(model, 0.5).predict(images[:1], ["bird"])
        armed[0] = False
    assert any(name == "nonzero" for name, _ in hits)


def test_compiled_model_through_the_runner(images, threshold):
    """A model with compiled stages (fullgraph=True) runs through the runner; a second call of the
    same bucket on other values does not recompile."""
    torch._dynamo.reset()
    compiled = sam3fast.build_image_model("tiny", device="cpu").compile_stages(backend="eager")
    eager = sam3fast.build_image_model("tiny", device="cpu")
    ref = ImagePredictor(eager, threshold).predict(images[:2], PROMPTS[:2])
    got = ImagePredictor(compiled, threshold).predict(images[:2], PROMPTS[:2])
    with torch._dynamo.config.patch(error_on_recompile=True):
        ImagePredictor(compiled, threshold).predict(images[1:], PROMPTS[2:4])
    assert _assert_same(got, ref) > 0  # backend="eager" runs the same kernels: bit-equal


# ---------------------------------------------------------------- bad input
def test_bad_inputs(model, images):
    _, sizes, x, feats, mask = _raw_reference(model, images[:2], PROMPTS[:2])
    r = GraphedImageStep(model)
    cases = [
        (dict(images=x[0]), r"\(B, 3, 112, 112\)"),
        (dict(images=x[:, :, :64]), r"\(B, 3, 112, 112\)"),
        (dict(images=x.double()), "float32"),
        (dict(text_feats=feats[0]), r"\(P, T, D\)"),
        (dict(text_feats=feats.bfloat16()), "float32"),
        (dict(text_mask=mask.long()), "bool"),
        (dict(text_mask=mask[:1]), "bool"),
        (dict(sizes=sizes[:1]), "each of the 2 images"),
        (dict(sizes=[(0, 5), (4, 4)]), "positive"),
        (dict(threshold=1.5), r"\[0, 1\]"),
        (dict(threshold=torch.zeros(2)), "one number"),
        (dict(boxes=torch.zeros(2, 1, 4)), "all three"),
        (dict(boxes=torch.zeros(2, 1, 3), box_labels=torch.zeros(2, 1, dtype=torch.bool),
              box_mask=torch.zeros(2, 1, dtype=torch.bool)), r"\(B=2, Nb, 4\)"),
        (dict(boxes=torch.zeros(2, 1, 4), box_labels=torch.zeros(2, 2, dtype=torch.bool),
              box_mask=torch.zeros(2, 1, dtype=torch.bool)), "box_labels"),
        (dict(mask_size=(40, 0)), "positive"),
        (dict(mask_size=(40, 56)), "every image"),
        (dict(out="device"), "out must be"),
    ]
    base = dict(images=x, text_feats=feats, text_mask=mask, threshold=0.5, sizes=sizes)
    for change, match in cases:
        kw = {**base, **change}
        with pytest.raises(ValueError, match=match):
            r.run(**kw)
    assert not r.entries  # nothing half-built by a refused call
    with pytest.raises(ValueError, match="CUDA"):
        GraphedImageStep(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA"):
        ImagePredictor(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="prompt_buckets"):
        GraphedImageStep(model, prompt_buckets=(0, 4))
    with pytest.raises(ValueError, match="mask_policy"):
        ImagePredictor(model, mask_policy="full")
    pred = ImagePredictor(model)
    for kw, match in [(dict(batch_size=0), "batch_size"), (dict(batch_size=1.5), "batch_size"),
                      (dict(box_labels=[[True], [True]]), "without boxes"),
                      (dict(boxes=[[[0.5, 0.5, 0.2, 0.2]]]), "one list per image")]:
        with pytest.raises(ValueError, match=match):
            pred.predict(images[:2], "bird", **kw)
    with pytest.raises(ValueError, match="non-empty"):
        pred.predict([], "bird")
    with pytest.raises(ValueError, match="non-empty"):
        pred.predict(images[:1], [])
    with pytest.raises(ValueError, match="non-empty list of images"):
        list(pred.predict_batches([images[:1], []], "bird"))


# ---------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def cuda_model():
    return sam3fast.build_image_model("tiny", device="cuda")


def _cuda_inputs(m, seed, B=2, P=3):
    ims = [_image(48 + 8 * i, 64, seed + i) for i in range(B)]
    xs, sizes = [], []
    for im in ims:
        x, h, w = preprocess(im, m.cfg.resolution, m.device, m.dtype)
        xs.append(x)
        sizes.append((h, w))
    with torch.inference_mode():
        feats, mask = m.encode_text(["bird", "a tree", "two red cars", "sky"][:P])
    return torch.stack(xs), feats, mask, sizes


def _assert_outputs_equal(a, b):
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert a[k].shape == b[k].shape, k
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


@needs_cuda
def test_gpu_replay_equals_eager(cuda_model):
    x, feats, mask, sizes = _cuda_inputs(cuda_model, 0)
    eager = GraphedImageStep(cuda_model, cuda_graphs=False)
    graphed = GraphedImageStep(cuda_model)
    assert graphed.cuda_graphs
    for seed in (0, 10):  # the first call captures, the second replays on new inputs
        x, feats, mask, sizes = _cuda_inputs(cuda_model, seed)
        g = graphed.run(x, feats, mask, 0.4, sizes)
        e = eager.run(x, feats, mask, 0.4, sizes)
        _assert_outputs_equal(g, e)
    (entry,) = graphed.entries.values()
    assert entry.graph is not None and entry.replays == 2


@needs_cuda
def test_gpu_outputs_survive_the_next_replay(cuda_model):
    r = GraphedImageStep(cuda_model)
    x1, f1, m1, s1 = _cuda_inputs(cuda_model, 1)
    x2, f2, m2, s2 = _cuda_inputs(cuda_model, 2)
    held = r.run(x1, f1, m1, 0.4, s1)
    held_host = r.run(x1, f1, m1, 0.4, s1, out="host")
    snapshot = {k: v.clone() for k, v in held.tensors.items()}
    second = r.run(x2, f2, m2, 0.4, s2)
    torch.cuda.synchronize()
    assert not torch.equal(second["scores"], snapshot["scores"])  # the replay did rewrite its outputs
    for k in snapshot:
        assert torch.equal(held[k], snapshot[k]), k
        assert held_host[k].device.type == "cpu" and held_host[k].is_pinned()
        assert torch.equal(held_host.wait()[k], snapshot[k].cpu()), k


@needs_cuda
def test_gpu_new_bucket_captured_on_demand(cuda_model):
    r = GraphedImageStep(cuda_model)
    eager = GraphedImageStep(cuda_model, cuda_graphs=False)
    x, f, m, s = _cuda_inputs(cuda_model, 3, B=2, P=3)
    r.run(x, f, m, 0.4, s)
    x1, f1, m1, s1 = _cuda_inputs(cuda_model, 4, B=1, P=2)
    got = r.run(x1, f1, m1, 0.4, s1)
    assert len(r.entries) == 2 and all(e.graph is not None for e in r.entries.values())
    _assert_outputs_equal(got, eager.run(x1, f1, m1, 0.4, s1))
    again = r.run(x, f, m, 0.4, s)  # the first bucket still replays right after the second's capture
    _assert_outputs_equal(again, eager.run(x, f, m, 0.4, s))


@needs_cuda
def test_gpu_replay_makes_no_host_sync(cuda_model):
    r = GraphedImageStep(cuda_model)
    x, f, m, s = _cuda_inputs(cuda_model, 5)
    r.run(x, f, m, 0.4, s)  # capture (allowed to sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for out in ("clone", "none", "host"):
            r.run(x, f, m, 0.4, s, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@needs_cuda
def test_gpu_predictor_graphs_equal_eager(cuda_model):
    """The whole predictor (side-stream preprocessing, one-ahead pipeline, graphs) against the
    same predictor without graphs."""
    ims = [_image(48 + 4 * i, 64 - 2 * i, 30 + i) for i in range(5)]
    a = ImagePredictor(cuda_model, 0.3)
    b = ImagePredictor(cuda_model, 0.3, cuda_graphs=False)
    assert a.cuda_graphs and not b.cuda_graphs
    for _ in range(2):
        ga = a.predict(ims, ["bird", "tree", "sky"], batch_size=2)
        gb = b.predict(ims, ["bird", "tree", "sky"], batch_size=2)
        for pa, pb in zip(ga, gb):
            for ra, rb in zip(pa, pb):
                assert torch.equal(ra["masks"], rb["masks"])
                torch.testing.assert_close(ra["scores"], rb["scores"])
                torch.testing.assert_close(ra["boxes"], rb["boxes"])
    # the CUDA preprocessing (pinned memory, side stream) feeds the same pixels as preprocess()
    ref = _reference(cuda_model, ims[:2], ["bird"], 0.3)
    got = b.predict(ims[:2], ["bird"])
    for pr, pg in zip(ref, got):
        assert torch.equal(pr[0]["masks"], pg[0]["masks"])
        torch.testing.assert_close(pr[0]["scores"], pg[0]["scores"])
