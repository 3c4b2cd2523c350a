"""gkd-infer: sample responses (from the teacher) into a JSONL file that gkd-train reads unchanged.

Crash-safe and resumable: lines are written whole and flushed every --write_batch_size rows, and a rerun
of the same command samples only the rows not yet in the file. Under `accelerate launch` (or torchrun)
each process samples its share of every write batch and the main process writes them all.
"""

import hashlib
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

from gkd.config import VLLMEngineArguments
from gkd.config.tools import InferArguments, parse_infer_config
from gkd.data import DatasetSpec, read_rows, row_with_images, split_prompt_completion
from gkd.images import IMAGE_COLUMNS, image_entries, image_token_ids
from gkd.tokenize import check_chat_template, tokenize_messages
from gkd.errors import GKDUserError
from gkd.hub import resolve_model, use_hf_hub
from gkd.launch import leave_finished_processes, run_under_torchrun_if_asked
from gkd.models import (DTYPES, generation_config, load_model, load_processor, load_tokenizer, pad_token_id,
                        stop_token_ids)
from gkd.result_file import KEY_FIELD, ResultFile, check_result_path

logger = logging.getLogger("gkd")

# Settings that change what is sampled; a file is resumed only under the same ones.
SAMPLING_SETTINGS = ("model", "val_dataset", "infer_backend", "max_new_tokens", "temperature", "top_k",
                     "top_p", "seed", "num_return_sequences", "system", "torch_dtype")


@dataclass
class Sample:
    key: str
    order: int  # position in the input, so that the file follows the input's order within a write batch
    row: dict
    prompt_messages: list[dict]
    label: str | None
    images: list[str]  # the row's image references (gkd.images), [] for a text row


def sample_key(spec_index: int, spec: str, row: dict, occurrence: int, answer: int) -> str:
    """Names one response to one input row. Built from the row's content (and how many identical rows
    came before it in the same spec), so that a resume after the input file was edited resamples
    exactly the rows that changed, and a spec listed twice keeps both copies."""
    content = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    text = f"{spec_index}\0{spec}\0{content}\0{occurrence}\0{answer}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _holds_bytes(entry) -> bool:
    return isinstance(entry, dict) and bool(entry.get("bytes"))


def list_samples(args: InferArguments, processor=None) -> list[Sample]:
    """Every (input row, response number) of the input, in order. processor: a vision-language model's, for
    rows with images (refused without one)."""
    samples = []
    for spec_index, spec in enumerate(args.val_dataset):
        seen = Counter()
        for where, row in read_rows(DatasetSpec.parse(spec), args.seed):
            messages, images = row_with_images(row, where, args.system, processor,
                                               f"--model {args.model} reads text alone")
            prompt_messages, label = split_prompt_completion(messages)
            # The row is named by its entries as written (a path as given, wherever it resolves), decoded pictures
            # and bytes by their data (their text would name an address in memory).
            named = {**{name: value for name, value in row.items() if name not in IMAGE_COLUMNS},
                     "images": [entry if isinstance(entry, (str, dict)) and not _holds_bytes(entry) else reference
                                for entry, reference in zip(image_entries(row), images)]} if images else row
            content = json.dumps(named, sort_keys=True, ensure_ascii=False, default=str)
            occurrence, seen[content] = seen[content], seen[content] + 1
            if not prompt_messages:
                raise GKDUserError(f"{where}: the row has an assistant turn but no prompt")
            for answer in range(args.num_return_sequences):
                key = sample_key(spec_index, spec, named, occurrence, answer)
                samples.append(Sample(key, len(samples), row, prompt_messages, label, images))
    return samples


def result_row(sample: Sample, response: str) -> dict:
    """The input row, its last assistant turn replaced (or added) by the response, as swift infer writes; its
    images as the references gkd-train reads back (paths, URLs, data URLs; ms-swift writes '<<<bytes>>>'
    for bytes, which no later step can read)."""
    images = {"images": sample.images} if sample.images else {}
    return {
        **{name: value for name, value in sample.row.items() if not (images and name in IMAGE_COLUMNS)},
        **images,
        "messages": sample.prompt_messages + [{"role": "assistant", "content": response}],
        "response": response,
        "labels": sample.label,
        KEY_FIELD: sample.key,
    }


def make_engine(args: InferArguments, engine_args: VLLMEngineArguments, tokenizer, device, processor=None):
    """The engine, and the stop tokens of the model it samples from (processor: a vision-language model's,
    loaded as one, when rows have images)."""
    if args.infer_backend == "vllm":
        from gkd.sampling.vllm_engine import VLLMEngine

        engine = VLLMEngine.from_arguments(args.model, engine_args, dtype=args.torch_dtype, seed=args.seed,
                                           trust_remote_code=args.trust_remote_code, flag="--infer_backend vllm",
                                           processor=processor)
        return engine, stop_token_ids(tokenizer, generation_config(args.model, args.trust_remote_code))
    from gkd.sampling import TransformersEngine

    dtype = "auto" if args.torch_dtype == "auto" else DTYPES[args.torch_dtype]
    model = load_model(args.model, dtype, args.attn_impl, args.trust_remote_code, "--model",
                       images=processor is not None).to(device).eval()
    engine = TransformersEngine(model, pad_token_id(tokenizer), max_batch_size=args.max_batch_size,
                                processor=processor)
    return engine, stop_token_ids(tokenizer, model.generation_config)


