"""The benchmarks run in --smoke mode (tiny config, CPU) so they cannot rot; timing is not checked."""

import os
import runpy
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")


@pytest.mark.parametrize("script, expect", [
    ("bench_image.py", "sam3fast_float32"),
    ("bench_mask_postprocess.py", "mask_postprocess benchmark"),
    ("bench_mask_iou.py", "mask_iou / mask_nms benchmark"),
    ("bench_memory_attention.py", "memory_attention benchmark"),
    ("bench_rope.py", ("# rope benchmark", "triton l2 w4", "eager apply_rope")),
    ("bench_rope_projection.py", ("# rope_projection benchmark", "triton r16 j16 w4 s2", "linear + rope prepass",
                                  "# frame (4 layers), 2 object(s), linear + rope prepass")),
    ("bench_dwconv_norm.py", ("# dwconv_norm benchmark", "triton 2x4 w4", "eager channels-last")),
    ("bench_fused_linear.py", ("# fused_linear benchmark", "triton 16x32x16 w4 s2", "eager linear + gelu",
                               "qkv+rope window", "qkv+rope global", "eager linear + rope",
                               "cublasLt linear + tanh gelu", "# trunk (32 blocks), fc1+gelu, cublasLt",
                               "ffn relu, 1 object     cublasLt linear + relu", "# ffn relu, 1 object, 4 memory",
                               "cxblock gelu, 2 objects", "# cxblock gelu, 2 objects, 2 CXBlocks a frame")),
    ("bench_trunk_attention.py", ("# trunk_attention benchmark", "window   flash contiguous", "global   math",
                                  "# trunk default:", "# trunk flash:", "fastest pinned backend",
                                  "rope + SDPA (the trunk's path)", "rope_self_attention 16x16 w4 s2 inline",
                                  "# trunk rope_self_attention op against rope + SDPA")),
    ("bench_residual_norm.py", ("# residual_norm benchmark", "triton t4 w4", "add+norm1+window",
                                "# trunk (28 window + 4 global blocks), eager chain", "memattn add+norm B=2",
                                "# memory attention frame (12 calls), memattn add+norm B=2, eager chain")),
    ("bench_connected_components.py", "connected_components benchmark"),
    ("bench_table_memory.py", ("# table_memory benchmark", "rows=2    pytorch", "rows=2    kernels")),
    ("bench_video.py", ("video frames/s benchmark", "| e2e prefetch | 1 |", "| e2e prefetch perframe | 2 |",
                       "| cached new-table | 1 |", "| concept | sam3fast | float32 | e2e ahead-stream |")),
    # the CPU host-work counts: both parts ran and their phases were found (a renamed driver would
    # put every operation under "(outside)")
    ("host_ops.py", ("| tracker | 1 |", "| concept |", "- _run_single_frame_inference:",
                     "- run_tracker_update_planning_phase:", "| bank |", "| perframe |")),
    ("bench_norms.py", ("# norms benchmark", "channels-first *", "group_norm_fast", "# pixel decoder GroupNorm",
                        "triton layer_norm2d + GELU", "channels-first + F.gelu *", "triton group_norm + ReLU",
                        "# pixel decoder GroupNorm + ReLU")),
    # every part's stages were hooked (a renamed module path would drop its row)
    ("profile_gpu.py", ("| vit_trunk |", "| detr_decoder |", "| memory_attention |", "| mask_decoder |",
                        "| detector_fusion_encoder |", "| tracker_memory_encoder |")),
])
def test_bench_smoke(script, expect, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--smoke"])
    runpy.run_path(os.path.join(BENCH, script), run_name="__main__")
    out = capsys.readouterr().out
    for e in (expect,) if isinstance(expect, str) else expect:
        assert e in out


def test_host_op_counter_counts_kernels_views_reads_and_phases():
    """bench/host_ops.py's counter: a view launches nothing, an out-of-place or in-place op does, a
    value read is a read; operations are put under the driver's callee, a graphed region's apart."""
    sys.path.insert(0, BENCH)
    try:
        import host_ops
    finally:
        sys.path.pop(0)
    x = torch.randn(4, 4)

    def phase_a():
        y = x.view(16)  # a view
        z = x + 1  # a kernel
        z.add_(1)  # in place: a kernel
        return y, float(z.sum()), bool(z.any())  # a kernel, then a read (twice: bool() is is_nonzero)

    def driver():
        phase_a()
        counter.enter_region("graph")
        x.mul(2)  # inside a graphed region
        counter.exit_region()
        return x.t()  # the driver's own view

    counter = host_ops.HostOpCounter("driver", package="test_bench_smoke")
    with counter:
        driver()
        x.neg()  # outside the driver
    fr = counter.frames[-1]
    assert fr["reads"] == 2 and fr["kernels"] == 5, fr
    assert fr["eager"] == {"phase_a": 7, "(frame driver)": 1, "(outside)": 1}, fr["eager"]
    assert fr["graphed"] == {"graph": 1} and fr["calls"] == {"graph": 1}
    assert host_ops.summarize(counter, 0)["eager_ops"] == 9


def test_kernel_static_report_runs():
    """bench/kernel_static_report.py (real Triton compiler, no GPU, a fresh process without
    TRITON_INTERPRET) builds two cases and prints their rows."""
    import subprocess

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(BENCH, "kernel_static_report.py"), "--no-write",
                          "--cases", "rpb_attention", "connected_components"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    out = res.stdout
    assert "0 errors" in out and "_rpb_attention_kernel" in out and "_cc_merge_kernel" in out


def test_gpu_check_script_names_real_tests_and_scripts():
    """bench/gpu/run_checks.sh (the scarce GPU runs) parses, every test it names first (FIRST,
    TMA_TEST: a file, or file::function) exists, and every bench script it runs is in bench/: a
    renamed test or script would otherwise be found out on the device."""
    import re
    import subprocess

    root = os.path.join(BENCH, "..")
    path = os.path.join(BENCH, "gpu", "run_checks.sh")
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    first = re.search(r'^FIRST="([^"]*)"', text, re.M).group(1).split()
    tma = re.search(r"^TMA_TEST=(\S+)", text, re.M).group(1)
    assert len(first) >= 5
    for ref in first + [tma]:
        file, _, func = ref.partition("::")
        assert os.path.isfile(os.path.join(root, file)), ref
        if func:
            assert re.search(rf"^def {re.escape(func)}\(", open(os.path.join(root, file)).read(), re.M), ref
    scripts = set(re.findall(r"python3 (bench/[\w/]+\.py)", text))
    assert "bench/bench_mask_postprocess.py" in scripts and "bench/bench_video.py" in scripts
    for s in scripts:
        assert os.path.isfile(os.path.join(root, s)), s


def test_gpu_summarize_reads_the_stored_results(capsys):
    """bench/gpu/summarize.py groups the stored H100 rows by case and places the default launch
    against the fastest (run 2's memory-attention file: B=1 default 0.951 ms, the 64x32 row 0.937)."""
    sys.path.insert(0, os.path.join(BENCH, "gpu"))
    try:
        import summarize
    finally:
        sys.path.pop(0)
    path = os.path.join(BENCH, "results", "memory_attention_nvidia-h100-80gb-hbm3_2026-11-26_run2.json")
    lines = summarize.summarize(path)
    text = "\n".join(lines)
    assert "- shape=cross B=1 S=36352" in text and "- shape=cross B=16 S=36352" in text
    assert "default (op (triton, defaults)): 0.9510 ms, 1.02x the fastest" in text
    assert summarize.main([path, os.path.join(BENCH, "results", "gpu_runs_2026-11-26_H100_run2.md")]) == 0
    out = capsys.readouterr().out
    assert "# 1 of 2 files had benchmark rows" in out and "not read" in out


def test_video_steady_rate_and_its_note():
    """bench_video's rate from a full memory bank on: the frames after index ``first`` over the time
    from that frame's yield to the end; nothing for a stream too short to have such a stretch."""
    sys.path.insert(0, BENCH)
    try:
        import bench_video
    finally:
        sys.path.pop(0)
    stamps = [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]  # slow first frames, then 1 frame/s
    assert bench_video.steady_rate(stamps, 13.0, 3) == {"steady_fps": 2 / 3.0, "steady_from": 3}
    assert bench_video.steady_rate(stamps, 13.0, 5) == {}
    row = {"part": "tracker", "engine": "sam3fast", "dtype": "bfloat16", "variant": "e2e", "objects": 1,
           "frames": 6, "fps": 0.5, "ms_per_frame": 2e3, "steady_fps": 2 / 3.0, "steady_from": 3}
    results = {"machine": {"device": "cpu", "torch": torch.__version__}, "config": "tiny", "date": "d", "clip": "c",
               "weights": {}, "prompt": "p", "det_nms_thresh": None, "rows": [row]}
    assert "0.67 frames/s from frame 3 on" in bench_video.format_table(results)


def test_profile_attribution_counts_each_kernel_once_in_its_innermost_stage():
    """bench/profile_gpu.py's attribution on a synthetic event tree: a kernel counts once, under the
    op that launched it (not again under the op's parents, nor as its own device event, the double
    count key_averages() invites), in the innermost stage range around that op; a range's own
    launches go to it; kernels outside every range are reported as such; CPU ranges give calls and
    host time, GPU-side ranges the span."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    mod = runpy.run_path(os.path.join(BENCH, "profile_gpu.py"), run_name="profile_gpu_test")

    def ev(name, start, end, parent=None, kernels=(), device=DeviceType.CPU, shapes=()):
        return NS(name=name, device_type=device, time_range=NS(start=start, end=end), is_async=False,
                  kernels=[NS(name=k, duration=d) for k, d in kernels], cpu_parent=parent, input_shapes=shapes)

    trunk = ev("stage::vit_trunk", 0, 100)
    linear = ev("aten::linear", 1, 10, trunk)
    addmm = ev("aten::addmm", 2, 9, linear, [("gemm_bf16", 30.0)], shapes=[[4736], [5184, 1024], [1024, 4736], []])
    nested = ev("stage::scoring", 20, 40, trunk, [("triton_direct", 2.5)])  # a range launching itself
    inner = ev("aten::mm", 21, 30, nested, [("sgemm_f32", 4.0), ("sgemm_f32", 6.0)])
    outside = ev("aten::copy_", 200, 201, None, [("copy_kernel", 1.0)])
    gpu_range = ev("stage::vit_trunk", 5, 80, None, device=DeviceType.CUDA)
    kernel_event = ev("gemm_bf16", 5, 35, None, device=DeviceType.CUDA)  # the device-side twin
    a = mod["attribute"]([trunk, linear, addmm, nested, inner, outside, gpu_range, kernel_event])
    assert a["kernels"] == {"gemm_bf16": [1, 30.0], "triton_direct": [1, 2.5], "sgemm_f32": [2, 10.0],
                            "copy_kernel": [1, 1.0]}
    assert a["stages"] == {"vit_trunk": {"gemm_bf16": [1, 30.0]},
                           "scoring": {"triton_direct": [1, 2.5], "sgemm_f32": [2, 10.0]},
                           mod["OUTSIDE"]: {"copy_kernel": [1, 1.0]}}
    assert a["host"] == {"vit_trunk": [1, 100.0], "scoring": [1, 20.0]}
    assert a["span"] == {"vit_trunk": 75.0}
    assert a["sites"]["vit_trunk"] == {"gemm_bf16": {"aten::addmm 4736, 5184x1024, 1024x4736": [1, 30.0]}}
    assert a["sites"]["scoring"]["sgemm_f32"] == {"aten::mm": [2, 10.0]}
