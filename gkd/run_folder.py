"""ms-swift's output layout: a versioned run folder holding args.json, logging.jsonl and images/.

`<output_dir>/v{N}-{%Y%m%d-%H%M%S}` is what `swift rlhf` writes with --add_version (its default), so
scripts that look for a run's files (logging.jsonl, images/train_loss.png, checkpoint-*) find them in the
same places after switching to gkd-train.
"""

import datetime
import enum
import json
import logging
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from gkd.errors import GKDUserError

logger = logging.getLogger(__name__)

LOG_FILE = "logging.jsonl"
ARGS_FILE = "args.json"
IMAGES_DIR = "images"
PROGRESS_KEY = "global_step/max_steps"  # present on every on_log line, absent from the final summary line
# What RunFolderCallback adds to each log line. ms-swift adds these after TensorBoard has seen the logs,
# so they get no image there, and none here.
ADDED_KEYS = {PROGRESS_KEY, "elapsed_time", "remaining_time", "memory(GiB)", "train_speed(s/it)"}
# The only tag ms-swift draws with a smoothed curve beside the raw one, and its weight.
SMOOTHED_TAGS = {"train/loss"}
SMOOTHING = 0.9
RAW_COLOR, SMOOTH_COLOR = "#FFE2D9", "#FF7043"  # ms-swift's (TensorBoard's) colours


# ----------------------------------------------------------------------------- the versioned folder


def run_versions(output_dir: str) -> dict[str, int]:
    """The entries of output_dir that hold a version, by name: as ms-swift, any entry (folder or file) whose
    name starts with v<digits> holds N, so v3-old, v10-x and a file v20 all count."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return {name: int(match.group(1)) for name in names if (match := re.match(r"v(\d+)", name))}


def next_version_dir(output_dir: str, now: datetime.datetime | None = None) -> str:
    """The next run folder's path, `<output_dir>/v{N}-{YYYYmmdd-HHMMSS}`; nothing is created."""
    version = max(run_versions(output_dir).values(), default=-1) + 1
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    return os.path.join(output_dir, f"v{version}-{stamp}")


def start_run_folder(output_dir: str, add_version: bool) -> tuple[str, list[str]]:
    """The folder this run writes into: with add_version (ms-swift's default) a new output_dir/vN-..., so
    nothing of an earlier run is overwritten; else output_dir itself. Needs the process group (rank 0 names
    the folder). Returns it and the folders this run created (for remove_unfinished_run)."""
    created = [] if os.path.exists(output_dir) else [output_dir]
    if not add_version:
        os.makedirs(output_dir, exist_ok=True)
        return output_dir, created
    run_dir = versioned_output_dir(output_dir)
    return run_dir, created + [run_dir]


