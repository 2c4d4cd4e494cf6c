"""The memory attention kernel (``sam3fast.kernels.memory_attention``) against a float64 reference
written independently here (complex arithmetic, an explicitly repeated RoPE table, an explicit masked
softmax), the op's reference against the model's ``RoPEAttention``, and the
``sam3fast::memory_attention`` op (opcheck, torch.compile) and its entry point.

On CPU the Triton launcher runs under ``TRITON_INTERPRET=1`` (set by conftest.py) on tiny odd shapes:
3 x 3 and 4 x 4 grids, 2-4 memory frames plus a few pointer tokens, invalid keys including whole
padded frames; outputs are preallocated full of NaN so an unwritten element fails.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from kernel_checks import SM90_BUILD, assert_close_to64, capture_graph, forced_backend_reason, run_compiled

from sam3fast.kernels import memory_attention as ma
from sam3fast.model.memory_attention import RoPEAttention
from sam3fast.model.vit import compute_axial_cis

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not ma.HAS_TRITON, reason=f"triton not importable: {ma.TRITON_IMPORT_ERROR}")


def naive64(q, k, v, freqs_cis, key_valid, rope_q, n_rope_keys):
    """The spec in float64, written the obvious way; rows with no valid key give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    cis = freqs_cis.to(torch.complex128)
    L, Dh = cis.shape[0], q.shape[-1]

    def rot(x, table):  # x (B, n, H, Dh), table (n, Dh/2)
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], Dh // 2, 2).contiguous())
        return torch.view_as_real(xc * table[None, :, None, :]).flatten(-2)

    if rope_q:
        q = rot(q, cis)
    if n_rope_keys:
        k = torch.cat([rot(k[:, :n_rope_keys], cis.repeat(n_rope_keys // L, 1)), k[:, n_rope_keys:]], dim=1)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(Dh)
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isfinite(m), m, 0.0))
    l = p.sum(dim=-1, keepdim=True)
    return torch.einsum("bhij,bjhd->bihd", p / torch.where(l > 0, l, 1.0), v)


def _case(B, H, Dh, grid, n_frames, n_ptr, seed, dtype=torch.float32, valid="random", random_table=False):
    """q (B, L, H, Dh), k/v (B, n_frames * L + n_ptr, H, Dh), the complex table, key_valid."""
    g = torch.Generator().manual_seed(seed)
    gx, gy = grid
    L = gx * gy
    S = n_frames * L + n_ptr
    if random_table:  # no axial structure: any table row may sit at any position
        ang = torch.rand(L, Dh // 2, generator=g) * 2 * math.pi
        freqs = torch.polar(torch.ones_like(ang), ang)
    else:
        freqs = compute_axial_cis(Dh, gx, gy)
    q = torch.randn(B, L, H, Dh, generator=g) * 1.5
    k = torch.randn(B, S, H, Dh, generator=g) * 1.5
    v = torch.randn(B, S, H, Dh, generator=g)
    key_valid = None
    if valid == "random":
        key_valid = torch.rand(B, S, generator=g) > 0.3
        key_valid[:, 0] = True
        if B > 1 and n_frames > 1:
            key_valid[1, L:2 * L] = False  # a whole padded memory frame
        if n_ptr:
            key_valid[-1, -1] = False  # a padded pointer slot
    return q.to(dtype), k.to(dtype), v.to(dtype), freqs, key_valid


def _run(q, k, v, freqs, key_valid, rope_q, n_rope_keys, **launch):
    out = torch.full((*q.shape[:3], v.shape[-1]), float("nan"), dtype=q.dtype)
    got = ma._memory_attention_triton(q, k, v, torch.view_as_real(freqs), key_valid, rope_q, n_rope_keys,
                                      out=out, **launch)
    assert got.data_ptr() == out.data_ptr()
    return got


_assert_close = assert_close_to64


# (B, H, Dh, grid, memory frames, pointer tokens, rope_q, self-attention)
CASES = {
    "self_3x3": (1, 1, 32, (3, 3), 1, 0, True),
    "cross_3x3_3f_4p": (2, 1, 32, (3, 3), 3, 4, True),
    "cross_4x4_2f_4p_h2_dh16": (3, 2, 16, (4, 4), 2, 4, True),
    "cross_4x3_2f_nop": (2, 1, 64, (4, 3), 2, 0, True),
    "cross_3x3_3f_5p": (1, 1, 32, (3, 3), 3, 5, True),
}
LAUNCH = {
    "default": {},
    "splits": dict(block_m=16, block_n=16, num_splits=3),
    "inline": dict(block_n=16, num_splits=2, rope_k="inline"),
    "noskip": dict(block_n=16, num_splits=4, skip_invalid_tiles=False),
}


@needs_triton
@pytest.mark.parametrize("launch", list(LAUNCH), ids=list(LAUNCH))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_float64(case, launch):
    B, H, Dh, grid, n_frames, n_ptr, rope_q = CASES[case]
    L = grid[0] * grid[1]
    q, k, v, freqs, key_valid = _case(B, H, Dh, grid, n_frames, n_ptr, seed=len(case),
                                      valid=None if case.startswith("self") else "random")
    n_rope = n_frames * L
    want = naive64(q, k, v, freqs, key_valid, rope_q, n_rope)
    _assert_close(_run(q, k, v, freqs, key_valid, rope_q, n_rope, **LAUNCH[launch]), want, 2e-5)
    # The reference (the CPU kernel) is checked against the same float64 spec, in float32 and float64.
    rope = torch.view_as_real(freqs)
    _assert_close(ma.memory_attention_ref(q, k, v, rope, key_valid, rope_q, n_rope), want, 2e-5)
    _assert_close(ma.memory_attention_ref(q.double(), k.double(), v.double(), rope, key_valid, rope_q, n_rope),
                  want, 1e-6)  # the table is float32: its values, not its rounding, are the spec


@needs_triton
@pytest.mark.parametrize("case", ["cross_3x3_3f_4p", "cross_4x4_2f_4p_h2_dh16", "self_3x3"])
def test_sdpa_path_matches_float64(case):
    """The many-objects path (RoPE prepass kernel + SDPA) against the float64 spec, with padded
    frames and pointer slots, and a row with no valid key (zeros, as the Triton kernel)."""
    B, H, Dh, grid, n_frames, n_ptr, rope_q = CASES[case]
    L = grid[0] * grid[1]
    q, k, v, freqs, key_valid = _case(B, H, Dh, grid, n_frames, n_ptr, seed=7 + len(case),
                                      valid=None if case.startswith("self") else "random")
    if key_valid is not None:
        key_valid[0] = False  # the first object has no valid key at all
    n_rope = n_frames * L
    want = naive64(q, k, v, freqs, key_valid, rope_q, n_rope)
    got = ma._memory_attention_sdpa(q, k, v, torch.view_as_real(freqs), key_valid, rope_q, n_rope)
    assert got.shape == q.shape and got.dtype == q.dtype and got.is_contiguous()
    _assert_close(got, want, 2e-5)
    if key_valid is not None:
        assert torch.equal(got[0], torch.zeros_like(got[0]))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rope_prepass_matches_rotation(dtype):
    """The RoPE prepass alone (``_rope_prepass``: a program per row block and head, looping over
    the objects): three objects, two heads, strided input (a slice of a wider tensor), two rotated
    frames of 12 rows + 5 pointer rows; rotated rows as the float32 rotation rounded once, the
    others exact copies; every element written (the buffer starts as NaN); rows past S untouched."""
    g = torch.Generator().manual_seed(5)
    B, H, Dh, L = 3, 2, 16, 12
    S = 2 * L + 5
    wide = torch.randn(B, S, H, Dh + 8, generator=g).to(dtype)
    x = wide[..., 4:4 + Dh]  # strided rows
    ang = torch.rand(L, Dh // 2, generator=g) * 6.3
    rope = torch.stack((torch.cos(ang), torch.sin(ang)), dim=-1)  # (L, Dh/2, 2) float32
    for block_n, warps in ((ma.ROPE_PREPASS_BLOCK_N, ma.ROPE_PREPASS_WARPS), (8, 1)):
        got = ma._rope_prepass(x, rope, 2 * L, block_n=block_n, num_warps=warps)
        assert got.shape == (B, S, H, Dh) and got.is_contiguous() and got.dtype == dtype
        xe, xo = x.float()[..., 0::2], x.float()[..., 1::2]
        c = rope[..., 0].repeat(2, 1)[None, :, None]
        sn = rope[..., 1].repeat(2, 1)[None, :, None]
        want = torch.stack((xe[:, :2 * L] * c - xo[:, :2 * L] * sn, xe[:, :2 * L] * sn + xo[:, :2 * L] * c), -1)
        want = want.flatten(-2).to(dtype)
        torch.testing.assert_close(got[:, :2 * L], want, rtol=0, atol=0)
        assert torch.equal(got[:, 2 * L:], x[:, 2 * L:])


def test_rope_prepass_compiles_for_sm90():
    """The RoPE prepass built for an H100 without a GPU at the tracker's keys (16 objects, 7 frames +
    64 pointer rows, bf16): no spill, and no barrier or shared memory in its loop over the objects;
    and at one object and one row (sizes equal to 1 arrive as constants), which must build too."""
    code = SM90_BUILD + textwrap.dedent(
        """
        import torch
        from sam3fast.kernels import memory_attention as ma
        from sam3fast.kernels._static_build import assert_no_spills_or_loop_conversions, capture
        with capture(ma._rope_keys_kernel) as builds:
            ma._rope_prepass(torch.empty(16, 36352, 1, 256, dtype=torch.bfloat16),
                             torch.empty(5184, 128, 2), 36288)
        assert assert_no_spills_or_loop_conversions(builds[0].kernel)["barriers"] == 0
        with capture(ma._rope_keys_kernel) as builds:
            ma._rope_prepass(torch.empty(1, 1, 1, 256, dtype=torch.bfloat16), torch.empty(1, 128, 2), 1)
        assert len(builds) == 1
        print("ok")
        """
    )
    run_compiled(code)


def test_sdpa_path_choice(monkeypatch):
    """Which calls the CUDA op hands to SDPA: bf16/fp16 with at least SDPA_MIN_BATCH_HEADS
    (object, head) pairs; float32 always stays on the Triton kernel; None turns the path off."""
    def q(B, H, dtype=torch.bfloat16):
        return torch.empty(B, 9, H, 32, dtype=dtype)

    assert (ma.SDPA_MIN_BATCH_HEADS, ma.SDPA_MIN_BATCH_HEADS_FOLD) == (8, 4)  # set by the H200 run
    monkeypatch.setattr(ma, "SDPA_MIN_BATCH_HEADS", 4)
    monkeypatch.setattr(ma, "SDPA_MIN_BATCH_HEADS_FOLD", 2)
    assert not ma.uses_sdpa_path(q(1, 1)) and not ma.uses_sdpa_path(q(3, 1))
    assert ma.uses_sdpa_path(q(4, 1)) and ma.uses_sdpa_path(q(2, 2)) and ma.uses_sdpa_path(q(16, 1, torch.float16))
    assert ma.uses_sdpa_path(q(4, 1), 32) and not ma.uses_sdpa_path(q(3, 1), 64)  # values as wide or wider
    # values narrower than the keys (the value fold) have their own threshold
    assert ma.uses_sdpa_path(q(2, 1), 16) and not ma.uses_sdpa_path(q(1, 1), 16)
    assert not ma.uses_sdpa_path(q(16, 1, torch.float32)) and not ma.uses_sdpa_path(q(16, 1, torch.float32), 16)
    monkeypatch.setattr(ma, "SDPA_MIN_BATCH_HEADS", None)
    assert not ma.uses_sdpa_path(q(64, 1)) and ma.uses_sdpa_path(q(64, 1), 16)
    monkeypatch.setattr(ma, "SDPA_MIN_BATCH_HEADS_FOLD", None)
    assert not ma.uses_sdpa_path(q(64, 1), 16)



@needs_triton
def test_kernel_rope_variants():
    """A table with no axial structure; no rotated keys and unrotated queries with Lq != L; keys all
    rotated but not queries; fp16 inputs (rotations rounded to fp16 like apply_rope)."""
    q, k, v, freqs, key_valid = _case(2, 1, 32, (3, 3), 2, 3, seed=1, random_table=True)
    for rope_q, n_rope, qq in ((True, 18, q), (False, 0, q[:, :7]), (False, 9, q[:, :5]), (True, 0, q)):
        want = naive64(qq, k, v, freqs, key_valid, rope_q, n_rope)
        for launch in ({}, dict(block_n=16, num_splits=2, rope_k="inline")):
            _assert_close(_run(qq, k, v, freqs, key_valid, rope_q, n_rope, **launch), want, 2e-5)
    h = [t.half() for t in (q, k, v)]
    want = naive64(*h, freqs, key_valid, True, 18)
    ref = ma.memory_attention_ref(*h, torch.view_as_real(freqs), key_valid, True, 18)
    ref_err = (ref.double() - want).abs().max().item()
    for launch in ({}, dict(block_n=16, num_splits=2, rope_k="inline")):
        got = _run(*h, freqs, key_valid, True, 18, **launch)
        assert got.dtype == torch.float16
        _assert_close(got, want, max(2 * ref_err, 2e-3))


@needs_triton
def test_kernel_strided_inputs():
    """Views of wider projections (only the last dim contiguous) and a non-contiguous last dim."""
    q, k, v, freqs, key_valid = _case(2, 2, 32, (3, 3), 2, 4, seed=3)
    wide = torch.randn(2, k.shape[1], 2, 96)
    k2, v2 = wide[..., :32], wide[..., 40:72]
    k2.copy_(k)
    v2.copy_(v)
    q2 = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, H, Dh) with strides of (B, H, L, Dh)
    q3 = torch.randn(2, 9, 2, 32, 2)[..., 0]
    q3.copy_(q)  # last-dim stride 2: the launcher copies it
    want = naive64(q, k, v, freqs, key_valid, True, 18)
    for qq in (q2, q3):
        for launch in ({}, dict(block_n=16, num_splits=2, rope_k="inline")):
            _assert_close(_run(qq, k2, v2, freqs, key_valid, True, 18, **launch), want, 2e-5)


@needs_triton
def test_kernel_empty_splits_and_rows():
    """Whole padded frames that make some KV splits empty, and a batch element with no valid key
    at all (zeros, not NaN, in the kernel, the reference and the float64 spec)."""
    q, k, v, freqs, _ = _case(3, 1, 32, (4, 4), 4, 4, seed=5)
    key_valid = torch.ones(3, 68, dtype=torch.bool)
    key_valid[0, 16:48] = False  # frames 1 and 2: with one tile of 16 per split, splits 1, 2 empty
    key_valid[1, :] = False  # nothing to attend to
    key_valid[2, 64:] = False  # pointers padded
    want = naive64(q, k, v, freqs, key_valid, True, 64)
    assert (want[1] == 0).all()
    for launch in (dict(block_n=16, num_splits=5), dict(block_n=16, num_splits=5, skip_invalid_tiles=False),
                   dict(block_n=16, num_splits=2, rope_k="inline"), {}):
        got = _run(q, k, v, freqs, key_valid, True, 64, **launch)
        _assert_close(got, want, 2e-5)
        assert (got[1] == 0).all()
    ref = ma.memory_attention_ref(q, k, v, torch.view_as_real(freqs), key_valid, True, 64)
    _assert_close(ref, want, 2e-5)
    assert (ref[1] == 0).all()


@needs_triton
@pytest.mark.parametrize("S, block_n", [(5000, 16), (37, 16), (4096, 32), (1, 16)])
def test_valid_tile_list(S, block_n):
    """The list of tiles holding a valid key (the attention's skip of invalid keys): in ascending
    order, the count right, over several chunks of 128 tiles and a partial last tile, for rows all
    valid, all invalid, whole padded frames and scattered single keys."""
    g = torch.Generator().manual_seed(S)
    rows = [torch.ones(S, dtype=torch.bool), torch.zeros(S, dtype=torch.bool), torch.rand(S, generator=g) < 0.002]
    framed = torch.ones(S, dtype=torch.bool)
    framed[S // 5:3 * S // 5] = False
    rows.append(framed)
    valid = torch.stack(rows)
    n_tiles = (S + block_n - 1) // block_n
    t, c = ma._valid_tiles(valid.view(torch.uint8), S, block_n)
    assert t.shape == (len(rows), n_tiles)
    padded = torch.zeros(len(rows), n_tiles * block_n, dtype=torch.bool)
    padded[:, :S] = valid
    want_flags = padded.view(len(rows), n_tiles, block_n).any(-1)
    for b in range(len(rows)):
        want = want_flags[b].nonzero().flatten().to(torch.int32)
        assert int(c[b]) == want.numel()
        assert torch.equal(t[b, :want.numel()], want)


TMA_LAUNCH = {
    "skip_split": dict(block_n=16, num_splits=3, use_tma=True),
    "noskip_split": dict(block_n=16, num_splits=4, skip_invalid_tiles=False, use_tma=True),
    "one_split": dict(block_n=16, num_splits=1, use_tma=True),
    "eager_rescale": dict(block_n=16, num_splits=2, use_tma=True, lazy_rescale=False),
}


@needs_triton
@pytest.mark.parametrize("launch", list(TMA_LAUNCH), ids=list(TMA_LAUNCH))
@pytest.mark.parametrize("case", ["self_3x3", "cross_3x3_3f_4p", "cross_4x3_2f_nop", "cross_3x3_3f_5p", "fold"])
def test_kernel_tma_matches_float64(case, launch):
    """K and V through tensor descriptors (use_tma, one head): the last tile of a batch element
    reads zeros past S, a split's last tile the next split's keys (masked); against the float64
    spec, with padded frames and pointer slots, and for the value fold (v 16 wide)."""
    if case == "fold":
        B, H, Dh, Dv, grid, n_frames, n_ptr, shared = FOLD_CASES["dh32_dv16_3x3_3f_4p"]
        q, k, v, freqs, key_valid = _fold_case(B, H, Dh, Dv, grid, n_frames, n_ptr, seed=21, shared=shared)
        rope_q = True
    else:
        B, H, Dh, grid, n_frames, n_ptr, rope_q = CASES[case]
        q, k, v, freqs, key_valid = _case(B, H, Dh, grid, n_frames, n_ptr, seed=len(case) + 40,
                                          valid=None if case.startswith("self") else "random")
    n_rope = n_frames * grid[0] * grid[1]
    want = naive64(q, k, v, freqs, key_valid, rope_q, n_rope)
    _assert_close(_run(q, k, v, freqs, key_valid, rope_q, n_rope, **TMA_LAUNCH[launch]), want, 2e-5)


@needs_triton
def test_kernel_tma_refusals():
    """use_tma says why it cannot: several heads, the inline key RoPE, a misaligned row stride."""
    q, k, v, freqs, key_valid = _case(3, 2, 16, (4, 4), 2, 4, seed=3)
    with pytest.raises(ValueError, match="one head"):
        _run(q, k, v, freqs, key_valid, True, 32, use_tma=True)
    q, k, v, freqs, key_valid = _case(2, 1, 32, (3, 3), 3, 4, seed=4)
    with pytest.raises(ValueError, match="inline"):
        _run(q, k, v, freqs, key_valid, True, 27, use_tma=True, rope_k="inline")
    wide = torch.randn(2, k.shape[1], 1, 33)[..., :32]  # rows of 33 floats: 132-byte stride
    with pytest.raises(ValueError, match="16-byte"):
        _run(q, k, wide, freqs, key_valid, True, 27, use_tma=True)


@needs_triton
@pytest.mark.parametrize("order", ["rising", "falling"])
def test_kernel_lazy_rescale_matches_float64(order):
    """Scores that rise from key tile to key tile by far more than the lazy-rescale threshold, to
    hundreds of log2 units (each tile's keys scaled up: the rows' reference maximum must move
    mid-loop, after terms have been accumulated against the old one; a reference that never moved
    would overflow exp2, float32 tops out at 2**128), and scores that fall (it never moves after the
    first tile): the lazy and the eager rescaling both match the float64 spec, split or not, with a
    row-block where some rows see no valid key in the first tiles. The tolerance allows for float32
    scores of a few hundred."""
    q, k, v, freqs, key_valid = _case(2, 1, 32, (4, 4), 3, 4, seed=11)
    S = k.shape[1]
    scale = torch.linspace(0.2, 40.0, S // 16 + 1).repeat_interleave(16)[:S]
    if order == "falling":
        scale = scale.flip(0)
    k = k * scale.view(1, S, 1, 1)
    key_valid[0, :20] = False
    want = naive64(q, k, v, freqs, key_valid, True, 48)
    for lazy in (True, False):
        for launch in (dict(block_n=16, num_splits=1), dict(block_n=16, num_splits=3)):
            got = _run(q, k, v, freqs, key_valid, True, 48, lazy_rescale=lazy, **launch)
            _assert_close(got, want, 2e-3)


@needs_triton
def test_kernel_masked_keys_do_not_matter():
    """Changing k and v at invalid slots, even to huge values, changes nothing, bit for bit."""
    q, k, v, freqs, key_valid = _case(2, 1, 32, (3, 3), 3, 4, seed=6)
    base = _run(q, k, v, freqs, key_valid, True, 27, block_n=16, num_splits=2)
    k2, v2 = k.clone(), v.clone()
    k2[~key_valid] = 1e4
    v2[~key_valid] = -1e4
    assert torch.equal(_run(q, k2, v2, freqs, key_valid, True, 27, block_n=16, num_splits=2), base)


def test_choose_num_splits():
    # SAM 3 on an H100 (132 SMs), BLOCK_M 64 (81 query blocks), BLOCK_N 32, 7 frames + 16 pointers.
    kv_tiles = (7 * 5184 + 64 + 31) // 32
    assert ma.choose_num_splits(81, kv_tiles, 132) == 3  # 243 programs: 92 % of two waves
    assert ma.choose_num_splits(41, kv_tiles, 132) == 3  # BLOCK_M 128: 123 programs, one wave
    assert ma.choose_num_splits(81 * 16, kv_tiles, 132) == 1  # 16 objects fill the GPU already
    assert ma.choose_num_splits(81, 5, 132) == 1  # too few key tiles to split
    assert 1 <= ma.choose_num_splits(1, 10**6, 132) <= 16


def test_reference_matches_rope_attention():
    """The op's math equals the model's RoPEAttention after its projections: cross-attention with
    pointer tokens and a key mask, and self-attention; two heads and one."""
    torch.manual_seed(0)
    for H in (1, 2):
        D, kv_in, gx, gy, n_frames, T, B = 32, 16, 3, 3, 3, 4, 2
        L, S = gx * gy, n_frames * gx * gy + T
        freqs = compute_axial_cis(D // H, gx, gy)
        cross, self_attn = RoPEAttention(D, H, kv_in_dim=kv_in), RoPEAttention(D, H)
        x, mem = torch.randn(B, L, D), torch.randn(B, S, kv_in)
        key_valid = torch.rand(B, S) > 0.3
        key_valid[:, 0] = True
        key_valid[1, L:2 * L] = False
        with torch.no_grad():
            want = cross(x, mem, mem, freqs, T, key_valid)
            q = cross.q_proj(x).view(B, L, H, -1)
            k, v = cross.k_proj(mem).view(B, S, H, -1), cross.v_proj(mem).view(B, S, H, -1)
            o = ma.memory_attention_ref(q, k, v, torch.view_as_real(freqs), key_valid, True, S - T)
            got = cross.out_proj(o.reshape(B, L, D))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            o = ma.memory_attention(q, k, v, freqs, key_valid, n_rope_keys=S - T)  # entry point, CPU
            torch.testing.assert_close(cross.out_proj(o.reshape(B, L, D)), want, rtol=1e-5, atol=1e-5)

            want = self_attn(x, x, x, freqs)
            q, k, v = (p(x).view(B, L, H, -1) for p in (self_attn.q_proj, self_attn.k_proj, self_attn.v_proj))
            o = ma.memory_attention(q, k, v, freqs)
            torch.testing.assert_close(self_attn.out_proj(o.reshape(B, L, D)), want, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    q, k, v, freqs, key_valid = _case(2, 1, 32, (3, 3), 2, 4, seed=0)
    rope = torch.view_as_real(freqs)
    ref = ma.memory_attention_ref
    with pytest.raises(ValueError, match="q must be"):
        ref(q[0], k, v, rope, key_valid, True, 18)
    with pytest.raises(ValueError, match="k must be"):
        ref(q, k[..., :16], v, rope, key_valid, True, 18)
    with pytest.raises(ValueError, match="v must have"):
        ref(q, k, v[:, :-1], rope, key_valid, True, 18)
    with pytest.raises(ValueError, match="share a dtype"):
        ref(q, k.double(), v, rope, key_valid, True, 18)
    with pytest.raises(ValueError, match="rope must be"):
        ref(q, k, v, freqs, key_valid, True, 18)  # the complex table itself: the op takes view_as_real
    with pytest.raises(ValueError, match="rope must be"):
        ref(q, k, v, rope[:, :8], key_valid, True, 18)
    with pytest.raises(ValueError, match="key_valid"):
        ref(q, k, v, rope, key_valid.float(), True, 18)
    with pytest.raises(ValueError, match="key_valid"):
        ref(q, k, v, rope, key_valid[:, 1:], True, 18)
    with pytest.raises(ValueError, match="Lq == L"):
        ref(q[:, :5], k, v, rope, key_valid, True, 18)
    with pytest.raises(ValueError, match="multiple of L"):
        ref(q, k, v, rope, key_valid, True, 17)
    with pytest.raises(ValueError, match="multiple of L"):
        ref(q, k, v, rope, key_valid, True, 27)  # beyond S = 22
    with pytest.raises(ValueError, match="even"):
        ref(q[..., :31], k[..., :31], v[..., :31], rope, key_valid, True, 18)
    if ma.HAS_TRITON:
        with pytest.raises(ValueError, match="head dims"):
            ma._memory_attention_triton(q[..., :24], k[..., :24], v[..., :24], rope[:, :12], key_valid, True, 18)
        with pytest.raises(ValueError, match="float32/bfloat16/float16"):
            ma._memory_attention_triton(q.double(), k.double(), v.double(), rope, key_valid, True, 18)
        with pytest.raises(ValueError, match="block_n"):
            ma._memory_attention_triton(q, k, v, rope, key_valid, True, 18, block_n=24)
        with pytest.raises(ValueError, match="rope_k"):
            ma._memory_attention_triton(q, k, v, rope, key_valid, True, 18, rope_k="cached")
        with pytest.raises(ValueError, match="out must be"):
            ma._memory_attention_triton(q, k, v, rope, key_valid, True, 18, out=torch.empty(2, 9, 1, 16))


def _op_args(valid=True, rope_q=True):
    q, k, v, freqs, key_valid = _case(2, 2, 16, (3, 3), 2, 3, seed=9)
    return (q, k, v, torch.view_as_real(freqs), key_valid if valid else None, rope_q, 18)


@pytest.mark.parametrize("valid, rope_q", [(True, True), (False, True), (True, False)])
def test_opcheck(valid, rope_q):
    torch.library.opcheck(torch.ops.sam3fast.memory_attention.default, _op_args(valid, rope_q))


def test_op_cpu_is_reference():
    args = _op_args()
    assert torch.equal(torch.ops.sam3fast.memory_attention(*args), ma.memory_attention_ref(*args))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    """A caller of the op and one of the entry point (complex table in) compile with no graph break."""
    q, k, v, rope, key_valid, _, _ = _op_args()
    freqs = torch.view_as_complex(rope.contiguous())

    def via_op(q, k, v, key_valid):
        return torch.ops.sam3fast.memory_attention(q * 2.0, k, v, rope, key_valid, True, 18) + 1.0

    def via_entry(q, k, v, key_valid):
        return ma.memory_attention(q, k * 0.5, v, freqs, key_valid, n_rope_keys=18) * 2.0

    torch._dynamo.reset()
    for fn in (via_op, via_entry):
        got = torch.compile(fn, fullgraph=True, backend=backend)(q, k, v, key_valid)
        torch.testing.assert_close(got, fn(q, k, v, key_valid), rtol=0, atol=0)


def test_entry_point_backend_cpu():
    q = torch.zeros(1, 9, 1, 32)
    assert ma.memory_attention_backend(q)[0] == "reference"
    q, k, v, freqs, key_valid = _case(2, 1, 32, (3, 3), 2, 4, seed=4)
    got = ma.memory_attention(q, k, v, freqs, key_valid, n_rope_keys=18)
    assert torch.equal(got, ma.memory_attention_ref(q, k, v, torch.view_as_real(freqs), key_valid, True, 18))


def test_force_reference_env():
    reason = forced_backend_reason("memory_attention", "memory_attention_backend(torch.zeros(1, 9, 1, 32))")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


@needs_triton
def test_kernels_compile_for_sm90():
    """The real (not interpreted) Triton compiler builds what the launcher launches for an H100,
    without a GPU (sam3fast.kernels._static_build: the launcher runs on CPU tensors of SAM 3's shapes
    in bf16, each launch compiled with the specialisation Triton would give its arguments). At the
    default tile, with and without a key-validity mask (the fixed-capacity bank's skip of invalid
    tiles), the attention uses Hopper's wgmma and its K/V loads are software-pipelined (cp.async):
    the earlier skip, an `if` around each tile's work, compiled with no cp.async at all. The default
    launches have no spill inside the main loop. Also the inline-RoPE, single-split and value-fold
    variants build."""
    code = textwrap.dedent(
        """
        import torch
        from sam3fast.kernels import memory_attention as ma, _split_kv
        from sam3fast.kernels._static_build import capture, sass_stats
        from sam3fast.model.vit import compute_axial_cis
        L, Dh, S = 5184, 256, 7 * 5184 + 64
        q = torch.empty(1, L, 1, Dh, dtype=torch.bfloat16)
        k = torch.empty(1, S, 1, Dh, dtype=torch.bfloat16)
        v = torch.empty(1, S, 1, Dh, dtype=torch.bfloat16)
        v64 = torch.empty(1, S, 1, 64, dtype=torch.bfloat16)
        rope = torch.view_as_real(compute_axial_cis(Dh, 72, 72, 10000.0)).float()
        valid = torch.ones(1, S, dtype=torch.bool)
        kernels = (ma._memory_attention_kernel, ma._tile_list_kernel, ma._rope_keys_kernel,
                   _split_kv._merge_splits_kernel)
        cases = {
            "valid, skip": (v, valid, dict(num_splits=3)),
            "valid, no skip": (v, valid, dict(num_splits=3, skip_invalid_tiles=False)),
            "no mask": (v, None, dict(num_splits=3)),
            "rope_k inline, one split": (v, valid, dict(num_splits=1, rope_k="inline")),
            "fold": (v64, valid, dict(num_splits=3)),
            "fold 128x64 w8": (v64, None, dict(num_splits=1, block_m=128, block_n=64, num_warps=8)),
        }
        for name, (vv, kv, launch) in cases.items():
            with capture(*kernels) as builds:
                ma._memory_attention_triton(q, k, vv, rope, kv, True, 7 * L, **launch)
            names = [b.name for b in builds]
            assert ("_rope_keys_kernel" in names) == (launch.get("rope_k", "prepass") == "prepass"), names
            assert ("_tile_list_kernel" in names) == (kv is not None and launch.get("skip_invalid_tiles", True)), names
            attn = [b for b in builds if b.name == "_memory_attention_kernel"]
            assert len(attn) == 1, names
            st = sass_stats(attn[0].kernel)
            assert st["wgmma"] > 0, (name, st)
            if name in ("valid, skip", "valid, no skip", "no mask", "fold"):
                assert st["cp_async"] > 0, f"{name}: the K/V loads are not pipelined: {st}"
            if name in ("valid, skip", "no mask"):  # the defaults of the bank and of self-attention
                # spills before or after the loop cost once; inside it, every key tile
                assert st["loop_spills"] == 0, f"{name}: spills inside the loop: {st}"
        print("ok")
        """
    )
    run_compiled(code)


# ---- values of their own width (Dv != Dh: the value fold of RoPEAttention.fold_value) ----------


def _fold_case(B, H, Dh, Dv, grid, n_frames, n_ptr, seed, shared=False, **kw):
    """``_case`` with v (B, S, H, Dv); ``shared``: one (B, S, 1, Dv) value expanded over the heads
    (stride 0 on the head dim), as the folded cross-attention passes its memory."""
    q, k, _, freqs, key_valid = _case(B, H, Dh, grid, n_frames, n_ptr, seed, **kw)
    g = torch.Generator().manual_seed(1000 + seed)
    S = k.shape[1]
    if shared:
        v = torch.randn(B, S, 1, Dv, generator=g).to(q.dtype).expand(B, S, H, Dv)
    else:
        v = torch.randn(B, S, H, Dv, generator=g).to(q.dtype)
    return q, k, v, freqs, key_valid


# (B, H, Dh, Dv, grid, memory frames, pointer tokens, v shared by the heads)
FOLD_CASES = {
    "dh32_dv16_3x3_3f_4p": (2, 1, 32, 16, (3, 3), 3, 4, False),
    "dh64_dv16_4x3_2f_5p": (2, 1, 64, 16, (4, 3), 2, 5, False),
    "dh16_dv32_3x3_2f_3p": (1, 1, 16, 32, (3, 3), 2, 3, False),  # values wider than the keys
    "dh32_dv16_4x4_2f_4p_h2_shared": (3, 2, 32, 16, (4, 4), 2, 4, True),
    "dh16_dv64_3x3_2f_4p_h2": (2, 2, 16, 64, (3, 3), 2, 4, False),
}


@needs_triton
@pytest.mark.parametrize("launch", list(LAUNCH), ids=list(LAUNCH))
@pytest.mark.parametrize("case", list(FOLD_CASES), ids=list(FOLD_CASES))
def test_kernel_value_dim_matches_float64(case, launch):
    """Dv != Dh: (B, Lq, H, Dv) out of the kernel (split and not, inline key RoPE, no tile skip),
    padded frames and pointer slots masked, against the float64 spec; the reference too."""
    B, H, Dh, Dv, grid, n_frames, n_ptr, shared = FOLD_CASES[case]
    L = grid[0] * grid[1]
    q, k, v, freqs, key_valid = _fold_case(B, H, Dh, Dv, grid, n_frames, n_ptr, seed=len(case), shared=shared)
    n_rope = n_frames * L
    want = naive64(q, k, v, freqs, key_valid, True, n_rope)
    assert want.shape == (B, L, H, Dv)
    got = _run(q, k, v, freqs, key_valid, True, n_rope, **LAUNCH[launch])
    assert got.shape == (B, L, H, Dv)
    _assert_close(got, want, 2e-5)
    rope = torch.view_as_real(freqs)
    _assert_close(ma.memory_attention_ref(q, k, v, rope, key_valid, True, n_rope), want, 2e-5)
    _assert_close(ma.memory_attention_ref(q.double(), k.double(), v.double(), rope, key_valid, True, n_rope),
                  want, 1e-6)


@needs_triton
def test_kernel_value_dim_variants():
    """Dv != Dh with unrotated queries (Lq != L), keys all unrotated (pointer-like), keys all rotated,
    a row with no valid key and splits left empty by padded frames; the head-shared (stride 0) v gives
    the same bits as its contiguous copy."""
    q, k, v, freqs, _ = _fold_case(3, 2, 32, 16, (4, 4), 4, 4, seed=11, shared=True)
    key_valid = torch.ones(3, 68, dtype=torch.bool)
    key_valid[0, 16:48] = False  # frames 1 and 2: with one tile of 16 per split, splits 1, 2 empty
    key_valid[1, :] = False  # nothing to attend to: zeros
    key_valid[2, 64:] = False
    for rope_q, n_rope, qq in ((True, 64, q), (False, 0, q[:, :7]), (False, 32, q[:, :5]), (True, 0, q)):
        want = naive64(qq, k, v, freqs, key_valid, rope_q, n_rope)
        for launch in ({}, dict(block_n=16, num_splits=5), dict(block_n=16, num_splits=5, skip_invalid_tiles=False),
                       dict(block_m=32, block_n=16, num_splits=2, rope_k="inline")):
            got = _run(qq, k, v, freqs, key_valid, rope_q, n_rope, **launch)
            _assert_close(got, want, 2e-5)
            assert (got[1] == 0).all()
            assert torch.equal(_run(qq, k, v.contiguous(), freqs, key_valid, rope_q, n_rope, **launch), got)
    assert v.stride(2) == 0


@needs_triton
def test_kernel_value_dim_fp16():
    """fp16 with Dv != Dh: error vs the float64 spec within 2x that of the op's reference in fp16."""
    q, k, v, freqs, key_valid = (t.half() if t is not None and t.is_floating_point() else t
                                 for t in _fold_case(2, 1, 32, 16, (3, 3), 2, 3, seed=12))
    freqs = compute_axial_cis(32, 3, 3)
    want = naive64(q, k, v, freqs, key_valid, True, 18)
    ref = ma.memory_attention_ref(q, k, v, torch.view_as_real(freqs), key_valid, True, 18)
    ref_err = (ref.double() - want).abs().max().item()
    for launch in ({}, dict(block_n=16, num_splits=2, rope_k="inline")):
        got = _run(q, k, v, freqs, key_valid, True, 18, **launch)
        assert got.dtype == torch.float16 and got.shape == (2, 9, 1, 16)
        _assert_close(got, want, max(2 * ref_err, 2e-3))


@needs_triton
def test_sdpa_value_dim_refusal_falls_back_to_triton(monkeypatch):
    """Many objects with Dv != Dh: SDPA is asked with cuDNN and memory-efficient only (no math
    fallback; on CPU neither exists, so it refuses with a RuntimeError), the op's body then runs the
    Triton kernel, and the refusal is remembered per (dtype, Dh, Dv): SDPA is tried once."""
    monkeypatch.setattr(ma, "SDPA_MIN_BATCH_HEADS", 4)
    monkeypatch.setattr(ma, "SDPA_MIN_BATCH_HEADS_FOLD", 4)
    monkeypatch.setattr(ma, "SDPA_REFUSED", {})
    q, k, v, freqs, key_valid = _fold_case(4, 1, 32, 16, (3, 3), 2, 3, seed=13, dtype=torch.float16)
    rope = torch.view_as_real(freqs)
    assert ma.uses_sdpa_path(q, v.shape[-1])
    with pytest.raises(RuntimeError):
        ma._memory_attention_sdpa(q, k, v, rope, key_valid, True, 18)
    tries = []
    real_sdpa = ma._memory_attention_sdpa

    def counting_sdpa(*args):
        tries.append(args[2].shape[-1])
        return real_sdpa(*args)

    monkeypatch.setattr(ma, "_memory_attention_sdpa", counting_sdpa)
    want = naive64(q, k, v, freqs, key_valid, True, 18)
    ref_err = (ma.memory_attention_ref(q, k, v, rope, key_valid, True, 18).double() - want).abs().max().item()
    for _ in range(2):
        got = ma._memory_attention_dispatch(q, k, v, rope, key_valid, True, 18)
        assert got.shape == (4, 9, 1, 16) and got.dtype == torch.float16
        _assert_close(got, want, max(2 * ref_err, 2e-3))
    assert tries == [16], "SDPA should be tried once per (dtype, Dh, Dv)"
    assert list(ma.SDPA_REFUSED) == [(torch.float16, 32, 16)]
    # Dv == Dh keeps the full backend order (math included): no refusal recorded, no Triton fallback.
    q2, k2, v2, _, _ = _case(4, 1, 32, (3, 3), 2, 3, seed=14, dtype=torch.float16)
    got = ma._memory_attention_dispatch(q2, k2, v2, rope, key_valid, True, 18)
    _assert_close(got, naive64(q2, k2, v2, freqs, key_valid, True, 18), 2e-3)
    assert tries == [16, 32] and len(ma.SDPA_REFUSED) == 1


def test_value_dim_bad_inputs():
    q, k, v, freqs, key_valid = _fold_case(2, 1, 32, 16, (3, 3), 2, 4, seed=0)
    rope = torch.view_as_real(freqs)
    with pytest.raises(ValueError, match="v must have"):
        ma.memory_attention_ref(q, k, v[:, :-1], rope, key_valid, True, 18)
    with pytest.raises(ValueError, match="v must have"):
        ma.memory_attention_ref(q, k, v[:, :, None], rope, key_valid, True, 18)  # 5-D
    with pytest.raises(ValueError, match="v must have"):
        ma.memory_attention_ref(q, k, v[..., :0], rope, key_valid, True, 18)  # Dv = 0
    with pytest.raises(ValueError, match="v must have"):
        ma.memory_attention_ref(q, k, v.expand(2, 22, 2, 16), rope, key_valid, True, 18)  # H mismatch
    # Any Dv >= 1 is the reference's; the kernel's are _KERNEL_HEAD_DIMS.
    assert ma.memory_attention_ref(q, k, v[..., :12], rope, key_valid, True, 18).shape == (2, 9, 1, 12)
    if ma.HAS_TRITON:
        with pytest.raises(ValueError, match="value dims"):
            ma._memory_attention_triton(q, k, v[..., :12], rope, key_valid, True, 18)
        with pytest.raises(ValueError, match="value dims"):
            ma._memory_attention_triton(q, k, torch.randn(2, 22, 1, 8), rope, key_valid, True, 18)
        with pytest.raises(ValueError, match="out must be"):  # out is Dv wide, not Dh
            ma._memory_attention_triton(q, k, v, rope, key_valid, True, 18, out=torch.empty(2, 9, 1, 32))
    backend, why = ma.memory_attention_backend(q, 12)
    assert backend == "reference"


def test_value_dim_backend_choice(monkeypatch):
    """memory_attention_backend(q, Dv) refuses a value width the kernel lacks, with the reason."""
    monkeypatch.setattr(ma, "attention_backend", lambda *a: ("triton", "CUDA tensors, triton available"))
    q = torch.zeros(1, 9, 1, 256)
    assert ma.memory_attention_backend(q) == ma.memory_attention_backend(q, 64) == ("triton",
                                                                                    "CUDA tensors, triton available")
    backend, why = ma.memory_attention_backend(q, 48)
    assert backend == "reference" and "value dim 48" in why


def _fold_op_args(valid=True, rope_q=True, shared=False):
    q, k, v, freqs, key_valid = _fold_case(2, 2, 32, 16, (3, 3), 2, 3, seed=15, shared=shared)
    return (q, k, v, torch.view_as_real(freqs), key_valid if valid else None, rope_q, 18)


@pytest.mark.parametrize("valid, rope_q, shared", [(True, True, False), (False, True, True), (True, False, True)])
def test_opcheck_value_dim(valid, rope_q, shared):
    args = _fold_op_args(valid, rope_q, shared)
    torch.library.opcheck(torch.ops.sam3fast.memory_attention.default, args)
    out = torch.ops.sam3fast.memory_attention(*args)
    assert out.shape == (2, 9, 2, 16)
    assert torch.equal(out, ma.memory_attention_ref(*args))  # the CPU kernel is the reference
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.sam3fast.memory_attention(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                     for a in args))
    assert fake.shape == (2, 9, 2, 16) and fake.dtype == torch.float32


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_value_dim(backend):
    """The entry point with a head-shared Dv != Dh value compiles with no graph break."""
    q, k, v, rope, key_valid, _, _ = _fold_op_args(shared=True)
    freqs = torch.view_as_complex(rope.contiguous())
    mem = v[:, :, :1].contiguous()

    def via_entry(q, k, mem, key_valid):
        vv = mem.expand(-1, -1, q.shape[2], -1)
        return ma.memory_attention(q, k, vv, freqs, key_valid, n_rope_keys=18) * 2.0

    torch._dynamo.reset()
    got = torch.compile(via_entry, fullgraph=True, backend=backend)(q, k, mem, key_valid)
    assert got.shape == (2, 9, 2, 16)
    torch.testing.assert_close(got, via_entry(q, k, mem, key_valid), rtol=0, atol=0)


# ---- GPU only --------------------------------------------------------------------------------


def _torch_bf16(q, k, v, freqs, key_valid, n_rope_keys):
    """What the model does in bf16: its RoPEAttention (one head) with identity projections."""
    m = RoPEAttention(q.shape[-1], 1)
    m.q_proj = m.k_proj = m.v_proj = m.out_proj = torch.nn.Identity()
    m.use_kernel = False  # the SDPA path, not the Triton kernel it dispatches to on CUDA
    return m(q.flatten(2), k.flatten(2), v.flatten(2), freqs, k.shape[1] - n_rope_keys, key_valid).unflatten(2, (1, -1))


def _gpu_case(B, n_frames, n_ptr, seed, pad_frames=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    L, Dh = 5184, 256
    S = n_frames * L + n_ptr
    freqs = compute_axial_cis(Dh, 72, 72).cuda()
    q = torch.randn(B, L, 1, Dh, device="cuda", generator=g)
    k = torch.randn(B, S, 1, Dh, device="cuda", generator=g)
    v = torch.randn(B, S, 1, Dh, device="cuda", generator=g)
    key_valid = torch.ones(B, S, dtype=torch.bool, device="cuda")
    if pad_frames:
        key_valid[:, (n_frames - pad_frames) * L:n_frames * L] = False
        key_valid[:, -n_ptr // 2:] = False
    return q, k, v, freqs, key_valid


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize(
    "B, n_frames, n_ptr, pad, self_attn",
    [(1, 1, 0, 0, True), (1, 7, 64, 0, False), (3, 10, 64, 3, False)],
    ids=["self_B1", "cross_7f_B1", "cross_10f_pad3_B3"],
)
def test_gpu_real_shape_bf16(B, n_frames, n_ptr, pad, self_attn):
    """bf16 at SAM 3 sizes: error vs the fp32 reference at most 2x that of PyTorch in bf16 (the op, and
    the launcher with one split, the inline key RoPE, the eager rescale)."""
    q, k, v, freqs, key_valid = _gpu_case(B, n_frames, n_ptr, seed=B + n_frames, pad_frames=pad)
    if self_attn:
        k, v, key_valid = q.clone(), torch.randn_like(q), None
    n_rope = n_frames * 5184
    rope = torch.view_as_real(freqs)
    ref = ma.memory_attention_ref(q, k, v, rope, key_valid, True, n_rope)  # float32 inputs: the fp32 reference
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    torch_err = (_torch_bf16(qb, kb, vb, freqs, key_valid, n_rope).float() - ref).abs()
    assert ma.memory_attention_backend(qb)[0] == "triton"
    for got in (ma.memory_attention(qb, kb, vb, freqs, key_valid, n_rope_keys=n_rope),
                ma._memory_attention_triton(qb, kb, vb, rope, key_valid, True, n_rope, num_splits=1),
                ma._memory_attention_triton(qb, kb, vb, rope, key_valid, True, n_rope, rope_k="inline"),
                ma._memory_attention_triton(qb, kb, vb, rope, key_valid, True, n_rope, lazy_rescale=False)):
        assert got.dtype == torch.bfloat16 and not got.isnan().any()
        err = (got.float() - ref).abs()
        assert err.max() <= 2 * torch_err.max(), (err.max().item(), torch_err.max().item())
        assert err.pow(2).mean().sqrt() <= 2 * torch_err.pow(2).mean().sqrt()


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("B, pad", [(4, 0), (16, 2)], ids=["B4", "B16_pad2"])
def test_gpu_sdpa_path_real_shape_bf16(B, pad, monkeypatch):
    """Many objects in bf16 go to the RoPE prepass + SDPA path (from 4 objects here: the path's
    numbers, not the threshold, are under test): at 7 memory frames + 64 pointer tokens its error vs
    the fp32 reference is at most 2x that of PyTorch in bf16; and the op replays inside a CUDA graph."""
    monkeypatch.setattr(ma, "SDPA_MIN_BATCH_HEADS", 4)
    q, k, v, freqs, key_valid = _gpu_case(B, 7, 64, seed=20 + B, pad_frames=pad)
    n_rope = 7 * 5184
    rope = torch.view_as_real(freqs)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    assert ma.uses_sdpa_path(qb)
    ref = ma.memory_attention_ref(q, k, v, rope, key_valid, True, n_rope)
    torch_err = (_torch_bf16(qb, kb, vb, freqs, key_valid, n_rope).float() - ref).abs()
    got = ma.memory_attention(qb, kb, vb, freqs, key_valid, n_rope_keys=n_rope)
    assert got.dtype == torch.bfloat16 and not got.isnan().any()
    err = (got.float() - ref).abs()
    assert err.max() <= 2 * torch_err.max(), (err.max().item(), torch_err.max().item())
    assert err.pow(2).mean().sqrt() <= 2 * torch_err.pow(2).mean().sqrt()
    del ref, torch_err, err

    static = [qb.clone(), kb.clone(), vb.clone(), key_valid.clone()]

    def fn():
        return ma.memory_attention(static[0], static[1], static[2], freqs, static[3], n_rope_keys=n_rope)

    graph, out = capture_graph(fn)
    static[0].copy_(torch.randn_like(q).bfloat16())
    static[3][:, 5184:2 * 5184] = False
    graph.replay()
    want = ma._memory_attention_sdpa(static[0], static[1], static[2], rope, static[3], True, n_rope)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_fp32_matches_reference():
    q, k, v, freqs, key_valid = _gpu_case(2, 2, 16, seed=3, pad_frames=1)
    rope = torch.view_as_real(freqs)
    ref = naive64(q[:, :512], k, v, freqs, key_valid, False, 2 * 5184)
    got = ma._memory_attention_triton(q[:, :512], k, v, rope, key_valid, False, 2 * 5184)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-5)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_cuda_graph_replay():
    q, k, v, freqs, key_valid = _gpu_case(2, 3, 16, seed=4, pad_frames=1)
    static = [t.bfloat16() for t in (q, k, v)] + [key_valid.clone()]

    def fn():
        return ma.memory_attention(static[0], static[1], static[2], freqs, static[3], n_rope_keys=3 * 5184)

    graph, out = capture_graph(fn)
    for seed in (5, 6):
        nq, nk, nv, _, nvalid = _gpu_case(2, 3, 16, seed=seed, pad_frames=seed - 4)
        new = [t.bfloat16() for t in (nq, nk, nv)] + [nvalid]
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        want = ma._memory_attention_triton(*new[:3], torch.view_as_real(freqs), new[3], True, 3 * 5184)
        assert torch.equal(out, want)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_compile_inductor():
    q, k, v, freqs, key_valid = _gpu_case(2, 2, 16, seed=8, pad_frames=1)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))

    def fn(q, k, v, valid):
        return ma.memory_attention(q, k, v, freqs, valid, n_rope_keys=2 * 5184) * 2

    got = torch.compile(fn, fullgraph=True)(qb, kb, vb, key_valid)
    assert torch.equal(got, fn(qb, kb, vb, key_valid))


def _gpu_fold_case(B, seed, Dv=64, pad=False):
    """7 memory frames of 72 x 72 + 64 pointer tokens, Dh 256, v (B, S, 1, Dv)."""
    q, k, _, freqs, key_valid = _gpu_case(B, 7, 64, seed, pad_frames=2 if pad else 0)
    g = torch.Generator(device="cuda").manual_seed(seed + 100)
    v = torch.randn(B, k.shape[1], 1, Dv, device="cuda", generator=g)
    return q, k, v, freqs, key_valid


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("B, pad", [(1, False), (16, True)], ids=["B1", "B16_pad2"])
def test_gpu_value_dim_real_shape_bf16(B, pad):
    """The value fold's attention at SAM 3 sizes in bf16 (Dh 256, Dv 64): the op (Triton for one
    object, SDPA or its Triton fallback for 16) and the Triton launcher (split and not) within 2x
    PyTorch bf16's error vs the fp32 reference, per object so no (B, Lq, S) scores are built at once;
    the op also replays inside a CUDA graph."""
    q, k, v, freqs, key_valid = _gpu_fold_case(B, seed=30 + B, pad=pad)
    n_rope = 7 * 5184
    rope = torch.view_as_real(freqs)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    assert ma.memory_attention_backend(qb, 64)[0] == "triton"
    cands = {
        "op": lambda: ma.memory_attention(qb, kb, vb, freqs, key_valid, n_rope_keys=n_rope),
        "triton": lambda: ma._memory_attention_triton(qb, kb, vb, rope, key_valid, True, n_rope),
        "triton, no split": lambda: ma._memory_attention_triton(qb, kb, vb, rope, key_valid, True, n_rope,
                                                                num_splits=1),
        "triton 128x64 w8": lambda: ma._memory_attention_triton(qb, kb, vb, rope, key_valid, True, n_rope,
                                                                block_m=128, block_n=64, num_warps=8),
    }
    outs = {name: fn() for name, fn in cands.items()}
    torch_max = torch_sq = 0.0
    errs = {name: [0.0, 0.0] for name in outs}
    for b in range(B):
        sl = slice(b, b + 1)
        ref = ma.memory_attention_ref(q[sl], k[sl], v[sl], rope, key_valid[sl], True, n_rope)
        t = (_torch_bf16(qb[sl], kb[sl], vb[sl], freqs, key_valid[sl], n_rope).float() - ref).abs()
        torch_max, torch_sq = max(torch_max, t.max().item()), torch_sq + t.pow(2).sum().item()
        for name, out in outs.items():
            e = (out[sl].float() - ref).abs()
            errs[name] = [max(errs[name][0], e.max().item()), errs[name][1] + e.pow(2).sum().item()]
    path = "sdpa" if ma.uses_sdpa_path(qb, 64) and (torch.bfloat16, 256, 64) not in ma.SDPA_REFUSED else "triton"
    for name, out in outs.items():
        assert out.shape == (B, 5184, 1, 64) and out.dtype == torch.bfloat16 and not out.isnan().any()
        emax, esq = errs[name]
        assert emax <= 2 * torch_max, (name, path, emax, torch_max)
        assert esq <= 4 * torch_sq, (name, path, esq, torch_sq)  # RMS within 2x

    static = [qb.clone(), kb.clone(), vb.clone(), key_valid.clone()]

    def fn():
        return ma.memory_attention(static[0], static[1], static[2], freqs, static[3], n_rope_keys=n_rope)

    graph, out = capture_graph(fn)
    static[2].copy_(torch.randn_like(v).bfloat16())
    static[3][:, 5184:2 * 5184] = False
    graph.replay()
    torch.testing.assert_close(out, fn(), rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("B, pad", [(1, 0), (3, 3)], ids=["B1", "B3_pad3"])
def test_gpu_tma_loads_real_shape_bf16(B, pad):
    """K and V through tensor descriptors (use_tma) at SAM 3 sizes in bf16, split and not, at the
    default tile and 128x64 w8, unfolded and folded (v 64 wide): the same tiles reach the same math,
    so the output equals the pointer-load kernel's to bf16 rounding (which test_gpu_real_shape_bf16
    holds to the fp32 reference); then replayed from a CUDA graph after the keys change (the
    descriptors are kernel arguments). Last in the file and run apart by bench/gpu/run_checks.sh:
    a new path on the device."""
    q, k, v, freqs, key_valid = _gpu_case(B, 7, 64, seed=50 + B, pad_frames=pad)
    n_rope = 7 * 5184
    rope = torch.view_as_real(freqs)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))

    def close(got, want):
        assert not got.isnan().any()
        tol = 2 ** -7 * want.float().abs().max().item()  # one bf16 step at the output's largest value
        assert (got.float() - want.float()).abs().max().item() <= tol

    for vv in (vb, vb[..., :64].contiguous()):
        for launch in (dict(), dict(num_splits=1), dict(block_m=128, block_n=64, num_warps=8)):
            want = ma._memory_attention_triton(qb, kb, vv, rope, key_valid, True, n_rope, **launch)
            close(ma._memory_attention_triton(qb, kb, vv, rope, key_valid, True, n_rope, use_tma=True, **launch),
                  want)
    graph, out = capture_graph(lambda: ma._memory_attention_triton(qb, kb, vb, rope, key_valid, True, n_rope,
                                                                   use_tma=True))
    kb.mul_(0.5)
    graph.replay()
    close(out, ma._memory_attention_triton(qb, kb, vb, rope, key_valid, True, n_rope))
