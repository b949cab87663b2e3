"""The command line as a new user meets it: one-line errors, the resolved configuration with its
meanings, limits that say what they mean, and output that fits 80 columns."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prfl.cli import app, split_message
from prfl.config import load_config
from prfl.explain import REQUIRED, option_help, resolved_config
from prfl.policies import POLICIES

SMALL = ["--set", "data.dataset=digits", "--set", "model.name=mlp", "--set", "model.options={hidden: [16]}",
         "--set", "sim.max_rounds=2", "--set", "sim.executor=inline", "--no-baselines", "-q"]


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


# ---------------------------------------------------------------------------- bad input
def _bad_fleet(d: Path) -> Path:
    p = d / "fleet.csv"
    p.write_text("client,compute_flops,down_bps,up_bps\n0,fast,1e6,1e6\n", encoding="utf-8")
    return p


def _corrupt_cifar(d: Path) -> Path:
    (d / "cifar").mkdir()
    (d / "cifar" / "cifar-10-python.tar.gz").write_bytes(b"not an archive")
    return d / "cifar"


def _corrupt_fmnist(d: Path) -> Path:
    (d / "fm").mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (d / "fm" / name).write_bytes(b"\x1f\x8b truncated")
    return d / "fm"


def _bad_checkpoint(d: Path) -> Path:
    result = invoke("run", *SMALL, "--set", "sim.checkpoint_every_rounds=1", "--out", str(d / "ok"))
    assert result.exit_code == 0, result.output
    run_dir = d / "ok" / "prfl"
    (run_dir / "checkpoint.pt").write_bytes(b"torn")
    (run_dir / "checkpoint.prev.pt").unlink(missing_ok=True)
    return run_dir


def _finished_run(d: Path) -> Path:
    result = invoke("run", *SMALL, "--set", "sim.checkpoint_every_rounds=1", "--out", str(d / "done"))
    assert result.exit_code == 0, result.output
    return d / "done" / "prfl"


def _bad_yaml(d: Path) -> Path:
    p = d / "bad.yaml"
    p.write_text("data: [digits\n", encoding="utf-8")
    return p


BAD_INPUTS = {
    # name: (how to build the arguments in a temporary directory, words the error must contain)
    "missing data set": (lambda d: ["run", *SMALL, "--set", "data.dataset=cifar10", "--set", f"data.data_dir={d}"],
                         ["cifar10", "searched"]),
    "corrupt archive": (lambda d: ["run", *SMALL, "--set", "data.dataset=cifar10", "--set",
                                   f"data.data_dir={_corrupt_cifar(d)}"], ["not a readable tar archive"]),
    "corrupt IDX files": (lambda d: ["run", *SMALL, "--set", "data.dataset=fashion-mnist", "--set",
                                     f"data.data_dir={_corrupt_fmnist(d)}"], ["fashion-mnist", "gzip"]),
    "bad fleet file": (lambda d: ["run", *SMALL, "--set", "data.num_clients=1", "--set", f"fleet.file={_bad_fleet(d)}"],
                       ["compute_flops", "not a number"]),
    "missing fleet file": (lambda d: ["run", *SMALL, "--set", f"fleet.file={d / 'nowhere.csv'}"], ["does not exist"]),
    "bad checkpoint": (lambda d: ["run", "--resume", str(_bad_checkpoint(d)), "-q"], ["no usable checkpoint"]),
    "extend without resume": (lambda d: ["run", *SMALL, "--extend-to", "3000"], ["--extend-to", "--resume"]),
    "extend to an earlier time": (lambda d: ["run", "--resume", str(_finished_run(d)), "--extend-to", "5", "-q"],
                                  ["would end it sooner", "later time"]),
    "no checkpoint": (lambda d: ["run", "--resume", str(d), "-q"], ["not a run directory"]),
    "unknown field": (lambda d: ["run", *SMALL, "--set", "data.datset=digits"], ["data.datset", "--explain"]),
    "bad value": (lambda d: ["run", *SMALL, "--set", "data.dataset=mnist"], ["unknown data set 'mnist'"]),
    "bad number": (lambda d: ["run", *SMALL, "--set", "train.lr=-1"], ["train.lr", "greater than 0"]),
    "bad policy option": (lambda d: ["run", *SMALL, "--set", "policy.options={interval: 0}"], ["interval"]),
    "invalid YAML": (lambda d: ["run", str(_bad_yaml(d))], ["not valid YAML", "line 2"]),
    "missing config file": (lambda d: ["config", str(d / "nowhere.yaml")], ["does not exist"]),
    "unknown preset": (lambda d: ["config", "--preset", "nosuch"], ["unknown preset"]),
    "unknown method": (lambda d: ["compare", "--preset", "demo", "--methods", "prfl", "nosuch", "--out", str(d / "c")],
                       ["unknown method 'nosuch'"]),
    "report of nothing": (lambda d: ["report", str(d)], ["holds no run directories"]),
    "report of no directory": (lambda d: ["report", str(d / "nowhere")], ["is not a directory"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_exit_2(case: str, tmp_path: Path) -> None:
    build, words = BAD_INPUTS[case]
    args = build(tmp_path)
    result = invoke(*args, env={"PRFL_DATA": "", "PRFL_DEBUG": ""})
    out = lines(result.output)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert 1 <= len(out) <= 2, f"{case}: {len(out)} lines:\n{result.output}"
    assert out[0].startswith("error: "), out
    if len(out) == 2:
        assert out[1].startswith("fix: "), out
    assert "Value error," not in result.output and "Traceback" not in result.output
    for w in words:
        assert w in result.output, (w, result.output)


def test_debug_flag_and_environment_show_the_traceback(tmp_path: Path) -> None:
    args = ["run", *SMALL, "--set", "data.dataset=cifar10", "--set", f"data.data_dir={tmp_path}"]
    for extra, env in ((["--debug"], {}), ([], {"PRFL_DEBUG": "1"})):
        result = invoke(*args, *extra, env={"PRFL_DATA": "", **env})
        assert result.exit_code == 2
        assert "Traceback (most recent call last)" in result.output and "DataError" in result.output
        assert lines(result.output)[-2].startswith("error: cifar10")


def test_split_message_joins_searched_places_and_keeps_the_fix() -> None:
    what, fix = split_message("x: expected files; searched:\n  - /a\n  - /b\nDownload them.\nThen retry.")
    assert what == "x: expected files; searched: /a, /b"
    assert fix == "Download them. Then retry."
    assert split_message("one line") == ("one line", None)


def test_python_dash_m_knows_every_command() -> None:
    """``python -m prfl.cli`` defines every command before it runs (compare and report included)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "prfl.cli", "report", "--help"], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "a run directory, a `prfl run` output root" in done.stdout


