"""Sampling through a gkd-rollout server (vLLM in its own process, on its own GPUs).

The protocol, JSON over HTTP:
- GET  /health           what the server serves: model, architecture, vocabulary, weight shapes;
- POST /generate         {"prompts": [[token ids]], "seeds": [seed or null], "settings": {...}}
                         -> {"completions": [[token ids]]};
- POST /weights/connect  -> {"port": P}: the server opens a two-member process group (rank 1) whose
                         store listens on P; the trainer joins it as rank 0;
- POST /weights/update   {"buckets": [[[name, shape, dtype], ...], ...]}: the server receives each bucket,
                         one flat tensor per bucket, by broadcast from rank 0 and loads the weights.
Weights never travel through HTTP: only their names and shapes do.

With several training processes only the main one talks to the server: every process hands its prompts
(and their seeds) to it, it sends them in one request and hands each process its completions back.
"""

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
from datetime import timedelta

import torch

from gkd.errors import GKDUserError
from gkd.sampling.base import SamplingEngine, SamplingSettings, prompt_seeds
from gkd.sampling.vllm_engine import checkpoint_shapes, checkpoint_weights

BUCKET_BYTES = 512 * 2**20  # weights are sent in flat buckets of about this size, one broadcast each
DTYPES = {str(dtype): dtype for dtype in (torch.float32, torch.bfloat16, torch.float16)}


def weights_signature(shapes) -> list[list]:
    """What must agree between the student and the served model: each weight's name and shape."""
    return sorted([name, list(shape)] for name, shape, *_ in shapes)


def weight_store(host: str, port: int, is_server: bool, timeout_seconds: float):
    """The rendezvous of the weight group: the server listens (port 0: any free one), the trainer connects."""
    return torch.distributed.TCPStore(host, port, 2, is_master=is_server, timeout=timedelta(seconds=timeout_seconds),
                                      wait_for_workers=False)


def join_weight_group(store, rank: int, timeout_seconds: float, backend: str):
    """The two-member process group (trainer rank 0, server rank 1) that carries weights, built from its
    own store, apart from any default group that training or vLLM set up."""
    prefix_store = torch.distributed.PrefixStore("gkd-weights", store)
    if backend == "nccl":
        return torch.distributed.ProcessGroupNCCL(prefix_store, rank, 2)
    return torch.distributed.ProcessGroupGloo(prefix_store, rank, 2, timedelta(seconds=timeout_seconds))


def plan_buckets(shapes_and_dtypes: list[tuple[str, list[int], str]]) -> list[list[tuple[str, list[int], str]]]:
    """Consecutive weights of one dtype, up to BUCKET_BYTES a bucket (a larger weight gets one of its own)."""
    buckets, size = [], 0
    for name, shape, dtype in shapes_and_dtypes:
        nbytes = torch.Size(shape).numel() * DTYPES[dtype].itemsize
        if not buckets or buckets[-1][-1][2] != dtype or size + nbytes > BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append((name, list(shape), dtype))
        size += nbytes
    return buckets


def broadcast(group, tensor: torch.Tensor) -> None:
    options = torch.distributed.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def receive_weights(group, buckets, device):
    """Yields (name, tensor) as the trainer broadcasts each bucket (the server side of /weights/update)."""
    for bucket in buckets:
        dtype = DTYPES[bucket[0][2]]
        flat = torch.empty(sum(torch.Size(shape).numel() for _, shape, _ in bucket), dtype=dtype, device=device)
        broadcast(group, flat)
        offset = 0
        for name, shape, _ in bucket:
            count = torch.Size(shape).numel()
            yield name, flat[offset : offset + count].view(shape)
            offset += count


