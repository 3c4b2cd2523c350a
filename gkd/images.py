"""Images of vision-language rows: ms-swift's `images` column read as ms-swift reads it, the `<image>` tags that
place them in the conversation, and the processor that turns them into a model's inputs.

An image entry is a local path, an http(s) URL, a base64 string (with or without its `data:` prefix),
ms-swift's {"bytes", "path"} dict (what its preprocessors and datasets' Image columns give), or a decoded
PIL picture. A relative path is found as ms-swift finds it: from the working directory, else under
$ROOT_IMAGE_DIR. Each entry becomes one reference string (a path, a URL or a data URL) that every step can
open again; rows keep references, never decoded pictures.

Tags follow ms-swift's template (Template._add_default_tags): a row with fewer `<image>` tags than images gets
the missing ones at the start of its first non-system message (coco_2014_caption's query has none). Where
ms-swift only warns and leaves text behind, gkd stops in one line: more tags than images, or an image in the
completion (gkd supervises text only).
"""

import base64
import binascii
import io
import os
import re
import urllib.request

from gkd.errors import GKDUserError, first_line

IMAGE_TAG = "<image>"
IMAGE_COLUMNS = ("images", "image")  # ms-swift's column and its alias
URL_TIMEOUT = float(os.environ.get("SWIFT_TIMEOUT", 20))  # ms-swift's variable for fetching media
_DATA_URL = re.compile(r"data:(.*?);base64,(.+)", re.DOTALL)


def has_images(row) -> bool:
    return isinstance(row, dict) and any(row.get(column) for column in IMAGE_COLUMNS)


def image_entries(row: dict) -> list:
    """The row's image entries as written (one entry or a list), [] for a text row."""
    value = next((row[column] for column in IMAGE_COLUMNS if row.get(column)), None)
    return [] if value is None else value if isinstance(value, list) else [value]


def image_refs(row: dict, where: str) -> list[str]:
    """The row's images as reference strings (see the module docstring), [] for a text row."""
    return [_reference(entry, f"{where}: image {index + 1}") for index, entry in enumerate(image_entries(row))]


def _reference(entry, where: str) -> str:
    if isinstance(entry, dict):  # {"bytes", "path"}: the bytes when there are any (as ms-swift)
        entry = entry.get("bytes") or entry.get("path")
    if hasattr(entry, "save"):  # a decoded picture (datasets' Image column): kept as PNG bytes
        buffer = io.BytesIO()
        entry.save(buffer, format="PNG")
        entry = buffer.getvalue()
    if isinstance(entry, (bytes, bytearray)):
        return "data:image;base64," + base64.b64encode(entry).decode()
    if not isinstance(entry, str) or not entry:
        raise GKDUserError(f"{where}: expected a path, URL or base64 string, got {type(entry).__name__}")
    if entry.startswith(("http://", "https://", "data:")):
        return entry
    if len(entry) <= 2000:  # ms-swift takes longer strings as base64 without looking at the disk
        for candidate in (entry, os.path.join(os.path.expanduser(os.environ.get("ROOT_IMAGE_DIR", "")), entry)):
            if os.path.isfile(candidate):
                return os.path.abspath(candidate)
    try:
        base64.b64decode(entry, validate=True)
    except binascii.Error:
        hint = " or under $ROOT_IMAGE_DIR" if os.environ.get("ROOT_IMAGE_DIR") else ""
        raise GKDUserError(f"{where}: {entry[:200]} is not a file (relative paths are read from the working "
                           f"directory{hint}), nor a URL or base64") from None
    return "data:image;base64," + entry


def open_image(reference: str):
    """The picture a reference names, as an RGB PIL image."""
    from PIL import Image

    match = _DATA_URL.fullmatch(reference)
    if match:
        source = io.BytesIO(base64.b64decode(match[2]))
    elif reference.startswith(("http://", "https://")):
        with urllib.request.urlopen(reference, timeout=URL_TIMEOUT) as response:
            source = io.BytesIO(response.read())
    else:
        source = reference
    with Image.open(source) as image:
        return image.convert("RGB")


