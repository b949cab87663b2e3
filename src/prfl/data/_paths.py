"""Where loaders look for data files: an explicit directory, then ``$PRFL_DATA``, then system dirs."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

ENV_VAR = "PRFL_DATA"


def search_roots(
    data_dir: str | os.PathLike[str] | None,
    subdir: str,
    system_dirs: Iterable[str | os.PathLike[str]] = (),
) -> list[Path]:
    """Candidate directories in priority order, without duplicates.

    Each user-given base (``data_dir``, then every entry of ``$PRFL_DATA``) contributes
    the base itself and ``base/subdir``; system directories are appended last.
    """
    bases: list[Path] = []
    if data_dir is not None:
        bases.append(Path(data_dir).expanduser())
    env = os.environ.get(ENV_VAR, "")
    bases.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    roots: list[Path] = []
    for base in bases:
        roots.extend((base, base / subdir))
    roots.extend(Path(p) for p in system_dirs)
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def suggested_dir(data_dir: str | os.PathLike[str] | None, subdir: str) -> str:
    """The directory to tell a user to put files into."""
    if data_dir is not None:
        return str(Path(data_dir).expanduser() / subdir)
    env = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    if env:
        return str(Path(env[0]).expanduser() / subdir)
    return f"<dir>/{subdir}, with <dir> passed as data_dir or listed in ${ENV_VAR}"


def format_places(places: Sequence[Path]) -> str:
    """Bullet list of searched places for error messages."""
    if not places:
        return "  (nowhere: no data_dir given and $PRFL_DATA is unset)"
    return "\n".join(f"  - {p}" for p in places)
