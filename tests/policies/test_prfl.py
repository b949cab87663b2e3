"""PR-FL policy driven by scripted events, checked against hand-computed numbers."""

import pytest
import torch

from prfl.client.result import TaskResult
from prfl.policies import build_policy
from prfl.policies.base import (
    Dispatch, EvaluationDone, PolicyContext, Record, RequestEvaluation, ResultArrived, SetTimer, Start, Stop, TimerFired,
)
from prfl.policies.prfl import CLIENT_SCORE, SERVER_SCORE, WINDOW_TIMER

W0 = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 0.5])  # 4 prunable weights (one layer) + 2 biases


def ctx(num_samples=(1, 3), **kw):
    return PolicyContext(
        num_clients=len(num_samples), num_samples=tuple(num_samples), initial_weights=W0.clone(), num_prunable=4,
        layer_bounds=((0, 4),), **kw,
    )


def dispatches(actions):
    return {a.task.client: a.task for a in actions if isinstance(a, Dispatch)}


def result(task, weights, n):
    return TaskResult(task_id=task.task_id, client=task.client, version=task.version, weights=torch.tensor(weights, dtype=torch.float32),
                      num_samples=n, mean_loss=0.0, steps=1, compute_seconds=0.0, density=task.density)


def test_buffer_aggregation_with_reaged_poly_staleness_by_hand():
    pol = build_policy("prfl", ctx(), window=0.0, interval=1000, recovery=False, importance=False,
                       initial_densities=1.0, staleness_mode="reaged")
    tasks = dispatches(pol.on_event(Start(0.0)))
    assert set(tasks) == {0, 1} and all(t.mask is None and t.density == 1.0 for t in tasks.values())
    # client 0 alone: one holder, staleness 0 -> its model
    acts = pol.on_event(ResultArrived(1.0, result(tasks[0], [2, 2, 2, 2, 1, 1], 1)))
    assert pol.version == 1 and torch.equal(pol.weights, torch.tensor([2.0, 2, 2, 2, 1, 1]))
    assert 0 in dispatches(acts)  # redispatched at once
    # client 1 (sent at round 0) arrives at round 1: both slots have tau = 1, so equal p_i = 1/2;
    # c = p_i n_i = (0.5, 1.5): W = (0.5 w0 + 1.5 w1) / 2 = 0.25 w0 + 0.75 w1
    pol.on_event(ResultArrived(2.0, result(tasks[1], [4, 0, 4, 4, 3, 3], 3)))
    assert torch.allclose(pol.weights, torch.tensor([3.5, 0.5, 3.5, 3.5, 2.5, 2.5]))


