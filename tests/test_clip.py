"""CLIP loading (shape-inferred architecture, refused file kinds), preprocessing, CLIP-V / CLIP-T scores.

The tiny random-weight model from ``vans.fixtures.clip`` goes through the same loader as LAION's file; an
independent reference is open_clip's own loader and PIL transform on the same file (``local-dir:``)."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vans.checkpoints import save_state_dict
from vans.clip import (
    clip_config_from_state_dict,
    clip_t_from_features,
    clip_v_from_features,
    clipscore,
    PAPER_ARCH,
    even_spread_indices,
    load_clip,
    resolve_clip_arch,
)
from vans.errors import Cancelled, InputError, ModelFileError
from vans.fixtures.clip import TINY_CLIP, tiny_clip_state_dict, write_tiny_clip
from vans.progress import quiet, use_cancel_check, use_reporter

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    write_tiny_clip(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(clip_dir):
    # GELU, like the open_clip reference config of test_features_match_open_clip_own_loader_and_transform
    return load_clip(clip_dir / "open_clip_model.safetensors", arch="ViT-B-32")


@pytest.fixture(autouse=True)
def _no_bars():
    with quiet():
        yield


def video(frames=4, height=48, width=80, seed=0):
    """Smooth random frames (low-frequency noise upsampled), so resizing is well behaved."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(frames, 3, 6, 10, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear").permute(0, 2, 3, 1)


# -- loading -------------------------------------------------------------------------------------

def test_tiny_file_loads_with_sizes_from_shapes(scorer):
    assert scorer.image_size == TINY_CLIP["image_size"]
    features = scorer.image_features(video(5))
    assert features.shape == (5, TINY_CLIP["embed_dim"]) and features.dtype == torch.float32
    assert torch.allclose(features.norm(dim=-1), torch.ones(5), atol=1e-5)
    text = scorer.text_features(["a cat", "a hand sprinkles cheese on the chicken"])
    assert text.shape == (2, TINY_CLIP["embed_dim"])
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16", "ViT-L-14"])
def test_inferred_config_matches_open_clip_configs(arch):
    named = open_clip.get_model_config(arch)
    with torch.device("meta"):  # real sizes, no memory
        model = open_clip.model.CLIP(named["embed_dim"], vision_cfg=open_clip.model.CLIPVisionCfg(**named["vision_cfg"]),
                                     text_cfg=open_clip.model.CLIPTextCfg(**named["text_cfg"]),
                                     quick_gelu=named.get("quick_gelu", False))
    inferred = clip_config_from_state_dict(model.state_dict(), {}, Path(f"{arch}.safetensors"))
    assert inferred["embed_dim"] == named["embed_dim"]
    for key, value in named["vision_cfg"].items():
        assert inferred["vision_cfg"][key] == value, key
    for key, value in named["text_cfg"].items():
        assert inferred["text_cfg"][key] == value, key


def test_features_match_open_clip_own_loader_and_transform(clip_dir, scorer):
    from PIL import Image

    config = dict(embed_dim=TINY_CLIP["embed_dim"],
                  vision_cfg=dict(image_size=64, layers=2, width=64, patch_size=32),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2))
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    model.eval()

    frame = (video(1, height=96, width=160)[0] * 255).round().to(torch.uint8)  # landscape: exercises the crop
    with torch.no_grad():
        reference = model.encode_image(preprocess(Image.fromarray(frame.numpy()))[None], normalize=True)
    ours = scorer.image_features(frame[None])
    assert torch.nn.functional.cosine_similarity(ours, reference).item() > 0.999
    portrait = frame.transpose(0, 1).contiguous()
    with torch.no_grad():
        reference = model.encode_image(preprocess(Image.fromarray(portrait.numpy()))[None], normalize=True)
    assert torch.nn.functional.cosine_similarity(scorer.image_features(portrait[None]), reference).item() > 0.999

    # Pixel noise: only an antialiased bicubic resize with the same crop and mean/std matches PIL this closely.
    noise = (torch.rand(200, 320, 3, generator=torch.Generator().manual_seed(0)) * 255).round().to(torch.uint8)
    reference_input = preprocess(Image.fromarray(noise.numpy()))
    assert (scorer.preprocess(noise[None])[0] - reference_input).abs().max() < 0.05

    texts = ["a dog runs across the street", "cheese"]
    with torch.no_grad():
        reference_text = model.encode_text(open_clip.tokenizer.SimpleTokenizer()(texts), normalize=True)
    assert torch.allclose(scorer.text_features(texts), reference_text, atol=1e-5)


