"""Data: dataset specs, every row shape to messages, tokenization and the completion mask."""

import json
from collections import Counter

import pytest
import torch

from conftest import write_jsonl
from gkd.data import (
    IGNORE_INDEX, DatasetSpec, build_batch, check_chat_template, cut_at_stop, draw_rows, load_examples,
    read_rows, row_to_messages, split_prompt_completion, tokenize_messages, truncate,
)
from gkd.errors import GKDUserError

USER_ASSISTANT = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_spec_syntax(tmp_path):
    assert DatasetSpec.parse("org/name:subset#100") == DatasetSpec("org/name", "subset", 100)
    assert DatasetSpec.parse("data.jsonl#5") == DatasetSpec("data.jsonl", None, 5)
    assert DatasetSpec.parse("org/name") == DatasetSpec("org/name", None, None)
    odd = tmp_path / "a:b.jsonl"  # an existing path keeps its colon
    odd.write_text("")
    assert DatasetSpec.parse(f"{odd}#2") == DatasetSpec(str(odd), None, 2)
    hashed = tmp_path / "run#1.jsonl"  # and its '#'
    hashed.write_text("")
    assert DatasetSpec.parse(str(hashed)) == DatasetSpec(str(hashed), None, None)
    with pytest.raises(GKDUserError, match="positive row count"):
        DatasetSpec.parse("data.jsonl#ten")


def test_draw_rows_without_replacement_when_n_fits():
    rows = list(range(10))
    drawn = draw_rows(rows, 4, seed=1)
    assert len(drawn) == 4 and len(set(drawn)) == 4
    assert drawn == draw_rows(rows, 4, seed=1)
    assert drawn != draw_rows(rows, 4, seed=2)


def test_draw_rows_repeats_then_tops_up_when_n_exceeds():
    counts = Counter(draw_rows(list(range(10)), 25, seed=0))
    assert sum(counts.values()) == 25
    assert sorted(counts.values()) == [2] * 5 + [3] * 5  # two whole copies plus 5 distinct extra rows


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"messages": USER_ASSISTANT}, USER_ASSISTANT),
        ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, USER_ASSISTANT),
        ({"query": "Q", "response": "A"}, USER_ASSISTANT),
        ({"prompt": "Q", "completion": "A"}, USER_ASSISTANT),
        ({"question": "Q", "answer": "A"}, USER_ASSISTANT),
        ({"instruction": "Q", "output": "A"}, USER_ASSISTANT),
        ({"instruction": "Do", "input": "this", "output": "A"},
         [{"role": "user", "content": "Do\nthis"}, {"role": "assistant", "content": "A"}]),
        ({"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]},
         USER_ASSISTANT),
        ({"query": "Q2", "response": "A2", "system": "S", "history": [["Q1", "A1"]]},
         [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
          {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
          {"role": "assistant", "content": "A2"}]),
        ({"query": "Q"}, [{"role": "user", "content": "Q"}]),
    ],
)
def test_row_shapes_normalise_to_messages(row, expected):
    assert row_to_messages(row, "f.jsonl:1") == expected


def test_system_flag_only_fills_a_missing_system_turn():
    assert row_to_messages({"query": "Q"}, "w", system="S")[0] == {"role": "system", "content": "S"}
    own = [{"role": "system", "content": "mine"}, *USER_ASSISTANT]
    assert row_to_messages({"messages": own}, "w", system="S") == own


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": [{"role": "user", "content": 5}]}, "content must be a string"),
        ({"text": "hello"}, "unknown row shape"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown speaker"),
        ([1, 2], "expected an object"),
    ],
)
def test_malformed_rows_name_where(row, message):
    with pytest.raises(GKDUserError, match=rf"^data\.jsonl:7: .*{message}"):
        row_to_messages(row, "data.jsonl:7")


