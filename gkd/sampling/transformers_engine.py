"""Sampling with transformers `generate` (KV cache on), straight from the model being trained."""

import torch
from transformers import GenerationConfig

from gkd.data import cut_at_stop
from gkd.sampling.base import SamplingEngine, SamplingSettings


class TransformersEngine(SamplingEngine):
    def __init__(self, model, pad_token_id: int, max_batch_size: int | None = None):
        self.model = model
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size

    def _generation_config(self, settings: SamplingSettings) -> GenerationConfig:
        sample = settings.temperature > 0
        # generate() fills every field left None from the model's own generation_config, so each sampling
        # control is set here, off when not asked for: the model's defaults (top_k=50, say) must not leak in.
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=sample,
            temperature=settings.temperature if sample else 1.0,
            top_k=(settings.top_k or 0) if sample else 0,
            top_p=(settings.top_p or 1.0) if sample else 1.0,
            min_p=0.0,
            typical_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
            eos_token_id=list(settings.stop_token_ids) or None,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )

    @torch.no_grad()
    def _generate_batch(self, prompts, generation_config) -> list[list[int]]:
        device = next(self.model.parameters()).device
        width = max(len(prompt) for prompt in prompts)
        # Left padding, so that every prompt ends where generation starts.
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        output = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=generation_config
        )
        return output[:, width:].tolist()

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[int]]:
        if not prompts:
            return []
        generation_config = self._generation_config(settings)
        batch_size = self.max_batch_size or len(prompts)
        was_training = self.model.training
        self.model.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            # A private RNG stream: seeded sampling repeats, and the training RNG (dropout, data order) is untouched.
            with torch.random.fork_rng(devices=devices, enabled=settings.seed is not None):
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                completions = []
                for start in range(0, len(prompts), batch_size):
                    completions += self._generate_batch(prompts[start : start + batch_size], generation_config)
        finally:
            self.model.train(was_training)
        return [cut_at_stop(completion, settings.stop_token_ids) for completion in completions]
