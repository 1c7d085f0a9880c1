"""The captioner's inputs and weights against independent implementations of the official VANS pipeline.

* LoRA merge: the official ``agent_mllm.py`` wraps Qwen2.5-VL with peft ``get_peft_model(LoraConfig(r=8,
  lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM", target_modules=[q,k,v,o,gate,up,
  down]_proj))`` and ``vlm.safetensors`` holds that wrapped model's state dict under
  ``pipe.mllm.mllm_backbone.``. Here peft itself builds such a file on the tiny random Qwen2.5-VL (with
  random, non-zero LoRA A and B), and peft's ``merge_and_unload()`` is the reference for our loader
  (``vans.lora.load_vlm_checkpoint`` via ``load_captioner``): every weight and the logits of one forward.
* Frames: the official reader is qwen-vl-utils' ``vision_process.py`` with FPS = 1, FPS_MIN_FRAMES =
  FPS_MAX_FRAMES = 6 (the copy bundled with VANS); ``fetch_video`` of qwen-vl-utils 0.0.14 runs here with
  those constants and an in-memory clip in place of the decoder, and its frame indices, frame size and
  pixels are compared with ``vans.captioner.frame_indices`` / ``smart_resize`` / ``vlm_frames``.

Tolerances are stated next to each comparison, with the largest difference measured on this machine.
"""

import random

import pytest
import torch

peft = pytest.importorskip("peft")
vision_process = pytest.importorskip("qwen_vl_utils.vision_process")

from safetensors.torch import save_file  # noqa: E402

from vans import progress  # noqa: E402
from vans.captioner import (  # noqa: E402
    IMAGE_FACTOR,
    NUM_FRAMES,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    frame_indices,
    load_captioner,
    smart_resize,
    vlm_frames,
)
from vans.fixtures.qwen import hub_key, write_tiny_qwen_vl  # noqa: E402

OFFICIAL_PREFIX = "pipe.mllm.mllm_backbone."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = dict(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)  # few video tokens: a fast forward

# fp32 merge, W + (α/r)·B·A computed by peft and by us: the same float32 operations, so equal up to
# summation order in B·A (|W| ~ 0.2, ΔW up to 0.4 here). Measured: 0 (bit-identical) for all four files.
WEIGHT_ATOL = 1e-6
# Logits of the tiny model are O(10) and the adapter moves them by up to 16. Measured max |Δ|: 0 between
# our load and peft's merged model, 4.1e-5 against peft's unmerged (adapter-in-the-loop) forward.
LOGIT_ATOL = 1e-4
# qwen-vl-utils resizes the decoded uint8 frames and rounds back to uint8 (torchvision rounds and clamps a
# uint8 result), then the processor rescales by 1/255; we resize float 0..1 without re-quantising. The
# same bicubic+antialias interpolation, so the difference is that rounding: at most 0.5/255 (+ fp32 noise).
# Measured: 0.50004/255. Bilinear instead would differ by 38..49/255, bicubic without antialias by 21..102/255
# (torch's antialiased bicubic filter, aten UpSample.h, has a = −0.5, the plain one a = −0.75, so antialias
# matters when upscaling too).
PIXEL_ATOL_UINT8 = 0.5 / 255 + 1e-6
# Against the same torchvision call on float input (no rounding), clamped to 0..255 as ours is to 0..1.
# Measured: 4.2e-7.
PIXEL_ATOL_FLOAT = 1e-5


@pytest.fixture(autouse=True)
def quiet_bars():
    with progress.quiet():
        yield


# ---- LoRA merge vs peft ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_qwen_vl(tmp_path_factory.mktemp("qwen") / "Qwen2.5-VL-tiny")


@pytest.fixture(scope="module")
def prompt(tiny_folder):
    """One tokenized prompt with a 6-frame video, from the base model's processor."""
    base = load_captioner(tiny_folder, device="cpu")
    frames = torch.rand(10, 60, 90, 3, generator=torch.Generator().manual_seed(0))
    return base.prepare(frames, "What will happen next?", **SMALL).tensors


