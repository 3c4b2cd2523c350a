"""--padding_free and --packing: one sequence per micro-batch gives the padded batch's logits, losses,
gradients and optimizer steps; a row boundary is never supervised; bins respect packing_length."""

import math
import random
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from gkd.data import IGNORE_INDEX, build_batch
from gkd.errors import GKDUserError
from gkd.losses import LossBatch, LossSettings, make_loss
from gkd.teachers import Teacher
from gkd.packing import PACKED_KEY, check_padding_free, collate_bins, pack_batch, pack_examples

from gkd.trainer import sample_source
from test_trainer import make_examples, make_trainer


def random_rows(count, seed=0, vocab=259, prompt=(3, 12), completion=(1, 15)):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*prompt))] for _ in range(count)]
    completions = [[rng.randrange(vocab) for _ in range(rng.randint(*completion))] for _ in range(count)]
    return prompts, completions


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("impl", [None, "sdpa", "eager", "flex_attention", "flash_attn", "flash_attention_2",
                                  "flash_attention_3"])
def test_implementations_that_keep_packed_rows_apart_are_accepted(impl):
    assert check_padding_free(impl) is None


@pytest.mark.parametrize("impl", ["paged|sdpa", "my_kernel"])
def test_other_attention_implementations_are_refused_in_one_line(impl):
    problem = check_padding_free(impl)
    assert problem.startswith(f"--padding_free/--packing: --attn_impl {impl} cannot keep") and "\n" not in problem


def tiny_qwen2(impl):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return Qwen2ForCausalLM._from_config(config, attn_implementation=impl).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_packed_sequence_gives_each_rows_own_logits(tiny, impl, family):
    model = (AutoModelForCausalLM.from_pretrained(tiny / "student", attn_implementation=impl).eval()
             if family == "llama" else tiny_qwen2(impl))
    prompts, completions = random_rows(5, seed=1)
    padded = build_batch(prompts, completions, 0)
    packed = pack_batch(padded)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([p + c]), use_cache=False).logits[0] for p, c in zip(prompts, completions)]
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        unpacked = model(input_ids=packed["input_ids"], use_cache=False).logits[0]  # one long row: differs
    expected = torch.cat(alone)
    torch.testing.assert_close(together, expected, rtol=1e-5, atol=1e-5)
    assert (unpacked - expected).abs().max() > 1e-2  # the test has teeth: without position_ids rows see each other
    assert packed["row_ids"][0].tolist() == [row for row, (p, c) in enumerate(zip(prompts, completions))
                                            for _ in range(len(p) + len(c))]


# ----------------------------------------------------------------------------- labels at row boundaries


def test_a_row_boundary_is_never_supervised():
    """A label span opening at a row's first prompt token (--loss_scale default may supervise prompt spans):
    in the packed sequence the previous row's last position would predict it; it must count nowhere."""
    prompts, completions = random_rows(4, seed=2)
    padded = build_batch(prompts, completions, 0)
    padded["labels"][:, :2] = padded["input_ids"][:, :2]  # rows' first two tokens supervised
    packed = pack_batch(padded)
    targets = LossBatch(packed["input_ids"], None, packed["labels"], position_ids=packed["position_ids"]).targets()
    row_ends = padded["attention_mask"].sum(1).cumsum(0) - 1
    assert (targets[0, row_ends] == IGNORE_INDEX).all()
    # even labels that were not cleared at the row starts are not predicted across the boundary
    raw = torch.cat([padded["labels"][row, : len(p) + len(c)] for row, (p, c) in enumerate(zip(prompts, completions))])
    targets_raw = LossBatch(packed["input_ids"], None, raw[None], position_ids=packed["position_ids"]).targets()
    assert (targets_raw[0, row_ends] == IGNORE_INDEX).all()
    # the packed targets are the padded ones, row after row (the second token of each row is still counted)
    padded_targets = LossBatch(padded["input_ids"], padded["attention_mask"], padded["labels"]).targets()
    assert torch.equal(targets[0], padded_targets[padded["attention_mask"].bool()])
    assert int(targets.ne(IGNORE_INDEX).sum()) == int(padded_targets.ne(IGNORE_INDEX).sum()) > 0


# ----------------------------------------------------------------------------- the loss implementations


@pytest.mark.parametrize("impl, beta, topk", [("exact", 0.5, None), ("chunked", 0.0, None), ("fused", 0.5, None),
                                              ("fused", 1.0, None), ("topk", 0.5, 20)])
