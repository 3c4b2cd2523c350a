"""A teacher with its own weights in this process: whole in every process (optionally kept in host memory
between steps: --offload_teacher_model), a ZeRO-3 inference engine, or sharded by FSDP2."""

from gkd.offload import OffloadedModel
from gkd.sharding import prepare_teacher
from gkd.teachers.base import Teacher


class LoadedTeacher(Teacher):
    def __init__(self, model, accelerator, training, gkd_args):
        model, sharding = prepare_teacher(
            model.eval().requires_grad_(False), accelerator, training, gkd_args.teacher_deepspeed,
            gather=gkd_args.ds3_gather_for_generation, keep_on_host=gkd_args.offload_teacher_model)
        super().__init__(model, sharding)
        # --offload_teacher_model: the weights live in host memory and visit the device once per step.
        self.host_copy = OffloadedModel(model, training.device) if gkd_args.offload_teacher_model else None

    def load(self) -> None:
        if self.host_copy is not None:
            self.host_copy.load()

    def offload(self) -> None:
        if self.host_copy is not None:
            self.host_copy.offload()
