"""Data pipeline of megatron-anchor: preprocessing to Megatron indexed datasets, per-document
domain tags, the embedded sample corpus, tokenizer training and document-aware window packing.

Submodules are imported lazily: importing Megatron-Core takes seconds, and `--help` of the
command-line tools (`megatron_anchor.cli`: preprocess_data, merge_datasets,
build_sample_corpus, train_tokenizer, dataset_stats) should not pay for it.
"""

from megatron_anchor.data.indexed import DatasetError  # light: no Megatron import

__all__ = ["DatasetError"]
