"""Candidate batches and score lists, as ComfyUI hands them over (no ComfyUI import here).

A set of candidate videos reaches a node in one of two ways: one IMAGE batch holding N videos one
after the other (KSampler with batch_size N, then VAEDecode), or a ComfyUI list of N IMAGEs (a node
that outputs lists, e.g. several captions, upstream). Scores follow the videos' order.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..vans.errors import InputError


def split_videos(videos: Sequence[torch.Tensor] | torch.Tensor, count: int, *, what: str = "videos") -> list[torch.Tensor]:
    """``count`` videos [T, H, W, C] from a list of ``count`` IMAGEs or from one IMAGE batch of count·T frames."""
    if count < 1:
        raise InputError(f"{what}: need at least one candidate video")
    if isinstance(videos, torch.Tensor):
        videos = [videos]
    videos = list(videos)
    if len(videos) == count:
        return videos
    if len(videos) == 1:
        frames = videos[0].shape[0]
        if frames % count == 0:
            return list(videos[0].split(frames // count))
        raise InputError(
            f"{what}: {frames} frames cannot be split into {count} videos of equal length; "
            f"give one score per video (or set candidates to the number of videos in the batch)"
        )
    raise InputError(f"{what}: got {len(videos)} videos but {count} scores; give one score per video")


def best_index(scores: Sequence[float]) -> int:
    """Index of the highest score; NaN scores (a failed reward) never win; ties go to the first."""
    best, best_score = -1, -math.inf
    for i, score in enumerate(scores):
        value = float(score)
        if not math.isnan(value) and value > best_score:
            best, best_score = i, value
    if best < 0:
        raise InputError("rewards: every candidate's reward is NaN; check the reward node's inputs")
    return best


def format_scores(name: str, scores: Sequence[float]) -> str:
    """Text shown on a reward node: one line per candidate when there are several."""
    if len(scores) == 1:
        return f"{name}: {float(scores[0]):.4f}"
    return "\n".join(f"{name} #{i}: {float(s):.4f}" for i, s in enumerate(scores))
