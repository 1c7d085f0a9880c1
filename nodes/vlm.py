"""The VLM half of VANS: load Qwen2.5-VL (+ VANS LoRA) and write the next-event caption.

The loaded model lives in a ComfyUI ModelPatcher: ComfyUI moves it to the GPU for captioning, may
offload it when the video model needs room, and frees it on "Unload models". The loader's output
(kept by ComfyUI's cache) is the only reference; nothing is cached on the node classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..vans.captioner import DECODING_MODES as DECODING_CHOICES
from ..vans.errors import InputError, ModelFileError
from ..vans.prompts import SYSTEM_PROMPTS
from .display import HIDDEN, output_with_text
from .frames import MIN_VLM_FRAMES, pick_vlm_frames
from .host import (NONE_CHOICE, VLM_FOLDER_KEY, VansNode, check_inputs, engine_call, list_files, list_model_dirs,
                   load_to_device, manage, model_file_errors, offload, resolve_dir, resolve_file, video_folders)

VansVLM = io.Custom("VANS_VLM")

DTYPES = ["auto", "bf16", "fp16", "fp32"]
ATTENTIONS = ["sdpa", "eager", "flash_attention_2"]
PIXELS_PER_TOKEN = 28 * 28
DEFAULT_MIN_PIXELS = 128 * PIXELS_PER_TOKEN
DEFAULT_MAX_PIXELS = 768 * PIXELS_PER_TOKEN
MAX_PIXELS = 16384 * PIXELS_PER_TOKEN
MAX_SEED = 0xFFFFFFFFFFFFFFFF
SYSTEM_PROMPT_CHOICES = tuple(SYSTEM_PROMPTS)
VIDEO_FPS_NOTE = "sampled by the video's own frame rate; the fps widget applies to the frames input only"
# model-weight shards of a Hugging Face folder are not VANS checkpoints
_SHARD_PREFIXES = ("model.safetensors", "model-0", "diffusion_pytorch_model")


@dataclass
class VlmHandle:
    """What flows through a VANS_VLM socket: the engine captioner and the patcher that places it."""

    captioner: object
    patcher: object
    name: str


def vlm_choices() -> list[str]:
    return list_model_dirs(VLM_FOLDER_KEY)


def checkpoint_choices() -> list[str]:
    return [NONE_CHOICE] + list_files(VLM_FOLDER_KEY, (".safetensors",), exclude=_SHARD_PREFIXES)


def pick_dtype(name: str) -> torch.dtype:
    """``auto``: bf16 where the compute device supports it, else fp16 on GPUs, fp32 on the CPU."""
    import comfy.model_management as mm

    if name != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    device = mm.get_torch_device()
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float16


def load_vlm(model: str, checkpoint: str, dtype: str, attention: str) -> VlmHandle:
    from ..vans.captioner import load_captioner

    folder = resolve_dir(VLM_FOLDER_KEY, model)
    if folder is None:
        raise ModelFileError(
            f"model: folder '{model}' not found in models/{VLM_FOLDER_KEY}; put the Qwen2.5-VL-3B-Instruct folder "
            f"(config.json, model*.safetensors, tokenizer files) in ComfyUI/models/{VLM_FOLDER_KEY}/ and refresh"
        )
    checkpoint_path = None
    if checkpoint != NONE_CHOICE:
        checkpoint_path = resolve_file(VLM_FOLDER_KEY, checkpoint)
        if checkpoint_path is None:
            raise ModelFileError(f"checkpoint: '{checkpoint}' not found in models/{VLM_FOLDER_KEY}; "
                                 "refresh the node or pick none")
    with model_file_errors(f"model '{model}'"), engine_call():
        # loaded on the offload device; ComfyUI moves it to the GPU for captioning
        captioner = load_captioner(folder, checkpoint=checkpoint_path, dtype=pick_dtype(dtype),
                                   device=_offload_device(), attn_implementation=attention)
    return VlmHandle(captioner=captioner, patcher=manage(captioner.model), name=model)


def _offload_device() -> torch.device:
    import comfy.model_management as mm

    return mm.unet_offload_device()


class VANSLoadVLM(VansNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VANSLoadVLM",
            display_name="VANS Load VLM",
            category="VANS",
            description="Load Qwen2.5-VL-3B-Instruct from models/LLM, optionally with the VANS vlm.safetensors LoRA merged in.",
            inputs=[
                io.Combo.Input("model", options=vlm_choices(), tooltip=(
                    "A Qwen2.5-VL-3B-Instruct folder (Hugging Face layout) in ComfyUI/models/LLM/ or an LLM: path "
                    "in extra_model_paths.yaml")),
                io.Combo.Input("checkpoint", options=checkpoint_choices(), default=NONE_CHOICE, tooltip=(
                    "VANS vlm.safetensors (the Joint-GRPO LoRA) or a trainer export, from models/LLM/; none = the "
                    "base model")),
                io.Combo.Input("dtype", options=DTYPES, default="auto", tooltip=(
                    "Weight precision; auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU")),
                io.Combo.Input("attention", options=ATTENTIONS, default="sdpa", tooltip=(
                    "Attention kernel; sdpa works everywhere, flash_attention_2 needs the flash-attn package "
                    "(falls back to eager with a log line when unavailable)")),
            ],
            outputs=[VansVLM.Output(display_name="vlm", tooltip="The loaded VLM, for VANS Next-Event Caption")],
        )

    @classmethod
    def execute(cls, model, checkpoint, dtype, attention) -> io.NodeOutput:
        if not vlm_choices():
            raise ModelFileError(f"model: no VLM folder in models/{VLM_FOLDER_KEY}; put the Qwen2.5-VL-3B-Instruct "
                                 "folder there (Hugging Face layout, with config.json) and refresh")
        check_inputs(cls, locals())  # also refuses names outside the listed folders (e.g. "../..")
        return io.NodeOutput(load_vlm(model, checkpoint, dtype, attention))


def check_caption_settings(num_frames: int, min_pixels: int, max_pixels: int) -> None:
    """What the caption node's schema cannot say (its ranges are checked by ``check_inputs``)."""
    if num_frames % 2:
        raise InputError(f"num_frames={num_frames}: use an even number, the VLM reads frames in pairs (VANS: 6)")
    if min_pixels > max_pixels:
        raise InputError(f"min_pixels={min_pixels} is above max_pixels={max_pixels}; lower min_pixels or raise max_pixels")


