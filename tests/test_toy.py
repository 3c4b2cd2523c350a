"""The toy benchmark (examples/toy): task generators and checkers, the evaluator, and a smoke run."""

import itertools
import json
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO

sys.path.insert(0, str(REPO / "examples" / "toy"))
import evaluate as toy_evaluate  # noqa: E402
import run  # noqa: E402
from tasks import (TASKS, Addition, Navigation, Permutation, PermutationUndo, RunningSum, Walk,  # noqa: E402
                   make_splits, to_row)


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_seeded_distinct_and_disjoint(name):
    task = TASKS[name]
    train, test = make_splits(task, 3, 500, 100)
    assert (train, test) == make_splits(task, 3, 500, 100)
    assert make_splits(task, 4, 500, 100)[0] != train
    expected = 500 if task.n_problems is None else min(500, task.n_problems - 100)  # navigation: all the rest
    assert len(set(train)) == expected and len(set(test)) == 100 and not set(train) & set(test)
    rng = random.Random(0)
    for problem in train[:50]:
        assert task.check(problem, task.reference(problem, rng))
        row = to_row(task, problem, "x")
        assert row["messages"][0] == {"role": "user", "content": task.prompt(problem)}


def test_addition_checker_is_exact():
    task = Addition()
    assert task.check((12345, 67890), "80235")
    for wrong in ("80234", "080235", "80235 ", "", "8023"):
        assert not task.check((12345, 67890), wrong)


def test_permutation_checker_accepts_all_720_and_nothing_else():
    task = Permutation()
    letters = "abcdef"
    assert all(task.check(letters, "".join(order)) for order in itertools.permutations(letters))
    for wrong in ("abcdeg", "abcdee", "abcde", "abcdefa", "ABCDEF"):
        assert not task.check(letters, wrong)


def test_running_sum_reference_and_recovery_examples():
    task = RunningSum()
    problem = "9876543210123456"
    expected = "".join(str(sum(map(int, problem[: index + 1])) % 10) for index in range(len(problem)))
    assert task.reference(problem) == expected and task.check(problem, expected)
    assert not task.check(problem, expected[:-1] + str((int(expected[-1]) + 1) % 10))
    for seed in range(20):
        [(prefix, rest)] = task.recovery_examples(problem, random.Random(seed))
        position = len(prefix) - 1
        assert prefix[:position] == expected[:position] and prefix[position] != expected[position]
        assert rest == expected[position + 1 :]  # the continuation ignores the mistake


def test_navigation_checker_and_recovery_examples():
    task = Navigation(size=20, slack=4)
    assert task.n_problems == 21 * 20
    assert task.reference((3, 8)) == "RRRRR" and task.reference((8, 3)) == "LLLLL"
    for right in ("RRRRR", "RRLRRRR", "RLRRRRR", "RRRRRRL", "RLRLRRRRR"):  # shortest + up to 4 undone
        assert task.check((3, 8), right), right
    for wrong in ("RRRR", "RRRRRR", "RLRLRLRRRRR", "RRRRR ", "rrrrr", ""):
        assert not task.check((3, 8), wrong), wrong
    for seed in range(30):
        for prefix, rest in task.recovery_examples((3, 8), random.Random(seed)):
            assert prefix[:-1] == "R" * (len(prefix) - 1)  # right moves, then one wrong one
            assert prefix[-1] == "L" or len(prefix) == 6  # back, or one past the goal
            assert task.check((3, 8), prefix + rest) and len(prefix + rest) == 7  # undone at once


def test_walk_checker_and_recovery_examples():
    task = Walk(size=20, slack=4)
    start = (3, 0)  # the letter d
    assert task.prompt(start) == "d" and task.max_new_tokens == 47
    assert task.reference(start, random.Random(0)) in (" c b a", " " + " ".join("efghijklmnopqrstu"))
    for right in (" c b a", " c d c b a", " e d c b a", " c b c b a", " e f g h i j k l m n o p q r s t u"):
        assert task.check(start, right), right
    for wrong in (" c b", " b a", " c b a b", " c b a ", "c b a", " c  b a", " e d e d e d c b a",
                  " c b c b c b c b a", ""):
        assert not task.check(start, wrong), wrong
    assert task.check((19, 0), " u") and not task.check((19, 0), " u t")  # stops at the first end it reaches
    kinds = set()
    for seed in range(200):
        for prefix, rest in task.recovery_examples(start, random.Random(seed)):
            assert task.check(start, prefix + rest)
            assert len(prefix + rest) == len(task.walk(3, 0 if rest.endswith("a") else 20)) + 4  # one undone
            kinds.add(rest[-1])
    assert kinds == {"a", "u"}  # mistakes on the way to either end


