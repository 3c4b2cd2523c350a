"""The parts of vLLM weight sync that need no vLLM: which weights are sent under which names (those
save_pretrained writes), the buckets, the transfer through a gloo group, gkd-rollout's token and where its
weight store listens, and the server client's refusals. The end-to-end sync tests are in test_vllm.py."""

import copy
import importlib.util
import ipaddress
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import HTTPServer

import pytest
import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import free_port
from gkd.cli.rollout import Handler, Rollout, describe_model
from gkd.errors import GKDUserError
from gkd.models import tokenizer_fingerprint
from gkd.sampling import SamplingSettings
from gkd.sampling.vllm_engine import checkpoint_shapes, checkpoint_weights
from gkd.sampling.vllm_server import (
    BUCKET_BYTES, TOKEN_VARIABLE, VLLMServerEngine, broadcast, join_weight_group, plan_buckets, receive_weights,
    token_proof, weight_store, weights_signature,
)

SHAPES = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
FAMILIES = {
    "llama": dict(model_type="llama"),
    "qwen2-tied": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
}


@pytest.fixture
def student(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)


def saved(model, folder) -> dict:
    """What save_pretrained writes: the reference for the names, shapes and values sent to vLLM."""
    model.save_pretrained(folder)
    return safetensors.torch.load_file(folder / "model.safetensors")


def family(name: str, folder, tokenizer):
    """A small random model of the family, saved to `folder` with the tiny tokenizer, and loaded back as
    training loads it."""
    options = dict(FAMILIES[name])
    config = AutoConfig.for_model(options.pop("model_type"), **SHAPES, **options)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_weights_are_sent_under_the_names_save_pretrained_writes(tmp_path, tokenizer, name):
    model = family(name, tmp_path / "model", tokenizer)
    reference = saved(model, tmp_path / "saved")
    if name in ("qwen2_moe", "mixtral"):  # in memory, transformers fuses the experts of each layer
        assert "model.layers.0.mlp.experts.gate_up_proj" in dict(model.named_parameters())
        assert "model.layers.0.mlp.experts.gate_up_proj" not in reference
    if name == "qwen2-tied":
        assert "lm_head.weight" not in reference
    weights = dict(checkpoint_weights(model))
    assert sorted(weights) == sorted(reference)
    for key, tensor in reference.items():
        assert torch.equal(weights[key], tensor), key
    shapes = checkpoint_shapes(model)
    assert [name for name, _, _ in shapes] == list(weights)  # the order the weights are sent in
    assert {name: (shape, dtype) for name, shape, dtype in shapes} == \
        {key: (list(tensor.shape), str(tensor.dtype)) for key, tensor in reference.items()}
    # gkd-rollout's /health describes the served model from its config alone: the same names and shapes.
    assert describe_model(str(tmp_path / "model"), False)["weights"] == weights_signature(shapes)
    if name in ("llama", "qwen2-tied"):  # no conversion: the parameters themselves, not copies
        pointers = {parameter.data_ptr() for parameter in model.parameters()}
        assert all(tensor.data_ptr() in pointers for tensor in weights.values())


