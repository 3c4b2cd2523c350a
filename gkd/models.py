"""Loading the student, the teacher and their tokenizer, and checking that they fit together."""

import hashlib
import json
import logging

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                          GenerationConfig)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from gkd.errors import GKDUserError, first_line

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name: str, trust_remote_code: bool = False, flag: str = "--model"):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as error:  # missing folder, hub offline, unknown id: one line for all
        raise GKDUserError(f"{flag} {name}: cannot load its tokenizer ({first_line(error)})") from None
    if tokenizer.eos_token_id is None:
        raise GKDUserError(f"{flag} {name}: the tokenizer has no eos_token, so completions could never end")
    return tokenizer


def generation_config(name: str, trust_remote_code: bool):
    """The checkpoint's generation config (for its EOS ids), or None when it ships none."""
    try:
        return GenerationConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # many checkpoints ship none; the tokenizer's EOS is enough then
        return None


def attn_implementation(attn_impl: str | None) -> str | None:
    """ms-swift's --attn_impl names to transformers': flash_attn is flash_attention_2; others pass through."""
    return "flash_attention_2" if attn_impl == "flash_attn" else attn_impl


def load_model(name: str, dtype, attn_impl: str | None, trust_remote_code: bool, flag: str, images: bool = False):
    """The model as a causal LM, or (images) as a vision-language model with its vision tower."""
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_impl:
        kwargs["attn_implementation"] = attn_implementation(attn_impl)
    model_class, kind = (AutoModelForImageTextToText, "a vision-language model") if images else \
        (AutoModelForCausalLM, "a causal LM")
    try:
        return model_class.from_pretrained(name, **kwargs)
    except Exception as error:
        raise GKDUserError(f"{flag} {name}: cannot load it as {kind} ({first_line(error)})") from None


def load_processor(name: str, trust_remote_code: bool, flag: str = "--model"):
    """The processor of a vision-language checkpoint (its chat template and image processor), or None for
    a checkpoint that reads text alone: a model type transformers loads as image-text-to-text, shipped with
    an image processor. One that cannot load is a warning, not a stop: text rows do not need it (rows with
    images are then refused, naming the model)."""
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception:  # load_model reports an unloadable checkpoint in its own words
        return None
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return None
    try:
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as error:
        logger.warning("%s %s: its processor cannot load (%s); it reads text rows only", flag, name, first_line(error))
        return None
    return processor if getattr(processor, "image_processor", None) is not None else None


# Where ms-swift's --freeze_vit / --freeze_aligner / --freeze_llm find each part of a vision-language model
# (its MultiModelKeys, for transformers' own classes): parameter name prefixes per model type.
VISION_LANGUAGE_PARTS = {
    "idefics3": {"llm": ("model.text_model", "lm_head"), "vit": ("model.vision_model",),
                 "aligner": ("model.connector",)},
    "llava": {"llm": ("model.language_model", "lm_head"), "vit": ("model.vision_tower",),
              "aligner": ("model.multi_modal_projector",)},
    "internvl": {"llm": ("model.language_model", "lm_head"), "vit": ("model.vision_tower",),
                 "aligner": ("model.multi_modal_projector",)},
    "qwen2_vl": {"llm": ("model.language_model", "lm_head"), "vit": ("model.visual",),
                 "aligner": ("model.visual.merger",)},
    "qwen2_5_vl": {"llm": ("model.language_model", "lm_head"), "vit": ("model.visual",),
                   "aligner": ("model.visual.merger",)},
}


def frozen_parts(model, name: str, freeze_llm: bool, freeze_vit: bool, freeze_aligner: bool):
    """ms-swift's rule as a predicate on parameter and module names: True inside a frozen part, except an
    aligner inside the vision tower (Qwen2-VL's merger), which trains when --freeze_aligner false even with the
    tower frozen."""
    parts = VISION_LANGUAGE_PARTS.get(model.config.model_type)
    if parts is None:
        raise GKDUserError(f"--model {name}: gkd does not know where the vision tower and aligner of a "
                           f"{model.config.model_type} model are (it knows {', '.join(VISION_LANGUAGE_PARTS)})")
    frozen = tuple(prefix + "." for prefix in [*(parts["llm"] if freeze_llm else ()),
                                               *(parts["vit"] if freeze_vit else ()),
                                               *(parts["aligner"] if freeze_aligner else ())])
    trained = tuple(prefix + "." for prefix in (() if freeze_aligner else parts["aligner"]))
    return lambda qualified_name: qualified_name.startswith(frozen) and not qualified_name.startswith(trained)


