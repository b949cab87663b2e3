"""Residual split distribution: pieces, byte accounting, publisher and client cache."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prfl.distribution import (
    PieceLedger,
    PackedIndex,
    Piece,
    PieceCache,
    PieceId,
    Publisher,
    ResidualSplit,
    assemble,
    dense_model_bytes,
    index_bytes,
    pack_bits,
    plan_download,
    sparse_model_bytes,
    unpack_bits,
)
from prfl.pruning.ranking import Ranking


def random_ranking(n: int, seed: int = 0) -> Ranking:
    g = torch.Generator().manual_seed(seed)
    return Ranking(order=torch.randperm(n, generator=g))


def random_weights(total: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(total, generator=g)


def expected_submodel(w: torch.Tensor, ranking: Ranking, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W ⊙ mask(rho) on the prefix, the suffix untouched."""
    n = ranking.size
    mask = ranking.mask(rho)
    out = w.clone()
    out[:n] = torch.where(mask, w[:n], torch.zeros(()))
    return out, mask


# --------------------------------------------------------------------------- hand case
# N = 100 prunable, M = 10 suffix, densities 0.1, 0.5, 1.0 (client list has a duplicate 0.5).
# Piece sizes: p0 = 10 (suffix), p1 = ceil(0.1*100) = 10, p2 = 50 - 10 = 40, p3 = 100 - 50 = 50.
# Bitmap over N = ceil(100/8) = 13 bytes; position lists would be 40, 160, 200 bytes: bitmap wins.
#   p0 = 4*10                  =  40
#   p1 = 4*10 + min(13, 40) + 1  =  40 + 13 + 1 =  54
#   p2 = 4*40 + min(13, 160) + 1 = 160 + 13 + 1 = 174
#   p3 = 4*50 + min(13, 200) + 1 = 200 + 13 + 1 = 214
#   whole version = 40 + 54 + 174 + 214 = 482 = |W| + k |index| = 4*110 + 3*(13 + 1) = 440 + 42
N, M = 100, 10
HAND_BYTES = [40, 54, 174, 214]


@pytest.fixture
def hand_split() -> ResidualSplit:
    return ResidualSplit(random_ranking(N), [1.0, 0.1, 0.5, 0.5], version=3, total=N + M)


def test_hand_levels_sizes_and_bytes(hand_split):
    s = hand_split
    assert s.levels == (0.1, 0.5, 1.0)
    assert s.num_pieces == 4
    assert [s.count(p) for p in s.piece_ids()] == [10, 10, 40, 50]
    assert [s.piece_bytes(p) for p in s.piece_ids()] == HAND_BYTES
    assert s.version_bytes() == 482
    assert s.version_bytes() == 4 * (N + M) + 3 * (13 + 1)


def test_hand_needed_and_plan(hand_split):
    s = hand_split
    assert s.needed(0.1) == (PieceId(3, 0), PieceId(3, 1))
    assert s.needed(1.0) == tuple(PieceId(3, j) for j in range(4))
    assert [str(p) for p in s.needed(0.5)] == ["v3/p0", "v3/p1", "v3/p2"]
    assert plan_download(s, 0.1, set()) == ([PieceId(3, 0), PieceId(3, 1)], 40 + 54)
    assert plan_download(s, 0.5, set()) == ([PieceId(3, 0), PieceId(3, 1), PieceId(3, 2)], 268)
    # a client that holds v3's pieces 0 and 1 (it was at density 0.1) and rises to 0.5 fetches p2 only
    assert plan_download(s, 0.5, {PieceId(3, 0), PieceId(3, 1)}) == ([PieceId(3, 2)], 174)
    # pieces of an older version do not count
    assert plan_download(s, 0.1, {PieceId(2, 0), PieceId(2, 1)})[1] == 94


def test_hand_sparse_and_dense_model_bytes():
    # whole sparse sub-models: 4c + 13 + 1 + 4*10
    assert sparse_model_bytes(10, N, M) == 40 + 13 + 1 + 40  # 94, same as pieces 0+1
    assert sparse_model_bytes(50, N, M) == 200 + 13 + 1 + 40  # 254 < 268: one index instead of two
    assert sparse_model_bytes(100, N, M) == 400 + 13 + 1 + 40  # 454
    assert dense_model_bytes(N + M) == 440
    # three clients at 0.1, 0.5, 1.0: 94 + 254 + 454 = 802 bytes one by one, 482 as residual pieces


