"""Fixtures shared by the prfl.data tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_prfl_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's $PRFL_DATA from changing what the tests find."""
    monkeypatch.delenv("PRFL_DATA", raising=False)