def freeze_parts(model, is_frozen) -> None:
    """Full training: the frozen parts' parameters train no more."""
    for parameter_name, parameter in model.named_parameters():
        if is_frozen(parameter_name):
            parameter.requires_grad_(False)


def checkpoint_dtype(name: str, trust_remote_code: bool) -> torch.dtype | None:
    """The dtype a checkpoint's config.json names (its `dtype`, or the older `torch_dtype`), if any."""
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception:  # load_model reports an unloadable checkpoint in its own words
        return None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype.removeprefix("torch."))
    return dtype if dtype in DTYPES.values() else None


def disable_dropout(model) -> None:
    """ms-swift's GKD trains without dropout (TRL's GKDConfig.disable_dropout, default true): the student's
    distribution is compared with the teacher's, and dropout would make it a random one. Attention dropout is
    a rate the attention modules read (not a Dropout module) in transformers' model families."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def stop_token_ids(tokenizer, generation_config=None) -> tuple[int, ...]:
    """EOS may be several ids (Llama 3's <|eot_id|> next to <|end_of_text|>): any of them ends a completion."""
    ids = {tokenizer.eos_token_id}
    generation_eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos:
        ids.update(generation_eos)
    return tuple(sorted(ids))


def pad_token_id(tokenizer) -> int:
    """Tokenizers without a pad token (Llama 3) pad with EOS; masks come from lengths, so that is safe."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def output_vocab_size(model) -> int:
    weight = model.get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitions it as it loads: its full shape


def check_vocabularies(tokenizer, teacher_tokenizer, student, teacher, student_name, teacher_name) -> int:
    """Refuse a student and teacher that do not share a tokenizer; return how many logit rows to compare.

    Models often pad their vocabulary past the tokenizer (Qwen2.5: 151936 vs 152064 rows around a
    151665-token tokenizer); such padding rows never stand for a token, so only the rows both models have
    are compared, once both cover every token of the tokenizer.
    """
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise GKDUserError(
            f"--teacher_model {teacher_name}: its tokenizer differs from the student's ({student_name}); "
            "GKD compares distributions token by token, so both must use the same tokenizer"
        )
    tokens = len(tokenizer)
    for flag, name, model in (("--model", student_name, student), ("--teacher_model", teacher_name, teacher)):
        if output_vocab_size(model) < tokens:
            raise GKDUserError(
                f"{flag} {name}: its output layer has {output_vocab_size(model)} rows but the tokenizer has "
                f"{tokens} tokens"
            )
    shared = min(output_vocab_size(student), output_vocab_size(teacher))
    if output_vocab_size(student) != output_vocab_size(teacher):
        logger.info(
            "student has %d output rows, teacher %d, tokenizer %d tokens: comparing the first %d",
            output_vocab_size(student), output_vocab_size(teacher), tokens, shared,
        )
    return shared


def apply_lora(model, tuner, is_frozen=None):
    """is_frozen (vision-language models, frozen_parts): all-linear then means the linear layers outside the
    frozen parts, as ms-swift adds no adapter to a frozen vision tower or aligner."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise GKDUserError("--tuner_type lora needs peft: pip install 'gkd[peft]'") from None
    target_modules = tuner.target_modules
    targets = target_modules[0] if target_modules == ["all-linear"] else target_modules
    if targets == "all-linear" and is_frozen is not None:
        head = model.get_output_embeddings()  # peft's all-linear leaves the output layer alone too
        targets = [module_name for module_name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head and not is_frozen(module_name + ".")]
    config = LoraConfig(
        r=tuner.lora_rank,
        lora_alpha=tuner.lora_alpha,
        lora_dropout=tuner.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise GKDUserError(f"--target_modules {' '.join(target_modules)}: {first_line(error)}") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """Names a vocabulary: equal fingerprints mean the same token for every id."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocabulary, ensure_ascii=False).encode()).hexdigest()[:16]
