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
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images);
    var ok = function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; };
    var out = {
      images: imgs.length,
      rendered: imgs.filter(ok).length,
      widths: imgs.map(function (i) { return i.naturalWidth; }),
      broken: imgs.filter(function (i) { return !ok(i); }).map(function (i) { return i.alt || i.src.slice(0, 60); }),
      errors: errors,
      title: document.title
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


def with_checker(report: Path, dest: Path) -> Path:
    text = report.read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", text)
    assert head is not None, "the report has no <head>"
    dest.write_text(text[: head.end()] + CHECKER + text[head.end():], encoding="utf-8")
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
