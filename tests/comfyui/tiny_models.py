"""Tiny random-weight model files for the real-ComfyUI tests, written by the engine's fixtures in the
real file formats and under the file names the shipped workflows use, so ``workflows/api/*.json`` run
unchanged apart from sizes and step counts. The umT5 file (and, if the engine's Wan fixtures are
missing or do not fit ComfyUI's fixed sizes, the DiT and VAE) come from ``tiny_wan``; ``fallbacks``
says which and why.

ComfyUI infers most sizes from the files; for the two it hard-codes (umT5-XXL config, Wan VAE base
width) ``arch`` holds the tiny values and ``tiny_arch_pack`` applies them. Wan's DiT has no text-width
field in ComfyUI's detection (it assumes 4096), so the tiny DiT and the tiny umT5 keep d_model 4096 with
tiny heads, feed-forward and depth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import tiny_wan

# File names as in workflows/*.json.
DIT_NAME = "vdm.safetensors"
VAE_NAME = "wan_2.1_vae.safetensors"
TEXT_ENCODER_NAME = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VLM_DIR_NAME = "Qwen2.5-VL-3B-Instruct"
VLM_CHECKPOINT_NAME = "vlm.safetensors"
CLIP_NAME = "clip_vit_b32_openai.safetensors"
TEXT_DIM = 4096


@dataclass
class TinyModels:
    root: Path
    files: dict[str, Path] = field(default_factory=dict)  # role -> file or folder
    arch: dict = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # role -> why it could not be written
    fallbacks: dict[str, str] = field(default_factory=dict)  # role -> why tiny_wan wrote it, not the engine

    @property
    def arch_file(self) -> Path:
        return self.root / "tiny_arch.json"

    def folder_map(self) -> dict[str, Path]:
        """ComfyUI model-folder key -> folder holding the tiny file (for extra_model_paths.yaml)."""
        keys = {"dit": "diffusion_models", "vae": "vae", "text_encoder": "text_encoders", "vlm": "LLM",
                "clip": "reward_models"}
        return {keys[role]: path.parent for role, path in self.files.items() if role in keys}

    def need(self, *roles: str) -> None:
        """Skip the calling test when a tiny model could not be written (an engine fixture is missing)."""
        import pytest

        missing = [f"{r}: {self.problems.get(r, 'not written')}" for r in roles if r not in self.files]
        if missing:
            pytest.skip("tiny models unavailable: " + "; ".join(missing))


def _attempt(models: TinyModels, role: str, write) -> None:
    try:
        models.files[role] = write()
    except (ImportError, AttributeError, TypeError) as exc:  # engine fixture not there (yet) or other signature
        models.problems[role] = f"{type(exc).__name__}: {exc}"


def write_tiny_models(root: Path) -> TinyModels:
    models = TinyModels(root=Path(root))
    folders = {name: models.root / name for name in ("diffusion_models", "vae", "text_encoders", "LLM",
                                                     "reward_models")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)

    def vlm():
        from vans.fixtures.qwen import write_tiny_qwen_vl, write_tiny_vans_vlm_checkpoint

        folder = write_tiny_qwen_vl(folders["LLM"] / VLM_DIR_NAME)
        models.files["vlm_checkpoint"] = write_tiny_vans_vlm_checkpoint(folders["LLM"] / VLM_CHECKPOINT_NAME, folder)
        return folder

    def dit():
        path = folders["diffusion_models"] / DIT_NAME
        try:
            from vans.fixtures.wan import write_tiny_wan_dit

            write_tiny_wan_dit(path, layout="wan", text_dim=TEXT_DIM, freq_dim=256)  # ComfyUI assumes 256
            problem = tiny_wan.comfy_dit_problem(path)
        except ImportError as exc:
            problem = str(exc)
        return fallback("dit", tiny_wan.write_dit(path), problem) if problem else path

    def vae():
        path = folders["vae"] / VAE_NAME
        try:
            from vans.fixtures.wan import write_tiny_wan_vae

            write_tiny_wan_vae(path, layout="wan")
            problem = tiny_wan.comfy_vae_problem(path)
        except ImportError as exc:
            problem = str(exc)
        if problem:
            fallback("vae", tiny_wan.write_vae(path), problem)
        models.arch["wan_vae_dim"] = _vae_base_dim(path)
        return path

    def text_encoder():  # ComfyUI's own CLIPLoader reads it, with the config tiny_arch_pack installs
        path, _ = tiny_wan.write_umt5(folders["text_encoders"] / TEXT_ENCODER_NAME)
        models.arch["umt5_config"] = _umt5_config(path)
        return path

    def fallback(role: str, path: Path, why: str) -> Path:
        models.fallbacks[role] = why
        return path

    def clip():
        from vans.fixtures.clip import write_tiny_clip

        return write_tiny_clip(folders["reward_models"] / CLIP_NAME)

    for role, write in (("vlm", vlm), ("dit", dit), ("vae", vae), ("text_encoder", text_encoder), ("clip", clip)):
        _attempt(models, role, write)
    models.arch.setdefault("wan_vae_dim", 96)
    models.arch.setdefault("umt5_config", None)
    models.arch_file.write_text(json.dumps(models.arch), encoding="utf-8")
    return models


def _vae_base_dim(path: Path) -> int:
    """The Wan VAE base width, read back from the file (ComfyUI's WanVAE ``dim``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return int(f.get_slice("decoder.head.0.gamma").get_shape()[0])


def _umt5_config(path: Path) -> dict:
    """A ComfyUI T5 config dict matching the tiny umT5 file's shapes."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        shape = lambda key: f.get_slice(key).get_shape()  # noqa: E731
        layers = 1 + max(int(k.split(".")[2]) for k in keys if k.startswith("encoder.block."))
        buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        inner, d_model = shape("encoder.block.0.layer.0.SelfAttention.q.weight")
        d_ff = shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0]
        vocab = shape("shared.weight")[0]
    return {"d_ff": d_ff, "d_kv": inner // heads, "d_model": d_model, "num_heads": heads, "num_layers": layers,
            "relative_attention_num_buckets": buckets, "vocab_size": vocab, "dense_act_fn": "gelu_pytorch_tanh",
            "is_gated_act": True, "layer_norm_epsilon": 1e-6, "model_type": "umt5", "is_encoder_decoder": True,
            "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "tie_word_embeddings": False}
