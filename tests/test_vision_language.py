"""Vision-language distillation on the tiny Idefics3 student and teacher (scripts/make_tiny_vl_models.py):
ms-swift's image rows, the processor's image tokens in the prompt, both models reading the pictures in the
loss and in generation, and the one-line refusals of what gkd does not feed images to yet."""

import base64
import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import assert_refused_in_one_line, write_jsonl
from gkd.data import load_examples
from gkd.errors import GKDUserError
from gkd.images import image_refs, open_image, place_image_tags
from gkd.losses import generalized_jsd_loss
from gkd.models import freeze_parts, frozen_parts
from test_cli import gkd_train
from test_trainer_loss import VOCAB, make_trainer

IMAGE_TOKENS_PER_PICTURE = 4  # 32-pixel pictures, 8-pixel patches, pixel shuffle by 2


@pytest.fixture(scope="session")
def processor(tiny_vl):
    return AutoProcessor.from_pretrained(tiny_vl / "student")


def rows(tiny_vl, count=4, split="train"):
    return [json.loads(line) for line in (tiny_vl / "data" / f"{split}.jsonl").read_text().splitlines()[:count]]


def load(tiny_vl, name):
    return AutoModelForImageTextToText.from_pretrained(tiny_vl / name, dtype=torch.float32)


def examples(tmp_path, processor, data_rows, **options):
    path = write_jsonl(tmp_path / "rows.jsonl", data_rows)
    tokenizer = processor.tokenizer
    return load_examples([str(path)], tokenizer, (tokenizer.eos_token_id,), seed=0, processor=processor, **options)


# ----------------------------------------------------------------------------- rows


def test_image_entries_in_every_form_ms_swift_reads(tmp_path, monkeypatch):
    picture = tmp_path / "pictures" / "red.png"
    picture.parent.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(picture)
    encoded = base64.b64encode(picture.read_bytes()).decode()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROOT_IMAGE_DIR", str(tmp_path / "pictures"))
    entries = ["pictures/red.png",  # from the working directory
               "red.png",  # under $ROOT_IMAGE_DIR
               f"data:image/png;base64,{encoded}", encoded, {"bytes": picture.read_bytes(), "path": None},
               {"bytes": None, "path": str(picture)}, Image.open(picture)]
    references = image_refs({"images": entries}, "rows.jsonl:1")
    assert references[:2] == [str(picture), str(picture)] and references[5] == str(picture)
    for reference in references:
        assert open_image(reference).getpixel((3, 3)) == (255, 0, 0)
    assert image_refs({"image": "pictures/red.png"}, "x") == [str(picture)]  # ms-swift's alias, one entry
    with pytest.raises(GKDUserError, match=r"^rows\.jsonl:1: image 2: missing\.png is not a file \(relative paths "
                                           r"are read from the working directory or under \$ROOT_IMAGE_DIR\)"):
        image_refs({"images": [str(picture), "missing.png"]}, "rows.jsonl:1")


def test_image_tags_as_ms_swift_places_them():
    question = [{"role": "system", "content": "S"}, {"role": "user", "content": "describe"}]
    assert place_image_tags(question, 2, "x")[1]["content"] == "<image><image>describe"  # missing: prepended
    tagged = [{"role": "user", "content": "a <image> b"}]
    assert place_image_tags(tagged, 1, "x") == tagged
    with pytest.raises(GKDUserError, match=r"^x: 2 <image> tags but 1 image\(s\)"):
        place_image_tags([{"role": "user", "content": "<image><image>"}], 1, "x")


def test_the_prompt_holds_each_pictures_image_tokens(tmp_path, tiny_vl, processor):
    """The processor expands each image tag; the completion is text, so no image token is ever labelled."""
    data_rows = rows(tiny_vl)
    data_rows[1] = {**data_rows[1], "images": data_rows[1]["images"] * 2}  # one tag, two pictures: one prepended
    loaded = examples(tmp_path, processor, data_rows)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert [example["prompt_ids"].count(image_id) for example in loaded] == [IMAGE_TOKENS_PER_PICTURE, 2 * 4, 4, 4]
    assert all(image_id not in example["completion_ids"] for example in loaded)
    assert loaded[0]["images"] == data_rows[0]["images"]
    caption = data_rows[0]["messages"][1]["content"]
    assert processor.tokenizer.decode(loaded[0]["completion_ids"]) == caption + "<|im_end|>"


