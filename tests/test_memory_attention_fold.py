"""The value fold of the tracker's memory cross-attention (``RoPEAttention.fold_value``,
``MemoryAttention.fold_value``): attending over the raw M-wide memory and applying out_proj . v_proj
as one linear equals the unfolded module, on random weights, with padded keys and rows that have no
valid key, for one head and two; through the PyTorch path (CPU) and the Triton kernel (interpreter);
and the folded weights follow the parameters (nothing cached). Parity of the folded module against
the official ``sam3`` module is in tests/test_memory.py (parametrized over the fold).
"""

from __future__ import annotations

import pytest
import torch

from kernel_checks import randomize_
from sam3fast.kernels import memory_attention as ma
from sam3fast.model import memory_attention as mam
from sam3fast.model.memory_attention import MemoryAttention, RoPEAttention
from sam3fast.model.vit import compute_axial_cis

pytestmark = pytest.mark.usefixtures("one_thread_module")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not ma.HAS_TRITON, reason=f"triton not importable: {ma.TRITON_IMPORT_ERROR}")

# (dtype, max abs difference folded vs unfolded)
DTYPES = [(torch.float64, 1e-12), (torch.float32, 2e-5)]




def _inputs(B, D, M, grid, n_frames, T, seed, dtype):
    """x (B, L, D), keys' input and memory (B, S, M), the complex table, key_valid with a padded
    frame, a padded pointer slot and (last element) no valid key at all."""
    g = torch.Generator().manual_seed(seed)
    L = grid[0] * grid[1]
    S = n_frames * L + T
    x = torch.randn(B, L, D, generator=g).to(dtype)
    mem_k = torch.randn(B, S, M, generator=g).to(dtype)
    mem = torch.randn(B, S, M, generator=g).to(dtype)
    key_valid = torch.rand(B, S, generator=g) > 0.3
    key_valid[:, 0] = True
    key_valid[0, L:2 * L] = False
    key_valid[0, -1] = False
    key_valid[-1] = False
    return x, mem_k, mem, key_valid


def _pair(D, H, M, seed, dtype):
    unfolded = randomize_(RoPEAttention(D, H, kv_in_dim=M), seed).to(dtype)
    folded = randomize_(RoPEAttention(D, H, kv_in_dim=M, fold_value=True), seed).to(dtype)
    assert folded.folds_value and not unfolded.folds_value
    return unfolded, folded


