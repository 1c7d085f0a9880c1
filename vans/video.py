"""Video files in and out: probe, decode with bounded memory, resize, write H.264 mp4.

Everything FFmpeg reads is accepted (through PyAV). Frames come back in the engine layout, a float32
tensor ``[T, H, W, C]`` in 0..1 with C = 3.

Frame picking (``read_video``):

* ``num_frames=N``: N frames picked by ``pick`` (``FRAME_PICKS``):
  - ``"spread"``: spread evenly over the **whole** clip, source indices ``round(linspace(0, n_total - 1, N))``
    (``sample_indices``). The VLM's rule (the official qwen_vl_utils patch: 6 frames of the whole clip).
  - ``"fps"``: the first N frames of the clip resampled to ``pick_fps`` (default 11): the VDM's default view
    of a clip (``FramePick``, where the choice is explained).
  - ``"first"``: the first N consecutive frames at the native rate (DiffSynth's ``VideoDataset``).
  A clip with fewer than N such frames repeats frames to fill N (evenly for ``spread``, the last frame for
  the others); use ``min_frames`` to refuse such clips instead.
* ``fps=R``: resample to R frames per second, the source frame nearest each 1/R tick (assumes a
  constant frame rate: tick k takes frame ``round(k * source_fps / R)``; a variable-rate file is
  treated at its average rate).
* neither: every frame.
* ``max_frames``: caps the count ("0 disables", the VideoHelperSuite convention). With ``fps`` or all
  frames it keeps the first ``max_frames``; with ``num_frames`` it lowers N.

Memory stays bounded by the output: frames are decoded one at a time, only the picked ones are
converted to RGB, resized right away (swscale, bicubic, antialiased when shrinking) and written into
the preallocated output. A full-resolution video is never held.

Damaged files: a file whose index is lost (an mp4 cut short before its ``moov`` atom, the usual case
for a truncated download of a non-faststart mp4) cannot be opened and raises ``InputError``. A file
that opens but ends early or has damaged packets (faststart mp4, mkv, ts cut short) yields the frames
FFmpeg can still decode: the damaged packets are skipped, ``Video.complete`` is False and a warning
is logged. The frame picking then applies to the frames actually decoded.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import torch

from .errors import InputError
from .progress import progress

log = logging.getLogger(__name__)

RESIZE_MODES = ("crop", "fit")

# Demuxers FFmpeg uses for single pictures; a one-frame file from one of them is a still image.
_IMAGE_DEMUXERS = ("image2", "image2pipe")
# At most this many progress reports per decode, so a host's hook is not flooded on long videos;
# Cancel is checked at every report (1 % of the frames).
_MAX_PROGRESS_REPORTS = 100


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the first video stream (frames counted when it does not say).

    width and height are the stored size: a phone video's display rotation is applied only by
    ``read_video`` (reading it needs a decoded frame), so its frames may come back H and W swapped.
    """

    frames: int
    fps: float
    width: int
    height: int
    duration: float  # seconds


@dataclass
class Video:
    """Decoded frames plus where they came from."""

    frames: torch.Tensor  # float32 [T, H, W, 3] in 0..1
    fps: float  # rate of the returned frames: playing them at this rate lasts as long as the source
    source_fps: float
    source_frames: int  # frames in the source (as decoded; fewer than declared for a damaged file)
    indices: list[int] = field(default_factory=list)  # source frame index of each returned frame
    complete: bool = True  # False when damaged or missing data was skipped


# ----------------------------------------------------------------------------- frame picking


def sample_indices(n_total: int, n: int) -> list[int]:
    """``round(linspace(0, n_total - 1, n))``: n indices spread evenly over the whole clip.

    First and last frames are always included (for n >= 2). When n > n_total, indices repeat: each
    source frame is duplicated about n / n_total times, evenly (our padding rule for short clips).
    Rounding is half-to-even, as in torch (the reference VANS code uses the same expression).
    """
    if n_total < 1:
        raise InputError(f"cannot pick frames from a clip with {n_total} frames; use a clip with at least one frame")
    if n < 1:
        raise InputError(f"number of frames to pick must be at least 1 (got {n})")
    return torch.linspace(0, n_total - 1, n, dtype=torch.float64).round().long().tolist()


