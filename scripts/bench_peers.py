"""gkd-train beside TRL's GKDTrainer (and ms-swift's `swift rlhf --rlhf_type gkd` where it is installed), at
equal settings, in one run: training-loop time (each Trainer's train_runtime) and the process's peak memory.

The models are the tiny student and teacher of scripts/make_tiny_models.py with their output layers grown to
--vocab rows (so that the vocabulary costs what a real one's does); the data is their train.jsonl. Settings:
lmbda 0.5, beta 0.5, temperature 0.9, 32 new tokens, max_length 256, batch 4, accumulation 1, no gradient
checkpointing, float32, --steps steps, each tool with its own defaults otherwise (optimizer, learning rate).

    python scripts/bench_peers.py [--tiny_dir examples/tiny] [--vocab 32000] [--steps 40] [--repeats 2]

TRL: `pip install trl` (its GKDTrainer lives in trl.experimental.gkd since TRL 1.0). ms-swift: `pip install
ms-swift`; a row says "not installed" otherwise. gkd's row also gives the share of its step spent
generating (its own generation_share log). gkd runs twice: as it is by default, and with --async_generate
(each sampling call also writes the next step's student samples, one optimizer step off-policy).
"""

import argparse
import functools
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(lmbda=0.5, beta=0.5, temperature=0.9, max_new_tokens=32, max_length=256, batch_size=4)

# TRL's GKDTrainer on the same models, data and settings; prints its train_runtime as JSON.
TRL_DRIVER = """
import json, sys
import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.gkd import GKDConfig, GKDTrainer

student, teacher, data, output, steps, lmbda, beta, temperature, new_tokens, max_length, batch = sys.argv[1:]
tokenizer = AutoTokenizer.from_pretrained(student)
args = GKDConfig(output_dir=output, lmbda=float(lmbda), beta=float(beta), temperature=float(temperature),
                 max_new_tokens=int(new_tokens), max_length=int(max_length), per_device_train_batch_size=int(batch),
                 gradient_accumulation_steps=1, gradient_checkpointing=False, max_steps=int(steps), report_to="none",
                 save_strategy="no", logging_steps=int(steps), use_cpu=True, disable_tqdm=True)
trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
                     teacher_model=AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32), args=args,
                     train_dataset=load_dataset("json", data_files=data, split="train"), processing_class=tokenizer)
print(json.dumps({"train_runtime": trainer.train().metrics["train_runtime"]}))
"""


