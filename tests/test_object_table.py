"""The object table (``sam3fast.video.memory_bank.ObjectTable``): the memory banks of several
tracker sessions in one set of fixed-capacity tensors, against the per-session banks.

- ``table_memory`` equals ``bank_memory`` + ``_batch_memories`` of the same banks up to token order
  (per row: the multiset of valid frame blocks, L tokens each with their positions, and of valid
  pointer tokens), for sessions with different object counts, conditioning-frame counts, ring
  counts and last-frame flags, forward, reverse and without previous frames; free rows attend to
  one zero key;
- rows freed (the objects after them move down) and reused, capacity doubling, the conditioning
  slots growing to the largest session;
- ``advance`` over the table equals ``MemoryBank.advance`` per row (each row its own good flag);
- the per-session memory-selection score as one segment sum equals ``cal_mem_score``;
- the tracker with several sessions (objects added on different frames, a session with two
  conditioning frames, an object removed, a session leaving the batch) gives the same outputs
  with ``object_table`` True and False, the steady-state frames read no tensor value on the host.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

from host_reads import record_host_reads
from sam3fast.video.memory_bank import BankSpec, MemoryBank, ObjectTable, TableState, bank_memory, table_advance
from sam3fast.video.tracker_predictor import Sam3TrackerPredictor, _batch_memories

NM, G = 7, 6  # num_maskmem (F = 5 ring slots), the list cap
PN = G + 1  # ptr_norm
M, H, W, D = 4, 2, 3, 8  # two tokens per pointer
L = H * W


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture
def mods():
    gen = torch.Generator().manual_seed(11)
    enc = torch.randn(NM, 1, 1, M, generator=gen)
    proj = nn.Linear(D, M)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(M, D, generator=gen))
        proj.bias.copy_(torch.randn(M, generator=gen))
    return enc, proj


def make_bank(gen, B, cond_frames, n_adv, reverse=False):
    """A MemoryBank with random conditioning memory and ``n_adv`` random frames recorded (some
    holding nothing, some bad, goods given as bools or 0-d tensors)."""
    C = len(cond_frames)
    bank = MemoryBank(torch.randn(B, C, M, H, W, generator=gen), torch.randn(B, C, D, generator=gen), cond_frames,
                      torch.randn(1, M, H, W, generator=gen), NM, max_list=G, ptr_norm=PN, reverse=reverse)
    for _ in range(n_adv):
        advance_random(gen, [bank])
    return bank


def random_frame(gen, B):
    r = torch.rand((), generator=gen).item()
    if r < 0.15:
        return None, None, False
    good = torch.rand((), generator=gen).item() < 0.65
    return (torch.randn(B, M, H, W, generator=gen), torch.randn(B, D, generator=gen),
            torch.tensor(good) if r < 0.5 else good)


def advance_random(gen, banks, handles=None):
    for i, bank in enumerate(banks):
        feat, ptr, good = random_frame(gen, bank.batch_size)
        bank.advance(feat, ptr, good)
        if handles is not None:
            handles[i].advance(feat, ptr, good)


def _blocks(memory, memory_pos, valid, n_ptr):
    """One row's valid memory as sorted sets: frame blocks (k, L, 2M) and pointer tokens (k, 2M)
    (memory and position side by side). A frame block is valid whole or not at all."""
    tok = torch.cat((memory, memory_pos), dim=-1)
    n_frame = tok.shape[0] - n_ptr
    fv = valid[:n_frame].view(-1, L)
    assert torch.equal(fv.all(1), fv.any(1)), "a frame block is partly valid"
    frames = tok[:n_frame].view(-1, L, 2 * M)[fv[:, 0]]
    ptrs = tok[n_frame:][valid[n_frame:]]
    kf = torch.linspace(1, 2, L * 2 * M, dtype=tok.dtype).view(L, 2 * M)
    kp = torch.linspace(1, 2, 2 * M, dtype=tok.dtype)
    frames = frames[torch.argsort((frames * kf).sum((1, 2)))]
    ptrs = ptrs[torch.argsort((ptrs * kp).sum(1))]
    return frames, ptrs


def assert_table_matches_banks(table, handles, banks, frame, no_prev, mods, rows=None):
    enc, proj = mods
    frame_t = torch.tensor(frame)
    memory, memory_pos, n_ptr, valid = table.memory(frame_t, no_prev, enc, proj, rows=rows)
    n = table.used if rows is None else rows
    assert memory.shape[:2] == valid.shape and memory.shape[0] == n and memory_pos.shape == memory.shape
    assert n_ptr == (table.cond_capacity + G + 1) * (D // M)
    parts = [bank_memory(b.spec, b.state, frame_t, no_prev, enc, proj) for b in banks]
    ref_mem, ref_pos, ref_nptr, ref_valid = _batch_memories(parts, [b.state.cond_feats.shape[1] for b in banks], L,
                                                            D // M)
    a = 0
    for h, b in zip(handles, banks):
        rows_h = h.rows
        for j in range(b.batch_size):
            got = _blocks(memory[rows_h.start + j], memory_pos[rows_h.start + j], valid[rows_h.start + j], n_ptr)
            ref = _blocks(ref_mem[a + j], ref_pos[a + j], ref_valid[a + j], ref_nptr)
            for g, r, what in zip(got, ref, ("frame blocks", "pointer tokens")):
                assert g.shape == r.shape, f"{what}: {tuple(g.shape)} vs {tuple(r.shape)}"
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=what)
        a += b.batch_size
    active = torch.zeros(n, dtype=torch.bool)
    for h in handles:
        active[h.rows] = True
    free = ~active
    assert torch.equal(valid[free].sum(1), torch.ones(int(free.sum()), dtype=torch.long))
    assert valid[free, 0].all() and (memory[free, 0] == 0).all()


SESSIONS = [  # (objects, conditioning frames, frames recorded)
    (2, [0], 9),
    (1, [0, 4], 3),
    (3, [2], 0),
    (1, [0, 3, 8], 14),
]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("no_prev", [False, True])
def test_table_memory_equals_batched_banks(mods, reverse, no_prev):
    gen = torch.Generator().manual_seed(3 + reverse + 2 * no_prev)
    banks = [make_bank(gen, B, [9 - c for c in cf] if reverse else cf, n, reverse) for B, cf, n in SESSIONS]
    table = ObjectTable.for_bank(banks[0])
    handles = [table.add(b) for b in banks]
    assert table.used == 7 and table.capacity == 8 and table.cond_capacity == 3
    # distinct ring counts and last flags across rows, so the check sees per-row selection
    assert len({int(b.state.count) for b in banks}) >= 3
    assert {bool(b.state.last_content) for b in banks} == {True, False}
    for frame in (5, 6) if not reverse else (4, 3):
        assert_table_matches_banks(table, handles, banks, frame, no_prev, mods)
    # the whole capacity (a bucket): the free row attends to its one zero key
    assert_table_matches_banks(table, handles, banks, 6, no_prev, mods, rows=table.capacity)


def test_rows_freed_reused_and_grown(mods):
    gen = torch.Generator().manual_seed(5)
    banks = [make_bank(gen, B, cf, n) for B, cf, n in SESSIONS[:3]]
    table = ObjectTable.for_bank(banks[0])
    assert table.capacity == 2 and table.cond_capacity == 1
    handles = [table.add(banks[0])]
    handles.append(table.add(banks[1]))  # 3 objects: doubled to 4; two conditioning slots
    assert (table.capacity, table.cond_capacity, table.used) == (4, 2, 3)
    handles.append(table.add(banks[2]))  # 6 objects: 8
    assert (table.capacity, table.used) == (8, 6)
    assert [h.rows for h in handles] == [slice(0, 2), slice(2, 3), slice(3, 6)]
    assert_table_matches_banks(table, handles, banks, 7, False, mods, rows=8)
    # the middle session leaves: the last one moves down, its old rows are free (zero key)
    handles[1].free()
    assert not handles[1].alive and table.used == 5
    assert handles[2].rows == slice(2, 5)
    assert_table_matches_banks(table, [handles[0], handles[2]], [banks[0], banks[2]], 7, False, mods, rows=8)
    st = table.state
    assert not st.active[5:].any() and (st.cond_feats[5:] == 0).all() and (st.segment[5:] == 8).all()
    assert st.segment[:5].tolist() == [0, 0, 2, 2, 2]
    # reused: a new session takes rows 5.. (a third conditioning slot: the slots grow, rows stay)
    new = make_bank(gen, 2, [0, 1, 2], 4)
    handles.append(table.add(new))
    assert handles[3].rows == slice(5, 7) and (table.capacity, table.cond_capacity) == (8, 3)
    live = [handles[0], handles[2], handles[3]]
    banks_live = [banks[0], banks[2], new]
    assert_table_matches_banks(table, live, banks_live, 7, False, mods)
    # recording frames after the moves still matches the banks
    for _ in range(8):
        advance_random(gen, banks_live, live)
        table.advance()
    assert_table_matches_banks(table, live, banks_live, 9, False, mods)
    # retain: the sessions not kept are freed
    table.retain([handles[3].sid])
    assert table.used == 2 and handles[3].rows == slice(0, 2) and not handles[0].alive
    assert_table_matches_banks(table, [handles[3]], [new], 9, False, mods)
    with pytest.raises(ValueError, match="does not fit"):
        table.add(make_bank(gen, 1, [0], 0, reverse=True))


def test_reclaim_frees_dropped_sessions_and_empties_the_table(mods):
    """A session dropped while it holds rows (its TableRows garbage) is freed by ``reclaim``, the
    live sessions stay packed and correct; once no handle is held (freed handles included) the
    table is back to a new table's zeros and ``reusable_for`` a bank that a new ``for_bank``
    table would fit exactly (same conditioning slots, enough rows)."""
    import copy
    import gc

    gen = torch.Generator().manual_seed(6)
    banks = [make_bank(gen, B, cf, n) for B, cf, n in SESSIONS[:3]]
    table = ObjectTable.for_bank(banks[0], capacity=8)
    handles = [table.add(b) for b in banks]
    for _ in range(3):
        advance_random(gen, banks, handles)
    fresh = ObjectTable.for_bank(banks[0], capacity=8)
    fresh._grow(table.capacity, table.cond_capacity)
    assert not table.reclaim()  # every session held: nothing freed
    assert table.used == 6
    del handles[1]
    gc.collect()
    assert not table.reclaim() and table.used == 5  # the dropped session's rows are free
    assert [h.rows for h in handles] == [slice(0, 2), slice(2, 5)]
    assert_table_matches_banks(table, handles, [banks[0], banks[2]], 7, False, mods, rows=8)
    handles[0].free()  # freed, but its handle is still held: the session may come back to it
    assert not table.reclaim() and table.used == 3
    del handles[:]
    gc.collect()
    assert table.reclaim() and table.used == 0 and not table.sessions
    for name, a, b in zip(TableState._fields, table.state, fresh.state):
        assert torch.equal(a, b), name
    c = table.cond_capacity  # 2: the second session's two conditioning frames
    assert table.reusable_for(make_bank(gen, 3, list(range(c)), 1))
    assert not table.reusable_for(make_bank(gen, 1, [0], 1))  # one slot: a new table would have one
    assert not table.reusable_for(make_bank(gen, 9, list(range(c)), 1))  # more rows than it has
    assert not table.reusable_for(make_bank(gen, 1, list(range(c)), 1, reverse=True))  # another spec
    h = table.add(make_bank(gen, 1, list(range(c)), 1))
    assert not table.reusable_for(make_bank(gen, 1, list(range(c)), 1))  # in use
    # deep copies: a copied session holds its rows in the copied table, whatever happens to the
    # original handle; a table copied alone holds orphans
    state = copy.deepcopy({"bank": h})
    h2 = state["bank"]
    assert h2.table is not table and h2.alive and h2.rows == h.rows
    assert torch.equal(h2.table.state.cond_feats, table.state.cond_feats)
    del h
    gc.collect()
    assert table.reclaim() and table.used == 0
    assert not h2.table.reclaim() and h2.alive and h2.table.used == 1
    lone = copy.deepcopy(h2.table)
    assert lone.reclaim() and lone.used == 0 and h2.alive


def test_advance_equals_bank_advance_per_row():
    gen = torch.Generator().manual_seed(9)
    banks = [make_bank(gen, B, cf, 0) for B, cf, _ in SESSIONS]
    table = ObjectTable.for_bank(banks[0])
    handles = [table.add(b) for b in banks]
    st = table.state
    for step in range(25):
        # some sessions skip a frame (their rows must not move); one records two frames (the
        # second stage applies the first)
        movers = [i for i in range(len(banks)) if torch.rand((), generator=gen).item() < 0.8]
        for i in movers:
            feat, ptr, good = random_frame(gen, banks[i].batch_size)
            banks[i].advance(feat, ptr, good)
            handles[i].advance(feat, ptr, good)
            if step % 7 == 3 and i == movers[0]:
                feat, ptr, good = random_frame(gen, banks[i].batch_size)
                banks[i].advance(feat, ptr, good)
                handles[i].advance(feat, ptr, good)
        table.advance()
        for h, b in zip(handles, banks):
            r, bs = h.rows, b.state
            for name in ("ring_feat", "ring_ptr", "last_feat", "last_ptr"):
                assert torch.equal(getattr(st, name)[r], getattr(bs, name)), (step, name)
            for name in ("count", "last_content", "last_good"):
                assert torch.equal(getattr(st, name)[r], getattr(bs, name).expand(b.batch_size)), (step, name)
    assert max(int(b.state.count) for b in banks) > G  # the rings wrapped


def test_table_advance_each_row_its_own_flag():
    """``table_advance`` with full-table inputs: rows outside the mask unchanged, each row's own
    good flag (rows of one session may differ here), against one single-row bank per row."""
    gen = torch.Generator().manual_seed(4)
    banks = [make_bank(gen, 1, [0], n) for n in (0, 3, 6, 11)]
    table = ObjectTable.for_bank(banks[0], capacity=4)
    handles = [table.add(b) for b in banks]
    st, Cap = table.state, table.capacity
    for _ in range(12):
        feat, ptr = torch.randn(Cap, M, H, W, generator=gen), torch.randn(Cap, D, generator=gen)
        good = torch.rand(Cap, generator=gen) < 0.6
        content = torch.rand(Cap, generator=gen) < 0.8
        mask = torch.rand(Cap, generator=gen) < 0.75
        table_advance(table.spec, st, feat, ptr, good, content, mask)
        for i, b in enumerate(banks):
            if mask[i]:
                b.advance(feat[i:i + 1] if content[i] else None, ptr[i:i + 1] if content[i] else None, good[i])
        for h, b in zip(handles, banks):
            r, bs = h.rows, b.state
            for name in ("ring_feat", "ring_ptr", "last_feat", "last_ptr"):
                assert torch.equal(getattr(st, name)[r], getattr(bs, name)), name
            for name in ("count", "last_content", "last_good"):
                assert torch.equal(getattr(st, name)[r], getattr(bs, name).view(1)), name


def test_segment_mem_score_equals_cal_mem_score():
    gen = torch.Generator().manual_seed(2)
    sizes = [2, 1, 3, 2]
    n = sum(sizes)
    score = torch.randn(n + 2, 1, generator=gen)
    iou = torch.rand(n + 2, generator=gen)
    seg, a = [], 0
    for s in sizes:
        seg += [a] * s
        a += s
    seg += [8, 8]  # two free rows: the sentinel segment
    eff = Sam3TrackerPredictor.segment_mem_score(score, iou, torch.tensor(seg), 9)
    a = 0
    for s in sizes:
        ref = Sam3TrackerPredictor.cal_mem_score(None, score[a:a + s], iou[a:a + s])
        torch.testing.assert_close(eff[a], ref, rtol=1e-6, atol=1e-7)
        a += s


# ----------------------------------------------------------------------------------------------
# The tracker: several sessions propagating together


@pytest.fixture(scope="module")
def pair():
    from test_tracker_predictor import Pair

    from sam3fast.config import get_config

    torch.manual_seed(0)
    return Pair(get_config("tiny"), score_shift=-0.515, num_frames=12)


def _cache(pred, frames):
    """Every frame's features in one cache, as the SAM 3 video model shares it among sessions."""
    with torch.inference_mode():
        return {t: (frames[t:t + 1], pred.forward_image(frames[t:t + 1].float())) for t in range(len(frames))}


