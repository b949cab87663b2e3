"""Importance scores from the clients' squared gradients, checked against hand-computed numbers."""

import pytest
import torch

from prfl.pruning.importance import ImportanceScores, normalise_report

BOUNDS = ((0, 3), (3, 6))
W = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0])


def test_reports_are_min_max_normalised_over_the_whole_vector():
    assert torch.allclose(normalise_report(torch.tensor([4.0, 2.0, 0.0, 1.0])), torch.tensor([1.0, 0.5, 0.0, 0.25]))
    # a kept-weights report: the zeros of pruned weights take part in the minimum
    assert torch.allclose(normalise_report(torch.tensor([0.0, 3.0, 5.0])), torch.tensor([0.0, 0.6, 1.0]))
    assert torch.equal(normalise_report(torch.full((3,), 2.0)), torch.zeros(3))  # constant: no information


def test_holder_average_fills_unscored_weights_with_g_min_times_magnitude():
    s = ImportanceScores(6, BOUNDS, "holders")
    s.add(torch.tensor([4.0, 2.0, 0.0, 1.0, 3.0, 0.0]))  # -> [1, .5, 0, .25, .75, 0]
    s.add(torch.tensor([2.0, 0.0, 0.0, 8.0, 0.0, 0.0]))  # -> [.25, 0, 0, 1, 0, 0]
    scores = s.take(W)
    # holders [2, 1, 0, 2, 1, 0]: means [.625, .5, -, .625, .75, -]; g_min is .5 in layer 0 and
    # .625 in layer 1, so weight 2 gets .5 * |3| = 1.5 and weight 5 gets .625 * |-6| = 3.75
    assert torch.allclose(scores, torch.tensor([0.625, 0.5, 1.5, 0.625, 0.75, 3.75]))
    assert not s.pending
    # next interval: only weight 4 is reported; the others keep their scores
    s.add(torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, 0.0]))
    assert torch.allclose(s.take(W), torch.tensor([0.625, 0.5, 1.5, 0.625, 1.0, 3.75]))


def test_a_layer_nobody_reported_takes_the_smallest_g_min_of_the_others():
    s = ImportanceScores(6, BOUNDS, "holders")
    s.add(torch.tensor([4.0, 2.0, 0.0, 0.0, 0.0, 0.0]))  # -> [1, .5, 0, 0, 0, 0]
    scores = s.take(W)
    assert torch.allclose(scores, torch.tensor([1.0, 0.5, 0.5 * 3, 0.5 * 4, 0.5 * 5, 0.5 * 6]))


def test_the_all_rule_is_the_plain_mean_of_the_interval():
    s = ImportanceScores(6, BOUNDS, "all")
    s.add(torch.tensor([4.0, 2.0, 0.0, 1.0, 3.0, 0.0]))
    s.add(torch.tensor([2.0, 0.0, 0.0, 8.0, 0.0, 0.0]))
    assert torch.allclose(s.take(W), torch.tensor([0.625, 0.25, 0.0, 0.625, 0.375, 0.0]))
    s.add(torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, 0.0]))
    assert torch.allclose(s.take(W), torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0]))  # nothing persists


def test_no_report_no_scores_and_bad_reports_are_named():
    s = ImportanceScores(6, BOUNDS)
    assert s.take(W) is None
    with pytest.raises(ValueError, match="6 prunable weights"):
        s.add(torch.ones(5))
    with pytest.raises(ValueError, match="importance_average"):
        ImportanceScores(6, BOUNDS, "median")


def test_state_round_trip():
    s = ImportanceScores(6, BOUNDS)
    s.add(torch.tensor([4.0, 2.0, 0.0, 1.0, 3.0, 0.0]))
    s.take(W)
    s.add(torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0, 0.0]))
    t = ImportanceScores(6, BOUNDS)
    t.load_state_dict(s.state_dict())
    assert torch.equal(t.take(W), s.take(W))


@pytest.mark.parametrize("average", ["holders", "all"])
def test_a_report_given_at_its_kept_positions_adds_what_the_whole_vector_adds(average):
    """add_kept(values, positions) == add(vector that is values there, 0 elsewhere), bit for bit,
    including zeros among the kept values and a report that keeps every weight."""
    n = 5000
    g = torch.Generator().manual_seed(4)
    whole, kept = ImportanceScores(n, ((0, 2000), (2000, n)), average), ImportanceScores(n, ((0, 2000), (2000, n)), average)
    for k, density in enumerate((0.3, 0.1, 1.0, 0.5)):
        positions = torch.randperm(n, generator=g)[: int(density * n)].sort().values
        values = torch.rand(positions.numel(), generator=g) ** 3
        values[:: 17] = 0.0  # a kept weight with no gradient
        full = torch.zeros(n)
        full[positions] = values
        whole.add(full)
        kept.add_kept(values, positions)
        assert torch.equal(kept.total.view(torch.int32), whole.total.view(torch.int32)), k
        if average == "holders":
            assert torch.equal(kept.holders, whole.holders), k
    assert kept.reports == whole.reports == 4
    assert torch.equal(kept.take(W.repeat(n // 6 + 1)[:n]), whole.take(W.repeat(n // 6 + 1)[:n]))
