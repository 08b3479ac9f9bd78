"""Name maps between a net and a checkpoint: explicit rules, and automatic structural alignment.

Rules (`--checkpoint_name_map`, repeatable; one rule per string) map a MODEL name to the
CHECKPOINT name it is restored from, like slim users' `name_in_checkpoint(var)`:

- ``MODEL_PREFIX=CHECKPOINT_PREFIX`` — e.g. ``ssd_vgg_512/=vgg_16/``: the net's ``ssd_vgg_512/...``
  loads from the checkpoint's ``vgg_16/...``. Prefixes match on scope boundaries and may be written
  in slim ('/') or torch ('.') spelling; an empty side adds or removes a prefix.
- ``re:PATTERN=REPLACEMENT`` — a regex rule, ``re.sub`` on the model name spelled like the
  checkpoint (slim names, e.g. ``vgg_16/fc8/weights``, for TF checkpoints; torch names otherwise).
  The split is at the LAST '='. Example: ``re:^net/block(\\d+)/=resnet/stage\\1/``.
- ``auto`` — align the remaining tensors by structure (see `auto_align`).

The first rule that matches a name wins; names no rule matches keep the naming contract. When a
rewritten name is not in the checkpoint, the one tensor beside it whose leaf means the same is
taken (slim ``weights`` = Keras ``kernel`` = torch ``weight``), so rules may name layers only.

The automatic alignment that `auto` switches on lives in `slimtune.checkpoint.alignment`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ..errors import ConfigError
from .names import DEPTHWISE_LEAVES, strip_tensor_suffix


# ---------------------------------------------------------------------------------------------
# Explicit rules


@dataclass(frozen=True)
class NameRule:
    """One rule: a boundary-matched prefix replacement or a regex substitution."""

    kind: str  # 'prefix' or 'regex'
    pattern: str
    replacement: str
    text: str

    def apply(self, name: str) -> Optional[str]:
        """The rewritten name, or None when the rule does not match `name`."""
        if self.kind == "regex":
            compiled = re.compile(self.pattern)
            if not compiled.search(name):
                return None
            return compiled.sub(self.replacement, name, count=1)
        prefix = self.pattern
        if not name.startswith(prefix):
            return None
        rest = name[len(prefix):]
        if prefix and not prefix.endswith(("/", ".")) and rest and rest[0] not in "/.":
            return None  # 'fc8' must not rewrite 'fc8_2'
        return self.replacement + rest

    def respelled(self, separator: str) -> "NameRule":
        """A prefix rule written with the other separator, re-spelled to `separator`."""
        if self.kind != "prefix":
            return self
        other = "." if separator == "/" else "/"
        return NameRule("prefix", self.pattern.replace(other, separator),
                        self.replacement.replace(other, separator), self.text)


_RULE_HELP = ("a --checkpoint_name_map rule is MODEL_PREFIX=CHECKPOINT_PREFIX (e.g. ssd_vgg_512/=vgg_16/), "
              "re:PATTERN=REPLACEMENT, or auto")


def parse_rule(text: str) -> NameRule:
    """Parse one rule string (not 'auto')."""
    spec = text.strip()
    if spec.startswith("re:"):
        body = spec[3:]
        if "=" not in body:
            raise ConfigError(f"name-map rule '{text}' has no '=': {_RULE_HELP}")
        pattern, replacement = body.rsplit("=", 1)
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f"name-map rule '{text}': bad regular expression ({error})") from None
        return NameRule("regex", pattern, replacement, spec)
    if spec.count("=") != 1:
        raise ConfigError(f"name-map rule '{text}' is not understood: {_RULE_HELP}")
    model_prefix, checkpoint_prefix = (part.strip() for part in spec.split("="))
    return NameRule("prefix", strip_tensor_suffix(model_prefix), strip_tensor_suffix(checkpoint_prefix), spec)


@dataclass(frozen=True)
class NameMap:
    """Ordered rules mapping model names to checkpoint names, plus the `auto` switch."""

    rules: tuple[NameRule, ...] = ()
    auto: bool = False

    @classmethod
    def parse(cls, specs: Union[None, str, Sequence[str], "NameMap"]) -> "NameMap":
        """Parse rule strings ('auto', 'A/=B/', 're:P=R'); one rule per string."""
        if isinstance(specs, NameMap):
            return specs
        if specs is None:
            return cls()
        items = [specs] if isinstance(specs, str) else list(specs)
        rules: list[NameRule] = []
        auto = False
        for item in items:
            if not str(item).strip():
                continue
            if str(item).strip().lower() == "auto":
                auto = True
            else:
                rules.append(parse_rule(str(item)))
        return cls(tuple(rules), auto)

    def apply(self, model_name: str) -> str:
        """The checkpoint name for `model_name`: the first matching rule's result, else unchanged."""
        for rule in self.rules:
            mapped = rule.apply(model_name)
            if mapped is not None:
                return mapped
        return model_name

    def rule_for(self, model_name: str) -> Optional[NameRule]:
        """The rule that rewrites `model_name`, if any."""
        return next((rule for rule in self.rules if rule.apply(model_name) is not None), None)

    def respelled(self, separator: str) -> "NameMap":
        """The same map with prefix rules in the checkpoint's spelling ('/' or '.')."""
        return NameMap(tuple(rule.respelled(separator) for rule in self.rules), self.auto)

    def __bool__(self) -> bool:
        return bool(self.rules) or self.auto


# Leaves that name the same thing in different libraries (slim, torch, Keras).
_SYNONYM_GROUPS = (
    {"weights", "weight", "kernel", "w"},
    {"biases", "bias", "b"},
    {"gamma", "scale", "weight"},
    {"beta", "offset", "bias"},
    {"moving_mean", "running_mean", "mean"},
    {"moving_variance", "running_var", "moving_var", "variance", "var"},
    set(DEPTHWISE_LEAVES),
    {"pointwise_weights", "pointwise_weight", "pointwise_kernel"},
)


def leaf_synonyms(leaf: str) -> set[str]:
    """Other libraries' names for the same leaf: 'weights' -> {'weight', 'kernel', 'w'}."""
    found: set[str] = set()
    for group in _SYNONYM_GROUPS:
        if leaf in group:
            found |= group
    found.discard(leaf)
    return found
