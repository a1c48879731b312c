"""SmolLM2-135M read from the GGUF: config, tokenizer, Q/K un-permutation, Megatron import."""

import sysconfig
from pathlib import Path

import pytest
import torch

from megatron_anchor.convert.gguf import permute_rope_rows
from megatron_anchor.convert.reference_llama import Precision, ReferenceLlama, perplexity

# SmolLM2-135M (GGUF read, 30-layer forwards on CPU).
pytestmark = pytest.mark.slow


def test_config_from_metadata(smollm2):
    cfg = smollm2.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == \
        (30, 576, 9, 3)
    assert (cfg.ffn_hidden_size, cfg.vocab_size, cfg.rotary_base) == (1536, 49152, 1e5)
    assert cfg.norm_epsilon == pytest.approx(1e-5)
    assert cfg.tied_embeddings  # no output.weight in the file: embedding copied to the output
    assert torch.equal(smollm2.weights["output"], smollm2.weights["embedding"])
    assert smollm2.weights["output"].data_ptr() != smollm2.weights["embedding"].data_ptr()


def test_tokenizer_round_trip(smollm2):
    tok = smollm2.tokenizer
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:4000]
    text += "\nUnicode: héllo wörld, 日本語, digits 2024-11-23, tabs\t\tand  spaces "
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # BPE merges really apply
    assert tok.encode("12345").tokens == list("12345")  # SmolLM2 splits digits one by one
    assert tok.encode("<|endoftext|>").ids == [smollm2.eod_token_id] == [0]
    assert tok.get_vocab_size() == 49152


def test_tokenizer_matches_llama_cpp(smollm2):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(smollm2.source), vocab_only=True, verbose=False)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:6000]
    text += " Héllo 12 日本語 <|im_start|>x"
    assert smollm2.tokenizer.encode(text).ids == llm.tokenize(text.encode(), add_bos=False,
                                                              special=True)


def test_perplexity_on_real_text_needs_the_unpermutation(smollm2, real_text_tokens):
    model = ReferenceLlama(smollm2.config, smollm2.weights, Precision(torch.float32))
    ppl = perplexity(model, real_text_tokens)
    # Measured 12.1 on textwrap.py (vocab 49152; a uniform guess is 49152).
    assert ppl < 30, ppl
    # Leaving llama.cpp's interleaved Q/K row order in place wrecks the model.
    permuted = dict(smollm2.weights)
    for i in range(smollm2.config.num_layers):
        permuted[f"layers.{i}.wq"] = permute_rope_rows(permuted[f"layers.{i}.wq"], 9)
        permuted[f"layers.{i}.wk"] = permute_rope_rows(permuted[f"layers.{i}.wk"], 3)
    wrong = perplexity(ReferenceLlama(smollm2.config, permuted), real_text_tokens)
    assert wrong > 5 * ppl, (wrong, ppl)


def test_megatron_model_matches_reference_logits(smollm2, real_text_tokens, megatron_cpu):
    from dataclasses import replace

    from megatron_anchor.convert import reference as mi

    # The first 4 of the 30 layers keep the test short; the mapping is per layer.
    cfg = replace(smollm2.config, num_layers=4)
    weights = {k: v for k, v in smollm2.weights.items()
               if not k.startswith("layers.") or int(k.split(".")[1]) < 4}
    model, mcfg = mi.build_megatron_model(cfg, weights)
    tokens = real_text_tokens[:128]
    ours = mi.megatron_logits(model, tokens)[:, :cfg.vocab_size]
    ref = ReferenceLlama(cfg, weights, Precision(torch.float32)).logits(
        tokens, torch.arange(tokens.numel()))[0]
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4), float((ours - ref).abs().max())
    # And back: Megatron's state dict maps to the same reference weights.
    back = mi.reference_weights_from_megatron(model.state_dict(), cfg)
    assert set(back) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(back[name], tensor), name


def test_qkv_fusion_layout():
    """Megatron's fused QKV groups rows per query group: [q heads of the group, k, v]."""
    from megatron_anchor.convert.reference import fuse_qkv, split_qkv
    from megatron_anchor.convert.reference_llama import LlamaConfig

    cfg = LlamaConfig(num_layers=1, hidden_size=4, ffn_hidden_size=8, num_attention_heads=4,
                      num_query_groups=2, vocab_size=8, rotary_base=1e4, norm_epsilon=1e-5)
    D = cfg.head_dim  # 1: each row is one head
    wq = torch.tensor([[10.0], [11.0], [12.0], [13.0]]).expand(4, 4)
    wk = torch.tensor([[20.0], [21.0]]).expand(2, 4)
    wv = torch.tensor([[30.0], [31.0]]).expand(2, 4)
    fused = fuse_qkv(wq, wk, wv, cfg)
    assert fused[:, 0].tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, cfg), (wq, wk, wv)))
    assert D == 1