def remove_unfinished_run(created: list[str], run_dir: str) -> None:
    """After bad input found late: rank 0 removes the folders this run created, unless a checkpoint was written."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    for folder in reversed(created):
        try:
            if not any(name.startswith(PREFIX_CHECKPOINT_DIR) for name in os.listdir(folder)):
                shutil.rmtree(folder) if folder == run_dir else os.rmdir(folder)
        except OSError:  # not empty (another run's), or already gone
            pass


def latest_checkpoint(output_dir: str, add_version: bool) -> str | None:
    """The newest checkpoint of the newest run under output_dir (runs by version, the highest N newest),
    else of output_dir itself."""
    versions = run_versions(output_dir) if add_version else {}
    runs = [os.path.join(output_dir, name) for name in sorted(versions, key=versions.get, reverse=True)]
    for folder in runs + [output_dir]:
        checkpoint = get_last_checkpoint(folder) if os.path.isdir(folder) else None
        if checkpoint:
            return checkpoint
    return None


def versioned_output_dir(output_dir: str) -> str:
    """Create the next run folder on rank 0; every rank returns its path.

    Call it after the process group exists: each rank naming its own folder would split one run over
    several folders (their timestamps differ).
    """
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("versioned_output_dir: form the process group first, so that rank 0 names the folder")
    path, problem = None, None
    if not distributed or dist.get_rank() == 0:
        try:
            path = _create_next_version_dir(output_dir)
        except OSError as error:
            problem = f"--output_dir {output_dir}: cannot create the run folder there ({error.strerror})"
    if distributed:
        # The failure travels too: otherwise the other ranks would wait in the broadcast until it times out.
        shared = [path, problem]
        dist.broadcast_object_list(shared, src=0)
        path, problem = shared
    if problem:
        raise GKDUserError(problem)
    return path


def _create_next_version_dir(output_dir: str) -> str:
    # exist_ok=False: a run started in the same second that took this name makes us take the next one,
    # so two runs never write into one folder.
    while True:
        path = next_version_dir(output_dir)
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue


# ----------------------------------------------------------------------------- args.json


def save_arguments(path: str, arguments: dict) -> None:
    """Write the arguments to `path` (the run folder's args.json) as ms-swift does; rank 0 only."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    # Written beside it, then os.replace: a reader never sees half a file. Only rank 0 writes, and no two
    # runs share a run folder, so the fixed temporary name is safe.
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(_json_safe(arguments), file, indent=2, ensure_ascii=False)
    os.replace(temporary, path)


def _json_safe(value):
    if isinstance(value, enum.Enum):  # before the scalars: an IntEnum or str enum is also an int or a str
        return _json_safe(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(item) for item in value]
    return str(value)


# ----------------------------------------------------------------------------- logging.jsonl


def format_time(seconds: float) -> str:
    """ms-swift's duration format: 5s, 1m 5s, 1h 0m 5s, 1d 1h 1m 5s."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m {seconds}s"
    if hours:
        return f"{hours}h {minutes}m {seconds}s"
    if minutes:
        return f"{minutes}m {seconds}s"
    return f"{seconds}s"


def peak_memory_gib() -> float:
    """The most memory this process has held: reserved on all CUDA devices (as ms-swift), else peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Summed over devices as ms-swift does for models spread over several (device_map); under DDP the
        # other ranks' devices hold nothing of this process.
        reserved = sum(torch.cuda.max_memory_reserved(device) for device in range(torch.cuda.device_count()))
        return reserved / 1024**3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kibibytes on Linux, bytes on macOS
    return peak / (1024**3 if sys.platform == "darwin" else 1024**2)


def _append_line(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(_json_safe(record), ensure_ascii=False) + "\n")


class RunFolderCallback(TrainerCallback):
    """Appends each log to `<run_dir>/logging.jsonl` with ms-swift's progress fields; at the end of training
    a summary line, then draws images/ from the file. Only the main process writes."""

    def __init__(self, run_dir: str, arguments: dict | None = None, draw_images: bool = True):
        """arguments: written to args.json when training starts, and into every checkpoint (ms-swift's
        --load_args reads them there); draw_images: ms-swift draws images/ when it reports to tensorboard."""
        self.run_dir = run_dir
        self.arguments = arguments
        self.draw_images = draw_images
        self.log_path = os.path.join(run_dir, LOG_FILE)
        self.start_time = time.time()
        self.start_step = 0
        self.max_memory = 0.0
        self.last_checkpoint = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.arguments is not None and state.is_world_process_zero:
            save_arguments(os.path.join(self.run_dir, ARGS_FILE), self.arguments)
        self.start_time = time.time()
        self.start_step = state.global_step  # a resumed run's speed counts only the steps it ran

    def on_step_end(self, args, state, control, **kwargs):
        # As ms-swift: the last step is always saved (and evaluated), so a run ends with its final checkpoint.
        if state.global_step == state.max_steps:
            control.should_save = args.save_strategy != "no"
            control.should_evaluate = args.eval_strategy != "no"
        return control

    def on_save(self, args, state, control, **kwargs):
        # Called once the checkpoint is on disk; Trainer names it checkpoint-<step> in args.output_dir.
        self.last_checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.arguments is not None and state.is_world_process_zero and os.path.isdir(self.last_checkpoint):
            save_arguments(os.path.join(self.last_checkpoint, ARGS_FILE), self.arguments)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        self.max_memory = max(self.max_memory, peak_memory_gib())
        # A copy: the other callbacks (TensorBoard among them) get the logs as Trainer made them.
        record = {key: round(value, 8) if isinstance(value, float) else value for key, value in (logs or {}).items()}
        elapsed = time.time() - self.start_time
        steps_run = state.global_step - self.start_step
        speed = elapsed / steps_run if steps_run > 0 else 0.0
        record[PROGRESS_KEY] = f"{state.global_step}/{state.max_steps}"
        record["elapsed_time"] = format_time(elapsed)
        record["remaining_time"] = format_time((state.max_steps - state.global_step) * speed)
        record["memory(GiB)"] = round(self.max_memory, 2)
        record["train_speed(s/it)"] = round(speed, 6)
        _append_line(self.log_path, record)

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        _append_line(self.log_path, {
            "last_model_checkpoint": self.last_checkpoint,
            "best_model_checkpoint": state.best_model_checkpoint,
            "best_metric": state.best_metric,
            "global_step": state.global_step,
            "log_history": state.log_history,
            "memory": self.max_memory,
        })
        if self.draw_images:
            plot_logs(self.run_dir)


# ----------------------------------------------------------------------------- images/


def plot_logs(run_dir: str) -> list[str]:
    """Draw `<run_dir>/images/<tag>.png` for each numeric key of logging.jsonl; returns the paths written."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no images in %s", os.path.join(run_dir, IMAGES_DIR))
        return []
    series = _read_series(os.path.join(run_dir, LOG_FILE))
    images_dir = os.path.join(run_dir, IMAGES_DIR)
    os.makedirs(images_dir, exist_ok=True)
    written = []
    for tag, points in series.items():
        steps, values = zip(*points)
        # Figure + Agg canvas, not pyplot: no process-wide backend switch and no figure registry to leak into.
        figure = Figure(figsize=(8, 5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.subplots()
        axes.set_title(tag)
        if len(values) == 1:
            axes.scatter(steps, values, color=SMOOTH_COLOR)
        elif tag in SMOOTHED_TAGS:
            axes.plot(steps, values, color=RAW_COLOR)
            axes.plot(steps, smoothed(values, SMOOTHING), color=SMOOTH_COLOR)
        else:
            axes.plot(steps, values, color=SMOOTH_COLOR)
        path = os.path.join(images_dir, tag.replace("/", "_").replace(".", "_") + ".png")
        figure.savefig(path, bbox_inches="tight")
        written.append(path)
    return written


def _read_series(log_path: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per TensorBoard tag, read from the on_log lines of logging.jsonl."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(log_path, encoding="utf-8") as file:
        for line in file:
            record = json.loads(line)
            if PROGRESS_KEY not in record:
                continue  # the end-of-training summary
            step = int(record[PROGRESS_KEY].split("/")[0])
            for key, value in record.items():
                if key in ADDED_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                series.setdefault(_tensorboard_tag(key), []).append((step, value))
    return series


def _tensorboard_tag(key: str) -> str:
    # transformers' TensorBoardCallback (rewrite_logs): eval_x -> eval/x, test_x -> test/x, x -> train/x.
    for prefix in ("eval_", "test_"):
        if key.startswith(prefix):
            return prefix[:-1] + "/" + key[len(prefix):]
    return "train/" + key


def smoothed(values, weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average corrected for its start at zero."""
    average, norm, result = 0.0, 0.0, []
    for value in values:
        average = average * weight + value
        norm = norm * weight + 1
        result.append(average / norm)
    return result
