"""--padding_free and --packing: a micro-batch's rows run as ONE sequence, without padding.

Padding-free: the rows of a micro-batch (prompt + completion each) are concatenated into a single
sequence of batch size 1, `position_ids` restart at 0 at every row and no attention_mask is passed.
transformers 5 then keeps the rows invisible to each other: masking_utils.find_packed_sequence_indices
reads the row starts from position_ids and builds a block-diagonal causal mask for sdpa, eager and
flex_attention; flash_attention_2/3/4 read the same position_ids and run varlen (cu_seqlens), which
needs batch size 1 (modeling_flash_attention_utils._is_packed_sequence) - so one sequence per micro-batch,
for every implementation.

Packing (ms-swift's --packing, packing_strategy 'binpack'): before training, the examples are grouped
into bins of at most packing_length tokens (prompt + dataset completion) by best-fit decreasing; one
dataloader item is a bin, so per_device_train_batch_size counts bins; the collator flattens the bins of
a micro-batch back into rows, which then run padding-free as above: a micro-batch of B bins is ONE
sequence of all their rows (not B padded rows: flash attention's varlen path wants batch size 1, and
padding bins to the longest would bring padding back). Sources, generation and labels stay per row.
"""

from __future__ import annotations

import bisect

import torch

from gkd.data import collate_examples
from gkd.errors import GKDUserError

PACKED_KEY = "packed_examples"  # a bin: {"packed_examples": [example, ...]}

# The attention implementations that keep packed rows apart in transformers 5 (see the module docstring).
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3",
                     "flash_attention_4")


def check_padding_free(attn_implementation: str | None) -> str | None:
    """None when --padding_free / --packing can run with this --attn_impl, else the problem, in one line.
    None (transformers' default) picks sdpa where the model supports it, else eager: both can."""
    if attn_implementation is None:
        return None
    name = "flash_attention_2" if attn_implementation == "flash_attn" else attn_implementation
    if name in PACKING_ATTENTION:
        return None
    return (f"--padding_free/--packing: --attn_impl {attn_implementation} cannot keep the rows of a packed sequence "
            f"apart; use one of {', '.join(PACKING_ATTENTION)} (or leave --attn_impl unset)")


# ----------------------------------------------------------------------------- packing examples into bins


def example_length(example: dict) -> int:
    return len(example["prompt_ids"]) + len(example.get("completion_ids") or [])


def pack_examples(examples: list[dict], packing_length: int) -> list[dict]:
    """Group examples into bins of at most packing_length tokens (prompt + dataset completion); each bin is
    {"packed_examples": [example, ...]}, bins in the order they were opened, rows within a bin in dataset
    order. An example longer than packing_length gets a bin of its own.

    Strategy: best-fit decreasing. Examples go longest first (ties: dataset order), each into the open bin
    with the LEAST room that still fits it (ties: the bin opened first), else into a new bin. The open bins
    are a list sorted by (room, bin number), searched with bisect, so n examples cost O(n log n) comparisons
    (plus the list's memmove on insertion, a few thousand pointers); first fit scanned every bin per
    example, ~1e9 steps for 114k rows at 8192 tokens. ms-swift's packing_strategy 'binpack' calls the
    binpacking package's to_constant_volume, also a decreasing heuristic; the bins need not be the same as
    its, only as full: best-fit decreasing needs at most 11/9 of the optimal bin count (plus one) and, for
    many rows short next to packing_length, comes within a percent of the lower bound
    ceil(total tokens / packing_length).
    Deterministic: no randomness and no hashing, so the same examples give the same bins.

    The bound holds for the dataset's completions only: a completion generated during training (the
    student's, or the teacher's with --seq_kd) replaces the dataset's and may make its bin longer than
    packing_length (up to --max_completion_length per row). That is allowed: the bin only decides which
    rows share a micro-batch, and a padding-free sequence has no fixed width."""
    if not isinstance(packing_length, int) or isinstance(packing_length, bool) or packing_length < 1:
        raise GKDUserError(f"--packing_length {packing_length}: must be a positive number of tokens")
    lengths = [example_length(example) for example in examples]
    order = sorted(range(len(examples)), key=lambda index: (-lengths[index], index))
    smallest = min(lengths, default=0)
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # (room left, bin number), sorted: bisect finds the best fit
    for index in order:
        length = lengths[index]
        slot = bisect.bisect_left(open_bins, (length, -1))  # the least room >= length, earliest bin first
        if slot < len(open_bins):
            room, number = open_bins.pop(slot)
            bins[number].append(index)
            room -= length
        else:
            number, room = len(bins), packing_length - length  # negative for an over-long example: closed
            bins.append([index])
        if room >= smallest:  # a bin no remaining example fits is closed for good
            bisect.insort(open_bins, (room, number))
    return [{PACKED_KEY: [examples[index] for index in sorted(members)]} for members in bins]


def collate_bins(features: list[dict]) -> dict:
    """The collator under --packing: bins are flattened into their rows (plain examples pass as they are),
    then collated as gkd.data.collate_examples does."""
    rows = [row for feature in features for row in (feature[PACKED_KEY] if PACKED_KEY in feature else [feature])]
    return collate_examples(rows)


# ----------------------------------------------------------------------------- one sequence per micro-batch


def pack_batch(padded: dict) -> dict:
    """A padded micro-batch (gkd.data.build_batch's right-padded input_ids, attention_mask, labels) as one
    sequence: input_ids, labels, position_ids and row_ids, each (1, total tokens); no attention_mask.

    position_ids restart at 0 at every row, which is how the model tells rows apart; row_ids says which row
    each position belongs to (the trainer's per-row data: sources, the cross-entropy's rows, per-sample
    losses). build_batch leaves every row's first label unset, so no row's label is predicted from the row
    before it."""
    lengths = padded["attention_mask"].sum(1)
    keep = padded["attention_mask"].bool()
    width = padded["input_ids"].shape[1]
    positions = torch.arange(width, device=lengths.device).expand_as(keep)
    rows = torch.arange(len(lengths), device=lengths.device)[:, None].expand_as(keep)
    return {
        "input_ids": padded["input_ids"][keep][None],
        "labels": padded["labels"][keep][None],
        "position_ids": positions[keep][None],
        "row_ids": rows[keep][None],
    }
