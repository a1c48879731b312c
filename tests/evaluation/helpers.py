"""Shared helpers: a byte-level tokenizer.json (no merges) and a tiny model config for it."""

import json
import os

SPECIALS = ("<s>", "</s>")


def write_byte_tokenizer(folder) -> str:
    """A real `tokenizers` byte-level BPE without merges: 256 byte tokens + <s> + </s>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    return str(folder)


def tiny_model_config(**overrides):
    from megatron_anchor.model import ModelConfig

    values = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  vocab_size=258, max_sequence_length=8192)
    values.update(overrides)
    return ModelConfig(**values)
