"""slim's optimizers (--optimizer) on torch, with TensorFlow's update rules where torch differs.

torch's RMSprop adds epsilon outside the square root and starts its mean square at 0; TF's
RMSPropOptimizer adds it inside and starts at 1, which with slim's opt_epsilon=1.0 is what slim's
recipes were tuned for. FTRL has no torch counterpart. Both are implemented here after TF's
`training_ops` kernels.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Iterable, Optional

import torch
from torch.optim import Optimizer

from ..errors import ConfigError

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


# The optimizer registry: name -> factory(param_groups, learning_rate, options). Each factory reads
# the flags it needs from `options` (a TrainConfig, or any object with those attributes), so adding
# an optimizer is one decorated function here, plus its name in the --optimizer choices.
OptimizerFactory = Callable[[list, float, Any], Optimizer]
_REGISTRY: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator adding an optimizer factory under `name`."""
    def add(factory: OptimizerFactory) -> OptimizerFactory:
        _REGISTRY[name] = factory
        return factory
    return add


def _epsilon(options: Any, name: str) -> Optional[float]:
    given = getattr(options, "opt_epsilon", None)
    return given if given is not None else DEFAULT_EPSILON.get(name)


@register_optimizer("adadelta")
def _adadelta(groups: list, lr: float, o: Any) -> Optimizer:
    return torch.optim.Adadelta(groups, lr=lr, rho=o.adadelta_rho, eps=_epsilon(o, "adadelta"))


@register_optimizer("adagrad")
def _adagrad(groups: list, lr: float, o: Any) -> Optimizer:
    return torch.optim.Adagrad(groups, lr=lr, initial_accumulator_value=o.adagrad_initial_accumulator_value)


@register_optimizer("adam")
def _adam(groups: list, lr: float, o: Any) -> Optimizer:
    return torch.optim.Adam(groups, lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=_epsilon(o, "adam"))


@register_optimizer("adamw")
def _adamw(groups: list, lr: float, o: Any) -> Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=_epsilon(o, "adamw"))


@register_optimizer("ftrl")
def _ftrl(groups: list, lr: float, o: Any) -> Optimizer:
    return Ftrl(groups, lr=lr, learning_rate_power=o.ftrl_learning_rate_power,
                initial_accumulator_value=o.ftrl_initial_accumulator_value, l1=o.ftrl_l1, l2=o.ftrl_l2)


@register_optimizer("momentum")
def _momentum(groups: list, lr: float, o: Any) -> Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=o.momentum)


@register_optimizer("rmsprop")
def _rmsprop(groups: list, lr: float, o: Any) -> Optimizer:
    return TFRMSprop(groups, lr=lr, decay=o.rmsprop_decay, momentum=o.rmsprop_momentum, epsilon=_epsilon(o, "rmsprop"))


@register_optimizer("sgd")
def _sgd(groups: list, lr: float, o: Any) -> Optimizer:
    return torch.optim.SGD(groups, lr=lr)


def optimizer_names() -> tuple[str, ...]:
    """The registered optimizer names, sorted."""
    return tuple(sorted(_REGISTRY))


OPTIMIZERS = optimizer_names()  # at import time: the built-in ones


def build_optimizer(name: str, param_groups: list[dict], learning_rate: float, options: Any = None,
                    **overrides: Any) -> Optimizer:
    """Build slim's optimizer `name` over param groups (each may carry its own weight_decay).

    `options` supplies the optimizer flags (a TrainConfig); keyword `overrides` replace single ones
    (`opt_epsilon=1.0`); flags given by neither take TrainConfig's defaults.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError(f"--optimizer {name!r} is not one of {', '.join(optimizer_names())}")
    if options is None:
        from ..config import TrainConfig

        options = TrainConfig()
    unknown = [key for key in overrides if not hasattr(options, key)]
    if unknown:
        raise ConfigError(f"unknown optimizer option(s) {', '.join(unknown)}")
    merged = SimpleNamespace(**{**vars(options), **overrides}) if overrides else options
    return factory(param_groups, learning_rate, merged)
