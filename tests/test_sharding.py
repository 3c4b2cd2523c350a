"""Sharded training in 2 CPU processes over gloo (gkd/sharding): DeepSpeed ZeRO-2, ZeRO-3 (with CPU offload),
FSDP2, a sharded teacher, LoRA and resume, each against the same global batch in one plain process.

lmbda 0.5 gives steps where one process has student samples and the other none (no hang), and the weights
after the steps must equal one process's (tolerance as for DDP in test_cli.py): the same sources, the same
completions, and the gradient of (global sum / global completion tokens) whatever the backend does with
accumulation. Float32 and plain SGD, so that rounding is not amplified into visible steps.
"""

import ast
import json
import subprocess
import sys

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, free_port
from gkd.trainer import sample_source

STEPS = 4
COMMON = ["--max_steps", STEPS, "--seed", 3, "--optim", "sgd", "--learning_rate", "0.5", "--lmbda", 0.5,
          "--lr_scheduler_type", "constant", "--temperature", 1.0, "--torch_dtype", "float32",
          "--max_completion_length", 12, "--logging_steps", 1, "--report_to", "none", "--disable_tqdm", "true",
          "--add_version", "false", "--gradient_checkpointing", "false", "--save_strategy", "no"]


def train(tiny, output_dir, *flags, processes=1, batch_size=4, accumulation=1, accelerate_config=None):
    """gkd-train on the tiny models; returns its training logs. 2 processes: NPROC_PER_NODE=2, as ms-swift
    starts them, or accelerate launch with one of examples/accelerate/'s configs."""
    environment = {"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())} if processes == 2 else {}
    launcher = [sys.executable]
    if accelerate_config:
        environment = {}
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    REPO / "examples" / "accelerate" / accelerate_config, "--num_processes", 2,
                    "--main_process_port", free_port()]
    flags = ["--model", tiny / "student", "--teacher_model", tiny / "teacher", "--dataset",
             f"{tiny / 'data' / 'train.jsonl'}#32", "--output_dir", output_dir, *COMMON,
             "--per_device_train_batch_size", batch_size, "--gradient_accumulation_steps", accumulation, *flags]
    # A new session, so that a hang is stopped with all of torchrun's processes, not only the launcher.
    process = subprocess.Popen(["env", *(f"{name}={value}" for name, value in environment.items()),
                                *map(str, launcher), "-m", "gkd.cli.train", *map(str, flags)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # torchrun's workers run in sessions of their own: the whole tree
        for child in [*psutil.Process(process.pid).children(recursive=True), process]:
            child.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"gkd-train hung (killed after 300 s): {stderr[-3000:]}")
    assert process.returncode == 0, stderr[-4000:]
    return [ast.literal_eval(line) for line in stdout.splitlines() if line.startswith("{'loss'")]


def sources(logs):
    return [(entry["samples_student"], entry["samples_teacher"], entry["samples_dataset"],
             entry["completion_length"]) for entry in logs]


def a_process_goes_without(batch_size, accumulation, seq_kd=False) -> bool:
    """Whether some step leaves one of the 2 processes without a student sample while the other has one
    (gkd.trainer numbers a step's rows micro-batch by micro-batch, process by process)."""
    for step in range(STEPS):
        counts = [sum(sample_source(3, step, (micro_batch * 2 + process) * batch_size + row, 0.5, seq_kd) == "student"
                      for micro_batch in range(accumulation) for row in range(batch_size)) for process in (0, 1)]
        if min(counts) == 0 < max(counts):
            return True
    return False


def assert_same_weights(folder, reference_folder, atol=1e-6):
    weights, reference = load_file(folder / "model.safetensors"), load_file(reference_folder / "model.safetensors")
    assert sorted(weights) == sorted(reference)
    for name in reference:
        torch.testing.assert_close(weights[name].float(), reference[name], rtol=1e-4, atol=atol, msg=name)


def assert_reloads_and_generates(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    output = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert output.shape == (1, 7)


@pytest.fixture(scope="module")
def references(tiny, tmp_path_factory):
    """One plain process with the whole global batch: on-policy, seq_kd, and LoRA (lazily, once each)."""
    folder, done = tmp_path_factory.mktemp("references"), {}

    def reference(name, *flags):
        if name not in done:
            done[name] = (folder / name, sources(train(tiny, folder / name, *flags)))
        return done[name]

    return reference


@pytest.fixture(scope="module")
def offload_config(tmp_path_factory):
    """zero3_offload with the trainer's optimizer (SGD) kept: a config file given by path."""
    config = json.loads((REPO / "gkd" / "deepspeed_configs" / "zero3_offload.json").read_text())
    config["zero_force_ds_cpu_optimizer"] = False  # else DeepSpeed swaps in its CPU Adam
    path = tmp_path_factory.mktemp("config") / "zero3_offload_sgd.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("backend, flags, batch_size, accumulation", [
    # the teacher partitioned under its own ZeRO-3 while the student's stage is 2
    ("zero2", ["--deepspeed", "zero2", "--teacher_deepspeed", "zero3"], 2, 1),
    ("fsdp2", ["--fsdp", "full_shard auto_wrap"], 1, 2),
])
def test_sharded_student_steps_equal_one_process(tiny, tmp_path, references, backend, flags, batch_size,
                                                 accumulation):
    reference_folder, reference_sources = references("plain")
    logs = train(tiny, tmp_path / backend, *flags, processes=2, batch_size=batch_size, accumulation=accumulation)
    assert a_process_goes_without(batch_size, accumulation)
    assert sources(logs) == reference_sources  # same sources and completion lengths, step by step
    assert_same_weights(tmp_path / backend, reference_folder)
    assert_reloads_and_generates(tmp_path / backend)