def test_masked_client_and_residual_bytes_by_hand():
    # rule B with preset densities (1, 0.5). Magnitude ranking of [1,2,3,4]: order [3,2,1,0], so
    # mask(0.5) = {2, 3}.
    pol = build_policy("prfl", ctx(), window=0.0, interval=1000, recovery=False, importance=False,
                       density_rule="B", initial_densities=(1.0, 0.5))
    tasks = dispatches(pol.on_event(Start(0.0)))
    assert tasks[1].mask.tolist() == [False, False, True, True]
    # Pieces for levels (0.5, 1): p0 = 2 biases = 8 B; p1 = 2 weights = 4*2 + min(ceil(4/8), 8) + 1 = 10 B;
    # p2 = 10 B. Client 0 (dense) needs p0..p2 = 28 B and publishes them all; client 1 needs
    # p0, p1 = 18 B, already published: no new egress.
    assert tasks[0].download_bytes == 28 and tasks[0].server_egress_bytes == 28
    assert tasks[1].download_bytes == 18 and tasks[1].server_egress_bytes == 0
    assert tasks[1].upload_bytes == 4 * (2 + 2) and tasks[0].upload_bytes == 4 * 6
    again = dispatches(pol.on_event(ResultArrived(1.0, result(tasks[0], [2, 2, 2, 2, 1, 1], 1))))[0]
    # a new model version with the same ranking and levels: the client keeps the positions, so
    # it fetches values only, p0 + p1 + p2 = 8 + 8 + 8 B, and they are new on the server's link
    assert again.download_bytes == 24 and again.server_egress_bytes == 24
    pol.on_event(ResultArrived(2.0, result(tasks[1], [0, 0, 8, 8, 3, 3], 3)))
    # staleness frozen on arrival: client 0 arrived at round 0 from version 0 (s = 1, c = 1 * 1),
    # client 1 at round 1 from version 0 (s = 2^-0.6, c = 3 * 2^-0.6 = 1.97926).
    # weights 0, 1: only client 0 holds them -> 2; weights 2, 3: (1*2 + 1.97926*8) / 2.97926 = 5.98608;
    # biases (1*1 + 1.97926*3) / 2.97926 = 2.32869
    c1 = 3 * 2**-0.6
    w23, bias = (2 + c1 * 8) / (1 + c1), (1 + c1 * 3) / (1 + c1)
    assert torch.allclose(pol.weights, torch.tensor([2.0, 2.0, w23, w23, bias, bias]))
    assert abs(w23 - 5.98608) < 1e-5 and abs(bias - 2.32869) < 1e-5


def test_safeguard_keeps_weights_nobody_trained():
    pol = build_policy("prfl", ctx(), window=0.0, interval=1000, recovery=False, importance=False,
                       density_rule="B", initial_densities=(0.5, 0.5))
    tasks = dispatches(pol.on_event(Start(0.0)))
    pol.on_event(ResultArrived(1.0, result(tasks[0], [0, 0, 5, 7, 1, 1], 1)))
    # weights 0 and 1 are outside every mask: they keep the server's values 1 and 2
    assert torch.equal(pol.weights, torch.tensor([1.0, 2.0, 5.0, 7.0, 1.0, 1.0]))


def test_window_collects_arrivals_until_its_timer():
    pol = build_policy("prfl", ctx(), window=0.5, interval=1000, recovery=False, importance=False,
                       initial_densities=1.0)
    tasks = dispatches(pol.on_event(Start(0.0)))
    acts = pol.on_event(ResultArrived(1.0, result(tasks[0], [2, 2, 2, 2, 1, 1], 1)))
    assert acts == [SetTimer(1.5, WINDOW_TIMER)] and pol.version == 0
    assert pol.on_event(ResultArrived(1.2, result(tasks[1], [4, 0, 4, 4, 3, 3], 3))) == []
    acts = pol.on_event(TimerFired(1.5, WINDOW_TIMER))
    # both in one server step, staleness 0 each: W = (1 w0 + 3 w1) / 4
    assert pol.version == 1 and set(dispatches(acts)) == {0, 1}
    assert torch.allclose(pol.weights, torch.tensor([3.5, 0.5, 3.5, 3.5, 2.5, 2.5]))


def test_density_rule_a_applied_every_interval():
    # the earlier rules: rule A from a dense start, the interval in server steps, round time = task time
    pol = build_policy("prfl", ctx(), window=0.0, interval=2, recovery=False, importance=False, density_rule="A",
                       initial_densities=1.0, counting="server_steps", round_time="task")
    tasks = dispatches(pol.on_event(Start(0.0)))
    acts = pol.on_event(ResultArrived(2.0, result(tasks[0], [1, 2, 3, 4, 1, 1], 1)))  # round time 2
    t0 = dispatches(acts)[0]
    acts = pol.on_event(ResultArrived(8.0, result(tasks[1], [1, 2, 3, 4, 1, 1], 3)))  # round time 8
    # round 2 closes the interval: rho_1 = max(2 / 8, 0.1) = 0.25
    recs = [a for a in acts if isinstance(a, Record) and a.kind == "densities"]
    assert recs and recs[0].data["density"] == [1.0, 0.25]
    assert dispatches(acts)[1].density == 0.25 and dispatches(acts)[1].mask.sum() == 1
    assert t0.density == 1.0


