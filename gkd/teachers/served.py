"""A teacher served by vLLM's OpenAI-compatible server: ms-swift's --teacher_model_server.

`vllm serve TEACHER --max-logprobs K` (ms-swift's `swift deploy` speaks its own /infer/ protocol, and its
/v1/completions takes text only). gkd sends the token ids the teacher reads (its prompt, then the
completion; never text, so nothing is tokenized again differently) to /v1/completions with
`prompt_logprobs: K` and `max_tokens: 1`. For each position vLLM returns the K most likely next tokens
with their log-probabilities under the teacher's full softmax at temperature 1 (prompt log-probabilities
never go through sampling settings), plus the actual next token when it is not among them, which is
dropped here.

That is what gkd's top-k loss needs, and gives the loss the same teacher side as the same teacher in
process with --gkd_logits_topk K: the top K ids at temperature 1 are the top K at any temperature, and
renormalising log p / T over them equals renormalising logits / T. The tail bucket needs the mass outside
the K at the loss temperature, which only temperature 1 gives from these numbers.

Several servers (ms-swift's JSON list of {"url", "tags"}) each teach the rows whose --teacher_tag_key value
is one of their tags. Requests go one per row, concurrently (a server batches them), with retries and
backoff; they leave before the student's forward, so the server works while it runs. At start each server
is asked what it serves: it must answer, know the student's vocabulary (its /tokenize endpoint gives the
student tokenizer's ids for a text made of that vocabulary), and return K log-probabilities.
"""

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from gkd.errors import GKDUserError
from gkd.losses.common import IGNORE_INDEX
from gkd.losses.topk import TeacherTopK
from gkd.sampling.served_teacher import ServedTeacherEngine
from gkd.teachers.base import Teacher

logger = logging.getLogger("gkd")
ATTEMPTS = 4  # per request; waits of 1, 2 and 4 seconds between them
PROBE_TOKENS = 2000  # vocabulary entries in the text that checks the server's tokenizer


def parse_teacher_servers(value: str) -> list[dict]:
    """--teacher_model_server as ms-swift reads it: one URL, or a JSON list of {"url", "tags"} (tags: the
    values of --teacher_tag_key that route a row to that teacher; with several teachers each needs tags,
    none shared). Returns [{"url", "tags"}]; raises GKDUserError on a malformed value."""
    value, flag = value.strip(), f"--teacher_model_server {value.strip()}"
    if not value.startswith("["):
        return [{"url": value, "tags": []}]
    try:
        teachers = json.loads(value)
    except ValueError as error:
        raise GKDUserError(f"{flag}: not valid JSON ({error})") from None
    if not teachers or not all(isinstance(teacher, dict) and isinstance(teacher.get("url"), str)
                               for teacher in teachers):
        raise GKDUserError(f'{flag}: expected a URL or a non-empty JSON list of {{"url": ..., "tags": [...]}}')
    teachers = [{"url": teacher["url"], "tags": [str(tag) for tag in teacher.get("tags") or []]}
                for teacher in teachers]
    seen = {}
    for index, teacher in enumerate(teachers if len(teachers) > 1 else []):
        if not teacher["tags"]:
            raise GKDUserError(f"{flag}: teacher {index} has no tags; with several teachers each routes the rows "
                               "whose --teacher_tag_key value is one of its tags")
        for tag in teacher["tags"]:
            if tag in seen:
                raise GKDUserError(f"{flag}: tag {tag!r} is in teachers {seen[tag]} and {index}")
            seen[tag] = index
    return teachers


