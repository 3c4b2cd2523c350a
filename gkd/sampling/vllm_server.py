"""Sampling through a gkd-rollout server (vLLM in its own process, on its own GPUs).

The protocol, JSON over HTTP; every request carries `Authorization: Bearer TOKEN`, the token gkd-rollout
was started with (GKD_ROLLOUT_TOKEN in both environments), and is refused without it:
- GET  /health           what the server serves: model, architecture, vocabulary, weight names and shapes;
- POST /generate         {"prompts": [[token ids]], "seeds": [seed or null], "settings": {...}, and for
                         prompts with pictures "images": [[reference]] (gkd.images: paths, URLs, data URLs,
                         which the server opens: a path must be readable there)}
                         -> {"completions": [[token ids]]};
- POST /weights/connect  -> {"port": P, "nonce": N}: the server opens a two-member process group (rank 1)
                         whose store listens on P, where the HTTP server listens; the trainer joins it as
                         rank 0 and first broadcasts HMAC-SHA256(token, N), or the server leaves the group;
- POST /weights/update   {"buckets": [[[name, shape, dtype], ...], ...]}: the server receives each bucket,
                         one flat tensor per bucket, by broadcast from rank 0 and loads the weights.
Weights never travel through HTTP: only their names (as in the checkpoint) and shapes do.

With several training processes only the main one talks to the server: every process hands its prompts
(and their seeds) to it, it sends them in one request and hands each process its completions back (or
the server's refusal, which every process then raises). The request waits in a thread, so that with
--async_generate the server samples the next step while this one trains.
"""

import dataclasses
import hashlib
import hmac
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import timedelta

import torch

from gkd.errors import GKDUserError
from gkd.sampling.base import SamplingEngine, SamplingSettings
from gkd.sampling.vllm_engine import checkpoint_shapes, checkpoint_weights

BUCKET_BYTES = 512 * 2**20  # weights are sent in flat buckets of about this size, one broadcast each
DTYPES = {str(dtype): dtype for dtype in (torch.float32, torch.bfloat16, torch.float16)}
TOKEN_VARIABLE = "GKD_ROLLOUT_TOKEN"  # the shared secret, in gkd-rollout's and gkd-train's environments


def weights_signature(shapes) -> list[list]:
    """What must agree between the student and the served model: each weight's name and shape."""
    return sorted([name, list(shape)] for name, shape, *_ in shapes)


def weight_store(host: str, port: int, is_server: bool, timeout_seconds: float):
    """The rendezvous of the weight group: the server listens on host (port 0: any free one), the trainer
    connects. TCPStore's own server socket would listen on every interface whatever the host, so the
    server's socket is bound here, to host alone, and handed over (TCPStore closes it when done)."""
    timeout = timedelta(seconds=timeout_seconds)
    if not is_server:
        return torch.distributed.TCPStore(host, port, 2, is_master=False, timeout=timeout)
    listener = socket.create_server((host, port), family=socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0])
    return torch.distributed.TCPStore(host, listener.getsockname()[1], 2, is_master=True, timeout=timeout,
                                      wait_for_workers=False, master_listen_fd=listener.detach())


def join_weight_group(store, rank: int, timeout_seconds: float, backend: str, nonce: str, host: str | None = None):
    """The two-member process group (trainer rank 0, server rank 1) that carries weights, built from its
    own store (its keys under the connection's nonce), apart from any default group that training or
    vLLM set up. host: the address gloo's transport listens on; None, or a wildcard that a peer could not
    connect to: the one the machine's name resolves to."""
    prefix_store = torch.distributed.PrefixStore(f"gkd-weights/{nonce}", store)
    timeout = timedelta(seconds=timeout_seconds)
    if backend == "nccl":
        return torch.distributed.ProcessGroupNCCL(prefix_store, rank, 2)
    if host is None or host in ("", "0.0.0.0", "::"):
        return torch.distributed.ProcessGroupGloo(prefix_store, rank, 2, timeout)
    options = torch.distributed.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [torch.distributed.ProcessGroupGloo.create_device(hostname=host)]
    return torch.distributed.ProcessGroupGloo(prefix_store, rank, 2, options)


