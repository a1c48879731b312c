"""Single-process training tests (gloo world of one, Megatron-Core's DDP/optimizer/ckpt)."""

import json
import os

import pytest
import torch

from tests.training.conftest import tiny_argv


def run(argv):
    from megatron_anchor.training.pretrain import run as pretrain_run

    return pretrain_run(argv)


def read_metrics(directory, kind="train"):
    with open(os.path.join(directory, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_end_to_end_loss_falls_and_outputs(megatron_cpu, byte_corpus, tmp_path):
    save = str(tmp_path / "run")
    summary = run(tiny_argv(byte_corpus, "--train-iters", "12", "--save", save,
                            "--eval-iters", "1", "--eval-interval", "6",
                            "--tensorboard-dir", str(tmp_path / "tb")))
    assert summary.iterations == 12
    assert summary.last_loss < summary.first_loss - 0.5, summary.losses
    assert os.path.isfile(summary.plot) and summary.plot.endswith(".png")
    assert summary.checkpoint.endswith("iter_0000012")
    assert "all" in summary.valid and set(summary.valid) & {"a", "b"}  # per-domain loss
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "12"
    assert len(read_metrics(save, "valid")) == 2
    assert os.listdir(tmp_path / "tb")


def test_resume_is_exact(megatron_cpu, byte_corpus, tmp_path):
    common = tiny_argv(byte_corpus, "--train-iters", "6", "--lr-decay-style", "cosine",
                       "--min-lr", "3e-4")
    full = run(common + ["--save", str(tmp_path / "full")])
    half = str(tmp_path / "half")
    first = run(common + ["--save", half, "--exit-interval", "3"])
    assert first.iterations == 3
    second = run(common + ["--load", half, "--save", half])
    assert second.start_iteration == 3 and second.iterations == 3
    torch.testing.assert_close(torch.tensor(second.losses), torch.tensor(full.losses[3:]),
                               rtol=1e-6, atol=1e-6)
    resumed = read_metrics(half)
    assert [r["iteration"] for r in resumed] == list(range(1, 7))
    # Same LR and gradient norms after resume (scheduler and optimizer state restored).
    reference = read_metrics(str(tmp_path / "full"))
    for a, b in zip(resumed[3:], reference[3:]):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_grad_accumulation_matches_larger_micro_batch(megatron_cpu, byte_corpus):
    accumulated = run(tiny_argv(byte_corpus, "--train-iters", "3", "--micro-batch-size", "1"))
    one_batch = run(tiny_argv(byte_corpus, "--train-iters", "3", "--micro-batch-size", "2"))
    torch.testing.assert_close(torch.tensor(accumulated.losses), torch.tensor(one_batch.losses),
                               rtol=2e-5, atol=2e-5)


def test_loss_and_grads_are_per_trained_token(megatron_cpu, byte_corpus):
    """The step's loss and gradients equal those of sum(masked loss) / sum(mask) over the
    whole global batch, not a mean of per-micro-batch means."""
    from megatron_anchor.model import forward_packed
    from megatron_anchor.training import data
    from megatron_anchor.training.arguments import config_from_args, parse_args
    from megatron_anchor.training.model_setup import build_training_components
    from megatron_anchor.training.train import forward_backward, reduce_loss_reports

    cfg = config_from_args(parse_args(tiny_argv(byte_corpus, "--train-iters", "2",
                                                "--micro-batch-size", "1")))
    data.resolve_tokens(cfg, data.load_tokenizer(cfg))
    cfg.validate()
    # Windows of short documents, so the micro-batches have different trained-token counts.
    from megatron_anchor.layout import pack_documents

    gen = torch.Generator().manual_seed(0)
    lengths = [[30, 90, 50], [200], [10, 20, 30, 40, 50], [120, 60]]
    windows = [pack_documents([torch.randint(3, 250, (n,), generator=gen).tolist() for n in docs],
                              256, "anchor", anchor_token_id=257, pad_token_id=258)
               for docs in lengths]
    batches = [data.MicroBatches(cfg, 0, 1, 0, 1, "cpu").assemble([w]) for w in windows]
    counts = [float(b.loss_mask.sum()) for b in batches]
    assert len(set(counts)) > 1 and max(counts) < 256  # unequal, and some slots masked

    components = build_training_components(cfg)
    module = components.module
    sums = []
    for batch in batches:
        _, loss = forward_packed(module, batch, return_logits=False)
        sums.append((loss * batch.loss_mask).sum())
    reference_loss = torch.stack(sums).sum() / sum(counts)
    reference_grads = torch.autograd.grad(reference_loss, list(module.parameters()))

    reported = reduce_loss_reports(forward_backward(components, batches, cfg))
    assert reported == pytest.approx(float(reference_loss), rel=1e-6)
    mean_of_means = float(torch.stack([s / c for s, c in zip(sums, counts)]).mean())
    assert abs(mean_of_means - reported) > 1e-4  # the test can tell the two apart
    for param, expected in zip(module.parameters(), reference_grads):
        torch.testing.assert_close(param.main_grad, expected, rtol=1e-4, atol=1e-6)


def test_checkpoint_round_trip_load_model(megatron_cpu, byte_corpus, tmp_path):
    from megatron_anchor.layout import pack_documents
    from megatron_anchor.model import forward_packed
    from megatron_anchor import checkpoint
    from megatron_anchor.checkpoint import CheckpointError
    from megatron_anchor.layout import LayoutError
    from megatron_anchor.runtime import ParallelLayoutError

    save = str(tmp_path / "ck")
    run(tiny_argv(byte_corpus, "--train-iters", "2", "--save", save))
    ckpt = checkpoint.open(save)
    model, config = ckpt.load_model(tp=1, cp=1), ckpt.model_config
    assert config.hidden_size == 64 and config.num_query_groups == 2
    batch = pack_documents([list(range(3, 60)), list(range(100, 180))], 256, "anchor",
                           anchor_token_id=257)
    with torch.no_grad():
        logits, _ = forward_packed(model, batch)
    # Same weights as a second load of the same files (and not the random init).
    again = checkpoint.open(os.path.join(save, "iter_0000002")).load_model(tp=1, cp=1)
    with torch.no_grad():
        torch.testing.assert_close(forward_packed(again, batch)[0], logits, rtol=0, atol=0)
    with pytest.raises(ParallelLayoutError, match="already exist with TP=1"):
        ckpt.load_model(tp=2, cp=1)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.open(str(tmp_path / "nothing"))
    with pytest.raises(CheckpointError, match="cannot override num_layers"):
        ckpt.load_model(num_layers=3)
    with pytest.raises(LayoutError, match="--seq-length"):
        run(tiny_argv(byte_corpus, "--context-parallel-size", "2", "--seq-length", "250"))


def test_interleave_chunks_reaches_the_packed_windows(byte_corpus):
    """--interleave-chunks goes from the command line to the window packer: same tokens and
    segments, positions permuted as if the documents' chunks were interleaved."""
    from megatron_anchor.training.arguments import config_from_args, parse_args
    from megatron_anchor.training.data import build_dataset

    def first_window(extra):
        args = parse_args(tiny_argv(byte_corpus, "--attention-variant", "intra-doc",
                                    "--seq-length", "8192", *extra))
        cfg = config_from_args(args)
        return cfg.data.interleave_chunks, build_dataset(cfg, "train", 1)[0]

    chunks, plain = first_window([])
    assert chunks is None
    chunks, inter = first_window(["--interleave-chunks", "2"])
    assert chunks == 2
    assert len(plain.consumed) >= 2  # several documents, so interleaving moves tokens
    assert torch.equal(inter.tokens, plain.tokens)
    assert not torch.equal(inter.position_ids, plain.position_ids)
    assert sorted(inter.position_ids.tolist()) == sorted(plain.position_ids.tolist())
    from megatron_anchor.errors import UsageError

    with pytest.raises(UsageError, match="--interleave-chunks: invalid choice: 4"):
        parse_args(tiny_argv(byte_corpus, "--interleave-chunks", "4"))


def test_bf16_mixed_precision_on_cpu_tracks_fp32(byte_corpus, monkeypatch):
    """--bf16 on CPU: BF16 weights and activations, FP32 main weights in Megatron's own
    mixed-precision optimizer; a few steps stay within BF16 tolerance of FP32 and still learn."""
    from megatron_anchor.training import model_setup

    build, seen = model_setup.build_training_components, {}

    def spy(cfg):  # the run imports build_training_components when it starts
        components = build(cfg)
        seen["param_dtypes"] = {p.dtype for p in components.module.parameters()}
        optimizers = getattr(components.optimizer, "chained_optimizers", [components.optimizer])
        seen["optimizer"] = type(optimizers[0]).__name__
        return components

    monkeypatch.setattr(model_setup, "build_training_components", spy)
    fp32 = run(tiny_argv(byte_corpus, "--train-iters", "4")).losses
    assert seen["param_dtypes"] == {torch.float32}
    bf16 = run(tiny_argv(byte_corpus, "--train-iters", "4", "--bf16")).losses
    assert seen["param_dtypes"] == {torch.bfloat16}  # norms too, as Float16Module casts them
    assert seen["optimizer"] == "Float16OptimizerWithFloat16Params"  # FP32 main weights
    rel = max(abs(a - b) / a for a, b in zip(fp32, bf16))
    assert rel < 2.5e-2, (fp32, bf16)
    assert bf16 != fp32 and bf16[-1] < bf16[0]


def test_bf16_from_a_pretrained_checkpoint_keeps_its_weights(megatron_cpu, byte_corpus,
                                                             tmp_path):
    """The FP32 main weights are made when the optimizer is built, before the pretrained
    weights arrive: they must be refreshed, or the first update puts the random init back."""
    pretrained = str(tmp_path / "pretrained")
    trained = run(tiny_argv(byte_corpus, "--train-iters", "10", "--save", pretrained))
    assert trained.last_loss < trained.first_loss - 0.5
    start = tiny_argv(byte_corpus, "--train-iters", "3", "--pretrained-checkpoint", pretrained)
    fp32 = run(start).losses
    bf16 = run(start + ["--bf16"]).losses
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16)) < 2.5e-2, (fp32, bf16)


def test_bf16_resume_is_exact(megatron_cpu, byte_corpus, tmp_path):
    """BF16 weights, FP32 main weights and Adam state all go through the checkpoint."""
    common = tiny_argv(byte_corpus, "--train-iters", "4", "--bf16")
    full = run(common + ["--save", str(tmp_path / "full")])
    half = str(tmp_path / "half")
    run(common + ["--save", half, "--exit-interval", "2"])
    second = run(common + ["--load", half, "--save", half])
    assert second.start_iteration == 2
    assert second.losses == full.losses[2:]
