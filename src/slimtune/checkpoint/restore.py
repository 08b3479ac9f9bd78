"""The restore plan: which checkpoint tensor goes into which net tensor, and why the rest do not.

`restore(model, checkpoint, ...)` works on any torch module. It pairs every state_dict tensor of
the net with a checkpoint tensor (naming contract, name-map rules, or the automatic alignment),
converts layouts, checks shapes, and only then copies the values in, all or nothing. The returned
`RestorePlan` accounts for every tensor on both sides; `str(plan)` is the report users read, with
the flag that fixes each problem spelled out.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, RestoreError
from .mapping import NameMap, auto_align, leaf_synonyms
from .names import (fit_torch_array, fit_torch_shape, is_norm_scope, strip_tensor_suffix, strip_wrappers,
                    tf_to_torch_array, tf_to_torch_shape, torch_to_slim)
from .scopes import (ScopesArg, classifier_scopes_of, common_net_scope, expand_heads, in_scope, normalize_scope,
                     parse_scopes, select_names)

Shape = tuple[int, ...]
CheckpointArg = Union[str, os.PathLike, Mapping]

# ImageNet heads: slim's 1001-class checkpoints carry a 'background' class at index 0.
_CLASS_COUNTS = (1000, 1001)

_OPTIMIZER_SLOT = re.compile(
    r"^(Momentum|RMSProp|Adam|Adagrad|AdagradDA|Adadelta|Ftrl|ProximalAdagrad|LARS|Nadam|AdamW)(_\d+)?$")


def ignored_by_design(name: str) -> Optional[str]:
    """Why a checkpoint tensor is never restored into a net (None for model weights)."""
    parts = re.split(r"[/.]", name)
    leaf = parts[-1]
    if leaf == "global_step" or name in {"save_counter", "iterations"}:
        return "step counter"
    if leaf == "num_batches_tracked":
        return "BatchNorm step counter"
    if name in {"beta1_power", "beta2_power"} or _OPTIMIZER_SLOT.match(leaf):
        return "optimizer slot"
    if "ExponentialMovingAverage" in parts:
        return "EMA shadow"
    if ".OPTIMIZER_SLOT" in name or name.startswith(("optimizer/", "_CHECKPOINTABLE_OBJECT_GRAPH")):
        return "TF2 optimizer/bookkeeping"
    return None


@dataclass
class TensorFate:
    """What happened to one net tensor."""

    status: str  # 'loaded', 'excluded', 'missing' or 'mismatched'
    model_name: str
    model_shape: Shape
    checkpoint_name: Optional[str] = None  # the tensor it came from, or the name looked for
    checkpoint_shape: Optional[Shape] = None  # as stored in the checkpoint (its own layout)
    note: str = ""  # how it was paired or adapted ('auto', 'rule ...', 'dropped background row 0')
    scope: str = ""  # the layer scope to exclude when this tensor cannot load
    display: str = ""  # the name in the spelling users of this checkpoint think in


@dataclass
class CheckpointTensor:
    """A checkpoint tensor no net tensor took."""

    name: str
    shape: Shape
    reason: str = ""  # empty for unused tensors; the reason for ignored-by-design ones


# The flag that fixes each kind of problem, per command. `train` has them all; a command without
# one gets advice in words (its plan never names a flag that command refuses).
TRAIN_ADVICE = {"exclude": "--checkpoint_exclude_scopes", "ignore_missing": "--ignore_missing_vars",
                "name_map": "--checkpoint_name_map", "verbose": "--verbose"}
# eval and predict rebuild a net to read a checkpoint: nothing can be left out there.
LOAD_ADVICE: dict[str, Optional[str]] = {"exclude": None, "ignore_missing": None, "name_map": None, "verbose": None}
# features builds a net by name and class count and may map a foreign checkpoint's names.
FEATURES_ADVICE: dict[str, Optional[str]] = {**LOAD_ADVICE, "name_map": "--checkpoint_name_map",
                                             "classes": "--num_classes"}
INPUT_CHANNELS_NOTE = "input channels"


@dataclass
class RestorePlan:
    """Every tensor's fate; `ok` is False when something nobody excluded or ignored cannot load."""

    source: str
    model_label: str
    spelling: str  # 'slim' (TF layout) or 'torch'
    fates: list[TensorFate] = field(default_factory=list)
    unused: list[CheckpointTensor] = field(default_factory=list)
    ignored: list[CheckpointTensor] = field(default_factory=list)
    auto_mapping: dict[str, str] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)
    exclude_scopes: list[str] = field(default_factory=list)
    ignore_missing_vars: bool = False
    dry_run: bool = False
    applied: bool = False
    #: flags the calling command accepts, by the problem they fix (see TRAIN_ADVICE)
    advice: dict[str, Optional[str]] = field(default_factory=lambda: dict(TRAIN_ADVICE))
    #: ways the checkpoint's network computes differently from this one although tensors pair up
    #: (another architecture's stride placement, padding or preprocessing); not problems, but never "No problems"
    differences: list[str] = field(default_factory=list)
    #: what the nets are, for the differences check and the summary (e.g. 'torchvision ResNet')
    checkpoint_layout: str = ""

    def _with(self, status: str) -> list[TensorFate]:
        return [f for f in self.fates if f.status == status]

    @property
    def loaded(self) -> list[TensorFate]:
        """Net tensors restored (or to be restored) from the checkpoint."""
        return self._with("loaded")

    @property
    def adapted(self) -> list[TensorFate]:
        """Loaded tensors whose class rows were dropped or added (1001 <-> 1000)."""
        return [f for f in self.loaded if "background row" in f.note]

    @property
    def excluded(self) -> list[TensorFate]:
        """Net tensors inside --checkpoint_exclude_scopes."""
        return self._with("excluded")

    @property
    def missing(self) -> list[TensorFate]:
        """Net tensors with no checkpoint tensor."""
        return self._with("missing")

    @property
    def mismatched(self) -> list[TensorFate]:
        """Net tensors whose checkpoint tensor has another shape."""
        return self._with("mismatched")

    def _channel_mismatches(self) -> list[TensorFate]:
        return [f for f in self.mismatched if f.note.startswith(INPUT_CHANNELS_NOTE)]

    def _excludable(self) -> list[TensorFate]:
        return [f for f in self.mismatched if not f.note.startswith(INPUT_CHANNELS_NOTE)]

    @property
    def problems(self) -> list[str]:
        """One line per problem, each ending in what fixes it (a flag the command accepts)."""
        lines = []
        exclude, ignore, name_map = (self.advice.get(k) for k in ("exclude", "ignore_missing", "name_map"))
        for fate in self.mismatched:
            why = f" ({fate.note})" if fate.note.startswith("renamed") else ""
            shapes = (f"{fate.display}: checkpoint {_fmt(fate.checkpoint_shape)}, net {_fmt(fate.model_shape)}"
                      f"{why}: ")
            if fate.note.startswith(INPUT_CHANNELS_NOTE):
                stored, wanted = fate.note.split(":", 1)[1].split("->")
                lines.append(shapes + f"the checkpoint's first conv reads {stored.strip()}-channel images, the net "
                             f"{wanted.strip()}-channel ones: set the net's input channels to {stored.strip()} "
                             f"(its in_channels) rather than dropping the pretrained first layer")
            elif exclude:
                lines.append(shapes + f"add {exclude}={fate.scope}")
            else:
                classes = self.advice.get("classes")
                lines.append(shapes + "this checkpoint was made for another net or class count: pass the "
                             f"--model_name{f' and {classes}' if classes else ''} it was trained with")
        if not self.ignore_missing_vars:
            for fate in self.missing:
                fixes = [f for f in (ignore, name_map and f"check {name_map}") if f]
                lines.append(f"{fate.display}: not in the checkpoint (looked for {fate.checkpoint_name}): "
                             + (f"add {' or '.join(fixes)}" if fixes else
                                "this checkpoint was made for another net: pass the --model_name it was trained with"))
        wanted = [f for f in self.fates if f.status != "excluded"]
        if wanted and not any(f.checkpoint_shape is not None for f in wanted):
            lines.append("no checkpoint tensor matched any net tensor: is this the checkpoint of another net? "
                         + (f"map its names with {name_map} (rules or 'auto')" if name_map else
                            "pass the --model_name it was trained with"))
        return lines

    @property
    def ok(self) -> bool:
        """True when restoring would leave nothing unexplained."""
        return not self.problems

    def fix(self) -> str:
        """The flags that fix every problem at once (empty when ok)."""
        flags = []
        exclude, ignore, name_map = (self.advice.get(k) for k in ("exclude", "ignore_missing", "name_map"))
        scopes = list(dict.fromkeys(f.scope for f in self._excludable()))
        if scopes and exclude:
            flags.append(f"{exclude}=" + ",".join(self.exclude_scopes_display() + scopes))
        if self.missing and not self.ignore_missing_vars and ignore:
            flags.append(ignore + (f" (or a {name_map} rule for the missing names)" if name_map else ""))
        return " ".join(flags)

    def exclude_scopes_display(self) -> list[str]:
        """The exclude scopes already given, in the report's spelling."""
        return [s.replace(".", "/") if self.spelling == "slim" else s for s in self.exclude_scopes]

    def summary(self) -> str:
        """One line: counts per category."""
        parts = [f"{len(self.loaded)} loaded"]
        if self.adapted:
            parts.append(f"{len(self.adapted)} adapted")
        parts += [f"{len(self.excluded)} excluded", f"{len(self.missing)} missing",
                  f"{len(self.mismatched)} mismatched", f"{len(self.unused)} unused",
                  f"{len(self.ignored)} ignored by design"]
        return f"restore {self.source} -> {self.model_label}: " + ", ".join(parts)

    def _header(self) -> list[str]:
        out = [f"Restore plan: {self.source} -> {self.model_label} "
               f"({'slim names, TF layout' if self.spelling == 'slim' else 'torch names and layout'})"
               + ("  [dry run: nothing loaded]" if self.dry_run else "")]
        if self.rules:
            out.append(f"  name map: {', '.join(self.rules)}")
        if self.exclude_scopes:
            out.append(f"  exclude scopes: {', '.join(self.exclude_scopes_display())}")
        return out

    def _ending(self) -> list[str]:
        """The differences, then the problems with their fixes, or 'No problems.'."""
        out = []
        if self.differences:
            out.append("")
            out.append(f"The checkpoint's network computes differently ({self.checkpoint_layout}); its weights load "
                       f"by shape, but expect other outputs until fine-tuned ({len(self.differences)}):")
            out += [f"  {line}" for line in self.differences]
        problems = self.problems
        out.append("")
        if problems:
            out.append(f"Problems ({len(problems)}):")
            out += [f"  {line}" for line in problems]
            fix = self.fix()
            if fix:
                out.append(f"Fix: {fix}")
        elif self.differences:
            out.append("No tensor problems, but see the differences above." + (" Loaded." if self.applied else ""))
        else:
            out.append("No problems." + (" Loaded." if self.applied else ""))
        return out

    def scope_counts(self) -> dict[str, dict[str, int]]:
        """Net tensors per layer group (the net scope and one level below) and fate."""
        groups: dict[str, dict[str, int]] = {}
        sep = "/" if self.spelling == "slim" else "."
        for fate in self.fates:
            parts = fate.display.split(sep)
            key = sep.join(parts[:2]) if len(parts) > 2 else parts[0]
            counts = groups.setdefault(key, {"loaded": 0, "excluded": 0, "missing": 0, "mismatched": 0})
            counts[fate.status] += 1
        return groups

    def summary_report(self, full_plan: Optional[str] = None) -> str:
        """What a run prints: counts by scope, then every problem with its fix; the tensor-by-tensor
        list lives in `report()` (printed with --verbose, saved as `full_plan` when given)."""
        out = self._header()
        totals = [f"{len(self.loaded)} loaded"] + ([f"{len(self.adapted)} adapted (1001 <-> 1000 classes)"]
                                                  if self.adapted else [])
        totals += [f"{len(self.excluded)} excluded", f"{len(self.missing)} missing"
                   + (" (ignored: --ignore_missing_vars)" if self.missing and self.ignore_missing_vars else ""),
                   f"{len(self.mismatched)} mismatched", f"{len(self.unused)} checkpoint tensors unused",
                   f"{len(self.ignored)} ignored by design"]
        out.append("  " + ", ".join(totals))
        if self.auto_mapping:
            out.append(f"  automatic mapping paired {len(self.auto_mapping)} tensors")
        columns = ("loaded", "excluded", "missing", "mismatched")
        rows = [(scope, *(str(counts[c]) if counts[c] else "" for c in columns))
                for scope, counts in self.scope_counts().items()]
        out += _columns([("by scope", *columns)] + rows)
        out += self._ending()
        if full_plan or self.advice.get("verbose"):
            out.append(f"Every tensor's fate: {full_plan}" if full_plan else
                       f"Every tensor's fate: rerun with {self.advice['verbose']}")
        return "\n".join(out)

    def report(self) -> str:
        """The full report: counts, every tensor's fate grouped, then the problems and their fixes."""
        out = self._header()
        counts = [("loaded", len(self.loaded), f"{len(self.adapted)} adapted (1001 <-> 1000 classes)" if self.adapted else ""),
                  ("excluded", len(self.excluded), ""),
                  ("missing", len(self.missing), "ignored (--ignore_missing_vars)" if self.missing and self.ignore_missing_vars else ""),
                  ("mismatched", len(self.mismatched), ""),
                  ("unused", len(self.unused), "checkpoint tensors no net tensor took" if self.unused else ""),
                  ("ignored", len(self.ignored), "optimizer slots, step counters, EMA shadows: by design" if self.ignored else "")]
        width = max(len(str(c)) for _, c, _ in counts)
        for label, count, comment in counts:
            out.append(f"  {label:<11}{count:>{width}}" + (f"   {comment}" if comment else ""))

        if self.auto_mapping:
            out.append("")
            out.append(f"Automatic mapping (net name <- checkpoint name), {len(self.auto_mapping)} tensors:")
            out += _columns([(m, "<-", c) for m, c in self.auto_mapping.items()])
        for title, fates in (("Loaded", self.loaded), ("Excluded", self.excluded),
                             ("Missing", self.missing), ("Mismatched", self.mismatched)):
            if not fates:
                continue
            out.append("")
            out.append(f"{title} ({len(fates)}):")
            rows = []
            for fate in fates:
                source = ""
                if fate.checkpoint_name and strip_tensor_suffix(fate.checkpoint_name) != fate.display and not (
                        title == "Loaded" and fate.note.startswith("auto")):
                    source = f"<- {fate.checkpoint_name}" if fate.checkpoint_shape is not None else f"(looked for {fate.checkpoint_name})"
                stored = ""
                if fate.checkpoint_shape is not None and title != "Loaded":
                    stored = f"checkpoint {_fmt(fate.checkpoint_shape)}"
                extra = " ".join(p for p in (source, fate.note and f"[{fate.note}]") if p)
                rows.append((fate.display, f"net {_fmt(fate.model_shape)}", stored, extra))
            out += _columns(rows)
        for title, tensors in (("Unused checkpoint tensors", self.unused), ("Ignored by design", self.ignored)):
            if tensors:
                out.append("")
                out.append(f"{title} ({len(tensors)}):")
                out += _columns([(t.name, _fmt(t.shape), t.reason) for t in tensors])
        out += self._ending()
        return "\n".join(out)

    def __str__(self) -> str:
        return self.report()


