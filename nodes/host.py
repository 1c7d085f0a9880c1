"""What the nodes need from ComfyUI: progress and Cancel, model management, model folders, input checks.

Everything that touches ComfyUI's own modules lives here, imported lazily, so the node modules can
be imported (and their schemas checked) with only ``comfy_api`` available.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
from typing import Iterable, Iterator

import torch
from comfy_api.latest import io

from ..vans.errors import Cancelled, InputError, ModelFileError, VansError
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
# The VLM (transformers) and the CLIP scorer (open_clip) are plain torch modules, not ComfyUI's
# cast-on-the-fly ``comfy.ops`` layers. They get the non-dynamic ``comfy.model_patcher.ModelPatcher``
# (the same class and constructor in 0.3.64 and in the 0.38 release files), loaded whole through
# ``load_models_gpu``, deliberately not ``comfy.model_patcher.CoreModelPatcher``, which ComfyUI's
# start-up turns into ``ModelPatcherDynamic`` when Dynamic VRAM is on (0.38 ``main.py``). Facts from the
# 0.38 ``comfy/model_management.py`` and ``comfy/model_patcher.py``:
#   * ``ModelPatcherDynamic`` streams only ``comfy.ops`` layers; every other weight is force-loaded as a
#     plain GPU copy, one copy per module (so Qwen2.5-VL's tied ``lm_head``/``embed_tokens`` weight would
#     be held twice) that its on-demand (VBAR) eviction does not touch;
#   * ``free_memory`` never unloads a dynamic model to make room for another dynamic model ("that works
#     on-demand"), so a dynamic-wrapped VLM kept loaded (``offload`` off) would stay in VRAM while the
#     dynamic Wan model samples, whereas a non-dynamic patcher is unloaded whenever room is needed;
#   * ``load_models_gpu`` with a non-dynamic patcher frees VRAM from dynamic models first (the mixed case
#     ComfyUI handles: ComfyUI PR #12227 fixed unloading dynamic models for a regular ModelPatcher).
# A model kept outside a ModelPatcher (put on the GPU with ``.to``/``device_map``) is invisible to this
# bookkeeping; out-of-memory reports against other VLM packs after the Dynamic VRAM releases came from
# such loaders (e.g. ComfyUI-QwenVL issue #156: "Allocation on device" while materialising the weights).
# The handles that carry a patcher name it ``patcher``: the attribute ComfyUI's own model outputs use and
# that 0.38's ``comfy.model_patcher.is_model_patcher_output`` (RAM-cache eviction) looks for.

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
    """Wrap a model in a (non-dynamic, see above) ModelPatcher so that ComfyUI loads, offloads and
    unloads it ("Unload models")."""
    import comfy.model_management as mm
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(ModelHolder(model), load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def misplaced_tensors(module: torch.nn.Module, device: torch.device) -> list[str]:
    """Names of the parameters and buffers of ``module`` that are not on ``device``."""
    device = torch.device(device)
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    return [name for name, tensor in tensors if not _same_device(tensor.device, device)]


def load_to_device(patcher) -> torch.device:
    """Make room (offloading other models as ComfyUI sees fit) and move the whole model to its device.

    ``force_full_load``: our modules are not ComfyUI's cast-on-the-fly layers, so a partially loaded
    transformers model would mix devices. A tensor left elsewhere after the load (not seen with a
    non-dynamic patcher in 0.3.64; 0.38's own upscale node moves its non-``comfy.ops`` model the same
    way after ``load_models_gpu``) is moved, so the model never runs on two devices.
    """
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    stray = misplaced_tensors(patcher.model, patcher.load_device)
    if stray:
        log.info("[VANS] %d tensors were not on %s after loading; moving them (first: %s)", len(stray),
                 patcher.load_device, stray[0])
        patcher.model.to(patcher.load_device)
    return patcher.load_device


def offload(patcher) -> None:
    """Move a model back to its offload device and forget it in ComfyUI's list of loaded models.

    Newer ComfyUI has ``unload_model_and_clones`` for exactly this (it frees the model and its clones and
    keeps every other loaded model); 0.3.64 has none, so its loaded-model list is edited the same way."""
    import comfy.model_management as mm

    if hasattr(mm, "unload_model_and_clones"):
        mm.unload_model_and_clones(patcher)
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


# -- checking inputs -----------------------------------------------------------------------------
# How ComfyUI validates a prompt (execution.py ``validate_prompt`` / ``validate_inputs``, the same in 0.3.64
# and in the 0.38 release files): every output node is validated with its ancestors, and only the outputs
# whose ancestors all pass are run: a prompt with one valid output is accepted and runs to "success" while
# the invalid branch is dropped, the UI showing no more than a red outline. A node's ``validate_inputs``
# that fails is reported once for every input the function takes, and ComfyUI checks ``min``/``max`` (and,
# from the 0.38 files on, V3 combo options) only for the inputs that function does not take.
#
# So the pack's nodes take every input in ``validate_inputs(**values)`` and accept there: ComfyUI then
# leaves range and choice checks to ``check_inputs``, which each node runs first in ``execute``. A bad value
# stops the whole prompt with one ``execution_error`` naming the input (a dialog in the UI), instead of
# dropping a branch. ComfyUI still converts widget values to their declared type (INT, FLOAT, STRING,
# BOOLEAN) and checks link types and required inputs before any node code runs; those failures are its own.

class VansNode(io.ComfyNode):
    """Base of the pack's nodes: values are checked when the node runs (``check_inputs``), not by
    ComfyUI's per-output validation (see above)."""

    @classmethod
    def validate_inputs(cls, **values) -> bool:
        return True


