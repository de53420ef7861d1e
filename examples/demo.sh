#!/usr/bin/env bash
# memtune demo, offline, on the embedded SmolLM2-135M-Instruct (about 10-15 minutes on 2 CPU cores):
#   1. find country capitals the model gets wrong (and ones it knows),
#   2. retrofit a 1M-slot memory in parallel mode (exactly the base model until it learns),
#   3. record background slot statistics on chat-formatted questions about other relations,
#   4. learn 20 wrong capitals with sparse memory finetuning,
#   5. compare answers before and after, on the learned facts, their paraphrases and known facts.
# Usage: bash examples/demo.sh [OUT_DIR]   (default runs/demo; N_FACTS, EPOCHS override sizes)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
N_FACTS=${N_FACTS:-20}
EPOCHS=${EPOCHS:-60}
M=".venv/bin/memtune"
mkdir -p "$OUT"

echo "== 1/5 which capitals does the base model know?"
[ -f "$OUT/facts/summary.json" ] || $M facts --model smollm2-135m --data countries:capital --out "$OUT/facts"
head -n "$N_FACTS" "$OUT/facts/learn.jsonl" > "$OUT/learn.jsonl"
head -n "$N_FACTS" "$OUT/facts/known.jsonl" > "$OUT/known.jsonl"

echo "== 2/5 retrofit: memory at layers 8,16,24 sharing one 1024² = 1M-slot value table"
[ -f "$OUT/memory/memory_config.json" ] || \
  $M retrofit --model smollm2-135m --layers 8,16,24 --mode parallel --n-keys 1024 --out "$OUT/memory"

echo "== 3/5 background statistics: chat-formatted questions on other relations"
[ -f "$OUT/background/background.json" ] || \
  $M background --model "$OUT/memory" --data countries:currency,continent,demonym,language,calling_code \
    --batches 60 --batch-size 8 --out "$OUT/background"

echo "== 4/5 sparse memory finetuning on $N_FACTS facts the model got wrong"
$M learn --model "$OUT/memory" --data "$OUT/learn.jsonl" --background "$OUT/background" \
  --batch-size "$N_FACTS" --epochs "$EPOCHS" --out "$OUT/smf" --overwrite

echo "== 5/5 before and after"
for model in "$OUT/memory" "$OUT/smf/model"; do
  $M eval --model "$model" --probe qa --qa "$OUT/learn.jsonl" --predictions --out "$model.learned.json" > /dev/null
  $M eval --model "$model" --probe qa --qa "$OUT/known.jsonl" --no-paraphrases --out "$model.known.json" > /dev/null
done
.venv/bin/python examples/compare.py "$OUT/memory" "$OUT/smf/model" | tee "$OUT/summary.md"
