"""Megatron-LM glue: the batch/forward-step pieces run with megatron-core alone; the trainer
pieces need `megatron.training` (not importable on megatron-core 0.16.1 / Python 3.11)."""

import pytest
import torch

from megatron_anchor.training import megatron_lm


def test_forward_step_matches_forward_packed(megatron_cpu):
    from megatron_anchor.layout import pack_documents
    from megatron_anchor.model import ModelConfig, build_model, forward_packed

    model = build_model(ModelConfig(vocab_size=300))
    windows = [pack_documents([list(range(3, 40)), list(range(50, 120))], 128, "anchor",
                              anchor_token_id=1) for _ in range(2)]
    loss, reduce = megatron_lm.forward_step(iter([windows]), model)
    loss_sum, num_tokens, report = reduce(loss)
    from megatron_anchor.layout import collate

    batch = collate(windows)
    _, expected = forward_packed(model, batch, return_logits=False)
    assert int(num_tokens) == int(batch.loss_mask.sum())
    torch.testing.assert_close(loss_sum, (expected * batch.loss_mask).sum())
    torch.testing.assert_close(report["lm loss"][1], batch.loss_mask.sum())


def test_megatron_lm_pieces_need_megatron_training():
    if megatron_lm.megatron_lm_available():
        import argparse

        parser = megatron_lm.add_anchor_args(argparse.ArgumentParser())
        assert parser.parse_args(["--anchor-token-id", "1"]).anchor_variant == "anchor"
        pytest.skip("megatron.training is importable: the full trainer path is exercised on "
                    "clusters")
    with pytest.raises(ImportError, match="megatron.training"):
        megatron_lm.model_provider()
