"""gkd-train's flags: ms-swift names and defaults, YAML config with command-line override, refusals."""

import json

import pytest
import torch

from gkd.config import parse_config
from gkd.errors import GKDUserError
from gkd.teachers.served import parse_teacher_servers

REQUIRED = ["--model", "s", "--teacher_model", "t", "--dataset", "d.jsonl"]


def parse(tmp_path, *flags):
    return parse_config([*REQUIRED, "--output_dir", str(tmp_path / "out"), *flags])


# Every default gkd-train takes when a flag is unset, and the ms-swift 4.6 file it was read from
# (commit 3602360; docs/ms-swift-gkd-reference.md has the lines). (section, attribute, value, source)
MS_SWIFT_DEFAULTS = [
    ("gkd", "beta", 0.5, "swift/arguments/rlhf_args.py (_set_default: 0.5 for gkd)"),
    ("gkd", "lmbda", 0.5, "swift/arguments/rlhf_args.py"),
    ("gkd", "seq_kd", False, "swift/arguments/rlhf_args.py"),
    ("gkd", "temperature", 0.9, "swift/arguments/rlhf_args.py"),
    ("gkd", "loss_temperature", 0.9, "swift/rlhf_trainers/gkd_loss.py (logits / temperature)"),
    ("gkd", "sft_alpha", 0.0, "swift/arguments/rlhf_args.py"),
    ("gkd", "max_completion_length", 512, "swift/arguments/rlhf_args.py"),
    ("gkd", "top_k", -1, "swift/rlhf_trainers/args_mixin.py"),
    ("gkd", "gkd_logits_topk", None, "swift/arguments/rlhf_args.py"),
    ("gkd", "offload_teacher_model", False, "swift/arguments/rlhf_args.py"),
    ("gkd", "log_completions", False, "swift/rlhf_trainers/arguments.py (GKDConfig)"),
    ("gkd", "add_version", True, "swift/arguments/sft_args.py"),
    ("gkd", "teacher_tag_key", "dataset", "swift/rlhf_trainers/args_mixin.py"),
    ("data", "truncation_strategy", "delete", "swift/arguments/base_args/template_args.py"),
    ("data", "max_length", None, "swift/arguments/base_args/template_args.py"),
    ("data", "loss_scale", "last_round", "swift/arguments/rlhf_args.py (gkd without multi_turn_scheduler)"),
    ("data", "dataset_num_proc", 1, "swift/arguments/base_args/data_args.py"),
    ("data", "load_from_cache_file", False, "swift/arguments/base_args/data_args.py"),
    ("data", "split_dataset_ratio", 0.0, "swift/arguments/base_args/data_args.py"),
    ("data", "padding_free", False, "swift/arguments/base_args/template_args.py"),
    ("data", "packing", False, "swift/arguments/base_args/base_args.py"),
    ("data", "enable_thinking", None, "swift/arguments/base_args/template_args.py"),
    ("tuner", "tuner_type", "full", "gkd: full (ms-swift's base_args.py says lora; see the README)"),
    ("tuner", "freeze_vit", True, "swift/arguments/tuner_args.py"),
    ("tuner", "freeze_aligner", True, "swift/arguments/tuner_args.py"),
    ("tuner", "freeze_llm", False, "swift/arguments/tuner_args.py"),
    ("model", "use_hf", None, "swift/arguments/base_args/base_args.py (False, or USE_HF=1)"),
    ("model", "trust_remote_code", False, "gkd: off unless asked"),
    ("training", "learning_rate", 1e-5, "swift/arguments/sft_args.py (full: 1e-5, lora: 1e-4)"),
    ("training", "per_device_train_batch_size", 1, "swift/trainers/arguments.py"),
    ("training", "per_device_eval_batch_size", 1, "swift/trainers/arguments.py"),
    ("training", "gradient_accumulation_steps", 16, "swift/trainers/arguments.py (ceil(16 / batch / world))"),
    ("training", "gradient_checkpointing", True, "swift/trainers/arguments.py"),
    ("training", "logging_first_step", True, "swift/trainers/arguments.py"),
    ("training", "logging_steps", 5, "swift/trainers/arguments.py"),
    ("training", "weight_decay", 0.1, "swift/trainers/arguments.py"),
    ("training", "adam_beta2", 0.95, "swift/trainers/arguments.py"),
    ("training", "lr_scheduler_type", "cosine", "swift/trainers/arguments.py"),
    ("training", "report_to", ["tensorboard"], "swift/trainers/arguments.py"),
    ("training", "dataloader_num_workers", 1, "swift/trainers/arguments.py (0 on Windows)"),
    ("training", "eval_strategy", "no", "swift/arguments/sft_args.py (no validation data)"),
    ("training", "warmup_ratio", 0.0, "swift/trainers/arguments.py"),
    ("training", "ddp_timeout", 18000000, "swift/arguments/base_args/base_args.py"),
    ("training", "seed", 42, "swift/arguments/base_args/base_args.py"),
    ("training", "save_steps", 500, "transformers (ms-swift keeps it)"),
    ("training", "num_train_epochs", 3, "transformers (ms-swift keeps it)"),
    ("training", "max_grad_norm", 1.0, "transformers (ms-swift keeps it)"),
    ("training", "save_total_limit", None, "transformers (ms-swift keeps it)"),
]


