"""GKDTrainer: source selection, loss normalisation over the optimizer step, the teacher, generation."""

import dataclasses
import json
import math
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TrainerCallback, TrainingArguments

from gkd.config import GKDArguments
from gkd.data import IGNORE_INDEX, build_batch
from gkd.tokenize import tokenize_messages
from gkd.errors import GKDUserError
from gkd.losses import generalized_jsd_loss
from gkd.models import check_vocabularies, output_vocab_size
from gkd.sampling import SamplingSettings, TransformersEngine
from gkd.sampling import decode_loop, transformers_engine
from gkd.sampling.decode_loop import RowGumbelNoise
from gkd.tokenize import cut_at_stop
from gkd.trainer import GKDTrainer, has_experts, sample_source


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


def make_trainer(tmp_path, tokenizer, student, teacher, examples, *, batch_size, accumulation, bf16=False,
                 **gkd_flags):
    args = TrainingArguments(
        output_dir=str(tmp_path / f"out-{batch_size}-{accumulation}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to="none", save_strategy="no",
        seed=11, disable_tqdm=True, bf16=bf16, use_cpu=bf16,
    )
    trainer_flags = {name: gkd_flags.pop(name) for name in ("padding_free", "packing", "log_completions")
                     if name in gkd_flags}
    # loss_temperature 1: the references below compare logits unscaled (its default follows --temperature)
    gkd_args = GKDArguments(**{"lmbda": 0.0, "max_completion_length": 8, "loss_temperature": 1.0, **gkd_flags})
    return GKDTrainer(
        model=student, teacher_model=teacher, args=args, gkd_args=gkd_args,
        stop_token_ids=(tokenizer.eos_token_id,),
        compared_vocab_size=min(output_vocab_size(student), output_vocab_size(teacher)),
        train_dataset=examples, processing_class=tokenizer, **trainer_flags,
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


def test_the_student_samples_in_the_training_precision(tmp_path, tokenizer, models):
    """--bf16: the student's float32 master weights generate through bf16 autocast, as its training forward."""
    student, teacher = models
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, make_examples(tokenizer, ["1", "2"]),
                           batch_size=2, accumulation=1, lmbda=1.0, bf16=True)
    dtypes = []
    student.model.layers[0].mlp.down_proj.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 1, torch.device("cpu"))
    assert len(dtypes) > 1 and set(dtypes) == {torch.bfloat16}
    assert next(student.parameters()).dtype == torch.float32


def test_teacher_stays_frozen_in_eval_mode(tmp_path, tokenizer, models):
    student, teacher = models
    before = {name: param.clone() for name, param in teacher.named_parameters()}
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, make_examples(tokenizer, ["1", "2"]),
                           batch_size=2, accumulation=1)
    trainer.train()
    assert not trainer.teacher.model.training
    assert not any(param.requires_grad for param in teacher.parameters())
    assert all(torch.equal(param, before[name]) for name, param in teacher.named_parameters())


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_generated_completions_end_at_the_first_stop(tokenizer, models, pad_is_eos):
    student, _ = models
    eos = tokenizer.eos_token_id
    engine = TransformersEngine(student, eos if pad_is_eos else tokenizer.pad_token_id)
    prompts = [make_examples(tokenizer, ["a"] * 6)[index]["prompt_ids"] for index in range(6)]
    settings = SamplingSettings(max_new_tokens=12, temperature=1.5, stop_token_ids=(eos,))
    completions = engine.generate(prompts, settings, seeds=list(range(6)))
    assert len(completions) == 6
    for completion in completions:
        assert 1 <= len(completion) <= 12
        assert eos not in completion[:-1]  # a stop only ever stands last
    assert any(completion[-1] == eos for completion in completions) or all(len(c) == 12 for c in completions)


