"""NPROC_PER_NODE and friends start torchrun as ms-swift does (the end-to-end runs are in test_cli.py and
test_infer.py)."""

import os
import subprocess
import sys

import pytest

from gkd.errors import GKDUserError
from gkd.launch import torchrun_command


def test_swift_variables_become_torchrun_flags_in_order(monkeypatch):
    for name, value in {"MASTER_ADDR": "10.0.0.1", "NODE_RANK": "1", "NNODES": "2", "MASTER_PORT": "29555",
                        "NPROC_PER_NODE": "4"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert torchrun_command("gkd.cli.train", ["--lmbda", "1"]) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", "29555",
        "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "-m", "gkd.cli.train", "--lmbda", "1"]


def test_no_variables_or_a_started_process_runs_as_it_is(monkeypatch):
    for name in ("NPROC_PER_NODE", "NNODES", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_command("gkd.cli.train", []) is None
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun's child: must not start torchrun again
    assert torchrun_command("gkd.cli.train", []) is None


def test_a_bad_value_is_one_line(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("NPROC_PER_NODE", "four")
    with pytest.raises(GKDUserError, match="NPROC_PER_NODE=four: must be an integer >= 1"):
        torchrun_command("gkd.cli.train", [])
    result = subprocess.run([sys.executable, "-m", "gkd.cli.train", "--help"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "NPROC_PER_NODE": "0"}, timeout=120)
    assert result.returncode == 2 and result.stderr == "gkd-train: error: NPROC_PER_NODE=0: must be an integer >= 1\n"


def test_a_failing_run_under_nproc_per_node_ends_in_its_own_line_not_a_launcher_traceback(tmp_path, tiny):
    """Bad data under NPROC_PER_NODE=2: each process says what is wrong in one line, the launcher adds no
    traceback of its own, and the exit code is the processes' (2)."""
    result = subprocess.run(
        [sys.executable, "-m", "gkd.cli.train", "--model", tiny / "student", "--teacher_model", tiny / "teacher",
         "--dataset", tiny / "data" / "prompts.jsonl", "--output_dir", tmp_path / "out", "--report_to", "none"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "NPROC_PER_NODE": "2"})
    assert result.returncode == 2
    errors = {line for line in result.stderr.splitlines() if line.startswith("gkd-train: error:")}
    assert len(errors) == 1 and "prompts.jsonl:1: the row has no assistant completion" in errors.pop()
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


LEAVING = """
import atexit, sys
from types import SimpleNamespace
from gkd.launch import leave_finished_processes

atexit.register(lambda: print(" exit handlers ran", flush=True))
state = SimpleNamespace(num_processes={processes}, wait_for_everyone=lambda: print(" waited", end=""))
print("saved", end="")  # buffered: leaving must flush it
leave_finished_processes(state)
print(" returned", end="")
sys.exit(3)
"""


@pytest.mark.parametrize("processes", [1, 2])
def test_a_finished_process_of_several_leaves_after_the_others_with_its_exit_handlers(processes):
    """One process returns and exits as usual; each of several waits for the others, runs Python's exit
    handlers, flushes what it printed and ends with 0 without the interpreter's teardown."""
    result = subprocess.run([sys.executable, "-c", LEAVING.format(processes=processes)], capture_output=True,
                            text=True)
    if processes == 1:
        assert (result.returncode, result.stdout) == (3, "saved returned exit handlers ran\n")
    else:
        assert (result.returncode, result.stdout) == (0, "saved waited exit handlers ran\n")