@pytest.mark.parametrize("name", ["llama", "qwen2_moe"])
def test_lora_weights_are_merged_without_touching_the_model(tmp_path, tokenizer, name):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(family(name, tmp_path / "model", tokenizer), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    weights = dict(checkpoint_weights(model))
    reference = saved(copy.deepcopy(model).merge_and_unload(), tmp_path / "merged")  # peft's own merge
    unmerged = saved(family(name, tmp_path / "model", tokenizer), tmp_path / "base")
    assert sorted(weights) == sorted(reference)
    changed = 0
    for key, tensor in reference.items():
        torch.testing.assert_close(weights[key], tensor, rtol=0, atol=1e-6, msg=key)
        changed += not torch.equal(tensor, unmerged[key])
    # Per layer: q, k, v, o and the MLP's gate, up, down (in qwen2_moe the shared expert's, and its gate;
    # the fused experts and the router are no nn.Linear, so all-linear leaves them alone).
    assert changed == {"llama": 14, "qwen2_moe": 16}[name]
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_buckets_keep_order_split_by_dtype_and_size():
    mib = 2**20 // 4  # float32 elements in a MiB
    weights = [("a", [mib], "torch.float32"), ("b", [mib], "torch.float32"), ("c", [mib], "torch.bfloat16"),
               ("d", [BUCKET_BYTES // 4], "torch.float32"), ("e", [1], "torch.float32")]
    buckets = plan_buckets(weights)
    assert [[name for name, _, _ in bucket] for bucket in buckets] == [["a", "b"], ["c"], ["d"], ["e"]]


def test_weights_cross_a_gloo_group_exactly(student):
    """The trainer's side (rank 0) broadcasts buckets; the server's side (rank 1) gets the same tensors."""
    shapes = checkpoint_shapes(student)
    buckets = plan_buckets(shapes)
    port, received = free_port(), {}

    def server():
        store = weight_store("127.0.0.1", port, True, 30)
        group = join_weight_group(store, 1, 30, "gloo", "n0nce", "127.0.0.1")
        received.update((name, tensor.clone()) for name, tensor in receive_weights(group, buckets, "cpu"))

    thread = threading.Thread(target=server)
    thread.start()
    store = weight_store("127.0.0.1", port, False, 30)
    group = join_weight_group(store, 0, 30, "gloo", "n0nce")
    weights = checkpoint_weights(student)
    for bucket in buckets:
        broadcast(group, torch.cat([next(weights)[1].reshape(-1) for _ in bucket]))
    thread.join(timeout=60)
    assert list(received) == [name for name, _, _ in shapes]
    for name, parameter in student.named_parameters():
        assert torch.equal(received[name], parameter.detach()), name


def non_loopback_address() -> str | None:
    """An address of this machine that is not a loopback one, or None."""
    candidates = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))  # picks the outgoing interface; sends nothing
            candidates.append(probe.getsockname()[0])
        except OSError:
            pass
    try:
        candidates += subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    except OSError:
        pass
    return next((address for address in candidates if not ipaddress.ip_address(address).is_loopback), None)


def reachable(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=2).close()
        return True
    except OSError:
        return False


def test_weight_store_listens_only_where_asked():
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback ones")
    store = weight_store("127.0.0.1", 0, True, 10)
    assert reachable("127.0.0.1", store.port)
    assert not reachable(address, store.port)
    everywhere = weight_store("0.0.0.0", 0, True, 10)  # the control: reachable when told to listen there
    assert reachable(address, everywhere.port)


class RecordingEngine:
    """Stands in for vLLM behind a real gkd-rollout HTTP server: records what it is asked to do."""

    def __init__(self):
        self.calls, self.loaded = [], {}

    def generate(self, prompts, settings, seeds, images=None):
        self.calls.append((prompts, settings, seeds, images))
        return [[7] for _ in prompts]

    def check_loadable(self, names):
        pass

    def load_weights(self, weights):
        self.loaded = {name: tensor.clone() for name, tensor in weights}


@pytest.fixture
def server(tiny):
    """gkd-rollout's HTTP server and weight group, on 127.0.0.1, with the token "right"."""
    rollout = Rollout(RecordingEngine(), describe_model(str(tiny / "student"), False), "127.0.0.1", "right", 30)
    http = HTTPServer(("127.0.0.1", 0), Handler)
    http.rollout = rollout
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield rollout, http.server_address[1]
    http.shutdown()
    http.server_close()


def client(tiny, student, port, token):
    fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny / "student"))
    return VLLMServerEngine("127.0.0.1", port, 20, model=student, tokenizer_fingerprint=fingerprint, token=token)


