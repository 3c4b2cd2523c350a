#!/usr/bin/env bash
# On-policy GKD with the student served by gkd-rollout (vLLM in its own process, on its own GPUs) and
# trained on others; weights go to the server after every optimizer step through a process group.
# E.g. on 4 GPUs: ROLLOUT_GPUS=3 TRAIN_GPUS=0,1,2 NPROC=3 ROLLOUT_FLAGS="--vllm_gpu_memory_utilization 0.9".
# Needs vLLM where gkd-rollout runs (pip install 'gkd[vllm]').
# Defaults run on the tiny models (python scripts/make_tiny_models.py); set STUDENT, TEACHER, DATA for yours.
set -euo pipefail
cd "$(dirname "$0")/../.."
STUDENT=${STUDENT:-examples/tiny/student}
TEACHER=${TEACHER:-examples/tiny/teacher}
DATA=${DATA:-examples/tiny/data/train.jsonl}
PORT=${PORT:-8000}
# gkd-rollout refuses requests without this shared secret; gkd-rollout and gkd-train both read it here.
export GKD_ROLLOUT_TOKEN=${GKD_ROLLOUT_TOKEN:-$(python -c "import secrets; print(secrets.token_urlsafe(24))")}

# shellcheck disable=SC2086  # ROLLOUT_FLAGS is a list of flags
env ${ROLLOUT_GPUS:+CUDA_VISIBLE_DEVICES=$ROLLOUT_GPUS} gkd-rollout --model "$STUDENT" --port "$PORT" ${ROLLOUT_FLAGS:-} &
ROLLOUT=$!
trap 'kill "$ROLLOUT" 2>/dev/null; wait "$ROLLOUT" 2>/dev/null || true' EXIT

# gkd-train waits (up to --vllm_server_timeout seconds) for the server to answer.
env ${TRAIN_GPUS:+CUDA_VISIBLE_DEVICES=$TRAIN_GPUS} torchrun --nproc_per_node "${NPROC:-1}" --master_port "${MASTER_PORT:-29500}" \
    -m gkd.cli.train \
    --model "$STUDENT" --teacher_model "$TEACHER" --dataset "$DATA" \
    --lmbda 1 --beta 0.5 --temperature 0.9 --max_completion_length "${MAX_NEW_TOKENS:-32}" \
    --use_vllm true --vllm_mode server --vllm_server_port "$PORT" \
    --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --learning_rate 1e-4 \
    --max_steps "${MAX_STEPS:-100}" --logging_steps 10 --save_steps 50 \
    --output_dir "${OUTPUT_DIR:-output/vllm-server}" "$@"
