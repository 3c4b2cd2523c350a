"""Data: read datasets, normalise every row to chat messages, tokenize (gkd.tokenize) into prompt and
completion ids, split off a validation set, and build the padded batches.

A row's prompt is everything before its last assistant turn, rendered with the tokenizer's chat template
and generation prompt; its completion is that last assistant turn, ending with (and including) the first
stop token. Rows whose conversation ends on a user turn are prompt-only: fine when every sample is
generated (`--lmbda 1`, or `--seq_kd true`), refused otherwise.

Dataset specs use ms-swift's syntax ID_OR_PATH[:subset][#N].
"""

import glob
import itertools
import json
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from gkd.errors import GKDUserError
from gkd.hub import load_hub_dataset, looks_local, use_hf_hub
from gkd.images import IMAGE_TAG, check_images, has_images, image_refs, place_image_tags
from gkd.tokenize import check_loss_scale, tokenize_records

logger = logging.getLogger(__name__)

FILE_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
IGNORE_INDEX = -100

# ms-swift's column aliases for query/response rows, in the order they are looked up.
QUERY_COLUMNS = ("query", "question", "problem", "prompt", "instruction")
RESPONSE_COLUMNS = ("response", "answer", "output", "solution", "completion")
MEDIA_COLUMNS = ("videos", "audios")  # ms-swift's other multimodal columns (images: gkd.images)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class DatasetSpec:
    """ms-swift's dataset syntax (swift/dataset/dataset_syntax.py): [hf::|ms::]ID_OR_PATH[:SUBSET[/SUBSET...]][#N].

    Parsed as ms-swift parses it: before each cut (the hub prefix, then '#N', then ':SUBSET') the text left is
    checked against the disk, and an existing path is taken whole, so a path may hold '::', '#' or ':'
    (`hf::runs/a#1` where runs/a#1 exists is that path). Where ms-swift would silently misread a spec, gkd
    refuses it in one line instead:
    - hub prefixes are `hf::` and `ms::` (any case). ms-swift drops any other `X::` without a word and loads
      the rest from the default hub (`huggingface::org/name` would go to ModelScope); gkd names the prefix,
      unless the text with its '::' is an existing path once '#N' / ':SUBSET' are cut (`x::y.jsonl#4`).
    - a subset on an existing local path: ms-swift ignores it for a file (it reads the file whole) and for a
      folder passes it to datasets as a config name, which gkd's folder reading (its data files) has no use
      for; either way the subset would be dropped, so gkd refuses it.
    """

    source: str  # a local file or folder, or a hub dataset id
    subset: str | None = None  # 'a/b' names several subsets
    count: int | None = None  # the #N suffix
    use_hf: bool | None = None  # the hf:: / ms:: prefix; None: --use_hf / USE_HF decide

    @classmethod
    def parse(cls, text: str) -> "DatasetSpec":
        def exists(path: str) -> bool:
            return os.path.exists(os.path.expanduser(path))

        if exists(text):  # a real path may hold '::', '#' or ':'
            return cls(source=text)
        source, count, use_hf, subset = text, None, None, None
        hub, separator, rest = source.partition("::")
        if separator and hub.lower() in ("hf", "ms"):
            source, use_hf = rest, hub.lower() == "hf"
        if not exists(source) and "#" in source:
            source, _, count_text = source.rpartition("#")
            if not count_text.isdigit() or int(count_text) == 0:
                raise GKDUserError(f"--dataset {text}: '#{count_text}' must be a positive row count, e.g. #1000")
            count = int(count_text)
        if not exists(source) and ":" in source:
            source, _, subset = source.partition(":")
            if subset and exists(source):
                kind = "folder" if os.path.isdir(os.path.expanduser(source)) else "file"
                raise GKDUserError(f"--dataset {text}: a local {kind} takes no subset (drop ':{subset}')")
        if use_hf is None and separator and not exists(source):
            raise GKDUserError(f"--dataset {text}: unknown hub prefix '{hub}::'; use hf:: (Hugging Face Hub), "
                               "ms:: (ModelScope) or none (--use_hf decides)")
        return cls(source=source, subset=subset or None, count=count, use_hf=use_hf)

    def looks_local(self) -> bool:
        return os.path.exists(self.source) or self.source.lower().endswith(FILE_EXTENSIONS) or looks_local(self.source)


# ----------------------------------------------------------------------------- reading rows


