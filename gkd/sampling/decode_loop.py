"""gkd's own decode loop over a transformers model's forward and KV cache: what TransformersEngine samples
text prompts with.

Why not `generate`: at the batch sizes a training step samples (a few rows, tens of tokens), decoding is
latency-bound, and generate spends a share of each token in its own machinery (input preparation, cache
positions, stopping criteria, output bookkeeping), and keeps finished rows in the batch to the end. This
loop does only what gkd's sampling needs: one forward per token on the last position alone, the rows'
scores processed by transformers' own logits processors, each row's draw from its own generator, and
finished rows dropped from the batch (their cache rows too), so that a long completion does not drag the
short ones along. It takes 0.67-0.98x generate's time per call on a tiny 32000-row student
(scripts/bench_generation.py); most of what is left is the model itself.

It makes the same choices as generate with the same processors: greedy, the argmax of the processed
scores; sampling, the Gumbel-max draw whose noise comes from the row's generator, one draw over the
tokenizer's ids per generated token (RowGumbelNoise, which generate runs too; a finished row's later draws
are never used there). Tested token for token against generate under both.

Left to generate: prompts with pictures (families such as Qwen2-VL compute their own rope positions from
the pictures) and sharded models stepping with the other processes (synced_gpus).
"""

import inspect

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

# Cache layers (these exact types) whose whole state is keys and values per row, which finished rows can
# leave. Others, subclasses included (a hybrid model's linear-attention states, an indexer's, quantized
# ones), keep every row to the end, as generate does.
ROW_SELECTABLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


class RowGumbelNoise(LogitsProcessor):
    """Adds Gumbel(0, 1) noise to each row from that row's own generator (or the global one, unseeded): one
    draw of the row's first `width` scores per call (the vocabulary: the output layer's padding rows past it
    are -inf already, and a 32000-row layer around a small tokenizer would cost most of the draw), so row i's
    k-th token uses the k-th draw of seeds[i] alone."""

    def __init__(self, seeds: list[int] | None, device, width: int | None = None):
        self.width = width
        self.generators = None if seeds is None else [
            torch.Generator(device=device).manual_seed(seed) for seed in seeds
        ]

    def select(self, rows: list[int]) -> None:
        """Only these rows go on (the decode loop dropped the others from its batch)."""
        if self.generators is not None:
            self.generators = [self.generators[row] for row in rows]

    def __call__(self, input_ids, scores):
        width = min(self.width or scores.shape[1], scores.shape[1])
        if self.generators is None:
            uniform = torch.rand((scores.shape[0], width), device=scores.device)
        else:
            uniform = torch.stack([torch.rand(width, generator=generator, device=scores.device)
                                   for generator in self.generators])
        # u -> -log(-log u); u = 0 would give -inf (never chosen), so the floor only avoids log(0) warnings.
        scores[:, :width] += uniform.clamp_min_(torch.finfo(uniform.dtype).tiny).log_().neg_().log_().neg_()
        return scores


def left_padded(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded on the left: every prompt ends where generation starts."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


@torch.no_grad()
def decode(model, prompts: list[list[int]], *, max_new_tokens: int, stop_token_ids, pad_token_id: int,
           processors: LogitsProcessorList, noise: RowGumbelNoise | None = None) -> list[list[int]]:
    """One completion per prompt: up to max_new_tokens ids, ending at the first stop id (kept). processors:
    what shapes each step's scores before the choice (vocabulary, temperature, top-k, top-p); noise: to
    sample (Gumbel-max) rather than take the argmax."""
    device = next(model.parameters()).device
    input_ids, attention_mask = (tensor.to(device) for tensor in left_padded(prompts, pad_token_id))
    # Positions count the prompt's own tokens, as generate computes them (padding gets 1; it is masked).
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill_(attention_mask == 0, 1)
    stop = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    # Only the last position's logits: a prompt's others would cost a vocabulary-wide projection each.
    forward_parameters = _forward_parameters(model)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters else {}

    cache = DynamicCache(config=model.config)
    # transformers 5.24 renamed the forward's past_key_values to cache (the old name goes in 5.40)
    with_cache = {"cache" if "cache" in forward_parameters else "past_key_values": cache, "use_cache": True}
    rows = torch.arange(len(prompts), device=device)  # the prompt each batch row belongs to
    completions = [[] for _ in prompts]
    history = input_ids  # what the processors see (none of transformers' warpers used here reads it)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **with_cache,
                   **last_only).logits[:, -1]
    selectable = all(type(layer) in ROW_SELECTABLE_LAYERS for layer in cache.layers)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # rows finished but kept in the batch
    for step in range(max_new_tokens):
        scores = processors(history, logits.float())
        tokens = (scores if noise is None else noise(history, scores)).argmax(-1)
        for row, token, finished in zip(rows.tolist(), tokens.tolist(), done.tolist()):
            if not finished:
                completions[row].append(token)
        going = ~torch.isin(tokens, stop) & ~done
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all() and selectable:  # finished rows leave the batch, and their cache rows with them
            kept = going.nonzero().squeeze(-1)
            cache.batch_select_indices(kept)
            rows, tokens, attention_mask, position_ids = rows[kept], tokens[kept], attention_mask[kept], \
                position_ids[kept]
            done = done[kept]
            if noise is not None:
                noise.select(kept.tolist())
        elif not going.all():
            done = ~going
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(rows), 1))], dim=1)
        position_ids = position_ids[:, -1:] + 1
        history = tokens[:, None]
        logits = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=position_ids,
                       **with_cache).logits[:, -1]
    return completions


def _forward_parameters(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft passes them through
    return inspect.signature(base.forward).parameters
