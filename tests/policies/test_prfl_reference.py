"""PR-FL's reference rules on scripted events, against hand-computed numbers: preset initial
densities by speed, kept-weight importance with the holder average, counting in the fastest
client's rounds, inter-arrival round times against an anchor client, the layer cost in the
ranking, and recovery that arms, then rolls back."""

import pytest
import torch

from prfl.client.result import TaskResult
from prfl.policies import build_policy
from prfl.policies.base import (
    Dispatch, EvaluationDone, PolicyContext, Record, RequestEvaluation, ResultArrived, Start, TimerFired,
)
from prfl.policies.prfl import CLIENT_SCORE, SERVER_SCORE, WINDOW_TIMER, preset_densities

W0 = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 0.5])  # 4 prunable weights + 2 biases


def ctx(num_samples=(1, 1), bounds=((0, 4),), **kw):
    return PolicyContext(num_clients=len(num_samples), num_samples=tuple(num_samples), initial_weights=W0.clone(),
                         num_prunable=4, layer_bounds=bounds, **kw)


def dispatches(actions):
    return {a.task.client: a.task for a in actions if isinstance(a, Dispatch)}


def records(actions, kind):
    return [a.data for a in actions if isinstance(a, Record) and a.kind == kind]


def result(task, weights, grad_sq=None, n=1):
    return TaskResult(task_id=task.task_id, client=task.client, version=task.version,
                      weights=torch.tensor(weights, dtype=torch.float32), num_samples=n, mean_loss=0.0, steps=1,
                      compute_seconds=0.0, density=task.density,
                      grad_sq=None if grad_sq is None else torch.tensor(grad_sq, dtype=torch.float32))


# ---------------------------------------------------------------- initial densities
def test_preset_densities_follow_the_fleet_by_nominal_speed():
    paper = (1.0, 1.0, 0.6, 0.6, 0.3, 0.3, 0.1, 0.1, 0.1, 0.1)
    assert preset_densities([float(c) for c in range(10)]) == paper
    # 4 clients with round times 9, 30, 5, 20 s: ranks 1, 3, 0, 2 take entries 2, 7, 0, 5
    assert preset_densities([9.0, 30.0, 5.0, 20.0]) == (0.6, 0.1, 1.0, 0.3)
    # 20 clients: each entry twice
    assert preset_densities([float(c) for c in range(20)]) == tuple(d for d in paper for _ in range(2))
    # equally fast clients start equally dense: the density of the best rank among them
    assert preset_densities([3.0, 1.0, 3.0, 3.0]) == (0.6, 1.0, 0.6, 0.6)
    assert preset_densities([2.0] * 7) == (1.0,) * 7


def test_the_policy_starts_from_the_preset_and_anchors_rule_b_on_the_fastest_client():
    pol = build_policy("prfl", ctx((1, 1, 1, 1), nominal_round_times=(9.0, 30.0, 5.0, 20.0)))
    assert pol.densities == [0.6, 0.1, 1.0, 0.3]
    assert pol.control.anchor == 2
    tasks = dispatches(pol.on_event(Start(0.0)))
    assert tasks[2].mask is None and tasks[1].density == 0.1 and int(tasks[1].mask.sum()) == 1
    # without nominal times, client order is speed order
    assert build_policy("prfl", ctx((1, 1, 1, 1))).densities == [1.0, 0.6, 0.3, 0.1]


