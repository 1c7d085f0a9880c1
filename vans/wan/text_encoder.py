"""The umT5-XXL text encoder as Wan uses it, from every file layout users hold.

``WanTextEncoder.encode(texts)`` returns ``[B, 512, d_model]`` exactly as diffusers' ``WanPipeline``
builds prompt embeddings: the prompt cleaned (HTML entities, runs of whitespace), tokenized with EOS,
truncated to 512 tokens, encoded with an attention mask, and every position past a prompt's length
set to zero.

Weights accepted (transformers' ``UMT5EncoderModel`` runs them):

* ComfyUI's ``umt5_xxl_fp16.safetensors`` / ``_bf16`` (HF T5 key layout, ``spiece_model`` inside);
* ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` (fp8 weights × per-tensor ``scale_weight``), dequantised;
* a diffusers pipeline folder (``text_encoder/`` + ``tokenizer/``) or a transformers folder;
* Wan's own ``models_t5_umt5-xxl-enc-bf16.pth`` layout (pickle: only with ``allow_pickle``).

Tokenizer, first found: the ``tokenizer`` argument (a folder, ``spiece.model`` or ``tokenizer.json``),
the ``spiece_model`` tensor inside the weights file, a tokenizer beside the weights.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import ModelFileError
from .files import (
    assign_weights,
    check_keys,
    dequantize_scaled_fp8,
    empty_model,
    find_weight_files,
    is_safetensors,
    log,
    read_config,
    read_headers,
    read_weights,
    report_extra_keys,
    strip_known_prefix,
)
from .kinds import describe_kind, detect_checkpoint_kind

WHAT = "text encoder"
EXPECTED = "the umT5-XXL text encoder"
HINT = "use umt5_xxl_fp16.safetensors (or _bf16 / _fp8_e4m3fn_scaled) in models/text_encoders"
MAX_LENGTH = 512
PAD_ID, EOS_ID = 0, 1
UMT5_PREFIXES = ("text_encoders.umt5xxl.transformer.", "umt5xxl.transformer.", "text_encoder.", "transformer.")
SPIECE_KEY = "spiece_model"
# Settings of the umT5 family the shapes cannot show (google/umt5-xxl config.json).
UMT5_FIXED = {"relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
              "dropout_rate": 0.0, "is_encoder_decoder": False, "use_cache": False, "pad_token_id": PAD_ID,
              "eos_token_id": EOS_ID, "decoder_start_token_id": PAD_ID}


# -- prompts and tokens -------------------------------------------------------------------------

def clean_prompt(text: str) -> str:
    """What Wan and diffusers do before tokenizing (minus ftfy, which is not a dependency)."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5Tokenizer:
    """umT5 tokens: sentencepiece pieces + EOS (id 1), no BOS, truncated to ``max_length`` with the EOS
    kept, padded with id 0 to the longest prompt of the batch."""

    def __init__(self, encode_batch, source: str):
        self._encode_batch = encode_batch  # list[str] -> list[list[int]] without EOS
        self.source = source

    @classmethod
    def from_sentencepiece(cls, model_proto: bytes, source: str) -> "UMT5Tokenizer":
        import sentencepiece

        try:
            processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError on a bad proto
            raise ModelFileError(f"tokenizer in {source} is not a valid sentencepiece model ({exc})") from None
        return cls(lambda texts: processor.encode(texts), source)

    @classmethod
    def from_hf_folder(cls, folder: Path) -> "UMT5Tokenizer":
        """diffusers' own path: ``AutoTokenizer`` on the ``tokenizer/`` folder (``tokenizer.json``)."""
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # transformers raises many types for unreadable folders
            raise ModelFileError(f"tokenizer folder {folder} could not be read ({exc}); download it again") from None
        eos = tok.eos_token_id

        def encode(texts):
            ids = tok(texts, add_special_tokens=True)["input_ids"]
            return [row[:-1] if row and row[-1] == eos else row for row in ids]

        return cls(encode, str(folder))

    def __call__(self, texts: list[str], max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [row[: max_length - 1] + [EOS_ID] for row in self._encode_batch(list(texts))]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask


def load_tokenizer(path: str | Path) -> UMT5Tokenizer:
    """A tokenizer folder (``tokenizer.json``/``tokenizer_config.json`` or ``spiece.model``), a
    ``spiece.model`` file or a ``tokenizer.json`` file."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.name == "tokenizer.json":
            return UMT5Tokenizer.from_hf_folder(path.parent)
        return UMT5Tokenizer.from_sentencepiece(path.read_bytes(), str(path))
    if path.is_dir():
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            return UMT5Tokenizer.from_hf_folder(path)
        if (path / "spiece.model").is_file():
            return UMT5Tokenizer.from_sentencepiece((path / "spiece.model").read_bytes(), str(path / "spiece.model"))
    raise ModelFileError(f"tokenizer not found at {path}: expected a folder with tokenizer.json or spiece.model, "
                         "or the spiece.model file itself")


def _tokenizer_beside(weights: Path) -> Path | None:
    folder = weights if weights.is_dir() else weights.parent
    for candidate in (folder / "tokenizer", folder.parent / "tokenizer", folder):
        if (candidate / "tokenizer.json").is_file() or (candidate / "spiece.model").is_file():
            return candidate
    return None


# -- the encoder --------------------------------------------------------------------------------

class WanTextEncoder(nn.Module):
    """umT5 encoder + tokenizer, producing Wan's ``[B, 512, d_model]`` prompt embeddings."""

    def __init__(self, model, tokenizer: UMT5Tokenizer, max_length: int = MAX_LENGTH):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """``[B, max_length, d_model]`` in the model's dtype, zero past each prompt's last token (EOS).

        The encoder runs on the batch's longest prompt only, not on 512 padded positions: padded keys
        are masked out, so the positions that matter come out the same, and short captions encode
        several times faster.
        """
        if isinstance(texts, str):
            texts = [texts]
        ids, mask = self.tokenizer([clean_prompt(t) for t in texts], self.max_length)
        device = self.model.shared.weight.device
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        out = hidden.new_zeros(hidden.shape[0], self.max_length, hidden.shape[-1])
        out[:, : hidden.shape[1]] = hidden
        return out


# -- key layouts and config --------------------------------------------------------------------

_WAN_T5_BLOCK = {
    "attn.q.weight": "layer.0.SelfAttention.q.weight", "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight", "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm1.weight": "layer.0.layer_norm.weight", "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight", "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def wan_t5_to_hf_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan's own T5 names (``blocks.N.attn.q``, ``blocks.N.ffn.gate.0``…) -> HF/ComfyUI T5 names."""
    out = {}
    for key, tensor in sd.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = tensor
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = tensor
        elif (m := re.match(r"blocks\.(\d+)\.(.+)$", key)) and m.group(2) in _WAN_T5_BLOCK:
            out[f"encoder.block.{m.group(1)}.{_WAN_T5_BLOCK[m.group(2)]}"] = tensor
        else:
            out[key] = tensor
    return out


def infer_umt5_config(sd: Mapping[str, torch.Tensor], folder_config: dict | None = None) -> dict:
    """``UMT5Config`` arguments from HF-named tensors (meta tensors are enough)."""
    vocab, d_model = (int(s) for s in sd["shared.weight"].shape)
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    prefix = "encoder.block.0.layer."
    buckets, heads = (int(s) for s in sd[prefix + "0.SelfAttention.relative_attention_bias.weight"].shape)
    inner = int(sd[prefix + "0.SelfAttention.q.weight"].shape[0])
    config = dict(UMT5_FIXED, vocab_size=vocab, d_model=d_model, num_layers=max(blocks) + 1, num_heads=heads,
                  d_kv=inner // heads, d_ff=int(sd[prefix + "1.DenseReluDense.wi_0.weight"].shape[0]),
                  relative_attention_num_buckets=buckets)
    for key in ("relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj"):
        if folder_config and key in folder_config:
            config[key] = folder_config[key]
    return config


def _refuse(name: str, what_it_is: str) -> ModelFileError:
    return ModelFileError(f"{WHAT} file {name} is {what_it_is}; expected {EXPECTED}: {HINT}")


def inspect_umt5_state_dict(
    sd: Mapping[str, torch.Tensor], name: str = "the file", folder_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor | None]:
    """Check ``sd`` is a umT5 encoder; return (config, HF-named dequantised tensors, spiece_model or None)."""
    sd = strip_known_prefix(sd, UMT5_PREFIXES)
    spiece = sd.pop(SPIECE_KEY, None)
    kind = detect_checkpoint_kind(sd)
    if kind != "umt5":
        raise _refuse(name, describe_kind(kind))
    sd = dequantize_scaled_fp8(sd, what=WHAT, name=name, dtype=dtype)
    if "token_embedding.weight" in sd:
        sd = wan_t5_to_hf_layout(sd)
    required = ("shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                "encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise ModelFileError(f"{WHAT} file {name} is missing {', '.join(missing)}; it is incomplete or not {EXPECTED}")
    config = infer_umt5_config(sd, folder_config)
    if config["d_model"] == 4096 and config["num_layers"] != 24:
        raise ModelFileError(f"{WHAT} file {name} has {config['num_layers']} blocks, umT5-XXL has 24; "
                             "the file is incomplete, download it again")
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]  # tied in UMT5EncoderModel
    return config, sd, spiece


def _weights_source(path: Path, allow_pickle: bool) -> tuple[list[Path], dict | None, Path]:
    """(weight files, config.json or None, the place to look for a tokenizer beside the weights)."""
    if path.is_file():
        return [path], None, path
    if not path.is_dir():
        raise ModelFileError(f"{WHAT} file not found: {path}; {HINT}")
    folder = path / "text_encoder" if (path / "text_encoder").is_dir() else path
    return find_weight_files(folder, "model", what=WHAT, allow_pickle=allow_pickle), read_config(folder), folder


def _split_ignored(extra: list[str]) -> list[str]:
    """A full umT5 checkpoint also holds the decoder, which the encoder never uses: not worth a warning."""
    decoder = [k for k in extra if k.startswith(("decoder.", "lm_head."))]
    if decoder:
        log.info("text encoder: ignored the %d decoder weights", len(decoder))
    return [k for k in extra if k not in decoder]


def load_text_encoder(path, *, tokenizer=None, dtype: torch.dtype = torch.bfloat16,
                      device: str | torch.device = "cpu", allow_pickle: bool = False,
                      max_length: int = MAX_LENGTH) -> WanTextEncoder:
    """umT5 weights (file or folder) + tokenizer -> ``WanTextEncoder`` in ``dtype`` on ``device``."""
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path).expanduser()
    files, folder_config, beside = _weights_source(path, allow_pickle)
    name = path.name
    if is_safetensors(files):  # refuse a wrong file before reading gigabytes
        inspect_umt5_state_dict(read_headers(files, what=WHAT), name, folder_config)
    config, named, spiece = inspect_umt5_state_dict(read_weights(files, what=WHAT, allow_pickle=allow_pickle), name,
                                                    folder_config, dtype)
    tok = _resolve_tokenizer(tokenizer, spiece, beside, name)
    model = empty_model(lambda: UMT5EncoderModel(UMT5Config(**config)))
    extra = _split_ignored(check_keys(model, named, what=WHAT, name=name, expected=EXPECTED))
    report_extra_keys(extra, what=WHAT, name=name)

    def dtype_of(key: str) -> torch.dtype:
        # transformers keeps the feed-forward output in fp32 for fp16 only (it overflows otherwise)
        return torch.float32 if dtype == torch.float16 and ".wo." in key else dtype

    assign_weights(model, named, dtype_of=dtype_of, device=device)
    model.encoder.embed_tokens.weight = model.shared.weight
    model.eval()
    return WanTextEncoder(model, tok, max_length=max_length).eval()


def _resolve_tokenizer(tokenizer, spiece: torch.Tensor | None, beside: Path, name: str) -> UMT5Tokenizer:
    if isinstance(tokenizer, UMT5Tokenizer):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if spiece is not None:
        return UMT5Tokenizer.from_sentencepiece(spiece.cpu().numpy().tobytes(), f"{name} ({SPIECE_KEY})")
    found = _tokenizer_beside(beside)
    if found is not None:
        return load_tokenizer(found)
    folder = beside if beside.is_dir() else beside.parent
    raise ModelFileError(
        f"{WHAT} file {name} carries no tokenizer ({SPIECE_KEY}) and none was found beside it "
        f"(looked for tokenizer.json or spiece.model in {folder / 'tokenizer'}, {folder.parent / 'tokenizer'} and "
        f"{folder}); use ComfyUI's umt5_xxl_*.safetensors, which has it inside, or pass the umT5 tokenizer folder"
    )