def _read_jsonl(path: str):
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise GKDUserError(f"{where}: bad JSON ({error.msg})") from None
            yield where, row


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            rows = json.load(handle)
    except json.JSONDecodeError as error:
        raise GKDUserError(f"{path}:{error.lineno}: bad JSON ({error.msg})") from None
    if not isinstance(rows, list):
        raise GKDUserError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    for index, row in enumerate(rows, start=1):
        yield f"{path} row {index}", row


def _read_table(path: str, kind: str):
    import datasets

    try:
        table = datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as error:  # datasets wraps parser errors in several types
        raise GKDUserError(f"{path}: cannot read it as {kind} ({str(error).splitlines()[0]})") from None
    for index, row in enumerate(table, start=1):
        yield f"{path} row {index}", row


def _read_file(path: str):
    lower = path.lower()
    try:
        if lower.endswith(".jsonl"):
            yield from _read_jsonl(path)
        elif lower.endswith(".json"):
            yield from _read_json(path)
        elif lower.endswith(".csv"):
            yield from _read_table(path, "csv")
        elif lower.endswith(".parquet"):
            yield from _read_table(path, "parquet")
        else:
            raise GKDUserError(f"{path}: unsupported file type (use {', '.join(FILE_EXTENSIONS)})")
    except UnicodeDecodeError:
        raise GKDUserError(f"{path}: not UTF-8 text") from None
    except OSError as error:
        raise GKDUserError(f"{path}: cannot read it ({error.strerror})") from None


def _coco_caption_row(row: dict) -> dict:
    """ms-swift's COCO2014Preprocess: the first of the '&&'-joined captions answers a fixed query (the image
    tag is added where the row's images are placed, gkd.images.place_image_tags)."""
    return {"messages": [{"role": "user", "content": "please describe the image."},
                         {"role": "assistant", "content": row["caption"].split("&&")[0]}], "images": row["image"]}


# Hub datasets whose columns ms-swift maps with a preprocessor of their own (swift/dataset/dataset/*.py).
HUB_ROW_PREPROCESSORS = {"modelscope/coco_2014_caption": _coco_caption_row}


def _read_hub(spec: DatasetSpec):
    """A hub dataset's rows, from ModelScope unless hf::, --use_hf or USE_HF=1 say the Hugging Face Hub (as
    ms-swift; gkd-train has settled --use_hf into USE_HF before data loads)."""
    use_hf = spec.use_hf if spec.use_hf is not None else use_hf_hub(None)
    preprocess = HUB_ROW_PREPROCESSORS.get(spec.source, dict)
    for index, row in enumerate(load_hub_dataset(spec.source, spec.subset, use_hf=use_hf), start=1):
        yield f"{spec.source} row {index}", preprocess(row)


def read_rows(spec: DatasetSpec, seed: int) -> list[tuple[str, dict]]:
    """All rows of one spec as (where, row) pairs; `where` names file and line for error messages."""
    if spec.looks_local():
        path = os.path.expanduser(spec.source)
        if os.path.isdir(path):
            files = sorted(
                name for name in glob.glob(os.path.join(path, "*")) if name.lower().endswith(FILE_EXTENSIONS)
            )
            if not files:
                raise GKDUserError(f"--dataset {spec.source}: folder holds no {'/'.join(FILE_EXTENSIONS)} files")
        elif os.path.isfile(path):
            files = [path]
        else:
            raise GKDUserError(f"--dataset {spec.source}: no such file or folder")
        rows = [pair for file in files for pair in _read_file(file)]
    else:
        rows = list(_read_hub(spec))
    if not rows:
        raise GKDUserError(f"--dataset {spec.source}: holds no rows")
    return draw_rows(rows, spec.count, seed)


def draw_rows(rows: list, count: int | None, seed: int) -> list:
    """ms-swift's #N: N rows without replacement when N <= size; else whole copies, topped up at random."""
    if count is None:
        return rows
    rng = random.Random(seed)
    whole_copies, remainder = divmod(count, len(rows))
    return rows * whole_copies + [rows[index] for index in rng.sample(range(len(rows)), remainder)]


# ----------------------------------------------------------------------------- rows to messages


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise GKDUserError(f"{where}: messages must be a non-empty list")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            raise GKDUserError(f"{where}: each message needs a 'role' and a 'content'")
        if not isinstance(turn.get("content"), str):
            raise GKDUserError(f"{where}: message content must be a string, got {type(turn.get('content')).__name__}")
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages]


