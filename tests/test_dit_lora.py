"""Stage-2 DiT adapters and exports (trainer/dit_lora.py) on the tiny random-weight Wan DiT."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from trainer import dit_lora
from vans.errors import InputError
from vans.fixtures.wan import tiny_wan_dit
from vans.generator import VideoGenerator
from vans.lora import LoRALinear, adapters_disabled, lora_modules, merged_state_dict

TEXT_DIM = 32


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 2, 4, 4, generator=g)
    context = torch.randn(1, 16, 2, 4, 4, generator=g)
    text = torch.randn(2, 5, TEXT_DIM, generator=g)
    return x, context, text


def _velocity(dit, sigma: float = 0.7, seed: int = 0) -> torch.Tensor:
    x, context, text = _inputs(seed)
    with torch.no_grad():
        return VideoGenerator(dit, None, None).model_velocity(x, torch.tensor(sigma), context, text)


def _randomise_adapters(dit, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(dit).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g) * 0.05)


@pytest.fixture()
def lora_dit():
    dit = tiny_wan_dit(text_dim=TEXT_DIM).float()
    base = _velocity(dit)
    params = dit_lora.prepare_dit(dit, "lora", targets="attn", rank=4, alpha=8.0)
    return dit, base, params


def test_lora_wraps_the_attention_projections_and_trains_only_adapters(lora_dit):
    dit, _, params = lora_dit
    modules = lora_modules(dit)
    assert len(modules) == 2 * 8  # 2 blocks × (self + cross) × (q, k, v, o)
    assert {name.split(".", 2)[2] for name in modules} == set(dit_lora.ATTENTION_TARGETS)
    assert all(isinstance(m, LoRALinear) and isinstance(m.dropout, torch.nn.Identity) for m in modules.values())
    names = {n for n, p in dit.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert sum(p.numel() for p in params) == sum(t.numel() for t in dit_lora.trainable_state_dict(dit).values())


def test_fresh_lora_and_disabled_lora_equal_the_base(lora_dit):
    dit, base, _ = lora_dit
    assert torch.equal(_velocity(dit), base)
    _randomise_adapters(dit)
    adapted = _velocity(dit)
    assert (adapted - base).abs().max() > 1e-3  # the adapters do something
    with adapters_disabled(dit):
        assert torch.equal(_velocity(dit), base)
    assert torch.equal(_velocity(dit), adapted)  # and come back on exit


def test_reference_policy_swaps_for_lora_and_full():
    dit = tiny_wan_dit(text_dim=TEXT_DIM).float()
    base = _velocity(dit)
    gen = VideoGenerator(dit, None, None)
    dit_lora.prepare_dit(dit, "full")
    frozen = dit_lora.frozen_copy(dit)
    with torch.no_grad():
        dit.proj_out.weight.add_(0.1)
    x, context, text = _inputs()
    with torch.no_grad():
        trained = gen.model_velocity(x, torch.tensor(0.7), context, text)
        with dit_lora.reference_policy(gen, "full", frozen):
            ref = gen.model_velocity(x, torch.tensor(0.7), context, text)
    assert torch.equal(ref, base) and not torch.allclose(trained, base)
    assert gen.dit is dit
    with pytest.raises(InputError):
        with dit_lora.reference_policy(gen, "full", None):
            pass


def test_trainable_state_round_trip(lora_dit):
    dit, _, _ = lora_dit
    _randomise_adapters(dit, seed=3)
    saved = {k: v.clone() for k, v in dit_lora.trainable_state_dict(dit).items()}
    expected = _velocity(dit)
    _randomise_adapters(dit, seed=4)
    dit_lora.load_trainable_state_dict(dit, saved)
    assert torch.equal(_velocity(dit), expected)
    with pytest.raises(InputError, match="missing"):
        dit_lora.load_trainable_state_dict(dit, dict(list(saved.items())[1:]))


def test_merged_export_loads_with_load_dit_and_equals_the_lora_model(lora_dit, tmp_path):
    from vans.wan import load_dit

    dit, base, _ = lora_dit
    _randomise_adapters(dit)
    adapted = _velocity(dit)
    path = dit_lora.export_merged_dit(dit, tmp_path / "vdm.safetensors", dtype="fp32")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert "blocks.0.self_attn.q.weight" in keys and "head.modulation" in keys
    assert not any("lora" in k or "base_layer" in k for k in keys)
    merged = load_dit(path, dtype=torch.float32)
    out = _velocity(merged)
    assert (out - adapted).abs().max() <= 1e-5 * adapted.abs().max()
    assert (out - base).abs().max() > 1e-3
    assert torch.equal(_velocity(dit), adapted)  # exporting left the training model untouched


def test_comfy_lora_keys_and_weights_apply_to_the_wan_layout(lora_dit):
    from vans.wan.dit import to_wan_layout

    dit, _, _ = lora_dit
    _randomise_adapters(dit)
    lora = dit_lora.comfy_lora_state_dict(dit)
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in lora
    assert "diffusion_model.blocks.1.cross_attn.o.lora_B.weight" in lora
    assert lora["diffusion_model.blocks.0.self_attn.q.alpha"].item() == 8.0
    assert len(lora) == 3 * 16
    # ComfyUI's rule W + (alpha / r)·B·A on the Wan-named base weights gives the merged export's weights
    base = to_wan_layout({k.replace(".base_layer.", "."): v for k, v in dit.state_dict().items()
                          if ".lora_" not in k})
    merged = to_wan_layout(merged_state_dict(dit))
    for key in ("blocks.0.self_attn.q", "blocks.1.cross_attn.o"):
        a, b = lora[f"diffusion_model.{key}.lora_A.weight"], lora[f"diffusion_model.{key}.lora_B.weight"]
        alpha = lora[f"diffusion_model.{key}.alpha"].item()
        applied = base[f"{key}.weight"] + (alpha / a.shape[0]) * (b @ a)
        torch.testing.assert_close(applied, merged[f"{key}.weight"])


def test_full_mode_has_no_lora_export_and_bad_settings_are_named():
    dit = tiny_wan_dit(text_dim=TEXT_DIM).float()
    params = dit_lora.prepare_dit(dit, "full")
    assert len(params) == len(list(dit.parameters()))
    with pytest.raises(InputError, match="no LoRA adapters"):
        dit_lora.comfy_lora_state_dict(dit)
    with pytest.raises(InputError, match="train mode"):
        dit_lora.prepare_dit(tiny_wan_dit(text_dim=TEXT_DIM), "half")
    with pytest.raises(InputError, match="match no linear"):
        dit_lora.prepare_dit(tiny_wan_dit(text_dim=TEXT_DIM), "lora", targets="nonexistent.proj")
    with pytest.raises(InputError, match="export dtype"):
        dit_lora.export_merged_dit(dit, "unused.safetensors", dtype="fp64")
