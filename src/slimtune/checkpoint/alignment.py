"""Automatic alignment (`auto_align`) groups tensors into layers (a kernel with its bias; a norm
layer's gamma, beta, mean and variance), gives each tensor a role from its leaf name (kernel,
weights, weight, bias, gamma, scale, beta, moving_mean, running_var, ...) and compares shapes in
torch layout up to dense-vs-conv reshapes. Layers with the same roles and shapes form a class; a
class is paired in order when the names on both sides confirm that order (conv1_1 < conv1_2,
blocks.2 < blocks.10). Those pairs are anchors. The remaining classes are placed by the anchors:
by the scope tree (`conv1/BatchNorm` sits with `conv1/weights`), by numbering (`conv2` lies between
anchored `conv1` and `conv4`), and for a registration-ordered checkpoint (a state_dict) by its
order, then by shared name tokens (`shortcut`, `conv3`). Registration order alone never decides
between same-shape parallel branches (libraries register a shortcut before or after conv3). When
nothing decides, or a norm layer's tensors carry no role names, it raises AmbiguousMappingError
naming the net layers and the candidate checkpoint layers, rather than guessing.

Explicit name rules (`NameMap`) live in `slimtune.checkpoint.rules`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..errors import RestoreError
from .names import DEPTHWISE_LEAVES, tf_to_torch_shape

Shape = tuple[int, ...]


class AmbiguousMappingError(RestoreError):
    """The automatic mapping found two equally good answers; a name-map rule must decide."""


# ---------------------------------------------------------------------------------------------
# Automatic alignment

_ROLE_BY_LEAF = {
    **dict.fromkeys(["weight", "weights", "kernel", "w", "filter", "filters", "pointwise_weights",
                     "pointwise_weight", "pointwise_kernel", *DEPTHWISE_LEAVES], "weight"),
    **dict.fromkeys(["bias", "biases", "b"], "bias"),
    **dict.fromkeys(["gamma", "scale"], "gamma"),
    **dict.fromkeys(["beta", "offset", "shift"], "beta"),
    **dict.fromkeys(["running_mean", "moving_mean", "mean", "mu"], "mean"),
    **dict.fromkeys(["running_var", "moving_variance", "moving_var", "variance", "var"], "var"),
}
_NORM_ROLES = {"gamma", "beta", "mean", "var"}

def _split(name: str) -> tuple[str, str]:
    """(layer path, leaf) in the name's own spelling."""
    cut = max(name.rfind("/"), name.rfind(".") if "/" not in name else -1)
    return (name[:cut], name[cut + 1:]) if cut >= 0 else ("", name)


def _components(path: str) -> list[str]:
    return [c for c in re.split(r"[/.]", path) if c]


def _tokens(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+|\d+", text)


def _natural_key(path: str) -> tuple:
    return tuple(tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in _tokens(c))
                 for c in _components(path))


def _ordinal_comparable(a: str, b: str) -> bool:
    """True when the order of two layer paths is told by numbers/letters (conv1_1 < conv1_2),
    not by words that sort alphabetically (conv3 vs shortcut)."""
    pa, pb = _components(a), _components(b)
    for x, y in zip(pa, pb):
        if x == y:
            continue
        ta, tb = _tokens(x), _tokens(y)
        differs = False
        for s, t in zip(ta, tb):
            if s == t:
                continue
            if s.isdigit() and t.isdigit():
                differs = True
            elif s.isalpha() and t.isalpha() and len(s) == 1 and len(t) == 1:
                differs = True
            else:
                return False
        extra = ta[len(tb):] or tb[len(ta):]
        if extra:
            return all(t.isdigit() for t in extra)
        return differs
    return False


def _shape_key(shape: Shape) -> tuple[int, ...]:
    """Shape up to dense-vs-conv reshapes: (out, elements per output)."""
    if len(shape) <= 1:
        return tuple(shape)
    return shape[0], math.prod(shape[1:])


@dataclass
class _Layer:
    path: str
    index: int  # position of its first tensor in its side's order
    tensors: dict[str, tuple[str, Shape]] = field(default_factory=dict)  # role -> (name, torch shape)
    unresolved: list[tuple[str, Shape]] = field(default_factory=list)

    @property
    def signature(self) -> tuple:
        return tuple(sorted((role, _shape_key(shape)) for role, (_, shape) in self.tensors.items()))

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(sorted(self.tensors))

    @property
    def shape_multiset(self) -> tuple:
        shapes = [_shape_key(s) for _, s in self.tensors.values()] + [_shape_key(s) for _, s in self.unresolved]
        return tuple(sorted(shapes))

    def describe(self) -> str:
        names = [n for n, _ in self.tensors.values()] + [n for n, _ in self.unresolved]
        return self.path or names[0]