def test_a_sample_depends_on_its_own_seed_alone(tokenizer, models):
    """Same prompt and seed: same completion whatever else shares the call; the training RNG is untouched."""
    student, _ = models
    engine = TransformersEngine(student, tokenizer.pad_token_id)
    prompts = [example["prompt_ids"] for example in make_examples(tokenizer, ["a", "bb", "c", "dddd"])]
    settings = SamplingSettings(max_new_tokens=10, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,))
    torch.manual_seed(0)
    first = engine.generate(prompts, settings, seeds=[9, 10, 11, 12])
    after_first = torch.rand(1)
    torch.manual_seed(0)
    assert engine.generate(prompts[2:], settings, seeds=[11, 12]) == first[2:]  # other neighbours, other padding
    assert engine.generate(prompts[::-1], settings, seeds=[12, 11, 10, 9]) == first[::-1]
    assert torch.equal(torch.rand(1), after_first)
    assert engine.generate(prompts, settings, seeds=[1, 2, 3, 4]) != first
    greedy = SamplingSettings(max_new_tokens=10, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,))
    reference = student.generate(torch.tensor([prompts[1]]), max_new_tokens=10, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert engine.generate(prompts, greedy)[1] == reference[0, len(prompts[1]):].tolist()


@pytest.mark.parametrize("temperature, top_k, top_p, selectable", [
    (0.0, None, None, True), (1.0, None, None, True), (0.7, 5, 0.9, True), (1.3, None, 0.8, True),
    (1.0, None, None, False), (0.0, None, None, False)])
def test_the_decode_loop_writes_what_transformers_generate_writes(tokenizer, models, monkeypatch, temperature,
                                                                  top_k, top_p, selectable):
    """gkd's decode loop against transformers generate with the same processors and per-row noise, token for
    token: prompts of different lengths (left padding), rows ending at different steps (the loop drops
    them from its batch, or, with a cache whose rows cannot be selected, keeps them to the end), greedy and
    sampled. (The teacher: its rows end at EOS at different steps.)"""
    if not selectable:  # as a hybrid model's linear-attention cache layers
        monkeypatch.setattr(decode_loop, "ROW_SELECTABLE_LAYERS", ())
    _, model = models
    engine = TransformersEngine(model, tokenizer.pad_token_id)
    prompts = [example["prompt_ids"] for example in make_examples(tokenizer, ["a", "bb", "c", "dddd", "e", "ff"])]
    prompts[1] = prompts[1][:-5]  # another length
    settings = SamplingSettings(max_new_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p,
                                stop_token_ids=(tokenizer.eos_token_id,), vocab_size=259)
    seeds = [31, 32, 33, 34, 35, 36]
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: batch_sizes.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        looped = engine.generate(prompts, settings, seeds)
    finally:
        hook.remove()
    noise = [RowGumbelNoise(seeds, "cpu", settings.vocab_size)] if temperature > 0 else []
    with torch.no_grad():
        generated = engine._transformers_generate(prompts, settings, engine._warpers(settings) + noise, None, False,
                                                  "cpu")
    assert looped == [cut_at_stop(completion, settings.stop_token_ids) for completion in generated]
    lengths = sorted(len(completion) for completion in looped)
    assert lengths[0] < lengths[-1]  # some rows stopped early ...
    assert batch_sizes[0] == 6 and len(batch_sizes) == lengths[-1]
    assert (batch_sizes[-1] < 6) == selectable  # ... and left, where the cache lets them


def test_generate_applies_none_of_the_checkpoints_generation_controls(tokenizer, models, monkeypatch):
    """The path through transformers generate (pictures, sharded models) writes what the decode loop writes
    even where the checkpoint's generation_config suppresses, bans, penalises and forces tokens, which
    generate would otherwise apply (control: without CHECKPOINT_CONTROLS_OFF it writes otherwise)."""
    _, model = models
    engine = TransformersEngine(model, tokenizer.pad_token_id)
    prompts = [example["prompt_ids"] for example in make_examples(tokenizer, ["a", "bb", "c"])]
    settings = SamplingSettings(max_new_tokens=12, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,),
                                vocab_size=259)
    looped = engine.generate(prompts, settings)
    first = looped[0][0]
    monkeypatch.setattr(model, "generation_config", GenerationConfig(
        suppress_tokens=[first], bad_words_ids=[[looped[1][0]]], repetition_penalty=3.0, no_repeat_ngram_size=1,
        forced_eos_token_id=tokenizer.eos_token_id, min_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))

    def through_generate():
        with torch.no_grad():
            generated = engine._transformers_generate(prompts, settings, engine._warpers(settings), None, False, "cpu")
        return [cut_at_stop(completion, settings.stop_token_ids) for completion in generated]

    assert engine.generate(prompts, settings) == looped  # the decode loop never read them
    assert through_generate() == looped
    monkeypatch.setattr(transformers_engine, "CHECKPOINT_CONTROLS_OFF", {})
    assert through_generate() != looped


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8)])
def test_sampled_first_tokens_follow_the_warped_distribution(tokenizer, models, temperature, top_k, top_p):
    """2000 seeds of one prompt: the first token's frequencies match softmax(logits / T) after top-k /
    top-p, computed here independently of transformers' warpers."""
    student, _ = models
    prompt = make_examples(tokenizer, ["a"])[0]["prompt_ids"]
    with torch.no_grad():
        logits = student(torch.tensor([prompt])).logits[0, -1, :259].double() / temperature
    probs = logits.softmax(-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k:
        keep &= probs >= probs.topk(top_k).values[-1]
    if top_p:
        ordered, order = probs.sort(descending=True)
        before = ordered.cumsum(0) - ordered  # mass strictly above each token: kept while below top_p
        keep &= torch.zeros_like(keep).scatter(0, order, before < top_p)
    expected = torch.where(keep, probs, 0.0)
    expected /= expected.sum()

    draws = 2000
    engine = TransformersEngine(student, tokenizer.pad_token_id)
    settings = SamplingSettings(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=259)
    first = [completion[0] for completion in engine.generate([prompt] * draws, settings, seeds=list(range(draws)))]
    counts = torch.bincount(torch.tensor(first), minlength=320).double()
    assert counts[~torch.nn.functional.pad(keep, (0, 61))].sum() == 0  # nothing outside top-k / top-p / the vocab
    # Each frequency within 5 binomial standard deviations (plus one count) of its probability.
    spread = 5 * (expected * (1 - expected) / draws).sqrt() + 1 / draws
    assert ((counts[:259] / draws - expected).abs() <= spread).all()


# ----------------------------------------------------------------------------- padded output layers


def make_padding_rows_likely(model, rows: int, tokenizer):
    """Resize the output layer to `rows` and make its new (padding) rows likely next tokens: each new row
    points along the model's mean final hidden state, scaled to give a logit of about 12 there."""
    old_rows = model.get_output_embeddings().weight.shape[0]
    prompts = [example["prompt_ids"] for example in make_examples(tokenizer, ["a"] * 4)]
    with torch.no_grad():
        hidden = torch.cat([model(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0]
                            for prompt in prompts]).mean(0)
        model.resize_token_embeddings(rows, mean_resizing=False)
        model.get_output_embeddings().weight[old_rows:] = 12 * hidden / hidden.square().sum()


def test_no_engine_draws_an_output_layer_padding_row(tokenizer, models):
    student, _ = models
    make_padding_rows_likely(student, 384, tokenizer)
    engine = TransformersEngine(student, tokenizer.pad_token_id)
    prompts = [example["prompt_ids"] for example in make_examples(tokenizer, ["a"] * 8)]
    settings = SamplingSettings(max_new_tokens=12, temperature=1.0)
    unguarded = engine.generate(prompts, settings, seeds=list(range(8)))
    assert sum(token >= 259 for completion in unguarded for token in completion) > 20  # the test has teeth
    guarded = engine.generate(prompts, dataclasses.replace(settings, vocab_size=259), seeds=list(range(8)))
    assert max(token for completion in guarded for token in completion) < 259


@pytest.mark.parametrize("padded, flags", [("student", {"lmbda": 1.0}), ("teacher", {"seq_kd": True})])
def test_a_padded_output_layer_trains_on_tokens_only(tmp_path, tokenizer, models, padded, flags):
    """Qwen2.5-7B (152064 rows) teaching Qwen2.5-0.5B (151936) around a 151665-token tokenizer, in small:
    the sampling model's padding rows are likely, yet every completion holds tokenizer ids only."""
    student, teacher = models
    make_padding_rows_likely(student if padded == "student" else teacher, 384, tokenizer)
    examples = make_examples(tokenizer, ["1", "2", "3", "4"])
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, examples, batch_size=2, accumulation=2,
                           **flags)
    batches, _ = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 2, torch.device("cpu"))
    completions = torch.cat([batch["labels"][batch["labels"] != IGNORE_INDEX] for batch in batches])
    assert completions.numel() > 8 and int(completions.max()) < 259
    trainer.train()  # before the fix: IndexError in the 320-row model's embedding


