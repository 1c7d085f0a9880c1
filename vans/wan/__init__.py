"""Wan2.1 model loading: the T2V DiT, the umT5 text encoder and the VAE, from every file layout users hold.

    load_dit(path, dtype=..., device=...)                        -> diffusers WanTransformer3DModel
    load_text_encoder(path, tokenizer=None, dtype=..., device=...) -> WanTextEncoder (.encode(texts))
    load_vae(path, dtype=..., device=..., tiling=True)           -> WanVAE (.encode(frames), .decode(latents))
    detect_checkpoint_kind(state_dict)                           -> "wan_dit", "wan_vae", "umt5", …

The submodules import diffusers/transformers only inside their functions, so importing this package
is cheap.
"""

from .dit import check_text_encoder_matches, inspect_dit_state_dict, load_dit
from .kinds import KIND_DESCRIPTIONS, describe_kind, detect_checkpoint_kind
from .text_encoder import UMT5Tokenizer, WanTextEncoder, load_text_encoder, load_tokenizer
from .vae import WanVAE, load_vae

__all__ = [
    "KIND_DESCRIPTIONS", "UMT5Tokenizer", "WanTextEncoder", "WanVAE", "check_text_encoder_matches", "describe_kind",
    "detect_checkpoint_kind", "inspect_dit_state_dict", "load_dit", "load_text_encoder", "load_tokenizer", "load_vae",
]
