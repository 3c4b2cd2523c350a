"""Tokenization: a row's messages to prompt and completion ids, the --max_length rule, the supervised spans
of --loss_scale default, and the tokenization of a whole dataset through `datasets.Dataset.map`
(--dataset_num_proc worker processes, --load_from_cache_file on-disk cache).

gkd.data reads and normalises rows; this module turns them into token ids.
"""

import hashlib
import json
import os
from pathlib import Path

from gkd.errors import GKDUserError, first_line
from gkd.images import encoding_of, open_image, with_image_parts

LOSS_SCALES = ("last_round", "default")  # ms-swift's base strategies that mean something for GKD
CACHE_FORMAT_VERSION = 3  # bump whenever what a cached example holds, or how it is computed, changes


def cut_at_stop(token_ids: list[int], stop_ids) -> list[int]:
    """Keep tokens up to and including the first stop token: the stop is supervised, what follows is not."""
    for position, token in enumerate(token_ids):
        if token in stop_ids:
            return token_ids[: position + 1]
    return token_ids


def check_chat_template(tokenizer, name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise GKDUserError(
            f"the tokenizer of {name} has no chat template; gkd renders prompts with it. Use a chat model's "
            "tokenizer, or add a 'chat_template' to its tokenizer_config.json"
        )


def check_loss_scale(loss_scale: str | None) -> str:
    """ms-swift's --loss_scale, of which GKD has a use for two; None is ms-swift's GKD default, last_round."""
    if loss_scale is None:
        return "last_round"
    if loss_scale not in LOSS_SCALES:
        raise GKDUserError(f"--loss_scale {loss_scale}: gkd supports default and last_round")
    return loss_scale


def render(tokenizer, messages, add_generation_prompt: bool, enable_thinking: bool | None = None) -> str:
    """The chat template's text; enable_thinking reaches the template only when set (as in ms-swift)."""
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **extra)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_messages(tokenizer, prompt_messages, completion, stop_ids, *, enable_thinking: bool | None = None,
                      images: list[str] | None = None, processor=None) -> tuple[list[int], list[int] | None]:
    """Prompt ids (chat template + generation prompt) and completion ids (cut after the first stop). With
    images (references, gkd.images), the processor writes the prompt: its template places each image, and
    it expands each into as many image tokens as the vision tower gives that picture."""
    templater = tokenizer
    if images:
        prompt_messages = with_image_parts(prompt_messages)
        templater = processor if getattr(processor, "chat_template", None) else tokenizer
    prompt_text = render(templater, prompt_messages, True, enable_thinking)
    if images:
        pictures = [open_image(reference) for reference in images]
        prompt_ids = list(processor(text=[prompt_text], images=[pictures], add_special_tokens=False)["input_ids"][0])
    else:
        prompt_ids = encode(tokenizer, prompt_text)
    if completion is None:
        return prompt_ids, None
    turn = {"role": "assistant", "content": [{"type": "text", "text": completion}] if images else completion}
    full_text = render(templater, prompt_messages + [turn], False, enable_thinking)
    # The template's own rendering of the assistant turn carries its end-of-turn token; templates that
    # rewrite earlier turns (e.g. drop reasoning) break the prefix, and then the plain content is used.
    completion_text = full_text[len(prompt_text) :] if full_text.startswith(prompt_text) else completion
    completion_ids = cut_at_stop(encode(tokenizer, completion_text), stop_ids)
    if not completion_ids or completion_ids[-1] not in stop_ids:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids


def assistant_spans(tokenizer, prompt_messages, prompt_ids, stop_ids, where: str, *,
                    enable_thinking: bool | None = None) -> list[tuple[int, int]]:
    """--loss_scale default: the (start, end) positions in prompt_ids of every assistant turn in the prompt.

    A turn's tokens are those the template adds between the conversation before it (rendered with the
    generation prompt, so the turn's header is not supervised) and the conversation through it, up to and
    including the first stop token, as for the last turn's completion. This needs each such prefix to
    tokenize to a prefix of the prompt; templates that rewrite earlier turns (e.g. drop their reasoning)
    do not, and the row is refused rather than supervised at the wrong tokens.
    """
    spans = []
    for index, message in enumerate(prompt_messages):
        if message["role"] != "assistant":
            continue
        try:
            before = encode(tokenizer, render(tokenizer, prompt_messages[:index], True, enable_thinking))
            through = encode(tokenizer, render(tokenizer, prompt_messages[: index + 1], False, enable_thinking))
        except Exception as error:  # a template that cannot render the shorter conversation (jinja errors)
            raise GKDUserError(f"{where}: --loss_scale default: the chat template cannot render the conversation "
                               f"up to message {index + 1} ({first_line(error)})"
                               "; use --loss_scale last_round") from None
        if through[: len(before)] != before or prompt_ids[: len(through)] != through:
            raise GKDUserError(f"{where}: --loss_scale default: the chat template renders the conversation up to "
                               f"assistant message {index + 1} differently from the whole prompt, so its tokens "
                               "cannot be located; use --loss_scale last_round")
        turn = cut_at_stop(through[len(before) :], stop_ids)
        if turn:
            spans.append((len(before), len(before) + len(turn)))
    return spans


def truncate(prompt_ids, completion_ids, max_length: int | None, strategy: str, where: str):
    """Apply --max_length to one row; returns None when the row is to be dropped.

    As in ms-swift's GKD, --max_length bounds the PROMPT ("max_prompt_length"); generation is bounded by
    --max_completion_length. So a prompt-only row is kept when len(prompt) <= max_length; a longer one is
    dropped (delete), keeps its last max_length tokens (left: the generation prompt is at the end), or stops
    the run (raise). 'right' drops it too: keeping the prompt's start would cut off the generation prompt,
    and the model would continue the user's text instead of answering it.

    A row with a dataset completion is checked on prompt + completion, as ms-swift checks dataset-sourced
    samples: within max_length it stays whole; beyond it is dropped (delete), loses the prompt's start
    (left: at least one prompt token stays, and a completion longer than max_length - 1 loses its end),
    loses the completion's end (right: dropped when the prompt alone leaves no room), or stops the run
    (raise). Left and right keep the prompt as a suffix of itself or whole, so positions counted from the
    prompt's end survive: the caller shifts --loss_scale default spans by the tokens cut from the start.
    """
    if max_length is None:
        return prompt_ids, completion_ids
    if completion_ids is None:
        if len(prompt_ids) <= max_length:
            return prompt_ids, None
        if strategy == "raise":
            raise GKDUserError(f"{where}: the prompt's {len(prompt_ids)} tokens exceed --max_length {max_length} "
                               "(--truncation_strategy raise)")
        return (prompt_ids[-max_length:], None) if strategy == "left" else None
    if len(prompt_ids) + len(completion_ids) <= max_length:
        return prompt_ids, completion_ids
    if strategy == "raise":
        raise GKDUserError(
            f"{where}: {len(prompt_ids) + len(completion_ids)} tokens exceed --max_length {max_length} "
            "(--truncation_strategy raise)"
        )
    if strategy == "delete":
        return None
    if strategy == "left":
        completion_ids = completion_ids[: max_length - 1]
        return prompt_ids[-(max_length - len(completion_ids)) :], completion_ids
    room = max_length - len(prompt_ids)  # right
    return None if room < 1 else (prompt_ids, completion_ids[:room])


def shift_spans(spans, cut: int) -> list[tuple[int, int]]:
    """Spans after the prompt lost its first `cut` tokens; spans cut away vanish, cut ones shrink."""
    return [(max(start - cut, 0), end - cut) for start, end in spans if end - cut > 0]


# ----------------------------------------------------------------------------- whole datasets


