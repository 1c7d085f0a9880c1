"""The Wan2.1 VAE as diffusers' ``AutoencoderKLWan``, with the latent normalisation Wan's DiT expects.

``WanVAE.encode`` takes frames ``[B, T, H, W, C]`` in 0..1 and returns normalised latents
``[B, 16, (T-1)/4+1, H/8, W/8]``: ``(mu - latents_mean) / latents_std`` of the posterior mean (no
sampling), as ComfyUI and DiffSynth feed the DiT. ``decode`` inverts it and returns frames in 0..1.
Both run in the official spatial tiles by default (``vans.wan.tiling``: 30×52 latents every 15×26, the
official VANS inference's setting), which bounds memory and gives the official latents and frames along the
seams; ``tiling=False`` runs in one piece. diffusers' own tiling (other tiles, other blending) is never used.

Files: ``wan_2.1_vae.safetensors`` (original Wan key layout, converted with diffusers' converter),
``Wan2.1_VAE.pth`` (same layout, pickle: only with ``allow_pickle``), a diffusers ``vae/`` folder, or a
diffusers-layout single file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import InputError, ModelFileError
from .files import (
    assign_weights,
    check_keys,
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
from .tiling import OFFICIAL_TILE_SIZE, OFFICIAL_TILE_STRIDE, tiled_decode, tiled_encode

WHAT = "VAE"
EXPECTED = "the Wan2.1 VAE"
HINT = "use wan_2.1_vae.safetensors in models/vae"
LATENT_CHANNELS = 16
TIME_STRIDE, SPACE_STRIDE = 4, 8
VAE_PREFIXES = ("first_stage_model.", "vae.")


# -- key layouts --------------------------------------------------------------------------------

def vae_layout(keys) -> str:
    return "wan" if any(".middle." in k or ".downsamples." in k or k.startswith("conv1.") for k in keys) \
        else "diffusers"


def to_diffusers_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return convert_wan_vae_to_diffusers(dict(sd))


_RESNET_TO_WAN = (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
                  ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))
_UP_BLOCK_STRIDE = 4  # Wan's flat decoder list: 3 residual blocks then 1 upsampler per level


def _resnet_part_to_wan(rest: str) -> str:
    for old, new in _RESNET_TO_WAN:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _wan_vae_key(key: str) -> str:
    fixed = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
             "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.": "encoder.head.0.",
             "encoder.conv_out.": "encoder.head.2.", "decoder.norm_out.": "decoder.head.0.",
             "decoder.conv_out.": "decoder.head.2."}
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old):]
    if m := re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", key):
        side, kind, idx, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        if kind == "attentions":
            return f"{side}.middle.1.{rest}"
        return f"{side}.middle.{2 * idx}.{_resnet_part_to_wan(rest)}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.(.+)$", key):
        return f"encoder.downsamples.{m.group(1)}.{_resnet_part_to_wan(m.group(2))}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
        index = _UP_BLOCK_STRIDE * int(m.group(1)) + int(m.group(2))
        return f"decoder.upsamples.{index}.{_resnet_part_to_wan(m.group(3))}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$", key):
        return f"decoder.upsamples.{_UP_BLOCK_STRIDE * int(m.group(1)) + 3}.{m.group(2)}"
    return key


def to_wan_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> original Wan VAE names (what ``wan_2.1_vae.safetensors`` holds); checked against
    diffusers' converter so the two stay inverse."""
    names = {k: _wan_vae_key(k) for k in sd}
    back = to_diffusers_layout({wan: k for k, wan in names.items()})
    if any(converted != k for converted, k in back.items()) or len(back) != len(names):
        raise RuntimeError("Wan VAE key mapping is out of step with diffusers' converter")
    return {names[k]: v for k, v in sd.items()}


# -- inspection ---------------------------------------------------------------------------------

