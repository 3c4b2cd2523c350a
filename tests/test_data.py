"""Data: dataset specs, every row shape to messages, tokenization and the completion mask."""

import json
import re
from collections import Counter

import pytest
import torch

from conftest import write_jsonl
from gkd.data import (
    IGNORE_INDEX, DatasetSpec, build_batch, collate_examples, draw_rows, load_examples, read_rows, row_to_messages,
    split_prompt_completion, split_train_val,
)
from gkd.tokenize import check_chat_template, cut_at_stop, tokenize_messages, truncate
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
    # ms-swift's hub prefix and several subsets (split at the first colon)
    assert DatasetSpec.parse("hf::org/name:a/b#7") == DatasetSpec("org/name", "a/b", 7, use_hf=True)
    assert DatasetSpec.parse("MS::org/name") == DatasetSpec("org/name", None, None, use_hf=False)
    with pytest.raises(GKDUserError, match="positive row count"):
        DatasetSpec.parse("data.jsonl#ten")


def test_spec_a_path_is_checked_again_after_each_cut(tmp_path, monkeypatch):
    # ms-swift checks the disk before each cut: after the hub prefix, then after '#N'
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some_dir#1").mkdir()
    assert DatasetSpec.parse("hf::some_dir#1") == DatasetSpec("some_dir#1", None, None, use_hf=True)
    assert DatasetSpec.parse("ms::some_dir#1#3") == DatasetSpec("some_dir#1", None, 3, use_hf=False)
    (tmp_path / "a:b.jsonl").write_text("")
    assert DatasetSpec.parse("HF::a:b.jsonl#2") == DatasetSpec("a:b.jsonl", None, 2, use_hf=True)
    assert DatasetSpec.parse("ms::a:b.jsonl") == DatasetSpec("a:b.jsonl", None, None, use_hf=False)
    (tmp_path / "x::y.jsonl").write_text("")  # an existing path keeps its '::'
    assert DatasetSpec.parse("x::y.jsonl#4") == DatasetSpec("x::y.jsonl", None, 4)


@pytest.mark.parametrize("text", ["huggingface::org/name", "modelscope::org/name:sub#3", "::org/name",
                                  "org/name:sub::x"])
def test_spec_other_hub_prefixes_are_refused_in_one_line(text):
    # ms-swift drops any prefix but hf/ms silently and loads from the default hub
    with pytest.raises(GKDUserError, match="unknown hub prefix") as error:
        DatasetSpec.parse(text)
    assert str(error.value).startswith(f"--dataset {text}: ") and "\n" not in str(error.value)


def test_spec_a_subset_on_a_local_path_is_refused(tmp_path, monkeypatch):
    # ms-swift reads a file whole and ignores the subset: gkd says so instead of dropping it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("")
    (tmp_path / "folder").mkdir()
    with pytest.raises(GKDUserError) as error:
        DatasetSpec.parse("data.jsonl:sub")
    assert str(error.value).startswith("--dataset data.jsonl:sub: a local file takes no subset")
    with pytest.raises(GKDUserError, match="a local file takes no subset"):
        DatasetSpec.parse("hf::data.jsonl:a/b#5")
    with pytest.raises(GKDUserError, match="a local folder takes no subset"):
        DatasetSpec.parse("folder:sub")
    assert DatasetSpec.parse("data.jsonl:#2") == DatasetSpec("data.jsonl", None, 2)  # an empty subset is none
    # a file that does not exist is not local by the disk: the subset stays (reading it then says no such file)
    assert DatasetSpec.parse("missing.jsonl:sub") == DatasetSpec("missing.jsonl", "sub", None)


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
    assert truncate(prompt, completion, 3, "left", "w") == ([5], [10, 11])  # one prompt token stays
    assert truncate(prompt, completion, 6, "right", "w") is None  # no room left for the completion
    with pytest.raises(GKDUserError, match=r"w: 10 tokens exceed --max_length 8"):
        truncate(prompt, completion, 8, "raise", "w")


def test_max_length_bounds_the_prompt_of_prompt_only_rows():
    """ms-swift's GKD: --max_length is max_prompt_length; generation has --max_completion_length."""
    prompt = list(range(6))
    for strategy in ("delete", "left", "right", "raise"):
        assert truncate(prompt, None, 6, strategy, "w") == (prompt, None)  # len(prompt) == max_length is kept
    assert truncate(prompt, None, 5, "delete", "w") is None
    assert truncate(prompt, None, 4, "left", "w") == ([2, 3, 4, 5], None)  # the generation prompt is at the end
    assert truncate(prompt, None, 4, "right", "w") is None  # its start would cut the generation prompt off
    with pytest.raises(GKDUserError, match=r"^w: the prompt's 6 tokens exceed --max_length 5 "):
        truncate(prompt, None, 5, "raise", "w")


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


