"""slim's learning-rate schedules (--learning_rate_decay_type) plus cosine, with linear warmup.

Epochs are counted on the *global* batch (batch_size x world size): slim counted them per clone,
so its decay ran num_clones times too slowly (tensorflow/models#1428).
"""

from __future__ import annotations

import math

from ..errors import ConfigError

DECAY_TYPES = ("fixed", "exponential", "polynomial", "cosine")


def learning_rate_at(step: int, *, learning_rate: float, decay_type: str, steps_per_epoch: float,
                     num_epochs_per_decay: float = 2.0, decay_factor: float = 0.94,
                     end_learning_rate: float = 1e-4, warmup_epochs: float = 0.0,
                     total_steps: int | None = None) -> float:
    """The learning rate at a global step."""
    decay_steps = max(int(steps_per_epoch * num_epochs_per_decay), 1)
    if decay_type == "fixed":
        rate = learning_rate
    elif decay_type == "exponential":
        # tf.train.exponential_decay(staircase=True)
        rate = learning_rate * decay_factor ** (step // decay_steps)
    elif decay_type == "polynomial":
        # tf.train.polynomial_decay(power=1.0, cycle=False) over decay_steps.
        fraction = min(step, decay_steps) / decay_steps
        rate = (learning_rate - end_learning_rate) * (1 - fraction) + end_learning_rate
    elif decay_type == "cosine":
        horizon = max(total_steps or decay_steps, 1)
        fraction = min(step, horizon) / horizon
        rate = end_learning_rate + 0.5 * (learning_rate - end_learning_rate) * (1 + math.cos(math.pi * fraction))
    else:
        raise ConfigError(f"--learning_rate_decay_type {decay_type!r} is not one of {', '.join(DECAY_TYPES)}")
    warmup_steps = steps_per_epoch * warmup_epochs
    if warmup_steps > 0:
        rate = min(learning_rate * step / warmup_steps, rate)
    return rate
