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
- permutation_undo: permutation with an undo key (`<`), which the teacher learns to press after a wrong
  letter: supervised KD never shows the student one, its own samples do, right where it needs one.
- walk: two right answers per prompt. From a start on the line a..u, walk one letter at a time to either
  end, the teacher choosing the end at random. The student's attention window is 2 tokens (with its 2
  layers it sees its last 3: a letter and the spaces around it): where it is, not which way it was going.
  Supervised KD teaches it, at each letter, how often the teacher's walks through that letter went each
  way, and near the middle its sampled walks zigzag; trained on its own walks, it leans at each letter the
  way its own walks arrive (the misspecified student of Foster et al. 2024, where learning from one's own
  states beats cloning).
"""

import abc
import random


class Task(abc.ABC):
    name: str
    metric: str  # "exact": one right answer; "valid": any answer the checker accepts; "success": reaches a goal
    max_new_tokens: int
    n_problems: int | None = None  # how many distinct problems there are, when few
    chat_template: str | None = None  # the tokenizer's own (ChatML) unless a task needs the prompt elsewhere
    student_window: int | None = None  # the student's attention window in tokens (None: it sees everything)

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


class PermutationUndo(Permutation):
    """permutation with an undo key: `<` takes back the letter before it, and the answer is right when what
    remains is a permutation (with at most `undos` undos). The teacher is also trained, for a `recovery_share`
    of problems, on a wrong letter (one already written, or one not given) followed by `<` and the rest.
    Supervised KD never shows the student a `<`; its own samples do, where it needs one. Spotting a repeated
    letter is one look back over the answer; choosing an unused one is the harder part."""

    name = "permutation_undo"

    def __init__(self, letters: int = 6, undos: int = 3, recovery_share: float = 0.3):
        super().__init__(letters)
        self.undos, self.recovery_share = undos, recovery_share
        self.max_new_tokens = letters + 2 * undos + 3

    def check(self, problem, answer):
        if answer.count("<") > self.undos:
            return False
        kept = []
        for character in answer:
            if character != "<":
                kept.append(character)
            elif not kept:
                return False  # nothing to take back
            else:
                kept.pop()
        return super().check(problem, "".join(kept))

    def recovery_examples(self, problem, rng):
        if rng.random() >= self.recovery_share:
            return []
        answer = self.reference(problem, rng)
        done = rng.randrange(1, len(answer))  # right letters before the wrong one
        unused = [letter for letter in "abcdefghijklmnopqrstuvwxyz" if letter not in problem]
        wrong = rng.choice(list(answer[:done]) + rng.sample(unused, 3))
        return [(answer[:done] + wrong, "<" + answer[done:])]


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


# The conversation as plain text: the prompt is the user's message itself, the answer follows it directly and
# ends with <|im_end|>. A student with a 2-token window then sees the start when it takes its first step.
PLAIN_TEMPLATE = ("{% for message in messages %}{{ message['content'] }}"
                  "{% if message['role'] == 'assistant' %}{{ '<|im_end|>' }}{% endif %}{% endfor %}")


class Walk(Task):
    """The prompt is a start letter between the ends of the line a..u; the answer walks, one ` x` (space,
    letter) per move, to either end and stops there. Right: each move goes to a neighbouring letter, the walk
    stops on the first end it reaches, and it takes at most `slack` moves more than the straight way to that
    end (room for two mistakes undone). A problem is (start, instance): the line has few starts, and the
    instance only tells the many training rows of one start apart (the held-out rows are new instances)."""

    name, metric = "walk", "valid"
    chat_template, student_window = PLAIN_TEMPLATE, 2

    def __init__(self, size: int = 20, slack: int = 4, recovery_share: float = 0.15):
        self.size, self.slack, self.recovery_share = size, slack, recovery_share
        self.max_new_tokens = 2 * (size - 1 + slack) + 1  # the longest right answer, and <|im_end|>

    def letter(self, position: int) -> str:
        return chr(ord("a") + position)

    def problem(self, rng):
        return rng.randint(1, self.size - 1), rng.randrange(10**9)

    def prompt(self, problem):
        return self.letter(problem[0])

    def walk(self, start: int, end: int) -> str:
        step = 1 if end > start else -1
        return "".join(f" {self.letter(position)}" for position in range(start + step, end + step, step))

    def reference(self, problem, rng):
        return self.walk(problem[0], rng.choice([0, self.size]))

    def check(self, problem, answer):
        if len(answer) % 2 or answer[::2].strip() or not answer:
            return False
        positions = [problem[0]] + [ord(letter) - ord("a") for letter in answer[1::2]]
        if any(abs(after - before) != 1 for before, after in zip(positions, positions[1:])):
            return False
        ends = [index for index, position in enumerate(positions) if position in (0, self.size)]
        if ends != [len(positions) - 1]:  # an end reached, the first one, and nothing after it
            return False
        return len(positions) - 1 <= abs(positions[-1] - problem[0]) + self.slack

    def recovery_examples(self, problem, rng):
        """For a `recovery_share` of problems: a wrong move after some right ones, then the way to the same
        end from where it led (never onto an end: that would have finished the walk)."""
        start = problem[0]
        end = rng.choice([0, self.size])
        step = 1 if end > start else -1
        done = rng.randrange(abs(end - start))  # right moves before the mistake; the walk has not ended yet
        position = start + step * done - step
        if rng.random() >= self.recovery_share or position in (0, self.size):
            return []
        return [(self.walk(start, start + step * done) + f" {self.letter(position)}", self.walk(position, end))]


TASKS = {task.name: task for task in (Addition(), Permutation(), PermutationUndo(), RunningSum(), Navigation(),
                                      Walk())}


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
