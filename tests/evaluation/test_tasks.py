"""Task generators: deterministic, token-exact, answer present, control without the answer."""

import re
from collections import Counter

import pytest

from megatron_anchor.evaluation.tasks import (
    TASKS, EvaluationError, generate_sample, generate_samples)

LENGTHS = (2048, 2301)   # bytes = tokens with the byte-level test tokenizer


def _mentions(text, word):
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


@pytest.mark.parametrize("task", sorted(TASKS))
def test_exact_length_and_answer_in_prompt(task, byte_tokenizer):
    for length in LENGTHS:
        for sample in generate_samples(task, byte_tokenizer, length, 3):
            assert sample.num_tokens == length
            assert len(sample.prompt_ids) + len(sample.answer_ids) + 1 == length
            text = byte_tokenizer.decode(sample.prompt_ids)
            assert sample.references and all(_mentions(text, r) for r in sample.references)
            assert len(sample.item_spans) == len(sample.references)
            for (a, b), ref in zip(sample.item_spans, sample.references):
                assert byte_tokenizer.decode(sample.answer_ids[a:b]).strip() == ref
            assert 0.0 < sample.chance < 0.5
            assert sample.needle_spans and not sample.control


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_per_seed(task, byte_tokenizer):
    a = generate_sample(task, byte_tokenizer, 2048, 1, seed=7)
    b = generate_sample(task, byte_tokenizer, 2048, 1, seed=7)
    c = generate_sample(task, byte_tokenizer, 2048, 1, seed=8)
    d = generate_sample(task, byte_tokenizer, 2048, 2, seed=7)
    assert a == b
    assert a.prompt_ids != c.prompt_ids and a.prompt_ids != d.prompt_ids


@pytest.mark.parametrize("task", sorted(TASKS))
def test_control_has_no_answer_and_keeps_the_rest(task, byte_tokenizer):
    for index in range(3):
        sample = generate_sample(task, byte_tokenizer, 2301, index)
        control = generate_sample(task, byte_tokenizer, 2301, index, control=True)
        assert control.control and control.num_tokens == sample.num_tokens
        assert control.answer_ids == sample.answer_ids
        text = byte_tokenizer.decode(control.prompt_ids)
        assert not any(_mentions(text, r) for r in sample.references), task
        # Only the needle slots differ.
        in_needle = set()
        for a, b in sample.needle_spans:
            in_needle.update(range(a, b))
        differ = {i for i, (x, y) in enumerate(zip(sample.prompt_ids, control.prompt_ids))
                  if x != y}
        assert differ and differ <= in_needle


def test_depth_moves_the_needle(byte_tokenizer):
    starts = []
    for index, depth in enumerate((0.0, 0.5, 1.0)):
        s = generate_sample("passkey", byte_tokenizer, 4096, index, depths=(0.0, 0.5, 1.0))
        assert s.depth == depth and len(s.needle_spans) == 1
        starts.append(s.needle_spans[0][0] / len(s.prompt_ids))
    assert starts[0] < 0.15 and 0.4 < starts[1] < 0.6 and starts[2] > 0.85


def test_fwe_answers_are_the_most_frequent_words(byte_tokenizer):
    s = generate_sample("fwe", byte_tokenizer, 4096, 0)
    counts = Counter(byte_tokenizer.decode(s.prompt_ids).split())
    ranked = [w for w, _ in counts.most_common() if re.fullmatch(r"[a-z]{6}", w)]
    assert tuple(ranked[:3]) == s.references


def test_cwe_answers_are_the_common_words(byte_tokenizer):
    s = generate_sample("cwe", byte_tokenizer, 8192, 0)  # x30 repeats from 4K on
    body = byte_tokenizer.decode(s.prompt_ids).rsplit("Below is a numbered list", 1)[1]
    counts = Counter(re.findall(r"\d+\. ([\w-]+)", body))
    assert all(counts[w] == 30 for w in s.references) and len(s.references) == 10
    assert max(c for w, c in counts.items() if w not in s.references) <= 3


def test_vt_answer_is_the_chain(byte_tokenizer):
    s = generate_sample("vt", byte_tokenizer, 2048, 0)
    text = byte_tokenizer.decode(s.prompt_ids).rsplit("they are:", 2)[1]
    first, *rest = s.references
    value = re.search(rf"VAR {first} = (\d+)", text).group(1)
    assert f"assigned the value {value}" in byte_tokenizer.decode(s.prompt_ids)[-300:]
    for prev, name in zip(s.references, rest):
        assert f"VAR {name} = VAR {prev}" in text


def test_multikey_distractors_do_not_hold_the_answer(byte_tokenizer):
    s = generate_sample("niah_multikey_2", byte_tokenizer, 4096, 0)
    text = byte_tokenizer.decode(s.prompt_ids)
    assert text.count("One of the special magic numbers for") > 20
    assert text.count(s.references[0]) == 1
    assert s.chance == pytest.approx(1 / text.count("One of the special magic numbers for"),
                                     rel=0.05)


def test_bad_requests_raise_one_line_errors(byte_tokenizer):
    with pytest.raises(EvaluationError, match="unknown task 'nope'"):
        generate_sample("nope", byte_tokenizer, 2048, 0)
    with pytest.raises(EvaluationError, match="too short"):
        generate_sample("vt", byte_tokenizer, 300, 0)
    with pytest.raises(EvaluationError, match="depths"):
        generate_sample("passkey", byte_tokenizer, 2048, 0, depths=(1.5,))