# ---------------------------------------------------------------- importance
def test_kept_weight_importance_is_uploaded_once_per_interval_and_averaged_over_holders():
    # densities (1, 0.5); magnitude ranking of [1, 2, 3, 4] is [3, 2, 1, 0], so client 1 keeps {2, 3}
    pol = build_policy("prfl", ctx(), window=0.5, interval=1, recovery=False, initial_densities=(1.0, 0.5))
    tasks = dispatches(pol.on_event(Start(0.0)))
    # values of the kept weights and biases, plus one float32 score per kept prunable weight
    assert tasks[1].upload_bytes == 4 * (2 + 2) + 4 * 2 and tasks[1].upload_importance_bytes == 8
    assert tasks[0].upload_bytes == 4 * 6 + 4 * 4 and tasks[0].upload_importance_bytes == 16
    assert tasks[1].importance_scope == "kept"
    pol.on_event(ResultArrived(1.0, result(tasks[0], [1, 2, 3, 4, 0.5, 0.5], [4, 0, 2, 1])))  # -> [1, 0, .5, .25]
    # client 1's gradient outside its mask is discarded: [0, 0, 2, 6] -> [0, 0, 1/3, 1]
    pol.on_event(ResultArrived(1.2, result(tasks[1], [0, 0, 3, 4, 0.5, 0.5], [5, 5, 2, 6])))
    acts = pol.on_event(TimerFired(1.5, WINDOW_TIMER))
    assert records(acts, "ranking")
    assert torch.equal(pol.weights, W0)  # both clients returned the server's values
    # holders [1, 0, 2, 2]: means [1, -, 5/12, 5/8]; weight 1 is filled with g_min |w_1| = 5/12 * 2.
    # The 5% floor keeps weight 3 (largest magnitude) first; then by score: 0, 1, 3, 2
    assert torch.allclose(pol.scores.scores, torch.tensor([1.0, 5 / 6, 5 / 12, 5 / 8]))
    assert pol.ranking.order.tolist() == [3, 0, 1, 2]
    assert pol.mask_for(0.5).tolist() == [True, False, False, True]
    # a new interval has begun: each client is asked again, the next task of each only once
    again = dispatches(acts)
    assert again[0].want_importance and again[1].want_importance


def test_the_layer_cost_divides_the_scores_before_ranking():
    kw = dict(window=0.0, interval=1, recovery=False, initial_densities=1.0, floor=0.0)
    cheap_first = ctx(bounds=((0, 2), (2, 4)), layer_cost=(1.0, 10.0))
    orders = {}
    for name, c in (("cost", cheap_first), ("none", ctx(bounds=((0, 2), (2, 4))))):
        pol = build_policy("prfl", c, **kw)
        tasks = dispatches(pol.on_event(Start(0.0)))
        pol.on_event(ResultArrived(1.0, result(tasks[0], [1, 2, 3, 4, 0.5, 0.5], [2, 3, 4, 5])))
        orders[name] = pol.ranking.order.tolist()
    # reports [0, 1/3, 2/3, 1]; weight 0 unscored: g_min of its layer (1/3) * |1|. Divided by the
    # costs (1, 1, 10, 10): [1/3, 1/3, 1/15, 1/10] -> 0, 1, 3, 2; undivided: 3, 2, then 0, 1
    assert orders == {"cost": [0, 1, 3, 2], "none": [3, 2, 0, 1]}
    off = build_policy("prfl", cheap_first, layer_cost=False, **kw)
    tasks = dispatches(off.on_event(Start(0.0)))
    off.on_event(ResultArrived(1.0, result(tasks[0], [1, 2, 3, 4, 0.5, 0.5], [2, 3, 4, 5])))
    assert off.ranking.order.tolist() == [3, 2, 0, 1]


# ---------------------------------------------------------------- counting and round times
def _control_steps(actions):
    return [a for a in actions if isinstance(a, RequestEvaluation) and a.tag == SERVER_SCORE]


@pytest.mark.parametrize("counting", ["fastest_client", "server_steps"])
def test_the_interval_counts_the_fastest_clients_rounds_or_server_steps(counting):
    pol = build_policy("prfl", ctx(), window=0.0, interval=2, importance=False, initial_densities=1.0,
                       client_scores=False, counting=counting)
    tasks = dispatches(pol.on_event(Start(0.0)))
    acts = pol.on_event(ResultArrived(1.0, result(tasks[0], [1, 2, 3, 4, 0.5, 0.5])))
    t0 = dispatches(acts)[0]
    steps = [len(_control_steps(acts))]
    acts = pol.on_event(ResultArrived(1.5, result(tasks[1], [1, 2, 3, 4, 0.5, 0.5])))  # server step 2
    steps.append(len(_control_steps(acts)))
    acts = pol.on_event(ResultArrived(2.0, result(t0, [1, 2, 3, 4, 0.5, 0.5])))  # client 0's 2nd round
    steps.append(len(_control_steps(acts)))
    assert steps == ([0, 0, 1] if counting == "fastest_client" else [0, 1, 0])


