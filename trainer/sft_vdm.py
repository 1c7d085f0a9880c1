"""VDM SFT: flow-matching fine-tuning of the Wan2.1 DiT with the VANS context rule (VANS App. C.1, §4).

    python -m trainer.sft_vdm --config trainer/configs/sft_vdm.yaml [--set key=value ...] [--resume]
    accelerate launch -m trainer.sft_vdm --config ...        (data parallel, one process per GPU)
    python -m trainer.sft_vdm bench --out DIR [--scale real|tiny] [--device cuda]   (one step, timed)

Paper (App. C.1): all DiT blocks fine-tuned (``model.train_mode=full``), lr 5e-5, 20K steps, conditioned on
the ground-truth caption and 6 clean reference latents of the input clip; LoRA (``train_mode=lora``,
``trainer.dit_lora``) is offered as a cheaper option. Batch size and optimizer are not stated.

One training item (the official ``WanVideoPipeline.training_loss``, KlingAIResearch/VANS
``vans/pipelines/wan_video_new.py``; its scheduler ``vans/schedulers/flow_match.py``):

1. x₀ = VAE latents of the ground-truth next-event clip (all (F − 1)/4 + 1 latent frames); the context =
   ``num_context`` latents of the input clip picked by ``vans.context.select_context``. Both are encoded
   once and cached (``FeatureCache``), as is the umT5 embedding of the caption.
2. A timestep index i is drawn uniformly from [⌊min·1000⌋, ⌊max·1000⌋) of the scheduler's 1000 training
   timesteps (``flow.min_timestep_boundary`` / ``max``; ``torch.randint`` there). The grid is Wan's
   (``FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True)``): σ_i = shift·s_i/(1 + (shift − 1)·s_i),
   s = linspace(1, 0, 1001)[:1000], t_i = 1000·σ_i (``vans.sampling.flow_sigmas``). The official code casts
   t_i to the model dtype (bf16) before the DiT call, and ``add_noise`` / ``training_weight`` then use the
   grid point nearest that rounded value; ``video.timestep_dtype=model`` reproduces this, ``fp32`` keeps t_i.
3. Noise ε only on the target: x_t = (1 − σ)·x₀ + σ·ε; the clean context is prepended along time, the DiT
   sees one timestep for the whole sequence, and the first ``num_context`` frames of its prediction are
   dropped (``VideoGenerator.model_velocity``, the engine's one model call, shared with inference).
4. loss = mean((v̂ − (ε − x₀))²) in fp32 × w(t_i), with the scheduler's training weight
   w_i = (y_i − min y)·1000 / Σ(y − min y), y_i = exp(−2·((t_i − 500)/1000)²) (``set_timesteps(1000,
   training=True)``; DiffSynth 2.1's ``FlowMatchScheduler.set_training_weight`` gives the same on 1000 steps).
   The VANS training loop is not released; its ``training_loss`` draws indices below ``num_train_timesteps`` =
   1000, which exist only after ``set_timesteps(1000, training=True)``, the call DiffSynth's Wan trainer makes.

``run.prompts_per_step`` clips per optimizer step (over all processes); each clip is one forward and its
gradient accumulates. Full fine-tune keeps fp32 master weights (and AdamW state) and computes under bf16
autocast when ``run.dtype`` is bf16/fp16; LoRA keeps the base in the run dtype and fp32 adapters. Clips
with fewer frames than ``video.num_frames`` repeat their last frame (``vans.video.read_clip``, as stage 2).

Validation (``val.every`` steps, at the start of the step: the weights after step − 1 updates): the same
weighted loss on the held-out clips (the dataset's ``split`` column or ``data.heldout_fraction``,
``trainer.data.split_samples``) at ``val.timesteps`` fixed, evenly spaced grid points with noise seeded by
(``val.seed``, clip id, point), so values are comparable across steps and runs; optionally
(``val.ode_steps``) the latent MSE between an Euler ODE sample from fixed noise and the clip's target latents.

Exports (``<out_dir>/export``): the merged DiT in the original Wan key layout (``export.merged_name``, for
ComfyUI's Load Diffusion Model / ``UNETLoader``, ``vans answer --dit`` and ``trainer.stage2 --set dit=``),
in LoRA mode also a ComfyUI LoRA (``LoraLoaderModelOnly``), and ``validation.json`` (final held-out loss).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from vans.errors import InputError, VansError

from . import dit_lora
from .config import HeldoutDataConfig, OptimConfig, RunConfig, doc, section

log = logging.getLogger("vans.trainer")

NUM_TRAIN_TIMESTEPS = 1000  # the official training grid (set_timesteps(1000, training=True))
TIMESTEP_DTYPES = ("model", "fp32")


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class SftVdmRunConfig(RunConfig):
    out_dir: str = doc("runs/sft_vdm", "output folder: checkpoints/, metrics.jsonl, tensorboard/, plots, export/")
    steps: int = doc(20000, "optimizer steps of the whole run (VANS: 20K for the VDM)")
    prompts_per_step: int = doc(1, "clips per optimizer step over all processes (the batch; one forward per clip, "
                                   "gradients accumulate); a multiple of the number of processes")
    save_every: int = doc(500, "write a checkpoint every N steps (and at the end)")


@dataclass
class ModelSection:
    train_mode: str = doc("full", "full (every DiT weight trains, fp32 master weights; VANS: all blocks) or lora "
                                  "(adapters on a frozen base in the run dtype)")
    lora_rank: int = doc(32, "LoRA rank r (train_mode=lora)")
    lora_alpha: float = doc(64.0, "LoRA alpha; the update is scaled by alpha / rank")
    lora_targets: str = doc("attn", "adapted linears in every block: attn, attn+ffn, or suffixes such as "
                                    "attn1.to_q,attn1.to_v")
    gradient_checkpointing: bool = doc(True, "recompute the DiT blocks in the backward pass (less memory, about "
                                             "30% more time)")


@dataclass
class VideoSection:
    width: int = doc(640, "clip width in pixels (multiple of 16; VANS 640)")
    height: int = doc(352, "clip height in pixels (multiple of 16; VANS 352)")
    num_frames: int = doc(33, "frames of the input clip and of the target clip (4n+1; VANS 33)")
    num_context: int = doc(6, "clean context latents taken from the input clip (VANS 6)")
    shift: float = doc(5.0, "flow-matching shift of the training grid and of the validation ODE (Wan: 5)")
    frame_pick: str = doc("fps", "frames of the input and target clips: fps (the first num_frames at pick_fps; "
                                 "VANS default), first (native rate) or spread (whole clip)")
    pick_fps: float = doc(11.0, "frame rate of frame_pick=fps (VANS answers are 11 fps)")
    timestep_dtype: str = doc("model", "model (the DiT's timestep rounded to the compute dtype and the noise level "
                                       "taken at the nearest grid point, as the official code in bf16) or fp32")


@dataclass
class FlowSection:
    min_timestep_boundary: float = doc(0.0, "draw timesteps from this fraction of the 1000-step grid on (0 = pure "
                                            "noise end; official training_loss input)")
    max_timestep_boundary: float = doc(1.0, "... up to (excluding) this fraction (1 = the clean end)")


@dataclass
class ValSection:
    every: int = doc(500, "held-out flow-matching loss every N steps (also at step 1 and, after training, in "
                          "export/validation.json); 0 = off")
    timesteps: int = doc(4, "fixed grid points per held-out clip, evenly spaced over the boundaries")
    max_clips: int = doc(0, "validate on the first N held-out clips (0 = all)")
    seed: int = doc(0, "seed of the fixed validation noise")
    ode_steps: int = doc(0, "also sample each held-out clip with this many Euler ODE steps (no CFG) from fixed "
                            "noise and report val/ode_latent_mse to its target latents (0 = off)")


@dataclass
class ExportSection:
    dtype: str = doc("bf16", "dtype of the exported files: bf16, fp16 or fp32")
    merged_name: str = doc("vdm_sft.safetensors", "merged DiT in the original Wan key layout, for ComfyUI's Load "
                                                  "Diffusion Model, vans answer --dit and trainer.stage2 dit=")
    lora_name: str = doc("vans_sft_vdm_lora.safetensors", "ComfyUI LoRA (train_mode=lora) for core "
                                                          "LoraLoaderModelOnly on the start DiT")


@dataclass
class SftVdmConfig:
    models_dir: str = doc("", "ComfyUI-style models/ folder with the DiT, umT5 and VAE (see vans.models.ROLES)")
    dit: str = doc("", "DiT file to start from (default: found in models_dir, where vdm.safetensors is preferred; "
                       "to start from the base model name it, e.g. .../wan2.1_t2v_1.3B_bf16.safetensors)")
    data: HeldoutDataConfig = section(HeldoutDataConfig, "dataset and held-out split")
    run: SftVdmRunConfig = section(SftVdmRunConfig, "run length, output, checkpoints, device")
    optim: OptimConfig = section(OptimConfig, "optimizer (VANS VDM SFT: lr 5e-5)")
    model: ModelSection = section(ModelSection, "what trains on the DiT")
    video: VideoSection = section(VideoSection, "clip shape, frame pick, schedule")
    flow: FlowSection = section(FlowSection, "timestep draw of the flow-matching loss")
    val: ValSection = section(ValSection, "held-out validation")
    export: ExportSection = section(ExportSection, "files written at the end")

    def validate(self) -> None:
        from vans.generator import GenerationSettings

        from .data import frame_pick

        v, f = self.video, self.flow
        GenerationSettings(width=v.width, height=v.height, num_frames=v.num_frames, num_context=v.num_context,
                           shift=v.shift).validate()
        frame_pick(v, "video")
        if self.model.train_mode not in ("full", "lora"):
            raise InputError(f"model.train_mode={self.model.train_mode!r}: use full or lora")
        if v.timestep_dtype not in TIMESTEP_DTYPES:
            raise InputError(f"video.timestep_dtype={v.timestep_dtype!r}: use one of {', '.join(TIMESTEP_DTYPES)}")
        if not 0.0 <= f.min_timestep_boundary < f.max_timestep_boundary <= 1.0:
            raise InputError(f"flow.min_timestep_boundary={f.min_timestep_boundary}, max_timestep_boundary="
                             f"{f.max_timestep_boundary}: need 0 <= min < max <= 1")
        TrainingSchedule(v.shift).index_range(f.min_timestep_boundary, f.max_timestep_boundary)
        if not 0.0 <= self.data.heldout_fraction < 1.0:
            raise InputError(f"data.heldout_fraction={self.data.heldout_fraction}: use a value in [0, 1)")
        for key in ("every", "timesteps", "max_clips", "ode_steps"):
            if getattr(self.val, key) < 0:
                raise InputError(f"val.{key}={getattr(self.val, key)}: must be 0 or more")
        if self.val.every and self.val.timesteps < 1:
            raise InputError("val.timesteps=0 with val.every > 0: give at least 1 fixed timestep")


# ----------------------------------------------------------------------------------------------------
# The loss


@dataclass(frozen=True)
class TrainTimestep:
    index: int  # grid point of the noise level and weight (after the model-dtype rounding)
    sigma: float  # noise level of x_t
    model_sigma: float  # what the DiT is called with (its timestep is 1000·model_sigma)
    weight: float  # the scheduler's training weight


class TrainingSchedule:
    """The official 1000-point training grid, its weights, the uniform index draw (module docstring, 2 and 4)."""

    def __init__(self, shift: float = 5.0, num: int = NUM_TRAIN_TIMESTEPS):
        from vans.sampling import flow_sigmas

        self.num = num
        self.sigmas = flow_sigmas(num, shift)[:num]  # descending from 1; the final 0 is not a training point
        self.timesteps = self.sigmas * num
        y = torch.exp(-2 * ((self.timesteps - num / 2) / num) ** 2)
        shifted = y - y.min()
        self.weights = shifted * (num / shifted.sum())

    def index_range(self, lo: float, hi: float) -> tuple[int, int]:
        a, b = int(lo * self.num), int(hi * self.num)
        if b <= a:
            raise InputError(f"flow timestep boundaries [{lo}, {hi}) hold no point of the {self.num}-step grid; "
                             "widen them")
        return a, b

    def draw(self, generator: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> int:
        a, b = self.index_range(lo, hi)
        return int(torch.randint(a, b, (1,), generator=generator))

    def fixed(self, count: int, lo: float = 0.0, hi: float = 1.0) -> list[int]:
        """``count`` evenly spaced indices inside the boundaries (the validation points)."""
        a, b = self.index_range(lo, hi)
        return [a + int((k + 0.5) * (b - a) / count) for k in range(count)]

    def at(self, index: int, dtype: torch.dtype = torch.float32) -> TrainTimestep:
        """Grid point ``index`` as the model sees it in ``dtype`` (see the module docstring, 2)."""
        t = self.timesteps[index].to(dtype).float()
        nearest = int(torch.argmin((self.timesteps - t).abs()))
        return TrainTimestep(nearest, float(self.sigmas[nearest]), float(t) / self.num, float(self.weights[nearest]))


def flow_matching_loss(generator, target: torch.Tensor, context: torch.Tensor, text: torch.Tensor,
                       noise: torch.Tensor, t: TrainTimestep, *, timestep_dtype: str = "model"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss, plain MSE) of one clip: noise on ``target`` only, clean ``context`` prepended and its
    prediction frames dropped inside ``generator.model_velocity``; the MSE is taken in fp32."""
    x0 = target.float()
    x_t = (1.0 - t.sigma) * x0 + t.sigma * noise.float()
    sigma = torch.tensor(t.model_sigma, dtype=torch.float32)
    v = generator.model_velocity(x_t, sigma, context, text, timestep_dtype=timestep_dtype)
    mse = torch.nn.functional.mse_loss(v.float(), noise.float() - x0)
    return mse * t.weight, mse


