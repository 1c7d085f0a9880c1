"""VDM SFT exports in real ComfyUI. Two short ``trainer.sft_vdm`` runs (full fine-tune and LoRA) on ComfyUI's tiny
Wan files; then the merged DiT read by core ``UNETLoader`` and the LoRA applied by core ``LoraLoaderModelOnly`` to
the start DiT both compute the trained model's velocity (the engine's, on the same inputs; the helpers and the
velocity readout of ``test_trainer_export``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_trainer_export import _close, _comfy_velocity, _engine_velocity

MODES = ("full", "lora")
CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"


@pytest.fixture(scope="module")
def sft_runs(comfyui, tmp_path_factory):
    comfyui.models.need("dit", "vae", "text_encoder")
    import folder_paths

    from trainer.config import load_config
    from trainer.data import load_samples, write_demo_dataset
    from trainer.runner import run_training
    from trainer.sft_vdm import SftVdmConfig, SftVdmPolicy
    from vans import progress

    work = tmp_path_factory.mktemp("sft_vdm_comfy")
    data = write_demo_dataset(work / "data", count=2)
    samples = load_samples(data).samples
    runs = {}
    for mode in MODES:
        cfg = load_config(SftVdmConfig, CONFIGS / "sft_vdm_tiny.yaml", [
            f"models_dir={comfyui.models.root}", f"data.path={data}", f"run.out_dir={work / mode}", "run.steps=2",
            "run.prompts_per_step=1", "run.plot=false", "val.every=0", "export.dtype=fp32", f"model.train_mode={mode}",
            "model.lora_targets=attn+ffn", "model.lora_rank=4", "model.lora_alpha=8", "optim.lr=1e-2",
            f"export.merged_name=vdm_sft_{mode}.safetensors"])
        policy = SftVdmPolicy(cfg)
        with progress.quiet():
            result = run_training(cfg, policy, samples=samples)
        for kind, key in (("dit", "diffusion_models"), ("lora", "loras")):
            if kind in result.exports:
                folder_paths.add_model_folder_path(key, str(result.exports[kind].parent))
        runs[mode] = (policy, result.exports)
    return runs


@pytest.mark.parametrize("mode", MODES)
def test_core_unet_loader_reads_the_merged_sft_dit(sft_runs, comfyui, mode):
    import nodes

    policy, exports = sft_runs[mode]
    model = nodes.NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet(exports["dit"].name, "default")[0]
    assert type(model.model).__name__ == "WAN21"
    v_comfy, v_trained = _comfy_velocity(model), _engine_velocity(policy.generator.dit)
    import comfy.sd

    v_base = _comfy_velocity(comfy.sd.load_diffusion_model(str(comfyui.models.files["dit"]),
                                                           model_options={"dtype": torch.float32}))
    assert _close(v_comfy, v_trained)  # ComfyUI on the merged file == the trained model in the engine
    assert not _close(v_comfy, v_base)  # and the training changed it


def test_core_lora_loader_applies_the_sft_lora(sft_runs, comfyui):
    import comfy.sd
    import nodes

    policy, exports = sft_runs["lora"]
    base = comfy.sd.load_diffusion_model(str(comfyui.models.files["dit"]), model_options={"dtype": torch.float32})
    v_base = _comfy_velocity(base)
    loader = nodes.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]()
    patched = loader.load_lora_model_only(base, exports["lora"].name, 1.0)[0]
    v_lora = _comfy_velocity(patched)
    assert not _close(v_lora, v_base)
    assert _close(v_lora, _engine_velocity(policy.generator.dit))  # core LoRA loader == the trained LoRA model
