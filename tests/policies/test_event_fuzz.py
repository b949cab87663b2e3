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

        @rule(client=clients, variant=st.sampled_from(RESULT_VARIANTS), dt=dts, noise=st.integers(0, 99))
        def arrive(self, client: int, variant: str, dt: float, noise: int) -> None:
            self.fz.arrive(client, variant, dt, noise)

        @rule(client=clients, dt=dts)
        def fail(self, client: int, dt: float) -> None:
            self.fz.fail_task(client, dt)

        @rule(pick=picks, dt=dts)
        def fire(self, pick: int, dt: float) -> None:
            self.fz.fire(pick, dt)

        @rule(pick=picks, accuracy=st.floats(0.0, 1.0), dt=dts)
        def evaluate(self, pick: int, accuracy: float, dt: float) -> None:
            self.fz.evaluate(pick, accuracy, dt)

        @rule(client=clients, dt=dts)
        def offline(self, client: int, dt: float) -> None:
            self.fz.offline(client, dt)

        @rule(client=clients, dt=dts)
        def online(self, client: int, dt: float) -> None:
            self.fz.online_(client, dt)

        @rule(client=clients, dt=dts)
        def idle(self, client: int, dt: float) -> None:
            self.fz.idle(client, dt)

        @rule()
        def checkpoint(self) -> None:
            self.fz.checkpoint()

        @rule(kind=st.sampled_from(HOSTILE_KINDS), pick=picks, dt=dts)
        def hostile(self, kind: str, pick: int, dt: float) -> None:
            self.fz.hostile(kind, pick, dt)

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