def _seed(base: int, step: int, rank: int, index: int) -> int:
    """A distinct, reproducible seed per (run seed, step, process, clip): a resume replays the same draws."""
    return (base * 1_000_003 + step * 10_007 + rank * 101 + index) % (2 ** 31)


def _path_key(path) -> object:
    p = Path(path)
    return p if p.is_file() else str(p)  # a Path part is hashed by content (files only)


# ----------------------------------------------------------------------------------------------------
# The policy


class SftVdmPolicy:
    """The trainer's ``TrainingPolicy`` for the VDM SFT (see the module docstring)."""

    name = "sft_vdm"
    memory_settings = ("model.gradient_checkpointing", "model.train_mode", "video.num_frames")

    def __init__(self, cfg: SftVdmConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 cache=None, rank: int = 0, world_size: int = 1, heldout: list | None = None):
        from vans.generator import VideoGenerator
        from vans.models import require, resolve_models
        from vans.wan import load_dit, load_text_encoder, load_vae
        from vans.wan.dit import check_text_encoder_matches

        from .data import FeatureCache

        cfg.validate()
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype  # compute dtype (autocast when not fp32)
        self.rank, self.world_size = rank, world_size
        self.cache = cache if cache is not None else FeatureCache(None)
        self.heldout = list(heldout or [])
        if cfg.val.max_clips:
            self.heldout = self.heldout[: cfg.val.max_clips]
        self.paths = resolve_models(cfg.models_dir or None, dit=cfg.dit or None)
        require(self.paths, ("dit", "text_encoder", "vae"), cfg.models_dir or None)
        full = cfg.model.train_mode == "full"
        model_dtype = torch.float32 if full else dtype  # fp32 master weights for the full fine-tune
        dit = load_dit(self.paths.dit, dtype=model_dtype, device=self.device)
        text_encoder = load_text_encoder(self.paths.text_encoder, tokenizer=self.paths.tokenizer, dtype=dtype,
                                         device="cpu")
        check_text_encoder_matches(dit, text_encoder)
        vae = load_vae(self.paths.vae, dtype=dtype, device=self.device)
        self.generator = VideoGenerator(dit, text_encoder, vae, device=self.device, dtype=model_dtype, offload=False)
        m = cfg.model
        with torch.random.fork_rng(devices=[]):  # the same adapter init in every process and every run
            torch.manual_seed(cfg.run.seed)
            self._params = dit_lora.prepare_dit(dit, m.train_mode, targets=m.lora_targets, rank=m.lora_rank,
                                                alpha=m.lora_alpha)
        if m.gradient_checkpointing:
            dit.enable_gradient_checkpointing()
        self.schedule = TrainingSchedule(cfg.video.shift)

    # -- TrainingPolicy protocol -------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._params

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return dit_lora.trainable_state_dict(self.generator.dit)

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        dit_lora.load_trainable_state_dict(self.generator.dit, sd)

    def step(self, samples: list, step: int) -> dict[str, float]:
        """Validation when due, then one flow-matching loss per local clip, backpropagated as their mean."""
        cfg = self.cfg
        metrics: dict[str, float] = {}
        if self.heldout and cfg.val.every and (step == 1 or step % cfg.val.every == 0):
            start = time.perf_counter()
            metrics.update(self.validate())
            metrics["time/val_s"] = time.perf_counter() - start
        totals = {"loss": 0.0, "mse": 0.0, "timestep": 0.0, "weight": 0.0}
        seconds = {"data": 0.0, "train": 0.0}
        for index, sample in enumerate(samples):
            start = time.perf_counter()
            context, target = self.latents(sample)
            text = self.text_embedding(sample.caption)
            g = torch.Generator().manual_seed(_seed(cfg.run.seed, step, self.rank, index))
            t = self.schedule.at(self.schedule.draw(g, cfg.flow.min_timestep_boundary, cfg.flow.max_timestep_boundary),
                                 self.dtype if cfg.video.timestep_dtype == "model" else torch.float32)
            noise = torch.randn(target.shape, generator=g).to(self.device)  # drawn on the CPU: device-independent
            seconds["data"] += time.perf_counter() - start
            start = time.perf_counter()
            with self._autocast():
                loss, mse = flow_matching_loss(self.generator, target, context, text, noise, t,
                                               timestep_dtype=cfg.video.timestep_dtype)
            (loss / len(samples)).backward()
            seconds["train"] += time.perf_counter() - start
            for key, value in (("loss", loss), ("mse", mse), ("timestep", t.model_sigma * 1000), ("weight", t.weight)):
                totals[key] += float(value.detach() if torch.is_tensor(value) else value) / len(samples)
        metrics.update(totals)
        metrics["count/samples"] = float(len(samples))
        metrics.update({f"time/{k}_s": v for k, v in seconds.items()})
        return metrics

    def export(self, out_dir) -> dict[str, Path]:
        """Merged DiT (+ ComfyUI LoRA in lora mode) and the final held-out loss under ``out_dir``."""
        out, e = Path(out_dir), self.cfg.export
        meta = {"vans_stage": "sft_vdm", "steps": str(self.cfg.run.steps), "train_mode": self.cfg.model.train_mode}
        files = {}
        if self.cfg.model.train_mode == "lora":
            files["lora"] = dit_lora.export_comfy_lora(self.generator.dit, out / e.lora_name, dtype=e.dtype,
                                                       metadata=meta)
        files["dit"] = dit_lora.export_merged_dit(self.generator.dit, out / e.merged_name, dtype=e.dtype, metadata=meta)
        if self.heldout and self.cfg.val.every:
            values = self.validate(shard=False)
            log.info("held-out after training: %s", " ".join(f"{k} {v:.5g}" for k, v in values.items()))
            files["validation"] = out / "validation.json"
            files["validation"].write_text(json.dumps({"step": self.cfg.run.steps, **values}, indent=1),
                                           encoding="utf-8")
        return files

    # -- validation --------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, *, shard: bool = True) -> dict[str, float]:
        """Held-out loss at fixed timesteps and noise (``val/loss`` weighted as training, ``val/mse`` plain;
        ``val/ode_latent_mse`` with ``val.ode_steps``). With ``shard`` each process takes clips rank::world and
        reports its sum × world / count, so the runner's mean over processes is the exact mean over clips."""
        cfg = self.cfg
        clips = self.heldout[self.rank::self.world_size] if shard else self.heldout
        scale = (self.world_size if shard else 1) / len(self.heldout)
        dtype = self.dtype if cfg.video.timestep_dtype == "model" else torch.float32
        points = self.schedule.fixed(cfg.val.timesteps, cfg.flow.min_timestep_boundary, cfg.flow.max_timestep_boundary)
        sums = {"val/loss": 0.0, "val/mse": 0.0} | ({"val/ode_latent_mse": 0.0} if cfg.val.ode_steps else {})
        for sample in clips:
            context, target = self.latents(sample)
            text = self.text_embedding(sample.caption)
            for k, index in enumerate(points):
                g = torch.Generator().manual_seed(zlib.crc32(f"{cfg.val.seed}:{sample.id}:{k}".encode()))
                noise = torch.randn(target.shape, generator=g).to(self.device)
                with self._autocast():
                    loss, mse = flow_matching_loss(self.generator, target, context, text, noise,
                                                   self.schedule.at(index, dtype),
                                                   timestep_dtype=cfg.video.timestep_dtype)
                sums["val/loss"] += float(loss) / len(points)
                sums["val/mse"] += float(mse) / len(points)
            if cfg.val.ode_steps:
                latents = self.ode_sample(sample, cfg.val.ode_steps)
                sums["val/ode_latent_mse"] += float(((latents.float() - target.float()) ** 2).mean())
        return {k: v * scale for k, v in sums.items()}

    @torch.no_grad()
    def ode_sample(self, sample, steps: int, seed: int | None = None) -> torch.Tensor:
        """Target latents [1, C, T, h, w] sampled by the engine (Euler ODE, no CFG, the clip's context and
        caption) from noise seeded by (``val.seed``, clip id) unless ``seed`` is given."""
        from vans.generator import GenerationSettings

        v = self.cfg.video
        settings = GenerationSettings(width=v.width, height=v.height, num_frames=v.num_frames,
                                      num_context=v.num_context, steps=steps, guidance=1.0, shift=v.shift,
                                      timestep_dtype=v.timestep_dtype)
        context, _ = self.latents(sample)
        seed = zlib.crc32(f"{self.cfg.val.seed}:{sample.id}:ode".encode()) if seed is None else seed
        noise = self.generator.initial_noise(1, settings, seed=seed)
        from vans import progress

        with self._autocast(), progress.quiet():
            return self.generator.sample(context, self.text_embedding(sample.caption), settings, noise=noise).latents

    # -- cached inputs -----------------------------------------------------------------------------

    def latents(self, sample) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean context [1, C, n, h, w], target x₀ [1, C, T, h, w]) on the device, VAE-encoded once and cached."""
        from vans.video import read_clip

        from .data import frame_pick, vae_tiling_key

        v, pick, vae = self.cfg.video, frame_pick(self.cfg.video, "video"), self.generator.vae

        def encode() -> dict[str, torch.Tensor]:
            out = {}
            for name, path, what in (("input", sample.video, "input video"), ("target", sample.gt_video,
                                                                            "ground-truth video")):
                clip = read_clip(path, v.num_frames, v.height, v.width, pick, what=what)
                with torch.no_grad():
                    out[name] = vae.encode(clip.frames.unsqueeze(0).to(self.device)).float().cpu()
            from vans.context import select_context

            return {"context": select_context(out["input"], v.num_context), "target": out["target"]}

        cached = self.cache.get_or_compute("sft_vdm_latents", [Path(sample.video), Path(sample.gt_video),
                                                               _path_key(self.paths.vae), v.num_frames, v.height,
                                                               v.width, v.num_context, pick.mode, pick.fps,
                                                               str(self.dtype), vae_tiling_key(vae)], encode)
        return (cached["context"].to(self.device, self.generator.dtype),
                cached["target"].to(self.device, torch.float32))

    def text_embedding(self, caption: str) -> torch.Tensor:
        """[1, max_length, D] umT5 embedding of ``caption``, cached without its zero padding."""
        from .stage2 import _on

        encoder = self.generator.text_encoder

        def encode() -> torch.Tensor:
            with torch.no_grad(), _on(encoder, self.device):
                emb = encoder.encode([caption])[0].cpu()
            used = torch.nonzero(emb.abs().sum(dim=-1) > 0)
            return emb[: int(used.max()) + 1 if used.numel() else 1].contiguous()

        trimmed = self.cache.get_or_compute("sft_vdm_text", [_path_key(self.paths.text_encoder),
                                                             str(self.paths.tokenizer), caption, str(self.dtype),
                                                             encoder.max_length], encode)
        out = trimmed.new_zeros(encoder.max_length, trimmed.shape[-1])
        out[: trimmed.shape[0]] = trimmed
        return out.unsqueeze(0).to(self.device, self.generator.dtype)

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


# ----------------------------------------------------------------------------------------------------
# Command line


def train(cfg: SftVdmConfig, *, samples=None, runtime=None):
    """Load and split the data, build the policy, run the shared loop; returns the runner's ``RunResult``."""
    from .data import FeatureCache, load_samples, split_samples
    from .runner import run_training, setup_runtime

    cfg.validate()
    runtime = runtime or setup_runtime(cfg.run)
    if samples is None:
        d = cfg.data
        samples = load_samples(d.path, d.video_root or None, check_videos=d.check_videos,
                               max_samples=d.max_samples).samples
    rows, heldout = split_samples(samples, cfg.data.heldout_fraction, cfg.data.heldout_seed)
    if not heldout and cfg.val.every and runtime.is_main:
        log.warning("no held-out clips (no split column, data.heldout_fraction=0): no validation loss")
    elif runtime.is_main:
        log.info("%d training clips, %d held out", len(rows), len(heldout))
    cache = FeatureCache(cfg.data.cache_dir or Path(cfg.run.out_dir) / "cache")
    policy = SftVdmPolicy(cfg, device=runtime.device, dtype=runtime.dtype, cache=cache, rank=runtime.rank,
                          world_size=runtime.world_size, heldout=heldout)
    return run_training(cfg, policy, runtime=runtime, samples=rows)


