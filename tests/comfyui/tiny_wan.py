"""Tiny Wan2.1 files (DiT, VAE, umT5 with its sentencepiece model inside) for the real-ComfyUI tests.

The umT5 file is always written here: ComfyUI recognises umT5-XXL only by its 24 blocks of width 4096,
so it needs a shape no engine fixture has. The DiT and VAE writers are the fallback while the
engine's ``vans.fixtures.wan`` is not available.

The key layouts are the originals (ComfyUI's Wan and T5 modules use the official names), so the files
are what a user's ``wan2.1_t2v_1.3B_*.safetensors``, ``wan_2.1_vae.safetensors`` and
``umt5_xxl_*.safetensors`` look like, only tiny and random. Needs ComfyUI importable (these tests run
with it) and the ``sentencepiece`` package.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

DIT = dict(dim=256, ffn_dim=512, num_layers=2, text_dim=4096, freq_dim=256)  # heads = dim / 128 = 2
VAE_DIM = 8
# ComfyUI recognises umT5-XXL by a 24th block whose feed-forward reads 4096 features; everything else tiny.
UMT5 = {"d_ff": 8, "d_kv": 8, "d_model": 4096, "num_heads": 1, "num_layers": 24, "relative_attention_num_buckets": 32,
        "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "layer_norm_epsilon": 1e-6, "model_type": "umt5"}
_WORDS = ("a the person hand chef dog cat ball car street kitchen pan cheese chicken walks runs jumps sprinkles "
          "cooks opens closes picks puts next then rain sun falls over table door window water fire video "
          "vivid colors overexposed static blurry details subtitles style artwork painting frame worst quality")


def _randomised(state: dict, seed: int, scale: float) -> dict:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, tensor in state.items():
        if tensor.ndim >= 2:
            out[key] = torch.randn(tensor.shape, generator=generator) * scale
        elif key.endswith(("gamma", "norm_q.weight", "norm_k.weight", "layer_norm.weight", "norm3.weight")):
            out[key] = torch.ones(tensor.shape)
        else:
            out[key] = torch.randn(tensor.shape, generator=generator) * scale
    return {k: v.contiguous() for k, v in out.items()}


def write_dit(path: Path, seed: int = 0) -> Path:
    import comfy.ldm.wan.model
    import comfy.ops
    from safetensors.torch import save_file

    model = comfy.ldm.wan.model.WanModel(
        model_type="t2v", patch_size=(1, 2, 2), in_dim=16, out_dim=16, num_heads=DIT["dim"] // 128,
        window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6, operations=comfy.ops.disable_weight_init,
        device="meta", dtype=torch.float32, **DIT)
    state = {k: torch.empty(v.shape) for k, v in model.state_dict().items()}
    save_file(_randomised(state, seed, 0.05), str(path))
    return path


def write_vae(path: Path, seed: int = 1) -> Path:
    import comfy.ldm.wan.vae
    from safetensors.torch import save_file

    model = comfy.ldm.wan.vae.WanVAE(dim=VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                     temperal_downsample=[False, True, True], dropout=0.0)
    save_file(_randomised(model.state_dict(), seed, 0.1), str(path))
    return path


def _sentencepiece_model() -> bytes:
    import sentencepiece

    sentences = [" ".join(_WORDS.split()[i:i + 7]) for i in range(0, len(_WORDS.split()), 3)] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=64, model_type="unigram", hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return model.getvalue()


def write_umt5(path: Path, seed: int = 2) -> tuple[Path, dict]:
    """The umT5 encoder in the HF T5 key layout ComfyUI reads, with ``spiece_model`` inside; returns the
    ComfyUI T5 config it was made with."""
    import comfy.ops
    import comfy.text_encoders.t5
    from safetensors.torch import save_file

    spiece = _sentencepiece_model()
    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    config = dict(UMT5, vocab_size=vocab)
    model = comfy.text_encoders.t5.T5(config, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    state = {k: torch.empty(v.shape) for k, v in model.state_dict().items()}
    state = {k: v.half() for k, v in _randomised(state, seed, 0.05).items()}  # as umt5_xxl_fp16.safetensors
    state["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    save_file(state, str(path))
    return path, config


def _shapes(path: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def comfy_dit_problem(path: Path) -> str | None:
    """Why ComfyUI's Wan loader would not build this DiT (it assumes text width 4096, frequency width
    256 and 128-wide heads), or None."""
    shapes = _shapes(path)
    dim = shapes["head.modulation"][-1]
    if dim % 128 or shapes["text_embedding.0.weight"][1] != 4096 or shapes["time_embedding.0.weight"][1] != 256:
        return f"engine DiT fixture shapes do not fit ComfyUI's Wan detection (dim {dim})"
    return None


def comfy_vae_problem(path: Path) -> str | None:
    """Why ComfyUI's WanVAE (its layout, with the file's base width) would not load this VAE, or None."""
    import comfy.ldm.wan.vae

    shapes = _shapes(path)
    dim = shapes["decoder.head.0.gamma"][0]
    expected = comfy.ldm.wan.vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                        temperal_downsample=[False, True, True], dropout=0.0).state_dict()
    if {k: tuple(v.shape) for k, v in expected.items()} != shapes:
        return "engine VAE fixture layout differs from ComfyUI's WanVAE"
    return None