def test_recovery_fires_on_scripted_accuracy_and_ends_training():
    pol = build_policy("prfl", ctx(), window=0.0, interval=1000, importance=False, patience=2, delta_rho=0.2,
                       initial_densities=1.0, recovery_arming=False, client_scores=False)
    tasks = dispatches(pol.on_event(Start(0.0)))
    best = pol.weights
    assert pol.on_event(EvaluationDone(0.0, SERVER_SCORE, 0.5, 1.0)) == []  # improvement: best checkpoint
    pol.on_event(ResultArrived(1.0, result(tasks[0], [9, 9, 9, 9, 9, 9], 1)))
    assert not torch.equal(pol.weights, best)
    assert pol.on_event(EvaluationDone(1.0, SERVER_SCORE, 0.4, 1.0)) == []
    acts = pol.on_event(EvaluationDone(1.0, SERVER_SCORE, 0.45, 1.0))  # 2nd bad check: fires
    rec = [a for a in acts if isinstance(a, Record) and a.kind == "recovery"]
    assert rec and rec[0].data["min_density"] == pytest.approx([0.3, 0.3])
    assert torch.equal(pol.weights, best)  # rolled back
    minimums = [0.3]
    for _ in range(4):  # 0.5, 0.7, 0.9, 1.0 (capped)
        pol.on_event(EvaluationDone(2.0, SERVER_SCORE, 0.1, 1.0))
        acts = pol.on_event(EvaluationDone(2.0, SERVER_SCORE, 0.1, 1.0))
        minimums.append(pol.control.minimums[0])
    assert minimums == pytest.approx([0.3, 0.5, 0.7, 0.9, 1.0])
    assert pol.final_phase and pol.monitor.patience == 16  # 2 x final_patience_factor 8
    for _ in range(15):
        assert pol.on_event(EvaluationDone(3.0, SERVER_SCORE, 0.1, 1.0)) == []
    acts = pol.on_event(EvaluationDone(3.0, SERVER_SCORE, 0.1, 1.0))
    assert any(isinstance(a, Stop) for a in acts) and pol.stopped


def test_control_step_requests_the_server_score_of_the_buffer_average():
    pol = build_policy("prfl", ctx(), window=0.0, interval=1, importance=False, initial_densities=1.0,
                       client_scores=False)
    tasks = dispatches(pol.on_event(Start(0.0)))
    acts = pol.on_event(ResultArrived(1.0, result(tasks[0], [2, 2, 2, 2, 1, 1], 1)))
    evals = [a for a in acts if isinstance(a, RequestEvaluation)]
    assert len(evals) == 1 and evals[0].tag == SERVER_SCORE
    assert torch.equal(evals[0].weights, torch.tensor([2.0, 2, 2, 2, 1, 1]))  # the buffer's only model


def test_client_scores_build_each_buffered_model_only_when_it_is_evaluated(monkeypatch):
    """Per-client monitors ask one evaluation per buffered client at every control step; with a
    fleet of thousands, building every model at once would hold thousands of models. The requests
    carry a builder instead, and the metrics read the buffer's bookkeeping, not its models."""
    pol = build_policy("prfl", ctx(), window=0.0, interval=1, importance=False, initial_densities=1.0)
    tasks = dispatches(pol.on_event(Start(0.0)))
    built: list[int] = []
    get = pol.buffer.get
    monkeypatch.setattr(pol.buffer, "get", lambda c: built.append(c) or get(c))
    acts = pol.on_event(ResultArrived(1.0, result(tasks[0], [2, 2, 2, 2, 1, 1], 1)))  # a control step
    (req,) = [a for a in acts if isinstance(a, RequestEvaluation) and a.tag != SERVER_SCORE]
    assert req.tag == f"{CLIENT_SCORE}0" and built == []  # nothing built yet
    assert torch.equal(req.model(), torch.tensor([2.0, 2, 2, 2, 1, 1])) and built == [0]
    pol.on_event(ResultArrived(2.0, result(tasks[1], [3, 3, 3, 3, 1, 1], 1)))
    assert pol.version == 2 and pol.metrics().buffer_staleness == (2, 2)  # both trained from version 0
    assert built == [0]


