"""Helpers every metric module shares: array coercion, safe division, JSON conversion, the IGNORE label."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from slimtune.errors import ConfigError

IGNORE = -1
"""Label (single-label) or target (multi-label) value meaning 'do not evaluate this entry'."""


def as_numpy(x: Any) -> np.ndarray:
    """Return `x` (numpy array, torch tensor or sequence) as a numpy array without copying numpy input."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor; torch is not imported here
        tensor = x.detach().cpu()
        # bfloat16/float16 have no (useful) numpy dtype; float32 keeps their ordering exactly.
        if tensor.is_floating_point() and tensor.element_size() < 4:
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(x)


def sigmoid(x: Any) -> np.ndarray:
    """Numerically stable logistic function, elementwise (float32 stays float32)."""
    arr = as_numpy(x)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    # exp of a non-positive number never overflows; the two branches are the same function.
    e = np.exp(-np.abs(arr))
    return np.where(arr >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(arr.dtype, copy=False)


def resolve_class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ConfigError(
            f"got {len(names)} class names for {num_classes} classes: make the labels file "
            "and num_classes agree"
        )
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
        raise ConfigError(f"class name {dup!r} appears twice in the class names; names must be unique")
    return names


def safe_div(num: np.ndarray | float, den: np.ndarray | float, empty: float = 0.0) -> np.ndarray:
    """num / den elementwise, `empty` where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def harmonic_f1(precision: np.ndarray | float, recall: np.ndarray | float) -> np.ndarray:
    """Harmonic mean, 0 where both are 0."""
    p = np.asarray(precision, dtype=np.float64)
    r = np.asarray(recall, dtype=np.float64)
    return safe_div(2.0 * p * r, p + r)


def nanmean(values: np.ndarray) -> float:
    """Mean over the finite entries; NaN when there are none (without numpy's warning)."""
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    return float(values[ok].mean()) if ok.any() else float("nan")


def to_jsonable(obj: Any) -> Any:
    """Convert a results dict (numpy arrays/scalars, tuples, paths) to JSON-ready Python; NaN/inf -> None."""
    if isinstance(obj, Mapping):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        if np.issubdtype(obj.dtype, np.floating) and not np.isfinite(obj).all():
            return np.where(np.isfinite(obj), obj, None).tolist()
        if obj.dtype.kind in "biuf":
            return obj.tolist()
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "detach"):
        return to_jsonable(as_numpy(obj))
    raise TypeError(f"to_jsonable cannot convert {type(obj).__name__}")


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, tuple):
        return " -> ".join(str(k) for k in key)
    return str(to_jsonable(key))