def _session(pred, p, cache, prompts):
    st = pred.init_state(cached_features=cache, video_height=90, video_width=120, num_frames=len(p.frames))
    for frame, obj, xy in prompts:
        pred.add_new_points_or_box(st, frame, obj, points=[xy], labels=[1])
    pred.propagate_in_video_preflight(st)
    return st


def multi_session(pred, p, cache, on_frame=None):
    """Sessions added on frames 0, 3 and 5 (the last with conditioning frames 2 and 5), an object
    removed on frame 8, the first session leaving the batch on frame 9. Records per frame and
    session (frame, session, obj_ids, low-res masks, scores)."""
    sessions = {"a": _session(pred, p, cache, [(0, 1, [0.1, 0.5]), (0, 2, [0.8, 0.3])])}
    rec = []
    for f in range(len(p.frames)):
        if f == 3:
            sessions["b"] = _session(pred, p, cache, [(3, 3, [0.5, 0.8]), (3, 5, [0.3, 0.3])])
        if f == 5:
            sessions["c"] = _session(pred, p, cache, [(2, 4, [0.4, 0.4]), (5, 4, [0.45, 0.45])])
        if f == 8:
            pred.remove_object(sessions["b"], 5, need_output=False)
        if f == 9:
            del sessions["a"]
        if on_frame is not None:
            on_frame(sessions)
        names = list(sessions)
        res = pred.propagate_states_one_frame([sessions[k] for k in names], f, False, run_mem_encoder=True)
        for k, r in zip(names, res):
            rec.append((f, k, r[0], r[1].clone(), r[2].clone()))
    return rec