def test_importance_rebuilds_the_ranking():
    pol = build_policy("prfl", ctx(), window=0.0, interval=1, recovery=False, floor=0.0,
                       density_rule="B", initial_densities=(1.0, 0.5))
    tasks = dispatches(pol.on_event(Start(0.0)))
    assert tasks[1].mask.tolist() == [False, False, True, True]  # by magnitude at first
    r = result(tasks[0], [1, 2, 3, 4, 0.5, 0.5], 1)
    r.grad_sq = torch.tensor([9.0, 5.0, 1.0, 0.0])  # importance favours weights 0 and 1
    acts = pol.on_event(ResultArrived(1.0, r))
    assert any(isinstance(a, Record) and a.kind == "ranking" for a in acts)
    assert pol.mask_for(0.5).tolist() == [True, True, False, False]


@pytest.mark.parametrize(("dtype", "per_value"), [("float32", 4), ("bfloat16", 2)])
def test_uploads_carry_the_squared_gradients_of_every_prunable_weight(dtype, per_value):
    # client 1 trains 2 of the 4 prunable weights and 2 biases: 4 * 4 B of values, plus the
    # importance of all 4 prunable weights (pruned ones included), at the chosen precision
    pol = build_policy("prfl", ctx(), window=0.0, interval=1000, recovery=False, importance_dtype=dtype,
                       density_rule="B", initial_densities=(1.0, 0.5), importance_scope="all",
                       importance_requests="every")
    tasks = dispatches(pol.on_event(Start(0.0)))
    assert tasks[1].upload_bytes == 4 * (2 + 2) + per_value * 4
    assert tasks[0].upload_bytes == 4 * 6 + per_value * 4
    assert tasks[1].want_importance and tasks[1].importance_dtype == dtype
    assert tasks[1].upload_importance_bytes == per_value * 4


def test_importance_once_per_interval_asks_each_client_once_between_rebuilds():
    kw = dict(window=0.0, interval=3, recovery=False, importance_requests="interval", density_rule="B",
              initial_densities=(1.0, 0.5), counting="server_steps", importance_scope="all")
    pol = build_policy("prfl", ctx(), **kw)
    tasks = dispatches(pol.on_event(Start(0.0)))
    assert tasks[0].want_importance and tasks[1].want_importance
    assert tasks[1].upload_bytes == 4 * (2 + 2) + 4 * 4
    r = result(tasks[0], [1, 2, 3, 4, 0.5, 0.5], 1)
    r.grad_sq = torch.tensor([9.0, 5.0, 1.0, 0.0])
    again = dispatches(pol.on_event(ResultArrived(1.0, r)))[0]  # round 1: no rebuild yet
    assert not again.want_importance and again.upload_bytes == 4 * 6  # values only
    again = dispatches(pol.on_event(ResultArrived(2.0, result(again, [1, 2, 3, 4, 0.5, 0.5], 1))))[0]
    assert not again.want_importance
    acts = pol.on_event(ResultArrived(3.0, result(again, [1, 2, 3, 4, 0.5, 0.5], 1)))  # round 3: rebuild
    assert any(isinstance(a, Record) and a.kind == "ranking" for a in acts)
    assert dispatches(acts)[0].want_importance  # a new interval: asked again
    # the round trip through a checkpoint keeps who was asked
    clone = build_policy("prfl", ctx(), **kw)
    clone.load_state_dict(pol.state_dict())
    assert clone._imp_asked == pol._imp_asked == {0}