def test_every_loss_implementation_gives_the_padded_sums_and_gradients(tiny, impl, beta, topk):
    student = AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=torch.float32).eval()
    loss = make_loss(impl, LossSettings(beta=beta, temperature=0.9, vocab_size=320, chunk_size=16, topk=topk,
                                        sft_alpha=0.3))
    prompts, completions = random_rows(6, seed=3)
    padded = build_batch(prompts, completions, 0)
    sft_rows = torch.tensor([True, False, True, True, False, False])
    packed = pack_batch(padded)
    results = []
    for batch in (LossBatch(padded["input_ids"], padded["attention_mask"], padded["labels"], sft_rows),
                  LossBatch(packed["input_ids"], None, packed["labels"], sft_rows[packed["row_ids"]],
                            packed["position_ids"])):
        student.zero_grad()
        jsd, sft = loss(student, Teacher(teacher), batch)
        (jsd + 0.3 * sft).backward()
        results.append((jsd.detach(), sft.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    (jsd_a, sft_a, grads_a), (jsd_b, sft_b, grads_b) = results
    assert jsd_a > 0 and sft_a > 0
    torch.testing.assert_close(jsd_b, jsd_a, rtol=1e-5, atol=0)
    torch.testing.assert_close(sft_b, sft_a, rtol=1e-5, atol=0)
    for name in grads_a:
        # float32 sums in another order: each entry within 1e-5 of the tensor's largest
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4,
                                   atol=1e-5 * float(grads_a[name].abs().max()), msg=name)


# ----------------------------------------------------------------------------- packing into bins


def test_bins_hold_every_example_once_within_the_packing_length():
    examples = [{"prompt_ids": [0] * p, "completion_ids": [1] * c} for p, c in
                [(5, 3), (2, 1), (30, 10), (4, 4), (6, 2), (1, 1), (10, 5), (3, 0)]]
    examples[-1]["completion_ids"] = None  # a prompt-only row
    bins = pack_examples(examples, 16)
    members = [id(example) for bin_ in bins for example in bin_[PACKED_KEY]]
    assert sorted(members) == sorted(id(example) for example in examples)
    lengths = [sum(len(e["prompt_ids"]) + len(e["completion_ids"] or []) for e in bin_[PACKED_KEY]) for bin_ in bins]
    assert lengths[0] == 40 and all(length <= 16 for length in lengths[1:])  # the 40-token row alone, first
    assert len(bins) == 1 + 3  # 53 tokens of rows up to 16 need 3 bins of 16, and best-fit decreasing finds them
    assert pack_examples(examples, 16) == bins  # deterministic
    rows = collate_bins(bins[1:3])
    assert len(rows["prompt_ids"]) == sum(len(bin_[PACKED_KEY]) for bin_ in bins[1:3])


def length_rows(lengths):
    return [{"prompt_ids": [index % 7] * length, "completion_ids": None} for index, length in enumerate(lengths)]


def check_bins(examples, bins, packing_length):
    """Every example once; bins within packing_length but for an over-long example alone; dataset order."""
    position = {id(example): index for index, example in enumerate(examples)}
    members = [[position[id(example)] for example in bin_[PACKED_KEY]] for bin_ in bins]
    assert sorted(index for bin_ in members for index in bin_) == list(range(len(examples)))
    for bin_ in members:
        assert bin_ == sorted(bin_)
        total = sum(len(examples[index]["prompt_ids"]) for index in bin_)
        assert total <= packing_length or len(bin_) == 1
    return members


def best_fit_decreasing(lengths, packing_length):
    """The strategy written plainly, O(rows x bins): the reference for pack_examples' bisect version."""
    bins, room = [], []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [slot for slot, free in enumerate(room) if lengths[index] <= free]
        if fits:
            slot = min(fits, key=lambda s: (room[s], s))  # least room, then the earliest bin
            bins[slot].append(index)
            room[slot] -= lengths[index]
        else:
            bins.append([index])
            room.append(packing_length - lengths[index])
    return [sorted(bin_) for bin_ in bins]


@pytest.mark.parametrize("seed", range(20))
def test_bins_are_best_fit_decreasing(seed):
    rng = random.Random(seed)
    packing_length = rng.choice([8, 16, 50])
    lengths = [rng.randint(1, packing_length + 5) for _ in range(rng.randint(0, 60))]
    examples = length_rows(lengths)
    bins = pack_examples(examples, packing_length)
    assert check_bins(examples, bins, packing_length) == best_fit_decreasing(lengths, packing_length)
    assert pack_examples(examples, packing_length) == bins  # deterministic
    assert pack_examples(length_rows(lengths), packing_length) == bins  # on equal examples too


def test_best_fit_takes_the_fullest_bin_that_fits_and_the_earliest_on_a_tie():
    # 8 and 6 open bins (room 2 and 4), the 3 goes with the 6 (room 1): the 1 then fits both bins and goes
    # to the fuller, the 6's; first fit would have put it with the 8
    examples = length_rows([8, 6, 3, 1])
    assert check_bins(examples, pack_examples(examples, 10), 10) == [[0], [1, 2, 3]]
    # two bins with room 3 each: the 3 goes to the one opened first, the first of the equal 5s in the dataset
    examples = length_rows([5, 5, 3])
    assert check_bins(examples, pack_examples(examples, 8), 8) == [[0, 2], [1]]
    examples = length_rows([3, 5, 5])
    assert check_bins(examples, pack_examples(examples, 8), 8) == [[0, 1], [2]]


def test_over_long_examples_get_a_bin_each_and_empty_input_gives_none():
    examples = length_rows([20, 3, 25, 20, 4])
    members = check_bins(examples, pack_examples(examples, 10), 10)
    assert members == [[2], [0], [3], [1, 4]]  # longest first, equal lengths in dataset order
    assert pack_examples([], 10) == []
    for bad in (0, -3, 2.5, True):
        with pytest.raises(GKDUserError, match="--packing_length"):
            pack_examples(examples, bad)


def test_packing_many_rows_is_fast_and_near_the_lower_bound():
    rng = random.Random(0)
    lengths = [rng.randint(1, 4096) for _ in range(20000)]
    examples = length_rows(lengths)
    start = time.perf_counter()
    bins = pack_examples(examples, 8192)
    elapsed = time.perf_counter() - start
    check_bins(examples, bins, 8192)
    lower_bound = math.ceil(sum(lengths) / 8192)
    assert lower_bound <= len(bins) <= 1.02 * lower_bound
    assert elapsed < 0.5, elapsed  # ~0.05 s; first fit scanned every bin per row, O(rows x bins)


# ----------------------------------------------------------------------------- optimizer steps


def one_step(tmp_path, tiny, tokenizer, examples, name, *, batch_size, accumulation, **flags):
    student = AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=torch.float32)
    trainer = make_trainer(tmp_path / name, tokenizer, student, teacher, examples, batch_size=batch_size,
                           accumulation=accumulation, **flags)
    trainer.train()
    return {name: param.detach().clone() for name, param in student.named_parameters()}


