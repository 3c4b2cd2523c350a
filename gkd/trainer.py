"""GKDTrainer: a transformers Trainer whose step picks each sample's completion source, then distils.

One optimizer step, as in the paper's pseudocode:
1. for every sample, draw its source: the student's own sample with probability lmbda, else the teacher's
   sample if seq_kd, else the dataset's completion;
2. generate what must be generated, for all micro-batches of the step, before any loss: the loss is
   normalised by the completion tokens of the whole optimizer step, which are known only then;
3. per micro-batch: student forward, teacher forward (eval mode, no gradients), generalized JSD over the
   completion tokens, plus sft_alpha * cross-entropy on the samples the student did not write.

--padding_free / --packing (gkd/packing.py): each micro-batch's rows run as one sequence; --log_completions
(gkd/completion_log.py): what each step trained on, with per-sample losses, in completions.jsonl.
"""

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import EvalLoopOutput

from gkd.completion_log import CompletionLog, per_row_sums
from gkd.data import IGNORE_INDEX, build_batch, collate_examples
from gkd.errors import GKDUserError
from gkd.images import image_token_ids, pixel_inputs
from gkd.losses import LossBatch, LossSettings, choose_loss_impl, make_loss
from gkd.losses.common import recording_divergences
from gkd.models import pad_token_id
from gkd.packing import collate_bins, pack_batch
from gkd.sampling import SamplingEngine, SamplingSettings, TransformersEngine, derive_seed
from gkd.sharding import student_sharding, why_sharded
from gkd.teachers import Teacher, make_teacher

SOURCES = ("student", "teacher", "dataset")


@dataclass
class StepSamples:
    """One optimizer step's micro-batches on this process, with each row's source and global sample index."""
    global_step: int
    batches: list[dict]
    sources: list[list[str]] = field(default_factory=list)  # per micro-batch, per row
    indices: list[list[int]] = field(default_factory=list)
    needed_anywhere: set[str] = field(default_factory=set)  # the sources some process draws in this step
    # --async_generate: per source whose samples were started during the last step, what collects them
    # (None: already written)
    ahead: dict[str, Callable[[], None] | None] = field(default_factory=dict)


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
    """The step's forwards are done: what the teacher brought to the device goes before the optimizer needs
    room (--offload_teacher_model; a no-op for the other teachers)."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.teacher.offload()


class _FlushCompletionLog(TrainerCallback):
    """--log_completions: the step's samples go to completions.jsonl (and the reporters) once it is done."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        lines = self.trainer.completion_log.flush()
        CompletionLog.report(lines, self.trainer.callback_handler.callbacks, state.global_step)


