"""The captioner end to end on a tiny random-weight Qwen2.5-VL written in the Hub's file layout."""

import json
import shutil

import pytest
import torch

from vans import progress
from vans.captioner import (
    SECONDS_PER_GRID,
    _completion_masks,
    check_frames,
    frame_indices,
    load_captioner,
    smart_resize,
    vlm_frames,
)
from vans.errors import Cancelled, InputError, ModelFileError
from vans.fixtures.qwen import hub_key, write_tiny_qwen_vl, write_tiny_vans_vlm_checkpoint
from vans.lora import adapters_disabled, add_lora, lora_modules

# Small frames and pixel budgets keep the tiny model fast: 4..16 merged 28×28 cells per frame.
SMALL = dict(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
QUESTION = "What will happen next?"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_qwen_vl(tmp_path_factory.mktemp("qwen") / "Qwen2.5-VL-tiny")


@pytest.fixture(scope="module")
def captioner(tiny_folder):
    return load_captioner(tiny_folder, device="cpu")


@pytest.fixture(scope="module")
def frames():
    return torch.rand(10, 60, 90, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def quiet_bars():
    with progress.quiet():
        yield


# ---- frames ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, expected", [
    ((352, 640), (364, 644)),  # 12.57→13, 22.86→23 cells; 234,416 px is inside [100,352, 602,112]
    ((1080, 1920), (560, 1008)),  # too large: β = √(1080·1920/602,112) = 1.856; ⌊20.78⌋·28, ⌊36.95⌋·28
    ((64, 64), (336, 336)),  # too small: β = √(100,352/4,096) = 4.95; ⌈11.31⌉·28
    ((10, 2000), (28, 4480)),  # too small: β = √(100,352/20,000) = 2.24; ⌈0.8⌉·28, ⌈160⌉·28
])
def test_smart_resize_hand_computed(size, expected):
    assert smart_resize(*size) == expected


@pytest.mark.parametrize("height, width", [(480, 854), (720, 1280), (33, 47), (2160, 3840), (300, 100)])
def test_smart_resize_invariants(height, width):
    h, w = smart_resize(height, width)
    assert h % 28 == 0 and w % 28 == 0
    assert 128 * 28 * 28 <= h * w <= 768 * 28 * 28
    assert abs(h / w - height / width) / (height / width) < 0.25


def test_smart_resize_refuses_extreme_aspect_ratio():
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(1, 300)


@pytest.mark.parametrize("total, expected", [
    (10, [0, 2, 4, 5, 7, 9]),  # round(0, 1.8, 3.6, 5.4, 7.2, 9)
    (6, [0, 1, 2, 3, 4, 5]),
    (33, [0, 6, 13, 19, 26, 32]),  # round(0, 6.4, 12.8, 19.2, 25.6, 32)
    (3, [0, 0, 1, 1, 2, 2]),  # short clips repeat frames
])
def test_frame_indices(total, expected):
    assert frame_indices(total, 6) == expected


def test_vlm_frames_picks_spread_frames_and_resizes():
    clip = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 60, 90, 3) / 10
    out = vlm_frames(clip, 6, **SMALL)
    assert out.shape == (6, 56, 84, 3)  # smart_resize(60, 90) = (56, 84): 2·3 cells, area 4,704 in range
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[:, 10, 10, 0], torch.tensor([0, 2, 4, 5, 7, 9]) / 10)


def test_vlm_frames_accepts_uint8_and_rejects_bad_input():
    clip = torch.full((4, 56, 84, 3), 255, dtype=torch.uint8)
    assert vlm_frames(clip, 6, **SMALL).max() == 1.0
    with pytest.raises(InputError, match="expected \\[frames, height, width, 3\\]"):
        check_frames(torch.rand(4, 3, 56, 84))
    with pytest.raises(InputError, match="no frames"):
        check_frames(torch.rand(0, 56, 84, 3))
    with pytest.raises(InputError, match="NaN"):
        check_frames(torch.full((2, 8, 8, 3), float("nan")))
    with pytest.raises(InputError, match="even number"):
        vlm_frames(clip, 5)


# ---- loading -----------------------------------------------------------------------------------------


def test_missing_folder_lists_expected_files(tmp_path):
    with pytest.raises(ModelFileError) as info:
        load_captioner(tmp_path / "nowhere")
    message = str(info.value)
    assert "nowhere" in message and "config.json" in message and "preprocessor_config.json" in message


def test_folder_without_weights_names_them(tmp_path, tiny_folder):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_folder, partial)
    (partial / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="lacks model.safetensors"):
        load_captioner(partial)


