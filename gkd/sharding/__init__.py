"""How the student and the teacher are spread over the processes, and what generating from them takes.

A replicated model (one process, DDP, DeepSpeed ZeRO-1/2) holds its whole weights in every process. A
sharded one (DeepSpeed ZeRO-3, FSDP2) holds a slice and gathers each layer's weights inside its forward,
which makes every forward a collective: all processes must run it together. Token-by-token generation
would gather every layer once per token, and processes whose completions end at different lengths would
stop calling forwards at different times and hang the others. So a sharded model generates either

- gathered (`--ds3_gather_for_generation true`, the default, as in ms-swift and TRL): every process
  gathers the whole weights once, generates on its own, and gives them back; or
- synced (false, for models too big for one device): weights stay sharded and every process runs the same
  forwards (transformers' `synced_gpus`), those with nothing to generate on a stand-in prompt.

The trainer asks `student_sharding` / `prepare_teacher` once and hands the result to the sampling engine;
it never looks at which backend is running.
"""

from gkd.sharding.base import ModelSharding, Replicated
from gkd.sharding.preparation import prepare_teacher, student_sharding, why_sharded

__all__ = ["ModelSharding", "Replicated", "prepare_teacher", "student_sharding", "why_sharded"]
