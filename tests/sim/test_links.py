"""Tests for prfl.sim.links: max-min fair sharing of the server link, checked against hand-computed times."""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prfl.sim.links import SharedLink, transfer_time, water_fill

MB = 1e6


def drain(link: SharedLink) -> list[tuple[float, object]]:
    """Run the link until empty; return (completion time, flow id) pairs."""
    out = []
    while (nxt := link.next_completion()) is not None:
        t, _ = nxt
        out.extend((t, fid) for fid in link.advance(t))
    return out


def test_water_fill_examples() -> None:
    # all caps fit: everyone at its cap
    assert water_fill([2.0, 3.0], 10.0) == [2.0, 3.0]
    # equal split when both caps exceed C/2
    assert water_fill([8.0, 6.0], 10.0) == [5.0, 5.0]
    # one flow below the fair share 10/3 keeps its cap; the other two split 10 - 2 = 8
    assert water_fill([6.0, 2.0, 6.0], 10.0) == [4.0, 2.0, 4.0]
    assert water_fill([1.0, 2.0], None) == [1.0, 2.0]


def test_sharing_not_binding_both_at_caps() -> None:
    # Server 10 MB/s; A cap 8 MB/s, 20 MB from t=0; B cap 2 MB/s, 10 MB from t=1.
    # [0,1): A alone at 8 -> 12 MB left at t=1. From t=1: B's cap 2 is below the fair share 5,
    # so B runs at 2 and A gets min(8, 10 - 2) = 8: both at their caps, the link does not bind.
    # A finishes at 1 + 12/8 = 2.5; B at 1 + 10/2 = 6.
    link = SharedLink(10 * MB)
    link.start("A", 20 * MB, 8 * MB, now=0.0)
    assert link.advance(1.0) == []
    link.start("B", 10 * MB, 2 * MB, now=1.0)
    assert link.rates() == {"A": 8 * MB, "B": 2 * MB}
    assert drain(link) == [(2.5, "A"), (6.0, "B")]


def test_two_clients_fair_share_binds() -> None:
    # Server 10 MB/s; A cap 8 MB/s downloads 20 MB from t=0; B cap 6 MB/s downloads 10 MB from t=1.
    # [0,1):   A alone at its cap 8        -> A has 20 - 8 = 12 MB left at t=1.
    # [1,3):   fair share 10/2 = 5 < both caps -> A 5, B 5. B needs 10/5 = 2 s -> B done at t=3.
    #          A moved 5*2 = 10 MB        -> 2 MB left at t=3.
    # [3,3.25): A alone again at 8        -> 2/8 = 0.25 s -> A done at t=3.25.
    link = SharedLink(10 * MB)
    link.start("A", 20 * MB, 8 * MB, now=0.0)
    assert link.rates() == {"A": 8 * MB}
    assert link.next_completion() == (2.5, "A")
    assert link.advance(1.0) == []
    link.start("B", 10 * MB, 6 * MB, now=1.0)
    assert link.rates() == {"A": 5 * MB, "B": 5 * MB}
    assert link.next_completion() == (3.0, "B")
    assert link.advance(3.0) == ["B"]
    assert link.remaining("A") == pytest.approx(2 * MB)
    assert link.rates() == {"A": 8 * MB}
    assert link.next_completion() == (3.25, "A")
    assert link.advance(3.25) == ["A"]
    assert link.active() == 0 and link.next_completion() is None


def test_advance_past_several_completions_reshares_in_between() -> None:
    # Same scenario, but one advance(10) jumps over both completions: the rates must still be
    # re-shared at t=3 (otherwise A would finish at 1 + 12/5 = 3.4 instead of 3.25).
    link = SharedLink(10 * MB)
    link.start("A", 20 * MB, 8 * MB, now=0.0)
    link.start("B", 10 * MB, 6 * MB, now=1.0)
    assert link.advance(10.0) == ["B", "A"]
    link2 = SharedLink(10 * MB)
    link2.start("A", 20 * MB, 8 * MB, now=0.0)
    link2.start("B", 10 * MB, 6 * MB, now=1.0)
    assert drain(link2) == [(3.0, "B"), (3.25, "A")]