def _fmt(shape: Optional[Sequence[int]]) -> str:
    return "-" if shape is None else "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _columns(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Rows of cells as left-aligned columns; columns empty in every row take no space."""
    if not rows:
        return []
    used = [i for i in range(len(rows[0])) if any(row[i] for row in rows)]
    widths = {i: max(len(row[i]) for row in rows) for i in used}
    return [(indent + "  ".join(row[i].ljust(widths[i]) for i in used)).rstrip() for row in rows]


# ---------------------------------------------------------------------------------------------
# Checkpoint access


def _open(checkpoint: CheckpointArg) -> tuple[str, Mapping]:
    if isinstance(checkpoint, (str, os.PathLike)):
        try:
            from .reader import read_checkpoint
        except ImportError as error:  # pragma: no cover - the reader ships with the package
            raise CheckpointError(f"cannot read {checkpoint}: checkpoint reader unavailable ({error})") from None
        return os.fspath(checkpoint), read_checkpoint(checkpoint)
    if isinstance(checkpoint, Mapping):
        return f"<{type(checkpoint).__name__} of {len(checkpoint)} tensors>", _unwrap(checkpoint)
    raise CheckpointError(f"checkpoint must be a path or a name -> array mapping, not {type(checkpoint).__name__}")


def _unwrap(state: Mapping) -> Mapping:
    """A training checkpoint {'state_dict': {...}, 'optimizer': ...} -> its weights."""
    for key in ("state_dict", "model_state_dict", "model"):
        inner = state.get(key) if hasattr(state, "get") else None
        if isinstance(inner, Mapping) and all(not hasattr(v, "shape") for k, v in state.items() if k != key):
            return inner
    return state


