"""Synthetic tasks with exact checkers, small enough that a 1M-parameter teacher masters them on a CPU.

Each task says why it is in the benchmark:
- addition: one right answer; measures whether distillation transfers a skill (exact match).
- permutation: 720 right answers per prompt; a mode-seeking divergence should keep the student on valid
  answers, a mode-covering one spreads it over invalid ones (validity, and diversity of valid answers).
- running_sum: long answers (16 digits) where each digit is the previous one plus an input digit, mod 10:
  a student that computes from its own previous digit carries every mistake to the end. Its teacher is
  also trained on answers with an injected wrong digit followed by the correct continuation, so it knows
  how to recover off its own path: the setting where the GKD paper's on-policy effect should show.
- navigation: walk from a start to a goal on a line, one move (R or L) per token: the position lives only
  in the answer so far, and a wrong move can be undone by one more move the other way. The teacher is also
  trained on paths with a wrong move followed by the oracle's correction, so it is right from any position;
  a student that only counts its moves, rather than tracking where they took it, ends off the goal after
  its own mistakes.
"""

import abc
import random


class Task(abc.ABC):
    name: str
    metric: str  # "exact": one right answer; "valid": any answer the checker accepts; "success": reaches a goal
    max_new_tokens: int
    n_problems: int | None = None  # how many distinct problems there are, when few

    @abc.abstractmethod
    def problem(self, rng: random.Random):
        """A random problem (hashable)."""

    @abc.abstractmethod
    def prompt(self, problem) -> str:
        """The user's message."""

    @abc.abstractmethod
    def reference(self, problem, rng: random.Random) -> str:
        """An answer to train on (for many-answer tasks, one drawn with rng)."""

    @abc.abstractmethod
    def check(self, problem, answer: str) -> bool:
        """Whether `answer` is right."""

    def recovery_examples(self, problem, rng: random.Random) -> list[tuple[str, str]]:
        """(answer prefix with a mistake, correct continuation) pairs for the teacher; none by default."""
        return []


class Addition(Task):
    name, metric = "addition", "exact"

    def __init__(self, digits: int = 5):
        self.digits, self.max_new_tokens = digits, digits + 3

    def problem(self, rng):
        low, high = 10 ** (self.digits - 1), 10**self.digits - 1
        return rng.randint(low, high), rng.randint(low, high)

    def prompt(self, problem):
        return f"{problem[0]}+{problem[1]}="

    def reference(self, problem, rng):
        return str(problem[0] + problem[1])

    def check(self, problem, answer):
        return answer == str(problem[0] + problem[1])


class Permutation(Task):
    name, metric = "permutation", "valid"

    def __init__(self, letters: int = 6):
        self.letters, self.max_new_tokens = letters, letters + 3

    def problem(self, rng):
        return "".join(sorted(rng.sample("abcdefghijklmnopqrstuvwxyz", self.letters)))

    def prompt(self, problem):
        return f"shuffle {problem}"

    def reference(self, problem, rng):
        return "".join(rng.sample(problem, len(problem)))

    def check(self, problem, answer):
        return len(answer) == len(problem) and sorted(answer) == sorted(problem)


class RunningSum(Task):
    name, metric = "running_sum", "exact"

    def __init__(self, length: int = 16):
        self.length, self.max_new_tokens = length, length + 3

    def problem(self, rng):
        return "".join(rng.choice("0123456789") for _ in range(self.length))

    def prompt(self, problem):
        return f"sum {problem}"

    def reference(self, problem, rng=None):
        total, digits = 0, []
        for digit in problem:
            total = (total + int(digit)) % 10
            digits.append(str(total))
        return "".join(digits)

    def check(self, problem, answer):
        return answer == self.reference(problem)

    def recovery_examples(self, problem, rng):
        answer = self.reference(problem)
        position = rng.randrange(self.length - 1)
        wrong = rng.choice([digit for digit in "0123456789" if digit != answer[position]])
        return [(answer[:position] + wrong, answer[position + 1 :])]


class Navigation(Task):
    """Start and goal on the line 0..size; success: the moves end on the goal, at most `slack` moves more
    than the shortest path (room for two mistakes undone)."""

    name, metric = "navigation", "success"

    def __init__(self, size: int = 20, slack: int = 4):
        self.size, self.slack, self.max_new_tokens = size, slack, size + slack + 2
        self.n_problems = (size + 1) * size

    def problem(self, rng):
        start, goal = rng.sample(range(self.size + 1), 2)
        return start, goal

    def prompt(self, problem):
        return f"go {problem[0]} {problem[1]}"

    def reference(self, problem, rng=None):
        start, goal = problem
        return ("R" if goal > start else "L") * abs(goal - start)

    def check(self, problem, answer):
        start, goal = problem
        if set(answer) - {"R", "L"} or len(answer) > abs(goal - start) + self.slack:
            return False
        return start + answer.count("R") - answer.count("L") == goal

    def recovery_examples(self, problem, rng, count: int = 4):
        """`count` times: a wrong move after any number of right ones (past the goal, after all of them), then
        the shortest way from where it led."""
        start, goal = problem
        answer = self.reference(problem)
        examples = []
        for _ in range(count):
            done = rng.randrange(len(answer) + 1)
            wrong = answer[0] if done == len(answer) else {"R": "L", "L": "R"}[answer[0]]
            position = start + answer[:done].count("R") - answer[:done].count("L") + (1 if wrong == "R" else -1)
            examples.append((answer[:done] + wrong, self.reference((position, goal))))
        return examples


TASKS = {task.name: task for task in (Addition(), Permutation(), RunningSum(), Navigation())}


def make_splits(task: Task, seed: int, n_train: int, n_test: int):
    """Disjoint train and test problems (test problems never appear in training), drawn with `seed`."""
    rng = random.Random(f"{task.name}-{seed}")
    if task.n_problems is not None:  # every problem but the test ones trains
        n_train = min(n_train, task.n_problems - n_test)
    seen, problems = set(), []
    while len(problems) < n_train + n_test:
        problem = task.problem(rng)
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    return problems[:n_train], problems[n_train:]


def to_row(task: Task, problem, answer: str | None) -> dict:
    """A row in gkd's data format (messages); prompt-only when answer is None."""
    messages = [{"role": "user", "content": task.prompt(problem)}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}
