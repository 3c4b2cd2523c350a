import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny / "student")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
