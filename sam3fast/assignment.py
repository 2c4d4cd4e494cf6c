"""Batched exact linear sum assignment (min-cost bipartite matching), CPU and CUDA.

For each problem b of ``cost`` (B, N, M) find the matching of K = min(N, M) rows to distinct
columns that minimises sum_i cost[b, i, assignment[b, i]], exactly as
``scipy.optimize.linear_sum_assignment`` (``maximize=False``) does. ``+inf`` marks a forbidden pair.

Algorithm: shortest augmenting path (Jonker-Volgenant, in the rectangular form of Crouse 2016 that
scipy uses), O(K^2 max(N, M)) per problem, float64 arithmetic for float32 and float64 costs.
- CPU (csrc/cpu/assignment.cpp): scipy's visiting order and tie-breaking, so the assignments equal
  scipy's, ties included; problems of a batch run in parallel over torch's intra-op threads.
- CUDA (csrc/cuda/assignment.cu): one thread block per problem, no host sync; the same optimum,
  but on tied costs it may pick a different optimal assignment than scipy/CPU.

Op: ``torch.ops.sam3fast.linear_sum_assignment(cost) -> (assignment (B, N) int64, feasible (B,)
bool)`` (registered by ``sam3fast._C``; CPU, CUDA and Meta kernels, so it traces under
``torch.compile``). A problem that holds NaN or -inf, or has no complete assignment avoiding
+inf, gets ``feasible=False`` and an all -1 row; the op itself never raises on values.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.sam3fast.linear_sum_assignment)

    NATIVE_IMPORT_ERROR: str | None = None
except ImportError as e:  # the extension is optional at import time; calls say why it is missing
    NATIVE_IMPORT_ERROR = f"{type(e).__name__}: {e}"

__all__ = ["batched_linear_sum_assignment", "linear_sum_assignment_with_status"]

_BUILD_HINT = (
    "sam3fast._C (the native ops) is not built: run `pip install --no-build-isolation -e .` "
    "in the sam3fast checkout (`python -m sam3fast.info` tells what is built). Import error: "
)


def _native_op():
    if NATIVE_IMPORT_ERROR is not None:
        raise RuntimeError(_BUILD_HINT + NATIVE_IMPORT_ERROR)
    return torch.ops.sam3fast.linear_sum_assignment


def _as_cost(cost: torch.Tensor) -> torch.Tensor:
    if cost.dtype in (torch.float32, torch.float64):
        return cost
    if cost.is_floating_point():
        return cost.float()  # half/bfloat16: widen; the solver works in float64 anyway
    if cost.is_complex():
        raise TypeError("linear_sum_assignment: complex costs are not supported")
    return cost.double()  # integers and bools, exactly like scipy


def linear_sum_assignment_with_status(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment (B, N) int64, feasible (B,) bool) for cost (B, N, M); never raises on values.

    No host sync on CUDA. Rows of problems with ``feasible=False`` (NaN/-inf entries, or no
    complete assignment avoiding +inf) are all -1.
    """
    if cost.dim() != 3:
        raise ValueError(f"linear_sum_assignment: cost must be (B, N, M), got shape {tuple(cost.shape)}")
    return _native_op()(_as_cost(cost))


def batched_linear_sum_assignment(cost: torch.Tensor, *, return_feasible: bool = False):
    """Minimum-cost assignment of each problem of ``cost``; scipy's ``linear_sum_assignment`` batched.

    Args:
        cost: (B, N, M) (or a single (N, M) problem) real tensor on CPU or CUDA; +inf = forbidden.
            float32/float64 are used as they are, other dtypes are converted (float64 for ints).
        return_feasible: also return the (B,) bool ``feasible`` flags instead of raising.

    Returns:
        assignment: (B, N) int64 (or (N,) for a 2-D input) on cost's device; the column given to
        each row, -1 for the N - M rows left out when N > M. ``assignment[b] >= 0`` selects
        the same pairs as scipy's ``(row_ind, col_ind)``.
        feasible: (B,) bool, only with ``return_feasible=True``.

    Raises (CPU, without ``return_feasible``): ValueError when a problem holds NaN or -inf, or has
    no complete assignment avoiding +inf (scipy: "cost matrix is infeasible").
    On CUDA nothing is checked on the host (that would sync): such problems come back as all -1
    rows; pass ``return_feasible=True`` to get the flags.
    """
    single = cost.dim() == 2
    if single:
        cost = cost.unsqueeze(0)
    assignment, feasible = linear_sum_assignment_with_status(cost)
    if single:
        assignment, feasible = assignment[0], feasible[0]
    if return_feasible:
        return assignment, feasible
    if cost.device.type == "cpu":
        if torch.compiler.is_compiling():
            # Inside a graph a Python branch on values would break it; this raises at run time.
            torch._assert_async(feasible.all(), "linear_sum_assignment: NaN/-inf or infeasible cost")
        elif not bool(feasible.all()):
            raise ValueError(_describe_infeasible(cost, feasible.reshape(-1)))
    return assignment


def _describe_infeasible(cost: torch.Tensor, feasible: torch.Tensor) -> str:
    bad = (~feasible).nonzero().flatten().tolist()
    parts = []
    for b in bad[:5]:
        c = cost[b]
        if c.is_floating_point() and bool(torch.isnan(c).any()):
            parts.append(f"problem {b} contains NaN")
        elif c.is_floating_point() and bool((c == float("-inf")).any()):
            parts.append(f"problem {b} contains -inf")
        else:
            parts.append(f"problem {b} is infeasible (no complete assignment avoids +inf)")
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    return "linear_sum_assignment: " + "; ".join(parts) + more
