"""The trainer's loss: which implementation runs (decided by evaluating the models), and the
implementations agreeing with each other, and with hand computations, inside real steps (tiny models).

References are independent of the code under test: the exact loss (generalized_jsd_loss, itself
tested against a float64 definition in test_loss.py) on the models' own logits, F.cross_entropy or a
log-softmax written out, or the same run another way (without checkpointing, without a wrapper)."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM, FalconH1Config, FalconH1ForCausalLM, LlamaForCausalLM, TrainingArguments

from gkd.config import GKDArguments
from gkd.data import IGNORE_INDEX, build_batch
from gkd.tokenize import tokenize_messages
from gkd.errors import GKDUserError
from gkd.losses import LossBatch, LossSettings, choose_loss_impl, generalized_jsd_loss, make_loss
from gkd.teachers import Teacher
from gkd.trainer import GKDTrainer

COMPLETIONS = ["1", "22 + 22 = 44 and that is it", "3", "4 + 4 = 8"]
VOCAB = 320  # the tiny models' output rows (scripts/make_tiny_models.py)


# ----------------------------------------------------------------------------- models and helpers


class ScaledLlama(LlamaForCausalLM):
    """Logits multiplied after the head, as Falcon-H1's lm_head_multiplier or Granite's logits_scaling."""

    def forward(self, *args, logits_to_keep=0, **kwargs):
        output = super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)
        output.logits = output.logits * 0.5
        return output


class SoftcappedLlama(LlamaForCausalLM):
    """Logits soft-capped after the head at 30, as Gemma 2's final_logit_softcapping: at the tiny
    model's logits (|z| < 10) the cap changes them by under 4%, and near 0 by almost nothing."""

    def forward(self, *args, logits_to_keep=0, **kwargs):
        output = super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)
        output.logits = 30.0 * torch.tanh(output.logits / 30.0)
        return output


def load(tiny, name, cls=AutoModelForCausalLM, dtype=torch.float32):
    return cls.from_pretrained(tiny / name, dtype=dtype)


def tiny_falcon_h1():
    """A real family whose logits are lm_head(h) * lm_head_multiplier (random weights, CPU-sized)."""
    torch.manual_seed(0)
    config = FalconH1Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
        mamba_n_groups=1, mamba_chunk_size=8, lm_head_multiplier=0.5, tie_word_embeddings=False,
    )
    return FalconH1ForCausalLM(config)


def student_of(kind, tiny):
    if kind == "falcon_h1":
        return tiny_falcon_h1()
    return load(tiny, "student", {"scaled_llama": ScaledLlama, "softcapped_llama": SoftcappedLlama}.get(
        kind, AutoModelForCausalLM))


def make_examples(tokenizer, completions=COMPLETIONS):
    examples = []
    for index, completion in enumerate(completions):
        prompt_ids, completion_ids = tokenize_messages(
            tokenizer, [{"role": "user", "content": f"What is {index} + {index}?"}], completion,
            (tokenizer.eos_token_id,))
        examples.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids})
    return examples


def make_trainer(tmp_path, tokenizer, student, teacher, examples=None, *, batch_size=4, bf16=False,
                 gradient_checkpointing=False, teacher_processor=None, **flags):
    """tokenizer: or a vision-language model's processor (teacher_processor: the teacher's own, if another)."""
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch_size, max_steps=1, optim="sgd",
        learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to="none",
        save_strategy="no", seed=11, disable_tqdm=True, logging_steps=1, bf16=bf16, use_cpu=True,
        gradient_checkpointing=gradient_checkpointing,
    )
    gkd_args = GKDArguments(**{"lmbda": 0.0, "max_completion_length": 8, "loss_temperature": 1.0, **flags})
    return GKDTrainer(
        model=student, teacher_model=teacher, args=args, gkd_args=gkd_args,
        stop_token_ids=(getattr(tokenizer, "tokenizer", tokenizer).eos_token_id,), compared_vocab_size=VOCAB,
        train_dataset=examples or make_examples(tokenizer), processing_class=tokenizer,
        teacher_processor=teacher_processor,
    )


