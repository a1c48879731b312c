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
        pytest.skip("megatron.training is importable here: see the test below")
    with pytest.raises(ImportError, match="megatron.training"):
        megatron_lm.model_provider()


MEGATRON_LM_ARGV = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "176",
    "--seq-length", "256", "--max-position-embeddings", "256", "--micro-batch-size", "1",
    "--global-batch-size", "2", "--spec", "megatron_anchor.megatron_lm_spec", "anchor_layer_spec",
    "--position-embedding-type", "none", "--rotary-base", "10000", "--normalization", "RMSNorm",
    "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--transformer-impl", "local", "--calculate-per-token-loss", "--attention-dropout", "0",
    "--hidden-dropout", "0", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "300", "--lr", "1e-3",
    "--train-iters", "2", "--split", "90,10,0", "--distributed-backend", "gloo",
    "--attention-variant", "anchor", "--anchor-token-id", "1",
]


def test_plugin_flags_take_the_trainers_names_and_keep_the_old_ones():
    """--attention-variant / --pad-token-id / --rope-bf16 as in megatron-anchor-pretrain; the
    earlier --anchor-* spellings still parse, with a deprecation warning."""
    import argparse

    parser = megatron_lm.add_anchor_args(argparse.ArgumentParser())
    args = parser.parse_args(["--attention-variant", "intra-doc", "--pad-token-id", "5",
                              "--rope-bf16"])
    assert (args.attention_variant, args.pad_token_id, args.rope_bf16) == ("intra-doc", 5, True)
    assert parser.parse_args([]).rope_bf16 is False
    with pytest.warns(FutureWarning, match="--anchor-variant is deprecated: use "
                                           "--attention-variant"):
        old = parser.parse_args(["--anchor-variant", "full", "--anchor-pad-token-id", "7",
                                 "--anchor-rope-bf16"])
    assert (old.attention_variant, old.pad_token_id, old.rope_bf16) == ("full", 7, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--attention-variant", "nope"])


def test_megatron_lm_spec_dataset_and_forward_step(megatron_cpu, byte_corpus, monkeypatch):
    """With Megatron-LM's own argument parsing (megatron-core >= 0.19 on Python >= 3.12):
    `--spec megatron_anchor.megatron_lm_spec anchor_layer_spec` resolves through Megatron's
    `import_module`, the model provider builds the anchor GPTModel, the dataset provider
    yields packed windows, and forward_step's loss equals forward_packed's."""
    if not megatron_lm.megatron_lm_available():
        pytest.skip("megatron.training is not importable (megatron-core < 0.19 or Python < 3.12)")
    from megatron.core.transformer.spec_utils import import_module
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_args

    from megatron_anchor.attention.core import LocalAnchorAttention
    from megatron_anchor.layout import collate
    from megatron_anchor.model import forward_packed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr("sys.argv", ["pretrain_gpt.py", *MEGATRON_LM_ARGV,
                                     "--data-path", byte_corpus])
    args = parse_args(extra_args_provider=megatron_lm.add_anchor_args)
    validate_args(args)
    args.padded_vocab_size = 384  # set by Megatron-LM's tokenizer set-up in a real run
    set_args(args)

    spec = import_module(tuple(args.spec))  # what pretrain_gpt.py / gpt_builders.py do
    assert spec.submodules.self_attention.submodules.core_attention.module is LocalAnchorAttention
    model = megatron_lm.model_provider()
    train, valid, test = megatron_lm.train_valid_test_datasets_provider([4, 2, 0])
    assert len(train.dataset) == 4 and len(valid.dataset) == 2 and test is None
    windows = next(train) + next(train)  # micro-batches of 1 window, DP=1
    assert [w.tokens.tolist() for w in windows] == \
        [train.dataset[i].tokens.tolist() for i in (0, 1)]
    assert all(w.tokens.numel() == 256 for w in windows)

    loss, reduce = megatron_lm.forward_step(iter([windows]), model)
    loss_sum, num_tokens, _ = reduce(loss)
    batch = collate(windows)
    _, expected = forward_packed(model, batch, return_logits=False)
    assert int(num_tokens) == int(batch.loss_mask.sum()) > 0
    torch.testing.assert_close(loss_sum.detach(), (expected * batch.loss_mask).sum().detach())


def test_pretrain_main_calls_the_installed_trainers_pretrain(megatron_cpu, byte_corpus,
                                                             monkeypatch):
    """`pretrain_main` hands our providers to the installed Megatron-LM `pretrain()` in the
    form it takes: megatron-core 0.19 wants the parsed arguments as a PretrainConfigContainer
    first (calling it the old way was a TypeError, found on the first H200 run). Megatron-LM's
    own parsing runs; only pretrain() itself (it needs CUDA) is replaced by a recorder with
    its signature."""
    if not megatron_lm.megatron_lm_available():
        pytest.skip("megatron.training is not importable (megatron-core < 0.19 or Python < 3.12)")
    import functools
    import inspect

    import megatron.training

    real = megatron.training.pretrain
    calls = []

    @functools.wraps(real)
    def recorder(*args, **kwargs):
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments)

    monkeypatch.setattr(megatron.training, "pretrain", recorder)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    from megatron.training.global_vars import unset_global_variables

    unset_global_variables()  # a test before may have set Megatron-LM's global args
    try:
        megatron_lm.pretrain_main([*MEGATRON_LM_ARGV, "--data-path", byte_corpus,
                                   "--dataloader-type", "external"])
        args = megatron.training.get_args()
    finally:
        unset_global_variables()
    (bound,) = calls
    assert bound["train_valid_test_dataset_provider"] is \
        megatron_lm.train_valid_test_datasets_provider
    assert bound["forward_step_func"] is megatron_lm.forward_step
    assert bound["model_provider"] is megatron_lm.model_provider
    if "cfg_container" in bound:
        cfg = bound["cfg_container"]
        assert cfg.train.train_iters == 2 and cfg.train.micro_batch_size == 1
        assert args.attention_variant == "anchor" and args.anchor_token_id == 1
    else:
        assert bound["extra_args_provider"] is megatron_lm.add_anchor_args


def test_micro_batch_iterator_follows_megatrons_sampler_order():
    """Each DP rank gets its m samples of every m·dp (MegatronPretrainingSampler's order),
    resumes at the consumed samples, and a train iterator ends with its dataset."""
    samples = list(range(12))
    ranks = [megatron_lm.MicroBatchIterator(samples, 2, rank, 2) for rank in range(2)]
    assert [next(ranks[0]), next(ranks[1]), next(ranks[0])] == [[0, 1], [2, 3], [4, 5]]
    resumed = megatron_lm.MicroBatchIterator(samples, 2, 1, 2, consumed_samples=8)
    assert list(resumed) == [[10, 11]]
    cyclic = megatron_lm.MicroBatchIterator(samples[:3], 2, 0, 1, cyclic=True)
    assert [next(cyclic) for _ in range(3)] == [[0, 1], [2, 0], [1, 2]]
