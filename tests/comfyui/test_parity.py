"""Parity: ComfyUI's native Wan2.1 model, loaded from the tiny DiT file by ComfyUI's own loader and
patched by VANS Context Conditioning, computes the engine's model call on the same weights.

Both sides work in the normalised latent space: the engine's VAE returns (μ − mean)/std latents, ComfyUI's
VAE returns μ and ``process_latent_in`` applies the same normalisation. ComfyUI's CONST model returns
x0 = x − σ·v, so v = (x − x0)/σ. The sampler test runs KSampler's own path (ModelSamplingSD3 shift 5,
euler, simple) against the engine's Euler sampler from the same seed.
"""

from __future__ import annotations

import pytest
import torch

WIDTH, HEIGHT, LENGTH, NUM_CONTEXT = 64, 48, 33, 6


def engine_dit(path):
    """The engine's DiT loader; while ``vans.wan`` is not there, the same diffusers model built with
    diffusers' own Wan key conversion (the engine's model code is diffusers' WanTransformer3DModel)."""
    try:
        from vans.wan import load_dit
    except ImportError:  # vans.wan missing, or there without load_dit yet
        load_dit = None
    if load_dit is None:
        from diffusers import WanTransformer3DModel
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
        from safetensors.torch import load_file

        from tiny_wan import DIT

        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=DIT["dim"] // 128, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=DIT["text_dim"], freq_dim=DIT["freq_dim"], ffn_dim=DIT["ffn_dim"],
            num_layers=DIT["num_layers"], cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
        model.load_state_dict(convert_wan_transformer_to_diffusers(load_file(str(path))), strict=True)
        return model.eval()
    return load_dit(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def native(comfyui):
    """The node's outputs on ComfyUI's own Wan model and VAE, and the engine's generator on the same DiT."""
    comfyui.models.need("dit", "vae")
    import comfy.patcher_extension
    import comfy.sd
    import comfy.utils

    from vans.generator import VideoGenerator

    files = comfyui.models.files
    model = comfy.sd.load_diffusion_model(str(files["dit"]), model_options={"dtype": torch.float32})
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(files["vae"])))
    conditioning = comfyui.pack_submodule("nodes.conditioning")
    frames = torch.rand(40, 60, 90, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # as ComfyUI runs nodes
        patched, latent = conditioning.condition(model, vae, frames, WIDTH, HEIGHT, LENGTH, NUM_CONTEXT, 1, fps=16.0)
    wrapper = patched.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, conditioning.WRAPPER_KEY)[0]
    engine = VideoGenerator(engine_dit(files["dit"]), None, None)
    clip = conditioning.context_clip(frames, LENGTH, HEIGHT, WIDTH, fps=16.0)
    return {"patched": patched, "latent": latent, "context": wrapper.context.clone(), "engine": engine,
            "clip": clip, "model": model, "files": files, "vae": vae, "conditioning": conditioning, "frames": frames}