def test_fp16_file_with_module_prefix_and_bf16_scorer(tmp_path, scorer):
    state_dict = {f"module.{k}": v.half() for k, v in tiny_clip_state_dict().items()}
    path = save_state_dict(state_dict, tmp_path / "clip_fp16.safetensors")
    frames = video(3)
    half = load_clip(path)
    assert torch.allclose(half.image_features(frames), scorer.image_features(frames), atol=1e-2)
    low = load_clip(path, dtype=torch.bfloat16)
    assert next(low.model.parameters()).dtype == torch.bfloat16
    assert low.image_features(frames).dtype == torch.float32
    assert torch.allclose(low.image_features(frames), scorer.image_features(frames), atol=5e-2)


def test_different_seed_gives_different_features(tmp_path, scorer):
    other = load_clip(write_tiny_clip(tmp_path / "other.safetensors", seed=1))
    frames = video(2)
    assert not torch.allclose(other.image_features(frames), scorer.image_features(frames), atol=1e-3)


def test_refuses_unrelated_safetensors(tmp_path):
    path = save_state_dict({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, tmp_path / "wan.safetensors")
    with pytest.raises(ModelFileError, match="not a CLIP model.*open_clip.*openai"):
        load_clip(path)


def test_refuses_transformers_clip_layout(tmp_path):
    sd = {"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 4, 4),
          "text_model.embeddings.token_embedding.weight": torch.zeros(10, 8)}
    with pytest.raises(ModelFileError, match="transformers"):
        load_clip(save_state_dict(sd, tmp_path / "model.safetensors"))


def test_refuses_image_tower_only(tmp_path):
    sd = {k: v for k, v in tiny_clip_state_dict().items() if k.startswith("visual.")}
    with pytest.raises(ModelFileError, match="image tower only"):
        load_clip(save_state_dict(sd, tmp_path / "visual.safetensors"))


def test_refuses_file_with_missing_tensors(tmp_path):
    sd = tiny_clip_state_dict()
    del sd["visual.ln_post.weight"]
    with pytest.raises(ModelFileError, match="visual.ln_post.weight"):
        load_clip(save_state_dict(sd, tmp_path / "broken.safetensors"))


def test_pickle_refused_unless_opted_in(tmp_path, scorer):
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(tiny_clip_state_dict(), path)
    with pytest.raises(ModelFileError, match="pickle"):
        load_clip(path)
    frames = video(2)
    assert torch.allclose(load_clip(path, allow_pickle=True, arch="ViT-B-32").image_features(frames), scorer.image_features(frames))


def test_torchscript_refused_even_with_pickles_allowed(tmp_path):
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.script(nn.Linear(2, 2)).save(str(path))
    for allow in (False, True):
        with pytest.raises(ModelFileError, match="TorchScript.*safetensors"):
            load_clip(path, allow_pickle=allow)


def test_unknown_arch_is_an_input_error(clip_dir):
    with pytest.raises(InputError, match="arch"):
        load_clip(clip_dir / "open_clip_model.safetensors", arch="NoSuchModel")


# -- scores --------------------------------------------------------------------------------------

def test_even_spread_indices_hand_values():
    assert even_spread_indices(9, 6).tolist() == [0, 2, 3, 5, 6, 8]  # 0, 1.6, 3.2, 4.8, 6.4, 8
    assert even_spread_indices(5, 3).tolist() == [0, 2, 4]
    assert even_spread_indices(2, 4).tolist() == [0, 0, 1, 1]
    assert even_spread_indices(4, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(InputError):
        even_spread_indices(0, 3)


def test_clip_v_of_identical_videos_is_one(scorer):
    frames = video(4)
    assert scorer.clip_v(frames, frames) == pytest.approx(1.0, abs=1e-5)
    assert scorer.clip_v(frames, frames.flip(0)) < 1.0 - 1e-4


def test_clip_v_resamples_the_gt_to_the_generated_frame_count(scorer):
    gt, gen = video(5, seed=1), video(3, seed=2)
    assert scorer.clip_v(gt[[0, 2, 4]], gt) == pytest.approx(1.0, abs=1e-5)
    gen_f, gt_f = scorer.image_features(gen), scorer.image_features(gt)
    manual = sum(float(gen_f[i] @ gt_f[j]) for i, j in enumerate([0, 2, 4])) / 3
    assert scorer.clip_v(gen, gt) == pytest.approx(manual, abs=1e-5)


def test_clip_t_is_the_mean_frame_text_cosine(scorer):
    frames = video(3)
    image_f, text_f = scorer.image_features(frames), scorer.text_features("a cat on a mat")
    expected = float((image_f @ text_f[0]).mean())
    assert scorer.clip_t(frames, "a cat on a mat") == pytest.approx(expected, abs=1e-5)
    assert -1.0 <= expected <= 1.0
    assert scorer.clip_t(frames, "a cat on a mat") != pytest.approx(scorer.clip_t(frames, "a red car"), abs=1e-4)
    single = frames[:1]
    assert scorer.clip_t(single.expand(4, -1, -1, -1), "x") == pytest.approx(scorer.clip_t(single, "x"), abs=1e-5)


def test_group_scores_equal_per_item_scores(scorer):
    gt = video(4, seed=3)
    videos = torch.stack([video(4, seed=s) for s in (4, 5, 6)])
    group = scorer.clip_v_group(videos, gt, batch_size=5)  # batches straddle videos
    assert group.shape == (3,) and group.device.type == "cpu"
    assert group.tolist() == pytest.approx([scorer.clip_v(v, gt) for v in videos], abs=1e-5)

    texts = ["a cat", "a dog", "a pan"]
    assert scorer.clip_t_group(videos, texts).tolist() == pytest.approx(
        [scorer.clip_t(v, t) for v, t in zip(videos, texts)], abs=1e-5)
    assert scorer.clip_t_group(videos, "a cat").tolist() == pytest.approx(
        [scorer.clip_t(v, "a cat") for v in videos], abs=1e-5)
    with pytest.raises(InputError):
        scorer.clip_t_group(videos, ["a", "b"])


def test_group_of_videos_with_different_lengths_and_sizes(scorer):
    gt = video(4, seed=3)
    videos = [video(4, seed=7), video(2, height=64, width=64, seed=8), video(6, height=90, width=40, seed=9)]
    group = scorer.clip_v_group(videos, gt, batch_size=3)
    assert group.tolist() == pytest.approx([scorer.clip_v(v, gt) for v in videos], abs=1e-5)


def test_cached_gt_features_give_the_same_scores(scorer):
    gt, videos = video(4, seed=3), torch.stack([video(4, seed=s) for s in (4, 5)])
    cached = scorer.image_features(gt)
    assert torch.allclose(scorer.clip_v_group(videos, gt_features=cached), scorer.clip_v_group(videos, gt))
    with pytest.raises(InputError):
        scorer.clip_v_group(videos)


def test_batch_size_does_not_change_features(scorer):
    frames = video(7)
    assert torch.allclose(scorer.image_features(frames, batch_size=1), scorer.image_features(frames, batch_size=64),
                          atol=1e-5)
    uint8 = (frames * 255).round().to(torch.uint8)
    assert torch.allclose(scorer.image_features(uint8), scorer.image_features(uint8.float() / 255), atol=1e-6)


def test_pure_feature_functions():
    gen = torch.nn.functional.normalize(torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert torch.allclose(clip_v_from_features(gen, gen[0]), torch.stack([torch.tensor(1.0), (gen[1] * gen[0]).sum(-1).mean()]))
    text = gen[:, 0]
    assert torch.allclose(clip_t_from_features(gen, text), (gen @ text.unsqueeze(-1)).squeeze(-1).mean(-1))
    assert clipscore(0.3) == pytest.approx(0.75)
    assert clipscore(-0.2) == 0.0
    assert torch.equal(clipscore(torch.tensor([0.4, -1.0])), torch.tensor([1.0, 0.0]))


def test_bad_frames_are_input_errors(scorer):
    with pytest.raises(InputError, match=r"\[T, H, W, 3\]"):
        scorer.image_features(torch.rand(2, 8, 8, 4))
    with pytest.raises(InputError):
        scorer.image_features(torch.zeros(2, 8, 8, 3, dtype=torch.int32))
    with pytest.raises(InputError):
        scorer.image_features(torch.rand(0, 8, 8, 3))
    with pytest.raises(InputError):
        scorer.clip_v_group(torch.rand(2, 8, 8, 3), video(2))
    with pytest.raises(InputError):
        scorer.text_features([])


def test_progress_per_batch_and_cancel(scorer):
    updates = []

    class Bar:
        def __init__(self, total, desc):
            updates.append(("open", total, desc))

        def update(self, n=1):
            updates.append(("update", n))

        def close(self):
            pass

    with use_reporter(Bar):
        scorer.image_features(video(5), batch_size=2)
    assert updates[0][:2] == ("open", math.ceil(5 / 2))
    assert sum(1 for u in updates if u[0] == "update") == 3

    with use_cancel_check(lambda: True), pytest.raises(Cancelled):
        scorer.image_features(video(5), batch_size=2)


# -- architecture: QuickGELU (OpenAI, the paper's) vs GELU (LAION) ------------------------------------


def test_arch_auto_reads_config_then_name_then_logs_the_paper_default(tmp_path, caplog):
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    assert resolve_clip_arch(folder / "open_clip_model.safetensors") == ("ViT-B-32-quickgelu", "open_clip_config.json")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 512}}))
    assert resolve_clip_arch(folder / "open_clip_model.safetensors")[0] == "ViT-B-32"
    assert resolve_clip_arch(tmp_path / "clip_vit_b32_openai.safetensors")[0] == "ViT-B-32-quickgelu"
    assert resolve_clip_arch(tmp_path / "laion_b32.safetensors")[0] == "ViT-B-32"
    # the name earlier versions of this pack told users to give LAION's file keeps meaning LAION (GELU)
    assert resolve_clip_arch(tmp_path / "open_clip_ViT-B-32.safetensors")[0] == "ViT-B-32"
    assert resolve_clip_arch(tmp_path / "x.safetensors", "ViT-B-32") == ("ViT-B-32", "explicit")
    with caplog.at_level("WARNING", logger="vans"):
        assert resolve_clip_arch(tmp_path / "reward.safetensors") == (PAPER_ARCH, "default (the paper's OpenAI CLIP)")
    assert "cannot be told from its tensors" in caplog.text and "ViT-B-32" in caplog.text


