"""gkd.hub: which hub an id goes to, through stand-ins for the client libraries (no hub is reachable here)."""

import sys
import types

import datasets
import huggingface_hub
import pytest

from gkd.errors import GKDUserError
from gkd.hub import load_hub_dataset, resolve_model, use_hf_hub


class Recorder:
    """Records each call's arguments; answers with `result`, or raises it when it is an exception."""

    def __init__(self, result):
        self.result, self.calls = result, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


class FakeMsDataset:
    """modelscope's MsDataset: the loaded datasets.Dataset sits in `_hf_ds`."""

    def __init__(self, table):
        self._hf_ds = table


@pytest.fixture
def hubs(monkeypatch, tmp_path):
    """A fake `modelscope` module, and fake download/load functions in the real `huggingface_hub` and
    `datasets` (whole fake modules there would break transformers, which imports from them)."""
    folder = tmp_path / "snapshot"
    folder.mkdir()
    ms_rows = datasets.Dataset.from_list([{"query": "ms 1"}, {"query": "ms 2"}])
    hf_rows = datasets.Dataset.from_list([{"query": "hf 1"}])
    fakes = types.SimpleNamespace(
        folder=str(folder),
        ms_download=Recorder(str(folder)), hf_download=Recorder(str(folder)),
        ms_load=Recorder(FakeMsDataset(ms_rows)), hf_load=Recorder(hf_rows),
    )
    modelscope = types.ModuleType("modelscope")
    modelscope.snapshot_download = fakes.ms_download
    modelscope.MsDataset = types.SimpleNamespace(load=fakes.ms_load)
    monkeypatch.setitem(sys.modules, "modelscope", modelscope)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fakes.hf_download)
    monkeypatch.setattr(datasets, "load_dataset", fakes.hf_load)
    monkeypatch.delenv("USE_HF", raising=False)
    return fakes


@pytest.mark.parametrize(("flag", "env", "expected"), [
    (None, None, False), (None, "1", True), (None, "true", True), (None, "0", False),
    (True, None, True), (False, "1", False),
])
def test_use_hf_flag_wins_over_env(monkeypatch, flag, env, expected):
    monkeypatch.delenv("USE_HF", raising=False)
    if env is not None:
        monkeypatch.setenv("USE_HF", env)
    assert use_hf_hub(flag) is expected
    assert use_hf_hub(None) is expected  # the decision is exported, for later calls and child processes


def test_bad_use_hf_env_is_one_line(monkeypatch):
    monkeypatch.setenv("USE_HF", "maybe")
    with pytest.raises(GKDUserError, match="USE_HF=maybe: expected"):
        use_hf_hub(None)


def test_model_goes_to_modelscope_by_default(hubs):
    assert resolve_model("Qwen/Qwen2.5-7B", use_hf=use_hf_hub(None)) == hubs.folder
    assert hubs.hf_download.calls == []
    (args, kwargs), = hubs.ms_download.calls
    assert args == ("Qwen/Qwen2.5-7B",) and kwargs["revision"] == "master"


def test_use_hf_switches_to_huggingface_hub(hubs, monkeypatch):
    monkeypatch.setenv("USE_HF", "1")
    assert resolve_model("Qwen/Qwen2.5-7B", use_hf=use_hf_hub(None), revision="v1.0") == hubs.folder
    assert hubs.ms_download.calls == []
    (args, kwargs), = hubs.hf_download.calls
    assert args == ("Qwen/Qwen2.5-7B",) and kwargs["revision"] == "v1.0"


def test_revision_is_passed_and_default_branch_names_map(hubs):
    resolve_model("org/m", use_hf=False, revision="abc123")
    resolve_model("org/m", use_hf=False, revision="main")
    resolve_model("org/m", use_hf=True, revision="master")
    assert [kwargs["revision"] for _, kwargs in hubs.ms_download.calls] == ["abc123", "master"]
    assert hubs.hf_download.calls[0][1]["revision"] == "main"


def test_subfolder_syntax_downloads_only_that_folder(hubs, tmp_path):
    (tmp_path / "snapshot" / "student").mkdir()
    assert resolve_model("org/m:student", use_hf=False) == str(tmp_path / "snapshot" / "student")
    (args, kwargs), = hubs.ms_download.calls
    assert args == ("org/m",) and kwargs["allow_patterns"] == ["student/*"]


