"""Tests that need a real ComfyUI: found through ``VANS_COMFYUI_DIR`` or because this pack sits in
``ComfyUI/custom_nodes/``. Without one (or in a Python that lacks ComfyUI's requirements, like CI's
venv) every test here is skipped with "skipped: no ComfyUI (set VANS_COMFYUI_DIR)".

Run them (ComfyUI 0.3.64 checkout, a venv with its requirements + this pack's + pytest):

    VANS_COMFYUI_DIR=/path/to/ComfyUI /path/to/venv/bin/python -m pytest tests/comfyui -q

Fixtures: ``comfyui_dir``; ``tiny_models`` (random-weight checkpoints in the real file formats, with
the architecture sizes that ``tiny_arch_pack`` makes ComfyUI's own loaders build); ``comfyui`` (ComfyUI
imported in this process with the pack loaded); ``server`` (a real ComfyUI server on a free port,
isolated base directory, only this pack and the tiny-architecture test pack).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SKIP_REASON = "skipped: no ComfyUI (set VANS_COMFYUI_DIR)"
# Modules ComfyUI imports at start-up that a plain engine venv does not have.
COMFYUI_IMPORTS = ("aiohttp", "yaml", "torchsde", "torchvision", "alembic", "sqlalchemy", "av", "PIL", "scipy",
                   "comfyui_frontend_package", "requests")


def find_comfyui() -> Path | None:
    env = os.environ.get("VANS_COMFYUI_DIR")
    candidates = [Path(env)] if env else []
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append(PACK_ROOT.parent.parent)
    for candidate in candidates:
        if (candidate / "main.py").is_file() and (candidate / "comfy").is_dir():
            return candidate.resolve()
    return None


def skip_reason() -> str | None:
    if find_comfyui() is None:
        return SKIP_REASON
    missing = [m for m in COMFYUI_IMPORTS if importlib.util.find_spec(m) is None]
    if missing:
        return f"{SKIP_REASON}: this Python lacks ComfyUI's requirements ({', '.join(missing)})"
    return None


def pytest_collection_modifyitems(config, items):
    reason = skip_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=reason)
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(marker)


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    path = find_comfyui()
    if path is None:
        pytest.skip(SKIP_REASON)
    return path


@pytest.fixture(scope="session")
def tiny_models(comfyui_dir, tmp_path_factory):
    from inprocess import import_comfyui
    from tiny_models import write_tiny_models

    import_comfyui(comfyui_dir)
    return write_tiny_models(tmp_path_factory.mktemp("vans_models"))


@pytest.fixture(scope="session")
def comfyui(comfyui_dir, tiny_models):
    """ComfyUI imported in this process (CPU), the tiny-architecture patches applied, the pack loaded."""
    from inprocess import start_inprocess

    return start_inprocess(comfyui_dir, PACK_ROOT, tiny_models)


@pytest.fixture(scope="session")
def server(comfyui_dir, tiny_models, tmp_path_factory):
    from server_harness import ComfyServer

    with ComfyServer(comfyui_dir, PACK_ROOT, tiny_models, tmp_path_factory.mktemp("comfy_server")) as srv:
        yield srv
