"""SmolLM2-135M: our GGUF import, our Hugging Face import and transformers agree on real text.

transformers reads the same GGUF file independently (its own dequantization and Q/K
un-permutation); its model, saved as a HF directory, is what our HF importer reads.
"""

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory, megatron_cpu, smollm2, real_text_tokens):
    from transformers import AutoModelForCausalLM

    from megatron_anchor.convert.smollm2 import smollm2_hf_dir

    folder = smollm2_hf_dir(str(tmp_path_factory.mktemp("smollm2-hf")))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    gguf = smollm2  # the session's GGUF read (tests/conftest.py), shared with the diagnostics
    tokens = torch.cat([torch.tensor([gguf.bos_token_id]), real_text_tokens[:255]])
    with torch.no_grad():
        ref = hf(input_ids=tokens[None]).logits[0].float()
    return folder, hf, gguf, tokens, ref


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_gguf_import_matches_transformers_gguf_reader(smol):
    from megatron_anchor.convert import reference as mi

    _, _, gguf, tokens, ref = smol
    model, _ = mi.build_megatron_model(gguf.config, gguf.weights)
    ours = mi.megatron_logits(model, tokens)[:, :gguf.config.vocab_size]
    assert rel(ours, ref) <= 1e-4, rel(ours, ref)
    # Real text, a pretrained model: next-token loss far below ln(49152) = 10.8.
    loss = torch.nn.functional.cross_entropy(ref[:-1], tokens[1:])
    assert loss < 4.0, float(loss)


def test_hf_import_of_smollm2_is_tied_and_exact(smol, megatron_cpu):
    from megatron_anchor.convert import load_hf_model
    from megatron_anchor.convert import reference as mi

    folder, _, gguf, tokens, ref = smol
    model, cfg, _ = load_hf_model(folder)
    assert cfg.share_embeddings_and_output_weights and cfg.rotary_base == 1e5
    assert "output_layer.weight" not in model.state_dict()
    ours = mi.megatron_logits(model, tokens)[:, :cfg.vocab_size]
    assert rel(ours, ref) <= 1e-5, rel(ours, ref)
    # Both importers read the same numbers: Q/K un-permutation agrees with transformers'.
    fused = model.state_dict()["decoder.layers.3.self_attention.linear_qkv.weight"]
    expected = mi.fuse_qkv(gguf.weights["layers.3.wq"], gguf.weights["layers.3.wk"],
                           gguf.weights["layers.3.wv"], gguf.config)
    assert torch.equal(fused, expected)
