"""The toy distillation benchmark: does on-policy GKD beat supervised KD on tasks a laptop can run?

For each task (tasks.py): write train/test data in gkd's format, train a teacher (4 layers x 128) and
briefly a student (2 layers x 64) with plain supervised training, then distil with the real `gkd-train`
over a grid of lmbda x beta (and seq_kd once), equal steps and batch, for each seed, and score every
result (evaluate.py). Writes results.json, results.md and curves.png into --output_dir.

    python examples/toy/run.py --quick       # walk: supervised KD against on-policy, one seed (make demo)
    python examples/toy/run.py --effect      # the same on three seeds
    python examples/toy/run.py               # three tasks, lmbda 0/0.5/1 x beta 0/0.5/1 + seq_kd, 2 seeds
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))  # the tiny models' tokenizer, model shapes and training loop
import make_tiny_models as tiny  # noqa: E402

from evaluate import evaluate, score  # noqa: E402
from tasks import TASKS, make_splits, to_row  # noqa: E402

# Supervised training of the two models at batch 64, learning rate 2e-3. The student's warm-up is checked
# every CHECK_EVERY steps and stops when its greedy score on 100 of its training problems reaches its target
# (at most student_steps): these tasks are learnt in a sudden jump whose timing depends on the seed, so a
# fixed step count leaves one seed's student at 0% and another's at 97%.
TRAINING = {
    "addition": {"teacher_steps": 1200, "student_steps": 1500, "student_target": 0.25},
    "permutation": {"teacher_steps": 600, "student_steps": 600, "student_target": 0.5},
    "permutation_undo": {"teacher_steps": 600, "student_steps": 600, "student_target": 0.5},
    "running_sum": {"teacher_steps": 1200, "student_steps": 600, "student_target": 0.3},
    "navigation": {"teacher_steps": 1000, "student_steps": 1500, "student_target": 0.5},
    "walk": {"teacher_steps": 400, "student_steps": 1500, "student_target": 0.5},
}
CHECK_EVERY = 25
CELL_WORKERS = 2  # cells trained side by side (see run)
LOADING = threading.Lock()  # from_pretrained sets process-wide defaults while it loads: one at a time
N_TRAIN, N_TEST = 20000, 300
# The on-policy effect (README): walk, supervised KD against on-policy distillation, each at the beta and
# learning rate that served it best in the README's sweep (beta 1 for both; 3e-3 and 1e-3), 1200 steps.
# Its headline score, which the learning curves follow and the gain column compares, is sampled validity:
# greedy answers are all right from the first checkpoint on.
EFFECT = dict(tasks=["walk"], lmbdas=[0.0, 1.0], betas=[1.0], seq_kd=False, dart=False, seeds=[0, 1, 2],
              steps=1200, learning_rate={0.0: 3e-3, 1.0: 1e-3}, headline="sampled")
QUICK = {**EFFECT, "seeds": [0]}
# The TRL-parity grid; navigation, permutation_undo and walk (the README's on-policy attempts) run when asked.
FULL = dict(tasks=["addition", "permutation", "running_sum"], lmbdas=[0.0, 0.5, 1.0], betas=[0.0, 0.5, 1.0],
            seq_kd=True, dart=False, seeds=[0, 1], steps=300, learning_rate=1e-3, headline="greedy")
# Distillation, the same in every cell (the TRL measurements used batch 32, lr 1e-3, temperature 1;
# the learning rate is the plan's, 1e-3 unless --learning_rate says otherwise).
# The students' own recipe (10% warm-up, cosine decay, weight decay 0.1): with a constant rate the
# students gained little in a few hundred steps, and plain supervised training fared the same.
DISTIL_FLAGS = ["--per_device_train_batch_size", "32", "--lr_scheduler_type",
                "cosine", "--temperature", "1.0", "--weight_decay", "0.1",
                # the recipe behind the README's table, pinned where gkd-train now takes ms-swift's defaults
                "--adam_beta2", "0.999", "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "false",
                "--add_version", "false"]


def encode(tokenizer, task, problem, answer_prefix: str, answer: str):
    """(prompt ids, completion ids): the loss falls on the completion only. A non-empty answer_prefix
    (a mistake to recover from) goes into the prompt side, so the teacher never learns to make it."""
    messages = [{"role": "user", "content": task.prompt(problem)}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + answer_prefix
    return (tokenizer.encode(prompt, add_special_tokens=False),
            tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id])


def task_tokenizer(task):
    """The tiny models' byte tokenizer, with the task's chat template where it has its own."""
    return tiny.build_tokenizer(chat_template=task.chat_template or tiny.CHAT_TEMPLATE)


def build_student(task, tokenizer, seed: int):
    """The student shape; a task with a student_window gets the same shape as a Mistral model whose
    attention looks back only that many tokens (transformers' sliding-window attention)."""
    if task.student_window is None:
        return tiny.build_model(tiny.STUDENT_SHAPE, tokenizer, seed)
    shape = tiny.llama_config(tiny.STUDENT_SHAPE, tokenizer)
    config = MistralConfig(
        vocab_size=shape.vocab_size, max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=shape.eos_token_id,
        pad_token_id=shape.pad_token_id, initializer_range=shape.initializer_range,
        sliding_window=task.student_window, **tiny.STUDENT_SHAPE)
    torch.manual_seed(seed)
    model = MistralForCausalLM(config)
    model.generation_config = tiny.generation_config(tokenizer)
    return model


def build_task(task, folder: Path, seed: int, budget: dict, n_test: int) -> list:
    """Data and teacher (shared by all seeds) and the starting student of `seed`, built into `folder` once
    (reused when present). Returns the held-out test problems."""
    train, test = make_splits(task, 0, N_TRAIN, n_test)
    student_path = folder / f"student-seed{seed}"
    if (folder / "teacher" / "model.safetensors").exists() and (student_path / "model.safetensors").exists():
        return test  # nothing to train: skip encoding the training set
    tokenizer = task_tokenizer(task)
    rng = random.Random(0)
    answers = [task.reference(problem, rng) for problem in train]
    clean = [encode(tokenizer, task, problem, "", answer) for problem, answer in zip(train, answers)]
    if not (folder / "teacher" / "model.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.jsonl").write_text("".join(json.dumps(to_row(task, problem, answer)) + "\n"
                                                    for problem, answer in zip(train, answers)))
        mistakes = [(problem, prefix, rest) for problem in train
                    for prefix, rest in task.recovery_examples(problem, rng)]
        recovery = [encode(tokenizer, task, problem, prefix, rest) for problem, prefix, rest in mistakes]
        if mistakes:  # the DART control's rows: the clean ones, and the mistakes with their recoveries as answers
            (folder / "train_noisy.jsonl").write_text("".join(
                json.dumps(to_row(task, problem, answer)) + "\n" for problem, answer in
                [*zip(train, answers), *((problem, prefix + rest) for problem, prefix, rest in mistakes)]))
        started = time.perf_counter()
        teacher = tiny.build_model(tiny.TEACHER_SHAPE, tokenizer, 0)
        tiny.train(teacher, clean + recovery, budget["teacher_steps"], 64, 2e-3, 0, tokenizer.pad_token_id, 0,
                   "teacher")
        save(teacher, tokenizer, folder / "teacher")
        print(f"  {task.name} teacher: {budget['teacher_steps']} steps in {time.perf_counter() - started:.0f} s",
              flush=True)
    if not (student_path / "model.safetensors").exists():
        warm_up_student(tokenizer, task, clean, train[-100:], budget, seed, student_path)
    return test


def warm_up_student(tokenizer, task, examples, check_problems, budget: dict, seed: int, path: Path) -> None:
    """One supervised run (AdamW, constant learning rate, no restarts) stopped as soon as the greedy score on
    check_problems, taken every CHECK_EVERY steps, reaches the task's target (or at student_steps): the
    same start for every cell, and one whose optimizer never restarted."""
    started, steps, greedy = time.perf_counter(), 0, 0.0
    model = build_student(task, tokenizer, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), weight_decay=0.1)
    rng, order = random.Random(seed), []
    while steps < budget["student_steps"] and greedy < budget["student_target"]:
        model.train()
        for _ in range(CHECK_EVERY):
            if len(order) < 64:  # a new epoch: a new permutation
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch = [examples[order.pop()] for _ in range(64)]
            model(**tiny.make_batch(batch, tokenizer.pad_token_id)).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps += CHECK_EVERY
        greedy = score(model, tokenizer, task, check_problems, 0.0, seed)
    save(model, tokenizer, path)
    print(f"  {task.name} student (seed {seed}): {steps} steps to {greedy:.0%} in "
          f"{time.perf_counter() - started:.0f} s", flush=True)


