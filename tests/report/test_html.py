"""``prfl report``: one self-contained HTML page from a comparison, a run directory or a run root."""

from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path

from typer.testing import CliRunner

from prfl.cli import app
from prfl.report.html import write_report

from .conftest import EVALS, LOCAL_ROUNDS, make_history, make_summary, write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
URL_ATTRS = {"src", "href", "srcset", "poster", "data", "action", "formaction", "background", "xlink:href"}


class Scan(HTMLParser):
    """Collects every URL-valued attribute, the images, scripts, stylesheets and element ids."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []
        self.images: list[str] = []
        self.tags: list[str] = []
        self.ids: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in URL_ATTRS:
                self.urls.append((tag, name, value or ""))
            if name == "id" and value:
                self.ids.add(value)
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def scan(path: Path) -> Scan:
    s = Scan()
    s.feed(path.read_text(encoding="utf-8"))
    return s


def assert_self_contained(path: Path, images: int) -> Scan:
    s = scan(path)
    for tag, attr, value in s.urls:
        assert value.startswith(("data:", "#")), f"<{tag} {attr}={value[:60]!r}> loads something"
        if value.startswith("#"):
            assert value[1:] in s.ids, f"link {value} has no target"
    assert "script" not in s.tags and "link" not in s.tags and "iframe" not in s.tags
    assert "url(" not in path.read_text(encoding="utf-8").split("<style>")[1].split("</style>")[0]
    assert len(s.images) == images
    for src in s.images:
        head, data = src.split(",", 1)
        assert head == "data:image/png;base64"
        assert base64.b64decode(data)[:8] == PNG_MAGIC
    return s


def test_comparison_report_is_self_contained(handmade) -> None:
    out = write_report(handmade)
    assert out == handmade / "report.html"
    s = assert_self_contained(out, images=4)
    text = " ".join(s.text)
    assert "handmade" in text and "15.0 ± 7.1" in text and "3.00x" in text and "60.0 (1/2 reached)" in text
    assert "baseline: slow" in text  # the comparison's configuration is on the page
    assert {"tta", "accuracy", "participation", "bytes", "plots", "clients", "config"} <= s.ids


def test_run_directory_and_run_root_reports(tmp_path) -> None:
    root = tmp_path / "root"
    for i, method in enumerate(("fedasync", "prfl")):
        recs = make_history(EVALS["fast", i], LOCAL_ROUNDS["fast", i], 1e6, densities=method == "prfl")
        cfg = {"name": "single", "seed": 0, "policy": {"name": method}, "sim": {"targets": [0.5]}}
        write_run(root / method, recs, make_summary(recs, LOCAL_ROUNDS["fast", i], 1e6, 0, method), cfg)
    single = write_report(root / "prfl", tmp_path / "single.html")
    s = assert_self_contained(single, images=4)
    assert "time to 0.5 (s)" in " ".join(s.text)
    both = write_report(root)
    s = assert_self_contained(both, images=4)
    assert "speed-up vs fedasync (0.5)" in " ".join(s.text)  # a run root takes fedasync as the baseline


def test_cli_report(handmade, tmp_path) -> None:
    result = CliRunner().invoke(app, ["report", str(handmade), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").is_file()
    nowhere = tmp_path / ("a-long-directory-name-that-would-not-fit-on-one-terminal-line-" * 2 + "[x]")
    bad = CliRunner().invoke(app, ["report", str(nowhere)])
    assert bad.exit_code == 2 and f"{nowhere} is not a directory" in bad.output  # one line, markup-safe


def test_method_colours_depend_on_names_only_and_stay_apart() -> None:
    import itertools

    from prfl.report.plots import OTHER_COLORS, POLICY_COLORS, method_colors

    a = method_colors(["fedasync", "prfl", "prfl-lean", "fedasync-1"])
    b = method_colors(["prfl-lean", "fedasync-1", "prfl", "fedasync"])
    assert a == b and a["prfl"] == POLICY_COLORS["prfl"] and len(set(a.values())) == 4
    assert method_colors(["prfl"]) == {"prfl": "#1f77b4"}

    def rgb(h: str) -> list[int]:
        return [int(h[i:i + 2], 16) for i in (1, 3, 5)]

    def blend_distance(c: list[int], d: list[int], bg: list[int]) -> float:
        return min(max(abs(x - (k / 100 * y + (1 - k / 100) * z)) for x, y, z in zip(c, d, bg)) for k in range(101))

    palette = [rgb(c) for c in [*POLICY_COLORS.values(), *OTHER_COLORS]]
    for c, d in itertools.permutations(palette, 2):
        for bg in ([255] * 3, [0] * 3, [176] * 3):
            assert blend_distance(c, d, bg) > 15, (c, d, bg)  # an edge of d never passes for c


def test_the_density_caption_names_only_the_marks_drawn(tmp_path) -> None:
    from prfl.report.html import caption
    from prfl.report.runset import load_runset

    root = tmp_path / "root"
    recs = make_history(EVALS["fast", 0], LOCAL_ROUNDS["fast", 0], 1e6, densities=True)
    plain = [r for r in recs if r["event"] != "recovery"]
    cfg = {"name": "d", "seed": 0, "policy": {"name": "prfl"}}
    write_run(root / "with", recs, make_summary(recs, LOCAL_ROUNDS["fast", 0], 1e6, 0, "prfl"), cfg)
    write_run(root / "without", plain, make_summary(plain, LOCAL_ROUNDS["fast", 0], 1e6, 0, "prfl"), cfg)
    with_marks = caption("density", load_runset(root / "with"))
    assert "red dashed lines: recovery" in with_marks and "red triangles" in with_marks
    assert "black line" not in with_marks  # no early stop in this history
    without = caption("density", load_runset(root / "without"))
    assert "red" not in without and "black" not in without
