"""Peak memory and time of GKDTrainer's loss on one micro-batch: the models' forwards and the loss,
plus the backward in training; on random Llama models sized by the flags (CPU or GPU).

Each case runs in its own subprocess. Memory is measured above what exists before the step (models,
batch): on the CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the
resident set before the step, with glibc told to return every allocation of 64 KiB or more to the
system on free (MALLOC_MMAP_THRESHOLD_), so that the resident set follows the live tensors; on a GPU
torch.cuda.max_memory_allocated minus the memory allocated before the step. Memory is the first
step's; time is the median of --repeats steps after it.

--gkd_root imports gkd from another checkout, e.g. a worktree of an older commit, to measure the
same cases before a change (the trainer's _loss_sums(model, inputs) is called in both):

    git worktree add /tmp/before <commit>
    python scripts/bench_trainer_loss.py --tokenizer examples/tiny/student --gkd_root /tmp/before
    python scripts/bench_trainer_loss.py --tokenizer examples/tiny/student

Cases: --cases impl:sft_alpha:mode,... with impl fused|chunked|exact, mode train (forward +
backward) or eval (no_grad, as evaluation_loop: without the SFT term where the trainer supports it).
"""

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASES = "fused:0:train,fused:0.3:train,chunked:0:train,chunked:0.3:train,exact:0:train,fused:0.3:eval"


def status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def llama(args, hidden, layers, seed):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                         num_key_value_heads=max(hidden // 64, 1), tie_word_embeddings=False,
                         max_position_embeddings=max(args.seq, 128))
    return LlamaForCausalLM(config).to(args.device)


def measure(args) -> dict:
    """In the child: build the models and one batch, then run the case."""
    sys.path.insert(0, str(Path(args.gkd_root).resolve()))
    import torch
    from transformers import AutoTokenizer, TrainingArguments

    import gkd
    from gkd.config import GKDArguments
    from gkd.trainer import GKDTrainer

    impl, sft_alpha, mode = args.case.split(":")
    sft_alpha = float(sft_alpha)
    device = torch.device(args.device)
    student = llama(args, args.hidden, args.layers, 0)
    teacher = llama(args, args.teacher_hidden or args.hidden, args.teacher_layers or args.layers, 1)
    training = TrainingArguments(output_dir=str(Path(args.scratch) / "out"), report_to="none",
                                 use_cpu=device.type == "cpu", bf16=args.bf16, per_device_train_batch_size=args.batch)
    gkd_args = GKDArguments(lmbda=0.0, sft_alpha=sft_alpha, loss_impl=impl, beta=0.5)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=training, gkd_args=gkd_args,
                         stop_token_ids=(tokenizer.eos_token_id,), compared_vocab_size=args.vocab,
                         train_dataset=[{"prompt_ids": [1], "completion_ids": [2]}], processing_class=tokenizer)
    assert trainer.loss_impl == impl, trainer.loss_impl

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    labels = input_ids.clone()
    labels[:, : args.seq // 4] = -100  # the prompt
    batch = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
             "labels": labels.to(device), "from_student": torch.zeros(args.batch, dtype=torch.bool, device=device)}
    no_sft = {"sft": False} if mode == "eval" and "sft" in inspect.signature(trainer._loss_sums).parameters else {}
    model = trainer.model.train(mode == "train")

    def step():
        with trainer.compute_loss_context_manager():
            if mode == "eval":
                with torch.no_grad():
                    trainer._loss_sums(model, batch, **no_sft)
                return
            jsd, sft = trainer._loss_sums(model, batch)
            (jsd + sft_alpha * sft).backward()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident set
        base = status_mib("VmRSS")
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = status_mib("VmHWM") - base
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return {"peak_mib": peak, "seconds": statistics.median(seconds) if seconds else float("nan"),
            "gkd": str(Path(gkd.__file__).parent)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=str(REPO / "examples" / "tiny" / "student"),
                        help="any tokenizer directory (the ids are random; only its pad and eos are used)")
    parser.add_argument("--gkd_root", default=str(REPO), help="the checkout to import gkd from")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--teacher_hidden", type=int, default=None, help="default: --hidden")
    parser.add_argument("--teacher_layers", type=int, default=None, help="default: --layers")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast (float32 weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child's job
    parser.add_argument("--scratch", default="/tmp/bench_trainer_loss", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        print(json.dumps(measure(args)))
        return

    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TRANSFORMERS_VERBOSITY": "error"}
    results = []
    for case in args.cases.split(","):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--case", case],
                               capture_output=True, text=True, env=environment)
        if child.returncode != 0:
            sys.exit(f"{case} failed:\n{child.stderr[-3000:]}")
        results.append((case, json.loads(child.stdout.strip().splitlines()[-1])))

    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    hidden_mib = args.batch * args.seq * args.hidden * 4 / 2**20
    print(f"gkd from {results[0][1]['gkd']}; batch {args.batch} x seq {args.seq}, vocab {args.vocab}, student "
          f"{args.layers} x {args.hidden}, teacher {args.teacher_layers or args.layers} x "
          f"{args.teacher_hidden or args.hidden}, {'bf16 autocast' if args.bf16 else 'float32'}, {args.device}; "
          f"one float32 logits tensor = {logits_mib:.0f} MiB, one student hidden-state tensor = {hidden_mib:.1f} MiB")
    print("| impl | sft_alpha | mode | peak extra MiB | in logits | median s |")
    print("|---|---|---|---|---|---|")
    for case, result in results:
        impl, sft_alpha, mode = case.split(":")
        print(f"| {impl} | {sft_alpha} | {mode} | {result['peak_mib']:.0f} | {result['peak_mib'] / logits_mib:.2f} | "
              f"{result['seconds']:.3f} |")


if __name__ == "__main__":
    main()
