#!/usr/bin/env bash
# Encoding throughput: `prolora data encode` on 1 thread and on all cores, next to open-instruct's
# encoder on HF tokenizers (Python, 1 process and one per core), on the same 20 000 examples;
# also checks the two outputs are identical. Needs the reference venv (scripts/reference/README.md).
#   scripts/bench/encode.sh [.venv-ref/bin/python]
set -euo pipefail
PY=${1:-.venv-ref/bin/python}
CORES=$(nproc)
TOK=assets/llama2-tokenizer.json
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cargo build --release --quiet
BIN=target/release/prolora
# A realistic mix: every prepared sample format, repeated to 20 000 examples.
for f in "superni data/raw/superni" "flan_v2 data/raw/flan_v2.jsonl" "cot data/raw/cot" \
         "code_alpaca data/raw" "alpaca data/raw" "messages data/raw/messages.jsonl"; do
  set -- $f
  $BIN data prepare --format "$1" --in "$2" --out "$WORK/$1.jsonl" 2>/dev/null
done
cat "$WORK"/*.jsonl > "$WORK/mix.jsonl"
python3 -c "
import sys; lines = open('$WORK/mix.jsonl').read().splitlines()
open('$WORK/data.jsonl', 'w').write('\n'.join((lines * (20000 // len(lines) + 1))[:20000]) + '\n')"
echo "20000 examples, $(wc -c < "$WORK/data.jsonl") bytes, max length 512, $CORES cores"
for threads in 1 "$CORES"; do
  start=$(date +%s.%N)
  RAYON_NUM_THREADS=$threads $BIN data encode --tokenizer $TOK --data "$WORK/data.jsonl" \
    --max-seq-len 512 --out "$WORK/rust.jsonl" 2>/dev/null
  end=$(date +%s.%N)
  python3 -c "t = $end - $start; print(f'prolora threads=$threads: 20000 examples in {t:.2f} s = {20000 / t:.0f} examples/s')"
done
for procs in 1 "$CORES"; do
  "$PY" scripts/bench/encode_hf.py $TOK "$WORK/data.jsonl" 512 "$WORK/python.jsonl" "$procs" 2>/dev/null
done
cmp -s "$WORK/rust.jsonl" <(python3 -c "
import json, sys
for l in open('$WORK/python.jsonl'): print(json.dumps(json.loads(l), separators=(',', ':')))") \
  && echo "outputs identical (20000 examples)" || { echo "OUTPUTS DIFFER"; exit 1; }
