"""The object table's bookkeeping kernels (kernels/table_memory.py) against their PyTorch references,
bit for bit, under the Triton interpreter on CPU: random table states (counts past the ring's wrap,
random good/content/staged flags, conditioning frames before and after the current frame, free rows),
bf16 and float32, with and without earlier frames, outputs poisoned before the launch; the ops'
registration (opcheck); and ``table_memory`` / ``table_apply_staged`` through the ops' dispatch."""

from __future__ import annotations

import pytest
import torch

from sam3fast.kernels import table_memory as tk
from sam3fast.kernels._triton_compat import HAS_TRITON
from sam3fast.video import memory_bank as mb
from sam3fast.video.memory_bank import BankSpec, TableState, table_apply_staged, table_memory

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the interpreter on CPU)")

C, F, G, M, H, W, D, NM = 2, 5, 15, 8, 3, 5, 32, 7


def random_state(Cap, dtype, seed, C=C, M=M, H=H, W=W, D=D):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    def b(*shape, p=0.5):
        return torch.rand(*shape, generator=g) < p

    def i(lo, hi, *shape):
        return torch.randint(lo, hi, shape, generator=g)

    return TableState(
        ring_feat=r(Cap, F, M, H, W), ring_ptr=r(Cap, G, D), count=i(0, 3 * G, Cap), last_feat=r(Cap, M, H, W),
        last_ptr=r(Cap, D), last_content=b(Cap, p=0.7), last_good=b(Cap), cond_feats=r(Cap, C, M, H, W),
        cond_ptrs=r(Cap, C, D), cond_frames=i(0, 40, Cap, C), cond_valid=b(Cap, C, p=0.7),
        maskmem_pos=r(Cap, M, H, W), active=b(Cap, p=0.75), segment=torch.zeros(Cap, dtype=torch.long),
        next_feat=r(Cap, M, H, W), next_ptr=r(Cap, D), next_good=b(Cap), next_content=b(Cap, p=0.7),
        staged=b(Cap, p=0.6),
    )