@pytest.mark.parametrize("use_hf", [False, True])
def test_local_path_touches_no_client(hubs, tmp_path, monkeypatch, use_hf):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    assert resolve_model(str(tmp_path / "model"), use_hf=use_hf) == str(tmp_path / "model")
    assert resolve_model("model", use_hf=use_hf) == "model"  # exists, though written like an id
    with pytest.raises(GKDUserError, match=r"^--model \./missing: no such folder$"):
        resolve_model("./missing", use_hf=use_hf)
    assert hubs.ms_download.calls == hubs.hf_download.calls == []


@pytest.mark.parametrize(("use_hf", "hub", "hint"), [
    (False, "ModelScope", "--use_hf true"), (True, "the Hugging Face Hub", "--use_hf false"),
])
def test_unreachable_hub_is_one_line(hubs, use_hf, hub, hint):
    hubs.ms_download.result = hubs.hf_download.result = ConnectionError("Max retries exceeded\nmore detail")
    with pytest.raises(GKDUserError) as caught:
        resolve_model("Qwen/Qwen2.5-7B", use_hf=use_hf, flag="--teacher_model")
    message = str(caught.value)
    assert "\n" not in message and caught.value.__cause__ is None and caught.value.__suppress_context__
    assert message.startswith(f"--teacher_model Qwen/Qwen2.5-7B: {hub} download failed (Max retries exceeded)")
    assert "local folder" in message and hint in message


def test_missing_modelscope_gives_install_hint(hubs, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # makes `import modelscope` fail
    with pytest.raises(GKDUserError, match=r"^--model org/m: needs the modelscope package .*pip install modelscope "
                                           r"\(or --use_hf true"):
        resolve_model("org/m", use_hf=False)
    with pytest.raises(GKDUserError, match=r"^--dataset org/d: needs the modelscope\[datasets\] package .*"
                                           r"pip install 'modelscope\[datasets\]' \(or --use_hf true"):
        load_hub_dataset("org/d", None, use_hf=False)


def test_missing_msdataset_dependency_gives_install_hint(hubs, monkeypatch):
    def lazy_import(name):  # how modelscope's lazy module reports a missing dependency of one of its parts
        try:
            import addict_not_installed  # noqa: F401
        except ImportError as error:
            raise RuntimeError(f"Failed to import modelscope.msdatasets because of the following error:\n{error}") \
                from error

    monkeypatch.setattr(sys.modules["modelscope"], "__getattr__", lazy_import, raising=False)
    monkeypatch.delattr(sys.modules["modelscope"], "MsDataset")
    with pytest.raises(GKDUserError, match=r"^--dataset org/d: cannot import modelscope.MsDataset \(No module named "
                                           r"'addict_not_installed'\): pip install 'modelscope\[datasets\]'"):
        load_hub_dataset("org/d", None, use_hf=False)


def test_dataset_from_modelscope_with_subsets(hubs):
    rows = list(load_hub_dataset("org/d", "zh/en", use_hf=False))
    assert rows == [{"query": "ms 1"}, {"query": "ms 2"}] * 2  # one table per subset, one after the other
    assert [call[1]["subset_name"] for call in hubs.ms_load.calls] == ["zh", "en"]
    assert all(call[0] == ("org/d",) and call[1]["split"] == "train" for call in hubs.ms_load.calls)
    assert hubs.hf_load.calls == []
    list(load_hub_dataset("org/d", None, use_hf=False))
    assert hubs.ms_load.calls[-1][1]["subset_name"] == "default"  # ms-swift's subset when none is named


def test_dataset_from_huggingface(hubs):
    assert list(load_hub_dataset("org/d", "main", use_hf=True)) == [{"query": "hf 1"}]
    assert hubs.hf_load.calls == [(("org/d", "main"), {"split": "train"})]
    assert hubs.ms_load.calls == []


def test_dataset_load_failure_is_one_line(hubs):
    hubs.ms_load.result = ValueError("Subset 'xx' not found")
    with pytest.raises(GKDUserError, match=r"^--dataset org/d:xx: ModelScope dataset load failed "
                                           r"\(Subset 'xx' not found\); pass a local folder"):
        load_hub_dataset("org/d", "xx", use_hf=False)


def test_resolved_folder_loads_with_transformers(hubs, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "hub-cache" / "tiny"
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    hubs.ms_download.result = str(folder)
    model = AutoModelForCausalLM.from_pretrained(resolve_model("org/tiny", use_hf=False))
    assert model.config.hidden_size == 16 and model.config.vocab_size == 32
