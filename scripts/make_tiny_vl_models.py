"""Build a tiny, fully offline vision-language teacher/student pair and a caption set to distil on.

    python scripts/make_tiny_vl_models.py --output_dir /tmp/tiny_vl
    python scripts/make_tiny_vl_models.py --output_dir /tmp/tiny_vl --teacher_steps 40 --student_steps 5 --no_eval

The image-text counterpart of make_tiny_models.py, made from scratch on the CPU with no download:

    OUT/teacher/            HF Idefics3 folder + processor, trained until it captions well
    OUT/student/            HF Idefics3 folder + processor, smaller and barely trained
    OUT/data/images/*.png   32x32 pictures of one coloured shape on a plain grey background
    OUT/data/train.jsonl    ms-swift rows: {"messages": [user, assistant], "images": [absolute path]}
    OUT/data/val.jsonl      other pictures, same format

Idefics3 because it is the one family found whose transformers processor runs without torchvision (its PIL
image processor) and which vLLM's CPU build also serves. The captions ("a red circle on the left.") name a
colour, a shape and a side: 24 captions in all, so every one is seen in training, and what val measures is
whether the model reads new pictures right.

The build is deterministic: the same flags and OUT on the same machine give byte-identical files (the jsonl
files name OUT). It is built next to OUT and renamed into place, so OUT is never half written.
caption_accuracy() is importable, to score a model before and after distillation.
"""

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the text builder: tokenizer and training loop
import make_tiny_models as tiny  # noqa: E402
from gkd.images import with_image_parts  # noqa: E402

# -----------------------------------------------------------------------------
# Tokenizer: the byte-level BPE of make_tiny_models.py (every byte one token,
# ids 0..255, then the chat tokens 256..258), plus the four tokens that
# Idefics3's processor writes around each picture, at 259..262.

PAD_TOKEN, IM_START, EOS_TOKEN = tiny.PAD_TOKEN, tiny.IM_START, tiny.EOS_TOKEN
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
IMAGE_TOKENS = [FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE, GLOBAL_IMAGE_TOKEN]
# ChatML, as in make_tiny_models.py, for both kinds of content: a plain
# string (text-only data, ms-swift's "<image>..." strings) and a list of typed
# parts, where an image part becomes the "<image>" that the processor expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MAX_POSITIONS = tiny.MAX_POSITIONS


def build_tokenizer():
    return tiny.build_tokenizer(IMAGE_TOKENS, CHAT_TEMPLATE)  # the template also renders chats for AutoTokenizer


# -----------------------------------------------------------------------------
# Processor: one 32x32 picture, no tiling, gives 4 <image> tokens. The vision
# tower cuts it into 4x4 patches of 8 px; the connector's pixel shuffle folds
# each 2x2 block of patches into one token, so each token sees one 16x16
# quadrant of the picture.

IMAGE_SIZE = 32
PATCH_SIZE = 8
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2


def build_processor(tokenizer):
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,  # no tiles, only the "global" picture
    )
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN,
                             chat_template=CHAT_TEMPLATE)


def check_processor(processor):
    # Cheap insurance, run on every build: the token ids above, and one
    # picture expanding to the expected run of tokens.
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids([PAD_TOKEN, IM_START, EOS_TOKEN, *IMAGE_TOKENS]) == list(range(256, 263))
    assert len(tokenizer) == 263 and tokenizer.bos_token_id is None
    picture = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128))
    ids = processor(text=["<image>"], images=[[picture]])["input_ids"][0]
    image_id, fake_id, global_id = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN])
    assert ids == [fake_id, global_id] + [image_id] * IMAGE_SEQ_LEN + [fake_id], ids


# -----------------------------------------------------------------------------
# Data: one shape per picture, in the left or the right half, so that the
# side decides which of the 4 quadrant tokens see it. The shape is 12-14 px
# wide, so a circle, a square and a triangle differ over whole patches, and
# keeps a 1-px margin from the edges and the midline, so the side is never in
# doubt. Size, place (by a few px), shade of colour and of the background vary
# from picture to picture, so val pictures are new ones. (With shapes of
# 10-13 px anywhere in their half, the default steps left the teacher right
# only about half the time.)

COLOURS = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 210), "yellow": (225, 200, 40)}
SHAPES = ["square", "circle", "triangle"]
SIDES = ["left", "right"]
PROMPT = "please describe the image."
# Room for the longest caption, "a yellow triangle on the right." (31 bytes,
# so 31 tokens), its <|im_end|>, and some to spare.
MAX_NEW_TOKENS = 48


def draw_picture(rng, colour, shape, side):
    grey = rng.randint(170, 235)
    picture = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (grey, grey, grey))
    size = rng.randint(12, 14)
    half = IMAGE_SIZE // 2
    x0 = rng.randint(1, half - 1 - size) + (half if side == "right" else 0)
    y0 = (IMAGE_SIZE - size) // 2 + rng.randint(-2, 2)
    x1, y1 = x0 + size - 1, y0 + size - 1
    fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[colour])
    draw = ImageDraw.Draw(picture)
    if shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    else:  # triangle, point up
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return picture


