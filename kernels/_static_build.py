"""Static sm_90 builds of the Triton kernels as a launch on an H100 would compile them, without a GPU.

A build for a hand-written signature misses what Triton's launcher adds from the actual arguments:
16-byte alignment of the pointers and divisibility by 16 of the integers (strides, sizes). Those
decide, among other things, whether the loads are vectorised and software-pipelined (cp.async), so
a hand-written build can report a kernel very different from the one that runs. Here the project's
own launchers run on CPU tensors of the real shapes and dtypes, and each launch of a captured kernel
is compiled with the specialisation the launcher would derive from those arguments, then recorded
instead of run (outputs stay unwritten).

    with capture(ma._memory_attention_kernel) as builds:
        ma._memory_attention_triton(q, k, v, rope, key_valid, True, n_rope, num_splits=3)
    stats = sass_stats(builds[0].kernel)   # {"regs": ..., "spill_stores": ..., "cp_async": ...}

``sass_stats`` reads the cubin with the ``cuobjdump`` / ``nvdisasm`` that ship with Triton. The
numbers are static (instructions in the binary, resources per thread block), not timings; they
answer questions such as "does the default tile spill?" or "are the K/V loads pipelined?" on a CPU
machine, and ``bench/kernel_static_report.py`` prints them for the engine's kernels at SAM 3 shapes.

Needs the real Triton compiler: it refuses to run under ``TRITON_INTERPRET=1`` (where the kernels are
interpreted functions), so tests call it in a fresh process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Tuple

from ._triton_compat import HAS_TRITON, triton

SM90 = ("cuda", 90, 32)

# SASS opcodes counted by sass_stats, by what they tell.
_COUNTED = {
    "HGMMA": "wgmma",        # Hopper warpgroup matrix multiply-accumulate
    "HMMA": "mma",           # the older per-warp tensor-core instruction
    "LDGSTS": "cp_async",    # asynchronous global -> shared copies (software pipelining)
    "UTMALDG": "tma_loads",  # tensor-memory-accelerator loads
    "STL": "spill_stores",   # local-memory stores: register spills (or stack arrays)
    "LDL": "spill_loads",
    "BAR": "barriers",
    "LDG": "global_loads",
    "STG": "global_stores",
    "ATOM": "atomics",
    "ATOMG": "atomics",      # sm_90 spells the global and shared atomics ATOMG / ATOMS
    "ATOMS": "atomics",
    "RED": "reductions_to_memory",
    "REDG": "reductions_to_memory",  # (not REDUX: a warp-level reduction in registers)
}


@dataclass
class Build:
    """One captured launch: the kernel's name, its grid as given, and the compiled sm_90 kernel."""

    name: str
    grid: Any
    kernel: Any  # triton.compiler.CompiledKernel: .asm["ttgir" | "ptx" | "cubin"], .metadata


