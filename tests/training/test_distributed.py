"""Multi-process (gloo) training tests: TP=2 matches TP=1; checkpoints reshard at load."""

import pytest
import torch

from megatron_anchor.testing import run_on_ranks
from tests.training.conftest import tiny_argv

pytestmark = pytest.mark.distributed


def _train(rank, world_size, argv):
    from megatron_anchor.training.pretrain import run

    summary = run(argv)
    return summary.losses


def _tp2_logits(rank, world_size, checkpoint, batch):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_anchor import runtime
    from megatron_anchor.model import forward_packed
    from megatron_anchor.checkpoint import open as open_checkpoint

    model = open_checkpoint(checkpoint).load_model(tp=2, cp=1, cpu=True)
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    with torch.no_grad():
        logits, _ = forward_packed(model, batch)
        full = gather_from_tensor_model_parallel_region(logits)
    runtime.destroy()
    return full


def test_tp2_training_matches_tp1_and_tp1_checkpoint_loads_at_tp2(byte_corpus, tmp_path):
    from megatron_anchor.layout import pack_documents

    argv = tiny_argv(byte_corpus, "--train-iters", "3")
    save = str(tmp_path / "tp1")
    tp1 = run_on_ranks(_train, 1, argv + ["--save", save])[0]
    tp2 = run_on_ranks(_train, 2, argv + ["--tensor-model-parallel-size", "2"])
    assert tp2[0] == tp2[1]
    torch.testing.assert_close(torch.tensor(tp2[0]), torch.tensor(tp1), rtol=1e-5, atol=1e-5)

    batch = pack_documents([list(range(3, 70)), list(range(90, 200))], 256, "anchor",
                           anchor_token_id=257)
    reference = run_on_ranks(_tp1_logits, 1, save, batch)[0]
    resharded = run_on_ranks(_tp2_logits, 2, save, batch)
    for logits in resharded:
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def _tp1_logits(rank, world_size, checkpoint, batch):
    from megatron_anchor import runtime
    from megatron_anchor.model import forward_packed
    from megatron_anchor.checkpoint import open as open_checkpoint

    model = open_checkpoint(checkpoint).load_model(tp=1, cp=1, cpu=True)
    with torch.no_grad():
        logits, _ = forward_packed(model, batch)
    runtime.destroy()
    return logits
