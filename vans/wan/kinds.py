"""What a weight file is, from its key names alone.

Used for the friendly half of every "wrong file" message: a VAE dropped where the DiT belongs gets
"…is a Wan VAE, not a Wan DiT", not a list of 800 missing keys. Only names are read, so it works on
the meta tensors of a safetensors header as well as on loaded weights, with or without the wrapper
prefixes files carry (``model.diffusion_model.``, ``first_stage_model.``, ``pipe.dit.``…).
"""

from __future__ import annotations

from typing import Iterable, Mapping

KIND_DESCRIPTIONS = {
    "wan_dit": "a Wan diffusion model (DiT)",
    "wan_vae": "a Wan VAE",
    "umt5": "a umT5 text encoder",
    "t5": "a T5 text encoder (t5xxl, as used by Flux/SD3, not Wan's umT5-XXL)",
    "qwen_vl_lora": "a Qwen2.5-VL (VANS VLM) checkpoint",
    "clip": "a CLIP model",
    "lora": "a LoRA",
    "unknown": "not a model file we recognise",
}


def _ends(keys: Iterable[str], *suffixes: str) -> bool:
    return any(k.endswith(suffixes) for k in keys)


def _has(keys: Iterable[str], *parts: str) -> bool:
    return any(p in k for k in keys for p in parts)


def _is_wan_dit(keys: list[str]) -> bool:
    original = _ends(keys, "head.modulation", "blocks.0.self_attn.q.weight", "blocks.0.cross_attn.k.weight")
    diffusers = _ends(keys, "blocks.0.attn1.to_q.weight") and _has(keys, "condition_embedder.")
    return (original or diffusers) and _ends(keys, "patch_embedding.weight")


def _is_wan_vae(keys: list[str]) -> bool:
    original = _ends(keys, "decoder.middle.0.residual.0.gamma", "encoder.downsamples.0.residual.0.gamma")
    diffusers = _ends(keys, "decoder.mid_block.resnets.0.norm1.gamma", "encoder.down_blocks.0.norm1.gamma")
    return original or diffusers


def _t5_kind(keys: list[str]) -> str | None:
    """umT5 has a relative-attention table in every block, T5 only in block 0."""
    if _ends(keys, "encoder.block.0.layer.0.SelfAttention.q.weight"):
        if _ends(keys, "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"):
            return "umt5"
        if _ends(keys, "encoder.block.1.layer.0.SelfAttention.q.weight"):
            return "t5"
        return "umt5"  # a single block cannot tell; the loader decides from the shapes
    # Wan's own T5 layout (models_t5_umt5-xxl-enc-bf16.pth): per-block relative embeddings.
    if _ends(keys, "blocks.0.attn.q.weight") and _ends(keys, "token_embedding.weight") and \
            _ends(keys, "blocks.0.pos_embedding.embedding.weight"):
        return "umt5"
    return None


def _is_lora(keys: list[str]) -> bool:
    return _has(keys, ".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", "lora_unet_", ".lora.down.")


def _is_qwen_vl(keys: list[str]) -> bool:
    return _has(keys, "mllm_backbone.", "visual.merger.", "language_model.layers.") or (
        _has(keys, "self_attn.q_proj.") and _has(keys, "mlp.gate_proj.") and _has(keys, "visual."))


def _is_clip(keys: list[str]) -> bool:
    open_clip = _ends(keys, "positional_embedding") and _has(keys, "visual.transformer.resblocks.", "visual.trunk.")
    hf = _has(keys, "vision_model.embeddings.", "text_model.embeddings.")
    return open_clip or hf


def detect_checkpoint_kind(sd: Mapping[str, object] | Iterable[str]) -> str:
    """One of ``KIND_DESCRIPTIONS``' keys: "wan_dit", "wan_vae", "umt5", "t5", "qwen_vl_lora", "clip",
    "lora", "unknown". Accepts a state dict (real or meta tensors) or just its keys."""
    keys = list(sd.keys() if isinstance(sd, Mapping) else sd)
    # Full models first: a VANS vdm.safetensors may also carry the VLM's LoRA tensors, and is still a DiT.
    if _is_wan_dit(keys):
        return "wan_dit"
    if _is_wan_vae(keys):
        return "wan_vae"
    t5 = _t5_kind(keys)
    if t5:
        return t5
    if _is_lora(keys):
        return "qwen_vl_lora" if _is_qwen_vl(keys) else "lora"
    if _is_qwen_vl(keys):
        return "qwen_vl_lora"
    if _is_clip(keys):
        return "clip"
    return "unknown"


def describe_kind(kind: str) -> str:
    return KIND_DESCRIPTIONS.get(kind, KIND_DESCRIPTIONS["unknown"])
