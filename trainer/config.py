"""Trainer configuration: nested dataclasses, YAML files and ``--set key=value`` overrides.

A stage defines one top-level dataclass whose fields are plain values or nested dataclasses (the shared
``DataConfig``, ``RunConfig``, ``OptimConfig`` below and its own sections). Every field carries its help
text in ``field(metadata={"help": ...})``; ``config_help`` turns them into the ``--help`` listing.

Precedence: dataclass defaults < the YAML file (``--config``) < ``--set a.b=value`` (in order given).
A ``--set`` value is parsed with ``yaml.safe_load`` ("3" is an int, "1e-4" a float, "[q, v]" a list,
"true" a bool). Any key that is not a field, in the file or in ``--set``, raises ``InputError`` naming the
key and the closest valid keys. Values are checked against the field's type (ints are accepted for
floats).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vans.errors import InputError

T = TypeVar("T")


def doc(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with a default and its help text (lists/dicts get a factory)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def section(cls: type, help: str) -> Any:
    """A nested dataclass field."""
    return field(default_factory=cls, metadata={"help": help})


# ----------------------------------------------------------------------------------------------------
# Shared sections


@dataclass
class DataConfig:
    path: str = doc("", "dataset file: the VANS CSV (input_video_path, output_video_path, ENG_Instruction, "
                        "ENG_Think, ENG_GT_Caption) or a JSONL manifest (video, question, think, caption, gt_video, id)")
    video_root: str = doc("", "folder that relative video paths in the dataset are resolved against "
                              "(default: the dataset file's folder)")
    cache_dir: str = doc("", "feature cache folder (default: <run.out_dir>/cache); safe to share between runs")
    shuffle: bool = doc(True, "visit the samples in a seeded random order, reshuffled every epoch")
    max_samples: int = doc(0, "use only the first N usable samples (0 = all)")
    check_videos: bool = doc(True, "open every video once at start-up and skip unreadable rows")


@dataclass
class HeldoutDataConfig(DataConfig):
    """The data section of the SFT stages: a held-out split for validation (``trainer.data.split_samples``)."""

    heldout_fraction: float = doc(0.0, "share of the rows held out for validation when no row's split column names a "
                                       "held-out set (val, test, ...; seeded by heldout_seed, at least one row); 0 = none")
    heldout_seed: int = doc(0, "seed of the heldout_fraction draw (kept apart from run.seed, so runs with other "
                               "seeds validate on the same rows)")


@dataclass
class RunConfig:
    out_dir: str = doc("runs/stage", "output folder: checkpoints/, metrics.jsonl, tensorboard/, plots, export/")
    steps: int = doc(800, "optimizer steps of the whole run")
    prompts_per_step: int = doc(1, "prompts (groups) per optimizer step over all processes; must be a "
                                   "multiple of the number of processes")
    save_every: int = doc(50, "write a checkpoint every N steps (and at the end); at most N steps are lost on a crash")
    keep_last: int = doc(3, "checkpoints to keep (older ones are deleted)")
    seed: int = doc(0, "seed of the data order and of every step's sampling (per step and process)")
    log_every: int = doc(1, "print a metrics line every N steps (metrics.jsonl gets every step)")
    device: str = doc("auto", "auto, cpu, cuda or cuda:N (under accelerate each process uses its own GPU)")
    dtype: str = doc("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 or fp32")
    resume: bool = doc(False, "continue from the latest checkpoint in out_dir/checkpoints (same as --resume)")
    allow_world_size_change: bool = doc(False, "let --resume continue a checkpoint saved with another number of "
                                                "processes (the run is then no longer an exact replay)")
    stop_at: int = doc(0, "end this invocation after this step with a checkpoint (0 = run to the end); "
                          "for time-limited jobs, continue later with --resume")
    plot: bool = doc(True, "write PNG reward curves at the end of the run (needs matplotlib)")
    tensorboard: bool = doc(True, "also log to TensorBoard under out_dir/tensorboard when it is installed")


@dataclass
class OptimConfig:
    lr: float = doc(5e-5, "AdamW learning rate (0 freezes the policy)")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    betas: list = doc([0.9, 0.999], "AdamW betas")
    warmup: int = doc(0, "linear warm-up steps")
    schedule: str = doc("constant", "learning-rate schedule after warm-up: constant or cosine")
    grad_clip: float = doc(1.0, "clip the global gradient norm to this value (0 = off)")


# ----------------------------------------------------------------------------------------------------
# Keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_section(cls: type, name: str) -> bool:
    hint = _hints(cls)[name]
    return dataclasses.is_dataclass(hint)


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls`` (sections too, as ``a`` and ``a.b``)."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        hint = _hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(valid_keys(hint, key + "."))
    return keys


def _unknown(key: str, cls_root: type) -> InputError:
    """The error for an unknown key, suggesting the closest valid keys: first a key of the same name in another
    section ("lr" -> "optim.lr"), then the nearest names inside the key's own section ("optim.lrr" ->
    "optim.lr"; never the section itself), else the section's keys (or, at the top level, keys of a similar
    name anywhere)."""
    keys = valid_keys(cls_root)
    parent, _, last = key.rpartition(".")
    prefix = parent + "." if parent else ""
    same_name = [k for k in keys if k.rsplit(".", 1)[-1] == last]
    siblings = [k[len(prefix):] for k in keys if k.startswith(prefix) and "." not in k[len(prefix):]]
    near = [prefix + name for name in difflib.get_close_matches(last, siblings, n=3, cutoff=0.6)]
    close = list(dict.fromkeys(same_name + near))[:3]
    if close:
        hint = f"did you mean {', '.join(close)}?"
    elif parent:
        hint = f"valid keys in {parent}: {', '.join(siblings)}"
    else:
        lasts = difflib.get_close_matches(last, [k.rsplit(".", 1)[-1] for k in keys], n=3, cutoff=0.6)
        close = [k for k in keys if k.rsplit(".", 1)[-1] in lasts][:3]
        hint = f"did you mean {', '.join(close)}?" if close else f"valid top-level keys: {', '.join(siblings)}"
    return InputError(f"unknown config key '{key}'; {hint} (see --help)")


# ----------------------------------------------------------------------------------------------------
# Building


def _check_value(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # yaml reads "5e-5" (no dot) as a string
        except ValueError:
            pass
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise InputError(f"config key '{key}' must be a {hint.__name__}, got {value!r}; fix the value")
        return value
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise InputError(f"config key '{key}' must be a list like [a, b], got {value!r}; fix the value")
        return value
    return value


def _apply(obj: Any, data: dict, prefix: str, root: type) -> Any:
    """Copy of ``obj`` (a dataclass instance holding its defaults) with ``data`` applied, recursively."""
    cls = type(obj)
    if not isinstance(data, dict):
        raise InputError(f"config section '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    changes = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise _unknown(full, root)
        if dataclasses.is_dataclass(hints[key]):
            changes[key] = _apply(getattr(obj, key), value or {}, full + ".", root)
        else:
            changes[key] = _check_value(full, hints[key], value)
    return dataclasses.replace(obj, **changes)


def _build(cls: type, data: dict, prefix: str, root: type) -> Any:
    return _apply(cls(), data, prefix, root)


def _set_dotted(data: dict, key: str, value: Any, root: type) -> None:
    parts = key.split(".")
    cls = root
    node = data
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            raise _unknown(".".join(parts[: i + 1]) if i < len(parts) - 1 else key, root)
        hint = _hints(cls)[part]
        if i == len(parts) - 1:
            node[part] = value
            return
        if not dataclasses.is_dataclass(hint):
            raise InputError(f"config key '{'.'.join(parts[: i + 1])}' is a value, not a section; "
                             f"use --set {'.'.join(parts[: i + 1])}=VALUE")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        cls = hint


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ("a.b", yaml value)."""
    import yaml

    if "=" not in text:
        raise InputError(f"--set '{text}' is not key=value; write e.g. --set optim.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file not found: {path}; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"config file {path} is not valid YAML ({str(exc).splitlines()[0]}); fix its syntax") from None
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults < YAML file < ``--set`` overrides; unknown keys raise ``InputError`` with suggestions."""
    data = read_yaml(path) if path else {}
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value, cls)
    return _build(cls, data, "", cls)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path


def config_help(cls: type, prefix: str = "", defaults: Any = None) -> str:
    """One line per setting: ``key = default  help``, sections as headers."""
    lines = []
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        hint = _hints(cls)[f.name]
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(hint):
            lines.append(f"\n[{key}] {help_text}")
            lines.append(config_help(hint, key + ".", getattr(defaults, f.name)))
        else:
            lines.append(f"  {key} = {getattr(defaults, f.name)!r}\n      {help_text}")
    return "\n".join(lines)


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """--config FILE, --set KEY=VALUE (repeatable), --resume; the epilog lists every setting."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", metavar="FILE", help="YAML config file (see trainer/configs/)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override one setting, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.out_dir")
    parser.epilog = "settings (key = default, then what it does):\n" + config_help(cls)
    return parser


def parse_cli(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    parser = add_config_args(argparse.ArgumentParser(prog=prog, description=description), cls)
    args = parser.parse_args(argv)
    cfg = load_config(cls, args.config, args.overrides)
    if args.resume and hasattr(cfg, "run"):
        cfg.run.resume = True
    return cfg
