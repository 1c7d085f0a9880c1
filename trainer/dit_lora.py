"""What stage 2 trains on the Wan DiT, and the two files it exports for ComfyUI.

Training modes:

* ``lora`` (default): ``vans.lora.LoRALinear`` adapters on the attention projections of every block
  (diffusers names ``blocks.N.attn{1,2}.to_{q,k,v}`` and ``to_out.0``, the Flow-GRPO Wan targets;
  ``ffn.net.0.proj`` / ``ffn.net.2`` can be added). The base stays frozen, B starts at zero so the adapted
  model starts equal to the base, and the KL reference is the same network with adapters off
  (``vans.lora.adapters_disabled``): no second copy of the DiT. Dropout is 0: a rollout and its training
  forward must compute the same function, or the first PPO ratio is not 1.
* ``full``: every DiT parameter trains; the KL reference is a frozen copy (``reference_dit``).

Exports (names in the original Wan layout, which ComfyUI and ``vans.wan.load_dit`` read):

* ``export_comfy_lora``: ``diffusion_model.<wan module>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r]
  and ``.alpha`` (a 0-d tensor). ComfyUI 0.3.64 maps ``diffusion_model.<key>`` to the model weight
  (``comfy.lora.model_lora_keys_unet``, "generic lora format") and applies W + (alpha / r)·B·A
  (``comfy.weight_adapter.lora``), which is exactly our (α/r)·B·A. Core ``LoraLoaderModelOnly`` loads it.
* ``export_merged_dit``: the whole DiT with the adapters folded in, as one safetensors file in the
  original Wan key layout (``blocks.N.self_attn.q.weight`` …), for core "Load Diffusion Model" and
  ``vans.wan.load_dit``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from vans.checkpoints import save_state_dict
from vans.errors import InputError
from vans.lora import LoRALinear, adapters_disabled, lora_modules, merged_state_dict
from vans.wan.dit import to_wan_layout

ATTENTION_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
FFN_TARGETS = ("ffn.net.0.proj", "ffn.net.2")
TARGET_PRESETS = {"attn": ATTENTION_TARGETS, "attn+ffn": ATTENTION_TARGETS + FFN_TARGETS}
COMFY_PREFIX = "diffusion_model."
LORA_FORMAT = "vans-dit-lora"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """A preset name (``attn``, ``attn+ffn``) or comma-separated module suffixes inside a block."""
    if isinstance(targets, str):
        if targets in TARGET_PRESETS:
            return TARGET_PRESETS[targets]
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = tuple(targets)
    if not targets:
        raise InputError(f"lora targets: empty; use one of {sorted(TARGET_PRESETS)} or suffixes like attn1.to_q")
    return targets


def dit_lora_targets(dit: nn.Module, targets: Iterable[str]) -> list[str]:
    """Paths ``blocks.N.<suffix>`` of the plain linears to adapt."""
    suffixes = tuple(targets)
    found = [name for name, module in dit.named_modules()
             if type(module) is nn.Linear and re.match(r"blocks\.\d+\.", name)
             and any(name.endswith("." + s) for s in suffixes)]
    if not found:
        raise InputError(f"lora targets {list(suffixes)} match no linear layer of the DiT; "
                         f"use one of {sorted(TARGET_PRESETS)}")
    return found


def add_dit_lora(dit: nn.Module, targets: str | Iterable[str] = "attn", rank: int = 32, alpha: float = 64.0) -> list[str]:
    """Freeze the DiT and wrap the target linears with fp32 ``LoRALinear`` adapters (dropout 0); returns the paths."""
    paths = dit_lora_targets(dit, parse_targets(targets))
    dit.requires_grad_(False)
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = dit.get_submodule(parent_path)
        setattr(parent, child, LoRALinear(getattr(parent, child), r=rank, alpha=alpha, dropout=0.0,
                                          dtype=torch.float32))
    return paths


def prepare_dit(dit: nn.Module, mode: str, *, targets="attn", rank: int = 32, alpha: float = 64.0) -> list[nn.Parameter]:
    """Set up ``dit`` for ``mode`` (``lora`` | ``full``) and return the trainable parameters."""
    dit.eval()  # no dropout anywhere: rollout and training forwards must agree
    if mode == "lora":
        add_dit_lora(dit, targets, rank, alpha)
    elif mode == "full":
        dit.requires_grad_(True)
    else:
        raise InputError(f"train mode {mode!r}: use 'lora' or 'full'")
    return [p for p in dit.parameters() if p.requires_grad]


def trainable_state_dict(dit: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors by module path (adapters for LoRA, every trainable parameter for full)."""
    return {name: p.detach() for name, p in dit.named_parameters() if p.requires_grad}


