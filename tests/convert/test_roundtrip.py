"""Import -> Megatron checkpoint -> export gives back every tensor bit for bit; the export
loads in transformers unchanged; a TP=2 load of the imported checkpoint gives the same logits."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from megatron_anchor.layout import pack_documents
from tests.convert.conftest import (BOS, VOCAB, documents, hf_logits, make_hf_model,
                                    our_logits, rel_diff)


def read_all(folder):
    """Every tensor of a HF directory (all *.safetensors files)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("name,shard,dtype,import_dtype", [
    ("llama31-rope-scaling", "40KB", torch.float32, "fp32"),  # sharded with an index
    ("qwen2-bias-tied-gqa", None, torch.float32, "fp32"),     # single file, tied, QKV bias
    ("mistral-mha", "60KB", torch.bfloat16, "fp32"),          # BF16 file -> FP32 -> BF16
    ("llama-gqa", None, torch.bfloat16, "bf16"),              # BF16 all the way
])
def test_import_export_round_trip_is_bit_identical(name, shard, dtype, import_dtype, tmp_path,
                                                   megatron_cpu):
    from transformers import AutoModelForCausalLM

    from megatron_anchor import checkpoint
    from megatron_anchor.convert import export_checkpoint, import_checkpoint

    src, hf = make_hf_model(name, tmp_path / "hf", max_shard_size=shard)
    if dtype != torch.float32:
        hf = hf.to(dtype)
        for f in os.listdir(src):
            if f.endswith(".safetensors") or f.endswith(".index.json"):
                os.remove(os.path.join(src, f))
        hf.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
    summary = import_checkpoint(src, str(tmp_path / "ckpt"), dtype=import_dtype)
    imported = checkpoint.open(str(tmp_path / "ckpt"))
    saved = imported.model_config
    assert saved.vocab_size == VOCAB and saved.bf16 == (import_dtype == "bf16")
    assert imported.tokenizer_dir  # tokenizer files travel along
    assert summary.parameters > 0

    out = str(tmp_path / "export")
    export_checkpoint(imported, out, max_shard_bytes=50_000)
    original, exported = read_all(src), read_all(out)
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype, key
        assert torch.equal(exported[key], tensor), key
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))

    config = json.load(open(os.path.join(out, "config.json")))
    source = json.load(open(os.path.join(src, "config.json")))
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == \
        source["rope_parameters"]["rope_theta"]
    assert config["max_position_embeddings"] == source["max_position_embeddings"]
    assert config["bos_token_id"] == source["bos_token_id"]

    # transformers loads the export as it loads the original: the same logits, bit for bit.
    back, orig = (AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager")
                  .float().eval() for d in (out, src))
    tokens = [BOS] + documents(seed=5, lengths=(40,))[0]
    pos = list(range(len(tokens)))
    assert torch.equal(hf_logits(back, tokens, pos), hf_logits(orig, tokens, pos))