@pytest.mark.parametrize("row, message", [
    ({"images": ["{missing}"]}, r"rows\.jsonl:1: image 1: .*missing\.png is not a file"),
    ({"images": ["{broken}"]}, r"rows\.jsonl:1: image 1 \(.*broken\.png\) cannot be read \("),
    ({"messages": [{"role": "user", "content": "<image><image>describe"}, {"role": "assistant", "content": "a"}]},
     r"rows\.jsonl:1: 2 <image> tags but 1 image\(s\)"),
    ({"messages": [{"role": "user", "content": "describe"}, {"role": "assistant", "content": "<image> a"}]},
     r"rows\.jsonl:1: the completion holds an <image> tag"),
])
def test_bad_image_rows_are_one_line_naming_the_row(tmp_path, tiny_vl, processor, row, message):
    (tmp_path / "broken.png").write_text("not a picture")
    first = rows(tiny_vl, 1)[0]
    row = {**first, **{key: [entry.format(missing=tmp_path / "missing.png", broken=tmp_path / "broken.png")
                             for entry in value] if key == "images" else value for key, value in row.items()}}
    with pytest.raises(GKDUserError, match=f"^[^\\n]*{message}"):
        examples(tmp_path, processor, [row])


def test_a_template_that_renders_parts_alone_keeps_every_turn(tmp_path, tiny_vl, processor):
    """Some processors' templates render a turn's list of parts and nothing for a plain string: with images
    every turn goes as parts, so the system prompt and the caption survive."""
    parts_only = ("{% for message in messages %}{{ message['role'] }}:{% for part in message['content'] %}"
                  "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
                  "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    strict = AutoProcessor.from_pretrained(tiny_vl / "student", chat_template=parts_only)
    row = {**rows(tiny_vl, 1)[0]}
    row["messages"] = [{"role": "system", "content": "be brief"}, *row["messages"]]
    (example,) = examples(tmp_path, strict, [row])
    text = strict.tokenizer.decode(example["prompt_ids"])
    assert text.startswith("system:be brief<|im_end|>") and text.endswith("please describe the image.<|im_end|>\nassistant:")
    assert strict.tokenizer.decode(example["completion_ids"]) == row["messages"][-1]["content"] + "<|im_end|>"


def test_truncating_an_image_prompt_drops_the_row(tmp_path, tiny_vl, processor):
    """--truncation_strategy left would cut the prompt's start, where the picture's tokens are: the row goes."""
    data_rows = rows(tiny_vl, 2)
    data_rows[1] = {**data_rows[1], "messages": [{"role": "user", "content": "<image>" + "long question " * 20},
                                                 data_rows[1]["messages"][1]]}
    loaded = examples(tmp_path, processor, data_rows, max_length=100, truncation_strategy="left")
    assert [example["images"] for example in loaded] == [data_rows[0]["images"]]


def test_text_rows_keep_their_literal_image_text_without_a_processor(tmp_path, tokenizer):
    """A text model reads '<image>' as text: a completion may hold it, and non-object rows stay one line."""
    path = write_jsonl(tmp_path / "html.jsonl", [
        {"messages": [{"role": "user", "content": "tag?"}, {"role": "assistant", "content": "<image> is a tag"}]}])
    (example,) = load_examples([str(path)], tokenizer, (tokenizer.eos_token_id,), seed=0)
    assert tokenizer.decode(example["completion_ids"]).startswith("<image> is a tag")
    write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(GKDUserError, match=r"list\.jsonl:1: expected an object"):
        load_examples([str(tmp_path / "list.jsonl")], tokenizer, (tokenizer.eos_token_id,), seed=0)


# ----------------------------------------------------------------------------- the step


def image_batch(trainer, loaded, images=None):
    batch = trainer._tensors([e["prompt_ids"] for e in loaded], [e["completion_ids"] for e in loaded],
                             images=images or [e["images"] for e in loaded])
    batch["from_student"] = torch.zeros(len(loaded), dtype=torch.bool)
    return batch


@pytest.mark.parametrize("loss_impl", ["fused", "chunked", "exact", "topk"])
def test_the_loss_reads_both_models_pictures_at_the_completion_tokens(tmp_path, tiny_vl, processor, loss_impl):
    """Every loss implementation (top-k with K = the vocabulary) equals the generalized JSD of the two models'
    own logits (each run on the prompt with its pictures) over the completion tokens; another picture gives
    another loss."""
    student, teacher = load(tiny_vl, "student"), load(tiny_vl, "teacher")
    loaded = examples(tmp_path, processor, rows(tiny_vl))
    flags = {"gkd_logits_topk": VOCAB} if loss_impl == "topk" else {"loss_impl": loss_impl}
    trainer = make_trainer(tmp_path, processor, student, teacher, loaded, **flags)
    assert trainer.loss_impl == loss_impl
    batch = image_batch(trainer, loaded)
    jsd, _ = trainer._loss_sums(trainer.model, batch, sft=False)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **batch["pixel_inputs"]}
    counted = batch["labels"][:, 1:].ne(-100)
    with torch.no_grad():
        student_logits, teacher_logits = student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1]
        want = generalized_jsd_loss(student_logits[counted], teacher_logits[counted], beta=0.5, reduction="sum")
    torch.testing.assert_close(jsd.detach(), want, rtol=1e-5, atol=1e-6)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert not batch["labels"][batch["input_ids"] == image_id].ne(-100).any()  # image tokens carry no loss
    others = [e["images"] for e in loaded][1:] + [loaded[0]["images"]]  # each row another row's picture
    other_jsd, _ = trainer._loss_sums(trainer.model, image_batch(trainer, loaded, others), sft=False)
    assert abs(float(other_jsd) - float(jsd)) > 1e-3  # (exactly equal if the pictures were dropped)


