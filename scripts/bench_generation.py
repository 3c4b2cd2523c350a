"""What one generate call costs, per engine, at the batch sizes and lengths a training step samples.

The student of scripts/make_tiny_models.py with its output layer grown to --vocab rows (new rows random: the
projection then costs what a real vocabulary's does; only the tokenizer's 259 ids are ever drawn). Every
row samples its full --lengths tokens (EOS suppressed), at temperature 0.9, as gkd-train's student does; the
median of --repeats calls after one warm-up call, in one process:

    python scripts/bench_generation.py [--tiny_dir examples/tiny] [--vocab 32000] [--batch_sizes 1 2 4 8]
        [--lengths 32 128] [--repeats 5]

Engines: transformers `generate` (with gkd's per-row processors), gkd's decode loop (what TransformersEngine
now samples text with; gkd/sampling/decode_loop.py), and vLLM in this process where it is installed.
What share of a training step generation takes is gkd-train's own `generation_share` log
(scripts/bench_peers.py prints it beside the peers' times).
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def grown_student(tiny: Path, vocab: int, folder: Path) -> Path:
    """The tiny student, its embedding and output layer grown to `vocab` rows, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)
    torch.manual_seed(0)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny / "student").save_pretrained(folder)
    return folder


def prompts_of(tokenizer, count: int) -> list[list[int]]:
    from gkd.tokenize import tokenize_messages

    questions = [f"what is {index * 37 % 1000} + {index * 91 % 1000}?" for index in range(count)]
    return [tokenize_messages(tokenizer, [{"role": "user", "content": question}], None, ())[0]
            for question in questions]


def timed(call, repeats: int) -> float:
    call()  # warm-up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny_dir", type=Path, default=REPO / "examples" / "tiny")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not (args.tiny_dir / "student").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), "--output_dir",
                        str(args.tiny_dir)], check=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gkd.sampling import SamplingSettings, TransformersEngine
    from gkd.sampling.decode_loop import RowGumbelNoise

    with tempfile.TemporaryDirectory() as scratch:
        folder = grown_student(args.tiny_dir, args.vocab, Path(scratch) / "student")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        engine = TransformersEngine(model, tokenizer.pad_token_id)

        def with_generate(prompts, settings, seeds):
            with torch.no_grad():
                processors = engine._warpers(settings) + [RowGumbelNoise(seeds, "cpu", settings.vocab_size)]
                return engine._transformers_generate(prompts, settings, processors, None, False, "cpu")

        engines = {"transformers generate": with_generate, "gkd decode loop": engine.generate}
        try:
            from gkd.sampling.vllm_engine import VLLMEngine

            vllm_engine = VLLMEngine(str(folder), dtype="float32", max_model_len=512, enforce_eager=True)
            engines["vllm (in process)"] = vllm_engine.generate
        except Exception as error:  # not installed here (the main environment): left out, said so
            print(f"vLLM left out: {str(error).splitlines()[0]}", file=sys.stderr)

        rows = []
        for length in args.lengths:
            for batch_size in args.batch_sizes:
                prompts = prompts_of(tokenizer, batch_size)
                # EOS both stops and is never drawn: every row runs its full length on every engine.
                eos = (tokenizer.eos_token_id,)
                settings = SamplingSettings(max_new_tokens=length, temperature=0.9, vocab_size=len(tokenizer),
                                            stop_token_ids=eos, suppressed_token_ids=eos)
                seeds = list(range(batch_size))
                times = {name: timed(lambda call=call: call(prompts, settings, seeds), args.repeats)
                         for name, call in engines.items()}
                rows.append((length, batch_size, times))

    names = list(engines)
    print(f"\nvocabulary {args.vocab}, temperature 0.9, every row its full length; median of {args.repeats} calls")
    print("| new tokens | batch | " + " | ".join(f"{name} s/call (ms/token)" for name in names)
          + " | loop vs generate |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for length, batch_size, times in rows:
        cells = [f"{times[name]:.3f} ({1000 * times[name] / (length * batch_size):.2f})" for name in names]
        ratio = times["gkd decode loop"] / times["transformers generate"]
        print(f"| {length} | {batch_size} | " + " | ".join(cells) + f" | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
