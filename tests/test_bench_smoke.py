"""The benchmark's building blocks on the CPU at the tiny scale (the benchmarks themselves are not tests):
random-weight models served to the engine's loaders run ``vans.pipeline.answer`` end to end, the hooks
refuse other files and are removed afterwards, and the DiT FLOP count agrees with torch's counter."""

from __future__ import annotations

import pytest
import torch

from vans import progress
from vans.errors import ModelFileError


@pytest.fixture
def quiet():
    with progress.quiet():
        yield


def test_random_tiny_models_answer_end_to_end(tmp_path, quiet):
    import vans.wan
    from vans.bench import e2e_settings, sample_video
    from vans.fixtures.random_models import RandomModels
    from vans.pipeline import answer

    original = vans.wan.load_dit
    models = RandomModels("tiny", tmp_path / "models").vans_models(device="cpu", dtype=torch.float32)
    assert vans.wan.load_dit is original  # the hooks are gone once the models are loaded
    settings = e2e_settings("tiny")
    ans = answer(models, sample_video("tiny", tmp_path), "What will happen next?", settings)

    vs = settings.video
    assert ans.frames.shape == (vs.num_frames, vs.height, vs.width, 3)
    assert torch.isfinite(ans.frames).all() and ans.frames.std() > 0
    assert ans.caption.strip()
    # Sampled ids stay inside the tokenizer, so the caption is text, not dropped ids.
    tokenizer = models.captioner.processor.tokenizer
    assert int(models.captioner.banned_ids.max()) == models.captioner.model.get_input_embeddings().weight.shape[0] - 1
    assert int(models.captioner.banned_ids.min()) < len(tokenizer)  # the vision placeholders stay banned too


def test_hooks_serve_only_the_tree_and_are_restored(tmp_path):
    import vans.clip
    import vans.wan
    from vans.fixtures.random_models import RandomModels

    models = RandomModels("tiny", tmp_path / "models")
    before = (vans.wan.load_dit, vans.wan.load_vae, vans.clip.load_clip)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"x")
    with models.installed():
        with pytest.raises(ModelFileError, match="only .* is served"):
            vans.wan.load_dit(other)
        vae = vans.wan.load_vae(models.files["vae"], dtype=torch.float32)
        assert vae.encode(torch.rand(1, 5, 32, 32, 3)).shape == (1, 16, 2, 4, 4)
    assert (vans.wan.load_dit, vans.wan.load_vae, vans.clip.load_clip) == before
    with pytest.raises(ModelFileError):  # the placeholder is no weight file for the real loader
        vans.wan.load_vae(models.files["vae"])


def test_dit_flop_count_matches_torch_counter():
    from diffusers import WanTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    from vans.bench import dit_forward_flops, dit_tokens
    from vans.fixtures.wan import tiny_wan_dit_config

    dim, ffn, layers, text_len, rows = 256, 512, 2, 16, 2
    dit = WanTransformer3DModel(**tiny_wan_dit_config(text_dim=32, dim=dim, ffn_dim=ffn, num_layers=layers)).eval()
    x = torch.randn(rows, 16, 4, 16, 16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dit(hidden_states=x, timestep=torch.full((rows,), 500.0), encoder_hidden_states=torch.randn(rows, text_len, 32),
            return_dict=False)
    tokens = 4 * 8 * 8
    assert dit_tokens(13, 128, 128, 0) == tokens  # 4 latent frames of 16×16 latents in 2×2 patches
    ours = dit_forward_flops(rows, tokens, text_len, dim, ffn, layers, attention=False)
    # The counter sees the linear layers (SDPA is not counted on the CPU) plus the embedders and head we
    # leave out, which are a few percent at this tiny width and < 0.1% at the real one.
    assert 1.0 <= counter.get_total_flops() / ours < 1.05
