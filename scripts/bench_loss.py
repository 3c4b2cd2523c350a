"""Forward+backward time and peak memory of the generalized JSD implementations.

Variants, each measured in its own subprocess so that one's allocations cannot hide another's:
- exact:       generalized_jsd_loss on precomputed student and teacher logits
- chunked:     chunked_generalized_jsd_loss on the same logits
- exact+proj:  the two lm_head projections (hidden @ W.T) followed by the exact loss
- fused:       fused_generalized_jsd_loss on hidden states and lm_head weights (never full logits)

With --sft_alpha A > 0 each variant adds A x the student's cross-entropy at the counted positions: the
exact ones through F.cross_entropy, chunked and fused through their _and_cross_entropy forms (in the
same pass). With --autocast the inputs stay float32 and the step runs under bf16 autocast.

Time is the median over --repeats of forward+backward. Peak memory is measured above the inputs: on the
CPU the process's maximum resident set minus its resident set once the inputs exist; on a GPU
torch.cuda.max_memory_allocated minus the memory allocated once the inputs exist. It includes the
gradients the backward returns. "logits" is the size of one float32 tensor of batch x seq x vocab.

    python scripts/bench_loss.py [--batch 4 --seq 512 --vocab 32000 --hidden 512 --dtype float32]
                                 [--device cuda] [--repeats 5] [--chunk_size N] [--sft_alpha 0.3] [--autocast]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("exact", "chunked", "exact+proj", "fused")


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(variant: str, args) -> dict:
    """Runs in the child: build inputs, then time forward+backward of one variant."""
    import torch
    import torch.nn.functional as F

    from gkd.losses import (
        chunked_generalized_jsd_and_cross_entropy, fused_generalized_jsd_and_cross_entropy, generalized_jsd_loss,
    )

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = (args.batch, args.seq)
    labels = torch.randint(0, args.vocab, shape, device=device)
    labels[torch.rand(shape, device=device) < args.masked_fraction] = -100
    chunk = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    if variant in ("exact", "chunked"):
        student = torch.randn(*shape, args.vocab, device=device, dtype=dtype, requires_grad=True)
        teacher = torch.randn(*shape, args.vocab, device=device, dtype=dtype)
        inputs = [student]
    else:
        student_hidden = torch.randn(*shape, args.hidden, device=device, dtype=dtype, requires_grad=True)
        teacher_hidden = torch.randn(*shape, args.hidden, device=device, dtype=dtype)
        student_weight = (torch.randn(args.vocab, args.hidden, device=device, dtype=dtype) / args.hidden**0.5)
        student_weight.requires_grad_(True)
        teacher_weight = torch.randn(args.vocab, args.hidden, device=device, dtype=dtype) / args.hidden**0.5
        inputs = [student_hidden, student_weight]

    alpha = args.sft_alpha

    def exact_with_ce(student_logits, teacher_logits):
        loss = generalized_jsd_loss(student_logits, teacher_logits, labels, beta=0.5)
        if alpha > 0:
            counted = labels.reshape(-1) != -100
            ce = F.cross_entropy(student_logits.reshape(-1, args.vocab)[counted].float(), labels.reshape(-1)[counted])
            loss = loss + alpha * ce
        return loss

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            if variant == "exact":
                loss = exact_with_ce(student, teacher)
            elif variant == "chunked":
                jsd, ce = chunked_generalized_jsd_and_cross_entropy(
                    student, teacher, labels, labels if alpha > 0 else None, beta=0.5, reduction="batchmean",
                    sft_weight=alpha, **chunk)
                loss = jsd + alpha * ce
            elif variant == "exact+proj":
                with torch.no_grad():
                    teacher_logits = torch.nn.functional.linear(teacher_hidden, teacher_weight)
                loss = exact_with_ce(torch.nn.functional.linear(student_hidden, student_weight), teacher_logits)
            else:
                jsd, ce = fused_generalized_jsd_and_cross_entropy(
                    student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                    labels if alpha > 0 else None, beta=0.5, reduction="batchmean", sft_weight=alpha, **chunk)
                loss = jsd + alpha * ce
        loss.backward()
        for tensor in inputs:
            tensor.grad = None

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resident_bytes()
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": statistics.median(seconds), "peak_bytes": peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk_size", type=int, default=None, help="default: the functions' own")
    parser.add_argument("--masked_fraction", type=float, default=0.0,
                        help="share of positions with label -100 (prompt/padding); default: all counted")
    parser.add_argument("--sft_alpha", type=float, default=0.0,
                        help="add sft_alpha x cross-entropy at the counted positions (default: none)")
    parser.add_argument("--autocast", action="store_true", help="run under bf16 autocast (float32 inputs)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return

    results = {}
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                               capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"{variant} failed:\n{child.stderr[-3000:]}")
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])

    logits_bytes = args.batch * args.seq * args.vocab * 4
    exact = results["exact"]
    print(f"{args.batch} x {args.seq} positions, vocab {args.vocab}, hidden {args.hidden}, {args.dtype}, "
          f"{args.device}, {args.repeats} repeats, {args.masked_fraction:.0%} masked, sft_alpha {args.sft_alpha}"
          f"{', bf16 autocast' if args.autocast else ''}; "
          f"one logits-sized float32 tensor = {logits_bytes / 2**20:.0f} MiB")
    print("| variant | median s | time vs exact | peak extra MiB | in logits | memory vs exact |")
    print("|---|---|---|---|---|---|")
    for variant, result in results.items():
        print(f"| {variant} | {result['seconds']:.3f} | {result['seconds'] / exact['seconds']:.2f}x | "
              f"{result['peak_bytes'] / 2**20:.0f} | {result['peak_bytes'] / logits_bytes:.2f} | "
              f"{result['peak_bytes'] / exact['peak_bytes']:.2f}x |")


if __name__ == "__main__":
    main()
