"""Tiny random Hugging Face models made on the spot with transformers' own config classes."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

BOS = 1
VOCAB = 300  # not a multiple of 128: exercises the vocabulary padding

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=VOCAB, max_position_embeddings=512, rms_norm_eps=1e-5,
              bos_token_id=BOS, eos_token_id=2)

# name -> (config class, extra config kwargs); one per family and feature.
FAMILIES = {
    "llama-gqa": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=10000.0,
                                      tie_word_embeddings=False)),
    "llama31-rope-scaling": ("LlamaConfig", dict(
        num_key_value_heads=2, tie_word_embeddings=False,
        # head_dim 16 at base 5e5: wavelengths 6.3, 32.5, 168, ... fall in all three bands.
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "mistral-mha": ("MistralConfig", dict(num_key_value_heads=4, rope_theta=1e6,
                                          sliding_window=None, tie_word_embeddings=False)),
    "qwen2-bias-tied-gqa": ("Qwen2Config", dict(num_key_value_heads=2, rope_theta=1e6,
                                                tie_word_embeddings=True)),
    "qwen2-bias-mha": ("Qwen2Config", dict(num_key_value_heads=4, rope_theta=1e6,
                                           tie_word_embeddings=False)),
}


def make_hf_model(name: str, folder, max_shard_size=None, seed: int = 0):
    """Save a random model of family `name` (every tensor perturbed: norms, biases too) and
    a tokenizer file; returns (folder, the transformers model in FP32 eval mode)."""
    cls_name, extra = FAMILIES[name]
    config = getattr(transformers, cls_name)(**COMMON, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.eval()
    folder = str(folder)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "model_max_length": 512}, f)
    return folder, model


def hf_logits(model, tokens, positions):
    """transformers' FP32 logits for one sequence at explicit `position_ids`.

    An explicit all-ones attention mask keeps transformers from reading the position jumps
    (anchor at 0, document at its window offset) as packed-sequence boundaries.
    """
    ids = torch.as_tensor(tokens)[None]
    with torch.no_grad():
        return model(input_ids=ids, position_ids=torch.as_tensor(positions)[None],
                     attention_mask=torch.ones_like(ids)).logits[0].float()


def our_logits(model, batch, vocab=VOCAB):
    from megatron_anchor.model import forward_packed

    with torch.no_grad():
        logits, _ = forward_packed(model, batch)
    return logits.float()[:, :vocab]


def rel_diff(ours, ref) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def documents(seed: int = 1, lengths=(23, 40, 17)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Every family saved once: name -> (folder, transformers model)."""
    return {name: make_hf_model(name, tmp_path_factory.mktemp(name)) for name in FAMILIES}