def _shape(checkpoint: Mapping, name: str) -> Shape:
    """A tensor's stored shape, without reading its data when the reader can tell."""
    shapes = getattr(checkpoint, "shapes", None)
    if isinstance(shapes, Mapping) and name in shapes:
        return tuple(int(d) for d in shapes[name])
    getter = getattr(checkpoint, "shape", None)
    if callable(getter):
        return tuple(int(d) for d in getter(name))
    return tuple(int(d) for d in np.shape(checkpoint[name]))


def _non_numeric(checkpoint: Mapping, name: str) -> Optional[str]:
    """'string tensor' for a reader's string tensors (never weights), else None."""
    dtype = getattr(checkpoint, "dtype", None)
    return "string tensor" if callable(dtype) and dtype(name) == "string" else None


def _norm_modules(model: nn.Module) -> set[str]:
    """Paths of modules whose weight/bias are a norm's gamma/beta."""
    paths = set()
    for path, module in model.named_modules():
        if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or (
                "running_mean" in dict(module.named_buffers(recurse=False))) or (
                path and is_norm_scope(path.rsplit(".", 1)[-1]) and "Norm" in type(module).__name__):
            paths.add(path)
    return paths


def _convert_shape(name: str, shape: Shape, target: Optional[Shape], tf_layout: bool) -> Shape:
    if tf_layout:
        return tf_to_torch_shape(name, shape, target)
    return fit_torch_shape(shape, target) if target is not None else shape


