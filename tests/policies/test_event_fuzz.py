"""Stateful property test: every policy survives any order of the events a driver can deliver.

A hypothesis state machine drives :class:`event_fuzz.PolicyFuzz` (the driver model and its
invariants, see that module) with random interleavings of Start, results (in order, late,
malformed), failures, timers, evaluations, availability churn, checkpoint-and-restore and
undeliverable events; on a failure hypothesis shrinks the sequence to a minimal one. The same
driver model runs 10,000 sequences per policy in ``benchmarks/fuzz_policies.py``; here a small
count per policy keeps the suite fast, plus a few fixed random sequences per policy.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from event_fuzz import CASES, DTS, HOSTILE_KINDS, NUM_CLIENTS, RESULT_VARIANTS, Case, PolicyFuzz, run_random

EXAMPLES = int(os.environ.get("PRFL_FUZZ_EXAMPLES", "12"))
STEPS = int(os.environ.get("PRFL_FUZZ_STEPS", "40"))

picks = st.integers(0, 63)
clients = st.integers(0, NUM_CLIENTS - 1)
dts = st.sampled_from(DTS)


# One rule whose ``move`` is drawn with the weights of ``event_fuzz.run_random`` (hypothesis picks
# rules uniformly; most of a real run is results arriving). Shrinking goes towards the first
# move, a well-formed result.
MOVES = ("arrive",) * 6 + ("fire",) * 3 + ("fail", "fail", "offline", "offline", "online", "online", "idle",
                                          "evaluate", "checkpoint", "hostile")


def machine_for(case: Case) -> type[RuleBasedStateMachine]:
    class PolicyMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.fz: PolicyFuzz | None = None

        @initialize(seed=st.integers(0, 2), eval_at_once=st.booleans(), eager_fail=st.booleans(),
                    online=st.tuples(*[st.booleans()] * NUM_CLIENTS).map(lambda t: tuple(not x for x in t)))
        def start(self, seed: int, eval_at_once: bool, eager_fail: bool, online: tuple[bool, ...]) -> None:
            self.fz = PolicyFuzz(case, seed=seed, eval_at_once=eval_at_once, eager_fail=eager_fail, online=online)
            self.fz.start()

        @rule(move=st.sampled_from(MOVES), client=clients, variant=st.sampled_from(RESULT_VARIANTS), dt=dts,
              pick=picks, accuracy=st.floats(0.0, 1.0), kind=st.sampled_from(HOSTILE_KINDS))
        def step(self, move: str, client: int, variant: str, dt: float, pick: int, accuracy: float, kind: str) -> None:
            fz = self.fz
            if move == "arrive":
                fz.arrive(client, variant, dt, pick)
            elif move == "fire":
                fz.fire(pick, dt)
            elif move == "fail":
                fz.fail_task(client, dt)
            elif move == "offline":
                fz.offline(client, dt)
            elif move == "online":
                fz.online_(client, dt)
            elif move == "idle":
                fz.idle(client, dt)
            elif move == "evaluate":
                fz.evaluate(pick, accuracy, dt)
            elif move == "checkpoint":
                fz.checkpoint()
            else:
                fz.hostile(kind, pick, dt)

        def teardown(self) -> None:
            if self.fz is not None:
                self.fz.finish()

    PolicyMachine.__name__ = f"PolicyMachine[{case.name}]"
    return PolicyMachine


@pytest.mark.parametrize("name", sorted(CASES))
def test_any_event_order(name: str) -> None:
    run_state_machine_as_test(
        machine_for(CASES[name]),
        settings=settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck)),
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixed_random_sequences(name: str) -> None:
    """The fuzz script's sequences 0..4: the same driver model without hypothesis."""
    for seed in range(5):
        run_random(CASES[name], seed, steps=60)
