"""Every environment variable sam3fast reads at run time, read here once, at import.

SAM3FAST_FORCE_REFERENCE=1  use the pure-PyTorch reference of every custom op (no Triton/CUDA kernels)
SAM3FAST_NVTX=1             emit NVTX ranges around every stage (for Nsight Systems); off by default
(Build-time switches SAM3FAST_BUILD_NATIVE / SAM3FAST_BUILD_CUDA are read by setup.py.)
"""

import os

FORCE_REFERENCE: bool = os.environ.get("SAM3FAST_FORCE_REFERENCE", "0") == "1"
NVTX: bool = os.environ.get("SAM3FAST_NVTX", "0") == "1"
