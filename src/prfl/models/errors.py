"""Error type shared by the model zoo and the cost model."""

from __future__ import annotations

__all__ = ["ModelError"]


class ModelError(ValueError):
    """Raised for unknown model names, unsupported input shapes or bad options."""
