"""gkd-infer: output that gkd-train reads, crash safety, resume, data parallelism, refusals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import assert_refused_in_one_line, write_jsonl
from gkd.data import DatasetSpec, read_rows
from gkd.result_file import KEY_FIELD


def gkd_infer(*flags, launcher=()):
    command = [*launcher, "-m", "gkd.cli.infer"] if launcher else [sys.executable, "-m", "gkd.cli.infer"]
    return subprocess.run([*command, *map(str, flags)], capture_output=True, text=True, timeout=600)


def base_flags(tiny, result, dataset):
    return ["--model", tiny / "teacher", "--dataset", dataset, "--result_path", result, "--max_new_tokens", 10,
            "--max_batch_size", 4, "--write_batch_size", 4]


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_output_round_trips_into_gkd_train(tmp_path, tiny):
    spec = f"{tiny / 'data' / 'train.jsonl'}#6"
    result = tmp_path / "teacher.jsonl"
    run = gkd_infer(*base_flags(tiny, result, spec), "--num_return_sequences", 2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "12 rows" in run.stdout and "tokens/s" in run.stdout

    lines = read_lines(result)
    assert len(lines) == 12
    assert len({line[KEY_FIELD] for line in lines}) == 12
    for line in lines:
        assert line["messages"][-1] == {"role": "assistant", "content": line["response"]}
        assert line["messages"][0]["role"] == "user" and len(line["messages"]) == 2
        assert line["labels"].startswith(line["messages"][0]["content"][8:-1].split(" + ")[0])  # the original answer

    train = subprocess.run(
        [sys.executable, "-m", "gkd.cli.train", "--model", tiny / "student", "--teacher_model", tiny / "teacher",
         "--dataset", result, "--lmbda", "0", "--output_dir", tmp_path / "out", "--max_steps", "1",
         "--per_device_train_batch_size", "4", "--report_to", "none", "--save_strategy", "no"],
        capture_output=True, text=True, timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]


def test_sigkill_then_rerun_gives_every_row_exactly_once(tmp_path, tiny):
    spec = str(tiny / "data" / "prompts.jsonl")
    result = tmp_path / "killed.jsonl"
    flags = [*base_flags(tiny, result, f"{spec}#40"), "--write_batch_size", 2, "--max_batch_size", 2]
    process = subprocess.Popen([sys.executable, "-m", "gkd.cli.infer", *map(str, flags)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not result.exists() or len(result.read_bytes().splitlines()) < 4):
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = len(read_lines(result))
    assert 4 <= written < 40, "the kill should land mid-run"
    with open(result, "a") as handle:  # what a writer killed mid-line leaves
        handle.write('{"messages": [{"role": "user", "content": "What is')

    rerun = gkd_infer(*flags)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{40 - written} rows" in rerun.stdout and f"{written} rows were already" in rerun.stdout
    lines = read_lines(result)
    assert len(lines) == 40 and len({line[KEY_FIELD] for line in lines}) == 40
    drawn = [row for _, row in read_rows(DatasetSpec.parse(f"{spec}#40"), 42)]
    assert sorted(json.dumps(line["messages"][:-1]) for line in lines) == sorted(
        json.dumps(row["messages"]) for row in drawn)
    # The interrupted run wrote, response for response, what an uninterrupted one writes, though its write
    # batches and engine batches were cut differently: each response is seeded by its key alone.
    whole = tmp_path / "whole.jsonl"
    assert gkd_infer(*base_flags(tiny, whole, f"{spec}#40"), "--write_batch_size", 40, "--max_batch_size", 8
                     ).returncode == 0
    responses = {line[KEY_FIELD]: line["response"] for line in read_lines(whole)}
    assert {line[KEY_FIELD]: line["response"] for line in lines} == responses
    assert len(set(responses.values())) > 30  # sampled (temperature 0.9), not one greedy answer repeated


def test_a_spec_listed_twice_and_an_edited_input_resume_correctly(tmp_path, tiny):
    data = write_jsonl(tmp_path / "in.jsonl", [{"query": f"What is {i} + 1?"} for i in range(4)])
    result = tmp_path / "twice.jsonl"
    assert gkd_infer(*base_flags(tiny, result, data), "--dataset", data, data).returncode == 0
    assert len(read_lines(result)) == 8  # both copies, with distinct keys
    write_jsonl(data, [{"query": f"What is {i} + 1?"} for i in [0, 1, 2, 9]])  # the last row edited
    rerun = gkd_infer(*base_flags(tiny, result, data), "--dataset", data, data)
    assert rerun.returncode == 0 and "2 rows (" in rerun.stdout  # the edited row, once per copy
    assert len(read_lines(result)) == 10


def test_changed_settings_are_refused_on_resume(tmp_path, tiny):
    spec = f"{tiny / 'data' / 'prompts.jsonl'}#4"
    result = tmp_path / "r.jsonl"
    assert gkd_infer(*base_flags(tiny, result, spec)).returncode == 0
    before = result.read_text()
    changed = gkd_infer(*base_flags(tiny, result, spec), "--temperature", 0.5)
    assert changed.returncode == 2
    assert "temperature: 0.9 then, 0.5 now" in changed.stderr
    assert result.read_text() == before
    same = gkd_infer(*base_flags(tiny, result, spec))
    assert same.returncode == 0 and "0 rows" in same.stdout and result.read_text() == before


def test_two_processes_write_the_same_row_set_as_one(tmp_path, tiny):
    spec = f"{tiny / 'data' / 'train.jsonl'}#10"
    single, double = tmp_path / "single.jsonl", tmp_path / "double.jsonl"
    assert gkd_infer(*base_flags(tiny, single, spec)).returncode == 0
    launcher = ["env", "NPROC_PER_NODE=2", "MASTER_PORT=29517", sys.executable]  # as ms-swift users start it
    run = gkd_infer(*base_flags(tiny, double, spec), launcher=launcher)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("gkd-infer: 10 rows") == 1  # only the main process reports

    def row_set(path):  # responses included: each is seeded by its key, not by who sampled it
        return sorted((line[KEY_FIELD], json.dumps(line["messages"]), line["labels"]) for line in read_lines(path))

    assert row_set(double) == row_set(single)


def test_bad_inputs_give_one_line(tmp_path, tiny):
    prompts = tiny / "data" / "prompts.jsonl"
    existing = write_jsonl(tmp_path / "mine.jsonl", [{"note": "a file the user made"}])
    cases = {
        "missing model": (["--model", tmp_path / "nope", "--dataset", prompts, "--result_path", tmp_path / "a.jsonl"],
                          "--model"),
        "unknown backend": (["--model", tiny / "teacher", "--dataset", prompts, "--result_path", tmp_path / "b.jsonl",
                             "--infer_backend", "tgi"], "invalid choice: 'tgi'"),
        "unreadable dataset": (["--model", tiny / "teacher", "--dataset", tmp_path / "none.jsonl",
                                "--result_path", tmp_path / "c.jsonl"], "no such file or folder"),
        "missing folder": (["--model", tiny / "teacher", "--dataset", prompts,
                            "--result_path", tmp_path / "no" / "d.jsonl"], "does not exist"),
        "read-only folder": (["--model", tiny / "teacher", "--dataset", prompts, "--result_path", "/proc/e.jsonl"],
                             "cannot write there"),
        "not ours": (["--model", tiny / "teacher", "--dataset", prompts, "--result_path", existing],
                     "was not written by gkd-infer"),
    }
    assert_refused_in_one_line("gkd.cli.infer", "gkd-infer", cases)
    assert existing.read_text() == '{"note": "a file the user made"}\n'
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "c.jsonl").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; /proc covers it above")
def test_read_only_folder_for_non_root(tmp_path, tiny):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    run = gkd_infer("--model", tiny / "teacher", "--dataset", tiny / "data" / "prompts.jsonl",
                    "--result_path", folder / "x.jsonl")
    assert run.returncode == 2 and "cannot write there" in run.stderr
