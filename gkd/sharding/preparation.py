"""Which sharding the student and the teacher get, from the accelerator's backend: decided here, once."""

from accelerate.utils import DistributedType

from gkd.sharding.base import ModelSharding, Replicated
from gkd.sharding.fsdp import FullyShardedTwo, shard_teacher
from gkd.sharding.zero import ZeroThree, inference_engine, read_config, zero_stage


def _student_zero_config(accelerator) -> dict | None:
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.state.deepspeed_plugin.deepspeed_config


def _reshard_after_forward(accelerator) -> bool:
    setting = accelerator.state.fsdp_plugin.reshard_after_forward
    return setting if isinstance(setting, bool) else True


def why_sharded(accelerator) -> str | None:
    """Why the student's LM head weight is not whole outside its forward (which the fused loss reads), or None."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return "FSDP shards the LM head's weight outside the forward"
    if zero_stage(_student_zero_config(accelerator)) == 3:
        return "ZeRO-3 partitions the LM head's weight outside the forward"
    return None


def student_sharding(accelerator, wrapped_model, gather: bool) -> ModelSharding:
    """wrapped_model: a callable returning the prepared student (DeepSpeed engine, or the FSDP2 module)."""
    if zero_stage(_student_zero_config(accelerator)) == 3:
        return ZeroThree(wrapped_model, gather)
    if accelerator.distributed_type == DistributedType.FSDP:
        return FullyShardedTwo(wrapped_model, gather, _reshard_after_forward(accelerator))
    return Replicated()


def prepare_teacher(teacher, accelerator, training, teacher_deepspeed: str | None, gather: bool,
                    keep_on_host: bool = False) -> tuple[object, ModelSharding]:
    """The teacher to call for forwards and generation, and its sharding. Under DeepSpeed its config is
    --teacher_deepspeed's (a file), else the student's (ms-swift's default): a ZeRO-3 inference engine when
    that is stage 3, else whole in every process. Under FSDP it is sharded as the student is. keep_on_host:
    --offload_teacher_model (a replicated teacher only; the trainer moves it)."""
    student_config = _student_zero_config(accelerator)
    if student_config is not None:
        config = read_config(teacher_deepspeed) if teacher_deepspeed else student_config
        if zero_stage(config) == 3:
            engine = inference_engine(teacher, config, training)
            return engine, ZeroThree(lambda: engine, gather)
    elif accelerator.distributed_type == DistributedType.FSDP:
        teacher = shard_teacher(teacher, accelerator)
        return teacher, FullyShardedTwo(lambda: teacher, gather, _reshard_after_forward(accelerator))
    if not keep_on_host:
        teacher.to(training.device)
    return teacher, Replicated()