def test_wrong_model_type_is_refused(tmp_path, tiny_folder):
    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "qwen2_vl"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="'qwen2_vl' model.*qwen2_5_vl"):
        load_captioner(other)


def test_loads_hub_layout_weights_exactly(captioner, tiny_folder):
    from safetensors.torch import load_file

    stored = load_file(str(tiny_folder / "model.safetensors"))
    loaded = captioner.model.state_dict()
    for name, tensor in loaded.items():
        if name != "lm_head.weight":
            assert torch.equal(tensor, stored[hub_key(name)]), name
    assert torch.equal(loaded["lm_head.weight"], stored["model.embed_tokens.weight"])  # tied, as in the 3B
    assert captioner.device == torch.device("cpu") and captioner.dtype == torch.float32


def test_prompt_keeps_our_frame_size_and_official_timing(captioner, frames):
    prompt = captioner.prepare(frames, QUESTION, **SMALL)
    t = prompt.tensors
    # 6 frames of 56×84 → 3 temporal patches × 4 × 6 patches of 14 px (no second resize by the processor).
    assert t["video_grid_thw"].tolist() == [[3, 4, 6]]
    assert t["pixel_values_videos"].shape == (3 * 4 * 6, 3 * 2 * 14 * 14)
    video_id = captioner.model.config.video_token_id
    assert int((t["input_ids"] == video_id).sum()) == 3 * 4 * 6 // 4  # 2×2 spatial merge
    assert t["second_per_grid_ts"].tolist() == [SECONDS_PER_GRID] == [1.0]
    assert prompt.text.startswith("<|im_start|>system\nYou will be given a video.")
    assert prompt.text.endswith(f"<|vision_start|><|video_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


# ---- captioning --------------------------------------------------------------------------------------


def test_caption_is_reproducible_per_seed_and_leaves_rng_alone(captioner, frames):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = captioner.caption(frames, QUESTION, max_new_tokens=12, seed=0, decoding="policy", **SMALL)
    torch.testing.assert_close(torch.rand(3), expected_next)  # caller's RNG stream untouched
    again = captioner.caption(frames, QUESTION, max_new_tokens=12, seed=0, decoding="policy", **SMALL)
    other = captioner.caption(frames, QUESTION, max_new_tokens=12, seed=1, decoding="policy", **SMALL)
    assert first.raw == again.raw
    assert first.raw != other.raw
    assert 1 <= first.num_tokens <= 12 and first.seconds > 0
    assert first.caption == first.raw.strip() or "[Ans]" in first.raw


def test_tiny_top_p_is_greedy(captioner, frames):
    greedy = captioner.caption(frames, QUESTION, max_new_tokens=8, temperature=0, decoding="policy", **SMALL)
    for seed in (0, 1):
        nucleus = captioner.caption(frames, QUESTION, max_new_tokens=8, top_p=1e-6, seed=seed, decoding="policy",
                                    **SMALL)
        assert nucleus.raw == greedy.raw


@pytest.mark.parametrize("copy", ["hub", "release_era"])
def test_official_decoding_equals_the_official_generate_call(tmp_path, frames, copy):
    """The official inference calls generate(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=N) on a
    model loaded with from_pretrained, so transformers merges those four into the folder's generation_config.json
    and fills the rest with its defaults. Both copies of the Qwen2.5-VL-3B-Instruct file: today's (repetition
    penalty 1.05, top-k left to the default 50) and the release-era one (top-k 1: greedy). Reference: exactly that
    call on an independently loaded model, same prompt tensors, same seed."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vans.fixtures.qwen import HUB_SAMPLING_FIELDS, RELEASE_ERA_SAMPLING_FIELDS

    fields = HUB_SAMPLING_FIELDS if copy == "hub" else RELEASE_ERA_SAMPLING_FIELDS
    folder = write_tiny_qwen_vl(tmp_path / "qwen", sampling=fields)
    captioner = load_captioner(folder, device="cpu")
    reference_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, local_files_only=True,
                                                                         dtype=torch.float32).eval()
    assert reference_model.generation_config.repetition_penalty == 1.05
    prompt = captioner.prepare(frames, QUESTION, **SMALL)
    for seed in (7, 8):
        torch.manual_seed(seed)
        with torch.no_grad():
            expected = reference_model.generate(**prompt.tensors, max_new_tokens=16, do_sample=True, temperature=0.7,
                                                top_p=0.9)[:, prompt.length:]
        ours, logprobs = captioner._generate(prompt, num_sequences=1, temperature=0.7, top_p=0.9, max_new_tokens=16,
                                             seed=seed, desc="test", decoding="official")
        assert logprobs is None
        n = min(expected.shape[1], ours.shape[1])
        assert n > 0 and torch.equal(ours[:, :n], expected[:, :n])
    official = {captioner.caption(frames, QUESTION, max_new_tokens=12, seed=s, **SMALL).raw for s in (0, 1, 2)}
    policy = {captioner.caption(frames, QUESTION, max_new_tokens=12, seed=s, decoding="policy", **SMALL).raw
              for s in (0, 1, 2)}
    assert len(policy) > 1
    summary = captioner.decoding_summary("official", 0.7, 0.9)
    assert (summary["repetition_penalty"], summary["temperature"], summary["top_p"]) == (1.05, 0.7, 0.9)
    if copy == "release_era":  # top-k 1: the official captions do not depend on the seed
        assert len(official) == 1 and summary["top_k"] == 1 and summary["deterministic"]
    else:
        assert len(official) > 1 and summary["top_k"] == 50 and not summary["deterministic"]
    assert not captioner.is_deterministic("policy", 0.7)
    with pytest.raises(InputError, match="decoding='beam'"):
        captioner.caption(frames, QUESTION, decoding="beam", **SMALL)


def test_progress_ticks_once_per_token_and_cancel_stops(captioner, frames):
    ticks = []

    class Bar:
        def update(self, n=1):
            ticks.append(n)

        def close(self):
            pass

    with progress.use_reporter(lambda total, desc: Bar()):
        result = captioner.caption(frames, QUESTION, max_new_tokens=10, seed=0, **SMALL)
    assert len(ticks) == result.num_tokens
    count = iter(range(100))
    with progress.use_cancel_check(lambda: next(count) >= 3), pytest.raises(Cancelled):
        captioner.caption(frames, QUESTION, max_new_tokens=10, seed=0, **SMALL)


@pytest.mark.parametrize("question", ["", "  ", "x" * 100_000])
def test_bad_question_fails_before_generation(captioner, frames, question):
    with pytest.raises(InputError, match="question"):
        captioner.caption(frames, question, **SMALL)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens")])
def test_bad_sampling_settings(captioner, frames, kwargs, match):
    with pytest.raises(InputError, match=match):
        captioner.caption(frames, QUESTION, **SMALL, **kwargs)


# ---- GRPO group sampling ------------------------------------------------------------------------------


def test_completion_masks_by_first_end_token():
    eos = torch.tensor([7, 9])  # 9 doubles as the pad id, as <|endoftext|> does
    ids = torch.tensor([[1, 2, 7, 9, 9],
                        [1, 9, 9, 9, 9],
                        [1, 2, 3, 4, 5]])
    attention, action, lengths = _completion_masks(ids, eos, include_eos=True)
    assert attention.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert action.tolist() == attention.bool().tolist()
    assert lengths.tolist() == [3, 2, 5]
    _, official, _ = _completion_masks(ids, eos, include_eos=False)
    assert official.int().tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


@pytest.fixture(scope="module")
def group(captioner, frames):
    with progress.quiet():
        return captioner.sample_group(frames, QUESTION, group_size=8, max_new_tokens=16, seed=0, **SMALL)


def test_group_sample_shapes_and_masks(captioner, group):
    g, length = group.completion_ids.shape
    assert g == 8 == group.group_size and length <= 16
    assert group.logprobs.shape == group.attention_mask.shape == group.action_mask.shape == (8, length)
    assert group.logprobs.dtype == torch.float32
    assert len(group.texts) == len(group.responses) == len(group.lengths) == 8
    assert group.attention_mask.sum(1).tolist() == group.lengths
    assert len(set(group.lengths)) > 1, "the tiny model should end some completions early"
    eos = set(captioner.eos_token_ids)
    for row, n in zip(group.completion_ids.tolist(), group.lengths):
        assert not any(t in eos for t in row[: n - 1])  # no end token before the last counted one
        if n < length:
            assert row[n - 1] in eos
            assert all(t == captioner.pad_token_id for t in row[n:])
    valid = group.attention_mask.bool()
    assert bool((group.logprobs[valid] <= 0).all()) and bool(torch.isfinite(group.logprobs).all())
    assert bool((group.logprobs[~valid] == 0).all())
    assert len(set(group.texts)) > 1
    video_id = captioner.model.config.video_token_id
    assert not bool((group.completion_ids == video_id).any())


def test_recomputed_logprobs_equal_sampling_logprobs(captioner, group):
    with torch.no_grad():
        recomputed = captioner.completion_logprobs(group)
    mask = group.attention_mask.bool()
    torch.testing.assert_close(recomputed[mask], group.logprobs[mask], rtol=0, atol=1e-4)
    hotter = captioner.completion_logprobs(group, temperature=1.3).detach()
    assert not torch.allclose(hotter[mask], group.logprobs[mask], atol=1e-3)


def test_group_sampling_is_seeded(captioner, frames, group):
    again = captioner.sample_group(frames, QUESTION, group_size=8, max_new_tokens=16, seed=0, **SMALL)
    assert torch.equal(again.completion_ids, group.completion_ids)
    torch.testing.assert_close(again.logprobs, group.logprobs)


def test_lora_training_forward(tiny_folder, frames):
    """LoRA on the language model: gradients reach the adapters through the recomputed log-probs, and the
    reference (adapters off) is the base model."""
    policy = load_captioner(tiny_folder, device="cpu")
    base_group = policy.sample_group(frames, QUESTION, group_size=2, max_new_tokens=6, seed=3, **SMALL)
    with torch.no_grad():
        base = policy.completion_logprobs(base_group)
    add_lora(policy.model, r=4, alpha=8, dropout=0.0)
    assert not any("visual" in name for name in lora_modules(policy.model))
    with torch.no_grad():
        for module in lora_modules(policy.model).values():
            module.lora_B.weight.normal_(0, 0.3)
    logprobs = policy.completion_logprobs(base_group)
    (logprobs * base_group.action_mask).sum().backward()
    grads = [m.lora_A.weight.grad for m in lora_modules(policy.model).values()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert not torch.allclose(logprobs.detach(), base, atol=1e-3)
    with torch.no_grad(), adapters_disabled(policy.model):
        torch.testing.assert_close(policy.completion_logprobs(base_group), base, rtol=0, atol=1e-5)


# ---- the official VANS checkpoint ---------------------------------------------------------------------


@pytest.mark.parametrize("layout, prefix", [("hub", "pipe.mllm.mllm_backbone."), ("v5", "mllmagent.mllm_backbone.")])
def test_vans_checkpoint_is_merged_and_changes_outputs(tmp_path, tiny_folder, captioner, group, layout, prefix):
    from safetensors.torch import load_file

    path = write_tiny_vans_vlm_checkpoint(tmp_path / "vlm.safetensors", tiny_folder, layout=layout, prefix=prefix)
    tuned = load_captioner(tiny_folder, checkpoint=path, device="cpu")
    report = tuned.checkpoint_report
    assert report.format == "vans-peft"
    assert report.unexpected == [] and report.missing == [] and report.shape_mismatched == []
    assert report.merged_lora == 2 * 7 + 2 * 3  # 2 LM layers × 7 targets + 2 vision blocks × gate/up/down
    assert report.rank == 8 and report.alpha == 32

    sd = load_file(str(path))
    root = prefix + "base_model.model."
    lm = "model.layers.0.self_attn.q_proj" if layout == "hub" else "model.language_model.layers.0.self_attn.q_proj"
    vision = "visual.blocks.1.mlp.down_proj" if layout == "hub" else "model.visual.blocks.1.mlp.down_proj"
    for file_name, module in ((lm, "model.language_model.layers.0.self_attn.q_proj"),
                              (vision, "model.visual.blocks.1.mlp.down_proj")):
        a, b = sd[f"{root}{file_name}.lora_A.default.weight"], sd[f"{root}{file_name}.lora_B.default.weight"]
        expected = sd[f"{root}{file_name}.base_layer.weight"] + (32 / 8) * b @ a
        torch.testing.assert_close(tuned.model.get_submodule(module).weight, expected)

    with torch.no_grad():
        before = captioner.completion_logprobs(group)
        after = tuned.completion_logprobs(group)
    assert not torch.allclose(before, after, atol=1e-2)


def test_checkpoint_for_another_model_size_is_refused(tmp_path, tiny_folder):
    from vans.checkpoints import save_state_dict

    save_state_dict({"pipe.mllm.mllm_backbone.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight":
                     torch.zeros(8, 2048),
                     "pipe.mllm.mllm_backbone.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight":
                     torch.zeros(2048, 8)}, tmp_path / "vlm.safetensors")
    with pytest.raises(ModelFileError, match="different model size"):
        load_captioner(tiny_folder, checkpoint=tmp_path / "vlm.safetensors", device="cpu")


def test_offload_and_back(captioner, frames):
    captioner.offload()
    assert next(captioner.model.parameters()).device.type == "cpu"
    assert captioner.to("cpu") is captioner
    assert captioner.caption(frames, QUESTION, max_new_tokens=2, **SMALL).num_tokens >= 1
