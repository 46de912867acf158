#!/usr/bin/env bash
# The GPU round behind experiments/README.md ("What was tried", round 3): train every variant at
# once on one GPU, read each one's likelihood control (and his-oracle) on the validation users, then
# generate for the validation users (to choose) and the test users (to report the chosen one once).
# Metrics and the voice measures are computed afterwards on a CPU from the generations (the same
# `evaluate` command without --generate-only finds them done and scores them).
# Usage: bash experiments/voice_round.sh OUT_DIR [MINUTES] [VARIANTS_FILE]; the variants file
# (default: round 3's) has one line per variant, "name | train arguments | evaluate arguments" (the
# evaluate arguments, the prompt's layout, go to the likelihood control too).
# DEVICE, EXTRA_TRAIN and EXTRA_EVAL (for a quick CPU rehearsal) change the device and add arguments.
set -uo pipefail
OUT=${1:?output folder}; MINUTES=${2:-4}; VARIANTS_FILE=${3:-$(dirname "$0")/round3.variants}
COMMON=(--device "${DEVICE:-cuda}" --no-4bit)
# shellcheck disable=SC2206
TRAIN=(--epochs 3 --batch-size 32 --lr 1e-3 --eval-every 50 --val-samples 128 --max-minutes "$MINUTES" ${EXTRA_TRAIN:-})
# shellcheck disable=SC2206
EVAL=(--batch-users 64 --generate-only ${EXTRA_EVAL:-})
declare -A VARIANTS EVAL_ARGS
while IFS='|' read -r name train_args eval_args; do
  name=$(echo "$name" | xargs); [[ -z $name || $name == \#* ]] && continue
  VARIANTS[$name]=$train_args; EVAL_ARGS[$name]=$eval_args
done < "$VARIANTS_FILE"
VAL_METHODS=nonperso,generic,dep,dep-shuffled
TEST_METHODS=nonperso,nonperso+length,generic,dep,dep-shuffled,his+diff,his+diff-shuffled,dep@alpha=0.5,dep@alpha=1.5
mkdir -p "$OUT"
python3 -c "from dep_engine.llm import load_llm; load_llm(device='${DEVICE:-cuda}', four_bit=False)"  # de-quantize once
for name in "${!VARIANTS[@]}"; do
  # shellcheck disable=SC2086
  python3 -m dep_engine train "${COMMON[@]}" "${TRAIN[@]}" ${VARIANTS[$name]} --out "$OUT/$name" \
    > "$OUT/$name.train.log" 2>&1 &
done
wait
for name in "${!VARIANTS[@]}"; do  # the likelihood control and the his-oracle, no generation (round 11)
  [[ -f "$OUT/$name/adapter_config.json" ]] || continue
  # shellcheck disable=SC2086
  python3 -m dep_engine likelihood "${COMMON[@]}" --adapter "$OUT/$name" --split val \
    ${EVAL_ARGS[$name]} --out "$OUT/$name/likelihood-val.json" > "$OUT/$name.likelihood.log" 2>&1 &
done
wait
for split in val test; do
  methods=$VAL_METHODS; [[ $split == test ]] && methods=$TEST_METHODS
  for name in "${!VARIANTS[@]}"; do
    [[ -f "$OUT/$name/adapter_config.json" ]] || continue
    # shellcheck disable=SC2086
    python3 -m dep_engine evaluate "${COMMON[@]}" --adapter "$OUT/$name" --split "$split" --methods "$methods" \
      "${EVAL[@]}" ${EVAL_ARGS[$name]} --out "$OUT/$name/$split" > "$OUT/$name.$split.log" 2>&1 &
  done
  wait
done
