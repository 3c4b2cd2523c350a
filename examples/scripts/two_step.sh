#!/usr/bin/env bash
# Sequence-level KD in two steps: sample the teacher once with gkd-infer (resumable: rerun after a
# crash), then train on its answers with lmbda 0 (add --lmbda 0.5 to mix in on-policy samples).
set -euo pipefail
cd "$(dirname "$0")/../.."
STUDENT=${STUDENT:-examples/tiny/student}
TEACHER=${TEACHER:-examples/tiny/teacher}
DATA=${DATA:-examples/tiny/data/prompts.jsonl}
SAMPLES=${SAMPLES:-output/teacher-samples.jsonl}
mkdir -p "$(dirname "$SAMPLES")"
gkd-infer --model "$TEACHER" --val_dataset "$DATA" --result_path "$SAMPLES" \
    --max_new_tokens "${MAX_NEW_TOKENS:-32}" --temperature 0.9
gkd-train \
    --model "$STUDENT" --teacher_model "$TEACHER" --dataset "$SAMPLES" \
    --lmbda 0 --beta 0.5 \
    --per_device_train_batch_size 8 --learning_rate 1e-4 \
    --max_steps "${MAX_STEPS:-100}" --logging_steps 10 --save_steps 50 \
    --output_dir "${OUTPUT_DIR:-output/two-step}" "$@"
