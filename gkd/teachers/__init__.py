"""The teacher, wherever it runs: what GKDTrainer runs for the loss and for seq_kd generation.

base.py     Teacher: the module the loss and the generation engine run, its sharding, what must hold
            while it runs, and its visits to the device
loaded.py   LoadedTeacher: its own weights in this process (whole, offloaded to host, ZeRO-3 or FSDP2)
student.py  self-distillation: the live student (no --teacher_model), or the student's base with its LoRA
            adapters off (--teacher_model equal to --model with --tuner_type lora): no second copy
served.py   ServedTeacher: a vLLM OpenAI server's top-k log-probabilities (--teacher_model_server)
make_teacher picks one from what gkd-train loaded or connected to.
"""

from gkd.teachers.base import Teacher
from gkd.teachers.loaded import LoadedTeacher
from gkd.teachers.student import STUDENT, STUDENT_BASE, StudentAsTeacher


def make_teacher(teacher_model, student, student_sharding, accelerator, training, gkd_args) -> Teacher:
    """teacher_model: a loaded model, STUDENT / STUDENT_BASE for self-distillation (gkd-train decides, as
    ms-swift does, from --teacher_model and --tuner_type), or a Teacher already made (a served one)."""
    if isinstance(teacher_model, Teacher):
        return teacher_model
    if teacher_model in (STUDENT, STUDENT_BASE):
        return StudentAsTeacher(student, student_sharding, adapters_off=teacher_model == STUDENT_BASE)
    return LoadedTeacher(teacher_model, accelerator, training, gkd_args)


__all__ = ["STUDENT", "STUDENT_BASE", "LoadedTeacher", "StudentAsTeacher", "Teacher", "make_teacher"]
