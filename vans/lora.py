"""LoRA for the captioner without peft (not one of our dependencies), and the VANS ``vlm.safetensors`` loader.

``add_lora`` wraps ``nn.Linear`` modules in ``LoRALinear`` (y = W·x + (α/r)·B·A·dropout(x), B zero at
start so the wrapped model is unchanged). The GRPO reference policy is the same network with the
adapters switched off (``adapters_disabled``), so no second copy of the 3B model is kept.

Which modules: VANS trained LoRA r 8 / α 32 with PEFT ``target_modules`` = q,k,v,o,gate,up,down. PEFT
matches those as name suffixes over the whole Qwen2.5-VL, so the official adapter also covers the vision
tower's MLPs (``visual.blocks.N.mlp.{gate,up,down}_proj``; the vision attention is ``qkv``/``proj`` and
is not matched). Our default adapts the **language model only** (``exclude=("visual",)``): the vision
tower then stays frozen, so a GRPO step encodes the video once per group without a graph through the
ViT and reuses the features for all G completions and the reference pass. Pass ``exclude=()`` to adapt
the vision MLPs as well. Loading the official file is independent of this choice: its LoRA pairs,
wherever they sit, are merged into the base weights.

Checkpoint formats read by ``load_vlm_checkpoint``:

* VANS/PEFT: keys ``[pipe.mllm.|mllmagent.]mllm_backbone.base_model.model.<Qwen key>`` where a wrapped
  linear stores ``….base_layer.weight`` (+bias) and ``….lora_A.default.weight`` / ``….lora_B.default.weight``;
* ours (``save_lora``): ``<module path>.lora_A.weight`` / ``.lora_B.weight`` with r, α and the targets in
  the safetensors metadata (``format = vans-lora``);
* a plain (merged) Qwen2.5-VL state dict, with or without the prefixes above.

Qwen key names changed between transformers 4.4x (``model.layers.*``, ``visual.*``) and 5.x
(``model.language_model.layers.*``, ``model.visual.*``); names are mapped onto whatever the loaded model uses.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from .errors import ModelFileError

log = logging.getLogger("vans")

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_EXCLUDE = ("visual",)
VANS_LORA_ALPHA = 32.0  # official LoraConfig(r=8, lora_alpha=32)
LORA_FORMAT = "vans-lora"

# Wrappers of the official checkpoint, outermost first (the official loaders strip these prefixes).
_OFFICIAL_PREFIXES = ("pipe.mllm.mllm_backbone.", "mllmagent.mllm_backbone.", "mllm.mllm_backbone.", "mllm_backbone.")
_PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (α/r)·B·A."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 32.0, dropout: float = 0.05,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base_layer = base
        self.r = int(r)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.r
        self.enabled = True
        kw = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, self.r, bias=False, **kw)
        self.lora_B = nn.Linear(self.r, base.out_features, bias=False, **kw)
        # Same init as PEFT: A kaiming-uniform, B zero, so the wrapped model starts identical to the base.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that reads ``proj.weight`` (dtype/device checks) keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.enabled:
            return y
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.dropout(x).to(a.dtype)))
        return y + (update * self.scale).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(α/r)·B·A in float32, the amount ``merge`` adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    def merged(self) -> nn.Linear:
        """The base linear with the update folded in (the adapter's weights are not modified)."""
        base = self.base_layer
        with torch.no_grad():
            base.weight.copy_((base.weight.float() + self.delta_weight().to(base.weight.device)).to(base.weight.dtype))
        return base

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, enabled={self.enabled}"


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(e in parts or name.startswith(e + ".") for e in exclude)


def lora_targets(model: nn.Module, target_names: Iterable[str] = DEFAULT_TARGETS,
                 exclude: Iterable[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Paths of the plain linears ``add_lora`` would wrap (name's last part in ``target_names``)."""
    target_names, exclude = set(target_names), tuple(exclude)
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in target_names and not _excluded(name, exclude)]


def add_lora(model: nn.Module, target_names: Iterable[str] = DEFAULT_TARGETS, r: int = 8, alpha: float = 32.0,
             dropout: float = 0.05, exclude: Iterable[str] = DEFAULT_EXCLUDE, *, freeze_base: bool = True,
             dtype: torch.dtype | None = None) -> list[str]:
    """Wrap the matching linears in place; returns their paths. With ``freeze_base`` only LoRA trains."""
    paths = lora_targets(model, target_names, exclude)
    if not paths:
        raise ValueError(f"no nn.Linear named {sorted(set(target_names))} found outside {list(exclude)}")
    if freeze_base:
        model.requires_grad_(False)
    for path in paths:
        parent, child = _parent(model, path)
        setattr(parent, child, LoRALinear(getattr(parent, child), r=r, alpha=alpha, dropout=dropout, dtype=dtype))
    return paths


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: ``<module path>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]."""
    out = {}
    for name, module in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return out


def lora_metadata(model: nn.Module) -> dict[str, str]:
    """safetensors metadata for ``lora_state_dict``: format, rank, α and the wrapped module names."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters")
    ranks = {m.r for m in modules.values()}
    alphas = {m.alpha for m in modules.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"adapters with mixed rank/alpha cannot share one header: r {sorted(ranks)}, alpha {sorted(alphas)}")
    return {
        "format": LORA_FORMAT,
        "r": str(ranks.pop()),
        "alpha": f"{alphas.pop():g}",
        "targets": ",".join(sorted({n.rsplit('.', 1)[-1] for n in modules})),
        "modules": str(len(modules)),
    }


def save_lora(model: nn.Module, path: str | os.PathLike, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write the adapter (tensors + metadata) atomically as safetensors."""
    from .checkpoints import save_state_dict

    return save_state_dict(lora_state_dict(model), path, metadata={**lora_metadata(model), **(extra_metadata or {})})


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model (the GRPO reference policy) inside the block; adapters come back on exit."""
    modules = list(lora_modules(model).values())
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.enabled = was


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back (fast inference)."""
    for name, module in lora_modules(model).items():
        parent, child = _parent(model, name)
        setattr(parent, child, module.merged())
    return model


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` under its plain name (``…base_layer.weight`` → ``….weight``) with each
    adapter folded in, optionally cast to ``dtype``; the model itself is untouched (training goes on).
    Tied tensors (e.g. Qwen's lm_head / embedding) appear once, under their first name."""
    modules = lora_modules(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        key = name.replace(".base_layer.", ".")
        module_path = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module_path in modules:
            tensor = (tensor.float() + modules[module_path].delta_weight().to(tensor.device)).to(tensor.dtype)
        tensor = tensor.detach()
        out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


@dataclass
class LoadReport:
    """What a checkpoint load did; lists are key names as they appear in the file."""

    path: str = ""
    format: str = ""
    applied: int = 0  # base tensors copied
    merged_lora: int = 0  # LoRA pairs folded into base weights (load_vlm_checkpoint) or loaded (load_lora_state_dict)
    rank: int | None = None
    alpha: float | None = None
    missing: list[str] = field(default_factory=list)  # model tensors the file should have had but lacks
    unexpected: list[str] = field(default_factory=list)  # file tensors with no place in the model
    shape_mismatched: list[str] = field(default_factory=list)  # "key: file [..] vs model [..]"

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatched)

    def summary(self) -> str:
        def few(items: list[str]) -> str:
            return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")

        parts = [f"{Path(self.path).name or 'state dict'} ({self.format}): {self.applied} base tensors, "
                 f"{self.merged_lora} LoRA pairs" + (f" (r {self.rank}, alpha {self.alpha:g})" if self.rank else "")]
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape mismatch", self.shape_mismatched)):
            if items:
                parts.append(f"{len(items)} {label}: {few(items)}")
        return "; ".join(parts)


def load_lora_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], *, strict: bool = True) -> LoadReport:
    """Copy adapter tensors (our export layout) into the model's existing ``LoRALinear`` modules.

    The model must already be wrapped with ``add_lora`` at the same paths (resume, reference copies).
    With ``strict`` any missing, unexpected or mis-shaped tensor raises ``ModelFileError``.
    """
    modules = lora_modules(model)
    report = LoadReport(format=LORA_FORMAT)
    seen, present = set(), set()
    for key, tensor in sd.items():
        match = re.fullmatch(r"(.+)\.(lora_[AB])\.weight", key)
        module = modules.get(match.group(1)) if match else None
        if module is None:
            report.unexpected.append(key)
            continue
        present.add(key)
        target = getattr(module, match.group(2)).weight
        if tuple(target.shape) != tuple(tensor.shape):
            report.shape_mismatched.append(f"{key}: file {list(tensor.shape)} vs model {list(target.shape)}")
            continue
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
        seen.add(key)
    report.missing = [f"{n}.{ab}.weight" for n in modules for ab in ("lora_A", "lora_B")
                      if f"{n}.{ab}.weight" not in present]
    report.merged_lora = len(seen) // 2
    if modules:
        report.rank = next(iter(modules.values())).r
        report.alpha = next(iter(modules.values())).alpha
    if strict and not report.clean:
        raise ModelFileError(f"LoRA state dict does not fit the model: {report.summary()}")
    return report


