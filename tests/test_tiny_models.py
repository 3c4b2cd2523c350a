"""scripts/make_tiny_models.py: what it builds, and that it builds it the same way twice.

Most checks read the session's `tiny` build (conftest.py: a subprocess run of the
script, briefly trained). The rest call main() in-process on a few dozen rows,
which skips the start-up of a new interpreter.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_tiny_models.py"


def load_script():
    spec = importlib.util.spec_from_file_location("make_tiny_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mtm = load_script()

# A build small enough for a test: a few steps on a few dozen rows.
SMALL = ["--teacher_steps", "3", "--student_steps", "2", "--n_train", "48", "--n_val", "8",
         "--n_prompts", "8", "--batch_size", "8", "--log_every", "0"]


def build_small(out, *extra):
    return mtm.main(["--output_dir", str(out), *SMALL, *extra])


def file_hashes(folder):
    return {str(p.relative_to(folder)): mtm.sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -----------------------------------------------------------------------------
# The session build: layout, models, tokenizer, data.


def test_build_has_every_file_and_no_leftovers(tiny):
    for name in mtm.EXPECTED_FILES:
        assert (tiny / name).is_file(), name
    assert not [p.name for p in tiny.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_models_load_and_match_the_tokenizer(tiny, name):
    folder = tiny / name
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)

    assert config.model_type == "llama"
    assert config.hidden_size // config.num_attention_heads >= 32
    assert config.head_dim >= 32
    assert config.vocab_size == 320 and len(tokenizer) == 259
    assert not config.tie_word_embeddings
    assert config.bos_token_id is None and tokenizer.bos_token_id is None
    assert config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    # The chat template lives in tokenizer_config.json, where every
    # transformers version looks for it.
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())

    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}],
                                         add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 320)
    assert torch.isfinite(logits).all()


def test_teacher_is_bigger_than_student(tiny):
    teacher = AutoConfig.from_pretrained(tiny / "teacher")
    student = AutoConfig.from_pretrained(tiny / "student")
    assert (teacher.hidden_size, teacher.num_hidden_layers) == (128, 4)
    assert (student.hidden_size, student.num_hidden_layers) == (64, 2)


def test_chat_template_renders_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "12 + 30 = 42"},
        {"role": "user", "content": "And 20 + 21?"},
    ]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n"
                "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
                "<|im_start|>assistant\n12 + 30 = 42<|im_end|>\n"
                "<|im_start|>user\nAnd 20 + 21?<|im_end|>\n")
    assert tokenizer.apply_chat_template(messages, tokenize=False) == expected
    assert (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == expected + "<|im_start|>assistant\n")
    # Tokenized, the special markers are single tokens and the rest are bytes.
    ids = tokenizer.encode(expected, add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tokenizer.eos_token_id) == 4
    assert tokenizer.decode(ids) == expected


@pytest.mark.parametrize("text", ["What is 23 + 45?", " leading and trailing ", "tabs\tand\nnewlines",
                                  "ünïcödé, 数学, emoji 🤖", ""])
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    assert tokenizer.decode(ids) == text


def test_data_files(tiny):
    splits = {name: read_jsonl(tiny / "data" / f"{name}.jsonl") for name in ("train", "val", "prompts")}
    assert [len(rows) for rows in splits.values()] == [2000, 200, 200]
    problems = {}
    for name, rows in splits.items():
        problems[name] = set()
        for row in rows:
            assert list(row) == ["messages"]
            roles = [m["role"] for m in row["messages"]]
            assert roles == (["user"] if name == "prompts" else ["user", "assistant"])
            question = row["messages"][0]["content"]
            a, b = map(int, question.removeprefix("What is ").removesuffix("?").split(" + "))
            if name != "prompts":
                assert row["messages"][1]["content"] == f"{a} + {b} = {a + b}"
            problems[name].add((a, b))
        assert len(problems[name]) == len(rows)  # no duplicates within a split
    assert not problems["train"] & problems["val"]
    assert not problems["train"] & problems["prompts"]
    assert not problems["val"] & problems["prompts"]


# -----------------------------------------------------------------------------
# The build itself: determinism, skipping, atomic writes.


def test_two_builds_are_byte_identical(tmp_path):
    build_small(tmp_path / "a")
    build_small(tmp_path / "b")
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert set(a) == set(mtm.EXPECTED_FILES)
    assert a == b
    # and the seed matters
    build_small(tmp_path / "c", "--seed", "1")
    assert file_hashes(tmp_path / "c")["teacher/model.safetensors"] != a["teacher/model.safetensors"]


def test_main_leaves_torch_settings_as_it_found_them(tmp_path):
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    build_small(tmp_path / "out", "--teacher_steps", "0", "--student_steps", "0", "--no_eval")
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


def test_skips_an_up_to_date_build_and_rebuilds_on_force_or_new_recipe(tmp_path, capsys):
    out = tmp_path / "out"
    flags = ["--teacher_steps", "0", "--student_steps", "0", "--no_eval"]
    build_small(out, *flags)
    weights = out / "teacher" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    capsys.readouterr()
    build_small(out, *flags)
    assert "up to date" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == stamp

    build_small(out, *flags, "--force")
    assert "built" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns != stamp

    # A different recipe is not "up to date", even without --force.
    build_small(out, "--teacher_steps", "1", "--student_steps", "0", "--no_eval")
    assert json.loads((out / "build_info.json").read_text())["recipe"]["teacher_steps"] == 1

    # An incomplete folder is rebuilt too.
    (out / "data" / "val.jsonl").unlink()
    build_small(out, "--teacher_steps", "1", "--student_steps", "0", "--no_eval")
    assert (out / "data" / "val.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left


def test_stale_temp_folders_of_dead_runs_are_removed(tmp_path):
    # A folder named after a finished process is stale; one named after a
    # running process may be another build in progress and must stay.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".out.tmp-{dead.pid}"
        busy = tmp_path / f".out.tmp-{live.pid}"
        (stale / "teacher").mkdir(parents=True)
        busy.mkdir()
        build_small(tmp_path / "out", "--teacher_steps", "0", "--student_steps", "0", "--no_eval")
        assert not stale.exists()
        assert busy.exists()
    finally:
        live.kill()
        live.wait()


def test_command_line_skips_an_up_to_date_build(tmp_path):
    flags = [*SMALL, "--teacher_steps", "0", "--student_steps", "0", "--no_eval"]
    mtm.main(["--output_dir", str(tmp_path / "out"), *flags])
    result = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(tmp_path / "out"), *flags],
                            capture_output=True, text=True, check=True)
    assert "up to date" in result.stdout
