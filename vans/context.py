"""The VANS context-latent rule (the official vans/pipelines/wan_video_new.py).

The input clip (33 frames at 352×640) is VAE-encoded to T = 9 latent frames; ``num_context`` = 6
of them are picked with an even spread (``linspace(0, T-1, n)`` truncated to integers, as the
official code does: T = 9 gives 0, 1, 3, 4, 6, 8). At every denoising step those clean latents are
prepended to the noisy target latents along time, the DiT sees one timestep for the whole
sequence, and the first ``num_context`` frames of its prediction are dropped. The context is never
stepped: fresh clean latents go in at every step.
"""

from __future__ import annotations

import torch

DEFAULT_NUM_CONTEXT = 6


def context_indices(num_latent_frames: int, num_context: int = DEFAULT_NUM_CONTEXT) -> torch.Tensor:
    """Indices of the latent frames used as context (truncation, not rounding, as the official code)."""
    if num_latent_frames < 1 or num_context < 1:
        raise ValueError("need at least one latent frame and one context frame")
    return torch.linspace(0, num_latent_frames - 1, num_context).long()


def select_context(latents: torch.Tensor, num_context: int = DEFAULT_NUM_CONTEXT) -> torch.Tensor:
    """[B, C, T, H, W] input latents -> [B, C, num_context, H, W] clean context latents."""
    idx = context_indices(latents.shape[2], num_context).to(latents.device)
    return latents.index_select(2, idx)


def prepend_context(context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[b, C, n, H, W] context ‖ [B, C, T, H, W] target along time. A context of batch 1 is shared by every
    row; one of batch b with B = k·b is tiled k times (row r gets context r mod b: the cond ‖ uncond halves of
    a guided batch over b prompts' rows)."""
    b, rows = context.shape[0], target.shape[0]
    if b == 1 and rows != 1:
        context = context.expand(rows, -1, -1, -1, -1)
    elif b != rows:
        if rows % b:
            raise ValueError(f"context batch {b} does not divide the {rows} target rows")
        context = context.repeat(rows // b, 1, 1, 1, 1)
    return torch.cat([context.to(target.dtype), target], dim=2)


def strip_context(prediction: torch.Tensor, num_context: int) -> torch.Tensor:
    """Drop the context frames from a DiT prediction over [context ‖ target]."""
    return prediction[:, :, num_context:]