def test_node_returns_the_empty_answer_latent(native):
    assert native["latent"]["samples"].shape == (1, 16, (LENGTH - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    assert torch.count_nonzero(native["latent"]["samples"]) == 0
    import comfy.patcher_extension

    # the input model itself is left unpatched
    assert native["model"].get_all_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL) == []


def test_context_latents_equal_the_engine_context(native):
    try:
        from vans.wan import load_vae
    except ImportError:
        pytest.skip("the engine's Wan VAE loader (vans.wan.load_vae) is not available")
    native["engine"].vae = load_vae(native["files"]["vae"], dtype=torch.float32)
    with torch.no_grad():
        engine_context = native["engine"].encode_context(native["clip"], NUM_CONTEXT)
    assert native["context"].shape == engine_context.shape == (1, 16, NUM_CONTEXT, HEIGHT // 8, WIDTH // 8)
    torch.testing.assert_close(native["context"].float(), engine_context.float(), rtol=1e-4, atol=1e-4)


def test_context_is_encoded_in_the_official_tiles_at_640x352(native):
    """At the real size the official tiles are 2 × 3: the node runs ComfyUI's own VAE on each tile and blends
    them as the engine does, so both give the same context; ComfyUI's VAE on the whole frame would not."""
    from vans.generator import VideoGenerator
    from vans.wan import load_vae

    clip = torch.rand(1, 352, 640, 3, generator=torch.Generator().manual_seed(4))
    model, vae = native["model"], native["vae"]
    with torch.inference_mode():
        node = native["conditioning"].encode_context(model, vae, clip, 1)
        whole = model.model.process_latent_in(vae.encode(clip))
    engine = VideoGenerator(None, None, load_vae(native["files"]["vae"], dtype=torch.float32)).encode_context(clip, 1)
    assert node.shape == engine.shape == (1, 16, 1, 44, 80)
    torch.testing.assert_close(node.float(), engine.float(), rtol=1e-4, atol=1e-4)
    assert (whole.float() - node.float()).abs().max() > 1e-3


def test_node_equals_the_engine_at_640x352_context_and_model_call(native):
    """At the real resolution (352×640, tiled context): the node's context latents and one patched model call
    equal the engine's encode_context and model_velocity (fp32). 5 frames (2 latent frames, 1 context) keep the
    tiny DiT's 2,640 tokens fast on a CPU; the tile seams are spatial, so time does not change them."""
    from vans.generator import VideoGenerator
    from vans.wan import load_vae

    frames = torch.rand(9, 360, 660, 3, generator=torch.Generator().manual_seed(5))
    conditioning = native["conditioning"]
    with torch.inference_mode():
        patched, latent = conditioning.condition(native["model"], native["vae"], frames, 640, 352, 5, 1, 1,
                                                 frame_pick="first")
    import comfy.patcher_extension

    wrapper = patched.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, conditioning.WRAPPER_KEY)[0]
    engine = native["engine"]
    engine.vae = load_vae(native["files"]["vae"], dtype=torch.float32)
    with torch.no_grad():
        engine_context = engine.encode_context(conditioning.context_clip(frames, 5, 352, 640, "first"), 1)
    assert wrapper.context.shape == engine_context.shape == (1, 16, 1, 44, 80)
    torch.testing.assert_close(wrapper.context.float(), engine_context.float(), rtol=1e-4, atol=1e-4)
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(1, 16, 2, 44, 80, generator=generator)
    text = torch.randn(1, 7, 4096, generator=generator) * 0.2
    native_velocity = (x - _native_call(patched, x, 0.6, text)) / 0.6
    with torch.no_grad():
        engine_velocity = engine.model_velocity(x, torch.tensor(0.6), engine_context, text)
    assert (native_velocity - engine_velocity).abs().max() <= 5e-5 * engine_velocity.abs().max()


@pytest.fixture(scope="module")
def native_bf16(native):
    """The same DiT loaded by ComfyUI in bf16 and run in bf16, as ComfyUI runs a bf16 Wan model on a GPU (on
    a CPU it upcasts to fp32: ``manual_cast_dtype`` is cleared to get the GPU's arithmetic here)."""
    import comfy.patcher_extension
    import comfy.sd

    from vans.generator import VideoGenerator
    from vans.wan import load_dit

    model = comfy.sd.load_diffusion_model(str(native["files"]["dit"]), model_options={"dtype": torch.bfloat16})
    model.model.manual_cast_dtype = None
    conditioning = native["conditioning"]
    with torch.inference_mode():
        patched, _ = conditioning.condition(model, native["vae"], native["frames"], WIDTH, HEIGHT, LENGTH,
                                            NUM_CONTEXT, 1, fps=16.0)
    wrapper = patched.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, conditioning.WRAPPER_KEY)[0]
    assert wrapper.timestep_dtype == torch.bfloat16
    engine = VideoGenerator(load_dit(native["files"]["dit"], dtype=torch.bfloat16), None, None, dtype=torch.bfloat16)
    return {"patched": patched, "context": wrapper.context.clone(), "engine": engine}


