"""GKDTrainer: a transformers Trainer whose step picks each sample's completion source, then distils.

One optimizer step, as in the paper's pseudocode:
1. for every sample, draw its source: the student's own sample with probability lmbda, else the teacher's
   sample if seq_kd, else the dataset's completion;
2. generate what must be generated, for all micro-batches of the step, before any loss: the loss is
   normalised by the completion tokens of the whole optimizer step, which are known only then;
3. per micro-batch: student forward, teacher forward (eval mode, no gradients), generalized JSD over the
   completion tokens, plus sft_alpha * cross-entropy on the samples the student did not write.
"""

import random
import time

import torch
import torch.nn.functional as F
from transformers import Trainer

from gkd.data import IGNORE_INDEX, build_batch, collate_examples
from gkd.loss import generalized_jsd_loss
from gkd.sampling import SamplingEngine, SamplingSettings, TransformersEngine, derive_seed

SOURCES = ("student", "teacher", "dataset")


def sample_source(seed: int, global_step: int, sample_index: int, lmbda: float, seq_kd: bool) -> str:
    """Where one sample's completion comes from. Depends only on its arguments, so every process draws
    the same sequence, and a run resumed at step k draws what the first run drew at step k."""
    if random.Random(derive_seed(seed, global_step, sample_index)).random() < lmbda:
        return "student"
    return "teacher" if seq_kd else "dataset"


