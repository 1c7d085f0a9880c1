"""Compatibility with the ComfyUI the tests run against (0.3.64 here; point ``VANS_COMFYUI_DIR`` at a newer
checkout to check that one): every ComfyUI symbol the pack's code names exists, no pack node id is taken
by a core node (core wins a clash), the VLM/CLIP wrappers stay on the non-dynamic ModelPatcher path
(why: ``nodes/host.py``), and, opt-in, the shipped workflows in a newer frontend.

Opt-in frontend check: ``VANS_FRONTEND_ROOT`` names the ``static`` folder of a ``comfyui-frontend-package``
(``pip install --target /tmp/fe comfyui-frontend-package==1.58.1`` gives
``/tmp/fe/comfyui_frontend_package/static``); the server is started with ``--front-end-root`` on it and
every workflow is loaded in the classic canvas and with "Nodes 2.0" (``Comfy.VueNodes.Enabled``).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
from pathlib import Path

import pytest
import torch

from test_server import TEMPLATES, WORKFLOWS, load_api

PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_FILES = [PACK_ROOT / "__init__.py", *sorted((PACK_ROOT / "nodes").glob("*.py"))]
# top-level modules that belong to ComfyUI (not to torch, the engine or the standard library)
COMFY_MODULES = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "server", "execution",
                 "latent_preview", "node_helpers", "nodes"}


# -- which ComfyUI names the pack uses -----------------------------------------------------------
class _Uses(ast.NodeVisitor):
    """Dotted ComfyUI names a module uses (``comfy.model_management.load_models_gpu``, ``io.Int.Input``
    through ``from comfy_api.latest import io``), and the attribute names it only reaches through
    ``hasattr``/``getattr`` with a literal name (guarded: allowed to be missing)."""

    def __init__(self):
        self.aliases: dict[str, str] = {}  # local name -> dotted ComfyUI name
        self.used: set[str] = set()
        self.guarded: set[str] = set()

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name.split(".")[0] in COMFY_MODULES:
                local = alias.asname or alias.name.split(".")[0]
                self.aliases[local] = alias.name if alias.asname else alias.name.split(".")[0]
                self.used.add(alias.name)

    def visit_ImportFrom(self, node):
        if node.level or not node.module or node.module.split(".")[0] not in COMFY_MODULES:
            return
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            self.used.add(f"{node.module}.{alias.name}")

    def visit_Call(self, node):
        name = getattr(node.func, "id", None)
        if name in ("hasattr", "getattr") and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            self.guarded.add(str(node.args[1].value))
        self.generic_visit(node)

    def visit_Attribute(self, node):
        parts, base = [], node
        while isinstance(base, ast.Attribute):
            parts.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id in self.aliases:
            self.used.add(".".join([self.aliases[base.id], *reversed(parts)]))
            return  # the inner attributes are prefixes of this name
        self.generic_visit(node)


def pack_comfy_names() -> tuple[set[str], set[str]]:
    """(every ComfyUI name the pack's code uses, the attribute names it guards)."""
    used, guarded = set(), set()
    for path in PACK_FILES:
        uses = _Uses()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):  # imports first (some are inside functions), then the uses
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                uses.visit(node)
        uses.visit(tree)
        used |= uses.used
        guarded |= uses.guarded
    return used, guarded


def resolve(dotted: str):
    """The object a dotted ComfyUI name points to (module import, then attributes); AttributeError or
    ImportError when it does not exist in this ComfyUI."""
    parts = dotted.split(".")
    obj, i = None, len(parts)
    while i > 0:
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError:
            i -= 1
    if obj is None:
        raise ImportError(dotted)
    for attr in parts[i:]:
        obj = getattr(obj, attr)
    return obj


def test_every_comfyui_name_the_pack_uses_exists(comfyui):
    used, guarded = pack_comfy_names()
    assert {"comfy.model_patcher.ModelPatcher", "comfy.model_management.load_models_gpu", "comfy_api.latest.io.Schema",
            "folder_paths.get_filename_list", "server.PromptServer"} <= used  # the scan sees the pack's uses
    missing = []
    for name in sorted(used):
        try:
            resolve(name)
        except (ImportError, AttributeError):
            if name.rsplit(".", 1)[-1] not in guarded:
                missing.append(name)
    assert missing == [], f"not in this ComfyUI: {missing}"


def test_no_pack_node_id_is_taken_by_a_core_node(comfyui):
    """ComfyUI skips a custom node whose id a core node already has; every pack id must be the pack's."""
    import nodes

    pack = comfyui.pack_module.__name__
    ids = [cls.define_schema().node_id for cls in comfyui.pack_submodule("nodes").node_classes()[0]]
    assert ids and all(node_id.startswith("VANS") for node_id in ids)
    shadowed = [i for i in ids if not nodes.NODE_CLASS_MAPPINGS[i].__module__.startswith(pack)]
    assert shadowed == []


# -- model management ----------------------------------------------------------------------------
def _loaded(patcher) -> bool:
    import comfy.model_management as mm

    return any(m.model is patcher for m in mm.current_loaded_models)


def test_wrappers_keep_the_non_dynamic_patcher_when_comfyui_swaps_the_core_one(comfyui, monkeypatch):
    """Newer ComfyUI replaces ``CoreModelPatcher`` by ``ModelPatcherDynamic`` at start-up when Dynamic VRAM
    is on; the VLM/CLIP wrappers must stay on the plain ModelPatcher (reasons in ``nodes/host.py``)."""
    import comfy.model_patcher

    class DynamicLike(comfy.model_patcher.ModelPatcher):
        def is_dynamic(self):
            return True

    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", DynamicLike, raising=False)
    host = comfyui.pack_submodule("nodes.host")
    patcher = host.manage(torch.nn.Linear(4, 4))
    assert type(patcher) is comfy.model_patcher.ModelPatcher
    assert not getattr(patcher, "is_dynamic", lambda: False)()