def _tokenize_record(record: dict, tokenizer, processor, teacher_processor, settings: dict) -> dict:
    """One row in a `Dataset.map` worker (teacher_processor: what writes the teacher's prompt, when not the
    student's processor). A GKDUserError travels back as the row's `error` (the caller raises
    the first one, in row order), so it reaches the user as one line whatever process met it."""
    where, messages, completion = record["where"], json.loads(record["messages"]), record["completion"]
    images = json.loads(record["images"]) if record["images"] is not None else None
    enable_thinking, max_length, strategy = settings["enable_thinking"], settings["max_length"], \
        settings["truncation_strategy"]
    empty = {"prompt_ids": [], "completion_ids": None, "prompt_label_spans": [], "teacher_prompt_ids": None}
    try:
        prompt_ids, completion_ids = tokenize_messages(tokenizer, messages, completion, settings["stop_ids"],
                                                       enable_thinking=enable_thinking, images=images,
                                                       processor=processor)
        spans = []
        if settings["loss_scale"] == "default":
            spans = assistant_spans(tokenizer, messages, prompt_ids, settings["stop_ids"], where,
                                    enable_thinking=enable_thinking)
        kept = truncate(prompt_ids, completion_ids, max_length, strategy, where)
        if images and kept is not None and len(kept[0]) < len(prompt_ids):
            kept = None  # cutting a prompt with images could cut a picture's tokens: the row is dropped
        teacher_prompt_ids = None
        if record["teacher_messages"] is not None:  # the teacher's own prompt, bounded as a prompt alone
            teacher_processor = teacher_processor or processor
            teacher_tokenizer = getattr(teacher_processor, "tokenizer", tokenizer)
            teacher_prompt_ids, _ = tokenize_messages(teacher_tokenizer, json.loads(record["teacher_messages"]), None,
                                                      settings["stop_ids"], enable_thinking=enable_thinking,
                                                      images=images, processor=teacher_processor)
            teacher_kept = truncate(teacher_prompt_ids, None, max_length, strategy, f"{where} (teacher_prompt)")
            if images and teacher_kept is not None and len(teacher_kept[0]) < len(teacher_prompt_ids):
                teacher_kept = None
            kept = kept if teacher_kept is not None else None
            teacher_prompt_ids = teacher_kept and teacher_kept[0]
    except GKDUserError as error:
        return {**empty, "dropped": False, "error": str(error)}
    if kept is None:
        return {**empty, "dropped": True, "error": None}
    return {"prompt_ids": kept[0], "completion_ids": kept[1], "teacher_prompt_ids": teacher_prompt_ids,
            "dropped": False, "error": None, "prompt_label_spans": shift_spans(spans, len(prompt_ids) - len(kept[0]))}


def tokenizer_identity(tokenizer) -> dict:
    """What decides how a tokenizer turns messages into ids: its class, vocabulary, chat template, special
    tokens and (fast tokenizers) its whole pipeline (normalizer, pre-tokenizer, merges, added tokens)."""
    from gkd.models import tokenizer_fingerprint

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return {
        "class": type(tokenizer).__name__,
        "vocab": tokenizer_fingerprint(tokenizer),
        "size": len(tokenizer),
        "chat_template": tokenizer.chat_template,
        "special_tokens": {name: str(value) for name, value in tokenizer.special_tokens_map.items()},
        "pipeline": hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else None,
    }


