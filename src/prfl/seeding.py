"""Seeds by address: every random draw is keyed by (run seed, stream, client, task, ...).

Deriving each draw's seed from its address, never from a shared generator's position, is what
makes the inline, process-pool and Ray executors give the same history bit for bit.
"""

from __future__ import annotations

import zlib

import numpy as np

# Named streams keep draws for different purposes independent even at equal (client, task).
_STREAMS = ("init", "train", "link", "compute", "availability", "cohort", "partition", "policy", "fleet")


def stream_id(name: str) -> int:
    """A stable integer for a stream name (CRC32, so it does not depend on Python's hash seed)."""
    return zlib.crc32(name.encode("utf-8"))


def seed_sequence(run_seed: int, stream: str, *keys: int) -> np.random.SeedSequence:
    """The SeedSequence at address (run_seed, stream, *keys)."""
    if run_seed < 0 or any(k < 0 for k in keys):
        raise ValueError(f"seed addresses must be non-negative integers, got {run_seed!r}, {keys!r}")
    return np.random.SeedSequence([int(run_seed), stream_id(stream), *(int(k) for k in keys)])


def rng_for(run_seed: int, stream: str, *keys: int) -> np.random.Generator:
    """A NumPy generator for the draw at address (run_seed, stream, *keys)."""
    return np.random.default_rng(seed_sequence(run_seed, stream, *keys))


def int_seed(run_seed: int, stream: str, *keys: int) -> int:
    """A 63-bit integer seed (for torch.Generator.manual_seed) at the given address."""
    return int(seed_sequence(run_seed, stream, *keys).generate_state(2, np.uint64)[0] >> np.uint64(1))
