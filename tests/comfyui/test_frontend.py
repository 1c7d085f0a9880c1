"""workflows/vnep.json in ComfyUI's real frontend (headless Debian Chromium driven by Playwright): it
loads with no missing node types, converts to exactly the shipped API-format copy, and runs when
queued from the page. A screenshot is saved (path printed; ``VANS_SCREENSHOT`` copies it elsewhere).

Chromium: ``apt-get install chromium`` (Playwright's own browser download is not needed);
``VANS_CHROMIUM`` points at another binary.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from test_server import CAPTION, SMALL, WORKFLOWS, find_caption_seed, load_api

CHROMIUM = os.environ.get("VANS_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set VANS_CHROMIUM)")
    server.post("/settings", {"Comfy.TutorialCompleted": True})
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            tab = browser.new_page(viewport={"width": 2200, "height": 1300})
            tab.goto(server.url + "/")
            tab.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=90_000)
            yield tab
        finally:
            browser.close()


def load_ui(page, name: str) -> dict:
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    page.evaluate("async ([w]) => { await app.loadGraphData(w); }", [workflow])
    page.wait_for_timeout(1000)
    page.keyboard.press("Escape")  # a missing-models dialog (files absent in this server) would sit on top
    return workflow


@pytest.mark.parametrize("name", ["vnep", "multi_future", "reward_scoring"])
def test_workflow_loads_with_every_node_type_known(page, name):
    workflow = load_ui(page, name)
    unknown = page.evaluate("""() => app.graph._nodes
        .filter(n => !(n.type in LiteGraph.registered_node_types) || n.has_errors)
        .map(n => n.type)""")
    assert unknown == []
    types = {n["type"] for n in workflow["nodes"]} - {"Note"}
    assert all(t.startswith("VANS") or t in page.evaluate("() => Object.keys(LiteGraph.registered_node_types)")
               for t in types)


@pytest.mark.parametrize("name", ["vnep", "multi_future", "reward_scoring"])
def test_ui_workflow_converts_to_its_api_copy(page, name):
    load_ui(page, name)
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    api = load_api(name)
    assert set(prompt) == set(api)
    for node_id, node in api.items():
        assert prompt[node_id]["class_type"] == node["class_type"], node_id
        assert prompt[node_id]["inputs"] == node["inputs"], node_id


def test_vnep_is_queued_from_the_page_and_runs(page, server, tmp_path_factory):
    server.models.need("vlm", "dit", "vae", "text_encoder")
    from vans.video import synthetic_frames, write_video

    video = tmp_path_factory.mktemp("frontend") / "input.mp4"
    write_video(video, synthetic_frames(40, 96, 128), 16.0)
    assert server.upload(video, "input.mp4") == "input.mp4"
    seed = find_caption_seed(server, "input.mp4")
    load_ui(page, "vnep")
    settings = {"VANSContextConditioning": SMALL, "KSampler": {"steps": 2},
                "VANSNextEventCaption": dict(CAPTION, seed=seed)}
    page.evaluate("""([settings]) => {
        for (const node of app.graph._nodes) {
            for (const [name, value] of Object.entries(settings[node.type] || {})) {
                node.widgets.find(w => w.name === name).value = value;
            }
        }
        app.graph.setDirtyCanvas(true, true);
    }""", [settings])
    before = set(server.get("/history"))
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    prompt_id, entry = None, {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        new = set(server.get("/history")) - before
        if new:
            prompt_id = new.pop()
            entry = server.get(f"/history/{prompt_id}")[prompt_id]
            if entry.get("status", {}).get("completed") is not None:
                break
        time.sleep(0.5)
    assert prompt_id is not None, "the page did not queue the workflow"
    assert entry["status"]["status_str"] == "success", entry["status"]
    page.wait_for_timeout(1500)  # let the page draw the results
    shown = page.evaluate("""() => app.graph._nodes.filter(n => n.type === "VANSNextEventCaption")
        .map(n => (n.widgets || []).map(w => [w.name, typeof w.value === "string" ? w.value : null]))""")
    preview = dict(shown[0]).get("$$node-text-preview")  # the frontend's text preview on the node
    assert isinstance(preview, str) and preview.strip(), shown
    shot = tmp_path_factory.mktemp("screenshots") / "vnep.png"
    page.screenshot(path=str(shot))
    print(f"screenshot: {shot}")
    if os.environ.get("VANS_SCREENSHOT"):
        shutil.copy(shot, os.environ["VANS_SCREENSHOT"])
    assert shot.stat().st_size > 10_000
