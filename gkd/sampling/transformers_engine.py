"""Sampling with transformers `generate` (KV cache on), straight from the model being trained.

generate() draws one random stream for the whole batch (torch.multinomial), so a row's sample would depend
on its neighbours. Instead generate runs greedy over scores that already carry each row's own randomness:
the sampling warpers (temperature, top-k, top-p, as transformers orders them), then Gumbel noise drawn from
a generator seeded with that row's seed. argmax(scores + Gumbel noise) is an exact sample from
softmax(scores) (the Gumbel-max trick), and row i's noise depends on seeds[i] alone.

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
from gkd.sharding.base import ModelSharding, Replicated
from gkd.tokenize import cut_at_stop


class KeepVocabulary(LogitsProcessor):
    """Ids at and past vocab_size (the output layer's padding rows), and the suppressed ids, can never be
    chosen."""

    def __init__(self, vocab_size: int | None, suppressed_token_ids=()):
        self.vocab_size, self.suppressed_token_ids = vocab_size, list(suppressed_token_ids)

    def __call__(self, input_ids, scores):
        banned = torch.tensor(self.suppressed_token_ids, dtype=torch.long, device=scores.device)
        if self.vocab_size is not None:
            banned = torch.cat([banned, torch.arange(self.vocab_size, scores.shape[1], device=scores.device)])
        return scores.index_fill_(1, banned, -torch.inf)


class RowGumbelNoise(LogitsProcessor):
    """Adds Gumbel(0, 1) noise to each row from that row's own generator (or the global one, unseeded)."""

    def __init__(self, seeds: list[int] | None, device):
        self.generators = None if seeds is None else [
            torch.Generator(device=device).manual_seed(seed) for seed in seeds
        ]

    def __call__(self, input_ids, scores):
        if self.generators is None:
            uniform = torch.rand(scores.shape, device=scores.device)
        else:
            uniform = torch.stack([torch.rand(scores.shape[1], generator=generator, device=scores.device)
                                   for generator in self.generators])
        # u -> -log(-log u); u = 0 would give -inf (never chosen), so the floor only avoids log(0) warnings.
        return scores + uniform.clamp_min_(torch.finfo(uniform.dtype).tiny).log_().neg_().log_().neg_()


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
        # defaults (top_k=50, say) are then never applied. generate() fills every field left None from the
        # model's own generation_config, so each control that also acts under greedy decoding is set, off.
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,
            temperature=1.0,
            top_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            eos_token_id=list(settings.stop_token_ids) or None,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )

    def _processors(self, settings: SamplingSettings, seeds, device) -> LogitsProcessorList:
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
            processors.append(RowGumbelNoise(seeds, device))
        return processors

    @torch.no_grad()
    def _generate_batch(self, prompts, seeds, settings: SamplingSettings, images=None,
                        **generate_options) -> list[list[int]]:
        device = next(self.model.parameters()).device
        if images and any(images):  # the prompts' image tokens read these pictures
            generate_options.update({name: tensor.to(device)
                                     for name, tensor in pixel_inputs(self.processor, images).items()})
        width = max(len(prompt) for prompt in prompts)
        # Left padding, so that every prompt ends where generation starts.
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        output = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            generation_config=self._generation_config(settings),
            logits_processor=self._processors(settings, seeds, device), **generate_options,
        )
        return output[:, width:].tolist()

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
                        # explicitly off: transformers turns it on by itself for ZeRO-3 and FSDP models
                        completions += self._generate_batch(prompts[start : start + batch_size], batch_seeds,
                                                            settings, batch_images, synced_gpus=False)
        finally:
            self.model.train(was_training)
        return [cut_at_stop(completion, settings.stop_token_ids) for completion in completions]

    def _generate_synced(self, prompts, seeds, settings: SamplingSettings, images=None) -> list[list[int]]:
        """Sharded weights: one generate call, stepping with the other processes until all are done."""
        if not prompts:  # a stand-in, so that this process runs the forwards the others need
            self._generate_batch([[self.pad_token_id]], [0], settings, synced_gpus=True)
            return []
        return self._generate_batch(prompts, seeds, settings, images, synced_gpus=True)
