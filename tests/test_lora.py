"""LoRA wrapping, merging, export and the VANS checkpoint loader, on a toy model that has Qwen2.5-VL's
module names (transformers 5 layout) so the key mapping is exercised without loading transformers."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vans.checkpoints import read_metadata, save_state_dict
from vans.errors import ModelFileError
from vans.lora import (
    LoRALinear,
    adapters_disabled,
    add_lora,
    load_lora_state_dict,
    load_vlm_checkpoint,
    lora_metadata,
    lora_state_dict,
    lora_targets,
    merge_lora,
    merged_state_dict,
    save_lora,
)

DIM = 8


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(DIM, DIM)
        self.o_proj = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attention()
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x):
        return x + self.self_attn(self.norm(x))


class VisionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(DIM, DIM)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(DIM, DIM)

    def forward(self, x):
        return x + self.attn.qkv(torch.relu(self.mlp.gate_proj(x)))


class ToyVL(nn.Module):
    """model.visual.blocks.N / model.language_model.layers.N / lm_head, like Qwen2.5-VL under transformers 5."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Module()
        self.model.visual = nn.Module()
        self.model.visual.blocks = nn.ModuleList([VisionBlock()])
        self.model.language_model = nn.Module()
        self.model.language_model.embed_tokens = nn.Embedding(5, DIM)
        self.model.language_model.layers = nn.ModuleList([Layer(), Layer()])
        self.lm_head = nn.Linear(DIM, 5, bias=False)

    def forward(self, x):
        x = self.model.visual.blocks[0](x)
        for layer in self.model.language_model.layers:
            x = layer(x)
        return self.lm_head(x)


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g))


@pytest.fixture
def x():
    return torch.randn(3, DIM, generator=torch.Generator().manual_seed(7))


def test_lora_linear_starts_as_the_base_and_has_peft_shapes(x):
    base = nn.Linear(DIM, 4)
    reference = base(x)
    lora = LoRALinear(base, r=2, alpha=8, dropout=0.0)
    assert lora.lora_A.weight.shape == (2, DIM)
    assert lora.lora_B.weight.shape == (4, 2)
    assert torch.count_nonzero(lora.lora_B.weight) == 0
    assert torch.count_nonzero(lora.lora_A.weight) > 0
    assert lora.scale == 4.0
    torch.testing.assert_close(lora(x), reference)


def test_lora_linear_forward_is_base_plus_scaled_low_rank_update(x):
    base = nn.Linear(DIM, 4)
    lora = LoRALinear(base, r=2, alpha=6, dropout=0.0)
    with torch.no_grad():
        lora.lora_A.weight.copy_(torch.arange(2 * DIM, dtype=torch.float32).view(2, DIM) / 10)
        lora.lora_B.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]]))
    expected = x @ base.weight.T + base.bias + 3.0 * (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)
    torch.testing.assert_close(lora(x), expected)
    lora.enabled = False
    torch.testing.assert_close(lora(x), base(x))


def test_dropout_only_acts_in_training(x):
    lora = LoRALinear(nn.Linear(DIM, 4), r=2, alpha=4, dropout=0.5)
    randomize_adapters(nn.Sequential(lora))
    lora.eval()
    torch.testing.assert_close(lora(x), lora(x))
    lora.train()
    torch.manual_seed(0)
    a = lora(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, lora(x))