def dataset_batch(tokenizer, from_student=None):
    examples = make_examples(tokenizer)
    batch = build_batch([e["prompt_ids"] for e in examples], [e["completion_ids"] for e in examples],
                        tokenizer.pad_token_id)
    batch["from_student"] = torch.zeros(len(examples), dtype=torch.bool) if from_student is None else from_student
    return batch


def exact_sums(student, teacher, batch, beta=0.5, sft_rows=None):
    """The reference: the exact loss on both models' own logits, and F.cross_entropy at the SFT rows."""
    forward = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    student_logits = student(**forward).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(**forward).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    jsd = generalized_jsd_loss(student_logits, teacher_logits, labels, beta=beta, reduction="sum")
    if sft_rows is None:
        return jsd, None
    sft_labels = labels.masked_fill(~sft_rows[:, None], IGNORE_INDEX)
    return jsd, F.cross_entropy(student_logits.flatten(0, 1).float(), sft_labels.flatten(), reduction="sum")


def relative_error(got, want):
    return float((got.double() - want.double()).norm() / want.double().norm())


class LargeTensors(TorchDispatchMode):
    """Records every new tensor (not a view of an input) whose last dimension is the vocabulary and
    which holds at least `rows` such rows: the logits-sized allocations of what runs inside."""

    def __init__(self, rows: int, vocab: int = VOCAB):
        super().__init__()
        self.rows, self.vocab, self.seen = rows, vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[-1] == self.vocab \
                    and tensor.numel() >= self.rows * self.vocab \
                    and tensor.untyped_storage().data_ptr() not in inputs:
                self.seen.append((str(func), tuple(tensor.shape)))
        return out


# ----------------------------------------------------------------------------- the choice, by evaluation


@pytest.mark.parametrize("kind", ["scaled_llama", "softcapped_llama", "falcon_h1", "scaled_teacher"])
def test_models_that_transform_their_logits_are_not_fused(tmp_path, tiny, tokenizer, kind, caplog):
    """Bug: the config-attribute check fused Falcon-H1 (lm_head_multiplier) and any model whose forward
    rescales or caps logits under another name. Now decided by evaluating the models."""
    student = student_of("plain" if kind == "scaled_teacher" else kind, tiny)
    teacher = load(tiny, "teacher", ScaledLlama if kind == "scaled_teacher" else AutoModelForCausalLM)
    with caplog.at_level(logging.INFO, logger="gkd"):
        trainer = make_trainer(tmp_path, tokenizer, student, teacher)
    assert trainer.loss_impl == "chunked"
    assert "loss implementation: chunked" in caplog.text
    assert "rescales or caps its logits after the LM head" in caplog.text

    with pytest.raises(GKDUserError) as refused:
        make_trainer(tmp_path, tokenizer, student, teacher, loss_impl="fused")
    message = str(refused.value)
    assert message.startswith("--loss_impl fused: ") and message.endswith("; use --loss_impl chunked")
    assert "\n" not in message and "rescales or caps its logits after the LM head" in message


def test_fused_where_the_logits_are_the_head_of_the_last_hidden_state(tmp_path, tiny, tokenizer, caplog):
    student, teacher = load(tiny, "student"), load(tiny, "teacher")
    student.config.final_logit_softcapping = 30.0  # a config field Llama's forward never reads: no reason not to fuse
    with caplog.at_level(logging.INFO, logger="gkd"):
        assert make_trainer(tmp_path, tokenizer, student, teacher).loss_impl == "fused"
    assert "loss implementation: fused" in caplog.text


