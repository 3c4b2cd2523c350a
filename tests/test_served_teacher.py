"""The teacher served by vLLM's own OpenAI server (gkd/teachers/served.py): the loss and the student's gradient
equal those of the same teacher in process with --gkd_logits_topk K. The server is vLLM's
`vllm.entrypoints.openai.api_server` on the tiny teacher (conftest's teacher_server). Runs where vllm is installed
(`make test-vllm`)."""

import ast
import json
import time

import pytest
import torch
from transformers import AutoTokenizer

from conftest import free_port, write_jsonl
from gkd.errors import GKDUserError
from gkd.sampling import SamplingSettings
from gkd.teachers.served import ServedTeacher
from gkd.tokenize import tokenize_messages
from test_cli import base_flags, gkd_train
from test_trainer_loss import VOCAB, dataset_batch, load, make_examples, make_trainer

pytestmark = pytest.mark.vllm


def batches(trainer, tokenizer, teacher_prompt=False):
    """lmbda 0's batch (the dataset's completions) and lmbda 1's (completions the student sampled), built as
    the trainer builds them (padded, or packed under --padding_free); with teacher_prompt, rows 0 and 2 show
    the teacher a longer prompt of their own (OPSD's teacher_prompt column), rows 1 and 3 share the student's."""
    examples = make_examples(tokenizer)
    prompts = [example["prompt_ids"] for example in examples]
    teacher_prompts = None
    if teacher_prompt:
        teacher_prompts = [tokenize_messages(
            tokenizer, [{"role": "user", "content": f"What is {index} + {index}? The answer is {2 * index}."}], "",
            (tokenizer.eos_token_id,))[0] if index % 2 == 0 else None for index in range(len(prompts))]
    sampled = trainer.student_engine.generate(
        prompts, SamplingSettings(max_new_tokens=12, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,)),
        seeds=list(range(len(prompts))))
    built = []
    for completions in ([example["completion_ids"] for example in examples], sampled):
        tensors = trainer._tensors(prompts, completions, VOCAB, teacher_prompts=teacher_prompts)
        tensors["from_student"] = torch.ones(len(prompts), dtype=torch.bool)
        built.append(tensors)
    return built


@pytest.mark.parametrize("topk, tail, temperature, padding_free, teacher_prompt", [
    (16, False, 0.9, False, False), (16, True, 1.0, False, False), (VOCAB, False, 1.0, False, False),
    (VOCAB, True, 1.0, False, False), (16, False, 0.9, True, False), (16, True, 1.0, False, True),
    (16, False, 0.9, True, True)])
def test_the_served_teacher_gives_the_in_process_teachers_loss(tmp_path, tiny, tokenizer, teacher_server, topk, tail,
                                                               temperature, padding_free, teacher_prompt):
    """Dataset completions (lmbda 0) and the student's own (lmbda 1), padded and padding-free, with and
    without a privileged teacher prompt: value and gradient as in process."""
    results = {}
    for kind in ("in process", "served"):
        student = load(tiny, "student")
        teacher = load(tiny, "teacher") if kind == "in process" else \
            ServedTeacher([{"url": teacher_server, "tags": []}], topk, temperature, tail, tokenizer)
        trainer = make_trainer(tmp_path / kind.replace(" ", "-"), tokenizer, student, teacher, gkd_logits_topk=topk,
                               gkd_logits_topk_tail=tail, loss_temperature=temperature)
        assert trainer.loss_impl == "topk"
        trainer.padding_free = padding_free  # (what --padding_free sets)
        built = batches(trainer, tokenizer, teacher_prompt)
        sums = []
        for batch in built:
            jsd, _ = trainer._loss_sums(trainer.model, batch, sft=False)
            jsd.backward()
            sums.append(jsd.detach())
        results[kind] = (sums, {name: param.grad.clone() for name, param in student.named_parameters()},
                         [batch["input_ids"] for batch in built])
    (want, want_grads, want_inputs), (got, got_grads, got_inputs) = results["in process"], results["served"]
    assert all(torch.equal(a, b) for a, b in zip(want_inputs, got_inputs))  # the same student samples
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-4, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_the_requests_leave_before_the_students_forward(tmp_path, tiny, tokenizer, teacher_server):
    """The server answers while the student's forward runs: when that forward starts, every row's request
    has already been sent (and the loss is what the in-process order gives)."""
    teacher = ServedTeacher([{"url": teacher_server, "tags": []}], 16, 1.0, False, tokenizer)
    (served,) = teacher.servers
    sent, ask = [], served.prompt_logprobs
    served.prompt_logprobs = lambda ids: sent.append(ids) or ask(ids)
    student = load(tiny, "student")
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, gkd_logits_topk=16)
    batch = dataset_batch(tokenizer)
    seen_at_forward = []

    def before_forward(module, args, kwargs):
        deadline = time.time() + 30  # (the requests are sent by worker threads)
        while len(sent) < len(batch["input_ids"]) and time.time() < deadline:
            time.sleep(0.01)
        seen_at_forward.append(len(sent))

    hook = student.register_forward_pre_hook(before_forward, with_kwargs=True)
    served_sum = trainer._loss_sums(trainer.model, batch, sft=False)[0]
    hook.remove()
    assert seen_at_forward == [len(batch["input_ids"])]
    in_process = make_trainer(tmp_path, tokenizer, student, load(tiny, "teacher"), gkd_logits_topk=16)
    torch.testing.assert_close(served_sum, in_process._loss_sums(student, batch, sft=False)[0], rtol=1e-4, atol=1e-5)


