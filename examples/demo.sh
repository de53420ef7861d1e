#!/usr/bin/env bash
# memtune demo, offline, on the embedded SmolLM2-135M-Instruct (about 15-20 minutes on 2 CPU cores;
# on a busy machine OMP_NUM_THREADS=1 is much faster):
#   1. ask the model every country's capital; split them into facts it gets wrong and right,
#   2. retrofit a 1M-slot memory in parallel mode (exactly the base model until it learns),
#   3. record background slot statistics on chat-formatted country questions that are neither
#      learned nor used to check forgetting (the background must look like the data learned),
#   4. learn N_FACTS wrong capitals with sparse memory finetuning,
#   5. compare answers before and after: learned facts, their paraphrases, and known facts.
# Usage: bash examples/demo.sh [OUT_DIR]     (default runs/demo; N_FACTS, EPOCHS, LR, TOP_T override)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
N_FACTS=${N_FACTS:-20}
EPOCHS=${EPOCHS:-120}
LR=${LR:-1.0}
TOP_T=${TOP_T:-2000}
M=".venv/bin/memtune"
PY=".venv/bin/python"
mkdir -p "$OUT"

echo "== 1/5 which capitals does the base model know?"
[ -f "$OUT/facts/summary.json" ] || $M facts --model smollm2-135m --data countries:capital --out "$OUT/facts"
head -n "$N_FACTS" "$OUT/facts/learn.jsonl" > "$OUT/learn.jsonl"
head -n "$N_FACTS" "$OUT/facts/known.jsonl" > "$OUT/known.jsonl"

echo "== 2/5 retrofit: memory at layers 8,16,24 sharing one 1024² = 1M-slot value table"
[ -f "$OUT/memory/memory_config.json" ] || \
  $M retrofit --model smollm2-135m --layers 8,16,24 --mode parallel --n-keys 1024 --out "$OUT/memory"

echo "== 3/5 background statistics on other country questions"
$PY - "$OUT" "$N_FACTS" <<'PY'
import json, sys
from memtune.data import load_qa
out, n = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for f in ("learn", "known") for l in open(f"{out}/facts/{f}.jsonl").readlines()[n:]]
rows += [q.to_dict() for q in load_qa("countries:currency,continent,demonym,language")[: len(rows)]]
with open(f"{out}/background.jsonl", "w") as f:
    f.writelines(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows)
PY
[ -f "$OUT/background/background.json" ] || \
  $M background --model "$OUT/memory" --data "$OUT/background.jsonl" --batches 60 --batch-size 8 --out "$OUT/background"

echo "== 4/5 sparse memory finetuning on $N_FACTS facts the model got wrong"
$M learn --model "$OUT/memory" --data "$OUT/learn.jsonl" --background "$OUT/background" \
  --batch-size "$N_FACTS" --epochs "$EPOCHS" --lr "$LR" --top-t "$TOP_T" --out "$OUT/smf" --overwrite

echo "== 5/5 before and after"
for model in "$OUT/memory" "$OUT/smf/model"; do
  $M eval --model "$model" --probe qa --qa "$OUT/learn.jsonl" --predictions --out "$model.learned.json" > /dev/null
  $M eval --model "$model" --probe qa --qa "$OUT/known.jsonl" --predictions --out "$model.known.json" > /dev/null
done
$PY examples/compare.py "$OUT/memory" "$OUT/smf/model" | tee "$OUT/summary.md"
