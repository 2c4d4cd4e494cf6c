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
