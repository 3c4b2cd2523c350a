"""gkd-train: distil a teacher into a student with GKD. Reads top to bottom as the recipe it runs."""

import dataclasses
import logging
import os
import sys

from transformers import set_seed

from gkd.config import GKDConfig, parse_config, set_mixed_precision
from gkd.config.training import default_torch_dtype, student_weight_dtype
from gkd.data import load_examples, split_train_val
from gkd.errors import GKDUserError
from gkd.hub import resolve_model, use_hf_hub
from gkd.images import encoding_of
from gkd.launch import leave_finished_processes, run_under_torchrun_if_asked
from gkd.models import (
    DTYPES, apply_lora, check_vocabularies, checkpoint_dtype, disable_dropout, freeze_parts, frozen_parts,
    generation_config, load_model, load_processor, load_tokenizer, stop_token_ids, tokenizer_fingerprint,
)
from gkd.packing import pack_examples
from gkd.run_folder import RunFolderCallback, latest_checkpoint, remove_unfinished_run, start_run_folder
from gkd.sharding.zero import loading_teacher
from gkd.teachers import STUDENT, STUDENT_BASE
from gkd.teachers.served import ServedTeacher, parse_teacher_servers
from gkd.tokenize import check_chat_template

logger = logging.getLogger("gkd")


def run_arguments(config: GKDConfig) -> dict:
    """Every argument of the run in one flat mapping, as ms-swift's args.json has them (tokens masked)."""
    arguments = {}
    for section in (config.model, config.data, config.gkd, config.tuner, config.vllm):
        arguments.update(dataclasses.asdict(section))
    arguments.update(config.training.to_dict())  # transformers masks --hub_token and the like here
    return arguments


def checkpoint_to_resume(config: GKDConfig) -> str | None:
    """--resume_from_checkpoint: a folder as given; 'true'/'last': the newest checkpoint of the newest run
    under --output_dir (versioned runs each have their own folder)."""
    resume = config.training.resume_from_checkpoint
    if resume is None or resume.lower() not in ("true", "last"):
        return resume
    checkpoint = latest_checkpoint(config.training.output_dir, config.gkd.add_version)
    if checkpoint is None:
        raise GKDUserError(f"--resume_from_checkpoint {resume}: no checkpoint-* folder under "
                           f"{config.training.output_dir}")
    return checkpoint


def _teacher_tokenizer(teacher_dir: str, config: GKDConfig):
    try:
        return load_tokenizer(teacher_dir, config.model.trust_remote_code, "--teacher_model")
    except GKDUserError:
        logger.warning("no tokenizer beside --teacher_model %s: assuming it is the student's",
                       config.model.teacher_model)
        return None


def self_distillation_teacher(config: GKDConfig, student_dir: str, teacher_dir: str | None) -> str | None:
    """ms-swift's self-distillation: no --teacher_model makes the live student its own teacher; --teacher_model
    equal to --model with LoRA makes the student's base (its adapters off) the teacher, without a second
    copy. None: load --teacher_model (equal to --model with full training: a frozen copy, as ms-swift)."""
    if teacher_dir is None:
        choice, why = STUDENT, "no --teacher_model: self-distillation, the student's current weights are the teacher"
    elif os.path.realpath(teacher_dir) == os.path.realpath(student_dir) and config.tuner.tuner_type == "lora":
        choice, why = STUDENT_BASE, "--teacher_model is --model with LoRA: the teacher is the student, adapters off"
    else:
        return None
    gkd = config.gkd
    for flag, given in (("--offload_teacher_model true", gkd.offload_teacher_model),
                        (f"--teacher_deepspeed {gkd.teacher_deepspeed}", gkd.teacher_deepspeed)):
        if given:
            raise GKDUserError(f"{flag}: the teacher is the student itself ({why.split(':')[0]}), which runs "
                               "where the student does")
    logger.info(why)
    return choice