@pytest.mark.parametrize(("round_time", "expected"), [("inter_arrival", [1.0, 2.0]), ("task", [1.0, 1.5])])
def test_round_times_are_inter_arrival_times_or_task_times(round_time, expected):
    pol = build_policy("prfl", ctx((1,)), window=0.5, interval=1000, importance=False, recovery=False,
                       initial_densities=1.0, round_time=round_time)
    task = dispatches(pol.on_event(Start(0.0)))[0]
    pol.on_event(ResultArrived(1.0, result(task, [1, 2, 3, 4, 0.5, 0.5])))
    task = dispatches(pol.on_event(TimerFired(1.5, WINDOW_TIMER)))[0]  # redispatched when the window closes
    pol.on_event(ResultArrived(3.0, result(task, [1, 2, 3, 4, 0.5, 0.5])))
    assert list(pol.control.queues[0]) == expected


def test_rule_b_steps_each_density_towards_the_anchors_round_time():
    pol = build_policy("prfl", ctx(nominal_round_times=(1.0, 5.0)), window=0.0, interval=2, importance=False,
                       recovery=False, initial_densities=(1.0, 0.5))
    assert pol.control.anchor == 0
    tasks = dispatches(pol.on_event(Start(0.0)))
    t0 = dispatches(pol.on_event(ResultArrived(2.0, result(tasks[0], [1, 2, 3, 4, 0.5, 0.5]))))[0]
    pol.on_event(ResultArrived(3.0, result(tasks[1], [0, 0, 3, 4, 0.5, 0.5])))
    acts = pol.on_event(ResultArrived(4.0, result(t0, [1, 2, 3, 4, 0.5, 0.5])))
    # anchor mean (2 + 2) / 2 = 2; client 1: 3, rate (3 - 2) / 3, rho = round(0.5 (1 - 0.9 / 3), 2)
    (rec,) = records(acts, "densities")
    assert rec["density"] == [1.0, 0.35] and pol.densities == [1.0, 0.35]


# ---------------------------------------------------------------- recovery
def test_recovery_arms_first_then_rolls_back_and_raises_every_minimum():
    pol = build_policy("prfl", ctx(), window=0.0, interval=1000, importance=False, patience=1, delta_rho=0.2,
                       initial_densities=(1.0, 0.1), client_scores=False)
    tasks = dispatches(pol.on_event(Start(0.0)))
    assert pol.on_event(EvaluationDone(0.0, SERVER_SCORE, 0.5, 1.0)) == []  # best so far
    acts = pol.on_event(ResultArrived(1.0, result(tasks[0], [9, 9, 9, 9, 9, 9])))
    t0, moved = dispatches(acts)[0], pol.weights
    acts = pol.on_event(EvaluationDone(1.0, SERVER_SCORE, 0.4, 1.0))  # first run-out: armed only, state saved
    assert [r["scope"] for r in records(acts, "recovery")] == ["armed"]
    assert torch.equal(pol.weights, moved) and pol.control.minimums == [0.1, 0.1] and pol.first_stage
    assert pol.on_event(EvaluationDone(1.5, SERVER_SCORE, 0.6, 1.0)) == []  # an improvement saves the state again
    t1 = dispatches(pol.on_event(ResultArrived(2.0, result(tasks[1], [0, 0, 0, 4, 0.5, 0.5]))))[1]  # joins the buffer
    assert pol.buffer.clients() == [0, 1] and not torch.equal(pol.weights, moved)
    acts = pol.on_event(EvaluationDone(2.0, SERVER_SCORE, 0.3, 1.0))  # second: roll back and raise
    (rec,) = records(acts, "recovery")
    assert rec["scope"] == "server" and rec["min_density"] == pytest.approx([0.3, 0.3]) and rec["buffer_restored"]
    assert rec["density"] == pytest.approx([1.0, 0.3]) and rec["best_score"] == 0.6
    # the weights and the buffer are those of the last improvement: client 1's model has left the
    # buffer, so the next aggregation does not bring it back
    assert torch.equal(pol.weights, moved) and pol.buffer.clients() == [0] and not pol.first_stage
    pol.on_event(ResultArrived(3.0, result(t0, [7, 7, 7, 7, 7, 7])))
    assert torch.equal(pol.weights, torch.full((6,), 7.0))
    # the next dispatch to client 1 carries the raised density
    nxt = dispatches(pol.on_event(ResultArrived(4.0, result(t1, [0, 0, 0, 5, 0.5, 0.5]))))
    assert t1.density == pytest.approx(0.1) and nxt[1].density == pytest.approx(0.3)


