"""Stage-2 exports in real ComfyUI: the LoRA file applied by core ``LoraLoaderModelOnly`` to ComfyUI's own
Wan model, the merged DiT loaded by ComfyUI's diffusion-model loader, and our engine on the merged file all
compute the same velocity (ComfyUI's CONST model returns x0 = x − σ·v, so v = (x − x0)/σ).
"""

from __future__ import annotations

import logging

import pytest
import torch

SIGMA = 0.6
LORA_NAME = "vans_stage2_lora.safetensors"
MERGED_NAME = "vdm_stage2.safetensors"


@pytest.fixture(scope="module")
def exports(comfyui, tmp_path_factory):
    """A LoRA-wrapped engine DiT (random adapters on attention and FFN) exported both ways."""
    comfyui.models.need("dit")
    import folder_paths

    from trainer import dit_lora
    from vans.lora import lora_modules
    from vans.wan import load_dit

    dit = load_dit(comfyui.models.files["dit"], dtype=torch.float32)
    dit_lora.prepare_dit(dit, "lora", targets="attn+ffn", rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in lora_modules(dit).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g) * 0.05)
    out = tmp_path_factory.mktemp("stage2_export")
    lora = dit_lora.export_comfy_lora(dit, out / "loras" / LORA_NAME, dtype="fp32")
    merged = dit_lora.export_merged_dit(dit, out / "diffusion_models" / MERGED_NAME, dtype="fp32")
    folder_paths.add_model_folder_path("loras", str(lora.parent))
    folder_paths.add_model_folder_path("diffusion_models", str(merged.parent))
    return {"dit": dit, "lora": lora, "merged": merged, "base": comfyui.models.files["dit"],
            "modules": len(lora_modules(dit))}


def _inputs():
    from tiny_wan import DIT

    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 3, 6, 8, generator=g)
    text = torch.randn(2, 7, DIT["text_dim"], generator=g) * 0.2
    return x, text


def _comfy_velocity(patcher) -> torch.Tensor:
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])  # applies the weight patches (LoRA) as in a real run
    x, text = _inputs()
    with torch.no_grad():
        x0 = patcher.model.apply_model(x, torch.full((x.shape[0],), SIGMA), c_crossattn=text)
    return (x - x0) / SIGMA


def _engine_velocity(dit) -> torch.Tensor:
    from vans.generator import VideoGenerator

    x, text = _inputs()
    no_context = x.new_zeros(1, 16, 0, x.shape[3], x.shape[4])
    with torch.no_grad():
        return VideoGenerator(dit, None, None).model_velocity(x, torch.tensor(SIGMA), no_context, text)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 5e-5 * b.abs().max())


def test_every_lora_key_is_mapped_by_comfyui(exports, caplog):
    import comfy.lora
    import comfy.sd
    import comfy.utils

    model = comfy.sd.load_diffusion_model(str(exports["base"]), model_options={"dtype": torch.float32})
    lora = comfy.utils.load_torch_file(str(exports["lora"]), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patches) == exports["modules"] == 2 * 10  # 2 blocks × (8 attention + 2 FFN linears)
    assert "diffusion_model.blocks.0.self_attn.q.weight" in patches
    assert "diffusion_model.blocks.1.ffn.2.weight" in patches


def test_core_lora_loader_equals_the_merged_dit_in_comfyui_and_in_the_engine(exports):
    import comfy.sd
    import nodes

    from vans.wan import load_dit

    base = comfy.sd.load_diffusion_model(str(exports["base"]), model_options={"dtype": torch.float32})
    v_base = _comfy_velocity(base)
    patched = nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]().load_lora_model_only(base, LORA_NAME, 1.0)[0]
    v_lora = _comfy_velocity(patched)
    merged = comfy.sd.load_diffusion_model(str(exports["merged"]), model_options={"dtype": torch.float32})
    v_merged = _comfy_velocity(merged)
    v_engine_merged = _engine_velocity(load_dit(exports["merged"], dtype=torch.float32))
    v_engine_lora = _engine_velocity(exports["dit"])

    assert not _close(v_lora, v_base)  # the LoRA changes the model
    assert _close(v_lora, v_merged)  # core LoRA loader == merged file, both in ComfyUI
    assert _close(v_merged, v_engine_merged)  # ComfyUI == engine on the merged file
    assert _close(v_engine_merged, v_engine_lora)  # merged file == the trained LoRA model


def test_core_unet_loader_reads_the_merged_file(exports):
    import nodes

    model = nodes.NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet(MERGED_NAME, "default")[0]
    assert type(model.model).__name__ == "WAN21"


# -- stage 1: the VLM exports in the VANS VLM loader node -----------------------------------------------

def test_stage1_exports_load_in_the_vlm_loader_node(comfyui):
    """The trainer's two stage-1 files (adapter, merged) picked in VANS Load VLM give the captions of the
    trained model itself (same frames, question and seed)."""
    comfyui.models.need("vlm")
    from vans.captioner import load_captioner
    from vans.checkpoints import save_state_dict
    from vans.lora import add_lora, lora_modules, merged_state_dict, save_lora
    from vans.video import sample_indices

    folder = comfyui.models.files["vlm"]
    trained = load_captioner(folder, device="cpu", dtype=torch.float32)
    add_lora(trained.model, r=8, alpha=32.0, dropout=0.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in lora_modules(trained.model).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g) * 0.3)
    adapter = save_lora(trained.model, folder.parent / "stage1_adapter.safetensors")
    merged = save_state_dict(merged_state_dict(trained.model), folder.parent / "stage1_merged.safetensors")

    caption = comfyui.pack_submodule("nodes.vlm")
    assert {adapter.name, merged.name} <= set(caption.checkpoint_choices())
    frames = torch.rand(9, 48, 64, 3, generator=torch.Generator().manual_seed(0))
    settings = dict(temperature=0.9, top_p=0.95, max_new_tokens=16, seed=11, min_pixels=4 * 784, max_pixels=16 * 784)
    expected = [r.raw for r in trained.sample_group(frames[sample_indices(9, 6)], "What next?", group_size=3,
                                                    num_frames=6, **settings).responses]
    base = caption.load_vlm(folder.name, "none", "fp32", "sdpa")
    for name in (adapter.name, merged.name):
        handle = caption.load_vlm(folder.name, name, "fp32", "sdpa")
        got = caption.caption(handle, frames, 8.0, None, "What next?", 6, 0.0, settings["min_pixels"],
                              settings["max_pixels"], settings["temperature"], settings["top_p"],
                              settings["max_new_tokens"], 3, settings["seed"], True, decoding="policy")
        assert [raw for _, _, raw in got] == expected, name  # three answers: one policy group draw
    base_q = dict(base.captioner.model.named_parameters())
    handle_q = dict(handle.captioner.model.named_parameters())
    key = next(k for k in handle_q if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not torch.equal(base_q[key], handle_q[key])  # the trained update is in the loaded weights
