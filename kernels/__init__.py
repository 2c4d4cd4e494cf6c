"""Triton kernels, one file per op (installed as ``sam3fast.kernels``; import them under that name).

Each file holds the op's pure-PyTorch reference ``<op>_ref`` (the spec and the CPU kernel), the
Triton kernel, its launcher and the ``sam3fast::<op>`` custom op. Callers go through
``sam3fast.ops``, which picks the backend.
"""
