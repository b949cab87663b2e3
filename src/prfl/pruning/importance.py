"""The server's importance scores: how the clients' squared gradients become a ranking's scores.

A client reports ``g^2 * n`` (the squared gradient of its last local step times its sample count)
for the prunable weights. Each report is min-max normalised over the whole reported vector
(zeros of weights the client did not report included, as the PR-FL reference does), so clients
with large gradients do not dominate, then accumulated. Two rules turn the accumulated reports
into scores at the end of a ranking interval:

- ``holders`` (the PR-FL reference, ``R:2086-2106`` and ``S:663-687`` in ALGORITHMS.md): each
  weight's score is the mean of its non-zero normalised reports, taken over the clients that
  reported it (``sum_k r_k / #{k : r_k != 0}``). The scores persist across intervals: a weight
  nobody reported this interval keeps its last score, and a weight that has never had one is
  filled with ``g_min * |w|``, where ``g_min`` is the smallest non-zero mean of its layer this
  interval (the smallest over the other layers if its layer has none), so an untrained weight
  ranks by magnitude below every trained one of similar size.
- ``all`` (prfl's earlier rule): the plain mean of the reports of this interval over every
  report, pruned positions counting as zeros; nothing persists.

Whichever rule, clients that train a sparse sub-model under ``scope="kept"`` report only their
kept weights (the reference's forward pass multiplies the weights by the mask, so pruned weights
get no gradient); ``scope="all"`` reports the gradient of every prunable weight.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

AVERAGES = ("holders", "all")


def normalise_report(grad_sq: torch.Tensor) -> torch.Tensor:
    """``(g - min g) / (max g - min g)`` over the whole vector (zeros if it is constant)."""
    g = grad_sq.to(torch.float32)
    lo, hi = g.min(), g.max()
    if not hi > lo:
        return torch.zeros_like(g)
    return (g - lo) / (hi - lo)


class ImportanceScores:
    """Accumulates normalised reports over a ranking interval and turns them into scores."""

    def __init__(self, num_prunable: int, layer_bounds: Sequence[tuple[int, int]],
                 average: Literal["holders", "all"] = "holders") -> None:
        if average not in AVERAGES:
            raise ValueError(f"importance_average must be one of {', '.join(AVERAGES)}, got {average!r}")
        self.n = int(num_prunable)
        self.layer_bounds = tuple((int(a), int(b)) for a, b in layer_bounds)
        self.average = average
        self.total: torch.Tensor | None = None  # sum of normalised reports this interval
        self.holders: torch.Tensor | None = None  # reports that were non-zero, per weight (holders rule)
        self.reports = 0
        self.scores: torch.Tensor | None = None  # persistent scores (holders rule)

    def add(self, grad_sq: torch.Tensor) -> None:
        """Accumulate one client's report (length N; zeros where it reported nothing)."""
        if grad_sq.numel() != self.n:
            raise ValueError(f"an importance report has {grad_sq.numel()} entries, the model {self.n} prunable weights")
        r = normalise_report(grad_sq.reshape(-1))
        if self.total is None:
            self.total = r.clone()
        else:
            self.total += r
        if self.average == "holders":
            nz = (r != 0).to(torch.int32)
            if self.holders is None:
                self.holders = nz
            else:
                self.holders += nz
        self.reports += 1

    def add_kept(self, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Accumulate a report that is zero outside ``positions`` (ascending, distinct), given by
        its ``values`` there: what :meth:`add` does with the whole vector, at O(kept) cost.

        Squared gradients are >= 0, so with any position left out the report's minimum is 0 and
        its zeros normalise to exactly +0.0: they change neither the total nor the holders, and
        the kept values normalise as in the whole vector. Without one left out (every weight
        kept) the whole vector is the values themselves."""
        if positions.numel() != values.numel() or positions.numel() > self.n:
            raise ValueError(f"an importance report has {values.numel()} values for {positions.numel()} positions "
                             f"of {self.n} prunable weights")
        if positions.numel() == self.n:
            self.add(values)
            return
        v = values.reshape(-1).to(torch.float32)
        if v.numel() and bool(v.min() < 0):
            raise ValueError("an importance report has negative values; squared gradients are >= 0")
        hi = v.max() if v.numel() else None
        if self.total is None:
            self.total = torch.zeros(self.n, dtype=torch.float32)
        if self.average == "holders" and self.holders is None:
            self.holders = torch.zeros(self.n, dtype=torch.int32)
        if hi is not None and hi > 0:  # else the report is constant (all zero): nothing to add
            r = v / hi  # (g - 0) / (hi - 0)
            idx = positions.reshape(-1).to(torch.int64)  # distinct: one addition per weight, as add() makes it
            self.total.index_add_(0, idx, r)
            if self.average == "holders":
                assert self.holders is not None
                self.holders.index_add_(0, idx, (r != 0).to(torch.int32))
        self.reports += 1

    @property
    def pending(self) -> bool:
        """True when reports arrived since the last :meth:`take`."""
        return self.reports > 0

    def take(self, weights: torch.Tensor) -> torch.Tensor | None:
        """The scores for a new ranking (None if no report arrived), and a fresh interval.

        ``weights`` is the current global prunable prefix, for the ``g_min * |w|`` fill.
        """
        if not self.reports or self.total is None:
            return None
        if self.average == "all":
            scores = self.total / self.reports
        else:
            assert self.holders is not None
            mean = torch.where(self.holders > 0, self.total / self.holders.clamp_min(1), torch.zeros_like(self.total))
            scores = self.scores.clone() if self.scores is not None else torch.zeros(self.n, dtype=torch.float32)
            reported = mean != 0
            scores[reported] = mean[reported]
            self._fill(scores, mean, weights)
            self.scores = scores
        self.total, self.holders, self.reports = None, None, 0
        return scores

    def _fill(self, scores: torch.Tensor, mean: torch.Tensor, weights: torch.Tensor) -> None:
        """Weights without a score get ``g_min * |w|`` (``g_min``: smallest non-zero mean of the layer)."""
        g_min: list[float | None] = []
        for a, b in self.layer_bounds:
            m = mean[a:b]
            nz = m[m != 0]
            g_min.append(float(nz.min()) if nz.numel() else None)
        known = [g for g in g_min if g is not None]
        if not known:
            return
        fallback = min(known)
        mags = weights[: self.n].detach().abs().to(torch.float32)
        for (a, b), g in zip(self.layer_bounds, g_min):
            empty = scores[a:b] == 0
            if bool(empty.any()):
                scores[a:b][empty] = (fallback if g is None else g) * mags[a:b][empty]

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "holders": self.holders, "reports": self.reports, "scores": self.scores}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = None if state["total"] is None else state["total"].clone()
        self.holders = None if state["holders"] is None else state["holders"].clone()
        self.reports = int(state["reports"])
        self.scores = None if state["scores"] is None else state["scores"].clone()
