"""gkd-train: distil a teacher into a student with GKD. Reads top to bottom as the recipe it runs."""

import dataclasses
import logging
import os
import shutil
import sys

from transformers import set_seed

from gkd.config import GKDConfig, parse_config
from gkd.data import check_chat_template, load_examples
from gkd.errors import GKDUserError
from gkd.launch import run_under_torchrun_if_asked
from gkd.models import (
    apply_lora, check_vocabularies, generation_config, load_model, load_tokenizer, resolve_dtypes, stop_token_ids,
    tokenizer_fingerprint,
)

logger = logging.getLogger("gkd")


def _teacher_tokenizer(config: GKDConfig):
    try:
        return load_tokenizer(config.model.teacher_model, config.model.trust_remote_code, "--teacher_model")
    except GKDUserError:
        logger.warning("no tokenizer beside --teacher_model %s: assuming it is the student's",
                       config.model.teacher_model)
        return None


def _vllm_dtype(config: GKDConfig) -> str:
    if config.model.torch_dtype:
        return config.model.torch_dtype
    return "bfloat16" if config.training.bf16 else "float16" if config.training.fp16 else "auto"


def make_student_engine(config: GKDConfig, student, tokenizer):
    """The engine that samples the student's completions: None (transformers generate, the default),
    vLLM in this process (colocate), or a gkd-rollout server."""
    vllm = config.vllm
    if not vllm.use_vllm:
        return None
    if vllm.vllm_mode == "server":
        from gkd.sampling.vllm_server import VLLMServerEngine

        return VLLMServerEngine(vllm.vllm_server_host, vllm.vllm_server_port, vllm.vllm_server_timeout,
                                model=student, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    from gkd.sampling.vllm_engine import VLLMEngine

    # Without --vllm_max_model_len, --max_length bounds what vLLM must hold.
    engine_args = dataclasses.replace(vllm, vllm_max_model_len=vllm.vllm_max_model_len or config.data.max_length)
    return VLLMEngine.from_arguments(
        config.model.model, engine_args, sleep_level=vllm.sleep_level, dtype=_vllm_dtype(config),
        seed=config.training.seed, trust_remote_code=config.model.trust_remote_code,
    )


def train(config: GKDConfig) -> None:
    from gkd.trainer import GKDTrainer  # imports torch-heavy Trainer machinery; not needed to refuse bad flags

    model_args, data_args, gkd_args, training = config.model, config.data, config.gkd, config.training
    set_seed(training.seed)
    _ = training.device  # forms the process group now: vLLM's colocated engine joins it

    # Tokenizer and data first: a bad row should stop the run before minutes of model loading.
    tokenizer = load_tokenizer(model_args.model, model_args.trust_remote_code)
    check_chat_template(tokenizer, model_args.model)
    stop_ids = stop_token_ids(tokenizer, generation_config(model_args.model, model_args.trust_remote_code))
    need_completions = gkd_args.lmbda < 1 and not gkd_args.seq_kd
    data_settings = dict(seed=training.seed, system=data_args.system, max_length=data_args.max_length,
                         truncation_strategy=data_args.truncation_strategy)
    train_examples = load_examples(
        data_args.dataset, tokenizer, stop_ids, need_completions=need_completions,
        reason_completions_needed=f"--lmbda {gkd_args.lmbda} with --seq_kd false", **data_settings,
    )
    eval_examples = load_examples(
        data_args.val_dataset, tokenizer, stop_ids, need_completions=True,
        reason_completions_needed="the evaluation loss on --val_dataset", **data_settings,
    ) if data_args.val_dataset else None
    logger.info("%d training rows, %d evaluation rows", len(train_examples), len(eval_examples or []))

    student_dtype, teacher_dtype = resolve_dtypes(model_args.torch_dtype, training.bf16, training.fp16)
    student = load_model(model_args.model, student_dtype, model_args.attn_impl, model_args.trust_remote_code,
                         "--model")
    teacher = load_model(model_args.teacher_model, teacher_dtype, model_args.attn_impl,
                         model_args.trust_remote_code, "--teacher_model")
    compared_vocab_size = check_vocabularies(tokenizer, _teacher_tokenizer(config), student, teacher,
                                             model_args.model, model_args.teacher_model)
    if config.tuner.tuner_type == "lora":
        student = apply_lora(student, config.tuner)

    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=training, gkd_args=gkd_args,
        stop_token_ids=stop_ids, compared_vocab_size=compared_vocab_size, max_length=data_args.max_length,
        train_dataset=train_examples, eval_dataset=eval_examples, processing_class=tokenizer,
        student_engine=make_student_engine(config, student, tokenizer),
    )
    resume = training.resume_from_checkpoint
    if resume is not None and resume.lower() in ("true", "last"):
        resume = True
    try:
        trainer.train(resume_from_checkpoint=resume)
    except ValueError as error:
        if resume and "checkpoint" in str(error).lower():
            raise GKDUserError(f"--resume_from_checkpoint {training.resume_from_checkpoint}: {error}") from None
        raise

    if config.tuner.tuner_type == "lora":
        # A plain Hugging Face model in output_dir; the adapter itself stays in the checkpoints.
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(training.output_dir)
            tokenizer.save_pretrained(training.output_dir)
    else:
        trainer.save_model(training.output_dir)
    if trainer.is_world_process_zero():
        logger.info("saved the distilled student to %s", training.output_dir)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run_under_torchrun_if_asked("gkd.cli.train", argv, "gkd-train")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        # Several processes (torchrun, accelerate launch --multi_gpu) on a machine without CUDA: transformers
        # forms the gloo group only when told it trains on the CPU (accelerate launch says "False").
        if not torch.cuda.is_available():
            os.environ["ACCELERATE_USE_CPU"] = "true"
    output_dir = None
    created_output_dir = False
    try:
        config = parse_config(argv)
        output_dir = config.training.output_dir
        created_output_dir = not os.path.exists(output_dir)
        train(config)
    except GKDUserError as error:
        # Bad input leaves nothing behind that this run made; checkpoints, once written, are kept.
        if created_output_dir and os.path.isdir(output_dir) and not any(
            name.startswith("checkpoint-") for name in os.listdir(output_dir)
        ):
            shutil.rmtree(output_dir, ignore_errors=True)
        print(f"gkd-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gkd-train: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
