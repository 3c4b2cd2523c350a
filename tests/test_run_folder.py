"""ms-swift's output layout: versioned run folders, args.json, logging.jsonl and images/."""

import datetime
import enum
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from conftest import free_port
from gkd.errors import GKDUserError
from gkd.run_folder import (
    RunFolderCallback, format_time, next_version_dir, plot_logs, save_arguments, smoothed, versioned_output_dir,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NOW = datetime.datetime(2024, 3, 7, 9, 5, 2)


# ----------------------------------------------------------------------------- the versioned folder


def test_next_version_counts_every_entry_starting_with_v_digits(tmp_path):
    for folder in ("v0-20240101-000000", "v3-20240102-000000", "v10-x", "run-v99", "version7", "V50", "logs"):
        (tmp_path / folder).mkdir()
    (tmp_path / "v20").write_text("a file, not a folder: ms-swift counts it too")
    (tmp_path / "v30abc.txt").write_text("re.match needs only the prefix v<digits>")

    assert next_version_dir(str(tmp_path), NOW) == str(tmp_path / "v31-20240307-090502")
    (tmp_path / "v30abc.txt").unlink()
    assert next_version_dir(str(tmp_path), NOW) == str(tmp_path / "v21-20240307-090502")


def test_next_version_starts_at_v0_and_creates_nothing(tmp_path):
    missing = tmp_path / "not-yet"
    assert next_version_dir(str(missing), NOW) == str(missing / "v0-20240307-090502")
    assert next_version_dir(str(tmp_path), NOW) == str(tmp_path / "v0-20240307-090502")
    assert not missing.exists() and list(tmp_path.iterdir()) == []


def test_versioned_output_dir_creates_the_next_folder_each_call(tmp_path):
    output_dir = tmp_path / "out"
    first = versioned_output_dir(str(output_dir))
    second = versioned_output_dir(str(output_dir))
    assert os.path.isdir(first) and os.path.isdir(second)
    assert os.path.basename(first).startswith("v0-") and os.path.basename(second).startswith("v1-")
    assert sorted(os.listdir(output_dir)) == [os.path.basename(first), os.path.basename(second)]


def test_versioned_output_dir_skips_a_name_taken_meanwhile(tmp_path, monkeypatch):
    # Another run created v0-<this second> between our listing and our mkdir: we take v1, not its folder.
    import gkd.run_folder as run_folder

    taken = next_version_dir(str(tmp_path), NOW)
    calls = []

    def racing(output_dir, now=None):
        calls.append(output_dir)
        return taken if len(calls) == 1 else next_version_dir(output_dir, NOW)

    os.makedirs(taken)
    monkeypatch.setattr(run_folder, "next_version_dir", racing)
    assert versioned_output_dir(str(tmp_path)) == str(tmp_path / "v1-20240307-090502")
    assert len(calls) == 2


def test_versioned_output_dir_refuses_an_unwritable_place(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(GKDUserError, match="a-file: cannot create the run folder"):
        versioned_output_dir(str(blocker))


def test_versioned_output_dir_under_torchrun_needs_the_process_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="process group"):
        versioned_output_dir(str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def _two_ranks(rank: int, port: int, places: list[str], results: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:
            time.sleep(1.2)  # its own clock would name another second's folder
        answers = []
        for place in places:
            try:
                answers.append(versioned_output_dir(place))
            except GKDUserError as error:
                answers.append(f"GKDUserError: {error}")
        Path(results, f"rank{rank}.json").write_text(json.dumps(answers))
    finally:
        dist.destroy_process_group()


def test_versioned_output_dir_is_decided_on_rank0_and_broadcast(tmp_path):
    # One spawn for both cases: each process start imports torch and transformers again.
    output_dir, blocked, results = tmp_path / "out", tmp_path / "blocked", tmp_path / "results"
    results.mkdir()
    blocked.write_text("a file where the folder should be")
    mp.spawn(_two_ranks, args=(free_port(), [str(output_dir), str(blocked)], str(results)), nprocs=2, join=True)

    (created, refused), again = [json.loads((results / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [created, refused] == again
    assert os.listdir(output_dir) == [os.path.basename(created)]
    assert os.path.dirname(created) == str(output_dir) and os.path.basename(created).startswith("v0-")
    # A failure on rank 0 reaches every rank instead of leaving them waiting in the broadcast.
    assert refused.startswith(f"GKDUserError: --output_dir {blocked}: cannot create the run folder")


# ----------------------------------------------------------------------------- args.json


class Mode(enum.Enum):
    FULL = "full"


def test_save_arguments_writes_json_safe_values(tmp_path):
    path = tmp_path / "args.json"
    path.write_text("an older file, replaced whole")
    save_arguments(str(path), {
        "model": Path("/models/qwen"), "mode": Mode.FULL, "tags": ("a", "b"), "only": {3},
        "nested": {"lr": 1e-5, 2: [Path("x")]}, "callable": len, "flag": True, "none": None, "name": "函数",
    })
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "model": "/models/qwen", "mode": "full", "tags": ["a", "b"], "only": [3],
        "nested": {"lr": 1e-5, "2": ["x"]}, "callable": "<built-in function len>", "flag": True, "none": None,
        "name": "函数",
    }
    text = path.read_text(encoding="utf-8")
    assert '\n  "model": "/models/qwen",' in text and "函数" in text  # indent=2, ensure_ascii=False
    assert os.listdir(tmp_path) == ["args.json"]  # no temporary file left


# ----------------------------------------------------------------------------- logging.jsonl and images/


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (5.9, "5s"), (65, "1m 5s"), (3605, "1h 0m 5s"), (90061, "1d 1h 1m 1s"),
])
def test_format_time_as_ms_swift(seconds, text):
    assert format_time(seconds) == text


def test_smoothing_is_tensorboards_debiased_ema():
    assert smoothed([4.0], 0.9) == [4.0]
    assert smoothed([1.0, 2.0, 3.0], 0.9) == pytest.approx([1.0, 2.9 / 1.9, (2.9 * 0.9 + 3) / (1.9 * 0.9 + 1)])
    assert smoothed([1.0, 5.0], 0.0) == [1.0, 5.0]


def _read_png(path):
    from matplotlib.image import imread

    assert Path(path).read_bytes()[:8] == PNG_SIGNATURE
    return imread(path)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, 32, (8, 12), generator=generator)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"input_ids": self.rows[index], "labels": self.rows[index]}


def test_callback_in_a_real_trainer_run(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    ))
    run_dir = tmp_path / "v0-20240307-090502"
    run_dir.mkdir()
    args = TrainingArguments(
        output_dir=str(run_dir), max_steps=4, logging_steps=1, save_steps=4, per_device_train_batch_size=2,
        learning_rate=1e-3, report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[RunFolderCallback(str(run_dir))])
    trainer.train()

    lines = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    *log_lines, final = lines
    history = trainer.state.log_history
    # One line per Trainer log: the four steps, then Trainer's training summary (train_runtime, ...).
    assert len(log_lines) == len(history) == 5
    step_lines = [line for line in log_lines if "loss" in line]
    assert [line["loss"] for line in step_lines] == [round(entry["loss"], 8) for entry in history[:4]]
    assert [line["global_step/max_steps"] for line in log_lines] == ["1/4", "2/4", "3/4", "4/4", "4/4"]
    assert not any("percentage" in line for line in step_lines)  # ms-swift writes none
    for line, entry in zip(log_lines, history):
        assert {key: line[key] for key in entry if key != "step"} == {
            key: round(value, 8) if isinstance(value, float) else value for key, value in entry.items() if key != "step"
        }
        assert line["elapsed_time"].endswith("s") and line["remaining_time"].endswith("s")
        assert 0 < line["memory(GiB)"] < 1000 and line["train_speed(s/it)"] > 0
    assert step_lines[-1]["remaining_time"] == "0s"
    assert "train_runtime" in log_lines[-1]

    assert final["global_step"] == 4
    assert final["last_model_checkpoint"] == str(run_dir / "checkpoint-4")
    assert os.path.isdir(final["last_model_checkpoint"])
    assert final["best_model_checkpoint"] is None and final["best_metric"] is None
    assert final["log_history"] == json.loads(json.dumps(history))
    assert final["memory"] >= step_lines[-1]["memory(GiB)"] - 0.01

    images = run_dir / "images"
    for name in ("train_loss", "train_learning_rate", "train_grad_norm", "train_epoch", "train_train_runtime"):
        pixels = _read_png(images / f"{name}.png")
        assert pixels.ndim == 3 and pixels.shape[0] > 0 and pixels.shape[1] > 0
    names = {path.stem for path in images.iterdir()}
    assert not names & {"train_memory(GiB)", "train_train_speed(s/it)", "train_global_step_max_steps"}


