"""Wan2.1 loading (DiT, umT5, VAE) from every file layout, on tiny random-weight files in the real formats.

Each layout is checked against the in-memory model it was written from (same tensors, same outputs),
and every wrong file is refused with a message that says what it is and what was expected.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vans.errors import InputError, ModelFileError
from vans.fixtures.wan import (
    tiny_umt5_state_dict,
    tiny_wan_dit,
    tiny_wan_vae,
    wan_dit_meta_state_dict,
    write_header_only_safetensors,
    write_tiny_umt5,
    write_tiny_umt5_tokenizer,
    write_tiny_wan_dit,
    write_tiny_wan_vae,
)
from vans.wan import (
    check_text_encoder_matches,
    detect_checkpoint_kind,
    inspect_dit_state_dict,
    load_dit,
    load_text_encoder,
    load_vae,
)
from vans.wan.dit import to_diffusers_layout, to_wan_layout
from vans.wan.text_encoder import inspect_umt5_state_dict
from vans.wan.vae import inspect_vae_state_dict

TEXT_DIM = 32
DIT_LAYOUTS = ("wan", "comfy_prefixed", "diffusers_file", "diffusers_folder")


def _keys(path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def _meta(sd: dict) -> dict:
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}


# -- session fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def wan_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("wan")


@pytest.fixture(scope="session")
def dit_files(wan_dir):
    files = {}
    for layout in DIT_LAYOUTS:
        target = wan_dir / ("dit_folder" if layout == "diffusers_folder" else f"dit_{layout}.safetensors")
        files[layout] = write_tiny_wan_dit(target, layout=layout, text_dim=TEXT_DIM,
                                           shards=3 if layout == "diffusers_folder" else 1)
    return files


@pytest.fixture(scope="session")
def dit_reference():
    return tiny_wan_dit(TEXT_DIM)


@pytest.fixture(scope="session")
def dit_inputs():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, 3, 8, 8, generator=gen), torch.tensor([700.0]),
            torch.randn(1, 9, TEXT_DIM, generator=gen))


@pytest.fixture(scope="session")
def vae_files(wan_dir):
    return {"wan": write_tiny_wan_vae(wan_dir / "wan_2.1_vae.safetensors", layout="wan"),
            "diffusers_folder": write_tiny_wan_vae(wan_dir / "vae_folder", layout="diffusers_folder"),
            "wan_pth": write_tiny_wan_vae(wan_dir / "Wan2.1_VAE.pth", layout="wan_pth")}


@pytest.fixture(scope="session")
def vae(vae_files):
    return load_vae(vae_files["wan"], dtype=torch.float32)


@pytest.fixture(scope="session")
def umt5_files(wan_dir):
    return {"comfy": write_tiny_umt5(wan_dir / "umt5_xxl_fp16.safetensors"),
            "fp8": write_tiny_umt5(wan_dir / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", fp8_scaled=True),
            "diffusers_folder": write_tiny_umt5(wan_dir / "pipeline", layout="diffusers_folder"),
            "wan_pth": write_tiny_umt5(wan_dir / "wan_t5" / "models_t5_umt5-xxl-enc-bf16.pth", layout="wan_pth")}


@pytest.fixture(scope="session")
def text_encoder(umt5_files):
    return load_text_encoder(umt5_files["comfy"], dtype=torch.float32)


# -- DiT: layouts -------------------------------------------------------------------------------

def test_dit_files_are_tiny_and_use_the_real_key_names(dit_files, wan_dir):
    wan_keys = _keys(dit_files["wan"])
    for name in ("patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight",
                 "time_projection.1.weight", "blocks.1.self_attn.q.weight", "blocks.0.self_attn.norm_q.weight",
                 "blocks.0.cross_attn.k.weight", "blocks.0.norm3.weight", "blocks.0.ffn.0.weight",
                 "blocks.0.modulation", "head.head.weight", "head.modulation"):
        assert name in wan_keys
    assert not any("attn1" in k or "scale_shift_table" in k for k in wan_keys)
    assert all(k.startswith("model.diffusion_model.") for k in _keys(dit_files["comfy_prefixed"]))
    folder = dit_files["diffusers_folder"] / "transformer"
    assert (folder / "config.json").is_file()
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(folder.glob("diffusion_pytorch_model-*-of-00003.safetensors"))) == 3
    for path in wan_dir.glob("dit_*.safetensors"):
        assert path.stat().st_size < 5_000_000


@pytest.mark.parametrize("layout", DIT_LAYOUTS)
def test_dit_layout_loads_the_tensors_it_was_written_from(layout, dit_files, dit_reference, dit_inputs):
    model = load_dit(dit_files[layout], dtype=torch.float32)
    loaded, reference = model.state_dict(), dit_reference.state_dict()
    assert loaded.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(loaded[key], tensor), key
    with torch.no_grad():
        out = model(*dit_inputs, return_dict=False)[0]
        expected = dit_reference(*dit_inputs, return_dict=False)[0]
    assert out.shape == dit_inputs[0].shape
    assert expected.abs().mean() > 1e-3  # a real computation, not zeros
    assert torch.equal(out, expected)


def test_dit_architecture_is_inferred_from_shapes(dit_files):
    config = load_dit(dit_files["wan"], dtype=torch.float32).config
    assert (config.num_attention_heads, config.attention_head_dim) == (2, 128)  # 256 / 128
    assert (config.num_layers, config.ffn_dim, config.text_dim, config.freq_dim) == (2, 256, TEXT_DIM, 256)
    assert (config.in_channels, config.out_channels, tuple(config.patch_size)) == (16, 16, (1, 2, 2))


def test_dit_in_bf16_keeps_diffusers_fp32_modules(dit_files, dit_inputs, dit_reference):
    model = load_dit(dit_files["comfy_prefixed"], dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["proj_out.weight"] == torch.bfloat16
    for name in ("scale_shift_table", "blocks.0.scale_shift_table", "blocks.0.norm2.weight",
                 "condition_embedder.time_embedder.linear_1.weight"):
        assert dtypes[name] == torch.float32, name
    x, t, text = dit_inputs
    with torch.no_grad():
        out = model(x.bfloat16(), t, text.bfloat16(), return_dict=False)[0].float()
        expected = dit_reference(x, t, text, return_dict=False)[0]
    assert torch.allclose(out, expected, atol=0.1 * expected.abs().max().item())


def test_cast_dit_gives_the_dtypes_load_dit_gives(dit_files):
    import copy

    from vans.wan.dit import cast_dit

    loaded = load_dit(dit_files["wan"], dtype=torch.bfloat16)
    cast = cast_dit(copy.deepcopy(load_dit(dit_files["wan"], dtype=torch.float32)), torch.bfloat16)
    assert {n: p.dtype for n, p in cast.named_parameters()} == {n: p.dtype for n, p in loaded.named_parameters()}
    assert len({p.dtype for p in cast.parameters()}) == 2  # bf16 and the fp32 modules


def test_wan_and_diffusers_names_are_inverse(dit_reference):
    sd = dit_reference.state_dict()
    wan = to_wan_layout(sd)
    assert set(to_diffusers_layout(wan)) == set(sd)
    assert wan["head.modulation"] is sd["scale_shift_table"]
    assert wan["blocks.1.norm3.weight"] is sd["blocks.1.norm2.weight"]  # the cross-attention norm


# -- DiT: wrong files ---------------------------------------------------------------------------

def _tiny_meta_wan_dit() -> dict:
    return wan_dit_meta_state_dict(256, 2, 256, text_dim=TEXT_DIM)


def test_real_1_3b_shapes_are_accepted():
    plan, _ = inspect_dit_state_dict(wan_dit_meta_state_dict(1536, 30, 8960), "wan2.1_t2v_1.3B_bf16.safetensors")
    assert plan.config["num_attention_heads"] == 12 and plan.config["num_layers"] == 30


@pytest.mark.parametrize("shape, expected", [
    (dict(dim=5120, num_layers=40, ffn_dim=13824), "14B"),
    (dict(dim=3072, num_layers=30, ffn_dim=14336, in_channels=48, out_channels=48), "Wan2.2"),
    (dict(dim=1536, num_layers=30, ffn_dim=8960, in_channels=36), "I2V"),
    (dict(dim=1536, num_layers=29, ffn_dim=8960), "incomplete"),
])
def test_other_wan_dits_are_refused_from_their_shapes(shape, expected):
    with pytest.raises(ModelFileError, match=expected) as info:
        inspect_dit_state_dict(wan_dit_meta_state_dict(**shape), "model.safetensors")
    message = str(info.value)
    assert "model.safetensors" in message and "\n" not in message
    if expected != "incomplete":
        assert "expected a Wan2.1 T2V DiT (16 input channels, no image embedding)" in message


def test_a_14b_file_is_refused_from_its_header_alone(wan_dir):
    # The header describes 28 GB of weights but the file holds none: only a header-only check gets to "14B".
    path = write_header_only_safetensors(wan_dir / "wan2.1_t2v_14B_bf16.safetensors",
                                         {k: v.to(torch.bfloat16) for k, v in
                                          wan_dit_meta_state_dict(5120, 40, 13824).items()})
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ModelFileError, match="14B"):
        load_dit(path, dtype=torch.bfloat16)


@pytest.mark.parametrize("extra, expected", [
    ({"img_emb.proj.1.weight": (1536, 1280), "blocks.0.cross_attn.k_img.weight": (256, 256)}, "I2V"),
    ({"vace_blocks.0.after_proj.weight": (256, 256), "vace_patch_embedding.weight": (256, 96, 1, 2, 2)}, "VACE"),
    ({"motion_encoder.enc.fc.0.weight": (8, 8)}, "Animate"),
])
def test_wan_variants_are_refused_by_their_extra_modules(extra, expected):
    sd = _tiny_meta_wan_dit()
    sd.update({k: torch.empty(shape, device="meta") for k, shape in extra.items()})
    with pytest.raises(ModelFileError, match=expected):
        inspect_dit_state_dict(sd, "odd.safetensors")


def test_a_vae_or_text_encoder_given_as_dit_is_named(vae_files, umt5_files):
    with pytest.raises(ModelFileError, match=r"wan_2\.1_vae\.safetensors is a Wan VAE; expected a Wan2\.1 T2V DiT"):
        load_dit(vae_files["wan"])
    with pytest.raises(ModelFileError, match="is a umT5 text encoder; expected a Wan2.1 T2V DiT"):
        load_dit(umt5_files["comfy"])


def test_a_random_safetensors_file_is_refused(wan_dir):
    path = wan_dir / "random.safetensors"
    save_file({"layer.weight": torch.randn(4, 4)}, str(path))
    with pytest.raises(ModelFileError, match="not a model file we recognise"):
        load_dit(path)


def test_missing_weights_are_named(dit_files, wan_dir):
    sd = load_file(str(dit_files["wan"]))
    one_gone = {k: v for k, v in sd.items() if k != "blocks.1.self_attn.q.weight"}
    save_file(one_gone, str(wan_dir / "one_gone.safetensors"))
    one_missing = r"missing 1 of the \d+ weights .*first: blocks\.1\.self_attn\.q\.weight\)"
    with pytest.raises(ModelFileError, match=one_missing):
        load_dit(wan_dir / "one_gone.safetensors")
    block_gone = {k: v for k, v in sd.items() if not k.startswith("blocks.0.")}
    save_file(block_gone, str(wan_dir / "block_gone.safetensors"))
    block_params = sum(1 for k in sd if k.startswith("blocks.0."))
    with pytest.raises(ModelFileError, match=rf"missing {block_params} of the .*first: blocks\.0\."):
        load_dit(wan_dir / "block_gone.safetensors")


def test_unexpected_weights_are_reported_and_ignored(dit_files, wan_dir, dit_reference, dit_inputs, caplog):
    sd = load_file(str(dit_files["wan"]))
    extra = {f"blocks.{i}.cross_attn.{name}.weight": torch.randn(256, 256).to(torch.bfloat16)
             for i in range(2) for name in ("k_mllm_query", "v_mllm_query")}
    save_file({**sd, **extra}, str(wan_dir / "vdm.safetensors"))
    with caplog.at_level(logging.WARNING, logger="vans.wan"):
        model = load_dit(wan_dir / "vdm.safetensors", dtype=torch.float32)
    assert "ignored 4 weights" in caplog.text and "k_mllm_query" in caplog.text
    assert len(model.vans_load_report.extra_keys) == 4
    with torch.no_grad():
        assert torch.equal(model(*dit_inputs, return_dict=False)[0], dit_reference(*dit_inputs, return_dict=False)[0])


def test_vans_pipeline_prefixes_are_stripped(dit_files, wan_dir, dit_reference):
    """The VANS loader puts ``dit.``/``pipe.dit.`` before DiT keys and ``pipe.mllm.`` before VLM keys."""
    sd = {f"pipe.dit.{k}": v for k, v in load_file(str(dit_files["wan"])).items()}
    vlm_key = "pipe.mllm.mllm_backbone.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    sd[vlm_key] = torch.zeros(8, 4)
    save_file(sd, str(wan_dir / "vdm_prefixed.safetensors"))
    model = load_dit(wan_dir / "vdm_prefixed.safetensors", dtype=torch.float32)
    assert model.vans_load_report.extra_keys == [vlm_key]
    assert torch.equal(model.state_dict()["blocks.1.attn2.to_k.weight"],
                       dit_reference.state_dict()["blocks.1.attn2.to_k.weight"])


def test_text_width_mismatch_between_dit_and_text_encoder_is_caught(dit_files, text_encoder):
    tiny = load_dit(dit_files["wan"], dtype=torch.float32)
    check_text_encoder_matches(tiny, text_encoder)
    wide = load_dit(write_tiny_wan_dit(dit_files["wan"].parent / "dit_wide.safetensors", text_dim=64),
                    dtype=torch.float32)
    with pytest.raises(ModelFileError, match="32-wide embeddings but the DiT reads 64"):
        check_text_encoder_matches(wide, text_encoder)


def test_corrupt_and_pickled_dit_files_are_refused(dit_files, wan_dir):
    sd = load_file(str(dit_files["wan"]))
    sd["head.head.weight"] = torch.full_like(sd["head.head.weight"], float("nan"))
    save_file(sd, str(wan_dir / "nan.safetensors"))
    with pytest.raises(ModelFileError, match="NaN"):
        load_dit(wan_dir / "nan.safetensors")
    data = dit_files["wan"].read_bytes()
    (wan_dir / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        load_dit(wan_dir / "cut.safetensors")
    torch.save(load_file(str(dit_files["wan"])), wan_dir / "dit.pth")
    with pytest.raises(ModelFileError, match="pickle"):
        load_dit(wan_dir / "dit.pth")
    assert load_dit(wan_dir / "dit.pth", dtype=torch.float32, allow_pickle=True).config.num_layers == 2


# -- kinds --------------------------------------------------------------------------------------

def test_checkpoint_kinds(dit_files, vae_files, umt5_files):
    for layout in ("wan", "comfy_prefixed", "diffusers_file"):
        assert detect_checkpoint_kind(_keys(dit_files[layout])) == "wan_dit"
    assert detect_checkpoint_kind(_keys(vae_files["wan"])) == "wan_vae"
    assert detect_checkpoint_kind(
        _keys(vae_files["diffusers_folder"] / "vae" / "diffusion_pytorch_model.safetensors")) == "wan_vae"
    assert detect_checkpoint_kind(_keys(umt5_files["comfy"])) == "umt5"
    assert detect_checkpoint_kind(_keys(umt5_files["fp8"])) == "umt5"
    assert detect_checkpoint_kind(torch.load(umt5_files["wan_pth"])) == "umt5"
    t5 = ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
          "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
          "encoder.block.1.layer.0.SelfAttention.q.weight"]
    assert detect_checkpoint_kind(t5) == "t5"
    vans_vlm = "pipe.mllm.mllm_backbone.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert detect_checkpoint_kind([vans_vlm]) == "qwen_vl_lora"
    assert detect_checkpoint_kind(["visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight",
                                   "positional_embedding", "token_embedding.weight"]) == "clip"
    assert detect_checkpoint_kind(["diffusion_model.blocks.0.self_attn.q.lora_down.weight"]) == "lora"
    assert detect_checkpoint_kind(["layer.weight"]) == "unknown"


# -- umT5 text encoder --------------------------------------------------------------------------

def test_umt5_comfy_file_loads_the_source_weights(text_encoder):
    config, source = tiny_umt5_state_dict()
    loaded = text_encoder.model.state_dict()
    for key, tensor in source.items():
        assert torch.equal(loaded[key], tensor.half().float()), key
    assert text_encoder.model.encoder.embed_tokens.weight is text_encoder.model.shared.weight
    c = text_encoder.model.config
    assert (c.d_model, c.num_layers, c.num_heads, c.d_kv, c.d_ff) == (32, 2, 2, 16, 64)
    assert (c.relative_attention_num_buckets, c.vocab_size) == (32, config["vocab_size"])


def test_umt5_fp8_scaled_is_dequantised_within_fp8_error(umt5_files):
    raw = load_file(str(umt5_files["fp8"]))
    assert raw["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == torch.float8_e4m3fn
    assert "scaled_fp8" in raw and "encoder.block.0.layer.0.SelfAttention.q.scale_weight" in raw
    _, source = tiny_umt5_state_dict()
    loaded = load_text_encoder(umt5_files["fp8"], dtype=torch.float32).model.state_dict()
    for key, tensor in source.items():
        scale_key = key[: -len("weight")] + "scale_weight"
        if scale_key in raw:
            scale = raw[scale_key].item()
            # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4; subnormals: absolute 2^-10 * scale
            bound = tensor.abs() * 2 ** -4 + scale * 2 ** -10 + 1e-12
            assert ((loaded[key] - tensor).abs() <= bound).all(), key
            assert not torch.equal(loaded[key], tensor)  # it really went through fp8
        else:
            assert torch.equal(loaded[key], tensor.half().float()), key


def test_fp8_weights_are_dequantised_straight_to_the_load_dtype(umt5_files):
    """A bf16 load of an fp8 file must not hold every weight in fp32 first (peak memory)."""
    from vans.wan.files import dequantize_scaled_fp8

    raw = load_file(str(umt5_files["fp8"]))
    out = dequantize_scaled_fp8(raw, dtype=torch.bfloat16)
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert out[key].dtype == torch.bfloat16
    exact = raw[key].float() * raw[key[: -len("weight")] + "scale_weight"].float()
    assert torch.equal(out[key], exact.bfloat16())  # one rounding, from the fp32 product
    assert not any(t.dtype == torch.float32 for k, t in out.items() if raw[k].dtype == torch.float8_e4m3fn)


@pytest.mark.parametrize("layout", ["diffusers_folder", "wan_pth"])
def test_umt5_other_layouts_give_the_same_embeddings(layout, umt5_files, text_encoder):
    other = load_text_encoder(umt5_files[layout], dtype=torch.float32, allow_pickle=True)
    texts = ["a chef sprinkles cheese over the chicken", "the dog runs"]
    assert torch.equal(other.encode(texts), text_encoder.encode(texts))


def test_umt5_embeddings_match_the_wan_pipeline_recipe(text_encoder):
    """diffusers' WanPipeline: pad to 512, encode with the mask, trim each prompt to its length, zero-pad."""
    texts = ["a chef  sprinkles cheese &amp; ketchup", "the dog runs quickly across the kitchen to the red door"]
    out = text_encoder.encode(texts)
    assert out.shape == (2, 512, 32)
    ids, mask = text_encoder.tokenizer(["a chef sprinkles cheese & ketchup", texts[1]], 512)
    padded_ids = torch.zeros(2, 512, dtype=torch.long)
    padded_mask = torch.zeros(2, 512, dtype=torch.long)
    padded_ids[:, : ids.shape[1]], padded_mask[:, : ids.shape[1]] = ids, mask
    with torch.no_grad():
        hidden = text_encoder.model(input_ids=padded_ids, attention_mask=padded_mask).last_hidden_state
    lengths = mask.sum(1).tolist()
    expected = torch.stack([torch.cat([h[:n], h.new_zeros(512 - n, h.shape[1])]) for h, n in zip(hidden, lengths)])
    assert lengths[0] != lengths[1]
    assert torch.allclose(out, expected, atol=1e-5)
    for row, n in zip(out, lengths):
        assert torch.count_nonzero(row[n:]) == 0
        assert (row[:n].abs().sum(-1) > 0).all()


