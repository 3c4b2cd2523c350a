"""The sampling-engine interface: prompts and one seed per prompt in, completion token ids out.

The trainer only talks to this interface, so an engine (transformers `generate`, vLLM in-process or
behind a server) can be swapped without touching the trainer.

Reproducibility contract: a completion is a function of (prompt, its seed, the weights) alone. Which
other prompts share the call, how many processes run, and how a step is split into micro-batches must
not change it (up to float rounding), so every engine draws each prompt's randomness from that prompt's
own seed.
"""

import abc
import hashlib
from collections.abc import Callable
from dataclasses import dataclass


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings; the same on every process and every run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None  # None: off
    top_p: float | None = None  # None: off
    stop_token_ids: tuple[int, ...] = ()
    # Only ids below this are ever sampled: len(tokenizer). Models pad their output layer past the
    # tokenizer (Qwen2.5-7B: 152064 rows around 151665 tokens); a padding id means nothing and is past
    # the end of a smaller model's embedding. None: every row of the model's output layer.
    vocab_size: int | None = None
    # Ids never sampled although in the tokenizer: a vision-language model's image placeholder (one drawn
    # into a completion would stand for a picture that is not there, and the next forward would fail).
    suppressed_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("stop_token_ids", "suppressed_token_ids"):  # (lists when they come back from JSON)
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.top_k is not None and self.top_k <= 0:  # -1 and 0 mean off, as in ms-swift and vLLM
            object.__setattr__(self, "top_k", None)


class SamplingEngine(abc.ABC):
    # True when every process must call generate and sync_weights together, even with no prompts of its
    # own (an engine that gathers all processes' prompts to one server).
    collective = False
    # True when `submit` returns at once and the engine samples apart from the training processes (a gkd-rollout
    # server), so that sampling overlaps the training step (--async_generate).
    background = False

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], settings: SamplingSettings,
                 seeds: list[int] | None = None, images: list[list[str]] | None = None) -> list[list[int]]:
        """One completion per prompt, ending at (and including) its first stop token when it has one.

        seeds: one per prompt; prompt i's random draws come from seeds[i] alone. None: unseeded.
        images (vision-language models): per prompt, the references (gkd.images) of the pictures its image
        tokens stand for, as the model's processor expanded them; None: text prompts.
        """

    def submit(self, prompts: list[list[int]], settings: SamplingSettings, seeds: list[int] | None = None,
               images: list[list[str]] | None = None) -> Callable[[], list[list[int]]]:
        """generate's completions, started now and collected by calling what this returns (with the same
        processes taking part as in generate). The weights are those of the moment of the call. This engine
        generates here and now; a background engine returns at once and samples meanwhile."""
        completions = self.generate(prompts, settings, seeds, **({"images": images} if images else {}))
        return lambda: completions

    def sync_weights(self, model, sharding=None) -> None:
        """Load `model`'s current weights into the engine, so that it samples from the model being trained.
        sharding (gkd.sharding.ModelSharding): how the model is spread over the processes; when it is
        sharded, every process calls this together.

        Engines that sample from the training model itself have nothing to do.
        """

    def idle(self) -> None:
        """No more generation until the weights change: an engine may release memory until then."""