def load_trainable_state_dict(dit: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    params = dict(dit.named_parameters())
    wanted = {name for name, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(wanted - set(sd)), sorted(set(sd) - wanted)
    if missing or unexpected:
        raise InputError(f"checkpoint does not fit the DiT: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                         "resume with the same train mode and LoRA settings")
    with torch.no_grad():
        for name, tensor in sd.items():
            params[name].copy_(tensor.to(params[name].dtype))


@contextlib.contextmanager
def reference_policy(generator, mode: str, frozen: nn.Module | None = None) -> Iterator[None]:
    """Inside the block ``generator.model_velocity`` runs the KL reference policy: the same DiT with the
    adapters off (LoRA) or ``frozen`` (full fine-tune; see ``frozen_copy``) swapped in for the duration."""
    if mode == "lora":
        with adapters_disabled(generator.dit):
            yield
        return
    if frozen is None:
        raise InputError("full fine-tune needs a frozen reference DiT for the KL term (or set beta=0)")
    trained, generator.dit = generator.dit, frozen
    try:
        yield
    finally:
        generator.dit = trained


def frozen_copy(dit: nn.Module) -> nn.Module:
    """A frozen copy of the DiT (the full fine-tune's KL reference; costs one more DiT in memory)."""
    return copy.deepcopy(dit).requires_grad_(False).eval()


# -- export -------------------------------------------------------------------------------------

def _wan_module_names(paths: list[str]) -> dict[str, str]:
    """diffusers module path -> original Wan module path (through the DiT key mapping of vans.wan)."""
    wan = to_wan_layout({f"{p}.weight": None for p in paths})
    return {p: w[: -len(".weight")] for p, w in zip(paths, wan)}


def comfy_lora_state_dict(dit: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The adapters in ComfyUI's generic LoRA format, Wan module names (see the module docstring)."""
    modules = lora_modules(dit)
    if not modules:
        raise InputError("the DiT has no LoRA adapters to export (train mode 'full' exports only the merged DiT)")
    names = _wan_module_names(list(modules))
    out = {}
    for path, module in modules.items():
        key = COMFY_PREFIX + names[path]
        out[f"{key}.lora_A.weight"] = module.lora_A.weight.detach().to(dtype)
        out[f"{key}.lora_B.weight"] = module.lora_B.weight.detach().to(dtype)
        out[f"{key}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
    return out


def export_comfy_lora(dit: nn.Module, path: str | os.PathLike, *, dtype: str = "bf16",
                      metadata: dict[str, str] | None = None) -> Path:
    modules = lora_modules(dit)
    sd = comfy_lora_state_dict(dit, _dtype(dtype))
    first = next(iter(modules.values()))
    meta = {"format": LORA_FORMAT, "base_model": "Wan2.1-T2V-1.3B", "r": str(first.r), "alpha": f"{first.alpha:g}",
            "modules": str(len(modules)), **(metadata or {})}
    return save_state_dict(sd, path, metadata=meta)


def export_merged_dit(dit: nn.Module, path: str | os.PathLike, *, dtype: str = "bf16",
                      metadata: dict[str, str] | None = None) -> Path:
    """One safetensors file in the original Wan key layout (what ComfyUI's "Load Diffusion Model" reads)."""
    sd = to_wan_layout(merged_state_dict(dit, _dtype(dtype)))
    return save_state_dict(sd, path, metadata={"format": "wan", **(metadata or {})})


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise InputError(f"export dtype {name!r}: use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def is_lora(module: nn.Module) -> bool:
    return isinstance(module, LoRALinear)