# ----------------------------------------------------------------------------------------------------
# VANS vlm.safetensors (PEFT-wrapped), our export, or plain weights -> merged into a loaded Qwen2.5-VL


def _strip_wrappers(key: str) -> str:
    for prefix in _OFFICIAL_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if key.startswith(_PEFT_PREFIX):
        key = key[len(_PEFT_PREFIX):]
    return key


def _name_variants(name: str) -> list[str]:
    """The same Qwen2.5-VL tensor under the transformers 4.4x and 5.x module layouts."""
    variants = [name]
    if name.startswith("visual."):
        variants.append("model." + name)
    elif name.startswith("model.visual."):
        variants.append(name[len("model."):])
    elif name.startswith("model.language_model."):
        variants.append("model." + name[len("model.language_model."):])
    elif name.startswith("model."):
        variants.append("model.language_model." + name[len("model."):])
    elif name.startswith("language_model."):
        variants.append("model." + name)
    return variants


def _canonical_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Model tensors by name, with our ``LoRALinear`` wrapping hidden (``….base_layer.weight`` -> ``….weight``)."""
    out = {}
    # remove_duplicate=False: a tied lm_head is listed under its own name too, so a file that stores it is not
    # reported as unexpected.
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        if ".lora_A." in name or ".lora_B." in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[name] = module.base_layer
        elif type(module) is nn.Linear and not re.search(r"\.(lora_A|lora_B|base_layer)$", name):
            out[name] = module
    return out


def _resolve(name: str, table: Mapping[str, object]) -> str | None:
    for candidate in _name_variants(name):
        if candidate in table:
            return candidate
    return None


def _detect_format(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    if metadata.get("format") == LORA_FORMAT:
        return LORA_FORMAT
    keys = list(sd)
    if any(".lora_A.default." in k or ".base_layer." in k or _PEFT_PREFIX in k for k in keys):
        return "vans-peft"
    if any(k.endswith(".lora_A.weight") for k in keys):
        return LORA_FORMAT
    return "plain"


def _split_entries(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(base tensors by Qwen name, {module name: {"A": tensor, "B": tensor}})."""
    base, pairs = {}, {}
    for key, tensor in sd.items():
        name = _strip_wrappers(key)
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if match:
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
            continue
        if ".lora_" in name:  # lora_dropout, lora_embedding_*, other adapter names
            base[name] = tensor
            continue
        base[name.replace(".base_layer.", ".")] = tensor
    return base, pairs


