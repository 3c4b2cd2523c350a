"""Vision-language distillation on the tiny Idefics3 pair: step time per sample source, and the student's caption
accuracy (exact greedy captions of the val pictures) before and after gkd-train.

    python scripts/bench_vision_language.py [--models_dir DIR] [--steps 60] [--learning_rate 5e-4] [--train_vision]

Builds the tiny models first when DIR has none (scripts/make_tiny_vl_models.py, default flags). Each source
is one gkd-train run from the same student: the dataset's captions (--lmbda 0), the student's own samples
(--lmbda 1), the teacher's samples (--lmbda 0 --seq_kd true). Step time is the median of the logged
step_seconds after the first logging interval; one run each.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"dataset": ["--lmbda", "0"], "student": ["--lmbda", "1"], "teacher": ["--lmbda", "0", "--seq_kd", "true"]}


def accuracy(model_dir: Path, rows: list[dict]) -> float:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    sys.path.insert(0, str(REPO / "scripts"))
    from make_tiny_vl_models import caption_accuracy

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    return caption_accuracy(model, AutoProcessor.from_pretrained(model_dir), rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models_dir", type=Path, default=REPO / "examples" / "tiny_vl")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--learning_rate", default="5e-4")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--train_vision", action="store_true",
                        help="--freeze_vit false --freeze_aligner false (ms-swift's defaults freeze both)")
    args = parser.parse_args()
    if not (args.models_dir / "teacher").is_dir():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_vl_models.py"), "--output_dir",
                        str(args.models_dir)], check=True)
    val = [json.loads(line) for line in (args.models_dir / "data" / "val.jsonl").read_text().splitlines()]
    table = [("student before", "", accuracy(args.models_dir / "student", val)),
             ("teacher", "", accuracy(args.models_dir / "teacher", val))]
    with tempfile.TemporaryDirectory() as scratch:
        for source, flags in SOURCES.items():
            output_dir = Path(scratch) / source
            subprocess.run([
                sys.executable, "-m", "gkd.cli.train", "--model", str(args.models_dir / "student"), "--teacher_model",
                str(args.models_dir / "teacher"), "--dataset", str(args.models_dir / "data" / "train.jsonl"),
                "--output_dir", str(output_dir), "--add_version", "false", "--max_steps", str(args.steps),
                "--per_device_train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", "1",
                "--learning_rate", args.learning_rate, "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
                "--max_completion_length", "40", "--temperature", "1.0", "--torch_dtype", "float32",
                "--logging_steps", "5", "--save_strategy", "no", "--report_to", "none", "--split_dataset_ratio", "0",
                *(["--freeze_vit", "false", "--freeze_aligner", "false"] if args.train_vision else []),
                *flags], check=True, capture_output=True)
            logs = [json.loads(line) for line in (output_dir / "logging.jsonl").read_text().splitlines()]
            step_seconds = [line["step_seconds"] for line in logs if "step_seconds" in line][1:]
            table.append((f"student after, {source}", f"{statistics.median(step_seconds):.2f}",
                          accuracy(output_dir, val)))
    print(f"\n{len(val)} val pictures, {args.steps} steps of {args.batch_size} rows, lr {args.learning_rate}, "
          f"vision tower and aligner {'trained' if args.train_vision else 'frozen'}, CPU, one run each")
    print("| model | median step (s) | exact captions |\n|---|---|---|")
    for name, seconds, score in table:
        print(f"| {name} | {seconds or '-'} | {score:.1%} |")


if __name__ == "__main__":
    main()