def _sharegpt_to_messages(conversations, where: str) -> list[dict]:
    if not isinstance(conversations, list):
        raise GKDUserError(f"{where}: conversations must be a list")
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict):
            raise GKDUserError(f"{where}: each conversation turn must be an object")
        if "from" in turn:
            speaker = turn.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise GKDUserError(f"{where}: unknown speaker {speaker!r} (use {', '.join(SHAREGPT_ROLES)})")
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
        else:
            messages.append(turn)
    return messages


def _query_response_to_messages(row: dict, where: str) -> list[dict]:
    if "instruction" in row and row.get("input"):  # Alpaca: the input follows the instruction
        query = f"{row['instruction']}\n{row['input']}"
    else:
        query = next(row[key] for key in QUERY_COLUMNS if row.get(key) is not None)
    if isinstance(query, list):  # TRL's conversational prompt/completion
        messages = list(query)
    else:
        messages = []
        if row.get("system"):
            messages.append({"role": "system", "content": row["system"]})
        for pair in row.get("history") or []:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise GKDUserError(f"{where}: history must be a list of [query, response] pairs")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        messages.append({"role": "user", "content": query})
    response = next((row[key] for key in RESPONSE_COLUMNS if row.get(key) is not None), None)
    if isinstance(response, list):
        messages += response
    elif response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def row_to_messages(row, where: str, system: str | None = None) -> list[dict]:
    """Normalise any supported row shape to a list of {role, content} messages."""
    if not isinstance(row, dict):
        raise GKDUserError(f"{where}: expected an object with the row's fields, got {type(row).__name__}")
    media = [column for column in MEDIA_COLUMNS if row.get(column)]
    if media:  # never train on a transcript without the recording it describes
        raise GKDUserError(f"{where}: the row has {media[0]}; gkd reads images, not {media[0]}")
    if "messages" in row:
        messages = row["messages"]
    elif "conversations" in row:
        messages = _sharegpt_to_messages(row["conversations"], where)
    elif any(row.get(key) is not None for key in QUERY_COLUMNS):
        messages = _query_response_to_messages(row, where)
    else:
        raise GKDUserError(
            f"{where}: unknown row shape with keys {sorted(row)[:8]}; expected messages, conversations, "
            "query/response, prompt/completion or instruction/input/output"
        )
    messages = _check_messages(messages, where)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def row_with_images(row, where: str, system: str | None, processor, text_only_reason: str):
    """A row's messages and image references (gkd.images). With a vision-language processor every picture
    opens and the messages hold exactly one <image> tag per picture; without one, a row with images is
    refused (text_only_reason says which model reads no images) and '<image>' is text like any other."""
    if processor is None and has_images(row):
        raise GKDUserError(f"{where}: the row has images, and {text_only_reason}; gkd never trains on a caption "
                           "without its picture")
    messages, images = row_to_messages(row, where, system), image_refs(row, where)
    if processor is not None:
        check_images(images, where)
        messages = place_image_tags(messages, len(images), where)
    return messages, images


def teacher_messages(row: dict, prompt_messages: list[dict], where: str) -> list[dict] | None:
    """OPSD's privileged view (ms-swift's `teacher_prompt` column): the prompt with its last user turn's content
    replaced by the row's teacher_prompt, for the teacher alone; None for a row without one."""
    teacher_prompt = row.get("teacher_prompt")
    if teacher_prompt is None:
        return None
    if not isinstance(teacher_prompt, str):
        raise GKDUserError(f"{where}: teacher_prompt must be a string (the teacher's last user turn), got "
                           f"{type(teacher_prompt).__name__}")
    users = [index for index, message in enumerate(prompt_messages) if message["role"] == "user"]
    if not users:
        raise GKDUserError(f"{where}: the row has a teacher_prompt but no user turn for it to replace")
    messages = [dict(message) for message in prompt_messages]
    messages[users[-1]]["content"] = teacher_prompt
    return messages


def split_prompt_completion(messages: list[dict]) -> tuple[list[dict], str | None]:
    """The prompt is everything before the last assistant turn; None when the row ends on another role."""
    if messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


# ----------------------------------------------------------------------------- examples


