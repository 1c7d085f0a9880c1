"""VANS context conditioning for ComfyUI's native Wan2.1 model.

The node VAE-encodes the question's video, keeps ``num_context`` clean latent frames (the engine's
context rule, ``vans.context``) and returns a clone of the native MODEL whose every model call sees
``[context ‖ x]`` along time with one timestep, and returns only the target frames. Core
CLIPTextEncode, KSampler, VAEDecode, CreateVideo and SaveVideo do the rest, so users keep their own
Wan files, samplers and memory settings.

Inside ComfyUI's ``apply_model`` the input ``x`` is the noisy latent in the model's normalised
latent space, the CONST (flow) model returns the denoised ``x0 = x − σ·v``, and ``x0`` of a time
slice is the slice of ``x0``: so prepending clean context frames and dropping them from the output
is exactly the engine's ``VideoGenerator.model_velocity`` expressed as a denoised prediction.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..vans.context import DEFAULT_NUM_CONTEXT, prepend_context, select_context, strip_context
from ..vans.errors import InputError
from .host import engine_call

MAX_SIZE = 16384
WRAPPER_KEY = "vans_context"
WAN21_LATENT_CHANNELS = 16


def latent_frames(length: int) -> int:
    """Wan2.1's VAE maps 4n+1 frames to n+1 latent frames."""
    return (length - 1) // 4 + 1


