"""The shipped UI workflows in ComfyUI's real frontend (headless Debian Chromium driven by Playwright):
each loads with no missing node types, keeps the size its JSON gives every node, lays out cleanly as the
frontend measures it (the rules of tests/test_workflows_layout.py applied to LiteGraph's own node and
group rectangles), converts to exactly its shipped API-format copy, and shows up in the template
browser under its title; the answer workflow runs when queued from the page. A screenshot is saved
(path printed; ``VANS_SCREENSHOT`` copies it elsewhere; ``VANS_SCREENSHOTS=<folder>`` also saves one
picture of each workflow, fitted to the page, as ``<folder>/<api name>.png``).

Chromium: ``apt-get install chromium`` (Playwright's own browser download is not needed);
``VANS_CHROMIUM`` points at another binary.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from server_harness import PACK_FOLDER_NAME
from test_server import CAPTION, SMALL, TEMPLATES, WORKFLOWS, find_caption_seed, load_api

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_workflows_layout import layout_problems  # noqa: E402  (tests/, one level up)

CHROMIUM = os.environ.get("VANS_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set VANS_CHROMIUM)")
    settings = {"Comfy.TutorialCompleted": True}
    if os.environ.get("VANS_SCREENSHOTS"):  # draw text at any zoom, so a fitted picture stays readable
        settings.update({"LiteGraph.Canvas.MinFontSizeForLOD": 1, "Comfy.Minimap.Visible": False,
                         "Comfy.Graph.CanvasInfo": False, "Comfy.Graph.CanvasMenu": False})
    server.post("/settings", settings)
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
    """Load the UI template whose API copy is ``workflows/api/<name>.json``."""
    workflow = json.loads((WORKFLOWS / f"{TEMPLATES[name]}.json").read_text(encoding="utf-8"))
    page.evaluate("async ([w]) => { await app.loadGraphData(w); }", [workflow])
    page.wait_for_timeout(1000)
    page.keyboard.press("Escape")  # a missing-models dialog (files absent in this server) would sit on top
    return workflow


def test_every_ui_workflow_has_an_api_copy():
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == sorted(TEMPLATES.values())
    assert sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")) == sorted(TEMPLATES)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_workflow_loads_with_every_node_type_known(page, name):
    workflow = load_ui(page, name)
    unknown = page.evaluate("""() => app.graph._nodes
        .filter(n => !(n.type in LiteGraph.registered_node_types) || n.has_errors)
        .map(n => n.type)""")
    assert unknown == []
    types = {n["type"] for n in workflow["nodes"]} - {"Note"}
    assert all(t.startswith("VANS") or t in page.evaluate("() => Object.keys(LiteGraph.registered_node_types)")
               for t in types)


# Node and group rectangles as LiteGraph measures them after a frame is drawn: boundingRect (title bar
# included) lifted by the badges drawn above the title bar (LGraphNode.drawBadges: height + gap 2).
GEOMETRY = """() => {
    app.canvas.draw(true, true);
    const nodes = app.graph._nodes.map(n => {
        const [x, y, w, h] = n.boundingRect;
        const badges = (n.badges || []).map(b => typeof b === "function" ? b() : b).filter(b => b && b.visible);
        const lift = badges.length ? Math.max(...badges.map(b => b.height)) + 2 : 0;
        return {id: n.id, type: n.type, title: n.title, rect: [x, y - lift, w, h + lift], size: [...n.size]};
    });
    const groups = app.graph.groups.map(g => ({title: g.title, rect: [...g.boundingRect],
                                               title_height: g.titleHeight}));
    const links = app.graph.serialize().links.map(l => [l[1], l[3]]);
    return {nodes, groups, links};
}"""


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_workflow_geometry_in_the_frontend(page, name):
    workflow = load_ui(page, name)
    shown = page.evaluate(GEOMETRY)
    assert layout_problems(shown["nodes"], shown["groups"], [tuple(link) for link in shown["links"]]) == []
    # The frontend grows a node smaller than its widgets need; none may grow, so that the JSON geometry
    # tests/test_workflows_layout.py checks is the one users see.
    saved = {n["id"]: n["size"] for n in workflow["nodes"]}
    grown = {n["title"]: (saved[n["id"]], [round(v) for v in n["size"]]) for n in shown["nodes"]
             if [round(v) for v in n["size"]] != [round(v) for v in saved[n["id"]]]}
    assert grown == {}
    if os.environ.get("VANS_SCREENSHOTS"):
        folder = Path(os.environ["VANS_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        page.evaluate("""() => {
            const rects = [...app.graph._nodes.map(n => n.boundingRect), ...app.graph.groups.map(g => g.boundingRect)];
            const x0 = Math.min(...rects.map(r => r[0])), y0 = Math.min(...rects.map(r => r[1]));
            const x1 = Math.max(...rects.map(r => r[0] + r[2])), y1 = Math.max(...rects.map(r => r[1] + r[3]));
            const canvas = app.canvas.canvas, margin = 20;
            const scale = Math.min((canvas.clientWidth - 2 * margin) / (x1 - x0),
                                   (canvas.clientHeight - 2 * margin) / (y1 - y0));
            app.canvas.ds.scale = scale;
            app.canvas.ds.offset = [margin / scale - x0, margin / scale - y0];
            app.graph.setDirtyCanvas(true, true);
        }""")
        page.wait_for_timeout(500)
        page.locator("canvas#graph-canvas").screenshot(path=str(folder / f"{name}.png"))


def test_template_browser_shows_each_workflow_by_its_title(page, server):
    import requests

    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    page.wait_for_timeout(1500)
    dialog = page.locator(".p-dialog")
    dialog.get_by_text(PACK_FOLDER_NAME, exact=True).first.click()
    page.wait_for_timeout(1000)
    text = dialog.inner_text()
    page.keyboard.press("Escape")
    for title in TEMPLATES.values():
        assert title in text, text[:2000]
        thumbnail = requests.get(f"{server.url}/api/workflow_templates/{PACK_FOLDER_NAME}/{title}.jpg", timeout=30)
        assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg", title


@pytest.mark.parametrize("name", sorted(TEMPLATES))
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