def dit_passes(train_mode: str, gradient_checkpointing: bool) -> float:
    """Row-forward equivalents of one clip's training item, in ``vans.flops.stage2_rows``' convention: forward 1 +
    backward (2 for a full fine-tune: input and weight gradients; 1.5 for LoRA: input gradients only) + 1
    recompute with gradient checkpointing. A FLOP model, not a measurement."""
    return 1 + (2.0 if train_mode == "full" else 1.5) + (1 if gradient_checkpointing else 0)


def bench(scale: str, device, work, overrides=()) -> dict:
    """One timed optimizer step with ``sft_vdm.yaml`` (``sft_vdm_tiny.yaml`` at the tiny scale) on random
    weights of the real sizes (``vans.fixtures.random_models``), as ``vans.bench`` times stages 1 and 2."""
    from vans.bench import _run_stage, _stage_config
    from vans.fixtures.random_models import RandomModels
    from vans.flops import H100_CFG_STEP_S, dit_forward_flops, dit_tokens, scale_dit_flops

    device, work = torch.device(device), Path(work)
    models = RandomModels(scale, work / "models", device=device)
    cfg, out = _stage_config(SftVdmConfig, "sft_vdm", scale, device, work, models.tree, ("val.every=0",),
                             list(overrides))
    v, m_cfg = cfg.video, cfg.model
    out.update(stage="sft_vdm", scale=scale, device=str(device), train_mode=m_cfg.train_mode,
               gradient_checkpointing=m_cfg.gradient_checkpointing, size=[v.num_frames, v.height, v.width])
    m = _run_stage(lambda runtime: train_policy(cfg, runtime), cfg, models, device, out)
    out["phases_s"] = {k[len("time/"):-2]: val for k, val in m.items() if k.startswith("time/")}
    tokens = dit_tokens(v.num_frames, v.height, v.width, v.num_context)
    out["dit_flops_per_clip"] = dit_passes(m_cfg.train_mode, m_cfg.gradient_checkpointing) * \
        scale_dit_flops(scale, 1, tokens)
    out["projected_h100_train_s"] = cfg.run.prompts_per_step * out["dit_flops_per_clip"] / (
        dit_forward_flops(2, 13_200) / H100_CFG_STEP_S)  # at the measured H100 forward rate (real size only)
    if m.get("time/train_s"):
        out["train_tflops_per_s"] = cfg.run.prompts_per_step * out["dit_flops_per_clip"] / m["time/train_s"] / 1e12
    return out


