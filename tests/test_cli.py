"""gkd-train as a user runs it: a subprocess on the tiny models."""

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, assert_refused_in_one_line, write_jsonl
from gkd.data import build_batch, load_examples
from gkd.losses import generalized_jsd_loss
from gkd.models import generation_config, stop_token_ids


def gkd_train(*flags, cwd=None):
    return subprocess.run([sys.executable, "-m", "gkd.cli.train", *map(str, flags)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def base_flags(tiny, output_dir, dataset=None):
    return ["--model", tiny / "student", "--teacher_model", tiny / "teacher",
            "--dataset", dataset or f"{tiny / 'data' / 'train.jsonl'}#32", "--output_dir", output_dir,
            "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2, "--max_completion_length", 12,
            "--learning_rate", "1e-3", "--logging_steps", 1, "--save_steps", 1, "--report_to", "none",
            "--disable_tqdm", "true", "--add_version", "false", "--gradient_checkpointing", "false"]


def log_history(checkpoint):
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


@pytest.mark.parametrize(
    "source_flags, source",
    [(["--lmbda", "0"], "dataset"), (["--lmbda", "1"], "student"), (["--lmbda", "0", "--seq_kd", "true"], "teacher")],
)
def test_each_source_trains_saves_and_reloads(tmp_path, tiny, source_flags, source):
    out = tmp_path / "out"
    dataset = f"{tiny / 'data' / 'train.jsonl'}#8"  # one step of 4 x 2 holds every row, in whatever order
    result = gkd_train(*base_flags(tiny, out, dataset), "--max_steps", 2, *source_flags)
    assert result.returncode == 0, result.stderr[-3000:]

    logs = [entry for entry in log_history(out / "checkpoint-2") if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry[f"samples_{source}"] == 8  # every sample of the step came from the expected source
        assert 0 <= entry["generation_share"] <= 1 and entry["tokens_per_second"] > 0
        assert entry["loss"] == pytest.approx(entry["jsd_loss"], abs=1e-4)  # --sft_alpha 0
        assert 0 < entry["completion_length"] <= (12 if source != "dataset" else 100)  # generation's bound
    if source == "dataset":
        # The first step's loss, computed here from the untouched models: the per-token generalized JSD
        # (beta 0.5) over all completion tokens of the 8 rows.
        tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
        stop_ids = stop_token_ids(tokenizer, generation_config(str(tiny / "student"), False))
        examples = load_examples([dataset], tokenizer, stop_ids, seed=42)
        batch = build_batch([e["prompt_ids"] for e in examples], [e["completion_ids"] for e in examples],
                            tokenizer.pad_token_id)
        with torch.no_grad():
            student_logits, teacher_logits = (
                AutoModelForCausalLM.from_pretrained(tiny / name)(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1, :320]
                for name in ("student", "teacher"))
        # ms-swift's loss temperature: the sampling --temperature, 0.9 by default
        expected = generalized_jsd_loss(student_logits, teacher_logits, batch["labels"][:, 1:], beta=0.5,
                                        temperature=0.9)
        assert logs[0]["loss"] == pytest.approx(expected.item(), abs=2e-4)

    before = load_file(tiny / "student" / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.parametrize("processes", [1, 2])
def test_resumed_run_repeats_the_uninterrupted_one(tmp_path, tiny, processes):
    def run(*flags):
        launcher = [] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29591"]
        command = [*(launcher or [sys.executable]), "-m", "gkd.cli.train", *map(str, flags)]
        return subprocess.run(command, capture_output=True, text=True, timeout=600)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ["--max_steps", 3, "--lmbda", 0.5, "--seed", 5, "--lr_scheduler_type", "constant"]
    assert run(*base_flags(tiny, straight), *flags).returncode == 0
    assert run(*base_flags(tiny, resumed), *flags).returncode == 0
    shutil.rmtree(resumed / "checkpoint-2")
    shutil.rmtree(resumed / "checkpoint-3")
    result = run(*base_flags(tiny, resumed), *flags, "--resume_from_checkpoint", resumed / "checkpoint-1")
    assert result.returncode == 0, result.stderr[-3000:]

    expected = [entry for entry in log_history(straight / "checkpoint-3") if "loss" in entry]
    got = [entry for entry in log_history(resumed / "checkpoint-3") if "loss" in entry]
    assert [entry["step"] for entry in got] == [1, 2, 3]
    for want, have in zip(expected, got):
        assert have["samples_student"] == want["samples_student"]
        assert have["completion_length"] == want["completion_length"]
        assert have["loss"] == pytest.approx(want["loss"], rel=1e-4)


def bad_runs(tiny, tmp_path):
    other_teacher = tmp_path / "other-teacher"
    shutil.copytree(tiny / "teacher", other_teacher)
    tokenizer = AutoTokenizer.from_pretrained(other_teacher)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other_teacher)
    bad_row = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "response": "r"}, {"text": "?"}])
    (tmp_path / "broken.jsonl").write_text('{"query": "q", "response": "r"}\n{"query": \n')
    prompt_only = tiny / "data" / "prompts.jsonl"
    (tmp_path / "unknown.yaml").write_text("lmbdaa: 0.5\n")
    return {
        "missing student": (["--model", tmp_path / "nope"], "--model"),
        "missing dataset": (["--dataset", tmp_path / "none.jsonl"], "no such file or folder"),
        "unknown row shape": (["--dataset", bad_row], "bad.jsonl:2: unknown row shape"),
        "bad json": (["--dataset", tmp_path / "broken.jsonl"], "broken.jsonl:2: bad JSON"),
        "prompt only with lmbda < 1": (["--dataset", prompt_only, "--lmbda", 0.5], "prompts.jsonl:1: the row has no"),
        "other tokenizer": (["--teacher_model", other_teacher], "tokenizer differs"),
        "beta out of range": (["--beta", 1.5], "--beta 1.5: must be in [0, 1]"),
        "unknown yaml key": (["--config", tmp_path / "unknown.yaml"], "unknown.yaml:1: unknown key 'lmbdaa'"),
        "bad choice": (["--tuner_type", "qlora"], "invalid choice: 'qlora'"),
        "warmup ratio and steps": (["--warmup_ratio", 0.05, "--warmup_steps", 2], "not together with --warmup_steps"),
        "report_to unknown": (["--report_to", "tensorboard", "nosuch"], "--report_to nosuch: not an integration"),
        "offloading the student as teacher": (["--teacher_model", tiny / "student", "--tuner_type", "lora",
                                               "--offload_teacher_model", "true"],
                                              "--offload_teacher_model true: the teacher is the student itself"),
        # refused by the trainer, after the run folder was made: it goes again
        "top-k past the vocabulary": (["--gkd_logits_topk", 100000], "--gkd_logits_topk 100000: must be at most"),
    }


