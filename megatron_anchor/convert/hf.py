"""Hugging Face checkpoints in and out: streaming safetensors <-> our Megatron checkpoints.

Import: `config.json` -> `ModelConfig` (refusing what is not modelled), the GPTModel is built
at TP=1 without random init and every parameter is filled from the safetensors files one
rule at a time (a rule reads one to three HF tensors with plain file reads, no memory map),
so peak memory is the model plus the tensors of one rule (1.13x the FP32 model for a 1.1B
checkpoint; benchmarks/RESULTS.md, "HF conversion"). The result is written through `megatron_anchor.checkpoint.save_model`
(dist_checkpointing, global tensors: it loads at any TP/CP) with the tokenizer files and the
source `config.json` (kept as `hf_config.json` next to `model_config.json`).

Export: `Checkpoint.load_model` (megatron_anchor.checkpoint) at TP=1, then shard by shard:
tensors are produced in HF order, a shard is written (temporary name, then rename) as soon as it is
complete, plus the index and `config.json` with the trained RoPE base and length.
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from megatron_anchor import checkpoint, files, runtime
from megatron_anchor.convert.hf_config import (
    ConversionError, DTYPES, hf_config_from_model_config, model_config_from_hf,
    read_hf_config)
from megatron_anchor.convert.mapping import IGNORED_SUFFIXES, hf_shapes, rules

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HF_CONFIG_COPY = "hf_config.json"  # the imported config.json, kept with the checkpoint
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DEFAULT_MAX_SHARD_BYTES = 10 ** 9  # 1GB: a shard buffer stays below the load peak

Progress = Optional[Callable[[int, int], None]]  # (done, total) after each tensor group


# ---------------------------------------------------------------------------------------
# Reading safetensors, one tensor at a time
# ---------------------------------------------------------------------------------------

# safetensors dtype names (the file format's header).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
_MAX_HEADER_BYTES = 100 * 1024 ** 2


def read_safetensors_header(path: str):
    """(data start offset, {name: {dtype, shape, data_offsets}}) of one safetensors file."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < _MAX_HEADER_BYTES:
                raise ValueError(f"header size {size}")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as err:
        raise ConversionError(f"{path}: not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return 8 + size, header


class SafetensorsDir:
    """The tensors of a HF directory: `model.safetensors.index.json` shards or one file.

    Each tensor is read with plain file reads into its own buffer (no memory map): pages of
    the checkpoint never count against the process, so peak memory during an import is
    the model plus the tensors of one mapping rule.
    """

    def __init__(self, hf_dir: str):
        index = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index}: no weight_map")
            self.files = {name: os.path.join(hf_dir, fname) for name, fname in weight_map.items()}
            for path in sorted(set(self.files.values())):
                if not os.path.isfile(path):
                    raise ConversionError(f"{index} names {os.path.basename(path)}, which is "
                                          "missing")
        else:
            found = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
            if not found:
                bins = glob.glob(os.path.join(hf_dir, "*.bin")) + \
                    glob.glob(os.path.join(hf_dir, "*.pth"))
                hint = " (only PyTorch pickles found: re-save with safe_serialization)" \
                    if bins else ""
                raise ConversionError(f"{hf_dir}: no *.safetensors files and no {INDEX_FILE}"
                                      + hint)
            if len(found) > 1:
                raise ConversionError(f"{hf_dir}: {len(found)} *.safetensors files but no "
                                      f"{INDEX_FILE} to say which tensor is where")
            self.files = {name: found[0] for name in read_safetensors_header(found[0])[1]}
        self._headers = {}

    @property
    def names(self) -> List[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path not in self._headers:
            self._headers[path] = read_safetensors_header(path)
        start, header = self._headers[path]
        info = header.get(name)
        if info is None:
            raise ConversionError(f"{path}: no tensor {name} (the index says it is there)")
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ConversionError(f"{name}: unsupported safetensors dtype {info.get('dtype')}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - begin)
        with open(path, "rb") as f:
            f.seek(start + begin)
            if f.readinto(buffer) != len(buffer):
                raise ConversionError(f"{path}: truncated (tensor {name})")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._headers = {}


def _check_names(reader: SafetensorsDir, model_config, all_rules) -> None:
    expected = {n for r in all_rules for n in r.hf}
    present = {n for n in reader.names if not n.endswith(IGNORED_SUFFIXES)}
    if model_config.share_embeddings_and_output_weights:
        present.discard("lm_head.weight")  # a tied copy some exporters write anyway
    unexpected = sorted(present - expected)
    if unexpected:
        name = unexpected[0]
        why = ("q/k norm: qk-norm is not modelled" if ("q_norm" in name or "k_norm" in name)
               else "a bias outside q/k/v is not modelled" if name.endswith(".bias")
               else "expert weights: mixture-of-experts is not modelled" if "expert" in name
               else "not part of the modelled architecture")
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"tensor {name}{more}: {why}")
    missing = sorted(expected - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"tensor {missing[0]}{more} is missing from the checkpoint "
                              "(config.json describes a different model?)")


# ---------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------

def load_hf_model(hf_dir: str, *, rotary_base: Optional[float] = None, dtype: str = "fp32",
                  seq_length: Optional[int] = None, progress: Progress = None):
    """`(model, model_config, hf_config)`: our GPTModel at TP=1 holding the HF weights.

    The process's Megatron parallel state must be TP=1, CP=1 (it is set up if absent).
    """
    from megatron_anchor.model import build_model

    if dtype not in ("fp32", "bf16"):
        raise ConversionError(f"--dtype {dtype!r}: choose fp32 or bf16")
    hf = read_hf_config(hf_dir)
    model_config = model_config_from_hf(hf, rotary_base=rotary_base, bf16=dtype == "bf16",
                                        seq_length=seq_length)
    reader = SafetensorsDir(hf_dir)
    runtime.ensure_initialized(1, 1)
    model = build_model(model_config, initialize=False)  # every weight is overwritten below
    state = model.state_dict()
    all_rules = rules(model_config, state.keys())
    _check_names(reader, model_config, all_rules)
    filled = set()
    with torch.no_grad():
        for done, rule in enumerate(all_rules, 1):
            if rule.megatron not in state:
                raise ConversionError(f"the model has no {rule.megatron} (mapping and model "
                                      "disagree)")
            try:
                value = rule.to_megatron(*(reader.get(n) for n in rule.hf))
            except (RuntimeError, ValueError) as err:
                raise ConversionError(f"{', '.join(rule.hf)}: {err}") from None
            target = state[rule.megatron]
            if tuple(value.shape) != tuple(target.shape):
                raise ConversionError(f"{', '.join(rule.hf)}: shape {tuple(value.shape)} after "
                                      f"mapping, the model expects {tuple(target.shape)} for "
                                      f"{rule.megatron}")
            target.copy_(value)
            filled.add(rule.megatron)
            del value
            if progress:
                progress(done, len(all_rules))
    reader.close()
    unfilled = sorted(k for k in state if k not in filled and not k.endswith("_extra_state"))
    if unfilled:
        raise ConversionError(f"no Hugging Face tensor maps to {unfilled[0]}")
    return model.eval(), model_config, hf


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, n)) for n in checkpoint.TOKENIZER_FILES) or \
        bool(glob.glob(os.path.join(folder, "*.model")))


