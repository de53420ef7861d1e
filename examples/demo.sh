#!/usr/bin/env bash
# memtune demo, offline, on the embedded SmolLM2-135M-Instruct (20–30 minutes on 2 CPU
# cores; on a busy machine THREADS=1 is faster):
#   1. ask the model 120 countries' capitals; split them into facts it gets wrong and right,
#   2. `memtune learn` N_FACTS wrong capitals with its defaults: it retrofits a 1M-slot memory
#      (exactly the base model until it learns), writes questions of the same form itself to
#      find what it must keep, and learns by sparse memory finetuning until every fact is right,
#   3. a second `memtune learn` call teaches N_FACTS more, continuing the first call's checkpoint
#      (what the first learned stays frozen),
#   4. compare answers before and after: the facts of both calls, their paraphrases, and known
#      capitals that neither call saw.
# Usage: bash examples/demo.sh [OUT_DIR]     (default runs/demo; N_FACTS per call, default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
N_FACTS=${N_FACTS:-10}
THREADS=${THREADS:-2}
M=".venv/bin/memtune"
PY=".venv/bin/python"
mkdir -p "$OUT"

echo "== 1/4 which capitals does the base model know?"
[ -f "$OUT/facts/summary.json" ] || $M facts --model smollm2-135m --data countries:capital --limit 120 --out "$OUT/facts" --threads "$THREADS"
if [ "$(wc -l < "$OUT/facts/learn.jsonl")" -lt "$((2 * N_FACTS))" ]; then
  echo "the model gets fewer than $((2 * N_FACTS)) capitals wrong: set N_FACTS lower" >&2; exit 2
fi
head -n "$((2 * N_FACTS))" "$OUT/facts/learn.jsonl" > "$OUT/learn.jsonl"
head -n 20 "$OUT/facts/known.jsonl" > "$OUT/known.jsonl"
# what a user has: questions and answers only (no statements, no paraphrases), in two files
for call in 1 2; do
  $PY -c "import json,sys; [print(json.dumps({'question': r['question'], 'answer': r['answer']})) for r in map(json.loads, open(sys.argv[1]))]" \
    "$OUT/learn.jsonl" | sed -n "$(( (call - 1) * N_FACTS + 1 )),$(( call * N_FACTS ))p" > "$OUT/new_facts$call.jsonl"
done

echo "== 2/4 memtune learn, defaults: $N_FACTS facts the model got wrong"
$M learn --model smollm2-135m --data "$OUT/new_facts1.jsonl" --out "$OUT/call1" --overwrite --threads "$THREADS"

echo "== 3/4 memtune learn again, from the first call's checkpoint: $N_FACTS more"
$M learn --model "$OUT/call1/model" --data "$OUT/new_facts2.jsonl" --out "$OUT/call2" --overwrite --threads "$THREADS"

echo "== 4/4 before and after"
for side in before after; do
  model=$([ "$side" = before ] && echo smollm2-135m || echo "$OUT/call2/model")
  $M eval --model "$model" --probe qa --data "$OUT/learn.jsonl" --predictions --out "$OUT/$side.learned.json" --threads "$THREADS" > /dev/null
  $M eval --model "$model" --probe qa --data "$OUT/known.jsonl" --predictions --out "$OUT/$side.known.json" --threads "$THREADS" > /dev/null
done
$PY examples/compare.py "$OUT/before" "$OUT/after" --parts "$N_FACTS,$N_FACTS" | tee "$OUT/summary.md"
$M inspect --model "$OUT/call2/model" | sed -n '/^learned/,$p'