def test_offload_frees_only_its_own_model(comfyui):
    host = comfyui.pack_submodule("nodes.host")
    first, second = host.manage(torch.nn.Linear(8, 8)), host.manage(torch.nn.Linear(8, 8))
    try:
        assert host.load_to_device(first) == first.load_device
        host.load_to_device(second)
        assert _loaded(first) and _loaded(second)
        assert host.misplaced_tensors(first.model, first.load_device) == []
        host.offload(first)
        assert not _loaded(first) and _loaded(second)
        assert host.misplaced_tensors(first.model, first.offload_device) == []
    finally:
        host.offload(second)
    assert not _loaded(second)


def test_offload_uses_unload_model_and_clones_where_comfyui_has_it(comfyui, monkeypatch):
    """The 0.38 files' ``unload_model_and_clones`` frees the model (and clones) with ``free_memory`` and keeps
    the others; offload must go through it when it exists. The stand-in does what that function does."""
    import comfy.model_management as mm

    calls = []

    def unload_model_and_clones(model, unload_additional_models=True, all_devices=False):
        calls.append(model)
        keep = [m for m in mm.current_loaded_models if m.model is not model]
        mm.free_memory(1e30, mm.get_torch_device(), keep)

    monkeypatch.setattr(mm, "unload_model_and_clones", unload_model_and_clones, raising=False)
    host = comfyui.pack_submodule("nodes.host")
    first, second = host.manage(torch.nn.Linear(8, 8)), host.manage(torch.nn.Linear(8, 8))
    host.load_to_device(first)
    host.load_to_device(second)
    host.offload(first)
    assert calls == [first]
    assert not _loaded(first) and _loaded(second)
    host.offload(second)
    assert calls == [first, second] and not _loaded(second)


def test_misplaced_tensors_names_parameters_and_buffers_elsewhere(comfyui):
    host = comfyui.pack_submodule("nodes.host")
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    assert host.misplaced_tensors(module, torch.device("cpu")) == []
    names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    assert set(host.misplaced_tensors(module, torch.device("meta"))) == names


# -- opt-in: the shipped workflows in another frontend --------------------------------------------
CHROMIUM = os.environ.get("VANS_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def frontend_root() -> Path:
    value = os.environ.get("VANS_FRONTEND_ROOT")
    if not value:
        pytest.skip("opt-in: set VANS_FRONTEND_ROOT to the static folder of a comfyui-frontend-package "
                    "(pip install --target DIR comfyui-frontend-package==VERSION; DIR/comfyui_frontend_package/static)")
    root = Path(value)
    if not (root / "index.html").is_file():
        pytest.skip(f"VANS_FRONTEND_ROOT={root} has no index.html; point it at comfyui_frontend_package/static")
    return root


@pytest.fixture(scope="module")
def other_frontend_server(comfyui_dir, tiny_models, tmp_path_factory):
    from server_harness import ComfyServer

    root = frontend_root()
    with ComfyServer(comfyui_dir, PACK_ROOT, tiny_models, tmp_path_factory.mktemp("comfy_frontend"),
                     extra_args=("--front-end-root", str(root))) as srv:
        yield srv


@pytest.fixture(scope="module", params=["classic", "nodes2"])
def frontend_page(request, other_frontend_server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set VANS_CHROMIUM)")
    server = other_frontend_server
    server.post("/settings", {"Comfy.TutorialCompleted": True})
    server.post("/settings", {"Comfy.VueNodes.Enabled": request.param == "nodes2"})
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            tab = browser.new_page(viewport={"width": 2200, "height": 1300})
            tab.page_errors = []
            tab.on("pageerror", lambda error: tab.page_errors.append(str(error)))
            tab.goto(server.url + "/")
            tab.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
            vue = tab.evaluate("() => app.extensionManager.setting.get('Comfy.VueNodes.Enabled')")
            assert bool(vue) == (request.param == "nodes2")
            print("frontend", tab.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__"), request.param)
            yield tab
        finally:
            browser.close()


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_workflow_in_the_other_frontend(frontend_page, other_frontend_server, name):
    page = frontend_page
    workflow = json.loads((WORKFLOWS / f"{TEMPLATES[name]}.json").read_text(encoding="utf-8"))
    page.page_errors.clear()
    page.evaluate("async ([w]) => { await app.loadGraphData(w); }", [workflow])
    page.wait_for_timeout(1500)
    page.keyboard.press("Escape")  # a missing-models dialog (real file names, tiny models) would sit on top
    nodes = page.evaluate("""() => (app.graph.nodes || app.graph._nodes).map(n => ({
        type: n.type, known: n.type in LiteGraph.registered_node_types,
        widgets: (n.widgets || []).map(w => w.name)}))""")
    assert [n["type"] for n in nodes if not n["known"]] == []
    assert len(nodes) == len(workflow["nodes"])
    # every widget input of a VANS node is a widget on the page (Nodes 2.0 draws them itself)
    info = other_frontend_server.get("/object_info")
    for node in (n for n in nodes if n["type"].startswith("VANS")):
        spec = info[node["type"]]["input"]
        widget_inputs = {key for group in ("required", "optional") for key, value in spec.get(group, {}).items()
                         if isinstance(value[0], list) or value[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")}
        assert widget_inputs <= set(node["widgets"]), (node["type"], widget_inputs - set(node["widgets"]))
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    api = load_api(name)
    assert {k: (v["class_type"], v["inputs"]) for k, v in prompt.items()} == \
           {k: (v["class_type"], v["inputs"]) for k, v in api.items()}
    assert page.page_errors == []