@pytest.mark.parametrize("command, text", [("config", "experiment YAML"), ("report", "a run directory"),
                                           ("run", "experiment YAML"), ("compare", "scenario YAML")])
def test_help_describes_positional_arguments(command: str, text: str) -> None:
    result = invoke(command, "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert text in result.output


# ---------------------------------------------------------------------------- prfl config
def test_config_prints_every_policy_option_with_its_default() -> None:
    result = invoke("config", "--preset", "demo", "--set", "policy.name=prfl",
                    "--set", "baselines=[{name: fedbuff, options: {k: 3}}, {name: fedfix}]")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(result.output)
    from prfl.policies.prfl import PRFLConfig

    prfl_defaults = {f.name: f.default for f in dataclasses.fields(PRFLConfig)}
    assert set(data["policy"]["options"]) == set(prfl_defaults)
    assert data["policy"]["options"]["interval"] == prfl_defaults["interval"]
    assert data["baselines"][0]["options"] == {"k": 3, "server_lr": 1.0}
    assert data["baselines"][1]["options"]["dt"] == REQUIRED
    assert "# policy fedfix: option dt has no default" in result.output


def test_config_explain_is_valid_yaml_with_a_meaning_for_every_field() -> None:
    cfg_args = ["--preset", "demo", "--set", "baselines=[{name: fedasync}, {name: fedavg}, {name: fedbuff}, "
                "{name: fedfix, options: {dt: 10}}, {name: heterofl}]"]
    plain = invoke("config", *cfg_args)
    explained = invoke("config", "--explain", *cfg_args)
    assert explained.exit_code == 0, explained.output
    assert yaml.safe_load(explained.output) == yaml.safe_load(plain.output)
    text = explained.output
    assert "# data set name" in text and "# stop at this virtual time, in seconds" in text
    assert "# mixing weight of an arriving model" in text  # a baseline option's line comment
    assert "# deltas buffered per server update" in text  # a docstring entry (FedBuff's k)
    # every line that sets a field has its meaning right above it
    rows = text.splitlines()
    for i, row in enumerate(rows):
        if ":" in row and not row.lstrip().startswith(("#", "-")):
            assert rows[i - 1].lstrip().startswith("#"), f"no comment above {row!r}"


def test_every_baseline_option_has_a_meaning() -> None:
    for name in POLICIES:
        if name == "prfl":
            continue  # PR-FL's options are checked below for the ones documented in its source
        fields = {f.name for f in dataclasses.fields(POLICIES[name].config_cls)}
        assert set(option_help(name)) == fields, (name, fields - set(option_help(name)))
    helps = option_help("prfl")
    assert helps["interval"].startswith("I: fastest-client rounds (or server steps, see `counting`) between ranking rebuilds")
    assert helps["buffer_storage"].startswith("how the buffer stores sparse models")  # comment block above


def test_option_help_sources_in_order() -> None:
    from prfl.explain import dataclass_help

    @dataclasses.dataclass
    class Options:
        """Docstring entries: ``c``: from the docstring. More. ``d`` (unit): qualified."""

        a: int = dataclasses.field(default=1, metadata={"help": "from metadata"})  # not this
        # from the block
        # above it
        b: int = 2
        c: int = 3
        d: float = 4.0
        e: int = 5  # from the line

    assert dataclass_help(Options) == {"a": "from metadata", "b": "from the block above it", "c": "from the docstring",
                                       "d": "unit: qualified", "e": "from the line"}


# ---------------------------------------------------------------------------- limits
def test_a_time_budget_alone_is_the_only_limit(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text("sim: {max_time: 2400}\n", encoding="utf-8")
    assert load_config(p).sim.max_rounds is None and load_config(p).sim.max_time == 2400
    assert load_config(overrides=["sim.max_time=50"]).sim.max_rounds is None
    assert load_config().sim.max_rounds == 300  # neither given: the default round budget
    both = load_config(overrides=["sim.max_time=50", "sim.max_rounds=7"]).sim
    assert (both.max_rounds, both.max_time) == (7, 50)
    assert both.budget() == "7 server updates or 50 virtual s, whichever comes first"
    # the resolved configuration says so explicitly and reads back the same
    assert resolved_config(load_config(p))["sim"]["max_rounds"] is None


def test_run_says_which_limit_stops_it_and_where_everything_is(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = tmp_path / "t.yaml"
    cfg.write_text("name: t\ndata: {dataset: digits}\nmodel: {name: mlp, options: {hidden: [16]}}\n"
                   "policy: {name: fedasync}\nbaselines: [{name: fedbuff, options: {k: 2}}]\n"
                   "fleet: {options: {compute_flops: 1.0e+6}}\n"  # slow devices: about 170 updates in 30 s
                   "sim: {max_time: 30, eval_every_seconds: 10, eval_every_rounds: null, targets: [0.2]}\n",
                   encoding="utf-8")
    result = invoke("run", str(cfg), "--out", str(out), "-q", env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    text = result.output
    assert "each stops at 30 virtual s" in text
    summary = yaml.safe_load((out / "fedasync" / "summary.json").read_text())
    assert summary["stopped"] == "time budget spent" and summary["server_rounds"] < 300
    for row in text.splitlines():
        assert len(row.rstrip().replace(str(out), "<out>")) <= 80, row  # only a long path may run past 80
    assert "final\n" not in text and "acc" in text and "time to" in text and "…" not in text
    assert "accuracy.png" in text and "results.json" in text and f"prfl report {out}" in text
    assert (out / "accuracy.png").is_file() and (out / "results.json").is_file()


def test_every_prfl_command_in_the_readme_parses() -> None:
    """Each `prfl ...` line of the README's code blocks names a real command with real options."""
    import re
    import shlex

    import typer.main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    group = typer.main.get_command(app)
    seen = 0
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line.startswith(".venv/bin/prfl "):
                continue
            args = shlex.split(line)[1:]
            command = group.commands[args[0]]  # type: ignore[attr-defined]
            with command.make_context(args[0], args[1:]) as ctx:  # parses, does not run
                assert ctx.params is not None
            seen += 1
    assert seen >= 10


def test_config_of_every_preset_resolves() -> None:
    from prfl.config import preset_names

    for name in preset_names():
        result = invoke("config", "--preset", name, "--explain")
        assert result.exit_code == 0, (name, result.output)
        assert yaml.safe_load(result.output)["name"] == name


def test_run_lists_the_fleets_speed_changes(tmp_path: Path) -> None:
    result = invoke("run", *SMALL, "--set", "fleet.changes=[{at: 10, like: reversed}, {at: 20, clients: [1, 2], up: 0.5}]",
                    "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "from 10 virtual s: every client: client i takes client 9-i's starting device" in result.output
    assert "from 20 virtual s: clients [1, 2]: up x0.5" in result.output
    bad = invoke("run", *SMALL, "--set", "fleet.changes=[{at: 10, clients: [30]}]", "--out", str(tmp_path / "bad"))
    assert bad.exit_code != 0 and "names client 30, but the fleet has 10 clients" in bad.output
