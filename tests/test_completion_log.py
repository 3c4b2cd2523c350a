"""--log_completions: completions.jsonl holds what each step trained on, and per-sample losses that are the
step's own (checked against the logged jsd_loss and an independent per-row computation)."""

import copy
import json
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from gkd.completion_log import CompletionLog, markdown_table
from gkd.data import IGNORE_INDEX, build_batch
from gkd.losses import generalized_jsd_loss

from test_trainer import make_examples, make_trainer


@pytest.mark.parametrize("loss_impl, padding_free", [("exact", False), ("fused", True), ("chunked", False),
                                                     ("topk", True)])
def test_the_file_holds_what_was_trained_with_the_steps_own_losses(tmp_path, tiny, tokenizer, loss_impl, padding_free):
    student = AutoModelForCausalLM.from_pretrained(tiny / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher", dtype=torch.float32)
    initial = copy.deepcopy(student)
    examples = make_examples(tokenizer, ["1", "22 + 22 = 44", "3", "4 + 4 = 8", "55", "6 + 6 = 12", "7", "8"])
    flags = {"gkd_logits_topk": 40} if loss_impl == "topk" else {"loss_impl": loss_impl}
    trainer = make_trainer(tmp_path, tokenizer, student, teacher, examples, batch_size=2, accumulation=2,
                           lmbda=0.5, sft_alpha=0.1, log_completions=True, padding_free=padding_free, **flags)
    trainer.args.max_steps, trainer.args.logging_steps = 2, 1
    trained = []  # (step, prompt ids, supervised ids) of every row, read off the tensors the loss got

    def spy(epoch_iterator, num_batches, device, original=trainer.get_batch_samples):
        batches, divisor = original(epoch_iterator, num_batches, device)
        for batch in batches:
            rows = batch["row_ids"][0] if padding_free else None
            for row in range(len(batch["from_student"])):
                ids, labels = ((batch["input_ids"][0][rows == row], batch["labels"][0][rows == row]) if padding_free
                               else (batch["input_ids"][row], batch["labels"][row]))
                supervised = labels.ne(IGNORE_INDEX).nonzero()[:, 0]
                trained.append((trainer.state.global_step + 1, ids[: supervised[0]].tolist(), ids[supervised].tolist()))
        return batches, divisor

    trainer.get_batch_samples = spy
    trainer.train()

    lines = [json.loads(line) for line in open(tmp_path / "out-2-2" / "completions.jsonl")]
    assert [line["step"] for line in lines] == [1] * 4 + [2] * 4
    assert sorted(line["index"] for line in lines[:4]) == [0, 1, 2, 3]
    assert {line["source"] for line in lines} == {"student", "dataset"}
    ids_of = {(step, tokenizer.decode(prompt), tokenizer.decode(completion)): (prompt, completion)
              for step, prompt, completion in trained}
    assert len(ids_of) == len(trained) == len(lines)
    assert {(line["step"], line["prompt"], line["completion"]) for line in lines} == set(ids_of)
    for line in lines:
        assert line["completion_tokens"] == line["loss_tokens"] == len(ids_of[line["step"], line["prompt"],
                                                                             line["completion"]][1])

    # token-weighted, the lines of a step give the step's logged jsd_loss
    logged = [entry["jsd_loss"] for entry in trainer.state.log_history if "jsd_loss" in entry]
    for step, jsd_loss in zip((1, 2), logged):
        mine = [line for line in lines if line["step"] == step]
        mean = sum(line["loss"] * line["loss_tokens"] for line in mine) / sum(line["loss_tokens"] for line in mine)
        assert mean == pytest.approx(jsd_loss, abs=2e-6)

    # step 1's per-sample losses, each computed alone with the models as they were (the exact loss, or its top-k)
    for line in lines[:4]:
        prompt, completion = ids_of[line["step"], line["prompt"], line["completion"]]
        batch = build_batch([prompt], [completion], tokenizer.pad_token_id)
        with torch.no_grad():
            logits = [m(input_ids=batch["input_ids"]).logits[:, :-1] for m in (initial, teacher)]
        if loss_impl == "topk":
            from gkd.losses import topk_generalized_jsd_loss
            expected = topk_generalized_jsd_loss(*logits, batch["labels"][:, 1:], topk=40, reduction="batchmean")
        else:
            expected = generalized_jsd_loss(*logits, batch["labels"][:, 1:], beta=0.5, reduction="batchmean")
        assert line["loss"] == pytest.approx(expected.item(), rel=1e-4)


def test_the_step_goes_to_tensorboard_and_wandb_as_a_table():
    lines = [{"step": 1, "index": i, "source": "student", "prompt": "a|b", "completion": "c\nd", "completion_tokens": 2,
              "loss_tokens": 2, "loss": 0.5 + i} for i in range(3)]
    texts, logged = [], []
    tensorboard = type("TensorBoardCallback", (), {})()
    tensorboard.tb_writer = types.SimpleNamespace(add_text=lambda tag, text, step: texts.append((tag, text, step)))
    wandb = type("WandbCallback", (), {})()
    wandb._initialized = True
    wandb._wandb = types.SimpleNamespace(Table=lambda columns, data: (columns, data), log=logged.append)
    CompletionLog.report(lines, [tensorboard, wandb, object()], 7)
    assert texts == [("completions", markdown_table(lines), 7)]
    assert texts[0][1].splitlines()[2] == "| 1 | 0 | student | a\\|b | c\\nd | 2 | 2 | 0.5000 |"
    (columns, data), = [entry["completions"] for entry in logged]
    assert columns[0] == "step" and data[2][-1] == 2.5
