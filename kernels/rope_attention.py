"""RoPE self-attention of the ViT trunk with the rotation inside the attention: one op from the qkv
projection's q, k, v views to the attention output (``sam3fast::rope_self_attention``), in place of
the RoPE kernel (``sam3fast::rope``: a pass that reads and writes q and k) and SDPA.

Letters: B batch (windows x images in the window blocks), L tokens (= the RoPE table rows: w * w =
576 in a window block, g * g = 5184 in a global block of SAM 3), H heads (16), Dh head dim (64).

Inputs
    q, k, v  (B, L, H, Dh)  float32 / bfloat16 / float16 (the reference also takes float64); any
                            strides with the last dim contiguous: the ViT passes the views
                            ``qkv.unbind(2)`` of its (B, L, 3, H, Dh) projection, no copy
    rope     (L, Dh/2, 2)   float32 (cos, sin): ``torch.view_as_real`` of the block's ``freqs_cis``
Output: (B, L, H, Dh) contiguous in q's dtype, which ``reshape(B, L, H * Dh)`` views for the output
projection (SDPA's (B, H, L, Dh) result is transposed back first).

Math: softmax(rot(q) rot(k)^T / sqrt(Dh)) v per batch element and head, with rot the 2-D axial RoPE
of ``sam3fast.model.vit.apply_rope`` (token l by table row l), computed in float32 and rounded to
the input dtype before the products, as ``apply_rope`` rounds (the compiler may contract the
rotation's products and sums into FMAs, so a rotated element may differ from ``apply_rope``'s by an
ulp of float32 before that rounding). That is ``sam3fast::memory_attention`` with ``rope_q`` and
every key rotated (``n_rope_keys = L``), no key mask: this op is its Triton kernel
(``kernels/memory_attention.py``) called directly. (``sam3fast::memory_attention`` itself hands many
(batch, head) pairs, the trunk's 144, to its RoPE prepass + SDPA path.) The keys are rotated by the
memory-attention kernel's prepass (one read and write of K); q in the attention's prologue.

Why an op of its own: in the H200 eager profile of 2026-11-27 (bf16, one 1008 px image) SDPA
(cuDNN's flash kernel) took 3.36 ms over 39 launches, 32 of them the trunk's (so the trunk's 0.78
TFLOP ran at ~230 TFLOP/s or more), and the RoPE pass 0.36 ms. Whether
the Triton kernel at these shapes beats cuDNN is a measurement (bench/bench_trunk_attention.py
times it against the RoPE kernel + SDPA and sweeps tiles); until a GPU says so the trunk keeps RoPE +
SDPA (``ViT.rope_attention_kernel`` off). Default tile ``DEFAULT_TILE``: 64 queries x 64 keys, 4
warps, 3 stages (64 divides 576 and 5184: no padded query rows); its static sm_90 build (Triton 3.7,
bf16, Dh 64) uses wgmma and cp.async, 141 registers, no spills.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._split_kv import check_qkv
from .memory_attention import _memory_attention_triton, memory_attention_backend, memory_attention_ref

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
DEFAULT_TILE = (64, 64, 4, 3)


def _check(q: Tensor, k: Tensor, v: Tensor, rope: Tensor) -> None:
    check_qkv(q, k, v, "L")
    L, Dh = q.shape[1], q.shape[3]
    if k.shape[1] != L:
        raise ValueError(f"self-attention: k must have q's {L} tokens, got {k.shape[1]}")
    if rope.shape != (L, Dh // 2, 2):
        raise ValueError(f"rope must be (L={L}, Dh/2={Dh // 2}, 2) (cos, sin), got {tuple(rope.shape)}")


def rope_self_attention_ref(q: Tensor, k: Tensor, v: Tensor, rope: Tensor) -> Tensor:
    """The spec and CPU kernel: ``memory_attention_ref`` with q and every key rotated, no mask."""
    _check(q, k, v, rope)
    return memory_attention_ref(q, k, v, rope, None, True, k.shape[1])


def _rope_self_attention_triton(q: Tensor, k: Tensor, v: Tensor, rope: Tensor, out: Optional[Tensor] = None,
                                block_m: int = DEFAULT_TILE[0], block_n: int = DEFAULT_TILE[1],
                                num_warps: int = DEFAULT_TILE[2], num_stages: int = DEFAULT_TILE[3],
                                rope_k: str = "prepass") -> Tensor:
    """Launcher: the memory-attention kernel at this op's tile (one split: the trunk's B * H * L /
    BLOCK_M programs, 1296 per block, fill the GPU). ``out``: a preallocated contiguous (B, L, H, Dh)
    tensor of q's dtype, every element written."""
    _check(q, k, v, rope)
    return _memory_attention_triton(q, k, v, rope, None, True, k.shape[1], out=out, block_m=block_m,
                                    block_n=block_n, num_splits=1, num_warps=num_warps, num_stages=num_stages,
                                    rope_k=rope_k)


@torch.library.custom_op("sam3fast::rope_self_attention", mutates_args=(), device_types="cuda")
def rope_self_attention_op(q: Tensor, k: Tensor, v: Tensor, rope: Tensor) -> Tensor:
    """``sam3fast::rope_self_attention``: the Triton kernel on CUDA, ``rope_self_attention_ref`` on CPU."""
    return _rope_self_attention_triton(q, k, v, rope)


rope_self_attention_op.register_kernel("cpu")(rope_self_attention_ref)


@rope_self_attention_op.register_fake
def _rope_self_attention_fake(q, k, v, rope):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


def rope_self_attention_backend(q: Tensor) -> Tuple[str, str]:
    """("triton" | "reference", reason) for queries (B, L, H, Dh) of this device, dtype and head dim."""
    return memory_attention_backend(q)


def rope_self_attention(q: Tensor, k: Tensor, v: Tensor, freqs_cis: Tensor) -> Tensor:
    """softmax(rot(q) rot(k)^T / sqrt(Dh)) v over (B, L, H, Dh) q, k, v (last dim contiguous), with
    the ViT's 2-D axial RoPE table ``freqs_cis`` (L, Dh/2) complex64 (or its float32
    ``view_as_real``); (B, L, H, Dh) contiguous. The Triton kernel where
    ``rope_self_attention_backend`` says so, else the reference."""
    rope = torch.view_as_real(freqs_cis) if freqs_cis.is_complex() else freqs_cis
    if rope_self_attention_backend(q)[0] == "triton":
        return torch.ops.sam3fast.rope_self_attention(q, k, v, rope.float())
    return rope_self_attention_ref(q, k, v, rope)
