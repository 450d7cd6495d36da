"""Open report.html in headless Chromium and use it: the page loads offline with no console
errors, every figure renders, hovering a heatmap cell shows its node, a click filters the
ranked table and a header click sorts it; a screenshot shows a rendered page.

Skipped when Chromium is not installed (``apt-get install chromium``). The browser is driven
through the Chrome DevTools Protocol (``--remote-debugging-port``, websocket-client, which
nnsight depends on), so the mouse events are real input events, not synthetic JavaScript.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # works with or without tests/__init__.py
    sys.path.insert(0, _HERE)

from test_report import suite  # noqa: E402

from atp_nnsight.report import write_report  # noqa: E402
from atp_nnsight.types import Node  # noqa: E402


def _chromium() -> str | None:
    for candidate in (
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (/usr/bin/chromium); apt-get install chromium",
)

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]
WIDTH, HEIGHT = 1280, 900


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        import websocket  # websocket-client, a dependency of nnsight

        self.process = subprocess.Popen(
            [
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={WIDTH},{HEIGHT}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "HOME": str(profile)},
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as response:
            targets = json.load(response)
        page = next(t for t in targets if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=90)
        self.events: list[dict[str, Any]] = []
        self._id = 0

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str) -> dict[str, Any]:
        while True:
            for i, message in enumerate(self.events):
                if message.get("method") == event:
                    return self.events.pop(i)
            self.events.append(json.loads(self.socket.recv()))

    def open(self, report: Path) -> None:
        """Load ``report`` at WIDTH x HEIGHT, recording console, log and network events, and
        wait until plotly has drawn every figure."""
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.send("Page.navigate", url=report.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        expected = str(self.js("document.querySelectorAll('.plot').length"))
        deadline = time.monotonic() + 60
        while self.js("document.body.getAttribute('data-figures-rendered')") != expected:
            assert time.monotonic() < deadline, "figures did not render within 60 s"
            time.sleep(0.2)

    def js(self, expression: str) -> Any:
        out = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in out:
            raise RuntimeError(out["exceptionDetails"])
        return out["result"].get("value")

    def mouse(self, kind: str, x: float, y: float) -> None:
        extra = {"button": "left", "clickCount": 1} if kind != "mouseMoved" else {}
        self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

    def click(self, x: float, y: float) -> None:
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y)
        self.mouse("mouseReleased", x, y)

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def problems(events: list[dict[str, Any]]) -> list[str]:
    """Console errors and warnings, uncaught exceptions and failed loads among ``events``
    (loads of the report page, not of the blank page it replaced)."""
    out = []
    sent = {
        e["params"]["requestId"] for e in events if e.get("method") == "Network.requestWillBeSent"
    }
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            out.append(json.dumps(params["exceptionDetails"])[:500])
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning"):
            out.append(json.dumps(params["args"])[:500])
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            out.append(params["entry"]["text"][:500])
        elif method == "Network.loadingFailed" and params["requestId"] in sent:
            out.append(f"failed to load: {params.get('errorText')}")
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("browser_report")
    results, _ = suite()
    star = results["atp*"]
    return write_report(folder, {"atp*": star}, settings={"seed": 0}), {"atp*": star}


@pytest.fixture(scope="module")
def page(report, tmp_path_factory) -> Iterator[Browser]:
    path, _ = report
    browser = Browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        browser.open(path)
        yield browser
    finally:
        browser.close()


def test_page_loads_offline_without_console_errors(page, report):
    path, _ = report
    assert problems(page.events) == []
    requested = [
        e["params"]["request"]["url"]
        for e in page.events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    assert requested[0] == path.resolve().as_uri()
    assert all(url.startswith("data:") for url in requested[1:]), requested  # nothing fetched


def test_every_figure_renders(page):
    figures = page.js(
        """Array.from(document.querySelectorAll('.plot')).map(function (div) {
          return {id: div.id, rendered: div.getAttribute('data-rendered'),
                  type: div._fullData[0].type,
                  heatmaps: div.querySelectorAll('.heatmaplayer image').length,
                  points: div.querySelectorAll('.scatterlayer .point').length,
                  height: div.getBoundingClientRect().height};
        })"""
    )
    assert len(figures) == 6
    for fig in figures:
        assert fig["rendered"] == "1" and fig["height"] > 200, fig
        if fig["type"] == "heatmap":
            assert fig["heatmaps"] == 1, fig
        else:
            assert fig["points"] > 0, fig


def _cell_center(page: Browser, figure_id: str, column: int, row: int) -> tuple[float, float]:
    """Viewport coordinates of a heatmap cell, after scrolling its figure into view."""
    point = page.js(
        f"""(function () {{
          var gd = document.getElementById('{figure_id}');
          gd.scrollIntoView({{block: 'center'}});
          var box = gd.querySelector('.nsewdrag').getBoundingClientRect();
          var layout = gd._fullLayout;
          return [box.left + layout.xaxis.l2p({column}), box.top + layout.yaxis.l2p({row})];
        }})()"""
    )
    return point[0], point[1]


def _score_heatmap(page: Browser) -> str:
    return page.js(
        """Array.from(document.querySelectorAll('.plot')).filter(function (div) {
          return div._fullLayout.title.text === 'AtP*: head nodes';
        })[0].id"""
    )


def test_hovering_a_cell_shows_its_node_score_exact_effect_and_rank(page, report):
    _, results = report
    star = results["atp*"]
    best = int(star.ranking()[0])
    node = star.node(best)
    assert node.kind == "head"
    figure = _score_heatmap(page)
    x, y = _cell_center(page, figure, node.index, node.layer)
    page.mouse("mouseMoved", x, y)
    label = ""
    for _ in range(50):
        label = page.js(f"document.querySelector('#{figure} .hoverlayer').textContent")
        if label:
            break
        time.sleep(0.1)
    verified = star.metadata["verified"]
    exact = verified["mean_effect"][verified["order"].index(best)]
    assert str(Node("head", node.layer, node.index)) in label
    assert f"score {star.scores[best]:.4g} (rank 1)" in label
    assert f"exact effect {exact:.4g}" in label
    page.mouse("mouseMoved", 1, 1)  # move away: the label goes
    time.sleep(0.3)
    assert page.js(f"document.querySelector('#{figure} .hoverlayer').textContent") == ""


def visible_rows(page: Browser) -> list[str]:
    return page.js(
        """Array.from(document.querySelectorAll('table.ranked tbody tr'))
          .filter(function (row) { return !row.classList.contains('hidden'); })
          .map(function (row) { return row.getAttribute('data-node'); })"""
    )


def test_clicking_a_cell_filters_the_ranked_table(page, report):
    _, results = report
    star = results["atp*"]
    all_rows = visible_rows(page)
    assert len(all_rows) == 20
    target = star.node(int(star.ranking()[3]))
    figure = _score_heatmap(page) if target.kind == "head" else None
    if figure is None:  # the 4th node is a neuron: use that heatmap
        figure = page.js(
            """Array.from(document.querySelectorAll('.plot')).filter(function (div) {
              return div._fullLayout.title.text === 'AtP*: neuron nodes';
            })[0].id"""
        )
    page.click(*_cell_center(page, figure, target.index, target.layer))
    time.sleep(0.3)
    assert visible_rows(page) == [str(target)]
    state = page.js("document.querySelector('[data-filter-for] .state').textContent")
    assert state == f"Showing 1 row(s) for {target}."
    page.js("document.querySelector('[data-filter-for] button').click()")
    assert visible_rows(page) == all_rows


def test_clicking_a_header_sorts_the_table(page):
    def column(name: str) -> list[str]:
        return page.js(
            f"""(function () {{
              var table = document.querySelector('table.ranked');
              var heads = Array.from(table.tHead.rows[0].cells).map(function (c) {{
                return c.textContent; }});
              var i = heads.indexOf('{name}');
              return Array.from(table.tBodies[0].rows).map(function (r) {{
                return r.cells[i].getAttribute('data-sort') || r.cells[i].textContent; }});
            }})()"""
        )

    def click_header(name: str) -> None:
        x, y = page.js(
            f"""(function () {{
              var th = Array.from(document.querySelectorAll('table.ranked th')).filter(
                function (c) {{ return c.textContent === '{name}'; }})[0];
              th.scrollIntoView({{block: 'center'}});
              var box = th.getBoundingClientRect();
              return [box.left + box.width / 2, box.top + box.height / 2];
            }})()"""
        )
        page.click(x, y)

    ranks = [float(v) for v in column("rank")]
    assert ranks == sorted(ranks)
    click_header("signed mean estimate")
    estimates = [float(v) for v in column("signed mean estimate")]
    assert estimates == sorted(estimates)  # first click: ascending
    click_header("signed mean estimate")
    assert [float(v) for v in column("signed mean estimate")] == sorted(estimates, reverse=True)
    click_header("node")
    nodes = column("node")
    assert nodes == sorted(nodes, key=lambda s: s.lower()) or nodes == sorted(nodes)
    click_header("rank")
    assert [float(v) for v in column("rank")] == ranks


def test_screenshot_shows_a_rendered_page(page, tmp_path):
    from PIL import Image

    page.js("window.scrollTo(0, 0)")
    shot = page.send("Page.captureScreenshot", format="png")
    data = base64.b64decode(shot["data"])
    (tmp_path / "report.png").write_bytes(data)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (WIDTH, HEIGHT)
        grey = np.asarray(im.convert("L"))
        # a rendered page, not a blank or error screen: many grey levels, mostly light
        assert len(np.unique(grey)) > 50 and grey.mean() > 180
    assert problems(page.events) == []


def test_a_unit_cell_of_a_per_position_result_filters_every_position(tmp_path):
    results, _ = suite(per_position=True)
    star = results["atp*"]
    path = write_report(tmp_path / "report", {"atp*": star}, settings={}, top_k=20)
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(path)
        best = star.node(int(star.ranking()[0]))  # a head at one position
        unit = str(Node(best.kind, best.layer, best.index))
        in_table = [str(star.node(int(i))) for i in star.ranking()[:20]]
        want = [n for n in in_table if n.startswith(unit + "@")]
        assert len(want) >= 1
        figure = _score_heatmap(browser)
        browser.click(*_cell_center(browser, figure, best.index, best.layer))
        time.sleep(0.3)
        assert visible_rows(browser) == want
        assert problems(browser.events) == []
    finally:
        browser.close()