def test_export_writes_the_trained_rope_base_and_length(tmp_path, megatron_cpu):
    """A raised RoPE base and a new length reach config.json as rope_theta and
    rope_parameters; transformers then reproduces our logits at the new base."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from megatron_anchor import checkpoint
    from megatron_anchor.convert import export_checkpoint, import_checkpoint

    src, _ = make_hf_model("llama31-rope-scaling", tmp_path / "hf")
    import_checkpoint(src, str(tmp_path / "ckpt"), rotary_base=2e6)
    imported = checkpoint.open(str(tmp_path / "ckpt"))
    cfg = imported.architecture(max_sequence_length=1024)
    model = imported.load_model(cfg)
    assert cfg.rotary_base == 2e6
    # Save a "trained" checkpoint with a longer context window, as a trainer would.
    checkpoint.save_model(model, dataclasses.replace(cfg, max_sequence_length=1024),
                          str(tmp_path / "trained"), 10)
    out = str(tmp_path / "export")
    export_checkpoint(checkpoint.open(str(tmp_path / "trained")), out, hf_config_dir=src)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 2e6
    assert config["rope_parameters"]["rope_type"] == "llama3"
    assert config["max_position_embeddings"] == 1024
    back = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    docs = documents(seed=11, lengths=(50, 70))
    batch = pack_documents(docs, 160, "anchor", anchor_token_id=BOS)
    ours = our_logits(model, batch)
    slots = (batch.document_ids == 1).nonzero().flatten()
    ref = hf_logits(back, batch.tokens[slots], batch.position_ids[slots])
    assert rel_diff(ours[slots], ref) <= 1e-5


def _tp2_logits(rank, world_size, paths, batch):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_anchor import checkpoint, runtime
    from megatron_anchor.model import forward_packed

    out = []
    for path in paths:
        model = checkpoint.open(path).load_model(tp=2, cpu=True)
        assert parallel_state.get_tensor_model_parallel_world_size() == 2
        with torch.no_grad():
            logits, _ = forward_packed(model, batch)
            out.append(gather_from_tensor_model_parallel_region(logits))
    runtime.destroy()
    return out


@pytest.mark.distributed
def test_tp2_load_gives_transformers_logits(tmp_path, megatron_cpu):
    """Qwen2 (QKV bias split per group over ranks, tied embeddings) and Llama-3.1 at TP=2."""
    from megatron_anchor.convert import import_checkpoint
    from megatron_anchor.testing import run_on_ranks

    docs = documents(seed=3, lengths=(23, 40, 17))
    batch = pack_documents(docs, 96, "anchor", anchor_token_id=BOS)
    names = ("qwen2-bias-tied-gqa", "llama31-rope-scaling")
    models, paths = [], []
    for name in names:
        src, hf = make_hf_model(name, tmp_path / name)
        paths.append(str(tmp_path / (name + "-ckpt")))
        import_checkpoint(src, paths[-1])
        models.append(hf)
    results = run_on_ranks(_tp2_logits, 2, paths, batch)
    for k, (name, hf) in enumerate(zip(names, models)):
        assert torch.equal(results[0][k], results[1][k])
        ours = results[0][k].float()[:, :VOCAB]
        for i in range(len(docs)):
            slots = (batch.document_ids == i).nonzero().flatten()
            ref = hf_logits(hf, batch.tokens[slots], batch.position_ids[slots])
            assert rel_diff(ours[slots], ref) <= 1e-5, (name, i, rel_diff(ours[slots], ref))


@pytest.mark.parametrize("name", ["qwen2-bias-tied-gqa", "llama31-rope-scaling"])
def test_export_without_any_hf_config(name, tmp_path, megatron_cpu):
    """A checkpoint with no Hugging Face config to start from (trained from scratch here):
    config.json is written from model_config.json alone and transformers matches us."""
    from transformers import AutoModelForCausalLM

    from megatron_anchor import checkpoint
    from megatron_anchor.convert import export_checkpoint, import_checkpoint

    src, _ = make_hf_model(name, tmp_path / "hf")
    path = import_checkpoint(src, str(tmp_path / "ckpt")).output
    os.remove(os.path.join(path, "hf_config.json"))
    manifest = json.load(open(os.path.join(path, checkpoint.MANIFEST_FILE)))
    del manifest["files"]["hf_config.json"]  # as if never saved, not a damaged checkpoint
    json.dump(manifest, open(os.path.join(path, checkpoint.MANIFEST_FILE), "w"))
    out = str(tmp_path / "export")
    export_checkpoint(checkpoint.open(str(tmp_path / "ckpt")), out)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == ("qwen2" if name.startswith("qwen2") else "llama")
    assert "bos_token_id" not in config  # nothing invented
    model = checkpoint.open(str(tmp_path / "ckpt")).load_model()
    back = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    docs = documents(seed=4, lengths=(30, 45))
    batch = pack_documents(docs, 96, "anchor", anchor_token_id=BOS)
    ours = our_logits(model, batch)
    for i in range(len(docs)):
        slots = (batch.document_ids == i).nonzero().flatten()
        ref = hf_logits(back, batch.tokens[slots], batch.position_ids[slots])
        assert rel_diff(ours[slots], ref) <= 1e-5
