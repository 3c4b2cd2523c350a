"""gkd-infer's and gkd-rollout's configuration, in gkd-train's style (see gkd.config)."""

import math
from dataclasses import dataclass, field
from typing import Literal

from gkd.config.arguments import HubArguments, VLLMEngineArguments
from gkd.config.checks import check_top_k, check_vllm_engine_arguments, in_range, raise_first_problem
from gkd.config.parsing import build_parser, parse_dataclasses


# ----------------------------------------------------------------------------- gkd-infer


@dataclass
class InferArguments(HubArguments):
    _argument_group_name = "gkd-infer"

    model: str | None = field(default=None, metadata={"help": "The model that samples (the teacher): folder or hub id."})
    model_type: str | None = field(default=None, metadata={"help": "Accepted; the architecture comes from the checkpoint."})
    template: str | None = field(default=None, metadata={"help": "Accepted; the checkpoint's own chat template renders."})
    val_dataset: list[str] = field(
        default_factory=list,
        metadata={"help": "Prompts, same ID_OR_PATH[:subset][#N] syntax and row shapes as gkd-train.",
                  "aliases": ["--dataset"]},
    )
    result_path: str | None = field(
        default=None, metadata={"help": "Output JSONL. Running again after a crash resumes it."}
    )
    infer_backend: Literal["transformers", "vllm", "pt"] = field(
        default="transformers", metadata={"help": "Sampling engine (pt: ms-swift's older name of transformers)."}
    )
    max_new_tokens: int = field(default=512, metadata={"help": "Most tokens per response.",
                                                       "aliases": ["--max_completion_length"]})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature (> 0; 0 = greedy)."})
    top_k: int | None = field(default=None, metadata={"help": "Sampling top-k (>= 1; -1 or 0: off; default: off)."})
    top_p: float | None = field(default=None, metadata={"help": "Sampling top-p in (0, 1] (default: off)."})
    seed: int = field(default=42, metadata={"help": "Seed of the row draw (#N) and of sampling."})
    num_return_sequences: int = field(default=1, metadata={"help": "Responses per prompt (one line each)."})
    max_batch_size: int = field(default=16, metadata={"help": "Prompts per generate call."})
    write_batch_size: int = field(
        default=1000, metadata={"help": "Rows sampled between two flushed writes of the result file."}
    )
    system: str | None = field(default=None, metadata={"help": "System prompt for rows that have none."})
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Weight dtype (auto: the checkpoint's)."}
    )
    attn_impl: str | None = field(default=None, metadata={"help": "Attention implementation, e.g. sdpa."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model repository's own code."})


def parse_infer_config(argv: list[str] | None = None) -> tuple[InferArguments, VLLMEngineArguments]:
    parser = build_parser(
        (InferArguments, VLLMEngineArguments), prog="gkd-infer",
        usage="gkd-infer --model TEACHER --val_dataset DATA [DATA ...] --result_path OUT.jsonl [flags]",
        description="Sample responses from a model (the teacher) into a JSONL file that gkd-train reads.",
    )
    (args, engine), origin = parse_dataclasses(parser, argv)
    inf = math.inf
    raise_first_problem([
        None if args.model else "--model is required (the model that samples)",
        None if args.val_dataset else "--val_dataset is required (one or more files, folders or hub ids)",
        None if args.result_path else "--result_path is required (a .jsonl file)",
        in_range("temperature", args.temperature, 0, inf),
        check_top_k(args.top_k),
        None if args.top_p is None else in_range("top_p", args.top_p, 0, 1, low_open=True),
        in_range("max_new_tokens", args.max_new_tokens, 1, inf),
        in_range("num_return_sequences", args.num_return_sequences, 1, inf),
        in_range("max_batch_size", args.max_batch_size, 1, inf),
        in_range("write_batch_size", args.write_batch_size, 1, inf),
        *check_vllm_engine_arguments(engine),
    ], origin)
    if args.infer_backend == "pt":  # ms-swift 3's name, still accepted by ms-swift 4
        args.infer_backend = "transformers"
    if args.top_k is not None and args.top_k <= 0:
        args.top_k = None  # -1 and 0: off, as None (a resumed result file compares settings)
    return args, engine


# ----------------------------------------------------------------------------- gkd-rollout


@dataclass
class RolloutArguments(HubArguments):
    _argument_group_name = "gkd-rollout"

    model: str | None = field(default=None, metadata={"help": "The student to serve: folder or hub id."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"help": "HTTP port."})
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Weight dtype in vLLM (auto: the checkpoint's)."}
    )
    seed: int = field(default=42, metadata={"help": "vLLM's seed (requests from gkd-train carry their own)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model repository's own code."})


def parse_rollout_config(argv: list[str] | None = None) -> tuple[RolloutArguments, VLLMEngineArguments]:
    parser = build_parser(
        (RolloutArguments, VLLMEngineArguments), prog="gkd-rollout",
        usage="gkd-rollout --model STUDENT [--host 127.0.0.1] [--port 8000] [vLLM engine flags]",
        description="Serve a student model with vLLM to gkd-train --use_vllm true --vllm_mode server.",
    )
    (args, engine), origin = parse_dataclasses(parser, argv)
    raise_first_problem([
        None if args.model else "--model is required (the student to serve)",
        in_range("port", args.port, 1, 65535),
        *check_vllm_engine_arguments(engine),
    ], origin)
    return args, engine
