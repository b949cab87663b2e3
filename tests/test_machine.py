"""prfl.runtime.machine: what a record says about the machine a run computed on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from prfl.runtime import machine


def test_cpuinfo_takes_the_first_processor_and_tolerates_no_file(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2\n\n"
                    "processor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Other: with a colon\n")
    assert machine._cpuinfo(info) == {"vendor_id": "AuthenticAMD", "model name": "AMD EPYC 7B13"}
    assert machine._cpuinfo(tmp_path / "absent") == {}


def test_fingerprint_names_what_decides_the_roundings() -> None:
    fp = machine.fingerprint()
    assert fp["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert fp["torch"] == torch.__version__ and fp["numpy"] == np.__version__
    assert json.loads(json.dumps(fp)) == fp  # goes into JSON records as it is
    fp["torch"] = "changed"  # each call is a new dict: a caller's edit does not leak into the next record
    assert machine.fingerprint()["torch"] == torch.__version__


def test_describe_in_words() -> None:
    m = {"cpu_vendor": "AuthenticAMD", "cpu_model": "AMD EPYC", "cpu_capability": "AVX2", "torch": "2.13.0+cpu",
         "numpy": "2.4.6", "python": "3.11.7"}
    assert machine.describe(m) == "AMD EPYC, AVX2, torch 2.13.0+cpu, numpy 2.4.6"
    assert machine.describe({"cpu_vendor": "GenuineIntel"}) == "GenuineIntel, ?, torch ?, numpy ?"
    assert machine.describe({}).startswith("unknown processor, ")
