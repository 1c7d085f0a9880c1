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

Two official details are reproduced here too, so node and engine keep computing the same thing: the clip
is encoded in the official spatial tiles (``vans.wan.tiling``, around ComfyUI's own ``vae.encode``), and
the model sees its timestep rounded to its compute dtype (bf16 on GPU), as the official pipeline and the
engine's default ``timestep_dtype="model"`` do. Decoding is core VAE Decode: ComfyUI's own decode, not the
official tiles (the answer can differ from the official one along the tile seams).
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..vans.context import DEFAULT_NUM_CONTEXT, prepend_context, select_context, strip_context
from ..vans.errors import InputError
from ..vans.video import FRAME_PICKS
from ..vans.wan.tiling import OFFICIAL_TILE_SIZE, OFFICIAL_TILE_STRIDE, tiled_encode
from .host import VansNode, check_inputs, engine_call

MAX_SIZE = 16384
WRAPPER_KEY = "vans_context"
WAN21_LATENT_CHANNELS = 16


def latent_frames(length: int) -> int:
    """Wan2.1's VAE maps 4n+1 frames to n+1 latent frames."""
    return (length - 1) // 4 + 1


def check_video_settings(width, height, length, num_context) -> str | None:
    """One message naming the setting and the fix, or None. Unset values are skipped."""
    for name, value in (("width", width), ("height", height)):
        if value is not None and (not 16 <= value <= MAX_SIZE or value % 16):
            return f"{name}={value}: must be a multiple of 16 between 16 and {MAX_SIZE} (VANS: 640×352)"
    if length is not None and (not 5 <= length <= MAX_SIZE or (length - 1) % 4):
        below, above = max(5, (length - 1) // 4 * 4 + 1), max(5, (length + 2) // 4 * 4 + 1)
        hint = f"use {below}" if below == above else f"use {below} or {above}"
        return f"length={length}: Wan needs 4n+1 frames, at least 5 (VANS: 33); {hint}"
    if length is not None and num_context is not None and not 1 <= num_context <= latent_frames(length):
        fix = (f"lower num_context to {latent_frames(length)} or raise length to {4 * (num_context - 1) + 1}"
               if num_context > 1 else "use at least 1")
        return (f"num_context={num_context}: a {length}-frame clip has {latent_frames(length)} latent frames; "
                f"{fix}")
    return None


def context_clip(frames: torch.Tensor, length: int, height: int, width: int, frame_pick: str = "fps",
                 pick_fps: float = 11.0, fps: float = 0.0) -> torch.Tensor:
    """The VDM's view of the input: ``length`` frames picked by the engine's rule (``vans.video.FramePick``:
    by default the first ``length`` frames at ``pick_fps``, which needs the frames' own rate ``fps``), each
    resized to cover height×width and centre-cropped, so node and CLI see the same frames."""
    from ..vans.video import FramePick, pick_indices, resize_frames

    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[0] < 1 or frames.shape[-1] < 3:
        raise InputError(f"frames: expected a video as an IMAGE batch [frames, height, width, 3], got "
                         f"{tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__}")
    pick = FramePick(frame_pick, pick_fps)
    pick.validate()
    if pick.mode == "fps" and not fps > 0:
        raise InputError("fps: frame_pick 'fps' needs the frame rate of the frames; connect Get Video Components' "
                         "fps output to fps (or pick 'first' or 'spread')")
    picked = frames[pick_indices(frames.shape[0], fps, length, pick), :, :, :3]
    return resize_frames(picked, (height, width), resize="crop")


class ContextPrepender:
    """APPLY_MODEL wrapper: prepend clean context latents, run the model, drop them from the output.

    Registered under its own key, so other wrappers (e.g. caching or hooks) still compose with it.
    The context is batch 1 and expands to whatever batch the sampler sends (cond and uncond together).

    ``timestep_dtype`` (the model's compute dtype): the model is called with σ rounded so that its
    timestep 1000·σ is a value of that dtype, as the engine's ``model_timestep`` does; the denoised output
    x0 = x − σ_r·v is then re-expressed with the sampler's σ (x0 = x − σ·v), so only the model's input
    changes and the sampler steps with its exact σ.
    """

    def __init__(self, context: torch.Tensor, timestep_dtype: torch.dtype | None = None):
        self.context = context
        self.timestep_dtype = timestep_dtype
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
        t_model = self._model_sigma(t, _timestep_multiplier(executor))
        denoised = executor(full, t_model, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if t_model is not t:  # x0 = x − σ·v with v = (x − x0_r) / σ_r
            ratio = torch.where(t_model == 0, torch.ones_like(t), t / t_model).view(-1, 1, 1, 1, 1)
            denoised = full - (full - denoised) * ratio.to(denoised.dtype)
        return strip_context(denoised, self.num_context)

    def _model_sigma(self, t: torch.Tensor, multiplier: float) -> torch.Tensor:
        """σ whose timestep multiplier·σ is rounded to the compute dtype (``t`` itself when that changes nothing)."""
        if self.timestep_dtype is None or self.timestep_dtype == torch.float32 or not torch.is_tensor(t):
            return t
        # ComfyUI multiplies back in fp32: the model sees the rounded timestep to within one fp32 ulp
        sigma = (t.float() * multiplier).to(self.timestep_dtype).float() / multiplier
        return t if torch.equal(sigma, t.float()) else sigma.to(t.dtype)


def _timestep_multiplier(executor) -> float:
    """ComfyUI's timestep = multiplier·σ (1000 for Wan's flow model sampling), read from the model when known."""
    sampling = getattr(getattr(executor, "class_obj", None), "model_sampling", None)
    return float(getattr(sampling, "multiplier", 1000.0))


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
    """VAE-encode the clip in the official tiles (each tile by ComfyUI's ``vae.encode``, moved into the
    model's latent space as the official code normalises each tile), blend, keep the context frames."""

    def encode_tile(pixels: torch.Tensor) -> torch.Tensor:
        raw = vae.encode(pixels)
        if raw.ndim != 5 or raw.shape[1] != WAN21_LATENT_CHANNELS:
            raise InputError(f"vae: expected the Wan2.1 VAE (16 latent channels), got latents of shape {tuple(raw.shape)}")
        return model.model.process_latent_in(raw)

    normalised = tiled_encode(encode_tile, clip, OFFICIAL_TILE_SIZE, OFFICIAL_TILE_STRIDE, channels_last=True)
    return select_context(normalised, num_context)


def compute_dtype(model) -> torch.dtype | None:
    """The dtype ComfyUI runs the diffusion model in (``BaseModel._apply_model``: the manual-cast dtype if
    any, else the weights' dtype)."""
    base = getattr(model, "model", None)
    dtype = getattr(base, "manual_cast_dtype", None)
    if dtype is None and hasattr(base, "get_dtype"):
        dtype = base.get_dtype()
    return dtype if isinstance(dtype, torch.dtype) else None


def condition(model, vae, frames, width, height, length, num_context, batch_size, frame_pick="fps",
              pick_fps=11.0, fps=0.0):
    """Everything the node does, callable without the node class (tests use it directly)."""
    problem = check_video_settings(width, height, length, num_context)
    if problem:
        raise InputError(problem)
    import comfy.model_management
    import comfy.patcher_extension

    check_wan21_t2v(model)
    with engine_call():
        clip = context_clip(frames, length, height, width, frame_pick, pick_fps, fps)
    context = encode_context(model, vae, clip, num_context)
    patched = model.clone()
    prepender = ContextPrepender(context, compute_dtype(model))
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.APPLY_MODEL, prepender),
                          (comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, ContextMemory(num_context))):
        patched.remove_wrappers_with_key(kind, WRAPPER_KEY)  # conditioning twice replaces, never stacks
        patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    latent = torch.zeros([batch_size, WAN21_LATENT_CHANNELS, latent_frames(length), height // 8, width // 8],
                         device=comfy.model_management.intermediate_device())
    return patched, {"samples": latent}


class VANSContextConditioning(VansNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VANSContextConditioning",
            display_name="VANS Context Conditioning",
            category="VANS",
            description=(
                "Conditions a native Wan2.1 T2V model on the input video the VANS way: clean latent frames of the "
                "clip are prepended to every model call and dropped from its output. Feed the model and latent to "
                "KSampler (euler, simple, with ModelSamplingSD3 shift 5 for the paper's sampler). The clip is "
                "encoded in the official VANS tiles; decode the answer with core VAE Decode (ComfyUI's own decode, "
                "not the official tiles)."
            ),
            inputs=[
                io.Model.Input("model", tooltip=(
                    "Wan2.1 T2V 1.3B from the core Load Diffusion Model node: VANS vdm.safetensors or "
                    "wan2.1_t2v_1.3B_*.safetensors in models/diffusion_models")),
                io.Vae.Input("vae", tooltip=(
                    "Wan2.1 VAE (wan_2.1_vae.safetensors in models/vae) from the core Load VAE node; the clip is "
                    "encoded in the official VANS tiles (30×52 latents every 15×26)")),
                io.Image.Input("frames", tooltip=(
                    "The question's video as frames (batch = time), e.g. from Get Video Components; `length` "
                    "frames are picked by frame_pick, resized to cover width×height and centre-cropped")),
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
                io.Combo.Input("frame_pick", options=list(FRAME_PICKS), default="fps", optional=True, tooltip=(
                    "Which frames of the clip the video model sees: fps = the first `length` frames at pick_fps "
                    "(VANS default: 3 s at 11 fps), first = the first `length` frames at the clip's rate, spread = "
                    "`length` frames over the whole clip")),
                io.Float.Input("pick_fps", default=11.0, min=0.1, max=240.0, step=0.1, optional=True,
                               tooltip="Frame rate of frame_pick 'fps' (VANS: 11, the rate of the answer video)"),
                io.Float.Input("fps", default=0.0, min=0.0, max=1000.0, step=0.001, optional=True, tooltip=(
                    "Frame rate of the frames input: connect Get Video Components' fps; needed by frame_pick 'fps'")),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the VANS context rule; connect to KSampler"),
                io.Latent.Output(display_name="latent", tooltip="Empty answer latent; connect to KSampler's latent_image"),
            ],
        )

    @classmethod
    def execute(cls, model, vae, frames, width, height, length, num_context, batch_size, frame_pick=None,
                pick_fps=None, fps=None) -> io.NodeOutput:
        check_inputs(cls, locals())  # then condition() checks how the video settings fit together
        patched, latent = condition(model, vae, frames, width, height, length, num_context, batch_size,
                                    frame_pick or "fps", 11.0 if pick_fps is None else pick_fps, fps or 0.0)
        return io.NodeOutput(patched, latent)


NODES = [VANSContextConditioning]