def test_position_list_wins_for_small_pieces():
    # N = 1000, 5 weights: bitmap ceil(1000/8) = 125 bytes, positions 4*5 = 20 bytes; + tag = 21
    assert index_bytes(5, 1000) == 21
    s = ResidualSplit(random_ranking(1000), [0.005, 1.0], version=0, total=1000)
    assert s.piece_bytes(PieceId(0, 1)) == 4 * 5 + 20 + 1  # 41
    assert s.piece_bytes(PieceId(0, 2)) == 4 * 995 + 125 + 1  # 4106
    assert s.piece_bytes(PieceId(0, 0)) == 0  # no suffix


def test_packed_index_hand_bits_and_round_trip():
    bits = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1], dtype=torch.bool)
    packed = pack_bits(bits)
    assert packed.tolist() == [0b10110001, 0b10100000]  # MSB first, zero padded
    assert torch.equal(unpack_bits(packed, 11), bits)

    dense = PackedIndex.from_mask(bits)  # 6 of 11: bitmap 2 bytes < 24 bytes of positions
    assert dense.is_bitmap and dense.count == 6 and dense.nbytes == 3 == index_bytes(6, 11)
    few = torch.zeros(1000, dtype=torch.bool)
    few[[3, 500, 999]] = True
    sparse = PackedIndex.from_mask(few)  # 3 of 1000: 12 bytes of positions < 125 of bitmap
    assert not sparse.is_bitmap and sparse.nbytes == 13 == index_bytes(3, 1000)
    for idx, mask in ((dense, bits), (sparse, few)):
        assert torch.equal(idx.to_mask(), mask)
        assert torch.equal(idx.positions(), mask.nonzero().view(-1))
    assert torch.equal(PackedIndex.from_positions(torch.tensor([999, 3, 500]), 1000).to_mask(), few)


def test_piece_index_bytes_match_a_real_encoding(hand_split):
    s = hand_split
    for p in s.piece_ids()[1:]:
        packed = PackedIndex.from_positions(s.indices(p), N)
        assert 4 * s.count(p) + packed.nbytes == s.piece_bytes(p)


# --------------------------------------------------------------------------- pieces
def test_pieces_rebuild_every_submodel_exactly(hand_split):
    s = hand_split
    w = random_weights(N + M)
    for rho in s.levels:
        weights, mask = s.assemble(s.extract(w, p) for p in s.needed(rho))
        exp_w, exp_mask = expected_submodel(w, s.ranking, rho)
        assert torch.equal(mask, exp_mask)
        assert torch.equal(weights, exp_w)
        assert torch.equal(mask, s.mask(rho))


def test_pieces_partition_the_largest_mask(hand_split):
    s = hand_split
    prunable = [s.indices(p) for p in s.piece_ids()[1:]]
    joined = torch.cat(prunable)
    assert joined.numel() == len(set(joined.tolist()))  # disjoint
    assert torch.equal(torch.sort(joined).values, s.ranking.mask(1.0).nonzero().view(-1))
    for idx in prunable:  # ascending, as the wire format sends them
        assert torch.equal(idx, torch.sort(idx).values)
    # piece j is exactly the ranks [ceil(rho_(j-1) N), ceil(rho_(j) N)) of the ranking
    assert set(s.indices(PieceId(3, 2)).tolist()) == set(s.ranking.order[10:50].tolist())
    assert torch.equal(s.indices(PieceId(3, 0)), torch.arange(100, 110))


def test_split_errors(hand_split):
    s = hand_split
    with pytest.raises(ValueError, match="not a level"):
        s.needed(0.3)
    with pytest.raises(ValueError, match="version"):
        s.indices(PieceId(2, 1))
    with pytest.raises(ValueError, match="does not exist"):
        s.piece_bytes(PieceId(3, 4))
    with pytest.raises(ValueError, match="length 110"):
        s.extract(torch.zeros(109), PieceId(3, 0))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ResidualSplit(random_ranking(N), [0.0, 0.5], version=0, total=N + M)
    with pytest.raises(ValueError, match="at least one"):
        ResidualSplit(random_ranking(N), [], version=0, total=N + M)
    with pytest.raises(ValueError, match="total"):
        ResidualSplit(random_ranking(N), [0.5], version=0, total=N - 1)


def test_assemble_errors(hand_split):
    s = hand_split
    w = random_weights(N + M)
    p0, p1, p2 = (s.extract(w, p) for p in s.needed(0.5))
    with pytest.raises(ValueError, match="0..j"):
        s.assemble([p1, p2])  # no suffix
    with pytest.raises(ValueError, match="0..j"):
        s.assemble([p0, p2])  # gap
    with pytest.raises(ValueError, match="0..j"):
        s.assemble([p0, p1, p1])
    with pytest.raises(ValueError, match="versions"):
        assemble([p0, Piece(PieceId(4, 1), p1.indices, p1.values)], N + M, N)
    with pytest.raises(ValueError, match="carries"):
        s.assemble([p0, Piece(p1.id, p1.indices[:5], p1.values[:5])])
    with pytest.raises(ValueError, match="outside"):
        assemble([Piece(p0.id, p1.indices, p1.values)], N + M, N)