def _build_layers(tensors: Sequence[tuple[str, Shape]]) -> list[_Layer]:
    """Group (name, torch-layout shape) into layers and give each tensor a role."""
    groups: dict[str, list[tuple[int, str, str, Shape]]] = {}
    for index, (name, shape) in enumerate(tensors):
        if len(shape) == 0:
            continue  # scalars (step counters) are never layer weights
        path, leaf = _split(name)
        groups.setdefault(path, []).append((index, name, leaf, tuple(shape)))
    layers = []
    for path, members in groups.items():
        layer = _Layer(path, min(m[0] for m in members))
        roles = {name: _ROLE_BY_LEAF.get(leaf.lower()) for _, name, leaf, _ in members}
        is_norm = any(r in _NORM_ROLES for r in roles.values()) or any(
            r == "weight" and len(shape) == 1 for (_, name, _, shape), r in zip(members, roles.values()))
        unknown: list[tuple[str, Shape]] = []
        for _, name, leaf, shape in members:
            role = roles[name]
            if role == "weight" and is_norm and len(shape) == 1:
                role = "gamma"
            elif role == "bias" and is_norm:
                role = "beta"
            if role is None or role in layer.tensors:
                unknown.append((name, shape))
            else:
                layer.tensors[role] = (name, shape)
        # Roles from shapes where the names say nothing: one kernel, then one bias.
        if not is_norm:
            kernels = [u for u in unknown if len(u[1]) >= 2]
            if len(kernels) == 1 and "weight" not in layer.tensors:
                layer.tensors["weight"] = kernels[0]
                unknown.remove(kernels[0])
            vectors = [u for u in unknown if len(u[1]) == 1]
            if len(vectors) == 1 and "bias" not in layer.tensors and "weight" in layer.tensors:
                layer.tensors["bias"] = vectors[0]
                unknown.remove(vectors[0])
        layer.unresolved = unknown
        layers.append(layer)
    return layers


@dataclass
class AutoMapping:
    """The result of `auto_align`: model tensor -> checkpoint tensor."""

    pairs: dict[str, str] = field(default_factory=dict)
    #: model tensors paired by position only, with a different shape (a new classifier, typically)
    by_position: set[str] = field(default_factory=set)


def _registration_order_trusted(names: Sequence[str], layers: list[_Layer]) -> bool:
    """Is the checkpoint's own order a registration order (state_dict) rather than a name sort?"""
    if list(names) == sorted(names) or list(names) == sorted(names, key=_natural_key):
        return False  # indistinguishable from a sort: sibling order carries no information
    ordered = [layer.path for layer in sorted(layers, key=lambda l: l.index)]
    for a, b in zip(ordered, ordered[1:]):
        if _ordinal_comparable(a, b) and _natural_key(a) > _natural_key(b):
            return False  # numbered layers out of order: not a registration order
    return True


def _shared_prefix_length(paths: Sequence[list[str]]) -> int:
    """Components every path shares at its start (the net's root scope)."""
    if not paths:
        return 0
    shared = 0
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        shared += 1
    return min(shared, min(len(p) for p in paths) - 1) if paths else 0


def _distinguishing_tokens(paths: Sequence[str]) -> list[set[str]]:
    """Tokens of each path after removing the components all paths share (prefix and suffix)."""
    split = [_components(p) for p in paths]
    head = 0
    while all(len(s) > head for s in split) and len({s[head] for s in split}) == 1:
        head += 1
    tail = 0
    while all(len(s) - head > tail for s in split) and len({s[len(s) - 1 - tail] for s in split}) == 1:
        tail += 1
    return [{t.lower() for c in s[head:len(s) - tail] for t in _tokens(c)} for s in split]


def _resolve_by_tokens(models: list[_Layer], ckpts: list[_Layer]) -> Optional[list[_Layer]]:
    """The unique best assignment of `ckpts` to `models` by shared name tokens, or None on a tie."""
    if len(models) > 7:
        return None
    m_tokens, c_tokens = _distinguishing_tokens([m.path for m in models]), _distinguishing_tokens([c.path for c in ckpts])
    scored = []
    for perm in itertools.permutations(range(len(ckpts)), len(models)):
        scored.append((sum(len(m_tokens[i] & c_tokens[j]) for i, j in enumerate(perm)), perm))
    scored.sort(key=lambda s: -s[0])
    if not scored or scored[0][0] == 0 or (len(scored) > 1 and scored[1][0] == scored[0][0]):
        return None
    return [ckpts[j] for j in scored[0][1]]