@pytest.mark.parametrize("loss_impl, teacher_prompt", [("fused", False), ("chunked", False), ("fused", True)])
def test_padding_free_rows_with_pictures_give_the_padded_loss_and_gradient(tmp_path, tiny_vl, processor, loss_impl,
                                                                         teacher_prompt):
    """--padding_free: the rows as one sequence, their pictures in order as one row's; with a teacher prompt
    (OPSD) the teacher's padded view keeps its pictures row by row."""
    data_rows = rows(tiny_vl)
    data_rows[1] = {**data_rows[1], "images": data_rows[1]["images"] + data_rows[2]["images"]}  # two pictures
    if teacher_prompt:
        data_rows[0] = {**data_rows[0], "teacher_prompt": "<image>describe the picture, the answer is near."}
    loaded = examples(tmp_path, processor, data_rows)
    results = []
    for padding_free in (False, True):
        student = load(tiny_vl, "student")
        trainer = make_trainer(tmp_path, processor, student, load(tiny_vl, "teacher"), loaded, loss_impl=loss_impl)
        trainer.padding_free = padding_free  # (what --padding_free sets)
        batch = trainer._tensors([e["prompt_ids"] for e in loaded], [e["completion_ids"] for e in loaded],
                                 teacher_prompts=[e["teacher_prompt_ids"] for e in loaded],
                                 images=[e["images"] for e in loaded])
        batch["from_student"] = torch.ones(len(loaded), dtype=torch.bool)
        jsd, _ = trainer._loss_sums(trainer.model, batch, sft=False)
        jsd.backward()
        results.append((jsd.detach(), {name: p.grad for name, p in student.named_parameters() if p.grad is not None}))
    (padded, padded_grads), (packed, packed_grads) = results
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def tiled_teacher(tiny_vl, tmp_path):
    """The tiny teacher, its processor cutting each picture (upscaled to 64 pixels) into 2 x 2 tiles plus the
    whole: 20 image tokens and their tile markers where the student's processor writes 4."""
    folder = tmp_path / "tiled-teacher"
    shutil.copytree(tiny_vl / "teacher", folder)
    settings = json.loads((folder / "processor_config.json").read_text())
    settings["image_processor"].update(do_image_splitting=True, size={"longest_edge": 64})
    (folder / "processor_config.json").write_text(json.dumps(settings))
    return folder


