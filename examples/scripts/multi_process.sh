#!/usr/bin/env bash
# Several processes with DDP through torchrun (NPROC GPUs, or NPROC CPU processes over gloo).
# The global batch is NPROC x per_device_train_batch_size x gradient_accumulation_steps; the loss is
# normalised over the completion tokens of all of them.
set -euo pipefail
cd "$(dirname "$0")/../.."
STUDENT=${STUDENT:-examples/tiny/student}
TEACHER=${TEACHER:-examples/tiny/teacher}
DATA=${DATA:-examples/tiny/data/train.jsonl}
python -m torch.distributed.run --nproc_per_node "${NPROC:-2}" -m gkd.cli.train \
    --model "$STUDENT" --teacher_model "$TEACHER" --dataset "$DATA" \
    --lmbda 0.5 --beta 0.5 --max_completion_length "${MAX_NEW_TOKENS:-32}" \
    --per_device_train_batch_size 4 --gradient_accumulation_steps 2 --learning_rate 1e-4 \
    --max_steps "${MAX_STEPS:-100}" --logging_steps 10 --save_steps 50 \
    --output_dir "${OUTPUT_DIR:-output/multi}" "$@"
