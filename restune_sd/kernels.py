"""Kernel choice for the bypass's frozen forward in a CPU training step: oneDNN lays a convolution's weight out anew
on every call, a copy as large as the weight, which costs more than the plain kernel where the weight outweighs the
activation (SD's 1,280- and 2,560-channel convolutions at 4x4 to 16x16); those run on the plain kernel.

Measured (evaluation/results/bypass-floor/summary.md): the frozen forward's peak above the weights and its time drop; its
output differs from oneDNN's by float rounding (about 1e-6 relative). fp32 only: in bf16 the plain kernel is two
orders of magnitude slower. Sampling keeps oneDNN, so it draws exactly what a stock pipeline draws.
"""

import platform

import torch
from torch import nn

# Measured on a 2-core AVX2 AMD EPYC (torch 2.10): a 320-channel 3x3 convolution at 32x32, 2.7 s in bf16 against
# 0.05 s in fp32. oneDNN's fast bf16 paths need AVX-512 (or AMX) on x86.
SLOW_BF16 = ("--mixed-precision bf16: this CPU has no AVX-512, and PyTorch's bf16 convolutions run about 50x slower "
             "than fp32 on it; --mixed-precision no is faster here")


def slow_cpu_bf16(device: torch.device) -> bool:
    """Whether bf16 on `device` is an x86 CPU without AVX-512, where PyTorch's bf16 kernels crawl."""
    return (device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64")
            and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


def prefers_plain_kernel(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """The plain kernel for an fp32 CPU convolution whose weight holds more numbers than one sample's input."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and conv.weight.dtype == torch.float32
            and conv.weight.numel() > x[0].numel())


class PlainKernels:
    """Forward hooks on a frozen backbone's convolutions that switch oneDNN off around the heavy-weight ones while
    `active` (a count of the bypasses inside a training step's frozen forward; never a tuner's own
    layers). oneDNN's previous setting comes back after each call, also when a call fails. One per backbone, shared
    by stacked bypasses (`for_backbone`), so each convolution has one pair of hooks."""

    def __init__(self):
        self.active = 0
        self._was = []
        self._handles = []

    @classmethod
    def for_backbone(cls, backbone: nn.Module, ladder: nn.Module) -> "PlainKernels":
        kernels = backbone.__dict__.get("_restune_plain_kernels")
        if kernels is None:
            kernels = backbone.__dict__["_restune_plain_kernels"] = cls()
            kernels.attach(frozen_convolutions(backbone, ladder))
        return kernels

    def attach(self, convs: list[nn.Conv2d]) -> list:
        for conv in convs:
            self._handles += [conv.register_forward_pre_hook(self._before),
                              conv.register_forward_hook(self._after, always_call=True)]
        return self._handles

    def _before(self, conv, args):
        plain = self.active and bool(args) and prefers_plain_kernel(conv, args[0])
        self._was.append(torch.backends.mkldnn.enabled if plain else None)
        if plain:
            torch.backends.mkldnn.enabled = False

    def _after(self, conv, args, output):
        was = self._was.pop() if self._was else None
        if was is not None:
            torch.backends.mkldnn.enabled = was


def frozen_convolutions(backbone: nn.Module, ladder: nn.Module) -> list[nn.Conv2d]:
    """The backbone's own 2-D convolutions (a ladder's modules excluded: they train and keep oneDNN)."""
    own = {id(m) for m in ladder.modules()}
    return [m for m in backbone.modules() if isinstance(m, nn.Conv2d) and id(m) not in own]
