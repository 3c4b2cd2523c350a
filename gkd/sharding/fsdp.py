"""FSDP2 (torch's fully_shard, as accelerate applies it): the whole model for a while, and the teacher
sharded the way the student is.

Each fully_shard'ed module gathers its parameters before its forward and frees them after it
(reshard_after_forward). For generation they are gathered once: every module unsharded, told not to free
its parameters after a forward (an unsharded module's pre-forward gathers nothing), and resharded after.
FSDP2 also records the order of each forward to prefetch in the backward; generation's forwards (in the
processes that had prompts only) must not stay in that record, or the processes' next backwards prefetch
different modules and their all-gathers no longer match: the root's reset_iter_state() clears it.
"""

import contextlib

from gkd.errors import GKDUserError
from gkd.sharding.base import ModelSharding


def _sharded_modules(model):
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


class FullyShardedTwo(ModelSharding):
    """A model sharded by FSDP2. model: a callable returning it (the student is sharded when the trainer
    prepares it); reshard_after_forward: what its modules do outside the block (accelerate's setting)."""

    collective = True

    def __init__(self, model, gather: bool, reshard_after_forward: bool = True):
        self.model, self.synced, self.reshard_after_forward = model, not gather, reshard_after_forward

    @contextlib.contextmanager
    def whole_model(self):
        root = self.model()
        inner = [module for module in _sharded_modules(root) if module is not root]  # the root keeps its setting
        for module in (root, *inner):
            module.unshard()
        for module in inner:
            module.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for module in inner:
                module.set_reshard_after_forward(self.reshard_after_forward, recurse=False)
            for module in (root, *inner):
                module.reshard()

    def full(self, tensor):
        """A DTensor shard's whole value, all-gathered (every process must ask for it together)."""
        tensor = tensor.detach()
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    @contextlib.contextmanager
    def generating(self):
        root = self.model()
        if not hasattr(root, "reset_iter_state"):
            raise GKDUserError("generating from an FSDP2 model needs torch>=2.13 (FSDPModule.reset_iter_state); "
                               "upgrade torch, or use --deepspeed zero3")
        try:
            with super().generating():
                yield
        finally:
            root.reset_iter_state()  # forget generation's forwards (the next backward prefetches by them)


def shard_teacher(teacher, accelerator):
    """The teacher through accelerate's own FSDP2 preparation, with the student's plugin settings (no
    optimizer: its parameters are frozen, so nothing is upcast to float32)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator, teacher)
