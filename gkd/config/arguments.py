"""gkd-train's flags: dataclasses whose fields carry their help text.

Names, meanings and defaults are ms-swift's (`swift rlhf --rlhf_type gkd`, swift/arguments/), so a swift
command line pastes in. A flag that belongs to a capability gkd does not have yet still parses, and the
run stops before loading anything with one line that names it (gkd.config.checks).
"""

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

from gkd.errors import GKDUserError


@dataclass
class HubArguments:
    """Where hub ids come from; shared by gkd-train, gkd-infer and gkd-rollout."""

    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag, commit) of --model."})
    use_hf: bool | None = field(
        default=None,
        metadata={"help": "Download hub ids from the Hugging Face Hub instead of ModelScope (as ms-swift; "
                  "also USE_HF=1). Default: ModelScope."},
    )


@dataclass
class ModelArguments(HubArguments):
    _argument_group_name = "models"

    model: str | None = field(default=None, metadata={"help": "Student: a local folder or a hub id."})
    teacher_model: str | None = field(
        default=None, metadata={"help": "Teacher: a local folder or a hub id. Must share the student's tokenizer. "
                                "Unset: self-distillation, the live student is its own teacher; equal to --model "
                                "with --tuner_type lora: the student with its adapters off (one copy of the weights)."}
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Accepted for ms-swift command lines; gkd reads the architecture from the checkpoint."},
    )
    teacher_model_type: str | None = field(default=None, metadata={"help": "As --model_type, for the teacher."})
    teacher_model_revision: str | None = field(default=None, metadata={"help": "Hub revision of --teacher_model."})
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = field(
        default=None,
        metadata={
            "help": "Weight dtype of both models, and the mixed precision unless --bf16/--fp16 say otherwise, as "
            "ms-swift: bfloat16 -> bf16, float16 or float32 -> fp16. Default: the student's config.json dtype, "
            "else bfloat16 on a GPU that has it, float16 on other GPUs, float32 on a CPU."
        },
    )
    attn_impl: str | None = field(
        default=None,
        metadata={"help": "Attention implementation: flash_attn (= flash_attention_2, as ms-swift), sdpa, eager, "
                  "or any other name transformers knows (default: the model's)."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the model repository's own Python code. Off unless you trust it."}
    )


@dataclass
class DataArguments:
    _argument_group_name = "data"

    dataset: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Training data, one or more ID_OR_PATH[:subset][#N]: .jsonl/.json/.csv/.parquet files, "
            "folders of them, or hub dataset ids. #N draws N rows (repeating the set when N > its size)."
        },
    )
    val_dataset: list[str] = field(
        default_factory=list, metadata={"help": "Evaluation data, same syntax as --dataset."}
    )
    system: str | None = field(
        default=None, metadata={"help": "System prompt for rows that have none."}
    )
    template: str | None = field(
        default=None,
        metadata={"help": "Accepted for ms-swift command lines; gkd renders prompts with the checkpoint's own chat "
                  "template."},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Longest prompt, in tokens (ms-swift: 'in GKD, max_length refers to max_prompt_length'); "
                  "a dataset row's prompt + completion must fit too. Generated completions are bounded by "
                  "--max_completion_length alone. Default: no bound."},
    )
    truncation_strategy: Literal["delete", "left", "right", "raise"] = field(
        default="delete",
        metadata={
            "help": "Rows longer than --max_length: delete them, cut the prompt's left end (and the "
            "completion's end if it alone is too long), cut the completion's right end, or stop with an error."
        },
    )
    dataset_num_proc: int = field(default=1, metadata={"help": "Processes that tokenise the rows (>= 1)."})
    load_from_cache_file: bool = field(
        default=False,
        metadata={"help": "Reuse the tokenised rows of an earlier run with the same data, tokenizer and settings."},
    )
    split_dataset_ratio: float = field(
        default=0.0,
        metadata={"help": "Share in [0, 1) of the --dataset rows held out (seeded by --data_seed, default 42) as the "
                  "evaluation set, evaluated every --eval_steps. Ignored with --val_dataset, as ms-swift."},
    )
    enable_thinking: bool | None = field(
        default=None, metadata={"help": "Passed to the chat template (Qwen3's thinking switch). Default: the template's."}
    )
    loss_scale: str | None = field(
        default=None,
        metadata={"help": "Which assistant turns are distilled: last_round (the last one; ms-swift's GKD default) "
                  "or default (every assistant turn of the conversation)."},
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Concatenate each micro-batch's rows into one sequence (position ids restart per row): "
                  "no padding is computed. Needs an attention that handles packed sequences."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack rows into bins of at most --packing_length tokens, one bin per sample slot "
                  "(implies --padding_free)."},
    )
    packing_length: int | None = field(
        default=None, metadata={"help": "Tokens per packing bin (default: --max_length)."}
    )

    def __post_init__(self):
        self.loss_scale = self.loss_scale or "last_round"  # ms-swift's GKD default (rlhf_args.py)
        self.padding_free = self.padding_free or self.packing  # as ms-swift: packed bins are padding-free


