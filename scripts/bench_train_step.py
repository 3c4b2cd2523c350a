"""Time one gkd-train optimizer step per completion source, and the peak memory of each run.

Runs the real `gkd-train` as a subprocess on the tiny models (scripts/make_tiny_models.py), once per
source, and reads the per-step wall time that gkd-train logs (`step_seconds`, logging every step).
The first step (warm-up) is left out of the median. Peak memory is the child's maximum resident set.

    python scripts/bench_train_step.py [--tiny_dir examples/tiny] [--steps 12] [--batch_size 8] [-- GKD_FLAGS]
"""

import argparse
import ast
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = {
    "dataset": ["--lmbda", "0"],
    "student": ["--lmbda", "1"],
    "teacher": ["--lmbda", "0", "--seq_kd", "true"],
}


def run(tiny: Path, source_flags: list[str], args, output_dir: Path) -> tuple[list[dict], float]:
    command = [
        sys.executable, "-m", "gkd.cli.train",
        "--model", str(tiny / "student"), "--teacher_model", str(tiny / "teacher"),
        "--dataset", str(tiny / "data" / "train.jsonl"), "--output_dir", str(output_dir),
        "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
        "--max_completion_length", str(args.max_completion_length), "--logging_steps", "1",
        "--save_strategy", "no", "--report_to", "none",
        # one micro-batch per step, no recomputation: the workload the README's tables measure
        "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "false", "--add_version", "false", "--disable_tqdm", "true", "--seed", "0",
        *source_flags, *args.gkd_flags,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"gkd-train failed:\n{output[-3000:]}")
    logs = [ast.literal_eval(line) for line in output.splitlines() if line.startswith("{'loss'")]
    return logs, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny_dir", type=Path, default=REPO / "examples" / "tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=24)
    parser.add_argument("gkd_flags", nargs=argparse.REMAINDER,
                        help="more gkd-train flags after --, e.g. -- --loss_impl exact")
    args = parser.parse_args()
    args.gkd_flags = [flag for flag in args.gkd_flags if flag != "--"]
    if not (args.tiny_dir / "student").is_dir():
        sys.exit(f"{args.tiny_dir}: no tiny models; run python scripts/make_tiny_models.py first")

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for source, flags in SOURCES.items():
            logs, peak_mib = run(args.tiny_dir, flags, args, Path(scratch) / source)
            step_seconds = [float(entry["step_seconds"]) for entry in logs[1:]]
            lengths = [float(entry["completion_length"]) for entry in logs]
            shares = [float(entry["generation_share"]) for entry in logs[1:]]
            rows.append((source, statistics.median(step_seconds), min(step_seconds), max(step_seconds),
                         statistics.median(shares), statistics.mean(lengths), peak_mib))

    print(f"tiny models, batch {args.batch_size}, {args.steps} steps (median over steps 2..{args.steps}), "
          f"max_completion_length {args.max_completion_length}, {os.cpu_count()} CPUs "
          f"{' '.join(args.gkd_flags)}")
    print("| source | median step s | min | max | generating | completion tokens | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for source, median, low, high, share, length, peak in rows:
        print(f"| {source} | {median:.3f} | {low:.3f} | {high:.3f} | {share:.0%} | {length:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
