#!/usr/bin/env bash
# One process (one GPU, or the CPU): on-policy GKD with half the completions from the student.
# Defaults run on the tiny models (python scripts/make_tiny_models.py); set STUDENT, TEACHER, DATA for yours.
set -euo pipefail
cd "$(dirname "$0")/../.."
STUDENT=${STUDENT:-examples/tiny/student}
TEACHER=${TEACHER:-examples/tiny/teacher}
DATA=${DATA:-examples/tiny/data/train.jsonl}
gkd-train \
    --model "$STUDENT" --teacher_model "$TEACHER" --dataset "$DATA" \
    --lmbda 0.5 --beta 0.5 --temperature 0.9 --max_completion_length "${MAX_NEW_TOKENS:-32}" \
    --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --learning_rate 1e-4 \
    --max_steps "${MAX_STEPS:-100}" --logging_steps 10 --save_steps 50 \
    --output_dir "${OUTPUT_DIR:-output/single}" "$@"