def _refuse(name: str, what_it_is: str) -> ModelFileError:
    return ModelFileError(f"{WHAT} file {name} is {what_it_is}; expected {EXPECTED}: {HINT}")


def infer_vae_config(sd: Mapping[str, torch.Tensor], folder_config: dict | None = None) -> dict:
    """``AutoencoderKLWan`` arguments from diffusers-named tensors; the latent statistics are the
    Wan2.1 ones of diffusers' defaults (the original file does not carry them)."""
    config = dict(folder_config or {})
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["base_dim"] = int(sd["encoder.conv_in.weight"].shape[0])
    config["z_dim"] = int(sd["post_quant_conv.weight"].shape[0])
    return config


def inspect_vae_state_dict(sd: Mapping[str, torch.Tensor], name: str = "the file",
                           folder_config: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    sd = strip_known_prefix(sd, VAE_PREFIXES)
    kind = detect_checkpoint_kind(sd)
    if kind != "wan_vae":
        raise _refuse(name, describe_kind(kind))
    if vae_layout(sd) == "wan":
        sd = to_diffusers_layout(sd)
    for key in ("encoder.conv_in.weight", "post_quant_conv.weight"):
        if key not in sd:
            raise ModelFileError(f"{WHAT} file {name} is missing {key}; the file is incomplete or not {EXPECTED}")
    config = infer_vae_config(sd, folder_config)
    if config["z_dim"] != LATENT_CHANNELS or (folder_config or {}).get("is_residual"):
        raise _refuse(name, f"a VAE with {config['z_dim']} latent channels (the Wan2.2 VAE has 48)")
    return config, sd


# -- the model ----------------------------------------------------------------------------------

class WanVAE(nn.Module):
    """Frames <-> normalised Wan latents.

    ``tiling`` (default on): encode and decode in the official spatial tiles (``vans.wan.tiling``;
    ``tile_size`` / ``tile_stride`` in latent units), one tile at a time; off: in one piece.
    """

    def __init__(self, model, *, tiling: bool = True, tile_size: tuple[int, int] = OFFICIAL_TILE_SIZE,
                 tile_stride: tuple[int, int] = OFFICIAL_TILE_STRIDE):
        super().__init__()
        self.model = model
        model.disable_tiling()  # the tiles are ours (the official rule), never diffusers' own
        config = model.config
        per_channel = (1, -1, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(config.latents_mean, dtype=torch.float32).view(per_channel),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(config.latents_std, dtype=torch.float32).view(per_channel),
                             persistent=False)
        self.tiling = tiling
        self.tile_size = tuple(tile_size)
        self.tile_stride = tuple(tile_stride)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.encoder.conv_in.weight.device

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, W, 3]`` in 0..1 -> float32 ``[B, 16, (T-1)/4+1, H/8, W/8]``, normalised."""
        check_frames(frames)
        x = frames.to(device=self.device, dtype=self.dtype).permute(0, 4, 1, 2, 3) * 2 - 1
        if self.tiling:
            return tiled_encode(self._encode_piece, x, self.tile_size, self.tile_stride)
        return self._encode_piece(x)

    def _encode_piece(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, T, h, w]`` in -1..1 -> normalised fp32 latents (each tile normalised, as officially)."""
        mu = self.model.encode(x).latent_dist.mean
        return (mu.float() - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised ``[B, 16, t, h, w]`` -> float32 frames ``[B, 4(t-1)+1, 8h, 8w, 3]`` in 0..1."""
        check_latents(latents)
        z = latents.to(device=self.device, dtype=torch.float32) * self.latents_std + self.latents_mean
        z = z.to(self.dtype)
        if self.tiling:
            video = tiled_decode(self._decode_piece, z, self.tile_size, self.tile_stride)
        else:
            video = self._decode_piece(z)
        # clamped once, after blending (official order); -1..1 -> 0..1
        return ((video.float() + 1) / 2).clamp_(0, 1).permute(0, 2, 3, 4, 1)

    def _decode_piece(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> frames ``[B, 3, T, H, W]``, NOT clamped.

        diffusers' ``AutoencoderKLWan.decode`` clamps its output to -1..1, while the official tiled decode
        blends the tiles first and clamps the blend (a tile at 1.05 and a neighbour at 0.97 blend to 1.0,
        not 0.985). diffusers assembles its output from one decoder call per latent frame, so those
        outputs are collected here with a forward hook (public API) before the clamp; patchified VAEs
        (Wan2.2) are not Wan2.1's and not handled.
        """
        if getattr(self.model.config, "patch_size", None) is not None:
            return self.model.decode(z).sample
        pieces: list[torch.Tensor] = []
        handle = self.model.decoder.register_forward_hook(lambda module, args, out: pieces.append(out))
        try:
            clamped = self.model.decode(z).sample
        finally:
            handle.remove()
        video = torch.cat(pieces, dim=2) if pieces else clamped
        if video.shape != clamped.shape:  # a diffusers version that decodes otherwise: keep its (clamped) output
            return clamped
        return video


def check_frames(frames: torch.Tensor) -> None:
    """InputError with the fix for anything the VAE (and the DiT's 2×2 patches) cannot take."""
    if not torch.is_tensor(frames) or frames.ndim != 5 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if torch.is_tensor(frames) else type(frames).__name__
        raise InputError(f"frames for the VAE must be a [batch, frames, height, width, 3] tensor, got {shape}")
    if not frames.is_floating_point():
        raise InputError("frames for the VAE must be floats in 0..1 (convert uint8 frames with frames / 255)")
    _, t, h, w, _ = frames.shape
    if (t - 1) % TIME_STRIDE:
        raise InputError(f"the VAE needs 4n+1 frames (e.g. 33), got {t}; use {((t - 1) // 4) * 4 + 1} or "
                         f"{((t - 1) // 4 + 1) * 4 + 1} frames")
    if h % 16 or w % 16:
        raise InputError(f"height and width must be multiples of 16 for Wan, got {h}×{w}; resize to "
                         f"{max(16, h // 16 * 16)}×{max(16, w // 16 * 16)} (e.g. 352×640)")


def check_latents(latents: torch.Tensor) -> None:
    if not torch.is_tensor(latents) or latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
        shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
        raise InputError(f"latents for the VAE must be [batch, 16, frames, height, width], got {shape}")


# -- loading ------------------------------------------------------------------------------------

def _vae_files(path: Path, allow_pickle: bool) -> tuple[list[Path], dict | None]:
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise ModelFileError(f"{WHAT} file not found: {path}; {HINT}")
    folder = path / "vae" if (path / "vae").is_dir() else path
    return find_weight_files(folder, "diffusion_pytorch_model", what=WHAT, allow_pickle=allow_pickle), \
        read_config(folder)


def build_vae(config: dict):
    from diffusers import AutoencoderKLWan

    return empty_model(lambda: AutoencoderKLWan.from_config(config))


def load_vae(path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
             allow_pickle: bool = False, tiling: bool = True) -> WanVAE:
    """A Wan2.1 VAE file or folder -> ``WanVAE`` in ``dtype`` on ``device``."""
    path = Path(path).expanduser()
    files, folder_config = _vae_files(path, allow_pickle)
    name = path.name
    if is_safetensors(files):
        inspect_vae_state_dict(read_headers(files, what=WHAT), name, folder_config)
    config, named = inspect_vae_state_dict(read_weights(files, what=WHAT, allow_pickle=allow_pickle), name,
                                           folder_config)
    model = build_vae(config)
    extra = check_keys(model, named, what=WHAT, name=name, expected=EXPECTED)
    report_extra_keys(extra, what=WHAT, name=name)
    assign_weights(model, named, dtype_of=lambda key: dtype, device=device)
    model.eval()
    return WanVAE(model, tiling=tiling).to(device).eval()
