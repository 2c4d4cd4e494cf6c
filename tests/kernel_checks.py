"""Checks the kernel test files share: Python code run in a fresh process, either with the
pure-PyTorch references forced (``SAM3FAST_FORCE_REFERENCE=1``, read once at import) or with the real
Triton compiler instead of the interpreter (a build for an H100 needs no GPU), and the preamble those
sm_90 builds start from."""

from __future__ import annotations

import os
import subprocess
import sys

# For code run by run_compiled: `build(fn, signature, constexprs, num_warps[, num_stages])` compiles a
# @triton.jit function for sm_90 and returns the compiled kernel (its .asm["ptx"], .n_regs, ...).
SM90_BUILD = """
import triton
from triton.backends.compiler import GPUTarget
T = GPUTarget("cuda", 90, 32)
def build(fn, sig, cx, nw, ns=2):
    sig = dict(sig, **{n: "constexpr" for n in cx})
    return triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cx), target=T,
                          options={"num_warps": nw, "num_stages": ns})
i32 = "i32"
"""


def forced_reference_stdout(code: str) -> str:
    """stdout (stripped) of ``python -c code`` with SAM3FAST_FORCE_REFERENCE=1."""
    env = dict(os.environ, SAM3FAST_FORCE_REFERENCE="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def forced_backend_reason(module: str, call: str) -> str:
    """The reason ``sam3fast.kernels.<module>.<call>`` (a ``*_backend(...)`` call returning
    (backend, reason)) gives in a fresh process with SAM3FAST_FORCE_REFERENCE=1."""
    return forced_reference_stdout(f"import torch; from sam3fast.kernels import {module} as m; print(m.{call}[1])")


def run_compiled(code: str) -> None:
    """Run ``code`` with the real Triton compiler (no TRITON_INTERPRET); it must print "ok"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:] + res.stdout[-2000:]


def assert_close_to64(got, want, tol: float) -> None:
    """``got`` has no NaN (outputs are pre-filled with NaN: an unwritten element fails) and is within
    ``tol`` (max abs) of the float64 ``want``."""
    import torch

    assert not torch.isnan(got).any(), "NaN in the output (an unwritten element?)"
    err = (got.double() - want).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"


def ulp(t):
    """One ulp of each element's magnitude in t's dtype (float64 values)."""
    import torch

    e = torch.finfo(t.dtype).eps
    return e * torch.exp2(torch.floor(torch.log2(t.double().abs().clamp_min(torch.finfo(t.dtype).tiny))))


def assert_within_eager_rule(got, want, eager) -> None:
    """The norm kernels' rule against the float64 ``want``: float32 within 2e-6 of the largest
    magnitude; a half dtype at most the error of PyTorch's own path in that dtype (``eager``) plus
    one ulp of the result (the two roundings may fall on either side of a tie), element by element."""
    import torch

    err = (got.double() - want).abs()
    if got.dtype == torch.float32:
        assert err.max().item() <= 2e-6 * max(1.0, want.abs().max().item()), err.max().item()
        return
    bound = (eager.double() - want).abs() + ulp(want.to(got.dtype)) + 1e-6
    worst = (err - bound).max().item()
    assert worst <= 0, f"{(err > bound).sum().item()} elements past the bound (worst by {worst:.3g})"


def capture_graph(fn):
    """``(graph, out)``: ``fn`` warmed up on a side stream (Triton compiles outside the capture),
    then captured in a CUDA graph (``sam3fast.predictor.graphs.warm_up_and_capture``); ``out`` is what
    the capture returned (rewritten by each replay)."""
    from sam3fast.predictor.graphs import warm_up_and_capture

    graph, out, _ = warm_up_and_capture(fn, 1, None, "test_capture")
    return graph, out


def randomize_(module, seed: int):
    """Every parameter of ``module`` redrawn from its own generator, biases included: N(0, 1/fan_in)
    plus 0.1 N(0, 1). Returns the module."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 + 0.1 * torch.randn(p.shape, generator=g))
    return module


def sam3_memory_attention_pair():
    """``(cfg, m32, mbf)``: the SAM 3 memory attention on CUDA in eval mode, float32 and a bfloat16
    copy of the same (default-initialised, seed 0) weights; for the GPU tests at the real sizes."""
    import torch

    from sam3fast.config import get_config
    from sam3fast.model.memory_attention import MemoryAttention

    cfg = get_config("sam3")
    torch.manual_seed(0)
    m32 = MemoryAttention.from_config(cfg).cuda().eval()
    mbf = MemoryAttention.from_config(cfg).cuda().eval()
    mbf.load_state_dict(m32.state_dict())
    return cfg, m32, mbf.bfloat16()


def spread_layer_norms(module):
    """Every LayerNorm's affine drawn away from (1, 0) (weight ~ N(1, 0.3), bias ~ N(0, 0.3), from the
    global generator), so that a wrong or missing norm shows in a module test."""
    import torch

    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0.0, 0.3)
    return module


class KernelPathsOnCpu:
    """Context manager: the modules take their CUDA dispatch with CPU tensors
    (``sam3fast.kernels._triton_compat.KERNEL_PATHS_ON_CPU``: each ``sam3fast::`` op runs its CPU kernel,
    the reference) and the ``sam3fast::`` ops called are recorded in ``ops`` (their names), through a
    TorchDispatchMode."""

    def __init__(self):
        self.ops = set()
        self._mode = None

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        from sam3fast.kernels import _triton_compat

        ops = self.ops

        class _Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.namespace == "sam3fast":
                    ops.add(func._schema.name.split("::")[-1])
                return func(*args, **(kwargs or {}))

        self._prev = _triton_compat.KERNEL_PATHS_ON_CPU
        _triton_compat.KERNEL_PATHS_ON_CPU = True
        self._mode = _Record()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        from sam3fast.kernels import _triton_compat

        self._mode.__exit__(*exc)
        _triton_compat.KERNEL_PATHS_ON_CPU = self._prev
        return False


def tiny_trunk(seed: int = 0):
    """(vit, x): a 4-block ViT trunk (8 x 8 token grid, windows of 4 x 4, global blocks 1 and 3, 4
    heads of 16) in eval mode, drawn from ``seed``, and a (1, 3, 112, 112) image for it."""
    import torch

    from sam3fast.model.vit import ViT

    torch.manual_seed(seed)
    vit = ViT(img_size=112, pretrain_img_size=56, embed_dim=64, depth=4, num_heads=4, window_size=4,
              global_att_blocks=(1, 3)).eval()
    return vit, torch.randn(1, 3, 112, 112)