def check_video_settings(width, height, length, num_context) -> str | None:
    """One message naming the setting and the fix, or None. Unset (linked) values are skipped."""
    for name, value in (("width", width), ("height", height)):
        if value is not None and (not 16 <= value <= MAX_SIZE or value % 16):
            return f"{name}={value}: must be a multiple of 16 between 16 and {MAX_SIZE} (VANS: 640×352)"
    if length is not None and (not 5 <= length <= MAX_SIZE or (length - 1) % 4):
        below, above = max(5, (length - 1) // 4 * 4 + 1), max(5, (length + 2) // 4 * 4 + 1)
        hint = f"use {below}" if below == above else f"use {below} or {above}"
        return f"length={length}: Wan needs 4n+1 frames, at least 5 (VANS: 33); {hint}"
    if length is not None and num_context is not None and not 1 <= num_context <= latent_frames(length):
        return (f"num_context={num_context}: must be between 1 and the {latent_frames(length)} latent frames "
                f"of a {length}-frame clip")
    return None


def context_clip(frames: torch.Tensor, length: int, height: int, width: int) -> torch.Tensor:
    """The VDM's view of the input: ``length`` frames spread evenly over the whole clip, each resized to
    cover height×width and centre-cropped (the engine's rule, so node and CLI see the same pixels)."""
    from ..vans.video import resize_frames, sample_indices

    if frames.ndim != 4 or frames.shape[0] < 1 or frames.shape[-1] < 3:
        raise InputError(f"frames: expected a video as an IMAGE batch [frames, height, width, 3], got shape {tuple(frames.shape)}")
    picked = frames[sample_indices(frames.shape[0], length), :, :, :3]
    return resize_frames(picked, (height, width), resize="crop")


class ContextPrepender:
    """APPLY_MODEL wrapper: prepend clean context latents, run the model, drop them from the output.

    Registered under its own key, so other wrappers (e.g. caching or hooks) still compose with it.
    The context is batch 1 and expands to whatever batch the sampler sends (cond and uncond together).
    """

    def __init__(self, context: torch.Tensor):
        self.context = context
        self._cast: dict[tuple, torch.Tensor] = {}

    @property
    def num_context(self) -> int:
        return self.context.shape[2]

    def _context_like(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self._cast:  # one copy per device/dtype, not one per step
            self._cast = {key: self.context.to(device=x.device, dtype=x.dtype)}
        return self._cast[key]

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        if x.ndim != 5 or x.shape[1] != self.context.shape[1] or x.shape[-2:] != self.context.shape[-2:]:
            raise InputError(
                f"VANS context conditioning: the sampled latent {tuple(x.shape)} does not match the context "
                f"{tuple(self.context.shape)}; feed the KSampler the latent from the same VANS Context Conditioning node"
            )
        full = prepend_context(self._context_like(x), x)
        denoised = executor(full, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        return strip_context(denoised, self.num_context)


class ContextMemory:
    """PREPARE_SAMPLING wrapper: ComfyUI sizes its memory reservation (what it frees and whether it
    loads the model in low-VRAM mode) from the noise shape, but every model call also runs over the
    ``num_context`` prepended frames; estimate with them, or a long answer can run out of memory."""

    def __init__(self, num_context: int):
        self.num_context = num_context

    def __call__(self, executor, model, noise_shape, *args, **kwargs):
        shape = list(noise_shape)
        if len(shape) == 5:
            shape[2] += self.num_context
        return executor(model, shape, *args, **kwargs)


def check_wan21_t2v(model) -> None:
    """Refuse models the context rule was not trained for, with the file kind the user should load."""
    import comfy.model_base

    base = getattr(model, "model", None)
    diffusion = getattr(base, "diffusion_model", None)
    if not isinstance(base, comfy.model_base.WAN21) or diffusion is None:
        raise InputError(
            f"model: expected a Wan2.1 T2V model (Load Diffusion Model with wan2.1_t2v_1.3B_*.safetensors or "
            f"VANS vdm.safetensors), got {type(base).__name__}"
        )
    in_channels = diffusion.patch_embedding.weight.shape[1]
    if in_channels != WAN21_LATENT_CHANNELS or getattr(base, "image_to_video", False):
        raise InputError(
            f"model: this Wan model takes {in_channels} input channels (an image-to-video or other variant); "
            "VANS needs the Wan2.1 text-to-video model (16 channels)"
        )


def encode_context(model, vae, clip: torch.Tensor, num_context: int) -> torch.Tensor:
    """VAE-encode the clip, move it into the model's latent space and keep the context frames."""
    raw = vae.encode(clip)
    if raw.ndim != 5 or raw.shape[1] != WAN21_LATENT_CHANNELS:
        raise InputError(f"vae: expected the Wan2.1 VAE (16 latent channels), got latents of shape {tuple(raw.shape)}")
    normalised = model.model.process_latent_in(raw)
    return select_context(normalised, num_context)


def condition(model, vae, frames, width, height, length, num_context, batch_size):
    """Everything the node does, callable without the node class (tests use it directly)."""
    import comfy.model_management
    import comfy.patcher_extension

    problem = check_video_settings(width, height, length, num_context)
    if problem:
        raise InputError(problem)
    check_wan21_t2v(model)
    with engine_call():
        clip = context_clip(frames, length, height, width)
    context = encode_context(model, vae, clip, num_context)
    patched = model.clone()
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.APPLY_MODEL, ContextPrepender(context)),
                          (comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, ContextMemory(num_context))):
        patched.remove_wrappers_with_key(kind, WRAPPER_KEY)  # conditioning twice replaces, never stacks
        patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    latent = torch.zeros([batch_size, WAN21_LATENT_CHANNELS, latent_frames(length), height // 8, width // 8],
                         device=comfy.model_management.intermediate_device())
    return patched, {"samples": latent}


class VANSContextConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VANSContextConditioning",
            display_name="VANS Context Conditioning",
            category="VANS",
            description=(
                "Conditions a native Wan2.1 T2V model on the input video the VANS way: clean latent frames of the "
                "clip are prepended to every model call and dropped from its output. Feed the model and latent to "
                "KSampler (euler, simple, with ModelSamplingSD3 shift 5 for the paper's sampler)."
            ),
            inputs=[
                io.Model.Input("model", tooltip=(
                    "Wan2.1 T2V 1.3B from the core Load Diffusion Model node: VANS vdm.safetensors or "
                    "wan2.1_t2v_1.3B_*.safetensors in models/diffusion_models")),
                io.Vae.Input("vae", tooltip="Wan2.1 VAE (wan_2.1_vae.safetensors in models/vae) from the core Load VAE node"),
                io.Image.Input("frames", tooltip=(
                    "The question's video as frames (batch = time), e.g. from Get Video Components; `length` "
                    "frames are picked evenly over the whole clip, resized to cover width×height and centre-cropped")),
                io.Int.Input("width", default=640, min=16, max=MAX_SIZE, step=16,
                             tooltip="Width of the answer video in pixels, a multiple of 16 (VANS: 640)"),
                io.Int.Input("height", default=352, min=16, max=MAX_SIZE, step=16,
                             tooltip="Height of the answer video in pixels, a multiple of 16 (VANS: 352)"),
                io.Int.Input("length", default=33, min=5, max=MAX_SIZE, step=4,
                             tooltip="Frames of the context clip and of the answer video, 4n+1 (VANS: 33 = 9 latent frames)"),
                io.Int.Input("num_context", default=DEFAULT_NUM_CONTEXT, min=1, max=1024,
                             tooltip="Latent frames of the input used as context, spread evenly (VANS: 6 of 9)"),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Answer videos sampled at once from the same context (more candidates for Best of N)"),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the VANS context rule; connect to KSampler"),
                io.Latent.Output(display_name="latent", tooltip="Empty answer latent; connect to KSampler's latent_image"),
            ],
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None, length=None, num_context=None):
        return check_video_settings(width, height, length, num_context) or True

    @classmethod
    def execute(cls, model, vae, frames, width, height, length, num_context, batch_size) -> io.NodeOutput:
        patched, latent = condition(model, vae, frames, width, height, length, num_context, batch_size)
        return io.NodeOutput(patched, latent)


NODES = [VANSContextConditioning]