def test_three_flows_one_capped_below_fair_share() -> None:
    # Server 10 MB/s, all start at t=0: A cap 2 (4 MB), B cap 6 (12 MB), C cap 6 (18 MB).
    # Fair share 10/3 = 3.33 > A's cap 2 -> A at 2; B and C split 10 - 2 = 8 -> 4 each (< cap 6).
    # A done at 4/2 = 2. Then B has 12 - 8 = 4 MB and C 18 - 8 = 10 MB left.
    # [2, 2.8): B and C share 10 -> 5 each (< cap 6); B done at 2 + 4/5 = 2.8; C has 10 - 4 = 6 left.
    # [2.8, 3.8): C alone at its cap 6 -> 6/6 = 1 s -> C done at 3.8.
    link = SharedLink(10 * MB)
    link.start("A", 4 * MB, 2 * MB, now=0.0)
    link.start("B", 12 * MB, 6 * MB, now=0.0)
    link.start("C", 18 * MB, 6 * MB, now=0.0)
    assert link.rates() == {"A": 2 * MB, "B": 4 * MB, "C": 4 * MB}
    done = drain(link)
    assert [fid for _, fid in done] == ["A", "B", "C"]
    assert [t for t, _ in done] == pytest.approx([2.0, 2.8, 3.8], rel=1e-12)


def test_unlimited_capacity_each_flow_at_its_cap() -> None:
    link = SharedLink(None)
    link.start("A", 20 * MB, 8 * MB, now=0.0)
    link.start("B", 10 * MB, 6 * MB, now=1.0)
    assert link.rates() == {"A": 8 * MB, "B": 6 * MB}
    # A: 20/8 = 2.5; B: 1 + 10/6
    done = drain(link)
    assert done[0] == (2.5, "A")
    assert done[1][1] == "B" and done[1][0] == pytest.approx(1 + 10 / 6, rel=1e-12)
    assert SharedLink(math.inf).capacity is None


def test_cancel_frees_bandwidth() -> None:
    # Server 10; A cap 8 (20 MB) and B cap 6 (10 MB) from t=0 share 5/5. Cancel B at t=1:
    # A has 15 MB left and runs alone at 8 -> done at 1 + 15/8 = 2.875.
    link = SharedLink(10 * MB)
    link.start("A", 20 * MB, 8 * MB, now=0.0)
    link.start("B", 10 * MB, 6 * MB, now=0.0)
    link.cancel("B", now=1.0)
    assert link.rates() == {"A": 8 * MB}
    assert drain(link) == [(2.875, "A")]
    with pytest.raises(KeyError):
        link.cancel("B", now=3.0)


def test_zero_byte_flow_completes_at_start() -> None:
    link = SharedLink(10 * MB)
    link.start("A", 20 * MB, 8 * MB, now=0.0)
    link.start("Z", 0, 1 * MB, now=0.5)
    assert link.next_completion() == (0.5, "Z")
    assert link.active() == 1
    assert link.rates() == {"A": 8 * MB}  # the empty flow never takes bandwidth
    assert link.advance(0.5) == ["Z"]
    assert drain(link) == [(2.5, "A")]


def test_ties_broken_by_start_order() -> None:
    link = SharedLink(None)
    link.start("second", 2 * MB, 1 * MB, now=0.0)
    link.start("first", 2 * MB, 1 * MB, now=0.0)
    assert link.next_completion() == (2.0, "second")
    assert link.advance(2.0) == ["second", "first"]


