"""A shaped federation in its own process, for the clean-up tests (``python shaping_child.py DIR MODE``).

Prints one JSON line (slot, relay port, the process ids it started) once everything runs, then
waits to be signalled (``wait``, with SIGTERM turned into an exception as the benchmark does),
raises (``raise``), or waits without any handler of its own (``plain``, for SIGKILL).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from prfl.flower.shaping import LinkSpeeds, ShapedFederation, terminate_on_sigterm


def main() -> None:
    workdir, mode = Path(sys.argv[1]), sys.argv[2]
    speeds = LinkSpeeds(down_bps=(50e3,), up_bps=(40e3,), server_up_bps=80e3, server_down_bps=60e3)
    with terminate_on_sigterm(), ShapedFederation(workdir, speeds) as fed:
        assert fed.federation is not None and fed.shaper is not None and fed.relay is not None
        procs = [p.popen.pid for p in (fed.federation.superlink, *fed.federation.nodes) if p.popen is not None]
        print(json.dumps({"slot": fed.shaper.slot, "port": fed.relay.port, "pids": procs}), flush=True)
        if mode == "raise":
            raise RuntimeError("failure inside the shaped run")
        while True:
            time.sleep(0.2)


if __name__ == "__main__":
    main()