def test_bfloat16_importance_keeps_range_and_order_and_is_idempotent():
    from prfl.pruning.ranking import importance_for_upload

    # squared gradients span many decades: a half-precision format would flush the small ones to 0
    g = torch.tensor([3e-30, 7.5e4, 1e-3, 2.0, 0.0, 1.0001e-3])
    h = importance_for_upload(g, "bfloat16")
    assert h.dtype == torch.float32 and torch.all(h[:4] > 0)
    assert torch.equal(torch.argsort(h[:5], descending=True), torch.argsort(g[:5], descending=True))
    assert torch.allclose(h, g, rtol=2 ** -8)
    assert torch.equal(importance_for_upload(h, "bfloat16"), h)
    assert torch.equal(importance_for_upload(g, "float32"), g)
    with pytest.raises(ValueError, match="importance dtype"):
        importance_for_upload(g, "int8")


def test_prefix_buffer_storage_aggregates_like_dense_storage_and_survives_a_checkpoint():
    kw = dict(window=0.0, interval=1000, recovery=False, importance=False, density_rule="B",
              initial_densities=(1.0, 0.5))
    pols = {s: build_policy("prfl", ctx(), buffer_storage=s, **kw) for s in ("dense", "prefix")}
    tasks = {s: dispatches(p.on_event(Start(0.0))) for s, p in pols.items()}
    for s, p in pols.items():  # client 1 trains the prefix {2, 3} of the magnitude ranking
        p.on_event(ResultArrived(1.0, result(tasks[s][1], [0, 0, 5, 7, 2, 2], 3)))
        p.on_event(ResultArrived(2.0, result(tasks[s][0], [2, 2, 2, 2, 1, 1], 1)))
    assert torch.allclose(pols["prefix"].weights, pols["dense"].weights)
    assert len(pols["prefix"].buffer._orders) == 1 and not pols["prefix"].task_orders.keys() & {0, 1}
    twin = build_policy("prfl", ctx(), buffer_storage="prefix", **kw)
    twin.load_state_dict(pols["prefix"].state_dict())
    a, b = twin, pols["prefix"]
    assert torch.equal(a.buffer.aggregate(a.weights, a.version), b.buffer.aggregate(b.weights, b.version))


def test_state_dict_round_trip_continues_identically():
    kw = dict(window=0.0, interval=2, importance=False, density_rule="B", initial_densities=(1.0, 0.5))
    a = build_policy("prfl", ctx(), **kw)
    tasks = dispatches(a.on_event(Start(0.0)))
    a.on_event(ResultArrived(1.0, result(tasks[0], [2, 2, 2, 2, 1, 1], 1)))
    b = build_policy("prfl", ctx(), **kw)
    b.load_state_dict(a.state_dict())
    for pol in (a, b):
        pol.on_event(ResultArrived(2.0, result(tasks[1], [0, 0, 8, 8, 3, 3], 3)))
    assert torch.equal(a.weights, b.weights) and a.version == b.version == 2
    assert a.densities == b.densities


def test_one_initial_density_for_every_client():
    pol = build_policy("prfl", ctx(), window=0.0, interval=1000, recovery=False, initial_densities=0.5)
    tasks = dispatches(pol.on_event(Start(0.0)))
    assert pol.densities == [0.5, 0.5] and all(t.density == 0.5 for t in tasks.values())
    with pytest.raises(ValueError, match="initial densities"):
        build_policy("prfl", ctx(), initial_densities=1.5)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="density_rule"):
        build_policy("prfl", ctx(), density_rule="C")
    with pytest.raises(ValueError, match="importance_dtype"):
        build_policy("prfl", ctx(), importance_dtype="float16")
    with pytest.raises(ValueError, match="unknown option 'speed'"):
        build_policy("prfl", ctx(), speed=2)


