"""--offload_teacher_model: the teacher's weights live in host memory and visit the device once per
optimizer step, for the step's generations and forwards.

The teacher never trains, so its host copy never goes stale: sending it back costs nothing (the device
copies are simply dropped), and only the host-to-device copy is paid, once per step, from pinned memory
(page-locked, so the copy is a non-blocking DMA) where there is a GPU.
"""

import torch


class OffloadedModel:
    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, torch.device(device)
        pin = self.device.type == "cuda"
        self._host, by_tensor = {}, {}  # a tied weight (one tensor under two names) gets one host copy
        for name, tensor in self._tensors():
            if id(tensor) not in by_tensor:
                host = tensor.detach().to("cpu")
                by_tensor[id(tensor)] = host.pin_memory() if pin else host.clone()
                tensor.data = by_tensor[id(tensor)]  # at once: the original goes now, not after the whole model
            self._host[name] = by_tensor[id(tensor)]
        self.on_device = False
        self.loads = 0  # how many times the weights came to the device: once per optimizer step

    def _tensors(self):
        yield from self.model.named_parameters(remove_duplicate=False)
        yield from self.model.named_buffers(remove_duplicate=False)

    def load(self) -> None:
        """Copy the weights to the device (a no-op while they are there)."""
        if self.on_device:
            return
        copies = {}  # tied weights (one host copy, two names) are copied once and stay tied
        for name, tensor in self._tensors():
            host = self._host[name]
            if id(host) not in copies:
                # empty + copy_ rather than .to(): a real copy also when the device is the host itself.
                copies[id(host)] = torch.empty_like(host, device=self.device).copy_(host, non_blocking=True)
            tensor.data = copies[id(host)]
        self.on_device, self.loads = True, self.loads + 1

    def offload(self) -> None:
        """Point the weights back at their host copies; the device copies are freed."""
        for name, tensor in self._tensors():
            tensor.data = self._host[name]
        self.on_device = False