class GKDTrainer(Trainer):
    # compute_loss divides by the completion tokens of the whole optimizer step itself.
    loss_is_scaled_for_ga = True

    def __init__(self, model, teacher_model, args, gkd_args, *, stop_token_ids, compared_vocab_size,
                 student_engine: SamplingEngine | None = None, teacher_engine: SamplingEngine | None = None,
                 padding_free: bool = False, packing: bool = False, log_completions: bool = False,
                 teacher_processor=None, **kwargs):
        """packing: train_dataset holds gkd.packing.pack_examples' bins (a dataloader item is a bin) and
        implies padding_free: each micro-batch's rows run as one sequence, without padding. teacher_processor:
        the teacher's own, where it encodes pictures unlike the student's (the examples then hold the
        teacher's prompts, gkd.data.load_examples): the teacher reads its pixel inputs and generates with it."""
        # The collator hands over token lists; Trainer must not strip them as unknown model inputs.
        args.remove_unused_columns = False
        args.dataloader_pin_memory = False  # batches are token lists until the step builds tensors
        if args.ddp_find_unused_parameters is None:
            # A dense student uses every parameter in every step, so DDP can skip the search for unused ones;
            # a mixture of experts may leave an expert unused in a step, and so may a vision-language model (a
            # micro-batch without pictures leaves its vision tower out): DDP must then look.
            args.ddp_find_unused_parameters = has_experts(model) or \
                hasattr(kwargs.get("processing_class"), "image_processor")
        super().__init__(model=model, args=args, data_collator=collate_bins if packing else collate_examples, **kwargs)
        self.gkd = gkd_args
        self.stop_token_ids = tuple(stop_token_ids)
        self.compared_vocab_size = compared_vocab_size
        self.packing, self.padding_free = packing, padding_free or packing
        # processing_class: the tokenizer, or a vision-language model's processor (its tokenizer inside)
        self.tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        self.processor = self.processing_class if hasattr(self.processing_class, "image_processor") else None
        self.teacher_processor = teacher_processor or self.processor
        self.completion_log = CompletionLog(self.args.output_dir, self.tokenizer, self.accelerator) \
            if log_completions else None
        if self.completion_log is not None:
            self.add_callback(_FlushCompletionLog(self))
        self._step_samples = []  # per micro-batch of the step: (step, global indices, sources, prompts, completions)
        self.pad_token_id = pad_token_id(self.tokenizer)
        self.vocab_size = len(self.tokenizer)  # ids at or past it are the output layers' padding

        # How each model is spread over the processes: the engines generate accordingly, and a sharded model's
        # weight sync and generation are entered by every process together.
        self.shardings = {"student": student_sharding(self.accelerator, lambda: self.model_wrapped,
                                                      gather=gkd_args.ds3_gather_for_generation)}
        # The teacher (gkd/teachers): its own weights (whole, offloaded, or sharded as the student or
        # --teacher_deepspeed says), or the student itself (self-distillation).
        self.teacher = make_teacher(teacher_model, model, self.shardings["student"], self.accelerator, self.args,
                                    gkd_args)
        self.shardings["teacher"] = self.teacher.sharding
        if self.processor is not None and any(sharding.collective for sharding in self.shardings.values()):
            raise GKDUserError("ZeRO-3 and FSDP with rows that have images are not supported yet: a process whose "
                               "batch has no picture would skip the vision tower while the others gather its "
                               "weights")
        self.add_callback(_OffloadTeacherBeforeOptimizerStep(self.teacher))
        if gkd_args.gkd_logits_topk is not None and gkd_args.gkd_logits_topk > compared_vocab_size:
            raise GKDUserError(f"--gkd_logits_topk {gkd_args.gkd_logits_topk}: must be at most the vocabulary "
                               f"size {compared_vocab_size}")
        # The one place the loss implementation is chosen (and logged), by running both models where they are
        # (an offloaded teacher on the host: loading it here could meet a colocated vLLM engine's memory).
        self.loss_impl = choose_loss_impl(gkd_args.loss_impl, gkd_args.gkd_logits_topk, model, self.teacher.model,
                                          compared_vocab_size, replicas=max(self.args.n_gpu, 1),
                                          sharded=why_sharded(self.accelerator))
        # Small chunks suit a CPU's caches; a GPU wants larger ones, or kernel launches dominate.
        chunk_size = gkd_args.loss_chunk_size or (256 if self.args.device.type == "cuda" else None)
        self.gkd_loss = make_loss(self.loss_impl, LossSettings(
            beta=gkd_args.beta, temperature=gkd_args.loss_temperature, vocab_size=compared_vocab_size,
            chunk_size=chunk_size, topk=gkd_args.gkd_logits_topk, topk_tail=gkd_args.gkd_logits_topk_tail,
            sft_alpha=gkd_args.sft_alpha,
        ))
        # The student samples in the training precision: under --bf16 its float32 master weights run through
        # autocast, as in its training forward (vLLM engines hold weights in their own dtype).
        self.student_engine = student_engine or TransformersEngine(
            model, self.pad_token_id, autocast=self.accelerator.autocast, sharding=self.shardings["student"],
            processor=self.processor)
        self.teacher_engine = teacher_engine or self.teacher.sampling_engine(
            self.pad_token_id, self.accelerator.unwrap_model, self.teacher_processor)
        self._weights_synced_at_step = None
        self._next_step = None  # --async_generate: the next optimizer step, drawn ahead
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
            suppressed_token_ids=tuple(sorted({*image_token_ids(self.processor),
                                               *image_token_ids(self.teacher_processor)})),
        )

    def _global_sample_indices(self, micro_batch_index: int, rank: int, rows: int) -> list[int]:
        """Where each row of one process's micro-batch stands in the optimizer step's global batch: the
        micro-batches of a step follow each other, and within one the processes' rows follow each other
        (accelerate hands process r the r-th slice; every process holds `rows` rows, the last batch
        evened out). train_batch_size counts the rows of one process (per device x GPUs under DataParallel)."""
        world_size, per_process = self.accelerator.num_processes, self.args.train_batch_size
        first = (micro_batch_index * world_size + rank) * per_process
        return list(range(first, first + rows))

    def _packed_sample_indices(self, batch_samples: list[dict]) -> list[list[list[int]]]:
        """--packing: per micro-batch and process, the global indices of its rows. Bins hold different numbers
        of rows, so the processes' row counts are gathered, and the rows are numbered in the order of the
        step's bins (micro-batch, then process, then bin): a row's index is its place in the flattened
        sequence of the step's bins, which splitting the same bins differently between processes and
        accumulation keeps as the unpacked numbering does (the same bins, in the same order, per step)."""
        counts = torch.tensor([len(batch["prompt_ids"]) for batch in batch_samples], device=self.args.device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(counts[None])  # (processes, micro-batches)
        counts = counts.reshape(self.accelerator.num_processes, len(batch_samples)).t().reshape(-1).tolist()
        firsts = [sum(counts[:position]) for position in range(len(counts))]
        world_size = self.accelerator.num_processes
        return [[list(range(firsts[m * world_size + p], firsts[m * world_size + p] + counts[m * world_size + p]))
                 for p in range(world_size)] for m in range(len(batch_samples))]

    def _draw_step(self, batch_samples: list[dict], global_step: int) -> StepSamples:
        """Each sample's source and global sample index, for the step's micro-batches on this process. Both
        are functions of (seed, step, global sample index) alone, so splitting the step differently
        (processes, accumulation) or resuming leaves them unchanged."""
        rank, world_size = self.accelerator.process_index, self.accelerator.num_processes
        step = StepSamples(global_step, batch_samples)
        packed_indices = self._packed_sample_indices(batch_samples) if self.packing else None
        for micro_batch_index, batch in enumerate(batch_samples):
            rows = len(batch["prompt_ids"])
            for process in range(world_size):
                indices = packed_indices[micro_batch_index][process] if self.packing else \
                    self._global_sample_indices(micro_batch_index, process, rows)
                process_sources = [sample_source(self.args.seed, global_step, index, self.gkd.lmbda, self.gkd.seq_kd)
                                   for index in indices]
                step.needed_anywhere.update(process_sources)
                if process == rank:
                    step.sources.append(process_sources)
                    step.indices.append(indices)
            batch["completion_ids"] = list(batch["completion_ids"])
        return step

    def _complete_step(self, step: StepSamples, next_step: StepSamples | None = None) -> None:
        """Give every sample of the optimizer step that its source generates its completion (a function of
        the source's weights and (seed, step, global sample index) alone). Each engine is called once a step.

        next_step (--async_generate): the next step's micro-batches, drawn now. A background engine (the
        gkd-rollout server) starts their samples as this step's end, to sample while this step trains; any
        other engine, when it samples for this step, also writes the next step's rows in the same call (two
        steps' rows for about the price of one on a latency-bound engine), and then rests a step. Either way
        the student's samples of the next step come from the weights before this step's update: one optimizer
        step off-policy (as a self-distilling run's teacher samples; a separate teacher's are exact: it does
        not train)."""
        started = time.perf_counter()
        settings = self._sampling_settings()
        for source, engine in (("student", self.student_engine), ("teacher", self.teacher_engine)):
            if engine is None:  # a served teacher writes no completions (gkd-train refuses seq_kd with it)
                continue
            if source in step.ahead:  # started (or written) during the last step
                if (collect := step.ahead.pop(source)) is not None:
                    collect()
                now = []
            else:
                now = [step]
            later = [next_step] if next_step is not None else []
            if not engine.background:  # the next step's rows join a call this step makes
                if now and later:
                    now = now + later
                    next_step.ahead[source] = None  # written by this call
                later = []
            called = bool(now) and (collect := self._submit(source, engine, now, settings)) is not None
            if called:
                collect()
            if later:
                next_step.ahead[source] = self._submit(source, engine, later, settings)
            if called and not (later and next_step.ahead[source] is not None):
                engine.idle()  # no more sampling from it before the next optimizer step
        self._metrics["generation_seconds"] += time.perf_counter() - started

    def _submit(self, source: str, engine: SamplingEngine, steps: list[StepSamples], settings: SamplingSettings):
        """Starts the source's samples of `steps` on its engine; returns what writes them into their micro-batches
        once they are there, or None when no process needs the engine."""
        chosen = [(step, m, row) for step in steps for m, batch_sources in enumerate(step.sources)
                  for row, name in enumerate(batch_sources) if name == source]
        # A collective engine, or one whose model is sharded, is called by every process as soon as any one
        # of them needs it.
        collective = engine.collective or self.shardings[source].collective
        if not chosen and not (collective and any(source in step.needed_anywhere for step in steps)):
            return None
        global_step = self.state.global_step
        if source == "student" and self._weights_synced_at_step != global_step:
            engine.sync_weights(self.accelerator.unwrap_model(self.model), self.shardings["student"])
            self._weights_synced_at_step = global_step
        prompts = [self._prompt_of(source, step.batches[m], row) for step, m, row in chosen]
        seeds = [derive_seed(self.args.seed, "sample", step.global_step, step.indices[m][row]) for step, m, row in chosen]
        if source == "teacher":
            self.teacher.load()  # after the student's engine has released its memory (idle)
        images = [step.batches[m]["images"][row] for step, m, row in chosen] if self.processor else []
        with self.teacher.running() if source == "teacher" else contextlib.nullcontext():
            # (images only where rows have them: gkd-train gives the other engines none)
            collect = engine.submit(prompts, settings, seeds, **({"images": images} if any(images) else {}))

        def write() -> None:
            # generation is bounded by --max_completion_length alone (--max_length bounds the prompt)
            for (step, m, row), completion in zip(chosen, collect()):
                step.batches[m]["completion_ids"][row] = completion

        return write

    @staticmethod
    def _prompt_of(source: str, batch: dict, row: int) -> list[int]:
        """What the source's model is prompted with: the teacher reads a row's teacher prompt (OPSD) if it has one."""
        teacher_prompts = batch.get("teacher_prompt_ids")
        if source == "teacher" and teacher_prompts and teacher_prompts[row] is not None:
            return teacher_prompts[row]
        return batch["prompt_ids"][row]

    def _tensors(self, prompts, completions, vocab_size=None, prompt_label_spans=None, teacher_prompts=None,
                 teacher_tags=None, images=None) -> dict:
        """build_batch's padded tensors, or (--padding_free) one sequence of the rows (gkd.packing.pack_batch).
        teacher_prompts: per row its teacher prompt (OPSD) or None; if any row has one, teacher_* tensors hold
        what the teacher reads: every row's teacher prompt (or its prompt) before the same completion.
        teacher_tags: per row, what routes it to one of several served teachers (kept as a list). images: per
        row, its image references; pixel_inputs then holds what both models' image tokens read (packed: the
        rows' pictures in order, as one row's, as their image tokens follow each other in the sequence), and
        teacher_pixel_inputs what the teacher's view reads (its rows padded, its pictures by its processor)."""
        tensors = build_batch(prompts, completions, self.pad_token_id, vocab_size, prompt_label_spans)
        tensors = pack_batch(tensors) if self.padding_free else tensors
        images = images if images and any(images) else None
        if images:
            tensors["pixel_inputs"] = pixel_inputs(self.processor, [sum(images, [])] if self.padding_free else images)
        if teacher_tags and any(tag is not None for tag in teacher_tags):
            tensors["teacher_tags"] = list(teacher_tags)
        if teacher_prompts and any(prompt is not None for prompt in teacher_prompts):
            view = build_batch([own if teacher is None else teacher for own, teacher in zip(prompts, teacher_prompts)],
                               completions, self.pad_token_id, vocab_size)
            tensors.update({f"teacher_{name}": tensor for name, tensor in view.items()})
            if images and (self.padding_free or self.teacher_processor is not self.processor):
                tensors["teacher_pixel_inputs"] = pixel_inputs(self.teacher_processor, images)
        return tensors

    def _batch_tensors(self, batch: dict, sources: list[str]) -> dict:
        prompts, completions = batch["prompt_ids"], batch["completion_ids"]
        tensors = self._tensors(prompts, completions, self.vocab_size, batch.get("prompt_label_spans"),
                                batch.get("teacher_prompt_ids"), batch.get("teacher_tags"), batch.get("images"))
        tensors["from_student"] = torch.tensor([source == "student" for source in sources])
        for source in sources:
            self._metrics[f"samples_{source}"] += 1
        self._metrics["completion_tokens"] += sum(len(completion) for completion in completions)
        self._metrics["tokens"] += sum(len(prompt) + len(completion) for prompt, completion in zip(prompts, completions))
        return tensors

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the step's micro-batches, give each sample its completion, and count the step's completion
        tokens over all processes: the loss divisor, recounted after generation replaced completions."""
        global_step = self.state.global_step
        if self._metrics_since_step is None:
            self._metrics_since, self._metrics_since_step = time.perf_counter(), global_step
        step, self._next_step = self._next_step, None
        if step is None:  # none drawn ahead: no --async_generate, or the epoch's first step
            step = self._draw_step(super().get_batch_samples(epoch_iterator, num_batches, device)[0], global_step)
        # --async_generate: the next step's micro-batches, while this epoch has them and training goes on
        if self.gkd.async_generate and global_step + 1 < self.state.max_steps:
            next_batches, _ = super().get_batch_samples(epoch_iterator, self.args.gradient_accumulation_steps, device)
            self._next_step = self._draw_step(next_batches, global_step + 1) if next_batches else None
        self._complete_step(step, self._next_step)
        batch_samples, sources, indices = step.batches, step.sources, step.indices
        # For the step's forwards, if no teacher generation brought it (it goes back before the optimizer runs).
        self.teacher.load()
        self._step_samples = [(global_step + 1, batch_indices, batch_sources, batch["prompt_ids"], batch["completion_ids"])
                              for batch, batch_sources, batch_indices in zip(batch_samples, sources, indices)]
        batch_samples = [self._batch_tensors(batch, batch_sources)
                         for batch, batch_sources in zip(batch_samples, sources)]
        for micro_batch_index, batch in enumerate(batch_samples):
            batch["micro_batch"] = micro_batch_index  # compute_loss finds the samples' texts for the log by it
        completion_tokens = sum(int(batch["labels"].ne(IGNORE_INDEX).sum()) for batch in batch_samples)
        completion_tokens = torch.tensor(completion_tokens, device=device)
        if self.accelerator.num_processes > 1:
            completion_tokens = self.accelerator.gather(completion_tokens).sum()
        return batch_samples, completion_tokens

    # ------------------------------------------------------------------ the loss

    @staticmethod
    def _loss_batch(inputs, sft: bool) -> LossBatch:
        """sft: the cross-entropy's rows (non-student samples), per position in a padding-free sequence."""
        sft_rows = ~inputs["from_student"] if sft else None
        teacher_view, pixels = None, inputs.get("pixel_inputs")
        if "teacher_input_ids" in inputs:  # OPSD: the teacher reads its own prompts (padded rows, never packed)
            teacher_view = LossBatch(inputs["teacher_input_ids"], inputs["teacher_attention_mask"],
                                     inputs["teacher_labels"], pixel_inputs=inputs.get("teacher_pixel_inputs", pixels))
        packed = "position_ids" in inputs  # padding-free: one sequence, the rows told apart by position_ids
        if packed and sft_rows is not None:
            sft_rows = sft_rows[inputs["row_ids"]]
        return LossBatch(inputs["input_ids"], None if packed else inputs["attention_mask"], inputs["labels"], sft_rows,
                         inputs.get("position_ids"), teacher_view, inputs.get("teacher_tags"), pixels)

    def _loss_sums(self, model, inputs, sft: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed generalized JSD and summed cross-entropy (on non-student samples; 0 when sft is False or
        sft_alpha is 0) of one micro-batch. self.gkd_loss (gkd/losses) runs both models as its implementation
        needs; model may be a DDP/DeepSpeed wrapper, whose forward it calls. The teacher is on the device."""
        batch = self._loss_batch(inputs, sft and self.gkd.sft_alpha > 0)
        return tuple(self.gkd_loss(model, self.teacher, batch, student_module=self.accelerator.unwrap_model(model)))

    def _log_samples(self, inputs, records) -> None:
        """--log_completions: this micro-batch's samples with their summed divergences (from the loss's own
        per-position values) and counted positions."""
        step, indices, sources, prompts, completions = self._step_samples[inputs["micro_batch"]]
        targets = self._loss_batch(inputs, sft=False).targets()
        if "row_ids" in inputs:
            row_of_position = inputs["row_ids"].reshape(-1)
        else:
            row_of_position = torch.arange(targets.shape[0], device=targets.device).repeat_interleave(targets.shape[1])
        counted = targets.reshape(-1).ne(IGNORE_INDEX)
        tokens = torch.zeros(len(prompts), dtype=torch.long).index_add_(
            0, row_of_position[counted].cpu(), torch.ones(int(counted.sum()), dtype=torch.long))
        self.completion_log.add(step, indices, sources, prompts, completions,
                                per_row_sums(records, row_of_position, len(prompts)), tokens)

    def compute_loss_context_manager(self):
        """The loss runs under the accelerator's autocast: accelerate casts only inside the prepared model's
        forward, and the fused loss projects the LM heads outside it, in autocast's dtype when it is on."""
        stack = super().compute_loss_context_manager()
        stack.enter_context(self.accelerator.autocast())
        return stack

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.completion_log is not None and "micro_batch" in inputs:
            with recording_divergences() as records:
                jsd_sum, sft_sum = self._loss_sums(model, inputs)
            self._log_samples(inputs, records)
        else:
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
        self.teacher.load()
        totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)  # summed JSD, tokens
        samples = 0
        for inputs in dataloader:
            batch = self._tensors(inputs["prompt_ids"], inputs["completion_ids"],
                                  prompt_label_spans=inputs.get("prompt_label_spans"),
                                  teacher_prompts=inputs.get("teacher_prompt_ids"),
                                  teacher_tags=inputs.get("teacher_tags"), images=inputs.get("images"))
            batch = self._prepare_inputs(batch)  # tensors (and the pixel inputs' dict) to the device
            batch["from_student"] = torch.zeros(len(inputs["prompt_ids"]), dtype=torch.bool, device=self.args.device)
            with torch.no_grad(), self.compute_loss_context_manager():
                jsd_sum, _ = self._loss_sums(model, batch, sft=False)  # eval_loss is the JSD alone: no SFT term
            totals += torch.stack([jsd_sum.double(), batch["labels"].ne(IGNORE_INDEX).sum().double()])
            samples += len(inputs["prompt_ids"])
        model.train(was_training)
        self.teacher.offload()
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