@pytest.mark.parametrize("server_score", ["plain", "staleness"])
def test_the_server_monitor_scores_an_n_or_staleness_weighted_buffer_average(server_score):
    pol = build_policy("prfl", ctx((1, 3)), window=0.0, interval=2, importance=False, initial_densities=1.0,
                       client_scores=False, patience=1, recovery_arming=False, delta_rho=1.0,
                       server_score=server_score)
    tasks = dispatches(pol.on_event(Start(0.0)))
    a, b = [1.0, 2.0, 3.0, 4.0, 0.5, 0.5], [0.0, 6.0, 0.0, 2.0, 1.5, -0.5]
    t1 = tasks[1]
    for t in (1.0, 1.5):  # client 1's first two rounds: versions 1, 2 and a control step
        t1 = dispatches(pol.on_event(ResultArrived(t, result(t1, b, n=3))))[1]
    pol.on_event(ResultArrived(2.0, result(tasks[0], a, n=1)))  # sent at version 0, arrives at 2: s = 3^-0.6
    t1 = dispatches(pol.on_event(ResultArrived(2.5, result(t1, b, n=3))))[1]  # client 1's 3rd round
    assert pol.version == 4 and t1.version == 4
    acts = pol.on_event(ResultArrived(3.0, result(t1, b, n=3)))  # 4th: s = 1, a control step
    (req,), t1 = _control_steps(acts), dispatches(acts)[1]
    c0 = 3.0**-0.6 if server_score == "staleness" else 1.0
    plain = (torch.tensor(a) + 3.0 * torch.tensor(b)) / 4.0
    assert torch.allclose(req.model(), (c0 * torch.tensor(a) + 3.0 * torch.tensor(b)) / (c0 + 3.0), atol=1e-6)
    # a recovery that brings every minimum density to 1 opens the final phase, where the
    # reference scores the server model itself
    pol.on_event(EvaluationDone(2.0, SERVER_SCORE, 0.5, 1.0))
    (rec,) = records(pol.on_event(EvaluationDone(2.0, SERVER_SCORE, 0.4, 1.0)), "recovery")
    assert rec["final_phase"] and pol.control.all_dense
    t1 = dispatches(pol.on_event(ResultArrived(3.5, result(t1, b, n=3))))[1]
    (req,) = _control_steps(pol.on_event(ResultArrived(4.0, result(t1, b, n=3))))  # the next control step
    if server_score == "staleness":
        assert torch.equal(req.model(), pol.weights)
    else:
        assert torch.allclose(req.model(), plain, atol=1e-6) and not torch.allclose(req.model(), pol.weights)


def test_server_score_must_be_plain_or_staleness():
    with pytest.raises(ValueError, match="server_score must be 'plain' or 'staleness'"):
        build_policy("prfl", ctx(), server_score="weighted")


def test_density_rule_stops_after_the_first_recovery_unless_asked_to_adapt():
    for adapt in (False, True):
        pol = build_policy("prfl", ctx(nominal_round_times=(1.0, 5.0)), window=0.0, interval=2, importance=False,
                           patience=1, recovery_arming=False, client_scores=False, initial_densities=(1.0, 0.5),
                           adapt_after_recovery=adapt)
        tasks = dispatches(pol.on_event(Start(0.0)))
        pol.on_event(EvaluationDone(0.0, SERVER_SCORE, 0.5, 1.0))
        pol.on_event(EvaluationDone(0.0, SERVER_SCORE, 0.4, 1.0))  # recovery: minimums 0.3
        t0 = dispatches(pol.on_event(ResultArrived(2.0, result(tasks[0], [1, 2, 3, 4, 0.5, 0.5]))))[0]
        pol.on_event(ResultArrived(3.0, result(tasks[1], [0, 0, 3, 4, 0.5, 0.5])))
        pol.on_event(ResultArrived(4.0, result(t0, [1, 2, 3, 4, 0.5, 0.5])))
        # adapting: 0.5 * 0.7 = 0.35 >= the minimum 0.3; frozen: stays at 0.5
        assert pol.densities == ([1.0, 0.35] if adapt else [1.0, 0.5])


