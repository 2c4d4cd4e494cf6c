"""Shared comparison helpers for parity tests: relative L2 error and max-abs error over scale."""

import torch

TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def maxrel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def close(a, b, name, tol=TOL):
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    r, m = rel(a, b), maxrel(a, b)
    assert r < tol and m < tol, f"{name}: rel {r:.2e}, max-abs/scale {m:.2e}"
