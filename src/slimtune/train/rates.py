"""Per-scope learning rates: --learning_rate_multipliers and --layer_decay, resolved to one table.

`--learning_rate_multipliers 'vgg_16/fc8=10,vgg_16/conv[1-3]=0.1'` gives each parameter the
multiplier of the first pattern that selects it (1 when none does). A pattern is a scope (matched
on scope boundaries, in slim or torch spelling, with or without the net's scope, as
--trainable_scopes; the word `heads` names the net's classifier heads) or, when it holds regex
characters, a regular expression matched from the start of the slim name up to a scope boundary.
`--layer_decay D` multiplies each parameter's rate by `D ** (max_depth - depth)` over the net's
depth order (nets/depth.py; timm's and BEiT's rule, heads at full rate). The two combine as a
product. A multiplier of 0 freezes: the parameter is frozen exactly as --trainable_scopes freezes
(no gradient, no weight decay, BatchNorm statistics kept) by the same code.

The resolved table (scope -> multiplier, initial rate, frozen, parameter count) is printed when a
run starts, written to restore_plan.txt and kept in config.yaml's `resolved` section.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from torch import nn

from ..checkpoint.scopes import HEADS, expand_heads, nearest_scopes, select_params
from ..errors import ConfigError
from ..nets.depth import block_scopes, parameter_depths

FLAG = "--learning_rate_multipliers"
_REGEX_CHARACTERS = set("[](){}*+?|^$\\")


@dataclass(frozen=True)
class MultiplierRule:
    """One PATTERN=MULTIPLIER entry as the user wrote it."""

    pattern: str
    multiplier: float

    @property
    def is_regex(self) -> bool:
        """A pattern with regex characters is a regular expression; otherwise a scope."""
        return any(character in _REGEX_CHARACTERS for character in self.pattern)


def _number(pattern: str, value: Any) -> float:
    try:
        multiplier = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{FLAG}: {pattern}={value!r}: the multiplier is not a number "
                          f"(write SCOPE=MULTIPLIER, e.g. vgg_16/fc8=10)") from None
    if not math.isfinite(multiplier) or multiplier < 0:
        raise ConfigError(f"{FLAG}: {pattern}={value!r}: a multiplier must be a finite number >= 0 "
                          f"(0 freezes the scope)")
    return multiplier


def parse_multipliers(value: Any) -> list[MultiplierRule]:
    """'a=10,b/c[1-3]=0.1', a YAML mapping {a: 10, ...} or a list of 'a=10' -> rules in the given order."""
    if value is None or value == "" or value == {}:
        return []
    if isinstance(value, dict):
        pairs = [(str(key), item) for key, item in value.items()]
    elif not isinstance(value, (str, list, tuple)):
        raise ConfigError(f"{FLAG}: expected 'SCOPE=MULTIPLIER,...' or a mapping, got {value!r}")
    else:
        pieces = [value] if isinstance(value, str) else [str(v) for v in value]
        pairs = []
        for piece in (p.strip() for text in pieces for p in text.split(",")):
            if not piece:
                continue
            pattern, sep, number = piece.rpartition("=")
            if not sep or not pattern.strip():
                raise ConfigError(f"{FLAG}: {piece!r} is not SCOPE=MULTIPLIER (e.g. vgg_16/fc8=10; "
                                  f"a regex with commas goes in a YAML mapping)")
            pairs.append((pattern.strip(), number.strip()))
    rules = []
    for pattern, number in pairs:
        if not pattern.strip():
            raise ConfigError(f"{FLAG}: an empty pattern; write SCOPE=MULTIPLIER")
        rules.append(MultiplierRule(pattern.strip(), _number(pattern, number)))
    return rules


def _slim_spelling(name: str) -> str:
    return name.replace(".", "/")


def _regex_matches(model: nn.Module, rule: MultiplierRule, names: Sequence[str]) -> list[str]:
    try:
        # Matched from the start of the name up to a scope boundary, as a scope is.
        pattern = re.compile(f"(?:{rule.pattern})(?:/|$)")
    except re.error as error:
        raise ConfigError(f"{FLAG}: {rule.pattern!r} is not a valid regular expression ({error})") from None
    net = getattr(model, "scope", "") or ""
    hits = []
    for name in names:
        slim = _slim_spelling(name)
        relative = slim[len(net) + 1:] if net and slim.startswith(net + "/") else None
        if pattern.match(slim) or (relative is not None and pattern.match(relative)):
            hits.append(name)
    return hits


def select_rule(model: nn.Module, rule: MultiplierRule) -> list[str]:
    """The parameter names a rule's pattern selects; a pattern selecting nothing is a ConfigError
    naming the nearest scopes."""
    names = [name for name, _ in model.named_parameters()]
    if rule.pattern.lower() == HEADS:
        heads = expand_heads(HEADS, model)
        if not heads:
            raise ConfigError(f"{FLAG}: {getattr(getattr(model, 'spec', None), 'name', 'this net')} marks no "
                              f"classifier heads; name the scopes instead")
        return select_params(model, heads, flag=FLAG)
    if not rule.is_regex:
        return select_params(model, rule.pattern, flag=FLAG)
    hits = _regex_matches(model, rule, names)
    if not hits:
        net = getattr(model, "scope", None) or None
        near = ", ".join(_slim_spelling(s) for s in nearest_scopes(rule.pattern.replace("/", "."), names, net))
        raise ConfigError(f"{FLAG}: pattern '{rule.pattern}' matches no variable of the net; nearest scopes: {near}")
    return hits


@dataclass
class RateRow:
    """One line of the resolved table."""

    scope: str
    rule: str
    multiplier: float
    rate: float
    frozen: bool
    parameters: int
    members: list[str] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """For config.yaml's resolved section."""
        return {"scope": self.scope, "rule": self.rule, "multiplier": self.multiplier, "rate": self.rate,
                "frozen": self.frozen, "parameters": self.parameters}