def caption(vlm: VlmHandle, frames, fps, video, question, num_frames, sample_fps, min_pixels, max_pixels,
            temperature, top_p, max_new_tokens, answers, seed, offload_after, system_prompt="official",
            decoding="official") -> list[tuple[str, str, str]]:
    """(caption, think, raw) per answer. The VLM is placed by ComfyUI for the call and offloaded after
    it when asked, also when the call fails or is cancelled. Several answers in "official" decoding are
    one caption per seed (seed, seed + 1, …); in "policy" decoding one batched group draw."""
    from ..vans.prompts import system_prompt_text

    prompt_text = system_prompt_text(system_prompt)
    folders = video_folders() if video is not None else ()
    with engine_call():  # decoding reports progress and stops on Cancel too
        clip = pick_vlm_frames(frames, fps, video, num_frames, sample_fps, folders)
    captioner = vlm.captioner
    captioner.device = load_to_device(vlm.patcher)
    settings = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                    num_frames=clip.shape[0], min_pixels=min_pixels, max_pixels=max_pixels, system_prompt=prompt_text)
    try:
        with engine_call():
            if answers == 1 or decoding == "official":
                results = [captioner.caption(clip, question, seed=(seed + i) % (MAX_SEED + 1), decoding=decoding, **settings)
                           for i in range(answers)]
                if not any(r.caption.strip() for r in results):
                    raise InputError("the VLM wrote an empty caption; try another seed or rephrase the question")
                return [(r.caption, r.think, r.raw) for r in results]
            group = captioner.sample_group(clip, question, group_size=answers, seed=seed, **settings)
            return [(r.caption, r.think, r.raw) for r in group.responses]
    finally:
        if offload_after:
            offload(vlm.patcher)


