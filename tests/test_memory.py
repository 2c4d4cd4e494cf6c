"""Parity of the tracker's memory path against the official ``sam3`` tracker (float32, CPU).

The official modules come from ``build_official_tracker(cfg)`` (a whole ``Sam3TrackerPredictor`` at
the config's sizes) re-drawn with ``redraw_``; ours load ``maskmem_backbone`` /
``transformer.encoder`` state dicts with ``strict=True``. Covered: the memory encoder (both mask
modes, with and without the antialiased resize, objects present and absent), the tracker's
``_encode_new_memory``, the memory attention (1 and 3 memory frames plus pointer tokens) and key
masking of padded memory slots (each with and without ``MemoryAttention.fold_value``), and the
memory assembly of ``_prepare_memory_conditioned_features`` on a hand-built ``output_dict``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from official_ref import build_official_tracker, cpu_mode, redraw_
from sam3fast.config import get_config
from sam3fast.model.memory import MaskMemoryEncoder, encode_new_memory
from sam3fast.model.memory_attention import MemoryAttention, assemble_memory

from compare import close as _close, rel as _rel


def _spread(x, name, min_std=1e-2):
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    assert x.float().std() > min_std, f"{name}: degenerate (std {x.float().std():.2e})"


def _sub(module, prefix):
    return {k[len(prefix):]: v for k, v in module.state_dict().items() if k.startswith(prefix)}


def _smooth_logits(gen, b, size, scale=6.0):
    # Blob-like logits (upsampled noise) so masks have regions, not speckle, at every scale.
    coarse = torch.randn(b, 1, max(size // 16, 2), max(size // 16, 2), generator=gen) * scale
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


class Setup:
    def __init__(self, name: str):
        self.cfg = get_config(name)
        self.official = redraw_(build_official_tracker(self.cfg), seed=0)
        self.encoder = MaskMemoryEncoder.from_config(self.cfg).eval()
        self.encoder.load_state_dict(_sub(self.official, "maskmem_backbone."), strict=True)
        self.attn = MemoryAttention.from_config(self.cfg).eval()
        self.attn.load_state_dict(_sub(self.official, "transformer.encoder."), strict=True)
        self.g = self.cfg.feat_size
        self.D = self.cfg.d_model
        self.M = self.cfg.tracker.mem_dim

    def run_official_attn(self, curr, curr_pos, memory, memory_pos, n_ptr):
        with cpu_mode(), torch.no_grad():
            out = self.official.transformer.encoder(
                src=[curr.transpose(0, 1)], src_key_padding_mask=[None], src_pos=[curr_pos.transpose(0, 1)],
                prompt=memory.transpose(0, 1), prompt_pos=memory_pos.transpose(0, 1),
                feat_sizes=[(self.g, self.g)], num_obj_ptr_tokens=n_ptr,
            )
        return out["memory"].transpose(0, 1)

    def attn_inputs(self, B, n_mem, n_ptrs, seed):
        gen = torch.Generator().manual_seed(seed)
        L, D, M = self.g * self.g, self.D, self.M
        T = n_ptrs * (D // M)
        curr = torch.randn(B, L, D, generator=gen)
        curr_pos = torch.randn(B, L, D, generator=gen)
        memory = torch.randn(B, n_mem * L + T, M, generator=gen)
        memory_pos = torch.randn(B, n_mem * L + T, M, generator=gen)
        return curr, curr_pos, memory, memory_pos, T


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Setup("tiny")


@pytest.fixture(params=[False, True], ids=["unfolded", "fold_value"])
def fold(request, tiny):
    """The memory attention with and without its value fold (restored off after the test)."""
    tiny.attn.fold_value = request.param
    yield request.param
    tiny.attn.fold_value = False


# ----------------------------------------------------------------------------------------------
# Memory encoder


@pytest.mark.parametrize("skip_sigmoid", [False, True])
@pytest.mark.parametrize("resize", [False, True])
def test_memory_encoder(tiny, skip_sigmoid, resize):
    gen = torch.Generator().manual_seed(1)
    B, I = 3, tiny.cfg.tracker.mem_interpol_size
    size = tiny.cfg.resolution if resize else I  # the new-object path feeds 1008^2, the per-frame 1152^2
    assert (size != I) == resize
    pix = torch.randn(B, tiny.D, tiny.g, tiny.g, generator=gen)
    masks = _smooth_logits(gen, B, size)
    if skip_sigmoid:
        masks = torch.sigmoid(masks) * 20 - 10
    with cpu_mode(), torch.no_grad():
        ref = tiny.official.maskmem_backbone(pix, masks, skip_mask_sigmoid=skip_sigmoid)
    with torch.no_grad():
        feat, pos = tiny.encoder(pix, masks, skip_mask_sigmoid=skip_sigmoid)
    _close(feat, ref["vision_features"], "maskmem_features")
    _close(pos, ref["vision_pos_enc"][0], "maskmem_pos", tol=1e-6)
    _spread(feat, "maskmem_features")
    # the mask branch matters: another mask changes the memory
    with torch.no_grad():
        feat2, _ = tiny.encoder(pix, masks.flip(-1), skip_mask_sigmoid=skip_sigmoid)
    assert _rel(feat2, feat) > 1e-2


def test_memory_encoder_channels_last_fuser(tiny):
    """``channels_last_fuser``: the fuser's map in channels-last memory ("auto": CUDA only, so the
    CPU default is the NCHW path) gives the NCHW path's features within float32 summation order,
    NCHW contiguous out, the same position encoding; the switch takes True, False, "auto" only."""
    gen = torch.Generator().manual_seed(4)
    B, I = 3, tiny.cfg.tracker.mem_interpol_size
    pix = torch.randn(B, tiny.D, tiny.g, tiny.g, generator=gen)
    masks = _smooth_logits(gen, B, I)
    enc = tiny.encoder
    assert enc.channels_last_fuser == "auto"
    try:
        with torch.no_grad():
            nchw, pos = enc(pix, masks)
            enc.channels_last_fuser = True
            cl, pos_cl = enc(pix, masks)
            # a frame feature shared by the objects (the tracker's case): broadcast over the batch
            cl1, _ = enc(pix[:1], masks)
            enc.channels_last_fuser = False
            nchw1, _ = enc(pix[:1], masks)
        assert cl.is_contiguous() and cl.shape == nchw.shape
        assert torch.equal(pos_cl, pos)
        _close(cl, nchw, "channels-last fuser", tol=1e-5)
        _close(cl1, nchw1, "channels-last fuser, shared frame", tol=1e-5)
        for bad in ("yes", 1, None):
            enc.channels_last_fuser = bad
            with pytest.raises(ValueError, match="channels_last_fuser"):
                enc(pix, masks)
    finally:
        enc.channels_last_fuser = "auto"


@pytest.mark.parametrize("is_mask_from_pts", [False, True])
def test_encode_new_memory(tiny, is_mask_from_pts):
    gen = torch.Generator().manual_seed(2)
    B, g, D = 3, tiny.g, tiny.D
    # binarised masks come from the new-object path (1008^2 -> resize); logits from tracking (1152^2)
    size = tiny.cfg.resolution if is_mask_from_pts else tiny.cfg.tracker.mem_interpol_size
    pix = torch.randn(B, D, g, g, generator=gen)
    masks = _smooth_logits(gen, B, size)
    obj = torch.tensor([[2.0], [-1.5], [0.0]])  # present, absent, absent (logit 0 is not > 0)
    with cpu_mode(), torch.no_grad():
        ref_feat, ref_pos = tiny.official._encode_new_memory(
            image=None, current_vision_feats=[pix.flatten(2).permute(2, 0, 1)], feat_sizes=[(g, g)],
            pred_masks_high_res=masks, object_score_logits=obj, is_mask_from_pts=is_mask_from_pts,
        )
    with torch.no_grad():
        feat, pos = encode_new_memory(tiny.encoder, pix, masks, obj, tiny.official.no_obj_embed_spatial,
                                      is_mask_from_pts=is_mask_from_pts)
    _close(feat, ref_feat, "maskmem_features")
    _close(pos, ref_pos[0], "maskmem_pos", tol=1e-6)
    _spread(feat, "maskmem_features")
    # absent objects really got no_obj_embed_spatial
    mem_in = (masks > 0).float() if is_mask_from_pts else torch.sigmoid(masks)
    with torch.no_grad():
        plain, _ = tiny.encoder(pix, mem_in * 20 - 10, skip_mask_sigmoid=True)
    emb = tiny.official.no_obj_embed_spatial.detach()[0][:, None, None]
    torch.testing.assert_close(feat[0], plain[0])
    torch.testing.assert_close(feat[1], plain[1] + emb)
    torch.testing.assert_close(feat[2], plain[2] + emb)


# ----------------------------------------------------------------------------------------------
# Memory attention


@pytest.mark.parametrize("n_mem,n_ptrs", [(1, 1), (3, 3)])
def test_memory_attention(tiny, fold, n_mem, n_ptrs):
    curr, curr_pos, memory, memory_pos, T = tiny.attn_inputs(2, n_mem, n_ptrs, seed=3 + n_mem)
    ref = tiny.run_official_attn(curr, curr_pos, memory, memory_pos, T)
    with torch.no_grad():
        out = tiny.attn(curr, curr_pos, memory, memory_pos, T)
        out_all_valid = tiny.attn(curr, curr_pos, memory, memory_pos, T,
                                  memory_valid=torch.ones(memory.shape[:2], dtype=torch.bool))
    _close(out, ref, "pix_feat_with_mem")
    _close(out_all_valid, ref, "pix_feat_with_mem (all valid)")
    _spread(out, "pix_feat_with_mem", min_std=0.1)
    # the memory matters, and the pointer tokens matter
    with torch.no_grad():
        other = tiny.attn(curr, curr_pos, memory.flip(1), memory_pos, T)
        mem2 = memory.clone()
        mem2[:, -T:] = torch.randn(2, T, tiny.M)
        other_ptr = tiny.attn(curr, curr_pos, mem2, memory_pos, T)
    assert _rel(other, out) > 1e-2 and _rel(other_ptr, out) > 1e-3


def test_memory_valid_padding(tiny, fold):
    """A padded frame slot (in the middle) and a padded pointer slot, masked out, give the
    official result on the real slots alone."""
    B, L, D, M = 2, tiny.g * tiny.g, tiny.D, tiny.M
    k = D // M
    curr, curr_pos, memory, memory_pos, T = tiny.attn_inputs(B, 2, 2, seed=7)
    ref = tiny.run_official_attn(curr, curr_pos, memory, memory_pos, T)

    gen = torch.Generator().manual_seed(8)
    junk = lambda n: torch.randn(B, n, M, generator=gen) * 5  # noqa: E731
    frames, ptrs = memory[:, : 2 * L], memory[:, 2 * L:]
    frames_pos, ptrs_pos = memory_pos[:, : 2 * L], memory_pos[:, 2 * L:]
    # layout: frame0, PAD frame, frame1 | ptr0, PAD ptr, ptr1
    mem_p = torch.cat((frames[:, :L], junk(L), frames[:, L:], ptrs[:, :k], junk(k), ptrs[:, k:]), dim=1)
    pos_p = torch.cat((frames_pos[:, :L], junk(L), frames_pos[:, L:], ptrs_pos[:, :k], junk(k), ptrs_pos[:, k:]), 1)
    valid = torch.ones(B, mem_p.shape[1], dtype=torch.bool)
    valid[:, L: 2 * L] = False
    valid[:, 3 * L + k: 3 * L + 2 * k] = False
    with torch.no_grad():
        out = tiny.attn(curr, curr_pos, mem_p, pos_p, T + k, memory_valid=valid)
        unmasked = tiny.attn(curr, curr_pos, mem_p, pos_p, T + k)
    _close(out, ref, "padded + masked")
    assert _rel(unmasked, ref) > 1e-2  # the junk would matter without the mask


# ----------------------------------------------------------------------------------------------
# Memory assembly vs _prepare_memory_conditioned_features


@pytest.mark.parametrize("dim,temperature", [(256, 10000), (64, 10000), (6, 100.0)])
def test_get_1d_sine_pe_cached_divisors(tiny, dim, temperature):
    """``get_1d_sine_pe`` keeps its frequency divisors per (size, temperature, device) after the
    first call: bit for bit the official function on fresh positions, call after call, and one
    cache entry per size."""
    from sam3.model.sam3_tracker_utils import get_1d_sine_pe as official_pe
    from sam3fast.model import memory_attention as ma

    key = (dim // 2, float(temperature), torch.device("cpu"))
    ma._SINE_DIVISORS.pop(key, None)
    g = torch.Generator().manual_seed(dim)
    for _ in range(3):
        pos = torch.rand(2, 5, generator=g) * 17
        with cpu_mode():
            want = official_pe(pos, dim, temperature)
        got = ma.get_1d_sine_pe(pos, dim, temperature)
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    assert key in ma._SINE_DIVISORS and ma._sine_divisors(dim // 2, temperature, pos.device) is ma._SINE_DIVISORS[key]


def test_assemble_memory(tiny):
    tr, g, D, M = tiny.official, tiny.g, tiny.D, tiny.M
    B, frame_idx, num_frames = 2, 10, 20
    gen = torch.Generator().manual_seed(9)

    def frame_out():
        return {
            "maskmem_features": torch.randn(B, M, g, g, generator=gen),
            "maskmem_pos_enc": [torch.randn(B, M, g, g, generator=gen)],  # distinct per frame: order matters
            "obj_ptr": torch.randn(B, D, generator=gen),
        }

    cond = {t: frame_out() for t in (0, 2, 3, 15, 18)}
    non_cond = {t: frame_out() for t in (1, 4, 5, 7, 8, 9)}  # frame 6 missing: its slot is skipped
    output_dict = {"cond_frame_outputs": cond, "non_cond_frame_outputs": non_cond}

    # What the official selects (max 4 cond frames, 7 memory slots, 16 pointers, stride 1):
    # cond frames 3 (closest before), 15 (closest after), then 2 and 18 (distance 8 each); 0 unselected.
    # Non-cond t_pos 1..6 = frames 4..9 (6 absent). Pointers: selected cond frames <= 10 (3, 2), then
    # t_diff 1..10 = frames 9..0 where present (non-cond, or the unselected cond frame 0).
    mem_frames = [(cond[3], 0), (cond[15], 0), (cond[2], 0), (cond[18], 0),
                  (non_cond[4], 1), (non_cond[5], 2), (non_cond[7], 4), (non_cond[8], 5), (non_cond[9], 6)]
    ptr_frames = [(cond[3], 7), (cond[2], 8), (non_cond[9], 1), (non_cond[8], 2), (non_cond[7], 3),
                  (non_cond[5], 5), (non_cond[4], 6), (non_cond[1], 9), (cond[0], 10)]

    curr = torch.randn(B, g * g, D, generator=gen)
    curr_pos = torch.randn(B, g * g, D, generator=gen)
    captured = {}
    enc = tr.transformer.encoder
    orig_forward = enc.forward

    def spy(**kw):
        captured.update(kw)
        return orig_forward(**kw)

    enc.forward = spy
    try:
        with cpu_mode(), torch.no_grad():
            ref = tr._prepare_memory_conditioned_features(
                frame_idx=frame_idx, is_init_cond_frame=False,
                current_vision_feats=[curr.transpose(0, 1)], current_vision_pos_embeds=[curr_pos.transpose(0, 1)],
                feat_sizes=[(g, g)], output_dict=output_dict, num_frames=num_frames,
            )
    finally:
        del enc.forward

    with torch.no_grad():
        memory, memory_pos, n_ptr = assemble_memory(
            maskmem_features=torch.stack([o["maskmem_features"] for o, _ in mem_frames], dim=1),
            maskmem_pos=torch.stack([o["maskmem_pos_enc"][-1] for o, _ in mem_frames], dim=1),
            mem_tpos=torch.tensor([t for _, t in mem_frames]),
            obj_ptrs=torch.stack([o["obj_ptr"] for o, _ in ptr_frames], dim=1),
            ptr_tpos=torch.tensor([t for _, t in ptr_frames]),
            maskmem_tpos_enc=tr.maskmem_tpos_enc,
            obj_ptr_tpos_proj=tr.obj_ptr_tpos_proj,
            max_obj_ptrs_in_encoder=min(num_frames, tr.max_obj_ptrs_in_encoder),
        )
        out = tiny.attn(curr, curr_pos, memory, memory_pos, n_ptr)

    assert n_ptr == captured["num_obj_ptr_tokens"] == len(ptr_frames) * (D // M)
    torch.testing.assert_close(memory, captured["prompt"].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(memory_pos, captured["prompt_pos"].transpose(0, 1), rtol=1e-6, atol=1e-6)
    _close(out.transpose(1, 2).reshape(B, D, g, g), ref, "pix_feat_with_mem")
    _spread(memory_pos[:, -n_ptr:], "pointer pos")


# ----------------------------------------------------------------------------------------------
# Full size


@pytest.mark.slow
def test_memory_attention_full_size():
    """Official sizes (D 256, M 64, 72x72, 4 layers): 7 memory frames + 16 pointers (64 tokens)."""
    torch.manual_seed(0)
    cfg = get_config("sam3")
    official = redraw_(build_official_tracker(cfg), seed=0)
    attn = MemoryAttention.from_config(cfg).eval()
    attn.load_state_dict(_sub(official, "transformer.encoder."), strict=True)
    gen = torch.Generator().manual_seed(11)
    B, L, D, M = 1, cfg.feat_size ** 2, cfg.d_model, cfg.tracker.mem_dim
    T = 16 * (D // M)
    S = 7 * L + T
    curr, curr_pos = torch.randn(B, L, D, generator=gen), torch.randn(B, L, D, generator=gen)
    memory, memory_pos = torch.randn(B, S, M, generator=gen), torch.randn(B, S, M, generator=gen)
    with cpu_mode(), torch.no_grad():
        ref = official.transformer.encoder(
            src=[curr.transpose(0, 1)], src_key_padding_mask=[None], src_pos=[curr_pos.transpose(0, 1)],
            prompt=memory.transpose(0, 1), prompt_pos=memory_pos.transpose(0, 1),
            feat_sizes=[(cfg.feat_size,) * 2], num_obj_ptr_tokens=T,
        )["memory"].transpose(0, 1)
    with torch.no_grad():
        out = attn(curr, curr_pos, memory, memory_pos, T)
    _close(out, ref, "pix_feat_with_mem (full size)")
    _spread(out, "pix_feat_with_mem", min_std=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_attention_uses_kernel_on_cuda(dtype):
    """On CUDA the module runs the Triton memory-attention op: full-size shapes (7 frames + 16
    pointers, padded bank slots) against its own SDPA path, within the bf16 rounding budget."""
    from sam3fast.ops import memory_attention_backend

    cfg = get_config("sam3")
    torch.manual_seed(0)
    m = MemoryAttention.from_config(cfg).cuda().to(dtype).eval()
    B, L, D, M = 2, cfg.feat_size ** 2, cfg.d_model, cfg.tracker.mem_dim
    S = 9 * L + 16 * D // M
    curr, curr_pos = torch.randn(B, L, D, device="cuda", dtype=dtype), torch.randn(B, L, D, device="cuda", dtype=dtype)
    mem, mem_pos = torch.randn(B, S, M, device="cuda", dtype=dtype), torch.randn(B, S, M, device="cuda", dtype=dtype)
    valid = torch.ones(B, S, dtype=torch.bool, device="cuda")
    valid[:, 7 * L:9 * L] = False  # two padded frames
    valid[1, -32:] = False  # padded pointers
    assert memory_attention_backend(curr.view(B, L, 1, D))[0] == "triton"
    with torch.no_grad():
        got = m(curr, curr_pos, mem, mem_pos, 16 * D // M, valid)
        for layer in m.layers:
            layer.self_attn.use_kernel = layer.cross_attn_image.use_kernel = False
        ref = m(curr, curr_pos, mem, mem_pos, 16 * D // M, valid)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.isfinite(got).all()
    assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < tol


def test_memory_attention_shared_frame_rows(tiny, fold):
    """One frame's features expanded over the objects (the tracker's call: batch stride 0): the
    first self-attention runs once (``MemoryAttention`` detects the stride) and the result equals
    the official run on the same rows repeated in memory."""
    B = 3
    curr, curr_pos, memory, memory_pos, T = tiny.attn_inputs(B, 2, 2, seed=11)
    curr1, pos1 = curr[:1], curr_pos[:1]
    ref = tiny.run_official_attn(curr1.repeat(B, 1, 1), pos1.repeat(B, 1, 1), memory, memory_pos, T)
    calls = []
    sa = tiny.attn.layers[0].self_attn
    hook = sa.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        with torch.no_grad():
            shared = tiny.attn(curr1.expand(B, -1, -1), pos1.expand(B, -1, -1), memory, memory_pos, T)
            shared_pos1 = tiny.attn(curr1.expand(B, -1, -1), pos1, memory, memory_pos, T)
            plain = tiny.attn(curr1.repeat(B, 1, 1), pos1.repeat(B, 1, 1), memory, memory_pos, T)
    finally:
        hook.remove()
    assert calls == [1, 1, B]  # once per shared call; the repeated rows run as they are
    for out in (shared, shared_pos1, plain):
        _close(out, ref, "pix_feat_with_mem (shared frame rows)")
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-5)
    assert _rel(shared[0], shared[1]) > 1e-3  # the memories differ per object: so do the outputs


def test_cxblock_tanh_gelu_epilogue_switch():
    """``CXBlock.tanh_gelu_epilogue``: "auto" keeps the exact GELU on CPU (bit for bit the block's
    official operations) and in float32; True computes pwconv1 and the tanh GELU (on CPU: the linear,
    then ``gelu(approximate="tanh")``, what cuBLASLt's epilogue approximates on CUDA), at most the
    tanh form's 4.7e-4 per hidden unit away from the exact block; other values are refused."""
    from sam3fast.model.memory import CXBlock

    torch.manual_seed(0)
    block = CXBlock(32).eval()
    with torch.no_grad():
        block.gamma.uniform_(0.5, 1.5)
    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        y = F.layer_norm(block.dwconv(x).permute(0, 2, 3, 1), (32,), block.norm.weight, block.norm.bias, block.norm.eps)
        exact = x + (block.pwconv2(F.gelu(block.pwconv1(y))) * block.gamma).permute(0, 3, 1, 2)
        tanh = x + (block.pwconv2(F.gelu(block.pwconv1(y), approximate="tanh")) * block.gamma).permute(0, 3, 1, 2)
        assert not block.uses_tanh_epilogue(y) and torch.equal(block(x), exact)
        block.tanh_gelu_epilogue = True
        assert block.uses_tanh_epilogue(y)
        got = block(x)
    assert torch.equal(got, tanh) and not torch.equal(got, exact)
    bound = 4.8e-4 * (block.pwconv2.weight.abs().sum(dim=1) * block.gamma.abs()).max().item()
    assert (got - exact).abs().max().item() <= bound
    block.tanh_gelu_epilogue = "on"
    with pytest.raises(ValueError, match="tanh_gelu_epilogue must be True, False or 'auto'"):
        block(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cxblock_tanh_gelu_epilogue_on_cuda():
    """Full-size block, 16 objects, bf16 on CUDA: "auto" takes cuBLASLt's tanh-GELU epilogue, and its
    error against the float32 block with the exact GELU is at most 2x that of the bf16 block with the
    exact GELU (``tanh_gelu_epilogue = False``)."""
    from sam3fast.model.memory import CXBlock

    torch.manual_seed(0)
    block = CXBlock(256).cuda().eval()
    with torch.no_grad():
        block.gamma.uniform_(0.5, 1.5)
    x = torch.randn(16, 256, 72, 72, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = block(x)  # float32: the exact GELU
        b16 = block.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        y_probe = torch.zeros(1, 1, 1, 256, device="cuda", dtype=torch.bfloat16)
        assert b16.uses_tanh_epilogue(y_probe)
        got = b16(xb)
        b16.tanh_gelu_epilogue = False
        exact = b16(xb)
    err = (got.float() - ref).abs().max().item()
    err_exact = (exact.float() - ref).abs().max().item()
    assert torch.isfinite(got).all() and err <= 2 * err_exact + 1e-6, (err, err_exact)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cxblock_channels_last_dwconv_on_cuda():
    """On CUDA the fuser's depthwise convolution reads a channels-last copy (cuDNN instead of
    PyTorch's generic bf16 kernel): full-size block, 16 objects, bf16 output against the float32
    reference at most 2x the error of the contiguous (generic kernel) path, and the same layout out."""
    from sam3fast.model.memory import CXBlock

    torch.manual_seed(0)
    block = CXBlock(256).cuda().eval()
    with torch.no_grad():
        block.gamma.uniform_(0.5, 1.5)
    x = torch.randn(16, 256, 72, 72, device="cuda")
    with torch.no_grad():
        ref = block(x)  # float32
        b16 = block.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        got = b16(xb)
        CXBlock.CHANNELS_LAST_DWCONV = False
        try:
            generic = b16(xb)
        finally:
            CXBlock.CHANNELS_LAST_DWCONV = True
    err = (got.float() - ref).abs().max().item()
    err_generic = (generic.float() - ref).abs().max().item()
    assert torch.isfinite(got).all() and err <= 2 * err_generic + 1e-6, (err, err_generic)
    assert got.is_contiguous() == generic.is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_memory_encoder_channels_last_fuser_on_cuda():
    """On CUDA the fuser runs channels-last by default ("auto"): full-size encoder, 16 objects and
    one shared frame feature, bf16 against the float32 encoder at most 2x the error of the NCHW path
    (``channels_last_fuser = False``), NCHW contiguous out."""
    torch.manual_seed(0)
    enc = MaskMemoryEncoder(256, 64, 1152).cuda().eval()
    pix = torch.randn(1, 256, 72, 72, device="cuda")
    masks = torch.randn(16, 1, 1152, 1152, device="cuda").mul_(10).sigmoid_()
    with torch.no_grad():
        ref, _ = enc(pix, masks, skip_mask_sigmoid=True)
        e16 = enc.to(torch.bfloat16)
        got, _ = e16(pix.bfloat16(), masks.bfloat16(), skip_mask_sigmoid=True)
        e16.channels_last_fuser = False
        nchw, _ = e16(pix.bfloat16(), masks.bfloat16(), skip_mask_sigmoid=True)
    err = (got.float() - ref).abs().max().item()
    err_nchw = (nchw.float() - ref).abs().max().item()
    assert got.is_contiguous() and torch.isfinite(got).all()
    assert err <= 2 * err_nchw + 1e-6, (err, err_nchw)