@pytest.fixture(scope="module")
def official(tiny_folder, prompt, tmp_path_factory):
    """peft's wrapped model → the vlm.safetensors variants, peft's merged model and its logits."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_folder, local_files_only=True, dtype=torch.float32, attn_implementation="sdpa")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base_logits = model(**prompt, use_cache=False).logits
    wrapped = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, bias="none",
                                               task_type="CAUSAL_LM", target_modules=TARGETS))
    wrapped.eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:  # B is zero at init: both random, so ΔW ≠ 0
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    lora_modules = sorted(n[len("base_model.model."):] for n, m in wrapped.named_modules() if isinstance(m, LoraLayer))

    state = {OFFICIAL_PREFIX + k: v.detach().clone().contiguous() for k, v in wrapped.state_dict().items()}
    root = OFFICIAL_PREFIX + "base_model.model."
    files = {}
    folder = tmp_path_factory.mktemp("vans")

    def write(kind, sd):
        files[kind] = folder / f"{kind}.safetensors"
        save_file(sd, str(files[kind]), metadata={"format": "pt"})

    # As saved under transformers >= 4.52 / 5 (model.language_model.*, model.visual.*): what peft gives here.
    write("wrapped-v5", state)
    # Under transformers 4.4x module names (model.layers.*, visual.*).
    write("wrapped-hub", {root + hub_key(k[len(root):]): v for k, v in state.items()})
    # Only the adapter tensors (base weights come from the folder), official prefix and key names.
    write("lora-only", {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k})
    # peft's own adapter export (save_pretrained's adapter_model.safetensors: no ".default", no prefix).
    write("peft-adapter", {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(wrapped).items()})

    with torch.no_grad():
        unmerged_logits = wrapped(**prompt, use_cache=False).logits
        merged = wrapped.merge_and_unload()
        merged.eval()
        merged_logits = merged(**prompt, use_cache=False).logits
    return dict(files=files, base=base, merged=merged.state_dict(), lora_modules=lora_modules,
                base_logits=base_logits, unmerged_logits=unmerged_logits, merged_logits=merged_logits)


def test_peft_wraps_the_language_model_and_the_vision_mlp(official):
    """PEFT matches target names as suffixes over the whole model: the vision blocks' MLP is adapted too;
    their attention (attn.qkv / attn.proj) and the merger (mlp.0 / mlp.2) are not."""
    expected = [f"model.language_model.layers.{i}.{part}" for i in range(2)
                for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    expected += [f"model.visual.blocks.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    assert official["lora_modules"] == sorted(expected)


@pytest.mark.parametrize("kind", ["wrapped-v5", "wrapped-hub", "lora-only", "peft-adapter"])
def test_loader_equals_peft_merge_and_unload(official, tiny_folder, prompt, kind):
    """Every tensor of our loaded model equals peft's merged one, vision MLPs included, and so do the logits.

    Can fail: skipping the vision MLP pairs, another scale than α/r = 4, a pair merged into the wrong
    layer or a perturbed merged weight leaves an error of the order of ΔW (~0.1) ≫ 1e-6 in that weight."""
    captioner = load_captioner(tiny_folder, checkpoint=official["files"][kind], device="cpu")
    report = captioner.checkpoint_report
    assert report.clean, report.summary()
    assert report.merged_lora == len(official["lora_modules"]) == 20
    assert report.rank == 8 and report.alpha == 32

    ours = captioner.model.state_dict()
    merged, base = official["merged"], official["base"]
    assert sorted(ours) == sorted(merged)
    worst = max((ours[k] - merged[k]).abs().max().item() for k in merged)
    assert worst <= WEIGHT_ATOL, f"max |ours - peft merged| = {worst:.3g}"
    for module in official["lora_modules"]:  # the adapters really moved these weights (non-vacuous check)
        assert (merged[module + ".weight"] - base[module + ".weight"]).abs().max() > 1e-2, module

    with torch.no_grad():
        logits = captioner.model(**prompt, use_cache=False).logits
    torch.testing.assert_close(logits, official["merged_logits"], rtol=0, atol=LOGIT_ATOL)
    torch.testing.assert_close(logits, official["unmerged_logits"], rtol=0, atol=LOGIT_ATOL)
    # The adapter moves the logits far beyond the tolerance, so the comparison is not vacuous.
    assert (logits - official["base_logits"]).abs().max() > 100 * LOGIT_ATOL


# ---- frame picking ---------------------------------------------------------------------------------------

# (total frames, fps): clip lengths around the 6-frame minimum, the stage-1/2 lengths (49, 81), long clips
# and very long ones (float32 linspace in the official rule vs our float64). Clips under 6 frames are not
# compared: qwen-vl-utils 0.0.14's smart_nframes with the VANS constants gives 2 frames for 2–3, 4 for 4–5
# and an error for 1, while we always give 6 (repeating frames), a deliberate difference.
FRAME_CASES = [(6, 24), (7, 30), (8, 8), (10, 25), (11, 24), (13, 30), (16, 16), (31, 29.97), (49, 16),
               (81, 16), (100, 30), (121, 24), (241, 24), (1000, 30), (12345, 29.97), (100_001, 60), (1_000_007, 60)]


def _official_indices(total, nframes=NUM_FRAMES):
    """The official reader's expression (qwen-vl-utils ``_read_video_*``): float32 linspace, half-to-even round."""
    return torch.linspace(0, total - 1, nframes).round().long().tolist()


