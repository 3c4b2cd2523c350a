"""gkd-rollout: serve the student with vLLM to `gkd-train --use_vllm true --vllm_mode server`.

One request at a time (vLLM batches the prompts of each request itself). The protocol is described in
gkd/sampling/vllm_server.py; weights arrive through a torch.distributed group, never through HTTP.

Whoever can reach the server can replace the weights it samples from, so every request must carry the
token (GKD_ROLLOUT_TOKEN, or one made up and printed at start), the weight group's peer must prove it
holds it too, and everything listens on --host alone (127.0.0.1 by default).
"""

import hmac
import json
import logging
import os
import secrets
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch

from gkd.config.tools import parse_rollout_config
from gkd.errors import GKDUserError
from gkd.hub import resolve_model, use_hf_hub
from gkd.models import load_processor, load_tokenizer, tokenizer_fingerprint
from gkd.sampling.base import SamplingSettings
from gkd.sampling.vllm_engine import VLLMEngine, checkpoint_shapes
from gkd.sampling.vllm_server import (
    TOKEN_VARIABLE, broadcast, join_weight_group, receive_weights, token_proof, weight_store, weights_signature,
)

logger = logging.getLogger("gkd")


def describe_model(name: str, trust_remote_code: bool, vision_language: bool = False) -> dict:
    """What /health reports, for gkd-train to check it is about to train the model served here: its weights
    as a causal LM, or (vision_language) with its vision tower, as gkd-train loads it for rows with images."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    tokenizer = load_tokenizer(name, trust_remote_code)
    model_class, kind = (AutoModelForImageTextToText, "a vision-language model") if vision_language else \
        (AutoModelForCausalLM, "a causal LM")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        with torch.device("meta"):  # shapes only: nothing is allocated
            skeleton = model_class.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise GKDUserError(f"--model {name}: cannot read it as {kind} ({str(error).splitlines()[0]})") from None
    return {
        "status": "ok",
        "model": name,
        "architectures": list(config.architectures or []),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "weights": weights_signature(checkpoint_shapes(skeleton)),
    }


class Rollout:
    """The served engine, and the weight group once a trainer has connected."""

    def __init__(self, engine: VLLMEngine, health: dict, host: str, token: str, timeout_seconds: float = 600):
        self.engine, self.health, self.host, self.timeout_seconds = engine, health, host, timeout_seconds
        self.token = token
        self.group = self.store = None
        self.backend = "gloo"  # what the connected trainer asked for: gloo, or nccl between GPUs
        self.nonce = ""  # the pending connection's, which its peer's proof must be made with
        self.device = torch.device("cpu")
        self.expected_weights = {name: shape for name, shape in health["weights"]}

    def authorized(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self.token.encode())

    def generate(self, payload: dict) -> dict:
        settings = SamplingSettings(**payload["settings"])
        prompts, seeds = payload["prompts"], payload["seeds"]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        images = payload.get("images")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        return {"completions": self.engine.generate(prompts, settings, seeds, images=images)}

    def start_connect(self, payload: dict):
        """Open the store; the caller answers with its port and nonce, then calls finish_connect."""
        backend = payload.get("backend", "gloo")
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("the trainer asked for NCCL but this server has no GPU")
        self.group = None  # a new connection replaces the old one
        self.store = weight_store(self.host, 0, True, self.timeout_seconds)
        self.backend, self.nonce = backend, secrets.token_hex(16)
        return {"port": self.store.port, "nonce": self.nonce}

    def finish_connect(self):
        """Join the group as rank 1; keep it only if its other member proves it holds the token."""
        group = join_weight_group(self.store, 1, self.timeout_seconds, self.backend, self.nonce, self.host)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        proof = torch.zeros(32, dtype=torch.uint8, device=self.device)
        broadcast(group, proof)
        if torch.equal(proof.cpu(), token_proof(self.token, self.nonce)):
            self.group = group
        else:
            self.store = None
            logger.warning("gkd-rollout: refused a weight-group peer that does not hold the token")

    def update_weights(self, payload: dict) -> dict:
        if self.group is None:
            raise ValueError("no weight group: POST /weights/connect first")
        buckets = payload["buckets"]
        sent = {name: shape for bucket in buckets for name, shape, _ in bucket}
        if sent != self.expected_weights:
            wrong = sorted({(name, tuple(shape)) for name, shape in sent.items()}
                           ^ {(name, tuple(shape)) for name, shape in self.expected_weights.items()})
            raise ValueError(f"the weights sent differ from the served model's, first at {wrong[:1]}")
        self.engine.check_loadable(sent)
        self.engine.load_weights(receive_weights(self.group, buckets, self.device))
        return {"loaded": len(sent)}


class Handler(BaseHTTPRequestHandler):
    """Answers one request at a time (vLLM is not thread-safe), with the server's Rollout."""

    def _reply(self, status: int, body: dict | str):
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _authorized(self) -> bool:
        """Whether the request carries the server's token; if not, it is answered with a refusal."""
        if self.server.rollout.authorized(self.headers.get("Authorization", "").removeprefix("Bearer ")):
            return True
        self._reply(401, f"wrong or missing token: run gkd-train with {TOKEN_VARIABLE} set to gkd-rollout's token")
        return False

    def do_GET(self):
        if not self._authorized():
            return
        if self.path == "/health":
            self._reply(200, self.server.rollout.health)
        else:
            self._reply(404, f"no such endpoint: GET {self.path}")

    def do_POST(self):
        rollout = self.server.rollout
        if not self._authorized():
            # Nothing of an unauthorised body is read (it may be any size): the connection is closed after
            # the refusal, so the client sees the refusal or a reset, never a server that buffered it all.
            self.close_connection = True
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        routes = {"/generate": "generate", "/weights/connect": "start_connect", "/weights/update": "update_weights"}
        if self.path not in routes:
            self._reply(404, f"no such endpoint: POST {self.path}")
            return
        try:
            payload = json.loads(body or b"{}")
            result = getattr(rollout, routes[self.path])(payload)
        except GKDUserError as error:
            self._reply(400, str(error))
            return
        except (ValueError, KeyError, TypeError) as error:  # a bad request: say what, keep serving
            self._reply(400, f"{type(error).__name__}: {error}")
            return
        self._reply(200, result)
        if self.path == "/weights/connect":  # the trainer joins the group once it has the port and nonce
            rollout.finish_connect()

    def log_message(self, format, *args):
        logger.debug("%s %s", self.address_string(), format % args)