def save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def distil(folder: Path, output_dir: Path, cell: tuple, seed: int, plan: dict, max_completion_length: int,
           threads: int):
    """cell: (lmbda, beta, variant). variant "": the dataset's answers where lmbda does not sample;
    "seq_kd": the teacher's samples; "dart": the dataset with the teacher's training mistakes and their
    recoveries, supervised KD that sees the states after a mistake without sampling from the student (the
    DART control). threads: the process's torch threads. The tokenized rows are cached (ms-swift's
    --load_from_cache_file, in run's datasets cache): every cell reads the same training file."""
    lmbda, beta, variant = cell
    steps = plan["steps"]
    dataset = folder / ("train_noisy.jsonl" if variant == "dart" else "train.jsonl")
    command = [sys.executable, "-m", "gkd.cli.train", "--model", str(folder / f"student-seed{seed}"),
               "--teacher_model", str(folder / "teacher"), "--dataset", str(dataset),
               "--output_dir", str(output_dir), "--overwrite_output_dir", "true", "--lmbda", str(lmbda),
               "--beta", str(beta), "--seq_kd", str(variant == "seq_kd").lower(), "--max_steps", str(steps),
               "--seed", str(seed), "--learning_rate", str(learning_rate(plan, lmbda)),
               "--warmup_steps", str(steps // 10),
               "--max_completion_length", str(max_completion_length), "--save_steps", str(max(steps // 4, 1)),
               "--save_only_model", "true", "--load_from_cache_file", "true",
               "--logging_steps", str(steps), "--report_to", "none", "--disable_tqdm", "true", *DISTIL_FLAGS]
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if result.returncode != 0:
        sys.exit(f"gkd-train failed ({' '.join(command)}):\n{result.stderr[-3000:]}")


def learning_rate(plan: dict, lmbda: float) -> float:
    """The plan's learning rate: one for every cell, or one per lmbda."""
    rates = plan["learning_rate"]
    return rates if isinstance(rates, (int, float)) else rates[lmbda]


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def summarise(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def cell_name(lmbda, beta, variant):
    return f"lmbda {lmbda:g}, beta {beta:g}" + (f", {variant}" if variant else "")


def run(plan: dict, output_dir: Path) -> dict:
    """Builds each task's models (using every core), then runs the cells on CELL_WORKERS workers of
    cpu_count / CELL_WORKERS threads each, the longest (on-policy) first: the tiny models keep two cores
    only half busy, and two single-thread cells side by side took about what the longer took alone."""
    cores = os.cpu_count() or 1
    workers = min(CELL_WORKERS, cores)
    results = {"plan": plan, "tasks": {}}
    # gkd-train caches the tokenized rows there (--load_from_cache_file): inside the output, not the user's cache
    os.environ["HF_DATASETS_CACHE"] = str(output_dir / "datasets-cache")
    jobs = []
    torch.set_num_threads(cores)
    for task_name in plan["tasks"]:
        task = TASKS[task_name]
        cells = [(lmbda, beta, "") for lmbda in plan["lmbdas"] for beta in plan["betas"]]
        if plan["seq_kd"]:
            cells.append((0.0, 0.5, "seq_kd"))
        entry = results["tasks"][task_name] = {"metric": task.metric, "start": {}, "teacher": {}, "cells": {}}
        folder = output_dir / "models" / task_name
        for seed in plan["seeds"]:
            budget = {**TRAINING[task_name], **plan["training"]}
            test = build_task(task, folder, seed, budget, plan["n_test"])
            tokenizer = AutoTokenizer.from_pretrained(folder / "teacher")
            teacher = load(folder / "teacher")
            student = load(folder / f"student-seed{seed}")
            entry["teacher"][seed] = evaluate(teacher, teacher, tokenizer, task, test, seed)
            entry["start"][seed] = evaluate(student, teacher, tokenizer, task, test, seed)
            print(f"{task_name} seed {seed}: teacher {entry['teacher'][seed]['greedy']:.3f}, "
                  f"start {entry['start'][seed]['greedy']:.3f}", flush=True)
            with_mistakes = (folder / "train_noisy.jsonl").exists()
            dart = [(0.0, beta, "dart") for beta in plan["betas"]] if plan["dart"] and with_mistakes else []
            start_on_curve = on_curve(student, tokenizer, task, test, seed, plan)
            for cell in cells + dart:
                entry["cells"].setdefault(cell_name(*cell), {})  # the table's row order: the plan's
                jobs.append(Job(task, seed, cell, test, start_on_curve, tokenizer, teacher))
    jobs.sort(key=lambda job: -job.cell[0])  # on-policy cells (lmbda 1) sample as they train: the longest first
    threads = cores // workers
    torch.set_num_threads(threads)  # this process scores a cell in each worker's thread
    pool = ThreadPoolExecutor(workers)
    try:
        for job, scores in zip(jobs, pool.map(lambda job: run_cell(job, plan, output_dir, threads), jobs)):
            results["tasks"][job.task.name]["cells"][cell_name(*job.cell)][job.seed] = scores
    finally:  # a failed cell stops the run: the cells not started yet never start
        pool.shutdown(cancel_futures=True)
    return results


class Job(NamedTuple):
    """One cell on one seed, with what its scoring shares with the seed's other cells (the teacher is only
    read, so the workers' threads can share it)."""
    task: object
    seed: int
    cell: tuple  # (lmbda, beta, variant)
    test: list  # the seed's held-out problems
    start_on_curve: float  # the starting student's point on the learning curve
    tokenizer: object
    teacher: object


def run_cell(job: Job, plan: dict, output_dir: Path, threads: int) -> dict:
    """gkd-train in a process of `threads` threads, then the cell's scores and learning curve."""
    task, seed, name = job.task, job.seed, cell_name(*job.cell)
    folder = output_dir / "models" / task.name
    run_dir = output_dir / "runs" / task.name / f"seed{seed}" / name.replace(", ", "_").replace(" ", "")
    started = time.perf_counter()
    # 24 new tokens, or a longer task's whole answer (navigation's 26)
    distil(folder, run_dir, job.cell, seed, plan, max(24, task.max_new_tokens), threads)
    with LOADING:
        model = load(run_dir)
    scores = evaluate(model, job.teacher, job.tokenizer, task, job.test, seed)
    curve = [(0, job.start_on_curve)]
    for checkpoint in sorted(run_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1])):
        with LOADING:
            model = load(checkpoint)
        curve.append((int(checkpoint.name.split("-")[1]), on_curve(model, job.tokenizer, task, job.test, seed, plan)))
    scores["curve"] = curve
    scores["seconds"] = round(time.perf_counter() - started, 1)
    print(f"  {task.name} seed {seed}, {name}: {json.dumps({k: v for k, v in scores.items() if k != 'curve'})}",
          flush=True)
    return scores


def on_curve(model, tokenizer, task, test, seed: int, plan: dict) -> float:
    """A point of the learning curve: the plan's headline score (greedy or sampled) on the first 100 test
    prompts throughout (the final model's point is on the same 100, not the table's full test set)."""
    return score(model, tokenizer, task, test[:100], 1.0 if plan["headline"] == "sampled" else 0.0, seed)


def relative_gain(entry, name, metric: str):
    """(cell - start) / (supervised KD with the same beta - start), over seeds' means."""
    beta = name.split("beta ")[1].split(",")[0]
    supervised = entry["cells"].get(f"lmbda 0, beta {beta}")
    if supervised is None:
        return None
    start = statistics.mean(scores[metric] for scores in entry["start"].values())
    cell = statistics.mean(scores[metric] for scores in entry["cells"][name].values())
    baseline = statistics.mean(scores[metric] for scores in supervised.values())
    # A ratio of gains means something only when supervised KD gained.
    return (cell - start) / (baseline - start) if baseline - start > 0.005 else None


def error_ratio(entry, mode: str) -> str | None:
    """The issue's yardstick: errors (100% - score, mean over seeds) of the best on-policy cell (lmbda 1, any
    beta) against the best supervised KD cell (lmbda 0, any beta), under greedy or sampled decoding."""
    def best(lmbda):
        cells = {name: statistics.mean(scores[mode] for scores in per_seed.values())
                 for name, per_seed in entry["cells"].items() if name.startswith(f"lmbda {lmbda},")
                 and name.count(",") == 1}  # not seq_kd's or DART's
        return max(cells.items(), key=lambda item: item[1]) if cells else None

    supervised, on_policy = best(0), best(1)
    if supervised is None or on_policy is None:
        return None
    errors = [100 * (1 - value) for _, value in (supervised, on_policy)]
    ratio = f"{errors[1] / errors[0]:.2f}x" if errors[0] > 0 else "-"
    return (f"{mode}: on-policy errors {errors[1]:.1f}% ({on_policy[0]}) against supervised KD's {errors[0]:.1f}% "
            f"({supervised[0]}): ratio {ratio}")


def report(results: dict, output_dir: Path, seconds: float) -> str:
    lines = [f"Toy distillation benchmark ({len(results['plan']['seeds'])} seed(s), {results['plan']['steps']} "
             f"steps per cell, {seconds / 60:.1f} min on {os.cpu_count()} CPUs). Scores in %: mean ± spread "
             "over seeds; greedy / sampled at temperature 1."]
    headline = results["plan"]["headline"]
    for task_name, entry in results["tasks"].items():
        extra = " | diversity" if entry["metric"] == "valid" else ""
        metric = {"exact": "exact match", "valid": "validity", "success": "goal reached"}[entry["metric"]]
        lines += ["", f"### {task_name} ({metric})", "",
                  f"| model | greedy | sampled{extra} | teacher log-prob / token | "
                  f"gain vs supervised KD ({headline}) |",
                  "|---|---|---|---|---|" + ("---|" if extra else "")]
        rows = [("teacher", entry["teacher"]), ("start (student)", entry["start"])] + list(entry["cells"].items())
        for name, per_seed in rows:
            values = list(per_seed.values())
            diversity = f" | {summarise([v['diversity'] for v in values])}" if extra else ""
            gain = relative_gain(entry, name, headline) if name.startswith("lmbda") else None
            lines.append(f"| {name} | {summarise([v['greedy'] for v in values])} | "
                         f"{summarise([v['sampled'] for v in values])}{diversity} | "
                         f"{statistics.mean(v['teacher_logprob'] for v in values):.3f} | "
                         f"{'-' if gain is None else f'{gain:.2f}x'} |")
        ratios = [line for line in (error_ratio(entry, mode) for mode in ("greedy", "sampled")) if line]
        lines += [""] + [f"- {line}" for line in ratios] if ratios else []
    text = "\n".join(lines) + "\n"
    (output_dir / "results.md").write_text(text)
    (output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, output_dir / "curves.png")
    return text


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"].items())
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for axis, (task_name, entry) in zip(axes[0], tasks):
        for name, per_seed in entry["cells"].items():
            curves = [scores["curve"] for scores in per_seed.values()]
            steps = [step for step, _ in curves[0]]
            mean = [statistics.mean(curve[index][1] for curve in curves) for index in range(len(steps))]
            style = {"0": ":", "0.5": "--", "1": "-"}[name.split("lmbda ")[1].split(",")[0]]
            axis.plot(steps, [100 * value for value in mean], style, label=name)
        axis.set_title(task_name)
        axis.set_xlabel("distillation steps")
        axis.set_ylabel(f"{results['plan']['headline']} score, %")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    transformers.utils.logging.set_verbosity_error()  # no per-load progress bars and notices in the report
    transformers.utils.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plans = parser.add_mutually_exclusive_group()
    plans.add_argument("--quick", action="store_true", help="the on-policy effect on one seed (make demo)")
    plans.add_argument("--effect", action="store_true", help="the on-policy effect on three seeds")
    parser.add_argument("--output_dir", type=Path, default=REPO / "output" / "toy")
    parser.add_argument("--steps", type=int, help="distillation steps per cell (default: the plan's)")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), help="only these tasks")
    parser.add_argument("--lmbdas", nargs="+", type=float, help="the grid's lmbda values")
    parser.add_argument("--betas", nargs="+", type=float, help="the grid's beta values")
    parser.add_argument("--seeds", nargs="+", type=int, help="the students' seeds")
    parser.add_argument("--learning_rate", type=float, help="distillation's peak learning rate for every cell "
                        "(default: the plan's)")
    parser.add_argument("--dart", action="store_true", help="also supervised KD (lmbda 0) on the teacher's "
                        "training mistakes and recoveries, at each beta (the DART control; tasks with mistakes)")
    parser.add_argument("--teacher_steps", type=int, help="override every task's teacher training steps")
    parser.add_argument("--student_steps", type=int, help="override every task's most student training steps")
    parser.add_argument("--n_test", type=int, default=N_TEST, help="held-out prompts per task")
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else EFFECT if args.effect else FULL)
    plan["steps"] = args.steps or plan["steps"]
    for key in ("tasks", "lmbdas", "betas", "seeds"):
        plan[key] = getattr(args, key) or plan[key]
    plan["learning_rate"] = args.learning_rate or plan["learning_rate"]
    plan["dart"] = args.dart or plan["dart"]
    plan["n_test"] = args.n_test
    plan["training"] = {f"{role}_steps": getattr(args, f"{role}_steps") for role in ("teacher", "student")
                        if getattr(args, f"{role}_steps") is not None}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run(plan, args.output_dir)
    print(report(results, args.output_dir, time.perf_counter() - started))
    print(f"wrote {args.output_dir / 'results.md'}, results.json and curves.png")


if __name__ == "__main__":
    main()
