"""Frames for the VLM from what a workflow offers: an IMAGE batch with its fps, or a core VIDEO.

No ComfyUI import: a VIDEO is used through its public methods (``get_stream_source``,
``get_components``), so VideoHelperSuite-style and core video objects both work. A VIDEO backed by a
file is read only when that file lies in one of the folders the caller allows (the node: ComfyUI's
input, output and temp folders), whatever the node that made the VIDEO checked: ComfyUI 0.3.64's core
Load Video joins its file name to the input folder unchecked (``folder_paths.get_annotated_filepath``),
so ``../../etc/passwd`` reaches the caption node.
"""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Sequence

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


def _inside(path: str, folders: list[str]) -> bool:
    for folder in folders:
        try:
            if os.path.commonpath([path, folder]) == folder:
                return True
        except ValueError:  # another drive (Windows)
            pass
    return False


def check_video_file(path: str | os.PathLike, folders: Sequence[str | os.PathLike]) -> None:
    """Refuse a file outside ``folders``, ``..`` and links resolved (a link in ComfyUI/input to a file
    elsewhere is outside too): the rule of ``folder_paths.is_within_directory``, with which newer ComfyUI
    releases check Load Video's own file name."""
    if _inside(os.path.realpath(path), [os.path.realpath(f) for f in folders]):
        return
    raise InputError(f"video: the file {os.fspath(path)!r} lies outside ComfyUI's input, output and temp folders; "
                     "put the video in ComfyUI/input (Load Video lists it) or connect its frames to frames")


def frames_from_video(video, num_frames: int, sample_fps: float,
                      folders: Sequence[str | os.PathLike] = ()) -> torch.Tensor:
    """Decode only the frames the VLM sees (bounded memory for long videos), or the components'
    frames when the VIDEO has no file behind it. A file outside ``folders`` is refused."""
    path = video_file(video)
    if path is not None:
        check_video_file(path, folders)
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


def pick_vlm_frames(frames: torch.Tensor | None, fps: float, video, num_frames: int, sample_fps: float,
                    folders: Sequence[str | os.PathLike] = ()) -> torch.Tensor:
    """The clip for the VLM from exactly one of ``frames`` (IMAGE) and ``video`` (VIDEO); a video's file
    must lie in ``folders``."""
    if frames is None and video is None:
        raise InputError("connect either frames (IMAGE) or video (VIDEO) to the caption node")
    if frames is not None and video is not None:
        raise InputError("both frames and video are connected; connect only one of them")
    if video is not None:
        return frames_from_video(video, num_frames, sample_fps, folders)
    if frames.ndim != 4 or frames.shape[0] < 1:
        raise InputError(f"frames: expected an IMAGE batch [frames, height, width, 3], got shape {tuple(frames.shape)}")
    count = vlm_frame_count(frames.shape[0], fps, num_frames, sample_fps)
    return frames[sample_indices(frames.shape[0], count), :, :, :3]

