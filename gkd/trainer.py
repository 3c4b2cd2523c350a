"""GKDTrainer: a transformers Trainer whose step picks each sample's completion source, then distils.

One optimizer step, as in the paper's pseudocode:
1. for every sample, draw its source: the student's own sample with probability lmbda, else the teacher's
   sample if seq_kd, else the dataset's completion;
2. generate what must be generated, for all micro-batches of the step, before any loss: the loss is
   normalised by the completion tokens of the whole optimizer step, which are known only then;
3. per micro-batch: student forward, teacher forward (eval mode, no gradients), generalized JSD over the
   completion tokens, plus sft_alpha * cross-entropy on the samples the student did not write.
"""

import contextlib
import inspect
import random
import time

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput

from gkd.data import IGNORE_INDEX, build_batch, collate_examples
from gkd.errors import GKDUserError
from gkd.loss import (
    chunked_generalized_jsd_loss, fused_generalized_jsd_loss, generalized_jsd_loss, teacher_topk,
    topk_generalized_jsd_loss,
)
from gkd.models import pad_token_id
from gkd.sampling import SamplingEngine, SamplingSettings, TransformersEngine, derive_seed

SOURCES = ("student", "teacher", "dataset")


def sample_source(seed: int, global_step: int, sample_index: int, lmbda: float, seq_kd: bool) -> str:
    """Where one sample's completion comes from. Depends only on its arguments, so every process draws
    the same sequence, and a run resumed at step k draws what the first run drew at step k."""
    if random.Random(derive_seed(seed, global_step, sample_index)).random() < lmbda:
        return "student"
    return "teacher" if seq_kd else "dataset"