def test_old_rankings_are_cut_to_the_prefixes_in_use(tmp_path):
    # 3 clients at densities (1, 0.5, 0.25); a new ranking every 2 rounds from the squared
    # gradients. Client 2's task is in flight across the rebuild: afterwards its ranking is held
    # only as far as its mask reaches, and the buffer's rankings only as far as its slots reach.
    # The same events on a buffer kept in a file give the same weights.
    kw = dict(window=0.0, interval=2, recovery=False, density_rule="B", initial_densities=(1.0, 0.5, 0.25),
              buffer_storage="prefix", counting="server_steps", importance_scope="all", importance_average="all")
    pols = [build_policy("prfl", ctx((1, 2, 3)), **kw), build_policy("prfl", ctx((1, 2, 3)), buffer_dir=str(tmp_path), **kw)]
    for pol in pols:
        tasks = dispatches(pol.on_event(Start(0.0)))
        first = pol.ranking.order
        assert pol.task_orders[2] is first and pol.task_orders[1] is first
        r0 = result(tasks[0], [2, 2, 2, 2, 1, 1], 1)
        r0.grad_sq = torch.tensor([4.0, 3.0, 2.0, 1.0])  # reverses the magnitude ranking
        pol.on_event(ResultArrived(1.0, r0))
        kept = tasks[1].mask.nonzero().flatten()
        w1 = torch.zeros(6)
        w1[kept] = 5.0
        w1[4:] = 2.0
        r1 = result(tasks[1], w1.tolist(), 2)
        r1.grad_sq = torch.tensor([4.0, 3.0, 2.0, 1.0])
        pol.on_event(ResultArrived(2.0, r1))  # round 2: a new ranking
        assert pol.ranking_id == 1 and not torch.equal(pol.ranking.order, first)
        held = pol.task_orders[2]
        assert held is not first and torch.equal(held, first[:1])  # client 2 keeps 1 of 4 weights
        assert [o.numel() for o in pol.buffer._orders.values()] == [2]  # client 1's slot: 2 ranks
        # old rankings are held as int32 copies (half the bytes of the int64 ranking)
        assert held.dtype == torch.int32 and all(o.dtype == torch.int32 for o in pol.buffer._orders.values())
        w2 = torch.zeros(6)
        w2[first[0]] = 9.0
        w2[4:] = 3.0
        pol.on_event(ResultArrived(3.0, result(tasks[2], w2.tolist(), 3)))
    assert torch.equal(pols[0].weights, pols[1].weights)
    assert torch.equal(pols[0].buffer.aggregate(pols[0].weights, 3), pols[1].buffer.aggregate(pols[1].weights, 3))


def test_buffer_dir_needs_prefix_storage(tmp_path):
    with pytest.raises(ValueError, match="buffer_storage: prefix"):
        build_policy("prfl", ctx(), buffer_dir=str(tmp_path))


