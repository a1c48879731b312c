"""Scoring on tiny Megatron models: a model forced to predict "token + 1" gives known
verdicts; batched windows equal one-by-one forwards; averaging and intervals."""

import dataclasses

import pytest
import torch

from megatron_anchor.evaluation import scoring
from megatron_anchor.evaluation.runner import (
    EvalConfig, EvalResult, CellResult, average_checkpoints, evaluate, wilson_interval)
from megatron_anchor.evaluation.tasks import Sample, generate_sample
from tests.evaluation.helpers import tiny_model_config

ANCHOR = 5


@pytest.fixture(scope="module")
def successor_model(megatron_cpu):
    """Every layer zeroed (the residual stream is the embedding), and the output layer maps
    token i's embedding to token i+1: arg-max = input token + 1, at every position. Padded
    vocabulary rows get huge logits: scoring must ignore them."""
    from megatron_anchor.model import build_model

    cfg = tiny_model_config(num_layers=1, vocab_size=200)
    model = build_model(cfg).eval()
    torch.manual_seed(0)
    # Embeddings share a direction u (so one padded row can beat every real logit), yet each
    # is closest to itself.
    u = torch.nn.functional.normalize(torch.randn(cfg.hidden_size), dim=0)
    noise = torch.nn.functional.normalize(
        torch.randn(cfg.padded_vocab_size, cfg.hidden_size), dim=-1)
    emb = torch.nn.functional.normalize(0.8 * noise + 0.6 * u, dim=-1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("decoder.layers") and p.dim() == 2:
                p.zero_()
        model.embedding.word_embeddings.weight.copy_(emb)
        out = torch.roll(emb, shifts=1, dims=0)          # row j = emb[j - 1]
        out[cfg.vocab_size:] = 50.0 * u  # padded rows: "better" than any real token
        model.output_layer.weight.copy_(out)
    return model, cfg


def _sample(prompt, answer, spans, references=("x",)):
    return Sample(task="hand", length=1 + len(prompt) + len(answer), index=0, depth=None,
                  prompt_ids=tuple(prompt), answer_ids=tuple(answer), item_spans=tuple(spans),
                  references=tuple(references), chance=0.0)


def test_teacher_forced_verdicts_on_a_forced_model(successor_model):
    model, cfg = successor_model
    right = _sample([10, 11, 12], [13, 14, 15], [(0, 3)])
    half = _sample([40, 41], [42, 44, 45, 46], [(0, 2), (2, 4)])  # 44 after 42: wrong
    first_wrong = _sample([70, 71, 72], [74, 75], [(0, 2)])
    at_the_top = _sample([196, 197], [198, 199], [(0, 2)])  # next would be a padded row
    verdicts = scoring.teacher_forced(model, [right, half, first_wrong, at_the_top], ANCHOR,
                                      cfg.vocab_size)
    assert [v.correct for v in verdicts] == [True, False, False, True]
    assert verdicts[0].predicted_ids == (13, 14, 15)
    assert verdicts[1].items_correct == (False, True) and verdicts[1].score == 0.5
    assert verdicts[1].predicted_ids == (42, 43, 45, 46)
    assert verdicts[2].predicted_ids == (73, 75) and verdicts[2].score == 0.0
    # Without the cut to the real vocabulary a padded row would win everywhere.
    batch, _ = scoring.pack_windows([[10, 11, 12]], ANCHOR, 1)
    logits = scoring.full_logits(model, batch, torch.device("cpu"))
    assert (logits.argmax(-1) >= cfg.vocab_size).all()


def test_greedy_generation_and_string_match_all(successor_model):
    model, cfg = successor_model
    out = scoring.greedy_generate(model, [[10, 11], [50]], ANCHOR, cfg.vocab_size, 3)
    assert out == [[12, 13, 14], [51, 52, 53]]
    stop = scoring.greedy_generate(model, [[10]], ANCHOR, cfg.vocab_size, 5, stop_token_ids=[12])
    assert stop == [[11, 12]]
    assert scoring.string_match_all("The key is 123 and ABC", ["123", "abc", "zzz"]) == \
        pytest.approx(2 / 3)
    decode = lambda ids: " ".join(str(i) for i in ids)  # noqa: E731
    v = scoring.generation_scored(model, [_sample([20], [21, 22], [(0, 2)], ("22", "24"))],
                                  ANCHOR, cfg.vocab_size, decode, max_new_tokens=3)[0]
    assert v.text == "21 22 23" and v.items_correct == (True, False) and v.score == 0.5


@pytest.fixture(scope="module")
def random_model(megatron_cpu):
    from megatron_anchor.model import build_model

    torch.manual_seed(3)
    cfg = tiny_model_config()
    return build_model(cfg).eval(), cfg


def test_batched_windows_equal_one_by_one(random_model, byte_tokenizer):
    model, cfg = random_model
    samples = [generate_sample(t, byte_tokenizer, n, i)
               for t, n, i in (("passkey", 512, 0), ("passkey", 512, 1), ("fwe", 700, 0),
                               ("niah_multikey_2", 613, 2))]
    batched = scoring.teacher_forced(model, samples, byte_tokenizer.bos, cfg.vocab_size)
    single = [scoring.teacher_forced(model, [s], byte_tokenizer.bos, cfg.vocab_size)[0]
              for s in samples]
    def exact(v):
        return dataclasses.replace(v, answer_nll=None)

    assert [exact(v) for v in batched] == [exact(v) for v in single]
    assert [v.answer_nll for v in batched] == pytest.approx([v.answer_nll for v in single],
                                                            rel=1e-5)
    # The logits themselves, at every slot of every prompt.
    docs = [list(s.prompt_ids) + list(s.answer_ids) for s in samples]
    batch, starts = scoring.pack_windows(docs, byte_tokenizer.bos, 1)
    joint = scoring.full_logits(model, batch, torch.device("cpu"))
    # The answer NLL: cross entropy of the answer tokens, predicted one slot earlier.
    for sample, start, verdict in zip(samples, starts, batched):
        first = start + len(sample.prompt_ids)  # anchor at `start`, prompt token j at start+1+j
        rows = joint[first:first + len(sample.answer_ids), :cfg.vocab_size]
        expected = torch.nn.functional.cross_entropy(rows, torch.tensor(sample.answer_ids))
        assert verdict.answer_nll == pytest.approx(float(expected), rel=1e-5)
        assert batch.tokens[first + 1:first + 1 + len(sample.answer_ids)].tolist() == \
            list(sample.answer_ids)
    for doc, start in zip(docs, starts):
        alone_batch, _ = scoring.pack_windows([doc], byte_tokenizer.bos, 1)
        alone = scoring.full_logits(model, alone_batch, torch.device("cpu"))
        torch.testing.assert_close(joint[start:start + len(doc) + 1], alone[:len(doc) + 1],
                                   rtol=1e-5, atol=1e-5)
    # The anchor sits at slot 0 of every window with position 0.
    assert batch.tokens[starts].tolist() == [byte_tokenizer.bos] * 4
    assert batch.position_ids[starts].tolist() == [0] * 4


def test_evaluate_cells_controls_and_progress(random_model, byte_tokenizer):
    model, cfg = random_model
    seen = []
    config = EvalConfig(tasks=("passkey", "fwe"), lengths=(512, 700), samples=3,
                        tokens_per_batch=1200)
    result = evaluate(model, byte_tokenizer, cfg.vocab_size, config, label="x",
                      progress=lambda done, total: seen.append((done, total)))
    assert [(c.task, c.length) for c in result.cells] == [
        ("passkey", 512), ("passkey", 700), ("fwe", 512), ("fwe", 700)]
    assert seen[-1] == (24, 24) and len(seen) > 4
    assert len(result.samples) == 24 and sum(r.control for r in result.samples) == 12
    for cell in result.cells:
        assert cell.n == 3 and cell.control_score is not None and cell.seconds_per_sample > 0
        assert cell.ci_low <= cell.score <= cell.ci_high
    assert set(result.cell("passkey", 512).by_depth) == {"0", "0.25", "0.5"}
    assert result.cell("fwe", 700).by_depth == {}
    assert result.to_dict()["cells"][0]["task"] == "passkey"


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)


def test_average_over_checkpoints():
    def result(label, scores):
        cells = [CellResult(task="passkey", length=n, n=4, score=s, num_correct=0, ci_low=0,
                            ci_high=1, chance=0, control_score=None, seconds_per_sample=1)
                 for n, s in zip((1024, 2048), scores)]
        return EvalResult(label=label, config=EvalConfig(), cells=cells, samples=[])

    rows = average_checkpoints([result("a", (1.0, 0.5)), result("b", (0.5, 0.5)),
                                result("c", (0.75, 0.2))])
    assert rows[0].mean == pytest.approx(0.75) and rows[0].std == pytest.approx(0.25)
    assert rows[1].min == 0.2 and rows[1].max == 0.5
    assert rows[0].per_checkpoint == {"a": 1.0, "b": 0.5, "c": 0.75}