@pytest.mark.parametrize("loss_impl", ["fused", "chunked"])
def test_an_optimizer_step_is_the_same_padded_padding_free_and_packed(tmp_path, tiny, tokenizer, loss_impl):
    """lmbda 0, six dataset rows in one optimizer step: padded (3 x 2 accumulated), padding-free (2 x 3) and
    packed (bins of two or three rows, one bin per micro-batch) move the weights alike, prompt label spans
    included."""
    examples = make_examples(tokenizer, ["1", "22 + 22 = 44", "3", "4 + 4 = 8, surely", "55", "6 + 6 = 12"])
    # supervised prompt spans (--loss_scale default), one opening at a row's first token
    examples[1]["prompt_label_spans"], examples[4]["prompt_label_spans"] = [(0, 4), (9, 12)], [(3, 7)]
    flags = dict(lmbda=0.0, sft_alpha=0.2, loss_impl=loss_impl)
    padded = one_step(tmp_path, tiny, tokenizer, examples, "padded", batch_size=3, accumulation=2, **flags)
    free = one_step(tmp_path, tiny, tokenizer, examples, "free", batch_size=2, accumulation=3, padding_free=True,
                    **flags)
    longest = max(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in examples)
    bins = pack_examples(examples, 2 * longest + 5)
    assert 2 <= len(bins) < len(examples)
    packed = one_step(tmp_path, tiny, tokenizer, bins, "packed", batch_size=1, accumulation=len(bins), packing=True,
                      **flags)
    for name in padded:
        torch.testing.assert_close(free[name], padded[name], rtol=1e-5, atol=1e-7, msg=f"padding-free {name}")
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-5, atol=1e-7, msg=f"packed {name}")
    before = AutoModelForCausalLM.from_pretrained(tiny / "student").lm_head.weight.detach()
    moved = float((padded["lm_head.weight"] - before).abs().max())
    assert moved > 1e-4  # the step moved the weights


def test_packed_sources_and_samples_do_not_depend_on_the_split(tmp_path, tiny, tokenizer):
    """lmbda 0.5: each row's source and generated completion follow its global index (the order of the step's
    bins), so one micro-batch of all bins and one bin per accumulated micro-batch train alike."""
    examples = make_examples(tokenizer, ["1", "22 + 22 = 44", "3", "4 + 4 = 8", "55", "6 + 6 = 12", "7", "8"])
    bins = pack_examples(examples, 3 * max(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in examples))
    assert 2 <= len(bins) < len(examples)
    flags = dict(lmbda=0.5, loss_impl="chunked", packing=True)
    drawn = {sample_source(11, 0, index, 0.5, False) for index in range(len(examples))}  # make_trainer's seed 11
    assert drawn == {"student", "dataset"}
    whole = one_step(tmp_path, tiny, tokenizer, bins, "whole", batch_size=len(bins), accumulation=1, **flags)
    split = one_step(tmp_path, tiny, tokenizer, bins, "split", batch_size=1, accumulation=len(bins), **flags)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)
