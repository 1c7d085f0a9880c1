"""The Wan2.1 T2V DiT as diffusers' ``WanTransformer3DModel``, from every file layout users hold.

Accepted:

* a single safetensors file in the **original Wan key layout** (``patch_embedding.weight``,
  ``blocks.{i}.self_attn.q.weight``, ``blocks.{i}.modulation``, ``head.head.weight``…): the official
  ``diffusion_pytorch_model.safetensors``, VANS ``vdm.safetensors``, ComfyUI's repackaged
  ``wan2.1_t2v_1.3B_*.safetensors``, with or without a wrapper prefix (``model.diffusion_model.``);
  fp8 "scaled" files are dequantised;
* a diffusers folder (``transformer/config.json`` + ``diffusion_pytorch_model*.safetensors``, sharded
  or not; the pipeline root or the ``transformer/`` folder itself) or a diffusers-layout single file.

The architecture comes from the tensor shapes (heads = dim / 128, Wan's head size in every release),
and the file is checked before its data is read: anything but a plain Wan2.1 T2V DiT with 16 latent
channels (14B, I2V/FLF2V, VACE, Wan2.2, Animate, a VAE or a text encoder) is refused with a message
that says what was expected.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ModelFileError
from .files import (
    assign_weights,
    check_keys,
    dequantize_scaled_fp8,
    empty_model,
    find_weight_files,
    is_safetensors,
    read_config,
    read_headers,
    read_weights,
    report_extra_keys,
    strip_known_prefix,
)
from .kinds import describe_kind, detect_checkpoint_kind

WHAT = "DiT"
EXPECTED = "a Wan2.1 T2V DiT (16 input channels, no image embedding)"
HINT = "use wan2.1_t2v_1.3B_bf16.safetensors (or fp16/fp32) or VANS vdm.safetensors in models/diffusion_models"
WAN_HEAD_DIM = 128
LATENT_CHANNELS = 16
WAN21_T2V_1_3B = {"dim": 1536, "num_layers": 30, "ffn_dim": 8960}
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "pipe.dit.", "dit.", "transformer.")

# First key segments (or inner parts) that belong to other Wan variants: their presence means the
# file is not a plain T2V DiT even when the rest of it looks like one.
_VARIANT_PARTS = (
    (re.compile(r"^vace_"), "a Wan VACE DiT"),
    (re.compile(r"^img_emb\.|condition_embedder\.image_embedder\.|\.k_img\.|\.add_k_proj\."),
     "a Wan I2V/FLF2V DiT (it has an image embedding)"),
    (re.compile(r"^(motion_encoder|face_adapter|face_encoder)\."), "a Wan Animate DiT"),
    (re.compile(r"^control_adapter\."), "a Wan Fun-Camera DiT"),
    (re.compile(r"^(casual_audio_encoder|audio_injector|audio_proj|trainable_cond_mask|frame_packer|cond_encoder)\."),
     "a Wan speech/audio-driven DiT (S2V/HuMo)"),
    (re.compile(r"^ref_conv\."), "a Wan Fun reference DiT"),
)


@dataclass
class DitPlan:
    """What a DiT file holds, decided from names and shapes only."""

    config: dict
    layout: str  # "wan" (original) or "diffusers"
    extra_keys: list[str] = field(default_factory=list)  # as named in the file (prefix stripped)
    file_names: dict[str, str] = field(default_factory=dict)  # diffusers name -> name in the file


# -- key layouts ------------------------------------------------------------------------------

def dit_layout(keys) -> str:
    keys = list(keys)
    if any(k.endswith("head.modulation") or ".self_attn." in k or ".cross_attn." in k for k in keys):
        return "wan"
    return "diffusers"


def to_diffusers_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan names -> diffusers names, with diffusers' own converter (names only, tensors untouched)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers(dict(sd))


_TO_WAN_BLOCK = (
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."), (".to_q.", ".q."), (".to_k.", ".k."),
    (".to_v.", ".v."), (".to_out.0.", ".o."), (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
)
_TO_WAN_TOP = {
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "proj_out.": "head.head.",
}


def _wan_key(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    for old, new in _TO_WAN_TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("blocks."):
        if key.endswith(".scale_shift_table"):
            return key[: -len("scale_shift_table")] + "modulation"
        key = key.replace(".norm2.", ".norm3.")  # diffusers' norm2 is the cross-attention norm, Wan's norm3
        for old, new in _TO_WAN_BLOCK:
            key = key.replace(old, new)
    return key


def to_wan_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> original Wan names (what ComfyUI, DiffSynth and VANS read): used to export a
    trained DiT and to write test files. Checked against diffusers' converter, so the two stay inverse."""
    names = {k: _wan_key(k) for k in sd}
    back = to_diffusers_layout({wan: k for k, wan in names.items()})  # converts the names only
    if any(converted != k for converted, k in back.items()) or len(back) != len(names):
        raise RuntimeError("Wan DiT key mapping is out of step with diffusers' converter")
    return {names[k]: v for k, v in sd.items()}


