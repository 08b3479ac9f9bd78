"""Moving averages of the weights: slim's `--moving_average_decay`.

slim kept `tf.train.ExponentialMovingAverage(decay, num_updates=global_step)` of its model variables
(the trainable weights and the BatchNorm moving statistics) and evaluated with the averages. TF's
rule, reproduced here, updates each shadow after every optimizer step as

    decay_t = min(decay, (1 + t) / (10 + t))
    shadow  = shadow - (1 - decay_t) * (shadow - value)     (= decay_t * shadow + (1 - decay_t) * value)

where t is the global step before the update (0 for the first one), so early averages follow the
weights closely (TF's warm-up) instead of remembering the initialization for thousands of steps.

Averaged: the trainable parameters and the floating-point buffers (BatchNorm moving mean and
variance; frozen scopes still update theirs). Frozen weights do not change, so their "average" is
the weight itself and is not tracked; integer buffers (num_batches_tracked) are copied.
Unlike slim (whose shadows started from the random initialization and were never restored from a
warm-start checkpoint), the shadows start from the weights the run starts from.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import CheckpointError


def decay_at(decay: float, step: int) -> float:
    """TF's ExponentialMovingAverage decay with num_updates=step: min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1.0 + step) / (10.0 + step))


def averaged_names(model: nn.Module) -> list[str]:
    """state_dict names that get averaged: trainable parameters and floating-point buffers."""
    parameters = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    names = []
    for name in model.state_dict():
        if name in parameters:
            if parameters[name].requires_grad:
                names.append(name)
        elif name in buffers and buffers[name].is_floating_point():
            names.append(name)
    return names


class WeightAverage:
    """Shadow copies of a model's averaged tensors, updated after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"moving average decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = averaged_names(model)
        live = model.state_dict()
        self.shadow: dict[str, torch.Tensor] = {name: live[name].detach().clone() for name in self.names}

    def track_new(self, model: nn.Module) -> None:
        """Also average the tensors that became trainable (the whole net after a --head_epochs phase),
        starting from their current values; the shadows already kept go on."""
        live = model.state_dict()
        for name in averaged_names(model):
            if name not in self.shadow:
                self.names.append(name)
                self.shadow[name] = live[name].detach().clone()

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Move every shadow toward the model's current value; `step` is the global step before
        this optimizer step (TF's num_updates). Returns the decay used."""
        decay = decay_at(self.decay, step)
        live = model.state_dict()
        shadows = [self.shadow[name] for name in self.names]
        values = [live[name].detach() for name in self.names]
        if shadows:
            # TF's assign_moving_average form: shadow -= (1 - decay) * (shadow - value).
            torch._foreach_lerp_(shadows, values, 1.0 - decay)
        return decay

    def averaged_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full state_dict with the averaged tensors in place of the raw ones: a complete
        weights file that loads into the same network."""
        state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
        state.update(self.shadow)
        return state

    def averaged_model(self, model: nn.Module) -> nn.Module:
        """A copy of the model holding the averages (for evaluation while training)."""
        import copy

        twin = copy.deepcopy(model)
        twin.load_state_dict(self.averaged_state(model))
        return twin

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore the shadows from a saved averaged state (resume)."""
        missing = [name for name in self.names if name not in tensors]
        if missing:
            raise CheckpointError(f"the saved moving averages lack {len(missing)} tensors (e.g. {missing[0]}); "
                                  f"were they written with other --trainable_scopes?")
        for name in self.names:
            saved = tensors[name]
            if saved.shape != self.shadow[name].shape:
                raise CheckpointError(f"the saved moving average of {name} has shape {tuple(saved.shape)}, "
                                      f"the model {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(saved)
