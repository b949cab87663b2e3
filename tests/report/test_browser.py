"""The report renders in a real browser: headless Chromium loads it with the network off, every image
decodes (``naturalWidth > 0``) and nothing is reported as an error.

How: a copy of the report gets a checker script as the first element of ``<head>`` (before the
page's Content-Security-Policy, which allows no script and therefore does not block it). The
checker records ``error`` events (script errors and failed resource loads, captured), CSP
violations and ``console.error`` calls; on ``load`` it writes a JSON summary of the images and the
errors into ``<pre id="prfl-check">``. ``chromium --headless --dump-dom`` prints the DOM after the
page has loaded, and the test reads the summary from it. As a second, independent signal, Chromium
logs every console message of the page to stderr (``--enable-logging=stderr``); the report has no
script, so any ``CONSOLE`` line there is a failure.

Chromium comes from Debian's ``chromium`` package; without it the test skips and says how to
install it. Set ``PRFL_CHROMIUM`` to use another binary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from prfl.report.html import write_report
from prfl.report.plots import OTHER_COLORS, POLICY_COLORS, method_colors

from .conftest import EVALS, LOCAL_ROUNDS, make_history, make_summary, write_run

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")

CHECKER = """<script>
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push("error: " + (e.message || (t && (t.src || t.href || t.tagName)) || "?"));
  }, true);
  document.addEventListener("securitypolicyviolation", function (e) {
    errors.push("csp: " + e.violatedDirective + " " + e.blockedURI);
  });
  var original = console.error;
  console.error = function () {
    errors.push("console.error: " + Array.prototype.join.call(arguments, " "));
    return original.apply(console, arguments);
  };
  var palette = PALETTE;  // [[r, g, b], ...]: every colour the plotting code gives a method
  function paletteCounts(img) {
    // how many pixels of each palette colour the decoded image holds (within 2 per channel)
    var c = document.createElement("canvas");
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    var ctx = c.getContext("2d");
    ctx.drawImage(img, 0, 0);
    var d = ctx.getImageData(0, 0, c.width, c.height).data;
    var counts = palette.map(function () { return 0; });
    for (var i = 0; i < d.length; i += 4) {
      for (var k = 0; k < palette.length; k++) {
        var p = palette[k];
        if (Math.abs(d[i] - p[0]) <= 2 && Math.abs(d[i + 1] - p[1]) <= 2 && Math.abs(d[i + 2] - p[2]) <= 2) {
          counts[k]++;
          break;
        }
      }
    }
    return counts;
  }
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images);
    var ok = function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; };
    var key = {};
    document.querySelectorAll("p.key .method").forEach(function (m) {
      key[m.getAttribute("data-method")] = getComputedStyle(m.querySelector(".swatch")).backgroundColor;
    });
    var configs = {};
    document.querySelectorAll("h3[id^=config-]").forEach(function (h) {
      var pre = h.nextElementSibling;
      configs[h.id.slice(7)] = {heading: h.textContent, text: pre ? pre.textContent : ""};
    });
    var colors = {};
    imgs.filter(ok).forEach(function (i) {
      var fig = i.closest("figure");
      try { colors[fig ? fig.id : i.alt] = paletteCounts(i); } catch (e) { errors.push("canvas: " + e); }
    });
    var out = {
      images: imgs.length,
      rendered: imgs.filter(ok).length,
      widths: imgs.map(function (i) { return i.naturalWidth; }),
      broken: imgs.filter(function (i) { return !ok(i); }).map(function (i) { return i.alt || i.src.slice(0, 60); }),
      errors: errors,
      title: document.title,
      key: key,
      configs: configs,
      colors: colors
    };
    var pre = document.createElement("pre");
    pre.id = "prfl-check";
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  });
})();
</script>"""


def find_chromium() -> str | None:
    env = os.environ.get("PRFL_CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not found (looked for chromium, chromium-browser, google-chrome and $PRFL_CHROMIUM); "
           "install Debian's package with `sudo apt-get install -y chromium`",
)


PALETTE = [*POLICY_COLORS.values(), *OTHER_COLORS]


def rgb(hex_color: str) -> list[int]:
    return [int(hex_color[i:i + 2], 16) for i in (1, 3, 5)]


def with_checker(report: Path, dest: Path) -> Path:
    text = report.read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", text)
    assert head is not None, "the report has no <head>"
    checker = CHECKER.replace("PALETTE", json.dumps([rgb(c) for c in PALETTE]), 1)
    dest.write_text(text[: head.end()] + checker + text[head.end():], encoding="utf-8")
    return dest


def render(page: Path, profile: Path) -> tuple[dict, list[str]]:
    """(checker summary, console lines) of ``page`` loaded in headless Chromium."""
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "HOME": str(profile)})
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
    m = re.search(r'<pre id="prfl-check">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert m, f"the checker did not run; DOM tail:\n{proc.stdout[-1000:]}\nstderr:\n{proc.stderr[-2000:]}"
    summary = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return summary, console


# plots that draw each method in its colour (the density plot colours clients, not methods)
METHOD_PLOTS = ("fig-accuracy", "fig-egress", "fig-local_rounds")
MIN_PIXELS = 20  # a colour counts as drawn with at least this many pixels of it


def drawn_colors(summary: dict, figure: str) -> set[str]:
    counts = summary["colors"][figure]
    return {PALETTE[k] for k, n in enumerate(counts) if n >= MIN_PIXELS}


def check_colors_and_configs(summary: dict, methods: dict[str, str]) -> None:
    """Each method's swatch is its method_colors colour, every method plot shows exactly the colours
    of the methods, and every method's policy configuration is on the page with all its options."""
    from prfl.explain import option_defaults

    expected = method_colors(methods)
    key = {m: "#%02x%02x%02x" % tuple(int(v) for v in re.findall(r"\d+", c)[:3]) for m, c in summary["key"].items()}
    assert key == expected, (key, expected)
    for fig in METHOD_PLOTS:
        assert drawn_colors(summary, fig) == set(expected.values()), (fig, drawn_colors(summary, fig), expected)
    assert set(summary["configs"]) == set(methods), summary["configs"]
    for method, policy in methods.items():
        shown = summary["configs"][method]
        assert f"policy {policy}" in shown["heading"]
        for option in option_defaults(policy):
            assert re.search(rf"^{option}:", shown["text"], re.M), (method, option, shown["text"])


