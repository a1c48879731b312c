"""The model's own tokenizer for evaluation: encode pieces, decode generations, find the BOS.

The anchor (BOS) is chosen with the trainer's rule (`data.tokenizer.anchor_token_id`): the
tokenizer's BOS, else its end-of-document token.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

from megatron_anchor.evaluation.tasks import EvaluationError


class EvalTokenizer:
    """A `tokenizer.json` (or a folder holding one) read with the `tokenizers` library."""

    def __init__(self, path: str, bos_token_id: Optional[int] = None):
        from tokenizers import Tokenizer

        from megatron_anchor.data.indexed import DatasetError
        from megatron_anchor.data.tokenizer import HuggingFaceTokenizer, anchor_token_id

        json_path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(json_path):
            raise EvaluationError(f"{path}: no tokenizer.json (pass --tokenizer-model with a "
                                  "tokenizer.json file or a folder holding one)")
        try:
            info = HuggingFaceTokenizer(json_path)
        except DatasetError as err:
            raise EvaluationError(str(err)) from None
        self.path = json_path
        self._tok = Tokenizer.from_file(json_path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = info.eod
        self.bos = bos_token_id if bos_token_id is not None else anchor_token_id(info)
        if not 0 <= self.bos < self.vocab_size:
            raise EvaluationError(f"anchor/BOS token id {self.bos} is outside the tokenizer's "
                                  f"vocabulary of {self.vocab_size}")

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)