@dataclass
class GKDArguments:
    _argument_group_name = "gkd"

    rlhf_type: str = field(default="gkd", metadata={"help": "Accepted for ms-swift compatibility; only 'gkd'."})
    beta: float = field(
        default=0.5,
        metadata={
            "help": "Generalized JSD weight in [0, 1]: D = beta*KL(T||M) + (1-beta)*KL(S||M), "
            "M = beta*T + (1-beta)*S. 0 is exactly KL(teacher||student), 1 exactly KL(student||teacher)."
        },
    )
    lmbda: float = field(
        default=0.5,
        metadata={"help": "Probability in [0, 1] that a sample's completion is generated by the student."},
    )
    seq_kd: bool = field(
        default=False,
        metadata={"help": "Samples not generated by the student are generated by the teacher, not read from data."},
    )
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature (> 0) of generated completions."})
    top_k: int = field(default=-1, metadata={"help": "Sampling top-k (>= 1; -1 or 0: off, as ms-swift)."})
    top_p: float | None = field(default=None, metadata={"help": "Sampling top-p in (0, 1] (default: off)."})
    max_completion_length: int = field(
        default=512,
        metadata={"help": "Most tokens a generated completion may have.", "aliases": ["--max_new_tokens"]},
    )
    loss_temperature: float | None = field(
        default=None,
        metadata={
            "help": "Both models' logits are divided by this (> 0) in the loss. Default: --temperature, as "
            "ms-swift does."
        },
    )
    sft_alpha: float = field(
        default=0.0,
        metadata={"help": "Adds sft_alpha * cross-entropy on completions not generated by the student (>= 0)."},
    )
    loss_impl: Literal["fused", "chunked", "exact"] | None = field(
        default=None,
        metadata={
            "help": "How the loss is computed: fused with the LM heads (never full logits), chunked over "
            "positions, or exact. Default: fused where both models' logits are their LM head applied to their "
            "final hidden state (checked by running them at start), else chunked."
        },
    )
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Positions per chunk of the fused and chunked losses (default: theirs)."}
    )
    gkd_logits_topk: int | None = field(
        default=None,
        metadata={
            "help": "Compare only the teacher's top K tokens per position, both sides renormalised over them "
            "(a biased approximation that saves memory; see README)."
        },
    )
    gkd_logits_topk_tail: bool = field(
        default=False,
        metadata={"help": "With --gkd_logits_topk: add a bucket holding each side's probability outside the K."},
    )
    offload_teacher_model: bool = field(
        default=False,
        metadata={"help": "Keep the teacher in CPU memory, moving it to the device only for its forwards and "
                  "generations (slower; frees its device memory for the student)."},
    )
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={"help": "ZeRO-3 / FSDP: gather a sharded model's whole weights once per generation (fast). "
                  "false: generate with sharded weights, all processes stepping together (slower; for models "
                  "too big to gather on one device)."},
    )
    log_completions: bool = field(
        default=False,
        metadata={"help": "Write every trained sample's prompt, completion, source and loss to completions.jsonl "
                  "in the run folder."},
    )
    add_version: bool = field(
        default=True,
        metadata={"help": "Write the run into a new OUTPUT_DIR/vN-YYYYMMDD-HHMMSS folder, as ms-swift; false: "
                  "into --output_dir itself."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "With --add_version false: write into a non-empty --output_dir (files of the same name "
                  "are replaced)."},
    )
    teacher_model_server: str | None = field(
        default=None, metadata={"help": "The teacher as a vLLM OpenAI-compatible server (`vllm serve TEACHER "
                                "--max-logprobs K`): its URL, or ms-swift's JSON list of {url, tags} for several "
                                "teachers routed by --teacher_tag_key. Needs --gkd_logits_topk K."}
    )
    teacher_tag_key: str = field(default="dataset", metadata={
        "help": "What routes a row to one of several served teachers: 'dataset' (the --dataset entry it came "
                "from) or a column of the rows."})
    teacher_deepspeed: str | None = field(
        default=None,
        metadata={"help": "The teacher's DeepSpeed config (zero0 ... zero3_offload or a JSON file; default: the "
                  "student's --deepspeed). zero3 / zero3_offload partition it across the processes (offload: in "
                  "CPU memory) as an inference engine without optimizer; other stages keep it whole in each."},
    )
    async_generate: bool = field(default=False, metadata={
        "help": "Sample the next optimizer step's student completions ahead, from the weights before this step's "
                "update (one step off-policy): a gkd-rollout server (--vllm_mode server) samples them while this "
                "step trains; the other engines sample them in this step's call, beside this step's own. Each "
                "epoch's first step samples on-policy. ms-swift accepts the flag for GRPO only."})
    # ms-swift flags of capabilities gkd does not have yet: they parse, and gkd.config.checks stops the run.
    external_plugins: list[str] = field(
        default_factory=list, metadata={"help": "ms-swift plugin files: not supported (they register ms-swift classes)."}
    )
    multi_turn_scheduler: str | None = field(default=None, metadata={"help": "Multi-turn rollouts: not supported yet."})
    max_turns: int | None = field(default=None, metadata={"help": "Multi-turn rollouts: not supported yet."})

    def __post_init__(self):
        if self.loss_temperature is None:
            self.loss_temperature = self.temperature  # ms-swift divides the loss's logits by --temperature