# -- inspection (names and shapes) ------------------------------------------------------------

def _refuse(name: str, what_it_is: str) -> ModelFileError:
    return ModelFileError(f"{WHAT} file {name} is {what_it_is}; expected {EXPECTED}: {HINT}")


def _variant_of(keys) -> str | None:
    for pattern, description in _VARIANT_PARTS:
        if any(pattern.search(k) for k in keys):
            return description
    return None


def infer_dit_config(sd: Mapping[str, torch.Tensor], folder_config: dict | None = None) -> dict:
    """``WanTransformer3DModel`` arguments from diffusers-named tensors (meta tensors are enough)."""
    patch = sd["patch_embedding.weight"]
    dim, in_channels = int(patch.shape[0]), int(patch.shape[1])
    patch_size = tuple(int(s) for s in patch.shape[2:])
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    config = {
        "patch_size": patch_size,
        "num_attention_heads": dim // WAN_HEAD_DIM,
        "attention_head_dim": WAN_HEAD_DIM,
        "in_channels": in_channels,
        "out_channels": int(sd["proj_out.weight"].shape[0]) // max(1, math.prod(patch_size)),
        "text_dim": int(sd["condition_embedder.text_embedder.linear_1.weight"].shape[1]),
        "freq_dim": int(sd["condition_embedder.time_embedder.linear_1.weight"].shape[1]),
        "ffn_dim": next((int(sd[f"blocks.{i}.ffn.net.0.proj.weight"].shape[0]) for i in sorted(blocks)
                         if f"blocks.{i}.ffn.net.0.proj.weight" in sd), 0),
        "num_layers": max(blocks) + 1 if blocks else 0,
        "cross_attn_norm": any(k.endswith(".norm2.weight") for k in sd),
        "qk_norm": "rms_norm_across_heads" if any(".norm_q." in k for k in sd) else None,
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
    }
    if folder_config:
        heads, head_dim = folder_config.get("num_attention_heads"), folder_config.get("attention_head_dim")
        if heads and head_dim and heads * head_dim == dim:
            config.update(num_attention_heads=heads, attention_head_dim=head_dim)
        for key in ("eps", "rope_max_seq_len"):
            if key in folder_config:
                config[key] = folder_config[key]
    return config


def _check_config(config: dict, dim: int, name: str) -> None:
    in_ch = config["in_channels"]
    if in_ch == 36:
        raise _refuse(name, "a Wan I2V/FLF2V DiT (36 input channels)")
    if in_ch == 48 or config["out_channels"] == 48:
        raise _refuse(name, "a Wan2.2 TI2V-5B DiT (48 latent channels)")
    if in_ch != LATENT_CHANNELS or config["out_channels"] != LATENT_CHANNELS:
        raise _refuse(name, f"a DiT with {in_ch} input / {config['out_channels']} output channels")
    if config["patch_size"] != (1, 2, 2):
        raise _refuse(name, f"a DiT with patch size {config['patch_size']} (Wan2.1 uses 1×2×2)")
    if dim % WAN_HEAD_DIM:
        raise _refuse(name, f"a DiT of width {dim}, not a multiple of Wan's head size {WAN_HEAD_DIM}")
    if dim > WAN21_T2V_1_3B["dim"]:
        size = "the 14B model" if dim == 5120 else "not the 1.3B model"
        raise _refuse(name, f"a larger Wan DiT (width {dim}, {config['num_layers']} blocks: {size}); VANS is "
                            f"built on Wan2.1-T2V-1.3B (width 1536, 30 blocks)")
    if dim == WAN21_T2V_1_3B["dim"] and config["num_layers"] != WAN21_T2V_1_3B["num_layers"]:
        raise ModelFileError(f"{WHAT} file {name} has {config['num_layers']} blocks, Wan2.1-T2V-1.3B has 30; "
                             "the file is incomplete, download it again")
    if not config["num_layers"] or not config["ffn_dim"]:
        raise ModelFileError(f"{WHAT} file {name} has no transformer blocks; the file is incomplete")