def test_tracker_sessions_same_with_and_without_table(pair, monkeypatch):
    pred = pair.ours
    cache = _cache(pred, pair.frames)
    pred.object_table = False
    try:
        ref = multi_session(pred, pair, cache)
    finally:
        pred.object_table = True
    tables, rows_run = set(), []
    step = pred.table_track_step

    def spy(spec, state, frame_t, feats, pos, rows, **kw):
        rows_run.append(rows)
        return step(spec, state, frame_t, feats, pos, rows, **kw)

    def watch(sessions):
        for st in sessions.values():
            cur = st.get("memory_bank")
            if cur is not None:
                tables.add(id(cur["bank"].table))

    monkeypatch.setattr(pred, "table_track_step", spy)
    counts = dict(pred.step_counts)
    got = multi_session(pred, pair, cache, on_frame=watch)
    assert pred.step_counts["reference"] == counts["reference"], "a frame fell back to the official selection"
    # one step per frame (1 ..) for the sessions on the table: a's 2 objects, + b's 2 (from frame 4;
    # frame 3 is its prompt), + c's 1 (from frame 6, with 2 conditioning frames), b without an
    # object (frame 8), without a (frame 9)
    assert rows_run == [2, 2, 2, 4, 4, 5, 5, 4, 2, 2, 2], rows_run
    assert len(tables) == 1, "the sessions should share one object table"
    assert [r[:3] for r in got] == [r[:3] for r in ref]
    for (f, k, _, lo, sc), (_, _, _, lo_r, sc_r) in zip(got, ref):
        torch.testing.assert_close(lo, lo_r, rtol=1e-4, atol=1e-4, msg=f"frame {f} session {k} masks")
        torch.testing.assert_close(sc, sc_r, rtol=1e-4, atol=1e-4, msg=f"frame {f} session {k} scores")


