"""Command line and --config YAML to gkd's argument dataclasses.

transformers' HfArgumentParser turns the dataclasses into argparse groups. `--config FILE.yaml` takes the
same keys; flags on the command line win. Errors are one line, naming the YAML line a value came from.
"""

import argparse
import importlib.util
import logging
import os
import sys

import yaml
from transformers import HfArgumentParser
from transformers.trainer_utils import IntervalStrategy

from gkd.config.arguments import (DataArguments, GKDArguments, GKDConfig, ModelArguments, TunerArguments,
                                  VLLMArguments)
from gkd.config.checks import check_config
from gkd.config.training import SwiftTrainingArguments, derived_defaults
from gkd.errors import GKDUserError

logger = logging.getLogger(__name__)

ARGUMENT_CLASSES = (GKDArguments, ModelArguments, DataArguments, TunerArguments, VLLMArguments,
                    SwiftTrainingArguments)


class _OneLineErrorParser(HfArgumentParser):
    """argparse prints its whole usage (over a hundred flags here) before an error; print one line."""

    def error(self, message):
        raise GKDUserError(f"{message} (see {self.prog} --help)")


def build_parser(argument_classes=ARGUMENT_CLASSES, prog: str = "gkd-train", usage: str | None = None,
                 description: str | None = None) -> HfArgumentParser:
    parser = _OneLineErrorParser(
        argument_classes,
        prog=prog,
        usage=usage or f"{prog} --model STUDENT --teacher_model TEACHER --dataset DATA [DATA ...] --output_dir OUT [flags]",
        description=description or "On-policy knowledge distillation (GKD) of a student model from a teacher.",
    )
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="YAML file with any of these flags as keys; command-line flags win."
    )
    return parser


def _yaml_to_argv(key: str, value) -> list[str]:
    flag = f"--{key}"
    if value is None:
        return []
    if isinstance(value, bool):
        return [flag, "true" if value else "false"]
    if isinstance(value, list):
        return [flag, *[str(item) for item in value]]
    return [flag, str(value)]