@dataclass
class ResolvedRates:
    """Each parameter's learning-rate multiplier, and the table that explains it."""

    multipliers: dict[str, float]
    rows: list[RateRow]
    #: patterns every parameter of which an earlier pattern took first (they change nothing)
    shadowed: list[str] = field(default_factory=list)

    def frozen_names(self) -> set[str]:
        """Parameters a multiplier of 0 freezes."""
        return {name for name, multiplier in self.multipliers.items() if multiplier == 0}

    def restrict(self, trainable: Optional[set[str]]) -> Optional[set[str]]:
        """The trainable set (None = all) less what the multipliers freeze."""
        frozen = self.frozen_names()
        if not frozen:
            return trainable
        return set(trainable if trainable is not None else self.multipliers) - frozen

    def mark_frozen(self, trainable: Optional[set[str]]) -> None:
        """Mark the rows none of whose parameters train (a multiplier of 0, or --trainable_scopes)."""
        for row in self.rows:
            row.frozen = trainable is not None and not any(name in trainable for name in row.members)

    def format(self) -> str:
        """The table as text: one row per scope."""
        width = max([len(r.scope) for r in self.rows] + [5])
        rule_width = max([len(r.rule) for r in self.rows] + [4])
        lines = [f"Learning rates ({len(self.rows)} scopes): scope, rule, multiplier, initial rate, parameters",
                 f"  {'scope':<{width}}  {'rule':<{rule_width}}  {'x':>9}  {'rate':>10}  {'params':>11}"]
        for row in self.rows:
            rate = "frozen" if row.frozen else f"{row.rate:.4g}"
            lines.append(f"  {row.scope:<{width}}  {row.rule:<{rule_width}}  {row.multiplier:>9.4g}  {rate:>10}  "
                         f"{row.parameters:>11,}")
        lines += [f"  pattern '{pattern}' sets no rate: earlier patterns take every parameter it selects "
                  f"(the first match wins)" for pattern in self.shadowed]
        return "\n".join(lines)

    def as_list(self) -> list[dict[str, Any]]:
        """The table for config.yaml."""
        return [row.as_dict() for row in self.rows]


def _common_scope(names: list[str]) -> str:
    split = [_slim_spelling(n).split("/")[:-1] for n in names]
    common: list[str] = []
    for parts in zip(*split, strict=False):  # names of different depths: up to the shortest
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return "/".join(common) or "(root)"


def resolve_rates(model: nn.Module, rules_value: Any, layer_decay: Optional[float], learning_rate: float,
                  spec: Any = None) -> Optional[ResolvedRates]:
    """Each parameter's multiplier (first matching rule x layer decay) and the table; None when neither
    --learning_rate_multipliers nor --layer_decay is given (every rate is the schedule's)."""
    rules = parse_multipliers(rules_value)
    if not rules and layer_decay is None:
        return None
    if layer_decay is not None and not (0 < layer_decay <= 1):
        raise ConfigError(f"--layer_decay {layer_decay!r} must be > 0 and <= 1 (e.g. 0.75)")
    names = [name for name, _ in model.named_parameters()]
    chosen: dict[str, int] = {}
    for index, rule in enumerate(rules):
        for name in select_rule(model, rule):
            chosen.setdefault(name, index)  # the first rule that selects a parameter wins
    depths = parameter_depths(model, spec) if layer_decay is not None else {}
    deepest = max(depths.values(), default=0)
    blocks = block_scopes(model) if layer_decay is not None else {}
    multipliers: dict[str, float] = {}
    row_keys: dict[tuple, list[str]] = {}
    for name in names:
        rule_index = chosen.get(name)
        multiplier = rules[rule_index].multiplier if rule_index is not None else 1.0
        depth = depths.get(name)
        if depth is not None:
            multiplier *= layer_decay ** (deepest - depth)  # type: ignore[operator]
        multipliers[name] = multiplier
        row_keys.setdefault((depth, rule_index, multiplier), []).append(name)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    rows = []
    for (depth, rule_index, multiplier), members in row_keys.items():
        if depth is not None and members[0] in blocks and len({blocks[m] for m in members}) == 1:
            scope = _slim_spelling(blocks[members[0]])
        else:
            scope = _common_scope(members)
        rule = rules[rule_index].pattern if rule_index is not None else "-"
        if depth is not None:
            rule = f"{rule}; depth {depth}/{deepest}" if rule_index is not None else f"depth {depth}/{deepest}"
        rows.append(RateRow(scope=scope, rule=rule, multiplier=multiplier, rate=learning_rate * multiplier,
                            frozen=multiplier == 0, parameters=sum(sizes[m] for m in members), members=members))
    shadowed = [rule.pattern for index, rule in enumerate(rules) if index not in chosen.values()]
    return ResolvedRates(multipliers, rows, shadowed)
