"""--trainable_scopes and --freeze_batch_norm, done structurally.

slim only narrowed the optimizer's variable list: frozen layers kept updating their BatchNorm
statistics and still paid weight decay. Here a frozen parameter has requires_grad=False, is
left out of the optimizer (so no decay), and a BatchNorm whose parameters are all frozen stays
on its moving statistics even in train mode.
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

from ..nets.layers import BatchNorm


def _norm_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, (BatchNorm, nn.modules.batchnorm._BatchNorm)):
            yield name, module


def freeze_module_stats(module: nn.Module) -> None:
    """Keep a BatchNorm on its moving statistics, whatever model.train() says."""
    if isinstance(module, BatchNorm):
        module.frozen = True
    else:
        # torch's BatchNorm has no such switch: pin it in eval mode by shadowing `train`.
        module.eval()
        module.train = lambda mode=True: module  # type: ignore[assignment]


def unfreeze_module_stats(module: nn.Module) -> None:
    """Undo freeze_module_stats: the BatchNorm follows model.train() / eval() again."""
    if isinstance(module, BatchNorm):
        module.frozen = False
    elif "train" in vars(module):
        del module.train  # the class's own train() again
        module.train(True)


def apply_trainable_scopes(model: nn.Module, trainable: Optional[set[str]], freeze_batch_norm: bool = False) -> int:
    """Freeze every parameter not in `trainable` (None = all train); return the trainable count.

    It may be applied again with another set (phase 2 of --head_epochs): BatchNorms frozen before
    and trainable now update their statistics again.
    """
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable is None or name in trainable)
    for name, module in _norm_modules(model):
        own = list(module.parameters(recurse=False))
        if own:
            frozen = not any(p.requires_grad for p in own)
        else:  # a BN without gamma and beta follows the layer that owns it
            frozen = trainable is not None and f"{name.rsplit('.', 1)[0]}.weight" not in trainable
        if freeze_batch_norm or frozen:
            freeze_module_stats(module)
        else:
            unfreeze_module_stats(module)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def decay_groups(model: nn.Module, weight_decay: float,
                 multipliers: Optional[dict[str, float]] = None) -> list[dict]:
    """Optimizer groups: conv/fc kernels get L2 (slim's regularizers), biases and norms don't.

    With `multipliers` (parameter name -> learning-rate multiplier, from --learning_rate_multipliers
    and --layer_decay) each multiplier gets its own pair of groups, carrying it as `lr_multiplier`.
    """
    buckets: dict[tuple[float, bool], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_kernel = leaf == "weight" and parameter.dim() > 1
        multiplier = 1.0 if multipliers is None else float(multipliers.get(name, 1.0))
        # Kernels first within a multiplier: without multipliers, the two groups slim runs always had.
        buckets.setdefault((multiplier, True), [])
        buckets.setdefault((multiplier, False), [])
        buckets[(multiplier, is_kernel)].append(parameter)
    groups = []
    for (multiplier, is_kernel), params in buckets.items():
        if not params:
            continue
        group = {"params": params, "weight_decay": weight_decay if is_kernel else 0.0}
        if multipliers is not None:
            group["lr_multiplier"] = multiplier
        groups.append(group)
    return groups


def aux_head_parameters(model: nn.Module) -> list[str]:
    """Parameters of a net's auxiliary classifier: under a scope named AuxLogits (Inception v3/v4,
    Inception-ResNet-v2) or aux_logits (NASNet, PNASNet)."""
    return [name for name, _ in model.named_parameters()
            if any(part.replace("_", "").lower() == "auxlogits" for part in name.split("."))]


def freeze_aux_head(model: nn.Module) -> int:
    """Freeze the auxiliary head (--aux_loss_weight 0: no loss reaches it); return the tensors frozen.

    Its tensors would otherwise be trainable yet never get a gradient: DistributedDataParallel
    would wait for them (or need find_unused_parameters), and its BatchNorm statistics would drift.
    """
    names = set(aux_head_parameters(model))
    frozen = 0
    for name, parameter in model.named_parameters():
        if name in names and parameter.requires_grad:
            parameter.requires_grad_(False)
            frozen += 1
    for name, module in _norm_modules(model):
        if f"{name}.weight" in names or f"{name}.bias" in names or \
                any(part.replace("_", "").lower() == "auxlogits" for part in name.split(".")):
            freeze_module_stats(module)
    return frozen
