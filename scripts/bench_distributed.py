"""Step time and memory of the data-parallel and sharded backends, on 2 CPU processes, in one run.

Runs the real `gkd-train` (NPROC_PER_NODE=2, gloo, lmbda 0.5) once per backend on the same models and data,
and prints a table: the median of the per-step wall time gkd-train logs (the first steps, warm-up, left out)
and the peak resident memory of the largest training process. The models are random Llamas with the tiny
models' tokenizer, large enough for the weights to matter next to the Python runtime (student about 30M
parameters, teacher about 60M). DeepSpeed's CPU extensions are built once, before the first DeepSpeed run
is timed.

    python scripts/bench_distributed.py [--steps 8] [--backends ddp zero3 ...]
"""

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKENDS = {
    "DDP": [],
    "ZeRO-2": ["--deepspeed", "zero2"],
    "ZeRO-3": ["--deepspeed", "zero3"],
    "ZeRO-3 offload": ["--deepspeed", "zero3_offload"],  # DeepSpeed's CPU Adam (its optimizer offload needs it)
    "FSDP2": ["--fsdp", "full_shard auto_wrap"],
}


def build_llama(tokenizer_dir: Path, folder: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(flags: list[str], output_dir: Path) -> tuple[list[float], float]:
    """(per-step seconds, peak RSS in MiB of the largest process) of one 2-process gkd-train run."""
    # A child of its own, so that its RUSAGE_CHILDREN covers this run's processes alone.
    measure = ("import resource, subprocess, sys; "
               "result = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(result.stderr[-3000:] if result.returncode else ''); "
               "print(result.stdout); print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
               "sys.exit(result.returncode)")
    environment = {**os.environ, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", measure, sys.executable, "-m", "gkd.cli.train", *flags,
                             "--output_dir", str(output_dir)], capture_output=True, text=True, env=environment)
    if result.returncode:
        sys.exit(f"gkd-train failed:\n{result.stderr}")
    logs = [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("{'loss'")]
    peak = next(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("PEAK"))
    return [float(log["step_seconds"]) for log in logs], peak / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    args = parser.parse_args()
    tiny = REPO / "examples" / "tiny"
    if not (tiny / "student").is_dir():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py")], check=True)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        student = build_llama(tiny / "student", scratch / "student", hidden=384, layers=12)
        teacher = build_llama(tiny / "student", scratch / "teacher", hidden=512, layers=14)
        common = ["--model", str(student), "--teacher_model", str(teacher), "--dataset",
                  f"{tiny / 'data' / 'train.jsonl'}#64", "--max_steps", str(args.steps), "--lmbda", "0.5",
                  "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                  "--max_completion_length", "24", "--torch_dtype", "float32", "--logging_steps", "1",
                  "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--add_version", "false",
                  "--gradient_checkpointing", "false", "--seed", "0"]
        # DeepSpeed builds its CPU extensions (communication, CPU Adam) on first use: not part of a step.
        if any(flags[:1] == ["--deepspeed"] for name, flags in BACKENDS.items() if name in args.backends):
            run([*common, "--max_steps", "1", "--deepspeed", "zero3_offload"], scratch / "warm-up")
        rows = []
        for name in args.backends:
            seconds, peak = run([*common, *BACKENDS[name]], scratch / name.replace(" ", "-"))
            rows.append((name, statistics.median(seconds[args.warmup:]), peak))
            print(json.dumps({"backend": name, "step_seconds": seconds, "peak_mib": round(peak)}), flush=True)
    reference = rows[0][1]
    print(f"\n2 CPU processes (gloo), student 30M / teacher 60M random Llamas, lmbda 0.5, batch 2 per process, "
          f"{args.steps} steps (median of steps {args.warmup + 1}-{args.steps})\n")
    print(f"| backend | median step (s) | vs {rows[0][0]} | peak RSS per process (MiB) |")
    print("|---|---|---|---|")
    for name, median, peak in rows:
        print(f"| {name} | {median:.3f} | {median / reference:.2f}x | {peak:.0f} |")


if __name__ == "__main__":
    main()