@dataclass
class TunerArguments:
    _argument_group_name = "tuner"

    tuner_type: Literal["full", "lora"] | None = field(
        default=None, metadata={"help": "Train all student weights, or LoRA adapters (needs peft). Default: full."}
    )
    train_type: Literal["full", "lora"] | None = field(
        default=None, metadata={"help": "The older name of --tuner_type (same values)."}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank (>= 1)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (>= 1)."})
    lora_dropout: float = field(
        default=0.05, metadata={"help": "LoRA dropout in [0, 1); GKD trains without dropout, the adapters' included "
                                "(as ms-swift's GKD, through TRL), so it is accepted and has no effect."})
    target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get LoRA adapters; 'all-linear' means every linear layer but the head."},
    )
    freeze_vit: bool = field(default=True, metadata={"help": "Vision-language models: keep the vision tower frozen."})
    freeze_aligner: bool = field(
        default=True, metadata={"help": "Vision-language models: keep the vision-to-text projector frozen."}
    )
    freeze_llm: bool = field(default=False, metadata={"help": "Vision-language models: keep the language model frozen."})

    def __post_init__(self):
        if self.train_type and self.tuner_type and self.train_type != self.tuner_type:
            raise GKDUserError(f"--train_type {self.train_type}: the older name of --tuner_type, which says "
                               f"{self.tuner_type}; give one of them")
        self.tuner_type = self.tuner_type or self.train_type or "full"
        self.train_type = self.tuner_type


@dataclass
class VLLMEngineArguments:
    """How a vLLM engine is built; shared by gkd-train, gkd-infer and gkd-rollout."""

    _argument_group_name = "vllm engine"

    vllm_gpu_memory_utilization: float = field(
        default=0.9,
        metadata={"help": "Share of the GPU's memory in (0, 1] vLLM may take (weights and KV cache). Colocated "
                  "with training, leave room for the student, teacher and optimizer."},
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs one vLLM engine spans (>= 1)."})
    vllm_max_model_len: int | None = field(
        default=None,
        metadata={"help": "Longest prompt + completion vLLM holds (gkd-train's default: --max_length + "
                  "--max_completion_length; else the model's)."},
    )
    vllm_enforce_eager: bool = field(
        default=False, metadata={"help": "Run vLLM without CUDA graphs: slower, less memory, faster start."}
    )


@dataclass
class VLLMArguments(VLLMEngineArguments):
    """Whether and how gkd-train samples the student's completions with vLLM."""

    _argument_group_name = "vllm"

    use_vllm: bool = field(
        default=False,
        metadata={"help": "Sample the student's completions with vLLM instead of the default engine (the model itself) "
                  "(pip install 'gkd[vllm]')."},
    )
    vllm_mode: Literal["colocate", "server"] = field(
        default="colocate",
        metadata={"help": "colocate: a vLLM engine inside each training process, on its device. server: a "
                  "gkd-rollout server that the main training process talks to."},
    )
    sleep_level: int = field(
        default=0,
        metadata={"help": "Colocate on a GPU: between generations vLLM releases its KV cache (1) or also its "
                  "weights (2), waking them before the next weight sync. 0 keeps everything."},
    )
    vllm_server_host: str = field(default="127.0.0.1", metadata={"help": "Where gkd-rollout listens."})
    vllm_server_port: int = field(default=8000, metadata={"help": "gkd-rollout's HTTP port."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Seconds to wait for gkd-rollout to answer before giving up (> 0)."}
    )


@dataclass
class GKDConfig:
    """Everything gkd-train was told, in one object."""

    model: ModelArguments
    data: DataArguments
    gkd: GKDArguments
    tuner: TunerArguments
    vllm: VLLMArguments
    training: TrainingArguments  # gkd.config.training.SwiftTrainingArguments


