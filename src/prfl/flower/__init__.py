"""Run prfl policies on Flower (optional extra: ``pip install 'prfl[flower]'``).

The ServerApp (:mod:`prfl.flower.server_app`) drives any prfl policy in real time on Flower's
Grid (``push_messages`` / ``pull_messages``); the ClientApp (:mod:`prfl.flower.client_app`) trains
with prfl's trainer on the node's partition and keeps a cache of residual pieces. The same app
runs on Flower's Simulation Engine (Ray) and on a Deployment Engine (SuperLink + SuperNodes).

Importing this package does not import Flower; its submodules do (see :func:`require_flwr`).
"""

from __future__ import annotations

FLWR_VERSION = "1.41.0"
"""The Flower release this package is written and tested against."""


def require_flwr() -> None:
    """Raise an ImportError naming the fix when Flower is not importable."""
    try:
        import flwr  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "prfl.flower needs Flower, which is not installed in this Python environment; "
            f"install it with `pip install 'prfl[flower]'` (flwr[simulation]=={FLWR_VERSION})"
        ) from exc


__all__ = ["FLWR_VERSION", "require_flwr"]
