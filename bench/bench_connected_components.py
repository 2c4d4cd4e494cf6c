"""Benchmark of connected-component sizes (``sam3fast::connected_component_sizes``), the step of the
official hole filling that today costs a host round trip every video frame.

For N masks (N, H, W) bool -> (N, H, W) int64 sizes of 8-connected components, on three inputs:
  blobs     thresholded smooth logits with noise (what the SAM 3 low-res masks look like; with the
            background this is what hole filling labels)
  noise     i.i.d. foreground at density 0.45 (near the percolation threshold: many components)
  spiral    every mask one one-pixel spiral (the worst case for the union-find chains)
rows:
  triton <bh>x<bw> w<warps>  the four-launch union-find kernels (launcher, tile sweep on GPU)
  triton (op)                 through torch.ops.sam3fast.connected_component_sizes (GPU)
  triton (CUDA graph)         the op captured once and replayed (GPU)
  scipy round trip            what ``sam3fast.ops.connected_component_sizes`` does today: copy to
                              the host, scipy.ndimage.label per mask, copy back (on GPU this
                              includes the device sync)
Mpix/s = N * H * W / time.

    python bench/bench_connected_components.py            # GPU: 64 x 288 x 288, writes bench/results/*.json + .md
    python bench/bench_connected_components.py --smoke    # CPU: tiny shapes, Triton interpreter, a few s

CPU numbers (``--smoke``) check that the script runs; they are not performance numbers.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench/_common.py, also when run through runpy

from _common import machine_header, print_header, time_ms, use_interpreter_without_cuda, write_results  # noqa: E402

use_interpreter_without_cuda()  # before the kernel import

from sam3fast.kernels import connected_components as cc  # noqa: E402

TILES = [(16, 32, 4), (8, 32, 2), (8, 64, 4), (32, 32, 8), (4, 128, 4), (16, 64, 8)]  # (block_h, block_w, num_warps)


def spiral(S: int) -> torch.Tensor:
    """A one-pixel spiral with one-pixel gaps filling an S x S square."""
    m = torch.zeros(S, S, dtype=torch.bool)
    lengths = [S - 1] * 3
    k = 1
    while S - 1 - 2 * k > 0:
        lengths += [S - 1 - 2 * k] * 2
        k += 1
    y = x = 0
    m[0, 0] = True
    for i, n in enumerate(lengths):
        dy, dx = ((0, 1), (1, 0), (0, -1), (-1, 0))[i % 4]
        for _ in range(n):
            y, x = y + dy, x + dx
            m[y, x] = True
    return m


def make_inputs(kind: str, N: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "blobs":
        yy = torch.linspace(0, 1, H).view(1, H, 1)
        xx = torch.linspace(0, 1, W).view(1, 1, W)
        cy, cx = torch.rand(N, 1, 1, generator=g), torch.rand(N, 1, 1, generator=g)
        r = 0.05 + 0.25 * torch.rand(N, 1, 1, generator=g)
        logits = 6 * (1 - ((yy - cy) ** 2 + (xx - cx) ** 2) / r**2) + 2.0 * torch.randn(N, H, W, generator=g)
        return logits > 0
    if kind == "noise":
        return torch.rand(N, H, W, generator=g) < 0.45
    if kind == "spiral":
        fg = torch.zeros(N, H, W, dtype=torch.bool)
        S = min(H, W)
        fg[:, :S, :S] = spiral(S)
        return fg
    raise ValueError(kind)


def graph_replay(fg):
    """The op captured in a CUDA graph (what the video loop does): returns a replay closure."""
    static = fg.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.sam3fast.connected_component_sizes(static)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.sam3fast.connected_component_sizes(static)
    graph.replay()
    return graph.replay, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI); numbers are not performance numbers")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--height", type=int, default=288)
    p.add_argument("--width", type=int, default=288)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--inputs", default="blobs,noise,spiral")
    p.add_argument("--out", default=None,
                   help="results path stem (GPU: bench/results/connected_components_<gpu>_<date>)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.n, args.height, args.width, args.reps = 3, 24, 24, 3
    elif device.type != "cuda":
        p.error("full-size runs need a CUDA device; use --smoke on CPU")
    # The interpreter pays per program: one large tile keeps the smoke run short.
    tiles = [(32, 32, 4)] if device.type == "cpu" else TILES

    N, H, W = args.n, args.height, args.width
    header = machine_header(device, {"N": args.n, "H": args.height, "W": args.width})
    print_header("connected_components", header)

    rows = []
    for kind in args.inputs.split(","):
        fg = make_inputs(kind, N, H, W).to(device)
        want = cc._connected_component_sizes_scipy(fg.cpu())
        n_comp = sum(len(want[i][want[i] > 0].unique()) for i in range(N)) / max(N, 1)
        cands = {}
        for bh, bw, nw in tiles:
            tile = dict(block_h=bh, block_w=bw, num_warps=nw)
            cands[f"triton {bh}x{bw} w{nw}"] = lambda tile=tile: cc._connected_component_sizes_triton(fg, **tile)
        if device.type == "cuda":
            cands["triton (op)"] = lambda: torch.ops.sam3fast.connected_component_sizes(fg)
            replay, graph_out = graph_replay(fg)
            cands["triton (CUDA graph)"] = lambda: (replay(), graph_out)[1]
        cands["scipy round trip"] = lambda: cc._connected_component_sizes_scipy(fg)
        for name, fn in cands.items():
            got = fn()
            # Exact: a size that differs anywhere makes the time meaningless.
            assert torch.equal(got.cpu(), want), f"{kind} / {name}: output differs from scipy"
            ms = time_ms(fn, device, args.reps)
            row = {"input": kind, "impl": name, "ms": ms, "Mpix_per_s": N * H * W / ms / 1e3}
            rows.append(row)
            print(f"{kind:7} ({n_comp:7.1f} comps/mask)  {name:24} {ms:10.3f} ms  {row['Mpix_per_s']:10.1f} Mpix/s")

    if device.type == "cuda" or args.out:
        write_results(
            "connected_components", header, rows, ["input", "impl", "ms", "Mpix/s"],
            lambda r: [r["input"], r["impl"], f"{r['ms']:.3f}", f"{r['Mpix_per_s']:.1f}"], args.out,
        )

if __name__ == "__main__":
    main()
