"""Several processes without GPUs: plain data-parallel, DeepSpeed ZeRO and FSDP2, over gloo.

torchrun (or accelerate launch) starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK and the master's
address; what remains is to tell accelerate the world it is in. Its backend detection
(PartialState._prepare_backend) looks for an accelerator, finds none, and reports a single process
(DistributedType.NO); asked for the CPU (`cpu=True`) it reports MULTI_CPU but then drops the DeepSpeed and
FSDP plugins. So, on a machine without CUDA:
- plain data-parallel asks for the CPU (--use_cpu): MULTI_CPU over gloo;
- DeepSpeed (its CPU accelerator, DS_ACCELERATOR=cpu): the detection reports MULTI_CPU over gloo, and
  accelerate goes on to DEEPSPEED as it does on GPUs;
- FSDP2: the detection reports MULTI_GPU over gloo with the device pinned to the CPU, and accelerate goes
  on to FSDP as it does on GPUs.
That makes sharded training usable on CPU clusters, and it is how gkd's tests run ZeRO and FSDP.
"""

import os

import torch

from gkd.errors import GKDUserError


def uses_deepspeed(training) -> bool:
    return bool(training.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def uses_fsdp(training) -> bool:
    return bool(training.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def settle_cpu_world(training) -> None:
    """Called by the training arguments just before transformers forms the process group: plain
    data-parallel runs ask accelerate for the CPU (DDP over gloo, without device ids); sharded ones must not,
    or accelerate drops their plugin, and get the backend detection below instead. Nothing to do with CUDA
    or in one process."""
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1  # a process torchrun or accelerate started
    if torch.cuda.is_available() or not launched or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if uses_deepspeed(training) or uses_fsdp(training):
        _report_cpu_world()
    else:
        training.use_cpu = True


def _report_cpu_world() -> None:
    """Make accelerate's backend detection report the launcher's gloo world when it finds no accelerator."""
    from accelerate.state import DistributedType, PartialState

    detect = getattr(PartialState, "_prepare_backend", None)
    if detect is None:
        raise GKDUserError("sharded training without GPUs: this accelerate version has no "
                           "PartialState._prepare_backend to report the gloo world to; use accelerate>=1.0,<2")
    if getattr(detect, "reports_cpu_world", False):
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when DeepSpeed first looks for its accelerator

    def prepare_backend(state, cpu=False, sagemaker_dp=False, backend=None):
        found_backend, found_type = detect(state, cpu, sagemaker_dp, backend)
        if found_type != DistributedType.NO:  # an accelerator after all
            return found_backend, found_type
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            return "gloo", DistributedType.MULTI_CPU  # accelerate turns it into DEEPSPEED
        state.device = torch.device("cpu")  # MULTI_GPU would otherwise look for a CUDA device
        return "gloo", DistributedType.MULTI_GPU  # accelerate turns it into FSDP with the plugin

    prepare_backend.reports_cpu_world = True
    PartialState._prepare_backend = prepare_backend
