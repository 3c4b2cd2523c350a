"""The parts of vLLM weight sync that need no vLLM: which weights are sent under which names, the
buckets, the transfer through a gloo group, and the server client's refusals. The end-to-end sync
tests are in test_vllm.py."""

import copy
import subprocess
import sys
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import free_port
from gkd.errors import GKDUserError
from gkd.models import tokenizer_fingerprint
from gkd.sampling.vllm_engine import checkpoint_shapes, checkpoint_weights
from gkd.sampling.vllm_server import (
    BUCKET_BYTES, VLLMServerEngine, broadcast, join_weight_group, plan_buckets, receive_weights, weight_store,
)


@pytest.fixture
def student(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)


def test_full_model_weights_are_its_parameters_by_reference(student):
    weights = dict(checkpoint_weights(student))
    assert list(weights) == [name for name, _ in student.named_parameters()]
    for name, parameter in student.named_parameters():
        assert weights[name].data_ptr() == parameter.data_ptr()  # no copies for a full model
    assert [(name, shape) for name, shape, _ in checkpoint_shapes(student)] == \
        [(name, list(parameter.shape)) for name, parameter in student.named_parameters()]


def test_lora_weights_are_merged_without_touching_the_model(student):
    from peft import LoraConfig, get_peft_model

    reference = copy.deepcopy(student)
    model = get_peft_model(student, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               init_lora_weights=False))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    weights = dict(checkpoint_weights(model))
    merged = copy.deepcopy(model).merge_and_unload()  # peft's own merge, as the reference
    assert list(weights) == [name for name, _ in reference.named_parameters()]
    changed = 0
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(tensor, reference.state_dict()[name])
    assert changed == 14  # q, k, v, o, gate, up, down in each of the 2 layers got a delta
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


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
        group = join_weight_group(store, 1, 30, "gloo")
        received.update((name, tensor.clone()) for name, tensor in receive_weights(group, buckets, "cpu"))

    thread = threading.Thread(target=server)
    thread.start()
    store = weight_store("127.0.0.1", port, False, 30)
    group = join_weight_group(store, 0, 30, "gloo")
    weights = checkpoint_weights(student)
    for bucket in buckets:
        broadcast(group, torch.cat([next(weights)[1].reshape(-1) for _ in bucket]))
    thread.join(timeout=60)
    assert list(received) == [name for name, _, _ in shapes]
    for name, parameter in student.named_parameters():
        assert torch.equal(received[name], parameter.detach()), name


def test_no_server_is_one_clear_error(tiny, student):
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    port = free_port()
    with pytest.raises(GKDUserError, match=f"no gkd-rollout server answers at http://127.0.0.1:{port} after 2 s"):
        VLLMServerEngine("127.0.0.1", port, 2, model=student, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))


def gkd_rollout(*flags):
    return subprocess.run([sys.executable, "-m", "gkd.cli.rollout", *map(str, flags)],
                          capture_output=True, text=True, timeout=120)


def test_gkd_rollout_refusals_are_one_line(tiny):
    result = gkd_rollout("--port", free_port())
    assert result.returncode == 2
    assert result.stderr.strip() == "gkd-rollout: error: --model is required (the student to serve)"
    assert "--port 70000: must be in [1, 65535]" in gkd_rollout("--model", tiny / "student", "--port", 70000).stderr
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        result = gkd_rollout("--model", tiny / "student", "--port", free_port())
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith("gkd-rollout: error: gkd-rollout needs vLLM")
