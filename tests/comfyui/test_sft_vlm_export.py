"""VLM SFT exports in real ComfyUI: ``python -m trainer.sft_vlm``'s two files (adapter, merged), put in
``models/LLM`` and picked in VANS Load VLM, make VANS Next-Event Caption answer with the caption the tiny model
learned, the same raw text as the trained model in the trainer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

CAPTION = "the man will sit down"
CONFIGS = Path(__file__).resolve().parents[2] / "trainer" / "configs"


@pytest.fixture(scope="module")
def sft_run(comfyui, tmp_path_factory):
    """16 SFT steps on 8 clips sharing one caption (the last held out), from ComfyUI's tiny Qwen2.5-VL folder."""
    comfyui.models.need("vlm")
    from trainer.config import load_config
    from trainer.data import write_demo_dataset
    from trainer.runner import run_training, setup_runtime
    from trainer.sft_vlm import SftVlmConfig, SftVlmPolicy, load_split
    from vans import progress

    root = tmp_path_factory.mktemp("sft_vlm_comfy")
    data = write_demo_dataset(root / "data", count=8, captions=[CAPTION])
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[-1]["split"] = "val"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(SftVlmConfig, CONFIGS / "sft_vlm_tiny.yaml", [
        f"models_dir={comfyui.models.root}", f"data.path={data}", f"run.out_dir={root / 'run'}", "run.steps=16",
        "run.save_every=16", "run.prompts_per_step=4", "train.micro_batch=2", "val.every=0", "run.plot=false"])
    runtime = setup_runtime(cfg.run)
    train, heldout = load_split(cfg.data, require_think=True)
    policy = SftVlmPolicy(cfg, runtime, heldout)
    assert policy.base_model == comfyui.models.files["vlm"]
    with progress.quiet():
        result = run_training(cfg, policy, runtime=runtime, samples=train)
    llm = comfyui.models.files["vlm"].parent  # models/LLM, where VANS Load VLM lists checkpoints
    placed = [Path(shutil.copy(result.exports[kind], llm)) for kind in ("adapter", "merged")]
    yield policy, [p.name for p in placed]
    for path in placed:
        path.unlink()


def test_sft_vlm_exports_load_in_the_vlm_loader_node(comfyui, sft_run):
    from vans import progress
    from vans.video import read_video

    policy, names = sft_run
    nodes_vlm = comfyui.pack_submodule("nodes.vlm")
    assert set(names) <= set(nodes_vlm.checkpoint_choices())
    sample = policy.heldout[0]
    frames = read_video(sample.video).frames  # every frame of the clip, as Load Video + Get Video Components give
    with progress.quiet():
        expected = policy.generate(sample)  # greedy, the training's pixel budget
    assert expected.caption == CAPTION
    i = policy.cfg.input
    args = (frames, 8.0, None, sample.question, i.vlm_frames, 0.0, i.min_pixels, i.max_pixels, 0.0, 1.0, 48, 1, 0, True)
    folder = comfyui.models.files["vlm"].name
    base = nodes_vlm.caption(nodes_vlm.load_vlm(folder, "none", "fp32", "sdpa"), *args, decoding="policy")
    assert base[0][0] != CAPTION  # the random base model does not say it
    for name in names:
        handle = nodes_vlm.load_vlm(folder, name, "fp32", "sdpa")
        (caption, think, raw), = nodes_vlm.caption(handle, *args, decoding="policy")
        assert (caption, think, raw) == (CAPTION, sample.think, expected.raw), name
        trained = dict(policy.captioner.model.named_parameters())
        loaded = dict(handle.captioner.model.named_parameters())
        key = next(k for k in loaded if k.endswith("layers.0.self_attn.q_proj.weight"))
        lora_key = key.replace(".weight", ".base_layer.weight")
        delta = policy.lora[key[:-len(".weight")]].delta_weight()
        torch.testing.assert_close(loaded[key], trained[lora_key] + delta, rtol=0, atol=1e-5)