def test_hub_ids_go_through_the_chosen_hub(monkeypatch):
    """ModelScope by default, the Hugging Face Hub with USE_HF=1 or hf:: (clients stood in for: no hub here)."""
    import sys
    import types

    import datasets

    calls = []

    def rows(name):
        return datasets.Dataset.from_list([{"query": f"{name} q{i}", "response": "r"} for i in range(5)])

    def hf_load_dataset(name, subset=None, split=None):
        calls.append(("hf", name, subset, split))
        return rows("hf")

    class MsDataset:
        @staticmethod
        def load(name, subset_name=None, split=None):
            calls.append(("ms", name, subset_name, split))
            return rows("ms")

    monkeypatch.setattr(datasets, "load_dataset", hf_load_dataset)
    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(MsDataset=MsDataset))
    monkeypatch.delenv("USE_HF", raising=False)
    loaded = read_rows(DatasetSpec.parse("org/math:hard#3"), seed=0)
    assert calls == [("ms", "org/math", "hard", "train")]
    assert len(loaded) == 3 and loaded[0][0].startswith("org/math row ") and loaded[0][1]["query"].startswith("ms")
    read_rows(DatasetSpec.parse("hf::org/math"), seed=0)
    monkeypatch.setenv("USE_HF", "1")
    read_rows(DatasetSpec.parse("org/math:a/b"), seed=0)
    assert calls[1:] == [("hf", "org/math", None, "train"), ("hf", "org/math", "a", "train"),
                         ("hf", "org/math", "b", "train")]

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nlong details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GKDUserError, match=r"^--dataset org/none: .*\(Couldn't reach the Hub\)"):
        read_rows(DatasetSpec.parse("org/none"), seed=0)


def test_rows_with_images_are_refused_never_dropped(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "coco.jsonl", [
        {"messages": [{"role": "user", "content": "<image>Describe it."}, {"role": "assistant", "content": "A cat."}],
         "images": ["cat.png"]}])
    with pytest.raises(GKDUserError, match=r"^[^\n]*coco\.jsonl:1: the row has images, and the model reads text "
                                           r"alone; gkd never trains on a caption without its picture$"):
        load_examples([str(path)], tokenizer, (tokenizer.eos_token_id,), seed=0)


# ----------------------------------------------------------------------------- ms-swift data flags

TWO_TURNS = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_only_row_of_exactly_max_length_is_kept(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"query": "short"}, {"query": "a longer question here"}])
    stop_ids = (tokenizer.eos_token_id,)
    short = len(encode(tokenizer, "<|im_start|>user\nshort<|im_end|>\n<|im_start|>assistant\n"))
    examples = load_examples([str(path)], tokenizer, stop_ids, seed=0, need_completions=False, max_length=short)
    assert [len(example["prompt_ids"]) for example in examples] == [short]