def make_split(rng, name, n_rows, image_dir, final_image_dir):
    """The rows, and their pictures (also saved in image_dir). Every caption equally often, as far as n_rows
    allows, in a random order."""
    captions = [(c, s, p) for c in COLOURS for s in SHAPES for p in SIDES]
    kinds = [captions[i % len(captions)] for i in range(n_rows)]
    rng.shuffle(kinds)
    rows, pictures = [], []
    for i, (colour, shape, side) in enumerate(kinds):
        file_name = f"{name}_{i:04d}.png"
        pictures.append(draw_picture(rng, colour, shape, side))
        pictures[-1].save(image_dir / file_name)
        rows.append({
            "messages": [{"role": "user", "content": f"<image>{PROMPT}"},
                         {"role": "assistant", "content": f"a {colour} {shape} on the {side}."}],
            # Absolute, and where the picture will be once the build is
            # published: ms-swift resolves relative paths against its cwd.
            "images": [str(final_image_dir / file_name)],
        })
    return rows, pictures


def write_jsonl(rows, path):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_pictures(row):
    return [Image.open(path).convert("RGB") for path in row["images"]]


def prompt_text(processor, row):
    """The row's conversation up to and including the open assistant turn."""
    return processor.apply_chat_template(with_image_parts(row["messages"][:-1]), add_generation_prompt=True,
                                         tokenize=False)


# -----------------------------------------------------------------------------
# Models: Idefics3 (a SigLIP-style vision tower, a pixel-shuffle connector and
# a Llama), with the same vision tower in both and make_tiny_models.py's
# Llama shapes; head_dim 32 is the smallest vLLM's CPU build accepts.



# The vision tower's weights start at the text model's 0.06 too: with the
# default 0.02 the teacher got fewer shapes right.
VISION_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    initializer_range=0.06)
TEACHER_SHAPE, STUDENT_SHAPE = tiny.TEACHER_SHAPE, tiny.STUDENT_SHAPE  # the text models' language models


def build_model(shape, tokenizer, seed):
    text_config = tiny.llama_config(shape, tokenizer)
    config = Idefics3Config(
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION_SHAPE),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=SCALE_FACTOR,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)  # the initial weights depend on this alone
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config = tiny.generation_config(tokenizer, MAX_NEW_TOKENS)
    return model


# -----------------------------------------------------------------------------
# Training: supervised next-token prediction with the loss on the caption and
# its closing <|im_end|> only, never on the prompt or the picture's tokens.
# Every row goes through the processor once, up front: each step then only
# pads token lists and stacks pixel tensors.


def encode_example(processor, row, picture):
    completion = row["messages"][-1]["content"] + EOS_TOKEN
    full_text = processor.apply_chat_template(with_image_parts(row["messages"]), tokenize=False)
    text = prompt_text(processor, row) + completion
    # The template's rendering of the whole chat, less the final "\n" that
    # nothing needs to predict.
    assert full_text.startswith(text), (full_text, text)
    encoded = processor(text=[text], images=[[picture]], return_tensors="pt")
    n_completion = len(processor.tokenizer.encode(completion, add_special_tokens=False))
    return encoded["input_ids"][0].tolist(), n_completion, encoded["pixel_values"][0]


def make_batch(examples, pad_id):
    # Right padding; as in make_tiny_models.py the causal mask keeps real
    # tokens from seeing the pads after them, and pads carry no loss. Every
    # picture fills its frame, so the model's default pixel_attention_mask
    # (all ones) is the processor's.
    width = max(len(ids) for ids, _, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (ids, n_completion, _) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(ids) - n_completion : len(ids)] = torch.tensor(ids[-n_completion:])
    pixel_values = torch.stack([pixels for _, _, pixels in examples])  # (batch, images per row, 3, H, W)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}


# -----------------------------------------------------------------------------
# Evaluation: greedy captions of the val pictures. caption_accuracy is the
# share equal to the reference; the build also reports the share that are
# well formed ("a <colour> <shape> on the <side>."), which tells a weak model
# that has learned the format from a random one.

WELL_FORMED = re.compile(rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) on the ({'|'.join(SIDES)})\.")


@torch.no_grad()
def greedy_captions(model, processor, rows, max_new_tokens=MAX_NEW_TOKENS, batch_size=64):
    model.eval()
    captions = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        # Left padding, so that every prompt ends where generation starts.
        inputs = processor(text=[prompt_text(processor, row) for row in chunk],
                           images=[load_pictures(row) for row in chunk],
                           padding=True, padding_side="left", return_tensors="pt")
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        width = inputs["input_ids"].shape[1]
        captions += processor.batch_decode(out[:, width:], skip_special_tokens=True)
    return captions