def same(a, b):
    """Bit for bit (a bf16 -0.0 against +0.0 differs)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
        return torch.equal(a.view(bits), b.view(bits))
    return torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("no_prev", [False, True])
def test_memory_kernels_equal_the_references(dtype, no_prev):
    seen_ok = set()
    for seed, (Cap, rows, sign) in enumerate(((6, 4, 1), (4, 4, -1), (8, 2, 1))):
        st = random_state(Cap, dtype, seed)
        st.active[1] = False  # a free row among the rows run
        frame = torch.tensor(20)
        want_tpos, want_ok = tk.table_ptr_slots_ref(st.count, st.last_good, st.last_content, st.cond_valid,
                                                    st.cond_frames, st.active, frame, rows, F, G, sign, no_prev)
        P = C + G + 1
        out = (torch.full((rows, P), -7, dtype=torch.long), torch.ones(rows, P, dtype=torch.bool))
        want_ok_inv = ~want_ok  # a poisoned ``ok`` output that is already right would hide a missed store
        out[1].copy_(want_ok_inv)
        tpos, ok = tk._table_ptr_slots_triton(st.count, st.last_good, st.last_content, st.cond_valid, st.cond_frames,
                                              st.active, frame, rows, F, G, sign, no_prev, out=out)
        assert same(tpos, want_tpos) and same(ok, want_ok), (seed, tpos, want_tpos, ok, want_ok)
        seen_ok.update(want_ok.flatten().tolist())

        gen = torch.Generator().manual_seed(100 + seed)
        ptr_pos = torch.randn(rows, P, M, generator=gen).to(dtype)
        tpos_enc = torch.randn(NM, M, generator=gen).to(dtype)
        args = (st.cond_feats, st.ring_feat, st.last_feat, st.maskmem_pos, st.cond_ptrs, st.ring_ptr, st.last_ptr,
                st.count, st.last_good, st.last_content, st.cond_valid, st.active, tpos_enc, ptr_pos, ok, rows, NM,
                no_prev)
        want = tk.table_memory_tokens_ref(*args)
        S = want[0].shape[1]
        poisoned = (torch.full((rows, S, M), float("nan"), dtype=dtype), torch.full((rows, S, M), float("nan"), dtype=dtype),
                    ~want[2])
        got = tk._table_memory_tokens_triton(*args, block_l=8, out=poisoned)
        for name, a, b in zip(("memory", "memory_pos", "valid"), got, want):
            assert same(a, b), (seed, name)
        free = ~st.active[:rows]
        assert want[2][free, 0].all() and not want[2][free, 1:].any()  # a free row keeps one key, the first
    assert seen_ok == {False, True}  # the states give valid and invalid pointer slots


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_apply_staged_kernels_equal_the_reference(dtype):
    for seed, Cap in enumerate((6, 1, 8)):
        st = random_state(Cap, dtype, 10 + seed)
        ref = TableState(*(t.clone() for t in st))
        tk.table_apply_staged_ref(ref.ring_feat, ref.ring_ptr, ref.count, ref.last_feat, ref.last_ptr,
                                  ref.last_content, ref.last_good, ref.next_feat, ref.next_ptr, ref.next_good,
                                  ref.next_content, ref.staged)
        tk._table_apply_staged_triton(st.ring_feat, st.ring_ptr, st.count, st.last_feat, st.last_ptr, st.last_content,
                                      st.last_good, st.next_feat, st.next_ptr, st.next_good, st.next_content, st.staged,
                                      block=16)
        for name, a, b in zip(TableState._fields, st, ref):
            assert same(a, b), (seed, name)
        assert not st.staged.any()


def test_table_memory_through_the_ops_equals_the_reference_path(monkeypatch):
    """``table_memory`` and ``table_apply_staged`` take the ``sam3fast::`` ops where the backend is
    Triton (forced here on CPU tensors: the ops' CPU kernels are the references) and give the
    values of the reference path; a Python int frame index or mixed dtypes keep the reference."""
    from sam3fast.kernels import _triton_compat as tc

    dtype = torch.bfloat16
    spec = BankSpec(num_maskmem=NM, F=F, G=G, ptr_norm=G + 1, sign=1)
    proj = torch.nn.Linear(D, M).to(dtype)
    enc = torch.randn(NM, 1, 1, M).to(dtype)
    calls = []
    for name in ("table_ptr_slots_ref", "table_memory_tokens_ref", "table_apply_staged_ref"):
        real = getattr(tk, name)
        monkeypatch.setattr(tk, name, (lambda real, name: lambda *a: calls.append(name) or real(*a))(real, name))
    st = random_state(6, dtype, 3)
    ref_st = TableState(*(t.clone() for t in st))
    with torch.no_grad():
        want = table_memory(spec, ref_st, torch.tensor(20), False, enc, proj, 4)
        table_apply_staged(spec, ref_st)
    assert calls == ["table_ptr_slots_ref", "table_memory_tokens_ref", "table_apply_staged_ref"]
    calls.clear()
    monkeypatch.setattr(tc, "KERNEL_PATHS_ON_CPU", True)
    with torch.no_grad():
        got = table_memory(spec, st, torch.tensor(20), False, enc, proj, 4)
        table_apply_staged(spec, st)
        assert calls == []  # the ops' dispatch (their CPU kernels were registered before the patch)
        assert got[2] == want[2] == (C + G + 1) * (D // M)
        for a, b in zip((got[0], got[1], got[3]), (want[0], want[1], want[3])):
            assert same(a, b)
        for a, b in zip(st, ref_st):
            assert same(a, b)
        table_memory(spec, st, 20, False, enc, proj, 4)  # an int frame index: the reference
        table_memory(spec, st, torch.tensor(20), False, enc.float(), proj, 4)  # mixed dtypes: the reference
        assert calls == ["table_ptr_slots_ref", "table_memory_tokens_ref"] * 2
        calls.clear()
        monkeypatch.setattr(mb, "TABLE_KERNELS", False)  # the switch back: the references
        table_memory(spec, st, torch.tensor(20), False, enc, proj, 4)
        table_apply_staged(spec, st)
    assert calls == ["table_ptr_slots_ref", "table_memory_tokens_ref", "table_apply_staged_ref"]


def test_opcheck():
    st = random_state(4, torch.float32, 5)
    frame = torch.tensor(20)
    torch.library.opcheck(torch.ops.sam3fast.table_ptr_slots.default,
                          (st.count, st.last_good, st.last_content, st.cond_valid, st.cond_frames, st.active, frame,
                           3, F, G, 1, False))
    tpos, ok = tk.table_ptr_slots_ref(st.count, st.last_good, st.last_content, st.cond_valid, st.cond_frames,
                                      st.active, frame, 3, F, G, 1, False)
    ptr_pos = torch.randn(3, C + G + 1, M)
    torch.library.opcheck(torch.ops.sam3fast.table_memory_tokens.default,
                          (st.cond_feats, st.ring_feat, st.last_feat, st.maskmem_pos, st.cond_ptrs, st.ring_ptr,
                           st.last_ptr, st.count, st.last_good, st.last_content, st.cond_valid, st.active,
                           torch.randn(NM, M), ptr_pos, ok, 3, NM, False))
    torch.library.opcheck(torch.ops.sam3fast.table_apply_staged_.default, tuple(TableState(*(t.clone() for t in st))[i]
                          for i in (0, 1, 2, 3, 4, 5, 6, 14, 15, 16, 17, 18)))


# ---- GPU only --------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_gpu_real_shapes_bit_exact_and_in_a_graph():
    """SAM 3's table (bf16, 64 channels on 72 x 72, 4 conditioning slots, 16 rows of which 13 run):
    the kernels equal the references run on the same CUDA tensors bit for bit, eagerly and replayed
    from a CUDA graph (the tracker step's situation), staged frames applied once."""
    from sam3fast.predictor.graphs import warm_up_and_capture

    C, M, D = 4, 64, 256
    dev = torch.device("cuda")
    st = TableState(*(t.cuda() for t in random_state(16, torch.bfloat16, 7, C=C, M=M, H=72, W=72, D=D)))
    spec = BankSpec(num_maskmem=NM, F=F, G=G, ptr_norm=G + 1, sign=1)
    proj = torch.nn.Linear(D, M).to(dev, torch.bfloat16)
    enc = torch.randn(NM, 1, 1, M, device=dev).to(torch.bfloat16)
    frame = torch.tensor(30, device=dev)
    ref_st = TableState(*(t.clone() for t in st))
    with torch.inference_mode():
        tk.table_apply_staged_ref(*(ref_st[i] for i in (0, 1, 2, 3, 4, 5, 6, 14, 15, 16, 17, 18)))
        tpos, ok = tk.table_ptr_slots_ref(ref_st.count, ref_st.last_good, ref_st.last_content, ref_st.cond_valid,
                                          ref_st.cond_frames, ref_st.active, frame, 13, F, G, 1, False)
        ptr_pos = proj(torch.zeros(13, C + G + 1, D, device=dev, dtype=torch.bfloat16))  # any rows do
        want = tk.table_memory_tokens_ref(ref_st.cond_feats, ref_st.ring_feat, ref_st.last_feat, ref_st.maskmem_pos,
                                          ref_st.cond_ptrs, ref_st.ring_ptr, ref_st.last_ptr, ref_st.count,
                                          ref_st.last_good, ref_st.last_content, ref_st.cond_valid, ref_st.active,
                                          enc.reshape(NM, M), ptr_pos, ok, 13, NM, False)

        def step():
            table_apply_staged(spec, st)
            return table_memory(spec, st, frame, False, enc, proj, 13)

        graph, out, _ = warm_up_and_capture(step, 1, None, "test_table")
        for field in TableState._fields:
            assert same(getattr(st, field), getattr(ref_st, field)), field
        got_tpos, got_ok = torch.ops.sam3fast.table_ptr_slots(st.count, st.last_good, st.last_content,
                                                              st.cond_valid, st.cond_frames, st.active, frame, 13,
                                                              F, G, 1, False)
        assert same(got_tpos, tpos) and same(got_ok, ok)
        got = torch.ops.sam3fast.table_memory_tokens(st.cond_feats, st.ring_feat, st.last_feat, st.maskmem_pos,
                                                     st.cond_ptrs, st.ring_ptr, st.last_ptr, st.count,
                                                     st.last_good, st.last_content, st.cond_valid, st.active,
                                                     enc.reshape(NM, M), ptr_pos, ok, 13, NM, False)
        for a, b in zip(got, want):
            assert same(a, b)
        for t in out:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert not out[0].isnan().any() and not out[1].isnan().any()
        assert same(out[0], want[0]) and same(out[3], want[2])