def load_examples(specs, tokenizer, stop_ids, *, seed, system=None, max_length=None,
                  truncation_strategy="delete", need_completions=True, reason_completions_needed="",
                  dataset_num_proc=1, load_from_cache_file=False, enable_thinking=None, loss_scale="last_round",
                  teacher_tag_key=None, processor=None, teacher_processor=None,
                  text_only_reason="the model reads text alone"):
    """Read, normalise and tokenize every --dataset spec into examples: {"prompt_ids", "completion_ids",
    "prompt_label_spans", "teacher_prompt_ids", "dataset", "teacher_tag", "images"}.

    images: the row's image references (gkd.images), None for a text row. processor: the vision-language
    models' processor, which expands each image into its tokens; without one a row with images is refused,
    text_only_reason saying why (which model reads no images). teacher_processor: the teacher's, where it
    encodes pictures unlike the student's (another number of image tokens): every image row then also gets
    the teacher's own prompt, written by it, so that each model reads the pictures its own way before the
    same completion tokens.

    completion_ids is None for a prompt-only row. prompt_label_spans lists the (start, end) positions of
    prompt_ids to supervise besides the completion: the earlier assistant turns under loss_scale 'default'
    (ms-swift: every assistant turn), none under 'last_round' (ms-swift's GKD default: the last turn only).
    teacher_prompt_ids: the teacher's own prompt for a row with a teacher_prompt (OPSD) or, with a
    teacher_processor, for an image row; else None.
    dataset is the spec's source (ms-swift's `dataset` column); split_train_val splits each one apart.
    teacher_tag: what routes the row to one of several served teachers, --teacher_tag_key's value (`dataset`:
    the spec's source, as ms-swift's injected column; another name: the row's column, as a string), or None.
    max_length bounds the prompt (see gkd.tokenize.truncate). enable_thinking, when not None, is passed to
    the chat template. dataset_num_proc: worker processes of the tokenization; load_from_cache_file: reuse
    (and write) the tokenized rows in datasets' cache folder (gkd.tokenize.tokenize_records).
    """
    loss_scale = check_loss_scale(loss_scale)
    examples, dropped = [], 0
    for text in specs:
        spec = DatasetSpec.parse(text)
        records, tags = [], []
        for where, row in read_rows(spec, seed):
            messages, images = row_with_images(row, where, system, processor, text_only_reason)
            if processor is not None:
                if images and loss_scale == "default":
                    raise GKDUserError(f"{where}: --loss_scale default with images (earlier assistant turns located "
                                       "in a prompt the processor expands) is not supported; use --loss_scale "
                                       "last_round")
            prompt_messages, completion = split_prompt_completion(messages)
            if processor is not None and completion is not None and IMAGE_TAG in completion:
                raise GKDUserError(f"{where}: the completion holds an {IMAGE_TAG} tag; gkd supervises text, so "
                                   "images belong to the prompt")
            if completion is None and need_completions:
                raise GKDUserError(
                    f"{where}: the row has no assistant completion, which {reason_completions_needed} needs; "
                    "add one, or use --lmbda 1 or --seq_kd true"
                )
            if not prompt_messages:
                raise GKDUserError(f"{where}: the row has a completion but no prompt")
            teacher_view = teacher_messages(row, prompt_messages, where)
            if teacher_view is not None and loss_scale == "default":
                raise GKDUserError(f"{where}: a teacher_prompt row with --loss_scale default (earlier assistant turns "
                                   "supervised in two different prompts) is not supported; use --loss_scale "
                                   "last_round")
            if teacher_view is not None and images:  # the teacher sees the pictures too, wherever its prompt is
                teacher_view = place_image_tags(teacher_view, len(images), f"{where} (teacher_prompt)")
            if teacher_view is None and images and teacher_processor is not None:
                teacher_view = prompt_messages  # the same turns, the pictures as the teacher's processor encodes them
            records.append((where, prompt_messages, completion, teacher_view, images or None))
            tag = spec.source if teacher_tag_key == "dataset" else row.get(teacher_tag_key) if teacher_tag_key else None
            tags.append(None if tag is None else str(tag))
        tokenized = tokenize_records(
            records, tokenizer, processor=processor, teacher_processor=teacher_processor, stop_ids=stop_ids, max_length=max_length,
            truncation_strategy=truncation_strategy,
            enable_thinking=enable_thinking, loss_scale=loss_scale, system=system, num_proc=dataset_num_proc,
            load_from_cache_file=load_from_cache_file, desc=f"tokenizing {spec.source}",
        )
        dropped += tokenized.count(None)
        examples += [{**example, "dataset": spec.source, "teacher_tag": tag, "images": record[4]}
                     for example, tag, record in zip(tokenized, tags, records) if example is not None]
    if dropped:
        logger.warning("dropped %d rows longer than --max_length %s (the prompt, or prompt + dataset completion; "
                       "--truncation_strategy %s)", dropped, max_length, truncation_strategy)
    if not examples:
        raise GKDUserError(f"--dataset {' '.join(specs)}: no rows left after --max_length {max_length}")
    return examples