def make_student_engine(config: GKDConfig, student_dir: str, student, tokenizer, dtype, processor=None):
    """The engine that samples the student's completions: None (the default engine on the model itself),
    vLLM in this process (colocate), or a gkd-rollout server. processor: a vision-language student's, when
    rows have images (vLLM then takes each prompt's pictures)."""
    vllm = config.vllm
    if not vllm.use_vllm:
        return None
    if vllm.vllm_mode == "server":
        from gkd.sampling.vllm_server import VLLMServerEngine

        return VLLMServerEngine(vllm.vllm_server_host, vllm.vllm_server_port, vllm.vllm_server_timeout,
                                model=student, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    from gkd.sampling.vllm_engine import VLLMEngine

    # Without --vllm_max_model_len, vLLM holds the longest prompt (--max_length) and completion, which can be
    # far less KV cache than the model's whole context; never more than that context (vLLM refuses it).
    max_model_len = vllm.vllm_max_model_len
    if max_model_len is None and config.data.max_length is not None:
        context = getattr(student.config.get_text_config(), "max_position_embeddings", None)
        max_model_len = config.data.max_length + config.gkd.max_completion_length
        max_model_len = min(max_model_len, context) if context else max_model_len
    engine_args = dataclasses.replace(vllm, vllm_max_model_len=max_model_len)
    dtype_name = next(name for name, value in DTYPES.items() if value == dtype)
    return VLLMEngine.from_arguments(
        student_dir, engine_args, sleep_level=vllm.sleep_level, dtype=dtype_name,
        seed=config.training.seed, trust_remote_code=config.model.trust_remote_code, processor=processor,
    )


def _say_what_is_ignored(config: GKDConfig) -> None:
    model_args, data_args = config.model, config.data
    for flag, value in (("--model_type", model_args.model_type), ("--teacher_model_type", model_args.teacher_model_type),
                        ("--template", data_args.template)):
        if value:
            logger.info("%s %s: gkd reads the architecture and chat template from the checkpoint itself", flag, value)


# Processors of the families whose rows run packed as text rows do: position ids restarting at each row, the
# pictures in sequence order (Qwen2-VL's 3-D rope positions are not built by gkd).
PACKED_IMAGE_PROCESSORS = ("Idefics3Processor", "LlavaProcessor")


def check_image_run(config: GKDConfig, processor, teacher_dir: str | None, teacher_processor) -> None:
    """Rows with images: what reads them must be a vision-language model (teacher_processor: the teacher's
    processor, None for a teacher reading text alone), and what gkd cannot yet feed images to is refused in
    one line (never a run whose images some part silently ignores)."""
    model_args, data_args, gkd_args = config.model, config.data, config.gkd
    if teacher_dir and teacher_processor is None:
        raise GKDUserError(f"--teacher_model {model_args.teacher_model}: it reads text alone, and the rows have "
                           "images; the teacher must see the pictures it describes")
    unsupported = [
        (gkd_args.teacher_model_server, "--teacher_model_server: a served teacher is sent token ids alone, so the "
                                        "rows' images cannot reach it"),
        ((data_args.padding_free or data_args.packing) and type(processor).__name__ not in PACKED_IMAGE_PROCESSORS,
         f"--padding_free / --packing: gkd packs rows with images for {', '.join(PACKED_IMAGE_PROCESSORS)} (one "
         f"position per token); {type(processor).__name__} is not among them yet"),
    ]
    for applies, message in unsupported:
        if applies:
            raise GKDUserError(message)


def train(config: GKDConfig) -> None:
    from gkd.trainer import GKDTrainer  # imports torch-heavy Trainer machinery; not needed to refuse bad flags

    model_args, data_args, gkd_args, training = config.model, config.data, config.gkd, config.training
    set_seed(training.seed)
    _ = training.device  # forms the process group now: vLLM's colocated engine joins it
    resume = checkpoint_to_resume(config)
    _say_what_is_ignored(config)

    # Hub ids become local folders (ModelScope unless --use_hf), one download per machine.
    use_hf = use_hf_hub(model_args.use_hf)
    with training.main_process_first(local=True, desc="downloading the models"):
        student_dir = resolve_model(model_args.model, use_hf=use_hf, flag="--model",
                                    revision=model_args.model_revision)
        teacher_dir = model_args.teacher_model and resolve_model(
            model_args.teacher_model, use_hf=use_hf, flag="--teacher_model", revision=model_args.teacher_model_revision)

    teacher = None if gkd_args.teacher_model_server else self_distillation_teacher(config, student_dir, teacher_dir)

    # Tokenizer and data first: a bad row should stop the run before minutes of model loading.
    tokenizer = load_tokenizer(student_dir, model_args.trust_remote_code)
    check_chat_template(tokenizer, model_args.model)
    stop_ids = stop_token_ids(tokenizer, generation_config(student_dir, model_args.trust_remote_code))
    servers = parse_teacher_servers(gkd_args.teacher_model_server) if gkd_args.teacher_model_server else []
    if servers:  # each asked now what it serves: a wrong server stops the run before data and models load
        teacher = ServedTeacher(servers, gkd_args.gkd_logits_topk, gkd_args.loss_temperature,
                                gkd_args.gkd_logits_topk_tail, tokenizer, gkd_args.teacher_tag_key)
    processor = load_processor(student_dir, model_args.trust_remote_code)  # None: the student reads text alone
    teacher_processor = load_processor(teacher_dir, model_args.trust_remote_code, "--teacher_model") \
        if processor is not None and teacher_dir else None
    # A teacher encoding pictures unlike the student (another image size, tiling or number of image tokens)
    # reads them through its own processor: the examples then carry its own prompts.
    own_teacher_processor = teacher_processor if teacher_processor is not None and \
        encoding_of(teacher_processor) != encoding_of(processor) else None
    if own_teacher_processor is not None:
        logger.info("--teacher_model %s encodes pictures unlike the student: each reads them through its own "
                    "processor", model_args.teacher_model)
    need_completions = gkd_args.lmbda < 1 and not gkd_args.seq_kd
    data_seed = training.data_seed if training.data_seed is not None else 42  # ms-swift's data_seed default
    data_settings = dict(seed=data_seed, system=data_args.system, max_length=data_args.max_length,
                         truncation_strategy=data_args.truncation_strategy, dataset_num_proc=data_args.dataset_num_proc,
                         load_from_cache_file=data_args.load_from_cache_file, enable_thinking=data_args.enable_thinking,
                         loss_scale=data_args.loss_scale,
                         teacher_tag_key=gkd_args.teacher_tag_key if len(servers) > 1 else None,
                         processor=processor, teacher_processor=own_teacher_processor,
                         text_only_reason=f"--model {model_args.model} reads text alone")
    with training.main_process_first(local=True, desc="tokenizing"):  # one process fills the cache
        train_examples = load_examples(
            data_args.dataset, tokenizer, stop_ids, need_completions=need_completions,
            reason_completions_needed=f"--lmbda {gkd_args.lmbda} with --seq_kd false", **data_settings,
        )
        eval_examples = load_examples(
            data_args.val_dataset, tokenizer, stop_ids, need_completions=True,
            reason_completions_needed="the evaluation loss on --val_dataset", **data_settings,
        ) if data_args.val_dataset else None
    if not data_args.val_dataset and data_args.split_dataset_ratio > 0:  # ms-swift holds out a seeded share
        train_examples, eval_examples = split_train_val(train_examples, data_args.split_dataset_ratio, data_seed)
        if any(example["completion_ids"] is None for example in eval_examples):
            raise GKDUserError(f"--split_dataset_ratio {data_args.split_dataset_ratio}: the held-out rows need "
                               "completions for the evaluation loss, and some have none")
    if len(servers) > 1:  # every row must have a teacher
        teacher.check_rows(example["teacher_tag"] for example in train_examples + (eval_examples or []))
    images = any(example["images"] for example in train_examples + (eval_examples or []))
    if images:
        check_image_run(config, processor, teacher_dir, teacher_processor)
    logger.info("%d training rows, %d evaluation rows", len(train_examples), len(eval_examples or []))
    if data_args.packing:  # ms-swift's --packing: a training sample is a bin of rows
        train_examples = pack_examples(train_examples, data_args.packing_length or data_args.max_length)
        logger.info("packed into %d bins of at most %d tokens", len(train_examples),
                    data_args.packing_length or data_args.max_length)

    # Both models in one dtype, which also decides the mixed precision, as in ms-swift.
    if model_args.torch_dtype and model_args.torch_dtype != "auto":
        dtype = DTYPES[model_args.torch_dtype]
    else:
        dtype = default_torch_dtype(checkpoint_dtype(student_dir, model_args.trust_remote_code))
    set_mixed_precision(training, dtype)
    student = load_model(student_dir, student_weight_dtype(dtype, training), model_args.attn_impl,
                         model_args.trust_remote_code, "--model", images)
    is_frozen = frozen_parts(student, model_args.model, config.tuner.freeze_llm, config.tuner.freeze_vit,
                             config.tuner.freeze_aligner) if images else None
    if is_frozen is not None and config.tuner.tuner_type != "lora":
        freeze_parts(student, is_frozen)
    if teacher is None:  # --teacher_model, loaded in this process
        with loading_teacher(training, gkd_args.teacher_deepspeed):  # partitioned as it loads under ZeRO-3
            teacher = load_model(teacher_dir, dtype, model_args.attn_impl, model_args.trust_remote_code,
                                 "--teacher_model", images)
        compared_vocab_size = check_vocabularies(tokenizer, _teacher_tokenizer(teacher_dir, config), student,
                                                 teacher, model_args.model, model_args.teacher_model)
    else:  # the student itself, or a served teacher: the student's output rows are compared
        compared_vocab_size = check_vocabularies(tokenizer, None, student, student, model_args.model, model_args.model)
    if config.tuner.tuner_type == "lora":
        student = apply_lora(student, config.tuner, is_frozen)
    disable_dropout(student)  # after LoRA: its adapters' dropout too, as TRL's GKDTrainer (ms-swift's) does

    training.output_dir, created = start_run_folder(training.output_dir, config.gkd.add_version)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.join(training.output_dir, "runs"))
    try:
        trainer = GKDTrainer(
            model=student, teacher_model=teacher, args=training, gkd_args=gkd_args,
            stop_token_ids=stop_ids, compared_vocab_size=compared_vocab_size,
            train_dataset=train_examples, eval_dataset=eval_examples,
            processing_class=processor if images else tokenizer,  # what checkpoints save beside the weights
            student_engine=make_student_engine(config, student_dir, student, tokenizer, dtype,
                                               processor if images else None),
            padding_free=data_args.padding_free, packing=data_args.packing, log_completions=gkd_args.log_completions,
            teacher_processor=own_teacher_processor,
            callbacks=[RunFolderCallback(training.output_dir, run_arguments(config),
                                         draw_images="tensorboard" in training.report_to)],
        )
        trainer.train(resume_from_checkpoint=resume)
    except GKDUserError:
        remove_unfinished_run(created, training.output_dir)
        raise
    except ValueError as error:
        if resume and "checkpoint" in str(error).lower():
            remove_unfinished_run(created, training.output_dir)
            raise GKDUserError(f"--resume_from_checkpoint {training.resume_from_checkpoint}: {error}") from None
        raise

    if config.tuner.tuner_type == "lora":
        # A plain Hugging Face model in the run folder; the adapter itself stays in the checkpoints.
        trainer.accelerator.wait_for_everyone()
        with trainer.shardings["student"].whole_model():  # a sharded student's whole weights, to merge them
            if trainer.is_world_process_zero():
                trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(training.output_dir)
                trainer.processing_class.save_pretrained(training.output_dir)  # the tokenizer, or the processor
    else:
        trainer.save_model(training.output_dir)
    if trainer.is_world_process_zero():
        logger.info("saved the distilled student to %s", training.output_dir)
    leave_finished_processes(trainer.accelerator.state)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run_under_torchrun_if_asked("gkd.cli.train", argv, "gkd-train")
    try:
        # Bad input leaves nothing behind: the run folder is made once data and models have loaded, and
        # removed again if the trainer refuses what it was given (checkpoints, once written, are kept).
        train(parse_config(argv))
    except GKDUserError as error:
        print(f"gkd-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gkd-train: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
