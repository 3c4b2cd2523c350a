"""--async_generate against sampling in step, per engine, in one run: gkd-train's training-loop time
(train_runtime), median step time and the share of the loop spent waiting for samples (generation_share).

Engines: the default in-process one (transformers), and a gkd-rollout server (vLLM in its own process) where
vLLM is installed in this Python (scripts/setup_vllm_env.sh: run this script with .venv-vllm/bin/python).
With --async_generate the in-process engine writes two steps' student samples in one call; the server samples
the next step's while this one trains. Models and settings are scripts/bench_peers.py's (the tiny student and
teacher with --vocab-row output layers, lmbda 0.5, 32 new tokens, batch 4), at lmbda 1 by default here: every
row is sampled, which is where sampling costs most.

    .venv-vllm/bin/python scripts/bench_async_generate.py [--vocab 32000] [--steps 40] [--repeats 2] [--lmbda 1]
"""

import argparse
import importlib.util
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import REPO, gkd_command, grown_models  # noqa: E402 (the scripts folder is no package)

TOKEN_VARIABLE = "GKD_ROLLOUT_TOKEN"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_rollout(student: Path, port: int) -> subprocess.Popen:
    """gkd-rollout on the student, answering /health once vLLM is up."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gkd.cli.rollout", "--model", str(student), "--port", str(port), "--torch_dtype",
         "float32", "--vllm_enforce_eager", "true", "--vllm_max_model_len", "256"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/health",
                                     headers={"Authorization": f"Bearer {os.environ[TOKEN_VARIABLE]}"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"gkd-rollout stopped:\n{process.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5):
                return process
        except OSError:
            time.sleep(1)
    process.kill()
    sys.exit("gkd-rollout did not come up in 300 s")


def run_gkd(models: Path, data: Path, output: Path, steps: int, lmbda: float, flags: list[str]) -> dict:
    command = gkd_command(models, data, output, steps, lmbda=lmbda, logging_steps=1, flags=tuple(flags))
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        sys.exit(f"gkd-train {' '.join(flags)} failed:\n{finished.stderr[-3000:]}")
    logs = [json.loads(line) for line in (output / "logging.jsonl").read_text().splitlines()]
    steps_logged = [line for line in logs if "step_seconds" in line]
    seconds = sum(line["step_seconds"] for line in steps_logged)
    waited = sum(line["generation_share"] * line["step_seconds"] for line in steps_logged)
    return {"loop": next(float(line["train_runtime"]) for line in logs if "train_runtime" in line),
            "step": statistics.median(line["step_seconds"] for line in steps_logged),
            "share": waited / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny_dir", type=Path, default=REPO / "examples" / "tiny")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2, help="runs per row, alternating; medians reported")
    parser.add_argument("--lmbda", type=float, default=1.0)
    args = parser.parse_args()
    if not (args.tiny_dir / "student").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), "--output_dir",
                        str(args.tiny_dir)], check=True)
    os.environ.setdefault(TOKEN_VARIABLE, secrets.token_hex(16))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    has_vllm = importlib.util.find_spec("vllm") is not None
    with tempfile.TemporaryDirectory() as scratch:
        models = grown_models(args.tiny_dir, args.vocab, Path(scratch) / "models")
        rows = {("transformers", False): [], ("transformers", True): []}
        server, port = None, free_port()
        if has_vllm:
            server = start_rollout(models / "student", port)
            rows.update({("gkd-rollout server", False): [], ("gkd-rollout server", True): []})
        try:
            for repeat in range(args.repeats):
                for (engine, ahead), runs in rows.items():
                    flags = ["--async_generate", str(ahead).lower()]
                    if engine != "transformers":
                        flags += ["--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_port", str(port)]
                    output = Path(scratch) / f"{engine.split()[0]}-{ahead}-{repeat}"
                    runs.append(run_gkd(models, args.tiny_dir / "data" / "train.jsonl", output, args.steps,
                                        args.lmbda, flags))
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=60)

    print(f"\nvocabulary {args.vocab}, lmbda {args.lmbda:g}, temperature 0.9, 32 new tokens, batch 4, {args.steps} "
          f"steps, {os.cpu_count()} CPUs; median of {args.repeats} runs each")
    print("| engine | --async_generate | loop s | median step s | waiting for samples |")
    print("|---|---|---|---|---|")
    for (engine, ahead), runs in rows.items():
        print(f"| {engine} | {str(ahead).lower()} | {statistics.median(run['loop'] for run in runs):.1f} | "
              f"{statistics.median(run['step'] for run in runs):.3f} | "
              f"{statistics.median(run['share'] for run in runs):.0%} |")
    if not has_vllm:
        print("| gkd-rollout server | - | vLLM not installed in this Python | - | - |")


if __name__ == "__main__":
    main()
