"""Scopes for --checkpoint_exclude_scopes and --trainable_scopes, matched on scope boundaries.

slim matched exclusions with a plain string prefix, so `vgg_16/fc8` also hit `vgg_16/fc8_2`; here a
scope matches a name only when it is the whole name or a prefix ending at a '/' or '.' boundary.
Scopes are accepted in slim spelling (`vgg_16/fc8`) or torch spelling (`vgg_16.fc8`), and with or
without the network's own top scope (`fc8` means `vgg_16/fc8` in a net whose names all start with
`vgg_16`). A scope that matches nothing is an error naming the nearest scopes, because a typo there
would otherwise silently restore or train the wrong layers.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Optional, Sequence, Union

from torch import nn

from ..errors import ConfigError
from .names import slim_to_torch, strip_tensor_suffix, strip_wrappers

ScopesArg = Union[None, str, Sequence[str]]


def normalize_scope(scope: str) -> str:
    """One scope in torch spelling: whitespace, ':0', wrappers and trailing separators removed."""
    scope = strip_tensor_suffix(scope.strip()).rstrip("/.")
    return strip_wrappers(slim_to_torch(scope) if "/" in scope else scope)


def parse_scopes(text_or_list: ScopesArg) -> list[str]:
    """'vgg_16/fc8, vgg_16/fc7' (or a list, items may hold commas) -> ['vgg_16.fc8', 'vgg_16.fc7']."""
    if text_or_list is None:
        return []
    items = [text_or_list] if isinstance(text_or_list, str) else list(text_or_list)
    scopes: list[str] = []
    for item in items:
        for piece in str(item).split(","):
            scope = normalize_scope(piece)
            if scope and scope not in scopes:
                scopes.append(scope)
    return scopes


def _on_boundary(name: str, scope: str) -> bool:
    return name == scope or name.startswith(scope + ".")


def in_scope(name: str, scope: str, net_scope: Optional[str] = None) -> bool:
    """True when `name` lies inside `scope` (either spelling), matched on scope boundaries.

    With `net_scope` (e.g. 'vgg_16'), a scope written without it (`fc8`) matches too.
    """
    name = strip_wrappers(slim_to_torch(name))
    scope = normalize_scope(scope)
    if not scope:
        return False
    if _on_boundary(name, scope):
        return True
    if net_scope:
        net = normalize_scope(net_scope)
        if name.startswith(net + ".") and not _on_boundary(scope, net):
            return _on_boundary(name[len(net) + 1:], scope)
    return False


def common_net_scope(names: Iterable[str]) -> Optional[str]:
    """The first component shared by every name (slim's net scope, e.g. 'vgg_16'), if any."""
    first: Optional[str] = None
    seen_any = False
    for name in names:
        seen_any = True
        head = strip_wrappers(name).split(".", 1)
        if len(head) < 2:
            return None
        if first is None:
            first = head[0]
        elif head[0] != first:
            return None
    return first if seen_any else None


def _all_scopes(names: Sequence[str], net_scope: Optional[str]) -> list[str]:
    scopes: dict[str, None] = {}
    for name in names:
        parts = strip_wrappers(name).split(".")
        for end in range(1, len(parts) + 1):
            scopes[".".join(parts[:end])] = None
            if net_scope and parts[0] == net_scope and end > 1:
                scopes[".".join(parts[1:end])] = None
    return list(scopes)


def nearest_scopes(scope: str, names: Sequence[str], net_scope: Optional[str] = None, limit: int = 5) -> list[str]:
    """The existing scopes closest to `scope` (torch spelling), for 'did you mean' messages."""
    candidates = _all_scopes(names, net_scope)
    close = difflib.get_close_matches(normalize_scope(scope), candidates, n=limit, cutoff=0.5)
    if close:
        return close
    tops = [c for c in candidates if c.count(".") <= (1 if net_scope else 0)]
    return tops[:limit]


def _spell_like(user_text: str, torch_scope: str) -> str:
    return torch_scope.replace(".", "/") if "/" in user_text else torch_scope


def select_names(names: Sequence[str], scopes: ScopesArg, net_scope: Optional[str] = "auto",
                 flag: str = "scope") -> list[str]:
    """The names (kept as given) inside any of `scopes`; a scope matching nothing raises ConfigError.

    `net_scope='auto'` uses the first component shared by all names; None disables the
    net-relative form. `flag` names the option in error messages (e.g. '--trainable_scopes').
    """
    items = [scopes] if isinstance(scopes, str) else list(scopes or [])
    user_texts = [piece.strip() for item in items for piece in str(item).split(",") if piece.strip()]
    parsed = parse_scopes(scopes)
    if net_scope == "auto":
        net_scope = common_net_scope(names)
    clean = [strip_wrappers(n) for n in names]
    selected: set[str] = set()
    for scope, text in zip(parsed, _dedupe_texts(user_texts, parsed)):
        hits = [orig for orig, name in zip(names, clean) if in_scope(name, scope, net_scope)]
        if not hits:
            near = ", ".join(_spell_like(text, s) for s in nearest_scopes(scope, clean, net_scope))
            raise ConfigError(f"{flag}: scope '{text}' matches no variable of the net; nearest scopes: {near}")
        selected.update(hits)
    return [n for n in names if n in selected]


def _dedupe_texts(texts: list[str], parsed: list[str]) -> list[str]:
    """The user's own spelling for each parsed scope (parse_scopes drops duplicates)."""
    seen: dict[str, str] = {}
    for text in texts:
        seen.setdefault(normalize_scope(text), text)
    return [seen.get(scope, scope) for scope in parsed]


def select_params(model: nn.Module, scopes: ScopesArg, flag: str = "--trainable_scopes") -> list[str]:
    """Names of `model`'s parameters inside `scopes` (boundary match, either spelling)."""
    names = [name for name, _ in model.named_parameters()]
    own_scope = getattr(model, "scope", None)
    net_scope = own_scope if isinstance(own_scope, str) and own_scope else "auto"
    return select_names(names, scopes, net_scope=net_scope, flag=flag)


#: The word that stands for a net's classifier heads in --checkpoint_exclude_scopes / --trainable_scopes.
HEADS = "heads"


def classifier_scopes_of(model: nn.Module) -> tuple[str, ...]:
    """The scopes a net marks as its classifier heads (main first, auxiliary after): the net's own
    `classifier_scopes`, else its registry spec's, else its single `classifier_scope`."""
    inner = getattr(model, "module", model)  # DDP / DataParallel wrappers
    scopes = getattr(inner, "classifier_scopes", None)
    if scopes is None:
        spec = getattr(inner, "spec", None)
        scopes = getattr(spec, "classifier_scopes", ()) or ()
    if not scopes and getattr(inner, "classifier_scope", ""):
        scopes = (inner.classifier_scope,)
    return tuple(scopes)


def expand_heads(scopes: ScopesArg, model: nn.Module) -> ScopesArg:
    """Replace the word 'heads' by the net's classifier head scopes (Inception v3: InceptionV3/Logits,
    InceptionV3/AuxLogits); a headless net has none, so the word then excludes nothing."""
    items = [scopes] if isinstance(scopes, str) else list(scopes or [])
    pieces = [piece.strip() for item in items for piece in str(item).split(",") if piece.strip()]
    if not any(piece.lower() == HEADS for piece in pieces):
        return scopes
    expanded: list[str] = []
    for piece in pieces:
        expanded += list(classifier_scopes_of(model)) if piece.lower() == HEADS else [piece]
    return expanded
