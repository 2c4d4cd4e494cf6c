import os

# The Triton interpreter is chosen when a kernel module is imported: set it before any import,
# and only where no GPU exists (a GPU machine runs the compiled kernels).
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (README: ``-n 2``) each worker takes its share of the cores' intra-op threads,
# so two workers do not oversubscribe the machine (2 cores: one thread each).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _workers > 1:
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))
    except Exception:  # pragma: no cover - torch missing: the tests that need it fail on their own
        pass


def pytest_collection_modifyitems(config, items):
    """Every test skipped for want of a CUDA device carries the ``gpu`` marker, however its skip is
    written, so ``pytest -m gpu`` selects exactly the GPU checks (bench/gpu/run_checks.sh)."""
    import pytest

    for item in items:
        for mark in item.iter_markers("skipif"):
            reason = str(mark.kwargs.get("reason", ""))
            if "CUDA" in reason or "cuda" in reason or "GPU" in reason:
                item.add_marker(pytest.mark.gpu)
                break
    if _workers > 1:
        # Under pytest-xdist (``--dist loadscope``: a module is a unit of work, handed out in this
        # order) the modules holding full-size (slow, minutes each) tests go first, so the two
        # workers run them side by side from the start and the small modules fill in after; last,
        # they left one worker running a full-size test alone at the end.
        slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)  # (stable: order kept within)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread_module():
    """One intra-op thread for a module of tiny-model tests (``pytestmark =
    pytest.mark.usefixtures("one_thread_module")``): on a busy 2-core machine two threads made tiny
    sessions 10-20x slower (measured); one is faster and steady. Yields the previous count (for a
    test that does real work and wants every core back); restored after the module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield n
    torch.set_num_threads(n)