class VLLMServerEngine(SamplingEngine):
    collective = True  # every process must take part: the main one speaks for all

    def __init__(self, host: str, port: int, timeout: float, *, model, tokenizer_fingerprint: str):
        self.url = f"http://{host}:{port}"
        self.host, self.timeout = host, timeout
        self.rank, self.world_size = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self._group = None
        self._store = None
        if self.rank == 0:
            self._check_server(self._wait_for_server(), model, tokenizer_fingerprint)

    # ------------------------------------------------------------------ HTTP

    def _request(self, path: str, payload: dict | None = None, timeout: float | None = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace").strip()
            raise GKDUserError(f"gkd-rollout at {self.url}{path}: {detail or error.reason}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            raise GKDUserError(f"gkd-rollout at {self.url} stopped answering ({reason})") from None

    def _wait_for_server(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    return json.loads(response.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as error:
                if time.monotonic() > deadline:
                    raise GKDUserError(
                        f"--vllm_server_port: no gkd-rollout server answers at {self.url} after "
                        f"{self.timeout:g} s ({getattr(error, 'reason', error)}); start one with "
                        f"`gkd-rollout --model STUDENT --port {self.url.rsplit(':', 1)[1]}` first"
                    ) from None
                time.sleep(1)

    def _check_server(self, health: dict, model, tokenizer_fingerprint: str) -> None:
        config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        served = f"the gkd-rollout server at {self.url} serves {health.get('model')}"
        if health.get("architectures") != list(config.architectures or []):
            raise GKDUserError(f"{served}, a {health.get('architectures')}, but the student is a {config.architectures}")
        if health.get("tokenizer") != tokenizer_fingerprint:
            raise GKDUserError(f"{served}, whose tokenizer's vocabulary differs from the student's")
        if health.get("weights") != weights_signature(checkpoint_shapes(model)):
            raise GKDUserError(f"{served}, whose weight names or shapes differ from the student's")

    # ------------------------------------------------------------------ weights

    def sync_weights(self, model) -> None:
        if self.rank != 0:  # data-parallel copies hold the same weights: the main process sends them
            return
        if self._group is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            port = self._request("/weights/connect", {"backend": backend})["port"]
            self._store = weight_store(self.host, port, False, self.timeout)
            self._group = join_weight_group(self._store, 0, self.timeout, backend)
            self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        buckets = plan_buckets(checkpoint_shapes(model))
        # The server receives while this process sends: the request waits in a thread meanwhile.
        reply, failure = {}, []

        def post():
            try:
                reply.update(self._request("/weights/update", {"buckets": buckets}))
            except GKDUserError as error:
                failure.append(error)

        request = threading.Thread(target=post, daemon=True)
        request.start()
        weights = checkpoint_weights(model)  # one bucket's worth at a time (LoRA merges make new tensors)
        for bucket in buckets:
            tensors = [next(weights)[1].reshape(-1) for _ in bucket]
            broadcast(self._group, torch.cat(tensors).to(self._device))
        request.join()
        if failure:
            raise failure[0]

    # ------------------------------------------------------------------ sampling

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[int]]:
        seeds = prompt_seeds(settings.seed, len(prompts))
        if self.world_size == 1:
            return self._generate(prompts, seeds, settings)
        everyone = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, (prompts, seeds))
        handed_back = [None]
        if self.rank == 0:
            all_prompts = [prompt for rank_prompts, _ in everyone for prompt in rank_prompts]
            all_seeds = [seed for _, rank_seeds in everyone for seed in rank_seeds]
            completions = self._generate(all_prompts, all_seeds, settings)
            handed_back = [[]]
            for rank_prompts, _ in everyone:
                handed_back[0].append(completions[: len(rank_prompts)])
                completions = completions[len(rank_prompts) :]
        torch.distributed.broadcast_object_list(handed_back, src=0)
        return handed_back[0][self.rank]

    def _generate(self, prompts, seeds, settings: SamplingSettings) -> list[list[int]]:
        if not prompts:
            return []
        payload = {"prompts": prompts, "seeds": seeds, "settings": dataclasses.asdict(settings)}
        return self._request("/generate", payload)["completions"]
