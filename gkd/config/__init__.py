"""gkd's configuration: the flag dataclasses (arguments), transformers' TrainingArguments with ms-swift's
defaults (training), command line and YAML parsing (parsing), refusals (checks), and the flags of
gkd-infer and gkd-rollout (tools)."""

from gkd.config.arguments import (DataArguments, GKDArguments, GKDConfig, ModelArguments, TunerArguments,
                                  VLLMArguments, VLLMEngineArguments)
from gkd.config.checks import check_top_k, check_vllm_engine_arguments, in_range, raise_first_problem
from gkd.config.parsing import build_parser, deepspeed_config_path, parse_config, parse_dataclasses
from gkd.config.training import SwiftTrainingArguments, set_mixed_precision

__all__ = [
    "DataArguments", "GKDArguments", "GKDConfig", "ModelArguments", "SwiftTrainingArguments", "TunerArguments",
    "VLLMArguments", "VLLMEngineArguments", "build_parser", "check_top_k", "check_vllm_engine_arguments",
    "deepspeed_config_path", "in_range", "parse_config", "parse_dataclasses", "raise_first_problem",
    "set_mixed_precision",
]