def cache_key(records, tokenizer, settings: dict, system: str | None) -> str:
    """Names a tokenized dataset: the rows (with where they came from: error messages quote it), the
    tokenizer, every setting that changes the result, and the format version."""
    digest = hashlib.sha256(json.dumps(
        {"format": CACHE_FORMAT_VERSION, "tokenizer": tokenizer_identity(tokenizer), "system": system, **settings},
        sort_keys=True, ensure_ascii=False,
    ).encode())
    for record in records:
        digest.update(json.dumps(record, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()[:40]


def cache_folder() -> Path:
    """datasets' own cache folder (HF_DATASETS_CACHE, read now so a changed environment counts), /gkd."""
    import datasets

    return Path(os.environ.get("HF_DATASETS_CACHE") or datasets.config.HF_DATASETS_CACHE) / "gkd"


def tokenize_records(records, tokenizer, *, stop_ids, max_length=None, truncation_strategy="delete",
                     enable_thinking=None, loss_scale="last_round", system=None, num_proc: int = 1,
                     load_from_cache_file: bool = False, desc: str = "tokenizing",
                     processor=None, teacher_processor=None) -> list[dict | None]:
    """Tokenize (where, prompt_messages, completion, teacher_messages or None, image references or None)
    records (the processor: for those with images; teacher_processor, if given, for the teacher's messages)
    through `datasets.Dataset.map`; one result per record, in order: {"prompt_ids", "completion_ids",
    "prompt_label_spans", "teacher_prompt_ids"}, or None for a dropped row. A teacher prompt obeys
    max_length as a prompt alone does; a row whose teacher prompt is dropped is dropped whole.

    num_proc > 1 runs the map in that many worker processes. With load_from_cache_file the result is
    written to, and a later identical call reads it from, <HF_DATASETS_CACHE>/gkd/<cache_key>.arrow
    (datasets' cache files, one per worker); without it nothing is written and nothing is reused.
    """
    import datasets

    settings = {"stop_ids": sorted({int(token) for token in stop_ids}), "max_length": max_length,
                "truncation_strategy": truncation_strategy, "enable_thinking": enable_thinking,
                "loss_scale": check_loss_scale(loss_scale)}
    records = [(where, json.dumps(messages, ensure_ascii=False), completion,
                None if teacher is None else json.dumps(teacher, ensure_ascii=False),
                None if images is None else json.dumps(images))
               for where, messages, completion, teacher, images in records]
    encodings = [json.dumps(encoding_of(each), sort_keys=True, default=str) if each is not None else None
                 for each in (processor, teacher_processor)]
    key = cache_key(records, tokenizer, {**settings, "image_encodings": encodings}, system)
    cache_file_name = None
    if load_from_cache_file:
        cache_folder().mkdir(parents=True, exist_ok=True)
        cache_file_name = str(cache_folder() / f"{key}.arrow")
    text = datasets.Value("string")
    columns = ("where", "messages", "completion", "teacher_messages", "images")
    table = datasets.Dataset.from_dict(
        {name: [record[index] for record in records] for index, name in enumerate(columns)},
        features=datasets.Features({name: text for name in columns}),
    )
    token_list = datasets.List(datasets.Value("int32"))
    features = datasets.Features({"prompt_ids": token_list, "completion_ids": token_list,
                                  "teacher_prompt_ids": token_list, "prompt_label_spans": datasets.List(token_list),
                                  "dropped": datasets.Value("bool"), "error": datasets.Value("string")})
    mapped = table.map(
        _tokenize_record, fn_kwargs={"tokenizer": tokenizer, "processor": processor, "teacher_processor": teacher_processor,
                   "settings": settings},
        remove_columns=table.column_names, features=features, num_proc=num_proc if num_proc > 1 else None,
        cache_file_name=cache_file_name, load_from_cache_file=load_from_cache_file, new_fingerprint=key, desc=desc,
    ).to_dict()
    for error in mapped["error"]:
        if error is not None:
            raise GKDUserError(error)
    return [None if dropped else {"prompt_ids": prompt, "completion_ids": completion, "teacher_prompt_ids": teacher,
                                  "prompt_label_spans": [tuple(span) for span in spans]}
            for prompt, completion, teacher, spans, dropped in zip(
                mapped["prompt_ids"], mapped["completion_ids"], mapped["teacher_prompt_ids"],
                mapped["prompt_label_spans"], mapped["dropped"])]
