#!/usr/bin/env bash
# LoRA on the student (pip install -e ".[peft]"); the final folder holds the merged plain model.
set -euo pipefail
cd "$(dirname "$0")/../.."
STUDENT=${STUDENT:-examples/tiny/student}
TEACHER=${TEACHER:-examples/tiny/teacher}
DATA=${DATA:-examples/tiny/data/train.jsonl}
gkd-train \
    --model "$STUDENT" --teacher_model "$TEACHER" --dataset "$DATA" \
    --tuner_type lora --lora_rank 8 --lora_alpha 32 --target_modules all-linear \
    --lmbda 0.5 --beta 0.5 --max_completion_length "${MAX_NEW_TOKENS:-32}" \
    --per_device_train_batch_size 8 --learning_rate 1e-3 \
    --max_steps "${MAX_STEPS:-100}" --logging_steps 10 --save_steps 50 \
    --output_dir "${OUTPUT_DIR:-output/lora}" "$@"