def test_fusing_a_scaled_model_would_compute_another_loss(tiny, tokenizer):
    """Why the choice matters: on a model that halves its logits after the head the chunked loss is the
    exact loss of the model's logits, while a fused one (forced here) would distil lm_head(h) instead."""
    student, teacher = load(tiny, "student", ScaledLlama), load(tiny, "teacher")
    batch = dataset_batch(tokenizer)
    want, _ = exact_sums(student, teacher, batch)
    settings = LossSettings(beta=0.5, temperature=1.0, vocab_size=VOCAB)
    loss_batch = LossBatch(batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        chunked = make_loss("chunked", settings)(student, Teacher(teacher), loss_batch).jsd
        fused = make_loss("fused", settings)(student, Teacher(teacher), loss_batch).jsd
    torch.testing.assert_close(chunked, want.detach(), rtol=1e-5, atol=1e-6)
    assert abs(float(fused) - float(want)) > 0.01 * float(want)


# ----------------------------------------------------------------------------- steps under bf16, checkpointing


def one_step(tmp_path, tiny, tokenizer, **flags):
    """Parameter updates (SGD, lr 1: minus the gradient) and the logged JSD of one training step."""
    student, teacher = load(tiny, "student"), load(tiny, "teacher")
    before = {name: param.detach().clone() for name, param in student.named_parameters()}
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, **flags)
    assert trainer.loss_impl == flags["loss_impl"]
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "jsd_loss" in entry)
    return {name: param.detach() - before[name] for name, param in student.named_parameters()}, log


def test_bf16_step_agrees_across_implementations(tmp_path, tiny, tokenizer):
    """Under bf16 autocast every implementation distils the same bf16 logits (the fused one projects in
    bf16 too), so the logged losses agree to float32 summation order (1e-4 relative: they are rounded
    to 6 digits). The updates agree to the bf16 rounding of the logits' gradient before the head's
    GEMMs, which each implementation does at a different point of its scaling: about 2^-9 relative
    per element, so 1e-2 relative (in norm, per parameter) with margin; a float32 head, as the fused
    loss used to run under autocast, moves the head's update by more (see test_loss_lean.py)."""
    runs = {impl: one_step(tmp_path / impl, tiny, tokenizer, bf16=True, loss_impl=impl, sft_alpha=0.3)
            for impl in ("exact", "chunked", "fused")}
    updates, log = runs["exact"]
    for impl in ("chunked", "fused"):
        got_updates, got_log = runs[impl]
        for key in ("jsd_loss", "sft_loss"):
            assert got_log[key] == pytest.approx(log[key], rel=1e-4), (impl, key)
        for name, update in updates.items():
            assert relative_error(got_updates[name], update) < 1e-2, (impl, name)


def test_the_fused_loss_projects_in_the_autocast_dtype_in_a_bf16_step(tmp_path, tiny, tokenizer, monkeypatch):
    """accelerate casts only inside the prepared model's forward; the fused loss projects the heads outside
    it, so the trainer runs the loss under the accelerator's autocast: the head GEMMs are bf16, as the
    models' own heads would be, though the student's master weights are float32."""
    import gkd.losses.fused as fused

    seen = []
    original = fused.gemm_dtype
    monkeypatch.setattr(fused, "gemm_dtype", lambda *args: seen.append(original(*args)) or seen[-1])
    one_step(tmp_path, tiny, tokenizer, bf16=True, loss_impl="fused", sft_alpha=0.3)
    assert seen and set(seen) == {torch.bfloat16}


def test_data_parallel_replicas_get_the_chunked_loss(tiny):
    """torch DataParallel splits a batch between replicas, each decoder seeing a slice: no single final
    hidden state for the fused loss, so it is chunked by default and refused when asked for."""
    student, teacher = load(tiny, "student"), load(tiny, "teacher")
    assert choose_loss_impl(None, None, student, teacher, 320) == "fused"
    assert choose_loss_impl(None, None, student, teacher, 320, replicas=2) == "chunked"
    with pytest.raises(GKDUserError, match="--loss_impl fused: single-process training over 2 GPUs"):
        choose_loss_impl("fused", None, student, teacher, 320, replicas=2)