def test_worker_processes_give_the_same_examples(tmp_path, tokenizer):
    rows = [{"query": f"question {i}", "response": f"answer {i}"} for i in range(7)] + [{"messages": TWO_TURNS}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    stop_ids = (tokenizer.eos_token_id,)
    one = load_examples([str(path)], tokenizer, stop_ids, seed=0, loss_scale="default")
    two = load_examples([str(path)], tokenizer, stop_ids, seed=0, loss_scale="default", dataset_num_proc=2)
    assert two == one
    for example, row in zip(one, rows):  # the examples are the rows, in order, tokenized one by one
        messages = row_to_messages(row, "w")
        assert (example["prompt_ids"], example["completion_ids"]) == tokenize_messages(
            tokenizer, messages[:-1], messages[-1]["content"], stop_ids)
        assert example["dataset"] == str(path)
    assert [len(example["prompt_label_spans"]) for example in one] == [0] * 7 + [1]


def test_user_error_in_a_worker_is_one_line_naming_the_first_bad_row(tmp_path, tokenizer):
    rows = [{"query": "q", "response": "r"}] * 2 + [{"query": "q " * 40, "response": "r"}] * 3
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(GKDUserError) as caught:
        load_examples([str(path)], tokenizer, (tokenizer.eos_token_id,), seed=0, max_length=30,
                      truncation_strategy="raise", dataset_num_proc=2)
    assert type(caught.value) is GKDUserError
    assert re.fullmatch(rf"{re.escape(str(path))}:3: \d+ tokens exceed --max_length 30 \(--truncation_strategy raise\)",
                        str(caught.value))


def test_load_from_cache_file_reuses_the_tokenized_rows(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": f"q{i}", "response": f"r{i}"} for i in range(4)]
                       + [{"messages": TWO_TURNS}])
    stop_ids = (tokenizer.eos_token_id,)
    settings = dict(seed=0, max_length=64, loss_scale="default", load_from_cache_file=True)
    first = load_examples([str(path)], tokenizer, stop_ids, **settings)
    assert list((tmp_path / "hf" / "gkd").glob("*.arrow"))  # in datasets' cache folder, under gkd/

    def no_template(*args, **kwargs):
        raise RuntimeError("the chat template ran")

    monkeypatch.setattr(tokenizer, "apply_chat_template", no_template)
    assert load_examples([str(path)], tokenizer, stop_ids, **settings) == first  # read back, not recomputed
    changes = [dict(max_length=65), dict(loss_scale="last_round"), dict(enable_thinking=False),
               dict(truncation_strategy="left"), dict(system="S"), dict(load_from_cache_file=False)]
    for change in changes:
        with pytest.raises(RuntimeError, match="the chat template ran"):
            load_examples([str(path)], tokenizer, stop_ids, **{**settings, **change})
    with pytest.raises(RuntimeError, match="the chat template ran"):
        load_examples([str(path)], tokenizer, stop_ids + (0,), **settings)
    monkeypatch.setattr(tokenizer, "chat_template", tokenizer.chat_template + " ")
    with pytest.raises(RuntimeError, match="the chat template ran"):
        load_examples([str(path)], tokenizer, stop_ids, **settings)
    write_jsonl(path, [{"query": "q0", "response": "changed"}])
    with pytest.raises(RuntimeError, match="the chat template ran"):
        load_examples([str(path)], tokenizer, stop_ids, **settings)


def test_split_train_val_follows_ms_swift():
    import datasets
    import numpy as np

    examples = [{"i": i, "dataset": "a"} for i in range(10)] + [{"i": i, "dataset": "b"} for i in range(10, 13)]
    train, val = split_train_val(examples, 0.25, seed=42)
    # ms-swift: per --dataset entry, max(int(n * ratio), 1) validation rows drawn by datasets' train_test_split,
    # its seed drawn from one np.random.RandomState(data_seed) in entry order.
    random_state = np.random.RandomState(42)
    expected_train, expected_val = [], []
    for indices, val_count in ((range(10), 2), (range(10, 13), 1)):
        seed = random_state.randint(0, np.iinfo(np.int32).max)
        split = datasets.Dataset.from_dict({"i": list(indices)}).train_test_split(
            test_size=val_count, shuffle=True, seed=seed)
        expected_train += split["train"]["i"]
        expected_val += split["test"]["i"]
    assert [example["i"] for example in val] == expected_val and len(val) == 3
    assert [example["i"] for example in train] == expected_train
    assert sorted(example["i"] for example in train + val) == list(range(13))
    assert split_train_val(examples, 0.25, seed=42) == (train, val)
    assert split_train_val(examples, 0.25, seed=1) != (train, val)
    assert len(split_train_val(examples[:10], 0.01, seed=42)[1]) == 1  # at least one
    assert split_train_val(examples, 0.0, seed=42) == (examples, [])


@pytest.mark.parametrize("ratio, message", [(0.5, r"has 1 row\(s\), and 1 for validation would leave none"),
                                            (1.0, r"must be in \[0, 1\)"), (-0.1, r"must be in \[0, 1\)")])
def test_split_that_leaves_no_training_rows_is_refused(ratio, message):
    with pytest.raises(GKDUserError, match=rf"^--split_dataset_ratio {ratio}: .*{message}"):
        split_train_val([{"i": 0, "dataset": "one.jsonl"}], ratio, seed=42)


def test_enable_thinking_reaches_the_chat_template(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
        "{% endif %}{% endif %}"))
    path = write_jsonl(tmp_path / "t.jsonl", [{"query": "Q"}])
    stop_ids = (tokenizer.eos_token_id,)
    plain = encode(tokenizer, "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")
    prompts = {thinking: load_examples([str(path)], tokenizer, stop_ids, seed=0, need_completions=False,
                                       enable_thinking=thinking)[0]["prompt_ids"] for thinking in (None, True, False)}
    assert prompts[None] == prompts[True] == plain
    assert prompts[False] == plain + encode(tokenizer, "<think>\n\n</think>\n\n")


