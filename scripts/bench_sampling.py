"""On-policy step time with each student sampling engine: transformers generate, vLLM colocated, and
vLLM behind a gkd-rollout server, on the same models, prompts and lengths, in one run.

Runs the real `gkd-train` (lmbda 1: every completion is the student's) once per engine and reads the
per-step wall time it logs; the first step (warm-up, and the server's first weight sync) is left out of
the median. Needs vLLM: run it with the environment that has it, e.g.

    .venv-vllm/bin/python scripts/bench_sampling.py                 # tiny models, on this CPU
    python scripts/bench_sampling.py --random_llama --batch_size 16 --max_completion_length 256   # a GPU

--random_llama builds a randomly initialised Llama of about 0.5B parameters (vocabulary 32000, so that
completions rarely stop early) with the tiny models' tokenizer, as student and teacher.
"""

import argparse
import ast
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = {
    "transformers": [],
    "vllm colocate": ["--use_vllm", "true", "--vllm_mode", "colocate"],
    "vllm server": ["--use_vllm", "true", "--vllm_mode", "server"],
}


def build_random_llama(tiny: Path, folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, head_dim=64, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"random Llama: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", flush=True)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, port: int, args) -> subprocess.Popen:
    command = [sys.executable, "-m", "gkd.cli.rollout", "--model", str(model), "--port", str(port),
               *args.engine_flags]
    token = os.environ.setdefault("GKD_ROLLOUT_TOKEN", secrets.token_urlsafe(24))  # shared with gkd-train below
    health = urllib.request.Request(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {token}"})
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"gkd-rollout failed:\n{process.stderr.read()[-3000:]}")
        try:
            urllib.request.urlopen(health, timeout=5)
            return process
        except OSError:
            time.sleep(1)
    sys.exit("gkd-rollout did not come up in 600 s")


def train(student: Path, teacher: Path, data: str, engine_flags: list[str], args, output_dir: Path) -> list[dict]:
    command = [
        sys.executable, "-m", "gkd.cli.train", "--model", str(student), "--teacher_model", str(teacher),
        "--dataset", data, "--output_dir", str(output_dir), "--lmbda", "1", "--max_steps", str(args.steps),
        "--per_device_train_batch_size", str(args.batch_size), "--max_completion_length",
        str(args.max_completion_length), "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
        # one micro-batch per step, no recomputation: the workload the README's tables measure
        "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "false", "--add_version", "false",
        "--disable_tqdm", "true", "--seed", "0", *engine_flags, *args.engine_flags, *args.gkd_flags,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"gkd-train failed:\n{result.stderr[-3000:]}")
    return [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("{'loss'")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny_dir", type=Path, default=REPO / "examples" / "tiny")
    parser.add_argument("--random_llama", action="store_true", help="student and teacher: a random ~0.5B Llama")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("gkd_flags", nargs=argparse.REMAINDER, help="more gkd-train flags after --")
    args = parser.parse_args()
    args.gkd_flags = [flag for flag in args.gkd_flags if flag != "--"]
    if not (args.tiny_dir / "student").is_dir():
        sys.exit(f"{args.tiny_dir}: no tiny models; run python scripts/make_tiny_models.py first")
    import torch

    on_gpu = torch.cuda.is_available()
    args.engine_flags = ["--vllm_enforce_eager", "true"] if not on_gpu else []
    if on_gpu:
        args.gkd_flags = ["--bf16", "true", *args.gkd_flags]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.random_llama:
            student = teacher = build_random_llama(args.tiny_dir, scratch / "random-llama")
        else:
            student, teacher = args.tiny_dir / "student", args.tiny_dir / "teacher"
        data = f"{args.tiny_dir / 'data' / 'prompts.jsonl'}#{args.batch_size * args.steps}"
        for name, engine_flags in ENGINES.items():
            server = None
            if name == "vllm server":
                port = free_port()
                server = start_server(student, port, args)
                engine_flags = [*engine_flags, "--vllm_server_port", str(port)]
            try:
                logs = train(student, teacher, data, engine_flags, args, scratch / name.replace(" ", "-"))
            finally:
                if server is not None:
                    server.send_signal(signal.SIGINT)
                    server.wait(timeout=120)
            step_seconds = [float(entry["step_seconds"]) for entry in logs[1:]]
            rows.append((name, statistics.median(step_seconds), min(step_seconds), max(step_seconds),
                         statistics.median(float(entry["generation_share"]) for entry in logs[1:]),
                         statistics.mean(float(entry["completion_length"]) for entry in logs)))

    device = torch.cuda.get_device_name() if on_gpu else f"{os.cpu_count()} CPUs"
    model = "random Llama ~0.5B" if args.random_llama else "tiny models"
    print(f"{model}, {device}, lmbda 1, batch {args.batch_size}, max_completion_length "
          f"{args.max_completion_length}, median over steps 2..{args.steps} {' '.join(args.gkd_flags)}")
    print("| engine | median step s | min | max | generating | completion tokens | vs transformers |")
    print("|---|---|---|---|---|---|---|")
    baseline = rows[0][1]
    for name, median, low, high, share, length in rows:
        print(f"| {name} | {median:.3f} | {low:.3f} | {high:.3f} | {share:.0%} | {length:.1f} | "
              f"{median / baseline:.2f}x |")
    print(json.dumps({name: median for name, median, *_ in rows}))


if __name__ == "__main__":
    main()