@pytest.mark.parametrize("padding_free", [False, True])
def test_a_teacher_with_its_own_processor_is_compared_at_the_completion_tokens(tmp_path, tiny_vl, processor,
                                                                             padding_free):
    """Each model reads the pictures through its own processor: the loss is the generalized JSD of the student's
    logits on its prompt and the teacher's on the prompt its own processor writes, at the same completion
    tokens (reference: each row run alone, the teacher's inputs straight from its processor)."""
    folder = tiled_teacher(tiny_vl, tmp_path)
    teacher_processor = AutoProcessor.from_pretrained(folder)
    loaded = examples(tmp_path, processor, rows(tiny_vl), teacher_processor=teacher_processor)
    student, teacher = load(tiny_vl, "student"), AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    trainer = make_trainer(tmp_path, processor, student, teacher, loaded, teacher_processor=teacher_processor)
    assert trainer.teacher_engine.processor is teacher_processor  # seq_kd samples read the teacher's tiles too
    trainer.padding_free = padding_free
    batch = trainer._tensors([e["prompt_ids"] for e in loaded], [e["completion_ids"] for e in loaded],
                             teacher_prompts=[e["teacher_prompt_ids"] for e in loaded],
                             images=[e["images"] for e in loaded])
    batch["from_student"] = torch.zeros(len(loaded), dtype=torch.bool)
    jsd, _ = trainer._loss_sums(trainer.model, batch, sft=False)
    want = torch.zeros(())
    for row, example in zip(rows(tiny_vl), loaded):
        pictures = [[open_image(reference) for reference in example["images"]]]
        completion = example["completion_ids"]
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "please describe the image."}]}]
        assert row["messages"][0]["content"] == "<image>please describe the image."
        own = teacher_processor(text=[teacher_processor.apply_chat_template(prompt, add_generation_prompt=True,
                                                                            tokenize=False)],
                                images=pictures, return_tensors="pt", add_special_tokens=False)
        assert own["input_ids"].shape[1] > len(example["prompt_ids"]) + 60  # 16 more image tokens, tile markers
        student_inputs = processor.image_processor(pictures, return_tensors="pt")
        with torch.no_grad():
            student_logits = student(input_ids=torch.tensor([example["prompt_ids"] + completion]),
                                     **student_inputs).logits[0, -len(completion) - 1 : -1]
            own_ids = torch.cat([own["input_ids"], torch.tensor([completion])], dim=1)
            teacher_logits = teacher(input_ids=own_ids, pixel_values=own["pixel_values"],
                                     pixel_attention_mask=own["pixel_attention_mask"]).logits[0, -len(completion) - 1 : -1]
        want += generalized_jsd_loss(student_logits, teacher_logits, beta=0.5, reduction="sum")
    torch.testing.assert_close(jsd.detach(), want, rtol=1e-5, atol=1e-5)


