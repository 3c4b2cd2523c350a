"""transformers' TrainingArguments with ms-swift's defaults for GKD.

ms-swift overrides many of transformers' defaults (swift/trainers/arguments.py, swift/arguments/sft_args.py);
a swift user who leaves a flag unset expects ms-swift's value, so gkd takes the same ones. Each default below
names the ms-swift file it was read from (docs/ms-swift-gkd-reference.md has the line numbers). Defaults that
depend on other flags (the learning rate on the tuner, evaluation on whether there is validation data, the
output folder on the model) come from `derived_defaults`; the mixed precision, which depends on the
checkpoint's dtype, from `set_mixed_precision` once the checkpoint is at hand.
"""

import math
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from gkd.errors import GKDUserError
from gkd.sharding.cpu_world import settle_cpu_world

MS_SWIFT_ACCUMULATION_TARGET = 16  # ms-swift: ceil(16 / per_device_train_batch_size / world_size)


@dataclass
class SwiftTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments, listed under their own heading in --help after gkd's, with
    ms-swift's defaults, ms-swift's --warmup_ratio (transformers 5 dropped it) and a --report_to that
    takes several names."""

    _argument_group_name = "training (transformers TrainingArguments, ms-swift's defaults)"

    output_dir: str | None = field(
        default=None, metadata={"help": "Where runs go. Default: output/<model name>, as ms-swift."}
    )
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Samples per process per micro-batch."})
    per_device_eval_batch_size: int = field(default=1, metadata={"help": "Evaluation samples per process per batch."})
    gradient_accumulation_steps: int | None = field(
        default=None,
        metadata={"help": "Micro-batches per optimizer step. Default: ceil(16 / per_device_train_batch_size / "
                  "processes), as ms-swift."},
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate. Default: 1e-5 for --tuner_type full, 1e-4 for lora."}
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (transformers' names)."})
    warmup_ratio: float = field(
        default=0.0,
        metadata={"help": "Share in [0, 1) of the training steps spent warming the learning rate up linearly "
                  "(ceil(ratio x steps) steps, as ms-swift); not together with --warmup_steps."},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in the backward pass to save memory (transformers' newer name: "
                  "--activation_checkpointing). Default: true, as ms-swift."},
    )
    logging_steps: float = field(default=5, metadata={"help": "Optimizer steps between two training logs."})
    logging_first_step: bool = field(default=True, metadata={"help": "Log the first step too."})
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "Integrations the logs go to, one or more (tensorboard swanlab wandb ...); none: "
                  "only the console and logging.jsonl; all: every installed one."},
    )
    dataloader_num_workers: int | None = field(
        default=None, metadata={"help": "Data-loading worker processes. Default: 1 (0 on Windows), as ms-swift."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision. Default: from --torch_dtype, as ms-swift."}
    )
    fp16: bool | None = field(
        default=None, metadata={"help": "fp16 mixed precision. Default: from --torch_dtype, as ms-swift."}
    )
    eval_strategy: str | None = field(
        default=None,
        metadata={"help": "When to evaluate: no, steps, epoch. Default: as --save_strategy when there is "
                  "validation data (--val_dataset or --split_dataset_ratio), else no."},
    )
    ddp_timeout: int = field(default=18000000, metadata={"help": "Seconds a process waits for the others."})

    def __post_init__(self):
        ratio = self.warmup_ratio
        if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0 <= ratio < 1:
            raise GKDUserError(f"--warmup_ratio {ratio}: must be in [0, 1)")
        if ratio and self.warmup_steps:
            raise GKDUserError(f"--warmup_ratio {ratio}: not together with --warmup_steps {self.warmup_steps}")
        if ratio:  # transformers reads a float warmup_steps below 1 as a ratio: ceil(ratio x total steps)
            self.warmup_steps = float(ratio)
        if self.per_device_train_batch_size < 1:
            raise GKDUserError(f"--per_device_train_batch_size {self.per_device_train_batch_size}: must be >= 1")
        if self.gradient_accumulation_steps is None:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            self.gradient_accumulation_steps = max(1, math.ceil(
                MS_SWIFT_ACCUMULATION_TARGET / self.per_device_train_batch_size / world_size))
        if self.learning_rate is None:
            self.learning_rate = 1e-5  # --tuner_type full; derived_defaults gives lora its 1e-4
        if self.dataloader_num_workers is None:
            self.dataloader_num_workers = 0 if sys.platform == "win32" else 1
        if self.eval_strategy is None:
            self.eval_strategy = "no"
        # On unless told otherwise, as ms-swift. transformers >= 5.21 calls it activation_checkpointing and warns
        # on ms-swift's name, so the value moves to the new field (without the warning) where there is one.
        new_name = getattr(self, "activation_checkpointing", None)
        if self.gradient_checkpointing is None and new_name is None:
            self.gradient_checkpointing = True
        if hasattr(self, "activation_checkpointing"):
            self.activation_checkpointing = self.gradient_checkpointing if new_name is None else new_name
            self.gradient_checkpointing = None  # transformers mirrors the new field into it
        settle_cpu_world(self)  # several processes without CUDA: before transformers forms their group
        super().__post_init__()


def derived_defaults(raw) -> dict:
    """ms-swift's defaults that depend on other flags, from the command line parsed once without them
    (raw: an argparse Namespace of every flag). Returned as argparse defaults: flags given still win."""
    defaults = {}
    if raw.learning_rate is None:
        lora = (raw.tuner_type or raw.train_type or "full") != "full"
        defaults["learning_rate"] = 1e-4 if lora else 1e-5  # ms-swift: sft_args.py, by tuner
    has_validation = bool(raw.val_dataset) or (raw.split_dataset_ratio or 0) > 0
    if raw.eval_strategy is None:
        defaults["eval_strategy"] = str(raw.save_strategy) if has_validation else "no"
    if raw.eval_steps is None and has_validation:
        defaults["eval_steps"] = raw.save_steps  # ms-swift: eval_steps = save_steps (transformers: logging_steps)
    if raw.output_dir is None and raw.model:
        defaults["output_dir"] = os.path.abspath(os.path.join("output", os.path.basename(raw.model.rstrip("/"))))
    return defaults


def default_torch_dtype(checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """ms-swift's dtype when --torch_dtype is unset (swift/model/utils.py get_default_torch_dtype): the
    checkpoint's, else bfloat16 on a GPU that has it, float16 on other GPUs, float32 on a CPU."""
    if checkpoint_dtype is not None:
        return checkpoint_dtype
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def set_mixed_precision(training: TrainingArguments, dtype: torch.dtype) -> None:
    """--bf16/--fp16 left unset follow the weight dtype as in ms-swift (model_args.py _init_mixed_precision):
    bfloat16 weights train under bf16, float16 and float32 weights under fp16 on GPUs. Without a GPU
    float32 stays float32 (no fp16 autocast runs on a CPU; DeepSpeed would cast the whole model to float16)."""
    if training.fp16 is not None or training.bf16 is not None:
        training.fp16, training.bf16 = bool(training.fp16), bool(training.bf16)
    else:
        training.bf16 = dtype == torch.bfloat16
        training.fp16 = not training.bf16 and (dtype == torch.float16 or torch.cuda.is_available())
    training.mixed_precision = "fp16" if training.fp16 else "bf16" if training.bf16 else "no"
    # TrainingArguments filled DeepSpeed's "auto" precision fields before the precision was known: fill them
    # again from scratch, as its __post_init__ does (a second pass over filled fields would only report a
    # mismatch, which transformers raises when training starts).
    if training.deepspeed:
        from accelerate.utils import DeepSpeedPlugin
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        training.hf_deepspeed_config = HfTrainerDeepSpeedConfig(training.deepspeed)
        training.hf_deepspeed_config.trainer_config_process(training)
        training.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=training.hf_deepspeed_config)
    elif training.deepspeed_plugin is not None:  # accelerate launch's DeepSpeed config
        from accelerate.utils import DeepSpeedPlugin

        training.deepspeed_plugin = DeepSpeedPlugin()
        training.deepspeed_plugin.set_mixed_precision(training.mixed_precision)
        training.deepspeed_plugin.set_deepspeed_weakref()


def student_weight_dtype(dtype: torch.dtype, training: TrainingArguments) -> torch.dtype:
    """fp16 mixed precision keeps float32 master weights: its gradient scaler refuses float16 gradients
    (ms-swift upcasts trainable float16 parameters likewise); every other dtype trains as loaded."""
    return torch.float32 if dtype == torch.float16 and training.fp16 else dtype
