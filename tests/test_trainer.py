"""GKDTrainer: source selection, loss normalisation over the optimizer step, the teacher, generation."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from gkd.config import GKDArguments
from gkd.data import IGNORE_INDEX, build_batch, tokenize_messages
from gkd.errors import GKDUserError
from gkd.loss import generalized_jsd_loss
from gkd.models import check_vocabularies
from gkd.sampling import SamplingSettings, TransformersEngine
from gkd.trainer import GKDTrainer, sample_source


# ----------------------------------------------------------------------------- source selection


@pytest.mark.parametrize("lmbda", [0.0, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("seq_kd", [False, True])
def test_student_share_matches_lmbda(lmbda, seq_kd):
    draws = 20_000
    sources = [sample_source(7, step, index, lmbda, seq_kd) for step in range(40) for index in range(draws // 40)]
    share = sources.count("student") / draws
    # Binomial: 5 standard deviations, so this fails by chance about once in 3 million runs.
    assert abs(share - lmbda) <= 5 * math.sqrt(lmbda * (1 - lmbda) / draws)
    other = "teacher" if seq_kd else "dataset"
    assert sources.count("student") + sources.count(other) == draws


def test_source_sequence_repeats_and_depends_on_step_and_index():
    first = [sample_source(3, step, index, 0.5, False) for step in range(5) for index in range(16)]
    again = [sample_source(3, step, index, 0.5, False) for step in range(5) for index in range(16)]
    assert first == again
    other_seed = [sample_source(4, step, index, 0.5, False) for step in range(5) for index in range(16)]
    assert first != other_seed
    # Step 3 alone (as a run resumed at step 3 would draw it) equals step 3 inside the full run.
    assert [sample_source(3, 3, index, 0.5, False) for index in range(16)] == first[48:64]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def models(tiny):
    student = AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=torch.float32)
    return student, teacher


def make_examples(tokenizer, completions):
    stop_ids = (tokenizer.eos_token_id,)
    examples = []
    for index, completion in enumerate(completions):
        prompt_ids, completion_ids = tokenize_messages(
            tokenizer, [{"role": "user", "content": f"What is {index} + {index}?"}], completion, stop_ids
        )
        examples.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids})
    return examples


def make_trainer(tmp_path, tokenizer, student, teacher, examples, *, batch_size, accumulation, **gkd_flags):
    args = TrainingArguments(
        output_dir=str(tmp_path / f"out-{batch_size}-{accumulation}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to="none", save_strategy="no",
        seed=11, disable_tqdm=True,
    )
    gkd_args = GKDArguments(**{"lmbda": 0.0, "max_completion_length": 8, **gkd_flags})
    return GKDTrainer(
        model=student, teacher_model=teacher, args=args, gkd_args=gkd_args,
        stop_token_ids=(tokenizer.eos_token_id,), compared_vocab_size=student.config.vocab_size,
        train_dataset=examples, processing_class=tokenizer,
    )


# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "beta, sft_alpha, loss_impl",
    [(0.5, 0.0, "fused"), (0.0, 0.3, "fused"), (1.0, 0.0, "fused"), (0.5, 0.3, "chunked"), (0.9, 0.0, "exact"),
     (0.5, 0.3, "topk")],
)
def test_one_step_equals_the_per_token_mean_over_the_whole_step(tmp_path, tiny, tokenizer, beta, sft_alpha,
                                                                 loss_impl):
    """Four samples of very different completion lengths: one step of batch 4, of batch 2 x 2 accumulated,
    and of batch 1 x 4 accumulated must all move the weights as the gradient of
    (sum of per-token losses over the 4 samples) / (their completion tokens) does, whichever loss
    implementation computes it (top-k with K = the whole vocabulary is exact)."""
    flags = {"loss_impl": None, "gkd_logits_topk": 320} if loss_impl == "topk" else {"loss_impl": loss_impl}
    examples = make_examples(tokenizer, ["1", "22 + 22 = 44 and that is it", "3", "4 + 4 = 8"])

    reference, teacher = AutoModelForCausalLM.from_pretrained(tiny / "student"), AutoModelForCausalLM.from_pretrained(
        tiny / "teacher")
    batch = build_batch([e["prompt_ids"] for e in examples], [e["completion_ids"] for e in examples],
                        tokenizer.pad_token_id)
    labels = batch["labels"][:, 1:]
    student_logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    tokens = labels.ne(IGNORE_INDEX).sum()
    loss = generalized_jsd_loss(student_logits, teacher_logits, labels, beta=beta, reduction="sum") / tokens
    loss = loss + sft_alpha * torch.nn.functional.cross_entropy(
        student_logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum") / tokens
    loss.backward()
    expected = {name: param.detach() - 0.5 * param.grad for name, param in reference.named_parameters()}

    for batch_size, accumulation in [(4, 1), (2, 2), (1, 4)]:
        student = AutoModelForCausalLM.from_pretrained(tiny / "student")
        trainer = make_trainer(tmp_path, tokenizer, student, teacher, examples, batch_size=batch_size,
                               accumulation=accumulation, beta=beta, sft_alpha=sft_alpha, **flags)
        assert trainer.loss_impl == loss_impl
        trainer.train()
        for name, param in student.named_parameters():
            torch.testing.assert_close(param.detach(), expected[name], rtol=1e-4, atol=1e-6,
                                       msg=f"{name} with batch {batch_size} x {accumulation}")


def test_divisor_is_recounted_after_generation(tmp_path, tokenizer, models):
    student, teacher = models
    examples = make_examples(tokenizer, ["x" * 30] * 4)  # long dataset completions, all replaced
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, examples, batch_size=2, accumulation=2, lmbda=1.0)
    batches, divisor = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 2, torch.device("cpu"))
    generated_tokens = sum(int(batch["labels"].ne(IGNORE_INDEX).sum()) for batch in batches)
    assert int(divisor) == generated_tokens
    assert generated_tokens <= 4 * 8  # max_completion_length 8, not the dataset's 31 tokens
    assert all(batch["from_student"].all() for batch in batches)


def test_teacher_stays_frozen_in_eval_mode(tmp_path, tokenizer, models):
    student, teacher = models
    before = {name: param.clone() for name, param in teacher.named_parameters()}
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, make_examples(tokenizer, ["1", "2"]),
                           batch_size=2, accumulation=1)
    trainer.train()
    assert not trainer.teacher.training
    assert not any(param.requires_grad for param in teacher.parameters())
    assert all(torch.equal(param, before[name]) for name, param in teacher.named_parameters())


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_generated_completions_end_at_the_first_stop(tokenizer, models, pad_is_eos):
    student, _ = models
    eos = tokenizer.eos_token_id
    engine = TransformersEngine(student, eos if pad_is_eos else tokenizer.pad_token_id)
    prompts = [make_examples(tokenizer, ["a"] * 6)[index]["prompt_ids"] for index in range(6)]
    settings = SamplingSettings(max_new_tokens=12, temperature=1.5, stop_token_ids=(eos,), seed=5)
    completions = engine.generate(prompts, settings)
    assert len(completions) == 6
    for completion in completions:
        assert 1 <= len(completion) <= 12
        assert eos not in completion[:-1]  # a stop only ever stands last
    assert any(completion[-1] == eos for completion in completions) or all(len(c) == 12 for c in completions)


def test_seeded_generation_repeats_and_leaves_the_training_rng_alone(tokenizer, models):
    student, _ = models
    engine = TransformersEngine(student, tokenizer.pad_token_id)
    prompts = [example["prompt_ids"] for example in make_examples(tokenizer, ["a", "b", "c"])]
    settings = SamplingSettings(max_new_tokens=10, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,), seed=9)
    torch.manual_seed(0)
    first = engine.generate(prompts, settings)
    after_first = torch.rand(1)
    torch.manual_seed(0)
    assert engine.generate(prompts, settings) == first
    assert torch.equal(torch.rand(1), after_first)
    greedy = SamplingSettings(max_new_tokens=10, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,))
    assert engine.generate(prompts, greedy) == engine.generate(prompts[::-1], greedy)[::-1]


# ----------------------------------------------------------------------------- vocabularies


def test_fused_is_the_default_where_the_heads_allow_it(tmp_path, tokenizer, models):
    student, teacher = models
    examples = make_examples(tokenizer, ["1"])
    assert make_trainer(tmp_path, tokenizer, student, teacher, examples, batch_size=1, accumulation=1).loss_impl == "fused"
    student.config.final_logit_softcapping = 30.0  # as Gemma 2: the head's output is transformed
    assert make_trainer(tmp_path, tokenizer, student, teacher, examples, batch_size=1,
                        accumulation=1).loss_impl == "chunked"
    with pytest.raises(GKDUserError, match="--loss_impl fused: LlamaForCausalLM rescales or caps its logits"):
        make_trainer(tmp_path, tokenizer, student, teacher, examples, batch_size=1, accumulation=1, loss_impl="fused")


def test_padding_rows_are_tolerated_but_another_tokenizer_is_refused(tiny, tokenizer, models):
    student, teacher = models
    teacher.resize_token_embeddings(384)  # padding rows only: the tokenizer has 259 tokens
    assert check_vocabularies(tokenizer, tokenizer, student, teacher, "s", "t") == 320

    other = AutoTokenizer.from_pretrained(tiny / "teacher")
    other.add_tokens(["<extra>"])
    with pytest.raises(GKDUserError, match="tokenizer differs from the student's"):
        check_vocabularies(tokenizer, other, student, teacher, "s", "t")

    student.resize_token_embeddings(200)  # fewer rows than tokens
    with pytest.raises(GKDUserError, match="output layer has 200 rows but the tokenizer has 259"):
        check_vocabularies(tokenizer, tokenizer, student, teacher, "s", "t")


def test_eval_loss_is_per_completion_token_over_the_whole_set(tmp_path, tokenizer, models):
    student, teacher = models
    examples = make_examples(tokenizer, ["1", "22 + 22 = 44 and more words here", "3"])
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, examples, batch_size=2, accumulation=1)
    trainer.args.per_device_eval_batch_size = 2  # batches of 2 and 1: a mean of batch means would differ
    batch = build_batch([e["prompt_ids"] for e in examples], [e["completion_ids"] for e in examples],
                        tokenizer.pad_token_id)
    with torch.no_grad():
        logits = [m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                  for m in (student, teacher)]
    expected = generalized_jsd_loss(*logits, batch["labels"][:, 1:], beta=0.5).item()
    assert trainer.evaluate(examples)["eval_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss_impl", ["fused", "chunked"])
def test_offloaded_teacher_takes_the_same_steps(tmp_path, tiny, tokenizer, loss_impl):
    """--offload_teacher_model moves the teacher for each forward and generation, and back to CPU memory."""
    weights = []
    for offload in (False, True):
        student = AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)
        teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=torch.float32)
        examples = make_examples(tokenizer, ["1", "22 + 22 = 44", "3", "4 + 4 = 8"])
        trainer = make_trainer(tmp_path / str(offload), tokenizer, student, teacher, examples, batch_size=2,
                               accumulation=2, lmbda=0.0, seq_kd=True, loss_impl=loss_impl,
                               offload_teacher_model=offload)
        trainer.train()
        assert next(trainer.teacher.parameters()).device.type == "cpu"
        weights.append({name: parameter.detach().clone() for name, parameter in student.named_parameters()})
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
