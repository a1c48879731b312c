"""Bad arguments to any tool: one stderr line naming what to change, exit status 2, no
traceback. Every tool's `main(argv)` runs in-process; each case fails before any real work
(no model is loaded, nothing is written)."""

import importlib

import pytest

# (tool module, argv, a fragment the one line must hold). {tmp} is a fresh directory.
CASES = [
    ("megatron_anchor.cli.preprocess_data", ["--bogus"], "required: --input"),
    ("megatron_anchor.cli.preprocess_data",
     ["--input", "{tmp}/in.jsonl", "--output-prefix", "{tmp}/out",
      "--tokenizer-type", "ByteTokenizer", "--bogus"], "unrecognized arguments: --bogus"),
    ("megatron_anchor.cli.preprocess_data",
     ["--input", "{tmp}/missing.jsonl", "--output-prefix", "{tmp}/out",
      "--tokenizer-type", "ByteTokenizer"], "--input: no such file"),
    ("megatron_anchor.cli.preprocess_data",
     ["--input", "{tmp}/in.jsonl", "--output-prefix", "{tmp}/out",
      "--tokenizer-type", "ByteTokenizer", "--workers", "0"], "--workers"),
    ("megatron_anchor.cli.preprocess_data",
     ["--input", "{tmp}/in.jsonl", "--output-prefix", "{tmp}/out",
      "--tokenizer-type", "NoSuchTokenizer"], "--tokenizer-type"),
    ("megatron_anchor.cli.preprocess_data",
     ["--input", "{tmp}/in.jsonl", "--output-prefix", "{tmp}/out",
      "--tokenizer-type", "HuggingFaceTokenizer"], "--tokenizer-model"),
    ("megatron_anchor.cli.merge_datasets",
     ["--datasets", "{tmp}/missing", "--output-prefix", "{tmp}/m"], "dataset file not found"),
    ("megatron_anchor.cli.merge_datasets", ["--output-prefix", "{tmp}/m"],
     "--input --datasets"),
    ("megatron_anchor.cli.build_sample_corpus",
     ["--output", "{tmp}/c.jsonl", "--max-documents", "0"], "--max-documents"),
    ("megatron_anchor.cli.build_sample_corpus",
     ["--output", "{tmp}/c.jsonl", "--domains", "poetry"], "--domains"),
    ("megatron_anchor.cli.train_tokenizer",
     ["--input", "{tmp}/missing.jsonl", "--output", "{tmp}/t.json"], "--input: no such file"),
    ("megatron_anchor.cli.train_tokenizer",
     ["--input", "{tmp}/in.jsonl", "--output", "{tmp}/t.json", "--vocab-size", "100"],
     "--vocab-size"),
    ("megatron_anchor.cli.dataset_stats",
     ["--data-path", "{tmp}/missing", "--seq-length", "16"], "dataset file not found"),
    ("megatron_anchor.cli.dataset_stats",
     ["--data-path", "{tmp}/missing", "--seq-length", "many"], "--seq-length"),
    ("megatron_anchor.cli.rope_precision", ["--shifts", "100,500"], "must include 0"),
    ("megatron_anchor.cli.rope_precision", ["--settings", "bf8-pretrained"], "bf8-pretrained"),
    ("megatron_anchor.cli.rope_precision", ["--shifts", "0,ten"], "--shifts"),
    ("megatron_anchor.cli.rope_precision", ["--data-path", "{tmp}/missing"],
     "--data-path: dataset file not found"),
    ("megatron_anchor.cli.import_smollm2", ["--validate-tokens", "10"], "--save"),
    ("megatron_anchor.cli.import_smollm2", ["--save", "{tmp}/ckpt", "--validate-tokens", "-1"],
     "--validate-tokens"),
    ("megatron_anchor.cli.import_smollm2",
     ["--save", "{tmp}/ckpt", "--validate-text", "{tmp}/missing.txt"], "--validate-text"),
    ("megatron_anchor.cli.verify_parity", ["--layouts", "tpXcp1"], "tpXcp1"),
    ("megatron_anchor.cli.verify_parity", ["--layouts", "tp1cp1"], "at least two layouts"),
    ("megatron_anchor.cli.verify_parity", ["--bogus"], "unrecognized arguments: --bogus"),
    ("megatron_anchor.training.pretrain", ["--bogus"], "unrecognized arguments: --bogus"),
    ("megatron_anchor.training.pretrain",
     ["--cpu", "--data-path", "{tmp}/missing", "--vocab-size", "100",
      "--micro-batch-size", "3", "--global-batch-size", "4"], "--micro-batch-size 3"),
    ("megatron_anchor.training.pretrain",
     ["--cpu", "--data-path", "{tmp}/missing", "--vocab-size", "100", "--train-iters", "2",
      "--attention-variant", "full",
      "--lr-warmup-iters", "2"], "--lr-warmup-iters 2 must be below --train-iters 2"),
    ("megatron_anchor.cli.verify_parity", ["--layouts", "tp1cp1,tp2cp1", "--load", "{tmp}/none"],
     "no such checkpoint directory"),
    ("megatron_anchor.cli.convert_checkpoint", ["import", "--hf-dir", "{tmp}/none", "--output",
                                                "{tmp}/ck"], "no config.json"),
    ("megatron_anchor.cli.eval_long_context", ["--load", "{tmp}/none"], "no such checkpoint"),
]

# Every tool's `main(["--help"])` prints its help and returns 0.
HELP_TOOLS = [
    "megatron_anchor.cli.build_sample_corpus", "megatron_anchor.cli.dataset_stats",
    "megatron_anchor.cli.import_smollm2", "megatron_anchor.cli.merge_datasets",
    "megatron_anchor.cli.preprocess_data", "megatron_anchor.cli.rope_precision",
    "megatron_anchor.cli.train_tokenizer",
    "megatron_anchor.cli.verify_parity", "megatron_anchor.training.pretrain",
    "megatron_anchor.cli.convert_checkpoint", "megatron_anchor.cli.eval_long_context",
]


def _case_id(case):
    module, argv = (case.values if hasattr(case, "values") else case)[:2]
    return f"{module.rsplit('.', 1)[-1]}:{' '.join(argv)[:40]}"


@pytest.mark.parametrize("module,argv,fragment", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_arguments_are_one_line_and_status_2(tmp_path, capsys, monkeypatch, module, argv,
                                                 fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text('{"text": "a document"}\n')
    main = importlib.import_module(module).main
    status = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == 1, captured.err
    assert ": error: " in lines[0] and fragment in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing written


@pytest.mark.parametrize("module", HELP_TOOLS)
def test_help_is_status_0(capsys, module):
    assert importlib.import_module(module).main(["--help"]) == 0
    assert "usage:" in capsys.readouterr().out
