"""slim's optimizers (--optimizer) on torch, with TensorFlow's update rules where torch differs.

torch's RMSprop adds epsilon outside the square root and starts its mean square at 0; TF's
RMSPropOptimizer adds it inside and starts at 1, which with slim's opt_epsilon=1.0 is what slim's
recipes were tuned for. FTRL has no torch counterpart. Both are implemented here after TF's
`training_ops` kernels.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch.optim import Optimizer

from ..errors import ConfigError

OPTIMIZERS = ("adadelta", "adagrad", "adam", "adamw", "ftrl", "momentum", "rmsprop", "sgd")

# Per-optimizer epsilon when --opt_epsilon is not given. slim used 1.0 for all of them, which
# makes Adam barely move (a trap its users hit); RMSProp keeps 1.0 because its TF form puts
# epsilon inside the square root of a mean square that starts at 1.
DEFAULT_EPSILON = {"adadelta": 1e-6, "adam": 1e-8, "adamw": 1e-8, "rmsprop": 1.0}


class TFRMSprop(Optimizer):
    """tf.train.RMSPropOptimizer: ms starts at 1, mom = m*mom + lr*g/sqrt(ms+eps)."""

    def __init__(self, params: Iterable, lr: float, decay: float = 0.9, momentum: float = 0.0,
                 epsilon: float = 1e-10, weight_decay: float = 0.0, centered: bool = False) -> None:
        super().__init__(params, dict(lr=lr, decay=decay, momentum=momentum, epsilon=epsilon,
                                      weight_decay=weight_decay, centered=centered))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Optional[float]:
        """One update of every parameter with a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                state = self.state[param]
                if not state:
                    state["ms"] = torch.ones_like(param)
                    state["mom"] = torch.zeros_like(param)
                    if group["centered"]:
                        state["mg"] = torch.zeros_like(param)
                ms, mom = state["ms"], state["mom"]
                ms.mul_(group["decay"]).addcmul_(grad, grad, value=1 - group["decay"])
                denominator = ms.add(group["epsilon"])
                if group["centered"]:
                    state["mg"].mul_(group["decay"]).add_(grad, alpha=1 - group["decay"])
                    denominator.addcmul_(state["mg"], state["mg"], value=-1)
                mom.mul_(group["momentum"]).addcdiv_(grad, denominator.sqrt_(), value=group["lr"])
                param.sub_(mom)
        return loss


class Ftrl(Optimizer):
    """tf.train.FtrlOptimizer (FTRL-proximal with learning_rate_power, l1 and l2)."""

    def __init__(self, params: Iterable, lr: float, learning_rate_power: float = -0.5,
                 initial_accumulator_value: float = 0.1, l1: float = 0.0, l2: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        if learning_rate_power > 0:
            raise ConfigError("--ftrl_learning_rate_power must be <= 0")
        super().__init__(params, dict(lr=lr, power=learning_rate_power, init=initial_accumulator_value,
                                      l1=l1, l2=l2, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Optional[float]:
        """One FTRL update of every parameter with a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, power, l1, l2 = group["lr"], -group["power"], group["l1"], group["l2"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                state = self.state[param]
                if not state:
                    state["accum"] = torch.full_like(param, group["init"])
                    state["linear"] = torch.zeros_like(param)
                accum, linear = state["accum"], state["linear"]
                new_accum = accum + grad * grad
                sigma = (new_accum.pow(power) - accum.pow(power)) / lr
                linear.add_(grad - sigma * param)
                quadratic = new_accum.pow(power) / lr + 2 * l2
                shrunk = linear.clamp(-l1, l1) - linear
                param.copy_(torch.where(linear.abs() > l1, shrunk / quadratic, torch.zeros_like(param)))
                accum.copy_(new_accum)
        return loss


def build_optimizer(name: str, param_groups: list[dict], learning_rate: float, *, opt_epsilon: Optional[float] = None,
                    adadelta_rho: float = 0.95, adagrad_initial_accumulator_value: float = 0.1,
                    adam_beta1: float = 0.9, adam_beta2: float = 0.999, ftrl_learning_rate_power: float = -0.5,
                    ftrl_initial_accumulator_value: float = 0.1, ftrl_l1: float = 0.0, ftrl_l2: float = 0.0,
                    momentum: float = 0.9, rmsprop_momentum: float = 0.9, rmsprop_decay: float = 0.9) -> Optimizer:
    """Build slim's optimizer `name` over param groups (each may carry its own weight_decay)."""
    epsilon = opt_epsilon if opt_epsilon is not None else DEFAULT_EPSILON.get(name)
    if name == "adadelta":
        return torch.optim.Adadelta(param_groups, lr=learning_rate, rho=adadelta_rho, eps=epsilon)
    if name == "adagrad":
        return torch.optim.Adagrad(param_groups, lr=learning_rate,
                                   initial_accumulator_value=adagrad_initial_accumulator_value)
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=learning_rate, betas=(adam_beta1, adam_beta2), eps=epsilon)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=learning_rate, betas=(adam_beta1, adam_beta2), eps=epsilon)
    if name == "ftrl":
        return Ftrl(param_groups, lr=learning_rate, learning_rate_power=ftrl_learning_rate_power,
                    initial_accumulator_value=ftrl_initial_accumulator_value, l1=ftrl_l1, l2=ftrl_l2)
    if name == "momentum":
        return torch.optim.SGD(param_groups, lr=learning_rate, momentum=momentum)
    if name == "rmsprop":
        return TFRMSprop(param_groups, lr=learning_rate, decay=rmsprop_decay, momentum=rmsprop_momentum,
                         epsilon=epsilon)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=learning_rate)
    raise ConfigError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