def token_proof(token: str, nonce: str) -> torch.Tensor:
    """What the trainer broadcasts first through a new weight group, to show it holds the token without
    sending it: HMAC-SHA256(token, nonce), 32 bytes."""
    return torch.tensor(list(hmac.digest(token.encode(), nonce.encode(), hashlib.sha256)), dtype=torch.uint8)


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
    background = True  # the server samples in its own processes while the trainer trains

    def __init__(self, host: str, port: int, timeout: float, *, model, tokenizer_fingerprint: str,
                 token: str | None = None):
        self.url = f"http://{host}:{port}"
        self.host, self.timeout = host, timeout
        self.token = os.environ.get(TOKEN_VARIABLE, "") if token is None else token
        self.rank, self.world_size = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self._group = None
        self._store = None
        if self.rank == 0:
            self._check_server(self._wait_for_server(), model, tokenizer_fingerprint)

    # ------------------------------------------------------------------ HTTP

    def _open(self, path: str, payload: dict | None = None, timeout: float | None = None) -> dict:
        """The server's JSON answer; GKDUserError when it refuses the request (no retry would help)."""
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"}
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace").strip()
            raise GKDUserError(f"gkd-rollout at {self.url}{path}: {detail or error.reason}") from None

    def _request(self, path: str, payload: dict | None = None, timeout: float | None = None) -> dict:
        try:
            return self._open(path, payload, timeout)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            raise GKDUserError(f"gkd-rollout at {self.url} stopped answering ({reason})") from None

    def _wait_for_server(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self._open("/health", timeout=5)
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

    def _connect(self) -> None:
        """Joins the server's weight group, then proves to the server that this member holds the token."""
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        reply = self._request("/weights/connect", {"backend": backend})
        self._store = weight_store(self.host, reply["port"], False, self.timeout)
        self._group = join_weight_group(self._store, 0, self.timeout, backend, reply["nonce"])
        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        broadcast(self._group, token_proof(self.token, reply["nonce"]).to(self._device))

    def sync_weights(self, model, sharding=None) -> None:
        if self.rank != 0:  # data-parallel copies hold the same weights: the main process sends them
            if sharding is not None and sharding.collective:  # its reads gather this process's shards too
                for _ in checkpoint_weights(model, sharding):
                    pass
            return
        if self._group is None:
            self._connect()
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
        weights = checkpoint_weights(model, sharding)  # one block's worth at a time (conversions, LoRA merges: new tensors)
        for bucket in buckets:
            tensors = []
            for name, _, _ in bucket:
                sent_name, tensor = next(weights)
                assert sent_name == name, (sent_name, name)  # checkpoint_weights follows checkpoint_shapes
                tensors.append(tensor.reshape(-1))
            broadcast(self._group, torch.cat(tensors).to(self._device))
        request.join()
        if failure:
            raise failure[0]

    # ------------------------------------------------------------------ sampling

    def generate(self, prompts: list[list[int]], settings: SamplingSettings,
                 seeds: list[int] | None = None, images: list[list[str]] | None = None) -> list[list[int]]:
        return self.submit(prompts, settings, seeds, images)()

    def submit(self, prompts: list[list[int]], settings: SamplingSettings, seeds: list[int] | None = None,
               images: list[list[str]] | None = None) -> Callable[[], list[list[int]]]:
        """The request goes out in a thread of the main process, which returns at once: the server samples
        while the caller trains. The processes' collectives (handing prompts to the main process and
        completions back) run here and in the returned function, in the caller's thread, never beside the
        training step's own."""
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        seeds = seeds or [None] * len(prompts)
        images = images or [[] for _ in prompts]
        # Only the main process sends: the others' prompts (and pictures, possibly base64) go to it alone.
        everyone = [(prompts, seeds, images)]
        if self.world_size > 1:
            everyone = [None] * self.world_size if self.rank == 0 else None
            torch.distributed.gather_object((prompts, seeds, images), everyone, dst=0)
        answer = {}
        if self.rank == 0:
            def send():
                try:
                    answer["completions"] = self._generate(*(sum((rank_lists[part] for rank_lists in everyone), [])
                                                             for part in range(3)), settings)
                except Exception as error:  # raised where the caller collects, not lost in the thread
                    answer["error"] = error

            request = threading.Thread(target=send, daemon=True)
            request.start()

        def collect() -> list[list[int]]:
            handed_back = [None]  # per process its completions, or the main process's error for all to raise
            if self.rank == 0:
                request.join()
                if "error" in answer:
                    handed_back = [str(answer["error"])]
                else:
                    completions, handed_back = answer["completions"], [[]]
                    for rank_prompts, _, _ in everyone:
                        handed_back[0].append(completions[: len(rank_prompts)])
                        completions = completions[len(rank_prompts) :]
            if self.world_size > 1:
                torch.distributed.broadcast_object_list(handed_back, src=0)
            if self.rank == 0 and "error" in answer:
                raise answer["error"]
            if isinstance(handed_back[0], str):
                raise GKDUserError(f"the main process's request to gkd-rollout failed: {handed_back[0]}")
            return handed_back[0][self.rank]

        return collect

    def _generate(self, prompts, seeds, images, settings: SamplingSettings) -> list[list[int]]:
        if not prompts:
            return []
        payload = {"prompts": prompts, "seeds": seeds, "settings": dataclasses.asdict(settings),
                   **({"images": images} if any(images) else {})}
        return self._request("/generate", payload)["completions"]
