"""The VANS nodes for ComfyUI (V3 API), registered by the pack's top-level ``comfy_entrypoint``.

Each node maps sockets to engine calls (``..vans``) and nothing more. A Python package that only
some nodes need (transformers for the VLM, open_clip for CLIP scores, rouge-score for ROUGE-L) is
checked here: when it is missing, those nodes are left out with one log line and every other node
still loads. The pack itself never fails to import because of one.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from typing import Callable, Iterable

from comfy_api.latest import ComfyExtension, io

log = logging.getLogger("vans")

# Node modules, in menu order.
NODE_MODULES = ("vlm", "conditioning", "rewards", "clip", "selection")

# Python packages a node needs beyond what ComfyUI itself installs (torch, numpy, av, …).
NODE_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "VANSLoadVLM": ("transformers",),
    "VANSNextEventCaption": ("transformers",),
    "VANSLoadCLIP": ("open_clip",),
    "VANSClipVideoScore": ("open_clip",),
    "VANSClipTextScore": ("open_clip",),
    "VANSRougeL": ("rouge_score",),
    "VANSStage1Reward": ("rouge_score",),
}

# pip names for the log line (import name -> distribution name)
PIP_NAMES = {"open_clip": "open_clip_torch", "rouge_score": "rouge-score"}


def is_installed(module_name: str) -> bool:
    """True when ``module_name`` can be imported; checked without importing it (start-up stays fast)."""
    if module_name in sys.modules:
        return sys.modules[module_name] is not None
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        return False


def node_classes() -> tuple[list[type[io.ComfyNode]], list[str]]:
    """All node classes of the pack, and a problem line for each node module that failed to import."""
    classes, problems = [], []
    for name in NODE_MODULES:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ImportError as exc:  # a missing package imported at module level: disable this module only
            problems.append(f"nodes/{name}.py ({exc})")
            continue
        classes.extend(module.NODES)
    return classes, problems


def split_available(classes: Iterable[type[io.ComfyNode]],
                    installed: Callable[[str], bool] = is_installed) -> tuple[list, dict[str, list[str]]]:
    """(usable classes, {missing package: [node ids that need it]})."""
    usable, missing = [], {}
    for cls in classes:
        node_id = cls.define_schema().node_id
        absent = [pkg for pkg in NODE_REQUIREMENTS.get(node_id, ()) if not installed(pkg)]
        for pkg in absent:
            missing.setdefault(pkg, []).append(node_id)
        if not absent:
            usable.append(cls)
    return usable, missing


def disabled_message(missing: dict[str, list[str]], broken_modules: list[str]) -> str | None:
    """The single log line for everything left out, or None when nothing is."""
    parts = [f"{', '.join(ids)} need the Python package '{PIP_NAMES.get(pkg, pkg)}'" for pkg, ids in missing.items()]
    parts += [f"{m} could not be imported" for m in broken_modules]
    if not parts:
        return None
    return ("[VANS] some nodes are disabled: " + "; ".join(parts)
            + ". Install them with `pip install -r requirements.txt` in the pack folder and restart ComfyUI.")


class VansExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .host import register_model_folders

        register_model_folders()
        classes, broken = node_classes()
        usable, missing = split_available(classes)
        message = disabled_message(missing, broken)
        if message:
            log.warning(message)
        return usable
