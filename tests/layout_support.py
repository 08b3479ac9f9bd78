"""A dispatch mode that records the memory layout of every convolution's input, for tests that an
inference path (eager commands or exported graphs) convolves channels-last maps."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class ConvInputLayouts(TorchDispatchMode):
    """For each convolution op on a map whose layout is unambiguous (more than one channel and one
    pixel), whether its input was channels-last. Sees eager ops and TorchScript / torch.export graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.channels_last: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        x = args[0] if args else None
        if "conv" in func.__name__ and isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] > 1 \
                and x.shape[2] * x.shape[3] > 1:
            self.channels_last.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return func(*args, **(kwargs or {}))

    def all_channels_last(self) -> bool:
        """At least one convolution ran and every one had a channels-last input."""
        return bool(self.channels_last) and all(self.channels_last)

    def none_channels_last(self) -> bool:
        """At least one convolution ran and none had a channels-last input."""
        return bool(self.channels_last) and not any(self.channels_last)
