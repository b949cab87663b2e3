import pytest

from prfl.pruning.density import DensityController


def test_rule_a_on_scripted_round_times():
    dc = DensityController(4, interval=3, rule="A", global_min=0.1)
    for t in (2.0, 2.0):
        dc.observe(0, t)
    for t in (4.0, 6.0):
        dc.observe(1, t)
    dc.observe(2, 40.0)  # 2/40 = 0.05, below the global minimum
    # client 3 never reported: keeps its density
    assert dc.update() == pytest.approx([1.0, 0.4, 0.1, 1.0])
    # the FIFO keeps only the last `interval` times: client 1 -> (6, 1, 1) mean 8/3
    for t in (1.0, 1.0):
        dc.observe(1, t)
    assert dc.mean_times()[1] == pytest.approx(8 / 3)
    assert dc.update()[1] == pytest.approx(2.0 / (8 / 3))


def test_rule_b_on_scripted_round_times():
    dc = DensityController(4, interval=5, rule="B", global_min=0.1, initial=[1.0, 0.6, 0.3, 0.2])
    dc.observe(0, 2.0)
    dc.observe(1, 2.5)  # rate 0.2 -> 0.6 * (1 - 0.18) = 0.492 -> 0.49
    dc.observe(2, 5.0)  # rate 0.6 -> 0.3 * (1 - 0.54) = 0.138 -> 0.14
    dc.observe(3, 2.1)  # rate 0.0476 inside the 5% dead band -> unchanged
    assert dc.update() == [1.0, 0.49, 0.14, 0.2]
    dc.observe(2, 95.0)  # mean 50 -> rate 0.96 -> 0.14 * 0.136 -> 0.02 -> floor 0.1
    assert dc.update()[2] == 0.1


def test_recovery_raises_minimums_and_caps_at_one():
    dc = DensityController(2, rule="A", global_min=0.1)
    dc.observe(0, 1.0)
    dc.observe(1, 10.0)
    dc.update()
    assert dc.densities == [1.0, 0.1]
    dc.raise_minimum(None, 0.2)
    assert dc.minimums == [pytest.approx(0.3)] * 2 and dc.densities[1] == pytest.approx(0.3)
    dc.update()
    assert dc.densities[1] == pytest.approx(0.3)  # rule A never goes below the raised minimum
    for _ in range(5):
        dc.raise_minimum(1, 0.2)
    assert dc.minimums[1] == 1.0 and dc.densities == [1.0, 1.0]
    assert not dc.all_dense
    dc.raise_minimum(0, 0.9)
    assert dc.all_dense


def test_a_client_recovery_of_the_density_itself_caps_at_one_and_keeps_to_the_grid():
    dc = DensityController(3, rule="B", global_min=0.1, initial=[1.0, 0.45, 0.9])
    dc.raise_density(1, 0.2)
    dc.raise_density(2, 0.2)
    assert dc.densities == [1.0, pytest.approx(0.65), 1.0] and dc.minimums == [0.1] * 3  # the minimum stays
    grid = DensityController(2, rule="B", global_min=0.1, initial=[1.0, 0.3], step=0.25)
    assert grid.densities == [1.0, 0.3]
    grid.raise_density(1, 0.2)  # 0.5 lies on the grid of 0.25
    assert grid.densities[1] == pytest.approx(0.5)
    grid.raise_density(1, 0.2)  # 0.7 rounds up to 0.75: a recovery always raises the density
    assert grid.densities[1] == pytest.approx(0.75)
    grid.raise_density(1, 0.2)  # 0.95 -> 1.0
    assert grid.densities[1] == 1.0