@pytest.mark.parametrize("total, fps", FRAME_CASES)
def test_frame_indices_equal_the_official_rule(total, fps):
    """Can fail: floor instead of round gives e.g. [0, 1, 3, 5, 7, 9] vs [0, 2, 4, 5, 7, 9] for 10 frames."""
    assert frame_indices(total, NUM_FRAMES) == _official_indices(total)
    assert vision_process.smart_nframes({"nframes": NUM_FRAMES}, total_frames=total, video_fps=fps) == NUM_FRAMES
    # The bundled VANS copy: FPS 1 and min = max = 6 frames, i.e. 6 for any clip of at least 6 frames.
    assert vision_process.smart_nframes({"fps": 1.0, "min_frames": 6, "max_frames": 6},
                                        total_frames=total, video_fps=fps) == NUM_FRAMES


def test_frame_indices_equal_the_official_rule_for_every_length_up_to_3000():
    """With 6 frames, k·(N−1)/5 never ends in .5 (that needs 5 | N−1, which makes it whole), so no tie is
    rounded; float32 vs float64 linspace would matter only from ~10⁶ frames on (checked above)."""
    bad = [n for n in range(NUM_FRAMES, 3001) if frame_indices(n, NUM_FRAMES) != _official_indices(n)]
    assert bad == []


# ---- smart_resize ---------------------------------------------------------------------------------------


def _sizes():
    rng = random.Random(0)
    sizes = [(rng.randint(30, 4000), rng.randint(30, 4000)) for _ in range(200)]
    return sizes + [(352, 640), (1080, 1920), (720, 1280), (480, 832), (1920, 1080), (28, 28), (1, 1),
                    (27, 55), (10, 2000), (4000, 20)]