def test_a_wrong_server_is_one_line(tmp_path, tiny, teacher_server):
    tokenizer = AutoTokenizer.from_pretrained(tiny / "student")
    down = f"http://127.0.0.1:{free_port()}"
    def served(url, topk):
        return ServedTeacher([{"url": url, "tags": []}], topk, 1.0, False, tokenizer)

    with pytest.raises(GKDUserError, match=f"--teacher_model_server {down}: /v1/models failed 2 times"):
        served(down, 16)
    with pytest.raises(GKDUserError, match=rf"--gkd_logits_topk {VOCAB + 1}: .* refused {VOCAB + 1} log-probabilities "
                                           rf"per position \(.*\); start it with --max-logprobs {VOCAB + 1}"):
        served(teacher_server, VOCAB + 1)
    tokenizer.add_tokens(["<other>"])
    with pytest.raises(GKDUserError, match="whose tokenizer differs from the student's"):
        served(teacher_server, 16)


def test_gkd_train_distils_from_the_server(tmp_path, tiny, teacher_server):
    """ms-swift's teacher_server.sh shape: --teacher_model_server URL --gkd_logits_topk K; a down server
    stops the run in one line with nothing written."""
    def flags(output_dir, url):
        flags = base_flags(tiny, output_dir)
        at = flags.index("--teacher_model")
        return [*flags[:at], *flags[at + 2:], "--max_steps", 2, "--lmbda", 0.5, "--gkd_logits_topk", 16,
                "--teacher_model_server", url]

    result = gkd_train(*flags(tmp_path / "run", teacher_server))
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("{'loss'")]
    assert len(logs) == 2 and all(float(entry["jsd_loss"]) > 0 for entry in logs)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["teacher_model_server"] == teacher_server
    down = gkd_train(*flags(tmp_path / "down", f"http://127.0.0.1:{free_port()}"))
    assert down.returncode == 2, down.stderr[-3000:]
    assert down.stderr.strip().splitlines()[-1].startswith("gkd-train: error: --teacher_model_server")
    assert not (tmp_path / "down").exists()