def test_umt5_tokens_follow_umt5_conventions(text_encoder, umt5_files):
    ids, mask = text_encoder.tokenizer(["the dog", "the dog runs to the kitchen"])
    n0 = int(mask[0].sum())
    assert ids[0, n0 - 1] == 1 and (ids[0, n0:] == 0).all()  # EOS then pad 0
    assert ids[0, 0] != 1 and 1 not in ids[0, : n0 - 1].tolist()  # no BOS, one EOS
    long_ids, long_mask = text_encoder.tokenizer([" ".join(["kitchen table"] * 400)], 512)
    assert long_ids.shape == (1, 512) and long_ids[0, -1] == 1 and long_mask.all()
    # the embedded sentencepiece model and diffusers' tokenizer folder (tokenizer.json) agree
    folder_encoder = load_text_encoder(umt5_files["diffusers_folder"], dtype=torch.float32)
    texts = ["the dog cooks  chicken, quickly!", "kato rime sunopa"]
    assert torch.equal(folder_encoder.tokenizer(texts)[0], text_encoder.tokenizer(texts)[0])


def test_umt5_without_a_tokenizer_says_what_it_looked_for(tmp_path):
    bare = write_tiny_umt5(tmp_path / "te" / "umt5_xxl_fp16.safetensors", with_tokenizer=False)
    with pytest.raises(ModelFileError, match=r"carries no tokenizer \(spiece_model\).*spiece\.model"):
        load_text_encoder(bare, dtype=torch.float32)
    folder = write_tiny_umt5_tokenizer(tmp_path / "umt5_tokenizer", hf_files=False)
    encoder = load_text_encoder(bare, tokenizer=folder, dtype=torch.float32)
    assert encoder.encode(["the dog"]).shape == (1, 512, 32)


