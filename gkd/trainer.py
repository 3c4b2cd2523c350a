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
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import EvalLoopOutput

from gkd.data import IGNORE_INDEX, build_batch, collate_examples
from gkd.errors import GKDUserError
from gkd.losses import LossBatch, LossSettings, choose_loss_impl, make_loss
from gkd.models import pad_token_id
from gkd.offload import OffloadedModel
from gkd.sampling import SamplingEngine, SamplingSettings, TransformersEngine, derive_seed

SOURCES = ("student", "teacher", "dataset")


def sample_source(seed: int, global_step: int, sample_index: int, lmbda: float, seq_kd: bool) -> str:
    """Where one sample's completion comes from. Depends only on its arguments, so every process draws
    the same sequence, and a run resumed at step k draws what the first run drew at step k."""
    if random.Random(derive_seed(seed, global_step, sample_index)).random() < lmbda:
        return "student"
    return "teacher" if seq_kd else "dataset"


def has_experts(model) -> bool:
    """A mixture-of-experts model, by the config fields transformers' MoE families use."""
    configs = (model.config, model.config.get_text_config())  # composite models keep it in text_config
    return any(getattr(config, name, None) for config in configs
               for name in ("num_experts", "num_local_experts", "n_routed_experts"))


class _OffloadTeacherBeforeOptimizerStep(TrainerCallback):
    """The step's forwards are done: the offloaded teacher's device copy goes before the optimizer needs room."""

    def __init__(self, offload: OffloadedModel):
        self.offload = offload

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.offload.offload()


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
            # A dense student uses every parameter in every step, so DDP can skip the search for unused ones;
            # a mixture of experts may leave an expert unused in a step, and DDP must then look.
            args.ddp_find_unused_parameters = has_experts(model)
        super().__init__(model=model, args=args, data_collator=collate_examples, **kwargs)
        self.gkd = gkd_args
        self.stop_token_ids = tuple(stop_token_ids)
        self.compared_vocab_size = compared_vocab_size
        self.max_length = max_length
        self.pad_token_id = pad_token_id(self.processing_class)
        self.vocab_size = len(self.processing_class)  # ids at or past it are the output layers' padding

        self.teacher = teacher_model.eval().requires_grad_(False)
        # --offload_teacher_model: the teacher lives in host memory and visits the device once per step.
        self.teacher_offload = OffloadedModel(self.teacher, self.args.device) if gkd_args.offload_teacher_model \
            else None
        if self.teacher_offload is None:
            self.teacher.to(self.args.device)
        else:
            self.add_callback(_OffloadTeacherBeforeOptimizerStep(self.teacher_offload))
        if gkd_args.gkd_logits_topk is not None and gkd_args.gkd_logits_topk > compared_vocab_size:
            raise GKDUserError(f"--gkd_logits_topk {gkd_args.gkd_logits_topk}: must be at most the vocabulary "
                               f"size {compared_vocab_size}")
        # The one place the loss implementation is chosen (and logged), by running both models where they are
        # (an offloaded teacher on the host: loading it here could meet a colocated vLLM engine's memory).
        self.loss_impl = choose_loss_impl(gkd_args.loss_impl, gkd_args.gkd_logits_topk, model, self.teacher,
                                          compared_vocab_size, replicas=max(self.args.n_gpu, 1))
        # Small chunks suit a CPU's caches; a GPU wants larger ones, or kernel launches dominate.
        chunk_size = gkd_args.loss_chunk_size or (256 if self.args.device.type == "cuda" else None)
        self.gkd_loss = make_loss(self.loss_impl, LossSettings(
            beta=gkd_args.beta, temperature=gkd_args.loss_temperature, vocab_size=compared_vocab_size,
            chunk_size=chunk_size, topk=gkd_args.gkd_logits_topk, topk_tail=gkd_args.gkd_logits_topk_tail,
            sft_alpha=gkd_args.sft_alpha,
        ))
        # The student samples in the training precision: under --bf16 its float32 master weights run through
        # autocast, as in its training forward (vLLM engines hold weights in their own dtype).
        self.student_engine = student_engine or TransformersEngine(model, self.pad_token_id,
                                                                   autocast=self.accelerator.autocast)
        self.teacher_engine = teacher_engine or TransformersEngine(self.teacher, self.pad_token_id)
        self._weights_synced_at_step = None
        self._reset_metrics()
        self._metrics_since_step = None  # set at the first step: a resumed run starts at its checkpoint's step

    # ------------------------------------------------------------------ choosing and making completions

    def _sampling_settings(self) -> SamplingSettings:
        return SamplingSettings(
            max_new_tokens=self.gkd.max_completion_length,
            temperature=self.gkd.temperature,
            top_k=self.gkd.top_k,
            top_p=self.gkd.top_p,
            stop_token_ids=self.stop_token_ids,
            vocab_size=self.vocab_size,
        )

    def _fit_max_length(self, prompt, completion):
        if self.max_length is None:
            return completion
        return completion[: max(self.max_length - len(prompt), 1)]

    def _global_sample_indices(self, micro_batch_index: int, rank: int, rows: int) -> list[int]:
        """Where each row of one process's micro-batch stands in the optimizer step's global batch: the
        micro-batches of a step follow each other, and within one the processes' rows follow each other
        (accelerate hands process r the r-th slice; every process holds `rows` rows, the last batch
        evened out). train_batch_size counts the rows of one process (per device x GPUs under DataParallel)."""
        world_size, per_process = self.accelerator.num_processes, self.args.train_batch_size
        first = (micro_batch_index * world_size + rank) * per_process
        return list(range(first, first + rows))

    def _complete_step(self, batch_samples: list[dict], global_step: int) -> list[list[str]]:
        """Give every sample of the optimizer step its completion; returns this process's sources per
        micro-batch. Each sample's source and, when generated, its completion are functions of (seed, step,
        global sample index) alone, so splitting the step differently (processes, accumulation) or resuming
        leaves them unchanged. Each engine is called once for the whole step."""
        rank, world_size = self.accelerator.process_index, self.accelerator.num_processes
        sources, own_indices, needed_anywhere = [], [], set()
        for micro_batch_index, batch in enumerate(batch_samples):
            rows = len(batch["prompt_ids"])
            for process in range(world_size):
                indices = self._global_sample_indices(micro_batch_index, process, rows)
                process_sources = [sample_source(self.args.seed, global_step, index, self.gkd.lmbda, self.gkd.seq_kd)
                                   for index in indices]
                needed_anywhere.update(process_sources)
                if process == rank:
                    sources.append(process_sources)
                    own_indices.append(indices)
            batch["completion_ids"] = list(batch["completion_ids"])

        started = time.perf_counter()
        settings = self._sampling_settings()
        for source, engine in (("student", self.student_engine), ("teacher", self.teacher_engine)):
            chosen = [(m, row) for m, batch_sources in enumerate(sources)
                      for row, name in enumerate(batch_sources) if name == source]
            # A collective engine is called by every process as soon as any one of them needs it.
            if not chosen and not (engine.collective and source in needed_anywhere):
                continue
            if source == "student" and self._weights_synced_at_step != global_step:
                engine.sync_weights(self.accelerator.unwrap_model(self.model))
                self._weights_synced_at_step = global_step
            prompts = [batch_samples[m]["prompt_ids"][row] for m, row in chosen]
            seeds = [derive_seed(self.args.seed, "sample", global_step, own_indices[m][row]) for m, row in chosen]
            if source == "teacher" and self.teacher_offload is not None:
                self.teacher_offload.load()  # after the student's engine has released its memory (idle)
            generated = engine.generate(prompts, settings, seeds)
            engine.idle()  # no more sampling from it before the next optimizer step
            for (m, row), completion in zip(chosen, generated):
                batch = batch_samples[m]
                batch["completion_ids"][row] = self._fit_max_length(batch["prompt_ids"][row], completion)
        self._metrics["generation_seconds"] += time.perf_counter() - started
        return sources

    def _batch_tensors(self, batch: dict, sources: list[str]) -> dict:
        prompts, completions = batch["prompt_ids"], batch["completion_ids"]
        tensors = build_batch(prompts, completions, self.pad_token_id, self.vocab_size)
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
        sources = self._complete_step(batch_samples, global_step)
        if self.teacher_offload is not None:  # for the step's forwards, if no teacher generation brought it
            self.teacher_offload.load()  # (it goes back before the optimizer runs)
        batch_samples = [self._batch_tensors(batch, batch_sources)
                         for batch, batch_sources in zip(batch_samples, sources)]
        completion_tokens = sum(int(batch["labels"].ne(IGNORE_INDEX).sum()) for batch in batch_samples)
        completion_tokens = torch.tensor(completion_tokens, device=device)
        if self.accelerator.num_processes > 1:
            completion_tokens = self.accelerator.gather(completion_tokens).sum()
        return batch_samples, completion_tokens

    # ------------------------------------------------------------------ the loss

    def _loss_sums(self, model, inputs, sft: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed generalized JSD and summed cross-entropy (on non-student samples; 0 when sft is False or
        sft_alpha is 0) of one micro-batch. self.gkd_loss (gkd/losses) runs both models as its implementation
        needs; model may be a DDP/DeepSpeed wrapper, whose forward it calls. The teacher is on the device."""
        sft_rows = ~inputs["from_student"] if sft and self.gkd.sft_alpha > 0 else None
        batch = LossBatch(inputs["input_ids"], inputs["attention_mask"], inputs["labels"], sft_rows)
        return tuple(self.gkd_loss(model, self.teacher, batch, student_module=self.accelerator.unwrap_model(model)))

    def compute_loss_context_manager(self):
        """The loss runs under the accelerator's autocast: accelerate casts only inside the prepared model's
        forward, and the fused loss projects the LM heads outside it, in autocast's dtype when it is on."""
        stack = super().compute_loss_context_manager()
        stack.enter_context(self.accelerator.autocast())
        return stack

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
        if self.teacher_offload is not None:
            self.teacher_offload.load()
        totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)  # summed JSD, tokens
        samples = 0
        for inputs in dataloader:
            batch = build_batch(inputs["prompt_ids"], inputs["completion_ids"], self.pad_token_id)
            batch = {name: tensor.to(self.args.device) for name, tensor in batch.items()}
            batch["from_student"] = torch.zeros(len(inputs["prompt_ids"]), dtype=torch.bool, device=self.args.device)
            with torch.no_grad(), self.compute_loss_context_manager():
                jsd_sum, _ = self._loss_sums(model, batch, sft=False)  # eval_loss is the JSD alone: no SFT term
            totals += torch.stack([jsd_sum.double(), batch["labels"].ne(IGNORE_INDEX).sum().double()])
            samples += len(inputs["prompt_ids"])
        model.train(was_training)
        if self.teacher_offload is not None:
            self.teacher_offload.offload()
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
