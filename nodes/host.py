"""What the nodes need from ComfyUI: progress and Cancel, model management, model folders.

Everything that touches ComfyUI's own modules lives here, imported lazily, so the node modules can
be imported (and their schemas checked) with only ``comfy_api`` available.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterable, Iterator

import torch

from ..vans.errors import Cancelled, ModelFileError, VansError
from ..vans.progress import use_cancel_check, use_reporter

log = logging.getLogger("vans")

# ComfyUI has no core folder key for Hugging Face-style VLM folders nor for reward models; these are
# the pack's keys (``LLM`` is the convention other VLM packs use, so one folder serves them all).
VLM_FOLDER_KEY = "LLM"
REWARD_FOLDER_KEY = "reward_models"
NONE_CHOICE = "none"


# -- progress and Cancel -------------------------------------------------------------------------
class _ComfyBar:
    """Engine progress bar drawn on the running node. ComfyUI's progress hook also checks the Cancel
    flag on every update, so each engine step/token/batch is an interrupt point."""

    def __init__(self, total: int, desc: str):
        import comfy.utils

        self._bar = comfy.utils.ProgressBar(max(int(total), 1))

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        pass


def _raise_if_interrupted() -> bool:
    """Cancel check for the engine: raises ComfyUI's own exception (and clears the flag), so the
    prompt ends as ``execution_interrupted`` rather than as an error."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


@contextlib.contextmanager
def engine_call() -> Iterator[None]:
    """Run engine code with ComfyUI's progress bar and Cancel button."""
    import comfy.model_management

    with use_reporter(_ComfyBar), use_cancel_check(_raise_if_interrupted):
        try:
            yield
        except Cancelled:
            raise comfy.model_management.InterruptProcessingException() from None


@contextlib.contextmanager
def model_file_errors(what: str) -> Iterator[None]:
    """A library error raised while loading a model (a truncated safetensors, a bad config) becomes one
    ModelFileError naming the model and the fix; the engine's own errors and Cancel pass unchanged."""
    import comfy.model_management

    try:
        yield
    except (VansError, comfy.model_management.InterruptProcessingException):
        raise
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{what} could not be loaded ({detail}); its files may be incomplete or corrupt, "
                             "download them again") from None


# -- model management ----------------------------------------------------------------------------
class ModelHolder(torch.nn.Module):
    """A plain module around a transformers / open_clip model.

    ComfyUI's ModelPatcher writes bookkeeping attributes (``device``, ``model_lowvram``…) on the
    module it manages; transformers models expose ``device`` as a read-only property, so the
    patcher manages this holder and moving the holder moves the model inside.
    """

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.device = None

    def forward(self, *args, **kwargs):  # never called: the engine calls ``inner`` directly
        return self.inner(*args, **kwargs)


def manage(model: torch.nn.Module):
    """Wrap a model in a ModelPatcher so that ComfyUI loads, offloads and unloads it ("Unload models")."""
    import comfy.model_management as mm
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(ModelHolder(model), load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def load_to_device(patcher) -> torch.device:
    """Make room (offloading other models as ComfyUI sees fit) and move the whole model to its device.

    ``force_full_load``: our modules are not ComfyUI's cast-on-the-fly layers, so a partially loaded
    transformers model would mix devices.
    """
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    return patcher.load_device


def offload(patcher) -> None:
    """Move a model back to its offload device and forget it in ComfyUI's list of loaded models."""
    import comfy.model_management as mm

    loaded = getattr(mm, "current_loaded_models", [])
    for i in range(len(loaded) - 1, -1, -1):
        if loaded[i].model is patcher:
            loaded[i].model_unload()
            loaded.pop(i)
    patcher.model.to(patcher.offload_device)
    mm.soft_empty_cache()


# -- model folders -------------------------------------------------------------------------------
def register_model_folders() -> None:
    """Add ``models/LLM`` and ``models/reward_models`` without dropping paths from extra_model_paths.yaml."""
    import folder_paths

    for key in (VLM_FOLDER_KEY, REWARD_FOLDER_KEY):
        folder_paths.add_model_folder_path(key, os.path.join(folder_paths.models_dir, key))


def folder_roots(key: str) -> list[str]:
    import folder_paths

    try:
        return [p for p in folder_paths.get_folder_paths(key) if os.path.isdir(p)]
    except KeyError:
        return []


def list_model_dirs(key: str, marker: str = "config.json", depth: int = 2) -> list[str]:
    """Folders (relative, '/'-separated) under a model key that hold ``marker``; ComfyUI lists files only."""
    found: set[str] = set()
    for root in folder_roots(key):
        for current, dirs, files in os.walk(root, followlinks=True):
            rel = os.path.relpath(current, root)
            level = 0 if rel == "." else rel.count(os.sep) + 1
            if level > 0 and marker in files:
                found.add(rel.replace(os.sep, "/"))
                dirs[:] = []  # a model folder's subfolders are its own business
            elif level >= depth:
                dirs[:] = []
            dirs.sort()
    return sorted(found)


def list_files(key: str, suffixes: Iterable[str], exclude: Iterable[str] = ()) -> list[str]:
    import folder_paths

    suffixes = tuple(s.lower() for s in suffixes)
    skip = tuple(exclude)
    try:
        names = folder_paths.get_filename_list(key)
    except KeyError:
        return []
    return sorted(n for n in names if n.lower().endswith(suffixes) and not os.path.basename(n).startswith(skip))


def resolve_dir(key: str, name: str) -> str | None:
    for root in folder_roots(key):
        path = os.path.join(root, *name.split("/"))
        if os.path.isdir(path):
            return path
    return None


def resolve_file(key: str, name: str) -> str | None:
    import folder_paths

    return folder_paths.get_full_path(key, name)


def check_choice(input_name: str, value, options: list[str]) -> str | bool:
    """V3 combos are not checked by ComfyUI 0.3.64; every node with a combo validates it here."""
    if value is None or value in options:
        return True
    shown = ", ".join(options[:8]) + (" …" if len(options) > 8 else "")
    return f"{input_name}: '{value}' is not one of the choices ({shown or 'none found'})"
