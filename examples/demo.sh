#!/usr/bin/env bash
# memtune demo, offline, on the embedded SmolLM2-135M-Instruct (about 15-20 minutes on 2 CPU cores;
# on a busy machine --threads 1 / OMP_NUM_THREADS=1 is much faster):
#   1. ask the model every country's capital; split them into facts it gets wrong and right,
#   2. `memtune learn` N_FACTS wrong capitals with its defaults: it retrofits a 1M-slot memory
#      (exactly the base model until it learns), writes questions of the same form itself to
#      find what it must keep, and learns by sparse memory finetuning until every fact is right,
#   3. compare answers before and after: learned facts, their paraphrases, and known capitals
#      that the learn call never saw.
# Usage: bash examples/demo.sh [OUT_DIR]     (default runs/demo; N_FACTS overrides)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
N_FACTS=${N_FACTS:-20}
THREADS=${THREADS:-1}
M=".venv/bin/memtune"
PY=".venv/bin/python"
mkdir -p "$OUT"

echo "== 1/3 which capitals does the base model know?"
[ -f "$OUT/facts/summary.json" ] || $M facts --model smollm2-135m --data countries:capital --out "$OUT/facts" --threads "$THREADS"
head -n "$N_FACTS" "$OUT/facts/learn.jsonl" > "$OUT/learn.jsonl"
head -n "$N_FACTS" "$OUT/facts/known.jsonl" > "$OUT/known.jsonl"
# what a user has: questions and answers only (no statements, no paraphrases)
$PY -c "import json,sys; [print(json.dumps({'question': r['question'], 'answer': r['answer']})) for r in map(json.loads, open(sys.argv[1]))]" \
  "$OUT/learn.jsonl" > "$OUT/new_facts.jsonl"

echo "== 2/3 memtune learn, defaults: $N_FACTS facts the model got wrong"
$M learn --model smollm2-135m --data "$OUT/new_facts.jsonl" --out "$OUT/smf" --overwrite --threads "$THREADS"

echo "== 3/3 before and after"
for side in before after; do
  model=$([ "$side" = before ] && echo smollm2-135m || echo "$OUT/smf/model")
  $M eval --model "$model" --probe qa --data "$OUT/learn.jsonl" --predictions --out "$OUT/$side.learned.json" --threads "$THREADS" > /dev/null
  $M eval --model "$model" --probe qa --data "$OUT/known.jsonl" --predictions --out "$OUT/$side.known.json" --threads "$THREADS" > /dev/null
done
$PY examples/compare.py "$OUT/before" "$OUT/after" | tee "$OUT/summary.md"
