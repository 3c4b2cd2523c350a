"""Sampling straight from the model being trained: gkd's decode loop over its forward and KV cache
(gkd/sampling/decode_loop.py) for text prompts, transformers `generate` for prompts with pictures and for
sharded models stepping together.

Both draw a row's sample from that row's randomness alone (generate's own sampling draws one random stream
for the whole batch, torch.multinomial, so a row's sample would depend on its neighbours): the sampling
warpers (temperature, top-k, top-p, as transformers orders them), then Gumbel noise drawn from a generator
seeded with that row's seed, then the argmax. argmax(scores + Gumbel noise) is an exact sample from
softmax(scores) (the Gumbel-max trick).

A sharded model (gkd/sharding) generates with its whole weights gathered once, or, synced, with its
weights sharded: then every process makes one generate call that runs until all processes are done
(transformers' synced_gpus), on a stand-in prompt when it has none of its own.
"""

import contextlib

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from gkd.images import pixel_inputs
from gkd.sampling.base import SamplingEngine, SamplingSettings
from gkd.sampling.decode_loop import RowGumbelNoise, decode, left_padded
from gkd.sharding.base import ModelSharding, Replicated
from gkd.tokenize import cut_at_stop


# generate() fills each field a GenerationConfig leaves unset from the checkpoint's generation_config, whose
# controls (suppress_tokens, bad_words_ids, forced_eos_token_id, repetition_penalty, stop_strings, ...) would
# then shape or stop this path's samples alone: the decode loop and vLLM (generation_config="vllm") apply
# none. Keywords to generate() are applied after that filling, so these turn every one of them off.
CHECKPOINT_CONTROLS_OFF = dict(
    guidance_scale=None, sequence_bias=None, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, bad_words_ids=None, min_length=0, min_new_tokens=0,
    forced_bos_token_id=None, forced_eos_token_id=None, remove_invalid_values=False,
    exponential_decay_length_penalty=None, suppress_tokens=None, begin_suppress_tokens=None,
    watermarking_config=None, renormalize_logits=False, stop_strings=None, max_time=None,
)


class KeepVocabulary(LogitsProcessor):
    """Ids at and past vocab_size (the output layer's padding rows), and the suppressed ids, can never be
    chosen."""

    def __init__(self, vocab_size: int | None, suppressed_token_ids=()):
        self.vocab_size, self.suppressed_token_ids = vocab_size, list(suppressed_token_ids)

    def __call__(self, input_ids, scores):
        if self.vocab_size is not None:
            scores[:, self.vocab_size :] = -torch.inf  # a slice: no index list as long as the padding
        if self.suppressed_token_ids:
            banned = torch.tensor(self.suppressed_token_ids, dtype=torch.long, device=scores.device)
            scores.index_fill_(1, banned, -torch.inf)
        return scores


class TransformersEngine(SamplingEngine):
    def __init__(self, model, pad_token_id: int, max_batch_size: int | None = None, autocast=contextlib.nullcontext,
                 sharding: ModelSharding | None = None, processor=None):
        """autocast: a context manager factory generation runs under (the trainer's mixed precision);
        sharding: how the model is spread over the processes (default: whole in this one); processor: a
        vision-language model's, which turns the prompts' images into its image inputs."""
        self.model = model
        self.processor = processor
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.autocast = autocast
        self.sharding = sharding or Replicated()

    @property
    def collective(self) -> bool:
        return self.sharding.collective

    def _generation_config(self, settings: SamplingSettings) -> GenerationConfig:
        # Always greedy over the processors' scores (see the module docstring): the checkpoint's sampling
        # defaults (top_k=50, say) are then never applied.
        return GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0,
                                eos_token_id=list(settings.stop_token_ids) or None, pad_token_id=self.pad_token_id,
                                use_cache=True)

    @staticmethod
    def _warpers(settings: SamplingSettings) -> LogitsProcessorList:
        """What shapes a step's scores before the choice: the vocabulary, then the sampling warpers."""
        processors = LogitsProcessorList()
        if settings.vocab_size is not None or settings.suppressed_token_ids:
            processors.append(KeepVocabulary(settings.vocab_size, settings.suppressed_token_ids))
        if settings.temperature > 0:
            if settings.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k:
                processors.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p is not None and settings.top_p < 1.0:
                processors.append(TopPLogitsWarper(settings.top_p))
        return processors

    @torch.no_grad()
    def _generate_batch(self, prompts, seeds, settings: SamplingSettings, images=None,
                        synced_gpus: bool = False) -> list[list[int]]:
        device = next(self.model.parameters()).device
        noise = RowGumbelNoise(seeds, device, settings.vocab_size) if settings.temperature > 0 else None
        if images and any(images) or synced_gpus:
            return self._transformers_generate(prompts, settings, self._warpers(settings) + ([noise] if noise else []),
                                               images, synced_gpus, device)
        return decode(self.model, prompts, max_new_tokens=settings.max_new_tokens,
                      stop_token_ids=settings.stop_token_ids, pad_token_id=self.pad_token_id,
                      processors=self._warpers(settings), noise=noise)

    def _transformers_generate(self, prompts, settings: SamplingSettings, processors: LogitsProcessorList, images,
                               synced_gpus: bool, device) -> list[list[int]]:
        options = {"synced_gpus": synced_gpus}  # explicitly: transformers turns it on by itself for ZeRO-3, FSDP
        if images and any(images):  # the prompts' image tokens read these pictures
            options.update({name: tensor.to(device) for name, tensor in pixel_inputs(self.processor, images).items()})
        input_ids, attention_mask = left_padded(prompts, self.pad_token_id)
        output = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            generation_config=self._generation_config(settings), logits_processor=processors,
            **CHECKPOINT_CONTROLS_OFF, **options,
        )
        return output[:, input_ids.shape[1] :].tolist()

    def generate(self, prompts: list[list[int]], settings: SamplingSettings,
                 seeds: list[int] | None = None, images: list[list[str]] | None = None) -> list[list[int]]:
        """images (vision-language models): per prompt, the references of the pictures its image tokens stand
        for (gkd.images)."""
        if not prompts and not self.collective:
            return []
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        was_training = self.model.training
        self.model.eval()
        completions = []
        try:
            with self.autocast(), self.sharding.generating():
                if self.sharding.synced:
                    completions = self._generate_synced(prompts, seeds, settings, images)
                else:
                    batch_size = self.max_batch_size or max(len(prompts), 1)
                    for start in range(0, len(prompts), batch_size):
                        batch_seeds = None if seeds is None else seeds[start : start + batch_size]
                        batch_images = None if images is None else images[start : start + batch_size]
                        completions += self._generate_batch(prompts[start : start + batch_size], batch_seeds,
                                                            settings, batch_images)
        finally:
            self.model.train(was_training)
        return [cut_at_stop(completion, settings.stop_token_ids) for completion in completions]

    def _generate_synced(self, prompts, seeds, settings: SamplingSettings, images=None) -> list[list[int]]:
        """Sharded weights: one generate call, stepping with the other processes until all are done."""
        if not prompts:  # a stand-in, so that this process runs the forwards the others need
            self._generate_batch([[self.pad_token_id]], [0], settings, synced_gpus=True)
            return []
        return self._generate_batch(prompts, seeds, settings, images, synced_gpus=True)
