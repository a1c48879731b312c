"""RULER-style synthetic long-context tasks, generated offline with fixed seeds.

Tasks follow NVIDIA/RULER's synthetic generators (`scripts/data/synthetic/`, configured as
in `scripts/synthetic.yaml`), written anew for token-exact prompts:

* ``passkey``: the classic pass-key retrieval (a 5-digit key in repeated noise sentences).
* ``niah_single_1``: RULER's noise haystack, a word key and a 7-digit value.
* ``niah_multikey_2``: the haystack is made of distractor needles (word keys, 7-digit values).
* ``niah_multikey_3``: the same with UUID keys and UUID values.
* ``vt``: variable tracking, one chain of 4 hops in noise, with one worked example.
* ``cwe``: common-words extraction from a numbered list, with one worked example.
* ``fwe``: frequent-words extraction from Zipf-distributed coded words (alpha 2).

Every prompt is built from pieces tokenized one by one with the model's tokenizer, so its
length in tokens is known exactly: ``1 (BOS, the anchor) + prompt + answer == length``.
Whole haystack items fill the budget; the few tokens left are filled by the tail end of
one more filler item at the start of the haystack. The answer is the text a model should
produce after the prompt (RULER's ``answer_prefix`` ends the prompt); it is split into
scored items (one per reference string) and unscored connectors (list numbering).

Each sample has a needle-removed control: the same prompt with every needle piece replaced
by filler tokens of the same count, so the answer appears nowhere (it should score ~0).
`Sample.chance` is the expected per-item score of a guesser (see each task's docstring).
"""

from __future__ import annotations

import math
import random
import string
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from megatron_anchor.errors import UserError
from megatron_anchor.evaluation import words as wordlists


class EvaluationError(UserError):
    """A task, length or option that cannot be evaluated; the message says what to change."""


class TextTokenizer(Protocol):
    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


# ----------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One prompt: BOS + prompt_ids, then answer_ids (teacher-forced or generated)."""

    task: str
    length: int                               # 1 + len(prompt_ids) + len(answer_ids)
    index: int                                # within its (task, length) cell
    depth: Optional[float]                    # needle depth in [0, 1] (NIAH, passkey)
    prompt_ids: Tuple[int, ...]
    answer_ids: Tuple[int, ...]
    item_spans: Tuple[Tuple[int, int], ...]   # scored [start, end) spans of answer_ids
    references: Tuple[str, ...]               # RULER's outputs (string_match_all)
    chance: float                             # expected score of a guesser
    needle_spans: Tuple[Tuple[int, int], ...] = ()  # [start, end) in prompt_ids
    control: bool = False                     # needle removed

    @property
    def num_tokens(self) -> int:
        return 1 + len(self.prompt_ids) + len(self.answer_ids)


# ----------------------------------------------------------------------------------------
# Token-exact assembly
# ----------------------------------------------------------------------------------------

