"""Every Triton launch the models make at their own call sites builds for sm_90 (no GPU needed):
``bench/model_static_build.py`` runs the image model, the tracker (1 and 4 clicked objects) and the
concept video predictor at the tiny config in bf16 on CPU with their CUDA dispatch; each
``sam3fast::`` op's CUDA body is compiled for an H100 (launches built, not run) before its CPU
kernel serves the value. It must reach the kernels the tiny config runs and build all of them
(session 18: the memory attention's (B, 1, L, D) stream broke ``residual_norm``'s sm_90 build, which
no kernel test's shapes met; this run reports it)."""

import os
import subprocess
import sys

import pytest

from sam3fast.kernels import _triton_compat

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")


@pytest.mark.skipif(not _triton_compat.HAS_TRITON, reason="needs triton")
def test_models_build_every_launch_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, os.path.join(BENCH, "model_static_build.py")], env=env,
                         capture_output=True, text=True)
    out = res.stdout
    assert res.returncode == 0, out[-4000:] + res.stderr[-3000:]
    assert "0 failures" in out, out[-4000:]
    reached = {line.split()[0] for line in out.splitlines() if " calls " in line and "no launch" not in line}
    want = {"residual_norm", "rope", "rope_projection", "memory_attention", "dwconv_norm", "layer_norm2d",
            "conv_norm_gelu", "group_norm", "mask_for_memory", "mask_postprocess", "connected_component_sizes",
            "rpb_factors", "table_apply_staged_", "table_ptr_slots", "table_memory_tokens", "fold_out_proj"}
    assert want <= reached, sorted(want - reached)
