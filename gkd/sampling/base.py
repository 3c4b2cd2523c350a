"""The sampling-engine interface: prompts in, completion token ids out.

The trainer only talks to this interface, so an engine (transformers `generate`, vLLM in-process or
behind a server) can be swapped without touching the trainer.
"""

import abc
import hashlib
from dataclasses import dataclass


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings; the same on every process and every run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def prompt_seeds(seed: int | None, count: int) -> list[int | None]:
    """One seed per prompt, so that a prompt's completion does not depend on which prompts share its call."""
    return [None if seed is None else derive_seed(seed, index) for index in range(count)]


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None  # None: off
    top_p: float | None = None  # None: off
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # same seed, same prompts, same weights: same completions


class SamplingEngine(abc.ABC):
    # True when every process must call generate and sync_weights together, even with no prompts of its
    # own (an engine that gathers all processes' prompts to one server).
    collective = False

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[int]]:
        """One completion per prompt, ending at (and including) its first stop token when it has one."""

    def sync_weights(self, model) -> None:
        """Load `model`'s current weights into the engine, so that it samples from the model being trained.

        Engines that sample from the training model itself have nothing to do.
        """

    def idle(self) -> None:
        """No more generation until the weights change: an engine may release memory until then."""