class _Encoder:
    """Cached piece-wise encoding (haystack items repeat a lot)."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self._cache: Dict[str, Tuple[int, ...]] = {}

    def __call__(self, text: str) -> Tuple[int, ...]:
        ids = self._cache.get(text)
        if ids is None:
            ids = tuple(self.tokenizer.encode(text))
            if len(self._cache) < 200_000:
                self._cache[text] = ids
        return ids


_ENCODERS: Dict[int, _Encoder] = {}


def _encoder(tokenizer: TextTokenizer) -> _Encoder:
    enc = _ENCODERS.get(id(tokenizer))
    if enc is None or enc.tokenizer is not tokenizer:
        enc = _ENCODERS[id(tokenizer)] = _Encoder(tokenizer)
    return enc


@dataclass
class _Draft:
    """A prompt before the gap is filled: head, body pieces (needle flag), tail, answer."""

    head: Tuple[int, ...]
    body: List[Tuple[Tuple[int, ...], bool]]
    tail: Tuple[int, ...]
    answer: List[Tuple[Tuple[int, ...], bool]]   # (ids, scored)
    references: Tuple[str, ...]
    chance: float
    depth: Optional[float] = None

    def fixed_tokens(self) -> int:
        return (1 + len(self.head) + len(self.tail) + sum(len(a) for a, _ in self.answer))


def _tail_tokens(filler: Callable[[], Tuple[int, ...]], count: int) -> Tuple[int, ...]:
    """The last `count` tokens of as many filler items as needed."""
    if count <= 0:
        return ()
    ids: List[int] = []
    while len(ids) < count:
        item = filler()
        if not item:
            raise EvaluationError("a filler item encoded to no tokens; check the tokenizer")
        ids.extend(item)
    return tuple(ids[-count:])


def _finish(task: str, length: int, index: int, draft: _Draft,
            gap_filler: Callable[[], Tuple[int, ...]],
            control_filler: Optional[Callable[[], Tuple[int, ...]]]) -> Sample:
    """Fill the gap to exactly `length` tokens; replace needles in a control."""
    gap = length - draft.fixed_tokens() - sum(len(ids) for ids, _ in draft.body)
    if gap < 0:
        raise EvaluationError(f"task {task}: length {length} is too short for its fixed text "
                              f"({length - gap} tokens)")
    prompt = list(draft.head) + list(_tail_tokens(gap_filler, gap))
    needle_spans = []
    for ids, is_needle in draft.body:
        if is_needle and control_filler is not None:
            ids = _tail_tokens(control_filler, len(ids))
        elif is_needle:
            needle_spans.append((len(prompt), len(prompt) + len(ids)))
        prompt.extend(ids)
    prompt.extend(draft.tail)
    answer, spans = [], []
    for ids, scored in draft.answer:
        if scored:
            spans.append((len(answer), len(answer) + len(ids)))
        answer.extend(ids)
    sample = Sample(task=task, length=length, index=index, depth=draft.depth,
                    prompt_ids=tuple(prompt), answer_ids=tuple(answer),
                    item_spans=tuple(spans), references=draft.references,
                    chance=draft.chance, needle_spans=tuple(needle_spans),
                    control=control_filler is not None)
    assert sample.num_tokens == length, (sample.num_tokens, length)
    return sample


def _fill_stream(budget: int, next_item: Callable[[], Tuple[int, ...]]) -> List[Tuple[int, ...]]:
    """Whole items while they fit in `budget` tokens."""
    items, used = [], 0
    while True:
        item = next_item()
        if used + len(item) > budget:
            return items
        items.append(item)
        used += len(item)


# ----------------------------------------------------------------------------------------
# Random values (RULER's kinds)
# ----------------------------------------------------------------------------------------

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


_KEYS: List[str] = []


def _key_word(rng: random.Random) -> str:
    if not _KEYS:
        _KEYS.extend(wordlists.key_words())
    return rng.choice(_KEYS)


def _variable(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_uppercase, k=5))


# ----------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskInfo:
    name: str
    uses_depth: bool
    description: str
    builder: Callable = field(repr=False, compare=False)


def _place_single(items: List[Tuple[int, ...]], needle: Tuple[int, ...], depth: float):
    at = int(round(depth * len(items)))
    body = [(ids, False) for ids in items]
    body.insert(at, (needle, True))
    return body


def _passkey(enc, rng, length, depth):
    """Chance: 1/90000 (a uniformly guessed 5-digit key)."""
    key = _number(rng, 5)
    head = enc("There is an important info hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about the important information there.")
    item = enc(" " + NOISE)
    needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key.")
    tail = enc(" What is the pass key? The pass key is")
    answer = [(enc(" " + key), True)]
    draft = _Draft(head, [], tail, answer, (key,), 1 / 90000, depth)
    items = _fill_stream(length - draft.fixed_tokens() - len(needle), lambda: item)
    draft.body = _place_single(items, needle, depth)
    filler = lambda: item  # noqa: E731
    return draft, filler, filler


_NIAH_HEAD = ("A special magic {t} is hidden within the following text. Make sure to memorize "
              "it. I will quiz you about the {t} afterwards.\n")
_NIAH_TAIL = ("What is the special magic {t} for {q} mentioned in the provided text? "
              "The special magic {t} for {q} mentioned in the provided text is")
_NEEDLE = "One of the special magic {t}s for {k} is: {v}.\n"


def _niah(enc, rng, length, depth, *, haystack: str, key_kind: str, value_kind: str):
    make_key = _key_word if key_kind == "words" else _uuid
    make_value = (lambda r: _number(r, 7)) if value_kind == "numbers" else _uuid
    t = value_kind[:-1]  # "number" / "uuid"
    key, value = make_key(rng), make_value(rng)
    head = enc(_NIAH_HEAD.format(t=t))
    needle = enc(_NEEDLE.format(t=t, k=key, v=value))
    tail = enc(_NIAH_TAIL.format(t=t, q=key))
    answer = [(enc(" " + value), True)]
    draft = _Draft(head, [], tail, answer, (value,), 0.0, depth)
    if haystack == "noise":
        noise = enc(NOISE + "\n")
        next_item = lambda: noise  # noqa: E731
        chance = 1 / 9e6 if value_kind == "numbers" else 2.0 ** -122
    else:
        def next_item():
            while True:
                k, v = make_key(rng), make_value(rng)
                if k != key and v != value:
                    return enc(_NEEDLE.format(t=t, k=k, v=v))
    items = _fill_stream(length - draft.fixed_tokens() - len(needle), next_item)
    draft.body = _place_single(items, needle, depth)
    if haystack != "noise":
        chance = 1 / (1 + len(items))  # a value copied from a random needle in the context
    draft.chance = chance
    # Gap and control fillers draw from their own generators so the control keeps the
    # prompt's haystack and gap exactly.
    side = random.Random(rng.random())
    ctrl = random.Random(rng.random())

    def filler_from(r):
        if haystack == "noise":
            return lambda: noise
        return lambda: enc(_NEEDLE.format(t=t, k=make_key(r), v=make_value(r)))
    return draft, filler_from(side), filler_from(ctrl)


_VT_HEAD = ("Memorize and track the chain(s) of variable assignment hidden in the following "
            "text.\n\n")
_VT_TAIL = ("Question: Find all variables that are assigned the value {v} in the text above. "
            "Answer: According to the chain(s) of variable assignment in the text above, "
            "{n} variables are assigned the value {v}, they are:")


def _chain(rng, hops, taken):
    names = []
    while len(names) < hops + 1:
        name = _variable(rng)
        if name not in taken:
            taken.add(name)
            names.append(name)
    value = _number(rng, 5)
    lines = [f"VAR {names[0]} = {value}\n"] + [
        f"VAR {names[j + 1]} = VAR {names[j]}\n" for j in range(hops)]
    return names, value, lines


def _vt(enc, rng, length, depth, *, hops: int = 4, example_noise: int = 5):
    """One chain of `hops` hops in noise; one worked example first (RULER's few-shot).

    Scored in chain order. Chance: 1/(number of variable names in the prompt) per item.
    """
    taken = set()
    ex_names, ex_value, ex_lines = _chain(rng, hops, taken)
    names, value, lines = _chain(rng, hops, taken)
    ex_body = [NOISE + "\n"] * example_noise
    for j, pos in enumerate(sorted(rng.sample(range(example_noise + 1), hops + 1))):
        ex_body.insert(pos + j, ex_lines[j])
    example = (_VT_HEAD + "".join(ex_body) + _VT_TAIL.format(v=ex_value, n=hops + 1)
               + " " + " ".join(ex_names) + "\n\n")
    head = enc(example + _VT_HEAD)
    tail = enc(_VT_TAIL.format(v=value, n=hops + 1))
    answer = [(enc(" " + n), True) for n in names]
    draft = _Draft(head, [], tail, answer, tuple(names), 1 / (2 * (hops + 1)), None)
    noise = enc(NOISE + "\n")
    needles = [enc(line) for line in lines]
    items = _fill_stream(length - draft.fixed_tokens() - sum(map(len, needles)), lambda: noise)
    body = [(ids, False) for ids in items]
    for j, pos in enumerate(sorted(rng.choices(range(len(items) + 1), k=len(needles)))):
        body.insert(pos + j, (needles[j], True))
    draft.body = body
    return draft, (lambda: noise), (lambda: noise)


_CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than "
             "others. Memorize the ones that appear most often.\n")
_CWE_TAIL = ("\nQuestion: What are the {n} most common words in the above list? "
             "Answer: The top {n} words that appear most often in the list are:")


def _numbered(enc, words_in_order, needle_words=()):
    pieces = []
    for i, w in enumerate(words_in_order):
        pieces.append((enc(f"{i + 1}." if i == 0 else f" {i + 1}."), False))
        pieces.append((enc(" " + w), w in needle_words))
    return pieces


def _cwe(enc, rng, length, depth, *, num_cw: int = 10):
    """Common words x30, uncommon x3 (x6 / x1 below 4K, as RULER); one worked example.

    The answer lists the common words in order of first appearance. Chance: 1/(distinct
    words in the list) per item.
    """
    freq_cw, freq_ucw = (6, 1) if length < 4096 else (30, 3)
    plain = wordlists.plain_words()
    combos = wordlists.key_words()
    rng.shuffle(plain)
    rng.shuffle(combos)
    # The worked example: 10 common words x3, 10 uncommon x1 (RULER's short example).
    ex_words = plain[:2 * num_cw]
    ex_list = ex_words[:num_cw] * 3 + ex_words[num_cw:]
    rng.shuffle(ex_list)
    ex_seen = list(dict.fromkeys(w for w in ex_list if w in ex_words[:num_cw]))
    example = (_CWE_HEAD + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_list))
               + _CWE_TAIL.format(n=num_cw)
               + "".join(f" {i + 1}. {w}" for i, w in enumerate(ex_seen)) + "\n")
    plain = plain[2 * num_cw:]
    head = enc(example + _CWE_HEAD)
    tail = enc(_CWE_TAIL.format(n=num_cw))

    def list_tokens(pool, n_uncommon):
        count = num_cw * freq_cw + n_uncommon * freq_ucw
        total = sum(len(enc(f"{i + 1}." if i == 0 else f" {i + 1}.")) for i in range(count))
        for j, w in enumerate(pool[:num_cw + n_uncommon]):
            total += len(enc(" " + w)) * (freq_cw if j < num_cw else freq_ucw)
        return total

    def fit(pool):
        """Largest number of uncommon words from `pool` that fits, and the answer size."""
        answer_len = sum(len(enc(f" {i + 1}.")) + len(enc(" " + w))
                         for i, w in enumerate(pool[:num_cw]))
        budget = length - 1 - len(head) - len(tail) - answer_len
        if list_tokens(pool, 0) > budget:
            raise EvaluationError(f"task cwe: length {length} is too short for its list of "
                                  f"{num_cw} common words")
        lo, hi = 0, len(pool) - num_cw - 1  # keep one spare word for the filler
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if list_tokens(pool, mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    pool = plain
    n_uncommon = fit(pool)
    if n_uncommon == len(pool) - num_cw - 1:  # plain words ran out: adjective-noun pairs
        pool = combos
        n_uncommon = fit(pool)
    chosen = pool[:num_cw + n_uncommon]
    common, uncommon = chosen[:num_cw], chosen[num_cw:]
    listed = common * freq_cw + uncommon * freq_ucw
    rng.shuffle(listed)
    order = list(dict.fromkeys(w for w in listed if w in set(common)))
    answer = []
    for i, w in enumerate(order):
        answer += [(enc(f" {i + 1}."), False), (enc(" " + w), True)]
    spare = pool[num_cw + n_uncommon:]
    side = random.Random(rng.random())
    ctrl = random.Random(rng.random())
    draft = _Draft(head, _numbered(enc, listed, set(common)), tail, answer, tuple(order),
                   1 / len(chosen), None)
    return draft, (lambda: enc(" " + side.choice(spare))), (lambda: enc(" " + ctrl.choice(spare)))


_FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. Find "
             "the three most frequently appeared coded words.")
_FWE_TAIL = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What "
             "are the three most frequently appeared words in the above coded text? Answer: "
             "According to the coded text above, the three most frequently appeared words are:")


def _zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta(alpha) for alpha > 1 (partial sum plus the Euler-Maclaurin tail)."""
    partial = math.fsum(k ** -alpha for k in range(1, terms + 1))
    return partial + terms ** (1 - alpha) / (alpha - 1) - 0.5 * terms ** -alpha


def _fwe(enc, rng, length, depth, *, alpha: float = 2.0, word_len: int = 6, top: int = 3):
    """Zipf(alpha) counts over coded words; rank 1 is the noise word '...' (as RULER).

    Answer: ranks 2..4 in frequency order. Chance: 1/(vocabulary - 1) per item.
    """
    vocab_size = max(top + 3, (length - 50) // 50)
    vocab = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_len)))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "..."
    head, tail = enc(_FWE_HEAD), enc(_FWE_TAIL)
    answer = [(enc(" " + w), True) for w in vocab[1:top + 1]]
    budget = length - 1 - len(head) - len(tail) - sum(len(a) for a, _ in answer)
    z = _zeta(alpha)
    sizes = [len(enc(" " + w)) for w in vocab]

    def counts(n):
        return [int(n * (k ** -alpha) / z) for k in range(1, len(vocab) + 1)]

    def tokens(n):
        return sum(c * s for c, s in zip(counts(n), sizes))

    lo, hi = 0, max(1, budget)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tokens(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    c = counts(lo)
    if not all(c[k] > c[k + 1] for k in range(1, top + 1)):
        raise EvaluationError(f"task fwe: length {length} is too short to rank "
                              f"{top} words by frequency")
    listed = [w for w, n in zip(vocab, c) for _ in range(n)]
    rng.shuffle(listed)
    answers = set(vocab[1:top + 1])
    body = [(enc(" " + w), w in answers) for w in listed]
    dots = enc(" " + vocab[0])
    draft = _Draft(head, body, tail, answer, tuple(vocab[1:top + 1]), 1 / (len(vocab) - 1))
    return draft, (lambda: dots), (lambda: dots)


TASKS: Dict[str, TaskInfo] = {t.name: t for t in (
    TaskInfo("passkey", True, "pass-key retrieval in repeated noise", _passkey),
    TaskInfo("niah_single_1", True, "NIAH, noise haystack, word key, 7-digit value",
             lambda *a: _niah(*a, haystack="noise", key_kind="words", value_kind="numbers")),
    TaskInfo("niah_multikey_2", True, "NIAH, haystack of distractor needles (words/numbers)",
             lambda *a: _niah(*a, haystack="needle", key_kind="words", value_kind="numbers")),
    TaskInfo("niah_multikey_3", True, "NIAH, haystack of distractor needles (UUIDs)",
             lambda *a: _niah(*a, haystack="needle", key_kind="uuids", value_kind="uuids")),
    TaskInfo("vt", False, "variable tracking, 1 chain x 4 hops, 1 worked example", _vt),
    TaskInfo("cwe", False, "10 most common words of a numbered list, 1 worked example", _cwe),
    TaskInfo("fwe", False, "3 most frequent coded words (Zipf alpha 2)", _fwe),
)}

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def check_task(name: str) -> TaskInfo:
    try:
        return TASKS[name]
    except KeyError:
        raise EvaluationError(f"unknown task {name!r}: choose from {', '.join(TASKS)}") from None


def sample_seed(seed: int, task: str, length: int, index: int) -> str:
    """Each sample has its own generator: cells do not depend on each other."""
    return f"{seed}:{task}:{length}:{index}"


def generate_sample(task: str, tokenizer: TextTokenizer, length: int, index: int, *,
                    seed: int = 42, depths: Sequence[float] = DEFAULT_DEPTHS,
                    control: bool = False) -> Sample:
    """Sample `index` of the (task, length) cell; depth = depths[index % len(depths)]."""
    info = check_task(task)
    if length < 16:
        raise EvaluationError(f"length {length} is too short: use at least a few hundred tokens")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise EvaluationError(f"needle depths must lie in [0, 1], got {list(depths)}")
    depth = float(depths[index % len(depths)]) if info.uses_depth else None
    rng = random.Random(sample_seed(seed, task, length, index))
    enc = _encoder(tokenizer)
    draft, gap_filler, control_filler = info.builder(enc, rng, length, depth)
    return _finish(task, length, index, draft, gap_filler, control_filler if control else None)


def generate_samples(task: str, tokenizer: TextTokenizer, length: int, num_samples: int, *,
                     seed: int = 42, depths: Sequence[float] = DEFAULT_DEPTHS,
                     control: bool = False) -> List[Sample]:
    return [generate_sample(task, tokenizer, length, i, seed=seed, depths=depths,
                            control=control) for i in range(num_samples)]


__all__ = ["EvaluationError", "Sample", "TaskInfo", "TASKS", "DEFAULT_DEPTHS", "check_task",
           "generate_sample", "generate_samples"]
