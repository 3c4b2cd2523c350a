"""Self-distillation (ms-swift's modes): the teacher is the student's own module, so no second copy of the
weights exists.

- STUDENT (no --teacher_model): the live student, its current weights, as ms-swift's dynamic teacher.
  On the same prompt it predicts exactly what the student does: the divergence is 0 and only --sft_alpha's
  term trains, until a row's teacher_prompt (OPSD) gives the teacher a privileged view.
- STUDENT_BASE (--teacher_model equal to --model, --tuner_type lora): the student with its LoRA adapters
  disabled, i.e. the frozen starting model, as ms-swift's fixed teacher, without loading it twice.

The teacher runs in eval mode (no gradient checkpointing for a forward without gradients); the student's
training mode comes back afterwards. Its sharding is the student's: under ZeRO-3 or FSDP2 every process
enters its generation together, and its parameters are gathered as the student's are.
"""

import contextlib

from gkd.teachers.base import Teacher

STUDENT = "student"
STUDENT_BASE = "student_base"


class StudentAsTeacher(Teacher):
    def __init__(self, student, student_sharding, adapters_off: bool):
        super().__init__(student, student_sharding)
        self.adapters_off = adapters_off

    @contextlib.contextmanager
    def running(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter() if self.adapters_off else contextlib.nullcontext():
                yield
        finally:
            self.model.train(was_training)
