"""A recording stand-in for ``comfy_api.latest`` and ``folder_paths``, so CI (no ComfyUI) can import the
node modules and check their definitions. It mirrors only the calls the pack makes; the tests in
``tests/comfyui/`` check the same definitions against a real ComfyUI.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


class InputSpec:
    def __init__(self, io_type: str, id: str, optional: bool = False, tooltip: str | None = None, **options):
        self.io_type = io_type
        self.id = id
        self.optional = optional
        self.tooltip = tooltip
        self.options = options

    def as_dict(self) -> dict:  # the V3 input's flat option dict (min, max, options, default, forceInput, …)
        renamed = {"force_input": "forceInput", "dynamic_prompts": "dynamicPrompts"}
        return {"optional": self.optional, "tooltip": self.tooltip,
                **{renamed.get(key, key): value for key, value in self.options.items()}}


class OutputSpec:
    def __init__(self, io_type: str, id=None, display_name=None, tooltip=None, is_output_list=False):
        self.io_type = io_type
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip
        self.is_output_list = is_output_list


class SocketType:
    def __init__(self, io_type: str):
        self.io_type = io_type

    def Input(self, id, **kwargs):  # noqa: N802 (mirrors io.X.Input)
        return InputSpec(self.io_type, id, **kwargs)

    def Output(self, **kwargs):  # noqa: N802
        return OutputSpec(self.io_type, **kwargs)


class Schema:
    def __init__(self, node_id, display_name=None, category="sd", inputs=None, outputs=None, hidden=None,
                 description="", is_input_list=False, is_output_node=False, **flags):
        self.node_id = node_id
        self.display_name = display_name
        self.category = category
        self.inputs = inputs or []
        self.outputs = outputs or []
        self.hidden = hidden
        self.description = description
        self.is_input_list = is_input_list
        self.is_output_node = is_output_node
        self.flags = flags


class NodeOutput:
    def __init__(self, *args, ui=None, expand=None, block_execution=None):
        self.args = args
        self.ui = ui


class ComfyNode:
    @classmethod
    def define_schema(cls):
        raise NotImplementedError


class ComfyExtension:
    async def get_node_list(self):
        return []


class PreviewText:
    def __init__(self, value, **kwargs):
        self.value = value


def _io_module() -> types.ModuleType:
    io = types.ModuleType("comfy_api.latest.io")
    for name, io_type in (("Int", "INT"), ("Float", "FLOAT"), ("String", "STRING"), ("Boolean", "BOOLEAN"),
                          ("Combo", "COMBO"), ("Image", "IMAGE"), ("Latent", "LATENT"), ("Model", "MODEL"),
                          ("Vae", "VAE"), ("Video", "VIDEO"), ("Conditioning", "CONDITIONING"), ("Clip", "CLIP")):
        setattr(io, name, SocketType(io_type))
    io.Custom = SocketType
    io.Hidden = types.SimpleNamespace(unique_id="UNIQUE_ID", prompt="PROMPT", extra_pnginfo="EXTRA_PNGINFO")
    io.Schema = Schema
    io.NodeOutput = NodeOutput
    io.ComfyNode = ComfyNode
    return io


def _folder_paths_module(roots: dict[str, list[str]]) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.models_dir = "/nonexistent/models"
    fp.roots = roots

    def get_folder_paths(key):
        if key not in roots:
            raise KeyError(key)
        return list(roots[key])

    def add_model_folder_path(key, path, is_default=False):
        roots.setdefault(key, [])
        if path not in roots[key]:
            roots[key].append(path)

    def get_filename_list(key):
        names = []
        for root in get_folder_paths(key):
            base = Path(root)
            if base.is_dir():
                names += [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]
        return sorted(set(names))

    def get_full_path(key, name):
        for root in roots.get(key, []):
            path = Path(root) / name
            if path.is_file():
                return str(path)
        return None

    fp.get_folder_paths = get_folder_paths
    fp.add_model_folder_path = add_model_folder_path
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    return fp


@contextlib.contextmanager
def stubbed_pack(name: str = "vans_pack_stubbed", roots: dict[str, list[str]] | None = None):
    """Import the pack (as ComfyUI does: a package named by the caller, relative imports inside) with the
    stand-ins installed; every stand-in and pack module is removed from sys.modules afterwards."""
    io = _io_module()
    ui = types.ModuleType("comfy_api.latest.ui")
    ui.PreviewText = PreviewText
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ui, latest.ComfyExtension = io, ui, ComfyExtension
    api = types.ModuleType("comfy_api")
    api.latest = latest
    fake = {"comfy_api": api, "comfy_api.latest": latest, "comfy_api.latest.io": io, "comfy_api.latest.ui": ui,
            "folder_paths": _folder_paths_module(roots if roots is not None else {})}
    saved = {key: sys.modules.get(key) for key in fake}
    sys.modules.update(fake)
    try:
        spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(PACK_ROOT)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[name] = pack
        spec.loader.exec_module(pack)
        yield pack
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module


def import_node_module(pack_name: str, module: str):
    return importlib.import_module(f"{pack_name}.nodes.{module}")