def _write_log(run_dir: Path, records) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "logging.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


def test_plot_logs_names_images_after_tensorboard_tags(tmp_path):
    _write_log(tmp_path, [
        {"loss": 2.0, "learning_rate": 1e-4, "train.speed": 3, "note": "text", "global_step/max_steps": "1/3",
         "memory(GiB)": 1.5, "train_speed(s/it)": 0.2, "elapsed_time": "1s"},
        {"loss": 1.0, "learning_rate": 5e-5, "global_step/max_steps": "2/3"},
        {"eval_loss": 1.5, "global_step/max_steps": "2/3"},
        {"loss": 0.5, "learning_rate": 0.0, "global_step/max_steps": "3/3"},
        {"global_step": 3, "log_history": [], "memory": 1.5, "best_metric": None},
    ])
    written = plot_logs(str(tmp_path))
    images = tmp_path / "images"
    assert sorted(written) == sorted(str(images / f"{name}.png") for name in (
        "train_loss", "train_learning_rate", "train_train_speed", "eval_loss",
    ))
    for path in written:
        assert _read_png(path).shape[0] > 0


def test_plot_logs_draws_loss_raw_and_smoothed_and_a_single_point_as_a_scatter(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []

    def recorder(kind):
        return lambda axes, x, y, color: drawn.append((kind, list(x), list(y), color))

    monkeypatch.setattr(Axes, "plot", recorder("plot"))
    monkeypatch.setattr(Axes, "scatter", recorder("scatter"))
    _write_log(tmp_path, [
        {"loss": 2.0, "grad_norm": 1.0, "global_step/max_steps": "1/2"},
        {"loss": 1.0, "grad_norm": 0.5, "global_step/max_steps": "2/2"},
        {"eval_loss": 1.5, "global_step/max_steps": "2/2"},
    ])
    plot_logs(str(tmp_path))
    assert drawn == [
        ("plot", [1, 2], [2.0, 1.0], "#FFE2D9"), ("plot", [1, 2], smoothed([2.0, 1.0], 0.9), "#FF7043"),
        ("plot", [1, 2], [1.0, 0.5], "#FF7043"),
        ("scatter", [2], [1.5], "#FF7043"),
    ]


def test_plot_logs_without_matplotlib_warns_and_writes_nothing(tmp_path, monkeypatch, caplog):
    _write_log(tmp_path, [{"loss": 2.0, "global_step/max_steps": "1/1"}])
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # a None entry makes `import` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level("WARNING", logger="gkd.run_folder"):
        assert plot_logs(str(tmp_path)) == []
    assert not (tmp_path / "images").exists()
    assert [record.getMessage() for record in caplog.records] == [
        f"matplotlib is not installed: no images in {tmp_path / 'images'}"
    ]
