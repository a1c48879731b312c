"""Scoring: teacher-forced exact match (one forward) and greedy generation + string_match_all.

Batching: each prompt is its own window in the ``anchor`` layout (the anchor, the BOS, at
slot 0 with position 0 as in training, then prompt and answer at positions 1..), and the
windows of a batch are concatenated into one THD micro-batch (`layout.collate`). Segments
never see each other and every window keeps its own positions, so a batch gives exactly
the logits of one-by-one forwards. (Packing several prompts into *one* window would give
later prompts window-offset positions: exact only for RoPE-relative terms, not for the
distance to the anchor, so it is not done.)

Under tensor parallelism the logits are vocab-parallel and under context parallelism each
rank holds a share of every window: `parallel.gather.gather_full_logits` joins both, and
every rank of the replica sees the same verdicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state

from megatron_anchor.evaluation.tasks import EvaluationError, Sample
from megatron_anchor.layout import collate, cp_multiple, pack_documents, shard_for_cp
from megatron_anchor.model import forward_packed
from megatron_anchor.parallel.gather import gather_full_logits


@dataclass(frozen=True)
class Verdict:
    """One sample's score. `score` is the share of answer items right (RULER's partial credit)."""
    items_correct: Tuple[bool, ...]
    predicted_ids: Tuple[int, ...]   # arg-max tokens at the answer slots (teacher-forced), or
                                     # the generated tokens (generation)
    score: float
    correct: bool                    # every item right
    text: Optional[str] = None       # generated text (generation only)
    # Mean -log p of the answer tokens, teacher-forced (nats/token): a continuous score that
    # still separates models when both get every answer right.
    answer_nll: Optional[float] = None


def _layout():
    return (parallel_state.get_context_parallel_world_size(),
            parallel_state.get_context_parallel_rank())


def window_length(num_tokens: int, cp_size: int) -> int:
    multiple = cp_multiple(cp_size)
    return -(-num_tokens // multiple) * multiple


def pack_windows(docs: Sequence[Sequence[int]], anchor_token_id: int, cp_size: int,
                 pad_token_id: int = 0):
    """One `anchor` window per document (anchor + doc), collated; the slot of each anchor."""
    windows, starts, offset = [], [], 0
    for doc in docs:
        seq_length = window_length(len(doc) + 1, cp_size)
        windows.append(pack_documents([list(doc)], seq_length=seq_length, variant="anchor",
                                      anchor_token_id=anchor_token_id, cp_size=cp_size,
                                      pad_token_id=pad_token_id))
        starts.append(offset)
        offset += seq_length
    return collate(windows), starts


def full_logits(model, batch, device) -> torch.Tensor:
    """[T, V] FP32 logits of the whole collated batch in window order, on every rank."""
    cp_size, cp_rank = _layout()
    local = shard_for_cp(batch, cp_size, cp_rank).to(device)
    with torch.no_grad():
        logits, _ = forward_packed(model, local, return_logits=True)
        return gather_full_logits(logits, batch.cu_seqlens).float()


def _verdict(sample: Sample, predicted: Sequence[int],
             answer_nll: Optional[float] = None) -> Verdict:
    answer = sample.answer_ids
    items = tuple(all(predicted[i] == answer[i] for i in range(a, b))
                  for a, b in sample.item_spans)
    score = sum(items) / len(items) if items else 0.0
    return Verdict(items_correct=items, predicted_ids=tuple(int(p) for p in predicted),
                   score=score, correct=bool(items) and all(items), answer_nll=answer_nll)


def teacher_forced(model, samples: Sequence[Sample], anchor_token_id: int, vocab_size: int,
                   device=None) -> List[Verdict]:
    """Exact match with the answer appended: one forward for the whole batch.

    An answer token at slot p is predicted by the logits at slot p-1; an item is right when
    each of its tokens is the arg-max over the real vocabulary (padded rows excluded).
    """
    if not samples:
        return []
    device = device or torch.device("cpu")
    cp_size, _ = _layout()
    docs = [list(s.prompt_ids) + list(s.answer_ids) for s in samples]
    batch, starts = pack_windows(docs, anchor_token_id, cp_size)
    logits = full_logits(model, batch, device)
    verdicts = []
    for sample, start in zip(samples, starts):
        # Slot of doc token j is start + 1 + j; answer token k is doc token len(prompt) + k.
        first = start + len(sample.prompt_ids)
        rows = logits[first:first + len(sample.answer_ids), :vocab_size]
        nll = torch.nn.functional.cross_entropy(
            rows, torch.tensor(sample.answer_ids, device=rows.device))
        verdicts.append(_verdict(sample, rows.argmax(dim=-1).tolist(), float(nll)))
    return verdicts


def greedy_generate(model, prompts: Sequence[Sequence[int]], anchor_token_id: int,
                    vocab_size: int, max_new_tokens: int, device=None,
                    stop_token_ids: Sequence[int] = ()) -> List[List[int]]:
    """Greedy continuation of each prompt (after the anchor), one full forward per token.

    No KV cache: cost is max_new_tokens forwards of the batch, so keep prompts short.
    """
    device = device or torch.device("cpu")
    cp_size, _ = _layout()
    seqs = [list(p) for p in prompts]
    done = [False] * len(seqs)
    out: List[List[int]] = [[] for _ in seqs]
    for _ in range(max_new_tokens):
        live = [i for i, d in enumerate(done) if not d]
        if not live:
            break
        batch, starts = pack_windows([seqs[i] for i in live], anchor_token_id, cp_size)
        logits = full_logits(model, batch, device)
        for i, start in zip(live, starts):
            token = int(logits[start + len(seqs[i]), :vocab_size].argmax())
            seqs[i].append(token)
            out[i].append(token)
            if token in stop_token_ids:
                done[i] = True
    return out


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's metric for one sample: the share of references found in the prediction."""
    if not references:
        return 0.0
    low = prediction.lower()
    return sum(r.lower() in low for r in references) / len(references)


def generation_scored(model, samples: Sequence[Sample], anchor_token_id: int, vocab_size: int,
                      decode: Callable[[Sequence[int]], str], max_new_tokens: Optional[int],
                      device=None, stop_token_ids: Sequence[int] = ()) -> List[Verdict]:
    """Greedy generation scored with `string_match_all` (RULER's metric)."""
    if not samples:
        return []
    budget = max_new_tokens or max(len(s.answer_ids) for s in samples) + 4
    if budget < 1:
        raise EvaluationError("max_new_tokens must be at least 1")
    generated = greedy_generate(model, [s.prompt_ids for s in samples], anchor_token_id,
                                vocab_size, budget, device, stop_token_ids)
    verdicts = []
    for sample, ids in zip(samples, generated):
        text = decode(ids)
        items = tuple(r.lower() in text.lower() for r in sample.references)
        score = string_match_all(text, sample.references)
        verdicts.append(Verdict(items_correct=items, predicted_ids=tuple(ids), score=score,
                                correct=bool(items) and all(items), text=text))
    return verdicts