@pytest.fixture(scope="module")
def openai_b32(tmp_path_factory):
    """open_clip's own real-size ViT-B-32-quickgelu with random weights, saved under the paper's file name."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    path = tmp_path_factory.mktemp("openai") / "clip_vit_b32_openai.safetensors"
    save_state_dict({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, path


def test_openai_weights_load_as_quickgelu_and_match_open_clip_own_model(openai_b32):
    model, path = openai_b32
    ours = load_clip(path)  # auto: the file name says openai
    assert (ours.arch, ours.model.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__) == \
        ("ViT-B-32-quickgelu", "QuickGELU")
    frames = video(3, height=224, width=224)
    pixels = ours.preprocess(frames)
    with torch.no_grad():
        reference = model.encode_image(pixels, normalize=True)
        text_ref = model.encode_text(open_clip.get_tokenizer("ViT-B-32-quickgelu")(["a hand pours sauce"]),
                                     normalize=True)
    # Same weights, same input, same float32 modules: equal up to float32 summation order.
    assert torch.allclose(ours.image_features(frames), reference, atol=1e-5)
    assert torch.allclose(ours.text_features(["a hand pours sauce"]), text_ref, atol=1e-5)
    # The same file read as GELU (the old default) gives other features, with no error: why arch matters.
    gelu = load_clip(path, arch="ViT-B-32")
    assert (gelu.image_features(frames) - reference).abs().max() > 1e-3