def grown_models(tiny: Path, vocab: int, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("student", "teacher"):
        model = AutoModelForCausalLM.from_pretrained(tiny / name, dtype=torch.float32)
        torch.manual_seed(0)
        model.resize_token_embeddings(vocab, mean_resizing=False)
        model.save_pretrained(folder / name)
        AutoTokenizer.from_pretrained(tiny / name).save_pretrained(folder / name)
    return folder


def measured(command: list[str]) -> tuple[str, float]:
    """The command's output, and its peak resident memory in MiB."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(command[:4])} failed:\n{output[-3000:]}")
    return output, usage.ru_maxrss / 1024


def gkd_command(models: Path, data: Path, output: Path, steps: int, *, lmbda: float = SETTINGS["lmbda"],
                logging_steps: int | None = None, flags: tuple[str, ...] = ()) -> list[str]:
    """gkd-train at the comparison's settings (logging once, at the end, unless logging_steps says)."""
    return [sys.executable, "-m", "gkd.cli.train", "--model", str(models / "student"), "--teacher_model",
            str(models / "teacher"), "--dataset", str(data), "--output_dir", str(output), "--add_version", "false",
            "--lmbda", str(lmbda), "--beta", str(SETTINGS["beta"]), "--temperature", str(SETTINGS["temperature"]),
            "--max_completion_length", str(SETTINGS["max_new_tokens"]), "--max_length", str(SETTINGS["max_length"]),
            "--per_device_train_batch_size", str(SETTINGS["batch_size"]), "--gradient_accumulation_steps", "1",
            "--gradient_checkpointing", "false", "--max_steps", str(steps), "--logging_steps",
            str(logging_steps or steps), "--torch_dtype", "float32", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "true", *flags]


def run_gkd(models: Path, data: Path, output: Path, steps: int, flags: tuple[str, ...] = ()) -> dict:
    command = gkd_command(models, data, output, steps, flags=flags)
    _, peak = measured(command)
    logs = [json.loads(line) for line in (output / "logging.jsonl").read_text().splitlines()]
    runtime = next(float(line["train_runtime"]) for line in logs if "train_runtime" in line)
    share = next(float(line["generation_share"]) for line in logs if "generation_share" in line)
    return {"loop": runtime, "peak": peak, "share": share}


def run_trl(models: Path, data: Path, output: Path, steps: int) -> dict:
    arguments = [str(models / "student"), str(models / "teacher"), str(data), str(output), str(steps),
                 *(str(SETTINGS[name]) for name in ("lmbda", "beta", "temperature", "max_new_tokens", "max_length",
                                                    "batch_size"))]
    text, peak = measured([sys.executable, "-c", TRL_DRIVER, *arguments])
    runtime = json.loads(next(line for line in text.splitlines() if line.startswith('{"train_runtime"')))
    return {"loop": runtime["train_runtime"], "peak": peak}


def run_swift(models: Path, data: Path, output: Path, steps: int) -> dict:
    command = ["swift", "rlhf", "--rlhf_type", "gkd", "--model", str(models / "student"), "--teacher_model",
               str(models / "teacher"), "--dataset", str(data), "--output_dir", str(output), "--lmbda",
               str(SETTINGS["lmbda"]), "--beta", str(SETTINGS["beta"]), "--temperature", str(SETTINGS["temperature"]),
               "--max_completion_length", str(SETTINGS["max_new_tokens"]), "--max_length", str(SETTINGS["max_length"]),
               "--per_device_train_batch_size", str(SETTINGS["batch_size"]), "--gradient_accumulation_steps", "1",
               "--gradient_checkpointing", "false", "--max_steps", str(steps), "--torch_dtype", "float32",
               "--report_to", "none", "--save_strategy", "no", "--logging_steps", str(steps),
               # ms-swift names the tiny Llamas' architecture and ChatML template itself (gkd reads both from
               # the checkpoint)
               "--model_type", "llama", "--teacher_model_type", "llama", "--template", "chatml"]
    text, peak = measured(command)
    runtime = next(float(line.split("'train_runtime': ")[1].split(",")[0].strip("'"))
                   for line in text.splitlines() if "'train_runtime': " in line)
    return {"loop": runtime, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny_dir", type=Path, default=REPO / "examples" / "tiny")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool, alternating; medians reported")
    args = parser.parse_args()
    if not (args.tiny_dir / "student").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), "--output_dir",
                        str(args.tiny_dir)], check=True)
    tools = {"gkd": run_gkd, "gkd --async_generate true": functools.partial(run_gkd, flags=("--async_generate", "true"))}
    absent = []
    for name, runner, present in (("TRL GKDTrainer", run_trl, importlib.util.find_spec("trl") is not None),
                                  ("ms-swift `swift rlhf --rlhf_type gkd`", run_swift, shutil.which("swift"))):
        if present:
            tools[name] = runner
        else:
            absent.append(name)
    with tempfile.TemporaryDirectory() as scratch:
        models = grown_models(args.tiny_dir, args.vocab, Path(scratch) / "models")
        results = {name: [] for name in tools}
        for repeat in range(args.repeats):
            for number, (name, runner) in enumerate(tools.items()):
                output = Path(scratch) / f"{repeat}-{number}"
                results[name].append(runner(models, args.tiny_dir / "data" / "train.jsonl", output, args.steps))

    print(f"\nvocabulary {args.vocab}, lmbda 0.5, beta 0.5, temperature 0.9, 32 new tokens, max_length 256, batch 4, "
          f"{args.steps} steps, {os.cpu_count()} CPUs; median of {args.repeats} runs each")
    print("| tool | loop s | peak MiB | gkd's generation share |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        share = f"{statistics.median(run['share'] for run in runs):.0%}" if "share" in runs[0] else "-"
        print(f"| {name} | {statistics.median(run['loop'] for run in runs):.1f} | "
              f"{statistics.median(run['peak'] for run in runs):.0f} | {share} |")
    for name in absent:
        print(f"| {name} | not installed | - | - |")


if __name__ == "__main__":
    main()