def test_server_refuses_a_wrong_or_missing_token_at_once(tiny, student, server, monkeypatch):
    _, port = server
    refusal = "wrong or missing token: run gkd-train with GKD_ROLLOUT_TOKEN set to gkd-rollout's token"
    started = time.monotonic()
    with pytest.raises(GKDUserError, match=f"^gkd-rollout at http://127.0.0.1:{port}/health: {refusal}$"):
        client(tiny, student, port, "wrong")
    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    with pytest.raises(GKDUserError, match=refusal):
        client(tiny, student, port, None)
    assert time.monotonic() - started < 10  # refused, not waited on until the 20 s timeout
    for path, data in [("/generate", b"{}"), ("/weights/connect", b"{}"), ("/weights/update", b"{}")]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                         headers={"Authorization": "Bearer wrong"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401


def test_server_with_the_token_gets_prompts_seeds_settings_and_weights(tiny, student, server, monkeypatch):
    rollout, port = server
    monkeypatch.setenv(TOKEN_VARIABLE, "right")
    engine = client(tiny, student, port, None)  # the token from the environment, as gkd-train does
    settings = SamplingSettings(max_new_tokens=4, temperature=0.7, stop_token_ids=(3,), vocab_size=259)
    assert engine.generate([[1, 2], [3]], settings, [11, 12]) == [[7], [7]]
    pictures = [["/data/a.png", "https://example.org/b.png"], []]  # references, opened by the server's engine
    assert engine.generate([[1, 2], [3]], settings, [11, 12], images=pictures) == [[7], [7]]
    assert rollout.engine.calls == [([[1, 2], [3]], settings, [11, 12], None),
                                    ([[1, 2], [3]], settings, [11, 12], pictures)]
    engine.sync_weights(student)
    expected = dict(checkpoint_weights(student))
    assert list(rollout.engine.loaded) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(rollout.engine.loaded[name], tensor), name


def test_server_leaves_a_weight_group_whose_peer_lacks_the_token(server):
    """A peer that knows the connection's nonce (it could read the store) but not the token is refused."""
    rollout, port = server
    request = urllib.request.Request(f"http://127.0.0.1:{port}/weights/connect", data=b'{"backend": "gloo"}',
                                     headers={"Authorization": "Bearer right"})
    with urllib.request.urlopen(request, timeout=10) as response:
        reply = json.loads(response.read())
    store = weight_store("127.0.0.1", reply["port"], False, 20)
    group = join_weight_group(store, 0, 20, "gloo", reply["nonce"])
    broadcast(group, token_proof("wrong", reply["nonce"]))
    deadline = time.monotonic() + 10
    while rollout.store is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rollout.group is None and rollout.store is None
    update = urllib.request.Request(f"http://127.0.0.1:{port}/weights/update", data=b'{"buckets": []}',
                                    headers={"Authorization": "Bearer right"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(update, timeout=10)
    assert refused.value.read().decode() == "ValueError: no weight group: POST /weights/connect first"


def test_no_server_is_one_clear_error(tiny, student):
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    port = free_port()
    with pytest.raises(GKDUserError, match=f"no gkd-rollout server answers at http://127.0.0.1:{port} after 2 s"):
        VLLMServerEngine("127.0.0.1", port, 2, model=student, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))


def gkd_rollout(*flags, env=None):
    return subprocess.run([sys.executable, "-m", "gkd.cli.rollout", *map(str, flags)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_gkd_rollout_refusals_are_one_line(tiny):
    result = gkd_rollout("--port", free_port())
    assert result.returncode == 2
    assert result.stderr.strip() == "gkd-rollout: error: --model is required (the student to serve)"
    assert "--port 70000: must be in [1, 65535]" in gkd_rollout("--model", tiny / "student", "--port", 70000).stderr
    if importlib.util.find_spec("vllm") is None:
        environment = {key: value for key, value in os.environ.items() if key != TOKEN_VARIABLE}
        result = gkd_rollout("--model", tiny / "student", "--port", free_port(), env=environment)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        # Without GKD_ROLLOUT_TOKEN it makes one up, and says so before anything else.
        assert lines[0].startswith("gkd-rollout: GKD_ROLLOUT_TOKEN is not set; run gkd-train with GKD_ROLLOUT_TOKEN=")
        assert len(lines[0].rsplit("=", 1)[1]) >= 32
        assert lines[-1].startswith("gkd-rollout: error: gkd-rollout needs vLLM")


def test_weights_unlike_the_served_model_are_refused_by_name(tiny):
    """A trainer that sends other weight names or shapes is told the first difference (not a TypeError from
    hashing the JSON lists the shapes arrive as) before anything is received."""
    rollout = Rollout(None, describe_model(str(tiny / "student"), False), "127.0.0.1", "t", 30)
    rollout.group = object()  # connected; nothing may be received from it
    buckets = [[[name, list(shape), "torch.float32"] for name, shape in rollout.expected_weights.items()]]
    buckets[0][0][1] = [1, 1]
    with pytest.raises(ValueError, match=r"differ from the served model's, first at \[\('lm_head.weight', \(1, 1\)"):
        rollout.update_weights({"buckets": buckets})
