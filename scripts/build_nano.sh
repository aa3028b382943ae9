#!/usr/bin/env bash
# Build K2-Nano from nothing, offline, with this project's own pipeline:
#   corpus -> synthetic chats -> BPE tokenizer -> Base (pretrain) -> Instruct (SFT, three passes) -> block-FP8 dirs.
# Takes ~45 min on one free CPU core (base 200 steps, SFT 2 x 300 steps; each run uses one thread).
# Usage (from the repo root):  scripts/build_nano.sh
#   BASE_STEPS=N SFT_STEPS=M scripts/build_nano.sh   shorter/longer runs than the recipes' total_steps
#   (SFT_STEPS applies to each of the three SFT passes)
#   KIMI=path/to/kimi-k2 (default .venv/bin/kimi-k2), PY=python (default .venv/bin/python)
# Work files go to runs/nano/ (a rerun resumes the training runs from their checkpoints; rm -rf runs/nano to start
# over); the shipped directories are models/k2-nano-base and models/k2-nano-instruct (replaced).
set -euo pipefail
cd "$(dirname "$0")/.."
KIMI=${KIMI:-.venv/bin/kimi-k2}
PY=${PY:-.venv/bin/python}
W=runs/nano
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

steps() {  # --set overrides for a shorter/longer run: total steps, warm-up 1/30 of them (>= 2), eval/ckpt every 1/5
  [ -z "${1:-}" ] && return 0
  echo --set schedule.total_steps="$1" --set schedule.warmup_steps=$(( $1 / 30 > 2 ? $1 / 30 : 2 )) \
       --set train.eval_every=$(( $1 / 5 )) --set train.ckpt_every=$(( $1 / 5 ))
}

mkdir -p "$W"
"$KIMI" data corpus --out "$W/corpus.jsonl"
"$KIMI" data synth --out "$W/sft" --n 8000 --seed 0
"$PY" scripts/nano_text.py --corpus "$W/corpus.jsonl" --chats "$W/sft/train.jsonl" --n-chats 2000 --out "$W/text"
"$KIMI" tokenizer train --corpus "$W/text/tokenizer" --vocab-size 6144 --out "$W/tokenizer"
# shellcheck disable=SC2046
"$KIMI" train --config recipes/k2-nano-base.toml $(steps "${BASE_STEPS:-}")
# shellcheck disable=SC2046
"$KIMI" train --config recipes/k2-nano-instruct.toml $(steps "${SFT_STEPS:-}")
# shellcheck disable=SC2046
"$KIMI" train --config recipes/k2-nano-instruct-stage2.toml $(steps "${SFT_STEPS:-}")
"$KIMI" convert "$W/base/final" models/k2-nano-base --to fp8 --overwrite --no-progress
"$KIMI" data synth --out "$W/sft20k" --n 20000 --seed 0
# shellcheck disable=SC2046
"$KIMI" train --config recipes/k2-nano-instruct-stage3.toml $(steps "${SFT_STEPS:-}")
"$KIMI" convert "$W/instruct3/final" models/k2-nano-instruct --to fp8 --overwrite --no-progress
"$PY" scripts/nano_check.py models/k2-nano-instruct