def train_policy(cfg: SftVdmConfig, runtime) -> SftVdmPolicy:
    """The policy as ``train`` builds it (no held-out clips), for ``bench``."""
    from .data import FeatureCache

    return SftVdmPolicy(cfg, device=runtime.device, dtype=runtime.dtype, rank=runtime.rank,
                        world_size=runtime.world_size,
                        cache=FeatureCache(cfg.data.cache_dir or Path(cfg.run.out_dir) / "cache"))


def bench_cli(prog: str, run_bench, argv: list[str]) -> int:
    """``python -m trainer.sft_vdm bench`` / ``python -m trainer.sft_vlm bench``: one timed step of that stage,
    ``results.json`` in ``--out`` and a one-line summary."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=run_bench.__doc__)
    parser.add_argument("--out", required=True, help="work folder; results.json is written there")
    parser.add_argument("--scale", choices=("real", "tiny"), default=None, help="default: real on CUDA, tiny on CPU")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scale = args.scale or ("real" if device.type == "cuda" else "tiny")
    result = run_bench(scale, device, Path(args.out), args.overrides)
    (Path(args.out) / "results.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    keys = ("phases_s", "step_peak_gib", "dit_flops_per_clip", "train_tflops_per_s", "projected_h100_train_s",
            "target_tokens") + tuple(k for k in result if k.startswith("projected_step_s"))
    print(json.dumps({k: result[k] for k in keys if k in result}, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .config import parse_cli
    from .runner import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return bench_cli("python -m trainer.sft_vdm bench", bench, argv[1:])
    setup_logging()  # the runner logs every step and an end-of-run summary with the exported files
    try:
        cfg = parse_cli(SftVdmConfig, argv, "python -m trainer.sft_vdm",
                        "VDM SFT: flow-matching fine-tuning of the Wan2.1 DiT with the VANS context rule.")
        train(cfg)
    except VansError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