def test_client_monitors_raise_a_stalled_clients_minimum():
    pol = build_policy("prfl", ctx(), window=0.0, interval=1, importance=False, patience=1,
                       initial_densities=(1.0, 0.1))
    tasks = dispatches(pol.on_event(Start(0.0)))
    acts = pol.on_event(ResultArrived(1.0, result(tasks[1], [0, 0, 0, 4, 0.5, 0.5])))
    tags = sorted(a.tag for a in acts if isinstance(a, RequestEvaluation))
    assert tags == [f"{CLIENT_SCORE}1", SERVER_SCORE]  # the server score and each buffered client's
    assert pol.on_event(EvaluationDone(1.0, f"{CLIENT_SCORE}1", 0.6, 1.0)) == []
    acts = pol.on_event(EvaluationDone(2.0, f"{CLIENT_SCORE}1", 0.5, 1.0))
    (rec,) = records(acts, "recovery")
    assert rec["scope"] == "client" and rec["client"] == 1 and rec["min_density"] == pytest.approx(0.3)
    assert pol.densities == pytest.approx([1.0, 0.3]) and pol.control.minimums == pytest.approx([0.1, 0.3])


def _client_checks(actions):
    return sorted(int(a.tag[len(CLIENT_SCORE):]) for a in actions
                  if isinstance(a, RequestEvaluation) and a.tag.startswith(CLIENT_SCORE))


def test_a_client_that_sent_nothing_new_since_its_last_check_is_not_checked():
    # counting in server steps with interval 1: a control step at every arrival of client 0,
    # while client 1 is away; client 1's monitor sees its model once, not once per step
    pol = build_policy("prfl", ctx(), window=0.0, interval=1, counting="server_steps", importance=False,
                       initial_densities=(1.0, 0.5), patience=2)
    tasks = dispatches(pol.on_event(Start(0.0)))
    acts = pol.on_event(ResultArrived(1.0, result(tasks[1], [0, 0, 3, 4, 0.5, 0.5])))
    assert _client_checks(acts) == [1]
    t0, t1, checks = tasks[0], dispatches(acts)[1], []
    for k in range(4):
        acts = pol.on_event(ResultArrived(2.0 + k, result(t0, [1, 2, 3, 4, 0.5, 0.5])))
        checks.append(_client_checks(acts))
        t0 = dispatches(acts)[0]
        for c in _client_checks(acts):  # every check that is made sees no improvement
            pol.on_event(EvaluationDone(2.0 + k, f"{CLIENT_SCORE}{c}", 0.1, 1.0))
    assert checks == [[0], [0], [0], [0]]  # client 1: no check, so no run-out, while it is away
    assert pol.client_monitors[1].bad_checks == 0 and pol.control.minimums[1] == pytest.approx(0.1)
    # its next model is checked again; the state survives a checkpoint
    b = build_policy("prfl", ctx(), window=0.0, interval=1, counting="server_steps", importance=False,
                     initial_densities=(1.0, 0.5), patience=2)
    b.load_state_dict(pol.state_dict())
    assert b.buffered_models == pol.buffered_models == [4, 1] and b.scored_models == pol.scored_models == [4, 1]
    acts = b.on_event(ResultArrived(7.0, result(t1, [0, 0, 3, 5, 0.5, 0.5])))
    assert _client_checks(acts) == [1] and b.scored_models == [4, 2]


@pytest.mark.parametrize(("client_recovery", "density", "minimum"), [("minimum", 0.6, 0.3), ("density", 0.8, 0.1)])
def test_a_client_run_out_raises_its_minimum_or_its_density(client_recovery, density, minimum):
    pol = build_policy("prfl", ctx(), window=0.0, interval=1, importance=False, patience=1,
                       initial_densities=(1.0, 0.6), client_recovery=client_recovery)
    tasks = dispatches(pol.on_event(Start(0.0)))
    pol.on_event(ResultArrived(1.0, result(tasks[1], [0, 0, 3, 4, 0.5, 0.5])))
    pol.on_event(EvaluationDone(1.0, f"{CLIENT_SCORE}1", 0.6, 1.0))
    (rec,) = records(pol.on_event(EvaluationDone(2.0, f"{CLIENT_SCORE}1", 0.5, 1.0)), "recovery")
    assert rec["scope"] == "client" and rec["density"] == pytest.approx([1.0, density])
    assert pol.densities == pytest.approx([1.0, density]) and pol.control.minimums == pytest.approx([0.1, minimum])
    assert not pol.first_stage


