"""Video-Next-Event Prediction end to end: (video, question) -> (caption, answer video).

    load the input clip twice-bounded (6 frames for the VLM, 33 frames at 352×640 for the VDM)
    → caption with the VLM (think + [Ans] caption) → offload the VLM
    → render the caption with the context-conditioned Wan DiT → write mp4 + caption + JSON record.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .errors import InputError
from .generator import GenerationSettings, VideoGenerator
from .models import ModelPaths
from .video import FramePick


@dataclass
class CaptionSettings:
    """Defaults of the official code (``agent_mllm.py`` and its qwen_vl_utils constants)."""

    num_frames: int = 6
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 1024
    system_prompt: str = "official"  # or "paper" (vans.prompts.SYSTEM_PROMPTS)
    decoding: str = "official"  # or "policy" (vans.captioner.DECODING_MODES)


@dataclass
class AnswerSettings:
    caption: CaptionSettings = field(default_factory=CaptionSettings)
    video: GenerationSettings = field(default_factory=GenerationSettings)
    frame_pick: FramePick = field(default_factory=FramePick)  # the VDM's view of the input clip
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Answer:
    question: str
    caption: str
    think: str
    raw: str
    frames: torch.Tensor  # [T, H, W, C] 0..1
    fps: float
    timings: dict[str, float]


@dataclass
class VansModels:
    captioner: object
    generator: VideoGenerator


def pick_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        try:
            picked = torch.device(device)
        except (RuntimeError, ValueError):
            raise InputError(f"device '{device}': use auto, cpu, cuda or cuda:N") from None
        if picked.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device '{device}': this machine has no usable CUDA GPU; use --device cpu (or auto)")
        if picked.type == "cuda" and picked.index is not None and picked.index >= torch.cuda.device_count():
            raise InputError(f"device '{device}': only {torch.cuda.device_count()} CUDA device(s) here")
        return picked
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    if dtype and dtype != "auto":
        if dtype not in DTYPES:
            raise InputError(f"dtype '{dtype}': use one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_output_folder(out_dir: str | os.PathLike, *, what: str = "output folder") -> Path:
    """Make sure files can be written into ``out_dir`` (before any model loads) without creating it: a
    probe file is created and removed in the folder, or in its nearest existing parent when it does not
    exist yet (``save_answer`` creates the missing folders)."""
    import tempfile

    out = Path(out_dir)
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise InputError(f"{what} {out} cannot be created: {base} is a file, not a folder; pick another folder")
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".vans-write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(f"{what} {out} cannot be written ({reason} in {base}); pick a folder you can write to") \
            from None
    return out


def check_inputs(video_path: str | os.PathLike, question: str, settings: AnswerSettings | None = None) -> str:
    """Refuse a bad answer request before any model loads (loading takes minutes): the question, the
    settings, and the input video (exists, readable, a video with at least the VLM's frame count).
    Returns the question as ``answer`` will use it."""
    from .prompts import system_prompt_text, validate_question
    from .video import _require_frames, probe

    settings = settings or AnswerSettings()
    question = validate_question(question)
    system_prompt_text(settings.caption.system_prompt)
    settings.video.validate()
    settings.frame_pick.validate()
    info = probe(video_path, what="video")
    _require_frames(os.fspath(video_path), "video", info.frames, settings.caption.num_frames)
    return question


def load_models(paths: ModelPaths, *, device: torch.device, dtype: torch.dtype, offload: bool = True,
                allow_pickle: bool = False) -> VansModels:
    from .captioner import load_captioner
    from .wan import check_text_encoder_matches, load_dit, load_text_encoder, load_vae

    captioner = load_captioner(paths.vlm, checkpoint=paths.vlm_checkpoint, dtype=dtype,
                               device="cpu" if offload else device)
    captioner.device = device
    home = "cpu" if offload else device
    dit = load_dit(paths.dit, dtype=dtype, device=home, allow_pickle=allow_pickle)
    text_encoder = load_text_encoder(paths.text_encoder, tokenizer=paths.tokenizer, dtype=dtype, device=home,
                                     allow_pickle=allow_pickle)
    check_text_encoder_matches(dit, text_encoder)
    vae = load_vae(paths.vae, dtype=dtype, device=home, allow_pickle=allow_pickle)
    generator = VideoGenerator(dit, text_encoder, vae, device=device, dtype=dtype, offload=offload)
    return VansModels(captioner=captioner, generator=generator)


def answer(models: VansModels, video_path: str | os.PathLike, question: str,
           settings: AnswerSettings | None = None) -> Answer:
    from .prompts import system_prompt_text, validate_question
    from .video import read_clip, read_video

    question = validate_question(question)
    settings = settings or AnswerSettings()
    system_prompt = system_prompt_text(settings.caption.system_prompt)
    settings.video.validate()
    settings.frame_pick.validate()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    vs = settings.video
    # The VLM reads 6 frames of the whole clip at up to 768·28·28 pixels; the VDM reads 33 frames at 352×640
    # picked by settings.frame_pick (default: the first 3 s at 11 fps, see vans.video.FramePick).
    vlm_clip = read_video(video_path, num_frames=settings.caption.num_frames, min_frames=settings.caption.num_frames,
                          what="video")
    vdm_clip = read_clip(video_path, vs.num_frames, vs.height, vs.width, settings.frame_pick,
                         min_frames=settings.caption.num_frames, what="video")
    timings["decode_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cs = settings.caption
    result = models.captioner.caption(
        vlm_clip.frames, question, temperature=cs.temperature, top_p=cs.top_p, max_new_tokens=cs.max_new_tokens,
        seed=settings.seed, num_frames=cs.num_frames, min_pixels=cs.min_pixels, max_pixels=cs.max_pixels,
        system_prompt=system_prompt, decoding=cs.decoding,
    )
    models.captioner.offload()
    timings["caption_s"] = time.perf_counter() - t0
    if not result.caption.strip():
        raise InputError("the VLM wrote an empty caption; try another seed or rephrase the question")

    t0 = time.perf_counter()
    # one seed for the whole answer: the caption's sampling and the video's initial noise
    frames = models.generator.generate(vdm_clip.frames, result.caption, replace(vs, seed=settings.seed))
    timings["video_s"] = time.perf_counter() - t0
    return Answer(question=question, caption=result.caption, think=result.think, raw=result.raw,
                  frames=frames.float().cpu(), fps=vs.fps, timings=timings)


def save_answer(ans: Answer, out_dir: str | os.PathLike, *, name: str = "answer", record: dict | None = None) -> dict:
    """Write ``<name>.mp4``, ``<name>.txt`` (caption) and ``<name>.json`` (settings, seed, timings).

    Every file is written to a temporary name and renamed, the JSON record last: a run that fails
    leaves no partial file, and a record exists only for a complete answer.
    """
    from .files import atomic_write_text
    from .video import write_video

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    video_path = out / f"{name}.mp4"
    write_video(video_path, ans.frames, ans.fps)
    atomic_write_text(out / f"{name}.txt", ans.caption + "\n")
    full = {"question": ans.question, "caption": ans.caption, "think": ans.think, "raw": ans.raw,
            "video": video_path.name, "fps": ans.fps, "frames": int(ans.frames.shape[0]),
            "timings": {k: round(v, 3) for k, v in ans.timings.items()}, **(record or {})}
    atomic_write_text(out / f"{name}.json", json.dumps(full, indent=2, ensure_ascii=False) + "\n")
    return full
