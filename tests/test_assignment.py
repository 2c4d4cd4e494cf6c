"""sam3fast.assignment: batched exact linear assignment vs scipy.optimize.linear_sum_assignment.

The CPU op follows scipy's search order and tie-breaking, so its assignments must equal scipy's
exactly (ties included). The CUDA op (GPU tests) must reach the same optimal cost.
"""

import glob
import os
import re
import shutil
import subprocess

import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from sam3fast.assignment import batched_linear_sum_assignment, linear_sum_assignment_with_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cuda_op = pytest.mark.skipif(
    not (torch.cuda.is_available()
         and torch._C._dispatch_has_kernel_for_dispatch_key("sam3fast::linear_sum_assignment", "CUDA")),
    reason="needs a CUDA device and sam3fast._C built with CUDA",
)


def scipy_assignment(cost: torch.Tensor) -> torch.Tensor:
    """(B, N) int64 from scipy, -1 for unassigned rows (scipy sees the float64 values of cost)."""
    B, n, _ = cost.shape
    out = torch.full((B, n), -1, dtype=torch.int64)
    for b in range(B):
        rows, cols = scipy_lsa(cost[b].double().numpy())
        out[b, torch.from_numpy(rows)] = torch.from_numpy(cols)
    return out


def total_cost(cost: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """(B,) float64 sum of the assigned entries."""
    c = cost.double().cpu()
    a = assignment.cpu()
    picked = torch.gather(c, 2, a.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(a >= 0, picked, torch.zeros_like(picked)).sum(-1)


def check_valid(assignment: torch.Tensor, n: int, m: int):
    a = assignment.cpu()
    assert a.dtype == torch.int64 and a.shape[1:] == (n,)
    assert ((a >= -1) & (a < m)).all()
    assert ((a >= 0).sum(-1) == min(n, m)).all(), "every problem assigns min(n, m) pairs"
    for row in a:
        used = row[row >= 0]
        assert used.unique().numel() == used.numel(), "a column is used twice"


def random_cost(B, n, m, dtype, seed, kind="uniform", inf_rate=0.3):
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        c = torch.randn(B, n, m, generator=g, dtype=torch.float64) * 10
    elif kind == "ties":
        c = torch.randint(0, 3, (B, n, m), generator=g).double()
    elif kind == "inf":
        c = torch.rand(B, n, m, generator=g, dtype=torch.float64)
        c[torch.rand(B, n, m, generator=g) < inf_rate] = float("inf")
    return c.to(dtype)


SHAPES = [(1, 1), (3, 3), (5, 8), (8, 5), (10, 10), (1, 7), (7, 1), (17, 31), (31, 17), (64, 64), (40, 100)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("kind", ["uniform", "ties"])
def test_matches_scipy(n, m, dtype, kind):
    cost = random_cost(3, n, m, dtype, seed=n * 1000 + m, kind=kind)
    got = batched_linear_sum_assignment(cost)
    check_valid(got, n, m)
    want = scipy_assignment(cost)
    assert torch.equal(got, want)


@pytest.mark.parametrize("n,m,inf_rate", [(6, 6, 0.3), (6, 6, 0.7), (4, 9, 0.8), (9, 4, 0.8), (30, 30, 0.3), (30, 30, 0.85)])
def test_forbidden_entries(n, m, inf_rate):
    cost = random_cost(20, n, m, torch.float64, seed=7 + n, kind="inf", inf_rate=inf_rate)
    assignment, feasible = batched_linear_sum_assignment(cost, return_feasible=True)
    for b in range(cost.shape[0]):
        try:
            rows, cols = scipy_lsa(cost[b].numpy())
        except ValueError:  # infeasible
            assert not feasible[b] and (assignment[b] == -1).all()
            continue
        assert feasible[b]
        want = torch.full((n,), -1, dtype=torch.int64)
        want[torch.from_numpy(rows)] = torch.from_numpy(cols)
        assert torch.equal(assignment[b], want)
        assert torch.isfinite(total_cost(cost[b : b + 1], assignment[b : b + 1])).all()
    if inf_rate > 0.5:
        assert feasible.any() and not feasible.all(), "the seed should give both kinds"


def test_degenerate_shapes():
    # all-equal: scipy's (and our) answer is the identity
    for n, m in [(4, 4), (3, 6), (6, 3)]:
        got = batched_linear_sum_assignment(torch.ones(2, n, m))
        assert torch.equal(got, scipy_assignment(torch.ones(2, n, m)))
        assert torch.equal(got[0, : min(n, m)], torch.arange(min(n, m)))
    # one row picks the cheapest column; one column goes to the cheapest row
    row = torch.tensor([[[3.0, 1.0, 2.0, 1.5]]])
    assert batched_linear_sum_assignment(row).tolist() == [[1]]
    col = torch.tensor([[[3.0], [1.0], [2.0]]])
    assert batched_linear_sum_assignment(col).tolist() == [[-1, 0, -1]]
    # empty batch, no rows, no columns
    assert batched_linear_sum_assignment(torch.zeros(0, 3, 4)).shape == (0, 3)
    assert batched_linear_sum_assignment(torch.zeros(2, 0, 4)).shape == (2, 0)
    got, feasible = batched_linear_sum_assignment(torch.zeros(2, 3, 0), return_feasible=True)
    assert got.tolist() == [[-1, -1, -1]] * 2 and feasible.all()
    # a single (n, m) problem
    c = random_cost(1, 5, 7, torch.float64, seed=3)[0]
    got = batched_linear_sum_assignment(c)
    assert got.shape == (5,) and torch.equal(got, scipy_assignment(c[None])[0])


def test_batch_of_small_problems():
    cost = random_cost(200, 6, 9, torch.float32, seed=11)
    got = batched_linear_sum_assignment(cost)
    assert torch.equal(got, scipy_assignment(cost))
    # tall batch too, and a non-contiguous view (the transpose of the wide batch)
    tall = cost.transpose(1, 2)
    assert not tall.is_contiguous()
    assert torch.equal(batched_linear_sum_assignment(tall), scipy_assignment(tall.contiguous()))


def test_other_dtypes_are_converted():
    ints = torch.randint(0, 5, (4, 5, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(batched_linear_sum_assignment(ints), scipy_assignment(ints.double()))
    half = random_cost(4, 5, 6, torch.float32, seed=1).half()
    assert torch.equal(batched_linear_sum_assignment(half), scipy_assignment(half.float()))


def test_infeasible_raises():
    cost = random_cost(3, 3, 3, torch.float64, seed=0)
    cost[1, :, 2] = float("inf")
    cost[1, :, 1] = float("inf")  # three rows, one usable column
    with pytest.raises(ValueError, match="problem 1 is infeasible"):
        batched_linear_sum_assignment(cost)
    with pytest.raises(ValueError):  # scipy agrees
        scipy_lsa(cost[1].numpy())
    assignment, feasible = batched_linear_sum_assignment(cost, return_feasible=True)
    assert feasible.tolist() == [True, False, True]
    assert (assignment[1] == -1).all()
    assert torch.equal(assignment[[0, 2]], scipy_assignment(cost[[0, 2]]))
    with pytest.raises(ValueError, match="infeasible"):
        batched_linear_sum_assignment(torch.full((1, 2, 2), float("inf")))


@pytest.mark.parametrize("bad,word", [(float("nan"), "NaN"), (float("-inf"), "-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_invalid_entries_raise(bad, word, dtype):
    cost = random_cost(2, 4, 5, dtype, seed=2)
    cost[1, 2, 3] = bad
    with pytest.raises(ValueError, match=f"problem 1 contains {word}"):
        batched_linear_sum_assignment(cost)
    _, feasible = linear_sum_assignment_with_status(cost)
    assert feasible.tolist() == [True, False]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\(B, N, M\)"):
        linear_sum_assignment_with_status(torch.zeros(3))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.sam3fast.linear_sum_assignment(torch.zeros(1, 2, 2, dtype=torch.int32))


@pytest.mark.parametrize(
    "cost",
    [
        random_cost(4, 5, 7, torch.float32, seed=0),
        random_cost(3, 9, 4, torch.float64, seed=1),
        random_cost(2, 6, 6, torch.float64, seed=2, kind="inf"),
    ],
    ids=["wide-f32", "tall-f64", "inf-f64"],
)
def test_opcheck(cost):
    torch.library.opcheck(torch.ops.sam3fast.linear_sum_assignment.default, (cost,))


def test_compile_fullgraph():
    torch._dynamo.reset()

    def match(scores, boxes_a, boxes_b):
        cost = torch.cdist(boxes_a, boxes_b) - scores[:, :, None]
        return batched_linear_sum_assignment(cost)

    compiled = torch.compile(match, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    args = (torch.rand(8, 6, generator=g), torch.rand(8, 6, 4, generator=g), torch.rand(8, 5, 4, generator=g))
    assert torch.equal(compiled(*args), match(*args))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize(
    "path",
    sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)),
    ids=lambda p: os.path.relpath(p, ROOT),
)
def test_cuda_sources_compile(path, tmp_path):
    """Every .cu file compiles for sm_90 (the kernels include no torch headers, ~2-30 s each) and
    ptxas spills no register in any kernel (``-Xptxas -v``; the assignment's phase-timing kernels
    have a stack for their printf, not spills). Without a minimum of resident blocks in their
    ``__launch_bounds__``, CUDA 13's ptxas held several assignment kernels to 64 registers and they
    spilled (8 to 72 bytes of stores)."""
    cmd = ["nvcc", "-c", "-std=c++17", "-arch=sm_90", "-O3", "-Xptxas", "-v", "-I", os.path.join(ROOT, "csrc"), path,
           "-o", str(tmp_path / "out.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = res.stdout + res.stderr
    spills = re.findall(r"Function properties for (\S+)\s+\d+ bytes stack frame, (\d+) bytes spill stores, "
                        r"(\d+) bytes spill loads", report)
    assert spills, "ptxas -v reported no kernel"
    assert all(st == "0" and ld == "0" for _, st, ld in spills), [s for s in spills if s[1:] != ("0", "0")]


# ---- GPU (skipped without CUDA) ----


@pytest.mark.gpu
@needs_cuda_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m", SHAPES + [(256, 256), (200, 256), (256, 100), (700, 500)])
@pytest.mark.parametrize("kind", ["uniform", "ties", "inf"])
def test_cuda_matches_cpu(n, m, dtype, kind):
    cost = random_cost(5, n, m, dtype, seed=n + 7 * m, kind=kind)
    want, want_ok = linear_sum_assignment_with_status(cost)
    got, got_ok = linear_sum_assignment_with_status(cost.cuda())
    assert torch.equal(got_ok.cpu(), want_ok)
    got = got.cpu()
    assert (got[~want_ok] == -1).all()
    if want_ok.any():
        check_valid(got[want_ok], n, m)
        want_cost, got_cost = total_cost(cost[want_ok], want[want_ok]), total_cost(cost[want_ok], got[want_ok])
        # same optimum; tied problems may pick another optimal assignment
        torch.testing.assert_close(got_cost, want_cost, rtol=1e-12, atol=1e-9)
        if kind == "uniform":
            assert torch.equal(got, want)


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_launcher_knobs(monkeypatch, capfd):
    """Every setting of the launcher's tuning knobs (csrc/cuda/assignment_tuning.h; read at every
    call) reaches the CPU optimum: block size rule / 32 (one warp, __syncwarp) / 64 / 256 threads,
    initialisation none / row reduction / + reduction transfer, shared-memory staging up to 48 KiB,
    the opt-in limit, or the opt-in limit for batches of at most one problem per SM (the default;
    200x128 and 200x256 float32 stage only with the opt-in)."""
    wide = random_cost(6, 6, 9, torch.float64, seed=24, kind="inf", inf_rate=0.4)
    wide[0, 2, :] = float("inf")  # a row with no allowed column (caught by the initialisation)
    wide[1, :3, 1:] = float("inf")  # three rows share one column (caught by a search)
    tall = wide.transpose(1, 2).contiguous()
    cases = [random_cost(1, 200, 128, torch.float32, seed=21), random_cost(2, 200, 256, torch.float32, seed=22),
             random_cost(8, 64, 64, torch.float32, seed=23, kind="ties"), wide, tall,
             random_cost(4, 1, 7, torch.float32, seed=26), random_cost(4, 7, 1, torch.float32, seed=27),
             torch.full((3, 5, 9), 2.0)]
    refs = [linear_sum_assignment_with_status(c) for c in cases]
    assert refs[3][1][:2].tolist() == [False, False] and refs[3][1][2:].any()
    settings = [(t, i, s, r, p) for t in ("0", "32", "64", "256") for i in ("0", "1", "2") for s in ("0", "1", "2")
                for r in ("0", "1") for p in ("0", "1", "2")]
    for threads, init, stage, regs, split in settings + [("48", "7", "x", "2", "3")]:  # invalid: the defaults
        monkeypatch.setenv("SAM3FAST_LSA_THREADS", threads)
        monkeypatch.setenv("SAM3FAST_LSA_INIT", init)
        monkeypatch.setenv("SAM3FAST_LSA_STAGE", stage)
        monkeypatch.setenv("SAM3FAST_LSA_REGS", regs)
        monkeypatch.setenv("SAM3FAST_LSA_SPLIT", split)
        for cost, (want, want_ok) in zip(cases, refs):
            got, got_ok = linear_sum_assignment_with_status(cost.cuda())
            got, got_ok = got.cpu(), got_ok.cpu()
            where = (f"threads={threads} init={init} stage={stage} regs={regs} split={split} "
                     f"shape={tuple(cost.shape)}")
            assert torch.equal(got_ok, want_ok), where
            assert (got[~want_ok] == -1).all(), where
            if want_ok.any():
                n, m = cost.shape[1:]
                check_valid(got[want_ok], n, m)
                torch.testing.assert_close(total_cost(cost[want_ok], got[want_ok]),
                                           total_cost(cost[want_ok], want[want_ok]), rtol=1e-12, atol=1e-9,
                                           msg=where)
        assert torch.equal(got, torch.arange(5).expand(3, 5))  # all-equal costs: the identity, as on CPU
    err = capfd.readouterr().err
    assert "ignoring SAM3FAST_LSA_THREADS=48" in err and "ignoring SAM3FAST_LSA_REGS=2" in err
    assert "ignoring SAM3FAST_LSA_SPLIT=3" in err


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_large_batch_and_flags():
    cost = random_cost(4096, 8, 12, torch.float32, seed=5)
    cost[7, 0, 0] = float("nan")
    cost[9, 1, 1] = float("-inf")
    cost[11, :, 3:] = float("inf")  # 8 rows, 3 usable columns
    got, ok = linear_sum_assignment_with_status(cost.cuda())
    ok = ok.cpu()
    assert (~ok).nonzero().flatten().tolist() == [7, 9, 11]
    assert (got.cpu()[~ok] == -1).all()
    assert torch.equal(got.cpu()[ok], linear_sum_assignment_with_status(cost[ok])[0])
    # the public function does not raise on CUDA (no host sync): rows come back -1
    assert (batched_linear_sum_assignment(cost.cuda())[7] == -1).all()


@pytest.mark.gpu
@needs_cuda_op
def test_cuda_graph_capture_and_compile():
    cost = random_cost(64, 10, 20, torch.float32, seed=6).cuda()
    want = linear_sum_assignment_with_status(cost)[0]
    static_out = None
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):  # fails if the op synchronises with the host
        static_out = linear_sum_assignment_with_status(cost)[0]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, want)
    torch._dynamo.reset()
    compiled = torch.compile(lambda c: batched_linear_sum_assignment(c * 1.0), fullgraph=True)
    assert torch.equal(compiled(cost), want)


def test_info_reports_the_native_op(capsys):
    from sam3fast import info

    facts = info.collect()
    assert facts["native"]["built"], facts["native"].get("reason")
    keys = facts["native"]["ops"]["sam3fast::linear_sum_assignment"]
    assert "CPU" in keys and "Meta" in keys
    assert ("CUDA" in keys) == facts["native"]["cuda_kernels"]
    if not facts["native"]["cuda_kernels"]:
        assert facts["native"]["cuda_reason"]
    info.main()
    assert "sam3fast::linear_sum_assignment" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cmake_ctest(tmp_path):
    """CMakeLists.txt builds csrc/ standalone; its C++ test checks the CPU solver and the CUDA block
    algorithm (on host threads, under ThreadSanitizer when available) against brute force."""
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        ["cmake", "-S", ROOT, "-B", str(build), "-DSAM3FAST_CUDA=OFF", *gen],
        ["cmake", "--build", str(build), "-j", str(max(2, os.cpu_count() or 2))],
        ["ctest", "--test-dir", str(build), "--output-on-failure"],
    ]
    for cmd in steps:
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"


def test_bench_smoke(monkeypatch, capsys):
    """bench/bench_assignment.py --smoke runs (and checks every answer against scipy's optimum)."""
    import runpy
    import sys

    script = os.path.join(ROOT, "bench", "bench_assignment.py")
    monkeypatch.setattr(sys, "argv", [script, "--smoke"])
    runpy.run_path(script, run_name="__main__")
    assert "sam3fast_cpu" in capsys.readouterr().out