def test_a_server_recovery_restarts_the_patience_of_the_clients_it_densifies():
    pol = build_policy("prfl", ctx(), window=0.0, interval=1000, importance=False, patience=3,
                       recovery_arming=False, initial_densities=(1.0, 0.1))
    pol.on_event(Start(0.0))
    for m in pol.client_monitors:
        m.best, m.bad_checks = 0.9, 2  # both clients one bad check from a run-out
    pol.on_event(EvaluationDone(0.0, SERVER_SCORE, 0.5, 1.0))
    for k in range(3):
        acts = pol.on_event(EvaluationDone(1.0 + k, SERVER_SCORE, 0.4, 1.0))
    (rec,) = records(acts, "recovery")
    assert rec["scope"] == "server" and pol.densities == pytest.approx([1.0, 0.3])
    # client 1's density rose: its patience starts afresh; client 0, dense already, keeps its count
    assert [m.bad_checks for m in pol.client_monitors] == [2, 0]


@pytest.mark.parametrize("minimum_rule", ["fixed", "follow"])
def test_the_minimums_follow_the_densities_and_a_clamp_ends_the_first_stage(minimum_rule):
    pol = build_policy("prfl", ctx(nominal_round_times=(1.0, 5.0)), window=0.0, interval=2, importance=False,
                       client_scores=False, initial_densities=(1.0, 0.5), minimum_rule=minimum_rule)
    tasks = dispatches(pol.on_event(Start(0.0)))
    a, b = [1, 2, 3, 4, 0.5, 0.5], [0, 0, 3, 4, 0.5, 0.5]
    t0 = dispatches(pol.on_event(ResultArrived(2.0, result(tasks[0], a))))[0]
    t1 = dispatches(pol.on_event(ResultArrived(3.0, result(tasks[1], b))))[1]
    pol.monitor.best = 0.9
    acts = pol.on_event(ResultArrived(4.0, result(t0, a)))  # step 1: client 1 0.5 -> 0.35 (as above)
    t0 = dispatches(acts)[0]
    assert pol.densities == [1.0, 0.35] and pol.first_stage and records(acts, "minimums") == []
    # after the server monitor's check of this step (no new best: one bad check), the minimums
    # follow the lowest density, which is more than 0.01 above them, and the patience starts afresh
    acts = pol.on_event(EvaluationDone(4.0, SERVER_SCORE, 0.5, 1.0))
    if minimum_rule == "follow":
        assert records(acts, "minimums") == [{"min_density": [0.35, 0.35], "density": [1.0, 0.35]}]
        assert pol.monitor.bad_checks == 0
    else:
        assert acts == [] and pol.control.minimums == [0.1, 0.1] and pol.monitor.bad_checks == 1
    pol.client_monitors[1].bad_checks = 1
    t0 = dispatches(pol.on_event(ResultArrived(6.0, result(t0, a))))[0]
    pol.on_event(ResultArrived(7.5, result(t1, b)))  # client 1: 3 and 4.5 s, mean 3.75 against 2
    acts = pol.on_event(ResultArrived(8.0, result(t0, a)))  # step 2: rate 0.467, 0.35 * 0.58 -> 0.2
    t0 = dispatches(acts)[0]
    (rec,) = records(acts, "densities")
    if minimum_rule == "follow":  # held at its minimum: the server changed a density, the first stage ends
        assert rec["density"] == [1.0, 0.35] and rec["clamped"] == [1] and not pol.first_stage
        assert pol.client_monitors[1].bad_checks == 0
    else:
        assert rec["density"] == [1.0, 0.2] and "clamped" not in rec and pol.first_stage
        assert pol.client_monitors[1].bad_checks == 1
    for t in (10.0, 12.0):  # step 3 (same means): the rule adapts only in the first stage, 0.2 * 0.58 -> 0.12
        t0 = dispatches(pol.on_event(ResultArrived(t, result(t0, a))))[0]
    assert pol.densities == ([1.0, 0.35] if minimum_rule == "follow" else [1.0, 0.12])


