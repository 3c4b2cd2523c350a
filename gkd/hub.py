"""Model and dataset ids: which hub they come from, and how they become a local folder or rows.

As in ms-swift, an id goes to ModelScope unless `--use_hf true` or the environment has USE_HF=1; each hub
is reached through its own client library (`modelscope` or `huggingface_hub`/`datasets`). A local path is
never sent to a hub. Every failure (hub unreachable, unknown id, client library missing) reaches the user
as one GKDUserError line naming the flag and the id, never a traceback.

Models are always downloaded here, by either hub, and the snapshot folder is what transformers, the
tokenizer and vLLM then read: one error path for both hubs, and no second download by another library.
"""

import importlib
import os
from itertools import chain

from gkd.errors import GKDUserError, first_line

TRUE_WORDS = ("1", "true", "yes", "y", "t", "on")  # transformers' strtobool, which ms-swift reads USE_HF with
FALSE_WORDS = ("0", "false", "no", "n", "f", "off")

# ms-swift's default ignore_patterns for model downloads: formats nothing here reads (other frameworks'
# weights, archives), which can be as large as the model itself.
IGNORE_PATTERNS = ["*.zip", "*.gguf", "*.pth", "*.pt", "consolidated*", "onnx/*", "*.safetensors.md", "*.msgpack",
                   "*.onnx", "*.ot", "*.h5"]

MODELSCOPE = "ModelScope"
HUGGING_FACE = "the Hugging Face Hub"


def use_hf_hub(use_hf: bool | None) -> bool:
    """Whether ids go to the Hugging Face Hub: the --use_hf flag when given, else env USE_HF (default '0').

    When on, USE_HF=1 is exported as ms-swift does, so child processes and later `use_hf_hub(None)` calls
    agree. An explicit `--use_hf false` also wins over USE_HF=1 and exports USE_HF=0 (in ms-swift, whose
    flag defaults to False and cannot say "not given", USE_HF=1 wins over it).
    """
    if use_hf is None:
        text = os.environ.get("USE_HF", "0").strip().lower()
        if text not in TRUE_WORDS + FALSE_WORDS:
            raise GKDUserError(f"USE_HF={os.environ['USE_HF']}: expected 1/0, true/false, yes/no or on/off")
        use_hf = text in TRUE_WORDS
    if use_hf or "USE_HF" in os.environ:
        os.environ["USE_HF"] = "1" if use_hf else "0"
    return use_hf


def looks_local(name: str) -> bool:
    """A path on disk, or written like one: such a name is never sent to a hub."""
    return os.path.exists(os.path.expanduser(name)) or name.startswith(("/", "./", "../", "~"))


def _hub_name(use_hf: bool) -> str:
    return HUGGING_FACE if use_hf else MODELSCOPE


def _other_hub_hint(use_hf: bool) -> str:
    return "--use_hf false (and no USE_HF=1) for ModelScope" if use_hf else "--use_hf true for the Hugging Face Hub"


def _client(use_hf: bool, flag: str, name: str, module: str, attribute: str, package: str):
    """`module.attribute` of the hub's client library; a missing library is a one-line install hint."""
    install = f"pip install '{package}'" if "[" in package else f"pip install {package}"  # quoted for the shell
    try:
        client = importlib.import_module(module)
    except ImportError:
        raise GKDUserError(
            f"{flag} {name}: needs the {package} package for {_hub_name(use_hf)} ids: {install} "
            f"(or {_other_hub_hint(use_hf)})"
        ) from None
    try:
        return getattr(client, attribute)
    except (ImportError, RuntimeError) as error:  # modelscope imports its parts lazily: a missing dependency
        reason = first_line(error.__cause__ or error)  # of MsDataset (the [datasets] extra) surfaces here
        raise GKDUserError(
            f"{flag} {name}: cannot import {module}.{attribute} ({reason}): {install} "
            f"(or {_other_hub_hint(use_hf)})"
        ) from None


def _hub_failed(flag: str, name: str, use_hf: bool, action: str, error: BaseException) -> GKDUserError:
    return GKDUserError(
        f"{flag} {name}: {_hub_name(use_hf)} {action} failed ({first_line(error)}); "
        f"pass a local folder, or {_other_hub_hint(use_hf)}"
    )


def resolve_model(name: str, *, use_hf: bool, flag: str = "--model", revision: str | None = None) -> str:
    """A local folder holding the model `name`: `name` itself when local, else the hub's snapshot folder.

    `ID:SUBFOLDER` (ms-swift's syntax) downloads only that subfolder of the repo and returns it.
    """
    local = os.path.expanduser(name)
    if os.path.exists(local):
        return local
    if looks_local(name):
        raise GKDUserError(f"{flag} {name}: no such folder")
    repo_id, _, subfolder = name.partition(":")
    kwargs = {"ignore_patterns": IGNORE_PATTERNS}
    if subfolder:
        kwargs["allow_patterns"] = [f"{subfolder.rstrip('/')}/*"]
    module = "huggingface_hub" if use_hf else "modelscope"
    snapshot_download = _client(use_hf, flag, name, module, "snapshot_download", module)
    # The hubs name their default branch differently; ms-swift maps one to the other, so either spelling works.
    if use_hf:
        revision = "main" if revision in (None, "master") else revision
    else:
        revision = "master" if revision in (None, "main") else revision
    try:
        folder = snapshot_download(repo_id, revision=revision, **kwargs)
    except Exception as error:  # offline, unknown id, gated, bad revision: one line for all
        raise _hub_failed(flag, name, use_hf, "download", error) from None
    folder = os.path.join(folder, subfolder) if subfolder else folder
    if not os.path.isdir(folder):  # e.g. a subfolder the repo does not have
        raise GKDUserError(f"{flag} {name}: {_hub_name(use_hf)} gave no folder {folder}")
    return folder


def _load_split(load, dataset_id: str, subset: str | None, use_hf: bool):
    if use_hf:
        # None lets `datasets` pick the repo's only or default config, which covers every case ms-swift's
        # explicit 'default' does, and also repos whose one config has another name.
        return load(dataset_id, subset, split="train")
    # ms-swift asks ModelScope for subset 'default' when none is named.
    table = load(dataset_id, subset_name=subset or "default", split="train")
    return getattr(table, "_hf_ds", table)  # an MsDataset wraps the datasets.Dataset it loaded


def load_hub_dataset(source: str, subset: str | None, *, use_hf: bool, flag: str = "--dataset"):
    """The rows (dicts) of split 'train' of hub dataset `source`, as ms-swift loads them.

    `subset` is the part after ':' in ms-swift's `ID:SUBSET#N`; 'a/b' names several subsets, whose rows
    follow one another. The split is always 'train' (ms-swift's default for ids it has not registered).
    """
    if looks_local(source):
        raise GKDUserError(f"{flag} {source}: a local path, not a hub dataset id; no such file or folder")
    if use_hf:
        load = _client(use_hf, flag, source, "datasets", "load_dataset", "datasets")
    else:
        load = _client(use_hf, flag, source, "modelscope", "MsDataset", "modelscope[datasets]").load
    subsets = [part.strip() for part in subset.split("/")] if subset else [None]
    tables = []
    for name in subsets:
        try:
            tables.append(_load_split(load, source, name, use_hf))
        except Exception as error:  # offline, unknown id or subset, gated: one line for all
            shown = f"{source}:{name}" if name else source
            raise _hub_failed(flag, shown, use_hf, "dataset load", error) from None
    return chain.from_iterable(tables)