def test_prompt_is_everything_before_the_last_assistant_turn():
    multi_turn = [*USER_ASSISTANT, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    prompt, completion = split_prompt_completion(multi_turn)
    assert prompt == multi_turn[:3] and completion == "A2"
    assert split_prompt_completion(USER_ASSISTANT[:1]) == (USER_ASSISTANT[:1], None)


def test_every_file_type_and_folder(tmp_path):
    import pandas

    rows = [{"query": f"q{i}", "response": f"r{i}"} for i in range(3)]
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows)
    (folder / "b.json").write_text(json.dumps(rows))
    pandas.DataFrame(rows).to_csv(folder / "c.csv", index=False)
    pandas.DataFrame(rows).to_parquet(folder / "d.parquet")
    (folder / "notes.txt").write_text("ignored")
    read = read_rows(DatasetSpec.parse(str(folder)), seed=0)
    assert [row["query"] for _, row in read] == ["q0", "q1", "q2"] * 4
    assert read[1][0] == f"{folder / 'a.jsonl'}:2"


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q", "response": "r"}\n\n{"query": oops}\n')
    with pytest.raises(GKDUserError, match=r"bad\.jsonl:3: bad JSON"):
        read_rows(DatasetSpec.parse(str(path)), seed=0)


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(GKDUserError, match="no such file or folder"):
        read_rows(DatasetSpec.parse(str(tmp_path / "missing.jsonl")), seed=0)


def test_tokenization_ends_the_completion_at_eos(tokenizer):
    stop_ids = (tokenizer.eos_token_id,)
    prompt_ids, completion_ids = tokenize_messages(tokenizer, USER_ASSISTANT[:1], "12 + 3 = 15", stop_ids)
    assert tokenizer.decode(prompt_ids) == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    # The template's trailing newline after <|im_end|> is not part of the completion.
    assert tokenizer.decode(completion_ids) == "12 + 3 = 15<|im_end|>"
    assert completion_ids[-1] == tokenizer.eos_token_id


def test_no_chat_template_is_a_clear_error(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(GKDUserError, match="has no chat template"):
        check_chat_template(bare, "base-model")


def test_cut_at_stop_keeps_the_first_stop_only():
    assert cut_at_stop([5, 6, 2, 7, 2], (2,)) == [5, 6, 2]
    assert cut_at_stop([5, 6, 7], (2, 3)) == [5, 6, 7]
    assert cut_at_stop([5, 3, 2], (2, 3)) == [5, 3]


@pytest.mark.parametrize("pad_token_id", [0, 2])  # 2 is also the EOS here
def test_mask_supervises_completion_and_eos_only(pad_token_id):
    eos = 2
    prompts = [[10, 11], [20]]
    completions = [[13, eos], [21, 22, 23, eos]]
    batch = build_batch(prompts, completions, pad_token_id)
    assert batch["input_ids"].tolist() == [[10, 11, 13, eos, pad_token_id], [20, 21, 22, 23, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    ignore = IGNORE_INDEX
    assert batch["labels"].tolist() == [[ignore, ignore, 13, eos, ignore], [ignore, 21, 22, 23, eos]]


def test_truncation_strategies():
    prompt, completion = list(range(6)), [10, 11, 12, 13]
    assert truncate(prompt, completion, 20, "delete", "w") == (prompt, completion)
    assert truncate(prompt, completion, 8, "delete", "w") is None
    assert truncate(prompt, completion, 8, "left", "w") == ([2, 3, 4, 5], completion)
    assert truncate(prompt, completion, 8, "right", "w") == (prompt, [10, 11])
    assert truncate(prompt, None, 4, "left", "w") == ([3, 4, 5], None)
    with pytest.raises(GKDUserError, match=r"w: 10 tokens exceed --max_length 8"):
        truncate(prompt, completion, 8, "raise", "w")


def test_prompt_only_rows_need_lmbda_1_or_seq_kd(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"query": "a", "response": "b"}, {"query": "only a prompt"}])
    stop_ids = (tokenizer.eos_token_id,)
    with pytest.raises(GKDUserError, match=r"p\.jsonl:2: the row has no assistant completion, which --lmbda 0.5"):
        load_examples([str(path)], tokenizer, stop_ids, seed=0, need_completions=True,
                      reason_completions_needed="--lmbda 0.5 with --seq_kd false")
    examples = load_examples([str(path)], tokenizer, stop_ids, seed=0, need_completions=False)
    assert examples[1]["completion_ids"] is None and len(examples) == 2


def test_build_batch_gives_long_tensors():
    batch = build_batch([[1]], [[2]], 0)
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_hub_ids_go_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, subset=None, split=None):
        calls.append((name, subset, split))
        return datasets.Dataset.from_list([{"query": f"q{i}", "response": "r"} for i in range(5)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = read_rows(DatasetSpec.parse("org/math:hard#3"), seed=0)
    assert calls == [("org/math", "hard", "train")]
    assert len(rows) == 3 and rows[0][0].startswith("org/math row ")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nlong details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GKDUserError, match=r"^--dataset org/none: .*hub dataset failed \(Couldn't reach the Hub\)$"):
        read_rows(DatasetSpec.parse("org/none"), seed=0)
