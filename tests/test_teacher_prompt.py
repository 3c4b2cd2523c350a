"""OPSD's privileged teacher prompt (a row's teacher_prompt column): the teacher reads its own prompt before the
student's completion, and the loss compares the two at the completion tokens. The reference runs each row
through both models by hand and takes the positions that predict the completion."""

import pytest
import torch

from gkd.data import collate_examples, load_examples
from gkd.errors import GKDUserError
from gkd.losses import generalized_jsd_loss, topk_generalized_jsd_loss
from gkd.teachers import STUDENT
from gkd.tokenize import tokenize_messages
from conftest import write_jsonl
from test_trainer_loss import VOCAB, load, make_trainer

QUESTIONS = ["What is 2 + 2?", "What is 13 + 29?", "Name a colour."]
COMPLETIONS = ["4", "42, since 13 + 29 = 42", "blue"]
TEACHER_PROMPTS = ["What is 2 + 2? The answer is 4.", None, "Name a colour. Say blue."]


def rows():
    return [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question},
                          {"role": "assistant", "content": completion}],
             **({} if teacher_prompt is None else {"teacher_prompt": teacher_prompt})}
            for question, completion, teacher_prompt in zip(QUESTIONS, COMPLETIONS, TEACHER_PROMPTS)]


def examples(tmp_path, tokenizer, data_rows, **settings):
    return load_examples([str(write_jsonl(tmp_path / "opsd.jsonl", data_rows))], tokenizer,
                         (tokenizer.eos_token_id,), seed=1, **settings)


def test_the_teacher_prompt_replaces_the_last_user_turn(tmp_path, tokenizer):
    loaded = examples(tmp_path, tokenizer, rows())
    for example, question, completion, teacher_prompt in zip(loaded, QUESTIONS, COMPLETIONS, TEACHER_PROMPTS):
        system = {"role": "system", "content": "Be brief."}
        prompt, completion_ids = tokenize_messages(tokenizer, [system, {"role": "user", "content": question}],
                                                   completion, (tokenizer.eos_token_id,))
        assert example["prompt_ids"] == prompt and example["completion_ids"] == completion_ids
        if teacher_prompt is None:
            assert example["teacher_prompt_ids"] is None
        else:
            want, _ = tokenize_messages(tokenizer, [system, {"role": "user", "content": teacher_prompt}], None, ())
            assert example["teacher_prompt_ids"] == want != prompt


@pytest.mark.parametrize("row, settings, expected", [
    ({"messages": [{"role": "user", "content": "q"}], "teacher_prompt": 3}, {},
     "opsd.jsonl:1: teacher_prompt must be a string"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "teacher_prompt": "t"},
     {}, "opsd.jsonl:1: the row has a teacher_prompt but no user turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "teacher_prompt": "t"},
     {"loss_scale": "default"}, "opsd.jsonl:1: a teacher_prompt row with --loss_scale default"),
])
def test_bad_teacher_prompts_are_one_line_with_the_row(tmp_path, tokenizer, row, settings, expected):
    with pytest.raises(GKDUserError) as error:
        examples(tmp_path, tokenizer, [row], need_completions=False, **settings)
    assert str(error.value).startswith(f"{tmp_path}/{expected}") and "\n" not in str(error.value)


def test_a_teacher_prompt_longer_than_max_length_drops_its_row(tmp_path, tokenizer):
    loaded = examples(tmp_path, tokenizer, rows())
    limit = max(len(example["prompt_ids"]) + len(example["completion_ids"]) for example in loaded)
    kept = examples(tmp_path, tokenizer, rows() + [{**rows()[1], "teacher_prompt": "long " * 200}], max_length=limit)
    assert len(kept) == 3