@pytest.fixture(scope="module")
def three_policies(tmp_path_factory) -> Path:
    """A `prfl run` root with PR-FL and two baselines; by directory order (fedasync, heterofl,
    prfl) tab10 would give them blue, orange and green, not their own colours."""
    root = tmp_path_factory.mktemp("three") / "root"
    for i, method in enumerate(("prfl", "fedasync", "heterofl")):
        key = ("fast", 0) if i != 1 else ("slow", 1)
        recs = make_history(EVALS[key], LOCAL_ROUNDS[key], 1e6 * (i + 1), densities=method == "prfl")
        cfg = {"name": "three", "seed": 0, "policy": {"name": method, "options": {"interval": 7} if i == 0 else {}},
               "sim": {"targets": [0.5]}, "data": {"dataset": "digits"}}
        write_run(root / method, recs, make_summary(recs, LOCAL_ROUNDS[key], 1e6, 0, method), cfg)
    return root


def test_each_method_has_one_colour_in_every_image_and_its_configuration(three_policies, handmade_module,
                                                                          tmp_path) -> None:
    report = write_report(three_policies, tmp_path / "three.html")
    summary, console = render(with_checker(report, tmp_path / "checked.html"), tmp_path / "profile")
    assert summary["errors"] == [] and console == [], summary
    check_colors_and_configs(summary, {"prfl": "prfl", "fedasync": "fedasync", "heterofl": "heterofl"})
    assert "interval: 7" in summary["configs"]["prfl"]["text"]  # as the run set it, the rest defaults

    report = write_report(handmade_module, tmp_path / "handmade.html")
    summary, _ = render(with_checker(report, tmp_path / "checked2.html"), tmp_path / "profile2")
    check_colors_and_configs(summary, {"fast": "prfl", "slow": "fedasync"})


def test_the_colour_check_catches_a_plot_in_other_colours(three_policies, tmp_path) -> None:
    """The accuracy plot drawn with matplotlib's colour cycle in directory order fails the check."""
    import base64

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for i, method in enumerate(("fedasync", "heterofl", "prfl")):
        ax.plot([0, 10, 20], [0.1 + i * 0.1, 0.5, 0.8 - i * 0.1], color=f"C{i}", linewidth=2.0, label=method)
    ax.legend()
    png = tmp_path / "cycle.png"
    fig.savefig(png)
    plt.close(fig)
    report = write_report(three_policies, tmp_path / "three.html")
    text = report.read_text(encoding="utf-8")
    start = text.index('src="', text.index('id="fig-accuracy"')) + len('src="')
    end = text.index('"', start)
    swapped = tmp_path / "swapped.html"
    swapped.write_text(text[:start] + "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode() + text[end:],
                       encoding="utf-8")
    summary, _ = render(with_checker(swapped, tmp_path / "checked.html"), tmp_path / "profile")
    with pytest.raises(AssertionError, match="fig-accuracy"):
        check_colors_and_configs(summary, {"prfl": "prfl", "fedasync": "fedasync", "heterofl": "heterofl"})


def test_report_renders_in_headless_chromium(handmade_module, tmp_path) -> None:
    report = write_report(handmade_module)
    summary, console = render(with_checker(report, tmp_path / "checked.html"), tmp_path / "profile")
    assert summary["images"] == 4, summary
    assert summary["rendered"] == 4 and not summary["broken"], summary
    assert all(w > 100 for w in summary["widths"]), summary
    assert summary["errors"] == [], summary
    assert console == [], console
    assert summary["title"].startswith("handmade")


def test_the_check_catches_a_broken_page(handmade_module, tmp_path) -> None:
    """The same check fails a page with an external image and a script error (so it can fail)."""
    report = write_report(handmade_module, tmp_path / "report.html")
    text = report.read_text(encoding="utf-8").replace(
        "</body>", '<img src="http://example.invalid/x.png" alt="external"></body>')
    broken = tmp_path / "broken.html"
    broken.write_text(text, encoding="utf-8")
    summary, console = render(with_checker(broken, tmp_path / "checked.html"), tmp_path / "profile")
    assert summary["images"] == 5 and summary["broken"] == ["external"]
    assert any(e.startswith("csp: img-src") for e in summary["errors"]), summary
    assert console, "Chromium should log the blocked load"