def test_permutation_undo_checker_and_recovery_examples():
    task = PermutationUndo(letters=6, undos=3)
    problem = "abcdef"
    for right in ("fedcba", "fee<dcba", "fx<edcba", "fedcba<a", "ab<<bacdef", "abc<<<abcdef"):
        assert task.check(problem, right), right
    for wrong in ("fedcb", "fee<dcbaa", "<fedcba", "fedcba<", "ab<<<<abcdef", "a<b<c<d<abcdef"):
        assert not task.check(problem, wrong), wrong
    examples = [example for seed in range(100) for example in task.recovery_examples(problem, random.Random(seed))]
    assert 15 < len(examples) < 45  # recovery_share 0.3
    for prefix, rest in examples:
        assert rest.startswith("<") and task.check(problem, prefix + rest)
        assert len(set(prefix[:-1])) == len(prefix) - 1 and set(prefix[:-1]) <= set(problem)  # right so far
        assert prefix[-1] in prefix[:-1] or prefix[-1] not in problem  # then a repeated or foreign letter


def test_evaluator_counts_right_answers_and_distinct_valid_ones(monkeypatch, tiny):
    task = Permutation(letters=3)
    problems = ["abc", "def"]
    scripted = {0.0: ["cab", "ddd"], 1.0: ["bca", "fed"]}
    diverse = ["abc", "abc", "bac", "xyz", "cba", "acb", "bca", "cab"] + ["def"] * 8

    def fake_answers(engine, tokenizer, task, chosen, temperature, seed):
        texts = diverse if len(chosen) == 16 else scripted[temperature]
        return [[tokenizer.eos_token_id]] * len(texts), texts

    monkeypatch.setattr(toy_evaluate, "answers", fake_answers)
    model = AutoModelForCausalLM.from_pretrained(tiny / "student")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    scores = toy_evaluate.evaluate(model, model, tokenizer, task, problems)
    assert scores["greedy"] == 0.5 and scores["sampled"] == 1.0
    assert scores["diversity"] == (6 + 1) / 16  # abc, bac, cba, acb, bca, cab; and def


def test_teacher_logprob_matches_a_token_by_token_reference(tiny):
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny / "teacher")
    task = Addition(digits=2)
    problems = [(12, 34), (56, 78)]
    completions = [tokenizer.encode("46", add_special_tokens=False) + [tokenizer.eos_token_id],
                   tokenizer.encode("134", add_special_tokens=False)]
    total, count = 0.0, 0
    with torch.no_grad():
        for problem, completion in zip(problems, completions):
            prefix = toy_evaluate.prompt_ids(tokenizer, task, problem)
            for token in completion:
                logits = teacher(input_ids=torch.tensor([prefix])).logits[0, -1]
                total += torch.log_softmax(logits, dim=-1)[token].item()
                count += 1
                prefix = prefix + [token]
    got = toy_evaluate.teacher_logprob(teacher, tokenizer, task, problems, completions)
    assert got == pytest.approx(total / count, abs=1e-5)


