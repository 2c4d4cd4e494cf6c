"""Connected-component sizes (``sam3fast.kernels.connected_components``): the Triton union-find
kernels against scipy (``ndimage.label`` with 8-connectivity), exactly, on random masks of several
densities and on the shapes that break label propagation (spirals, snakes, checkerboards, diagonal
lines); the pure-PyTorch spec against scipy; the ``sam3fast::connected_component_sizes`` op
(opcheck, torch.compile) and the typed entry point with its backend choice.

On CPU the launcher runs under ``TRITON_INTERPRET=1`` (set by conftest.py). The interpreter runs the
programs one after another, but the lanes of one program do hit the same parent pointers within a
single atomic_min, so lost unions and their retries are exercised (``test_union_stress``).
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from kernel_checks import capture_graph, forced_backend_reason, run_compiled

from sam3fast.kernels import connected_components as cc

POISON = -7  # an output element the kernels failed to write cannot pass
BIG_TILE = dict(block_h=32, block_w=64)  # the interpreter pays per program: one program per mask here

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not cc.HAS_TRITON, reason=f"triton not importable: {cc.TRITON_IMPORT_ERROR}")


def _scipy(fg):
    return cc._connected_component_sizes_scipy(fg.cpu())


def _run(fg, **launch):
    out = torch.full(fg.shape, POISON, dtype=torch.int64, device=fg.device)
    got = cc._connected_component_sizes_triton(fg, out=out, **launch)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.int64 and got.shape == fg.shape
    return got


def _check(fg, **launch):
    got = _run(fg, **launch)
    want = _scipy(fg)
    bad = got.cpu() != want
    assert not bad.any(), f"{int(bad.sum())} of {fg.numel()} pixels differ, first at {bad.nonzero()[0].tolist()}"
    return want


def _random_masks(N, H, W, seed, densities=(0.1, 0.4, 0.6, 0.9)):
    """N masks whose foreground densities cycle through ``densities`` (below, near and above the
    8-connected percolation threshold ~0.41)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor([densities[i % len(densities)] for i in range(N)]).view(N, 1, 1)
    return torch.rand(N, H, W, generator=g) < p


def _spiral(S, gap=1):
    """A one-pixel-wide square spiral with ``gap`` background pixels between its arms, drawn by a
    turtle: segments of S - 1, S - 1, S - 1 moves, then pairs shortened by gap + 1. One path of
    ~S * S / (gap + 1) pixels: the worst case for label propagation and for parent-chain length."""
    m = torch.zeros(S, S, dtype=torch.bool)
    step = gap + 1
    lengths = [S - 1] * 3
    k = 1
    while S - 1 - k * step > 0:
        lengths += [S - 1 - k * step] * 2
        k += 1
    y, x = 0, 0
    m[0, 0] = True
    for i, n in enumerate(lengths):
        dy, dx = ((0, 1), (1, 0), (0, -1), (-1, 0))[i % 4]
        for _ in range(n):
            y, x = y + dy, x + dx
            m[y, x] = True
    return m


