"""prfl: federated learning across heterogeneous devices (PR-FL and baselines)."""

__version__ = "0.1.0"
