"""Name maps between a net and a checkpoint, kept importable from here.

Explicit rules (`NameRule`, `parse_rule`, `NameMap`, `leaf_synonyms`) live in
`slimtune.checkpoint.rules`; automatic structural alignment (`auto_align`, `AutoMapping`,
`AmbiguousMappingError`) in `slimtune.checkpoint.alignment`.
"""

from .alignment import AmbiguousMappingError, AutoMapping, auto_align
from .rules import NameMap, NameRule, leaf_synonyms, parse_rule

__all__ = ["AmbiguousMappingError", "AutoMapping", "NameMap", "NameRule", "auto_align", "leaf_synonyms",
           "parse_rule"]