@pytest.mark.parametrize("task", ["permutation", "walk"])
def test_pipeline_smoke_run(tmp_path, task):
    """The whole pipeline at a few steps: data, models, gkd-train for each cell, scores, report, plot. For
    walk also: the plain chat template, the windowed student, 47-token answers and the DART cells."""
    command = [sys.executable, str(REPO / "examples" / "toy" / "run.py"), "--quick", "--tasks", task,
               "--steps", "3", "--teacher_steps", "10", "--student_steps", "3", "--n_test", "30",
               "--output_dir", str(tmp_path), "--dart", "--betas", "0.5", "1", "--seeds", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    cells = results["tasks"][task]["cells"]
    dart = ["lmbda 0, beta 0.5, dart", "lmbda 0, beta 1, dart"] if task == "walk" else []  # permutation: no mistakes
    assert sorted(cells) == ["lmbda 0, beta 0.5", *dart[:1], "lmbda 0, beta 1", *dart[1:], "lmbda 1, beta 0.5",
                             "lmbda 1, beta 1"]
    for per_seed in cells.values():
        scores = per_seed["1"]
        assert 0 <= scores["greedy"] <= 1 and scores["teacher_logprob"] < 0 and 0 <= scores["diversity"] <= 1
        assert [step for step, _ in scores["curve"]] == [0, 1, 2, 3]
    table = (tmp_path / "results.md").read_text()
    assert "| lmbda 1, beta 1 |" in table and "| teacher |" in table and f"### {task} (validity)" in table
    assert "- sampled: on-policy errors" in table
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if task == "walk":
        args = json.loads((tmp_path / "runs" / task / "seed1" / "lmbda1_beta1" / "args.json").read_text())
        assert args["max_completion_length"] == 47  # whole answers, not the default 24
        assert args["dataset"][0].endswith("train.jsonl") and args["learning_rate"] == 1e-3  # the plan's for lmbda 1
        supervised = json.loads((tmp_path / "runs" / task / "seed1" / "lmbda0_beta1" / "args.json").read_text())
        assert supervised["learning_rate"] == 3e-3
        dart_args = json.loads((tmp_path / "runs" / task / "seed1" / "lmbda0_beta1_dart" / "args.json").read_text())
        assert dart_args["dataset"][0].endswith("train_noisy.jsonl") and dart_args["lmbda"] == 0
        folder = tmp_path / "models" / task
        clean = (folder / "train.jsonl").read_text().splitlines()
        noisy = (folder / "train_noisy.jsonl").read_text().splitlines()
        assert noisy[: len(clean)] == clean and 0.1 < (len(noisy) - len(clean)) / len(clean) < 0.2
        walk = TASKS["walk"]
        for line in noisy[len(clean):][:50]:  # each mistake row is a right answer that undoes one wrong move
            user, answer = (message["content"] for message in json.loads(line)["messages"])
            assert walk.check((ord(user) - ord("a"), 0), answer)
        # The student sees its last 3 tokens (2 layers, window 2): after " b ", not where it came from.
        student = AutoModelForCausalLM.from_pretrained(folder / "student-seed1").eval()
        tokenizer = AutoTokenizer.from_pretrained(folder / "student-seed1")
        assert student.config.model_type == "mistral" and student.config.sliding_window == 2
        with torch.no_grad():
            last = [student(input_ids=torch.tensor([tokenizer.encode(text)])).logits[0, -1] for text in
                    ("d c b ", "a b c b ", "x b ")]
        torch.testing.assert_close(last[0], last[1])
        torch.testing.assert_close(last[0], last[2])
        assert tokenizer.apply_chat_template([{"role": "user", "content": "d"}], add_generation_prompt=True,
                                             tokenize=False) == "d"
        # The effect's curves follow sampled validity on the first 100 test prompts, from the starting student on
        test = make_splits(walk, 0, run.N_TRAIN, 30)[1]
        start = results["tasks"][task]["cells"]["lmbda 1, beta 1"]["1"]["curve"][0][1]
        assert start == toy_evaluate.score(student, tokenizer, walk, test[:100], 1.0, 1)
        assert start != toy_evaluate.score(student, tokenizer, walk, test[:100], 0.0, 1)
        # every cell read the rows one tokenization wrote, in the output's own datasets cache
        assert len(list((tmp_path / "datasets-cache" / "gkd").glob("*.arrow"))) == 2  # train.jsonl, train_noisy.jsonl


def test_error_ratio_takes_each_side_at_its_best_beta():
    def cell(*scores):
        return {seed: {"greedy": greedy, "sampled": sampled} for seed, (greedy, sampled) in enumerate(scores)}

    entry = {"cells": {"lmbda 0, beta 0": cell((0.9, 0.5), (0.7, 0.5)), "lmbda 0, beta 1": cell((0.6, 0.8), (0.6, 0.8)),
                       "lmbda 1, beta 0": cell((0.95, 0.4), (0.95, 0.4)), "lmbda 1, beta 1": cell((0.9, 0.9), (0.9, 0.9)),
                       "lmbda 0, beta 1, dart": cell((1.0, 1.0), (1.0, 1.0))}}  # a control, not supervised KD
    assert run.error_ratio(entry, "greedy") == ("greedy: on-policy errors 5.0% (lmbda 1, beta 0) against supervised "
                                                "KD's 20.0% (lmbda 0, beta 0): ratio 0.25x")
    assert run.error_ratio(entry, "sampled") == ("sampled: on-policy errors 10.0% (lmbda 1, beta 1) against "
                                                 "supervised KD's 20.0% (lmbda 0, beta 1): ratio 0.50x")
    assert run.error_ratio({"cells": {"lmbda 0, beta 1": cell((0.6, 0.8))}}, "greedy") is None