class GKDTrainer(Trainer):
    # compute_loss divides by the completion tokens of the whole optimizer step itself.
    loss_is_scaled_for_ga = True

    def __init__(self, model, teacher_model, args, gkd_args, *, stop_token_ids, compared_vocab_size,
                 max_length=None, student_engine: SamplingEngine | None = None,
                 teacher_engine: SamplingEngine | None = None, **kwargs):
        # The collator hands over token lists; Trainer must not strip them as unknown model inputs.
        args.remove_unused_columns = False
        args.dataloader_pin_memory = False  # batches are token lists until the step builds tensors
        super().__init__(model=model, args=args, data_collator=collate_examples, **kwargs)
        self.gkd = gkd_args
        self.stop_token_ids = tuple(stop_token_ids)
        self.compared_vocab_size = compared_vocab_size
        self.max_length = max_length
        self.pad_token_id = self.processing_class.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.processing_class.eos_token_id

        self.teacher = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.student_engine = student_engine or TransformersEngine(model, self.pad_token_id)
        self.teacher_engine = teacher_engine or TransformersEngine(self.teacher, self.pad_token_id)
        self._weights_synced_at_step = None
        self._reset_metrics()

    # ------------------------------------------------------------------ choosing and making completions

    def _sampling_settings(self, *seed_parts) -> SamplingSettings:
        return SamplingSettings(
            max_new_tokens=self.gkd.max_completion_length,
            temperature=self.gkd.temperature,
            top_k=self.gkd.top_k,
            top_p=self.gkd.top_p,
            stop_token_ids=self.stop_token_ids,
            seed=derive_seed(self.args.seed, *seed_parts),
        )

    def _fit_max_length(self, prompt, completion):
        if self.max_length is None:
            return completion
        return completion[: max(self.max_length - len(prompt), 1)]

    def _complete_batch(self, batch: dict, global_step: int, micro_batch_index: int) -> dict:
        prompts, completions = batch["prompt_ids"], list(batch["completion_ids"])
        rank, world_size = self.accelerator.process_index, self.accelerator.num_processes
        per_device = self.args.per_device_train_batch_size
        first_index = (micro_batch_index * world_size + rank) * per_device
        sources = [
            sample_source(self.args.seed, global_step, first_index + offset, self.gkd.lmbda, self.gkd.seq_kd)
            for offset in range(len(prompts))
        ]

        started = time.perf_counter()
        for source, engine in (("student", self.student_engine), ("teacher", self.teacher_engine)):
            chosen = [index for index, name in enumerate(sources) if name == source]
            if not chosen:
                continue
            if source == "student" and self._weights_synced_at_step != global_step:
                engine.sync_weights(self.accelerator.unwrap_model(self.model))
                self._weights_synced_at_step = global_step
            settings = self._sampling_settings(global_step, rank, micro_batch_index, source)
            generated = engine.generate([prompts[index] for index in chosen], settings)
            for index, completion in zip(chosen, generated):
                completions[index] = self._fit_max_length(prompts[index], completion)
        self._metrics["generation_seconds"] += time.perf_counter() - started

        tensors = build_batch(prompts, completions, self.pad_token_id)
        tensors["from_student"] = torch.tensor([source == "student" for source in sources])
        for source in sources:
            self._metrics[f"samples_{source}"] += 1
        self._metrics["completion_tokens"] += sum(len(completion) for completion in completions)
        self._metrics["tokens"] += int(tensors["attention_mask"].sum())
        return tensors

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the step's micro-batches, give each sample its completion, and count the step's completion
        tokens over all processes: the loss divisor, recounted after generation replaced completions."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        global_step = self.state.global_step
        batch_samples = [
            self._complete_batch(batch, global_step, index) for index, batch in enumerate(batch_samples)
        ]
        completion_tokens = sum(int(batch["labels"].ne(IGNORE_INDEX).sum()) for batch in batch_samples)
        completion_tokens = torch.tensor(completion_tokens, device=device)
        if self.accelerator.num_processes > 1:
            completion_tokens = self.accelerator.gather(completion_tokens).sum()
        return batch_samples, completion_tokens

    # ------------------------------------------------------------------ the loss

    def _loss_sums(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed generalized JSD and summed cross-entropy (on non-student samples) of one micro-batch."""
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
        vocab = self.compared_vocab_size
        student_logits = model(**forward).logits[:, :-1, :vocab]
        with torch.no_grad():
            teacher_logits = self.teacher(**forward).logits[:, :-1, :vocab]
        labels = inputs["labels"][:, 1:]
        jsd_sum = generalized_jsd_loss(
            student_logits, teacher_logits, labels, beta=self.gkd.beta,
            temperature=self.gkd.loss_temperature, reduction="sum",
        )
        sft_sum = jsd_sum.new_zeros(())
        if self.gkd.sft_alpha > 0:
            sft_labels = labels.masked_fill(inputs["from_student"][:, None], IGNORE_INDEX)
            sft_sum = F.cross_entropy(
                student_logits.flatten(0, 1).float(), sft_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        return jsd_sum, sft_sum

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        jsd_sum, sft_sum = self._loss_sums(model, inputs)
        self._metrics["jsd_sum"] += float(jsd_sum.detach())
        self._metrics["sft_sum"] += float(sft_sum.detach())
        self._metrics["loss_tokens"] += int(inputs["labels"].ne(IGNORE_INDEX).sum())
        total = jsd_sum + self.gkd.sft_alpha * sft_sum
        if num_items_in_batch is None:
            return total / inputs["labels"].ne(IGNORE_INDEX).sum().clamp(min=1)
        # Data-parallel backends average gradients over processes; the divisor already counts every
        # process's tokens, so scale back up to get the gradient of (global sum / global count).
        return total / num_items_in_batch.clamp(min=1) * self.accelerator.num_processes

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation loss: generalized JSD per completion token on the dataset's own completions."""
        batch = build_batch(inputs["prompt_ids"], inputs["completion_ids"], self.pad_token_id)
        batch = {name: tensor.to(self.args.device) for name, tensor in batch.items()}
        batch["from_student"] = torch.zeros(len(inputs["prompt_ids"]), dtype=torch.bool, device=self.args.device)
        with torch.no_grad(), self.compute_loss_context_manager():
            jsd_sum, _ = self._loss_sums(model, batch)
        return jsd_sum / batch["labels"].ne(IGNORE_INDEX).sum().clamp(min=1), None, None

    # ------------------------------------------------------------------ logging

    def _reset_metrics(self):
        self._metrics = {name: 0.0 for name in (
            "generation_seconds", "completion_tokens", "tokens", "jsd_sum", "sft_sum", "loss_tokens",
            *(f"samples_{source}" for source in SOURCES),
        )}
        self._metrics_since = time.perf_counter()
        self._metrics_since_step = self.state.global_step

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add what happened since the last one
            names = sorted(self._metrics)
            totals = torch.tensor([self._metrics[name] for name in names], dtype=torch.float64, device=self.args.device)
            if self.accelerator.num_processes > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            total = dict(zip(names, totals.tolist()))
            seconds = max(time.perf_counter() - self._metrics_since, 1e-9)
            samples = sum(total[f"samples_{source}"] for source in SOURCES)
            logs["jsd_loss"] = round(total["jsd_sum"] / max(total["loss_tokens"], 1), 6)
            if self.gkd.sft_alpha > 0:
                logs["sft_loss"] = round(total["sft_sum"] / max(total["loss_tokens"], 1), 6)
            for source in SOURCES:
                logs[f"samples_{source}"] = int(total[f"samples_{source}"])
            logs["completion_length"] = round(total["completion_tokens"] / max(samples, 1), 2)
            logs["generation_share"] = round(total["generation_seconds"] / self.accelerator.num_processes / seconds, 4)
            logs["tokens_per_second"] = round(total["tokens"] / seconds, 1)
            logs["step_seconds"] = round(seconds / max(self.state.global_step - self._metrics_since_step, 1), 4)
            self._reset_metrics()
        super().log(logs, start_time)