@dataclass
class ConversionSummary:
    source: str
    output: str
    model_config: dict
    parameters: int
    seconds: float
    tensors: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def import_checkpoint(hf_dir: str, output: str, *, rotary_base: Optional[float] = None,
                      dtype: str = "fp32", seq_length: Optional[int] = None,
                      progress: Progress = None) -> ConversionSummary:
    """A HF directory -> a Megatron checkpoint root (`output/release`, weights only)."""
    start = time.time()
    model, model_config, hf = load_hf_model(hf_dir, rotary_base=rotary_base, dtype=dtype,
                                            seq_length=seq_length, progress=progress)
    path = checkpoint.save_model(
        model, model_config, output,
        tokenizer_dir=hf_dir if _has_tokenizer(hf_dir) else None,
        extra_json={HF_CONFIG_COPY: hf})
    parameters = sum(p.numel() for p in model.parameters())
    return ConversionSummary(source=hf_dir, output=path,
                             model_config=json.loads(model_config.to_json()),
                             parameters=parameters, seconds=round(time.time() - start, 2),
                             tensors=len(SafetensorsDir(hf_dir).names))


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------

def base_hf_config(ckpt, hf_config_dir: Optional[str] = None) -> Optional[dict]:
    """The config.json to start from: `--hf-config`, else the one kept at import (in this
    checkpoint, or in the `--pretrained-checkpoint` a training run started from)."""
    if hf_config_dir:
        return read_hf_config(hf_config_dir)
    kept = ckpt.json_file(HF_CONFIG_COPY)
    if kept is not None:
        return kept
    train = ckpt.json_file(checkpoint.TRAIN_CONFIG_FILE) or {}
    pretrained = (train.get("checkpoint") or {}).get("pretrained_checkpoint")
    if pretrained and checkpoint.exists(pretrained):
        return checkpoint.open(pretrained).json_file(HF_CONFIG_COPY)
    return None