def _class_row_change(name: str, shape: Shape, target: Shape, tf_layout: bool) -> Optional[int]:
    """The checkpoint's class count when only ImageNet's background row differs, else None."""
    if not target or target[0] not in _CLASS_COUNTS:
        return None
    natural = _convert_shape(name, shape, None, tf_layout)
    if not natural or natural[0] not in _CLASS_COUNTS or natural[0] == target[0]:
        return None
    widened = (natural[0],) + tuple(target[1:])
    return natural[0] if _convert_shape(name, shape, widened, tf_layout) == widened else None


def _read(checkpoint: Mapping, name: str) -> torch.Tensor:
    """One checkpoint tensor as a torch tensor (the reader's `to_torch` keeps bfloat16 as is)."""
    to_torch = getattr(checkpoint, "to_torch", None)
    if callable(to_torch):
        return to_torch(name)
    return _to_torch(checkpoint[name])


def _to_torch(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    array = np.asarray(value)
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, copy=True, order="C")
    return torch.from_numpy(array)


# ---------------------------------------------------------------------------------------------
# The plan


def _parent_and_leaf(name: str) -> tuple[str, str]:
    cut = name.rfind("/") if "/" in name else name.rfind(".")
    return (name[:cut], name[cut + 1:]) if cut >= 0 else ("", name)


