"""CLIP-V and CLIP-T scores (the engine's ``vans.clip``, open_clip ViT-B/32) as nodes.

The CLIP model lives in a ComfyUI ModelPatcher like the VLM, so "Unload models" frees it and it
yields VRAM to the video model. Scores are computed per batch of frames with progress, so Cancel
stops a long scoring run between batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..vans.clip import ARCH_CHOICES
from ..vans.errors import InputError, ModelFileError
from .batching import format_scores, split_videos
from .display import HIDDEN, output_with_text
from .host import (REWARD_FOLDER_KEY, VansNode, check_inputs, engine_call, list_files, load_to_device, manage,
                   model_file_errors, resolve_file)

VansCLIP = io.Custom("VANS_CLIP")
CATEGORY = "VANS/rewards"
CLIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class ClipHandle:
    scorer: object
    patcher: object
    name: str


def clip_choices() -> list[str]:
    return list_files(REWARD_FOLDER_KEY, CLIP_SUFFIXES)


def load_clip_model(clip_name: str, allow_pickle: bool, arch: str = "auto") -> ClipHandle:
    import comfy.model_management as mm

    from ..vans.clip import load_clip

    path = resolve_file(REWARD_FOLDER_KEY, clip_name)
    if path is None:
        raise ModelFileError(
            f"clip_name: '{clip_name}' not found in models/{REWARD_FOLDER_KEY}; put clip_vit_b32_openai.safetensors "
            f"(OpenAI's ViT-B/32, open_clip layout) in ComfyUI/models/{REWARD_FOLDER_KEY}/ and refresh"
        )
    with model_file_errors(f"clip_name '{clip_name}'"), engine_call():
        scorer = load_clip(path, arch=arch, device=mm.unet_offload_device(), allow_pickle=allow_pickle)
    return ClipHandle(scorer=scorer, patcher=manage(scorer.model), name=clip_name)


def _placed(handle: ClipHandle):
    """The scorer, with its model where ComfyUI put it and its own small tensors (normalisation
    constants) moved along, so preprocessing runs on the same device."""
    if not isinstance(handle, ClipHandle):
        raise InputError("clip: connect the output of VANS Load CLIP (reward)")
    device = load_to_device(handle.patcher)
    scorer = handle.scorer
    for name, value in vars(scorer).items():
        if isinstance(value, torch.Tensor) and value.device != device:
            setattr(scorer, name, value.to(device))
    scorer.device = device
    return scorer


class VANSLoadCLIP(VansNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VANSLoadCLIP",
            display_name="VANS Load CLIP (reward)",
            category=CATEGORY,
            description="Load the open_clip ViT-B/32 model used for the CLIP-V and CLIP-T rewards.",
            inputs=[
                io.Combo.Input("clip_name", options=clip_choices(), tooltip=(
                    "open_clip ViT-B/32 weights in ComfyUI/models/reward_models/: the paper's is OpenAI's "
                    "(open_clip_model.safetensors of timm/vit_base_patch32_clip_224.openai, saved as "
                    "clip_vit_b32_openai.safetensors)")),
                io.Boolean.Input("allow_pickle", default=False, tooltip=(
                    "Also load .bin/.pt pickle files, which can run code when loaded; only for files you trust")),
                io.Combo.Input("arch", options=list(ARCH_CHOICES), default="auto", optional=True, tooltip=(
                    "Activation, which the weights cannot tell: ViT-B-32-quickgelu for OpenAI weights (the paper's), "
                    "ViT-B-32 for LAION weights; auto reads open_clip_config.json beside the file, then the file "
                    "name (openai / laion), else assumes OpenAI and logs it")),
            ],
            outputs=[VansCLIP.Output(display_name="clip", tooltip="For VANS CLIP-V Score and VANS CLIP-T Score")],
        )

    @classmethod
    def execute(cls, clip_name, allow_pickle, arch=None) -> io.NodeOutput:
        check_inputs(cls, locals())  # also refuses names outside the listed files (e.g. "../..")
        return io.NodeOutput(load_clip_model(clip_name, allow_pickle, arch or "auto"))


def _candidates_input():
    return io.Int.Input("candidates", default=1, min=1, max=1024, tooltip=(
        "How many videos of equal length the video batch holds (e.g. KSampler batch_size); each gets a score"))


class VANSClipVideoScore(VansNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VANSClipVideoScore",
            hidden=HIDDEN,
            is_output_node=True,  # shows its result even when nothing is connected after it
            display_name="VANS CLIP-V Score",
            category=CATEGORY,
            description=(
                "CLIP-V: cosine similarity of CLIP image features between each generated frame and the matching "
                "reference frame, averaged (the reference is resampled evenly to the video's length)."
            ),
            inputs=[
                VansCLIP.Input("clip", tooltip="From VANS Load CLIP"),
                io.Image.Input("video", tooltip="Generated video(s) as frames, e.g. from VAE Decode"),
                io.Image.Input("reference", tooltip="The ground-truth next-event video as frames"),
                _candidates_input(),
            ],
            outputs=[io.Float.Output(display_name="clip_v", is_output_list=True, tooltip="One score per video, -1..1")],
        )

    @classmethod
    def execute(cls, clip, video, reference, candidates) -> io.NodeOutput:
        check_inputs(cls, locals())
        videos = split_videos(video, candidates, what="video")
        with engine_call():
            scores = [float(s) for s in _placed(clip).clip_v_group(videos, reference).tolist()]
        return output_with_text(cls, format_scores("CLIP-V", scores), scores)


class VANSClipTextScore(VansNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VANSClipTextScore",
            hidden=HIDDEN,
            is_output_node=True,  # shows its result even when nothing is connected after it
            display_name="VANS CLIP-T Score",
            category=CATEGORY,
            description="CLIP-T: cosine similarity of CLIP features between each frame and the text, averaged over frames.",
            inputs=[
                VansCLIP.Input("clip", tooltip="From VANS Load CLIP"),
                io.Image.Input("video", tooltip="Generated video(s) as frames, e.g. from VAE Decode"),
                io.String.Input("text", multiline=True, default="", tooltip=(
                    "The caption the video should show, e.g. the caption output of VANS Next-Event Caption")),
                _candidates_input(),
            ],
            outputs=[io.Float.Output(display_name="clip_t", is_output_list=True, tooltip="One score per video, -1..1")],
        )

    @classmethod
    def execute(cls, clip, video, text, candidates) -> io.NodeOutput:
        check_inputs(cls, locals())
        videos = split_videos(video, candidates, what="video")
        with engine_call():
            scores = [float(s) for s in _placed(clip).clip_t_group(videos, text).tolist()]
        return output_with_text(cls, format_scores("CLIP-T", scores), scores)


NODES = [VANSLoadCLIP, VANSClipVideoScore, VANSClipTextScore]
