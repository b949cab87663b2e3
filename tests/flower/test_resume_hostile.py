"""The Flower server's resume refuses a pickle checkpoint in its out-dir and runs none of it
(the same crafted file as tests/reliability/test_rel_hostile_checkpoint.py)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed: pip install 'prfl[flower]' to run the Flower tests")

from flower_fakegrid import FakeGrid
from flower_support import SMALL_RUN

from prfl.config import ConfigError
from prfl.flower.client_app import make_client_app
from prfl.flower.server_app import run_server


class Marker:
    """Unpickling this calls open(path, "w"): it creates the marker file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted_checkpoint(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"kind": "flower-driver", "policy": {"payload": Marker(marker)}, "history_offset": 0, "now": 0.0}, buf)
    data = buf.getvalue()
    return data + b"PRFLCKP1" + len(data).to_bytes(8, "little") + hashlib.sha256(data).digest()


def _run(tmp_path: Path, extra: dict) -> dict:
    rc = {**SMALL_RUN, "out-dir": str(tmp_path / "run"), "reply-timeout": 5.0, "wait-for-nodes": 2.0,
          "poll-interval": 0.01, "discover-interval": 0.05, "probe-interval": 0.05, "idle-timeout": 5.0, **extra}
    grid = FakeGrid(make_client_app(), rc, [{"partition-id": i, "num-partitions": 3} for i in range(3)])
    return run_server(grid, rc)


def test_server_resume_refuses_a_pickle_checkpoint_and_runs_none_of_it(tmp_path: Path) -> None:
    _run(tmp_path, {"prfl.sim.max_rounds": 3, "checkpoint-every-rounds": 1})
    run = tmp_path / "run"
    marker = tmp_path / "marker"
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        assert (run / name).is_file()
        (run / name).write_bytes(crafted_checkpoint(marker))
    with pytest.raises(ConfigError) as info:
        _run(tmp_path, {"prfl.sim.max_rounds": 6, "checkpoint-every-rounds": 1, "resume": True})
    message = str(info.value)
    assert not marker.exists()
    assert "\n" not in message and str(run / "checkpoint.pt") in message and "pickle" in message
    assert "resume = false" in message  # what to do, in the server's terms
    assert (run / "checkpoint.pt").read_bytes() == crafted_checkpoint(marker)  # left as it was, for inspection
