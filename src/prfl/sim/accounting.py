"""What the simulated links charge for a task: ``honest`` (every byte) or ``reference`` (the PR-FL
reference code's cost model, so that the paper's own figures can be checked).

``honest`` (the default) charges what the policy's :class:`~prfl.policies.base.TaskSpec` says:
``download_bytes`` (of which ``server_egress_bytes`` cross the server's shared uplink),
``upload_bytes`` (values, positions and importance scores alike), and compute time from the
FLOPs of the task at the device's drawn speed. Only PR-FL's residual pieces set
``server_egress_bytes``; with ``model_relay`` every policy's models are published once per model
version (:class:`VersionPublication`), so a version handed to several clients crosses the
server's uplink once whichever policy hands it out.

``reference`` reproduces the reference simulator (machengjie321/PR-FL, ``bases/fl/simulation_real/
Prune_Recover_FL.py``, cited R:line):

- **Downloads** are the reference's pickled state dicts (R:666-691, sized at R:1523): every
  prunable weight tensor, viewed as 2-D, becomes a sparse COO tensor that stores each kept weight
  as an fp32 value plus two int64 coordinates; every other tensor (biases, ...) stays dense fp32::

      D(kept, M) = (4 + 2 * 8) kept + 4 M = 20 kept + 4 M   bytes

  with ``kept`` the sub-model's kept prunable weights and ``M`` the non-prunable values: 5x the
  dense fp32 model at density 1. The pickle's framing (about 0.5 KB per stored tensor, by torch
  version) and the exact zeros ``to_sparse`` drops are left out; the reference also rounds its
  sizes to 1e-4 MiB and counts them against speeds in MB/s as if MiB/s, prfl charges bytes against
  bytes/s (1 MB = 1e6 bytes), so its transfers take 2^20 / 1e6 = 1.049x the reference's seconds.
- **Broadcast once per server step** (R:1517, 2433): the model a step hands out crosses the
  server's uplink once. Residual pieces are nested prefixes, so the server pushes only what the
  step's largest sub-model so far adds to what it already pushed; a task without pieces pushes
  its whole sub-model unless a task of the same step already carried the same one (density and
  width). The rest of a download is relayed at the client's own speed. The step is the model
  version the task starts from.
- **Uploads** carry the values only (R:1666-1683): ``upload_bytes - upload_index_bytes -
  upload_importance_bytes``; importance scores travel free.
- **Compute** is the same for every client (the reference charges measured wall time x 1 for
  every client, R:1811, 2063-2066): with ``compute_time: flops`` a task takes the FLOPs of its
  local steps on the dense model (the reference trains W ⊙ mask densely) divided by the fastest
  device's nominal FLOP/s; with ``compute_time: measured`` it takes the measured seconds, as in
  the reference.

Step closing (R:2471-2489) and FedAsync's one arrival per step (R:2164-2202) are rules of the
policies, given the server's nominal uplink and these sizes through
:class:`~prfl.policies.base.StepTiming`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from prfl.policies.base import StepTiming, TaskSpec

from prfl.settings import ACCOUNTING_MODES, Accounting, check_accounting  # noqa: F401  (defined once, there)

COO_VALUE_BYTES = 4
"""Bytes of a kept weight's fp32 value in the reference's sparse tensors."""
COO_INDEX_BYTES = 2 * 8
"""Bytes of a kept weight's two int64 coordinates (row, column of the 2-D view)."""
DENSE_VALUE_BYTES = 4
"""Bytes of a dense fp32 value."""
REFERENCE_MARGIN = 0.1
"""Seconds the reference adds to a step's download time when it closes the step (R:2483)."""


def reference_model_bytes(kept: int, dense_values: int) -> int:
    """Bytes of a sub-model as the reference sends it: 20 kept + 4 M (see the module docstring)."""
    if kept < 0 or dense_values < 0:
        raise ValueError(f"kept and dense_values must be >= 0, got {kept} and {dense_values}")
    return (COO_VALUE_BYTES + COO_INDEX_BYTES) * kept + DENSE_VALUE_BYTES * dense_values


def values_only_bytes(task: TaskSpec) -> int:
    """The part of ``task``'s upload that is weight values (what the reference charges)."""
    return max(0, task.upload_bytes - task.upload_index_bytes - task.upload_importance_bytes)


