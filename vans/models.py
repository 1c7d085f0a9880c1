"""Where the engine finds its weight files: a ComfyUI ``models/`` tree or explicit paths.

Nothing is ever downloaded. A missing file produces one message that lists the file names we accept
and the folders we looked in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ModelFileError


@dataclass(frozen=True)
class Role:
    what: str
    folders: tuple[str, ...]  # ComfyUI model-folder names, first is the canonical one
    names: tuple[str, ...]  # accepted file (or, for the VLM, folder) names, best first
    is_dir: bool = False


ROLES = {
    "dit": Role("Wan2.1-T2V-1.3B DiT (VANS vdm.safetensors or the base model)", ("diffusion_models", "unet"),
                ("vdm.safetensors", "wan2.1_t2v_1.3B_bf16.safetensors", "wan2.1_t2v_1.3B_fp16.safetensors",
                 "wan2.1_t2v_1.3B_fp32.safetensors")),
    "text_encoder": Role("umT5-XXL text encoder", ("text_encoders", "clip"),
                         ("umt5_xxl_fp16.safetensors", "umt5_xxl_bf16.safetensors",
                          "umt5_xxl_fp8_e4m3fn_scaled.safetensors")),
    "vae": Role("Wan2.1 VAE", ("vae",), ("wan_2.1_vae.safetensors", "Wan2.1_VAE.safetensors")),
    "vlm": Role("Qwen2.5-VL-3B-Instruct folder (Hugging Face layout)", ("LLM",),
                ("Qwen2.5-VL-3B-Instruct",), is_dir=True),
    "vlm_checkpoint": Role("VANS VLM LoRA (vlm.safetensors, optional)", ("LLM",), ("vlm.safetensors",)),
    "clip": Role("open_clip ViT-B/32 reward model (OpenAI's, the paper's)", ("reward_models",),
                 ("clip_vit_b32_openai.safetensors", "open_clip_ViT-B-32.safetensors", "open_clip_model.safetensors")),
}


@dataclass
class ModelPaths:
    dit: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None  # only needed when the text-encoder file carries no tokenizer
    vae: Path | None = None
    vlm: Path | None = None
    vlm_checkpoint: Path | None = None
    clip: Path | None = None

    def missing(self, required: tuple[str, ...]) -> list[str]:
        return [name for name in required if getattr(self, name) is None]


def comfyui_models_dir(start: str | os.PathLike | None = None) -> Path | None:
    """``ComfyUI/models`` when this pack sits in ``ComfyUI/custom_nodes/<pack>/``, else None."""
    here = Path(start or Path(__file__).resolve().parent.parent).resolve()
    for parent in [here, *here.parents]:
        if parent.name == "custom_nodes" and (parent.parent / "models").is_dir():
            return parent.parent / "models"
    return None


def find_in_tree(role_name: str, models_dir: Path) -> Path | None:
    role = ROLES[role_name]
    for folder in role.folders:
        base = models_dir / folder
        for name in role.names:
            candidate = base / name
            if candidate.is_dir() if role.is_dir else candidate.is_file():
                return candidate
    if role_name == "vlm_checkpoint":  # also accepted inside the VLM folder
        for folder in role.folders:
            vlm_dir = models_dir / folder / ROLES["vlm"].names[0]
            if (vlm_dir / "vlm.safetensors").is_file():
                return vlm_dir / "vlm.safetensors"
    return None


def resolve_models(models_dir: str | os.PathLike | None = None, **explicit: str | os.PathLike | None) -> ModelPaths:
    """Explicit paths win; the rest is looked up in ``models_dir`` (or the enclosing ComfyUI tree)."""
    tree = Path(models_dir) if models_dir else comfyui_models_dir()
    paths = ModelPaths()
    for f in fields(ModelPaths):
        value = explicit.get(f.name)
        if value:
            path = Path(value).expanduser()
            if not path.exists():
                raise ModelFileError(f"{f.name.replace('_', ' ')} path does not exist: {path}")
            setattr(paths, f.name, path)
        elif tree is not None and f.name in ROLES:
            setattr(paths, f.name, find_in_tree(f.name, tree))
    return paths


def require(paths: ModelPaths, required: tuple[str, ...], models_dir: str | os.PathLike | None) -> None:
    """Raise one ModelFileError naming every missing file, the accepted names and the folders searched."""
    missing = paths.missing(required)
    if not missing:
        return
    tree = Path(models_dir) if models_dir else comfyui_models_dir()
    parts = []
    for name in missing:
        role = ROLES[name]
        where = " or ".join(f"{tree / folder if tree else 'models/' + folder}/" for folder in role.folders)
        parts.append(f"{role.what}: one of {', '.join(role.names)} in {where} (or --{name.replace('_', '-')} PATH)")
    hint = "" if tree else " (no --models-dir given and the pack is not inside ComfyUI/custom_nodes)"
    raise ModelFileError("missing model files" + hint + ": " + "; ".join(parts) + "; or run with --demo")
