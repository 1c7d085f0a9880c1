"""CLIP ViT-B/32 scores of the VANS tables and rewards: CLIP-V (video vs GT video) and CLIP-T (video vs text).

The model is open_clip's ``CLIP`` built locally (never ``pretrained=``, which may download) with its
architecture read from the tensor shapes, then filled from the user's file. Files users have:

* ``open_clip_model.safetensors`` of ``timm/vit_base_patch32_clip_224.openai`` (OpenAI's ViT-B/32, the paper's;
  open_clip key layout), best saved as ``clip_vit_b32_openai.safetensors``: loads as QuickGELU;
* ``open_clip_model.safetensors`` of ``laion/CLIP-ViT-B-32-laion2B-s34B-b79K``: loads as GELU (not the paper's);
* ``open_clip_pytorch_model.bin`` of either repo: a pickle, loaded only with ``allow_pickle=True``;
* OpenAI's ``ViT-B-32.pt``: a TorchScript archive, refused (we never run code from a weight file).

Shapes cannot tell the activation, so the architecture (``arch``) is an explicit choice or read from
what travels with the file: the paper's "CLIP ViT-B/32" is OpenAI's, trained with QuickGELU
(``"ViT-B-32-quickgelu"``); LAION's ViT-B/32 uses GELU (``"ViT-B-32"``). Loading OpenAI weights as GELU
gives wrong features without any error. ``arch="auto"`` (``resolve_clip_arch``) reads, in order, an
``open_clip_config.json`` next to the file (Hugging Face repos ship one: ``model_cfg.quick_gelu``), then
the file name ("openai" / "laion"), and otherwise assumes the paper's OpenAI model and logs that it did.

Preprocessing happens in torch on the scorer's device and follows open_clip's eval transform: resize the
shortest side to the model's image size (bicubic, antialiased), center crop, normalise with the CLIP
mean/std. It works on float frames rather than PIL uint8 images, so features match open_clip's own
pipeline closely but not bit for bit.

Scores are raw cosines (the VANS tables print 0.2–0.38 for CLIP-T); ``clipscore`` gives Hessel et al.'s
scaled version. The ``*_from_features`` functions are pure, so a caller can cache GT features.
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .checkpoints import load_state_dict, strip_prefix
from .errors import InputError, ModelFileError
from .progress import progress

# open_clip's OPENAI_DATASET_MEAN / _STD, copied so that importing this module stays cheap.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CLIP_HEAD_WIDTH = 64  # every open_clip ViT config uses 64-wide attention heads in both towers
BPE_VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer, shipped inside the package
RECOMMENDED_FILE = ("open_clip_model.safetensors from timm/vit_base_patch32_clip_224.openai (OpenAI's ViT-B/32, "
                    "the paper's), saved as clip_vit_b32_openai.safetensors")
PAPER_ARCH = "ViT-B-32-quickgelu"  # OpenAI's ViT-B/32: the "CLIP ViT-B/32" of the VANS rewards and tables
ARCH_CHOICES = ("auto", "ViT-B-32-quickgelu", "ViT-B-32")
# The reward file name earlier versions told users to give LAION's open_clip_model.safetensors.
LEGACY_LAION_NAME = "open_clip_vit-b-32.safetensors"

_REQUIRED_KEYS = (
    "visual.conv1.weight",
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.proj",
    "token_embedding.weight",
    "positional_embedding",
    "text_projection",
    "ln_final.weight",
)
_KEY_PREFIXES = ("module.", "clip.")

log = logging.getLogger("vans")


# ---------------------------------------------------------------------------------------------
# Pure score functions
# ---------------------------------------------------------------------------------------------


def even_spread_indices(source_count: int, target_count: int) -> torch.Tensor:
    """``target_count`` indices spread evenly over a clip, first and last frame included
    (``vans.video.sample_indices``, the VLM's frame rule); used when two clips of different lengths meet."""
    from .video import sample_indices

    if source_count < 1 or target_count < 1:
        raise InputError(f"cannot resample {source_count} frames to {target_count}; both need at least one frame")
    return torch.tensor(sample_indices(source_count, target_count), dtype=torch.long)


def clip_v_from_features(gen_features: torch.Tensor, gt_features: torch.Tensor) -> torch.Tensor:
    """CLIP-V from normalised features: mean over frames of cos(generated frame t, GT frame t).

    ``gen_features`` [..., T, D]; ``gt_features`` [T_gt, D]. When T_gt ≠ T the GT is resampled to T frames
    with ``even_spread_indices`` (the paper leaves this open), so both clips span the same time.
    Returns [...] (a 0-d tensor for one video).
    """
    frames = gen_features.shape[-2]
    if gt_features.shape[0] != frames:
        gt_features = gt_features[even_spread_indices(gt_features.shape[0], frames).to(gt_features.device)]
    return (gen_features * gt_features).sum(dim=-1).mean(dim=-1)


def clip_t_from_features(frame_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP-T from normalised features: mean over frames of cos(frame, text). ``frame_features`` [..., T, D],
    ``text_features`` [..., D] (one text per video). Returns [...]."""
    return (frame_features * text_features.unsqueeze(-2)).sum(dim=-1).mean(dim=-1)


def clipscore(cosine: torch.Tensor | float) -> torch.Tensor | float:
    """CLIPScore of Hessel et al. (2021): 2.5 · max(cos, 0). The VANS tables report raw cosines instead."""
    if isinstance(cosine, torch.Tensor):
        return 2.5 * cosine.clamp(min=0)
    return 2.5 * max(float(cosine), 0.0)


# ---------------------------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------------------------


class ClipScorer:
    """A loaded CLIP model with its tokenizer, preprocessing and the CLIP-V / CLIP-T scores.

    Features are L2-normalised float32 on ``device``; group scores come back as float32 CPU tensors
    (one transfer per call) to feed ``vans.rewards``.
    """

    def __init__(self, model, tokenizer, *, image_size: int, device: str | torch.device, dtype: torch.dtype,
                 arch: str = PAPER_ARCH, arch_source: str = "explicit"):
        self.model = model
        self.arch = arch  # the open_clip config that supplied the activation
        self.arch_source = arch_source  # how it was chosen (resolve_clip_arch)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.device = torch.device(device)
        self.dtype = dtype
        self._mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)

    # -- features -------------------------------------------------------------------------------

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, H, W, C] 0..1 (or uint8) → [N, 3, S, S] model input: shortest side to S (bicubic, antialias), center
        crop (torchvision's rounding), CLIP mean/std."""
        images = frames.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if frames.dtype == torch.uint8:
            images = images / 255.0
        height, width = images.shape[-2:]
        size = self.image_size
        if height <= width:
            new_height, new_width = size, int(size * width / height)
        else:
            new_height, new_width = int(size * height / width), size
        if (new_height, new_width) != (height, width):
            images = F.interpolate(images, size=(new_height, new_width), mode="bicubic", antialias=True,
                                   align_corners=False)
            images = images.clamp(0.0, 1.0)  # bicubic overshoots; PIL's uint8 output is clamped too
        top = int(round((new_height - size) / 2.0))
        left = int(round((new_width - size) / 2.0))
        images = images[:, :, top:top + size, left:left + size]
        return ((images - self._mean) / self._std).to(self.dtype)

    def image_features(self, frames: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Normalised image features [N, D] of frames [N, H, W, C] in 0..1, ``batch_size`` frames at a time."""
        return self._encode_frames([_checked_frames(frames, "frames")], batch_size)

    def video_features(self, videos, batch_size: int = 64) -> list[torch.Tensor]:
        """Per-video features [T_i, D] of a [G, T, H, W, C] tensor or a list of [T_i, H, W, C] videos.

        The frames of all videos share batches (G·T frames in ⌈G·T / batch_size⌉ model calls)."""
        videos = _checked_videos(videos)
        features = self._encode_frames(videos, batch_size)
        return list(features.split([video.shape[0] for video in videos]))

    def text_features(self, texts: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised text features [N, D]. Texts longer than the context (77 tokens) are truncated, as in CLIP."""
        texts = _checked_texts(texts)
        batch_size = max(1, int(batch_size))
        tokens = self.tokenizer(texts)
        features = []
        with torch.inference_mode(), progress(math.ceil(len(texts) / batch_size), "CLIP text features") as bar:
            for start in range(0, len(texts), batch_size):
                batch = tokens[start:start + batch_size].to(self.device, non_blocking=True)
                features.append(F.normalize(self.model.encode_text(batch).float(), dim=-1))
                bar.update()
        return torch.cat(features)

    def _encode_frames(self, videos: list[torch.Tensor], batch_size: int) -> torch.Tensor:
        """Features of all frames of ``videos`` in order. A batch may span several videos (of any sizes);
        only one batch of frames is on the device at a time, and no copy of the whole input is made."""
        batch_size = max(1, int(batch_size))
        total = sum(video.shape[0] for video in videos)
        features = []
        with torch.inference_mode(), progress(math.ceil(total / batch_size), "CLIP image features") as bar:
            for pieces in _frame_batches(videos, batch_size):
                batch = torch.cat([self.preprocess(piece) for piece in pieces])
                features.append(F.normalize(self.model.encode_image(batch).float(), dim=-1))
                bar.update()
        return torch.cat(features)

    # -- scores ---------------------------------------------------------------------------------

    def clip_v(self, gen_frames: torch.Tensor, gt_frames: torch.Tensor | None = None, *,
               gt_features: torch.Tensor | None = None, batch_size: int = 64) -> float:
        """CLIP-V of one generated video against its GT video (see ``clip_v_from_features``)."""
        return float(self.clip_v_group([gen_frames], gt_frames, gt_features=gt_features, batch_size=batch_size)[0])

    def clip_v_group(self, gen_videos, gt_frames: torch.Tensor | None = None, *,
                     gt_features: torch.Tensor | None = None, batch_size: int = 64) -> torch.Tensor:
        """CLIP-V of G generated videos against one GT video → [G]. The GT is encoded once, or not at all
        when the caller passes its cached ``gt_features`` (``image_features(gt_frames)``)."""
        if gt_features is None:
            if gt_frames is None:
                raise InputError("CLIP-V needs the GT video: pass gt_frames or gt_features")
            gt_features = self.image_features(_checked_frames(gt_frames, "GT video"), batch_size)
        gen_features = self.video_features(gen_videos, batch_size)
        gt_features = gt_features.to(self.device, torch.float32)
        scores = torch.stack([clip_v_from_features(features, gt_features) for features in gen_features])
        return scores.cpu()

    def clip_t(self, frames: torch.Tensor, text: str, *, batch_size: int = 64) -> float:
        """CLIP-T of one video: raw cosine of each frame with ``text``, averaged over frames."""
        return float(self.clip_t_group([frames], [text], batch_size=batch_size)[0])

    def clip_t_group(self, videos, texts: str | Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """CLIP-T of G videos → [G]; ``texts`` is one text per video, or a single text for all of them
        (stage 2 scores every rollout against the same anchor caption; it is encoded once)."""
        frame_features = self.video_features(videos, batch_size)
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if len(texts) not in (1, len(frame_features)):
            raise InputError(f"CLIP-T got {len(texts)} texts for {len(frame_features)} videos; give one per video")
        text_features = self.text_features(texts)
        if len(texts) == 1:
            text_features = text_features.expand(len(frame_features), -1)
        scores = torch.stack([clip_t_from_features(f, t) for f, t in zip(frame_features, text_features)])
        return scores.cpu()


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def resolve_clip_arch(path: str | Path, arch: str = "auto") -> tuple[str, str]:
    """(open_clip arch name, how it was decided) for a CLIP file; see the module docstring.

    An explicit name is used as given. ``"auto"`` reads ``open_clip_config.json`` beside the file
    (``model_cfg.quick_gelu``), then the file name (``openai`` → QuickGELU; ``laion`` or this pack's earlier
    name for LAION's file, ``open_clip_ViT-B-32.safetensors`` → GELU), and otherwise falls back to the
    paper's OpenAI ViT-B/32 with a warning that names the choice.
    """
    if arch != "auto":
        return arch, "explicit"
    path = Path(path)
    config_file = path.with_name("open_clip_config.json")
    if config_file.is_file():
        try:
            model_cfg = json.loads(config_file.read_text(encoding="utf-8")).get("model_cfg", {})
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelFileError(f"{config_file} is not valid JSON ({exc}); fix it or pass the CLIP arch explicitly") from None
        return ("ViT-B-32-quickgelu" if model_cfg.get("quick_gelu") else "ViT-B-32"), config_file.name
    name = path.name.lower()
    if name == LEGACY_LAION_NAME:
        log.info("CLIP file %s: the name earlier versions of this pack gave LAION's ViT-B/32, read as GELU (ViT-B-32); "
                 "for OpenAI's weights use clip_vit_b32_openai.safetensors or set the arch", path.name)
        return "ViT-B-32", "file name (this pack's earlier name for LAION's file)"
    if "openai" in name:
        return "ViT-B-32-quickgelu", "file name (openai)"
    if "laion" in name:
        return "ViT-B-32", "file name (laion)"
    log.warning("CLIP file %s: QuickGELU or GELU cannot be told from its tensors and no open_clip_config.json lies "
                "beside it; assuming OpenAI's ViT-B/32 (%s, the paper's). For LAION weights set the arch to ViT-B-32.",
                path.name, PAPER_ARCH)
    return PAPER_ARCH, "default (the paper's OpenAI CLIP)"


def load_clip(
    path: str | Path,
    *,
    arch: str = "auto",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> ClipScorer:
    """Load an open_clip ViT CLIP weight file into a ``ClipScorer``; sizes come from the tensor shapes, the
    activation from ``arch`` (``resolve_clip_arch``: "auto", "ViT-B-32-quickgelu" or "ViT-B-32")."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    path = Path(path)
    _refuse_torchscript(path)
    if arch != "auto":
        _arch_settings(arch, open_clip)  # a wrong name fails before the file is read
    state_dict = strip_prefix(load_state_dict(path, what="CLIP", allow_pickle=allow_pickle), _KEY_PREFIXES)
    _check_open_clip_layout(state_dict, path)
    arch, arch_source = resolve_clip_arch(path, arch)
    settings = _arch_settings(arch, open_clip)
    config = clip_config_from_state_dict(state_dict, settings, path)

    model = CLIP(
        config["embed_dim"],
        vision_cfg=CLIPVisionCfg(**config["vision_cfg"]),
        text_cfg=CLIPTextCfg(**config["text_cfg"]),
        quick_gelu=config.get("quick_gelu", False),
    )
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelFileError(
            f"CLIP file {path.name} does not fit open_clip's '{arch}' model (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); expected {RECOMMENDED_FILE}"
        )
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=config["text_cfg"]["context_length"])
    return ClipScorer(model, tokenizer, image_size=config["vision_cfg"]["image_size"], device=device, dtype=dtype,
                      arch=arch, arch_source=arch_source)


def clip_config_from_state_dict(state_dict: dict[str, torch.Tensor], settings: dict, path: Path) -> dict:
    """open_clip model config: ``settings`` (from ``arch``) with every size replaced by the file's shapes."""
    conv = state_dict["visual.conv1.weight"]
    vision_width, patch_size = conv.shape[0], conv.shape[-1]
    positions = state_dict["visual.positional_embedding"].shape[0] - 1
    grid = math.isqrt(positions)
    text_width = state_dict["ln_final.weight"].shape[0]
    embed_dim = state_dict["visual.proj"].shape[1]
    vocab_size = state_dict["token_embedding.weight"].shape[0]

    if grid * grid != positions or conv.shape[-2] != patch_size:
        raise ModelFileError(f"CLIP file {path.name} has a non-square patch grid; expected {RECOMMENDED_FILE}")
    if vision_width % CLIP_HEAD_WIDTH or text_width % CLIP_HEAD_WIDTH:
        raise ModelFileError(
            f"CLIP file {path.name} has tower widths {vision_width}/{text_width}, not multiples of the "
            f"{CLIP_HEAD_WIDTH}-wide heads of open_clip ViT models; expected {RECOMMENDED_FILE}"
        )
    if state_dict["text_projection"].shape[-1] != embed_dim:
        raise ModelFileError(f"CLIP file {path.name} has image and text embeddings of different sizes; it is not a CLIP model")
    if vocab_size != BPE_VOCAB_SIZE:
        raise ModelFileError(
            f"CLIP file {path.name} has a text vocabulary of {vocab_size} tokens, but open_clip's BPE tokenizer "
            f"has {BPE_VOCAB_SIZE} (a multilingual or SigLIP model?); expected {RECOMMENDED_FILE}"
        )

    vision_cfg = dict(settings.get("vision_cfg", {}))
    vision_cfg.update(
        width=vision_width,
        layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
        patch_size=patch_size,
        image_size=patch_size * grid,
        head_width=CLIP_HEAD_WIDTH,
        mlp_ratio=state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vision_width,
    )
    text_cfg = dict(settings.get("text_cfg", {}))
    text_cfg.update(
        width=text_width,
        heads=text_width // CLIP_HEAD_WIDTH,
        layers=_count_blocks(state_dict, "transformer.resblocks."),
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=vocab_size,
        mlp_ratio=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
    )
    return dict(settings, embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)


def _arch_settings(arch: str, open_clip) -> dict:
    """The named open_clip config; it must describe a plain ViT CLIP (no timm / Hugging Face towers)."""
    config = open_clip.get_model_config(arch)
    if config is None:
        raise InputError(f"CLIP arch '{arch}' is not an open_clip model config; use 'ViT-B-32-quickgelu' (OpenAI "
                         "weights, the paper's), 'ViT-B-32' (LAION weights) or 'auto'")
    vision_cfg, text_cfg = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if vision_cfg.get("timm_model_name") or text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise InputError(f"CLIP arch '{arch}' uses timm or Hugging Face towers, which this loader does not build; use 'ViT-B-32'")
    return config


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    return len({key[len(prefix):].split(".", 1)[0] for key in state_dict if key.startswith(prefix)})


def _check_open_clip_layout(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse files that are not an open_clip ViT CLIP, saying what they look like and what to use."""
    if all(key in state_dict for key in _REQUIRED_KEYS) and "visual.transformer.resblocks.0.mlp.c_fc.weight" in state_dict \
            and "transformer.resblocks.0.mlp.c_fc.weight" in state_dict:
        return
    keys = list(state_dict)
    if any(key.startswith(("vision_model.", "text_model.")) for key in keys):
        kind = "a Hugging Face transformers CLIP file"
    elif any(key.startswith("visual.trunk.") for key in keys):
        kind = "an open_clip model with a timm image tower"
    elif any(key.startswith("visual.layer1.") for key in keys):
        kind = "a ResNet CLIP"
    elif keys and all(key.startswith("visual.") for key in keys):
        kind = "an image tower only"
    else:
        kind = f"not a CLIP model (keys like {', '.join(repr(k) for k in keys[:3])})"
    raise ModelFileError(
        f"CLIP file {path.name} is {kind}; expected an open_clip ViT CLIP (keys 'visual.conv1.weight', "
        f"'token_embedding.weight', …) such as {RECOMMENDED_FILE}"
    )


def _refuse_torchscript(path: Path) -> None:
    """OpenAI's ``ViT-B-32.pt`` is a TorchScript archive: loading it runs serialized code, so it is refused
    even with ``allow_pickle``; the same weights exist as open_clip safetensors."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return
    if any(name.endswith("constants.pkl") or "/code/" in name for name in names):
        raise ModelFileError(
            f"CLIP file {path.name} is a TorchScript archive (OpenAI's original release), which is not loaded; "
            f"use {RECOMMENDED_FILE} (the same weights in safetensors)"
        )


def _frame_batches(videos: list[torch.Tensor], batch_size: int):
    """Yield lists of frame slices holding ``batch_size`` consecutive frames (the last may hold fewer)."""
    pieces, count = [], 0
    for video in videos:
        start = 0
        while start < video.shape[0]:
            take = min(batch_size - count, video.shape[0] - start)
            pieces.append(video[start:start + take])
            count += take
            start += take
            if count == batch_size:
                yield pieces
                pieces, count = [], 0
    if pieces:
        yield pieces


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _checked_frames(frames, name: str) -> torch.Tensor:
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise InputError(f"{name} must be frames [T, H, W, 3] with values in 0..1 (got {shape})")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise InputError(f"{name} has no frames or no pixels (shape {tuple(frames.shape)})")
    if frames.dtype != torch.uint8 and not frames.is_floating_point():
        raise InputError(f"{name} must be float frames in 0..1 or uint8 (got {frames.dtype})")
    return frames


def _checked_videos(videos) -> list[torch.Tensor]:
    if isinstance(videos, torch.Tensor):
        if videos.ndim != 5:
            raise InputError(f"videos must be [G, T, H, W, 3] or a list of [T, H, W, 3] (got {tuple(videos.shape)})")
        videos = list(videos.unbind(0))
    videos = [_checked_frames(video, f"video {i}") for i, video in enumerate(videos)]
    if not videos:
        raise InputError("no videos to score")
    return videos


def _checked_texts(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(text, str) for text in texts):
        raise InputError("CLIP texts must be a non-empty list of strings")
    return texts
