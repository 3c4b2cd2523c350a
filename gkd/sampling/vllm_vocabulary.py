"""KeepVocabulary: a vLLM logits processor that gives -inf to every id at or past a request's vocabulary
size (SamplingSettings.vocab_size, carried in SamplingParams.extra_args), so that the output layer's
padding rows are never sampled. vLLM loads it by name in its engine process; it imports vLLM, so only
engines import it.

Why not SamplingParams.allowed_token_ids: every request would carry the list of all allowed ids (151,665
for Qwen2.5), validated one by one, copied and shipped to the engine core with each request, and vLLM's
V2 model runner (its default on GPUs) refuses more than 1024 of them. logit_bias is capped at 1024 ids
there too, and clamped to +-100, which does not rule an id out. Here a request carries one integer, and
a step costs one fill over the padding columns.

vLLM's two model runners call logits processors through different interfaces: V1 (on CPUs) by batch row,
V2 (GPUs) by request slot. This class implements both; each runner builds it and calls it through its own.
"""

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from gkd.sampling.vllm_engine import VOCAB_SIZE_ARGUMENT

NO_LIMIT = np.iinfo(np.int64).max


def vocabulary_size(params) -> int | None:
    return (params.extra_args or {}).get(VOCAB_SIZE_ARGUMENT)


class KeepVocabulary(V1LogitsProcessor, V2LogitsProcessor):
    def __init__(self, vllm_config, *runner_state):
        # V1 builds it with (device, is_pin_memory), V2 with (request state).
        self.limits_by_row: dict[int, int] = {}  # V1: batch row -> vocabulary size
        if len(runner_state) == 1:
            requests = runner_state[0]
            self.limits_by_slot = np.full(requests.max_num_reqs, NO_LIMIT, dtype=np.int64)
            self.device_limits = torch.tensor(self.limits_by_slot, device=requests.device)
            self.changed = False

    @classmethod
    def validate_params(cls, params) -> None:
        size = vocabulary_size(params)
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"{VOCAB_SIZE_ARGUMENT} must be a positive integer, not {size!r}")

    def apply(self, logits: torch.Tensor, ctx: LogitsContext | None = None) -> torch.Tensor:
        return self._apply_by_row(logits) if ctx is None else self._apply_by_slot(logits, ctx)

    # ---------------------------------------------------------------- V1: rows of a persistent batch

    def is_argmax_invariant(self) -> bool:
        return False  # it changes greedy choices too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        rows = self.limits_by_row
        for row in batch_update.removed:
            rows.pop(row, None)
        for row, params, _, _ in batch_update.added:
            rows.pop(row, None)
            if vocabulary_size(params) is not None:
                rows[row] = vocabulary_size(params)
        for source, target, direction in batch_update.moved:
            moving, displaced = rows.pop(source, None), rows.pop(target, None)
            if moving is not None:
                rows[target] = moving
            if direction == MoveDirectionality.SWAP and displaced is not None:
                rows[source] = displaced

    def _apply_by_row(self, logits: torch.Tensor) -> torch.Tensor:
        for size in set(self.limits_by_row.values()):
            rows = [row for row, limit in self.limits_by_row.items() if limit == size]
            logits[torch.tensor(rows, device=logits.device), size:] = -torch.inf
        return logits

    # ---------------------------------------------------------------- V2: request slots

    def add_request(self, req_idx: int, params) -> bool:
        size = vocabulary_size(params)
        self.limits_by_slot[req_idx] = NO_LIMIT if size is None else size
        self.changed = True
        return size is not None

    def apply_staged_writes(self) -> None:
        if self.changed:
            self.device_limits.copy_(torch.from_numpy(self.limits_by_slot))
            self.changed = False

    def _apply_by_slot(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if (self.limits_by_slot[ctx.idx_mapping_np] >= logits.shape[1]).all():
            return logits  # no request in this batch has padding columns to remove
        limits = self.device_limits[ctx.expanded_idx_mapping.long()]  # one per logits row
        columns = torch.arange(logits.shape[1], device=logits.device)
        return logits.masked_fill_(columns >= limits[:, None], -torch.inf)
