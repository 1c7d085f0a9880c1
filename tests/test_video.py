"""Video IO: frame picking rules, resize rules, round trips through real H.264 files, bad files."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from vans.errors import Cancelled, InputError
from vans.progress import quiet, use_cancel_check, use_reporter
from vans.video import (
    FramePick,
    pick_indices,
    probe,
    read_clip,
    read_video,
    resample_indices,
    resize_frames,
    sample_indices,
    scaled_size,
    synthetic_frames,
    write_video,
)

LEVEL_TOLERANCE = 3 / 255  # H.264 at crf 18 keeps flat grey levels within a couple of codes


@pytest.fixture(autouse=True)
def _quiet_bars():
    with quiet():
        yield


def grey_levels(count: int) -> torch.Tensor:
    """Frame i is flat grey at level i / (count - 1): a decoded frame tells which source frame it was."""
    return torch.linspace(0, 1, count)


def write_grey_clip(path, count: int, fps: float = 10.0, height: int = 16, width: int = 16):
    levels = grey_levels(count)
    frames = levels.view(count, 1, 1, 1).expand(count, height, width, 3).contiguous()
    write_video(path, frames, fps, preset="ultrafast")
    return levels


def frame_levels(frames: torch.Tensor) -> torch.Tensor:
    return frames.mean(dim=(1, 2, 3))


def assert_source_frames(video, levels, expected_indices):
    assert video.indices == expected_indices
    torch.testing.assert_close(frame_levels(video.frames), levels[expected_indices], atol=LEVEL_TOLERANCE, rtol=0)


def write_raw_clip(path, frames_uint8: np.ndarray, fps: int, *, codec="libx264", pix_fmt="yuv444p",
                   container_format=None, container_options=None, rotation=None):
    """Write with PyAV directly, for files write_video never makes (odd sizes, mkv, no faststart, rotation)."""
    import av

    with av.open(str(path), "w", format=container_format, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.height, stream.width = frames_uint8.shape[1:3]
        stream.pix_fmt = pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index, array in enumerate(frames_uint8):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def noise_uint8(count, height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def assert_one_line_naming(error: pytest.ExceptionInfo, name: str):
    message = str(error.value)
    assert "\n" not in message
    assert name in message


# ----------------------------------------------------------------------------- picking rules


def test_sample_indices_spread_over_whole_clip():
    # linspace(0, 19, 6) = 0, 3.8, 7.6, 11.4, 15.2, 19
    assert sample_indices(20, 6) == [0, 4, 8, 11, 15, 19]
    # linspace(0, 120, 33) has step 3.75
    picked = sample_indices(121, 33)
    assert picked[0] == 0 and picked[-1] == 120 and len(picked) == 33
    assert picked[:5] == [0, 4, 8, 11, 15]  # 0, 3.75, 7.5 (half to even -> 8), 11.25, 15
    assert sample_indices(7, 1) == [0]


def test_sample_indices_duplicate_evenly_when_clip_is_short():
    # linspace(0, 2, 6) = 0, .4, .8, 1.2, 1.6, 2: every frame twice
    assert sample_indices(3, 6) == [0, 0, 1, 1, 2, 2]
    assert sample_indices(1, 4) == [0, 0, 0, 0]


@pytest.mark.parametrize("n_total, n", [(0, 3), (5, 0), (5, -1)])
def test_sample_indices_refuses_empty_requests(n_total, n):
    with pytest.raises(InputError):
        sample_indices(n_total, n)


def test_resample_indices_take_nearest_frame_to_each_tick():
    assert resample_indices(20, 10.0, 5.0) == list(range(0, 20, 2))
    # ticks at 2.5-frame steps; a tie goes to the later frame
    assert resample_indices(20, 10.0, 4.0) == [0, 3, 5, 8, 10, 13, 15, 18]
    # faster than the source: frames repeat, never past the last one
    assert resample_indices(5, 10.0, 20.0) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    with pytest.raises(InputError):
        resample_indices(5, 0.0, 2.0)


# ----------------------------------------------------------------------------- geometry


def test_scaled_size_crop_covers_and_fit_stays_inside():
    assert scaled_size(1080, 1920, (352, 640), "crop") == (360, 640)  # scale 1/3, height 360 then crop to 352
    assert scaled_size(1920, 1080, (352, 640), "crop") == (1138, 640)  # portrait: width decides
    assert scaled_size(1080, 1920, (352, 640), "fit") == (352, 626)  # 1920 * 352/1080 = 625.8
    assert scaled_size(100, 200, (352, 640), "fit") == (100, 200)  # fit never enlarges
    assert scaled_size(100, 200, (352, 640), "crop") == (352, 704)  # crop does, to cover
    assert scaled_size(33, 47, None, "crop") == (33, 47)


def test_resize_frames_center_crop_keeps_the_middle():
    frames = torch.zeros(2, 48, 64, 3)
    frames[:, :, :16, 0] = 1  # red left quarter
    frames[:, :, 16:48, 1] = 1  # green middle half
    frames[:, :, 48:, 2] = 1  # blue right quarter
    out = resize_frames(frames, (48, 24), "crop")  # no scaling needed: 64 -> crop columns 20..43
    assert out.shape == (2, 48, 24, 3)
    torch.testing.assert_close(out, frames[:, :, 20:44])


def test_resize_frames_scales_with_antialias_and_clamps():
    flat = torch.full((3, 40, 60, 3), 0.25)
    out = resize_frames(flat, (20, 20), "crop")
    assert out.shape == (3, 20, 20, 3)
    torch.testing.assert_close(out, torch.full_like(out, 0.25))
    fitted = resize_frames(flat, (20, 20), "fit")
    assert fitted.shape == (3, 13, 20, 3)  # 40 * 20/60 = 13.3
    # a one-pixel checkerboard shrunk by 4 averages to grey with antialias (not aliased to 0 or 1)
    checker = ((torch.arange(64).view(64, 1) + torch.arange(64).view(1, 64)) % 2).float()
    checker = checker.view(1, 64, 64, 1).expand(1, 64, 64, 3)
    shrunk = resize_frames(checker, (16, 16), "crop")
    assert shrunk.min() >= 0 and shrunk.max() <= 1
    torch.testing.assert_close(shrunk, torch.full_like(shrunk, 0.5), atol=0.05, rtol=0)


def test_resize_frames_returns_input_when_size_matches():
    frames = torch.rand(2, 8, 8, 3)
    assert resize_frames(frames, (8, 8)) is frames
    assert resize_frames(frames, None) is frames


@pytest.mark.parametrize("size, resize", [((0, 10), "crop"), ((10,), "crop"), ((10, 10), "stretch")])
def test_resize_frames_refuses_bad_settings(size, resize):
    with pytest.raises(InputError):
        resize_frames(torch.rand(1, 8, 8, 3), size, resize)
    with pytest.raises(InputError):
        resize_frames(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), (4, 4))  # IMAGE frames are float 0..1


# ----------------------------------------------------------------------------- synthetic clips


def test_synthetic_frames_are_deterministic_moving_and_in_range():
    clip = synthetic_frames(5, 24, 32, seed=3)
    assert clip.shape == (5, 24, 32, 3) and clip.dtype == torch.float32
    assert clip.min() >= 0 and clip.max() <= 1
    torch.testing.assert_close(clip, synthetic_frames(5, 24, 32, seed=3), rtol=0, atol=0)
    assert not torch.equal(clip, synthetic_frames(5, 24, 32, seed=4))
    motion = (clip[1:] - clip[:-1]).abs().mean(dim=(1, 2, 3))
    assert bool((motion > 0.01).all())


# ----------------------------------------------------------------------------- round trips


def test_write_then_read_round_trip(tmp_path):
    clip = synthetic_frames(12, 48, 64, seed=1)
    path = write_video(tmp_path / "clip.mp4", clip, 12.0, preset="ultrafast")
    assert path == tmp_path / "clip.mp4"
    info = probe(path)
    assert (info.frames, info.fps, info.width, info.height) == (12, 12.0, 64, 48)
    assert info.duration == pytest.approx(1.0)
    video = read_video(path)
    assert video.frames.shape == (12, 48, 64, 3) and video.frames.dtype == torch.float32
    assert video.indices == list(range(12)) and video.fps == 12.0 and video.complete
    assert (video.frames - clip).abs().mean() < 0.05
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temporary file left


def test_written_colours_survive_decoding(tmp_path):
    colours = torch.eye(3).view(3, 1, 1, 3).expand(3, 16, 16, 3).contiguous()  # red, green, blue
    write_video(tmp_path / "rgb.mp4", colours, 5, crf=0)
    decoded = read_video(tmp_path / "rgb.mp4").frames.mean(dim=(1, 2))
    torch.testing.assert_close(decoded, torch.eye(3), atol=0.02, rtol=0)  # same colour matrix on both sides


def test_num_frames_picks_even_spread(tmp_path):
    levels = write_grey_clip(tmp_path / "grey.mp4", 12)
    video = read_video(tmp_path / "grey.mp4", num_frames=5)
    # linspace(0, 11, 5) = 0, 2.75, 5.5, 8.25, 11
    assert_source_frames(video, levels, [0, 3, 6, 8, 11])
    assert video.fps == pytest.approx(10.0 * 5 / 12)  # five frames still last the clip's 1.2 s
    assert video.source_frames == 12 and video.source_fps == 10.0


def test_num_frames_beyond_clip_length_duplicates(tmp_path):
    levels = write_grey_clip(tmp_path / "grey.mp4", 3)
    video = read_video(tmp_path / "grey.mp4", num_frames=6)
    assert_source_frames(video, levels, [0, 0, 1, 1, 2, 2])


def test_fps_resamples_and_max_frames_caps(tmp_path):
    levels = write_grey_clip(tmp_path / "grey.mp4", 12, fps=10)
    video = read_video(tmp_path / "grey.mp4", fps=5)
    assert_source_frames(video, levels, [0, 2, 4, 6, 8, 10])
    assert video.fps == 5.0
    assert_source_frames(read_video(tmp_path / "grey.mp4", fps=5, max_frames=2), levels, [0, 2])
    assert_source_frames(read_video(tmp_path / "grey.mp4", max_frames=3), levels, [0, 1, 2])
    # with num_frames the cap lowers the count, still spread over the whole clip
    assert_source_frames(read_video(tmp_path / "grey.mp4", num_frames=6, max_frames=3), levels, [0, 6, 11])


def test_vdm_frame_pick_modes(tmp_path):
    """The VDM's view of a clip (FramePick): the first frames at 11 fps by default, the first native frames, or
    spread over the whole clip; a short clip repeats its last picked frame."""
    levels = write_grey_clip(tmp_path / "grey.mp4", 30, fps=22)
    default = read_clip(tmp_path / "grey.mp4", 5, 16, 16)
    assert (FramePick().mode, FramePick().fps) == ("fps", 11.0)
    assert_source_frames(default, levels, [0, 2, 4, 6, 8])  # every other frame of a 22 fps clip, from the start
    assert default.fps == 11.0 and default.frames.shape == (5, 16, 16, 3)
    assert_source_frames(read_clip(tmp_path / "grey.mp4", 5, 16, 16, FramePick("first")), levels, [0, 1, 2, 3, 4])
    assert_source_frames(read_clip(tmp_path / "grey.mp4", 5, 16, 16, FramePick("spread")), levels,
                         sample_indices(30, 5))
    # 33 frames at 11 fps need 3 s; a 30-frame 22 fps clip lasts 1.36 s: its 15 ticks, then the last one repeated
    assert pick_indices(30, 22.0, 33, FramePick()) == [2 * k for k in range(15)] + [28] * 18
    assert pick_indices(3, 30.0, 5, FramePick("first")) == [0, 1, 2, 2, 2]
    with pytest.raises(InputError, match="frame_pick='middle'"):
        read_clip(tmp_path / "grey.mp4", 5, 16, 16, FramePick("middle"))
    with pytest.raises(InputError, match="pick_fps=0"):
        FramePick("fps", 0).validate()


def test_read_resizes_while_decoding(tmp_path):
    clip = synthetic_frames(4, 144, 256, seed=2)
    write_video(tmp_path / "clip.mp4", clip, 8, crf=10, preset="ultrafast")
    full = read_video(tmp_path / "clip.mp4").frames
    cropped = read_video(tmp_path / "clip.mp4", size=(48, 48), resize="crop").frames
    fitted = read_video(tmp_path / "clip.mp4", size=(48, 48), resize="fit").frames
    assert cropped.shape == (4, 48, 48, 3) and fitted.shape == (4, 27, 48, 3)
    # decoding-time scaling (swscale) agrees with the tensor path (torch) on the same frames
    assert (cropped - resize_frames(full, (48, 48), "crop")).abs().mean() < 0.03
    assert (fitted - resize_frames(full, (48, 48), "fit")).abs().mean() < 0.03


def test_odd_frame_sizes_decode_and_resize(tmp_path):
    path = tmp_path / "odd.mkv"  # mkv says no frame count, so probe counts packets
    write_raw_clip(path, noise_uint8(9, 33, 47), 8)
    info = probe(path)
    assert (info.frames, info.width, info.height) == (9, 47, 33)
    assert read_video(path).frames.shape == (9, 33, 47, 3)
    video = read_video(path, num_frames=4, size=(20, 30))
    assert video.frames.shape == (4, 20, 30, 3) and video.indices == [0, 3, 5, 8]


def test_write_pads_odd_sizes_by_repeating_the_edge(tmp_path):
    frames = torch.zeros(2, 33, 47, 3)
    frames[:, -1, :, 0] = 1  # last row red
    frames[:, :, -1, 2] = 1  # last column blue
    write_video(tmp_path / "odd.mp4", frames, 4, crf=0)
    decoded = read_video(tmp_path / "odd.mp4").frames
    assert decoded.shape == (2, 34, 48, 3)
    torch.testing.assert_close(decoded[:, 33, :40], decoded[:, 32, :40], atol=0.05, rtol=0)
    assert decoded[:, 33, :40, 0].mean() > 0.8  # the padded row repeats the red row
    assert decoded[:, :30, 47, 2].mean() > 0.8  # the padded column repeats the blue column


def test_phone_rotation_is_applied(tmp_path):
    picture = np.zeros((3, 48, 64, 3), dtype=np.uint8)
    picture[:, :16, :16, 0] = 255  # red marker top-left of the stored picture
    write_raw_clip(tmp_path / "portrait.mp4", picture, 10, rotation=-90)  # "turn 90 degrees clockwise"
    video = read_video(tmp_path / "portrait.mp4")
    assert video.frames.shape == (3, 64, 48, 3)
    red = video.frames[0, :, :, 0] > 0.5
    assert red[:16, -16:].float().mean() > 0.8 and red[:, :32].sum() == 0  # marker now top-right
    assert read_video(tmp_path / "portrait.mp4", size=(32, 16)).frames.shape == (3, 32, 16, 3)


def test_4k_clip_decodes_to_vdm_size(tmp_path):
    frames = (synthetic_frames(3, 540, 960, seed=5) * 255).round().to(torch.uint8)
    frames_4k = frames.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)  # 2160 x 3840, cheap to make
    write_video(tmp_path / "uhd.mp4", frames_4k, 30, preset="ultrafast")
    del frames_4k
    assert (probe(tmp_path / "uhd.mp4").width, probe(tmp_path / "uhd.mp4").height) == (3840, 2160)
    video = read_video(tmp_path / "uhd.mp4", num_frames=2, size=(352, 640), resize="crop")
    assert video.frames.shape == (2, 352, 640, 3) and video.indices == [0, 2]
    expected = resize_frames(frames[[0, 2]].float() / 255, (352, 640), "crop")
    assert (video.frames - expected).abs().mean() < 0.05


# ----------------------------------------------------------------------------- progress and cancel


def test_progress_counts_decoded_frames_and_cancel_stops(tmp_path):
    write_grey_clip(tmp_path / "grey.mp4", 12)
    reports = []

    class Recorder:
        def __init__(self, total, desc):
            reports.append([total, 0])

        def update(self, n=1):
            reports[-1][1] += n

        def close(self):
            pass

    with use_reporter(Recorder):
        read_video(tmp_path / "grey.mp4", num_frames=3)
    assert reports == [[12, 12]]

    calls = []
    with use_cancel_check(lambda: len(calls.append(1) or calls) > 3), pytest.raises(Cancelled):
        read_video(tmp_path / "grey.mp4")


# ----------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found") as error:
        read_video(tmp_path / "nope.mp4")
    assert_one_line_naming(error, "nope.mp4")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="empty") as error:
        probe(tmp_path / "empty.mp4")
    assert_one_line_naming(error, "empty.mp4")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(InputError, match="folder"):
        read_video(tmp_path)


def test_text_file(tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video\n" * 50)
    with pytest.raises(InputError, match="could not be opened as a video") as error:
        read_video(tmp_path / "notes.mp4")
    assert_one_line_naming(error, "notes.mp4")


def test_png_is_a_still_image(tmp_path):
    import av

    frame = av.VideoFrame.from_ndarray(noise_uint8(1, 16, 16)[0], format="rgb24")
    frame.save(str(tmp_path / "photo.png"))
    with pytest.raises(InputError, match="still image") as error:
        read_video(tmp_path / "photo.png")
    assert_one_line_naming(error, "photo.png")


def test_audio_only_file(tmp_path):
    import av

    with av.open(str(tmp_path / "sound.m4a"), "w") as container:
        stream = container.add_stream("aac", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 8000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(InputError, match="no video stream") as error:
        read_video(tmp_path / "sound.m4a")
    assert_one_line_naming(error, "sound.m4a")


def truncate(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_truncated_mp4_without_index_is_an_error(tmp_path):
    path = tmp_path / "cut.mp4"  # plain mp4: its index (moov) is written last, so the cut loses it
    write_raw_clip(path, noise_uint8(30, 48, 64), 10, pix_fmt="yuv420p")
    truncate(path)
    with pytest.raises(InputError, match="incomplete") as error:
        read_video(path)
    assert_one_line_naming(error, "cut.mp4")


def test_truncated_faststart_mp4_yields_the_decodable_frames(tmp_path):
    path = tmp_path / "cut.mp4"
    write_video(path, torch.from_numpy(noise_uint8(30, 48, 64)), 10, preset="ultrafast")  # faststart
    truncate(path)
    assert probe(path).frames == 30  # the index still promises 30
    everything = read_video(path)
    assert not everything.complete and 0 < everything.source_frames < 30
    assert everything.frames.shape[0] == everything.source_frames
    six = read_video(path, num_frames=6)
    assert not six.complete and six.indices == sample_indices(everything.source_frames, 6)
    assert six.frames.shape == (6, 48, 64, 3)
    with pytest.raises(InputError, match="need at least 30"):
        read_video(path, min_frames=30)


def test_truncated_mkv_yields_the_decodable_frames(tmp_path):
    path = tmp_path / "cut.mkv"
    write_raw_clip(path, noise_uint8(30, 48, 64), 10)
    truncate(path)
    video = read_video(path)
    assert 0 < video.source_frames < 30 and video.frames.shape[0] == video.source_frames


def test_one_frame_video(tmp_path):
    levels = write_grey_clip(tmp_path / "one.mp4", 1)
    video = read_video(tmp_path / "one.mp4")
    assert video.frames.shape == (1, 16, 16, 3)
    assert_source_frames(read_video(tmp_path / "one.mp4", num_frames=6), levels, [0] * 6)
    with pytest.raises(InputError, match=r"has 1 frame\(s\), need at least 6") as error:
        read_video(tmp_path / "one.mp4", num_frames=6, min_frames=6)
    assert_one_line_naming(error, "one.mp4")


def test_fewer_frames_than_minimum(tmp_path):
    write_grey_clip(tmp_path / "short.mp4", 4)
    with pytest.raises(InputError, match=r"has 4 frame\(s\), need at least 6"):
        read_video(tmp_path / "short.mp4", num_frames=6, min_frames=6)
    assert read_video(tmp_path / "short.mp4", num_frames=6, min_frames=4).frames.shape[0] == 6


@pytest.mark.parametrize("settings", [
    {"num_frames": 6, "fps": 2.0},
    {"num_frames": 0},
    {"fps": -1.0},
    {"max_frames": -1},
    {"size": (0, 640)},
    {"resize": "stretch", "size": (8, 8)},
])
def test_bad_read_settings(tmp_path, settings):
    write_grey_clip(tmp_path / "grey.mp4", 4)
    with pytest.raises(InputError):
        read_video(tmp_path / "grey.mp4", **settings)


# ----------------------------------------------------------------------------- writing bad tensors


@pytest.mark.parametrize("frames, fps", [
    ("not a tensor", 10),
    (torch.rand(8, 8, 3), 10),  # no time axis
    (torch.rand(2, 8, 8, 2), 10),  # two channels
    (torch.rand(0, 8, 8, 3), 10),  # no frames
    (torch.full((2, 8, 8, 3), float("nan")), 10),
    (torch.rand(2, 8, 8, 3), 0),
])
def test_write_refuses_bad_tensors_and_writes_nothing(tmp_path, frames, fps):
    with pytest.raises(InputError):
        write_video(tmp_path / "out.mp4", frames, fps)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous answer")
    with pytest.raises(Exception):
        write_video(target, torch.rand(2, 8, 8, 3), 10, preset="no-such-preset")
    assert target.read_bytes() == b"previous answer"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_cancelled_write_leaves_nothing(tmp_path):
    with use_cancel_check(lambda: True), pytest.raises(Cancelled):
        write_video(tmp_path / "out.mp4", torch.rand(4, 8, 8, 3), 10)
    assert list(tmp_path.iterdir()) == []


def test_write_accepts_uint8_grey_and_alpha(tmp_path):
    grey = torch.full((2, 8, 8, 1), 0.5)
    rgba = torch.cat([torch.full((2, 8, 8, 3), 200, dtype=torch.uint8), torch.zeros(2, 8, 8, 1, dtype=torch.uint8)], -1)
    write_video(tmp_path / "grey.mp4", grey, 10, crf=0)
    write_video(tmp_path / "rgba.mp4", rgba, 10, crf=0)
    assert read_video(tmp_path / "grey.mp4").frames.mean() == pytest.approx(0.5, abs=0.02)
    assert read_video(tmp_path / "rgba.mp4").frames.mean() == pytest.approx(200 / 255, abs=0.02)