def test_ms_swift_spellings_run_with_their_meaning(tmp_path, tiny):
    """--warmup_ratio as ms-swift (ceil(ratio x steps) warmup steps), --attn_impl sdpa, --report_to,
    --train_type and --top_k -1 (off)."""
    out = tmp_path / "out"
    result = gkd_train(*base_flags(tiny, out), "--max_steps", 3, "--lmbda", 0.5, "--warmup_ratio", 0.5,
                       "--lr_scheduler_type", "linear", "--attn_impl", "sdpa", "--report_to", "tensorboard",
                       "--train_type", "full", "--top_k", -1)
    assert result.returncode == 0, result.stderr[-3000:]
    rates = [entry["learning_rate"] for entry in log_history(out / "checkpoint-3") if "loss" in entry]
    # ceil(0.5 x 3) = 2 warmup steps, then linear decay: step k (from 1) runs at 1e-3 x (k-1)/2 while k-1 < 2,
    # then at 1e-3 x (3-(k-1))/(3-2). (int(0.5 x 3) = 1 warmup step would give 0, 1e-3, 5e-4.)
    assert rates == pytest.approx([0.0, 5e-4, 1e-3])


def test_bad_inputs_give_one_line_and_leave_nothing(tmp_path, tiny):
    cases = bad_runs(tiny, tmp_path)
    outputs = {name: tmp_path / f"out-{name.replace(' ', '-')}" for name in cases}
    assert_refused_in_one_line("gkd.cli.train", "gkd-train", {
        name: ([*base_flags(tiny, outputs[name]), "--max_steps", 1, *flags], expected)
        for name, (flags, expected) in cases.items()})
    assert not any(output.exists() for output in outputs.values())


def test_help_lists_gkd_flags_first():
    result = gkd_train("--help")
    assert result.returncode == 0
    text = result.stdout
    assert text.index("--lmbda") < text.index("--model STUDENT") or text.index("--lmbda") < text.index("--per_device")
    assert text.index("gkd:") < text.index("training (transformers TrainingArguments, ms-swift's defaults):")