def _layer_scope(model_name: str) -> str:
    """The scope a user excludes for this tensor: its layer (a conv's BatchNorm goes with the conv)."""
    parts = model_name.split(".")[:-1]
    if len(parts) > 1 and parts[-1] == "BatchNorm":
        parts = parts[:-1]
    return ".".join(parts) or model_name


def _first_conv_key(model: nn.Module, keys: Sequence[str], state: Mapping) -> Optional[str]:
    """The state_dict key of the net's first convolution kernel (what reads the image)."""
    spec = getattr(model, "spec", None)
    first = getattr(spec, "first_conv", "") if spec is not None else ""
    if first:
        wanted = first.replace("/", ".") + ".weight"
        found = [k for k in keys if strip_wrappers(k) == wanted]
        if found:
            return found[0]
    return next((k for k in keys if k.endswith("weight") and state[k].dim() == 4), None)


def _input_channels_only(name: str, stored: Shape, target: Shape, tf_layout: bool) -> Optional[tuple[int, int]]:
    """(checkpoint, net) input channels when a conv kernel differs in nothing else."""
    natural = _convert_shape(name, stored, None, tf_layout)
    if len(natural) == 4 == len(target) and natural[0] == target[0] and natural[2:] == tuple(target[2:]) \
            and natural[1] != target[1]:
        return natural[1], target[1]
    return None


