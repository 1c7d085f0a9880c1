"""Reading Wan weight files: single files, diffusers/transformers folders (sharded or not), headers only.

What every Wan loader needs:

* ``safetensors_header``: the names, shapes and dtypes of a safetensors file as meta tensors, read
  from the JSON header without touching the data, so a file of the wrong kind (a 28 GB 14B DiT, a
  VAE given as a DiT) is refused in milliseconds;
* ``find_weight_files`` / ``read_weights``: a folder's ``<stem>.safetensors`` or its sharded
  ``<stem>.safetensors.index.json``, pickles only when the caller opts in;
* ``dequantize_scaled_fp8``: ComfyUI's fp8 "scaled" files (float8 weights + a ``scale_weight`` per
  linear layer + a ``scaled_fp8`` marker) turned back into ordinary float weights;
* ``check_keys`` / ``assign_weights``: every expected tensor there with the right shape, then handed
  to a model built on the meta device, without a second copy.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from ..checkpoints import PICKLE_SUFFIXES, load_state_dict
from ..errors import ModelFileError

log = logging.getLogger("vans.wan")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Markers and activation scales of fp8 files; they carry no weights of the model.
_FP8_SIDE_KEYS = ("scaled_fp8", ".scale_input", ".input_scale", ".comfy_quant")
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def safetensors_header(path: str | os.PathLike, *, what: str = "model") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a meta tensor (right name, shape, dtype; no data).

    Only the header is read, so a truncated file passes here (what it is matters more to the user);
    ``read_weights`` refuses it afterwards.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{what} file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(f"{what} file is empty (0 bytes): {path}; download it again")
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise ValueError("header length is out of range")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        tensors = {name: _meta_tensor(info) for name, info in header.items() if name != "__metadata__"}
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ModelFileError(
            f"{what} file {path.name} is not a valid safetensors file ({exc}); it may be truncated, download it again"
        ) from None
    if not tensors:
        raise ModelFileError(f"{what} file {path.name} holds no tensors")
    return tensors


def _meta_tensor(info: dict) -> torch.Tensor:
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"unsupported dtype {info['dtype']}")
    return torch.empty([int(s) for s in info["shape"]], dtype=dtype, device="meta")


def find_weight_files(folder: Path, stem: str, *, what: str, allow_pickle: bool) -> list[Path]:
    """The weight files of a diffusers/transformers folder: ``<stem>.safetensors``, its sharded index, or
    (opt-in) the pickled ``<stem>.bin``."""
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return _shards_of(index, what)
    for pickled in (folder / f"{stem}.bin", folder / f"{stem}.bin.index.json"):
        if pickled.is_file():
            if not allow_pickle:
                raise ModelFileError(
                    f"{what} folder {folder} holds only pickle weights ({pickled.name}), which can run arbitrary "
                    "code when loaded; use the .safetensors release, or opt in with allow_pickle=True (--allow-pickle)"
                )
            return _shards_of(pickled, what) if pickled.suffix == ".json" else [pickled]
    raise ModelFileError(f"{what} folder {folder} has no {stem}.safetensors (nor {stem}.safetensors.index.json "
                         "with its shards); download the folder again")


def _shards_of(index: Path, what: str) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFileError(f"{what} index {index} is not readable ({exc}); download the folder again") from None
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ModelFileError(f"{what} folder {index.parent} is missing {len(missing)} shard(s) listed in "
                             f"{index.name} (first: {missing[0]}); download the folder again")
    return shards


def is_safetensors(files: Iterable[Path]) -> bool:
    return all(f.suffix.lower() not in PICKLE_SUFFIXES for f in files)


def read_headers(files: Iterable[Path], *, what: str) -> dict[str, torch.Tensor]:
    """Meta tensors of one file or of all shards together."""
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        merged.update(safetensors_header(f, what=what))
    return merged


def read_weights(files: Iterable[Path], *, what: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """All tensors of one file or of all shards together, on the CPU, through ``load_state_dict``
    (pickle opt-in, clear errors for empty, truncated or non-finite files)."""
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        merged.update(load_state_dict(f, what=what, allow_pickle=allow_pickle))
    return merged


def read_config(folder: Path) -> dict | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelFileError(f"{path} is not valid JSON ({exc}); download the folder again") from None


def strip_known_prefix(sd: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove one wrapper prefix shared by the weights (``model.diffusion_model.`` and the like).

    The prefix is chosen once for the whole file, the one most keys carry, so a key that merely
    contains the same text deeper inside is left alone.
    """
    prefixes = tuple(prefixes)
    counts = {p: sum(1 for k in sd if k.startswith(p)) for p in prefixes}
    best = max(prefixes, key=lambda p: counts[p], default=None)
    if best is None or counts[best] == 0:
        return dict(sd)
    return {(k[len(best):] if k.startswith(best) else k): v for k, v in sd.items()}