def test_staleness_frozen_on_arrival_by_hand():
    """s_i = 1 / (tau + 1) (poly, a = 1) with tau the staleness when the update arrives, kept while
    it sits in the buffer; the re-aged option ages every slot to the current round instead."""
    def run(mode):
        pol = build_policy("prfl", ctx(num_samples=(2, 3, 4)), window=0.0, interval=1000, recovery=False,
                           importance=False, density_rule="B", initial_densities=(1.0, 1.0, 0.5), a=1.0,
                           staleness_mode=mode)
        tasks = dispatches(pol.on_event(Start(0.0)))
        assert tasks[2].mask.tolist() == [False, False, True, True]  # magnitude order [3, 2, 1, 0]
        t0 = dispatches(pol.on_event(ResultArrived(1.0, result(tasks[0], [2, 2, 2, 2, 1, 1], 2))))[0]
        pol.on_event(ResultArrived(2.0, result(t0, [2, 2, 2, 2, 1, 1], 2)))  # from version 1 at round 1
        assert pol.version == 2
        pol.on_event(ResultArrived(3.0, result(tasks[1], [10, 10, 10, 10, 4, 4], 3)))  # from version 0 at round 2
        after_3 = pol.weights.clone()
        pol.on_event(ResultArrived(4.0, result(tasks[2], [0, 0, -6, -6, 3, 3], 4)))  # masked, from version 0 at round 3
        return pol, after_3, pol.weights

    pol, after_3, after_4 = run("frozen")
    state = pol.buffer.state_dict()
    assert state["clients"].tolist() == [0, 1, 2]
    assert state["sent_round"].tolist() == [1, 0, 0] and state["arrival_round"].tolist() == [1, 2, 3]
    # frozen: c = n s(tau at arrival) = 2 * 1/1, 3 * 1/3, 4 * 1/4 = (2, 1, 1), whatever the round
    # round 3: weights (2*2 + 1*10) / 3 = 14/3; biases (2*1 + 1*4) / 3 = 2
    assert torch.allclose(after_3, torch.tensor([14 / 3] * 4 + [2.0, 2.0]))
    # round 4: weights 0, 1 (client 2 does not hold them) stay 14/3; 2, 3: (4 + 10 - 6) / 4 = 2;
    # biases (2 + 4 + 3) / 4 = 9/4
    assert torch.allclose(after_4, torch.tensor([14 / 3, 14 / 3, 2.0, 2.0, 9 / 4, 9 / 4]))

    _, after_3, after_4 = run("reaged")
    # re-aged at round 2: client 0 (sent at 1) s = 1/2, c = 1; client 1 (sent at 0) s = 1/3, c = 1
    assert torch.allclose(after_3, torch.tensor([6.0] * 4 + [2.5, 2.5]))
    # re-aged at round 3: c = (2 * 1/3, 3 * 1/4, 4 * 1/4) = (2/3, 3/4, 1); weights 0, 1:
    # (4/3 + 30/4) / (17/12) = 106/17; 2, 3: (4/3 + 30/4 - 6) / (29/12) = 34/29; biases 80/29
    assert torch.allclose(after_4, torch.tensor([106 / 17, 106 / 17, 34 / 29, 34 / 29, 80 / 29, 80 / 29]))


def test_a_checkpoint_keeps_the_ranking_as_the_scores_it_was_built_from():
    """After an importance ranking the state holds its floor and digest, not the permutation; the
    loaded policy rebuilds the same ranking, and a state whose scores do not give it is refused."""
    kw = dict(window=0.0, interval=1, recovery=False, importance=True, density_rule="B", initial_densities=(1.0, 0.5))
    pol = build_policy("prfl", ctx(), **kw)
    assert pol.state_dict()["ranking_order"] is not None  # the magnitude ranking: stored as it is
    tasks = dispatches(pol.on_event(Start(0.0)))
    r = result(tasks[0], [1, 2, 3, 4, 0.5, 0.5], 1)
    r.grad_sq = torch.tensor([1.0, 9.0, 4.0, 0.0])
    acts = pol.on_event(ResultArrived(1.0, r))
    assert any(isinstance(a, Record) and a.kind == "ranking" for a in acts) and pol.ranking_id == 1
    state = pol.state_dict()
    assert state["ranking_order"] is None and state["ranking_in_floor"].dtype == torch.bool
    twin = build_policy("prfl", ctx(), **kw)
    twin.load_state_dict(state)
    assert torch.equal(twin.ranking.order, pol.ranking.order) and twin.ranking.floor_count == pol.ranking.floor_count
    assert twin.state_dict()["ranking_order"] is None  # and it keeps being stored that way
    forged = dict(state, scores=dict(state["scores"], scores=state["scores"]["scores"].flip(0)))
    with pytest.raises(ValueError, match="rebuilt from the checkpoint"):
        build_policy("prfl", ctx(), **kw).load_state_dict(forged)