def test_build_batch_refuses_an_id_past_the_tokenizer(tokenizer):
    with pytest.raises(GKDUserError, match="completion 1 of the batch holds token id 300, outside the "
                                           "tokenizer's 259 ids"):
        build_batch([[1, 2], [3]], [[4], [5, 300]], tokenizer.pad_token_id, vocab_size=259)


# ----------------------------------------------------------------------------- vocabularies


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
def test_offloaded_teacher_visits_the_device_once_per_step(tmp_path, tiny, tokenizer, loss_impl):
    """--offload_teacher_model: the teacher's weights are device copies during every generation and forward
    of a step, copied in once per optimizer step, and point at their host copies before the optimizer runs;
    the steps equal those of a teacher that never moves. (On this CPU "device" copies are still copies:
    distinct storage from the host copies, which is what is checked.)"""
    weights = []
    for offload in (False, True):
        student = AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)
        teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=torch.float32)
        examples = make_examples(tokenizer, ["1", "22 + 22 = 44", "3", "4 + 4 = 8"] * 2)
        trainer = make_trainer(tmp_path / str(offload), tokenizer, student, teacher, examples, batch_size=2,
                               accumulation=2, lmbda=0.0, seq_kd=True, loss_impl=loss_impl,
                               offload_teacher_model=offload)
        trainer.args.max_steps = 2
        placement = trainer.teacher.host_copy
        host_pointers = set() if placement is None else {host.data_ptr() for host in placement._host.values()}
        seen_on_host = []  # one entry per teacher forward (generation steps included)
        teacher.register_forward_pre_hook(
            lambda module, args: seen_on_host.append(module.lm_head.weight.data_ptr() in host_pointers))
        loads_before_training = 0 if placement is None else placement.loads
        optimizer_steps = []
        trainer.add_callback(type("Spy", (TrainerCallback,), {"on_optimizer_step": lambda self, *a, **k: (
            optimizer_steps.append(teacher.lm_head.weight.data_ptr() in host_pointers))})())
        trainer.train()
        assert len(seen_on_host) > 8 and not any(seen_on_host)
        if offload:
            assert placement.loads - loads_before_training == 2  # 2 steps of 2 micro-batches: once per step
            assert optimizer_steps == [True, True]  # back on the host before each optimizer step
            assert all(tensor.data_ptr() in host_pointers for tensor in teacher.parameters())
        weights.append({name: parameter.detach().clone() for name, parameter in student.named_parameters()})
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_sample_indices_count_every_row_of_a_data_parallel_batch(tmp_path, tokenizer, models):
    """Single-process multi-GPU (DataParallel) batches hold per_device x n_gpu rows: the next micro-batch's
    samples start after all of them, or neighbouring micro-batches would repeat their sources."""
    trainer = make_trainer(tmp_path, tokenizer, *models, make_examples(tokenizer, ["1"] * 8), batch_size=2,
                           accumulation=2)
    assert trainer._global_sample_indices(1, 0, 2) == [2, 3]
    trainer.args._n_gpu = 2  # what TrainingArguments sets with two visible GPUs and no process group
    assert trainer._global_sample_indices(0, 0, 4) == [0, 1, 2, 3]
    assert trainer._global_sample_indices(1, 0, 4) == [4, 5, 6, 7]