def test_generation_reads_the_picture(tmp_path, tiny_vl, processor):
    """The student's engine, greedy: what generate writes with the row's pixel inputs, and (for some row)
    something else with another picture."""
    from gkd.sampling import SamplingSettings

    teacher = load(tiny_vl, "teacher")
    loaded = examples(tmp_path, processor, rows(tiny_vl, 8))
    trainer = make_trainer(tmp_path, processor, teacher, load(tiny_vl, "teacher"), loaded)
    greedy = SamplingSettings(max_new_tokens=12, temperature=0.0, stop_token_ids=(processor.tokenizer.eos_token_id,))
    prompts, images = [e["prompt_ids"] for e in loaded], [e["images"] for e in loaded]
    generated = trainer.student_engine.generate(prompts, greedy, images=images)
    for prompt, pictures, completion in zip(prompts[:2], images, generated):
        inputs = processor.image_processor([[open_image(reference) for reference in pictures]], return_tensors="pt")
        want = teacher.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, **inputs,
                                eos_token_id=processor.tokenizer.eos_token_id)
        assert completion == want[0, len(prompt):].tolist()
    assert trainer.student_engine.generate(prompts, greedy, images=images[1:] + images[:1]) != generated


def test_samplers_never_draw_the_image_placeholder(tmp_path, tiny_vl, processor):
    """A drawn <image> would stand for a picture that is not there (the next forward fails on the count):
    hot sampling of the barely trained student, seeded, draws everything else but never it."""
    loaded = examples(tmp_path, processor, rows(tiny_vl, 16))
    trainer = make_trainer(tmp_path, processor, load(tiny_vl, "student"), load(tiny_vl, "teacher"), loaded,
                           temperature=4.0, max_completion_length=40)
    settings = trainer._sampling_settings()
    assert settings.suppressed_token_ids == (processor.tokenizer.convert_tokens_to_ids("<image>"),)
    completions = trainer.student_engine.generate([e["prompt_ids"] for e in loaded], settings, list(range(16)),
                                                  images=[e["images"] for e in loaded])
    drawn = {token for completion in completions for token in completion}
    assert len(drawn) > 150 and not drawn & set(settings.suppressed_token_ids)


def test_freezing_follows_ms_swifts_parts(tiny_vl):
    model = load(tiny_vl, "student")
    freeze_parts(model, frozen_parts(model, "student", freeze_llm=False, freeze_vit=True, freeze_aligner=True))
    trained = {name.split(".")[1] if name.startswith("model.") else name.split(".")[0]
               for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trained == {"text_model", "lm_head"}
    model = load(tiny_vl, "student")
    freeze_parts(model, frozen_parts(model, "student", freeze_llm=False, freeze_vit=True, freeze_aligner=False))
    assert all(parameter.requires_grad for name, parameter in model.named_parameters() if "connector" in name)
    assert not any(parameter.requires_grad for name, parameter in model.named_parameters() if "vision_model" in name)


# ----------------------------------------------------------------------------- gkd-train


def flags(tiny_vl, output_dir, *extra):
    return ["--model", tiny_vl / "student", "--teacher_model", tiny_vl / "teacher", "--dataset",
            tiny_vl / "data" / "train.jsonl", "--output_dir", output_dir, "--max_steps", 2,
            "--per_device_train_batch_size", 4, "--max_completion_length", 12, "--report_to", "none",
            "--torch_dtype", "float32", "--save_steps", 2, *extra]


@pytest.mark.parametrize("source", ["dataset", "student", "teacher"])
def test_each_source_trains_reloads_and_captions_a_picture(tmp_path, tiny_vl, processor, source):
    extra = {"dataset": ["--lmbda", 0], "student": ["--lmbda", 1], "teacher": ["--lmbda", 0, "--seq_kd", "true"]}
    result = gkd_train(*flags(tiny_vl, tmp_path / "run", *extra[source], "--add_version", "false"))
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [line for line in map(json.loads, (tmp_path / "run" / "logging.jsonl").read_text().splitlines())
            if f"samples_{source}" in line]
    others = {"dataset", "student", "teacher"} - {source}
    assert sum(line[f"samples_{source}"] for line in logs) > 0 and all(line["jsd_loss"] > 0 for line in logs)
    assert not any(line[f"samples_{other}"] for line in logs for other in others)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "run")  # the student, with its processor
    reloaded = AutoProcessor.from_pretrained(tmp_path / "run")
    row = rows(tiny_vl, 1, "val")[0]
    text = reloaded.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
                                         row["messages"][0]["content"].replace("<image>", "")}]}],
                                        add_generation_prompt=True, tokenize=False)
    inputs = reloaded(text=[text], images=[[open_image(row["images"][0])]], return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=4, do_sample=False).shape[1] > inputs["input_ids"].shape[1]