def test_gradient_checkpointing_with_the_fused_loss_changes_nothing(tmp_path, tiny, tokenizer):
    plain, _ = one_step(tmp_path / "plain", tiny, tokenizer, loss_impl="fused", sft_alpha=0.3)
    checkpointed, _ = one_step(tmp_path / "checkpointed", tiny, tokenizer, loss_impl="fused", sft_alpha=0.3,
                               gradient_checkpointing=True)
    for name, update in plain.items():
        torch.testing.assert_close(checkpointed[name], update, rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- wrappers: LoRA, DDP


def test_lora_fused_equals_lora_exact(tmp_path, tiny, tokenizer):
    peft = pytest.importorskip("peft")
    teacher = load(tiny, "teacher")
    batch = dataset_batch(tokenizer)
    sums, grads = {}, {}
    for impl in ("fused", "exact"):
        torch.manual_seed(3)  # the same LoRA weights; both A and B random, so both get gradients
        student = peft.get_peft_model(load(tiny, "student"), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        trainer = make_trainer(tmp_path / impl, tokenizer, student, teacher, loss_impl=impl, sft_alpha=0.3)
        jsd, sft = trainer._loss_sums(trainer.model, batch)
        (jsd + 0.3 * sft).backward()
        sums[impl] = (jsd.detach(), sft.detach())
        grads[impl] = {name: param.grad for name, param in student.named_parameters() if param.requires_grad}
    assert all("lora_" in name for name in grads["exact"]) and len(grads["exact"]) == 8
    for got, want in zip(sums["fused"], sums["exact"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, want in grads["exact"].items():
        assert want.abs().max() > 0, name
        torch.testing.assert_close(grads["fused"][name], want, rtol=1e-4, atol=1e-7, msg=name)


def test_fused_reads_the_last_hidden_state_through_a_ddp_wrapper(tiny, tokenizer):
    """The student is called through its DDP wrapper (whose forward must run), the final hidden state is
    read by a hook inside, and no forward is asked for every layer's hidden states."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from conftest import free_port

    teacher, batch = load(tiny, "teacher"), dataset_batch(tokenizer)
    loss = make_loss("fused", LossSettings(beta=0.5, temperature=1.0, vocab_size=VOCAB, sft_alpha=0.3))
    loss_batch = LossBatch(batch["input_ids"], batch["attention_mask"], batch["labels"], ~batch["from_student"])
    asked = []
    results = []
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        for wrap in (False, True):
            student = load(tiny, "student")
            for model in (student, teacher):
                model.model.register_forward_pre_hook(lambda module, args, kwargs: asked.append(dict(kwargs)),
                                                      with_kwargs=True)
            called = student if not wrap else DistributedDataParallel(student)
            wrapper_calls = []
            called.register_forward_pre_hook(lambda module, args: wrapper_calls.append(module))
            jsd, sft = loss(called, Teacher(teacher), loss_batch, student_module=student)
            (jsd + 0.3 * sft).backward()
            assert len(wrapper_calls) == 1
            results.append((jsd.detach(), sft.detach(), {n: p.grad for n, p in student.named_parameters()}))
    finally:
        dist.destroy_process_group()
    assert asked and not any(kwargs.get("output_hidden_states") for kwargs in asked)
    (jsd, sft, grads), (wrapped_jsd, wrapped_sft, wrapped_grads) = results
    torch.testing.assert_close(wrapped_jsd, jsd, rtol=1e-6, atol=0)
    torch.testing.assert_close(wrapped_sft, sft, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(wrapped_grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)


# ----------------------------------------------------------------------------- the SFT term


@pytest.mark.parametrize("loss_impl", ["fused", "chunked", "exact"])
def test_student_samples_get_no_cross_entropy(tmp_path, tiny, tokenizer, loss_impl):
    """lmbda 0.5: the step's samples are a mix of the student's own and the dataset's; the SFT sum is the
    cross-entropy of the dataset's completion tokens only, written out here as -log_softmax at the label."""
    student, teacher = load(tiny, "student"), load(tiny, "teacher")
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, lmbda=0.5, sft_alpha=0.3, loss_impl=loss_impl)
    (batch,), _ = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 1, torch.device("cpu"))
    from_student = batch["from_student"]
    assert from_student.any() and not from_student.all()  # seed 11 draws both kinds
    with torch.no_grad():
        jsd, sft = trainer._loss_sums(trainer.model, batch)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    log_probs = logits.log_softmax(-1)
    hand, everything = 0.0, 0.0
    for row in range(len(from_student)):
        for position in range(batch["labels"].shape[1] - 1):
            label = int(batch["labels"][row, position + 1])
            if label == IGNORE_INDEX:
                continue
            term = -float(log_probs[row, position, label])
            everything += term
            hand += 0.0 if from_student[row] else term
    assert float(sft) == pytest.approx(hand, rel=1e-5)
    assert abs(everything - hand) > 0.1 * hand  # the student's rows would have counted for something
    want_jsd, _ = exact_sums(student, teacher, batch)
    assert float(jsd) == pytest.approx(float(want_jsd), rel=1e-5)


def test_evaluation_computes_no_cross_entropy(tmp_path, tiny, tokenizer):
    student, teacher = load(tiny, "student"), load(tiny, "teacher")
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, sft_alpha=0.3, loss_impl="fused")
    seen, loss = [], trainer.gkd_loss
    trainer.gkd_loss = lambda *args, **kwargs: seen.append(args[2].sft_rows) or loss(*args, **kwargs)
    examples = make_examples(tokenizer)
    metrics = trainer.evaluate(examples)
    assert seen and all(rows is None for rows in seen)
    batch = dataset_batch(tokenizer)
    with torch.no_grad():
        jsd, _ = exact_sums(student, teacher, batch)
    assert metrics["eval_loss"] == pytest.approx(float(jsd) / int(batch["labels"].ne(IGNORE_INDEX).sum()), rel=1e-5)


# ----------------------------------------------------------------------------- no logits-sized copies


def test_fused_sft_builds_no_logits(tmp_path, tiny, tokenizer):
    """--sft_alpha > 0 with the fused loss: the cross-entropy is computed chunk by chunk with the
    divergence, so no tensor with a row per SFT position and a column per vocabulary entry appears
    (the chunks have 4 rows here); the value and gradient still equal the exact loss + F.cross_entropy."""
    student, teacher = load(tiny, "student"), load(tiny, "teacher")
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, sft_alpha=0.3, loss_impl="fused", loss_chunk_size=4)
    batch = dataset_batch(tokenizer)
    sft_positions = int(batch["labels"].ne(IGNORE_INDEX).sum())
    assert sft_positions > 6 * 4  # more rows than the chunk's six (4, V) buffers hold together
    with LargeTensors(sft_positions) as large:
        jsd, sft = trainer._loss_sums(trainer.model, batch)
        (jsd + 0.3 * sft).backward()
    assert large.seen == []
    grads = {name: param.grad.clone() for name, param in student.named_parameters()}
    student.zero_grad()
    want_jsd, want_sft = exact_sums(student, teacher, batch, sft_rows=~batch["from_student"])
    (want_jsd + 0.3 * want_sft).backward()
    torch.testing.assert_close(jsd, want_jsd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sft, want_sft, rtol=1e-5, atol=1e-6)
    # atol 1e-6: the embedding's gradient sums the chunks in another order; on some CPUs one entry of ~1e-3
    # came out 3e-7 apart. A wrong chunk would be ~1e-3 off.
    for name, param in student.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_copies_no_logits(tmp_path, tiny, tokenizer):
    """The chunked loss reads the logits where the model wrote them (the labels are shifted, not the
    logits, and the compared vocabulary is sliced chunk by chunk): the only logits-sized tensors of a
    forward and backward are the two models' logits and the gradient buffer."""
    student, teacher = load(tiny, "student"), load(tiny, "teacher")
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, sft_alpha=0.3, loss_impl="chunked",
                           loss_chunk_size=4)
    batch = dataset_batch(tokenizer)
    rows, length = batch["input_ids"].shape
    with LargeTensors(rows * (length - 1)) as large:
        jsd, sft = trainer._loss_sums(trainer.model, batch)
        (jsd + 0.3 * sft).backward()
    assert len(large.seen) == 3, large.seen
