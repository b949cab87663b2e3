"""Max-min fair sharing of one capacity among capped flows (water-filling).

Flows ``f`` with caps ``c_f`` share a capacity ``C``. Visit the flows by increasing cap with
``R = C`` and ``n`` flows left; the fair share is ``s = R / n``; a flow with ``c_f <= s`` gets
``r_f = c_f`` (then ``R -= c_f``, ``n -= 1``), and once the smallest remaining cap exceeds ``s``
all remaining flows get ``r_f = s``. Hence ``sum_f r_f = min(C, sum_f c_f)`` and ``r_f <= c_f``.
With unlimited capacity (``None`` or ``inf``) every flow runs at its cap. Units are the caller's
(bytes/s throughout prfl).

The simulator's shared server links (:class:`prfl.sim.links.SharedLink`) and the shaped links of
a Flower deployment (:mod:`prfl.flower.shaping`, whose ``tc`` classes are assured these rates)
both use it; it lives here so that neither depends on the other.
"""

from __future__ import annotations

import math

__all__ = ["water_fill"]


def water_fill(caps: list[float], capacity: float | None) -> list[float]:
    """Max-min fair rates for flows with caps ``caps`` sharing ``capacity`` (None: unlimited).

    Flows whose cap is below the running fair share ``R / n`` keep their cap; the rest split the
    remainder ``R`` equally. Ties in caps are visited in list order, so the result is deterministic.
    """
    if capacity is None or math.isinf(capacity):
        return list(caps)
    rates = [0.0] * len(caps)
    order = sorted(range(len(caps)), key=lambda i: caps[i])
    remaining = float(capacity)
    left = len(caps)
    for pos, i in enumerate(order):
        share = remaining / left
        if caps[i] <= share:
            rates[i] = caps[i]
            remaining -= caps[i]
            left -= 1
        else:
            for j in order[pos:]:
                rates[j] = share
            break
    return rates