class _Server:
    """One vLLM OpenAI server: checked at start, then asked for prompt log-probabilities."""

    def __init__(self, url: str, topk: int, tokenizer, timeout: float):
        self.url, self.topk, self.timeout = url.rstrip("/"), topk, timeout
        self.flag = f"--teacher_model_server {url}"
        self.received_bytes, self._counting = 0, threading.Lock()  # the answers' bodies (scripts/bench_teacher.py)
        self.served_model = self._served_model()
        self._check_vocabulary(tokenizer)
        self._check_logprobs(tokenizer)
        logger.info("teacher: %s at %s, its top %d log-probabilities per position", self.served_model, self.url, topk)

    def request(self, path: str, body: dict | None = None, attempts: int = ATTEMPTS) -> dict:
        """GET (no body) or POST JSON; retried with backoff on connection errors and server errors. A 4xx
        answer is returned as {"error": message}: it is about the request, and repeating it changes nothing."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"})
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = response.read()
                with self._counting:  # requests run in several threads
                    self.received_bytes += len(answer)
                return json.loads(answer)
            except urllib.error.HTTPError as error:
                text = error.read().decode(errors="replace")
                if error.code < 500:
                    return {"error": _error_message(text)}
                failure = f"HTTP {error.code}: {_error_message(text)}"
            except (urllib.error.URLError, OSError) as error:
                failure = str(getattr(error, "reason", error))
            if attempt + 1 < attempts:
                time.sleep(2 ** attempt)
        raise GKDUserError(f"{self.flag}: {path} failed {attempts} times ({failure}); is a vLLM OpenAI server "
                           "running there?")

    def _served_model(self) -> str:
        models = self.request("/v1/models", attempts=2)
        if "error" in models or not models.get("data"):
            raise GKDUserError(f"{self.flag}: /v1/models did not name a model ({models.get('error', models)})")
        return models["data"][0]["id"]

    def _check_vocabulary(self, tokenizer) -> None:
        """The server must turn a text into the ids the student's tokenizer gives it: a text made of spread-out
        entries of the student's vocabulary."""
        step = max(len(tokenizer) // PROBE_TOKENS, 1)
        text = tokenizer.decode(list(range(0, len(tokenizer), step)), skip_special_tokens=True)
        answer = self.request("/tokenize", {"model": self.served_model, "prompt": text, "add_special_tokens": False})
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        if answer.get("tokens") != want:
            raise GKDUserError(f"{self.flag}: it serves {self.served_model}, whose tokenizer differs from the "
                               "student's; GKD compares distributions token by token, so both must use the same one")

    def _check_logprobs(self, tokenizer) -> None:
        ids = tokenizer("check", add_special_tokens=False)["input_ids"][:1] * 2
        answer = self.request("/v1/completions", self._body(ids), attempts=2)
        returned = len(answer["choices"][0]["prompt_logprobs"][1]) if "error" not in answer else 0
        if returned < self.topk:  # (K, or K + 1 with the actual token)
            why = answer.get("error", f"it returned {returned}")
            raise GKDUserError(f"--gkd_logits_topk {self.topk}: {self.flag} refused {self.topk} log-probabilities "
                               f"per position ({why}); start it with --max-logprobs {self.topk} or more")

    def _body(self, ids: list[int]) -> dict:
        return {"model": self.served_model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": self.topk}

    def prompt_logprobs(self, ids: list[int]) -> list[dict | None]:
        answer = self.request("/v1/completions", self._body(ids))
        if "error" in answer:
            raise GKDUserError(f"{self.flag}: /v1/completions refused a row of {len(ids)} tokens ({answer['error']})")
        return answer["choices"][0]["prompt_logprobs"]


class ServedTeacher(Teacher):
    """servers: parse_teacher_servers' list; with several, each row goes to the one whose tags hold the row's
    --teacher_tag_key value (gkd-train checks every row has one before training starts)."""

    def __init__(self, servers: list[dict], topk: int, temperature: float, tail: bool, tokenizer,
                 tag_key: str = "dataset", timeout: float = 300.0):
        super().__init__(model=None)
        self.topk, self.temperature, self.tail, self.tag_key = topk, temperature, tail, tag_key
        self.servers = [_Server(server["url"], topk, tokenizer, timeout) for server in servers]
        self.routes = {tag: server for server, spec in zip(self.servers, servers) for tag in spec["tags"]}
        # (threads: a row's request mostly waits on the server, and parsing its JSON is short)
        self._requests = ThreadPoolExecutor(max_workers=16, thread_name_prefix="gkd-teacher-request")

    @property
    def received_bytes(self) -> int:
        return sum(server.received_bytes for server in self.servers)

    def server_of(self, tag: str | None) -> _Server:
        if len(self.servers) == 1:
            return self.servers[0]
        if tag not in self.routes:
            raise GKDUserError(f"--teacher_tag_key {self.tag_key}: rows tagged {tag!r} match no served teacher "
                               f"(tags: {', '.join(sorted(self.routes))})")
        return self.routes[tag]

    def check_rows(self, tags) -> None:
        """Before training: every row's tag routes it to a teacher (one line naming the first that does not)."""
        for tag in dict.fromkeys(tags):
            self.server_of(tag)

    def sampling_engine(self, pad_token_id: int, unwrap, processor=None):
        """seq_kd: the one server writes the teacher's completions (with several, gkd-train refuses seq_kd:
        a generation does not carry its rows' tags)."""
        return ServedTeacherEngine(self.servers[0]) if len(self.servers) == 1 else None

    def top_k_request(self, batch, topk: int, temperature: float, vocab_size: int):
        """Sends one request per row now (concurrently: the server batches them); the function returned waits
        for the answers, so the server computes while the student's forward runs."""
        if topk != self.topk or temperature != self.temperature:
            raise ValueError(f"the served teacher was set up for top {self.topk} at temperature {self.temperature}")
        view = batch.teacher_view or batch
        spans = _row_spans(view)
        tags = batch.teacher_tags or [None] * len(spans)
        counted = view.targets().ne(IGNORE_INDEX).cpu()
        input_ids = view.input_ids.cpu()
        answers = [self._requests.submit(self._row_top_k, self.server_of(tag), input_ids[line, start:end].tolist(),
                                         counted[line, start:end].nonzero().squeeze(1).tolist())
                   for (line, start, end), tag in zip(spans, tags)]

        def finish() -> TeacherTopK:
            logprobs = torch.zeros(*view.labels.shape, topk, dtype=torch.float32)
            ids = torch.zeros(*view.labels.shape, topk, dtype=torch.long)
            for (line, start, _), answer in zip(spans, answers):
                positions, row_ids, row_logprobs = answer.result()
                ids[line, start + positions] = row_ids
                logprobs[line, start + positions] = row_logprobs
            return self._as_teacher_topk(batch, logprobs, ids, vocab_size)

        return finish

    def _row_top_k(self, server: _Server, ids: list[int], positions: list[int]):
        """One row's request, and its answer as tensors (in a worker thread): at each counted position the K
        ids and log-probabilities, best first."""
        answer = server.prompt_logprobs(ids)
        row_ids = torch.zeros(len(positions), self.topk, dtype=torch.long)
        row_logprobs = torch.zeros(len(positions), self.topk, dtype=torch.float32)
        for index, position in enumerate(positions):
            # entry p + 1: the distribution after positions 0..p, i.e. what position p predicts
            best = sorted(answer[position + 1].items(), key=lambda item: -item[1]["logprob"])[:self.topk]
            row_ids[index] = torch.tensor([int(token) for token, _ in best])
            row_logprobs[index] = torch.tensor([entry["logprob"] for _, entry in best])
        return torch.tensor(positions, dtype=torch.long), row_ids, row_logprobs

    def _as_teacher_topk(self, batch, logprobs, ids, vocab_size: int) -> TeacherTopK:
        view = batch.teacher_view or batch
        if int(ids.max()) >= vocab_size:
            # In process only the output rows both models have are ranked; the server ranks all of the
            # teacher's, and its head has more rows than the student's (padding past the tokenizer).
            raise GKDUserError(f"--teacher_model_server: the teacher ranks token id {int(ids.max())} among its top "
                               f"{self.topk}, past the student's {vocab_size} output rows; a served teacher needs an "
                               "output layer no larger than the student's")
        if self.tail:  # at temperature 1 (checked at start): the mass outside the K
            tail = torch.log1p(-logprobs.exp().sum(-1).clamp(max=1.0))
        else:  # not needed: the loss renormalises over the K
            tail = torch.full(view.labels.shape, float("-inf"))
        device = view.input_ids.device
        moved = [batch.as_student_positions(tensor.to(device)) for tensor in (logprobs / self.temperature, ids, tail)]
        return TeacherTopK(*(tensor.reshape(-1, *tensor.shape[2:]) for tensor in moved), self.temperature)


def _row_spans(view) -> list[tuple[int, int, int]]:
    """(line, start, end) of each row in a LossBatch: padded rows, or the rows packed into one sequence
    (--padding_free), which start where position_ids restart at 0."""
    if view.attention_mask is not None:
        return [(line, 0, int(length)) for line, length in enumerate(view.attention_mask.sum(1).tolist())]
    starts = (view.position_ids[0] == 0).nonzero().squeeze(1).tolist()
    return [(0, start, end) for start, end in zip(starts, [*starts[1:], view.position_ids.shape[1]])]


def _error_message(text: str) -> str:
    """vLLM's error body ({"error": {"message": ...}} or {"message": ...}) as one line."""
    try:
        body = json.loads(text)
        message = body.get("error", body)
        message = message.get("message", message) if isinstance(message, dict) else message
    except (ValueError, AttributeError):
        message = text
    return " ".join(str(message).split())[:300]