def plan_restore(model: nn.Module, checkpoint: CheckpointArg, exclude_scopes: ScopesArg = (),
                 name_map: Union[None, str, Sequence[str], NameMap] = None,
                 ignore_missing_vars: bool = False,
                 advice: Optional[Mapping[str, Optional[str]]] = None) -> tuple[RestorePlan, Mapping, dict[str, tuple]]:
    """Work out the plan without loading; also returns the opened checkpoint and the load steps.

    `advice` names the flags of the calling command that fix each kind of problem (default:
    train's, TRAIN_ADVICE); a problem without such a flag is explained in words.
    """
    source, ckpt = _open(checkpoint)
    exclude_scopes = expand_heads(exclude_scopes, model)
    heads = [normalize_scope(h) for h in classifier_scopes_of(model)]
    rules = NameMap.parse(name_map)
    state = model.state_dict(keep_vars=True)
    model_keys = [k for k in state if not k.endswith("num_batches_tracked")]
    clean_of = {k: strip_wrappers(k) for k in model_keys}
    norm_paths = {strip_wrappers(p) for p in _norm_modules(model)}

    # Checkpoint names, normalized (':0', wrappers), and what is never a weight.
    ckpt_by_clean: dict[str, str] = {}
    ignored: list[CheckpointTensor] = []
    for key in ckpt.keys():
        clean = strip_tensor_suffix(str(key))
        if "/" not in clean:
            clean = strip_wrappers(clean)
        reason = ignored_by_design(clean) or _non_numeric(ckpt, key)
        if reason:
            ignored.append(CheckpointTensor(str(key), _shape(ckpt, key), reason))
        else:
            ckpt_by_clean.setdefault(clean, key)
    slashed = sum("/" in n for n in ckpt_by_clean)
    slim = slashed * 2 > len(ckpt_by_clean)
    rules = rules.respelled("/" if slim else ".")

    def contract_name(model_key: str) -> str:
        clean = clean_of[model_key]
        if not slim:
            return clean
        parent = clean.rsplit(".", 1)[0] if "." in clean else ""
        return torch_to_slim(clean, is_norm=parent in norm_paths)

    # Exclusions: boundary-matched scopes over all net tensors; a scope matching nothing is an error.
    own_scope = getattr(model, "scope", None)
    net_scope = own_scope if isinstance(own_scope, str) and own_scope else common_net_scope(clean_of.values())
    clean_keys = [clean_of[k] for k in model_keys]
    excluded_clean = set(select_names(clean_keys, exclude_scopes, net_scope=net_scope,
                                      flag="--checkpoint_exclude_scopes")) if parse_scopes(exclude_scopes) else set()

    # Pairing: contract or rules first, then the automatic alignment for what is left.
    pairs: dict[str, str] = {}  # model key -> clean checkpoint name
    looked_for: dict[str, str] = {}
    notes: dict[str, str] = {}
    consumed: set[str] = set()
    by_parent: dict[str, list[str]] = {}
    for name in ckpt_by_clean:
        by_parent.setdefault(_parent_and_leaf(name)[0], []).append(name)

    def synonym_of(name: str) -> Optional[str]:
        """The one checkpoint tensor beside `name` whose leaf means the same (kernel for weights)."""
        parent, leaf = _parent_and_leaf(name)
        synonyms = leaf_synonyms(leaf)
        found = [n for n in by_parent.get(parent, []) if _parent_and_leaf(n)[1] in synonyms]
        return found[0] if len(found) == 1 else None

    for key in model_keys:
        base = contract_name(key)
        candidate = rules.apply(base)
        rule = rules.rule_for(base)
        looked_for[key] = candidate
        tries = (candidate, clean_of[key]) if rule is None else (candidate, synonym_of(candidate))
        for name in tries:
            if name is not None and name in ckpt_by_clean and name not in consumed:
                pairs[key] = name
                consumed.add(name)
                if rule is not None:
                    notes[key] = f"rule {rule.text}"
                break
    auto_mapping: dict[str, str] = {}
    if rules.auto:
        rest_models = [k for k in model_keys if k not in pairs and rules.rule_for(contract_name(k)) is None]
        rest_ckpt = [n for n in ckpt_by_clean if n not in consumed]
        aligned = auto_align([(k, tuple(state[k].shape)) for k in rest_models],
                             [(n, _shape(ckpt, ckpt_by_clean[n])) for n in rest_ckpt], tf_layout=slim)
        for key in rest_models:
            if key in aligned.pairs:
                name = aligned.pairs[key]
                pairs[key] = name
                consumed.add(name)
                auto_mapping[contract_name(key)] = ckpt_by_clean[name]
                notes[key] = "auto, by position: shapes differ" if key in aligned.by_position else "auto"

    # a registry name says more than a class name (timm:resnet18, not ForeignNet)
    label = getattr(getattr(model, "spec", None), "name", None) or type(model).__name__
    plan = RestorePlan(source=source, model_label=label, spelling="slim" if slim else "torch",
                       ignored=ignored, auto_mapping=auto_mapping, rules=[r.text for r in rules.rules] + (["auto"] if rules.auto else []),
                       exclude_scopes=parse_scopes(exclude_scopes), ignore_missing_vars=ignore_missing_vars,
                       advice=dict(TRAIN_ADVICE if advice is None else advice))
    first_conv = _first_conv_key(model, model_keys, state)
    steps: dict[str, tuple] = {}
    for key in model_keys:
        target = tuple(state[key].shape)
        scope = _layer_scope(clean_of[key])
        # A classifier head is excluded as a whole (slim's recipe: InceptionV3/Logits,InceptionV3/AuxLogits).
        scope = next((head for head in heads if in_scope(scope, head)), scope)
        fate = TensorFate("missing", key, target, display=contract_name(key), note=notes.get(key, ""),
                          scope=scope.replace(".", "/") if slim else scope)
        if key in pairs:
            name = pairs[key]
            stored = _shape(ckpt, ckpt_by_clean[name])
            fate.checkpoint_name, fate.checkpoint_shape = ckpt_by_clean[name], stored
            converted = _convert_shape(name, stored, target, slim)
            if clean_of[key] in excluded_clean:
                fate.status = "excluded"
            elif converted == target:
                fate.status = "loaded"
                steps[key] = (ckpt_by_clean[name], name, target, None)
            else:
                classes = _class_row_change(name, stored, target, slim)
                if classes is not None:
                    fate.status = "loaded"
                    fate.note = ", ".join(p for p in (fate.note, "dropped background row 0" if classes > target[0]
                                                      else "added zero background row 0") if p)
                    steps[key] = (ckpt_by_clean[name], name, target, classes)
                else:
                    fate.status = "mismatched"
                    channels = _input_channels_only(name, stored, target, slim) if key == first_conv else None
                    if channels is not None:
                        fate.note = f"{INPUT_CHANNELS_NOTE}: {channels[0]} -> {channels[1]}"
        else:
            fate.checkpoint_name = looked_for[key]
            if clean_of[key] in excluded_clean:
                fate.status = "excluded"
        plan.fates.append(fate)
    plan.unused = [CheckpointTensor(ckpt_by_clean[n], _shape(ckpt, ckpt_by_clean[n]))
                   for n in ckpt_by_clean if n not in consumed]
    if plan.loaded:
        from .layouts import architecture_differences

        plan.checkpoint_layout, plan.differences = architecture_differences(list(ckpt_by_clean), model)
    explain = getattr(model, "explain_restore_plan", None)
    if callable(explain):
        explain(plan)  # e.g. a variable renamed by the input size, said in plain words
    return plan, ckpt, steps