def check_choice(input_name: str, value, options: list[str]) -> str | bool:
    """True when ``value`` is one of ``options`` (or unset), else the message naming the input."""
    if value is None or value in options:
        return True
    shown = ", ".join(options[:8]) + (" …" if len(options) > 8 else "")
    return f"{input_name}: {_shown(value)} is not one of the choices ({shown or 'none found'})"


def _shown(value) -> str:
    text = repr(value) if isinstance(value, str) else f"{type(value).__name__} {value!r}"
    return text if len(text) <= 60 else text[:57] + "…"


def input_problem(spec, value) -> str | None:
    """Why ``value`` does not fit the V3 input ``spec`` (its declared type, ``min``/``max``, combo options),
    or None. Sockets (IMAGE, MODEL, …) are left to ComfyUI's link-type check and to the code using them."""
    kind, info, name = str(spec.io_type), spec.as_dict(), spec.id
    if kind == "COMBO":
        verdict = check_choice(name, value, list(info.get("options") or []))
        return None if verdict is True else verdict
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}: expected text, got {_shown(value)}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}: expected true or false, got {_shown(value)}"
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            return f"{name}: expected a whole number, got {_shown(value)}"
    elif kind == "FLOAT":  # NaN from a linked score is a value (a failed reward, which Best of N skips)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"{name}: expected a number, got {_shown(value)}"
        if not math.isfinite(value) and not info.get("forceInput"):
            return f"{name}: expected a finite number, got {_shown(value)}"
    else:
        return None
    low, high = info.get("min"), info.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        return f"{name}={value}: must be between {low} and {high}"
    return None


def check_inputs(node_cls, values: dict) -> None:
    """Raise one InputError naming the first of the node's inputs whose value does not fit its declaration
    (``values``: the node's execute arguments, e.g. ``locals()``; unknown names and None are skipped).
    The schema is built afresh, so combo options are the files present now. A node taking whole lists
    (``is_input_list``) has each item checked."""
    schema = node_cls.define_schema()
    for spec in schema.inputs:
        value = values.get(spec.id)
        if value is None:
            continue
        for item in (value if schema.is_input_list else [value]):
            problem = None if item is None else input_problem(spec, item)
            if problem:
                raise InputError(problem)


def video_folders() -> list[str]:
    """The folders a VIDEO's file may lie in: ComfyUI's input, output and temp folders."""
    import folder_paths

    return [folder_paths.get_input_directory(), folder_paths.get_output_directory(),
            folder_paths.get_temp_directory()]
