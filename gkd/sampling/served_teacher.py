"""seq_kd with a served teacher: the teacher's completions from the same vLLM OpenAI server that gives its
log-probabilities (gkd/teachers/served.py), through /v1/completions with token ids in and out.

Every sampling setting is sent, so that none of the server's defaults (which vLLM reads from the model's
generation config) applies: temperature, top-k, top-p, no min-p, no repetition penalty, the prompt's own
seed, and gkd's stop ids with the model's own end-of-sequence ignored, as gkd's in-process vLLM engine
samples. The server cannot be told to keep its draws inside the tokenizer (the engines in process mask the
output layer's padding rows); a padding id drawn there stops the run at the batch with one line naming it.
"""

from concurrent.futures import ThreadPoolExecutor

from gkd.errors import GKDUserError
from gkd.sampling.base import SamplingEngine, SamplingSettings
from gkd.tokenize import cut_at_stop


class ServedTeacherEngine(SamplingEngine):
    def __init__(self, server):
        """server: gkd.teachers.served's client of one server (its request with retries, its model)."""
        self.server = server

    def _body(self, prompt: list[int], settings: SamplingSettings, seed: int | None) -> dict:
        sample = settings.temperature > 0
        return {"model": self.server.served_model, "prompt": prompt, "n": 1, "max_tokens": settings.max_new_tokens,
                "temperature": settings.temperature if sample else 0.0,
                "top_k": (settings.top_k or -1) if sample else -1, "top_p": (settings.top_p or 1.0) if sample else 1.0,
                "min_p": 0.0, "repetition_penalty": 1.0, "seed": seed, "stop_token_ids": list(settings.stop_token_ids),
                "ignore_eos": True, "skip_special_tokens": False, "return_token_ids": True}

    def _complete(self, prompt: list[int], settings: SamplingSettings, seed: int | None) -> list[int]:
        answer = self.server.request("/v1/completions", self._body(prompt, settings, seed))
        if "error" in answer:
            raise GKDUserError(f"{self.server.flag}: /v1/completions refused to sample a {len(prompt)}-token prompt "
                               f"({answer['error']})")
        choice = answer["choices"][0]
        if choice.get("token_ids") is None:
            raise GKDUserError(f"{self.server.flag}: the server answers without token ids (vLLM's return_token_ids, "
                               "in vLLM 0.10.2 and later), which seq_kd needs")
        return cut_at_stop(list(choice["token_ids"]), settings.stop_token_ids)

    def generate(self, prompts, settings, seeds=None):
        if not prompts:
            return []
        seeds = [None] * len(prompts) if seeds is None else seeds
        with ThreadPoolExecutor(max_workers=min(len(prompts), 16)) as pool:
            return list(pool.map(lambda prompt, seed: self._complete(prompt, settings, seed), prompts, seeds))
