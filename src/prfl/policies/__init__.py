"""Server policies and their registry.

A registered policy class is built as ``cls(ctx, config)``, where ``config`` is an instance of the
class attribute ``config_cls`` (a dataclass whose ``__post_init__`` validates its fields).
:func:`build_policy` turns keyword options into that config. Add a policy with
:func:`register_policy` (or an entry in :data:`POLICIES`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prfl.policies.base import Policy, PolicyContext
from prfl.policies.fedasync import FedAsync, FedAsyncConfig
from prfl.policies.fedavg import FedAvg, FedAvgConfig
from prfl.policies.fleet import FleetPolicy
from prfl.policies.fedbuff import FedBuff, FedBuffConfig
from prfl.policies.fedfix import FedFix, FedFixConfig
from prfl.policies.heterofl import HeteroFL, HeteroFLConfig
from prfl.policies.prfl import PRFL, PRFLConfig

POLICIES: dict[str, type[Policy]] = {
    "fedavg": FedAvg,
    "fedasync": FedAsync,
    "fedbuff": FedBuff,
    "fedfix": FedFix,
    "heterofl": HeteroFL,
    "prfl": PRFL,
}


def register_policy(name: str, cls: type[Policy]) -> None:
    """Make ``cls`` buildable as ``name``; it must define ``config_cls`` (a dataclass)."""
    if name in POLICIES:
        raise ValueError(f"a policy named {name!r} is already registered ({POLICIES[name].__name__})")
    config_cls = getattr(cls, "config_cls", None)
    if config_cls is None or not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{cls.__name__} must define config_cls, a dataclass of its options")
    POLICIES[name] = cls


def build_policy(name: str, ctx: PolicyContext, **options: Any) -> Policy:
    """Build the policy registered as ``name`` with config ``options``.

    Raises ValueError naming the valid policies for an unknown name, and naming the option for an
    unknown, missing or invalid option.
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}")
    config_cls = cls.config_cls  # type: ignore[attr-defined]
    fields = dataclasses.fields(config_cls)
    valid = [f.name for f in fields]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option {unknown[0]!r} for policy {name!r}; valid options: {', '.join(valid)}"
        )
    missing = [
        f.name for f in fields
        if f.name not in options
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"policy {name!r} needs option {missing[0]!r}")
    try:
        config = config_cls(**options)
    except ValueError as err:
        raise ValueError(f"policy {name!r}: option {err}") from err
    return cls(ctx, config)  # type: ignore[call-arg]


__all__ = [
    "POLICIES",
    "FedAsync",
    "FedAsyncConfig",
    "FedAvg",
    "FedAvgConfig",
    "FedBuff",
    "FedBuffConfig",
    "FedFix",
    "FedFixConfig",
    "FleetPolicy",
    "HeteroFL",
    "HeteroFLConfig",
    "PRFL",
    "PRFLConfig",
    "Policy",
    "PolicyContext",
    "build_policy",
    "register_policy",
]
