"""``SharedLink`` keeps its flows in NumPy arrays; the results must be the pure-Python loop's
(``links_reference.ReferenceLink``) to the last bit: the simulator's histories depend on every
completion time. Random sequences of starts, cancels, capacity changes and advances drive both
links; every answer is compared with ``==`` (floats included), and so are their states."""

from __future__ import annotations

import random

import pytest

from links_reference import ReferenceLink, water_fill as reference_water_fill
from prfl.sim.links import SharedLink, _water_fill_arrays, water_fill

import numpy as np

MB = 1e6


def _same(a, b, what: str) -> None:
    assert a == b, f"{what}: arrays {a!r} != loop {b!r}"


def _drive(seed: int, steps: int, flows_at_most: int) -> int:
    rng = random.Random(seed)
    capacity = rng.choice([None, 10 * MB, 50 * MB, 3 * MB])
    new, ref = SharedLink(capacity), ReferenceLink(capacity)
    now, next_id, compared = 0.0, 0, 0
    live: list[int] = []
    for _ in range(steps):
        op = rng.random()
        if op < 0.35 and len(live) < flows_at_most:
            nbytes = rng.choice([0.0, rng.uniform(1e3, 3e7), float(rng.randint(1, 10**7))])
            cap = rng.choice([rng.uniform(1e4, 2e7), 1.25 * MB, 5 * MB])  # equal caps: ties by start order
            fid = ("task", next_id) if rng.random() < 0.5 else next_id
            next_id += 1
            new.start(fid, nbytes, cap, now)
            ref.start(fid, nbytes, cap, now)
            live.append(fid)
        elif op < 0.45 and live:
            fid = live[rng.randrange(len(live))]
            if fid in ref:
                new.cancel(fid, now)
                ref.cancel(fid, now)
        elif op < 0.5:
            cap = rng.choice([None, rng.uniform(1e6, 6e7)])
            new.set_capacity(cap, now)
            ref.set_capacity(cap, now)
        else:
            nxt_new, nxt_ref = new.next_completion(), ref.next_completion()
            _same(nxt_new, nxt_ref, "next_completion")
            if nxt_ref is not None and rng.random() < 0.7:
                now = max(now, nxt_ref[0])  # step to the next completion, as the simulator does
            else:
                now += rng.expovariate(1.0)
            _same(new.advance(now), ref.advance(now), "advance")
        _same(new.rates(), ref.rates(), "rates")
        for fid in live:
            if fid in ref:
                _same(new.remaining(fid), ref.remaining(fid), f"remaining({fid})")
            assert (fid in new) == (fid in ref)
        _same(new.state_dict(), ref.state_dict(), "state_dict")
        compared += 1
    restored = SharedLink(None)
    restored.load_state_dict(new.state_dict())
    _same(restored.state_dict(), ref.state_dict(), "restored state_dict")
    _same(restored.rates(), ref.rates(), "restored rates")
    return compared


@pytest.mark.parametrize("seed", range(12))
def test_arrays_give_the_loops_results_bit_for_bit(seed: int) -> None:
    assert _drive(seed, steps=400, flows_at_most=40) == 400


def test_many_concurrent_flows_bit_for_bit() -> None:
    """Thousands of flows at once, as in a 10,000-client fleet's first minutes."""
    assert _drive(99, steps=2500, flows_at_most=1500) == 2500


def test_water_fill_arrays_match_the_loop() -> None:
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 60)
        caps = [rng.choice([rng.uniform(1.0, 100.0), 5.0, 12.5]) for _ in range(n)]
        capacity = rng.choice([None, rng.uniform(1.0, 2000.0), float("inf")])
        got = _water_fill_arrays(np.array(caps), np.arange(n), capacity).tolist()
        assert got == reference_water_fill(caps, capacity) == water_fill(caps, capacity)


def test_a_simulation_history_is_the_same_with_either_link(monkeypatch) -> None:
    """A whole run (PR-FL with availability churn, so flows are cancelled too) records the same
    history, every float, with the array link and with the loop."""
    from prfl.config import load_config
    from prfl.run import build_scenario, make_policy, make_simulation
    from prfl.sim import engine
    from prfl.sim.executors import make_executor
    from prfl.sim.history import HistoryWriter

    overrides = ["data.dataset=digits", "data.num_clients=12", "model.name=mlp", "model.options={hidden: [16]}",
                 "train.local_steps=2", "fleet.preset=lognormal", "policy.name=prfl",
                 "fleet.availability={mean_on: 40, mean_off: 10}", "sim.executor=inline", "sim.max_rounds=40",
                 "sim.eval_every_rounds=10", "seed=2"]
    sc = build_scenario(load_config(overrides=overrides))

    def history() -> list[dict]:
        writer = HistoryWriter(None)
        sim = make_simulation(sc, make_policy(sc, sc.cfg.policy), None, writer,
                              make_executor("inline", sc.worker_spec, dataset=sc.dataset))
        sim.run()
        return writer.records

    arrays = history()
    monkeypatch.setattr(engine, "SharedLink", ReferenceLink)
    loop = history()
    assert any(r["event"] == "task_failed" for r in loop) and any(r["event"] == "arrival" for r in loop)
    assert arrays == loop