def resample_indices(n_total: int, source_fps: float, fps: float) -> list[int]:
    """Source index nearest each 1/fps tick over the clip (constant frame rate assumed)."""
    if not source_fps > 0:
        raise InputError("the video has no usable frame rate, so fps resampling is impossible; set fps to 0 / None")
    duration = n_total / source_fps
    count = max(1, int(math.floor(duration * fps + 1e-9)))
    step = source_fps / fps
    return [min(n_total - 1, int(math.floor(k * step + 0.5))) for k in range(count)]  # ties go to the later frame


FRAME_PICKS = ("fps", "first", "spread")


@dataclass(frozen=True)
class FramePick:
    """How the VDM sees a clip: the input clip whose latents become the context, and the GT clip that CLIP-V
    compares an answer with (one rule for the CLI, the context node, both trainer stages and ``vans eval``; the
    ComfyUI CLIP-V node scores the frames it is given, spreading the GT over the answer's length).

    Default ``fps`` at 11 fps from the start of the clip. Evidence (the official ``VideoDataset`` that picks the
    33 frames is not in the VANS repository): its ancestor, DiffSynth-Studio's ``VideoDataset``, takes the first
    N frames from the start (2.0 adds resampling to a fixed frame rate); the official inference saves every
    answer at 11 fps; and VANS-Data drops target segments shorter than 3 s, exactly what 33 frames at 11 fps
    need. So the released VDM most likely saw 3 s at 11 fps. ``first`` (native rate, DiffSynth 1.x) and
    ``spread`` (33 frames over the whole clip, this project's earlier default) stay selectable.
    """

    mode: str = "fps"
    fps: float = 11.0

    def validate(self) -> None:
        if self.mode not in FRAME_PICKS:
            raise InputError(f"frame_pick={self.mode!r}: use one of {', '.join(FRAME_PICKS)} (fps = the first frames "
                             "at pick_fps, first = the first frames at the native rate, spread = over the whole clip)")
        if self.mode == "fps" and not (isinstance(self.fps, numbers.Real) and math.isfinite(self.fps) and self.fps > 0):
            raise InputError(f"pick_fps={self.fps!r}: must be a positive frame rate (VANS: 11)")


def pick_indices(n_total: int, source_fps: float, num_frames: int, pick: FramePick) -> list[int]:
    """``num_frames`` source indices by ``pick`` (see the module docstring), padded to ``num_frames``."""
    if pick.mode == "spread":
        return sample_indices(n_total, num_frames)
    if n_total < 1:
        raise InputError(f"cannot pick frames from a clip with {n_total} frames; use a clip with at least one frame")
    if pick.mode == "first":
        picked = list(range(min(n_total, num_frames)))
    else:
        picked = resample_indices(n_total, source_fps, pick.fps)[:num_frames]
    return picked + [picked[-1]] * (num_frames - len(picked))


def _pick_indices(n_total: int, source_fps: float, num_frames: int | None, fps: float | None,
                  max_frames: int, pick: FramePick) -> list[int]:
    if num_frames is not None:
        count = min(num_frames, max_frames) if max_frames else num_frames
        return pick_indices(n_total, source_fps, count, pick)
    picked = resample_indices(n_total, source_fps, fps) if fps is not None else list(range(n_total))
    return picked[:max_frames] if max_frames else picked


def _output_fps(source_fps: float, n_total: int, count: int, num_frames: int | None, fps: float | None,
                pick: FramePick) -> float:
    if fps is not None:
        return float(fps)
    if num_frames is not None:
        if pick.mode == "fps":
            return float(pick.fps)
        if pick.mode == "first":
            return source_fps
        # N frames standing for the whole clip: the rate that keeps the clip's duration (as qwen_vl_utils).
        return source_fps * count / n_total
    return source_fps


# ----------------------------------------------------------------------------- geometry


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"size must be (height, width) in pixels (got {size!r})") from None
    if height < 1 or width < 1:
        raise InputError(f"size must be positive (got {height}x{width}); set height and width to at least 1")
    return height, width


