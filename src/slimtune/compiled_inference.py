"""`--compile` for eval and predict: the network's inference forward compiled once, checked against eager.

torch.compile with inductor's *freezing* treats the weights as constants of the graph: each
BatchNorm is folded into its convolution's kernel, the kernels are pre-packed in oneDNN's blocked
layout once, at compile time, and elementwise tails are fused into generated C++. On 2 CPU cores at
batch 16 (2026-12-03, same process, alternating with eager) that measured 1.47x the eager forward for
nasnet_mobile (whose ~850 small ops per forward cost Python dispatch in eager; 1.24x compiled without
freezing) and 1.05-1.13x for inception_v3. Compiling takes 30-80 s on 2 cores, so it pays on a
dataset, not on a few photos.

What makes it safe to offer:
- Frozen weights must not change after the first batch (they are baked into the graph), so this is
  for a loaded checkpoint (`slimtune eval`, `slimtune predict`), never for evaluation during training.
- torch 2.14's inductor does not freeze every net correctly: with freezing, Inception-ResNet-v2's
  logits came out 37% off (relative to the largest logit) and MobileNet v3 failed to build; both are
  right compiled without freezing. So the first batch runs both ways: when the frozen graph fails to
  build or its logits differ from the eager model's by more than `tolerance` of the largest, it is
  compiled again without freezing and checked again, and if that fails too the eager model runs.
  Either way slimtune says so in one line.

(Freezing is set with `torch._inductor.config.patch` around the call that compiles:
`torch.compile(options={"freezing": True})` is accepted but does not freeze in torch 2.14.)
"""

from __future__ import annotations

import shutil
import sys
from typing import Callable, Optional

import torch
from torch import nn

from .errors import ConfigError

# The export check's bound (export.verify): a compiled graph computes the eager model's logits up
# to float32 reassociation, far below this.
COMPILE_TOLERANCE = 1e-4


def check_compiler(device: torch.device) -> None:
    """torch.compile on CPU generates C++: refuse in one line when no compiler is on PATH."""
    if device.type == "cpu" and not any(shutil.which(name) for name in ("g++", "c++", "clang++", "cc", "gcc")):
        raise ConfigError("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one or "
                          "drop --compile")


class CompiledInference:
    """Call it like the model on an image batch of at most `batch_size`: the logits of the compiled
    graph (or of the eager model when the first-batch check sent it back to eager).

    Every batch is copied into a `batch_size` buffer, so a short last batch reuses the compiled
    graph instead of compiling a second one (the padding rows are computed and dropped: eval-mode
    nets treat each image on its own). `status` says what runs: "unchecked" before the first batch,
    then "compiled, frozen weights", "compiled" or "eager: <why>".
    """

    def __init__(self, model: nn.Module, batch_size: int, *, tolerance: float = COMPILE_TOLERANCE) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.batch_size = batch_size
        self.tolerance = tolerance
        self.status = "unchecked"
        self._freezing = True
        self._compiled: Optional[Callable[[torch.Tensor], torch.Tensor]] = torch.compile(model, dynamic=False)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        count = images.shape[0]
        if count > self.batch_size:
            raise ValueError(f"a batch of {count} images; this compiled forward takes at most {self.batch_size}")
        if self._compiled is None:
            return self.model(images)
        with torch.no_grad():  # freezing applies to inference graphs only
            if self.status == "unchecked":
                return self._first_batch(images)
            return self._run_compiled(images)

    def _run_compiled(self, images: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config as inductor_config

        with inductor_config.patch(freezing=self._freezing):  # read when the first call compiles
            return self._compiled(self._padded(images))[: images.shape[0]]

    def _padded(self, images: torch.Tensor) -> torch.Tensor:
        """`images` in a fresh `batch_size` buffer of the same layout (the graph is specialised on
        shape and strides, so every call must look alike)."""
        layout = (torch.channels_last if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
                  else torch.contiguous_format)
        buffer = torch.empty((self.batch_size, *images.shape[1:]), dtype=images.dtype, device=images.device,
                             memory_format=layout)
        buffer[: images.shape[0]].copy_(images)
        buffer[images.shape[0]:].zero_()
        return buffer

    def _first_batch(self, images: torch.Tensor) -> torch.Tensor:
        eager = self.model(images)
        frozen_failure = None
        for freezing in (True, False):
            self._freezing = freezing
            outcome = self._checked_run(images, eager)
            if isinstance(outcome, torch.Tensor):
                self.status = "compiled, frozen weights" if freezing else "compiled"
                if frozen_failure:
                    _warn(f"with frozen weights {frozen_failure}; running it compiled without freezing")
                return outcome
            if freezing:
                frozen_failure = outcome
                # torch.compile keeps its graphs per function: a new wrapper of the same model
                # would be handed the frozen graph again.
                torch._dynamo.reset()
                self._compiled = torch.compile(self.model, dynamic=False)
        self.status = f"eager: {outcome}"
        self._compiled = None
        _warn(f"{outcome}; running the eager model instead")
        return eager

    def _checked_run(self, images: torch.Tensor, eager: torch.Tensor) -> torch.Tensor | str:
        """The compiled logits of `images`, or why they cannot be used."""
        try:
            compiled = self._run_compiled(images)
        except Exception as error:  # inductor's failures come as many exception types
            # The last line that is not torch's advice on debug settings.
            lines = [line.strip() for line in str(error).splitlines()
                     if line.strip() and "TORCHDYNAMO_VERBOSE" not in line and "TORCH_LOGS" not in line]
            reason = lines[-1] if lines else type(error).__name__
            return f"torch.compile could not build it ({reason[:200]})"
        scale = float(eager.abs().max()) if eager.numel() else 0.0
        difference = float((compiled.float() - eager.float()).abs().max()) if eager.numel() else 0.0
        if not difference <= self.tolerance * max(scale, 1e-12):  # also catches NaN
            return (f"the compiled graph's logits differ from the eager model's by {difference:.3g} "
                    f"(> {self.tolerance:g} of the largest, {scale:.3g})")
        return compiled


def _warn(message: str) -> None:
    print(f"slimtune: warning: --compile: {message}", file=sys.stderr, flush=True)


def inference_forward(model: nn.Module, compile: bool, batch_size: int,
                      device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward eval/predict run: `model` itself, or with `compile` a CompiledInference of it
    (a C++ compiler is required on CPU: refused in one line without one)."""
    if not compile:
        return model
    check_compiler(device)
    return CompiledInference(model, batch_size)
