"""Residual split distribution: one model version as nested pieces, with honest byte accounting.

Sort the distinct client densities ascending, rho_(1) < ... < rho_(k), and let N be the number of
prunable weights (the flat vector's prefix) and M the number of non-prunable ones (the suffix).

- Piece 0 is the suffix (biases, norms, ...): M values, always dense, needed by every client.
- Piece j (1..k) holds the prunable weights ranked in [ceil(rho_(j-1) N), ceil(rho_(j) N)),
  rho_(0) = 0: a slice of the ranking, sent as values plus positions.

A client of density rho_(j) needs pieces 0..j of the current version; since masks are prefixes
of one ranking, pieces 1..j are exactly its mask and the pieces are disjoint, so the server sends
each weight of a version at most once however many clients need it.

Wire format and byte accounting
-------------------------------
Values are fp32: 4 bytes each, in ascending position order. A prunable piece of c weights out of
N sends its positions in the cheaper of two encodings, plus a 1-byte tag naming which:

- a bitmap over the N prunable weights (most significant bit first): ceil(N / 8) bytes;
- the sorted positions as uint32: 4 c bytes.

    bytes(prunable piece) = 4 c + min(ceil(N / 8), 4 c) + 1
    bytes(piece 0)        = 4 M                       (dense, so no index)

The bitmap wins once a piece holds more than about 1/32 of the prunable weights. An empty piece
(two densities with the same ceil(rho N)) costs its 1-byte tag. Publishing a whole version once
therefore costs at most  4 (N + M) + k (ceil(N / 8) + 1)  bytes, i.e. |W| + k |index|, against
sum_i |W_i| for sending every client its own sub-model (:func:`sparse_model_bytes` per client).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from prfl.pruning.ranking import Ranking

VALUE_BYTES = 4
"""Bytes per fp32 value."""
POSITION_BYTES = 4
"""Bytes per uint32 position."""
TAG_BYTES = 1
"""Bytes of the tag that says whether an index is a bitmap or a position list."""

_MAX_POSITIONS = 2**31 - 1  # positions are held as int32 in memory (uint32 on the wire)
_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # MSB first


# --------------------------------------------------------------------------- byte formulas
def bitmap_bytes(n: int) -> int:
    """Bytes of a bitmap over ``n`` items: ceil(n / 8)."""
    return -(-n // 8)


def index_bytes(count: int, n: int) -> int:
    """Bytes of the positions of ``count`` of ``n`` items: min(ceil(n / 8), 4 count) + 1."""
    _check_count(count, n)
    return min(bitmap_bytes(n), POSITION_BYTES * count) + TAG_BYTES


def prunable_piece_bytes(count: int, n: int) -> int:
    """Bytes of a prunable piece of ``count`` weights out of ``n``: 4 c + min(ceil(n/8), 4 c) + 1."""
    return VALUE_BYTES * count + index_bytes(count, n)


def suffix_bytes(m: int) -> int:
    """Bytes of the dense non-prunable suffix (piece 0): 4 M."""
    if m < 0:
        raise ValueError(f"suffix length must be >= 0, got {m}")
    return VALUE_BYTES * m


def sparse_model_bytes(count: int, n: int, m: int) -> int:
    """Bytes of sending a client its whole sub-model in one message (no residual split).

    ``count`` kept prunable weights out of ``n`` plus the ``m`` suffix values:
    4 c + min(ceil(n / 8), 4 c) + 1 + 4 m.
    """
    return prunable_piece_bytes(count, n) + suffix_bytes(m)


def dense_model_bytes(total: int) -> int:
    """Bytes of a dense fp32 model of ``total`` weights: 4 |W|."""
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    return VALUE_BYTES * total


def _check_count(count: int, n: int) -> None:
    if not 0 <= count <= n:
        raise ValueError(f"count must lie in [0, {n}], got {count}")


# --------------------------------------------------------------------------- packed index
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor into ceil(n / 8) uint8 bytes, most significant bit first."""
    n = int(mask.numel())
    bits = torch.nn.functional.pad(mask.reshape(-1).to(torch.uint8), (0, (-n) % 8))
    return (bits.view(-1, 8) << _BIT_SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a bool tensor."""
    if packed.dtype != torch.uint8 or packed.numel() != bitmap_bytes(n):
        raise ValueError(f"expected {bitmap_bytes(n)} uint8 bytes for {n} bits, got {packed.numel()} {packed.dtype}")
    return ((packed.unsqueeze(1) >> _BIT_SHIFTS) & 1).view(-1)[:n].bool()


@dataclass(frozen=True)
class PackedIndex:
    """Positions of ``count`` of ``size`` items in the cheaper encoding (see the module docstring).

    ``data`` is a uint8 bitmap (``is_bitmap``) or the sorted positions as int32.
    """

    size: int
    count: int
    is_bitmap: bool
    data: torch.Tensor

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> PackedIndex:
        """Encode a 1-D bool mask."""
        if mask.dim() != 1 or mask.dtype != torch.bool:
            raise ValueError(f"expected a 1-D bool mask, got {mask.dtype} {tuple(mask.shape)}")
        n = int(mask.numel())
        if n > _MAX_POSITIONS:
            raise ValueError(f"at most {_MAX_POSITIONS} items can be indexed, got {n}")
        count = int(torch.count_nonzero(mask))
        if bitmap_bytes(n) < POSITION_BYTES * count:
            return cls(n, count, True, pack_bits(mask))
        return cls(n, count, False, mask.nonzero().view(-1).to(torch.int32))

    @classmethod
    def from_positions(cls, positions: torch.Tensor, size: int) -> PackedIndex:
        """Encode distinct positions in [0, size) (any order)."""
        mask = torch.zeros(size, dtype=torch.bool)
        mask[positions.to(torch.int64)] = True
        if int(torch.count_nonzero(mask)) != positions.numel():
            raise ValueError("positions must be distinct")
        return cls.from_mask(mask)

    @property
    def nbytes(self) -> int:
        """Wire bytes: the data plus the 1-byte tag; equals :func:`index_bytes`."""
        return TAG_BYTES + self.data.numel() * self.data.element_size()

    def to_mask(self) -> torch.Tensor:
        """The positions as a bool mask of length ``size``."""
        if self.is_bitmap:
            return unpack_bits(self.data, self.size)
        mask = torch.zeros(self.size, dtype=torch.bool)
        mask[self.data.to(torch.int64)] = True
        return mask

    def positions(self) -> torch.Tensor:
        """The positions, ascending, as int64."""
        if self.is_bitmap:
            return self.to_mask().nonzero().view(-1)
        return self.data.to(torch.int64)


# --------------------------------------------------------------------------- pieces
@dataclass(frozen=True, order=True)
class PieceId:
    """Address of a piece: model version and piece index (0 = suffix, j = j-th density level)."""

    version: int
    index: int

    def __str__(self) -> str:
        return f"v{self.version}/p{self.index}"


@dataclass(frozen=True)
class Piece:
    """A piece's content: positions in the flat vector (ascending, int64) and their values."""

    id: PieceId
    indices: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        if self.indices.dim() != 1 or self.values.shape != self.indices.shape:
            raise ValueError(
                f"piece {self.id}: indices {tuple(self.indices.shape)} and values "
                f"{tuple(self.values.shape)} must be 1-D of equal length"
            )


def assemble(pieces: Iterable[Piece], total: int, num_prunable: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuild a sub-model from pieces 0..j of one version (client side: needs only the layout).

    Returns ``(weights, mask)``: the flat vector of ``total`` weights, zero outside the pieces, and
    the bool mask over the ``num_prunable`` prefix (the union of the prunable pieces).
    """
    plist = list(pieces)
    if not plist:
        raise ValueError("assemble needs pieces 0..j of one version, got none")
    versions = {p.id.version for p in plist}
    if len(versions) != 1:
        raise ValueError(f"pieces mix model versions {sorted(versions)}; a sub-model needs one version")
    idx = sorted(p.id.index for p in plist)
    if idx != list(range(len(idx))):
        raise ValueError(f"assemble needs pieces 0..j each exactly once, got indices {idx}")
    weights = torch.zeros(total, dtype=plist[0].values.dtype)
    mask = torch.zeros(num_prunable, dtype=torch.bool)
    for p in plist:  # a loop over pieces (k+1 of them), each a vectorised scatter
        pos = p.indices
        if pos.numel():
            lo, hi = int(pos.min()), int(pos.max())
            inside = (num_prunable <= lo and hi < total) if p.id.index == 0 else (0 <= lo and hi < num_prunable)
            if not inside:
                part = "suffix" if p.id.index == 0 else "prunable prefix"
                raise ValueError(f"piece {p.id} has positions outside the {part}")
        weights[pos] = p.values.to(weights.dtype)
        if p.id.index > 0:
            mask[pos] = True
    return weights, mask


class ResidualSplit:
    """Pieces of one model version for a set of densities under one ranking.

    ``total`` is the length of the flat vector; ``N = ranking.size`` its prunable prefix and
    ``M = total - N`` the suffix. One split per version: build it from all clients' densities;
    :meth:`for_version` reuses the piece positions for the next version when the ranking and the
    densities are unchanged (only the values differ).
    """

    def __init__(self, ranking: Ranking, densities: Iterable[float], version: int, total: int) -> None:
        n = ranking.size
        if total < n:
            raise ValueError(f"total ({total}) must be >= the number of prunable weights ({n})")
        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        levels = tuple(sorted({float(d) for d in densities}))
        if not levels:
            raise ValueError("a residual split needs at least one density")
        bad = [d for d in levels if not 0.0 < d <= 1.0]
        if bad:
            raise ValueError(f"densities must lie in (0, 1], got {bad}")
        self.ranking = ranking
        self.version = int(version)
        self.total = int(total)
        self.num_prunable = n
        self.levels: tuple[float, ...] = levels
        self.bounds: tuple[int, ...] = (0, *(ranking.count(d) for d in levels))
        """Rank bounds: piece j holds ranks [bounds[j-1], bounds[j])."""
        self._level_of = {d: j for j, d in enumerate(levels, start=1)}
        self._positions: dict[int, torch.Tensor] = {}  # lazily sorted piece positions, shared by for_version

    # -- structure
    @property
    def num_suffix(self) -> int:
        """M, the number of non-prunable weights (piece 0)."""
        return self.total - self.num_prunable

    @property
    def num_pieces(self) -> int:
        """k + 1: the suffix plus one piece per density level."""
        return len(self.levels) + 1

    def piece_ids(self) -> tuple[PieceId, ...]:
        """All pieces of this version, ascending (suffix first, then smallest density first)."""
        return tuple(PieceId(self.version, j) for j in range(self.num_pieces))

    def for_version(self, version: int) -> ResidualSplit:
        """The same split (ranking, levels, positions) for another model version."""
        if version < 0:
            raise ValueError(f"version must be >= 0, got {version}")
        other = copy.copy(self)  # shallow: shares the ranking and the positions cache
        other.version = int(version)
        return other

    def level_of(self, density: float) -> int:
        """j such that ``density`` is rho_(j); raises unless it is a level."""
        j = self._level_of.get(float(density))
        if j is None:
            raise ValueError(f"density {density} is not a level of this split; levels: {list(self.levels)}")
        return j

    def needed(self, density: float) -> tuple[PieceId, ...]:
        """Pieces 0..j a client of density rho_(j) needs, ascending."""
        return tuple(PieceId(self.version, i) for i in range(self.level_of(density) + 1))

    def check(self, piece: PieceId) -> None:
        """Raise unless ``piece`` is a piece of this split."""
        if not isinstance(piece, PieceId):
            raise TypeError(f"expected a PieceId, got {type(piece).__name__}")
        if piece.version != self.version:
            raise ValueError(f"piece {piece} belongs to version {piece.version}, this split is version {self.version}")
        if not 0 <= piece.index < self.num_pieces:
            raise ValueError(f"piece {piece} does not exist; this split has pieces 0..{self.num_pieces - 1}")

    def count(self, piece: PieceId) -> int:
        """Number of weights in ``piece``: M for piece 0, ceil(rho_(j) N) - ceil(rho_(j-1) N) else."""
        self.check(piece)
        if piece.index == 0:
            return self.num_suffix
        return self.bounds[piece.index] - self.bounds[piece.index - 1]

    def indices(self, piece: PieceId) -> torch.Tensor:
        """Positions of ``piece`` in the flat vector, ascending (int64; treat as read-only)."""
        self.check(piece)
        j = piece.index
        if j == 0:
            return torch.arange(self.num_prunable, self.total, dtype=torch.int64)
        pos = self._positions.get(j)
        if pos is None:
            pos = torch.sort(self.ranking.order[self.bounds[j - 1] : self.bounds[j]]).values.to(torch.int64)
            self._positions[j] = pos
        return pos

    def mask(self, density: float) -> torch.Tensor:
        """Bool mask over the prunable prefix of the sub-model at a level: the union of pieces 1..j."""
        return self.ranking.mask(self.levels[self.level_of(density) - 1])

    # -- content
    def extract(self, weights: torch.Tensor, piece: PieceId) -> Piece:
        """Cut ``piece`` out of the version's flat weights (values copied)."""
        if weights.dim() != 1 or weights.numel() != self.total or not weights.is_floating_point():
            raise ValueError(
                f"expected flat floating-point weights of length {self.total}, got {weights.dtype} {tuple(weights.shape)}"
            )
        idx = self.indices(piece)
        values = weights.detach()[self.num_prunable :].clone() if piece.index == 0 else weights.detach()[idx]
        return Piece(piece, idx, values)

    def assemble(self, pieces: Iterable[Piece]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights, prunable mask)`` of the sub-model made of pieces 0..j of this version."""
        plist = list(pieces)
        for p in plist:
            self.check(p.id)
            if p.indices.numel() != self.count(p.id):
                raise ValueError(f"piece {p.id} carries {p.indices.numel()} weights, expected {self.count(p.id)}")
        return assemble(plist, self.total, self.num_prunable)

    # -- bytes
    def piece_bytes(self, piece: PieceId) -> int:
        """Wire bytes of ``piece``: 4 M for piece 0, 4 c + min(ceil(N/8), 4 c) + 1 otherwise."""
        c = self.count(piece)
        return suffix_bytes(c) if piece.index == 0 else prunable_piece_bytes(c, self.num_prunable)

    def bytes_of(self, pieces: Iterable[PieceId]) -> int:
        """Total wire bytes of distinct ``pieces``."""
        return sum(self.piece_bytes(p) for p in set(pieces))

    def version_bytes(self) -> int:
        """Bytes of publishing every piece of the version once (<= 4 |W| + k (ceil(N/8) + 1))."""
        return self.bytes_of(self.piece_ids())

    def __repr__(self) -> str:
        return (
            f"ResidualSplit(version={self.version}, levels={list(self.levels)}, "
            f"N={self.num_prunable}, M={self.num_suffix})"
        )


@dataclass(frozen=True)
class ResidualPlan:
    """How one task's sub-model is distributed: the residual split of the task's model version
    and the pieces 0..j it needs (ascending), j the level of the task's density."""

    split: ResidualSplit
    needed: tuple[PieceId, ...]

    @property
    def kept(self) -> int:
        """Prunable weights the needed pieces hold: ``bounds[j]``."""
        return self.split.bounds[self.needed[-1].index]


def plan_download(split: ResidualSplit, density: float, cache_has: set[PieceId]) -> tuple[list[PieceId], int]:
    """What a client of ``density`` must fetch given the pieces it holds: (missing pieces ascending, bytes)."""
    missing = [p for p in split.needed(density) if p not in cache_has]
    return missing, split.bytes_of(missing)


# --------------------------------------------------------------------------- server and client
class Publisher:
    """Server side: which pieces of which version have been pushed, and the egress they cost.

    Each piece is published once per version; a new version publishes its pieces again.
    """

    def __init__(self) -> None:
        self._published: set[PieceId] = set()
        self._egress = 0

    @property
    def egress_total(self) -> int:
        """Bytes published so far."""
        return self._egress

    def __contains__(self, piece: object) -> bool:
        return piece in self._published

    def pending(self, needed: Iterable[PieceId]) -> list[PieceId]:
        """The pieces of ``needed`` not yet published, ascending (smallest density first)."""
        return sorted({p for p in needed if p not in self._published})

    def publish(self, split: ResidualSplit, needed: Iterable[PieceId]) -> int:
        """Publish the pieces of ``needed`` not yet published; return their egress bytes."""
        new = self.pending(needed)
        for p in new:
            split.check(p)
        nbytes = split.bytes_of(new)
        self._published.update(new)
        self._egress += nbytes
        return nbytes

    def forget_versions_before(self, version: int) -> None:
        """Drop the record of older versions (bounded memory; they will not be requested again)."""
        self._published = {p for p in self._published if p.version >= version}

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint: published (version, index) pairs and the egress so far."""
        return {"published": [(p.version, p.index) for p in sorted(self._published)], "egress_total": self._egress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self._published = {PieceId(int(v), int(i)) for v, i in state["published"]}
        self._egress = int(state["egress_total"])


class PieceLedger:
    """Which residual pieces every client holds and which the server has published.

    The one record of piece holdings: PR-FL's byte accounting and the Flower piece server both
    keep one, and both answer a dispatch the same way. A piece's *values* belong to one model
    version (:class:`PieceId`); its *positions* depend only on the split's structure (the
    ranking and the density levels) and are tracked by piece index until the structure changes
    (:meth:`use_structure`). For a client that needs pieces ``0..j``:

    - :meth:`missing` lists the values it lacks for this version and the positions it lacks for
      this structure (piece 0, the dense suffix, has no positions: it costs 0 bytes of them);
    - :meth:`unpublished` lists the values and positions nobody has been sent yet (the server's
      egress, see :class:`Publisher`);
    - :meth:`deliver` records the delivery: the client now holds exactly this version's pieces
      ``0..j`` (older versions' values are dropped) and the positions of ``0..j``.

    A client whose device may have lost its cache (a failed task, a new node) is :meth:`forget`-ed.
    """

    def __init__(self, num_clients: int) -> None:
        self.values: list[set[PieceId]] = [set() for _ in range(num_clients)]
        self.index: list[set[int]] = [set() for _ in range(num_clients)]
        self.publisher = Publisher()
        self.published_index: set[int] = set()
        self.structure = 0  # counts structures: a client's positions are valid for one
        self.structure_key: Any = None

    def use_structure(self, key: Any) -> bool:
        """Dispatches from now on use the split structure ``key`` (e.g. (ranking id, levels));
        a new structure invalidates every client's positions. True when it changed."""
        if key == self.structure_key:
            return False
        self.structure_key = key
        self.structure += 1
        self.index = [set() for _ in self.index]
        self.published_index = set()
        return True

    def use_version(self, version: int) -> None:
        """Pieces of versions before ``version`` will not be published again: forget them."""
        self.publisher.forget_versions_before(version)

    def missing(self, client: int, needed: Iterable[PieceId]) -> tuple[list[PieceId], list[PieceId]]:
        """``(values, positions)``: the pieces of ``needed`` whose values, and whose positions,
        ``client`` lacks, ascending."""
        needed = sorted(set(needed))
        return ([p for p in needed if p not in self.values[client]],
                [p for p in needed if p.index not in self.index[client]])

    def unpublished(self, needed: Iterable[PieceId]) -> tuple[list[PieceId], list[PieceId]]:
        """``(values, positions)``: the pieces of ``needed`` whose values, and whose positions,
        have not been published yet, ascending."""
        needed = sorted(set(needed))
        return self.publisher.pending(needed), [p for p in needed if p.index not in self.published_index]

    def deliver(self, client: int, split: ResidualSplit, needed: Iterable[PieceId]) -> None:
        """``client`` was sent what it lacked of ``needed``: it now holds exactly these pieces."""
        needed = tuple(needed)
        self.publisher.publish(split, needed)
        self.values[client] = set(needed)
        self.index[client].update(p.index for p in needed)
        self.published_index.update(p.index for p in needed)

    def forget(self, client: int) -> None:
        """``client``'s device may have lost its cache: it holds nothing."""
        self.values[client] = set()
        self.index[client] = set()

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return {
            "values": [sorted(h) for h in self.values],
            "index": [sorted(h) for h in self.index],
            "publisher": self.publisher.state_dict(),
            "published_index": sorted(self.published_index),
            "structure": self.structure,
            "structure_key": self.structure_key,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.values = [set(h) for h in state["values"]]
        self.index = [set(h) for h in state["index"]]
        self.publisher.load_state_dict(state["publisher"])
        self.published_index = set(state["published_index"])
        self.structure = int(state["structure"])
        self.structure_key = state["structure_key"]


class PieceCache:
    """Client side: the pieces a client holds, keyed by :class:`PieceId`."""

    def __init__(self) -> None:
        self._pieces: dict[PieceId, Piece] = {}

    def __contains__(self, piece: object) -> bool:
        return piece in self._pieces

    def __len__(self) -> int:
        return len(self._pieces)

    def held(self) -> set[PieceId]:
        """Ids of the cached pieces."""
        return set(self._pieces)

    def missing(self, needed: Iterable[PieceId]) -> list[PieceId]:
        """The pieces of ``needed`` not cached, ascending."""
        return sorted({p for p in needed if p not in self._pieces})

    def fetch_bytes(self, needed: Iterable[PieceId], split: ResidualSplit) -> int:
        """Download bytes of the missing pieces of ``needed``."""
        return split.bytes_of(self.missing(needed))

    def store(self, piece: Piece) -> None:
        """Cache a received piece (replacing one with the same id)."""
        self._pieces[piece.id] = piece

    def drop_versions_before(self, version: int) -> int:
        """Evict pieces of versions older than ``version``; return how many were dropped."""
        old = [p for p in self._pieces if p.version < version]
        for p in old:
            del self._pieces[p]
        return len(old)

    def nbytes(self) -> int:
        """Memory held by the cached indices and values."""
        return sum(
            p.indices.numel() * p.indices.element_size() + p.values.numel() * p.values.element_size()
            for p in self._pieces.values()
        )

    def rebuild(self, needed: Iterable[PieceId], split: ResidualSplit) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights, prunable mask)`` of the sub-model made of the cached pieces ``needed``."""
        ids = sorted(set(needed))
        absent = [str(p) for p in ids if p not in self._pieces]
        if absent:
            raise KeyError(f"pieces not cached: {', '.join(absent)}; fetch them before rebuilding")
        return split.assemble(self._pieces[p] for p in ids)