def test_state_round_trip_and_errors():
    dc = DensityController(2, interval=2)
    dc.observe(0, 1.0)
    dc.observe(1, 3.0)
    dc.update()
    other = DensityController(2, interval=2)
    other.load_state_dict(dc.state_dict())
    assert other.densities == dc.densities and other.mean_times() == dc.mean_times()
    with pytest.raises(ValueError, match="rule"):
        DensityController(2, rule="C")
    with pytest.raises(ValueError, match="initial densities"):
        DensityController(2, initial=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        dc.observe(0, -1.0)


def test_dense_time_basis_steps_towards_equal_round_times():
    # client 1 took 8 s at density 0.25: its dense-equivalent round is 32 s, the fastest 4 s,
    # so rule A gives 4 / 32 = 0.125 (observed basis: 4 / 8 = 0.5)
    dense = DensityController(2, rule="A", global_min=0.1)
    observed = DensityController(2, rule="A", global_min=0.1, time_basis="observed")
    for dc in (dense, observed):
        dc.observe(0, 4.0, 1.0)
        dc.observe(1, 8.0, 0.25)
    assert dense.update() == pytest.approx([1.0, 0.125])
    assert observed.update() == pytest.approx([1.0, 0.5])
    with pytest.raises(ValueError, match="density"):
        dense.observe(0, 1.0, 0.0)


def test_density_step_rounds_rule_a_down_to_shared_levels():
    # mean times 2, 3, 7, 2.1 (dense basis, observed at density 1): rule A gives 1, 2/3, 2/7, 2/2.1
    dc = DensityController(4, interval=5, rule="A", global_min=0.1, step=0.25)
    for c, t in enumerate((2.0, 3.0, 7.0, 2.1)):
        dc.observe(c, t)
    # 1 -> 1; 0.667 -> 0.5; 0.286 -> 0.25; 0.952 -> 0.75 (never above what rule A allows)
    assert dc.update() == [1.0, 0.5, 0.25, 0.75]
    dc = DensityController(2, interval=5, rule="A", global_min=0.1, step=0.25)
    dc.observe(0, 1.0)
    dc.observe(1, 20.0)  # 0.05 -> 0.0 on the grid -> the global minimum 0.1
    assert dc.update() == [1.0, 0.1]
    with pytest.raises(ValueError, match="density step"):
        DensityController(2, step=0.0)


@pytest.mark.parametrize(("step_floor", "density", "clamped"), [(None, 0.1, [2]), (0.1, 0.14, []), (0.01, 0.1, [2])])
def test_a_rule_b_step_below_the_step_floor_is_not_taken_and_one_below_the_minimum_is_clamped(step_floor, density,
                                                                                                 clamped):
    dc = DensityController(3, interval=5, rule="B", global_min=0.1, initial=[1.0, 0.6, 0.14], step_floor=step_floor)
    dc.observe(0, 2.0)
    dc.observe(1, 2.5)  # 0.49, above every minimum
    dc.observe(2, 50.0)  # rate 0.96 -> 0.14 * 0.136 -> 0.02, below the global minimum 0.1
    assert dc.update() == pytest.approx([1.0, 0.49, density]) and dc.clamped == clamped


def test_a_step_above_the_floor_below_a_raised_minimum_is_clamped():
    for step_floor in (None, 0.1):
        dc = DensityController(2, interval=5, rule="B", global_min=0.1, initial=[1.0, 0.6], step_floor=step_floor)
        dc.raise_minimum(None, 0.4)  # minimums 0.5
        dc.observe(0, 2.0)
        dc.observe(1, 2.5)  # 0.6 * 0.82 -> 0.49: above 0.1, below 0.5
        assert dc.update() == pytest.approx([1.0, 0.5]) and dc.clamped == [1]
        dc.observe(1, 2.0)  # client 1 mean 2.25 against the anchor's 1.5: rate 1/3, 0.5 * 0.7 -> 0.35
        dc.observe(0, 1.0)
        dc.update()
        assert dc.clamped == [1]
        dc.observe(1, 1.0)
        dc.observe(1, 1.0)
        dc.observe(1, 1.0)  # client 1 mean 1.5, the anchor's too: no step, so nothing clamped
        dc.update()
        assert dc.clamped == [] and dc.densities == pytest.approx([1.0, 0.5])


def test_the_minimums_follow_the_lowest_density_only_upwards_and_by_more_than_the_margin():
    dc = DensityController(3, rule="B", global_min=0.1, initial=[1.0, 0.6, 0.11])
    assert not dc.lift_minimums() and dc.minimums == [0.1] * 3  # 0.11 is not more than 0.01 above 0.1
    dc.densities = [1.0, 0.6, 0.3]
    assert dc.lift_minimums() and dc.minimums == [0.3] * 3
    dc.raise_minimum(0, 0.5)  # one client's minimum above the lowest density stays where it is
    dc.densities[2] = 0.45
    assert dc.lift_minimums() and dc.minimums == pytest.approx([0.8, 0.45, 0.45])
    dc.densities[2] = 0.2  # a lower density never lowers them
    assert not dc.lift_minimums() and dc.minimums == pytest.approx([0.8, 0.45, 0.45])
    with pytest.raises(ValueError, match="step floor must lie in"):
        DensityController(2, step_floor=1.5)
