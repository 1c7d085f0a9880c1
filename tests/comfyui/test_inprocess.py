"""The pack inside a real ComfyUI, in this process: registration, schemas, model management, and the
VLM and reward nodes run by ComfyUI's own executor on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[1] / "node_schema.json"


def snapshot_from_v1_info(info: dict, is_input_list: bool | None = None) -> dict:
    """The golden-file view of one node from ComfyUI's /object_info entry (V1 form of a V3 node).
    /object_info does not tell whether a node takes whole lists; pass it when known."""
    entry = {}
    for section in ("required", "optional"):
        rows = []
        for name in info["input_order"].get(section, []):
            spec = info["input"][section][name]
            options = spec[1] if len(spec) > 1 else {}
            rows.append([name, spec[0], options.get("default")])
        entry[section] = rows
    entry["outputs"] = [[n, t, bool(lst)] for n, t, lst in zip(info["output_name"], info["output"], info["output_is_list"])]
    entry["is_input_list"] = is_input_list
    entry["output_node"] = bool(info["output_node"])
    return entry


def v1_info(comfyui, node_id: str) -> dict:
    return comfyui.node_class(node_id).GET_NODE_INFO_V1()


def test_every_node_is_registered_as_in_the_golden_file(comfyui):
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    for node_id, expected in golden.items():
        info = v1_info(comfyui, node_id)
        assert snapshot_from_v1_info(info, bool(comfyui.node_class(node_id).INPUT_IS_LIST)) == expected, node_id
        assert info["python_module"].startswith("custom_nodes."), info["python_module"]
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), (node_id, name)


def test_v3_combos_are_checked_by_the_pack_when_it_runs(comfyui):
    """Accepted at validation (a failure there would drop the branch, see nodes/host.py), refused when run."""
    graph = {
        "1": {"class_type": "VANSLoadVLM", "inputs": {"model": "Qwen2.5-VL-3B-Instruct", "checkpoint": "none",
                                                      "dtype": "bf17", "attention": "sdpa"}},
        "2": {"class_type": "VANSNextEventCaption", "inputs": _caption_inputs(["1", 0], frames=None)},
    }
    ok, error, _, node_errors = comfyui.validate(graph)
    assert ok and node_errors == {}, json.dumps(node_errors)
    executor = comfyui.run_prompt(graph)
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    assert not executor.success and len(errors) == 1
    assert errors[0]["exception_message"].startswith("dtype: 'bf17' is not one of the choices")


def test_vlm_folders_are_listed_from_the_llm_key(comfyui):
    comfyui.models.need("vlm")
    vlm = comfyui.pack_submodule("nodes.vlm")
    assert "Qwen2.5-VL-3B-Instruct" in vlm.vlm_choices()
    assert "vlm.safetensors" in vlm.checkpoint_choices()
    assert not any(name.endswith("model.safetensors") for name in vlm.checkpoint_choices())


def _caption_inputs(vlm, frames, **overrides):
    inputs = {"vlm": vlm, "question": "What will happen next?", "fps": 8.0, "num_frames": 6, "sample_fps": 0.0,
              "min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28, "temperature": 0.7, "top_p": 0.9,
              "max_new_tokens": 12, "answers": 1, "seed": 3, "offload": True}
    if frames is not None:
        inputs["frames"] = frames
    inputs.update(overrides)
    return inputs


def _caption_graph(**overrides):
    return {
        "1": {"class_type": "VANSLoadVLM", "inputs": {"model": "Qwen2.5-VL-3B-Instruct", "checkpoint": "vlm.safetensors",
                                                      "dtype": "fp32", "attention": "sdpa"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 9, "color": 0x336699}},
        "3": {"class_type": "VANSNextEventCaption", "inputs": _caption_inputs(["1", 0], ["2", 0], **overrides)},
    }


def _loaded_vans_models():
    import comfy.model_management as mm

    return [m.model for m in mm.current_loaded_models if type(m.model.model).__name__ == "ModelHolder"]


def test_caption_node_runs_and_offloads_its_model(comfyui):
    comfyui.models.need("vlm")
    executor = comfyui.run_prompt(_caption_graph())
    assert executor.success, executor.status_messages
    ui = executor.history_result["outputs"]["3"]
    assert isinstance(ui["text"][0], str)
    assert _loaded_vans_models() == []  # offload=True: out of ComfyUI's loaded list again


def test_caption_node_keeps_the_model_loaded_until_comfy_frees_it(comfyui):
    import comfy.model_management as mm

    comfyui.models.need("vlm")
    executor = comfyui.run_prompt(_caption_graph(offload=False, seed=4))
    assert executor.success, executor.status_messages
    loaded = _loaded_vans_models()
    assert len(loaded) == 1
    mm.unload_all_models()  # what the "Unload models" button does
    assert _loaded_vans_models() == []


def test_caption_answers_make_a_list(comfyui):
    comfyui.models.need("vlm")
    graph = _caption_graph(answers=3, seed=5)
    executor = comfyui.run_prompt(graph)
    assert executor.success, executor.status_messages
    assert executor.history_result["outputs"]["3"]["text"][0].count("#") == 3


def test_same_seed_same_caption_different_seed_may_differ(comfyui):
    comfyui.models.need("vlm")
    caption = comfyui.pack_submodule("nodes.vlm")
    handle = caption.load_vlm("Qwen2.5-VL-3B-Instruct", "vlm.safetensors", "fp32", "sdpa")
    frames = torch.rand(9, 48, 64, 3, generator=torch.Generator().manual_seed(0))
    args = (handle, frames, 8.0, None, "What next?", 6, 0.0, 4 * 784, 16 * 784, 0.9, 0.95, 16, 1)
    first = caption.caption(*args, 11, True)
    again = caption.caption(*args, 11, True)
    assert first == again


# -- rewards: the node outputs are the engine's numbers ----------------------------------------
def _run_node(comfyui, node_id: str, **inputs):
    return comfyui.node_class(node_id).execute(**inputs).args


def test_text_reward_nodes_give_the_engine_scores(comfyui):
    rewards = pytest.importorskip("vans.rewards", reason="the engine's vans.rewards is not available")
    pred, ref = "A hand sprinkles cheese over the chicken.", "A hand sprinkles grated cheese on the chicken in a pan."
    raw = f"[Think]The cheese is ready.[/Think][Ans]{pred}[/Ans]"
    assert _run_node(comfyui, "VANSFormatReward", raw=raw) == (rewards.format_reward(raw),) == (1.0,)
    assert _run_node(comfyui, "VANSFormatReward", raw=pred) == (0.0,)
    assert _run_node(comfyui, "VANSRougeL", prediction=pred, reference=ref)[0] == pytest.approx(rewards.rouge_l(pred, ref))
    bleu = _run_node(comfyui, "VANSBleu", prediction=pred, reference=ref)
    assert list(bleu) == pytest.approx(list(rewards.bleu(pred, ref, max_n=4)))


def test_stage_reward_nodes_normalise_within_the_group(comfyui):
    rewards = pytest.importorskip("vans.rewards", reason="the engine's vans.rewards is not available")
    raws = ["[Think]a[/Think][Ans]a dog runs[/Ans]", "no tags at all", "[Think]b[/Think][Ans]a cat sits[/Ans]"]
    clip_v = [0.8, 0.5, 0.6]
    reward, fmt, rouge = _run_node(comfyui, "VANSStage1Reward", raw=raws, reference=["a dog runs fast"], clip_v=clip_v)
    expected = rewards.stage1_reward(raws, ["a dog runs fast"] * 3, clip_v, group_size=3)
    assert reward == pytest.approx([float(v) for v in expected["reward"]])
    assert fmt == [1.0, 0.0, 1.0]
    (r2,) = _run_node(comfyui, "VANSStage2Reward", clip_v=[0.1, 0.3], clip_t=[0.2, 0.2])
    assert r2 == pytest.approx([float(v) for v in rewards.stage2_reward([0.1, 0.3], [0.2, 0.2], group_size=2)["reward"]])


def test_clip_nodes_score_each_candidate_under_model_management(comfyui):
    comfyui.models.need("clip")
    clip_module = pytest.importorskip("vans.clip", reason="the engine's vans.clip is not available")
    import comfy.model_management as mm

    (handle,) = _run_node(comfyui, "VANSLoadCLIP", clip_name=comfyui.models.files["clip"].name, allow_pickle=False)
    generator = torch.Generator().manual_seed(0)
    videos = torch.rand(2 * 5, 40, 56, 3, generator=generator)  # two candidates of 5 frames, one batch
    reference = torch.rand(7, 40, 56, 3, generator=generator)
    (clip_v,) = _run_node(comfyui, "VANSClipVideoScore", clip=handle, video=videos, reference=reference, candidates=2)
    scorer = clip_module.load_clip(comfyui.models.files["clip"])
    expected = scorer.clip_v_group(list(videos.split(5)), reference)
    assert clip_v == pytest.approx(expected.tolist(), abs=1e-5)
    (clip_t,) = _run_node(comfyui, "VANSClipTextScore", clip=handle, video=videos, text="a red ball", candidates=2)
    assert clip_t == pytest.approx(scorer.clip_t_group(list(videos.split(5)), "a red ball").tolist(), abs=1e-5)
    assert any(m.model is handle.patcher for m in mm.current_loaded_models)  # placed by ComfyUI ...
    mm.unload_all_models()  # ... and freed by "Unload models"
    assert not any(m.model is handle.patcher for m in mm.current_loaded_models)
