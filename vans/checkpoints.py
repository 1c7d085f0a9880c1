"""Reading and writing weight files safely.

Every loader in the engine goes through ``load_state_dict``: safetensors by default, pickle files
(.pt/.pth/.bin/.ckpt) only when the caller opts in, and a clear ``ModelFileError`` for a missing,
empty, truncated or non-finite file. Writers use ``save_state_dict``, which writes a temporary file
and renames it, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .errors import ModelFileError

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl"}


def load_state_dict(
    path: str | os.PathLike,
    *,
    what: str = "model",
    allow_pickle: bool = False,
    device: str = "cpu",
    check_finite: bool = True,
) -> dict[str, torch.Tensor]:
    """Load all tensors of a weight file. ``what`` names the file's role in error messages."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what} file not found: {path}")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{what} file is empty (0 bytes): {path}; download it again")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelFileError(
                f"{what} file {path.name} is a pickle file, which can run arbitrary code when loaded; "
                "use the .safetensors release, or opt in with allow_pickle=True (--allow-pickle) if you trust it"
            )
        try:
            sd = torch.load(path, map_location=device, weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise ModelFileError(f"{what} file {path.name} could not be read as a torch pickle: {exc}") from None
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping):
            raise ModelFileError(f"{what} file {path.name} does not hold a state dict")
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device=device)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFileError(
                f"{what} file {path.name} is not a valid safetensors file ({exc}); it may be truncated, download it again"
            ) from None
    if not sd:
        raise ModelFileError(f"{what} file {path.name} holds no tensors")
    if check_finite:
        assert_finite(sd, path, what)
    return sd


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata (empty for files without any)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


def assert_finite(sd: Mapping[str, torch.Tensor], path: str | os.PathLike, what: str = "model") -> None:
    for key, tensor in sd.items():
        if tensor.is_floating_point() and tensor.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            if not bool(torch.isfinite(tensor).all()):
                raise ModelFileError(
                    f"{what} file {Path(path).name} has NaN or infinite values in '{key}'; the file is corrupt"
                )


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove the first matching prefix from every key that has one (e.g. 'model.diffusion_model.')."""
    prefixes = tuple(prefixes)
    out = {}
    for key, value in sd.items():
        for p in prefixes:
            if key.startswith(p):
                key = key[len(p):]
                break
        out[key] = value
    return out


def save_state_dict(
    sd: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a safetensors file atomically (temporary file in the same folder, fsync, rename)."""
    from safetensors.torch import save_file

    from .files import atomic_path

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=dict(metadata) if metadata else None)
    return path


# -- adapters and the weights they were trained on ------------------------------------------------------

ADAPTER_FORMAT = "vans-lora"  # safetensors metadata "format" of vans.lora.save_lora


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a (possibly multi-GB) weight file: its size and the SHA-256 of its first and last
    MiB, which cover the safetensors header (names, shapes, offsets) and the last tensors' bytes."""
    import hashlib

    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            digest.update(f.read())
    return f"{size}:{digest.hexdigest()[:32]}"


def start_checkpoint_metadata(start: str | os.PathLike | None) -> dict[str, str]:
    """Metadata an adapter export records about the weights it was trained on top of (``"none"``: the base)."""
    if not start:
        return {"start_checkpoint": "none"}
    start = Path(start).resolve()
    return {"start_checkpoint": start.name, "start_checkpoint_path": str(start),
            "start_checkpoint_fingerprint": file_fingerprint(start)}


def checkpoint_chain(path: str | os.PathLike) -> list[Path]:
    """The files to apply, in order, to base weights to get what ``path`` was trained into.

    An adapter (``format = vans-lora``) is a delta on the weights it was trained from, which it records in its
    metadata (``start_checkpoint``, ``_path``, ``_fingerprint``): that start is applied first (and its own start
    before it), looked up at the recorded path, then beside the adapter. A recorded start that cannot be found,
    or whose fingerprint differs, is refused: the delta alone on other weights is a different model, silently.
    Any other file (the VANS ``vlm.safetensors``, a merged export, plain weights) stands alone.
    """
    path = Path(path)
    chain: list[Path] = [path]
    seen = {path.resolve()}
    while True:
        current = chain[0]
        meta = read_metadata(current) if current.suffix == ".safetensors" else {}
        name = meta.get("start_checkpoint", "none")
        if meta.get("format") != ADAPTER_FORMAT or name in ("", "none"):
            return chain
        candidates = [Path(meta["start_checkpoint_path"])] if meta.get("start_checkpoint_path") else []
        candidates.append(current.parent / name)
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ModelFileError(
                f"{current.name} is a LoRA adapter trained on top of {name}, which was not found "
                f"(looked at {', '.join(str(c) for c in candidates)}); put {name} there, or load the merged "
                f"export (vlm_merged.safetensors) instead of the adapter")
        expected = meta.get("start_checkpoint_fingerprint")
        if expected and file_fingerprint(found) != expected:
            raise ModelFileError(
                f"{current.name} was trained on top of a {name} that differs from {found} (fingerprint "
                f"mismatch); use the file it was trained from, or load the merged export (vlm_merged.safetensors)")
        if found.resolve() in seen:
            raise ModelFileError(f"{current.name}: its start checkpoint {found} refers back to itself")
        seen.add(found.resolve())
        chain.insert(0, found)
