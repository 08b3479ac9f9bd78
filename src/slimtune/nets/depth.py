"""How deep each parameter sits in a net: the order --layer_decay scales learning rates by.

timm and BEiT give each block of a network a depth (stem 0, each block one deeper, the classifier
head deepest) and train depth d of D at `lr * decay ** (D - d)`: early, general features move
least. A registered net may define its own order (`ModelSpec.layer_depths`); every other net,
a user's `file.py:fn` net included, gets the generic rule here:

- a parameter's block is its first module scope under the net's scope (`vgg_16/conv3`,
  `InceptionV3/Mixed_6a`, NASNet's `cell_7`), numbered in registration order, which in these
  nets is forward order; a block made of numbered repeats (`resnet_v1_50/block2/unit_1`, `unit_2`,
  ...) is split into them, as timm splits a ResNet stage into its blocks (Inception's parallel
  `Branch_0..3` are not repeats: a Mixed block is one depth);
- the classifier heads the registry marks (`InceptionV3/Logits` and `InceptionV3/AuxLogits`)
  share the deepest depth, whatever their place in the registration order.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from torch import nn

from ..checkpoint.scopes import classifier_scopes_of, common_net_scope, in_scope
from ..errors import ConfigError

_NUMBERED = re.compile(r"^(.*?)_?(\d+)$")
# Numbered scopes that run side by side, not one after another (Inception's Branch_0..3): one depth.
_PARALLEL_STEMS = {"branch"}


def _net_scope(model: nn.Module, names: list[str]) -> Optional[str]:
    own = getattr(model, "scope", None)
    if isinstance(own, str) and own and all(n.startswith(own + ".") for n in names):
        return own
    return common_net_scope(names)


def _is_numbered_repeat(children: list[str]) -> bool:
    """True for sequential scopes like unit_1, unit_2, ... (one stem, more than one number)."""
    if len(children) < 2:
        return False
    stems = set()
    for child in children:
        match = _NUMBERED.match(child)
        if not match:
            return False
        stems.add(match.group(1))
    return len(stems) == 1 and stems.pop().lower() not in _PARALLEL_STEMS


def block_scopes(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the block scope (torch spelling) its depth is counted by (heads excluded)."""
    names = [name for name, _ in model.named_parameters()]
    net = _net_scope(model, names)
    heads = classifier_scopes_of(model)
    first: dict[str, str] = {}
    children: dict[str, list[str]] = {}
    for name in names:
        if any(in_scope(name, head, net) for head in heads):
            continue
        parts = name.split(".")
        start = 1 if net and parts[0] == net else 0
        module_parts = parts[start:-1]
        # A parameter of the net's root module (no module scope of its own) is a block by its name.
        top = module_parts[0] if module_parts else parts[-1]
        key = ".".join(parts[:start] + [top])
        first[name] = key
        if len(module_parts) > 1:
            below = children.setdefault(key, [])
            if module_parts[1] not in below:
                below.append(module_parts[1])
        else:
            children.setdefault(key, []).append("")  # the block has parameters of its own: keep it whole
    split = {key for key, below in children.items() if _is_numbered_repeat(below)}
    blocks = {}
    for name, key in first.items():
        if key in split:
            parts = name.split(".")
            depth_of_key = key.count(".") + 1
            key = ".".join(parts[:depth_of_key + 1])
        blocks[name] = key
    return blocks


def generic_depths(model: nn.Module) -> dict[str, int]:
    """The generic rule (module docstring): blocks in registration order, heads deepest."""
    blocks = block_scopes(model)
    order: dict[str, int] = {}
    for block in blocks.values():
        order.setdefault(block, len(order))
    head_depth = len(order)
    return {name: order[blocks[name]] if name in blocks else head_depth for name, _ in model.named_parameters()}


def parameter_depths(model: nn.Module, spec: Any = None) -> dict[str, int]:
    """Parameter name -> depth (0 = stem ... max = classifier heads) for --layer_decay.

    Uses `spec.layer_depths` (the registry's own order for the net) when set, else the generic rule.
    `spec` defaults to the spec the factory attached to the model (`model.spec`).
    """
    spec = spec if spec is not None else getattr(model, "spec", None)
    rule = getattr(spec, "layer_depths", None)
    if rule is None:
        return generic_depths(model)
    depths = rule(model)
    missing = [name for name, _ in model.named_parameters() if name not in depths]
    if missing:
        raise ConfigError(f"--layer_decay: {spec.name}'s layer_depths gives no depth for {len(missing)} "
                          f"parameter(s), e.g. {', '.join(missing[:3])}; fix the registry entry")
    return {name: int(depths[name]) for name, _ in model.named_parameters()}