def _read_yaml_config(path: str, parser: HfArgumentParser) -> tuple[list[str], dict[str, str]]:
    """Turn the YAML file into argv tokens (placed before the real ones so that those win).

    Returns the tokens and, for each key, where it stands ("file:line"), to name in later errors.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except OSError as error:
        raise GKDUserError(f"--config {path}: cannot read it ({error.strerror})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise GKDUserError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if values is None:
        return [], {}
    if not isinstance(values, dict):
        raise GKDUserError(f"{path}: expected a mapping of flag names to values, got {type(values).__name__}")

    known = {option[2:] for action in parser._actions for option in action.option_strings}
    line_of = {key_node.value: key_node.start_mark.line + 1 for key_node, _ in node.value}
    argv, origin = [], {}
    for key, value in values.items():
        where = f"{path}:{line_of.get(str(key), '?')}"
        key = str(key).lstrip("-").replace("-", "_")
        if key not in known or key in ("config", "help"):
            raise GKDUserError(f"{where}: unknown key '{key}' (keys are {parser.prog}'s flag names)")
        if isinstance(value, dict):
            raise GKDUserError(f"{where}: '{key}' takes a value or a list, not a mapping")
        tokens = _yaml_to_argv(key, value)
        try:
            parser.parse_known_args(tokens)
        except GKDUserError as error:
            raise GKDUserError(f"{where}: {error}") from None
        argv += tokens
        origin[key] = where
    return argv, origin


DEEPSPEED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "deepspeed_configs")
# ms-swift's names, with its configs' contents (swift/config/*.json).
DEEPSPEED_NAMES = ("zero0", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")


def deepspeed_config_path(value: str) -> str:
    """--deepspeed zero2 (ms-swift's shorthand) means gkd's shipped zero2.json; a path stays a path."""
    return os.path.join(DEEPSPEED_CONFIGS, f"{value}.json") if value in DEEPSPEED_NAMES else value


DEEPSPEED_FLAGS = ("--deepspeed", "--teacher_deepspeed")


def _expand_deepspeed_names(argv: list[str]) -> list[str]:
    """--deepspeed NAME and --deepspeed=NAME (and --teacher_deepspeed's) become --deepspeed PATH."""
    expanded = []
    for token in argv:
        flag, equals, value = token.partition("=")
        if equals and flag in DEEPSPEED_FLAGS:
            expanded += [flag, value]
        else:
            expanded.append(token)
    return [deepspeed_config_path(token) if index and expanded[index - 1] in DEEPSPEED_FLAGS else token
            for index, token in enumerate(expanded)]


def parse_dataclasses(parser: HfArgumentParser, argv: list[str] | None) -> tuple[list, dict[str, str]]:
    """Parse argv, after the --config file's values, into the parser's dataclasses.

    Returns the dataclass instances and where each key from the config file stands ("file:line").
    Raises GKDUserError; loads nothing heavy.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config")
    known, _ = pre_parser.parse_known_args(argv)
    origin: dict[str, str] = {}
    if known.config:
        config_argv, origin = _read_yaml_config(known.config, parser)
        argv = config_argv + argv
    argv = _expand_deepspeed_names(argv)
    # ms-swift's defaults that hang on other flags (the learning rate on the tuner, ...): parse once for them.
    raw, _ = parser.parse_known_args(argv)
    if hasattr(raw, "learning_rate"):
        parser.set_defaults(**derived_defaults(raw))
    for index, token in enumerate(argv[:-1]):
        if token not in DEEPSPEED_FLAGS:
            continue
        where = f" (from {origin[token[2:]]})" if token[2:] in origin else ""
        if importlib.util.find_spec("deepspeed") is None:
            raise GKDUserError(f"{token} needs DeepSpeed: pip install 'gkd[deepspeed]'{where}")
        if not os.path.isfile(argv[index + 1]):
            raise GKDUserError(f"{token} {argv[index + 1]}: neither one of {', '.join(DEEPSPEED_NAMES)} nor a "
                               f"JSON file{where}")
    try:
        *instances, _ = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except GKDUserError:
        raise
    except ValueError as error:
        # TrainingArguments.__post_init__ refuses contradictions (e.g. --bf16 with --fp16) this way.
        raise GKDUserError(str(error).strip().splitlines()[0]) from None
    return instances, origin


def parse_config(argv: list[str] | None = None, prog: str = "gkd-train") -> GKDConfig:
    """Parse and check gkd-train's arguments. Raises GKDUserError; loads nothing heavy."""
    (gkd, model, data, tuner, vllm, training), origin = parse_dataclasses(build_parser(prog=prog), argv)
    config = GKDConfig(model=model, data=data, gkd=gkd, tuner=tuner, vllm=vllm, training=training)
    check_config(config, origin)
    settle_evaluation(config)
    return config


def settle_evaluation(config: GKDConfig) -> None:
    """As ms-swift (sft_args.py _init_eval_strategy): no validation data means no evaluation, whatever
    --eval_strategy says; no evaluation means no rows held out by --split_dataset_ratio; --val_dataset
    replaces the split."""
    data, training = config.data, config.training
    if data.val_dataset:
        data.split_dataset_ratio = 0.0
    if not data.val_dataset and not data.split_dataset_ratio and training.eval_strategy != IntervalStrategy.NO:
        logger.info("--eval_strategy %s: no validation data (--val_dataset, --split_dataset_ratio), so no evaluation",
                    training.eval_strategy.value)
        training.eval_strategy = IntervalStrategy.NO
    if training.eval_strategy == IntervalStrategy.NO and data.split_dataset_ratio:
        logger.info("--split_dataset_ratio %s: no evaluation (--eval_strategy no), so no rows are held out",
                    data.split_dataset_ratio)
        data.split_dataset_ratio = 0.0
