"""Context-conditioned Wan2.1 video generation (the official vans/pipelines/wan_video_new.py and inference.py).

Reads top to bottom as the algorithm: encode the caption and the negative prompt once → encode the
input clip and pick the clean context latents once → denoise (cond and uncond in one batch, the
context prepended at every step and stripped from every prediction) → decode.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from .cache import LRUCache
from .context import DEFAULT_NUM_CONTEXT, prepend_context, select_context, strip_context
from .errors import InputError
from .sampling import SampleResult, VelocityFn, sample_flow

# The English rendering of Wan's default negative prompt, passed literally by the official inference.
WAN_NEGATIVE_PROMPT = (
    "vivid colors, overexposed, static, blurry details, subtitles, style, artwork, painting, frame, "
    "stationary, overall grayish, worst quality, low quality, JPEG compression artifacts, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn face, deformed, disfigured, malformed limbs, fused "
    "fingers, stationary frame, cluttered background, three legs, crowded background people, walking backwards"
)


TIMESTEP_DTYPES = ("model", "fp32")


@dataclass
class GenerationSettings:
    """Defaults of the official inference code (inference.py: 640×352×33, 50 steps, CFG 5, shift 5)."""

    width: int = 640
    height: int = 352
    num_frames: int = 33
    num_context: int = DEFAULT_NUM_CONTEXT
    steps: int = 50
    guidance: float = 5.0
    shift: float = 5.0
    seed: int = 0
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    noise_level: float = 0.0  # 0 = Euler ODE; > 0 = Flow-GRPO SDE
    fps: float = 11.0  # of the saved answer video (official save_video fps)
    # The DiT's timestep (1000·σ): "model" = cast to the DiT's compute dtype before the call (bf16 on GPU:
    # 1000·σ rounded to 8 significant bits, e.g. 997.5 -> 996), as the official pipeline does
    # (KlingAIResearch/VANS vans/pipelines/wan_video_new.py: ``timestep.to(dtype=self.torch_dtype)``);
    # "fp32" = keep it exact. Identical for an fp32 DiT.
    timestep_dtype: str = "model"

    def validate(self) -> None:
        if self.num_frames < 5 or (self.num_frames - 1) % 4:
            raise InputError(f"num_frames={self.num_frames}: Wan needs 4n+1 frames (e.g. 33); pick the nearest such value")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise InputError(f"{name}={value}: must be a multiple of 16 (e.g. 640×352)")
        if self.steps < 1:
            raise InputError(f"steps={self.steps}: must be at least 1")
        if self.timestep_dtype not in TIMESTEP_DTYPES:
            raise InputError(f"timestep_dtype={self.timestep_dtype!r}: must be one of {', '.join(TIMESTEP_DTYPES)}")
        latent_frames = (self.num_frames - 1) // 4 + 1
        if not 1 <= self.num_context <= latent_frames:
            raise InputError(
                f"num_context={self.num_context}: must be between 1 and the {latent_frames} latent frames of "
                f"a {self.num_frames}-frame clip"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class VideoGenerator:
    """Holds the DiT, the umT5 text encoder and the VAE; moves each to the device only while it runs.

    ``offload=True`` keeps models on the CPU between uses, so the text encoder never shares the GPU
    with the DiT (umT5-XXL alone is ~11 GB in fp16).
    """

    def __init__(self, dit, text_encoder, vae, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, offload: bool = False, text_cache_size: int = 256):
        self.dit = dit
        self.text_encoder = text_encoder
        self.vae = vae
        self.device = torch.device(device)
        self.dtype = dtype
        self.offload = offload
        # prompts kept on the device (a training run sees one anchor caption per sample)
        self._text_cache = LRUCache(text_cache_size)
        # every DiT forward made through model_velocity: invocations, and rows (sequences) over all of them
        self.dit_calls = 0
        self.dit_rows = 0

    # -- model placement -------------------------------------------------------------------
    @contextlib.contextmanager
    def _placed(self, model) -> Iterator[None]:
        if self.offload:
            model.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                model.to("cpu")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    # -- 1. text ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """[B, L, D] umT5 embeddings, cached per text (the negative prompt is encoded once per process)."""
        missing = [t for t in dict.fromkeys(texts) if self.cached_text(t) is None]
        embeds = {}
        if missing:
            with self._placed(self.text_encoder):
                embeds = dict(zip(missing, self.text_encoder.encode(missing)))
            for text, emb in embeds.items():
                self.remember_text(text, emb)
        return torch.stack([self.cached_text(t) if t not in embeds else embeds[t].to(self.device, self.dtype)
                            for t in texts])

    def cached_text(self, text: str) -> torch.Tensor | None:
        """The cached embedding of ``text`` (marked as recently used), or None."""
        return self._text_cache.get(text)

    def remember_text(self, text: str, embedding: torch.Tensor) -> None:
        """Cache an embedding computed elsewhere (e.g. loaded from a trainer's disk cache)."""
        self._text_cache.put(text, embedding.to(self.device, self.dtype))

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    # -- 2. context ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_context(self, frames: torch.Tensor, num_context: int = DEFAULT_NUM_CONTEXT) -> torch.Tensor:
        """Input clip [T, H, W, C] (already at the target size) -> clean context latents [1, C, n, h, w]."""
        with self._placed(self.vae):
            latents = self.vae.encode(frames.unsqueeze(0).to(self.device))
        return select_context(latents, num_context).to(self.dtype)

    # -- 3. denoise ------------------------------------------------------------------------
    def model_timestep(self, sigma: torch.Tensor, timestep_dtype: str = "model") -> torch.Tensor:
        """The DiT's timestep 1000·σ as an fp32 value, rounded to the compute dtype for "model"
        (``GenerationSettings.timestep_dtype``)."""
        timestep = (sigma * 1000).to(self.device, torch.float32)
        if timestep_dtype == "model":
            return timestep.to(self.dtype).float()
        if timestep_dtype == "fp32":
            return timestep
        raise InputError(f"timestep_dtype={timestep_dtype!r}: must be one of {', '.join(TIMESTEP_DTYPES)}")

    def model_velocity(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                       text: torch.Tensor, *, timestep_dtype: str = "model") -> torch.Tensor:
        """One DiT call over [context ‖ x] with one timestep, prediction stripped to the target frames.

        This is the single model call shared by inference, rollouts and training (with grad there).
        """
        hidden = prepend_context(context, x.to(self.dtype))
        timestep = self.model_timestep(sigma, timestep_dtype).expand(hidden.shape[0])
        self.dit_calls += 1
        self.dit_rows += hidden.shape[0]
        out = self.dit(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        return strip_context(out, context.shape[2])

    def guided_velocity(self, context: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                        guidance: float, *, timestep_dtype: str = "model", share_uncond: bool = False) -> VelocityFn:
        """v = v_u + g·(v_c − v_u), cond and uncond in ONE batched forward (2B rows).

        ``share_uncond``: when every row of x is the same state and the context and negative prompt are shared
        (batch 1), the unconditional prediction is the same for all rows and is computed once (B + 1 rows): the
        first step of renders of G captions from one shared noise."""

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            c = cond.expand(b, -1, -1) if cond.shape[0] != b else cond
            if uncond is None or guidance == 1.0:
                return self.model_velocity(x, sigma, context, c, timestep_dtype=timestep_dtype)
            if share_uncond and b > 1 and context.shape[0] == 1 and uncond.shape[0] == 1 \
                    and torch.equal(x, x[:1].expand_as(x)):
                v = self.model_velocity(torch.cat([x, x[:1]]), sigma, context, torch.cat([c, uncond]),
                                        timestep_dtype=timestep_dtype)
                v_c, v_u = v[:b], v[b:]
                return v_u + guidance * (v_c - v_u)
            u = uncond.expand(b, -1, -1) if uncond.shape[0] != b else uncond
            v = self.model_velocity(torch.cat([x, x]), sigma, context, torch.cat([c, u]),
                                    timestep_dtype=timestep_dtype)
            v_c, v_u = v.chunk(2)
            return v_u + guidance * (v_c - v_u)

        return velocity

    def initial_noise(self, batch: int, settings: GenerationSettings, seed: int | None = None) -> torch.Tensor:
        """Seeded noise drawn on the CPU (as the official code), so a seed gives the same video on any device."""
        latent_shape = (batch, 16, (settings.num_frames - 1) // 4 + 1, settings.height // 8, settings.width // 8)
        gen = torch.Generator("cpu").manual_seed(settings.seed if seed is None else seed)
        return torch.randn(latent_shape, generator=gen, dtype=torch.float32).to(self.device, self.dtype)

    @torch.no_grad()
    def sample(self, context: torch.Tensor, caption_embeds: torch.Tensor, settings: GenerationSettings, *,
               batch: int = 1, noise: torch.Tensor | None = None, share_uncond: bool = False,
               **sampler_kwargs) -> SampleResult:
        uncond = self.encode_text([settings.negative_prompt]) if settings.guidance != 1.0 else None
        velocity = self.guided_velocity(context, caption_embeds, uncond, settings.guidance,
                                        timestep_dtype=settings.timestep_dtype, share_uncond=share_uncond)
        if noise is None:
            noise = self.initial_noise(batch, settings)
        with self._placed(self.dit):
            return sample_flow(velocity, noise, num_steps=settings.steps, shift=settings.shift,
                               noise_level=settings.noise_level, **sampler_kwargs)

    # -- 4. decode -------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, T, h, w] latents -> [B, T, H, W, C] frames in 0..1."""
        with self._placed(self.vae):
            return self.vae.decode(latents.to(self.device))

    # -- all together ----------------------------------------------------------------------
    def generate(self, frames: torch.Tensor, caption: str, settings: GenerationSettings | None = None) -> torch.Tensor:
        """Input clip [T, H, W, C] at the target size + caption -> answer video [T, H, W, C]."""
        settings = settings or GenerationSettings()
        settings.validate()
        # caption and negative prompt in one pass: the (large) text encoder is placed on the device once
        texts = [caption] + ([settings.negative_prompt] if settings.guidance != 1.0 else [])
        cond = self.encode_text(texts)[:1]
        context = self.encode_context(frames, settings.num_context)
        result = self.sample(context, cond, settings)
        return self.decode(result.latents)[0]