def test_completion_during_start_is_reported_by_next_advance() -> None:
    # The driver starts a flow at t=5 without advancing first: A (done at 2.5) is not lost.
    link = SharedLink(10 * MB)
    link.start("A", 20 * MB, 8 * MB, now=0.0)
    link.start("B", 1 * MB, 1 * MB, now=5.0)
    assert link.next_completion() == (2.5, "A")
    assert link.advance(5.0) == ["A"]
    assert link.rates() == {"B": 1 * MB}


def test_set_capacity_changes_rates() -> None:
    # A cap 8 (20 MB) on a 10 MB/s link: 8 MB by t=1; capacity drops to 4 -> 12/4 = 3 more s.
    link = SharedLink(10 * MB)
    link.start("A", 20 * MB, 8 * MB, now=0.0)
    link.set_capacity(4 * MB, now=1.0)
    assert link.rates() == {"A": 4 * MB}
    assert drain(link) == [(4.0, "A")]


def test_bad_inputs() -> None:
    link = SharedLink(10 * MB)
    with pytest.raises(ValueError):
        SharedLink(0.0)
    with pytest.raises(ValueError):
        link.start("A", -1, 1.0, now=0.0)
    with pytest.raises(ValueError):
        link.start("A", 1, 0.0, now=0.0)
    link.start("A", 1 * MB, 1 * MB, now=1.0)
    with pytest.raises(ValueError, match="already"):
        link.start("A", 1 * MB, 1 * MB, now=1.0)
    with pytest.raises(ValueError, match="backwards"):
        link.advance(0.5)


def test_state_dict_round_trip() -> None:
    link = SharedLink(10 * MB)
    link.start(("dl", 0), 20 * MB, 8 * MB, now=0.0)
    link.start(("dl", 1), 10 * MB, 6 * MB, now=1.0)
    link.start(("dl", 2), 0, 6 * MB, now=1.5)
    state = pickle.loads(pickle.dumps(link.state_dict()))
    restored = SharedLink(None)
    restored.load_state_dict(state)
    assert restored.rates() == link.rates()
    assert drain(restored) == drain(link) == [(1.5, ("dl", 2)), (3.0, ("dl", 1)), (3.25, ("dl", 0))]


def test_transfer_time() -> None:
    assert transfer_time(20 * MB, 8 * MB, 10 * MB) == 2.5
    assert transfer_time(20 * MB, 8 * MB, 4 * MB) == 5.0
    assert transfer_time(20 * MB, 8 * MB, None) == 2.5
    assert transfer_time(0, 8 * MB, 4 * MB) == 0.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 50.0),  # start time
            st.floats(0.0, 1e8),  # bytes
            st.floats(1e3, 2e7),  # cap
        ),
        min_size=1,
        max_size=8,
    ),
    st.one_of(st.none(), st.floats(1e5, 5e7)),
)
def test_invariants_random(flows: list[tuple[float, float, float]], capacity: float | None) -> None:
    """Every flow completes exactly once, never before nbytes / cap after its start, and the
    total rate never exceeds the capacity."""
    link = SharedLink(capacity)
    order = sorted(range(len(flows)), key=lambda i: flows[i][0])
    completed: dict[int, float] = {}
    for i in order:
        t0, nbytes, cap = flows[i]
        while (nxt := link.next_completion()) is not None and nxt[0] <= t0:
            completed.update((fid, nxt[0]) for fid in link.advance(nxt[0]))
        completed.update((fid, t0) for fid in link.advance(t0))
        link.start(i, nbytes, cap, now=t0)
        total = sum(link.rates().values())
        if capacity is not None:
            assert total <= capacity * (1 + 1e-9)
        assert all(r <= flows[f][2] * (1 + 1e-12) for f, r in link.rates().items())
    completed.update({fid: t for t, fid in drain(link)})
    assert sorted(completed) == list(range(len(flows)))
    for i, (t0, nbytes, cap) in enumerate(flows):
        assert completed[i] >= t0 + nbytes / cap * (1 - 1e-9) - 1e-9