def test_smart_resize_equals_qwen_vl_utils():
    """Exact equality on 210 sizes. Can fail: e.g. floor instead of round in the first step gives
    352×640 → 336×616 instead of 364×644."""
    assert VIDEO_MIN_PIXELS == vision_process.VIDEO_MIN_TOKEN_NUM * IMAGE_FACTOR ** 2
    assert VIDEO_MAX_PIXELS == vision_process.VIDEO_MAX_TOKEN_NUM * IMAGE_FACTOR ** 2
    mismatched = []
    for h, w in _sizes():
        theirs = vision_process.smart_resize(h, w, IMAGE_FACTOR, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
        ours = smart_resize(h, w, IMAGE_FACTOR, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
        if ours != theirs:
            mismatched.append(((h, w), ours, theirs))
    assert mismatched == []


# ---- pixels: vlm_frames vs fetch_video ----------------------------------------------------------------


def _clip(frames, height, width, seed):
    """uint8 [T, H, W, 3]: smooth gradients plus noise, so bicubic overshoot and antialiasing both matter."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height).view(1, height, 1, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width, 1)
    t = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1, 1) / frames
    smooth = 0.5 + 0.4 * torch.sin(6.0 * x + 4.0 * y + 3.0 * t + torch.tensor([0.0, 1.0, 2.0]))
    noisy = smooth + 0.25 * torch.randn(frames, height, width, 3, generator=g)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)


def _fetch_video(monkeypatch, clip_thwc, video_fps=24.0):
    """qwen-vl-utils 0.0.14 ``fetch_video`` on a video "file" whose decoder returns ``clip_thwc``, with the
    constants of the VANS copy (FPS 1, 6 frames); returns (frames [T, C, H, W] float 0..255, indices)."""
    video_tchw = clip_thwc.permute(0, 3, 1, 2).contiguous()

    def read_video(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
        assert output_format == "TCHW"
        return video_tchw, torch.empty(0), {"video_fps": video_fps}

    monkeypatch.setattr(vision_process, "get_video_reader_backend", lambda: "torchvision")
    monkeypatch.setattr(vision_process.io, "read_video", read_video, raising=False)
    monkeypatch.setattr(vision_process, "FPS", 1.0)
    monkeypatch.setattr(vision_process, "FPS_MIN_FRAMES", 6)
    monkeypatch.setattr(vision_process, "FPS_MAX_FRAMES", 6)
    video, metadata = vision_process.fetch_video({"video": "clip.mp4"}, return_video_metadata=True)
    return video, metadata["frames_indices"].tolist()


@pytest.mark.parametrize("frames, height, width", [
    (10, 100, 170),  # upscaled to the 128-token minimum (bicubic overshoot, clamped)
    (49, 352, 640),  # the VANS training size, nearly unchanged (364×644)
    (13, 720, 1280),  # downscaled to the 768-token maximum (antialias matters)
])
def test_vlm_frames_equal_fetch_video(monkeypatch, frames, height, width):
    """Same frames, same size, same pixels as the official reader + the processor's 1/255 rescale.

    Can fail: a different frame (the frames are independent noise), bilinear instead of bicubic, or no
    antialias on the downscale each leave differences of several /255, far above 0.5/255."""
    clip = _clip(frames, height, width, seed=frames)
    official_video, official_idx = _fetch_video(monkeypatch, clip)
    assert official_idx == frame_indices(frames, NUM_FRAMES)

    ours = vlm_frames(clip)  # uint8 in: scaled to 0..1 first, as the engine does
    assert ours.shape == (NUM_FRAMES, *official_video.shape[2:], 3)
    assert tuple(official_video.shape[2:]) == smart_resize(height, width)
    ours_tchw = ours.permute(0, 3, 1, 2)
    assert (ours_tchw - official_video / 255.0).abs().max().item() <= PIXEL_ATOL_UINT8

    # The interpolation itself, without the uint8 rounding: torchvision on the float frames.
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    picked = clip.permute(0, 3, 1, 2)[torch.tensor(official_idx)].float()
    resized = TF.resize(picked, list(official_video.shape[2:]), interpolation=InterpolationMode.BICUBIC,
                        antialias=True).clamp(0, 255) / 255.0
    assert (ours_tchw - resized).abs().max().item() <= PIXEL_ATOL_FLOAT