@pytest.mark.parametrize("H", [1, 2])
@pytest.mark.parametrize("dtype, tol", DTYPES, ids=["float64", "float32"])
def test_rope_attention_fold_matches_unfolded(dtype, tol, H):
    D, M, grid, n_frames, T, B = 32, 16, (3, 3), 3, 4, 3
    unfolded, folded = _pair(D, H, M, seed=H, dtype=dtype)
    freqs = compute_axial_cis(D // H, *grid)
    x, mem_k, mem, key_valid = _inputs(B, D, M, grid, n_frames, T, seed=10 + H, dtype=dtype)
    with torch.no_grad():
        for valid in (key_valid, None):
            want = unfolded(x, mem_k, mem, freqs, T, valid)
            got = folded(x, mem_k, mem, freqs, T, valid)
            assert got.dtype == dtype and got.shape == want.shape == (B, 9, D)
            err = (got - want).abs().max().item()
            assert err <= tol, f"max abs difference {err:.3g} > {tol:.3g}"
        # The row with no valid key: out_proj(0) = bo in both paths, bit for bit.
        got = folded(x, mem_k, mem, freqs, T, key_valid)
        assert torch.equal(got[-1], folded.out_proj.bias.expand(9, D))
        assert torch.equal(got[-1], unfolded(x, mem_k, mem, freqs, T, key_valid)[-1])
        # The memory's values matter (a fold that ignored v would pass the bias check above).
        assert (folded(x, mem_k, mem.flip(1), freqs, T, key_valid)[0] - got[0]).abs().max() > 1e-2


def test_folded_out_proj_formula():
    """W = concat_h(Wo[:, h block] @ Wv[h block, :]), b = Wo bv + bo, in the requested dtype."""
    D, H, M = 32, 4, 8
    m = randomize_(RoPEAttention(D, H, kv_in_dim=M, fold_value=True), seed=3).double()
    w, b = m.folded_out_proj(torch.float64)
    dh = D // H
    wo, wv = m.out_proj.weight, m.v_proj.weight
    want = torch.cat([wo[:, h * dh:(h + 1) * dh] @ wv[h * dh:(h + 1) * dh, :] for h in range(H)], dim=1)
    assert w.shape == (D, H * M) and b.shape == (D,)
    torch.testing.assert_close(w, want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(b, wo @ m.v_proj.bias + m.out_proj.bias, rtol=1e-14, atol=1e-14)
    w16, b16 = m.float().folded_out_proj(torch.bfloat16)  # computed in float32, rounded once
    assert w16.dtype == b16.dtype == torch.bfloat16
    torch.testing.assert_close(w16.double(), want, rtol=1e-2, atol=1e-2)


def test_fold_follows_reloaded_weights():
    """The folded weight is derived at each call: changing v_proj / out_proj in place (a reload)
    changes the folded output exactly as the unfolded one."""
    D, H, M, grid, T = 32, 1, 16, (3, 3), 4
    unfolded, folded = _pair(D, H, M, seed=5, dtype=torch.float64)
    freqs = compute_axial_cis(D, *grid)
    x, mem_k, mem, key_valid = _inputs(2, D, M, grid, 2, T, seed=6, dtype=torch.float64)
    with torch.no_grad():
        before = folded(x, mem_k, mem, freqs, T, key_valid)
        for m in (unfolded, folded):
            m.load_state_dict(randomize_(RoPEAttention(D, H, kv_in_dim=M), seed=7).double().state_dict())
        after = folded(x, mem_k, mem, freqs, T, key_valid)
        want = unfolded(x, mem_k, mem, freqs, T, key_valid)
    assert (after - before).abs().max() > 1e-2
    assert (after - want).abs().max() <= 1e-12


def test_self_attention_ignores_fold():
    """fold_value only applies where kv_in_dim != embedding_dim (the cross-attention)."""
    m = randomize_(RoPEAttention(32, 1, fold_value=True), seed=8).double()
    assert m.fold_value and not m.folds_value
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    freqs = compute_axial_cis(32, 3, 3)
    with torch.no_grad():
        got = m(x, x, x, freqs)
        m.fold_value = False
        assert torch.equal(got, m(x, x, x, freqs))


@needs_triton
@pytest.mark.parametrize("H", [1, 2])
def test_fold_kernel_path_interpreted(monkeypatch, H):
    """The module's kernel branch (taken on CUDA) run on CPU through the Triton launcher under the
    interpreter, outputs pre-filled with NaN: the folded call hands the kernel the M-wide memory
    shared by the heads (stride 0) and matches the unfolded module; padded rows give bo."""
    seen = []

    def launcher(q, k, v, freqs_cis, key_valid=None, *, rope_q=True, n_rope_keys=None):
        seen.append((v.shape[-1], v.stride(2)))
        out = torch.full((*q.shape[:3], v.shape[-1]), float("nan"), dtype=q.dtype)
        return ma._memory_attention_triton(q, k, v, torch.view_as_real(freqs_cis), key_valid, rope_q, n_rope_keys,
                                           out=out, block_m=16, block_n=16, num_splits=2)

    D, M, grid, T, B = 32, 16, (3, 3), 4, 3
    unfolded, folded = _pair(D, H, M, seed=20 + H, dtype=torch.float32)
    freqs = compute_axial_cis(D // H, *grid)
    x, mem_k, mem, key_valid = _inputs(B, D, M, grid, 2, T, seed=21, dtype=torch.float32)
    with torch.no_grad():
        want = unfolded(x, mem_k, mem, freqs, T, key_valid)  # PyTorch path (CPU): the spec here
        monkeypatch.setattr(mam, "memory_attention_backend", lambda q, dv=None: ("triton", "test"))
        monkeypatch.setattr(mam, "memory_attention", launcher)
        got = folded(x, mem_k, mem, freqs, T, key_valid)
        got_unfolded = unfolded(x, mem_k, mem, freqs, T, key_valid)
    assert seen == [(M, 0 if H > 1 else M), (D // H, D // H)]  # (Dv, v's head stride): folded, then unfolded
    assert not got.isnan().any()
    assert (got - want).abs().max() <= 2e-5 and (got_unfolded - want).abs().max() <= 2e-5
    assert torch.equal(got[-1], folded.out_proj.bias.expand(9, D))


def _tiny_memory_attention(seed, fold_value=False, num_heads=1):
    m = MemoryAttention(d_model=32, mem_dim=16, num_layers=2, dim_feedforward=48, grid=3, num_heads=num_heads,
                        fold_value=fold_value)
    return randomize_(m, seed).eval()


def test_memory_attention_switch():
    """The constructor flag and the ``fold_value`` property reach every cross-attention (and no
    self-attention); the state dict is the same either way; the default is "auto"; other values are
    refused by name."""
    assert MemoryAttention(d_model=32, mem_dim=16, num_layers=2, dim_feedforward=48, grid=3).fold_value == "auto"
    m = _tiny_memory_attention(0, fold_value=True)
    assert m.fold_value and all(layer.cross_attn_image.folds_value for layer in m.layers)
    assert not any(layer.self_attn.fold_value for layer in m.layers)
    m.fold_value = False
    assert not any(layer.cross_attn_image.fold_value for layer in m.layers)
    m.fold_value = True
    assert m.fold_value
    m.layers[1].cross_attn_image.fold_value = False
    assert not m.fold_value  # True only when every layer folds
    assert list(m.state_dict()) == list(_tiny_memory_attention(0).state_dict())
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="fold_value must be True, False or 'auto'"):
            m.fold_value = bad
        with pytest.raises(ValueError, match="fold_value must be True, False or 'auto'"):
            m.layers[0].cross_attn_image.fold_value = bad


def test_auto_fold_follows_the_sdpa_path():
    """"auto" folds exactly where the kernel op would hand the folded call to SDPA (a Triton-capable
    device, here the CUDA dispatch taken on CPU, ``KernelPathsOnCpu``; bf16/fp16; at least
    SDPA_MIN_BATCH_HEADS_FOLD (object, head) pairs; ``use_kernel``) or to its Triton kernel with q
    and the keys projected rotated (weights in the queries' dtype, ``fuse_rope_projection`` on);
    never on the CPU path, in float32, or for a self-attention; and forward then computes what
    fold_value=True computes."""
    from kernel_checks import KernelPathsOnCpu

    m = randomize_(RoPEAttention(32, 1, kv_in_dim=16, fold_value="auto"), seed=9)
    self_attn = RoPEAttention(32, 1, fold_value="auto")
    n = ma.SDPA_MIN_BATCH_HEADS_FOLD

    def q(B, dtype=torch.bfloat16, H=1):
        return torch.zeros(B, 9, H, 32 // H, dtype=dtype)

    assert not m.folds_value and not m.folds_for(q(n))  # CPU path
    with KernelPathsOnCpu():
        assert m.folds_for(q(n)) and not m.folds_for(q(n - 1)) and m.folds_for(q(n, torch.float16))
        assert not m.folds_for(q(n, torch.float32)) and not self_attn.folds_for(q(n))
        m.use_kernel = False
        assert not m.folds_for(q(n))
        m.use_kernel = True
        m16 = m.to(torch.bfloat16)
        # bf16 weights: below the SDPA threshold the Triton kernel gets rotated projections, and folds
        assert m16.folds_for(q(n - 1)) and m16.folds_for(q(1)) and m16.folds_for(q(n))
        m16.fuse_rope_projection = False  # (the instance's switch) the kernel rotating q and keys itself
        assert not m16.folds_for(q(n - 1)) and m16.folds_for(q(n))
        m16.fuse_rope_projection = "auto"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not m16.folds_for(q(1))  # (no rotated projections under autocast)
        assert not m16.folds_for(q(1).float())
        g = torch.Generator().manual_seed(10)
        x = torch.randn(n, 9, 32, generator=g).bfloat16()
        mem_k, mem = (torch.randn(n, 2 * 9 + 4, 16, generator=g).bfloat16() for _ in range(2))
        freqs = compute_axial_cis(32, 3, 3)
        with torch.no_grad():
            auto = m16(x, mem_k, mem, freqs, 4)
            m16.fold_value = True
            fold = m16(x, mem_k, mem, freqs, 4)
            m16.fold_value = False
            unfold = m16(x, mem_k, mem, freqs, 4)
    assert torch.equal(auto, fold) and not torch.equal(auto, unfold)


@pytest.mark.parametrize("num_heads", [1, 2])
@pytest.mark.parametrize("dtype, tol", DTYPES, ids=["float64", "float32"])
def test_memory_attention_fold_matches_unfolded(dtype, tol, num_heads):
    """The whole module (2 layers) folded vs unfolded on random weights, pointer tokens, padded frame
    and pointer slots masked."""
    m = _tiny_memory_attention(1, num_heads=num_heads).to(dtype)
    g = torch.Generator().manual_seed(2)
    B, L, T = 2, 9, 4
    S = 3 * L + T
    curr, curr_pos = (torch.randn(B, L, 32, generator=g).to(dtype) for _ in range(2))
    memory, memory_pos = (torch.randn(B, S, 16, generator=g).to(dtype) for _ in range(2))
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, L:2 * L] = False
    valid[1, -2:] = False
    with torch.no_grad():
        want = m(curr, curr_pos, memory, memory_pos, T, valid)
        m.fold_value = True
        got = m(curr, curr_pos, memory, memory_pos, T, valid)
        got_all = m(curr, curr_pos, memory, memory_pos, T)
        m.fold_value = False
        want_all = m(curr, curr_pos, memory, memory_pos, T)
    assert (got - want).abs().max().item() <= 10 * tol  # through 2 layers and LayerNorms
    assert (got_all - want_all).abs().max().item() <= 10 * tol
    assert (got - got_all).abs().max() > 1e-3  # the mask mattered


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_fold_compiles_fullgraph(backend):
    m = _tiny_memory_attention(3, fold_value=True)
    g = torch.Generator().manual_seed(4)
    B, L, T = 2, 9, 4
    S = 2 * L + T
    args = [torch.randn(B, L, 32, generator=g), torch.randn(B, L, 32, generator=g),
            torch.randn(B, S, 16, generator=g), torch.randn(B, S, 16, generator=g)]
    valid = torch.rand(B, S, generator=g) > 0.2
    valid[:, 0] = True
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(m, fullgraph=True, backend=backend)(*args, T, valid)
        torch.testing.assert_close(got, m(*args, T, valid), rtol=0, atol=0)


# ---- GPU only --------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("B", [1, 16])
def test_gpu_memory_attention_fold_bf16(B):
    """SAM 3 sizes (7 frames + 16 pointers, two padded frame slots) in bf16: the folded module's
    error vs the unfolded float32 module is at most 2x the unfolded bf16 module's; in float32 the
    folded module matches the unfolded one."""
    from kernel_checks import sam3_memory_attention_pair

    cfg, m32, mbf = sam3_memory_attention_pair()
    Lg, D, M = cfg.feat_size ** 2, cfg.d_model, cfg.tracker.mem_dim
    T = 16 * D // M
    S = 9 * Lg + T
    g = torch.Generator(device="cuda").manual_seed(1)
    curr, curr_pos = (torch.randn(B, Lg, D, device="cuda", generator=g) for _ in range(2))
    mem, mem_pos = (torch.randn(B, S, M, device="cuda", generator=g) for _ in range(2))
    valid = torch.ones(B, S, dtype=torch.bool, device="cuda")
    valid[:, 7 * Lg:9 * Lg] = False
    valid[-1, -32:] = False
    bf = [t.bfloat16() for t in (curr, curr_pos, mem, mem_pos)]
    with torch.no_grad():
        ref = m32(curr, curr_pos, mem, mem_pos, T, valid)
        base = mbf(*bf, T, valid).float()
        m32.fold_value = mbf.fold_value = True
        got32 = m32(curr, curr_pos, mem, mem_pos, T, valid)
        got = mbf(*bf, T, valid).float()
    assert torch.isfinite(got).all()
    rel = lambda a: ((a - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(got32) < 1e-4
    assert rel(got) <= 2 * rel(base), (rel(got), rel(base))
    assert (got - ref).abs().max() <= 2 * (base - ref).abs().max()
