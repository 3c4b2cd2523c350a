"""--log_completions: what each optimizer step trained on, one JSON line per sample, in
<output_dir>/completions.jsonl (written by the main process, lines gathered from every process):

    step              the optimizer step that trained on it (as logging.jsonl's global_step: 1 for the first)
    index             the sample's global index within the step (what its source and seed were drawn from)
    source            student | teacher | dataset
    prompt            the prompt, decoded (skip_special_tokens=False)
    completion        the completion trained on, decoded likewise
    completion_tokens its token count
    loss_tokens       the positions the loss counted for it (its completion tokens, plus any supervised prompt
                      span under --loss_scale default)
    loss              its summed generalized JSD / loss_tokens (null when it counted none)

The per-sample losses are the very values the step's loss summed (gkd.losses.common.recording_divergences:
the implementations hand over their per-position divergences, detached, no extra forward), so the
loss_tokens-weighted mean of a step's lines is the step's jsd_loss (logged with --logging_steps 1).
Each step also goes to TensorBoard as a text table (and to Weights & Biases as a table) when the trainer
reports there; other reporters get nothing from here.
"""

from __future__ import annotations

import json
import os

import torch

FIELDS = ("step", "index", "source", "prompt", "completion", "completion_tokens", "loss_tokens", "loss")
TABLE_ROWS = 16  # rows per step in a reporter's table (the file has them all)
TEXT_CHARS = 200  # characters of prompt / completion in a reporter's table


def per_row_sums(records, row_of_position: torch.Tensor, rows: int) -> torch.Tensor:
    """Summed divergence per row (float64, on the host) from recording_divergences' (values, flat positions)
    records; row_of_position maps a flat position index to its row."""
    sums = torch.zeros(rows, dtype=torch.float64)
    for values, positions in records:
        sums.index_add_(0, row_of_position[positions].cpu(), values.double().cpu())
    return sums


class CompletionLog:
    def __init__(self, output_dir: str, tokenizer, accelerator):
        self.path = os.path.join(output_dir, "completions.jsonl")
        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.pending: list[dict] = []

    def add(self, step: int, indices, sources, prompts, completions, jsd_sums, loss_tokens) -> None:
        """One micro-batch's samples (this process's)."""
        for index, source, prompt, completion, jsd, tokens in zip(indices, sources, prompts, completions,
                                                                  jsd_sums.tolist(), loss_tokens.tolist()):
            self.pending.append({
                "step": step, "index": index, "source": source,
                "prompt": self.tokenizer.decode(prompt, skip_special_tokens=False),
                "completion": self.tokenizer.decode(completion, skip_special_tokens=False),
                "completion_tokens": len(completion), "loss_tokens": int(tokens),
                "loss": jsd / tokens if tokens else None,
            })

    def flush(self) -> list[dict]:
        """Gather every process's lines, append them (main process) in (step, index) order; returns them (on
        the main process; [] elsewhere). Every process must call it at the same point (a collective)."""
        lines, self.pending = self.pending, []
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            lines = gather_object(lines)
        if not self.accelerator.is_main_process:
            return []
        lines.sort(key=lambda line: (line["step"], line["index"]))
        if lines:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        return lines

    @staticmethod
    def report(lines: list[dict], callbacks, step: int) -> None:
        """The step's first TABLE_ROWS lines as a table, to TensorBoard (add_text) and Weights & Biases
        (wandb.Table), through the writers of transformers' own callbacks, when they are active."""
        if not lines:
            return
        shown = lines[:TABLE_ROWS]
        for callback in callbacks:
            name = type(callback).__name__
            if name == "TensorBoardCallback" and getattr(callback, "tb_writer", None) is not None:
                callback.tb_writer.add_text("completions", markdown_table(shown), step)
            elif name == "WandbCallback" and getattr(callback, "_initialized", False):
                wandb = callback._wandb
                wandb.log({"completions": wandb.Table(columns=list(FIELDS),
                                                      data=[[line[field] for field in FIELDS] for line in shown])})


def markdown_table(lines: list[dict]) -> str:
    def cell(value):
        text = "" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        return text[:TEXT_CHARS].replace("|", "\\|").replace("\n", "\\n")

    rows = ["| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    rows += ["| " + " | ".join(cell(line[field]) for field in FIELDS) + " |" for line in lines]
    return "\n".join(rows)