def why_not_fusable(model) -> str | None:
    """None when the loss can be fused with the model's LM head, else the reason it cannot."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"{type(base).__name__}'s LM head is a {type(head).__name__}, not a plain Linear layer"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward has no logits_to_keep argument to skip its own LM head"
    config = base.config
    # Models that transform logits after the head: fusing would compare the wrong distributions.
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", 1.0) not in (None, 1.0) \
            or getattr(config, "logits_scaling", 1.0) not in (None, 1.0):
        return f"{type(base).__name__} rescales or caps its logits after the LM head"
    return None


def choose_loss_impl(requested: str | None, topk: int | None, student, teacher) -> str:
    if topk is not None:
        return "topk"
    reasons = [why_not_fusable(student), why_not_fusable(teacher)]
    reason = next((reason for reason in reasons if reason), None)
    if requested == "fused" and reason:
        raise GKDUserError(f"--loss_impl fused: {reason}; use --loss_impl chunked")
    return requested or ("chunked" if reason else "fused")


class GKDTrainer(Trainer):
    # compute_loss divides by the completion tokens of the whole optimizer step itself.
    loss_is_scaled_for_ga = True

    def __init__(self, model, teacher_model, args, gkd_args, *, stop_token_ids, compared_vocab_size,
                 max_length=None, student_engine: SamplingEngine | None = None,
                 teacher_engine: SamplingEngine | None = None, **kwargs):
        # The collator hands over token lists; Trainer must not strip them as unknown model inputs.
        args.remove_unused_columns = False
        args.dataloader_pin_memory = False  # batches are token lists until the step builds tensors
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = False  # every student parameter takes part in the loss
        super().__init__(model=model, args=args, data_collator=collate_examples, **kwargs)
        self.gkd = gkd_args
        self.stop_token_ids = tuple(stop_token_ids)
        self.compared_vocab_size = compared_vocab_size
        self.max_length = max_length
        self.pad_token_id = pad_token_id(self.processing_class)

        # --offload_teacher_model: the teacher lives in CPU memory and visits the device for its forwards.
        self.teacher = teacher_model.eval().requires_grad_(False)
        self.teacher.to("cpu" if gkd_args.offload_teacher_model else self.args.device)
        self.loss_impl = choose_loss_impl(gkd_args.loss_impl, gkd_args.gkd_logits_topk, model, self.teacher)
        # Small chunks suit a CPU's caches; a GPU wants larger ones, or kernel launches dominate.
        self.loss_chunk_size = gkd_args.loss_chunk_size or (256 if self.args.device.type == "cuda" else None)
        if gkd_args.gkd_logits_topk is not None and gkd_args.gkd_logits_topk > compared_vocab_size:
            raise GKDUserError(f"--gkd_logits_topk {gkd_args.gkd_logits_topk}: must be at most the vocabulary "
                               f"size {compared_vocab_size}")
        self.student_engine = student_engine or TransformersEngine(model, self.pad_token_id)
        self.teacher_engine = teacher_engine or TransformersEngine(self.teacher, self.pad_token_id)
        self._weights_synced_at_step = None
        self._reset_metrics()
        self._metrics_since_step = None  # set at the first step: a resumed run starts at its checkpoint's step

    @contextlib.contextmanager
    def _teacher_on_device(self):
        """With --offload_teacher_model, the teacher comes to the device for the duration, then goes back."""
        if not self.gkd.offload_teacher_model:
            yield
            return
        self.teacher.to(self.args.device)
        try:
            yield
        finally:
            self.teacher.to("cpu")

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

    def _micro_batch_sources(self, global_step: int, micro_batch_index: int, rows: int) -> list[list[str]]:
        """Every process's sample sources for one micro-batch (all processes hold `rows` rows: accelerate
        evens out the last batch), computed alike on each process without any communication."""
        world_size, per_device = self.accelerator.num_processes, self.args.per_device_train_batch_size
        return [
            [sample_source(self.args.seed, global_step, (micro_batch_index * world_size + rank) * per_device + offset,
                           self.gkd.lmbda, self.gkd.seq_kd) for offset in range(rows)]
            for rank in range(world_size)
        ]

    def _complete_batch(self, batch: dict, global_step: int, micro_batch_index: int) -> dict:
        prompts, completions = batch["prompt_ids"], list(batch["completion_ids"])
        rank = self.accelerator.process_index
        everyone = self._micro_batch_sources(global_step, micro_batch_index, len(prompts))
        sources = everyone[rank]

        started = time.perf_counter()
        for source, engine in (("student", self.student_engine), ("teacher", self.teacher_engine)):
            chosen = [index for index, name in enumerate(sources) if name == source]
            # A collective engine is called by every process as soon as any one of them needs it.
            if not any(source in rank_sources for rank_sources in (everyone if engine.collective else [sources])):
                continue
            if source == "student" and self._weights_synced_at_step != global_step:
                engine.sync_weights(self.accelerator.unwrap_model(self.model))
                self._weights_synced_at_step = global_step
            settings = self._sampling_settings(global_step, rank, micro_batch_index, source)
            with self._teacher_on_device() if source == "teacher" else contextlib.nullcontext():
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
        if self._metrics_since_step is None:
            self._metrics_since, self._metrics_since_step = time.perf_counter(), global_step
        batch_samples = [
            self._complete_batch(batch, global_step, index) for index, batch in enumerate(batch_samples)
        ]
        self.student_engine.idle()  # no more sampling before the next optimizer step
        self.teacher_engine.idle()
        completion_tokens = sum(int(batch["labels"].ne(IGNORE_INDEX).sum()) for batch in batch_samples)
        completion_tokens = torch.tensor(completion_tokens, device=device)
        if self.accelerator.num_processes > 1:
            completion_tokens = self.accelerator.gather(completion_tokens).sum()
        return batch_samples, completion_tokens

    # ------------------------------------------------------------------ the loss

    def _loss_sums(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed generalized JSD and summed cross-entropy (on non-student samples) of one micro-batch."""
        forward = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
        labels = inputs["labels"][:, 1:]
        sft_labels = labels.masked_fill(inputs["from_student"][:, None], IGNORE_INDEX)
        vocab = self.compared_vocab_size
        options = {"beta": self.gkd.beta, "temperature": self.gkd.loss_temperature, "reduction": "sum"}
        chunk = {} if self.loss_chunk_size is None else {"chunk_size": self.loss_chunk_size}
        student_head = self.accelerator.unwrap_model(model).get_output_embeddings()

        if self.loss_impl == "fused":
            # logits_to_keep=1: the models' own heads project one position; the loss projects the rest
            # chunk by chunk, so neither model's full logits ever exist.
            hidden = {**forward, "output_hidden_states": True, "logits_to_keep": 1}
            student_hidden = model(**hidden).hidden_states[-1][:, :-1]
            with self._teacher_on_device():  # the loss reads the teacher's head too
                with torch.no_grad():
                    teacher_hidden = self.teacher(**hidden).hidden_states[-1][:, :-1]
                teacher_head = self.teacher.get_output_embeddings()
                jsd_sum = fused_generalized_jsd_loss(
                    student_hidden, student_head.weight[:vocab], teacher_hidden, teacher_head.weight[:vocab], labels,
                    student_lm_head_bias=None if student_head.bias is None else student_head.bias[:vocab],
                    teacher_lm_head_bias=None if teacher_head.bias is None else teacher_head.bias[:vocab],
                    **options, **chunk,
                )
            sft_positions = sft_labels != IGNORE_INDEX
            sft_logits = student_head(student_hidden[sft_positions])[:, :vocab] if self.gkd.sft_alpha > 0 else None
            sft_targets = sft_labels[sft_positions]
        else:
            student_logits = model(**forward).logits[:, :-1, :vocab]
            with torch.no_grad(), self._teacher_on_device():
                teacher_logits = self.teacher(**forward).logits[:, :-1, :vocab]
                if self.loss_impl == "topk":  # keep K per position, let the full logits go
                    teacher_logits = teacher_topk(teacher_logits, self.gkd.gkd_logits_topk, self.gkd.loss_temperature)
            if self.loss_impl == "exact":
                jsd_sum = generalized_jsd_loss(student_logits, teacher_logits, labels, **options)
            elif self.loss_impl == "chunked":
                jsd_sum = chunked_generalized_jsd_loss(student_logits, teacher_logits, labels, **options, **chunk)
            else:
                jsd_sum = topk_generalized_jsd_loss(student_logits, teacher_logits, labels,
                                                    tail_bucket=self.gkd.gkd_logits_topk_tail, **options)
            sft_logits, sft_targets = student_logits.flatten(0, 1), sft_labels.flatten()

        if self.gkd.sft_alpha == 0:
            return jsd_sum, jsd_sum.new_zeros(())
        sft_sum = F.cross_entropy(sft_logits.float(), sft_targets, ignore_index=IGNORE_INDEX, reduction="sum")
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

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """eval_loss: the generalized JSD per completion token over the whole evaluation set (all
        processes), on the dataset's own completions. Trainer's own loop would average per-batch means."""
        model = self.model
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)  # summed JSD, tokens
        samples = 0
        for inputs in dataloader:
            batch = build_batch(inputs["prompt_ids"], inputs["completion_ids"], self.pad_token_id)
            batch = {name: tensor.to(self.args.device) for name, tensor in batch.items()}
            batch["from_student"] = torch.zeros(len(inputs["prompt_ids"]), dtype=torch.bool, device=self.args.device)
            with torch.no_grad(), self.compute_loss_context_manager():
                jsd_sum, _ = self._loss_sums(model, batch)
            totals += torch.stack([jsd_sum.double(), batch["labels"].ne(IGNORE_INDEX).sum().double()])
            samples += len(inputs["prompt_ids"])
        model.train(was_training)
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        metrics = {f"{metric_key_prefix}_loss": (totals[0] / totals[1].clamp(min=1)).item()}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=samples)

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