class VANSNextEventCaption(VansNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VANSNextEventCaption",
            hidden=HIDDEN,
            is_output_node=True,  # shows its result even when nothing is connected after it
            display_name="VANS Next-Event Caption",
            category="VANS",
            description=(
                "The VLM watches the video, reasons in [Think], and describes what happens next in [Ans]. The "
                "caption goes to CLIP Text Encode for the video model."
            ),
            inputs=[
                VansVLM.Input("vlm", tooltip="From VANS Load VLM"),
                io.Image.Input("frames", optional=True, tooltip=(
                    "The video as frames (batch = time), e.g. from Get Video Components; connect this or video")),
                io.Video.Input("video", optional=True, tooltip=(
                    "A core VIDEO (Load Video); only the frames the VLM sees are decoded; connect this or frames")),
                io.String.Input("question", multiline=True, default="What will happen next?", tooltip=(
                    "What you want to know about the video, e.g. 'What will the chef do next?'")),
                io.Float.Input("fps", default=16.0, min=0.0, max=1000.0, step=0.001, tooltip=(
                    "Frame rate of the frames input (Get Video Components gives it), used only when sample_fps is "
                    "above 0. Not used with the video input: a VIDEO carries its own rate (the node's text then notes it)")),
                io.Int.Input("num_frames", default=6, min=MIN_VLM_FRAMES, max=1024, step=2, tooltip=(
                    "Frames the VLM sees, spread evenly over the whole clip (VANS: 6); the upper limit when "
                    "sample_fps is set; even, since the VLM reads frames in pairs")),
                io.Float.Input("sample_fps", default=0.0, min=0.0, max=60.0, step=0.1, tooltip=(
                    "0 = exactly num_frames frames; above 0 = one frame per 1/sample_fps seconds, at most num_frames")),
                io.Int.Input("min_pixels", default=DEFAULT_MIN_PIXELS, min=PIXELS_PER_TOKEN, max=MAX_PIXELS,
                             step=PIXELS_PER_TOKEN, tooltip="Smallest frame area the VLM reads, in pixels (VANS: 128·28·28)"),
                io.Int.Input("max_pixels", default=DEFAULT_MAX_PIXELS, min=PIXELS_PER_TOKEN, max=MAX_PIXELS,
                             step=PIXELS_PER_TOKEN, tooltip=(
                                 "Largest frame area the VLM reads, in pixels (VANS: 768·28·28); lower it to save VRAM")),
                io.Float.Input("temperature", default=0.7, min=0.0, max=2.0, step=0.01, tooltip=(
                    "Sampling temperature (VANS: 0.7); 0 = greedy, one fixed answer. With decoding 'official' the "
                    "model folder's generation_config.json also applies (a release-era Qwen2.5-VL file sets top_k 1: greedy)")),
                io.Float.Input("top_p", default=0.9, min=0.01, max=1.0, step=0.01, tooltip="Nucleus sampling mass (VANS: 0.9)"),
                io.Int.Input("max_new_tokens", default=1024, min=1, max=8192, tooltip=(
                    "Longest answer in tokens, reasoning included (VANS: 1024)")),
                io.Int.Input("answers", default=1, min=1, max=64, tooltip=(
                    "Captions sampled for the same question; more than 1 gives a list, and every node after it runs "
                    "once per caption (several futures)")),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True, tooltip=(
                    "Random seed; the same seed and inputs give the same caption")),
                io.Boolean.Input("offload", default=True, tooltip=(
                    "Move the VLM off the GPU when done, leaving VRAM to the video model")),
                io.Combo.Input("system_prompt", options=list(SYSTEM_PROMPT_CHOICES), default="official", optional=True,
                               tooltip=(
                    "official: the official code's wording, which the released VANS weights were trained with; "
                    "paper: the paper's App. C.2 wording ('your detailed description')")),
                io.Combo.Input("decoding", options=list(DECODING_CHOICES), default="official", optional=True, tooltip=(
                    "official: the authors' inference (the model folder's generation_config.json with temperature "
                    "and top_p set, e.g. its repetition penalty 1.05; greedy when the file sets top_k 1); policy: plain "
                    "temperature + top-p sampling, as in GRPO training, for diverse answers")),
            ],
            outputs=[
                io.String.Output(display_name="caption", is_output_list=True,
                                 tooltip="The [Ans] text: the next event, to render with the video model"),
                io.String.Output(display_name="think", is_output_list=True, tooltip="The [Think] reasoning"),
                io.String.Output(display_name="raw", is_output_list=True,
                                 tooltip="The whole response, for VANS Format Reward"),
            ],
        )

    @classmethod
    def execute(cls, vlm, question, fps, num_frames, sample_fps, min_pixels, max_pixels, temperature, top_p,
                max_new_tokens, answers, seed, offload, frames=None, video=None, system_prompt=None,
                decoding=None) -> io.NodeOutput:
        check_inputs(cls, locals())
        check_caption_settings(num_frames, min_pixels, max_pixels)
        if not isinstance(vlm, VlmHandle):
            raise InputError("vlm: connect the output of VANS Load VLM")
        # optional, so API prompts saved before these inputs existed still validate: official defaults, but
        # several answers keep the one group draw (policy) they had, which stays diverse under any folder config
        decoding = decoding or ("policy" if answers > 1 else "official")
        results = caption(vlm, frames, fps, video, question, num_frames, sample_fps, min_pixels, max_pixels,
                          temperature, top_p, max_new_tokens, answers, seed, offload, system_prompt or "official",
                          decoding)
        captions, thinks, raws = (list(column) for column in zip(*results))
        shown = "\n\n".join(captions) if len(captions) == 1 else "\n\n".join(f"#{i}: {c}" for i, c in enumerate(captions))
        if video is not None and sample_fps > 0:
            shown += f"\n\n({VIDEO_FPS_NOTE})"
        return output_with_text(cls, shown, captions, thinks, raws)


NODES = [VANSLoadVLM, VANSNextEventCaption]