def test_lora_adapters_go_where_ms_swift_puts_them(tmp_path, tiny_vl):
    """--tuner_type lora with the default all-linear: adapters on the language model's linear layers only (the
    vision tower and aligner are frozen by default); the merged student saves with its processor."""
    result = gkd_train(*flags(tiny_vl, tmp_path / "run", "--tuner_type", "lora", "--lmbda", 0.5,
                              "--add_version", "false"))
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors", "pt") as adapter:
        names = list(adapter.keys())
    assert names and all(".text_model." in name for name in names)
    assert any(".mlp." in name for name in names) and any(".self_attn." in name for name in names)
    AutoModelForImageTextToText.from_pretrained(tmp_path / "run")
    AutoProcessor.from_pretrained(tmp_path / "run")


def test_a_teacher_with_its_own_processor_writes_its_samples_from_its_own_tiles(tmp_path, tiny_vl):
    """seq_kd with the tiled teacher, padding-free: its samples are generated from its own prompts and pixel
    inputs (the student's would not fit its 20 image tokens a picture) and distilled."""
    result = gkd_train(*flags(tiny_vl, tmp_path / "run", "--teacher_model", tiled_teacher(tiny_vl, tmp_path),
                              "--lmbda", 0, "--seq_kd", "true", "--padding_free", "true", "--add_version", "false"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encodes pictures unlike the student" in result.stderr
    logs = [line for line in map(json.loads, (tmp_path / "run" / "logging.jsonl").read_text().splitlines())
            if "samples_teacher" in line]
    assert all(line["samples_teacher"] > 0 and line["jsd_loss"] > 0 for line in logs) and logs


def test_what_gkd_cannot_feed_images_to_is_refused_in_one_line(tmp_path, tiny_vl, tiny):
    image_rows = str(tiny_vl / "data" / "train.jsonl")
    text_models = ["--model", str(tiny / "student"), "--teacher_model", str(tiny / "teacher")]
    cases = {
        "text student": ([*text_models, "--dataset", image_rows],
                         f"{image_rows}:1: the row has images, and --model {tiny / 'student'} reads text alone"),
        "text teacher": (["--teacher_model", str(tiny / "teacher")],
                         f"--teacher_model {tiny / 'teacher'}: it reads text alone, and the rows have images"),
    }
    base = [str(value) for value in flags(tiny_vl, tmp_path / "run")]
    assert_refused_in_one_line("gkd.cli.train", "gkd-train", {
        name: ([*base, *extra], message) for name, (extra, message) in cases.items()})
    assert not (tmp_path / "run").exists()  # nothing started


def test_gkd_infer_captions_each_picture_as_the_teacher_does(tmp_path, tiny_vl, processor):
    """gkd-infer, greedy: each response is what the teacher's own generate writes for the row's picture, and
    the row keeps its image references for gkd-train."""
    result = subprocess.run([sys.executable, "-m", "gkd.cli.infer", "--model", str(tiny_vl / "teacher"),
                             "--val_dataset", f"{tiny_vl / 'data' / 'val.jsonl'}#4", "--result_path",
                             str(tmp_path / "captions.jsonl"), "--max_new_tokens", "16", "--temperature", "0"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    teacher, tokenizer = load(tiny_vl, "teacher"), processor.tokenizer
    written = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert len(written) == 4
    for row in written:
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "please describe the image."}]}],
            add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], images=[[open_image(row["images"][0])]], return_tensors="pt")
        want = teacher.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=tokenizer.eos_token_id)
        assert row["response"] == tokenizer.decode(want[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert row["messages"][-1] == {"role": "assistant", "content": row["response"]}
