"""Atomic training checkpoints.

A checkpoint is a folder ``<dir>/step_00000042/`` holding

* ``trainable.safetensors`` the trainable tensors (e.g. the LoRA adapter),
* ``optimizer.pt``          ``optimizer.state_dict()`` (tensors and numbers only; read with ``weights_only``),
* ``state.json``            step, data position, scheduler state, caller extras, RNG states of python/numpy,
* ``rng.safetensors``       torch CPU and CUDA generator states.

It is written into ``<dir>/.tmp-step_…-<pid>/``, every file fsynced, then renamed in one ``os.replace``:
a process killed at any moment leaves either the complete folder or a ``.tmp-*`` folder that
``latest_checkpoint`` ignores (and the next save removes). Only complete folders count. The newest
``keep_last`` are kept.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from vans.errors import InputError

log = logging.getLogger("vans.trainer")

_STEP_DIR = re.compile(r"step_(\d{8})")
_FILES = ("trainable.safetensors", "optimizer.pt", "state.json", "rng.safetensors")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------
# RNG


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able python/numpy states, torch generator states as tensors)."""
    version, internal, gauss = random.getstate()
    py = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        py["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    return py, tensors


def set_rng_state(py: dict, tensors: dict[str, torch.Tensor]) -> None:
    if "python" in py:
        version, internal, gauss = py["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in py:
        try:
            import numpy as np

            name, keys, pos, has_gauss, cached = py["numpy"]
            np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        except ImportError:
            pass
    if "torch_cpu" in tensors:
        torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ----------------------------------------------------------------------------------------------------
# Save / find / load


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)
             and all((p / name).is_file() for name in _FILES)]
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_training_state(directory: str | os.PathLike, step: int, *, trainable: dict[str, torch.Tensor],
                        optimizer: torch.optim.Optimizer | None, scheduler: Any = None,
                        data_state: dict | None = None, extra: dict | None = None, keep_last: int = 3) -> Path:
    """Write the checkpoint of ``step`` atomically and prune old ones; returns its folder."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = directory / step_dir_name(step)
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict() if optimizer is not None else {}, tmp / "optimizer.pt")
        py_rng, torch_rng = rng_state()
        save_file(torch_rng, str(tmp / "rng.safetensors"))
        state = {"step": int(step), "data_state": data_state or {}, "extra": extra or {},
                 "scheduler": scheduler.state_dict() if scheduler is not None else None, "rng": py_rng}
        (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
        for name in _FILES:
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
        if final.exists():  # the same step written again (e.g. a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path: str | os.PathLike) -> int:
    return int(json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))["step"])


def load_training_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
                        scheduler: Any = None, *, restore_rng: bool = True
                        ) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Restore optimizer, scheduler and RNG states in place; returns (trainable, data_state, extra).
    ``extra`` also carries ``"step"``."""
    from safetensors.torch import load_file

    path = Path(path)
    missing = [name for name in _FILES if not (path / name).is_file()]
    if missing:
        raise InputError(f"checkpoint {path} is incomplete (no {', '.join(missing)}); resume from an older one")
    trainable = load_file(str(path / "trainable.safetensors"))
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state.get("rng", {}), load_file(str(path / "rng.safetensors")))
    extra = dict(state.get("extra") or {})
    extra["step"] = state["step"]
    return trainable, state.get("data_state") or {}, extra