def open_result_file(args: InferArguments, state) -> tuple[ResultFile | None, set[str]]:
    """The main process opens (and repairs) the file; every process learns which keys are done."""
    from accelerate.utils import broadcast_object_list

    result_file, payload = None, [None]
    if state.is_main_process:
        settings = {name: value for name, value in asdict(args).items() if name in SAMPLING_SETTINGS}
        try:
            result_file = ResultFile(args.result_path, settings)
            payload = [result_file.open()]
        except GKDUserError as error:
            payload = [error]
    if state.num_processes > 1:
        broadcast_object_list(payload)
    if isinstance(payload[0], GKDUserError):
        raise payload[0]
    return result_file, payload[0]


def infer(args: InferArguments, engine_args: VLLMEngineArguments) -> None:
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from gkd.sampling import SamplingSettings, derive_seed

    import torch

    # cpu=True is what lets accelerate form a gloo group when torchrun starts several CPU processes.
    state = PartialState(cpu=not torch.cuda.is_available())
    check_result_path(args.result_path)
    # One download per machine: the other processes wait, then find it in the cache. (accelerate's
    # main_process_first would leave them waiting forever if the download failed.)
    first = state.is_local_main_process
    if not first:
        state.wait_for_everyone()
    try:
        args.model = resolve_model(args.model, use_hf=use_hf_hub(args.use_hf), revision=args.model_revision)
    finally:
        if first:
            state.wait_for_everyone()
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    check_chat_template(tokenizer, args.model)
    processor = load_processor(args.model, args.trust_remote_code)  # None: the model reads text alone
    samples = list_samples(args, processor)
    images = any(sample.images for sample in samples)
    engine, stop_ids = make_engine(args, engine_args, tokenizer, state.device, processor if images else None)
    # Opened only once every input has been checked, so that bad input leaves no file behind.
    result_file, done = open_result_file(args, state)
    already = sum(sample.key in done for sample in samples)
    samples = [sample for sample in samples if sample.key not in done]

    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, stop_token_ids=stop_ids, vocab_size=len(tokenizer),
                                suppressed_token_ids=image_token_ids(processor if images else None))
    started, written, generated_tokens = time.perf_counter(), 0, 0
    progress = tqdm(total=len(samples), unit="row", disable=not state.is_main_process, desc="gkd-infer")
    try:
        for start in range(0, len(samples), args.write_batch_size):
            batch = samples[start : start + args.write_batch_size]
            mine = batch[state.process_index :: state.num_processes]
            prompts = [tokenize_messages(tokenizer, sample.prompt_messages, None, stop_ids, images=sample.images,
                                         processor=processor)[0] for sample in mine]
            # Each response's seed comes from its key (row content and response number) alone: a resumed run
            # writes what an uninterrupted one would have, whatever the write batches and processes.
            seeds = [derive_seed(args.seed, sample.key) for sample in mine]
            pictures = {"images": [sample.images for sample in mine]} if images else {}
            completions = engine.generate(prompts, settings, seeds, **pictures)
            rows = [(sample.order, result_row(sample, tokenizer.decode(completion, skip_special_tokens=True)))
                    for sample, completion in zip(mine, completions)]
            tokens = [sum(len(completion) for completion in completions)]
            if state.num_processes > 1:
                rows, tokens = gather_object(rows), gather_object(tokens)
            if state.is_main_process:
                result_file.write([row for _, row in sorted(rows, key=lambda pair: pair[0])])
            written += len(batch)
            generated_tokens += sum(tokens)
            seconds = time.perf_counter() - started
            progress.update(len(batch))
            progress.set_postfix(tokens_per_s=f"{generated_tokens / seconds:.1f}")
    finally:
        progress.close()
        if result_file is not None:
            result_file.close()
    seconds = time.perf_counter() - started
    if state.is_main_process:
        print(f"gkd-infer: {written} rows ({generated_tokens} generated tokens) in {seconds:.1f} s: "
              f"{written / max(seconds, 1e-9):.2f} rows/s, {generated_tokens / max(seconds, 1e-9):.1f} tokens/s; "
              f"{already} rows were already in {args.result_path}")
    leave_finished_processes(state)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run_under_torchrun_if_asked("gkd.cli.infer", argv, "gkd-infer")
    try:
        infer(*parse_infer_config(argv))
    except GKDUserError as error:
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(f"gkd-infer: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gkd-infer: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
