"""The VANS captioner: Qwen2.5-VL (transformers) reads 6 frames + a question and writes
``[Think]…[/Think][Ans]caption[/Ans]``.

Read top to bottom it is the algorithm of the official ``agent_mllm.py`` and its patched qwen_vl_utils:

    6 frames, indices round(linspace(0, N−1, 6)) over the clip  (``vlm_frames``)
    → each resized bicubic+antialias to multiples of 28, area in [128·28², 768·28²]  (``smart_resize``)
    → system prompt + [video, question] chat → processor (no second resize) → generate
    → parse [Think] / [Ans]  (``prompts.parse_response``)

Differences from the official code, on purpose:

* KV cache on (``use_cache=True``); the official code turned it off, which only costs time.
* Two decoding modes (``DECODING_MODES``):
  - ``official`` (inference, stage-2 anchor captions): what the official ``generate(do_sample=True,
    temperature=0.7, top_p=0.9, max_new_tokens=1024)`` does. transformers merges those four values into
    the model folder's ``generation_config.json`` and fills what is still unset with its global defaults
    (top-k 50), so every other field of that file stays active. The Qwen2.5-VL-3B-Instruct file has
    changed on the Hub: release-era copies set ``top_k 1, top_p 0.001, temperature 0.1,
    repetition_penalty 1.05``, which makes the official call greedy (captions independent of seed and
    temperature); the current copy sets only ``temperature 1e-06, repetition_penalty 1.05``, so the call
    samples with top-k 50 and the 1.05 penalty. Which copy the authors used is unknown; this mode
    reproduces the official call on whichever folder is loaded, and ``answer.json`` records the result.
  - ``policy`` (GRPO rollouts, several answers per question): softmax(logits / T) truncated by top-p
    and nothing else, the folder's other fields ignored, so the sampled policy is exactly the one whose
    log-probabilities the training forward recomputes.
* Video timing: the official code passes no fps, so the transformers 4.5x processor used its default
  fps 2 and ``second_per_grid_ts`` = temporal_patch 2 / 2 = 1.0 s. transformers 5 derives it from video
  metadata (24 fps when there is none, 0.083 s). We pass 1.0 explicitly to keep the official temporal
  RoPE spacing (``tokens_per_second`` · 1.0 per pair of frames).

GRPO support: ``sample_group`` draws G completions in one batched ``generate`` (the video is encoded
once and shared) and records each sampled token's log-probability under softmax(logits / T) as it
samples, with O(G·V) memory instead of keeping all logits. ``completion_logprobs`` recomputes the same
quantity in one forward of prompt + completion with the video inputs again (what the trainer
differentiates); for the same weights the two agree (the on-policy check).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .errors import InputError, ModelFileError
from .progress import progress
from .prompts import SYSTEM_PROMPT, ParsedResponse, build_messages, parse_response

log = logging.getLogger("vans")

# Constants of the official patched qwen_vl_utils/vision_process.py.
NUM_FRAMES = 6
FRAME_FACTOR = 2
IMAGE_FACTOR = 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
MAX_ASPECT_RATIO = 200
SECONDS_PER_GRID = 1.0  # see the module docstring
DECODING_MODES = ("official", "policy")  # see the module docstring

EXPECTED_FILES = ("config.json", "model.safetensors (or model-0000X-of-0000N.safetensors + model.safetensors.index.json)",
                  "tokenizer.json (or vocab.json + merges.txt)", "tokenizer_config.json", "preprocessor_config.json")

# Keep each log-prob chunk's float32 logits near this many bytes (Qwen vocab 151,936 × G 8 → ~220 tokens).
_LOGPROB_CHUNK_BYTES = 1 << 30


# ----------------------------------------------------------------------------------------------------
# Frames


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = VIDEO_MIN_PIXELS,
                 max_pixels: int = VIDEO_MAX_PIXELS) -> tuple[int, int]:
    """Height and width that are multiples of ``factor``, keep the aspect ratio and have an area in
    [min_pixels, max_pixels]: rounded to the nearest multiple, then scaled down (floor) or up (ceil)
    by the same factor on both sides when the area falls outside the range."""
    if height < 1 or width < 1:
        raise InputError(f"video frames are {height}×{width} pixels; they must be at least 1×1")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(f"video frames are {height}×{width}, an aspect ratio above {MAX_ASPECT_RATIO}:1; crop the video")
    if min_pixels > max_pixels:
        raise InputError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels}); swap or lower them")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def frame_indices(total: int, num_frames: int = NUM_FRAMES) -> list[int]:
    """The VLM's frames: the engine's even-spread rule (``vans.video.sample_indices``), first and last
    frame always. A clip shorter than ``num_frames`` repeats frames to keep ``num_frames``; qwen-vl-utils 0.0.14
    with the VANS constants would read fewer (2 frames of a 2–3-frame clip, 4 of a 4–5-frame one)."""
    from .video import sample_indices

    return sample_indices(total, num_frames)


def check_frames(frames: torch.Tensor, what: str = "video") -> torch.Tensor:
    """A float32 [T, H, W, 3] tensor in 0..1 (uint8 input is scaled), or ``InputError`` naming the problem."""
    if not isinstance(frames, torch.Tensor):
        raise InputError(f"{what} must be a [frames, height, width, 3] tensor, got {type(frames).__name__}")
    if frames.ndim == 3:
        frames = frames.unsqueeze(0)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"{what} has shape {list(frames.shape)}; expected [frames, height, width, 3] RGB")
    if frames.shape[0] == 0:
        raise InputError(f"{what} has no frames; pick a video that decodes to at least one frame")
    if frames.dtype == torch.uint8:
        return frames.float() / 255.0
    if not frames.is_floating_point():
        raise InputError(f"{what} has dtype {frames.dtype}; expected float 0..1 or uint8")
    frames = frames.float()
    if not bool(torch.isfinite(frames).all()):
        raise InputError(f"{what} contains NaN or infinite pixel values; re-decode the video")
    return frames


def vlm_frames(frames: torch.Tensor, num_frames: int = NUM_FRAMES, min_pixels: int = VIDEO_MIN_PIXELS,
               max_pixels: int = VIDEO_MAX_PIXELS, factor: int = IMAGE_FACTOR) -> torch.Tensor:
    """The frames the VLM sees: ``num_frames`` picked over the whole clip, resized (bicubic, antialias)
    to ``smart_resize`` size. [T, H, W, 3] 0..1 in, [num_frames, H', W', 3] float32 0..1 out."""
    if num_frames < FRAME_FACTOR or num_frames % FRAME_FACTOR:
        raise InputError(f"num_frames is {num_frames}; use an even number of at least {FRAME_FACTOR} (VANS uses 6)")
    frames = check_frames(frames)
    picked = frames.index_select(0, torch.tensor(frame_indices(frames.shape[0], num_frames), device=frames.device))
    height, width = picked.shape[1:3]
    new_h, new_w = smart_resize(height, width, factor, min_pixels, max_pixels)
    chw = picked.permute(0, 3, 1, 2)
    if (new_h, new_w) != (height, width):
        chw = torch.nn.functional.interpolate(chw, size=(new_h, new_w), mode="bicubic", antialias=True,
                                              align_corners=False).clamp_(0.0, 1.0)
    return chw.permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------------------------------
# Results


@dataclass
class CaptionResult:
    think: str
    caption: str
    raw: str
    num_tokens: int  # generated tokens, the end token included
    seconds: float


@dataclass
class PromptInputs:
    """One tokenized prompt with its video, as the processor made it (batch of 1)."""

    text: str
    tensors: dict[str, torch.Tensor]  # input_ids, attention_mask, mm_token_type_ids, pixel_values_videos,
    # video_grid_thw, second_per_grid_ts

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tensors["input_ids"]

    @property
    def length(self) -> int:
        return int(self.tensors["input_ids"].shape[1])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PromptInputs":
        """Move to ``device``; pixel values also take ``dtype`` (the vision tower's)."""
        moved = {}
        for key, value in self.tensors.items():
            if key == "pixel_values_videos" and dtype is not None:
                moved[key] = value.to(device=device, dtype=dtype)
            else:
                moved[key] = value.to(device)
        return PromptInputs(self.text, moved)


@dataclass
class GroupSample:
    """G completions of one prompt and what the GRPO trainer needs to score and recompute them.

    ``attention_mask`` marks the generated tokens up to and including the first end token (im_end or
    endoftext); what follows is padding. ``action_mask`` marks the tokens that count as actions: by
    default the same, i.e. the end token is an action too (as in TRL), so the policy also learns where
    to stop. The official ``generate_grpo_samples`` excluded it; ``include_eos=False`` reproduces that.
    ``logprobs`` are log softmax(logits / temperature) of the sampled tokens at sampling time, 0 on padding.
    """

    prompt: PromptInputs
    completion_ids: torch.Tensor  # [G, L] int64
    attention_mask: torch.Tensor  # [G, L] int64
    action_mask: torch.Tensor  # [G, L] bool
    logprobs: torch.Tensor  # [G, L] float32
    texts: list[str]
    responses: list[ParsedResponse]
    temperature: float
    top_p: float
    seconds: float = 0.0
    lengths: list[int] = field(default_factory=list)  # tokens per completion, end token included

    @property
    def group_size(self) -> int:
        return int(self.completion_ids.shape[0])


# ----------------------------------------------------------------------------------------------------
# Generation helpers


def _sampling_processors(temperature: float, top_p: float, recorder):
    """[log-prob recorder, temperature, top-p] in that order: the recorder sees the raw logits."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    processors = [recorder]
    if temperature > 0 and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if temperature > 0 and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList(processors)


class _SampledTokenLogProbs:
    """Logits processor that bans the vision placeholder tokens and records log softmax(logits / T) of
    each sampled token.

    Banning: a generated ``<|video_pad|>``/``<|image_pad|>`` would be taken for a slot of video features
    when the completion is fed back (``completion_logprobs``) and break that forward, so those ids get
    −inf before sampling, and the recomputation applies the same ban. A trained model gives them ~0 mass.

    Recording: at step k the processor sees the ids so far, whose last entry is the token drawn at step
    k − 1, and the logits of step k. It keeps only the previous step's log-probs ([G, V]), gathers the
    drawn token from them, and ``finish`` fills in the final step after ``generate`` returns.
    """

    def __init__(self, num_sequences: int, max_new_tokens: int, temperature: float, device: torch.device,
                 banned_ids: torch.Tensor):
        self.temperature = temperature if temperature > 0 else 1.0
        self.banned_ids = banned_ids.to(device)
        self.values = torch.zeros(num_sequences, max_new_tokens, dtype=torch.float32, device=device)
        self.previous: torch.Tensor | None = None
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None and self.steps - 1 < self.values.shape[1]:
            self.values[:, self.steps - 1] = self.previous.gather(1, input_ids[:, -1:]).squeeze(1)
        scores = scores.index_fill(-1, self.banned_ids, float("-inf"))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.steps += 1
        return scores

    def finish(self, completion_ids: torch.Tensor) -> torch.Tensor:
        length = completion_ids.shape[1]
        if self.previous is not None and self.steps == length and length > 0:
            self.values[:, length - 1] = self.previous.gather(1, completion_ids[:, -1:]).squeeze(1)
        self.previous = None
        return self.values[:, :length]


class _ProgressPerToken:
    """Stopping criterion that never stops: it ticks the progress bar once per generated token, and the
    bar raises ``Cancelled`` when the host asks, which aborts ``generate`` between two tokens."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        self.bar.update()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the CPU (and this CUDA device's) generator for the block, then restore the caller's RNG state."""
    if seed is None:
        yield
        return
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Sample from the policy without dropout (LoRA dropout is a training-time regulariser), then restore."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _completion_masks(completion_ids: torch.Tensor, eos_ids: torch.Tensor, include_eos: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attention [G, L] long, action [G, L] bool, length [G]) from the first end token of each row.
    Positions, not ids, decide: the pad id is also an end id (endoftext), so pads cannot be told apart by id."""
    length = completion_ids.shape[1]
    is_eos = torch.isin(completion_ids, eos_ids)
    positions = torch.arange(length, device=completion_ids.device).expand_as(completion_ids)
    first_eos = torch.where(is_eos, positions, torch.full_like(positions, length)).min(dim=1).values
    valid = positions <= first_eos[:, None]
    lengths = torch.minimum(first_eos + 1, torch.full_like(first_eos, length))
    action = valid if include_eos else valid & (positions != first_eos[:, None])
    return valid.long(), action, lengths


def _token_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor, temperature: float,
                    banned_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(lm_head(h) / T)[target] in float32 with ``banned_ids`` at −inf (as when sampling), in
    sequence chunks so the [G, L, V] logits never exist at once; with grad each chunk is checkpointed
    (its logits are recomputed in backward)."""
    from torch.utils.checkpoint import checkpoint

    groups, length = targets.shape
    vocab = lm_head.weight.shape[0]
    chunk = max(1, _LOGPROB_CHUNK_BYTES // max(1, groups * vocab * 4))

    def chunk_logprobs(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = (lm_head(h).float() / temperature).index_fill(-1, banned_ids, float("-inf"))
        return logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    pieces = []
    for start in range(0, length, chunk):
        h, t = hidden[:, start:start + chunk], targets[:, start:start + chunk]
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in lm_head.parameters())):
            pieces.append(checkpoint(chunk_logprobs, h, t, use_reentrant=False))
        else:
            pieces.append(chunk_logprobs(h, t))
    return torch.cat(pieces, dim=1)


def _global_generation_defaults() -> dict:
    """What ``generate`` puts in the fields a generation config leaves unset (transformers' global defaults)."""
    from transformers import GenerationConfig

    getter = getattr(GenerationConfig, "_get_default_generation_params", None)
    if getter is not None:
        return dict(getter())
    return {"top_k": 50, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0}


def _check_decoding(decoding: str) -> None:
    if decoding not in DECODING_MODES:
        raise InputError(f"decoding={decoding!r}: use official (the authors' inference: the model folder's "
                         "generation_config.json with temperature/top-p/max tokens set) or policy (plain "
                         "temperature + top-p sampling, as GRPO rollouts)")


def _check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise InputError(f"temperature is {temperature}; use 0 (greedy) or a positive value such as 0.7")
    if not (0 < top_p <= 1):
        raise InputError(f"top_p is {top_p}; use a value in (0, 1], e.g. 0.9")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens is {max_new_tokens}; use at least 1 (VANS uses 1024)")


# ----------------------------------------------------------------------------------------------------
# The captioner


class Captioner:
    """A loaded Qwen2.5-VL with its processor. ``device`` is where it computes; ``offload()`` parks the
    weights on the CPU and the next call moves them back."""

    def __init__(self, model, processor, *, device: torch.device, dtype: torch.dtype, folder: Path | None = None,
                 checkpoint_report=None, release_generation_config=None):
        self.model = model
        # the folder's generation config as transformers loads it (the base of "official" decoding)
        self.release_generation_config = release_generation_config
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.folder = folder
        self.checkpoint_report = checkpoint_report
        tokenizer = processor.tokenizer
        vocab = tokenizer.get_vocab()
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else vocab.get("<|endoftext|>")
        eos = {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
        config_eos = getattr(model.generation_config, "eos_token_id", None) or []
        eos.update([config_eos] if isinstance(config_eos, int) else config_eos)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        placeholders = {getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None)}
        self.banned_ids = torch.tensor(sorted(i for i in placeholders if i is not None), dtype=torch.long)
        video = processor.video_processor
        self.factor = int(video.patch_size * video.merge_size)

    # -- placement ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @device.setter
    def device(self, device: torch.device | str) -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self._device = device

    def to(self, device: torch.device | str) -> "Captioner":
        self.device = device
        self.model.to(self.device)
        return self

    def offload(self) -> "Captioner":
        """Move the weights to the CPU (``device`` stays the compute device for the next call)."""
        self.model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self

    def _on_device(self) -> None:
        if next(self.model.parameters()).device != self.device:
            self.model.to(self.device)

    @property
    def _vision_dtype(self) -> torch.dtype:
        return next(self.model.model.visual.parameters()).dtype

    # -- prompt ------------------------------------------------------------------------------------

    def prepare(self, frames: torch.Tensor, question: str, *, num_frames: int = NUM_FRAMES,
                min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                system_prompt: str = SYSTEM_PROMPT) -> PromptInputs:
        """Question + frames -> tokenized prompt with the video's pixel patches (on the CPU)."""
        from .prompts import SYSTEM_PROMPTS

        # a name ("official", "paper") or the text itself
        messages = build_messages(question, system_prompt=SYSTEM_PROMPTS.get(system_prompt, system_prompt))
        clip = vlm_frames(frames, num_frames, min_pixels, max_pixels, self.factor)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        video_kwargs = {"do_resize": False, "do_rescale": False, "do_sample_frames": False}
        if hasattr(self.processor.video_processor, "cap_pixels_per_frame"):
            video_kwargs["cap_pixels_per_frame"] = False  # sizes are final already; also silences a warning
        batch = self.processor(text=[text], videos=[clip.permute(0, 3, 1, 2).cpu()], return_tensors="pt",
                               videos_kwargs=video_kwargs)
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        tensors["second_per_grid_ts"] = torch.full((tensors["video_grid_thw"].shape[0],), SECONDS_PER_GRID)
        return PromptInputs(text, tensors)

    # -- sampling ----------------------------------------------------------------------------------

    def is_deterministic(self, decoding: str, temperature: float) -> bool:
        """True when every draw gives the same text: greedy decoding, or "official" decoding over a folder
        config with ``top_k=1`` (the Qwen2.5-VL-3B-Instruct release)."""
        _check_decoding(decoding)
        if temperature <= 0:
            return True
        if decoding != "official":
            return False
        config = self._official_config(temperature=temperature, top_p=1.0, max_new_tokens=1, num_sequences=1)
        config.update(**_global_generation_defaults(), defaults_only=True)
        return config.top_k == 1

    def decoding_summary(self, decoding: str, temperature: float, top_p: float) -> dict:
        """The sampling fields that really apply in ``decoding`` mode, for output records."""
        _check_decoding(decoding)
        if decoding == "policy":
            fields = {"do_sample": temperature > 0, "temperature": temperature, "top_p": top_p, "top_k": None,
                      "repetition_penalty": 1.0}
        else:
            config = self._official_config(temperature=temperature, top_p=top_p, max_new_tokens=1, num_sequences=1)
            config.update(**_global_generation_defaults(), defaults_only=True)  # what generate() fills in
            fields = {k: getattr(config, k, None) for k in ("do_sample", "temperature", "top_p", "top_k",
                                                            "repetition_penalty")}
        return {"mode": decoding, **fields, "deterministic": self.is_deterministic(decoding, temperature)}

    def _official_base(self):
        from transformers import GenerationConfig

        if self.release_generation_config is not None:
            return self.release_generation_config
        return GenerationConfig.from_model_config(self.model.config)

    def _official_config(self, *, temperature: float, top_p: float, max_new_tokens: int, num_sequences: int):
        """The folder's generation config with the official call's four overrides, as ``generate(**kwargs)``
        merges them (temperature 0 is our greedy extension)."""
        import copy

        config = copy.deepcopy(self._official_base())
        if temperature > 0:
            config.update(do_sample=True, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        else:
            config.update(do_sample=False, max_new_tokens=max_new_tokens)
        config.update(num_return_sequences=num_sequences, use_cache=True, return_dict_in_generate=False)
        if config.pad_token_id is None:
            config.pad_token_id = self.pad_token_id
        return config

    @torch.no_grad()
    def _generate(self, prompt: PromptInputs, *, num_sequences: int, temperature: float, top_p: float,
                  max_new_tokens: int, seed: int | None, desc: str, decoding: str = "policy"
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(completion ids [G, L], sampling log-probs [G, L] in "policy" mode, else None) for
        ``num_sequences`` draws from one prompt."""
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        _check_decoding(decoding)
        self._on_device()
        inputs = prompt.to(self.device, self._vision_dtype)
        recorder = None
        if decoding == "official":  # generate() fills the fields still unset with transformers' defaults
            config = self._official_config(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                           num_sequences=num_sequences)
            processors = LogitsProcessorList()
        else:
            recorder = _SampledTokenLogProbs(num_sequences, max_new_tokens, temperature, self.device, self.banned_ids)
            config = GenerationConfig(
                do_sample=temperature > 0, temperature=1.0, top_p=1.0, top_k=0, min_p=None, typical_p=1.0,
                repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1, max_new_tokens=max_new_tokens,
                num_return_sequences=num_sequences, eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id,
                use_cache=True, return_dict_in_generate=False,
            )
            processors = _sampling_processors(temperature, top_p, recorder)
        with progress(max_new_tokens, desc) as bar, _seeded(seed, self.device), _eval_mode(self.model):
            sequences = self.model.generate(
                **inputs.tensors, generation_config=config, logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([_ProgressPerToken(bar)]),
            )
        completion = sequences[:, prompt.length:]
        return completion, (recorder.finish(completion) if recorder is not None else None)

    def _decode(self, completion: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        rows = [ids[:n] for ids, n in zip(completion.tolist(), lengths.tolist())]
        return self.processor.tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def caption(self, frames: torch.Tensor, question: str, *, temperature: float = 0.7, top_p: float = 0.9,
                max_new_tokens: int = 1024, seed: int | None = 0, num_frames: int = NUM_FRAMES,
                min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                system_prompt: str = SYSTEM_PROMPT, decoding: str = "official") -> CaptionResult:
        """Reason about the clip and describe the next event. Same seed, same inputs -> same caption.
        ``decoding`` is "official" (the authors' inference) or "policy" (see the module docstring);
        ``temperature=0`` decodes greedily; ``seed=None`` draws from the global RNG."""
        start = time.perf_counter()
        _check_sampling(temperature, top_p, max_new_tokens)
        prompt = self.prepare(frames, question, num_frames=num_frames, min_pixels=min_pixels, max_pixels=max_pixels,
                              system_prompt=system_prompt)
        completion, _ = self._generate(prompt, num_sequences=1, temperature=temperature, top_p=top_p,
                                       max_new_tokens=max_new_tokens, seed=seed, desc="VLM caption",
                                       decoding=decoding)
        eos = torch.tensor(self.eos_token_ids, device=completion.device)
        _, _, lengths = _completion_masks(completion, eos, include_eos=True)
        text = self._decode(completion, lengths)[0]
        parsed = parse_response(text)
        return CaptionResult(think=parsed.think, caption=parsed.caption, raw=text, num_tokens=int(lengths[0]),
                             seconds=time.perf_counter() - start)

    def sample_group(self, frames: torch.Tensor, question: str, group_size: int = 8, *, temperature: float = 0.7,
                     top_p: float = 0.9, max_new_tokens: int = 256, seed: int | None = None,
                     num_frames: int = NUM_FRAMES, min_pixels: int = VIDEO_MIN_PIXELS,
                     max_pixels: int = VIDEO_MAX_PIXELS, include_eos: bool = True,
                     system_prompt: str = SYSTEM_PROMPT) -> GroupSample:
        """G completions of one (video, question) in one batched ``generate`` (GRPO rollout).

        ``max_new_tokens`` defaults to 256, the official ``generate_grpo_samples`` limit.
        """
        if group_size < 1:
            raise InputError(f"group_size is {group_size}; use at least 1 (VANS uses 8)")
        if temperature <= 0:
            raise InputError("temperature must be positive for GRPO sampling (greedy draws G identical captions)")
        _check_sampling(temperature, top_p, max_new_tokens)
        start = time.perf_counter()
        prompt = self.prepare(frames, question, num_frames=num_frames, min_pixels=min_pixels, max_pixels=max_pixels,
                              system_prompt=system_prompt)
        completion, logprobs = self._generate(prompt, num_sequences=group_size, temperature=temperature, top_p=top_p,
                                              max_new_tokens=max_new_tokens, seed=seed, desc="VLM rollouts",
                                              decoding="policy")
        eos = torch.tensor(self.eos_token_ids, device=completion.device)
        attention, action, lengths = _completion_masks(completion, eos, include_eos)
        texts = self._decode(completion, lengths)
        return GroupSample(
            prompt=prompt.to(self.device, self._vision_dtype), completion_ids=completion, attention_mask=attention,
            action_mask=action, logprobs=logprobs.masked_fill(attention == 0, 0.0), texts=texts,
            responses=[parse_response(t) for t in texts], temperature=temperature, top_p=top_p,
            seconds=time.perf_counter() - start, lengths=lengths.tolist(),
        )

    # -- training forward --------------------------------------------------------------------------

    def completion_logprobs(self, group: GroupSample, *, temperature: float | None = None) -> torch.Tensor:
        """log softmax(logits / T) of every completion token, [G, L] float32 (0 on padding), from one
        forward of prompt + completion with the video inputs. Differentiable when grad is enabled; the
        video is encoded once and its features shared by the G rows."""
        temperature = group.temperature if temperature is None else temperature
        if temperature <= 0:
            raise InputError(f"temperature is {temperature}; log-probabilities need the positive sampling temperature")
        self._on_device()
        prompt = group.prompt.to(self.device, self._vision_dtype).tensors
        completion = group.completion_ids.to(self.device)
        attention = group.attention_mask.to(self.device)
        groups, length = completion.shape
        prompt_len = prompt["input_ids"].shape[1]

        input_ids = torch.cat([prompt["input_ids"].expand(groups, -1), completion], dim=1)
        attention_mask = torch.cat([prompt["attention_mask"].expand(groups, -1), attention], dim=1)
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                      video_grid_thw=prompt["video_grid_thw"].repeat(groups, 1),
                      second_per_grid_ts=prompt["second_per_grid_ts"].repeat(groups))
        if "mm_token_type_ids" in prompt:
            kwargs["mm_token_type_ids"] = torch.cat(
                [prompt["mm_token_type_ids"].expand(groups, -1), torch.zeros_like(completion, dtype=prompt["mm_token_type_ids"].dtype)], dim=1)
        kwargs.update(self._shared_video_inputs(prompt, groups))

        hidden = self.model.model(**kwargs).last_hidden_state
        # Logits at position p predict token p + 1: completion token i comes from position prompt_len − 1 + i.
        hidden = hidden[:, prompt_len - 1: prompt_len - 1 + length]
        logprobs = _token_logprobs(hidden, self.model.lm_head, completion, temperature, self.banned_ids.to(self.device))
        return logprobs.masked_fill(attention == 0, 0.0)

    def _shared_video_inputs(self, prompt: dict[str, torch.Tensor], groups: int) -> dict:
        """Encode the prompt's video once and hand the same features to all G rows when the model accepts
        pre-computed features (transformers 5); otherwise repeat the pixels."""
        import inspect

        inner = self.model.model
        if "mm_encoder_outputs" in inspect.signature(inner.forward).parameters:
            features = inner.get_video_features(prompt["pixel_values_videos"], prompt["video_grid_thw"], return_dict=True)
            features.pooler_output = tuple(features.pooler_output) * groups
            return {"mm_encoder_outputs": {"video": features}}
        return {"pixel_values_videos": prompt["pixel_values_videos"].repeat(groups, 1)}


# ----------------------------------------------------------------------------------------------------
# Loading


def _check_folder(folder: Path) -> dict:
    """Config of a Qwen2.5-VL folder, or ``ModelFileError`` listing what is missing or wrong."""
    expected = ", ".join(EXPECTED_FILES)
    if not folder.is_dir():
        raise ModelFileError(
            f"Qwen2.5-VL folder not found: {folder}; download Qwen2.5-VL-3B-Instruct into it (expected files: {expected})")
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    has_tokenizer = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    missing = [name for name, ok in (
        ("config.json", (folder / "config.json").is_file()),
        ("model.safetensors or model.safetensors.index.json", has_weights),
        ("tokenizer.json or vocab.json + merges.txt", has_tokenizer),
        ("tokenizer_config.json", (folder / "tokenizer_config.json").is_file()),
        ("preprocessor_config.json", (folder / "preprocessor_config.json").is_file()),
    ) if not ok]
    if missing:
        raise ModelFileError(f"Qwen2.5-VL folder {folder} lacks {', '.join(missing)}; expected files: {expected}")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{folder / 'config.json'} is not valid JSON ({exc}); download it again") from None
    model_type = config.get("model_type")
    if model_type != "qwen2_5_vl":
        raise ModelFileError(
            f"{folder.name} holds a '{model_type}' model; the VANS captioner needs Qwen2.5-VL "
            "(config model_type 'qwen2_5_vl'), e.g. Qwen2.5-VL-3B-Instruct")
    return config


def _neutral_generation_config(model, folder: Path):
    """Only the special-token ids of the folder's generation config; sampling is set per call."""
    from transformers import GenerationConfig

    eos = getattr(model.generation_config, "eos_token_id", None)
    try:
        eos = GenerationConfig.from_pretrained(folder, local_files_only=True).eos_token_id or eos
    except (OSError, ValueError):
        pass
    return GenerationConfig(bos_token_id=getattr(model.generation_config, "bos_token_id", None), eos_token_id=eos,
                            pad_token_id=getattr(model.generation_config, "pad_token_id", None))


def _load_model(folder: Path, dtype: torch.dtype, attn_implementation: str):
    from safetensors import SafetensorError
    from transformers import Qwen2_5_VLForConditionalGeneration

    def load(attn: str):
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, local_files_only=True, dtype=dtype, attn_implementation=attn)

    try:
        try:
            return load(attn_implementation)
        except (ValueError, ImportError) as exc:
            about_attention = "attn" in str(exc).lower() or "attention" in str(exc).lower()
            if attn_implementation == "eager" or not about_attention:
                raise
            log.warning("attention '%s' unavailable (%s); using eager", attn_implementation, exc)
            return load("eager")
    except ModelFileError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ModelFileError(f"could not load Qwen2.5-VL from {folder}: {str(exc).splitlines()[0]}; "
                             "the weight files may be incomplete, download them again") from None


def load_captioner(folder: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                   attn_implementation: str = "sdpa", allow_pickle: bool = False) -> Captioner:
    """Load a Qwen2.5-VL folder (HF layout, local files only) and optionally apply a VANS ``vlm.safetensors``
    or our LoRA export (merged into the weights). dtype defaults to bf16 on CUDA and float32 on CPU."""
    folder = Path(folder)
    _check_folder(folder)  # before the transformers import: a wrong path fails fast

    from transformers import AutoProcessor

    from .lora import load_vlm_checkpoint

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFileError(f"could not load the Qwen2.5-VL processor/tokenizer from {folder}: "
                             f"{str(exc).splitlines()[0]}; check the tokenizer and preprocessor files") from None
    model = _load_model(folder, dtype, attn_implementation)
    model.eval()
    release_generation_config = model.generation_config  # as transformers loaded it from the folder
    model.generation_config = _neutral_generation_config(model, folder)
    report = None
    if checkpoint is not None:
        from .checkpoints import checkpoint_chain

        # an adapter export first applies the checkpoint it was trained on top of (recorded in its metadata)
        for path in checkpoint_chain(checkpoint):
            report = load_vlm_checkpoint(model, path, allow_pickle=allow_pickle)
        if report.shape_mismatched:
            raise ModelFileError(
                f"VANS VLM checkpoint {Path(checkpoint).name} was made for a different model size: "
                f"{report.shape_mismatched[0]}; use the vlm.safetensors for Qwen2.5-VL-3B-Instruct")
    model.to(device)
    return Captioner(model, processor, device=device, dtype=dtype, folder=folder, checkpoint_report=report,
                     release_generation_config=release_generation_config)