def test_loss_scale_default_supervises_every_assistant_turn(tmp_path, tokenizer):
    stop_ids = (tokenizer.eos_token_id,)
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": TWO_TURNS}])
    example = load_examples([str(path)], tokenizer, stop_ids, seed=0, loss_scale="default")[0]
    first_prompt = encode(tokenizer, "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n")
    first_answer = encode(tokenizer, "A1<|im_end|>")  # up to its stop; the template's newline after it is not
    assert example["prompt_ids"] == first_prompt + first_answer + encode(
        tokenizer, "\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")
    assert example["completion_ids"] == encode(tokenizer, "A2<|im_end|>")
    start, end = len(first_prompt), len(first_prompt) + len(first_answer)
    assert example["prompt_label_spans"] == [(start, end)]

    collated = collate_examples([example])
    assert collated.pop("teacher_prompt_ids") == [None]
    assert collated.pop("teacher_tags") == [None]
    assert collated.pop("images") == [[]]
    batch = build_batch(**collated, pad_token_id=tokenizer.pad_token_id)
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    supervised = [position for position, label in enumerate(labels) if label != IGNORE_INDEX]
    prompt_length = len(example["prompt_ids"])
    assert supervised == list(range(start, end)) + list(range(prompt_length, len(ids)))
    assert all(labels[position] == ids[position] for position in supervised)
    assert tokenizer.decode([ids[position] for position in supervised]) == "A1<|im_end|>A2<|im_end|>"

    last_round = load_examples([str(path)], tokenizer, stop_ids, seed=0)[0]
    assert last_round["prompt_label_spans"] == []
    assert (last_round["prompt_ids"], last_round["completion_ids"]) == (example["prompt_ids"],
                                                                       example["completion_ids"])


def test_loss_scale_spans_follow_left_truncation(tmp_path, tokenizer):
    three = [{"role": "system", "content": "S"}, *TWO_TURNS[:3], {"role": "assistant", "content": "A2"},
             {"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A3"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": three}])
    stop_ids = (tokenizer.eos_token_id,)
    whole = load_examples([str(path)], tokenizer, stop_ids, seed=0, loss_scale="default")[0]
    assert [tokenizer.decode(whole["prompt_ids"][s:e]) for s, e in whole["prompt_label_spans"]] == [
        "A1<|im_end|>", "A2<|im_end|>"]
    length = len(whole["prompt_ids"]) + len(whole["completion_ids"])
    start_a1, end_a1 = whole["prompt_label_spans"][0]
    for cut in (start_a1 + 1, end_a1):  # into A1's turn, then just past it
        kept = load_examples([str(path)], tokenizer, stop_ids, seed=0, loss_scale="default",
                             max_length=length - cut, truncation_strategy="left")[0]
        assert kept["prompt_ids"] == whole["prompt_ids"][cut:]
        spans = [(max(s - cut, 0), e - cut) for s, e in whole["prompt_label_spans"] if e > cut]
        assert kept["prompt_label_spans"] == spans
        assert tokenizer.decode(kept["prompt_ids"][spans[-1][0]:spans[-1][1]]) == "A2<|im_end|>"


def test_loss_scale_needs_a_template_with_the_prefix_property(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", (  # marks the last message: earlier prefixes differ
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
        "{% if loop.last %}{{ '!' }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"))
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": TWO_TURNS}])
    stop_ids = (tokenizer.eos_token_id,)
    with pytest.raises(GKDUserError, match=rf"^{re.escape(str(path))}:1: --loss_scale default: .*assistant message 2"):
        load_examples([str(path)], tokenizer, stop_ids, seed=0, loss_scale="default")
    assert load_examples([str(path)], tokenizer, stop_ids, seed=0)[0]["prompt_label_spans"] == []


@pytest.mark.parametrize("loss_scale", ["all", "ignore_empty_think", "react", "default+ignore_empty_think"])
def test_other_loss_scales_are_refused(tmp_path, tokenizer, loss_scale):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": TWO_TURNS}])
    message = rf"^--loss_scale {re.escape(loss_scale)}: gkd supports default and last_round$"
    with pytest.raises(GKDUserError, match=message):
        load_examples([str(path)], tokenizer, (tokenizer.eos_token_id,), seed=0, loss_scale=loss_scale)


def test_build_batch_supervises_prompt_label_spans():
    batch = build_batch([[10, 11, 12, 13], [20]], [[14, 2], [21, 2]], 0, prompt_label_spans=[[(1, 3)], []])
    ignore = IGNORE_INDEX
    assert batch["labels"].tolist() == [[ignore, 11, 12, ignore, 14, 2], [ignore, 21, 2, ignore, ignore, ignore]]
    assert collate_examples([{"prompt_ids": [1], "completion_ids": None}])["prompt_label_spans"] == [[]]
    with pytest.raises(ValueError, match="outside its 1 prompt tokens"):
        build_batch([[1]], [[2]], 0, prompt_label_spans=[[(0, 2)]])