def reference_sums(student, teacher, batch_rows, topk=None):
    """Each row by hand: the student's logits on prompt + completion and the teacher's on teacher prompt +
    completion, at the positions that predict the completion's tokens."""
    student_rows, teacher_rows = [], []
    for prompt, teacher_prompt, completion in batch_rows:
        teacher_prompt = prompt if teacher_prompt is None else teacher_prompt
        for model, own_prompt, kept in ((student, prompt, student_rows), (teacher, teacher_prompt, teacher_rows)):
            logits = model(input_ids=torch.tensor([own_prompt + completion])).logits[0]
            kept.append(logits[len(own_prompt) - 1:len(own_prompt) + len(completion) - 1, :VOCAB])
    student_logits, teacher_logits = torch.cat(student_rows), torch.cat(teacher_rows).detach()
    if topk is not None:
        return topk_generalized_jsd_loss(student_logits, teacher_logits, topk=topk, beta=0.5, temperature=1.0,
                                         reduction="sum")
    return generalized_jsd_loss(student_logits, teacher_logits, beta=0.5, temperature=1.0, reduction="sum")


@pytest.mark.parametrize("loss_impl, topk, padding_free, teacher", [
    ("fused", None, False, "loaded"), ("chunked", None, False, "loaded"), ("exact", None, False, "student"),
    ("topk", 16, False, "loaded"), ("fused", None, True, "student"), ("chunked", None, True, "loaded"),
])
def test_the_loss_compares_both_views_at_the_completion_tokens(tmp_path, tiny, tokenizer, loss_impl, topk,
                                                             padding_free, teacher):
    """Every loss implementation, padded and padding-free, a loaded teacher and the live student: value and
    gradient equal the reference. Row 2 has no teacher prompt and shares the student's."""
    loaded = examples(tmp_path, tokenizer, rows())
    student = load(tiny, "student")
    teacher_model = load(tiny, "teacher") if teacher == "loaded" else STUDENT
    flags = {"loss_impl": loss_impl} if topk is None else {"gkd_logits_topk": topk}
    trainer = make_trainer(tmp_path, tokenizer, student, teacher_model, **flags)
    trainer.padding_free = padding_free  # (what --padding_free sets)
    prompts, completions = [e["prompt_ids"] for e in loaded], [e["completion_ids"] for e in loaded]
    teacher_prompts = [e["teacher_prompt_ids"] for e in loaded]
    inputs = trainer._tensors(prompts, completions, VOCAB, teacher_prompts=teacher_prompts)
    inputs["from_student"] = torch.ones(len(loaded), dtype=torch.bool)
    jsd, _ = trainer._loss_sums(trainer.model, inputs, sft=False)
    jsd.backward()
    grads = {name: param.grad.clone() for name, param in student.named_parameters()}
    student.zero_grad()
    reference_teacher = student if teacher == "student" else trainer.teacher.model
    want = reference_sums(student, reference_teacher, zip(prompts, teacher_prompts, completions), topk)
    want.backward()
    assert float(want) > 1e-4  # the views differ, so even the live student disagrees with itself (0 otherwise)
    torch.testing.assert_close(jsd, want, rtol=1e-5, atol=1e-6)
    for name, param in student.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_teacher_generates_from_its_own_prompt(tmp_path, tiny, tokenizer):
    """seq_kd: the teacher's engine is asked for each row's teacher prompt (its own prompt without one)."""
    loaded = examples(tmp_path, tokenizer, rows())
    trainer = make_trainer(tmp_path, tokenizer, load(tiny, "student"), load(tiny, "teacher"), seq_kd=True)
    asked = []
    trainer.teacher_engine.generate = lambda prompts, settings, seeds: asked.extend(prompts) or [[7]] * len(prompts)
    batch_samples = [collate_examples(loaded)]
    step = trainer._draw_step(batch_samples, global_step=0)
    trainer._complete_step(step)
    assert step.sources == [["teacher"] * 3]  # lmbda 0 with seq_kd
    assert asked == [loaded[0]["teacher_prompt_ids"], loaded[1]["prompt_ids"], loaded[2]["teacher_prompt_ids"]]
    assert batch_samples[0]["completion_ids"] == [[7]] * 3