def test_tracker_sessions_steady_state_reads_nothing(pair, monkeypatch):
    """Two sessions (two and one objects, one and two conditioning frames) on one table: after
    the frames where the banks are built, a frame reads no tensor value on the host."""
    pred = pair.ours
    assert pred.object_table
    cache = _cache(pred, pair.frames)
    a = _session(pred, pair, cache, [(0, 1, [0.1, 0.5]), (0, 2, [0.8, 0.3])])
    b = _session(pred, pair, cache, [(0, 3, [0.5, 0.8]), (1, 3, [0.5, 0.75])])
    armed = [False]
    with record_host_reads(monkeypatch, armed) as hits:
        for f in range(len(pair.frames)):
            armed[0] = f >= 4
            pred.propagate_states_one_frame([a, b], f, False, run_mem_encoder=True)
        armed[0] = False
    assert hits == []
    table = a["memory_bank"]["bank"].table
    assert b["memory_bank"]["bank"].table is table and table.used == 3 and table.cond_capacity == 2


def test_random_sequences_match_banks(mods):
    """Random adds, frees and frames: the table's memory keeps matching the banks."""
    gen = torch.Generator().manual_seed(21)
    rnd = random.Random(21)
    table = ObjectTable(BankSpec(NM, NM - 2, G, PN, 1), (M, H, W), D, torch.float32, "cpu")
    live = []
    for step in range(30):
        op = rnd.random()
        if op < 0.3 or not live:
            cf = sorted(rnd.sample(range(8), rnd.randint(1, 3)))
            bank = make_bank(gen, rnd.randint(1, 3), cf, rnd.randint(0, 10))
            live.append((table.add(bank), bank))
        elif op < 0.45:
            h, _ = live.pop(rnd.randrange(len(live)))
            h.free()
        else:
            advance_random(gen, [b for _, b in live], [h for h, _ in live])
        if live:
            assert_table_matches_banks(table, [h for h, _ in live], [b for _, b in live], 8, False, mods,
                                       rows=table.bucket())
    assert table.capacity >= 4
