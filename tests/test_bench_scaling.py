"""bench/bench_scaling.py --smoke: the multi-GPU scaling benchmark runs on CPU (W = 1, then W = 2
on gloo: a spawned worker process), so it cannot rot. Timing is not checked; what is checked is
what the benchmark's rows claim: every W ran the same session (same object counts per frame as
one process), the rich weights made objects to shard, the W = 2 traffic came from the
predictor's own counters, and the docstring's detector-bytes formula the benchmark labels "model"
is the number the code sends at this config.
"""

import multiprocessing
import os
import runpy
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_scaling.py")


@pytest.fixture()
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_scaling_smoke(monkeypatch, capsys, _restore_threads):
    monkeypatch.setattr(sys, "argv", [BENCH, "--smoke"])
    ns = runpy.run_path(BENCH, run_name="__main__")
    out = capsys.readouterr().out
    assert "multi-GPU scaling benchmark" in out
    assert "NOT performance numbers" in out  # CPU numbers are labelled as such
    assert "model ms/frame" in out  # the docs/scaling.md prediction is printed next to the measurement

    res = ns["LAST_RESULTS"]
    rows = {r["W"]: r for r in res["rows"]}
    assert sorted(rows) == [1, 2] and not any("error" in r for r in rows.values())
    one, two = rows[1], rows[2]
    assert one["frames"] == two["frames"] == 8
    # the same session at both world sizes: rank 0 yields what one process yields
    assert two["shown_per_frame"] == one["shown_per_frame"]
    assert two["tracked_per_frame"] == one["tracked_per_frame"]
    assert two["same_object_counts_as_W1"] is True
    # the rich weights track several objects, so W = 2 has objects on both ranks to gather
    assert max(one["tracked_per_frame"]) >= 3, one["tracked_per_frame"]
    # one process has no collectives; two processes counted their traffic on rank 0
    assert "counted_bytes_per_frame" not in one
    counted, model = two["counted_bytes_per_frame"], two["model_bytes_per_frame"]
    assert counted["tracker masks and scores"] > 0
    # 8 frames in chunks of 2: every chunk gathered once, so the docstring formula is exact
    assert counted["detector outputs"] == pytest.approx(model["detector outputs"], rel=1e-12)
    # derived columns are consistent with the measured ones
    assert one["speedup"] == pytest.approx(1.0)
    assert two["speedup"] == pytest.approx(two["fps"] / one["fps"])
    assert two["efficiency"] == pytest.approx(two["speedup"] / 2)
    assert two["model_ms_per_frame"] < one["model_ms_per_frame"]  # D / W shrinks
    # shutdown left no worker behind
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("sam3fast-video-rank")]
