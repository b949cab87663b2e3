"""Layering rules checked on the source (AST), so that a violation fails the suite.

Rule 1 (policies are read through their typed interface). In every module of ``src/prfl``
outside ``src/prfl/policies/``, an expression that names a policy object, i.e. a variable or
attribute called ``policy`` or ``pol`` (``policy``, ``self.policy``, ``sim.policy``, ...), is
never

- followed by a private attribute: ``<policy>._name`` (one leading underscore; dunders such as
  ``__class__`` are allowed), nor
- the object of ``getattr``, ``hasattr`` or ``setattr`` (reading attributes by name is how
  private state and undeclared hooks were read before :class:`prfl.policies.base.Policy` had
  ``metrics()``, ``tasks_in_flight()`` and ``residual_plan()``).

The check is syntactic: a policy held under another name is not seen, which is why drivers keep
the policy in an attribute called ``policy``.

Rule 2 (the Flower path does not depend on the simulator). No module of ``prfl.flower`` imports
``prfl.sim`` (the run directory, history and checkpoint format live in ``prfl.runtime``, the
worker's workspace in ``prfl.client.workspace``). The scenario builder ``prfl.run`` is shared.

Rule 3 (classes stay readable). Every class in ``src/prfl`` is under 400 lines (a long one is
split into parts, e.g. mixins working on one state: ``prfl.buffer.ClientBuffer``,
``prfl.policies.prfl.PRFL``, ``prfl.flower.driver.FlowerDriver``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "prfl"
POLICY_NAMES = {"policy", "pol"}


def _modules(under: Path) -> list[Path]:
    return sorted(p for p in under.rglob("*.py"))


def _names_a_policy(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in POLICY_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr in POLICY_NAMES
    return False


def policy_reads(source: str) -> list[str]:
    """Violations of rule 1 in ``source``, as ``line: text``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and _names_a_policy(node.value)):
            out.append(f"{node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and node.args and _names_a_policy(node.args[0])):
            out.append(f"{node.lineno}: {ast.unparse(node)}")
    return out


def test_the_rule_sees_what_it_forbids() -> None:
    bad = (
        "x = self.policy._split\n"
        "y = getattr(policy, 'densities', None)\n"
        "z = hasattr(sim.policy, 'buffer')\n"
        "w = pol._busy\n"
    )
    assert [v.split(":")[0] for v in policy_reads(bad)] == ["1", "2", "3", "4"]
    fine = "a = self._heap\nb = self.policy.metrics()\nc = policy.__class__\nd = getattr(self, name)\n"
    assert policy_reads(fine) == []


@pytest.mark.parametrize("path", [p for p in _modules(SRC) if "policies" not in p.relative_to(SRC).parts],
                         ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_outside_the_policies_reads_a_policys_private_state(path: Path) -> None:
    violations = policy_reads(path.read_text(encoding="utf-8"))
    assert not violations, f"{path.relative_to(SRC)} reads policy internals: {violations}; add a typed method to Policy"


def test_flower_does_not_import_the_simulator() -> None:
    offenders = []
    for path in _modules(SRC / "flower"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if n == "prfl.sim" or n.startswith("prfl.sim.")]
    assert not offenders, f"prfl.flower imports the simulator: {offenders}"


# Rule 3
def test_classes_stay_under_400_lines() -> None:
    long = []
    for path in _modules(SRC):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 400:
                long.append(f"{path.relative_to(SRC)}: {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, f"classes over 400 lines: {long}"