def test_wrong_text_encoders_are_refused(dit_files):
    t5_like = {"shared.weight": torch.empty(256, 32),
               "encoder.block.0.layer.0.SelfAttention.q.weight": torch.empty(32, 32),
               "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": torch.empty(32, 2),
               "encoder.block.1.layer.0.SelfAttention.q.weight": torch.empty(32, 32)}
    with pytest.raises(ModelFileError, match="t5xxl.*expected the umT5-XXL text encoder"):
        inspect_umt5_state_dict(_meta(t5_like), "t5xxl_fp16.safetensors")
    with pytest.raises(ModelFileError, match="is a Wan diffusion model"):
        load_text_encoder(dit_files["wan"])


# -- VAE ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["wan", "diffusers_folder", "wan_pth"])
def test_vae_layout_loads_the_tensors_it_was_written_from(layout, vae_files):
    model = load_vae(vae_files[layout], dtype=torch.float32, allow_pickle=True).model
    reference = tiny_wan_vae().state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(loaded[key], tensor), key


def test_vae_file_uses_the_original_names_and_is_tiny(vae_files):
    keys = _keys(vae_files["wan"])
    for name in ("decoder.middle.0.residual.0.gamma", "encoder.conv1.weight", "conv1.weight", "conv2.weight",
                 "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.3.resample.1.weight",
                 "encoder.head.2.weight"):
        assert name in keys
    assert vae_files["wan"].stat().st_size < 5_000_000