def test_for_version_reuses_positions(hand_split):
    s = hand_split
    s4 = s.for_version(4)
    assert s4.version == 4 and s.version == 3
    assert s4.needed(0.1) == (PieceId(4, 0), PieceId(4, 1))
    assert torch.equal(s4.indices(PieceId(4, 2)), s.indices(PieceId(3, 2)))
    assert s4.indices(PieceId(4, 2)) is s.indices(PieceId(3, 2))  # computed once


# --------------------------------------------------------------------------- publisher and cache
def test_publisher_publishes_each_piece_once_per_version(hand_split):
    s = hand_split
    pub = Publisher()
    assert pub.pending(s.needed(0.5)) == [PieceId(3, 0), PieceId(3, 1), PieceId(3, 2)]
    assert pub.publish(s, s.needed(0.1)) == 40 + 54
    assert pub.pending(s.needed(0.5)) == [PieceId(3, 2)]
    assert pub.publish(s, s.needed(0.5)) == 174  # p0, p1 already out
    assert pub.publish(s, s.needed(0.5)) == 0
    assert pub.publish(s, s.needed(1.0)) == 214
    assert pub.egress_total == 482
    s4 = s.for_version(4)
    assert pub.publish(s4, s4.needed(0.5)) == 40 + 54 + 174  # a new version is published again
    assert pub.egress_total == 482 + 268
    assert PieceId(3, 3) in pub
    pub.forget_versions_before(4)
    assert PieceId(3, 3) not in pub and PieceId(4, 2) in pub
    with pytest.raises(ValueError, match="version"):
        pub.publish(s, [PieceId(5, 0)])


def test_piece_cache_fetches_only_what_it_lacks(hand_split):
    s = hand_split
    w = random_weights(N + M)
    cache = PieceCache()
    need = s.needed(0.1)
    assert cache.missing(need) == list(need)
    assert cache.fetch_bytes(need, s) == 94
    for p in cache.missing(need):
        cache.store(s.extract(w, p))
    assert cache.missing(need) == [] and cache.fetch_bytes(need, s) == 0
    need = s.needed(0.5)  # density rose: only piece 2 is new
    assert cache.missing(need) == [PieceId(3, 2)]
    assert cache.fetch_bytes(need, s) == 174
    with pytest.raises(KeyError, match="v3/p2"):
        cache.rebuild(need, s)
    cache.store(s.extract(w, PieceId(3, 2)))
    weights, mask = cache.rebuild(need, s)
    exp_w, exp_mask = expected_submodel(w, s.ranking, 0.5)
    assert torch.equal(weights, exp_w) and torch.equal(mask, exp_mask)
    assert cache.nbytes() == 60 * (8 + 4)  # int64 positions + fp32 values of 10 + 10 + 40 weights

    s4 = s.for_version(4)
    assert cache.fetch_bytes(s4.needed(0.1), s4) == 94  # new version: nothing reusable
    cache.store(s4.extract(w, PieceId(4, 0)))
    assert cache.drop_versions_before(4) == 3
    assert cache.held() == {PieceId(4, 0)} and len(cache) == 1


def test_version_egress_bound_with_many_clients():
    n, m = 2000, 37
    s = ResidualSplit(random_ranking(n, 5), [0.1, 0.1, 0.25, 0.33, 0.6, 0.6, 1.0, 0.01], version=0, total=n + m)
    pub = Publisher()
    for rho in [0.1, 0.1, 0.25, 0.33, 0.6, 0.6, 1.0, 0.01]:
        pub.publish(s, s.needed(rho))
    k = len(s.levels)
    assert pub.egress_total == s.version_bytes()
    assert pub.egress_total <= dense_model_bytes(n + m) + k * (math.ceil(n / 8) + 1)
    per_client = sum(sparse_model_bytes(s.ranking.count(r), n, m) for r in [0.1, 0.1, 0.25, 0.33, 0.6, 0.6, 1.0, 0.01])
    assert pub.egress_total < per_client


# --------------------------------------------------------------------------- properties
@st.composite
def split_cases(draw):
    n = draw(st.integers(1, 300))
    m = draw(st.integers(0, 20))
    seed = draw(st.integers(0, 2**31 - 1))
    dens = draw(
        st.lists(
            st.one_of(st.floats(0.001, 1.0, allow_nan=False), st.sampled_from([0.1, 0.3, 0.5, 1.0])),
            min_size=1,
            max_size=6,
        )
    )
    return n, m, seed, dens


