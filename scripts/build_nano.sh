#!/usr/bin/env bash
# Build K2-Nano from nothing, offline, with this project's own pipeline:
#   prepare: corpus -> BPE tokenizer -> pretraining text (corpus + rendered chats)
#   train:   synthetic SFT conversations -> Base (pretrain) -> Instruct (SFT, five passes) -> block-FP8 directories
# The chats mix generators of the nano study as the shipped passes did (experiments/k2_nano/synth.py: the same
# commands regenerate the same bytes; tests/test_nano_build.py pins them).
# Usage (from the repo root):
#   scripts/build_nano.sh [all|prepare|train]            all (default) = prepare, then train
# On a CPU (default) the runs are shortened: BASE_STEPS=200, MB_BASE=8, SFT_STEPS=600, MB_SFT=4 (set any of them to
# change that; measured 40 min on one core up to the first SFT pass); the second to fifth SFT passes (36, 48, 39 and
# 14 min on this box) are CPU-sized as they stand. With GPU=1 the recipes run as they stand (the shipped models:
# recipes/k2-nano-{base,instruct,instruct-stage2,instruct-stage3,instruct-stage4,instruct-stage5}.toml), the first two
# in bf16 autocast; `prepare` runs on the CPU machine whose Python stdlib the corpus comes from (copy
# runs/nano/{tokenizer,text} to the GPU machine).
# KIMI=path/to/kimi-k2 (default .venv/bin/kimi-k2), PY=python (default .venv/bin/python).
# Work files go to runs/nano/ (a rerun resumes the training runs from their checkpoints; rm -rf runs/nano to start
# over); the shipped directories are models/k2-nano-base and models/k2-nano-instruct (replaced).
set -euo pipefail
cd "$(dirname "$0")/.."
KIMI=${KIMI:-.venv/bin/kimi-k2}
PY=${PY:-.venv/bin/python}
W=runs/nano
PHASE=${1:-all}
NANO_SYNTH=("$PY" -m experiments.k2_nano.synth)  # `kimi-k2 data synth` plus the nano study's generator mixes
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "$PHASE" = all ] || [ "$PHASE" = prepare ]; then
  mkdir -p "$W"
  "$KIMI" data corpus --out "$W/corpus.jsonl"
  # the tokenizer: BPE over the corpus and 2000 chats of the hand-written tools
  "$KIMI" data synth --out "$W/chats-tok" --n 2000 --seed 0
  "$PY" scripts/nano_text.py --corpus "$W/corpus.jsonl" --chats "$W/chats-tok/train.jsonl" --n-chats 2000 \
    --out "$W/text-tok"
  "$KIMI" tokenizer train --corpus "$W/text-tok/tokenizer" --vocab-size 6144 --out "$W/tokenizer"
  # pretraining text: the corpus and 4000 chats, half of them over invented tools
  "${NANO_SYNTH[@]}" --out "$W/chats" --n 4000 --seed 100 --generic 0.5
  "$PY" scripts/nano_text.py --corpus "$W/corpus.jsonl" --chats "$W/chats/train.jsonl" --n-chats 4000 --out "$W/text"
fi

if [ "$PHASE" = all ] || [ "$PHASE" = train ]; then
  synth() {  # out_dir n seed0 generic: 8 shards, seeds seed0..seed0+7, concatenated into out_dir/train.jsonl
    local pids=() k pid
    for k in 0 1 2 3 4 5 6 7; do
      "${NANO_SYNTH[@]}" --out "$1-$k" --n "$2" --seed $(( $3 + k )) --generic "$4" > /dev/null &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done  # a failed shard stops the build (set -e)
    mkdir -p "$1" && cat "$1"-?/train.jsonl > "$1/train.jsonl"
  }
  synth "$W/sft" 20000 0 0.5
  "${NANO_SYNTH[@]}" --out "$W/sft2" --n 20000 --seed 20 --generic 0.4 --status 0.25
  "${NANO_SYNTH[@]}" --out "$W/sft3" --n 20000 --seed 40 --broad 0.5 --generic 0.3 --status 0.25
  "${NANO_SYNTH[@]}" --out "$W/sft4" --n 20000 --seed 50 --broad 0.6 --generic 0.25 --status 0.3 --vocab "$W/tokenizer"
  "${NANO_SYNTH[@]}" --out "$W/sft6" --n 8000 --seed 70 --broad 0.5 --generic 0.15 --status 0.6 --vocab "$W/tokenizer"
  if [ "${GPU:-0}" = 1 ]; then
    base=(--set train.dtype='"bfloat16"' --set train.threads=4)
    sft=("${base[@]}" --set data.workers=14)
  else
    steps() {  # total steps and micro-batch; warm-up 1/30 of the steps, eval and checkpoints every 1/4
      echo --set schedule.total_steps="$1" --set schedule.warmup_steps=$(( $1 / 30 > 2 ? $1 / 30 : 2 )) \
           --set train.eval_every=$(( $1 / 4 )) --set train.ckpt_every=$(( $1 / 4 )) --set train.micro_batch="$2"
    }
    read -r -a base <<< "$(steps "${BASE_STEPS:-200}" "${MB_BASE:-8}")"
    read -r -a sft <<< "$(steps "${SFT_STEPS:-600}" "${MB_SFT:-4}") --set data.workers=2"
  fi
  "$KIMI" train --config recipes/k2-nano-base.toml "${base[@]}"
  "$KIMI" train --config recipes/k2-nano-instruct.toml "${sft[@]}"
  "$KIMI" train --config recipes/k2-nano-instruct-stage2.toml
  "$KIMI" train --config recipes/k2-nano-instruct-stage3.toml
  "$KIMI" train --config recipes/k2-nano-instruct-stage4.toml
  "$KIMI" train --config recipes/k2-nano-instruct-stage5.toml
  "$KIMI" convert "$W/base/final" models/k2-nano-base --to fp8 --overwrite --no-progress
  "$KIMI" convert "$W/instruct5/final" models/k2-nano-instruct --to fp8 --overwrite --no-progress
  "$PY" scripts/nano_check.py models/k2-nano-instruct
fi