def test_lora_saves_a_merged_plain_model(tmp_path, tiny):
    out = tmp_path / "lora"
    result = gkd_train(*base_flags(tiny, out), "--max_steps", 2, "--lmbda", 0.5, "--tuner_type", "lora",
                       "--lora_rank", 4, "--learning_rate", "5e-2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert not (out / "adapter_config.json").exists()
    before = load_file(tiny / "student" / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert sorted(after) == sorted(before)  # plain weight names, no lora_A / lora_B left
    assert any(not torch.equal(before[name], after[name]) for name in before)
    AutoModelForCausalLM.from_pretrained(out)


def test_on_policy_steps_do_not_depend_on_how_the_batch_is_split(tmp_path, tiny):
    """--lmbda 0.5, so steps hold student samples: 1 process x batch 4, 1 x batch 2 x accumulation 2,
    2 CPU processes (gloo) x batch 2, and 2 processes x batch 1 x accumulation 2 draw the same sources and
    the same student completions for the same global samples, and end on the same weights. The two-process
    runs start once as ms-swift users do (NPROC_PER_NODE=2 in front of the command), once under torchrun."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
                "-m", "gkd.cli.train"]
    single = [sys.executable, "-m", "gkd.cli.train"]
    like_swift = ["env", "NPROC_PER_NODE=2", "MASTER_PORT=29562", *single]
    # Plain SGD: Adam's normalisation would turn float rounding in near-zero gradients into visible steps.
    common = ["--max_steps", 3, "--seed", 3, "--optim", "sgd", "--learning_rate", "0.5", "--lmbda", 0.5,
              "--lr_scheduler_type", "constant", "--save_strategy", "no", "--temperature", 1.0]

    def run(prefix, name, batch_size, accumulation):
        flags = [*base_flags(tiny, tmp_path / name), *common, "--per_device_train_batch_size", batch_size,
                 "--gradient_accumulation_steps", accumulation]
        result = subprocess.run([*prefix, *map(str, flags)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        logs = [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("{'loss'")]
        counts = [(entry["samples_student"], entry["samples_dataset"], entry["completion_length"]) for entry in logs]
        return load_file(tmp_path / name / "model.safetensors"), counts

    reference, reference_counts = run(single, "one-4x1", 4, 1)
    assert all(student + dataset == 4 for student, dataset, _ in reference_counts)
    assert sum(student for student, _, _ in reference_counts) >= 3  # the steps do generate
    for prefix, name, batch_size, accumulation in ((single, "one-2x2", 2, 2), (like_swift, "two-2x1", 2, 1),
                                                    (torchrun, "two-1x2", 1, 2)):
        weights, counts = run(prefix, name, batch_size, accumulation)
        assert counts == reference_counts, name  # same sources, same completion lengths
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.parametrize("form", ["module", "script"])
def test_accelerate_launch_forms_one_group_of_processes(tmp_path, tiny, form):
    """accelerate launch --multi_gpu on a machine without GPUs starts torchrun-style processes that must
    form one gloo group: with dataset completions, 2 x batch 2 ends where 1 x batch 4 does."""
    target = ["--module", "gkd.cli.train"] if form == "module" else [shutil.which("gkd-train")]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", "29581", *target]
    common = ["--max_steps", 2, "--seed", 3, "--optim", "sgd", "--learning_rate", "0.5", "--lmbda", 0,
              "--lr_scheduler_type", "constant", "--save_strategy", "no", "--gradient_accumulation_steps", 1]
    for prefix, output_dir, batch_size in (([sys.executable, "-m", "gkd.cli.train"], tmp_path / "one", 4),
                                           (launch, tmp_path / "two", 2)):
        flags = [*base_flags(tiny, output_dir), *common, "--per_device_train_batch_size", batch_size]
        result = subprocess.run([*prefix, *map(str, flags)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("script", ["single_process", "multi_process", "lora", "two_step"])
def test_example_scripts_run(tmp_path, tiny, script):
    environment = {
        **os.environ, "STUDENT": str(tiny / "student"), "TEACHER": str(tiny / "teacher"), "MAX_STEPS": "2",
        "DATA": str(tiny / "data" / ("prompts.jsonl#8" if script == "two_step" else "train.jsonl")),
        "MAX_NEW_TOKENS": "8", "OUTPUT_DIR": str(tmp_path / "out"), "SAMPLES": str(tmp_path / "samples.jsonl"),
    }
    result = subprocess.run(["bash", f"examples/scripts/{script}.sh", "--save_steps", "2"], cwd=REPO,
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_folder,) = (tmp_path / "out").glob("v0-*")  # ms-swift's versioned layout
    AutoModelForCausalLM.from_pretrained(run_folder)


def test_versioned_runs_never_touch_an_earlier_one(tmp_path, tiny):
    """--add_version (ms-swift's default): each run in a new OUTPUT_DIR/vN-YYYYMMDD-HHMMSS; the second run
    leaves the first's files byte for byte; --resume_from_checkpoint true picks the newest run's last
    checkpoint and continues from its step."""
    out = tmp_path / "out"
    flags = base_flags(tiny, out)
    at = flags.index("--add_version")
    flags = flags[:at] + flags[at + 2:]  # the default: versioned
    assert gkd_train(*flags, "--max_steps", 1, "--lmbda", 0).returncode == 0
    (first,) = out.iterdir()
    snapshot = {path: path.read_bytes() for path in first.rglob("*") if path.is_file()}
    resumed = gkd_train(*flags, "--max_steps", 2, "--lmbda", 0, "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = sorted(out.iterdir(), key=lambda path: int(path.name[1:].split("-")[0]))
    assert [run.name.split("-")[0] for run in runs] == ["v0", "v1"]
    assert {path: path.read_bytes() for path in first.rglob("*") if path.is_file()} == snapshot
    assert [entry["step"] for entry in log_history(runs[1] / "checkpoint-2") if "loss" in entry] == [1, 2]
    assert json.loads((runs[1] / "args.json").read_text())["resume_from_checkpoint"] == "true"