def test_the_minimums_follow_after_the_server_check_so_a_run_out_in_the_same_step_is_not_lost():
    pol = build_policy("prfl", ctx(nominal_round_times=(1.0, 5.0)), window=0.0, interval=2, importance=False,
                       client_scores=False, initial_densities=(1.0, 0.5), minimum_rule="follow", patience=2,
                       recovery_arming=False)
    tasks = dispatches(pol.on_event(Start(0.0)))
    a, b = [1, 2, 3, 4, 0.5, 0.5], [0, 0, 3, 4, 0.5, 0.5]
    t0 = dispatches(pol.on_event(ResultArrived(2.0, result(tasks[0], a))))[0]
    pol.on_event(ResultArrived(3.0, result(tasks[1], b)))
    pol.monitor.best, pol.monitor.bad_checks = 0.9, 1  # one bad check from a run-out
    pol.on_event(ResultArrived(4.0, result(t0, a)))  # a step: 0.5 -> 0.35, the lowest density
    acts = pol.on_event(EvaluationDone(4.0, SERVER_SCORE, 0.5, 1.0))
    # the check runs out first: a roll-back raises the minimums to 0.3; then they follow to 0.35
    assert [r["scope"] for r in records(acts, "recovery")] == ["server"]
    assert records(acts, "minimums") == [{"min_density": [0.35, 0.35], "density": [1.0, 0.35]}]
    assert pol.monitor.bad_checks == 0 and not pol.first_stage


@pytest.mark.parametrize(("step_floor", "first_stage"), [(None, True), (0.05, False)])
def test_a_step_under_the_minimum_but_over_the_step_floor_is_clamped_and_ends_the_first_stage(step_floor, first_stage):
    # the reference's CIFAR-10 and FEMNIST settings take rule steps down to 0.05 and clamp them to
    # the global minimum; its Fashion-MNIST setting (the default floor: min_density) takes none
    pol = build_policy("prfl", ctx(nominal_round_times=(1.0, 5.0)), window=0.0, interval=2, importance=False,
                       client_scores=False, initial_densities=(1.0, 0.1), minimum_rule="follow", step_floor=step_floor)
    tasks = dispatches(pol.on_event(Start(0.0)))
    t0 = dispatches(pol.on_event(ResultArrived(2.0, result(tasks[0], [1, 2, 3, 4, 0.5, 0.5]))))[0]
    pol.on_event(ResultArrived(3.0, result(tasks[1], [0, 0, 0, 4, 0.5, 0.5])))
    acts = pol.on_event(ResultArrived(4.0, result(t0, [1, 2, 3, 4, 0.5, 0.5])))  # 0.1 * 0.7 -> 0.07
    assert pol.densities == [1.0, 0.1] and pol.first_stage == first_stage
    assert records(acts, "densities") == ([] if first_stage else [{"density": [1.0, 0.1], "mean_round_time": [2.0, 3.0],
                                                                     "clamped": [1]}])


def test_minimums_that_follow_the_densities_to_one_open_the_final_phase():
    pol = build_policy("prfl", ctx(), window=0.0, interval=1, importance=False, patience=1,
                       initial_densities=(1.0, 0.9), client_recovery="density", minimum_rule="follow")
    tasks = dispatches(pol.on_event(Start(0.0)))
    pol.on_event(ResultArrived(1.0, result(tasks[1], [0, 0, 3, 4, 0.5, 0.5])))
    acts = pol.on_event(EvaluationDone(1.0, SERVER_SCORE, 0.5, 1.0))
    assert records(acts, "minimums")[0]["min_density"] == [0.9, 0.9]
    pol.on_event(EvaluationDone(1.0, f"{CLIENT_SCORE}1", 0.6, 1.0))
    acts = pol.on_event(EvaluationDone(2.0, f"{CLIENT_SCORE}1", 0.5, 1.0))  # client 1 runs out: 0.9 -> 1
    assert [r["scope"] for r in records(acts, "recovery")] == ["client"]
    assert records(acts, "minimums") == [{"min_density": [1.0, 1.0], "density": [1.0, 1.0], "final_phase": True}]
    assert pol.final_phase and pol.control.all_dense and pol.monitor.patience == 8


