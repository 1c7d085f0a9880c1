"""Frames for the VLM from what a workflow offers: an IMAGE batch with its fps, or a core VIDEO.

No ComfyUI import: a VIDEO is used through its public methods (``get_stream_source``,
``get_components``), so VideoHelperSuite-style and core video objects both work.
"""

from __future__ import annotations

import os
from fractions import Fraction

import torch

from ..vans.errors import InputError
from ..vans.video import sample_indices

MIN_VLM_FRAMES = 2  # Qwen2.5-VL groups frames in pairs


def vlm_frame_count(total_frames: int, fps: float, num_frames: int, sample_fps: float) -> int:
    """How many frames the VLM sees.

    ``sample_fps`` 0: exactly ``num_frames`` (VANS: 6), spread over the whole clip. ``sample_fps`` > 0:
    one frame per 1/sample_fps seconds of the clip, at most ``num_frames``; always an even number of at
    least 2, because the VLM consumes frames in pairs.
    """
    if num_frames < MIN_VLM_FRAMES or num_frames % 2:
        raise InputError(f"num_frames={num_frames}: use an even number of at least 2 (VANS: 6)")
    if sample_fps <= 0:
        return num_frames
    if fps <= 0:
        raise InputError(f"fps={fps}: give the frames' frame rate (e.g. from Get Video Components) to sample by time")
    duration = total_frames / fps
    count = int(duration * sample_fps)
    count -= count % 2
    return max(MIN_VLM_FRAMES, min(num_frames, count))


def video_file(video) -> str | None:
    """The file behind a VIDEO, when it has one on disk (core Load Video), else None."""
    source = getattr(video, "get_stream_source", None)
    if source is None:
        return None
    try:
        stream = source()
    except Exception:
        return None
    return stream if isinstance(stream, (str, os.PathLike)) else None


def frames_from_video(video, num_frames: int, sample_fps: float) -> torch.Tensor:
    """Decode only the frames the VLM sees (bounded memory for long videos), or the components'
    frames when the VIDEO has no file behind it."""
    path = video_file(video)
    if path is not None:
        from ..vans.video import probe, read_video

        info = probe(path)
        count = vlm_frame_count(info.frames, info.fps, num_frames, sample_fps)
        return read_video(path, num_frames=count, what="video").frames
    try:
        components = video.get_components()
    except Exception as exc:  # a broken in-memory stream; PyAV raises many types
        raise InputError(f"video could not be decoded ({str(exc).splitlines()[0]}); re-save it as an H.264 mp4") from None
    images = components.images
    rate = float(Fraction(components.frame_rate)) if components.frame_rate else 0.0
    count = vlm_frame_count(images.shape[0], rate, num_frames, sample_fps)
    return images[sample_indices(images.shape[0], count)]


def pick_vlm_frames(frames: torch.Tensor | None, fps: float, video, num_frames: int, sample_fps: float) -> torch.Tensor:
    """The clip for the VLM from exactly one of ``frames`` (IMAGE) and ``video`` (VIDEO)."""
    if frames is None and video is None:
        raise InputError("connect either frames (IMAGE) or video (VIDEO) to the caption node")
    if frames is not None and video is not None:
        raise InputError("both frames and video are connected; connect only one of them")
    if video is not None:
        return frames_from_video(video, num_frames, sample_fps)
    if frames.ndim != 4 or frames.shape[0] < 1:
        raise InputError(f"frames: expected an IMAGE batch [frames, height, width, 3], got shape {tuple(frames.shape)}")
    count = vlm_frame_count(frames.shape[0], fps, num_frames, sample_fps)
    return frames[sample_indices(frames.shape[0], count), :, :, :3]

