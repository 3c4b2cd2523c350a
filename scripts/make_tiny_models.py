"""Build the tiny, fully offline teacher/student pair that gkd trains on by default.

    python scripts/make_tiny_models.py                      # -> examples/tiny/
    python scripts/make_tiny_models.py --output_dir /tmp/t --teacher_steps 0 --student_steps 0

Everything is made from scratch on the CPU, with no download:

    OUT/teacher/            HF Llama folder + tokenizer, trained until it adds well
    OUT/student/            HF Llama folder + tokenizer, smaller and barely trained
    OUT/data/train.jsonl    {"messages": [user, assistant]} addition problems
    OUT/data/val.jsonl      held-out problems, same format
    OUT/data/prompts.jsonl  other held-out problems, user turn only
    OUT/build_info.json     the recipe, weight hashes and val accuracies

The build is deterministic: the same flags on the same machine give
byte-identical files. It is written atomically (built next to OUT, then
renamed into place), and skipped when OUT already holds a complete build made
with the same recipe, unless --force is given.
"""

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[1] / "examples" / "tiny"

# Bump when a change below changes the outputs, so that builds made by the
# old recipe stop counting as up to date.
RECIPE_VERSION = 1

# The files a finished build contains; the skip check and the tests use it.
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]
EXPECTED_FILES = [f"{m}/{f}" for m in ("teacher", "student") for f in MODEL_FILES] + [
    "data/train.jsonl",
    "data/val.jsonl",
    "data/prompts.jsonl",
    "build_info.json",
]

# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE with no merges. Every byte is one token, so there
# is nothing to train and nothing random: the vocabulary is fixed by
# construction, and any text (ASCII or not) round-trips exactly.

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"  # ends every turn, so generation stops on it

# ChatML, as used by Qwen and others: one block per message, then an open
# assistant block when the caller asks for a generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MAX_POSITIONS = 256


def build_tokenizer(extra_special_tokens=(), chat_template=CHAT_TEMPLATE):
    """extra_special_tokens: more special tokens after the chat ones (the vision-language builder's image
    tokens), at ids 259 on."""
    # ByteLevel maps each of the 256 bytes to a printable character; sorting
    # them gives ids 0..255 that depend on nothing but this code.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    # With no merges the regex split would change nothing, so skip it. No
    # prefix space: "5" must not silently become " 5".
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # The special tokens come after the bytes: ids 256, 257, 258.
    tok.add_special_tokens([PAD_TOKEN, IM_START, EOS_TOKEN, *extra_special_tokens])

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def check_tokenizer(tokenizer):
    # Cheap insurance, run on every build: the properties the rest of the
    # project relies on.
    for text in ["What is 23 + 45?", "  spaces\tand\nnewlines ", "héllo wörld, 数学 🤖"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text, f"round trip failed for {text!r}"
    assert len(tokenizer) == 259, len(tokenizer)
    assert tokenizer.convert_tokens_to_ids([PAD_TOKEN, IM_START, EOS_TOKEN]) == [256, 257, 258]
    assert tokenizer.bos_token_id is None


def save_tokenizer(tokenizer, folder):
    # save_jinja_files=False keeps the chat template inside
    # tokenizer_config.json, where older transformers (and the vLLM builds
    # pinned to them) look for it.
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    # transformers 5 records its internal class name, which older versions
    # cannot resolve; PreTrainedTokenizerFast loads in both.
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# -----------------------------------------------------------------------------
# Data: two-number addition in chat format. The answer restates the problem
# ("23 + 45 = 68"), so a good model must both copy and add, and even a weak
# one gets part of it right.
#
# Both operands have two digits and so does the sum (a + b <= 99, carries
# included). Fixed widths put every digit at a fixed offset from the answer,
# which is what lets a 0.9M-parameter model learn the task in well under a
# minute of CPU; with 1-digit operands or 3-digit sums mixed in it needs
# several times the steps. That leaves 3240 distinct problems: enough for
# disjoint splits.


def all_problems():
    return [(a, b) for a in range(10, 100) for b in range(10, 100) if a + b <= 99]


def make_row(a, b, with_answer=True):
    messages = [{"role": "user", "content": f"What is {a} + {b}?"}]
    if with_answer:
        messages.append({"role": "assistant", "content": f"{a} + {b} = {a + b}"})
    return {"messages": messages}


def make_splits(seed, n_train, n_val, n_prompts):
    # Shuffle the problems once and cut the list in three, so the splits are
    # disjoint: val and prompts hold problems never seen in training.
    pairs = all_problems()
    assert n_train + n_val + n_prompts <= len(pairs), f"only {len(pairs)} distinct problems"
    random.Random(seed).shuffle(pairs)
    val = pairs[:n_val]
    prompts = pairs[n_val : n_val + n_prompts]
    train = pairs[n_val + n_prompts : n_val + n_prompts + n_train]
    return (
        [make_row(a, b) for a, b in train],
        [make_row(a, b) for a, b in val],
        [make_row(a, b, with_answer=False) for a, b in prompts],
    )


def write_jsonl(rows, path):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# -----------------------------------------------------------------------------
# Models: Llama, which every serving stack supports. head_dim is 32 in both,
# the smallest the CPU build of vLLM accepts. vocab_size is rounded up past
# the 259 real tokens, as in real checkpoints whose embedding matrix is larger
# than their tokenizer; code that confuses the two fails here, not later.

VOCAB_SIZE = 320

# Full multi-head attention (as many kv heads as heads): with grouped kv heads
# the teacher learned the sums markedly more slowly.
TEACHER_SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, intermediate_size=384)
STUDENT_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, intermediate_size=192)