def inspect_dit_state_dict(sd: Mapping[str, torch.Tensor], name: str = "the file",
                           folder_config: dict | None = None,
                           dtype: torch.dtype = torch.float32) -> tuple[DitPlan, dict[str, torch.Tensor]]:
    """Check that ``sd`` (real or meta tensors, any accepted layout) is a Wan2.1 T2V DiT; return the
    plan and the tensors in diffusers names (fp8 dequantised), ready to assign.

    Raises ``ModelFileError`` naming what the file is and what was expected.
    """
    sd = strip_known_prefix(sd, DIT_PREFIXES)
    kind = detect_checkpoint_kind(sd)
    if kind != "wan_dit":
        raise _refuse(name, describe_kind(kind))
    variant = _variant_of(sd)
    if variant:
        raise _refuse(name, variant)
    sd = dequantize_scaled_fp8(sd, what=WHAT, name=name, dtype=dtype)
    layout = dit_layout(sd)
    file_names = {k: k for k in sd}
    if layout == "wan":
        file_names = to_diffusers_layout(file_names)  # converts the names only: diffusers name -> file name
        sd = {new: sd[old] for new, old in file_names.items()}
    required = ("patch_embedding.weight", "proj_out.weight", "condition_embedder.text_embedder.linear_1.weight",
                "condition_embedder.time_embedder.linear_1.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise ModelFileError(f"{WHAT} file {name} is missing {', '.join(missing)}; the file is incomplete or "
                             f"not {EXPECTED}")
    config = infer_dit_config(sd, folder_config)
    _check_config(config, int(sd["patch_embedding.weight"].shape[0]), name)
    return DitPlan(config=config, layout=layout, file_names=file_names), sd


# -- loading ----------------------------------------------------------------------------------

def _dit_files(path: Path, allow_pickle: bool) -> tuple[list[Path], dict | None]:
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise ModelFileError(f"{WHAT} file not found: {path}; {HINT}")
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    return find_weight_files(folder, "diffusion_pytorch_model", what=WHAT, allow_pickle=allow_pickle), \
        read_config(folder)


def dtype_rule(model, dtype: torch.dtype):
    """Parameter name -> its dtype: ``dtype``, except the modules diffusers keeps in fp32 whatever the
    load dtype (norms, modulation, time embedding)."""
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())

    def dtype_of(key: str) -> torch.dtype:
        return torch.float32 if any(part in keep_fp32 for part in key.split(".")) else dtype

    return dtype_of


def cast_dit(model, dtype: torch.dtype):
    """Cast a built DiT to ``dtype`` as ``load_dit`` does (fp32 modules stay fp32); returns it."""
    dtype_of = dtype_rule(model, dtype)
    for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype_of(key))
    return model


def _file_name(plan: DitPlan):
    """Model key -> the name a file of this layout uses (for messages)."""
    return _wan_key if plan.layout == "wan" else str


def build_dit(config: dict):
    from diffusers import WanTransformer3DModel

    return empty_model(lambda: WanTransformer3DModel(**config))


def load_dit(path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             allow_pickle: bool = False):
    """A Wan2.1 T2V DiT file or folder -> ``WanTransformer3DModel`` in ``dtype`` on ``device`` (eval mode).

    Unexpected extra weights (e.g. VANS's unused MLLM-query layers) are reported as a warning and ignored;
    missing or mis-shaped weights raise ``ModelFileError``. Norms, modulation tables and the time
    embedding stay in fp32, as diffusers' own loader keeps them.
    """
    path = Path(path).expanduser()
    files, folder_config = _dit_files(path, allow_pickle)
    name = path.name
    if is_safetensors(files):  # refuse a wrong file before reading gigabytes
        plan, named = inspect_dit_state_dict(read_headers(files, what=WHAT), name, folder_config)
        model = build_dit(plan.config)
        check_keys(model, named, what=WHAT, name=name, expected=EXPECTED, file_name=_file_name(plan))
    plan, named = inspect_dit_state_dict(read_weights(files, what=WHAT, allow_pickle=allow_pickle), name,
                                         folder_config, dtype)
    model = build_dit(plan.config)
    extra = check_keys(model, named, what=WHAT, name=name, expected=EXPECTED, file_name=_file_name(plan))
    plan.extra_keys = [plan.file_names.get(k, k) for k in extra]
    report_extra_keys(plan.extra_keys, what=WHAT, name=name)
    assign_weights(model, named, dtype_of=dtype_rule(model, dtype), device=device)
    model.eval()
    model.vans_load_report = plan  # what was inferred and what was ignored, for logs and tests
    return model


def check_text_encoder_matches(dit, text_encoder) -> None:
    """The DiT reads prompt embeddings of its ``text_dim`` features: a real umT5-XXL (4096) with a tiny
    demo DiT, or the reverse, would fail deep inside a matmul; say it here instead."""
    expected, got = int(dit.config.text_dim), int(text_encoder.dim)
    if expected != got:
        raise ModelFileError(f"the text encoder gives {got}-wide embeddings but the DiT reads {expected}; "
                             "use the umT5-XXL text encoder with the Wan2.1 DiT (or both tiny demo models)")
