"""Scoring a student on a task's held-out prompts: greedy and sampled quality, diversity of valid answers,
and how likely the teacher finds the student's own samples."""

import torch

from gkd.sampling import SamplingSettings, TransformersEngine, derive_seed

SAMPLES_PER_PROMPT = 8  # for diversity: distinct valid answers among this many samples of one prompt


def prompt_ids(tokenizer, task, problem) -> list[int]:
    messages = [{"role": "user", "content": task.prompt(problem)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def answers(engine, tokenizer, task, problems, temperature: float, seed: int) -> tuple[list[list[int]], list[str]]:
    settings = SamplingSettings(max_new_tokens=task.max_new_tokens, temperature=temperature,
                                stop_token_ids=(tokenizer.eos_token_id,), vocab_size=len(tokenizer))
    seeds = [derive_seed(seed, index) for index in range(len(problems))]
    completions = engine.generate([prompt_ids(tokenizer, task, problem) for problem in problems], settings, seeds)
    return completions, [tokenizer.decode(completion, skip_special_tokens=True) for completion in completions]


@torch.no_grad()
def teacher_logprob(teacher, tokenizer, task, problems, completions) -> float:
    """Mean log-probability per completion token that the teacher gives the student's completions."""
    total, count = 0.0, 0
    for problem, completion in zip(problems, completions):
        if not completion:
            continue
        prompt = prompt_ids(tokenizer, task, problem)
        ids = torch.tensor([prompt + completion])
        logprobs = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, len(prompt):]
        total += logprobs[len(prompt) - 1:].gather(-1, targets[:, None]).sum().item()
        count += len(completion)
    return total / max(count, 1)


def share_right(task, problems, texts) -> float:
    return sum(task.check(problem, answer) for problem, answer in zip(problems, texts)) / len(problems)


def score(model, tokenizer, task, problems, temperature: float, seed: int = 0) -> float:
    """The share of problems answered right at this temperature (0: greedy): the learning curve's one number."""
    engine = TransformersEngine(model.eval(), tokenizer.pad_token_id, max_batch_size=256)
    return share_right(task, problems, answers(engine, tokenizer, task, problems, temperature, seed)[1])


def evaluate(model, teacher, tokenizer, task, problems, seed: int = 0, diversity_prompts: int = 25) -> dict:
    """greedy and sampled (temperature 1): share right; diversity (many-answer tasks): distinct valid
    answers per SAMPLES_PER_PROMPT samples; teacher_logprob: of the sampled completions."""
    engine = TransformersEngine(model.eval(), tokenizer.pad_token_id, max_batch_size=256)
    _, greedy = answers(engine, tokenizer, task, problems, 0.0, seed)
    sampled_ids, sampled = answers(engine, tokenizer, task, problems, 1.0, seed)
    result = {
        "greedy": share_right(task, problems, greedy),
        "sampled": share_right(task, problems, sampled),
        "teacher_logprob": teacher_logprob(teacher, tokenizer, task, problems, sampled_ids),
    }
    if task.metric == "valid":
        chosen = problems[:diversity_prompts]
        repeated = [problem for problem in chosen for _ in range(SAMPLES_PER_PROMPT)]
        _, texts = answers(engine, tokenizer, task, repeated, 1.0, seed + 1)
        distinct = 0
        for index, problem in enumerate(chosen):
            mine = texts[index * SAMPLES_PER_PROMPT : (index + 1) * SAMPLES_PER_PROMPT]
            distinct += len({answer for answer in mine if task.check(problem, answer)})
        result["diversity"] = distinct / (len(chosen) * SAMPLES_PER_PROMPT)
    return result