def _require_compiler() -> None:
    if not HAS_TRITON:
        raise RuntimeError("static builds need triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("static builds need the real Triton compiler: unset TRITON_INTERPRET")


@contextlib.contextmanager
def capture(*kernels) -> Iterator[List[Build]]:
    """While active, a launch ``kernel[grid](*args, **kwargs)`` of any of ``kernels`` (``@triton.jit``
    functions) compiles it for sm_90 as Triton's launcher would for these arguments and appends a
    :class:`Build` to the yielded list; nothing runs."""
    _require_compiler()
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget(*SM90)
    backend = make_backend(target)
    builds: List[Build] = []

    def recorder(fn):
        binder = create_function_from_signature(fn.signature, fn.params, backend)

        def run(*args, grid, warmup, **kwargs):
            # What JITFunction.run does before compiling, with an sm_90 target instead of the driver's.
            kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
            builds.append(Build(fn.__name__, grid, kernel))

        return run

    for fn in kernels:
        if not hasattr(fn, "_pack_args"):
            raise TypeError(f"{fn!r} is not a @triton.jit function of the real compiler")
        fn.run = recorder(fn)  # an instance attribute: fn[grid] calls self.run
    try:
        yield builds
    finally:
        for fn in kernels:
            del fn.run


def all_kernels() -> List[Any]:
    """Every ``@triton.jit`` function defined in the ``sam3fast.kernels`` modules (for a
    :func:`capture` of whatever a model launches)."""
    import importlib
    import pkgutil

    import sam3fast.kernels as pkg

    found: List[Any] = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for v in vars(mod).values():
            if hasattr(v, "_pack_args") and getattr(v, "__module__", None) == mod.__name__ and v not in found:
                found.append(v)
    return found


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def sass_stats(kernel) -> Dict[str, int]:
    """Static resources and instruction counts of a compiled sm_90 kernel: ``regs`` (per thread),
    ``stack`` (local-memory bytes per thread), ``smem`` (shared memory bytes per block, Triton's
    dynamic allocation), ``instructions``, the counts named in ``_COUNTED`` (``wgmma``,
    ``cp_async``, ``spill_stores``, ...), and ``loop_instructions`` / ``loop_spills``: instructions
    and STL + LDL inside loops (the ranges of backward branches; a static count: a loop's code
    once, conditional blocks in it included), and ``loop_barriers`` / ``loop_shared``: BAR and
    shared-memory loads/stores inside loops (where no operand is staged in shared memory on
    purpose, those are register layout conversions through it, paid every iteration).
    Memoized on the cubin's bytes: a model's launches repeat a few dozen distinct builds (the tiny
    config's static build: 355 launches, 41 distinct), and each disassembly is two tool runs."""
    cubin = kernel.asm["cubin"]
    key = (hashlib.sha256(cubin).hexdigest(), int(kernel.metadata.shared))
    if key not in _SASS_STATS:
        _SASS_STATS[key] = _sass_stats(cubin, int(kernel.metadata.shared))
    return dict(_SASS_STATS[key])


_SASS_STATS: Dict[Tuple[str, int], Dict[str, int]] = {}


def _sass_stats(cubin: bytes, smem: int) -> Dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    res = dict(re.findall(r"(REG|STACK):(\d+)", usage))
    stats = {"regs": int(res.get("REG", 0)), "stack": int(res.get("STACK", 0)),
             "smem": smem, "instructions": 0}
    stats.update({v: 0 for v in _COUNTED.values()})
    stats.update(loop_instructions=0, loop_spills=0, loop_barriers=0, loop_shared=0)
    instrs = []  # (address, opcode)
    labels = {}  # label -> address of the instruction after it
    pending = []
    for line in sass.splitlines():
        lab = re.match(r"\s*(\.L_x_\d+):", line)
        if lab is not None:
            pending.append(lab.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(.*)", line)
        if m is None:
            continue
        addr = int(m.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        instrs.append((addr, m.group(3), m.group(4), m.group(2) is not None))
        stats["instructions"] += 1
        key = _COUNTED.get(m.group(3))
        if key is not None:
            stats[key] += 1
    # Loops: the address ranges [target, branch] of backward branches. Spills there cost on every
    # iteration; spills outside (a prologue's or epilogue's) cost once. Not counted: branches after
    # the last unconditional EXIT, i.e. the BRA-to-itself that ends every kernel and the jumps back
    # from out-of-line blocks placed there (an mbarrier wait's retry, with TMA), which are no loop.
    exits = [addr for addr, op, _, predicated in instrs if op == "EXIT" and not predicated]
    end = exits[-1] if exits else float("inf")
    loops = []
    for addr, op, rest, _ in instrs:
        t = re.search(r"`\((\.L_x_\d+)\)", rest) if op == "BRA" and addr < end else None
        if t is not None and labels.get(t.group(1), addr) < addr:
            loops.append((labels[t.group(1)], addr))
    for addr, op, _, _ in instrs:
        if any(a <= addr <= b for a, b in loops):
            stats["loop_instructions"] += 1
            stats["loop_spills"] += op in ("STL", "LDL")
            stats["loop_barriers"] += op == "BAR"
            stats["loop_shared"] += op in ("STS", "LDS", "LDSM")  # shared-memory traffic: layout conversions
    return stats


def assert_no_spills_or_loop_conversions(kernel) -> Dict[str, int]:
    """``sass_stats(kernel)`` after asserting no local memory (stack, spill stores) and, inside loops,
    no barrier and no shared-memory traffic: in a kernel without ``tl.dot`` those are register layout
    conversions paid every iteration. The tests' check of a kernel's default launch."""
    st = sass_stats(kernel)
    assert st["stack"] == 0 and st["spill_stores"] == 0, st
    assert st["loop_barriers"] == 0 and st["loop_shared"] == 0, st
    return st