def _snake(H, W):
    """A serpentine: full rows on even y, joined by one pixel at alternating ends on odd y."""
    m = torch.zeros(H, W, dtype=torch.bool)
    m[0::2] = True
    for y in range(1, H, 2):
        m[y, W - 1 if (y // 2) % 2 == 0 else 0] = True
    return m


def _vertical_snake(H, W):
    return _snake(W, H).T.contiguous()


# ---- Triton launcher vs scipy (interpreter on CPU) ------------------------------------------


@needs_triton
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 13), (3, 33, 40), (4, 2, 70), (2, 45, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_random_masks(shape):
    fg = _random_masks(*shape, seed=sum(shape))
    want = _check(fg, **BIG_TILE)
    if fg.numel() > 100:
        assert (want > 1).any() and (want == 1).any(), "no mix of large and isolated components"


@needs_triton
@pytest.mark.parametrize("tile", [(1, 1), (2, 4), (4, 2), (8, 16), (16, 32)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_tile_boundaries(tile):
    """Runs cut at tile edges, unions across tiles in both directions, partial tiles."""
    H, W = (6, 9) if tile == (1, 1) else (11, 19)  # the interpreter pays per program
    fg = _random_masks(2, H, W, seed=5, densities=(0.5, 0.75))
    _check(fg, block_h=tile[0], block_w=tile[1])


@needs_triton
@pytest.mark.parametrize("H, W", [(1, 1), (5, 9), (17, 33)])
def test_all_foreground_and_background(H, W):
    fg = torch.zeros(3, H, W, dtype=torch.bool)
    fg[1] = True
    got = _run(fg, block_h=8, block_w=8)
    assert (got[0] == 0).all() and (got[2] == 0).all() and (got[1] == H * W).all()


@needs_triton
def test_empty_batches():
    for shape in [(0, 5, 7), (3, 0, 5), (2, 4, 0)]:
        fg = torch.zeros(shape, dtype=torch.bool)
        got = cc._connected_component_sizes_triton(fg)
        assert got.shape == shape and got.dtype == torch.int64
        assert torch.equal(cc.connected_component_sizes_ref(fg), got)
        assert torch.equal(_scipy(fg), got)


@needs_triton
@pytest.mark.parametrize("H, W", [(8, 8), (9, 14)])
def test_checkerboard_is_one_component(H, W):
    """8-connectivity joins diagonals: a checkerboard is one component (4-connectivity: all 1s)."""
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    board = (yy + xx) % 2 == 0
    fg = torch.stack([board, ~board])
    got = _check(fg, block_h=4, block_w=8)
    assert (got[0][board] == int(board.sum())).all() and (got[1][~board] == int((~board).sum())).all()


@needs_triton
def test_diagonal_only_connection():
    """Hand-checked answers, independent of scipy."""
    fg = torch.zeros(1, 4, 5, dtype=torch.bool)
    fg[0, 0, 0] = fg[0, 1, 1] = True  # diagonal pair: size 2
    fg[0, 0, 4] = fg[0, 1, 3] = fg[0, 2, 4] = True  # anti-diagonal zigzag: size 3
    fg[0, 3, 0] = True  # isolated
    want = torch.zeros(1, 4, 5, dtype=torch.int64)
    want[0, 0, 0] = want[0, 1, 1] = 2
    want[0, 0, 4] = want[0, 1, 3] = want[0, 2, 4] = 3
    want[0, 3, 0] = 1
    for tile in [(1, 1), (2, 2), (4, 8)]:
        assert torch.equal(_run(fg, block_h=tile[0], block_w=tile[1]), want)


@needs_triton
def test_diagonal_lines():
    """Lines x + y = 3k and x - y = 3k + 1 (one apart is 8-adjacent, three apart is not), one mask
    each: every line is its own component with its length as size."""
    H, W = 13, 17
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    anti = (xx + yy) % 3 == 0
    main = (xx - yy) % 3 == 1
    fg = torch.stack([anti, main])
    got = _check(fg, block_h=4, block_w=8)
    for key, m, i in (((xx + yy), anti, 0), ((xx - yy), main, 1)):
        for c in key[m].unique():
            line = m & (key == c)
            assert (got[i][line] == int(line.sum())).all()


@needs_triton
@pytest.mark.parametrize("S, gap", [(21, 1), (24, 2), (31, 1)])
def test_spiral(S, gap):
    fg = torch.stack([_spiral(S, gap), ~_spiral(S, gap)])
    want = _check(fg, block_h=8, block_w=8)
    n_spiral = int(fg[0].sum())
    assert (want[0][fg[0]] == n_spiral).all(), "the spiral is not one component: the test shape is wrong"
    assert n_spiral > S * S // (gap + 2)
    _check(fg, **BIG_TILE)  # one program: every union inside a single program's loops


@needs_triton
def test_two_interleaved_spirals():
    """Two long paths wound side by side two pixels apart (a spiral and a smaller one inside its
    gaps, cut where they would touch at the centre): they must stay two components."""
    S = 26
    a = _spiral(S, gap=3)
    b = torch.zeros_like(a)
    b[2:S - 2, 2:S - 2] = _spiral(S - 4, gap=3)
    b &= ~torch.nn.functional.max_pool2d(a[None, None].float(), 3, 1, 1)[0, 0].bool()
    fg = (a | b)[None]
    want = _check(fg, block_h=4, block_w=16)
    assert (want[0][a] == int(a.sum())).all() and (want[0][b] == int(b.sum())).all()
    assert int(b.sum()) > 100


@needs_triton
@pytest.mark.parametrize("H, W", [(17, 12), (31, 9)])
def test_snakes(H, W):
    fg = torch.stack([_snake(H, W), _vertical_snake(H, W), ~_snake(H, W)])
    want = _check(fg, block_h=4, block_w=8)
    assert (want[0][fg[0]] == int(fg[0].sum())).all() and (want[1][fg[1]] == int(fg[1].sum())).all()


@needs_triton
def test_comb_many_roots_meet_late():
    """Many vertical teeth that only join at the bottom row: all unions of the last row hit
    different roots at once."""
    fg = torch.zeros(2, 15, 33, dtype=torch.bool)
    fg[0, :, 0::2] = True
    fg[0, -1] = True
    fg[1] = fg[0].flip(0).flip(1)
    want = _check(fg, block_h=4, block_w=8)
    assert (want[0][fg[0]] == int(fg[0].sum())).all()


@needs_triton
def test_noncontiguous_input():
    fg = _random_masks(3, 20, 24, seed=9).transpose(1, 2)
    assert not fg.is_contiguous()
    _check(fg, **BIG_TILE)


@needs_triton
def test_union_stress():
    """``_union`` alone, one program, many lanes linking into the same roots in the same atomic:
    the resulting partition equals a sequential union-find's."""
    import triton
    import triton.language as tl

    @triton.jit
    def _pairs_kernel(parent_ptr, a_ptr, b_ptr, n_pairs, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        m = offs < n_pairs
        a = tl.load(a_ptr + offs, mask=m, other=0)
        b = tl.load(b_ptr + offs, mask=m, other=0)
        cc._union(parent_ptr, a, b, m)

    g = torch.Generator().manual_seed(3)
    n, n_pairs = 200, 120
    for rnd in range(3):
        a = torch.randint(0, n, (n_pairs,), generator=g, dtype=torch.int32)
        b = torch.randint(0, n // 10 if rnd == 0 else n, (n_pairs,), generator=g, dtype=torch.int32)
        parent = torch.arange(n, dtype=torch.int32)
        _pairs_kernel[(1,)](parent, a, b, n_pairs, BLOCK=128)

        def find(p, x):
            while p[x] != x:
                x = p[x]
            return x

        assert all(int(parent[i]) <= i for i in range(n))
        seq = list(range(n))
        for i, j in zip(a.tolist(), b.tolist()):
            ri, rj = find(seq, i), find(seq, j)
            seq[max(ri, rj)] = min(ri, rj)
        p = parent.tolist()
        # Same partition, and the root is the smallest member (links always go to the smaller root).
        assert [find(p, i) for i in range(n)] == [find(seq, i) for i in range(n)]


# ---- references ------------------------------------------------------------------------------


def test_reference_matches_scipy():
    fg = torch.cat([_random_masks(4, 23, 31, seed=1), torch.zeros(1, 23, 31, dtype=torch.bool)])
    fg[-1, :, :23] = _spiral(23, 1)
    assert torch.equal(cc.connected_component_sizes_ref(fg), _scipy(fg))


# ---- the op and the entry point ---------------------------------------------------------------


def test_op_cpu_is_scipy():
    fg = _random_masks(3, 12, 17, seed=4)
    assert torch.equal(torch.ops.sam3fast.connected_component_sizes(fg), _scipy(fg))


def test_opcheck():
    torch.library.opcheck(torch.ops.sam3fast.connected_component_sizes.default, (_random_masks(3, 9, 11, seed=6),))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(backend):
    """Hole filling written around the op compiles with no graph break (the host scipy call hides
    behind the op on CPU)."""

    def fill_small_holes(logits):
        bg = logits <= 0
        sizes = torch.ops.sam3fast.connected_component_sizes(bg)
        return torch.where(bg & (sizes <= 4), 0.1, logits), sizes.sum()

    torch._dynamo.reset()
    logits = torch.randn(3, 14, 15, generator=torch.Generator().manual_seed(2))
    got = torch.compile(fill_small_holes, fullgraph=True, backend=backend)(logits)
    want = fill_small_holes(logits)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[0] != logits).any()


def test_entry_point_and_backend_cpu(monkeypatch):
    fg = _random_masks(2, 10, 13, seed=8)
    backend, reason = cc.connected_component_sizes_backend(fg)
    assert backend == "scipy" and "cpu" in reason
    assert torch.equal(cc.connected_component_sizes_gpu(fg), _scipy(fg))
    monkeypatch.setattr(cc._env, "FORCE_REFERENCE", True)
    assert cc.connected_component_sizes_backend(fg) == ("scipy", "SAM3FAST_FORCE_REFERENCE=1")
    assert torch.equal(cc.connected_component_sizes_gpu(fg), _scipy(fg))


def test_force_reference_env():
    reason = forced_backend_reason(
        "connected_components", "connected_component_sizes_backend(torch.zeros(1, 2, 2, dtype=torch.bool))")
    assert reason == "SAM3FAST_FORCE_REFERENCE=1"


def test_bad_inputs():
    fg = _random_masks(2, 5, 6, seed=0)
    fns = [cc.connected_component_sizes_ref, cc._connected_component_sizes_scipy, cc.connected_component_sizes_gpu,
           torch.ops.sam3fast.connected_component_sizes]
    if cc.HAS_TRITON:
        fns.append(cc._connected_component_sizes_triton)
    for fn in fns:
        with pytest.raises(ValueError, match=r"\(N, H, W\)"):
            fn(fg[0])
        with pytest.raises(ValueError, match=r"\(N, H, W\)"):
            fn(fg[None])
        for dtype in (torch.uint8, torch.float32, torch.int64):
            with pytest.raises(ValueError, match="bool"):
                fn(fg.to(dtype))
    if cc.HAS_TRITON:
        with pytest.raises(ValueError, match="power of two"):
            cc._connected_component_sizes_triton(fg, block_w=12)
        with pytest.raises(ValueError, match="out must be"):
            cc._connected_component_sizes_triton(fg, out=torch.empty(2, 5, 6, dtype=torch.int32))


@needs_triton
def test_kernels_compile_for_sm90():
    """The real (not interpreted) Triton compiler builds the four kernels for an H100 without a GPU,
    so a frontend or type error of the GPU path fails here rather than on the first GPU run."""
    code = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from sam3fast.kernels import connected_components as cc
        for name, atoms in (("init", 0), ("merge", 1), ("count", 1), ("gather", 0)):
            fn = getattr(cc, f"_cc_{name}_kernel")
            sig = {"fg_ptr": "*u8", "parent_ptr": "*i32", "sizes_ptr": "*i64", "H": "i32", "W": "i32"}
            if name == "merge":
                del sig["sizes_ptr"]
            src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs={"BLOCK_H": 16, "BLOCK_W": 32})
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
            ptx = k.asm["ptx"]
            assert (ptx.count("atom.global") >= 1) == bool(atoms), (name, ptx.count("atom.global"))
        print("ok")
        """
    )
    run_compiled(code)


# ---- GPU only --------------------------------------------------------------------------------


def _gpu_batch(N, H, W, seed):
    """Random densities, a spiral, a snake, all-foreground and all-background among N masks."""
    fg = _random_masks(N, H, W, seed=seed, densities=(0.05, 0.3, 0.41, 0.5, 0.7, 0.95))
    S = min(H, W)
    fg[0] = False
    fg[1] = True
    fg[2] = False
    fg[2, :S, :S] = _spiral(S, 1)
    fg[3] = _snake(H, W)
    fg[4] = ~fg[2]
    return fg


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("shape", [(64, 288, 288), (5, 1080, 1920), (7, 33, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_matches_cpu(shape):
    fg = _gpu_batch(*shape, seed=shape[1]).cuda()
    assert cc.connected_component_sizes_backend(fg)[0] == "triton"
    want = _scipy(fg)
    for launch in ({}, dict(block_h=8, block_w=64), dict(block_h=32, block_w=32, num_warps=8)):
        assert torch.equal(_run(fg, **launch).cpu(), want)
    assert torch.equal(cc.connected_component_sizes_gpu(fg).cpu(), want)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_repeatable():
    """Many runs of a racy algorithm: any schedule-dependent bug shows as a mismatch sooner or later."""
    fg = _gpu_batch(64, 288, 288, seed=11).cuda()
    want = _scipy(fg).cuda()
    for _ in range(20):
        assert torch.equal(_run(fg), want)


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_cuda_graph_replay():
    N, H, W = 64, 288, 288
    static = _gpu_batch(N, H, W, seed=1).cuda()
    fn = lambda: cc.connected_component_sizes_gpu(static)  # noqa: E731
    graph, out = capture_graph(fn)
    for seed in (2, 3):
        new = _gpu_batch(N, H, W, seed=seed)
        static.copy_(new)
        graph.replay()
        assert torch.equal(out.cpu(), _scipy(new))


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gpu_compile_inductor():
    fg = _gpu_batch(8, 288, 288, seed=4).cuda()

    def fn(x):
        return torch.ops.sam3fast.connected_component_sizes(x) * 2

    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, fullgraph=True)(fg), fn(fg))
