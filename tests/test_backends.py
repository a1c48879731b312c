"""The backend registry: what each backend supplies, and the rules it owns."""

import re

import pytest

from megatron_anchor import backends
from megatron_anchor.attention import te_cp


def test_registry_names_and_unknown_backend():
    assert backends.BACKEND_NAMES == ("local", "te", "varlen")
    with pytest.raises(backends.BackendError, match="unknown attention backend 'flash'.*local or te"):
        backends.get("flash")
    from megatron_anchor.training.megatron_lm import backend_for_transformer_impl

    assert backend_for_transformer_impl("transformer_engine") is backends.get("te")
    assert backend_for_transformer_impl("local") is backends.get("local")


def test_local_supplies_our_core_attention_in_megatrons_local_spec():
    from megatron_anchor.attention.core import LocalAnchorAttention
    from megatron_anchor.spec import get_anchor_layer_spec

    local = backends.get("local")
    assert local.core_attention() is LocalAnchorAttention
    spec = get_anchor_layer_spec(local, rotary_base=5e5)
    core = spec.submodules.self_attention.submodules.core_attention
    assert core.module is LocalAnchorAttention and core.params["rotary_base"] == 5e5
    local.validate(cpu=True, tp=2, cp=4, cp_comm_type="anything")  # local all-gathers K/V


@pytest.mark.parametrize("options,message", [
    (dict(cpu=True), "needs a GPU"),
    (dict(sequence_parallel=True), "Transformer Engine"),  # te, no TE here: not installed
])
def test_te_refusals_on_this_machine(options, message):
    if backends.transformer_engine_available():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(backends.BackendError, match=message):
        backends.validate("te", **options)


def test_sequence_parallel_needs_te():
    with pytest.raises(backends.BackendError, match="--sequence-parallel needs --attention-backend te"):
        backends.validate("local", sequence_parallel=True)


@pytest.mark.parametrize("comm_type,version,ok", [
    ("p2p", "1.13.0", True), ("a2a", "2.9.0", False), ("a2a", "2.10.0", True),
    ("all_gather", "2.17.0", False), ("all_gather", "2.18.0", True), ("a2a+p2p", "2.18", False),
])
def test_te_cp_comm_types_follow_the_installed_te(comm_type, version, ok):
    call = lambda: backends.validate("te", cp=2, cp_comm_type=comm_type, te_version=version,
                                     num_attention_heads=8, num_query_groups=2)
    if ok:
        call()
    else:
        with pytest.raises(backends.BackendError, match=re.escape(f"{comm_type}: that needs TE")):
            call()


def test_pretraining_takes_its_te_checks_from_the_registry(monkeypatch):
    """The trainer refuses a TE CP combination the installed TE cannot run (as the parity
    tool does): both ask the registry."""
    from megatron_anchor.training.config import DataConfig, ParallelConfig, TrainConfig
    from megatron_anchor.model import ModelConfig

    monkeypatch.setattr(backends, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(te_cp, "installed_te_version", lambda: "2.17.0")
    cfg = TrainConfig(
        model=ModelConfig(attention_backend="te", cp_comm_type="all_gather", vocab_size=256),
        parallel=ParallelConfig(context_parallel_size=2, cpu=False),
        data=DataConfig(data_path=["x"], seq_length=64, anchor_token_id=1))
    with pytest.raises(backends.BackendError, match="all_gather: that needs TE >= 2.18"):
        cfg.validate()
    cfg.model.cp_comm_type = "p2p"
    cfg.validate()
