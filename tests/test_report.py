"""The HTML report: content of a real (small) run's report, the CLI's rules for writing it, the
sweep report, stage lines, and the report opened in headless Chromium with the network off."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from ptqkit import report as report_mod
from ptqkit.cli import main

MODEL_PY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
"""
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A light-pipeline run (ranges, integer program over w8a8/w4a4, BN tuning) of a 4-layer
    user model, written by ``ptqkit quantize``."""
    d = tmp_path_factory.mktemp("report")
    (d / "net.py").write_text(MODEL_PY)
    torch.save(torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)), d / "calib.pt")
    rc = main(["quantize", f"{d / 'net.py'}:make", "--calib", str(d / "calib.pt"), "--pipeline",
               "light", "--compression", "0.2", "--no-first-last-8bit", "--out", str(d / "run")])
    assert rc == 0
    return d / "run"


def _layers(run: Path) -> dict[str, Any]:
    return json.loads((run / "report.json").read_text())["layers"]


def test_quantize_writes_report_listed_in_the_run(run: Path) -> None:
    from ptqkit.runs import read_run

    meta = read_run(run)  # verifies every listed file, report.html included
    assert "report.html" in meta["files"]
    text = (run / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")


def test_report_content(run: Path) -> None:
    text = (run / "report.html").read_text()
    layers = _layers(run)
    for heading in ("Run", "Recipe", "Layers", "Plots", "Steps"):
        assert f"<h2>{heading}</h2>" in text
    rows = re.findall(r'<tr class="(?:low )?layer">(.*?)</tr>', text)
    assert len(rows) == len(layers) == 4
    for row, (name, info) in zip(rows, layers.items()):  # execution order, with each layer's bits
        cells = re.findall(r'<td[^>]*data-v="([^"]*)"', row)
        assert cells[1] == name and cells[5] == str(info["w_bits"]) and cells[6] == str(info["a_bits"])
        assert cells[4].isdigit() and int(cells[4]) > 0  # MACs counted
    assert text.count("<svg") == 3  # SQNR, bits beside size, sensitivity heat map
    assert not EXTERNAL.search(text), EXTERNAL.search(text)
    assert "compression: 0.2" in text  # the recipe as YAML
    assert "mixed_precision" in text and "IP predicted loss" in text
    bn = next(s for s in json.loads((run / "report.json").read_text())["steps"]
              if s["step"] == "bn_tuning")
    assert ("undone by its guard" in text) == (not bn["kept"])


def test_low_sqnr_layers_are_highlighted() -> None:
    layers = {f"l{i}": {"type": "QuantConv2d", "w_bits": 8, "a_bits": 8, "sqnr_db": s}
              for i, s in enumerate([40.0, 41.0, 39.0, 25.0, 40.5])}
    text = report_mod.run_report("m", {"layers": layers, "steps": []}, "w_bits: 8\n")
    assert re.findall(r'<tr class="low layer"><td data-v="(\d+)"', text) == ["3"]


def test_report_without_matplotlib_has_a_note_and_no_plots(run: Path, monkeypatch) -> None:
    monkeypatch.setattr(report_mod, "_has_matplotlib", lambda: False)
    text = report_mod.run_report_from_dir(run)
    assert "<svg" not in text and "pip install &#x27;ptqkit[plot]&#x27;" in text
    assert len(re.findall(r'<tr class="(?:low )?layer">', text)) == 4


def test_report_command_and_its_errors(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert out.read_text().count('class="layer"') + out.read_text().count('class="low layer"') == 4
    capsys.readouterr()
    cases = [(["report", str(run), "--out", str(out)], "pass --force"),
             (["report", str(tmp_path / "nope"), "--out", str(tmp_path / "x.html")],
              "neither a run directory"),
             (["report", str(tmp_path), "--out", str(tmp_path / "x.html")], "not a ptqkit run"),
             (["report", str(run), "--out", str(run / "report.json"), "--force"], "run's own files")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ptqkit: error:") and message in err and "\n" not in err
    assert not (tmp_path / "x.html").exists()
    assert out.read_text().startswith("<!DOCTYPE html>")  # untouched by the refused calls
    assert json.loads((run / "report.json").read_text())["layers"]


def test_unwritable_out_is_one_line_and_leaves_nothing(run: Path, tmp_path: Path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):
            pytest.skip("running with permissions that ignore the folder's mode")
        assert main(["report", str(run), "--out", str(ro / "r.html")]) == 2
        assert "permission denied" in capsys.readouterr().err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


SWEEP_ROWS = [
    {"suite": "s", "method": "table:ranges", "layers": 3, "options": ["w8a8", "w4a4"], "seconds": 1.5},
    *({"suite": "s", "method": m, "budget": c, "compression": c - 0.001, "fp32_top1": 90.0,
       "quant_top1": 90.0 - (0.25 - c) * k * 10} for m, k in (("ip", 1), ("light", 0.5))
      for c in (0.25, 0.16, 0.13)),
]


def test_sweep_report_has_curves_points_and_peers(tmp_path: Path, capsys) -> None:
    rows = tmp_path / "sweep.json"
    rows.write_text(json.dumps(SWEEP_ROWS))
    peers = tmp_path / "bench.json"
    peers.write_text(json.dumps([{"suite": "s", "method": "nncf", "compression": 0.25,
                                  "quant_top1": 89.5}]))
    out = tmp_path / "sweep.html"
    assert main(["report", str(rows), "--peers", str(peers), "--out", str(out)]) == 0
    text = out.read_text()
    assert len(re.findall(r'<tr class="point">', text)) == 6 + 1
    assert text.count("<svg") == 1 and "nncf (peer)" in text and not EXTERNAL.search(text)
    assert "table:ranges" in text  # the sensitivity table is listed, not plotted as a point


def test_sweep_report_flag(tmp_path: Path, capsys) -> None:
    rows = tmp_path / "sweep.json"
    rows.write_text(json.dumps(SWEEP_ROWS))
    out = tmp_path / "sweep.html"
    argv = ["sweep", "--suite", "s", "--json", str(rows), "--report-only", "--report", str(out)]
    assert main(argv) == 0
    assert len(re.findall(r'<tr class="point">', out.read_text())) == 6
    assert main(argv) == 2 and "pass --force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0


def test_stage_lines_off_a_terminal() -> None:
    assert not report_mod.StageLog(io.StringIO()).enabled  # in memory: not a log
    with tempfile.TemporaryFile("w+") as f:
        assert report_mod.StageLog(f).enabled  # a file: a log
    buf = io.StringIO()
    stages = report_mod.StageLog(buf, enabled=True)
    with stages.stage("load"), stages.forward("ptqkit.pipeline"):
        logging.getLogger("ptqkit.pipeline").info("step %s done in %.1fs", "ranges", 2.25)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "ptqkit: stage load started"
    assert lines[1] == "ptqkit: stage ranges finished (2.2 s)"
    assert re.fullmatch(r"ptqkit: stage load finished \(\d+\.\d s\)", lines[2])
    assert logging.getLogger("ptqkit.pipeline").propagate  # restored
    quiet = io.StringIO()
    with report_mod.StageLog(quiet, enabled=False).stage("x"):
        pass
    assert quiet.getvalue() == ""


# ----------------------------------------------------------------------------- headless Chromium
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """Headless Chromium driven over the DevTools protocol (one page, network emulated off)."""

    def __init__(self) -> None:
        import websocket

        self.profile = tempfile.mkdtemp(prefix="ptqkit-chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", "--remote-allow-origins=*", "--window-size=1280,1600",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()  # type: ignore[union-attr]
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = int(m.group(1)) if m else None
            if not line and self.proc.poll() is not None:
                break
        if port is None:
            self.close()
            raise RuntimeError("chromium did not open its DevTools port")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60,
                                              suppress_origin=True)
        self.next_id, self.events = 0, []  # type: ignore[var-annotated]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == method:
                return msg
            self.events.append(msg)
        raise TimeoutError(method)

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, path: Path) -> float:
        """Load ``path`` with the network off; seconds until the load event."""
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Network.emulateNetworkConditions", offline=True, latency=0,
                  downloadThroughput=-1, uploadThroughput=-1)
        t0 = time.perf_counter()
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        return time.perf_counter() - t0

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and failed requests seen so far."""
        time.sleep(0.3)
        self.call("Runtime.evaluate", expression="1")  # drain the events sent meanwhile
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(f"console error: {p.get('args')}")
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(f"log error: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Network.loadingFailed":
                out.append(f"failed request: {p.get('errorText')} {p.get('type')}")
        return out

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def open_in_chromium(path: Path) -> tuple[float, list[str], bytes, int, list[float]]:
    """(load seconds, problems, PNG screenshot, per-layer table rows, SQNR column after one
    click on its header) of the HTML file ``path``."""
    browser = Chromium()
    try:
        seconds = browser.open(path)
        rows = browser.evaluate("document.querySelectorAll('#layers tbody tr').length")
        browser.evaluate("Array.from(document.querySelectorAll('#layers th'))"
                         ".find(h => h.textContent.startsWith('SQNR')).click()")
        col = browser.evaluate("Array.from(document.querySelectorAll('#layers tbody tr'))"
                               ".map(r => parseFloat(r.cells[9].dataset.v))")
        shot = browser.screenshot()
        return seconds, browser.problems(), shot, rows, col
    finally:
        browser.close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs the Debian package chromium (make data installs it)")
def test_report_in_headless_chromium(run: Path) -> None:
    pytest.importorskip("websocket", reason="needs websocket-client (the dev extra)")
    pytest.importorskip("PIL", reason="needs Pillow (the vision extra)")
    from PIL import Image, ImageStat

    seconds, problems, shot, rows, sqnr = open_in_chromium(run / "report.html")
    assert problems == []
    assert rows == len(_layers(run))
    assert sqnr == sorted(sqnr) and len(sqnr) == rows  # the click sorted the table by SQNR
    img = Image.open(io.BytesIO(shot)).convert("L")
    assert img.size[0] >= 800
    assert ImageStat.Stat(img).var[0] > 100, "the screenshot is blank"
    assert seconds < 10