def llama_config(shape, tokenizer) -> LlamaConfig:
    """The language model of a shape (also the vision-language builder's)."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # The default 0.02 suits wide models; at width 64-128 it leaves the
        # weights so small that training idles on a plateau for hundreds of
        # steps. 0.06 (about 1/sqrt(width)) gets there far sooner.
        initializer_range=0.06,
        **shape,
    )


def generation_config(tokenizer, max_new_tokens: int = 32) -> GenerationConfig:
    return GenerationConfig(bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens)


def build_model(shape, tokenizer, seed):
    config = llama_config(shape, tokenizer)
    assert config.head_dim >= 32, config.head_dim
    torch.manual_seed(seed)  # the initial weights depend on this alone
    model = LlamaForCausalLM(config)
    model.generation_config = generation_config(tokenizer)
    return model


# -----------------------------------------------------------------------------
# Training: plain supervised next-token prediction on the train rows, with the
# loss on the assistant's answer only (its text and the closing <|im_end|>).
# A hand-written loop: a Trainer would add seconds of start-up and knobs that
# only get in the way of reproducibility.


def encode_example(tokenizer, row):
    # prompt = the conversation up to and including "<|im_start|>assistant\n";
    # completion = the answer and <|im_end|>. Bytes are tokens, so prompt +
    # completion is exactly the templated conversation (less its final "\n",
    # which nothing needs to predict).
    prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(row["messages"][-1]["content"], add_special_tokens=False)
    return prompt_ids, answer_ids + [tokenizer.eos_token_id]


def make_batch(examples, pad_id) -> dict:
    # Right padding. The causal mask already keeps real tokens from seeing the
    # pads after them, so no attention mask is needed; pads carry no loss.
    width = max(len(p) + len(c) for p, c in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
    return {"input_ids": input_ids, "labels": labels}


def train(model, examples, steps, batch_size, lr, seed, pad_id, log_every, name, batch_of=make_batch):
    """batch_of(examples, pad_id): the model's keyword arguments for a batch, labels included."""
    if steps == 0:
        return  # keep the random initial weights
    model.train()
    # Weight decay 0.1 helps the jump from "copies the operands" to "adds them".
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.1)
    warmup = max(1, steps // 10)

    def lr_at(step):  # linear warmup, then cosine down to 10% of the peak
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = random.Random(seed)  # a private RNG: the batch order depends on the seed alone
    order = []
    for step in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not order:  # a new epoch: a new permutation
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])

        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(**batch_of(batch, pad_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  {name} step {step:4d}/{steps} loss {loss.item():.4f} lr {lr_at(step):.1e}", flush=True)
    model.eval()


# -----------------------------------------------------------------------------
# Evaluation: greedy answers to the val prompts. "exact" is the share of
# answers equal to the reference; "restated" the share that at least copy the
# problem correctly ("23 + 45 = <digits>"), which tells a weak model that has
# learned the format from a random one.


@torch.no_grad()
def evaluate(model, tokenizer, rows, batch_size=100):
    model.eval()
    exact = restated = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [encode_example(tokenizer, r)[0] for r in chunk]
        # Left padding, so that every prompt ends where generation starts.
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention_mask[i, width - len(p) :] = 1
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             do_sample=False, max_new_tokens=16)
        for row, ids in zip(chunk, out[:, width:].tolist()):
            answer = tokenizer.decode(ids, skip_special_tokens=True)
            reference = row["messages"][-1]["content"]
            exact += answer == reference
            restated += re.fullmatch(re.escape(reference.split("=")[0]) + r"= \d+", answer) is not None
    return {"exact": exact / len(rows), "restated": restated / len(rows)}


# -----------------------------------------------------------------------------
# Output: build in a hidden folder next to OUT, then rename it into place. A
# rename within one file system is atomic, so OUT is at any moment absent,
# the old build or the new one, never half written.


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def existing_build(out, recipe):
    """OUT's build_info if OUT is complete and made by this recipe, else None."""
    if not all((out / f).is_file() for f in EXPECTED_FILES):
        return None
    try:
        info = json.loads((out / "build_info.json").read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("recipe") == recipe else None


def pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs(out):
    # A run that was killed leaves its hidden folder behind. The folder's name
    # ends with the pid of its run, so remove only those whose run is gone.
    for path in list(out.parent.glob(f".{out.name}.tmp-*")) + list(out.parent.glob(f".{out.name}.old-*")):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def publish(tmp, out):
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():  # an outdated or incomplete build, or --force
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if not out.exists():  # a real failure: put the old build back
            if old.exists():
                old.rename(out)
            raise
        # Another run published at the same moment (say, two test workers);
        # its build is as good as ours.
        print(f"{out} was built by another process meanwhile; keeping that one")
    finally:
        shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                   help="where to build (default: examples/tiny in the repository)")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, weights and batch order")
    p.add_argument("--teacher_steps", type=int, default=450, help="teacher optimizer steps (0: random weights)")
    p.add_argument("--student_steps", type=int, default=150, help="student optimizer steps (0: random weights)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, both models")
    p.add_argument("--n_train", type=int, default=2000)
    p.add_argument("--n_val", type=int, default=200)
    p.add_argument("--n_prompts", type=int, default=200)
    # One thread: at this size more gain little, and on a busy 2-core machine
    # two ran 10x slower. The weights come out the same either way.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no_eval", action="store_true", help="skip the greedy val accuracy")
    p.add_argument("--log_every", type=int, default=50, help="print the loss every N steps (0: never)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = args.output_dir.resolve()
    # Everything that decides the bytes of the outputs. A build made with
    # other values is not up to date, with or without --force.
    recipe = {"version": RECIPE_VERSION}
    for key in ("seed", "teacher_steps", "student_steps", "batch_size", "lr", "n_train", "n_val", "n_prompts"):
        recipe[key] = getattr(args, key)

    info = existing_build(out, recipe)
    if info is not None and not args.force:
        print(f"{out} is up to date (same recipe); nothing to do. Pass --force to rebuild.")
        return info

    # Reproducibility: fixed seeds, deterministic kernels, a fixed thread
    # count. The caller's settings come back at the end, so that importing
    # and calling main() (as the tests do) leaves no trace.
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    hf_logging.disable_progress_bar()  # "Writing model shards" bars, twice
    try:
        return build(args, out, recipe)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        hf_logging.enable_progress_bar()


def build(args, out, recipe):
    t_start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # 1. tokenizer and data
        tokenizer = build_tokenizer()
        check_tokenizer(tokenizer)
        train_rows, val_rows, prompt_rows = make_splits(args.seed, args.n_train, args.n_val, args.n_prompts)
        (tmp / "data").mkdir()
        write_jsonl(train_rows, tmp / "data" / "train.jsonl")
        write_jsonl(val_rows, tmp / "data" / "val.jsonl")
        write_jsonl(prompt_rows, tmp / "data" / "prompts.jsonl")
        examples = [encode_example(tokenizer, r) for r in train_rows]

        # 2. teacher, then student: same data, same loop. The student is
        # smaller and gets far fewer steps: it learns the format, not the sums.
        seconds, scores, hashes = {}, {}, {}
        for name, shape, steps, seed in [
            ("teacher", TEACHER_SHAPE, args.teacher_steps, args.seed + 1),
            ("student", STUDENT_SHAPE, args.student_steps, args.seed + 2),
        ]:
            t0 = time.time()
            model = build_model(shape, tokenizer, seed)
            n_params = sum(p.numel() for p in model.parameters())
            print(f"{name}: {n_params / 1e6:.2f}M parameters, {steps} steps", flush=True)
            train(model, examples, steps, args.batch_size, args.lr, seed, tokenizer.pad_token_id,
                  args.log_every, name)
            seconds[name] = time.time() - t0
            if not args.no_eval:
                t0 = time.time()
                scores[name] = evaluate(model, tokenizer, val_rows)
                seconds[name + "_eval"] = time.time() - t0
            model.save_pretrained(tmp / name)
            save_tokenizer(tokenizer, tmp / name)
            hashes[name] = sha256(tmp / name / "model.safetensors")

        # 3. the record: the recipe (for the skip check), hashes and scores.
        # Timings vary from run to run, so they are printed, not stored: every
        # file of a build stays reproducible.
        info = {"recipe": recipe, "model_sha256": hashes, "val": scores}
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        missing = [f for f in EXPECTED_FILES if not (tmp / f).is_file()]
        assert not missing, f"build is missing {missing}"
        # save_pretrained leaves the weights readable by their owner only;
        # a server running as another user (vLLM in a container) must read them.
        for f in EXPECTED_FILES:
            (tmp / f).chmod(0o644)

        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"built {out}")
    print(f"  data: {len(train_rows)} train / {len(val_rows)} val / {len(prompt_rows)} prompt rows")
    for name in ("teacher", "student"):
        line = f"  {name}: trained {seconds[name]:.1f}s"
        if name in scores:
            line += (f"; val exact match {scores[name]['exact']:.1%}, restated {scores[name]['restated']:.1%}"
                     f" (eval {seconds[name + '_eval']:.1f}s)")
        print(line + f"; sha256 {hashes[name][:16]}")
    print(f"  total {time.time() - t_start:.1f}s")
    return info


if __name__ == "__main__":
    main()
