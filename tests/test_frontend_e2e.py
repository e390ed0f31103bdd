"""End to end, as a user meets the pack: ComfyUI's own server with the pack and its pinned web frontend
(comfyui-frontend-package) on 127.0.0.1, opened in headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium at a 1920×1080 viewport). Each shipped workflow file is dropped on
the canvas as a user drops it (a real file drop through the DevTools protocol); no missing-node dialog
may appear (the SD workflows must raise the missing-model dialog for their checkpoint instead), no two
nodes may overlap at the sizes the frontend gives them, and the whole graph must be in view. The
offline workflows are then run from the Run button and their outputs checked. A screenshot of each
goes to out/e2e/ (or $DISENTANGLE_E2E_OUT). The template browser must list every workflow with its
title, description and thumbnail, in order.

Skipped loudly when Chromium, chromedriver, Selenium or ComfyUI's server (its frontend) are missing."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import time

import pytest

from comfyui_disentangle.harness.server import PACK_ROOT

WORKFLOW_DIR = PACK_ROOT / "workflows"
NAMES = sorted(f[:-5] for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json") and f != "index.json")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
SCREEN = (1920, 1080)
RUN_TIMEOUT = float(os.environ.get("DISENTANGLE_E2E_RUN_TIMEOUT", "900"))


def _skip_reason() -> str | None:
    if not CHROMIUM or not CHROMEDRIVER:
        return "no chromium / chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


def screenshot_dir():
    path = os.environ.get("DISENTANGLE_E2E_OUT") or str(PACK_ROOT / "out" / "e2e")
    os.makedirs(path, exist_ok=True)
    return path


def needs_checkpoint(name: str) -> bool:
    with open(WORKFLOW_DIR / f"{name}.json", encoding="utf-8") as f:
        return any(n["type"] == "CheckpointLoaderSimple" for n in json.load(f)["nodes"])


class Frontend:
    """The web frontend in headless Chromium; ``js`` runs a script in the page."""

    def __init__(self, url: str):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        options = webdriver.ChromeOptions()
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--window-size={SCREEN[0]},{SCREEN[1]}", "--hide-scrollbars"):
            options.add_argument(arg)
        options.binary_location = CHROMIUM
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_script_timeout(60)
        self.cdp("Emulation.setDeviceMetricsOverride",
                 {"width": SCREEN[0], "height": SCREEN[1], "deviceScaleFactor": 1, "mobile": False})
        self.console: list[dict] = []
        self.driver.get(url)
        self.wait("window.app && app.graph && window.LiteGraph && Object.keys(LiteGraph.registered_node_types).length > 50"
                  " && document.querySelector('[data-testid=\"queue-button\"]')", 180)
        time.sleep(2)
        self.close_dialogs()

    def cdp(self, command: str, args: dict):
        return self.driver.execute_cdp_cmd(command, args)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, condition: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(f"try {{ return ({condition}); }} catch (e) {{ return null; }}")
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"the frontend did not reach `{condition}` within {timeout:.0f} s")

    def logs(self) -> list[dict]:
        self.console += self.driver.get_log("browser")
        return self.console

    def dialogs(self) -> list[str]:
        return self.js("return Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)")

    def close_dialogs(self) -> None:
        for _ in range(5):
            if not self.dialogs():
                return
            self.js("document.querySelectorAll('.p-dialog .p-dialog-close-button, .p-dialog-header-close')"
                    ".forEach(b => b.click())")
            time.sleep(0.5)

    def drop_file(self, path: str) -> None:
        """A file dragged from the desktop and dropped in the middle of the canvas."""
        data = {"items": [], "files": [str(path)], "dragOperationsMask": 1}
        for kind in ("dragEnter", "dragOver", "drop"):
            self.cdp("Input.dispatchDragEvent", {"type": kind, "x": SCREEN[0] // 2, "y": SCREEN[1] // 2, "data": data})

    def graph(self) -> dict:
        return self.js("""
            const c = document.querySelector('#graph-canvas').getBoundingClientRect();
            return {nodes: app.graph._nodes.map(n => ({id: n.id, title: n.title, type: n.type,
                                                        box: Array.from(n.getBounding())})),
                    scale: app.canvas.ds.scale, offset: Array.from(app.canvas.ds.offset),
                    canvas: [c.x, c.y, c.width, c.height]}""")

    def screenshot(self, name: str) -> str:
        path = os.path.join(screenshot_dir(), f"{name}.png")
        self.driver.save_screenshot(path)
        return path

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture(scope="module")
def frontend(comfy_server):
    reason = _skip_reason()
    if reason:
        pytest.skip(f"ComfyUI frontend end-to-end tests SKIPPED: {reason}")
    browser = Frontend(comfy_server.url)
    yield browser
    browser.quit()


def overlaps(nodes: list[dict]) -> list[tuple[str, str]]:
    def hit(a, b):
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
    return [(a["title"], b["title"]) for a, b in itertools.combinations(nodes, 2) if hit(a["box"], b["box"])]


def open_workflow(frontend, name: str) -> dict:
    frontend.close_dialogs()
    before = frontend.js("return app.graph._nodes.length")
    frontend.drop_file(WORKFLOW_DIR / f"{name}.json")
    with open(WORKFLOW_DIR / f"{name}.json", encoding="utf-8") as f:
        expected = len(json.load(f)["nodes"])
    frontend.wait(f"app.graph._nodes.length === {expected} && (document.title || '').includes({json.dumps(name)})", 60)
    time.sleep(1.5)  # the frontend sizes the nodes and draws
    assert before is not None
    return frontend.graph()


@pytest.mark.parametrize("name", NAMES)
def test_dropped_workflow_loads_whole_without_overlaps_in_view(frontend, name):
    graph = open_workflow(frontend, name)
    dialogs = frontend.dialogs()
    shot = frontend.screenshot(name)
    assert not frontend.js("return document.querySelector('.comfy-missing-nodes') !== null"), dialogs
    assert not any("missing" in d.lower() and "node" in d.lower() for d in dialogs), dialogs
    if needs_checkpoint(name):
        assert any("Missing Models" in d and ".safetensors" in d for d in dialogs), \
            f"{name}: no missing-model dialog at load ({dialogs})"
    else:
        assert not dialogs, dialogs
    assert not overlaps(graph["nodes"]), f"{name}: overlapping nodes {overlaps(graph['nodes'])} (see {shot})"
    scale, (ox, oy) = graph["scale"], graph["offset"]
    cw, ch = graph["canvas"][2], graph["canvas"][3]
    for node in graph["nodes"]:
        x, y, w, h = node["box"]
        left, top, right, bottom = (x + ox) * scale, (y + oy) * scale, (x + w + ox) * scale, (y + h + oy) * scale
        assert left >= 0 and top >= 0 and right <= cw and bottom <= ch, f"{node['title']} is off screen (see {shot})"


def _history_ids(server) -> set:
    return set(server.get_json("/history"))


def _queued(server) -> bool:
    queue = server.get_json("/queue")
    return bool(queue.get("queue_running") or queue.get("queue_pending"))


@pytest.mark.parametrize("name", [n for n in NAMES if not needs_checkpoint(n)])
def test_offline_workflow_runs_from_the_run_button(frontend, comfy_server, name):
    open_workflow(frontend, name)
    before = _history_ids(comfy_server)
    from selenium.webdriver.common.by import By
    frontend.driver.find_element(By.CSS_SELECTOR, '[data-testid="queue-button"]').click()  # a real mouse click
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline and not _queued(comfy_server) and not _history_ids(comfy_server) - before:
        time.sleep(0.2)
    # Headless Chromium redraws the canvas in software at every progress tick and would take a CPU core from
    # the run: as a user who switches tabs, the test looks at another tab while the server works (the
    # frontend still gets every message, but does not draw) and comes back to see the results.
    comfy_tab = frontend.driver.current_window_handle
    frontend.driver.switch_to.new_window("tab")
    entry = None
    try:
        while time.monotonic() < deadline:
            new = _history_ids(comfy_server) - before
            if new:
                entry = next(iter(comfy_server.get_json(f"/history/{new.pop()}").values()))
                if entry.get("status", {}).get("status_str") in ("success", "error"):
                    break
            time.sleep(1)
    finally:
        frontend.driver.close()
        frontend.driver.switch_to.window(comfy_tab)
    if entry is not None and entry["status"].get("status_str") == "success":
        frontend.wait("app.graph._nodes.some(n => n.type === 'SaveImage' && n.imgs && n.imgs.length)", 60)
        time.sleep(1)
    shot = frontend.screenshot(f"{name}_run")
    assert entry is not None, f"{name}: nothing ran within {RUN_TIMEOUT:.0f} s (see {shot})"
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status.get("messages"))[:3000]
    files = comfy_server.output_files(entry)
    saved = [p for p in files if comfy_server.output_dir in p.parents]
    assert saved and all(p.stat().st_size > 0 for p in files), f"{name}: no saved image"
    with open(WORKFLOW_DIR / f"{name}.json", encoding="utf-8") as f:
        outputs = {str(n["id"]) for n in json.load(f)["nodes"] if n["type"] in ("SaveImage", "PreviewImage")}
    assert outputs <= set(entry["outputs"]), f"{name}: outputs {sorted(outputs - set(entry['outputs']))} did not run"
    shown = frontend.js("return app.graph._nodes.filter(n => n.type === 'SaveImage' && n.imgs && n.imgs.length).length")
    assert shown, f"{name}: the Save Image node shows no image (see {shot})"
    grown = overlaps(frontend.graph()["nodes"])  # live previews and results make nodes grow
    assert not grown, f"{name}: after the run, overlapping nodes {grown} (see {shot})"


def test_template_browser_lists_the_workflows_with_titles_thumbnails_in_order(frontend):
    with open(WORKFLOW_DIR / "index.json", encoding="utf-8") as f:
        category = json.load(f)[0]
    templates = category["templates"]
    frontend.close_dialogs()
    frontend.js("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    # With ComfyUI's own templates installed (comfyui-workflow-templates, in its requirements) the browser
    # opens on them: as a user does, click the pack's category in the side list.
    frontend.wait(f"document.querySelector('.p-dialog') && document.querySelector('.p-dialog').innerText"
                  f".includes({json.dumps(category['title'])})", 30)
    frontend.js("""
        const title = arguments[0];
        const items = Array.from(document.querySelectorAll('.p-dialog *')).filter(
            e => e.children.length === 0 && e.textContent.trim() === title);
        (items[0].closest('[role=option], li, button, a') || items[0]).click();""", category["title"])
    frontend.wait(f"document.body.innerText.includes({json.dumps(templates[-1]['title'])})", 30)
    frontend.wait("Array.from(document.querySelectorAll('.p-dialog img')).filter(i => i.complete && i.naturalWidth > 0)"
                  f".length >= {min(len(templates), 4)}", 30)
    text = frontend.js("return document.querySelector('.p-dialog').innerText")
    shot = frontend.screenshot("template_browser")
    positions = [text.find(t["title"]) for t in templates]
    assert all(p >= 0 for p in positions), f"titles missing from the template browser (see {shot})"
    assert positions == sorted(positions), f"the template browser does not keep the index order (see {shot})"
    missing = [e["message"] for e in frontend.logs() if ".jpg" in e["message"] and "404" in e["message"]]
    assert not missing, missing
    frontend.close_dialogs()
