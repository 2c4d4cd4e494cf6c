"""Every environment variable sam3fast reads at run time, read here once, at import.

SAM3FAST_FORCE_REFERENCE=1  use the pure-PyTorch reference of every custom op (no Triton/CUDA kernels)
SAM3FAST_NVTX=1             emit NVTX ranges around every stage (for Nsight Systems); off by default
(Build-time switches SAM3FAST_BUILD_NATIVE / SAM3FAST_BUILD_CUDA are read by setup.py.)

Read by the native CUDA assignment launcher (csrc/cuda/assignment.cu) at every call, for benchmarks:
SAM3FAST_LSA_THREADS=0|32|64|128|256  threads per problem (0: the built-in rule)
SAM3FAST_LSA_INIT=2|1|0               initialisation (2: row reduction + greedy + reduction transfer)
SAM3FAST_LSA_STAGE=0|1                stage the costs in shared memory up to 48 KiB (0) or the opt-in limit (1)
SAM3FAST_LSA_REGS=1|0                 the searches' column state in registers (1, up to 8 columns a thread) or shared memory (0)
SAM3FAST_LSA_SPLIT=2|1|0              warp 0 alone searches after the block's initialisation (2: when problems <= SMs, 1: always, 0: never)
"""

import os

FORCE_REFERENCE: bool = os.environ.get("SAM3FAST_FORCE_REFERENCE", "0") == "1"
NVTX: bool = os.environ.get("SAM3FAST_NVTX", "0") == "1"