def _check_resize(resize: str) -> str:
    if resize not in RESIZE_MODES:
        raise InputError(f"resize must be one of {', '.join(RESIZE_MODES)} (got {resize!r})")
    return resize


def scaled_size(height: int, width: int, size: tuple[int, int] | None, resize: str) -> tuple[int, int]:
    """Size of a frame after scaling (before any crop).

    ``crop``: cover ``size`` (the smaller scale factor that fills it; a center crop follows).
    ``fit``: aspect kept, inside ``size``, never enlarged (size is a max bound).
    """
    if size is None:
        return height, width
    target_h, target_w = size
    if resize == "crop":
        scale = max(target_h / height, target_w / width)
        return max(target_h, round(height * scale)), max(target_w, round(width * scale))
    scale = min(1.0, target_h / height, target_w / width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _crop_box(scaled_h: int, scaled_w: int, size: tuple[int, int] | None, resize: str) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centered crop; the whole frame when there is nothing to crop."""
    if size is None or resize != "crop":
        return 0, 0, scaled_h, scaled_w
    target_h, target_w = size
    return (scaled_h - target_h) // 2, (scaled_w - target_w) // 2, target_h, target_w


def resize_frames(frames: torch.Tensor, size: tuple[int, int] | None, resize: str = "crop") -> torch.Tensor:
    """Resize a ``[T, H, W, C]`` tensor with the same rules as ``read_video`` (bicubic, antialiased).

    Returns the input itself when nothing changes, else float32. Works in chunks of frames so the float
    intermediate of interpolation stays small; the result keeps the device and is clamped to 0..1.
    """
    size = _check_size(size)
    _check_resize(resize)
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or not frames.is_floating_point():
        raise InputError(f"frames must be a float [T, H, W, C] tensor in 0..1 (got {_describe(frames)})")
    count, height, width, channels = frames.shape
    scaled_h, scaled_w = scaled_size(height, width, size, resize)
    top, left, out_h, out_w = _crop_box(scaled_h, scaled_w, size, resize)
    if (out_h, out_w) == (height, width) and (scaled_h, scaled_w) == (height, width):
        return frames
    out = torch.empty(count, out_h, out_w, channels, dtype=torch.float32, device=frames.device)
    chunk = max(1, (64 << 20) // max(1, scaled_h * scaled_w * channels * 4))  # ~64 MB per step
    for start in range(0, count, chunk):
        part = frames[start:start + chunk].to(torch.float32).permute(0, 3, 1, 2)
        if (scaled_h, scaled_w) != (height, width):
            part = torch.nn.functional.interpolate(part, size=(scaled_h, scaled_w), mode="bicubic",
                                                   align_corners=False, antialias=True)
        part = part[:, :, top:top + out_h, left:left + out_w].clamp_(0.0, 1.0)
        out[start:start + chunk] = part.permute(0, 2, 3, 1)
    return out


# ----------------------------------------------------------------------------- opening files


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_file(path, what: str) -> str:
    """Clear errors for the cases where FFmpeg would only say 'Invalid data'."""
    if path is None or str(path) == "":
        raise InputError(f"no {what} file given; pick a video file")
    name = os.fspath(path)
    if not os.path.exists(name):
        raise InputError(f"{what} file not found: {name}; check the path")
    if os.path.isdir(name):
        raise InputError(f"{what} path is a folder, not a file: {name}; pick a video file")
    if os.path.getsize(name) == 0:
        raise InputError(f"{what} file is empty (0 bytes): {name}; re-export or re-download it")
    if not os.access(name, os.R_OK):
        raise InputError(f"{what} file cannot be read (permission denied): {name}; fix its permissions")
    return name


def _open_video(path, what: str):
    """Open a container and its first video stream, or raise a one-line InputError."""
    import av

    name = _check_file(path, what)
    try:
        container = av.open(name, metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{what} file {name} could not be opened as a video: not a video, or incomplete/corrupt "
            f"({_first_line(exc)}); re-export it as an H.264 .mp4"
        ) from None
    if not container.streams.video:
        container.close()
        raise InputError(f"{what} file {name} has no video stream (audio or data only); pass a file with video")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads: much faster decoding of large frames
    return name, container, stream


def _is_image_demuxer(container) -> bool:
    format_name = container.format.name
    return format_name in _IMAGE_DEMUXERS or format_name.endswith("_pipe")


def _count_packets(container, stream) -> int:
    """Frames of a stream whose container does not say: one video packet is one frame (no decoding)."""
    count = 0
    for packet in container.demux(stream):
        if packet.size:
            count += 1
    return count


def _stream_fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return 0.0


def _stream_duration(container, stream, frames: int, fps: float) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return frames / fps if fps > 0 else 0.0


def _info(name: str, container, stream, what: str) -> VideoInfo:
    frames = stream.frames or _count_packets(container, stream)
    if frames == 0:
        raise InputError(f"{what} file {name} has no frames; re-export or re-download it")
    if frames == 1 and _is_image_demuxer(container):
        raise InputError(f"{what} file {name} is a still image, not a video; pass a video clip")
    fps = _stream_fps(stream)
    width, height = stream.codec_context.width, stream.codec_context.height
    return VideoInfo(frames=frames, fps=fps, width=width, height=height,
                     duration=_stream_duration(container, stream, frames, fps))


def probe(path: str | os.PathLike, *, what: str = "video") -> VideoInfo:
    """Frames, fps, size and duration of the first video stream, without decoding any frame."""
    name, container, stream = _open_video(path, what)
    with container:
        return _info(name, container, stream, what)


# ----------------------------------------------------------------------------- decoding


def display_rotation(array, degrees: int):
    """Turn a decoded ``[H, W, C]`` array upright, as FFmpeg's autorotate does.

    ``degrees`` is PyAV's ``frame.rotation``: the counter-clockwise rotation of the display matrix
    (phone videos shot upright say -90, meaning "turn 90 degrees clockwise to show").
    """
    import numpy as np

    quarter_turns = round(degrees / 90) % 4
    return np.rot90(array, k=quarter_turns) if quarter_turns else array


class _FramePicker:
    """Converts, resizes and stores the picked frames of one decoding pass."""

    def __init__(self, indices: list[int], size: tuple[int, int] | None, resize: str):
        self.indices = indices
        self.size = size
        self.resize = resize
        self.positions: dict[int, list[int]] = {}
        for position, index in enumerate(indices):
            self.positions.setdefault(index, []).append(position)
        self.out: torch.Tensor | None = None
        self.geometry: tuple | None = None
        self.filled = 0  # positions filled so far (a prefix, since indices never decrease)
        self.reformatter = None  # one swscale context for the whole pass (filters computed once)

    def _geometry_for(self, frame) -> tuple:
        """Fixed from the first picked frame so that every output frame has the same size."""
        quarter_turns = round(frame.rotation / 90) % 4
        height, width = (frame.width, frame.height) if quarter_turns % 2 else (frame.height, frame.width)
        scaled_h, scaled_w = scaled_size(height, width, self.size, self.resize)
        top, left, out_h, out_w = _crop_box(scaled_h, scaled_w, self.size, self.resize)
        # swscale works on the stored (unrotated) picture.
        stored_h, stored_w = (scaled_w, scaled_h) if quarter_turns % 2 else (scaled_h, scaled_w)
        return stored_h, stored_w, top, left, out_h, out_w

    def take(self, index: int, frame) -> None:
        positions = self.positions.get(index)
        if not positions:
            return
        if self.geometry is None:
            self.geometry = self._geometry_for(frame)
        stored_h, stored_w, top, left, out_h, out_w = self.geometry
        if self.out is None:
            self.out = torch.empty(len(self.indices), out_h, out_w, 3, dtype=torch.float32)
        if self.reformatter is None:
            from av.video.reformatter import VideoReformatter

            self.reformatter = VideoReformatter()
        rgb = self.reformatter.reformat(frame, width=stored_w, height=stored_h, format="rgb24",
                                        interpolation="BICUBIC").to_ndarray()
        rgb = display_rotation(rgb, frame.rotation)
        rgb = rgb[top:top + out_h, left:left + out_w]
        if rgb.shape[:2] != (out_h, out_w):  # rotation changed mid-stream: rare, keep the size
            rgb = _resize_array(rgb, out_h, out_w)
        picture = torch.from_numpy(rgb.copy()).to(torch.float32).div_(255.0)
        for position in positions:
            self.out[position] = picture
        self.filled = positions[-1] + 1


def _resize_array(rgb, height: int, width: int):
    picture = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float()
    picture = torch.nn.functional.interpolate(picture, size=(height, width), mode="bilinear", antialias=True)
    return picture[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _decoded_frames(container, stream, damage: list[str]) -> Iterator:
    """Frames in order; a damaged packet is skipped and a broken demuxer ends the stream (noted in damage)."""
    import av

    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.FFmpegError as exc:
            damage.append(_first_line(exc))
            return
        try:
            frames = packet.decode()
        except av.error.FFmpegError as exc:
            damage.append(_first_line(exc))
            continue
        yield from frames


def _decode_pass(path, what: str, indices: list[int], size, resize: str) -> tuple[_FramePicker, int, list[str]]:
    """Decode up to the last picked index, keeping only picked frames. Returns (picker, frames decoded, damage)."""
    _, container, stream = _open_video(path, what)
    picker = _FramePicker(indices, size, resize)
    last = indices[-1]
    total = last + 1
    report_every = max(1, total // _MAX_PROGRESS_REPORTS)
    damage: list[str] = []
    decoded = 0
    with container, progress(total, f"decoding {Path(path).name}") as bar:
        pending = 0
        for frame in _decoded_frames(container, stream, damage):
            picker.take(decoded, frame)
            decoded += 1
            pending += 1
            if pending == report_every:
                bar.update(pending)
                pending = 0
            if decoded > last:
                break
        if pending:
            bar.update(pending)
    return picker, decoded, damage


def _check_read_settings(num_frames, fps, max_frames, min_frames) -> None:
    if num_frames is not None and fps is not None:
        raise InputError("give either num_frames or fps, not both; set one of them to None")
    if num_frames is not None and (not isinstance(num_frames, numbers.Integral) or num_frames < 1):
        raise InputError(f"num_frames must be a whole number >= 1 (got {num_frames!r})")
    if fps is not None and not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise InputError(f"fps must be a positive number (got {fps!r}); use None to keep every frame")
    if not isinstance(max_frames, numbers.Integral) or max_frames < 0:
        raise InputError(f"max_frames must be a whole number >= 0, 0 disables the cap (got {max_frames!r})")
    if not isinstance(min_frames, numbers.Integral) or min_frames < 0:
        raise InputError(f"min_frames must be a whole number >= 0 (got {min_frames!r})")


def _require_frames(name: str, what: str, found: int, min_frames: int) -> None:
    if found < min_frames:
        raise InputError(f"{what} file {name} has {found} frame(s), need at least {min_frames}; use a longer clip")


def read_video(path: str | os.PathLike, *, num_frames: int | None = None, fps: float | None = None,
               size: tuple[int, int] | None = None, resize: str = "crop", max_frames: int = 0,
               min_frames: int = 1, what: str = "video", pick: FramePick | None = None) -> Video:
    """Decode the picked frames of a video, resized while decoding (see the module doc for the rules).

    ``size=(H, W)``: ``resize="crop"`` scales to cover and center-crops to exactly H x W (the VDM's
    352 x 640); ``"fit"`` keeps the aspect ratio inside H x W and never enlarges (the VLM path, which
    does its own smart_resize later). ``min_frames``: refuse clips with fewer source frames.
    ``what`` names the input in error messages. ``pick`` says how ``num_frames`` are picked (default: spread
    over the whole clip); ``read_clip`` reads the VDM's view.
    """
    _check_read_settings(num_frames, fps, max_frames, min_frames)
    pick = pick or FramePick("spread")
    pick.validate()
    size = _check_size(size)
    resize = _check_resize(resize)
    info = probe(path, what=what)
    name = os.fspath(path)
    _require_frames(name, what, info.frames, min_frames)
    if fps is not None and not info.fps > 0:
        raise InputError(f"{what} file {name} has no usable frame rate, so it cannot be resampled to {fps} fps; "
                         "use num_frames instead")
    if num_frames is not None and pick.mode == "fps" and not info.fps > 0:
        raise InputError(f"{what} file {name} has no usable frame rate, so frames cannot be picked at {pick.fps} fps; "
                         "re-export it, or use frame_pick first or spread")

    indices = _pick_indices(info.frames, info.fps, num_frames, fps, max_frames, pick)
    picker, decoded, damage = _decode_pass(path, what, indices, size, resize)
    short = decoded <= indices[-1]  # the file ended before the container said it would
    if decoded == 0:
        raise InputError(f"{what} file {name} has no decodable frames (incomplete or corrupt); re-export or re-download it")
    if short:
        _require_frames(name, what, decoded, min_frames)
        if num_frames is not None:  # spread over the frames that really exist: one more pass
            indices = _pick_indices(decoded, info.fps, num_frames, fps, max_frames, pick)
            picker, decoded_again, more_damage = _decode_pass(path, what, indices, size, resize)
            if decoded_again <= indices[-1]:
                raise InputError(f"{what} file {name} decodes differently on each read (corrupt); re-export it")
        else:
            indices = indices[:picker.filled]
            picker.out = picker.out[:len(indices)].clone()  # free the unfilled tail
    complete = not damage and not short
    if not complete:
        log.warning("%s file %s is damaged or cut short (%s); using the %d frames that decode",
                    what, name, damage[0] if damage else "ends early", decoded)
    source_frames = decoded if short else info.frames
    frames = picker.out[:len(indices)]
    return Video(frames=frames, fps=_output_fps(info.fps, source_frames, len(indices), num_frames, fps, pick),
                 source_fps=info.fps, source_frames=source_frames, indices=indices, complete=complete)


def read_clip(path: str | os.PathLike, num_frames: int, height: int, width: int, pick: FramePick | None = None, *,
              what: str = "video", min_frames: int = 1) -> Video:
    """The VDM's view of a clip: ``num_frames`` frames picked by ``pick`` (default ``FramePick()``), scaled to
    cover height×width and centre-cropped. Used for the input clip (context latents) and the GT clip (CLIP-V)."""
    return read_video(path, num_frames=num_frames, size=(height, width), resize="crop", pick=pick or FramePick(),
                      what=what, min_frames=min_frames)


# ----------------------------------------------------------------------------- writing


def _check_frames_to_write(frames, fps, crf) -> torch.Tensor:
    if not isinstance(frames, torch.Tensor):
        raise InputError(f"frames to write must be a [T, H, W, 3] tensor (got {_describe(frames)})")
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4) or min(frames.shape) < 1:
        raise InputError(f"frames to write must be a non-empty [T, H, W, C] tensor with C = 1, 3 or 4 "
                         f"(got {_describe(frames)})")
    if not (frames.is_floating_point() or frames.dtype == torch.uint8):
        raise InputError(f"frames to write must be float (0..1) or uint8 (got {_describe(frames)})")
    if frames.is_floating_point() and not bool(torch.isfinite(frames).all()):
        raise InputError("frames to write contain NaN or infinite values; check the generation settings")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise InputError(f"fps of the video to write must be a positive number (got {fps!r})")
    if not (isinstance(crf, int) and 0 <= crf <= 51):
        raise InputError(f"crf must be a whole number from 0 (lossless) to 51 (got {crf!r})")
    return frames


def _to_rgb24(frame: torch.Tensor, even_h: int, even_w: int):
    """One frame as uint8 RGB, padded to even size by repeating the last row/column (yuv420p needs it)."""
    import numpy as np

    if frame.is_floating_point():
        frame = frame.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    rgb = frame.cpu().numpy()
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    elif rgb.shape[-1] == 4:
        rgb = rgb[..., :3]
    pad_h, pad_w = even_h - rgb.shape[0], even_w - rgb.shape[1]
    if pad_h or pad_w:
        rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(rgb)


def _frame_rate(fps: float) -> Fraction:
    """Exact for integer rates, 30000/1001-style for NTSC rates."""
    return Fraction(fps).limit_denominator(1001)


def write_video(path: str | os.PathLike, frames: torch.Tensor, fps: float, *, crf: int = 18,
                preset: str = "medium") -> Path:
    """Write ``[T, H, W, C]`` frames (float 0..1 or uint8) as an H.264 (libx264, yuv420p) mp4.

    Odd sizes are padded to even by repeating the last row/column (so no picture is lost; the file is
    at most one pixel wider/taller). Values outside 0..1 are clipped. The file is written under a
    temporary name in the same folder and renamed when complete, so a failure never leaves a partial
    file. The container is always mp4 (faststart: playable while downloading), whatever the suffix.
    """
    import av

    from .files import atomic_path

    _check_frames_to_write(frames, fps, crf)
    target = Path(path)
    count, height, width, _ = frames.shape
    even_h, even_w = height + height % 2, width + width % 2
    with atomic_path(target, suffix=".tmp.mp4") as temp_name:
        with av.open(str(temp_name), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=_frame_rate(fps))
            stream.width, stream.height, stream.pix_fmt = even_w, even_h, "yuv420p"
            stream.options = {"crf": str(crf), "preset": preset}
            _tag_bt709(stream)
            with progress(count, f"writing {target.name}") as bar:
                for index in range(count):
                    picture = av.VideoFrame.from_ndarray(_to_rgb24(frames[index], even_h, even_w), format="rgb24")
                    picture = picture.reformat(format="yuv420p", dst_colorspace="itu709", dst_color_range="MPEG")
                    picture.pts = index
                    container.mux(stream.encode(picture))
                    bar.update()
            container.mux(stream.encode(None))
    return target


def _tag_bt709(stream) -> None:
    """Say which colours the YUV means (BT.709, limited range), so players and our reader agree."""
    context = stream.codec_context
    context.colorspace = 1  # AVCOL_SPC_BT709
    context.color_primaries = 1  # AVCOL_PRI_BT709
    context.color_trc = 1  # AVCOL_TRC_BT709
    context.color_range = 1  # AVCOL_RANGE_MPEG


# ----------------------------------------------------------------------------- synthetic clips


def synthetic_frames(T: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """A deterministic moving test pattern, float32 ``[T, H, W, 3]`` in 0..1.

    Drifting colour stripes plus a bright square crossing the picture: every frame differs from the
    previous one (motion for tests, demos and fixtures) and the same seed always gives the same clip.
    Built one frame at a time, so memory is the output only.
    """
    if min(T, H, W) < 1:
        raise InputError(f"synthetic clip size must be positive (got T={T}, H={H}, W={W})")
    generator = torch.Generator().manual_seed(seed)
    frequency = 1.0 + 3.0 * torch.rand(3, 2, generator=generator)  # stripes per picture, per channel, (y, x)
    phase = 2 * math.pi * torch.rand(3, generator=generator)
    drift = 2 * math.pi * (0.02 + 0.08 * torch.rand(3, generator=generator))  # radians per frame
    start = torch.rand(2, generator=generator)  # square position (y, x), fraction of the picture
    velocity = (0.5 + torch.rand(2, generator=generator)) / max(T, 8)  # crosses about once per clip
    square_color = 0.6 + 0.4 * torch.rand(3, generator=generator)
    y = torch.linspace(0, 1, H).view(H, 1)
    x = torch.linspace(0, 1, W).view(1, W)
    side_y, side_x = max(1, H // 5), max(1, W // 5)
    out = torch.empty(T, H, W, 3)
    for t in range(T):
        for c in range(3):
            angle = 2 * math.pi * (frequency[c, 0] * y + frequency[c, 1] * x) + phase[c] + drift[c] * t
            out[t, :, :, c] = 0.5 + 0.35 * torch.sin(angle)
        top = int(((start[0] + velocity[0] * t) % 1.0) * max(1, H - side_y))
        left = int(((start[1] + velocity[1] * t) % 1.0) * max(1, W - side_x))
        out[t, top:top + side_y, left:left + side_x] = square_color
    return out