def test_offloaded_zero3_student_and_teacher(tiny, tmp_path, references, offload_config):
    """The student under a zero3_offload config file, the teacher partitioned by --teacher_deepspeed
    zero3_offload (an inference engine, parameters in CPU memory)."""
    reference_folder, reference_sources = references("plain")
    assert a_process_goes_without(2, 1)
    logs = train(tiny, tmp_path / "offload", "--deepspeed", offload_config, "--teacher_deepspeed", "zero3_offload",
                 processes=2, batch_size=2)
    assert sources(logs) == reference_sources
    assert_same_weights(tmp_path / "offload", reference_folder)


def test_seq_kd_with_sharded_weights_left_sharded(tiny, tmp_path, references):
    """seq_kd: the ZeRO-3 teacher generates too; --ds3_gather_for_generation false keeps both models sharded
    while generating (every process steps through the same forwards, one of them on a stand-in prompt)."""
    reference_folder, reference_sources = references("seq_kd", "--seq_kd", "true")
    assert any(teacher for _, teacher, _, _ in reference_sources) and a_process_goes_without(2, 1, seq_kd=True)
    logs = train(tiny, tmp_path / "seq_kd", "--seq_kd", "true", "--deepspeed", "zero3", "--teacher_deepspeed",
                 "zero3", "--ds3_gather_for_generation", "false", processes=2, batch_size=2)
    assert sources(logs) == reference_sources
    assert_same_weights(tmp_path / "seq_kd", reference_folder)


def test_lora_under_zero3_saves_the_merged_model(tiny, tmp_path, references):
    lora = ["--tuner_type", "lora", "--lora_rank", 4, "--learning_rate", "5"]
    reference_folder, reference_sources = references("lora", *lora)
    # the teacher whole in each process (loaded outside the student's ZeRO-3)
    logs = train(tiny, tmp_path / "lora", *lora, "--deepspeed", "zero3", "--teacher_deepspeed", "zero2",
                 processes=2, batch_size=2)
    assert sources(logs) == reference_sources
    # Plain names: the adapters merged in. At learning rate 5 the merged product B @ A carries the processes'
    # other order of summing gradients up to 6e-6 (weights up to 0.6), where an element near zero fails 1e-6.
    assert_same_weights(tmp_path / "lora", reference_folder, atol=1e-5)


def test_the_lora_students_base_teaches_under_zero3(tiny, tmp_path, references):
    """Self-distillation with the teacher the student's base (--teacher_model equal to --model with LoRA): the
    partitioned student runs with its adapters off for the teacher's forwards and seq_kd generations."""
    flags = ["--teacher_model", tiny / "student", "--tuner_type", "lora", "--lora_rank", 4, "--learning_rate", "5",
             "--seq_kd", "true"]
    reference_folder, reference_sources = references("self", *flags)
    assert any(teacher for _, teacher, _, _ in reference_sources)
    logs = train(tiny, tmp_path / "self", *flags, "--deepspeed", "zero3", processes=2, batch_size=2)
    assert sources(logs) == reference_sources
    assert_same_weights(tmp_path / "self", reference_folder)


def test_zero3_steps_equal_one_process_and_a_resumed_run_repeats_them(tiny, tmp_path, references):
    """DeepSpeed's own accumulation scaling (batch 1 x 2 accumulated) and generation with the weights gathered
    once; then, stopped after step 2 and resumed from its checkpoint (started by accelerate launch with
    examples/accelerate/deepspeed_zero3.yaml), the run ends where the uninterrupted one does."""
    reference_folder, reference_sources = references("plain")
    assert a_process_goes_without(1, 2)
    whole = train(tiny, tmp_path / "whole", "--deepspeed", "zero3", "--save_strategy", "steps", "--save_steps", 2,
                  processes=2, batch_size=1, accumulation=2)
    assert sources(whole) == reference_sources
    assert_same_weights(tmp_path / "whole", reference_folder)
    assert_reloads_and_generates(tmp_path / "whole")
    resumed = train(tiny, tmp_path / "resumed", "--resume_from_checkpoint", tmp_path / "whole" / "checkpoint-2",
                    batch_size=1, accumulation=2, accelerate_config="deepspeed_zero3.yaml")
    assert sources(resumed) == sources(whole)[2:]
    assert_same_weights(tmp_path / "resumed", tmp_path / "whole")
