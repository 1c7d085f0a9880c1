"""ComfyUI imported into the test process (CPU): its node registry, executor and model code, no HTTP.

Follows ComfyUI's own start-up order: ComfyUI first on sys.path, ``utils.extra_config`` before
anything else (otherwise ``utils`` resolves to ``comfy/utils.py``), ``--cpu`` set before ``nodes`` is
imported, then the built-in extra nodes and finally this pack through ComfyUI's own
``load_custom_node``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass
class InProcessComfy:
    comfyui_dir: Path
    pack_module: object  # the pack as ComfyUI imported it
    models: object  # TinyModels

    def node_class(self, node_id: str):
        import nodes

        return nodes.NODE_CLASS_MAPPINGS[node_id]

    def pack_submodule(self, name: str):
        return importlib.import_module(f"{self.pack_module.__name__}.{name}")

    def run_prompt(self, graph: dict):
        """Validate and execute an API-format graph; returns (executor, outputs by node id)."""
        import execution

        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, graph, None))
        ok, error, outputs, node_errors = valid
        if not ok:
            raise AssertionError(f"invalid prompt: {error} {json.dumps(node_errors)[:2000]}")
        executor = execution.PromptExecutor(_ServerStub(), cache_type=execution.CacheType.CLASSIC)
        executor.execute(graph, prompt_id, {}, outputs)
        return executor

    def validate(self, graph: dict):
        import execution

        return asyncio.run(execution.validate_prompt(str(uuid.uuid4()), graph, None))


class _ServerStub:
    """What PromptExecutor needs from the server: a place to send events."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.events: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def queue_updated(self):
        pass


def import_comfyui(comfyui_dir: Path) -> None:
    """Make ComfyUI importable here, on the CPU, in ComfyUI's own start-up order: its folder first on
    sys.path, ``utils.extra_config`` before anything else (else ``utils`` is ``comfy/utils.py``), and
    ``--cpu`` set before ``comfy.model_management`` is imported."""
    root = str(comfyui_dir)
    if root not in sys.path:
        sys.path.insert(0, root)
    importlib.import_module("utils.extra_config")
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_api_nodes = True


def start_inprocess(comfyui_dir: Path, pack_root: Path, models) -> InProcessComfy:
    import_comfyui(comfyui_dir)
    import folder_paths

    for key, folder in models.folder_map().items():
        folder_paths.add_model_folder_path(key, str(folder), is_default=True)
    sys.path.insert(0, str(HERE))
    import tiny_arch_pack

    tiny_arch_pack.apply(models.arch)
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    ok = asyncio.run(nodes.load_custom_node(str(pack_root)))
    assert ok, "ComfyUI could not load the pack (see the log above)"
    module_name = str(pack_root).replace(".", "_x_")
    return InProcessComfy(comfyui_dir=comfyui_dir, pack_module=sys.modules[module_name], models=models)
