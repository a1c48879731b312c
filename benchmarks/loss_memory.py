"""Peak memory of one forward+backward through `forward_packed` with a large vocabulary.

The output layer's logits are [T, V/tp]; how the cross entropy treats them decides whether a
32K x 128K step fits. This builds a small model (so the logits dominate), runs one training
forward + backward (`return_logits=False`, as the trainer does) and reports the memory high
water mark above what was held before it: CPU, VmHWM reset just before the step; GPU,
`torch.cuda.max_memory_allocated`. Run it against two trees to compare (before/after):

    python benchmarks/loss_memory.py --tokens 8192 --vocab 32768 --bf16
    PYTHONPATH=/path/to/old/tree python benchmarks/loss_memory.py --tokens 8192 --vocab 32768 --bf16
"""

from __future__ import annotations

import argparse
import json
import warnings


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from megatron_anchor import model as model_lib, runtime
    from megatron_anchor.layout import pack_documents

    runtime.initialize(1, 1, cpu=None, seed=0)
    cfg = model_lib.ModelConfig(num_layers=1, hidden_size=args.hidden_size, num_attention_heads=2,
                                vocab_size=args.vocab, max_sequence_length=args.tokens,
                                bf16=args.bf16)
    gpt = model_lib.build_model(cfg).to(runtime.device())
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, args.vocab, (n,), generator=g).tolist() for n in (3000, 2000, 5000)]
    batch = pack_documents(docs, args.tokens, "anchor", anchor_token_id=1).to(runtime.device())
    logits_bytes = args.tokens * cfg.padded_vocab_size * (2 if args.bf16 else 4)
    gpu = not runtime.is_cpu()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM
    _, loss = model_lib.forward_packed(gpt, batch, return_logits=False)
    (loss * batch.loss_mask).sum().backward()
    peak = (torch.cuda.max_memory_allocated() if gpu else _status_bytes("VmHWM")) - before
    chunked = hasattr(model_lib, "vocab_parallel_cross_entropy")
    result = {"tokens": args.tokens, "vocab": cfg.padded_vocab_size, "bf16": args.bf16,
              "device": "cuda" if gpu else "cpu",
              "cross_entropy": "chunked" if chunked else "megatron (FP32 copy)",
              "logits_mib": logits_bytes / 2 ** 20, "peak_above_start_mib": peak / 2 ** 20,
              "peak_over_logits": peak / logits_bytes}
    print(json.dumps(result))
    runtime.destroy()
    return result


if __name__ == "__main__":
    main()