def test_ddp_looks_for_unused_parameters_only_in_a_mixture_of_experts(tmp_path, tokenizer, models):
    """A dense student uses every parameter each step (DDP may skip the search); an MoE student may leave an
    expert unused in a step, which DDP with find_unused_parameters=False stops on."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    student, teacher = models
    examples = make_examples(tokenizer, ["1"])
    dense = make_trainer(tmp_path, tokenizer, student, teacher, examples, batch_size=1, accumulation=1)
    assert dense.args.ddp_find_unused_parameters is False
    moe = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=1))
    trainer = make_trainer(tmp_path, tokenizer, moe, teacher, examples, batch_size=1, accumulation=1, loss_impl="exact")
    assert trainer.args.ddp_find_unused_parameters is True
    # A vision-language MoE keeps its expert count under text_config.
    composite = types.SimpleNamespace(config=types.SimpleNamespace(get_text_config=lambda: moe.config))
    assert has_experts(composite) and not has_experts(student)


# ----------------------------------------------------------------------------- --async_generate


class _WeightsAtStepBegin(TrainerCallback):
    """A copy of the student's weights as each optimizer step begins (by global step: 0 before the first)."""

    def __init__(self, model):
        self.model, self.weights = model, {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.weights[state.global_step] = {name: value.clone() for name, value in self.model.state_dict().items()}


def train_logging_completions(tmp_path, tokenizer, tiny, examples, **gkd_flags):
    """lmbda 1 at top-k 1 (greedy samples), 2 epochs of 5 steps of 2 rows, a large learning rate, so that each
    step's weights sample differently; returns the trainer, the weights per step and completions.jsonl's lines."""
    student = AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=2, optim="sgd", learning_rate=2.0,
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none", save_strategy="no", seed=3, disable_tqdm=True,
    )
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=args, log_completions=True,
        gkd_args=GKDArguments(**{"lmbda": 1.0, "top_k": 1, "max_completion_length": 8, **gkd_flags}),
        stop_token_ids=(tokenizer.eos_token_id,), compared_vocab_size=output_vocab_size(student),
        train_dataset=examples, processing_class=tokenizer,
    )
    snapshots = _WeightsAtStepBegin(student)
    trainer.add_callback(snapshots)
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    return trainer, snapshots.weights, lines