def _ambiguity(models: Sequence[_Layer], ckpts: Sequence[_Layer], why: str) -> AmbiguousMappingError:
    example = next(iter(models or ckpts))
    shapes = ", ".join(f"{role} {list(shape)}" for role, (_, shape) in sorted(example.tensors.items()))
    hint = f"e.g. '{models[0].describe()}={ckpts[0].describe()}'" if models and ckpts else ""
    return AmbiguousMappingError(
        f"automatic name mapping is ambiguous ({why}): net layers {[m.describe() for m in models]} vs "
        f"checkpoint layers {[c.describe() for c in ckpts]} ({shapes}); name the pairs with "
        f"--checkpoint_name_map rules MODEL_PREFIX=CHECKPOINT_PREFIX ({hint}) next to 'auto'")


@dataclass(frozen=True)
class _Estimate:
    """Where in the net's layer order a checkpoint layer belongs: [lo, hi], unbounded if unknown."""

    lo: float = -math.inf
    hi: float = math.inf

    @property
    def bounded(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    @property
    def sort_value(self) -> float:
        if self.bounded:
            return (self.lo + self.hi) / 2
        return self.hi if math.isfinite(self.hi) else (self.lo if math.isfinite(self.lo) else math.inf)


class _Estimator:
    """Estimates a checkpoint layer's position in the net from the layers already matched (anchors).

    Registration-ordered checkpoints interpolate between anchors. The placement, which does not
    depend on any order, uses the scope tree (a layer inside scope S sits among the anchors inside
    S, e.g. `conv1/BatchNorm` next to `conv1/weights`), else the numbering (`conv2` lies between
    anchors `conv1` and `conv4`).
    """

    def __init__(self, anchors: list[tuple[_Layer, _Layer]], model_pos: dict[int, int], ckpt_pos: dict[int, int],
                 trusted: bool, baseline: int) -> None:
        self.trusted = trusted
        self.baseline = baseline
        self.points = sorted((ckpt_pos[id(c)], model_pos[id(m)]) for m, c in anchors)
        self.anchors = [(model_pos[id(m)], _components(c.path), c.path) for m, c in anchors]
        self.ckpt_pos = ckpt_pos

    def estimate(self, layer: _Layer) -> _Estimate:
        """Position for pairing costs: interpolated in a registration order, else the placement."""
        if self.trusted:
            x = self._interpolate(self.ckpt_pos[id(layer)])
            return _Estimate(x, x)
        return self.placement(layer)

    def placement(self, layer: _Layer) -> _Estimate:
        """Where the scope tree or the numbering puts a layer among the anchors (order-free evidence)."""
        parts = _components(layer.path)
        best, inside = self.baseline, []
        for position, anchor_parts, _ in self.anchors:
            shared = 0
            for a, b in zip(parts, anchor_parts):
                if a != b:
                    break
                shared += 1
            if shared > best:
                best, inside = shared, [position]
            elif shared == best and shared > self.baseline:
                inside.append(position)
        if inside:
            return _Estimate(min(inside), max(inside))
        lo, hi = -math.inf, math.inf
        key = _natural_key(layer.path)
        for position, _, anchor_path in self.anchors:
            if _ordinal_comparable(anchor_path, layer.path):
                if _natural_key(anchor_path) < key:
                    lo = max(lo, position + 0.5)
                else:
                    hi = min(hi, position - 0.5)
        return _Estimate(lo, hi)

    def _interpolate(self, x: float) -> float:
        before = max((p for p in self.points if p[0] <= x), default=None)
        after = min((p for p in self.points if p[0] >= x), default=None)
        if before is None or after is None or before[0] == after[0]:
            anchor = before or after
            return anchor[1] + (x - anchor[0]) if anchor else x
        return before[1] + (after[1] - before[1]) * (x - before[0]) / (after[0] - before[0])


def _names_order(a: _Layer, b: _Layer) -> bool:
    """True when the names alone say `a` comes before `b` (conv1_1 < conv1_2, unit_1 < unit_2)."""
    return _ordinal_comparable(a.path, b.path) and _natural_key(a.path) < _natural_key(b.path)


def _named_in_order(models: Sequence[_Layer], ckpts: Sequence[_Layer]) -> bool:
    """Both sides' names confirm the in-order pairing of every adjacent pair."""
    return all(_names_order(models[i], models[i + 1]) and _names_order(ckpts[i], ckpts[i + 1])
               for i in range(len(models) - 1))


def _best_order_preserving(models: list[_Layer], ckpts: list[_Layer], cost) -> Optional[list[tuple[_Layer, _Layer]]]:
    """Pair the shorter list into the longer in order, at least total cost; None when two pairings tie."""
    swap = len(models) > len(ckpts)
    short, long_ = (ckpts, models) if swap else (models, ckpts)
    pair_cost = (lambda s, l: cost(l, s)) if swap else cost
    k, n = len(short), len(long_)
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    ways = [[0] * (n + 1) for _ in range(k + 1)]
    for j in range(n + 1):
        best[0][j], ways[0][j] = 0.0, 1
    for i in range(1, k + 1):
        for j in range(i, n + 1):
            skip = best[i][j - 1]
            take = best[i - 1][j - 1] + pair_cost(short[i - 1], long_[j - 1])
            value = min(skip, take)
            best[i][j] = value
            ways[i][j] = min(2, (ways[i][j - 1] if math.isclose(skip, value, abs_tol=1e-9) else 0)
                             + (ways[i - 1][j - 1] if math.isclose(take, value, abs_tol=1e-9) else 0))
    if ways[k][n] != 1:
        return None
    pairs = []
    i, j = k, n
    while i > 0:
        take = best[i - 1][j - 1] + pair_cost(short[i - 1], long_[j - 1])
        if math.isclose(best[i][j], take, abs_tol=1e-9) and ways[i - 1][j - 1]:
            pairs.append((long_[j - 1], short[i - 1]) if swap else (short[i - 1], long_[j - 1]))
            i, j = i - 1, j - 1
        else:
            j -= 1
    pairs.reverse()
    return pairs


def _assign_class(models: list[_Layer], ckpts: list[_Layer], estimator: _Estimator, model_pos: dict[int, int],
                  far: float) -> list[tuple[_Layer, _Layer]]:
    """Pair one class of same-signature layers, or raise AmbiguousMappingError."""
    estimates = {id(c): estimator.estimate(c) for c in ckpts}
    ordered = sorted(ckpts, key=lambda c: (estimates[id(c)].sort_value, _natural_key(c.path)))

    def cost(m: _Layer, c: _Layer) -> float:
        estimate = estimates[id(c)]
        if not estimate.bounded:
            return far  # nothing places it: use it only when no placed layer fits
        return abs(model_pos[id(m)] - estimate.sort_value)

    pairs = _best_order_preserving(models, ordered, cost)
    if pairs is None:
        raise _ambiguity(models, ordered, f"{len(models)} net layers but {len(ckpts)} checkpoint layers of "
                                          "this shape, and their positions do not decide which pair up"
                         if len(models) != len(ckpts) else "same-shape layers whose order is not decided")
    placements = {id(c): estimator.placement(c) for c in ckpts}

    def decided(a: tuple[_Layer, _Layer], b: tuple[_Layer, _Layer]) -> bool:
        # Registration order is arbitrary between parallel branches (a shortcut and conv3): an
        # adjacent pair counts as ordered only when names on both sides, or the scope tree, say so.
        if _names_order(a[0], b[0]) and _names_order(a[1], b[1]):
            return True
        return placements[id(a[1])].hi < placements[id(b[1])].lo

    result = list(pairs)
    start = 0
    while start < len(pairs):
        end = start
        while end + 1 < len(pairs) and not decided(pairs[end], pairs[end + 1]):
            end += 1
        if end > start:
            run_models = [m for m, _ in pairs[start:end + 1]]
            run_ckpts = [c for _, c in pairs[start:end + 1]]
            resolved = _resolve_by_tokens(run_models, run_ckpts)
            if resolved is None:
                raise _ambiguity(run_models, run_ckpts, "same-shape layers whose order neither names nor "
                                                        "neighbouring layers decide")
            result[start:end + 1] = list(zip(run_models, resolved))
        start = end + 1
    return result


def _fan_in(layer: _Layer) -> Optional[int]:
    kernel = layer.tensors.get("weight")
    return _shape_key(kernel[1])[1] if kernel and len(kernel[1]) >= 2 else None


def _pair_leftovers(models: list[_Layer], ckpts: list[_Layer]) -> list[tuple[_Layer, _Layer]]:
    """Pair leftover layers with the same roles whose shapes differ only in the output count
    (a replaced classifier), or the single leftover of a role set on each side."""
    pairs = []
    by_roles_m: dict[tuple, list[_Layer]] = defaultdict(list)
    by_roles_c: dict[tuple, list[_Layer]] = defaultdict(list)
    for layer in models:
        by_roles_m[layer.roles].append(layer)
    for layer in ckpts:
        if not layer.unresolved:
            by_roles_c[layer.roles].append(layer)
    for roles, ms in by_roles_m.items():
        cs = by_roles_c.get(roles, [])
        if not roles or not cs:
            continue
        if len(ms) == 1 and len(cs) == 1:
            pairs.append((ms[0], cs[0]))
            continue
        for m in ms:
            same_in = [c for c in cs if _fan_in(c) is not None and _fan_in(c) == _fan_in(m)]
            rivals = [o for o in ms if _fan_in(o) == _fan_in(m)]
            if len(same_in) == 1 and len(rivals) == 1:
                pairs.append((m, same_in[0]))
    return pairs


def auto_align(model_tensors: Sequence[tuple[str, Sequence[int]]],
               checkpoint_tensors: Sequence[tuple[str, Sequence[int]]],
               tf_layout: bool) -> AutoMapping:
    """Align checkpoint tensors to model tensors by structure, order and shape.

    model_tensors: (torch name, torch shape) in module registration order. checkpoint_tensors:
    (name, stored shape) in the file's order; `tf_layout` says the stored shapes are TF layout.
    Raises AmbiguousMappingError where the alignment is not decided.
    """
    model_layers = _build_layers([(n, tuple(int(d) for d in s)) for n, s in model_tensors])
    converted = [(n, tf_to_torch_shape(n, s) if tf_layout else tuple(int(d) for d in s)) for n, s in checkpoint_tensors]
    ckpt_layers = _build_layers(converted)

    trusted = _registration_order_trusted([n for n, _ in converted], ckpt_layers)
    ckpt_layers.sort(key=(lambda l: l.index) if trusted else (lambda l: _natural_key(l.path)))
    model_layers.sort(key=lambda l: l.index)
    model_pos = {id(l): i for i, l in enumerate(model_layers)}
    ckpt_pos = {id(l): i for i, l in enumerate(ckpt_layers)}
    baseline = _shared_prefix_length([_components(l.path) for l in ckpt_layers])

    classes: dict[tuple, tuple[list[_Layer], list[_Layer]]] = defaultdict(lambda: ([], []))
    for layer in model_layers:
        if layer.tensors and not layer.unresolved:
            classes[layer.signature][0].append(layer)
    for layer in ckpt_layers:
        if layer.tensors and not layer.unresolved:
            classes[layer.signature][1].append(layer)

    # Anchors first: classes whose pairing order alone decides; then the rest, placed by the anchors.
    matched: list[tuple[_Layer, _Layer]] = []
    pending = []
    for ms, cs in classes.values():
        if ms and cs and len(ms) == len(cs) and _named_in_order(ms, cs):
            matched.extend(zip(ms, cs))
        elif ms and cs:
            pending.append((ms, cs))
    pending.sort(key=lambda mc: len(mc[0]) + len(mc[1]))
    far = float(len(model_layers) + 1)
    while pending:
        deferred, first_error = [], None
        for ms, cs in pending:
            estimator = _Estimator(matched, model_pos, ckpt_pos, trusted, baseline)
            try:
                matched.extend(_assign_class(ms, cs, estimator, model_pos, far))
            except AmbiguousMappingError as error:
                deferred.append((ms, cs))
                first_error = first_error or error
        if len(deferred) == len(pending):
            raise first_error
        pending = deferred

    used_models = {id(m) for m, _ in matched}
    used_ckpts = {id(c) for _, c in matched}
    left_models = [l for l in model_layers if id(l) not in used_models]
    left_ckpts = [l for l in ckpt_layers if id(l) not in used_ckpts]

    # Checkpoint layers whose tensors' roles the names do not tell: refuse if a net layer needs them.
    for layer in left_ckpts:
        if not layer.unresolved:
            continue
        candidates = [m for m in left_models if m.shape_multiset == layer.shape_multiset]
        if candidates:
            names = [n for n, _ in layer.tensors.values()] + [n for n, _ in layer.unresolved]
            raise AmbiguousMappingError(
                f"automatic name mapping is ambiguous: checkpoint tensors {names} have the same shapes, "
                f"so their roles (weight/bias/mean/variance) cannot be told apart for net layer "
                f"{candidates[0].describe()}; add --checkpoint_name_map rules (or rename them in the file)")

    result = AutoMapping()
    for m, c in matched:
        for role, (name, _) in m.tensors.items():
            result.pairs[name] = c.tensors[role][0]
    for m, c in _pair_leftovers([l for l in left_models if l.tensors], left_ckpts):
        for role, (name, _) in m.tensors.items():
            result.pairs[name] = c.tensors[role][0]
            result.by_position.add(name)
    return result