def split_train_val(examples: list[dict], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """ms-swift's --split_dataset_ratio: part of the training rows become the validation set.

    As ms-swift's DatasetLoader.post_process (swift/dataset/dataset_meta.py) does for each --dataset entry:
    max(int(rows x ratio), 1) rows go to validation, chosen by `Dataset.train_test_split(test_size=that,
    shuffle=True, seed=get_seed(random_state))`, where random_state = np.random.RandomState(data_seed) is
    shared by the entries in order and get_seed draws randint(0, int32 max). That split takes a
    np.random.default_rng(seed) permutation of the rows: its first part is validation, the rest training
    (in that order). Entries are the runs of equal "dataset" values (examples without one form one entry).
    The rows are the same as ms-swift's when no row was dropped by --max_length and no #N was given
    (ms-swift splits before drawing #N rows; gkd draws first).
    """
    if not 0 <= ratio < 1:
        raise GKDUserError(f"--split_dataset_ratio {ratio}: must be in [0, 1)")
    if ratio == 0:
        return list(examples), []
    random_state = np.random.RandomState(seed)
    train, val = [], []
    for _, group in itertools.groupby(examples, key=lambda example: example.get("dataset")):
        group = list(group)
        val_count = max(int(len(group) * ratio), 1)
        if val_count >= len(group):
            raise GKDUserError(
                f"--split_dataset_ratio {ratio}: --dataset {group[0].get('dataset', '')} has {len(group)} "
                f"row(s), and {val_count} for validation would leave none for training"
            )
        order = np.random.default_rng(random_state.randint(0, np.iinfo(np.int32).max)).permutation(len(group))
        val += [group[index] for index in order[:val_count]]
        train += [group[index] for index in order[val_count:]]
    return train, val


# ----------------------------------------------------------------------------- batches


def collate_examples(features: list[dict]) -> dict:
    """Keep token lists as they are: the trainer decides each sample's completion before padding."""
    return {
        "prompt_ids": [feature["prompt_ids"] for feature in features],
        "completion_ids": [feature["completion_ids"] for feature in features],
        "prompt_label_spans": [feature.get("prompt_label_spans") or [] for feature in features],
        "teacher_prompt_ids": [feature.get("teacher_prompt_ids") for feature in features],
        "teacher_tags": [feature.get("teacher_tag") for feature in features],
        "images": [feature.get("images") or [] for feature in features],
    }


def build_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_token_id: int,
                vocab_size: int | None = None, prompt_label_spans: list[list[tuple[int, int]]] | None = None) -> dict:
    """Right-padded input_ids, attention_mask, and labels that supervise the completion tokens, plus the
    prompt positions in prompt_label_spans (per row, (start, end) pairs: --loss_scale default's earlier
    assistant turns).

    Labels come from lengths, never from comparing ids with the pad id, so an EOS equal to pad stays
    supervised. A row's first position is never labelled: no position predicts it (a span may open there),
    so the labels count exactly the positions the loss counts, padded or packed into one sequence. With vocab_size (the tokenizer's length), an id at or past it is refused: it would index
    past a smaller model's embedding (a crash deep in its forward) or train on a padding row of the output
    layer, which stands for no token.
    """
    if vocab_size is not None:
        for row, completion in enumerate(completion_ids):
            outside = [token for token in completion if not 0 <= token < vocab_size]
            if outside:
                raise GKDUserError(f"completion {row} of the batch holds token id {outside[0]}, outside the "
                                   f"tokenizer's {vocab_size} ids: its sampler drew a padding row of the "
                                   "output layer")
    lengths = [len(prompt) + len(completion) for prompt, completion in zip(prompt_ids, completion_ids)]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        sequence = torch.tensor(prompt + completion, dtype=torch.long)
        input_ids[row, : len(sequence)] = sequence
        attention_mask[row, : len(sequence)] = 1
        labels[row, len(prompt) : len(sequence)] = sequence[len(prompt) :]
        for start, end in prompt_label_spans[row] if prompt_label_spans else ():
            if not 0 <= start < end <= len(prompt):
                raise ValueError(f"prompt label span ({start}, {end}) of row {row} is outside its "
                                 f"{len(prompt)} prompt tokens")
            labels[row, start:end] = sequence[start:end]
    labels[:, 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