def greedy_completion(model, weights, prompt_ids, tokenizer) -> str:
    """transformers generate, greedy, from `weights` (an independent reference to gkd's decode loop), never
    choosing the output layer's padding rows past the tokenizer, as gkd does not."""
    model.load_state_dict(weights)
    output = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                            do_sample=False, max_new_tokens=8, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id,
                            suppress_tokens=list(range(len(tokenizer), output_vocab_size(model))))
    return tokenizer.decode(cut_at_stop(output[0, len(prompt_ids):].tolist(), (tokenizer.eos_token_id,)))


def test_async_generate_samples_the_next_step_from_the_weights_one_update_old(tmp_path, tiny, tokenizer):
    """--async_generate with the in-process engine: each call samples its step and the next one (within the
    epoch), so that steps 1, 3, 6, 8 (global step at their start) train on samples of the weights before the
    previous step's update; the others (each epoch's last step alone) sample on-policy. Every logged sample is
    checked against transformers generate from the weights it should come from; the batches each step trains
    on are those of the same run without the flag."""
    examples = make_examples(tokenizer, [str(index) for index in range(10)])
    trainer, weights, lines = train_logging_completions(tmp_path / "async", tokenizer, tiny, examples,
                                                        async_generate=True)
    _, _, on_policy_lines = train_logging_completions(tmp_path / "sync", tokenizer, tiny, examples)
    assert [(line["step"], line["index"], line["prompt"]) for line in lines] == \
        [(line["step"], line["index"], line["prompt"]) for line in on_policy_lines]
    assert sorted(line["step"] for line in lines) == [step for step in range(1, 11) for _ in range(2)]

    prompt_ids = {tokenizer.decode(example["prompt_ids"]): example["prompt_ids"] for example in examples}
    sampled_with = {0: 0, 1: 0, 2: 2, 3: 2, 4: 4, 5: 5, 6: 5, 7: 7, 8: 7, 9: 9}  # global step -> weights of step
    reference = AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)
    off_policy_differs = []
    for line in lines:
        step = line["step"] - 1
        prompt = prompt_ids[line["prompt"]]
        assert line["completion"] == greedy_completion(reference, weights[sampled_with[step]], prompt, tokenizer), line
        if sampled_with[step] != step:
            off_policy_differs.append(line["completion"] != greedy_completion(reference, weights[step], prompt, tokenizer))
    # The control: the current weights would have sampled otherwise, so the check above tells the two apart.
    assert len(off_policy_differs) == 8 and any(off_policy_differs)
    assert trainer._next_step is None


def test_async_generate_draws_the_teachers_samples_ahead_exactly(tmp_path, tiny, tokenizer):
    """seq_kd's teacher does not train: its samples drawn a step ahead are those it draws in step."""
    examples = make_examples(tokenizer, [str(index) for index in range(10)])
    flags = dict(lmbda=0.5, seq_kd=True, top_k=None, temperature=1.0)
    _, _, ahead = train_logging_completions(tmp_path / "async", tokenizer, tiny, examples, async_generate=True, **flags)
    _, _, in_step = train_logging_completions(tmp_path / "sync", tokenizer, tiny, examples, **flags)
    teacher_rows = [(line["step"], line["index"], line["prompt"], line["completion"]) for line in ahead
                    if line["source"] == "teacher"]
    assert len(teacher_rows) >= 5  # of 20 rows, about half
    assert teacher_rows == [(line["step"], line["index"], line["prompt"], line["completion"]) for line in in_step
                            if line["source"] == "teacher"]