def test_a_roll_back_restores_the_importance_scores_and_ranks_from_them():
    kw = dict(window=0.0, interval=1, patience=1, client_scores=False, initial_densities=(1.0, 0.1))
    pol = build_policy("prfl", ctx(), **kw)
    tasks = dispatches(pol.on_event(Start(0.0)))
    pol.on_event(EvaluationDone(0.0, SERVER_SCORE, 0.5, 1.0))
    t0 = dispatches(pol.on_event(ResultArrived(1.0, result(tasks[0], [1, 2, 3, 4, 0.5, 0.5], [1, 4, 9, 16]))))[0]
    saved, first = pol.scores.scores.clone(), pol.ranking.order.tolist()
    pol.on_event(EvaluationDone(1.0, SERVER_SCORE, 0.4, 1.0))  # armed: the state is saved, scores included
    moved = [4, 3, 2, 1, 0.5, 0.5]
    t0 = dispatches(pol.on_event(ResultArrived(2.0, result(t0, moved, [16, 9, 4, 1]))))[0]
    assert not torch.equal(pol.scores.scores, saved) and pol.ranking.order.tolist() != first
    b = build_policy("prfl", ctx(), **kw)
    b.load_state_dict(pol.state_dict())
    assert torch.equal(b.best_scores, saved)
    for p in (pol, b):
        acts = p.on_event(EvaluationDone(3.0, SERVER_SCORE, 0.3, 1.0))  # roll back: client 1's density 0.1 -> 0.3
        (rec,) = records(acts, "recovery")
        assert rec["scope"] == "server" and rec["scores_restored"] and p.densities == pytest.approx([1.0, 0.3])
        assert torch.equal(p.scores.scores, saved) and len(records(acts, "ranking")) == 1
        # the new sub-models are ranked as at the saved state: from its scores and its weights
        assert p.ranking.order.tolist() == first and torch.equal(p.weights, torch.tensor([1, 2, 3, 4, 0.5, 0.5]))


def test_reference_state_survives_a_checkpoint():
    kw = dict(window=0.0, interval=2, initial_densities=(1.0, 0.5))
    a = build_policy("prfl", ctx(), **kw)
    tasks = dispatches(a.on_event(Start(0.0)))
    a.on_event(ResultArrived(1.0, result(tasks[0], [1, 2, 3, 4, 0.5, 0.5], [4, 0, 2, 1])))
    b = build_policy("prfl", ctx(), **kw)
    b.load_state_dict(a.state_dict())
    assert b.local_rounds == a.local_rounds == [1, 0] and b.last_arrival == a.last_arrival
    for pol in (a, b):
        pol.on_event(ResultArrived(2.0, result(tasks[1], [0, 0, 3, 4, 0.5, 0.5], [5, 5, 2, 6])))
    assert torch.equal(a.weights, b.weights) and a.ranking.order.tolist() == b.ranking.order.tolist()


def test_the_saved_state_of_a_roll_back_survives_a_checkpoint():
    kw = dict(window=0.0, interval=1000, importance=False, patience=1, initial_densities=(1.0, 0.1),
              client_scores=False)
    a = build_policy("prfl", ctx(), **kw)
    tasks = dispatches(a.on_event(Start(0.0)))
    a.on_event(EvaluationDone(0.0, SERVER_SCORE, 0.5, 1.0))
    t0 = dispatches(a.on_event(ResultArrived(1.0, result(tasks[0], [9, 9, 9, 9, 9, 9]))))[0]
    a.on_event(EvaluationDone(1.0, SERVER_SCORE, 0.4, 1.0))  # armed: weights and buffer saved
    a.on_event(ResultArrived(2.0, result(tasks[1], [0, 0, 0, 4, 0.5, 0.5])))
    b = build_policy("prfl", ctx(), **kw)
    b.load_state_dict(a.state_dict())
    assert b.best_buffer is not None and b.best_buffer.clients() == a.best_buffer.clients() == [0]
    for pol in (a, b):  # a roll-back, then an arrival: the same in both
        pol.on_event(EvaluationDone(3.0, SERVER_SCORE, 0.3, 1.0))
        pol.on_event(ResultArrived(4.0, result(t0, [5, 6, 7, 8, 0.5, 0.5])))
    assert a.buffer.clients() == b.buffer.clients() == [0] and torch.equal(a.weights, b.weights)
    assert torch.equal(a.weights, torch.tensor([5.0, 6.0, 7.0, 8.0, 0.5, 0.5]))
