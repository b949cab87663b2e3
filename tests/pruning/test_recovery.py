import pytest

from prfl.pruning.recovery import EarlyStopping


def test_fires_after_patience_bad_checks_and_resets():
    es = EarlyStopping(patience=3)
    seq = [0.5, 0.6, 0.55, 0.6, 0.59, 0.7, 0.1, 0.1, 0.1]
    out = [es.check(s, r) for r, s in enumerate(seq)]
    assert [o[0] for o in out] == [True, True, False, False, False, True, False, False, False]
    # 0.6 again is not an improvement: bad checks at rounds 2, 3, 4 -> fires at 4; again at 8
    assert [o[1] for o in out] == [False, False, False, False, True, False, False, False, True]
    assert es.best == 0.7 and es.best_round == 5


def test_state_round_trip():
    es = EarlyStopping(patience=2)
    es.check(0.3, 0)
    es.check(0.2, 1)
    other = EarlyStopping(patience=9)
    other.load_state_dict(es.state_dict())
    assert other.check(0.1, 2) == (False, True)
    with pytest.raises(ValueError):
        EarlyStopping(patience=0)
