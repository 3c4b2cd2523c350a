"""The teacher in process against the same teacher served by vLLM's OpenAI server: time of one loss step
(student forward, the teacher's part, loss, backward) and the bytes the teacher hands the loss per step.

Runs in the vLLM environment (it starts `python -m vllm.entrypoints.openai.api_server` on the teacher, on a
free 127.0.0.1 port, and stops it after):

    .venv-vllm/bin/python scripts/bench_teacher.py [--models_dir examples/tiny] [--rows 8] [--repeats 10]

Cases: in process with the full vocabulary (the chunked loss: the teacher's logits, positions x vocabulary
float32), in process with --gkd_logits_topk K (its top K, ids and log-probabilities), and served with the
same K (the HTTP answers' bytes: JSON, every position's K entries), K = 16 and K = the vocabulary. Bytes
are per step; time is the median of --repeats steps after one warm-up.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def start_server(teacher: Path, max_logprobs: int):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--max-logprobs", str(max_logprobs)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 600
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5):
                return process, url
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                sys.exit("vLLM's server did not start")
            time.sleep(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models_dir", type=Path, default=REPO / "examples" / "tiny")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--topk", type=int, default=16)
    args = parser.parse_args()
    if not (args.models_dir / "teacher").is_dir():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py")], check=True)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from gkd.config import GKDArguments
    from gkd.data import build_batch, load_examples
    from gkd.models import output_vocab_size
    from gkd.teachers.served import ServedTeacher
    from gkd.trainer import GKDTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.models_dir / "student")
    examples = load_examples([str(args.models_dir / "data" / "train.jsonl")], tokenizer, (tokenizer.eos_token_id,),
                             seed=0)[:args.rows]
    batch = build_batch([e["prompt_ids"] for e in examples], [e["completion_ids"] for e in examples],
                        tokenizer.pad_token_id)
    batch["from_student"] = torch.ones(len(examples), dtype=torch.bool)
    positions = int(batch["labels"][:, 1:].ne(-100).sum())
    student = AutoModelForCausalLM.from_pretrained(args.models_dir / "student", dtype=torch.float32)
    vocab = output_vocab_size(student)
    server, url = start_server(args.models_dir / "teacher", vocab)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for name, topk, served in (("in process, full vocabulary", None, False),
                                       (f"in process, top {args.topk}", args.topk, False),
                                       (f"served, top {args.topk}", args.topk, True),
                                       (f"in process, top {vocab}", vocab, False),
                                       (f"served, top {vocab}", vocab, True)):
                teacher = ServedTeacher([{"url": url, "tags": []}], topk, 1.0, False, tokenizer) if served else \
                    AutoModelForCausalLM.from_pretrained(args.models_dir / "teacher", dtype=torch.float32)
                training = TrainingArguments(output_dir=scratch, report_to="none", use_cpu=True)
                gkd = GKDArguments(lmbda=1.0, loss_temperature=1.0, gkd_logits_topk=topk,
                                   loss_impl=None if topk else "chunked")
                trainer = GKDTrainer(model=student, teacher_model=teacher, args=training, gkd_args=gkd,
                                     stop_token_ids=(tokenizer.eos_token_id,), compared_vocab_size=vocab,
                                     train_dataset=examples, processing_class=tokenizer)
                seconds = []
                for repeat in range(args.repeats + 1):
                    received = teacher.received_bytes if served else 0
                    started = time.perf_counter()
                    jsd, _ = trainer._loss_sums(trainer.model, batch, sft=False)
                    jsd.backward()
                    seconds.append(time.perf_counter() - started)
                    student.zero_grad(set_to_none=True)
                if served:
                    moved = teacher.received_bytes - received
                elif topk:
                    moved = batch["input_ids"].numel() * topk * (4 + 8) + batch["input_ids"].numel() * 4
                else:
                    moved = batch["input_ids"].numel() * vocab * 4
                rows.append((name, statistics.median(seconds[1:]), moved))
    finally:
        server.kill()
        server.wait()
    print(f"\n{len(examples)} rows, {batch['input_ids'].numel()} positions ({positions} counted), vocabulary {vocab}, "
          f"CPU, median of {args.repeats} steps\n")
    print("| teacher | loss step (s) | vs in process, full | bytes to the loss per step |")
    print("|---|---|---|---|")
    for name, median, moved in rows:
        print(f"| {name} | {median:.4f} | {median / rows[0][1]:.2f}x | {moved / 1024:.0f} KiB |")


if __name__ == "__main__":
    main()