@pytest.mark.parametrize("section, name, value, source", MS_SWIFT_DEFAULTS,
                         ids=[f"{row[0]}.{row[1]}" for row in MS_SWIFT_DEFAULTS])
def test_defaults_follow_ms_swift(tmp_path, section, name, value, source, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = parse_config(REQUIRED)  # nothing else set
    actual = getattr(getattr(config, section), name)
    assert (actual.value if hasattr(actual, "value") else actual) == value, source


def test_defaults_that_follow_other_flags(tmp_path, monkeypatch):
    """ms-swift: lora's learning rate is 1e-4; accumulation = ceil(16 / batch / world size); evaluation
    every --save_steps when there is validation data; runs under output/<model name>."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = parse_config(["--model", "Qwen/Qwen2.5-7B", "--teacher_model", "t", "--dataset", "d.jsonl",
                           "--tuner_type", "lora", "--per_device_train_batch_size", "3",
                           "--split_dataset_ratio", "0.01", "--save_steps", "50"])
    training = config.training
    assert training.learning_rate == 1e-4
    assert training.gradient_accumulation_steps == 3  # ceil(16 / 3 / 2)
    assert (training.eval_strategy.value, training.eval_steps) == ("steps", 50)
    assert training.output_dir.endswith("/output/Qwen2.5-7B")
    assert parse(tmp_path, "--temperature", "1.2").gkd.loss_temperature == 1.2
    assert parse(tmp_path, "--temperature", "1.2", "--loss_temperature", "1").gkd.loss_temperature == 1.0
    assert parse(tmp_path, "--learning_rate", "3e-5", "--tuner_type", "lora").training.learning_rate == 3e-5


def test_swift_spellings_parse(tmp_path):
    config = parse(tmp_path, "--rlhf_type", "gkd", "--seq_kd", "true", "--max_new_tokens", "64",
                   "--dataset", "a.jsonl", "b#10", "--gradient_accumulation_steps", "4")
    assert config.gkd.seq_kd is True
    assert config.gkd.max_completion_length == 64
    assert config.data.dataset == ["a.jsonl", "b#10"]
    assert config.training.gradient_accumulation_steps == 4


def test_yaml_config_and_command_line_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: s\nteacher_model: t\ndataset: [x.jsonl, y.jsonl]\nbeta: 0.2\nlmbda: 1\n"
        "learning_rate: 1e-5\nseq_kd: true\nmax_new_tokens: 16\n"
    )
    config = parse_config(["--config", str(path), "--output_dir", str(tmp_path / "o"), "--beta", "0.7"])
    assert config.gkd.beta == 0.7  # the command line wins
    assert config.gkd.lmbda == 1.0
    assert config.data.dataset == ["x.jsonl", "y.jsonl"]
    assert config.training.learning_rate == pytest.approx(1e-5)
    assert config.gkd.seq_kd is True
    assert config.gkd.max_completion_length == 16


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--beta", "1.5"], "--beta 1.5: must be in [0, 1]"),
        (["--lmbda", "-0.1"], "--lmbda -0.1: must be in [0, 1]"),
        (["--temperature", "0"], "--temperature 0.0: must be in (0, inf]"),
        (["--loss_temperature", "-1"], "--loss_temperature -1.0: must be in (0, inf]"),
        (["--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
        (["--top_k", "-2"], "--top_k -2: must be >= 1, or -1 or 0 for off"),
        (["--warmup_ratio", "1"], "--warmup_ratio 1.0: must be in [0, 1)"),
        (["--warmup_ratio", "-0.1"], "--warmup_ratio -0.1: must be in [0, 1)"),
        (["--warmup_ratio", "0.1", "--warmup_steps", "5"], "--warmup_ratio 0.1: not together with --warmup_steps"),
        (["--train_type", "lora", "--tuner_type", "full"], "--train_type lora: the older name of --tuner_type"),
        (["--train_type", "qlora"], "invalid choice: 'qlora'"),
        (["--report_to", "tensorboard", "nosuchtracker"], "--report_to nosuchtracker: not an integration"),
        (["--max_completion_length", "0"], "--max_completion_length 0: must be in [1, inf]"),
        (["--sft_alpha", "-1"], "--sft_alpha -1.0: must be in [0, inf]"),
        (["--rlhf_type", "dpo"], "--rlhf_type dpo: gkd-train only does 'gkd'"),
        (["--beta", "abc"], "argument --beta: invalid float value: 'abc'"),
        (["--truncation_strategy", "middle"], "invalid choice: 'middle'"),
        (["--tuner_type", "lora", "--lora_rank", "0"], "--lora_rank 0: must be in [1, inf]"),
        (["--lmbda", "1", "--sft_alpha", "0.5"], "--sft_alpha 0.5 has no effect with --lmbda 1"),
        (["--resume_from_checkpoint", "/no/such/checkpoint"], "no such checkpoint folder"),
        (["--teacher_deepspeed", "zero9"], "--teacher_deepspeed zero9: neither one of zero0, zero1, zero2"),
        (["--deepspeed", "zero5"], "--deepspeed zero5: neither one of zero0, zero1, zero2, zero2_offload, zero3, zero3_offload nor a JSON file"),
        (["--use_vllm", "true", "--vllm_mode", "server", "--sleep_level", "3"], "--sleep_level 3: must be in [0, 2]"),
        (["--use_vllm", "true", "--vllm_mode", "server", "--sleep_level", "1"], "only for --vllm_mode colocate"),
        (["--use_vllm", "true", "--vllm_mode", "server", "--vllm_gpu_memory_utilization", "1.5"],
         "--vllm_gpu_memory_utilization 1.5: must be in (0, 1]"),
        (["--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_port", "0"],
         "--vllm_server_port 0: must be in [1, 65535]"),
        (["--use_vllm", "true", "--vllm_mode", "server", "--vllm_tensor_parallel_size", "0"],
         "--vllm_tensor_parallel_size 0: must be in [1, inf]"),
        (["--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_timeout", "0"],
         "--vllm_server_timeout 0.0: must be in (0, inf]"),
        (["--vllm_mode", "remote"], "invalid choice: 'remote'"),
    ],
)
def test_bad_values_are_refused_with_the_flag_named(tmp_path, flags, expected):
    with pytest.raises(GKDUserError) as error:
        parse(tmp_path, *flags)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("missing", ["--model", "--dataset"])
def test_required_flags(tmp_path, missing):
    flags = list(REQUIRED)
    index = flags.index(missing)
    del flags[index : index + 2]
    with pytest.raises(GKDUserError, match=f"{missing} is required"):
        parse_config([*flags, "--output_dir", str(tmp_path / "o")])


def test_non_empty_output_dir_needs_resume_or_overwrite_without_versions(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert parse(tmp_path).gkd.add_version  # the default: the run goes into a new out/vN-... folder
    with pytest.raises(GKDUserError, match="not empty"):
        parse(tmp_path, "--add_version", "false")
    assert parse(tmp_path, "--add_version", "false", "--overwrite_output_dir", "true").gkd.overwrite_output_dir


def test_yaml_errors_name_file_and_line(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model: s\n\nlmbdaa: 0.5\n")
    with pytest.raises(GKDUserError, match=r"unknown\.yaml:3: unknown key 'lmbdaa'"):
        parse_config(["--config", str(unknown)])

    out_of_range = tmp_path / "range.yaml"
    out_of_range.write_text("model: s\nteacher_model: t\ndataset: d.jsonl\nbeta: 2\n")
    with pytest.raises(GKDUserError, match=r"--beta 2.0: must be in \[0, 1\] \(from .*range\.yaml:4\)"):
        parse_config(["--config", str(out_of_range), "--output_dir", str(tmp_path / "o")])

    bad_type = tmp_path / "type.yaml"
    bad_type.write_text("beta: high\n")
    with pytest.raises(GKDUserError, match=r"type\.yaml:1: argument --beta: invalid float value"):
        parse_config(["--config", str(bad_type)])

    broken = tmp_path / "broken.yaml"
    broken.write_text("model: s\nbeta: [0.5\n")
    with pytest.raises(GKDUserError, match=r"broken\.yaml:\d+: not valid YAML"):
        parse_config(["--config", str(broken)])


def test_vllm_defaults_follow_ms_swift(tmp_path):
    vllm = parse(tmp_path).vllm
    assert (vllm.use_vllm, vllm.vllm_mode, vllm.sleep_level) == (False, "colocate", 0)
    assert (vllm.vllm_gpu_memory_utilization, vllm.vllm_tensor_parallel_size, vllm.vllm_max_model_len) == (0.9, 1, None)
    assert (vllm.vllm_server_host, vllm.vllm_server_port, vllm.vllm_server_timeout) == ("127.0.0.1", 8000, 240.0)


def test_use_vllm_without_vllm_names_the_extra(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(GKDUserError, match=r"--use_vllm true needs vLLM in this environment: pip install 'gkd\[vllm\]'"):
        parse(tmp_path, "--use_vllm", "true")
    parse(tmp_path, "--use_vllm", "true", "--vllm_mode", "server")  # the server brings its own vLLM


def test_deepspeed_names_the_shipped_configs_and_shards_only_in_several_processes(tmp_path):
    from gkd.config import deepspeed_config_path

    for name in ("zero0", "zero2", "zero3"):
        stage = json.loads(open(deepspeed_config_path(name)).read())["zero_optimization"]["stage"]
        assert stage == int(name[-1])
    if torch.cuda.is_available():
        assert parse(tmp_path, "--deepspeed", "zero3").training.deepspeed == deepspeed_config_path("zero3")
    else:  # this test process is one CPU process
        with pytest.raises(GKDUserError, match="^--deepspeed: without GPUs, sharded training runs in several CPU "
                                               "processes; start it with NPROC_PER_NODE=2"):
            parse(tmp_path, "--deepspeed", "zero2")


@pytest.mark.parametrize("flags, expected", [
    (["--teacher_deepspeed", "zero3_offload"],
     "--teacher_deepspeed zero3_offload: needs the student under DeepSpeed too (--deepspeed)"),
    (["--fsdp", "full_shard", "--fsdp_config", '{"version": 1}'],
     "FSDP version 1: gkd-train shards with FSDP2; set fsdp_version: 2"),
    (["--fsdp", "full_shard", "--offload_teacher_model", "true"],
     "--offload_teacher_model true: the teacher is sharded (ZeRO-3 or FSDP); --teacher_deepspeed zero3_offload"),
])
def test_sharding_settings_that_cannot_work_together(tmp_path, monkeypatch, flags, expected):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as in a launcher's process (the group forms later, in training)
    with pytest.raises(GKDUserError) as error:
        parse(tmp_path, *flags)
    assert str(error.value).startswith(expected)


def test_warmup_ratio_is_ms_swifts_share_of_the_steps(tmp_path):
    training = parse(tmp_path, "--warmup_ratio", "0.05").training
    # ms-swift hands the ratio to transformers as a float warmup_steps, which reads one below 1 as a ratio.
    assert training.warmup_steps == 0.05 and training.get_warmup_steps(100) == 5
    assert parse(tmp_path, "--warmup_ratio", "0.3").training.get_warmup_steps(4) == 2  # ceil(1.2)
    assert parse(tmp_path).training.get_warmup_steps(100) == 0


def test_attn_impl_takes_ms_swift_names():
    from gkd.models import attn_implementation

    assert attn_implementation("flash_attn") == "flash_attention_2"
    assert attn_implementation("flash_attention_2") == "flash_attention_2"
    for name in ("sdpa", "eager", "flex_attention", "flash_attention_3", None):
        assert attn_implementation(name) == name


def test_report_to_takes_several_integrations(tmp_path, monkeypatch):
    assert parse(tmp_path).training.report_to == ["tensorboard"]  # ms-swift's default
    assert parse(tmp_path, "--report_to", "none").training.report_to == []
    import transformers.integrations.integration_utils as integrations

    # Only tensorboard may be installed here: pretend swanlab is, to parse the two-name list of ms-swift's examples.
    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: ["tensorboard", "swanlab"])
    assert parse(tmp_path, "--report_to", "tensorboard", "swanlab").training.report_to == ["tensorboard", "swanlab"]
    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    with pytest.raises(GKDUserError, match=r"^--report_to swanlab: its Python package is not installed"):
        parse(tmp_path, "--report_to", "tensorboard", "swanlab")


def test_train_type_is_the_older_name_of_tuner_type(tmp_path):
    assert parse(tmp_path, "--train_type", "lora").tuner.tuner_type == "lora"
    assert parse(tmp_path, "--train_type", "lora", "--tuner_type", "lora").tuner.tuner_type == "lora"
    assert parse(tmp_path, "--train_type", "full").tuner.tuner_type == "full"


@pytest.mark.parametrize("value, expected", [("-1", None), ("0", None), ("5", 5)])
def test_top_k_minus_one_or_zero_is_off(tmp_path, value, expected):
    from gkd.config.tools import parse_infer_config
    from gkd.sampling.base import SamplingSettings

    assert parse(tmp_path).gkd.top_k == -1  # ms-swift's default: off
    top_k = parse(tmp_path, "--top_k", value).gkd.top_k
    assert SamplingSettings(max_new_tokens=4, top_k=top_k).top_k == expected
    args, _ = parse_infer_config(["--model", "m", "--val_dataset", "d.jsonl", "--result_path",
                                  str(tmp_path / "r.jsonl"), "--top_k", value])
    assert args.top_k == expected
    with pytest.raises(GKDUserError, match="--top_k -3: must be >= 1, or -1 or 0 for off"):
        parse_infer_config(["--model", "m", "--val_dataset", "d.jsonl", "--result_path", "r.jsonl", "--top_k", "-3"])


SERVER = ["--teacher_model_server", "http://127.0.0.1:8000"]
TWO_SERVERS = '[{"url": "http://a:1", "tags": ["m.jsonl"]}, {"url": "http://b:2", "tags": ["c.jsonl"]}]'


@pytest.mark.parametrize("flags, expected", [
    (["--gkd_logits_topk", "8"], "--teacher_model_server http://127.0.0.1:8000: not together with --teacher_model t"),
    ([], "--teacher_model_server http://127.0.0.1:8000: needs --gkd_logits_topk K"),

    (["--gkd_logits_topk", "8", "--offload_teacher_model", "true"], "--teacher_model_server http://127.0.0.1:8000: "
     "--offload_teacher_model is for a teacher loaded in process"),
    (["--gkd_logits_topk", "8", "--teacher_model_revision", "v2"], "--teacher_model_server http://127.0.0.1:8000: "
     "--teacher_model_revision is for a teacher loaded in process"),
    (["--gkd_logits_topk", "8", "--gkd_logits_topk_tail", "true"], "--gkd_logits_topk_tail with "
     "--teacher_model_server http://127.0.0.1:8000: needs --loss_temperature 1"),
])
def test_a_served_teacher_is_refused_in_one_line_where_it_cannot_work(tmp_path, flags, expected):
    # REQUIRED names --teacher_model t; the other cases drop it
    argv = [*REQUIRED, "--output_dir", str(tmp_path / "o"), *SERVER, *flags]
    if not expected.endswith("--teacher_model t"):
        at = argv.index("--teacher_model")
        del argv[at:at + 2]
    with pytest.raises(GKDUserError) as error:
        parse_config(argv)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


def test_served_teachers_parse_as_ms_swift_writes_them():
    assert parse_teacher_servers(" http://h:8000 ") == [{"url": "http://h:8000", "tags": []}]
    assert parse_teacher_servers('[{"url": "http://h:1"}]') == [{"url": "http://h:1", "tags": []}]
    assert parse_teacher_servers(TWO_SERVERS)[1] == {"url": "http://b:2", "tags": ["c.jsonl"]}
    for value, expected in (("[{", "not valid JSON"), ("[]", "expected a URL or a non-empty JSON list"),
                            ('[{"url": "a", "tags": ["x"]}, {"url": "b"}]', "teacher 1 has no tags"),
                            ('[{"url": "a", "tags": ["x"]}, {"url": "b", "tags": ["x"]}]', "tag 'x' is in teachers 0 and 1")):
        with pytest.raises(GKDUserError, match=expected):
            parse_teacher_servers(value)
    assert parse_config(["--model", "s", "--dataset", "d.jsonl", "--teacher_model_server", TWO_SERVERS,
                         "--gkd_logits_topk", "8"]).gkd.teacher_tag_key == "dataset"
    with pytest.raises(GKDUserError, match="--seq_kd true with several served teachers is not supported yet"):
        parse_config(["--model", "s", "--dataset", "d.jsonl", "--teacher_model_server", TWO_SERVERS,
                      "--gkd_logits_topk", "8", "--seq_kd", "true"])
    assert parse_config(["--model", "s", "--dataset", "d.jsonl", *SERVER, "--gkd_logits_topk", "8", "--loss_temperature",
                         "1", "--gkd_logits_topk_tail", "true"]).gkd.teacher_model_server == "http://127.0.0.1:8000"


@pytest.mark.parametrize("flags, expected", [
    (["--external_plugins", "examples/train/rlhf/opsd/opsd_plugin.py"],
     "--external_plugins examples/train/rlhf/opsd/opsd_plugin.py: ms-swift plugins register ms-swift classes"),
    (["--multi_turn_scheduler", "math_tip_trick", "--max_turns", "2"],
     "--multi_turn_scheduler math_tip_trick: multi-turn rollouts are not supported by gkd-train yet"),
    (["--max_turns", "2"], "--max_turns 2: multi-turn rollouts are not supported by gkd-train yet"),
    (["--loss_scale", "all"], "--loss_scale all: gkd supports last_round and default"),
])
def test_capabilities_gkd_lacks_parse_then_stop_in_one_line(tmp_path, flags, expected):
    """ms-swift flags of capabilities gkd does not have parse, and stop the run before anything loads,
    ahead of every other check (here --report_to swanlab, which is not installed, comes after)."""
    with pytest.raises(GKDUserError) as error:
        parse(tmp_path, *flags, "--report_to", "tensorboard", "swanlab")
    assert str(error.value).startswith(expected)


def test_no_teacher_parses_as_self_distillation():
    assert parse_config(["--model", "s", "--dataset", "d.jsonl"]).model.teacher_model is None


def test_ms_swift_deepspeed_names_ship_with_ms_swift_contents():
    from gkd.config import deepspeed_config_path

    stages = {name: json.load(open(deepspeed_config_path(name)))["zero_optimization"]
              for name in ("zero0", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")}
    assert {name: zero["stage"] for name, zero in stages.items()} == {
        "zero0": 0, "zero1": 1, "zero2": 2, "zero2_offload": 2, "zero3": 3, "zero3_offload": 3}
    assert stages["zero2_offload"]["offload_optimizer"]["device"] == "cpu"
    assert stages["zero3_offload"]["offload_param"]["device"] == "cpu"
    assert stages["zero3"]["offload_param"]["device"] == "none"


def test_infer_takes_ms_swift_older_backend_name_and_hub_flags(tmp_path):
    from gkd.config.tools import parse_infer_config

    args, _ = parse_infer_config(["--model", "Qwen/Qwen2.5-7B", "--val_dataset", "d.jsonl", "--result_path",
                                  str(tmp_path / "r.jsonl"), "--infer_backend", "pt", "--use_hf", "true",
                                  "--model_revision", "v1", "--model_type", "qwen2_5", "--template", "qwen2_5"])
    assert (args.infer_backend, args.use_hf, args.model_revision) == ("transformers", True, "v1")


@pytest.mark.parametrize("dtype, mixed", [(torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_mixed_precision_from_the_dtype_reaches_deepspeed(dtype, mixed):
    """--torch_dtype (or the checkpoint's dtype) decides the precision after TrainingArguments filled
    DeepSpeed's "auto" fields: they are filled again, with no mismatch left for transformers to raise."""
    from gkd.config import SwiftTrainingArguments, deepspeed_config_path, set_mixed_precision

    training = SwiftTrainingArguments(output_dir="unused", deepspeed=deepspeed_config_path("zero2"))
    assert training.hf_deepspeed_config.config["bf16"]["enabled"] is False  # filled before the dtype was known
    set_mixed_precision(training, dtype)
    config = training.hf_deepspeed_config.config
    assert (config["bf16"]["enabled"], config["fp16"]["enabled"]) == (mixed == "bf16", mixed == "fp16")
    assert training.mixed_precision == mixed and not training.hf_deepspeed_config.mismatches
    assert training.deepspeed_plugin.deepspeed_config["bf16"]["enabled"] == (mixed == "bf16")


def test_deepspeed_equals_form_is_expanded_too(tmp_path):
    from gkd.config.parsing import _expand_deepspeed_names, deepspeed_config_path

    assert _expand_deepspeed_names(["--deepspeed=zero3", "--x"]) == ["--deepspeed", deepspeed_config_path("zero3"), "--x"]


def test_evaluation_needs_validation_data_as_in_ms_swift(tmp_path):
    """No validation data: no evaluation, whatever --eval_strategy says; no evaluation: no held-out rows;
    --val_dataset replaces --split_dataset_ratio (ms-swift's sft_args.py _init_eval_strategy)."""
    assert parse(tmp_path, "--eval_strategy", "steps").training.eval_strategy.value == "no"
    no_eval = parse(tmp_path, "--split_dataset_ratio", "0.1", "--eval_strategy", "no")
    assert no_eval.data.split_dataset_ratio == 0
    held_out = parse(tmp_path, "--split_dataset_ratio", "0.1")
    assert (held_out.data.split_dataset_ratio, held_out.training.eval_strategy.value) == (0.1, "steps")
    with_val = parse(tmp_path, "--split_dataset_ratio", "0.1", "--val_dataset", "v.jsonl", "--eval_strategy", "epoch")
    assert (with_val.data.split_dataset_ratio, with_val.training.eval_strategy.value) == (0, "epoch")


def test_freeze_llm_on_a_text_model_would_train_nothing(tmp_path):
    with pytest.raises(GKDUserError, match="^--freeze_llm true: freezes the whole language model"):
        parse(tmp_path, "--freeze_llm", "true")