def _write_json(path: str, value) -> None:
    files.write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def plan_shards(shapes: Dict[str, tuple], itemsize: int, max_shard_bytes: int) -> List[List[str]]:
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_hf_weights(state: dict, model_config, output: str, dtype: torch.dtype,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     progress: Progress = None) -> List[str]:
    """Safetensors shards (+ index when more than one) from a TP=1 Megatron state dict."""
    from safetensors.torch import save_file

    shapes = hf_shapes(model_config)
    shards = plan_shards(shapes, torch.empty((), dtype=dtype).element_size(), max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    shard_of = {n: i for i, shard in enumerate(shards) for n in shard}
    pending: Dict[int, Dict[str, torch.Tensor]] = {}
    written, total_bytes = [], 0
    all_rules = rules(model_config, state.keys())
    for done, rule in enumerate(all_rules, 1):
        values = rule.to_hf(state[rule.megatron].detach())
        for name, value in zip(rule.hf, values):
            value = value.to(dtype=dtype, copy=True).contiguous()
            if tuple(value.shape) != tuple(shapes[name]):
                raise ConversionError(f"{name}: shape {tuple(value.shape)}, expected "
                                      f"{shapes[name]}")
            total_bytes += value.numel() * value.element_size()
            i = shard_of[name]
            pending.setdefault(i, {})[name] = value
            if len(pending[i]) == len(shards[i]):
                path = os.path.join(output, names[i])
                with files.atomic_path(path) as tmp:
                    save_file(pending.pop(i), tmp, metadata={"format": "pt"})
                written.append(path)
        if progress:
            progress(done, len(all_rules))
    if len(shards) > 1:
        _write_json(os.path.join(output, INDEX_FILE), {
            "metadata": {"total_size": total_bytes},
            "weight_map": {n: names[shard_of[n]] for n in shapes}})
        written.append(os.path.join(output, INDEX_FILE))
    return written


def export_checkpoint(ckpt, output: str, *, hf_config_dir: Optional[str] = None,
                      dtype: Optional[str] = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: Progress = None) -> ConversionSummary:
    """An opened Megatron checkpoint (any TP/CP it was saved at) -> a HF directory."""
    start = time.time()
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose {', '.join(TORCH_DTYPES)}")
    stale = glob.glob(os.path.join(output, "*.safetensors")) + \
        glob.glob(os.path.join(output, INDEX_FILE))
    if stale:
        raise ConversionError(f"{output} already holds {os.path.basename(stale[0])}: export into "
                              "an empty (or new) directory")
    saved = ckpt.model_config
    base = base_hf_config(ckpt, hf_config_dir)
    if dtype is None:  # the imported model's dtype, else the checkpoint's
        source = (base or {}).get("dtype") or (base or {}).get("torch_dtype")
        dtype = DTYPES.get(source) or ("bf16" if saved.bf16 else "fp32")
    torch_dtype = TORCH_DTYPES[dtype]
    hf = hf_config_from_model_config(saved, base, DTYPE_NAMES[torch_dtype])
    model_config = ckpt.architecture(attention_backend="local", sequence_parallel=False)
    model = ckpt.load_model(model_config, tp=1, cp=1)
    os.makedirs(output, exist_ok=True)
    state = model.state_dict()
    write_hf_weights(state, model_config, output, torch_dtype, max_shard_bytes, progress)
    _write_json(os.path.join(output, "config.json"), hf)
    if ckpt.tokenizer_dir:
        for name in sorted(os.listdir(ckpt.tokenizer_dir)):
            src = os.path.join(ckpt.tokenizer_dir, name)
            if os.path.isfile(src):
                files.copy_file(src, os.path.join(output, name))
    return ConversionSummary(source=ckpt.path, output=output,
                             model_config=json.loads(model_config.to_json()),
                             parameters=sum(p.numel() for p in model.parameters()),
                             seconds=round(time.time() - start, 2),
                             tensors=len(hf_shapes(model_config)))


__all__ = ["ConversionError", "ConversionSummary", "SafetensorsDir", "load_hf_model",
           "import_checkpoint", "export_checkpoint", "write_hf_weights", "base_hf_config",
           "DTYPES"]