def test_add_lora_wraps_language_model_targets_only_by_default():
    model = ToyVL()
    paths = add_lora(model, target_names=("q_proj", "o_proj", "gate_proj"), r=2, alpha=4)
    assert paths == [f"model.language_model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "o_proj")]
    assert isinstance(model.model.language_model.layers[1].self_attn.o_proj, LoRALinear)
    assert type(model.model.visual.blocks[0].mlp.gate_proj) is nn.Linear  # vision tower excluded
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_add_lora_can_include_the_vision_mlp_like_peft():
    model = ToyVL()
    names = lora_targets(model, ("q_proj", "gate_proj"), exclude=())
    assert "model.visual.blocks.0.mlp.gate_proj" in names
    assert not any(n.endswith("qkv") for n in names)


def test_add_lora_without_matches_is_an_error():
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_lora(ToyVL(), target_names=("nothing",))


def test_merge_equals_unmerged_forward(x):
    model = ToyVL()
    add_lora(model, r=2, alpha=4, dropout=0.0)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(x)
        merge_lora(model)
        merged = model(x)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.model.language_model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_merged_state_dict_is_the_merged_model_and_leaves_the_adapters(x):
    import copy

    model = ToyVL()
    add_lora(model, r=2, alpha=4, dropout=0.0)
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = merged_state_dict(model, dtype=torch.float64)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched, still adapted
    assert not any(".lora_" in k or ".base_layer." in k for k in sd)
    assert all(v.dtype == torch.float64 for v in sd.values())
    plain = merge_lora(copy.deepcopy(model))
    expected = plain.state_dict()
    assert sd.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(sd[key].float(), value, rtol=1e-6, atol=1e-6)


def test_merged_state_dict_keeps_tied_weights_once():
    model = ToyVL()
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # tied, as in Qwen2.5-VL-3B
    add_lora(model, r=2, alpha=4, dropout=0.0)
    sd = merged_state_dict(model)
    assert "lm_head.weight" not in sd and "model.language_model.embed_tokens.weight" in sd


def test_adapters_disabled_is_the_base_model_and_restores(x):
    base = ToyVL()
    with torch.no_grad():
        reference = base(x)
    model = ToyVL()
    add_lora(model, r=2, alpha=4, dropout=0.0)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, reference)
        with adapters_disabled(model):
            torch.testing.assert_close(model(x), reference)
        torch.testing.assert_close(model(x), adapted)
        with pytest.raises(RuntimeError):
            with adapters_disabled(model):
                raise RuntimeError("boom")
        torch.testing.assert_close(model(x), adapted)


def test_adapter_gradients_flow_and_base_stays_frozen(x):
    model = ToyVL()
    add_lora(model, r=2, alpha=4, dropout=0.0)
    randomize_adapters(model)
    model(x).sum().backward()
    q = model.model.language_model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.grad is not None and q.lora_A.weight.grad.abs().sum() > 0
    assert q.base_layer.weight.grad is None


def test_export_keys_metadata_and_round_trip(tmp_path, x):
    model = ToyVL()
    add_lora(model, target_names=("q_proj", "o_proj"), r=2, alpha=4, dropout=0.0)
    randomize_adapters(model)
    sd = lora_state_dict(model)
    assert sorted(sd) == sorted(
        f"model.language_model.layers.{i}.self_attn.{n}.lora_{ab}.weight"
        for i in range(2) for n in ("q_proj", "o_proj") for ab in "AB")
    meta = lora_metadata(model)
    assert meta == {"format": "vans-lora", "r": "2", "alpha": "4", "targets": "o_proj,q_proj", "modules": "4"}
    path = save_lora(model, tmp_path / "adapter.safetensors")
    assert read_metadata(path)["alpha"] == "4"

    other = ToyVL()  # same base seed
    add_lora(other, target_names=("q_proj", "o_proj"), r=2, alpha=4, dropout=0.0)
    report = load_lora_state_dict(other, sd)
    assert report.clean and report.merged_lora == 4
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))


