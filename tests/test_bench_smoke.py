"""The benchmarks run in --smoke mode (tiny config, CPU) so they cannot rot; timing is not checked."""

import os
import runpy
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")


@pytest.mark.parametrize("script", ["bench_image.py"])
def test_bench_smoke(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--smoke"])
    runpy.run_path(os.path.join(BENCH, script), run_name="__main__")
    out = capsys.readouterr().out
    assert "sam3fast_float32" in out
