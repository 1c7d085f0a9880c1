"""The official spatial tiling of the Wan2.1 VAE: where the tiles go and how they are blended.

The official VANS inference encodes the input clip and decodes the answer in overlapping spatial
tiles (official pipeline: KlingAIResearch/VANS vans/pipelines/wan_video_new.py, ``tiled=True,
tile_size=(30, 52), tile_stride=(15, 26)``; the tiling itself is DiffSynth-Studio's
``WanVideoVAE.tiled_encode`` / ``tiled_decode`` in diffsynth/models/wan_video_vae.py). The VAE is not
translation-invariant at the borders of what it sees (zero padding, the middle block's attention over
the whole tile), so the tile layout is part of the result: a clip encoded in one piece, or in other
tiles, gives different latents along the seams. The rule, in the units of the tiled input:

* sizes and strides are given in latent units, (height, width); an encode works on pixels, so both are
  multiplied by 8 there (240×416 tiles every 120×208 px), a decode works on latents as they are;
* tiles start at 0, stride, 2·stride, … along each axis; a start is skipped when the tile before it
  already reaches the far edge (``start − stride + size ≥ length``); a tile covers
  ``[start, start + size)`` clipped to the image. At 352×640 that is 2 × 3 tiles;
* each tile's output is weighted by a mask: along each axis a linear ramp ``(1, 2, …, b) / b`` over
  the first ``b`` outputs and its mirror over the last ``b``, except on a side that lies on the image
  border, where the weight stays 1; the 2-D mask is the minimum of the two axes' ramps. ``b`` is
  ``size − stride`` in the output's units (an encode: 15 × 26 latents; a decode: 120 × 208 px);
* the output is ``Σ tile·mask / Σ mask``; time is never tiled.

Each tile is computed by a caller's function (the engine's diffusers VAE, ComfyUI's VAE) one at a time,
so memory holds one tile's activations plus the fp32 output being accumulated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# Latent units (height, width), as the official inference passes them.
OFFICIAL_TILE_SIZE = (30, 52)
OFFICIAL_TILE_STRIDE = (15, 26)
SPACE_STRIDE = 8  # pixels per latent, each spatial axis

TileFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Span:
    """One tile along one axis: ``[start, stop)`` (clipped) and whether each end is the image border."""

    start: int
    stop: int
    at_start_border: bool
    at_stop_border: bool


def tile_spans(length: int, size: int, stride: int) -> list[Span]:
    """The tiles along one axis of ``length`` (all in the tiled input's units)."""
    if length < 1 or size < 1 or not 1 <= stride <= size:
        raise ValueError(f"tiling needs length, size >= 1 and 1 <= stride <= size, got {length}, {size}, {stride}")
    spans = []
    for start in range(0, length, stride):
        previous = start - stride
        if previous >= 0 and previous + size >= length:  # the tile before already reaches the far edge
            continue
        spans.append(Span(start, min(start + size, length), start == 0, start + size >= length))
    return spans


def ramp(length: int, ramp_start: bool, ramp_stop: bool, border: int) -> torch.Tensor:
    """1-D fp32 weights: 1, with a linear ramp (1..b)/b over the first and/or mirrored over the last ``b``."""
    weights = torch.ones(length, dtype=torch.float32)
    if border <= 0:
        return weights
    rising = torch.arange(1, border + 1, dtype=torch.float32) / border
    if ramp_start:
        n = min(border, length)
        weights[:n] = rising[:n]
    if ramp_stop:
        n = min(border, length)
        weights[length - n:] = rising.flip(0)[border - n:]
    return weights


def blend_mask(height: int, width: int, span_h: Span, span_w: Span, border: tuple[int, int]) -> torch.Tensor:
    """[height, width] fp32 weights of one tile's output: the minimum of the two axes' ramps."""
    h = ramp(height, not span_h.at_start_border, not span_h.at_stop_border, border[0])
    w = ramp(width, not span_w.at_start_border, not span_w.at_stop_border, border[1])
    return torch.minimum(h[:, None], w[None, :])


def _spatial_dims(channels_last: bool) -> tuple[int, int]:
    return (-3, -2) if channels_last else (-2, -1)


def _tiled(fn: TileFn, x: torch.Tensor, size: tuple[int, int], stride: tuple[int, int], *, scale: float,
           in_dims: tuple[int, int], out_dims: tuple[int, int]) -> torch.Tensor:
    """Run ``fn`` over the tiles of ``x`` (sizes in x's units) and blend; output units = input × ``scale``."""
    height, width = x.shape[in_dims[0]], x.shape[in_dims[1]]
    border = tuple(int((s - t) * scale) for s, t in zip(size, stride))
    values = weights = None
    for span_h in tile_spans(height, size[0], stride[0]):
        for span_w in tile_spans(width, size[1], stride[1]):
            piece = x.narrow(in_dims[0], span_h.start, span_h.stop - span_h.start)
            piece = piece.narrow(in_dims[1], span_w.start, span_w.stop - span_w.start)
            out = fn(piece)
            tile_h, tile_w = out.shape[out_dims[0]], out.shape[out_dims[1]]
            if values is None:
                shape = list(out.shape)
                shape[out_dims[0]], shape[out_dims[1]] = round(height * scale), round(width * scale)
                values = torch.zeros(shape, dtype=torch.float32, device=out.device)
                weights = torch.zeros(shape[out_dims[0]], shape[out_dims[1]], dtype=torch.float32, device=out.device)
            mask = blend_mask(tile_h, tile_w, span_h, span_w, border).to(out.device)
            top, left = round(span_h.start * scale), round(span_w.start * scale)
            region = values.narrow(out_dims[0], top, tile_h).narrow(out_dims[1], left, tile_w)
            region += out.float() * _broadcast(mask, out.ndim, out_dims)
            weights[top:top + tile_h, left:left + tile_w] += mask
            del out, piece
    return values / _broadcast(weights, values.ndim, out_dims)


def _broadcast(mask: torch.Tensor, ndim: int, dims: tuple[int, int]) -> torch.Tensor:
    """A [H, W] mask viewed to broadcast over a tensor whose spatial axes are ``dims``."""
    shape = [1] * ndim
    shape[dims[0]], shape[dims[1]] = mask.shape
    return mask.view(shape)


def _pair(value: Sequence[int], name: str) -> tuple[int, int]:
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be (height, width), got {value!r}")
    return pair


def tiled_encode(encode_fn: TileFn, pixels: torch.Tensor, tile_size: Sequence[int] = OFFICIAL_TILE_SIZE,
                 tile_stride: Sequence[int] = OFFICIAL_TILE_STRIDE, *, channels_last: bool = False) -> torch.Tensor:
    """Encode ``pixels`` tile by tile with ``encode_fn`` and blend the latents (fp32).

    ``pixels``: ``[B, C, T, H, W]``, or channels last (``[..., H, W, C]``, e.g. ComfyUI's ``[T, H, W, C]``
    IMAGE batch) with ``channels_last=True``. ``encode_fn`` gets a pixel tile in the same layout and
    returns its latents ``[B, 16, t, h, w]`` (h, w = tile / 8). Sizes and strides are in latent units.
    """
    size = tuple(s * SPACE_STRIDE for s in _pair(tile_size, "tile_size"))
    stride = tuple(s * SPACE_STRIDE for s in _pair(tile_stride, "tile_stride"))
    return _tiled(encode_fn, pixels, size, stride, scale=1 / SPACE_STRIDE, in_dims=_spatial_dims(channels_last),
                  out_dims=(-2, -1))


def tiled_decode(decode_fn: TileFn, latents: torch.Tensor, tile_size: Sequence[int] = OFFICIAL_TILE_SIZE,
                 tile_stride: Sequence[int] = OFFICIAL_TILE_STRIDE, *, channels_last: bool = False) -> torch.Tensor:
    """Decode ``latents`` ``[B, 16, t, h, w]`` tile by tile with ``decode_fn`` and blend the frames (fp32).

    ``decode_fn`` returns a tile's frames ``[B, C, T, H, W]`` (or ``[..., H, W, C]`` with
    ``channels_last=True``), H, W = tile × 8, not yet clamped: the official decode clamps to -1..1 only
    after blending. Sizes and strides are in latent units.
    """
    return _tiled(decode_fn, latents, _pair(tile_size, "tile_size"), _pair(tile_stride, "tile_stride"),
                  scale=SPACE_STRIDE, in_dims=(-2, -1), out_dims=_spatial_dims(channels_last))