@pytest.mark.parametrize("sigma", [0.9973, 0.73, 0.3337])  # timesteps 997.3, 730, 333.7 -> bf16 996, 728, 334
def test_bf16_native_model_sees_the_engine_timestep(native_bf16, sigma):
    """The official pipeline (and the engine's default ``timestep_dtype="model"``) round the timestep to the
    DiT's bf16; the node makes ComfyUI's bf16 call see the same timestep. Equal to bf16 noise (measured 1 %:
    two bf16 implementations), while the exact fp32 timestep is 14-70 % off on these random weights."""
    generator = torch.Generator().manual_seed(int(sigma * 100))
    x = torch.randn(2, 16, (LENGTH - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8, generator=generator)
    text = (torch.randn(2, 7, 4096, generator=generator) * 0.2).bfloat16()
    native_velocity = (x - _native_call(native_bf16["patched"], x, sigma, text)) / sigma
    engine, context = native_bf16["engine"], native_bf16["context"]
    with torch.no_grad():
        rounded = engine.model_velocity(x, torch.tensor(sigma), context, text)
        exact = engine.model_velocity(x, torch.tensor(sigma), context, text, timestep_dtype="fp32")

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert rel(native_velocity, rounded) <= 3e-2
    assert rel(native_velocity, exact) > 1e-1


def _native_call(patched, x, sigma, text):
    """apply_model as KSampler calls it: the patcher's wrappers merged into transformer_options."""
    import comfy.model_patcher
    import comfy.sampler_helpers

    options = comfy.model_patcher.create_model_options_clone(patched.model_options)
    comfy.sampler_helpers.prepare_model_patcher(patched, {}, options)
    t = torch.full((x.shape[0],), sigma)
    with torch.no_grad():
        return patched.model.apply_model(x, t, c_crossattn=text, transformer_options=options["transformer_options"])


@pytest.mark.parametrize("sigma", [1.0, 0.6, 0.05])
def test_patched_native_model_equals_the_engine_model_call(native, sigma):
    generator = torch.Generator().manual_seed(int(sigma * 100))
    x = torch.randn(2, 16, (LENGTH - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8, generator=generator)
    text = torch.randn(2, 7, 4096, generator=generator) * 0.2
    x0 = _native_call(native["patched"], x, sigma, text)
    native_velocity = (x - x0) / sigma
    with torch.no_grad():
        engine_velocity = native["engine"].model_velocity(x, torch.tensor(sigma), native["context"], text)
    assert native_velocity.shape == x.shape
    # two fp32 implementations (ComfyUI's and diffusers'): equal up to rounding, relative to the output's scale
    scale = engine_velocity.abs().max()
    assert (native_velocity - engine_velocity).abs().max() <= 5e-5 * scale
    # and the context matters: without it the native call differs
    with torch.no_grad():
        plain = native["model"].model.apply_model(x, torch.full((2,), sigma), c_crossattn=text)
    assert not torch.allclose((x - plain) / sigma, engine_velocity, atol=1e-3)


def test_ksampler_euler_shift5_reproduces_the_engine_sampler(native):
    import comfy.sample
    import comfy.samplers
    import nodes

    from vans.sampling import sample_flow

    steps, cfg, seed = 4, 5.0, 123
    generator = torch.Generator().manual_seed(5)
    positive = torch.randn(1, 9, 4096, generator=generator) * 0.2
    negative = torch.randn(1, 9, 4096, generator=generator) * 0.2
    shifted = nodes.NODE_CLASS_MAPPINGS["ModelSamplingSD3"]().patch(native["patched"], 5.0)[0]
    latent = native["latent"]["samples"]
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.no_grad():
        raw = comfy.sample.sample(shifted, noise, steps, cfg, "euler", "simple", [[positive, {}]], [[negative, {}]],
                                  latent, denoise=1.0, disable_pbar=True, seed=seed)
    native_latents = native["model"].model.process_latent_in(raw)

    engine = native["engine"]
    velocity = engine.guided_velocity(native["context"], positive, negative, cfg)
    engine_noise = torch.randn(latent.shape, generator=torch.Generator("cpu").manual_seed(seed))
    torch.testing.assert_close(noise, engine_noise)  # same seed, same starting noise
    result = sample_flow(velocity, engine_noise, num_steps=steps, shift=5.0)
    assert (native_latents - result.latents).abs().max() <= 5e-5 * result.latents.abs().max()


def test_memory_is_estimated_with_the_context_frames(native, monkeypatch):
    """ComfyUI reserves memory from the noise shape; the model also runs over the context frames."""
    import comfy.sample
    import comfy.sampler_helpers

    seen = []

    class Stop(Exception):
        pass

    def record(model, noise_shape, conds, model_options=None):
        seen.append(list(noise_shape))
        raise Stop

    monkeypatch.setattr(comfy.sampler_helpers, "_prepare_sampling", record)
    latent = native["latent"]["samples"]
    text = torch.zeros(1, 9, 4096)
    for model in (native["model"], native["patched"]):
        with pytest.raises(Stop):
            comfy.sample.sample(model, torch.zeros_like(latent), 1, 1.0, "euler", "simple", [[text, {}]],
                                [[text, {}]], latent, disable_pbar=True, seed=0)
    plain, patched = seen
    assert plain == list(latent.shape)
    assert patched == [*latent.shape[:2], latent.shape[2] + NUM_CONTEXT, *latent.shape[3:]]