class ReferenceSizes:
    """Reference download sizes of the tasks of a model with ``num_prunable`` prunable weights out
    of ``total``.

    A task's kept prunable weights are its mask's count (all N without a mask); a width-sliced
    task (``width`` < 1) keeps ``round(density N)`` prunable weights out of its sliced vector and
    the rest of that vector is dense. Mask counts are cached per mask tensor.
    """

    def __init__(self, num_prunable: int, total: int) -> None:
        if not 0 <= num_prunable <= total:
            raise ValueError(f"need 0 <= num_prunable <= total, got {num_prunable} and {total}")
        self.num_prunable = num_prunable
        self.total = total
        self._counts: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}

    def kept(self, task: TaskSpec) -> tuple[int, int]:
        """(kept prunable weights, dense values) of ``task``'s sub-model."""
        if task.width != 1.0:
            size = int(task.weights.numel())  # the sliced vector (sized at dispatch, while the task holds it)
            if size == 0:
                raise ValueError(f"task {task.task_id}: a width-sliced task is sized from its weights, which it no longer holds")
            kept = min(round(task.density * self.num_prunable), size)
            return kept, size - kept
        suffix = self.total - self.num_prunable
        if task.mask is None:
            return self.num_prunable, suffix
        return self._mask_count(task.mask), suffix

    def _mask_count(self, mask: torch.Tensor) -> int:
        hit = self._counts.get(id(mask))
        if hit is not None and hit[0]() is mask:
            return hit[1]
        count = int(torch.count_nonzero(mask))
        if len(self._counts) > 256:
            self._counts = {k: v for k, v in self._counts.items() if v[0]() is not None}
        self._counts[id(mask)] = (weakref.ref(mask), count)
        return count

    def download_bytes(self, task: TaskSpec) -> int:
        """D = 20 kept + 4 M: the reference's pickled COO sub-model."""
        return reference_model_bytes(*self.kept(task))

    def step_timing(self, server_up_bps: float) -> StepTiming:
        """The reference's step-closing rule with these sizes and the server's nominal uplink."""
        return StepTiming(server_up_bps=server_up_bps, margin=REFERENCE_MARGIN, download_bytes=self.download_bytes)


def publication_key(task: TaskSpec) -> tuple[int | float, ...]:
    """What identifies a whole sub-model within one model version, for the broadcasts and relays
    that send it once: the content its policy names (``task.content_key``), else its density and
    width (a policy hands every client of a version the same sub-model at those)."""
    return task.content_key if task.content_key is not None else (float(task.density), float(task.width))


class VersionPublication:
    """Which bytes of an honest download cross the server's uplink with ``model_relay``: each model
    version's sub-models once, for every policy.

    A task whose policy sized its own server egress (PR-FL's residual pieces, whose ledger knows
    which pieces of the version are out) keeps it. Any other task crosses the uplink with its whole
    download the first time its sub-model (:func:`publication_key`) goes out in its version; a
    later task of the same version and sub-model is served entirely from the relay, at the
    client's own speed. Only the current version is remembered (a policy dispatches from its
    current model).
    """

    def __init__(self) -> None:
        self._version: int | None = None
        self._models: frozenset[tuple[int | float, ...]] = frozenset()

    def egress(self, task: TaskSpec) -> int:
        """Bytes the server's uplink carries for ``task`` (at most its download)."""
        if task.server_egress_bytes is not None:
            return min(task.server_egress_bytes, task.download_bytes)
        if self._version != task.version:
            self._version, self._models = task.version, frozenset()
        key = publication_key(task)
        if key in self._models:
            return 0
        self._models = self._models | {key}
        return task.download_bytes

    def state_dict(self) -> dict[str, Any]:
        return {"version": self._version, "models": sorted(self._models)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        v = state.get("version")
        self._version = None if v is None else int(v)
        self._models = frozenset(tuple(k) for k in state.get("models", ()))


@dataclass
class _StepPublication:
    version: int
    prefix_kept: int = -1  # kept weights of the largest residual prefix pushed (-1: none yet)
    models: frozenset[tuple[int | float, ...]] = frozenset()  # publication_key of whole sub-models pushed


class ReferenceBroadcast:
    """Which bytes of a reference-sized download cross the server's uplink: each step's model once.

    Keyed by the model version a task starts from (one server step). With residual pieces
    (``task.pieces``) the pushed part is a prefix of the ranking: a task whose sub-model keeps
    ``k`` weights pushes ``20 (k - k_pushed)`` bytes, plus the dense values ``4 M`` if it is the
    step's first; without pieces it pushes its whole ``D`` unless the same sub-model
    (:func:`publication_key`) was pushed this step. Only the current step is remembered.
    """

    def __init__(self, sizes: ReferenceSizes) -> None:
        self.sizes = sizes
        self._step: _StepPublication | None = None

    def egress(self, task: TaskSpec) -> int:
        """Bytes the server pushes for ``task`` (at most its reference download)."""
        if self._step is None or self._step.version != task.version:
            self._step = _StepPublication(task.version)
        step = self._step
        kept, dense = self.sizes.kept(task)
        if task.pieces:
            if kept <= step.prefix_kept:
                return 0
            pushed = (COO_VALUE_BYTES + COO_INDEX_BYTES) * (kept - max(step.prefix_kept, 0))
            if step.prefix_kept < 0:
                pushed += DENSE_VALUE_BYTES * dense
            step.prefix_kept = kept
            return pushed
        key = publication_key(task)
        if key in step.models:
            return 0
        step.models = step.models | {key}
        return reference_model_bytes(kept, dense)

    def state_dict(self) -> dict[str, Any]:
        s = self._step
        if s is None:
            return {"step": None}
        return {"step": {"version": s.version, "prefix_kept": s.prefix_kept, "models": sorted(s.models)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = state.get("step")
        self._step = None if s is None else _StepPublication(
            int(s["version"]), int(s["prefix_kept"]), frozenset(tuple(k) for k in s["models"]))