def is_fp8_side_key(key: str) -> bool:
    return key == "scaled_fp8" or key.endswith(_FP8_SIDE_KEYS)


def dequantize_scaled_fp8(sd: Mapping[str, torch.Tensor], *, what: str = "model", name: str = "",
                          dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """float8 weights times their per-tensor ``scale_weight`` (ComfyUI's scaled-fp8 convention, as in
    comfy/ops.py: ``weight.to(dtype) * scale_weight``); fp8 weights without a scale are upcast as they are.

    The product is computed in fp32 one tensor at a time and stored in ``dtype``, the dtype the model is
    loaded in: a bf16 load of the fp8 umT5-XXL then peaks near its bf16 size instead of holding every
    weight in fp32 first. Works on meta tensors too (the header check), where only the dtypes change.
    """
    out: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if key.endswith(".scale_weight"):
            scales[key[: -len("scale_weight")] + "weight"] = tensor
        elif key.endswith(".weight_scale"):  # newer ComfyUI quantised files
            scales[key[: -len("weight_scale")] + "weight"] = tensor
        elif not is_fp8_side_key(key):
            out[key] = tensor
    for weight_key, scale in scales.items():
        weight = out.get(weight_key)
        if weight is None:
            raise ModelFileError(f"{what} file {name}: scale for '{weight_key}' without the weight itself; "
                                 "the file is incomplete")
        if scale.numel() != 1:
            raise ModelFileError(f"{what} file {name}: '{weight_key}' uses a block-wise fp8 scale, which is not "
                                 "supported; use the fp16/bf16 or the per-tensor scaled fp8 file")
        out[weight_key] = (weight.to(torch.float32) * scale.to(torch.float32).reshape(())).to(dtype)
    for key, tensor in out.items():
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            out[key] = tensor.to(dtype)
    return out


def empty_model(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model with its parameters on the meta device (no memory, no random init); buffers such as
    RoPE tables are computed normally because they are not in the state dict."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def check_keys(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, what: str, name: str,
               expected: str, file_name: Callable[[str], str] = str) -> list[str]:
    """Raise for missing or mis-shaped weights; return the unexpected keys (the caller reports them).

    ``file_name`` turns a model key back into the name the file uses, for the message.
    """
    wanted = model.state_dict()
    missing = [file_name(k) for k in wanted if k not in sd]
    if missing:
        raise ModelFileError(
            f"{what} file {name} is missing {len(missing)} of the {len(wanted)} weights of {expected} "
            f"(first: {', '.join(missing[:3])}); the file is incomplete or of another model"
        )
    wrong = [f"{file_name(k)} {tuple(sd[k].shape)} instead of {tuple(v.shape)}" for k, v in wanted.items()
             if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise ModelFileError(f"{what} file {name} has {len(wrong)} weights of the wrong shape for {expected} "
                             f"(first: {wrong[0]}); the file is of another model")
    return [k for k in sd if k not in wanted]


def report_extra_keys(extra: list[str], *, what: str, name: str) -> None:
    if extra:
        log.warning("%s file %s: ignored %d weights the model does not use (first: %s)", what, name, len(extra),
                    ", ".join(extra[:5]))


def assign_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], *,
                   dtype_of: Callable[[str], torch.dtype], device: str | torch.device) -> None:
    """Move each tensor to its dtype and device one at a time (the source dict gives it up as it goes,
    so the peak is one copy of the model plus one tensor) and hand it to the model without copying."""
    wanted = model.state_dict().keys()
    ready: dict[str, torch.Tensor] = {}
    for key in list(sd):
        tensor = sd.pop(key)
        if key in wanted:
            target = dtype_of(key) if tensor.is_floating_point() else tensor.dtype
            ready[key] = tensor.to(device=device, dtype=target)
    model.load_state_dict(ready, strict=True, assign=True)
    model.to(device)  # buffers built on the CPU (RoPE tables)
