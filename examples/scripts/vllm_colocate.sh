#!/usr/bin/env bash
# On-policy GKD with the student sampled by vLLM inside the training process (colocate), on its GPU.
# Needs vLLM (pip install 'gkd[vllm]'). Leave vLLM room beside the student, teacher and optimizer:
# VLLM_MEMORY is the share of the GPU it may take; SLEEP_LEVEL=1 frees its KV cache between generations.
# Several GPUs: NPROC=4 runs one process (and one engine) per GPU with torchrun.
# Defaults run on the tiny models (python scripts/make_tiny_models.py); set STUDENT, TEACHER, DATA for yours.
set -euo pipefail
cd "$(dirname "$0")/../.."
STUDENT=${STUDENT:-examples/tiny/student}
TEACHER=${TEACHER:-examples/tiny/teacher}
DATA=${DATA:-examples/tiny/data/train.jsonl}
torchrun --nproc_per_node "${NPROC:-1}" --master_port "${MASTER_PORT:-29500}" -m gkd.cli.train \
    --model "$STUDENT" --teacher_model "$TEACHER" --dataset "$DATA" \
    --lmbda 1 --beta 0.5 --temperature 0.9 --max_completion_length "${MAX_NEW_TOKENS:-32}" \
    --use_vllm true --vllm_mode colocate --vllm_gpu_memory_utilization "${VLLM_MEMORY:-0.3}" \
    --sleep_level "${SLEEP_LEVEL:-0}" \
    --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --learning_rate 1e-4 \
    --max_steps "${MAX_STEPS:-100}" --logging_steps 10 --save_steps 50 \
    --output_dir "${OUTPUT_DIR:-output/vllm-colocate}" "$@"