def evaluate(model, processor, rows, max_new_tokens=MAX_NEW_TOKENS):
    captions = greedy_captions(model, processor, rows, max_new_tokens)
    references = [row["messages"][-1]["content"] for row in rows]
    return {
        "exact": sum(c == r for c, r in zip(captions, references)) / len(rows),
        "well_formed": sum(WELL_FORMED.fullmatch(c) is not None for c in captions) / len(rows),
    }


def caption_accuracy(model, processor, rows, max_new_tokens=MAX_NEW_TOKENS):
    """Share of rows (ms-swift's format, as in data/val.jsonl) whose greedy caption equals the reference, the
    last message, exactly. max_new_tokens must cover the longest caption and its <|im_end|>: a token per byte,
    32 for "a yellow triangle on the right.".
    """
    return evaluate(model, processor, rows, max_new_tokens)["exact"]


# -----------------------------------------------------------------------------


def save_model(model, processor, folder):
    model.save_pretrained(folder)
    # The tokenizer, image processor and chat template, written by the same
    # code from the same objects: byte-identical in both folders.
    processor.save_pretrained(folder)
    # save_pretrained leaves files readable by their owner only; a server
    # running as another user (vLLM in a container) must read them.
    for path in Path(folder).iterdir():
        path.chmod(0o644)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", type=Path, required=True, help="where to build")
    p.add_argument("--seed", type=int, default=0, help="seed of the pictures, weights and batch order")
    p.add_argument("--teacher_steps", type=int, default=300, help="teacher optimizer steps (0: random weights)")
    p.add_argument("--student_steps", type=int, default=100, help="student optimizer steps (0: random weights)")
    p.add_argument("--rows", type=int, default=480, help="train rows; val gets a tenth as many")
    p.add_argument("--batch_size", type=int, default=16)
    # With make_tiny_models.py's 2e-3 the teacher learned the colours and
    # most shapes but could not tell left from right.
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, both models")
    # One thread, as in make_tiny_models.py: on a busy 2-core machine two ran
    # the teacher 4-6x slower. The weights come out the same either way.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no_eval", action="store_true", help="skip the greedy val accuracy")
    p.add_argument("--log_every", type=int, default=50, help="print the loss every N steps (0: never)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Reproducibility: fixed seeds, deterministic kernels, a fixed thread
    # count; the caller's settings come back at the end, so that importing
    # and calling main() leaves no trace.
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    hf_logging.disable_progress_bar()
    try:
        return build(args, args.output_dir.resolve())
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        hf_logging.enable_progress_bar()


def build(args, out):
    t_start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built in a hidden folder next to OUT, then renamed into place: OUT is
    # never half written.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data" / "images").mkdir(parents=True)
    try:
        # 1. processor and data
        processor = build_processor(build_tokenizer())
        check_processor(processor)
        rng = random.Random(args.seed)
        image_dir, final_image_dir = tmp / "data" / "images", out / "data" / "images"
        train_rows, train_pictures = make_split(rng, "train", args.rows, image_dir, final_image_dir)
        val_rows, _ = make_split(rng, "val", max(1, args.rows // 10), image_dir, final_image_dir)
        write_jsonl(train_rows, tmp / "data" / "train.jsonl")
        write_jsonl(val_rows, tmp / "data" / "val.jsonl")
        examples = [encode_example(processor, row, picture) for row, picture in zip(train_rows, train_pictures)]

        # 2. teacher, then student: same data, same loop. The student is
        # smaller and gets far fewer steps: it learns the caption format and
        # the colours, not yet the shapes and sides.
        seconds, trained = {}, {}
        for name, shape, steps, seed in [
            ("teacher", TEACHER_SHAPE, args.teacher_steps, args.seed + 1),
            ("student", STUDENT_SHAPE, args.student_steps, args.seed + 2),
        ]:
            t0 = time.time()
            model = build_model(shape, processor.tokenizer, seed)
            n_params = sum(p.numel() for p in model.parameters())
            print(f"{name}: {n_params / 1e6:.2f}M parameters, {steps} steps", flush=True)
            tiny.train(model, examples, steps, args.batch_size, args.lr, seed, processor.tokenizer.pad_token_id,
                       args.log_every, name, batch_of=make_batch)
            seconds[name] = time.time() - t0
            save_model(model, processor, tmp / name)
            trained[name] = model

        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # 3. val accuracy, on the published folder: the rows' image paths point there.
    print(f"built {out}")
    print(f"  data: {len(train_rows)} train / {len(val_rows)} val rows")
    scores = {}
    for name in ("teacher", "student"):
        line = f"  {name}: trained {seconds[name]:.1f}s"
        if not args.no_eval:
            t0 = time.time()
            scores[name] = evaluate(trained[name], processor, val_rows)
            line += (f"; val exact captions {scores[name]['exact']:.1%}, well formed"
                     f" {scores[name]['well_formed']:.1%} (eval {time.time() - t0:.1f}s)")
        print(line, flush=True)
    print(f"  total {time.time() - t_start:.1f}s")
    return scores


if __name__ == "__main__":
    main()