def load_vlm_checkpoint(model: nn.Module, path: str | os.PathLike, *, alpha: float | None = None,
                        allow_pickle: bool = False, strict: bool = False) -> LoadReport:
    """Apply a VANS ``vlm.safetensors`` (or our LoRA export, or plain weights) to a freshly loaded Qwen2.5-VL.

    Base tensors in the file replace the model's; every LoRA pair is merged: W += (α/r)·B·A, r from the
    tensors' shapes, α from ``alpha``, else the file's metadata, else 32 (the official config). The
    result is an ordinary model (no adapter modules), so inference pays nothing for LoRA. Apply it once,
    on base weights: a second call would add the deltas again. Missing, unexpected and mis-shaped keys
    are returned and logged; ``strict`` turns any of them into ``ModelFileError``. A file of which
    nothing fits raises ``ModelFileError`` regardless.
    """
    from .checkpoints import load_state_dict, read_metadata

    path = Path(path)
    sd = load_state_dict(path, what="VANS VLM checkpoint", allow_pickle=allow_pickle)
    metadata = read_metadata(path) if path.suffix == ".safetensors" else {}
    fmt = _detect_format(sd, metadata)
    base, pairs = _split_entries(sd)
    if alpha is None:
        alpha = float(metadata.get("alpha") or metadata.get("lora_alpha") or VANS_LORA_ALPHA)
    report = LoadReport(path=str(path), format=fmt, alpha=alpha if pairs else None)

    params = _canonical_parameters(model)
    written: set[int] = set()  # storage addresses, so tied tensors count once under any of their names
    with torch.no_grad():
        for name, tensor in base.items():
            target_name = _resolve(name, params)
            if target_name is None:
                report.unexpected.append(name)
                continue
            target = params[target_name]
            if tuple(target.shape) != tuple(tensor.shape):
                report.shape_mismatched.append(f"{name}: file {list(tensor.shape)} vs model {list(target.shape)}")
                continue
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            written.add(target.data_ptr())
            report.applied += 1
        _merge_pairs(model, pairs, alpha, report)

    if base and fmt != LORA_FORMAT:
        # A file that carries base weights should carry all of them (a tied lm_head is covered by the embedding).
        buffers = {name.replace(".base_layer.", ".") for name, _ in model.named_buffers()}
        report.missing = [n for n, t in params.items() if t.data_ptr() not in written and n not in buffers]
    if report.applied == 0 and report.merged_lora == 0 and report.shape_mismatched:
        raise ModelFileError(
            f"VANS VLM checkpoint {path.name} was made for a different model size: {report.shape_mismatched[0]}; "
            "use the vlm.safetensors made for Qwen2.5-VL-3B-Instruct"
        )
    if report.applied == 0 and report.merged_lora == 0:
        raise ModelFileError(
            f"VANS VLM checkpoint {path.name} has no tensor that fits this Qwen2.5-VL model "
            f"({len(sd)} tensors, e.g. '{next(iter(sd))}'); use the vlm.safetensors made for Qwen2.5-VL-3B-Instruct"
        )
    (log.info if report.clean else log.warning)("VLM checkpoint %s", report.summary())
    if strict and not report.clean:
        raise ModelFileError(f"VANS VLM checkpoint does not fit the model: {report.summary()}")
    return report


def _merge_pairs(model: nn.Module, pairs: Mapping[str, Mapping[str, torch.Tensor]], alpha: float,
                 report: LoadReport) -> None:
    linears = _linear_modules(model)
    ranks = set()
    for name, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            report.unexpected.extend(f"{name}.lora_{ab}.weight" for ab in pair)
            continue
        a, b = pair["A"], pair["B"]
        target_name = _resolve(name, linears)
        if target_name is None:
            report.unexpected.extend([f"{name}.lora_A.weight", f"{name}.lora_B.weight"])
            continue
        weight = linears[target_name].weight
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            report.shape_mismatched.append(
                f"{name}.lora_A/B: file A {list(a.shape)} B {list(b.shape)} vs model weight {list(weight.shape)}")
            continue
        delta = (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)) * (alpha / r)
        weight.copy_((weight.float() + delta).to(weight.dtype))
        ranks.add(r)
        report.merged_lora += 1
    if ranks:
        report.rank = max(ranks)


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child