def restore(model: nn.Module, checkpoint: CheckpointArg, exclude_scopes: ScopesArg = (),
            name_map: Union[None, str, Sequence[str], NameMap] = None, ignore_missing_vars: bool = False,
            dry_run: bool = False, advice: Optional[Mapping[str, Optional[str]]] = None) -> RestorePlan:
    """Restore `model` from a checkpoint path or a name -> array mapping; return the plan.

    Raises RestoreError (message = the plan's summary: counts by scope, every problem and its
    fix; `.plan` = the plan, `str(plan)` lists every tensor) when a tensor nobody excluded or
    ignored is missing or has another shape; nothing is loaded then. `dry_run` loads nothing and
    returns the plan, problems included. `advice`: see `plan_restore`.
    """
    plan, ckpt, steps = plan_restore(model, checkpoint, exclude_scopes, name_map, ignore_missing_vars, advice)
    plan.dry_run = dry_run
    try:
        if dry_run:
            return plan
        if not plan.ok:
            error = RestoreError(plan.summary_report())
            error.plan = plan  # type: ignore[attr-defined]
            raise error
        _load(model, ckpt, steps, tf_layout=plan.spelling == "slim")
        plan.applied = True
        return plan
    finally:
        if isinstance(checkpoint, (str, os.PathLike)) and hasattr(ckpt, "close"):
            ckpt.close()