def check_images(references: list[str], where: str) -> None:
    """Every image of a row opens: a bad one stops the run before training, naming the row."""
    for index, reference in enumerate(references):
        try:
            open_image(reference)
        except Exception as error:  # missing, unreachable, not an image: one line for all
            shown = reference if not reference.startswith("data:") else "its base64 data"
            raise GKDUserError(f"{where}: image {index + 1} ({shown[:200]}) cannot be read ({first_line(error)})") \
                from None


def place_image_tags(messages: list[dict], count: int, where: str) -> list[dict]:
    """The messages with exactly `count` <image> tags (see the module docstring)."""
    tags = sum(message["content"].count(IMAGE_TAG) for message in messages)
    if tags > count:
        raise GKDUserError(f"{where}: {tags} {IMAGE_TAG} tags but {count} image(s); each tag stands for one image "
                           "of the row's images column")
    if tags == count:
        return messages
    first = next(index for index, message in enumerate(messages) if message["role"] != "system")
    messages = [dict(message) for message in messages]
    messages[first]["content"] = IMAGE_TAG * (count - tags) + messages[first]["content"]
    return messages


def with_image_parts(messages: list[dict]) -> list[dict]:
    """Every turn's content as the chat templates of vision-language processors want it (some render parts
    alone): a list of {"type": "image"} (one per <image> tag, each template writing its own placeholder) and
    {"type": "text"} parts."""
    converted = []
    for message in messages:
        parts = []
        for index, text in enumerate(message["content"].split(IMAGE_TAG)):
            if index:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        converted.append({**message, "content": parts})
    return converted


def encoding_of(processor) -> dict:
    """What decides a processor's image tokens: its class, its image processor's settings and its own
    (image_seq_len and the like), without the chat template."""
    settings = processor.to_dict()
    return {"class": type(processor).__name__, **{name: value for name, value in settings.items()
                                                   if name not in ("chat_template", "processor_class")}}


def image_token_ids(processor) -> tuple[int, ...]:
    """The ids standing for a picture's features (what a sampler must never draw), () without a processor."""
    if processor is None:
        return ()
    tokens = [getattr(processor, name, None) for name in ("image_token", "video_token")]
    return tuple(processor.tokenizer.convert_tokens_to_ids(str(token)) for token in tokens if token is not None)


def placeholder_prompt(processor, prompt_ids: list[int], pictures: list) -> list[int]:
    """The prompt with each picture's image tokens, as the processor expanded them, back to the one placeholder
    token the template wrote (Idefics3's and LLaVA's <image>, Qwen2-VL's <|image_pad|>): what vLLM takes, as
    it expands every placeholder itself. A picture's expansion is found by expanding a lone placeholder for it
    (the same tokens wherever it stands); pictures: the prompt's, opened (open_image). ValueError where the
    prompt does not hold one."""
    placeholder = str(processor.image_token)
    placeholder_id = processor.tokenizer.convert_tokens_to_ids(placeholder)
    collapsed, start = [], 0
    for index, picture in enumerate(pictures):
        expansion = list(processor(text=[placeholder], images=[[picture]], add_special_tokens=False)["input_ids"][0])
        at = next((index for index in range(start, len(prompt_ids) - len(expansion) + 1)
                   if prompt_ids[index : index + len(expansion)] == expansion), None)
        if at is None:
            raise ValueError(f"the prompt does not hold the image tokens of its picture {index + 1}")
        collapsed += prompt_ids[start:at] + [placeholder_id]
        start = at + len(expansion)
    return collapsed + prompt_ids[start:]


def pixel_inputs(processor, images_per_row: list[list[str]]) -> dict:
    """The model's image inputs for a batch (pixel_values and what the family adds with them), from each
    row's references; rows without images get none."""
    opened = [[open_image(reference) for reference in references] for references in images_per_row]
    return dict(processor.image_processor(opened, return_tensors="pt"))