def test_vae_encode_normalises_the_posterior_mean(vae):
    frames = torch.rand(1, 5, 32, 48, 3, generator=torch.Generator().manual_seed(1))
    latents = vae.encode(frames)
    assert latents.shape == (1, 16, 2, 4, 6) and latents.dtype == torch.float32
    with torch.no_grad():
        mu = vae.model.encode(frames.permute(0, 4, 1, 2, 3) * 2 - 1).latent_dist.mean
    mean = torch.tensor(vae.model.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.model.config.latents_std).view(1, 16, 1, 1, 1)
    assert torch.allclose(latents, (mu - mean) / std, atol=1e-6)
    assert torch.equal(vae.encode(frames), latents)  # the mean, never a sample


def test_vae_decode_inverts_the_normalisation(vae):
    latents = torch.randn(2, 16, 2, 4, 6, generator=torch.Generator().manual_seed(2))
    frames = vae.decode(latents)
    assert frames.shape == (2, 5, 32, 48, 3)
    assert frames.min() >= 0 and frames.max() <= 1
    mean = torch.tensor(vae.model.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.model.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        raw = vae.model.decode(latents * std + mean).sample
    expected = ((raw + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)
    assert torch.allclose(frames, expected, atol=1e-6)


def test_vae_tiling_is_on_by_default_and_can_be_switched_off(vae_files):
    # The tiles are the official ones (30x52 latents every 15x26, vans.wan.tiling), never diffusers' own, whose
    # layout and blending differ from the official pipeline's (tests/test_fidelity_wan.py).
    vae = load_vae(vae_files["wan"], dtype=torch.float32)
    assert vae.tiling and (vae.tile_size, vae.tile_stride) == ((30, 52), (15, 26))
    assert not vae.model.use_tiling
    vae.tiling = False
    assert not vae.tiling and not vae.model.use_tiling
    assert not load_vae(vae_files["wan"], dtype=torch.float32, tiling=False).tiling


@pytest.mark.parametrize("shape, message", [
    ((1, 6, 32, 32, 3), "4n\\+1 frames"),
    ((1, 5, 40, 32, 3), "multiples of 16"),
    ((5, 32, 32, 3), r"\[batch, frames, height, width, 3\]"),
    ((1, 5, 32, 32, 4), r"\[batch, frames, height, width, 3\]"),
])
def test_vae_input_is_validated(vae, shape, message):
    with pytest.raises(InputError, match=message):
        vae.encode(torch.rand(shape))


def test_wrong_vaes_are_refused(vae_files, dit_files):
    sd = _meta(load_file(str(vae_files["wan"])))
    sd["conv2.weight"] = torch.empty(48, 48, 1, 1, 1, device="meta")
    with pytest.raises(ModelFileError, match="48"):
        inspect_vae_state_dict(sd, "wan2.2_vae.safetensors")
    with pytest.raises(ModelFileError, match="is a Wan diffusion model.*expected the Wan2.1 VAE"):
        load_vae(dit_files["wan"])
    with pytest.raises(ModelFileError, match="pickle"):
        load_vae(vae_files["wan_pth"])
