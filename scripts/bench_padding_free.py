"""Tokens per second of GKD's training step, padded vs padding-free (--padding_free), on the tiny models.

    python scripts/bench_padding_free.py                       # examples/tiny, built if missing
    python scripts/bench_padding_free.py --models_dir /tmp/t --repeats 7 --batch 8 --min_length 16 --max_length 256

One step = the student's and the teacher's forward, the default loss implementation (chosen as the trainer
chooses it: fused where both models allow it) and the student's backward, on micro-batches of --batch rows
whose lengths are uniform in [--min_length, --max_length] (half prompt, half completion). Padded rows are
right-padded to the longest row of their micro-batch; padding-free rows run as one sequence
(gkd.packing.pack_batch). Each repeat runs the same --batches micro-batches in both modes; the table gives the
median over repeats of real (non-padding) tokens per second, and the ratio.

What to expect: padding-free saves the padded positions' work in every linear layer and the loss, but with
sdpa or eager attention the packed sequence's attention is one (total x total) block-diagonal mask, computed
whole: quadratic in the micro-batch's total tokens instead of its longest row. On the tiny CPU models (2
threads, batch 8, lengths 16..256) that cancels the gain with sdpa (1.01x) and halves the speed with eager
(0.49x). The gain is for flash_attention_2/3 (varlen kernels, no mask, attention per row), on a GPU.
"""

import argparse
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gkd.data import build_batch  # noqa: E402
from gkd.losses import LossBatch, LossSettings, choose_loss_impl, make_loss  # noqa: E402
from gkd.teachers import Teacher  # noqa: E402
from gkd.packing import pack_batch  # noqa: E402


def micro_batches(count, rows, low, high, vocab, seed):
    rng = random.Random(seed)
    batches = []
    for _ in range(count):
        lengths = [rng.randint(low, high) for _ in range(rows)]
        prompts = [[rng.randrange(vocab) for _ in range(length // 2)] for length in lengths]
        completions = [[rng.randrange(vocab) for _ in range(length - length // 2)] for length in lengths]
        padded = build_batch(prompts, completions, 0)
        packed = pack_batch(padded)
        batches.append({
            "padded": LossBatch(padded["input_ids"], padded["attention_mask"], padded["labels"]),
            "padding-free": LossBatch(packed["input_ids"], None, packed["labels"], position_ids=packed["position_ids"]),
            "tokens": sum(lengths), "width": padded["input_ids"].numel(),
        })
    return batches


def step(loss, student, teacher, batch):
    student.zero_grad(set_to_none=True)
    jsd, _ = loss(student, Teacher(teacher), batch)
    jsd.backward()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models_dir", type=Path, default=REPO / "examples" / "tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min_length", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--attn_impl", default="sdpa")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if not (args.models_dir / "student" / "model.safetensors").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), "--output_dir",
                        str(args.models_dir), "--teacher_steps", "0", "--student_steps", "0", "--no_eval"], check=True)
    load = dict(dtype=torch.float32, attn_implementation=args.attn_impl)
    student = AutoModelForCausalLM.from_pretrained(args.models_dir / "student", **load).to(args.device).train()
    teacher = AutoModelForCausalLM.from_pretrained(args.models_dir / "teacher", **load).to(args.device).eval()
    teacher.requires_grad_(False)
    vocab = min(student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    impl = choose_loss_impl(None, None, student, teacher, vocab)
    loss = make_loss(impl, LossSettings(beta=0.5, temperature=1.0, vocab_size=vocab,
                                        chunk_size=256 if args.device.startswith("cuda") else None))
    batches = micro_batches(args.batches, args.batch, args.min_length, args.max_length, 256, args.seed)
    for batch in batches:  # warm-up, both modes
        step(loss, student, teacher, batch["padded"])
        step(loss, student, teacher, batch["padding-free"])

    seconds = {"padded": [], "padding-free": []}
    for _ in range(args.repeats):
        for mode in seconds:  # interleaved, so that a busy machine slows both alike
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            for batch in batches:
                step(loss, student, teacher, batch[mode])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[mode].append(time.perf_counter() - started)

    tokens = sum(batch["tokens"] for batch in batches)
    positions = {"padded": sum(batch["width"] for batch in batches), "padding-free": tokens}
    rates = {mode: tokens / statistics.median(times) for mode, times in seconds.items()}
    print(f"{args.batches} micro-batches of {args.batch} rows, lengths uniform in [{args.min_length}, "
          f"{args.max_length}], loss {impl}, attention {args.attn_impl}, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| mode | positions computed | real tokens | median s / micro-batch | tokens/s | vs padded |")
    print("|---|---|---|---|---|---|")
    for mode in seconds:
        print(f"| {mode} | {positions[mode]} | {tokens} | {statistics.median(seconds[mode]) / args.batches:.4f} | "
              f"{rates[mode]:.0f} | {rates[mode] / rates['padded']:.2f}x |")


if __name__ == "__main__":
    main()