def test_load_lora_state_dict_reports_mismatches():
    model = ToyVL()
    add_lora(model, target_names=("q_proj",), r=2, alpha=4)
    sd = lora_state_dict(model)
    broken = dict(sd)
    broken.pop("model.language_model.layers.1.self_attn.q_proj.lora_B.weight")
    broken["model.language_model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(3, DIM)
    broken["somewhere.else.lora_A.weight"] = torch.zeros(2, DIM)
    report = load_lora_state_dict(model, broken, strict=False)
    assert report.missing == ["model.language_model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert report.unexpected == ["somewhere.else.lora_A.weight"]
    assert len(report.shape_mismatched) == 1 and "[3, 8]" in report.shape_mismatched[0]
    with pytest.raises(ModelFileError):
        load_lora_state_dict(model, broken)


# ---- official VANS layout ---------------------------------------------------------------------------


def hub_name(name):
    """transformers 5 name -> transformers 4.4x (Hub) name."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def peft_file(path, model, pairs, *, prefix="pipe.mllm.mllm_backbone.", rename=hub_name, rank=2, seed=3):
    """A state dict as PEFT would save the wrapped model: base weights (wrapped ones under base_layer) + pairs."""
    g = torch.Generator().manual_seed(seed)
    sd, adapters = {}, {}
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        key = rename(name)
        if module in pairs:
            key_module = rename(module + ".weight")[: -len(".weight")]
            sd[f"{prefix}base_model.model.{key_module}.base_layer.{leaf}"] = tensor.clone()
            if leaf == "weight":
                a = torch.randn(rank, tensor.shape[1], generator=g)
                b = torch.randn(tensor.shape[0], rank, generator=g)
                sd[f"{prefix}base_model.model.{key_module}.lora_A.default.weight"] = a
                sd[f"{prefix}base_model.model.{key_module}.lora_B.default.weight"] = b
                adapters[module] = (a, b)
        else:
            sd[f"{prefix}base_model.model.{key}"] = tensor.clone()
    save_state_dict(sd, path)
    return adapters


PAIRS = ("model.language_model.layers.0.self_attn.q_proj", "model.visual.blocks.0.mlp.gate_proj")


@pytest.mark.parametrize("prefix", ["pipe.mllm.mllm_backbone.", "mllmagent.mllm_backbone.", ""])
@pytest.mark.parametrize("rename", [hub_name, lambda n: n], ids=["transformers4-names", "transformers5-names"])
def test_vans_peft_file_merges_hand_computed_delta(tmp_path, prefix, rename):
    source = ToyVL(seed=5)  # the file's base weights differ from the model's
    adapters = peft_file(tmp_path / "vlm.safetensors", source, PAIRS, prefix=prefix, rename=rename)
    model = ToyVL(seed=0)
    report = load_vlm_checkpoint(model, tmp_path / "vlm.safetensors")
    assert report.format == "vans-peft"
    assert report.clean, report.summary()
    assert report.merged_lora == 2 and report.rank == 2 and report.alpha == 32
    assert report.applied == len(source.state_dict())
    for name in PAIRS:
        a, b = adapters[name]
        expected = source.get_submodule(name).weight + (32 / 2) * b @ a  # W += (alpha/r) B A, alpha 32
        torch.testing.assert_close(model.get_submodule(name).weight, expected)
    untouched = "model.language_model.layers.1.self_attn.o_proj"
    torch.testing.assert_close(model.get_submodule(untouched).weight, source.get_submodule(untouched).weight)


def test_alpha_from_metadata_or_argument(tmp_path):
    source = ToyVL(seed=5)
    adapters = peft_file(tmp_path / "vlm.safetensors", source, PAIRS[:1])
    sd = load_file(str(tmp_path / "vlm.safetensors"))
    save_state_dict(sd, tmp_path / "meta.safetensors", metadata={"lora_alpha": "4"})
    a, b = adapters[PAIRS[0]]
    for path, kwargs, scale in ((tmp_path / "meta.safetensors", {}, 4 / 2),
                                (tmp_path / "vlm.safetensors", {"alpha": 1.0}, 1 / 2)):
        model = ToyVL(seed=0)
        load_vlm_checkpoint(model, path, **kwargs)
        torch.testing.assert_close(model.get_submodule(PAIRS[0]).weight,
                                   source.get_submodule(PAIRS[0]).weight + scale * b @ a)


def test_loading_into_a_model_that_already_has_adapters(tmp_path, x):
    source = ToyVL(seed=5)
    adapters = peft_file(tmp_path / "vlm.safetensors", source, PAIRS)
    model = ToyVL(seed=0)
    add_lora(model, r=2, alpha=4)
    report = load_vlm_checkpoint(model, tmp_path / "vlm.safetensors")
    assert report.clean, report.summary()
    a, b = adapters[PAIRS[0]]
    torch.testing.assert_close(model.get_submodule(PAIRS[0]).base_layer.weight,
                               source.get_submodule(PAIRS[0]).weight + 16 * b @ a)


def test_report_lists_unexpected_missing_and_mismatched(tmp_path):
    source = ToyVL(seed=5)
    sd = {f"pipe.mllm.mllm_backbone.base_model.model.{hub_name(k)}": v for k, v in source.state_dict().items()}
    sd.pop("pipe.mllm.mllm_backbone.base_model.model.lm_head.weight")
    sd["pipe.mllm.mllm_backbone.base_model.model.model.extra_query.weight"] = torch.zeros(2, 2)
    sd["pipe.mllm.mllm_backbone.base_model.model.model.layers.0.norm.weight"] = torch.zeros(DIM + 1)
    save_state_dict(sd, tmp_path / "vlm.safetensors")
    model = ToyVL(seed=0)
    report = load_vlm_checkpoint(model, tmp_path / "vlm.safetensors")
    assert report.unexpected == ["model.extra_query.weight"]
    assert report.missing == ["model.language_model.layers.0.norm.weight", "lm_head.weight"]
    assert report.shape_mismatched == ["model.layers.0.norm.weight: file [9] vs model [8]"]
    assert "1 unexpected" in report.summary()
    with pytest.raises(ModelFileError, match="does not fit"):
        load_vlm_checkpoint(ToyVL(seed=0), tmp_path / "vlm.safetensors", strict=True)


def test_our_export_merges_into_a_plain_model(tmp_path, x):
    model = ToyVL()
    add_lora(model, r=2, alpha=4, dropout=0.0)
    randomize_adapters(model)
    save_lora(model, tmp_path / "ours.safetensors")
    fresh = ToyVL()
    report = load_vlm_checkpoint(fresh, tmp_path / "ours.safetensors")
    assert report.format == "vans-lora" and report.clean and report.alpha == 4
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-5)


def test_tied_output_layer_stored_twice_is_not_unexpected(tmp_path):
    """PEFT's state dict lists a tied lm_head under both names; both land on the one shared tensor."""
    source = ToyVL(seed=5)
    source.lm_head.weight = source.model.language_model.embed_tokens.weight
    sd = {f"base_model.model.{hub_name(k)}": v.clone() for k, v in source.state_dict().items()}
    assert "base_model.model.lm_head.weight" in sd and "base_model.model.model.embed_tokens.weight" in sd
    save_state_dict(sd, tmp_path / "vlm.safetensors")
    model = ToyVL(seed=0)
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    report = load_vlm_checkpoint(model, tmp_path / "vlm.safetensors")
    assert report.clean, report.summary()
    torch.testing.assert_close(model.lm_head.weight, source.lm_head.weight)


def test_file_with_nothing_that_fits_is_refused(tmp_path):
    save_state_dict({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, tmp_path / "dit.safetensors")
    with pytest.raises(ModelFileError, match="no tensor that fits"):
        load_vlm_checkpoint(ToyVL(), tmp_path / "dit.safetensors")


def test_pickle_checkpoint_is_refused_unless_allowed(tmp_path):
    torch.save({"lm_head.weight": torch.zeros(5, DIM)}, tmp_path / "vlm.pt")
    with pytest.raises(ModelFileError, match="pickle"):
        load_vlm_checkpoint(ToyVL(), tmp_path / "vlm.pt")
    report = load_vlm_checkpoint(ToyVL(), tmp_path / "vlm.pt", allow_pickle=True)
    assert report.applied == 1