def test_two_teachers_each_teach_their_rows(tmp_path, tiny, tokenizer, teacher_server):
    """ms-swift's JSON list: rows routed by their dataset (the default --teacher_tag_key) and by a column. The
    same server under two URLs (localhost and 127.0.0.1) stands in for two teachers; each gets its rows."""
    other = teacher_server.replace("127.0.0.1", "localhost")
    rows = [json.loads(line) for line in (tiny / "data" / "train.jsonl").read_text().splitlines()[:16]]
    math, chat = write_jsonl(tmp_path / "math.jsonl", rows[:8]), write_jsonl(tmp_path / "chat.jsonl", rows[8:])
    by_file = json.dumps([{"url": teacher_server, "tags": [str(math)]}, {"url": other, "tags": [str(chat)]}])
    by_column = json.dumps([{"url": teacher_server, "tags": ["a"]}, {"url": other, "tags": ["b"]}])
    tagged = write_jsonl(tmp_path / "tagged.jsonl",
                         [{**row, "route": "ab"[index % 2]} for index, row in enumerate(rows)])

    def train(name, datasets, servers, *flags):
        out = tmp_path / name
        argv = base_flags(tiny, out)
        at = argv.index("--teacher_model")
        argv = [*argv[:at], *argv[at + 2:]]
        argv[argv.index("--dataset") + 1:argv.index("--dataset") + 2] = datasets
        return gkd_train(*argv, "--max_steps", 2, "--lmbda", 0, "--gkd_logits_topk", 16, "--teacher_model_server",
                         servers, *flags)

    for name, datasets, servers, flags in (("by-file", [math, chat], by_file, []),
                                           ("by-column", [tagged], by_column, ["--teacher_tag_key", "route"])):
        result = train(name, datasets, servers, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "at http://127.0.0.1" in result.stderr and "at http://localhost" in result.stderr
    unrouted = train("unrouted", [tagged], by_column, "--teacher_tag_key", "dataset")
    assert unrouted.returncode == 2
    assert unrouted.stderr.strip().splitlines()[-1] == (
        f"gkd-train: error: --teacher_tag_key dataset: rows tagged {str(tagged)!r} match no served teacher "
        "(tags: a, b)")
    assert not (tmp_path / "unrouted").exists()


@pytest.mark.parametrize("padding_free", [False, True])
def test_routing_sends_each_row_to_its_teacher(tmp_path, tiny, tokenizer, teacher_server, padding_free):
    """At the loss, padded or packed: the rows of one micro-batch go to the teacher their tag names, and the
    loss equals one teacher's (here both serve the same model)."""
    other = teacher_server.replace("127.0.0.1", "localhost")
    routed = ServedTeacher([{"url": teacher_server, "tags": ["a"]}, {"url": other, "tags": ["b"]}], 16, 1.0, False,
                           tokenizer)
    single = ServedTeacher([{"url": teacher_server, "tags": []}], 16, 1.0, False, tokenizer)
    examples = make_examples(tokenizer)
    sums = []
    for teacher, tags in ((routed, ["a", "b", "b", "a"]), (single, None)):
        trainer = make_trainer(tmp_path, tokenizer, load(tiny, "student"), teacher, gkd_logits_topk=16)
        trainer.padding_free = padding_free  # (what --padding_free sets)
        batch = trainer._tensors([e["prompt_ids"] for e in examples], [e["completion_ids"] for e in examples], VOCAB,
                                 teacher_tags=tags)
        batch["from_student"] = torch.ones(len(examples), dtype=torch.bool)
        before = [server.received_bytes for server in teacher.servers]
        sums.append(trainer._loss_sums(trainer.model, batch, sft=False)[0].detach())
        if tags:
            assert all(server.received_bytes > seen for server, seen in zip(teacher.servers, before))
    torch.testing.assert_close(sums[0], sums[1])


def test_seq_kd_samples_come_from_the_server(tmp_path, tiny, tokenizer, teacher_server):
    """The served teacher's completions: greedy, token for token what transformers generate on the teacher
    writes (stop token included); sampled, each a function of its own seed."""
    teacher = ServedTeacher([{"url": teacher_server, "tags": []}], 16, 1.0, False, tokenizer)
    engine = teacher.sampling_engine(tokenizer.pad_token_id, lambda model: model)
    prompts = [example["prompt_ids"] for example in make_examples(tokenizer)]
    greedy = SamplingSettings(max_new_tokens=12, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,))
    reference = load(tiny, "teacher").eval()
    for prompt, completion in zip(prompts, engine.generate(prompts, greedy)):
        want = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert completion == want[0, len(prompt):].tolist()
    sampled = SamplingSettings(max_new_tokens=12, temperature=1.0, stop_token_ids=(tokenizer.eos_token_id,))
    first = engine.generate(prompts, sampled, seeds=[1, 2, 3, 4])
    assert engine.generate(prompts[::-1], sampled, seeds=[4, 3, 2, 1]) == first[::-1]
    assert engine.generate(prompts, sampled, seeds=[5, 6, 7, 8]) != first


def test_gkd_train_seq_kd_with_a_served_teacher(tmp_path, tiny, teacher_server):
    flags = base_flags(tiny, tmp_path / "run")
    at = flags.index("--teacher_model")
    result = gkd_train(*flags[:at], *flags[at + 2:], "--max_steps", 2, "--lmbda", 0.5, "--seq_kd", "true",
                       "--gkd_logits_topk", 16, "--teacher_model_server", teacher_server)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = [ast.literal_eval(line) for line in result.stdout.splitlines() if line.startswith("{'loss'")]
    assert sum(entry["samples_teacher"] for entry in logs) > 0 and sum(entry["samples_dataset"] for entry in logs) == 0