@settings(max_examples=60, deadline=None)
@given(split_cases())
def test_round_trip_and_bounds_for_random_splits(case):
    n, m, seed, dens = case
    ranking = random_ranking(n, seed)
    s = ResidualSplit(ranking, dens, version=seed % 7, total=n + m)
    w = random_weights(n + m, seed + 1)
    cache = PieceCache()
    pub = Publisher()
    for rho in dens:
        need = s.needed(rho)
        missing, nbytes = plan_download(s, rho, cache.held())
        assert nbytes == cache.fetch_bytes(need, s)
        for p in missing:
            cache.store(s.extract(w, p))
        pub.publish(s, need)
        weights, mask = cache.rebuild(need, s)
        exp_w, exp_mask = expected_submodel(w, ranking, rho)
        assert torch.equal(mask, exp_mask)
        assert torch.equal(weights, exp_w)
        # one client alone pays exactly what a whole sparse sub-model costs, or more (several indices)
        assert s.bytes_of(need) >= sparse_model_bytes(ranking.count(rho), n, m)
    joined = torch.cat([s.indices(p) for p in s.piece_ids()[1:]])
    assert torch.equal(torch.sort(joined).values, ranking.mask(max(dens)).nonzero().view(-1))
    k = len(s.levels)
    assert pub.egress_total == s.version_bytes()
    assert pub.egress_total <= dense_model_bytes(n + m) + k * (math.ceil(n / 8) + 1)
    assert pub.egress_total <= sum(sparse_model_bytes(ranking.count(r), n, m) for r in s.levels)


def test_publisher_state_dict_round_trip(hand_split):
    s = hand_split
    pub = Publisher()
    pub.publish(s, s.needed(0.5))
    other = Publisher()
    other.load_state_dict(pub.state_dict())
    assert other.egress_total == 268
    assert other.publish(s, s.needed(1.0)) == 214  # p0..p2 known to be out already


# ---------------------------------------------------------------------------- the piece ledger
def _ledger_split(version: int, levels: tuple[float, ...] = (0.25, 0.5, 1.0)) -> ResidualSplit:
    return ResidualSplit(Ranking(torch.randperm(40, generator=torch.Generator().manual_seed(3))), levels, version, 48)


def test_ledger_sends_each_client_what_it_lacks_and_publishes_each_piece_once() -> None:
    ledger = PieceLedger(2)
    split = _ledger_split(1)
    assert ledger.use_structure(("r1", split.levels)) and ledger.structure == 1
    low, high = split.needed(0.25), split.needed(1.0)
    assert ledger.missing(0, low) == (list(low), list(low)) and ledger.unpublished(low) == (list(low), list(low))
    ledger.deliver(0, split, low)
    # client 1 needs everything; only the pieces beyond client 0's are new to the server
    assert ledger.missing(1, high) == (list(high), list(high))
    assert ledger.unpublished(high) == (list(high[2:]), list(high[2:]))
    ledger.deliver(1, split, high)
    # next model version, same structure: the values are new, the positions are held
    ledger.use_version(2)
    nxt = split.for_version(2)
    assert not ledger.use_structure(("r1", split.levels))
    assert ledger.missing(1, nxt.needed(1.0)) == (list(nxt.needed(1.0)), [])
    assert ledger.unpublished(nxt.needed(0.5)) == (list(nxt.needed(0.5)), [])
    # a new ranking: positions are stale everywhere; a forgotten client holds nothing
    assert ledger.use_structure(("r2", split.levels)) and ledger.structure == 2
    assert ledger.missing(1, nxt.needed(0.5))[1] == list(nxt.needed(0.5))
    ledger.forget(0)
    assert ledger.missing(0, nxt.needed(0.25)) == (list(nxt.needed(0.25)), list(nxt.needed(0.25)))


def test_ledger_state_round_trips_through_a_checkpoint() -> None:
    from prfl.runtime.checkpoint import dumps, loads

    ledger = PieceLedger(3)
    split = _ledger_split(4)
    ledger.use_structure((7, split.levels))
    ledger.deliver(2, split, split.needed(0.5))
    copy = PieceLedger(3)
    copy.load_state_dict(loads(dumps(ledger.state_dict())))
    for c in range(3):
        assert copy.missing(c, split.needed(1.0)) == ledger.missing(c, split.needed(1.0))
    assert copy.unpublished(split.needed(1.0)) == ledger.unpublished(split.needed(1.0))
    assert (copy.structure, copy.structure_key) == (ledger.structure, ledger.structure_key)
    assert not copy.use_structure((7, split.levels))
