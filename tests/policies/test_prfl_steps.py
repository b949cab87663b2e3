"""PR-FL's server steps under the simulator's reference accounting (ctx.step_timing), by hand."""

import pytest
import torch

from prfl.client.result import TaskResult
from prfl.policies import build_policy
from prfl.policies.base import Dispatch, PolicyContext, ResultArrived, SetTimer, Start, StepTiming, TimerFired
from prfl.policies.prfl import WINDOW_TIMER

W0 = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 0.5])  # 4 prunable weights (one layer) + 2 biases


def ctx(num_samples=(1, 3), **kw):
    return PolicyContext(
        num_clients=len(num_samples), num_samples=tuple(num_samples), initial_weights=W0.clone(), num_prunable=4,
        layer_bounds=((0, 4),), **kw,
    )


def dispatches(actions):
    return {a.task.client: a.task for a in actions if isinstance(a, Dispatch)}


def result(task, weights, n):
    return TaskResult(task_id=task.task_id, client=task.client, version=task.version,
                      weights=torch.tensor(weights, dtype=torch.float32), num_samples=n, mean_loss=0.0, steps=1,
                      compute_seconds=0.0, density=task.density)


# ---------------------------------------------------------------------------- reference step closing
def test_reference_steps_close_at_max_window_or_largest_download_over_uplink_by_hand():
    # Under the simulator's reference accounting a step that starts at t closes at
    # t + max(window, D_max / server_up + 0.1). Here client c's download counts 1,000 (c + 1) B
    # and the server's uplink 1,000 B/s; window 0.5.
    timing = StepTiming(server_up_bps=1_000.0, download_bytes=lambda task: 1_000 * (task.client + 1))
    pol = build_policy("prfl", ctx(step_timing=timing), window=0.5, interval=1000, recovery=False, importance=False,
                       initial_densities=1.0)
    tasks = dispatches(pol.on_event(Start(0.0)))
    # Step 1 sends both clients a model: D_max = 2,000 B -> max(0.5, 2 + 0.1) = 2.1 s, so the
    # window of a result arriving at 1.0 closes at 2.1 (not 1.0 + 0.5)
    acts = pol.on_event(ResultArrived(1.0, result(tasks[0], [2, 2, 2, 2, 1, 1], 1)))
    assert acts == [SetTimer(pytest.approx(2.1), WINDOW_TIMER)]
    assert pol.on_event(ResultArrived(2.0, result(tasks[1], [4, 4, 4, 4, 3, 3], 3))) == []
    acts = pol.on_event(TimerFired(2.1, WINDOW_TIMER))
    assert pol.version == 1 and set(dispatches(acts)) == {0, 1}
    tasks = dispatches(acts)
    # Step 2 (from 2.1) again sends 2,000 B at most: it closes at 4.2; later steps that send
    # nothing last max(0.5, 0.1) = 0.5 s: boundaries 4.7, 5.2, ... A result at 5.0 waits for 5.2.
    acts = pol.on_event(ResultArrived(5.0, result(tasks[0], [2, 2, 2, 2, 1, 1], 1)))
    assert acts == [SetTimer(pytest.approx(5.2), WINDOW_TIMER)]
    acts = pol.on_event(TimerFired(5.2, WINDOW_TIMER))
    assert pol.version == 2 and set(dispatches(acts)) == {0}
    # Step 3 (from 5.2) sent only client 0's 1,000 B: max(0.5, 1 + 0.1) = 1.1 -> closes at 6.3;
    # a result arriving right at that boundary is aggregated there
    acts = pol.on_event(ResultArrived(6.3, result(tasks[1], [4, 4, 4, 4, 3, 3], 3)))
    assert acts == [SetTimer(pytest.approx(6.3), WINDOW_TIMER)]


def test_without_step_timing_a_window_opens_at_its_first_arrival():
    pol = build_policy("prfl", ctx(), window=0.5, interval=1000, recovery=False, importance=False)
    tasks = dispatches(pol.on_event(Start(0.0)))
    acts = pol.on_event(ResultArrived(1.0, result(tasks[0], [2, 2, 2, 2, 1, 1], 1)))
    assert acts == [SetTimer(1.5, WINDOW_TIMER)]


def test_reference_steps_with_window_zero_still_wait_for_the_download_time():
    timing = StepTiming(server_up_bps=100.0, download_bytes=lambda task: 88)
    pol = build_policy("prfl", ctx(step_timing=timing), window=0.0, interval=1000, recovery=False, importance=False)
    tasks = dispatches(pol.on_event(Start(0.0)))
    # 88 B / 100 B/s + 0.1 = 0.98 s: the arrival at 0.3 is not aggregated at once
    acts = pol.on_event(ResultArrived(0.3, result(tasks[0], [2, 2, 2, 2, 1, 1], 1)))
    assert acts == [SetTimer(pytest.approx(0.98), WINDOW_TIMER)] and pol.version == 0
