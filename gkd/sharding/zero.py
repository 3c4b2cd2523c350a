"""DeepSpeed ZeRO: the teacher's config and inference engine, and the whole ZeRO-3 model for a while.

ZeRO-3 partitions parameters as the model loads (transformers' from_pretrained runs under deepspeed.zero.Init
while a ZeRO-3 config is the global one), and installs per-module hooks that gather them for each forward.
Gathering the whole model while those hooks are installed collides with them ("Cannot partition a param in
flight"), so the hooks come down for the gather and go back after it: DeepSpeed's own
unwrap_model_for_generation does that for the per-module hooks (of an engine with an optimizer and of an
inference engine alike), and ZeroThree.whole_model adds the root module's hook, which it leaves up.
"""

import contextlib
import copy
import json

from transformers.integrations import deepspeed as hf_deepspeed

from gkd.sharding.base import ModelSharding


def zero_stage(config: dict | None) -> int:
    return int((config or {}).get("zero_optimization", {}).get("stage", 0))


def read_config(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _filled(config: dict, training):
    """The config as transformers fills the student's: "auto" fields from the training arguments. Making it
    makes it the global config (from_pretrained partitions under it), held by a weak reference."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    filled = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
    filled.trainer_config_process(training)
    return filled


def _restore_student_config(training) -> None:
    plugin = training.deepspeed_plugin
    if plugin is not None:
        hf_deepspeed.set_hf_deepspeed_config(plugin.hf_ds_config)
    else:
        hf_deepspeed.unset_hf_deepspeed_config()


@contextlib.contextmanager
def loading_teacher(training, teacher_deepspeed: str | None):
    """Load the teacher partitioned as --teacher_deepspeed says: under its ZeRO-3 when it has one, whole
    otherwise, whatever the student's config is; the student's is the global one again afterwards. Unset:
    the student's config governs, as in ms-swift."""
    if teacher_deepspeed is None:
        yield
        return
    config = read_config(teacher_deepspeed)
    # global while it lives: this frame keeps it alive until the teacher has loaded
    teacher_config = _filled(config, training) if zero_stage(config) == 3 else None  # noqa: F841
    if teacher_config is None:
        hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        _restore_student_config(training)


def inference_engine(model, config: dict, training):
    """The teacher as a ZeRO-3 inference engine (no optimizer): its parameters stay partitioned across the
    processes (in CPU memory with offload_param) and its forwards gather them layer by layer. `auto` fields
    are filled from the training arguments and the teacher's hidden size, as transformers does for the student."""
    import deepspeed

    try:
        filled = _filled(config, training)
        filled.trainer_config_finalize(training, model, num_training_steps=0)
    finally:
        _restore_student_config(training)
    settings = filled.config
    for section in ("optimizer", "scheduler"):
        settings.pop(section, None)
    engine, *_ = deepspeed.initialize(model=model, config=settings)
    engine.eval()  # DeepSpeedEngine.eval returns nothing
    return engine


class ZeroThree(ModelSharding):
    """A model partitioned by ZeRO-3. engine: a callable returning its DeepSpeed engine (the student's is
    made when the trainer prepares it, after the sampling engine exists)."""

    collective = True

    def __init__(self, engine, gather: bool):
        self.engine, self.synced = engine, not gather

    @contextlib.contextmanager
    def whole_model(self):
        from deepspeed.runtime.zero import unwrap_model_for_generation

        engine = self.engine()
        with unwrap_model_for_generation(engine):
            # DeepSpeed takes down the per-module hooks but leaves the root's, which starts each forward by
            # checking, with the other processes, that all traced the same modules: a collective that only
            # the processes generating would enter. It comes down too, and goes back first, as it was.
            offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
            root_hook = offload.fwd_pre_hook
            start_of_forward = offload.module._forward_pre_hooks[root_hook.id]
            root_hook.remove()
            try:
                yield
            finally:
                offload.fwd_pre_hook = offload.module.register_forward_pre_hook(start_of_forward)

    @contextlib.contextmanager
    def gathered(self, parameters):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(parameters)):
            yield

    def full(self, tensor):
        # A copy: the gathered storage is freed in place when the block ends, and a reader may hold the
        # tensor longer (vLLM loads a layer once all its weights have arrived).
        return tensor.detach().clone()
