"""The report's HTML in a real browser: headless Chromium loads it with no console errors and shows every
image (naturalWidth > 0). Skipped when Chromium is not installed (`make browser` installs it on Debian)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tleg_deploy.report import ReportConfig, build_report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (make browser)")

# Injected first in <head> of a copy of the page: records errors (script errors, failed resource loads,
# console.error) and, once the page has loaded, each image's natural size, into a <pre> that --dump-dom prints.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target && e.target !== window ? e.target.tagName + ' failed to load' : '';
  window.__errors.push('error: ' + (e.message || t));
}, true);
var __ce = console.error;
console.error = function () {
  window.__errors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
  __ce.apply(console, arguments);
};
window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {w: i.naturalWidth, h: i.naturalHeight, complete: i.complete};
  });
  var pre = document.createElement('pre');
  pre.id = '__probe';
  pre.textContent = JSON.stringify({images: imgs, errors: window.__errors});
  document.body.appendChild(pre);
});
</script>"""


def load_in_chromium(html_path: Path, workdir: Path) -> dict[str, Any]:
    """Load a copy of the page (probe injected) headless; the probe's findings plus console errors from
    Chromium's own log."""
    page = html_path.read_text(encoding="utf-8")
    assert "<head>" in page
    probe_page = workdir / "probed.html"
    probe_page.write_text(page.replace("<head>", "<head>\n" + PROBE, 1), encoding="utf-8")
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={workdir / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", "--dump-dom", probe_page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r'<pre id="__probe">(.*?)</pre>', proc.stdout, re.S)
    assert m is not None, "the page never finished loading:\n" + proc.stdout[-1000:]
    found = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                       .replace("&amp;", "&"))
    found["errors"] += [line for line in proc.stderr.splitlines()
                        if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line)]
    return found


def test_probe_catches_broken_images_and_script_errors(tmp_path: Path) -> None:
    """The check can fail: a broken image and a throwing script are both reported."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
                   '<img src="data:image/png;base64,AAAA"><img src="missing.png">'
                   "<script>no_such_function();</script></body></html>")
    found = load_in_chromium(bad, tmp_path)
    assert [i["w"] for i in found["images"]] == [0, 0]
    assert any("no_such_function" in e for e in found["errors"])
    assert any("IMG failed to load" in e for e in found["errors"])


def test_report_loads_cleanly_and_shows_every_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_report import write_paper_claims, write_predictor_accuracy, write_solver

    monkeypatch.setenv("TLEG_DEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    write_paper_claims(results, depths=range(1, 7))
    write_predictor_accuracy(results)
    write_solver(results)
    res = build_report(ReportConfig(out_dir=tmp_path / "out", devices=("jetson",), results_dir=results, max_depth=6))
    found = load_in_chromium(res.html, tmp_path)
    assert found["errors"] == []
    assert len(found["images"]) == len(res.figures) == 6
    for img in found["images"]:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0