def serve(argv=None) -> None:
    args, engine_args = parse_rollout_config(argv)
    # A port in use should fail in a second, not after the engine has started. The server itself listens
    # only once the engine is up: until then a trainer's health check is refused, and retries.
    try:
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as error:
        raise GKDUserError(f"--port {args.port}: cannot listen on {args.host}:{args.port} ({error.strerror})") from None
    token = os.environ.get(TOKEN_VARIABLE)
    if not token:
        token = secrets.token_urlsafe(24)
        print(f"gkd-rollout: {TOKEN_VARIABLE} is not set; run gkd-train with {TOKEN_VARIABLE}={token}",
              file=sys.stderr, flush=True)
    args.model = resolve_model(args.model, use_hf=use_hf_hub(args.use_hf), revision=args.model_revision)
    # A vision-language model samples prompts with pictures too, its weights named as gkd-train loads it then.
    processor = load_processor(args.model, args.trust_remote_code)
    health = describe_model(args.model, args.trust_remote_code, vision_language=processor is not None)
    engine = VLLMEngine.from_arguments(args.model, engine_args, dtype=args.torch_dtype, seed=args.seed,
                                       trust_remote_code=args.trust_remote_code, flag="gkd-rollout",
                                       processor=processor)
    server = HTTPServer((args.host, args.port), Handler)
    server.rollout = Rollout(engine, health, args.host, token)
    print(f"gkd-rollout: serving {args.model} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def _stop(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    signal.signal(signal.SIGTERM, _stop)  # `kill` stops it as cleanly as Ctrl-C
    try:
        serve(argv)
    except GKDUserError as error:
        print(f"gkd-rollout: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gkd-rollout: stopped", file=sys.stderr)


if __name__ == "__main__":
    main()