def _load(model: nn.Module, ckpt: Mapping, steps: dict[str, tuple], tf_layout: bool) -> None:
    """Copy every planned tensor into the net's own tensors (layout and dtype converted).

    Every tensor is read, converted and checked before the first copy: a read error part-way
    (a corrupt record, a reader that lies about a shape) leaves the model untouched.
    """
    state = model.state_dict(keep_vars=True)
    values = {key: _converted(ckpt, ckpt_key, clean_name, target, classes, tf_layout)
              for key, (ckpt_key, clean_name, target, classes) in steps.items()}
    with torch.no_grad():
        for key, value in values.items():
            state[key].copy_(value)


def _converted(ckpt: Mapping, ckpt_key: str, clean_name: str, target: Shape, classes: Optional[int],
               tf_layout: bool) -> torch.Tensor:
    """One checkpoint tensor read and converted to its net tensor's layout and shape."""
    value = _read(ckpt, ckpt_key)
    shape = target if classes is None else (classes,) + tuple(target[1:])
    value = tf_to_torch_array(clean_name, value, shape) if tf_layout else fit_torch_array(value, shape)
    if classes is not None:
        value = _adapt_class_rows(value, target[0])
    if tuple(value.shape) != tuple(target):  # the plan said so; a reader lying about shapes is a bug
        raise CheckpointError(f"{ckpt_key}: value has shape {list(value.shape)}, expected {list(target)}")
    return value


def _adapt_class_rows(value: torch.Tensor, classes: int) -> torch.Tensor:
    """1001 -> 1000: drop background row 0; 1000 -> 1001: add a zero background row at 0."""
    if value.shape[0] == classes + 1:
        return value[1:]
    zero = torch.zeros((1,) + tuple(value.shape[1:]), dtype=value.dtype)
    return torch.cat([zero, value], dim=0)
