"""Self-distillation (gkd/teachers/student.py): the live student as its own teacher (no --teacher_model), and
the student's base with its LoRA adapters off (--teacher_model equal to --model with LoRA), one copy of the
weights. References: the base model loaded a second time from disk, and the exact loss on its logits."""

import ast
import json

import torch

from gkd.config import TunerArguments
from gkd.models import apply_lora, disable_dropout
from gkd.sampling import SamplingSettings
from gkd.teachers import STUDENT, STUDENT_BASE
from conftest import write_jsonl
from test_cli import base_flags, gkd_train
from test_trainer_loss import dataset_batch, exact_sums, load, make_trainer


def lora_student(tiny):
    """The tiny student with LoRA adapters that already change its outputs (lora_B starts at zero)."""
    student = apply_lora(load(tiny, "student"), TunerArguments(tuner_type="lora", lora_rank=4, lora_alpha=8))
    torch.manual_seed(0)
    for name, param in student.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.5)
    disable_dropout(student)  # as gkd-train does: LoRA's dropout too
    return student


def test_the_live_student_is_its_own_teacher(tmp_path, tiny, tokenizer):
    """On the same prompt the teacher is the student: the divergence is 0 and so is its gradient (up to float
    rounding; a teacher that were not the student would give ~0.1); only
    sft_alpha's cross-entropy trains (its value and gradient are F.cross_entropy's)."""
    student = load(tiny, "student")
    trainer = make_trainer(tmp_path, tokenizer, student, STUDENT, sft_alpha=0.5, loss_impl="exact")
    assert trainer.teacher.model is student
    batch = dataset_batch(tokenizer)
    student.train()  # as in training: the teacher's forward runs in eval mode, then it comes back
    jsd, sft = trainer._loss_sums(trainer.model, batch)
    jsd.backward(retain_graph=True)
    assert abs(float(jsd)) < 1e-6  # float rounding of a divergence between equal distributions
    assert all(float(param.grad.abs().max()) < 1e-7 for param in student.parameters())
    _, want_sft = exact_sums(load(tiny, "student"), load(tiny, "teacher"), batch, sft_rows=~batch["from_student"])
    torch.testing.assert_close(sft, want_sft, rtol=1e-5, atol=1e-6)
    assert student.training


def test_the_lora_students_base_teaches_with_its_adapters_off(tmp_path, tiny, tokenizer):
    """The loss and the student's gradient equal those against the base model loaded again from disk, for the
    fused and the chunked loss, and no weight was copied: the teacher is the student module itself."""
    base = load(tiny, "student").eval()
    batch = dataset_batch(tokenizer)
    for loss_impl in ("fused", "chunked"):
        student = lora_student(tiny)
        trainer = make_trainer(tmp_path / loss_impl, tokenizer, student, STUDENT_BASE, loss_impl=loss_impl)
        assert trainer.loss_impl == loss_impl and trainer.teacher.model is student
        student.train()
        jsd, _ = trainer._loss_sums(trainer.model, batch)
        jsd.backward()
        grads = {name: param.grad.clone() for name, param in student.named_parameters() if param.grad is not None}
        student.zero_grad()
        want, _ = exact_sums(student, base, batch)
        want.backward()
        assert float(want) > 0.01  # the adapters do change the student
        torch.testing.assert_close(jsd, want, rtol=1e-5, atol=1e-6)
        assert grads and all("lora_" in name for name in grads)  # the base is frozen
        for name, param in student.named_parameters():
            if param.grad is not None:
                torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert student.training
        with torch.no_grad():  # the adapters are back on after the teacher's forward
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            assert not torch.allclose(student(**inputs).logits, base(**inputs).logits, atol=1e-3)


def test_seq_kd_with_the_students_base_generates_as_the_base(tmp_path, tiny, tokenizer):
    student = lora_student(tiny)
    trainer = make_trainer(tmp_path, tokenizer, student, STUDENT_BASE, seq_kd=True)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    settings = SamplingSettings(max_new_tokens=6, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,))
    with trainer.teacher.running():
        taught = trainer.teacher_engine.generate(prompts, settings)
    base = load(tiny, "student").eval()
    for prompt, completion in zip(prompts, taught):
        want = base.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert completion == want[0, len(prompt):].tolist()
    student_says = trainer.student_engine.generate(prompts, settings)
    assert student_says != taught  # the adapters change the greedy completions


def test_gkd_train_without_a_teacher_distils_the_privileged_view(tmp_path, tiny):
    """No --teacher_model, rows with a teacher_prompt (OPSD): the live student teaches itself from the
    privileged prompt, so the divergence is not 0. (The LoRA base as teacher runs in test_swift_examples'
    opsd.sh and under ZeRO-3 in test_sharding.)"""
    data = [{**json.loads(line), "teacher_prompt": "Answer exactly, then stop."}
            for line in (tiny / "data" / "train.jsonl").read_text().splitlines()[:16]]
    flags = base_flags(tiny, tmp_path / "live", dataset=write_jsonl(tmp_path / "opsd.jsonl", data))
    at = flags.index("--teacher_model")
    live = gkd_train(*flags[:at], *flags[at + 2:], "--max_steps", 2, "--lmbda", 1)
    assert live.returncode == 0, live.stderr[-3000:]
    assert "no --teacher_model: self-distillation" in live.stderr
    logs = [ast.literal_eval(line) for line in live.stdout.splitlines() if line.startswith("{'loss'")]
    # (transformers prints the logged numbers formatted, as strings)
    assert len(logs) == 2 and all(float(entry["jsd_loss"]) > 1e-4 for entry in logs)
