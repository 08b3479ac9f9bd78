"""Evaluation metrics for single-label and multi-label classification (numpy only).

Single-label (`SingleLabelAccumulator`) reproduces what slim's `eval_image_classifier.py` reports
(`Accuracy` = argmax accuracy, `Recall_5` = top-5 with TF's `in_top_k` tie rule) and adds the
confusion matrix, per-class accuracy and the most confused class pairs.

Multi-label (`MultiLabelAccumulator`) keeps every score so that ranking metrics are exact. It
reports three average-precision definitions, because papers and toolkits disagree:

- ``AP`` / ``mAP`` -- area under the raw precision-recall step curve, no interpolation:
  ``sum_n (R_n - R_{n-1}) * P_n`` over the distinct score thresholds, i.e. the mean over positives
  of the precision at the threshold that first admits them. Tied scores form one threshold. This
  is exactly ``sklearn.metrics.average_precision_score`` (with ignored entries removed).
- ``AP_voc07`` / ``mAP_voc07`` -- the VOC2007 devkit's 11-point interpolated AP: the mean over
  ``t in {0, 0.1, ..., 1}`` of the maximum precision at recall >= t. Like the devkit, the ranking is
  a stable sort (ties keep input order) and precision is taken after every sample. ``recall >= t``
  is evaluated exactly (``10 * tp >= i * npos``); the devkit compares against floating-point
  ``0:0.1:1`` values, so at a recall of exactly 0.3 (MATLAB) or 0.3/0.6/0.7 (NumPy ports using
  ``arange``) those tools may skip a point that the rule, and this code, counts.
- ``AP_voc12`` / ``mAP_voc12`` -- the VOC2010-2012 devkit's all-points interpolated AP: the area
  under the monotone envelope of the precision-recall curve (precision replaced by the maximum
  precision at any higher recall). Always >= ``AP``.

Targets use 1 = positive, 0 = negative, -1 = ignore (VOC's 'difficult'): an ignored entry is left
out of that class's evaluation only, as in the VOC devkit. `MultiLabelAccumulator.compute` expects
scores that are probabilities (sigmoid outputs); build the accumulator with ``from_logits=True``
to feed raw logits, or apply `sigmoid` yourself. Ranking metrics (AP) do not depend on this; the
thresholded ones (CP/CR/CF1/OP/OR/OF1) do.

Everything is deterministic and vectorized; the per-class work runs over blocks of classes so that
50k x 1000 score matrices fit in memory.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from slimtune.errors import ConfigError, DataError

IGNORE = -1
"""Label (single-label) or target (multi-label) value meaning 'do not evaluate this entry'."""

# Classes handled per vectorized pass: bounds temporaries to a few (N x 64) arrays.
_CLASS_BLOCK = 64
# The 11 recall levels of the VOC2007 rule, as integers i for t = i / 10 (compared exactly).
_VOC07_LEVELS = range(11)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _as_numpy(x: Any) -> np.ndarray:
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
    arr = _as_numpy(x)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    # exp of a non-positive number never overflows; the two branches are the same function.
    e = np.exp(-np.abs(arr))
    return np.where(arr >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(arr.dtype, copy=False)


def _resolve_class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
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


def _safe_div(num: np.ndarray | float, den: np.ndarray | float, empty: float = 0.0) -> np.ndarray:
    """num / den elementwise, `empty` where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _f1(precision: np.ndarray | float, recall: np.ndarray | float) -> np.ndarray:
    """Harmonic mean, 0 where both are 0."""
    p = np.asarray(precision, dtype=np.float64)
    r = np.asarray(recall, dtype=np.float64)
    return _safe_div(2.0 * p * r, p + r)


def _nanmean(values: np.ndarray) -> float:
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
        return to_jsonable(_as_numpy(obj))
    raise TypeError(f"to_jsonable cannot convert {type(obj).__name__}")


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, tuple):
        return " -> ".join(str(k) for k in key)
    return str(to_jsonable(key))


# ----------------------------------------------------------------------------------------------
# Single-label
# ----------------------------------------------------------------------------------------------


class SingleLabelAccumulator:
    """Streaming single-label metrics: feed each evaluated sample exactly once via `update`.

    `Accuracy` is argmax accuracy (ties go to the lowest class index, like tf.argmax).
    `Recall_k` follows tf.nn.in_top_k, as slim's `streaming_recall_at_k` does: a sample counts when
    fewer than k classes score strictly higher than its true class, so ties at the boundary count as
    hits. With fewer than k classes, k is clipped to the number of classes (`topk_effective`).
    Labels equal to -1, or samples with mask False, are skipped and counted in `num_ignored`.
    Samples whose logits contain NaN have no prediction: they count as evaluated and wrong, are
    counted in `num_nonfinite`, and are absent from the confusion matrix.
    Under DDP, a DistributedSampler pads the last round with repeated samples: pass mask=False for
    those so that every sample is counted once, then `merge` the per-process accumulators.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        topk: Iterable[int] = (1, 5),
        max_examples_per_pair: int = 4,
    ) -> None:
        self.class_names = _resolve_class_names(num_classes, class_names)
        self.num_classes = int(num_classes)
        self.topk = tuple(int(k) for k in topk)
        if any(k < 1 for k in self.topk):
            raise ConfigError(f"topk values must be >= 1, got {self.topk}")
        self.max_examples_per_pair = int(max_examples_per_pair)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        c = self.num_classes
        self._confusion = np.zeros((c, c), dtype=np.int64)
        self._support = np.zeros(c, dtype=np.int64)  # includes NaN-logit samples, unlike the matrix
        self._topk_hits = np.zeros(len(self.topk), dtype=np.int64)
        self._num_ignored = 0
        self._num_nonfinite = 0
        self._examples: dict[tuple[int, int], list[Any]] = {}

    @property
    def num_samples(self) -> int:
        """Samples evaluated so far (ignored ones excluded)."""
        return int(self._support.sum())

    def update(
        self,
        logits: Any,
        labels: Any,
        mask: Any | None = None,
        sample_ids: Sequence[Any] | None = None,
    ) -> None:
        """Add a batch: logits [N, C] (numpy or torch), labels [N] ints (-1 = skip), mask [N] (False = skip).

        `sample_ids` (e.g. image paths), when given, lets `compute` list the first few misclassified
        samples of every (true, predicted) pair, in the order they were fed.
        """
        logits = _as_numpy(logits)
        labels = _as_numpy(labels)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        n = self._check_batch(logits, labels)
        keep = labels != IGNORE
        if mask is not None:
            mask = _as_numpy(mask).astype(bool).reshape(-1)
            if mask.shape[0] != n:
                raise DataError(f"mask has {mask.shape[0]} entries for a batch of {n} samples")
            keep &= mask
        if sample_ids is not None and len(sample_ids) != n:
            raise DataError(f"sample_ids has {len(sample_ids)} entries for a batch of {n} samples")
        self._num_ignored += int(n - keep.sum())
        if not keep.all():
            kept_index = np.flatnonzero(keep)
            logits, labels = logits[kept_index], labels[kept_index]
            if sample_ids is not None:
                sample_ids = [sample_ids[i] for i in kept_index]
        if labels.size == 0:
            return
        labels = labels.astype(np.int64, copy=False)
        c = self.num_classes
        self._support += np.bincount(labels, minlength=c)

        nan_rows = np.isnan(logits).any(axis=1) if np.issubdtype(logits.dtype, np.floating) else None
        if nan_rows is not None and nan_rows.any():
            self._num_nonfinite += int(nan_rows.sum())
            valid = ~nan_rows
            logits, labels = logits[valid], labels[valid]
            if sample_ids is not None:
                sample_ids = [s for s, v in zip(sample_ids, valid) if v]
            if labels.size == 0:
                return

        rows = np.arange(labels.shape[0])
        predicted = logits.argmax(axis=1)
        true_score = logits[rows, labels]
        # Rank of the true class = number of classes scoring strictly higher (tf.nn.in_top_k rule).
        rank = (logits > true_score[:, None]).sum(axis=1)
        for i, k in enumerate(self.topk_effective):
            self._topk_hits[i] += int((rank < k).sum())
        self._confusion += np.bincount(labels * c + predicted, minlength=c * c).reshape(c, c)

        if sample_ids is not None and self.max_examples_per_pair > 0:
            for i in np.flatnonzero(predicted != labels):
                bucket = self._examples.setdefault((int(labels[i]), int(predicted[i])), [])
                if len(bucket) < self.max_examples_per_pair:
                    bucket.append(sample_ids[i])

    def _check_batch(self, logits: np.ndarray, labels: np.ndarray) -> int:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise DataError(
                f"logits have shape {tuple(logits.shape)} but the accumulator expects "
                f"[batch, {self.num_classes}]: check num_classes"
            )
        if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
            raise DataError(
                f"labels have shape {tuple(labels.shape)} for logits of shape {tuple(logits.shape)}: "
                "pass one integer label per sample"
            )
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"labels must be integers, got dtype {labels.dtype}")
        bad = (labels < IGNORE) | (labels >= self.num_classes)
        if bad.any():
            raise DataError(
                f"label {int(labels[bad][0])} is outside [0, {self.num_classes}) (and is not -1 = ignore): "
                "check num_classes and labels_offset (slim's ImageNet checkpoints have 1001 classes, "
                "background = 0)"
            )
        return int(logits.shape[0])

    @property
    def topk_effective(self) -> tuple[int, ...]:
        """The k actually used for each requested k (clipped to num_classes)."""
        return tuple(min(k, self.num_classes) for k in self.topk)

    def merge(self, other: "SingleLabelAccumulator") -> None:
        """Add the counts of another accumulator (e.g. from another process) to this one."""
        if other.num_classes != self.num_classes or other.topk != self.topk:
            raise ConfigError("can only merge accumulators with the same num_classes and topk")
        self._confusion += other._confusion
        self._support += other._support
        self._topk_hits += other._topk_hits
        self._num_ignored += other._num_ignored
        self._num_nonfinite += other._num_nonfinite
        for pair, ids in other._examples.items():
            bucket = self._examples.setdefault(pair, [])
            bucket.extend(ids[: max(0, self.max_examples_per_pair - len(bucket))])

    def compute(self, most_confused_k: int = 20) -> dict[str, Any]:
        """Return the metrics dict (see module docstring); raises DataError when nothing was evaluated."""
        n = self.num_samples
        if n == 0:
            raise DataError(
                f"no samples were evaluated ({self._num_ignored} ignored): check the eval split and labels"
            )
        names = self.class_names
        confusion = self._confusion.copy()
        correct = np.diag(confusion)
        per_class_accuracy = _safe_div(correct, self._support, empty=float("nan"))
        predicted_count = confusion.sum(axis=0)
        per_class_precision = _safe_div(correct, predicted_count, empty=float("nan"))

        result: dict[str, Any] = {
            "kind": "single",
            "Accuracy": float(correct.sum() / n),
        }
        for k, hits in zip(self.topk, self._topk_hits):
            result[f"Recall_{k}"] = float(hits / n)
        result.update(
            {
                "topk_effective": {f"Recall_{k}": ke for k, ke in zip(self.topk, self.topk_effective)},
                "mean_per_class_accuracy": _nanmean(per_class_accuracy),
                "num_samples": n,
                "num_ignored": self._num_ignored,
                "num_nonfinite": self._num_nonfinite,
                "num_classes": self.num_classes,
                "class_names": list(names),
                "per_class": {
                    name: {
                        "accuracy": float(per_class_accuracy[i]),
                        "precision": float(per_class_precision[i]),
                        "support": int(self._support[i]),
                        "predicted": int(predicted_count[i]),
                    }
                    for i, name in enumerate(names)
                },
                "confusion_matrix": confusion,
                "most_confused": most_confused_pairs(confusion, names, most_confused_k),
                "misclassified_examples": [
                    {"true": names[t], "predicted": names[p], "samples": list(ids)}
                    for (t, p), ids in sorted(self._examples.items(), key=lambda kv: (-confusion[kv[0]], kv[0]))
                ],
            }
        )
        return result


def most_confused_pairs(
    confusion: np.ndarray, class_names: Sequence[str], k: int = 20
) -> list[tuple[str, str, int]]:
    """The k largest off-diagonal confusion counts as (true, predicted, count), largest first.

    Equal counts are ordered by true then predicted class index, so the order is deterministic.
    """
    off = np.asarray(confusion, dtype=np.int64).copy()
    np.fill_diagonal(off, 0)
    t_idx, p_idx = np.nonzero(off)
    counts = off[t_idx, p_idx]
    order = np.lexsort((p_idx, t_idx, -counts))[: max(0, int(k))]
    return [(class_names[t_idx[i]], class_names[p_idx[i]], int(counts[i])) for i in order]


# ----------------------------------------------------------------------------------------------
# Multi-label: ranking core
# ----------------------------------------------------------------------------------------------


def _check_multilabel(scores: np.ndarray, targets: np.ndarray, num_classes: int | None = None) -> None:
    if scores.ndim != 2:
        raise DataError(f"scores must be [num_samples, num_classes], got shape {tuple(scores.shape)}")
    if num_classes is not None and scores.shape[1] != num_classes:
        raise DataError(
            f"scores have {scores.shape[1]} classes but {num_classes} were expected: check num_classes"
        )
    if targets.shape != scores.shape:
        raise DataError(
            f"targets have shape {tuple(targets.shape)} but scores have {tuple(scores.shape)}: "
            "pass one 1/0/-1 target per score"
        )
    if targets.size and not np.isin(targets, (-1, 0, 1)).all():
        raise DataError("targets must be 1 (positive), 0 (negative) or -1 (ignore)")


def _prepare_targets(targets: Any) -> np.ndarray:
    t = _as_numpy(targets)
    if t.dtype == bool:
        return t.astype(np.int8)
    if np.issubdtype(t.dtype, np.floating):
        # Float targets (from a BCE target tensor) are fine when they hold exact -1/0/1.
        if t.size and not np.isin(t, (-1.0, 0.0, 1.0)).all():
            raise DataError("targets must be 1 (positive), 0 (negative) or -1 (ignore)")
    return t.astype(np.int8)


def _prepare_scores(scores: Any) -> np.ndarray:
    """Scores as float32/float64 with NaN replaced by -inf (ranked last, never above a threshold)."""
    s = _as_numpy(scores)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    nan = np.isnan(s)
    if nan.any():
        s = np.where(nan, -np.inf, s).astype(s.dtype)
    return s


class _RankedBlock:
    """A block of classes ranked by decreasing score: rows are classes, columns rank positions."""

    def __init__(self, scores_t: np.ndarray, targets_t: np.ndarray) -> None:
        # Stable sort keeps input order among ties, as MATLAB's sort in the VOC devkit does.
        order = np.argsort(-scores_t, axis=1, kind="stable")
        self.scores = np.take_along_axis(scores_t, order, axis=1)
        targets = np.take_along_axis(targets_t, order, axis=1)
        self.positive = targets == 1
        # int32 counts halve memory traffic; rankings longer than 2**31 / 10 samples are not a use case.
        self.tp = np.cumsum(self.positive, axis=1, dtype=np.int32)
        self.fp = np.cumsum(targets == 0, axis=1, dtype=np.int32)
        empty = np.zeros(len(order), np.int32)
        self.num_positives = self.tp[:, -1].copy() if self.tp.shape[1] else empty
        self.num_negatives = self.fp[:, -1].copy() if self.fp.shape[1] else empty
        # Precision after each position. Before any evaluated entry tp = fp = 0: the devkit gets NaN
        # there and its max() skips it; 0 is equivalent because it never exceeds a real precision.
        self.precision = self.tp / np.maximum(self.tp + self.fp, 1)

    def group_end(self) -> np.ndarray:
        """For every position, the last position holding the same score (end of its tie group)."""
        k, n = self.scores.shape
        is_end = np.ones((k, n), dtype=bool)
        is_end[:, :-1] = self.scores[:, :-1] != self.scores[:, 1:]
        index = np.where(is_end, np.arange(n)[None, :], n)
        return np.minimum.accumulate(index[:, ::-1], axis=1)[:, ::-1]

    def average_precisions(self) -> dict[str, np.ndarray]:
        """AP (area, sklearn), AP_voc07 (11-point) and AP_voc12 (all-points interpolated) per class."""
        k, n = self.scores.shape
        npos = self.num_positives
        has_pos = npos > 0
        denom = np.maximum(npos, 1)
        rows = np.arange(k)

        at_group_end = np.take_along_axis(self.precision, self.group_end(), axis=1)
        ap_area = (at_group_end * self.positive).sum(axis=1) / denom

        # Interpolated precision: the maximum precision at this or any later (higher-recall) position.
        envelope = np.maximum.accumulate(self.precision[:, ::-1], axis=1)[:, ::-1]
        ap_voc12 = (envelope * self.positive).sum(axis=1) / denom

        ap_voc07 = np.zeros(k, dtype=np.float64)
        tp10 = self.tp * 10
        for i in _VOC07_LEVELS:
            # First position with recall >= i/10, compared in integers so 3/10 >= 0.3 holds exactly.
            first = (tp10 < i * npos[:, None]).sum(axis=1)
            ap_voc07 += envelope[rows, np.minimum(first, n - 1)]
        ap_voc07 /= len(_VOC07_LEVELS)

        nan = np.full(k, np.nan)
        return {
            "AP": np.where(has_pos, ap_area, nan),
            "AP_voc07": np.where(has_pos, ap_voc07, nan),
            "AP_voc12": np.where(has_pos, ap_voc12, nan),
        }

    def best_f1_thresholds(self, fallback: float) -> np.ndarray:
        """Per class, a threshold (predict score >= t) maximizing F1; `fallback` without positives."""
        k, n = self.scores.shape
        npos = self.num_positives
        group_end = self.group_end()
        is_end = group_end == np.arange(n)[None, :]
        # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P); only tie-group ends are real cut points.
        f1 = _safe_div(2 * self.tp, self.tp + self.fp + npos[:, None])
        f1 = np.where(is_end, f1, -1.0)
        best = f1.argmax(axis=1)  # first maximum = highest threshold among equally good ones
        rows = np.arange(k)
        at = self.scores[rows, best]
        below = self.scores[rows, np.minimum(best + 1, n - 1)]
        # Midway to the next lower score keeps the validation predictions and generalizes better
        # than sitting exactly on a validation score.
        use_mid = (best < n - 1) & np.isfinite(below)
        threshold = np.where(use_mid, (at + below) / 2.0, at)
        return np.where(npos > 0, threshold, fallback).astype(np.float64)


def _class_blocks(num_classes: int) -> Iterable[slice]:
    for start in range(0, num_classes, _CLASS_BLOCK):
        yield slice(start, min(start + _CLASS_BLOCK, num_classes))


def _ranked_block(scores: np.ndarray, targets: np.ndarray, cols: slice) -> _RankedBlock:
    return _RankedBlock(
        np.ascontiguousarray(scores[:, cols].T), np.ascontiguousarray(targets[:, cols].T)
    )


def average_precisions(scores: Any, targets: Any) -> dict[str, np.ndarray]:
    """Per-class AP in its three forms (keys AP, AP_voc07, AP_voc12); NaN for classes without positives."""
    s, t = _prepare_scores(scores), _prepare_targets(targets)
    _check_multilabel(s, t)
    parts = [_ranked_block(s, t, cols).average_precisions() for cols in _class_blocks(s.shape[1])]
    return {key: np.concatenate([p[key] for p in parts]) for key in ("AP", "AP_voc07", "AP_voc12")}


def tune_thresholds(
    scores: Any, targets: Any, metric: str = "f1", fallback: float = 0.5
) -> np.ndarray:
    """Per-class thresholds maximizing that class's F1 on a validation split (targets -1 ignored).

    Predictions are `score >= threshold`. The threshold is placed midway between the best cut's
    score and the next lower score. Classes without positives get `fallback`.
    """
    if metric != "f1":
        raise ConfigError(f"unknown threshold metric {metric!r}: only 'f1' is supported")
    s, t = _prepare_scores(scores), _prepare_targets(targets)
    _check_multilabel(s, t)
    if s.shape[0] == 0:
        return np.full(s.shape[1], float(fallback))
    return np.concatenate(
        [_ranked_block(s, t, cols).best_f1_thresholds(float(fallback)) for cols in _class_blocks(s.shape[1])]
    )


def precision_recall_curve_points(
    scores_c: Any, targets_c: Any, max_points: int | None = None
) -> dict[str, np.ndarray]:
    """One class's PR curve at every distinct score (ignored entries dropped), by decreasing threshold.

    Returns arrays `precision`, `recall`, `thresholds` (same length; recall non-decreasing). With
    `max_points`, an evenly spaced subset that keeps the first and last points is returned.
    """
    s = _prepare_scores(np.asarray(_as_numpy(scores_c)).reshape(-1, 1))
    t = _prepare_targets(np.asarray(_as_numpy(targets_c)).reshape(-1, 1))
    _check_multilabel(s, t)
    keep = t[:, 0] != IGNORE
    s, t = s[keep], t[keep]
    empty = np.zeros(0, dtype=np.float64)
    if s.shape[0] == 0:
        return {"precision": empty, "recall": empty, "thresholds": empty}
    block = _RankedBlock(s.T.copy(), t.T.copy())
    ends = np.flatnonzero(block.group_end()[0] == np.arange(s.shape[0]))
    npos = int(block.num_positives[0])
    precision = block.precision[0, ends]
    recall = block.tp[0, ends] / npos if npos else np.zeros(len(ends))
    thresholds = block.scores[0, ends].astype(np.float64)
    if max_points is not None and len(ends) > max_points:
        pick = np.unique(np.round(np.linspace(0, len(ends) - 1, max(2, int(max_points)))).astype(int))
        precision, recall, thresholds = precision[pick], recall[pick], thresholds[pick]
    return {"precision": precision, "recall": np.asarray(recall, float), "thresholds": thresholds}


def threshold_metrics(scores: Any, targets: Any, thresholds: float | Any = 0.5) -> dict[str, Any]:
    """CP, CR, CF1, OP, OR, OF1 and per-class precision/recall/F1 for predictions `score >= threshold`.

    Per-class ("C") metrics average precision and recall over the classes that have positives
    (precision is 0 for such a class that predicts nothing); CF1 = 2*CP*CR / (CP + CR), the usual
    multi-label definition (not the mean of per-class F1s). Overall ("O") metrics pool the
    true/false positives of all classes: OP = sum TP / sum (TP + FP), OR = sum TP / sum P,
    OF1 = 2*OP*OR / (OP + OR). Ignored (-1) entries count nowhere.
    """
    s, t = _prepare_scores(scores), _prepare_targets(targets)
    _check_multilabel(s, t)
    c = s.shape[1]
    thr = _thresholds_array(thresholds, c)
    predicted = s >= thr[None, :]
    positive, negative = t == 1, t == 0
    tp = (predicted & positive).sum(axis=0)
    fp = (predicted & negative).sum(axis=0)
    npos = positive.sum(axis=0)
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, npos, empty=float("nan"))
    evaluable = npos > 0
    cp = float(precision[evaluable].mean()) if evaluable.any() else float("nan")
    cr = float(recall[evaluable].mean()) if evaluable.any() else float("nan")
    op = float(_safe_div(tp.sum(), tp.sum() + fp.sum()))
    orr = float(_safe_div(tp.sum(), npos.sum(), empty=float("nan")))
    return {
        "CP": cp,
        "CR": cr,
        "CF1": float(_f1(cp, cr)) if evaluable.any() else float("nan"),
        "OP": op,
        "OR": orr,
        "OF1": float(_f1(op, orr)) if npos.sum() else float("nan"),
        "thresholds": thr,
        "precision": precision,
        "recall": recall,
        "f1": np.where(evaluable, _f1(precision, np.nan_to_num(recall)), np.nan),
        "true_positives": tp,
        "false_positives": fp,
    }


def _logit(p: np.ndarray) -> np.ndarray:
    """Inverse sigmoid; 0 -> -inf and 1 -> +inf."""
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def _thresholds_array(thresholds: float | Any, num_classes: int) -> np.ndarray:
    thr = np.asarray(_as_numpy(thresholds), dtype=np.float64)
    if thr.ndim == 0:
        return np.full(num_classes, float(thr))
    thr = thr.reshape(-1)
    if thr.shape[0] != num_classes:
        raise ConfigError(f"got {thr.shape[0]} thresholds for {num_classes} classes: pass one per class or a single float")
    return thr


# ----------------------------------------------------------------------------------------------
# Multi-label accumulator
# ----------------------------------------------------------------------------------------------


class MultiLabelAccumulator:
    """Collects multi-label scores and 1/0/-1 targets; `compute` gives AP/mAP and thresholded metrics.

    Scores fed to `update` must be probabilities unless `from_logits=True`. Probabilities outside
    [0, 1] raise DataError, because thresholding logits at 0.5 would silently give wrong CP/CR/F1
    numbers. With `from_logits`, the logits themselves are ranked (float32 sigmoid would tie all
    logits above ~17 at 1.0) and probability thresholds t are applied as logit >= log(t / (1 - t));
    thresholds passed in and reported are always probabilities. NaN scores rank last and never
    pass a threshold; they are counted in `num_nonfinite`.
    """

    def __init__(
        self, num_classes: int, class_names: Sequence[str] | None = None, from_logits: bool = False
    ) -> None:
        self.class_names = _resolve_class_names(num_classes, class_names)
        self.num_classes = int(num_classes)
        self.from_logits = bool(from_logits)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._scores: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []
        self._num_nonfinite = 0

    @property
    def num_samples(self) -> int:
        """Samples (rows) fed so far."""
        return int(sum(s.shape[0] for s in self._scores))

    def update(self, scores: Any, targets: Any) -> None:
        """Add a batch: scores [N, C] (probabilities, or logits with from_logits=True), targets [N, C] in {1, 0, -1}."""
        raw = _as_numpy(scores)
        t = _prepare_targets(targets)
        if raw.ndim == 1 and self.num_classes == 1:
            raw, t = raw[:, None], t.reshape(-1, 1)
        nan_count = int(np.isnan(raw).sum()) if np.issubdtype(raw.dtype, np.floating) else 0
        s = _prepare_scores(raw)
        _check_multilabel(s, t, self.num_classes)
        if not self.from_logits:
            finite = s[np.isfinite(s)]
            if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
                raise DataError(
                    "multi-label scores must be probabilities in [0, 1]; these look like logits: "
                    "build MultiLabelAccumulator(..., from_logits=True) or pass sigmoid(logits)"
                )
        self._num_nonfinite += nan_count
        # Logits are stored as logits: float32 sigmoid saturates to exactly 1.0 above ~17, which
        # would turn confident predictions into ties and change the ranking (AP). Own copies,
        # because callers often reuse their batch buffers.
        self._scores.append(np.array(s, copy=True))
        self._targets.append(np.array(t, copy=True))

    def merge(self, other: "MultiLabelAccumulator") -> None:
        """Append the samples of another accumulator (e.g. from another process)."""
        if other.num_classes != self.num_classes:
            raise ConfigError("can only merge accumulators with the same num_classes")
        self._scores.extend(other._scores)
        self._targets.extend(other._targets)
        self._num_nonfinite += other._num_nonfinite

    def _stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Scores as stored (logits when from_logits) and targets, concatenated once."""
        if not self._scores:
            return (np.zeros((0, self.num_classes)), np.zeros((0, self.num_classes), np.int8))
        if len(self._scores) > 1:
            self._scores = [np.concatenate(self._scores)]
            self._targets = [np.concatenate(self._targets)]
        return self._scores[0], self._targets[0]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All scores as probabilities and all targets fed so far, concatenated."""
        scores, targets = self._stored()
        return (sigmoid(scores.astype(np.float64)) if self.from_logits else scores), targets

    def tune_thresholds(self, metric: str = "f1", fallback: float = 0.5) -> np.ndarray:
        """Per-class probability thresholds maximizing F1 on what was fed (see `tune_thresholds`)."""
        scores, targets = self._stored()
        tuned = tune_thresholds(scores, targets, metric=metric, fallback=fallback)
        if not self.from_logits:
            return tuned
        has_pos = (targets == 1).any(axis=0)
        return np.where(has_pos, sigmoid(tuned), float(fallback))

    def compute(
        self,
        thresholds: float | Any = 0.5,
        *,
        with_curves: bool = False,
        curve_points: int = 200,
    ) -> dict[str, Any]:
        """Return the metrics dict: mAP forms, CP..OF1 at `thresholds` (float or [C]), per-class details.

        With `with_curves`, `curves[name]` holds that class's precision-recall points (at most
        `curve_points`) for plotting.
        """
        scores, targets = self._stored()
        if scores.shape[0] == 0:
            raise DataError("no samples were evaluated: check the eval split")
        names = self.class_names
        parts = [_ranked_block(scores, targets, cols).average_precisions() for cols in _class_blocks(self.num_classes)]
        ap = {key: np.concatenate([p[key] for p in parts]) for key in ("AP", "AP_voc07", "AP_voc12")}
        prob_thresholds = _thresholds_array(thresholds, self.num_classes)
        # p >= t  <=>  logit >= log(t / (1 - t)), so stored logits are thresholded in logit space.
        stored_thresholds = _logit(prob_thresholds) if self.from_logits else prob_thresholds
        at_threshold = threshold_metrics(scores, targets, stored_thresholds)
        at_threshold["thresholds"] = prob_thresholds
        npos = (targets == 1).sum(axis=0)
        nneg = (targets == 0).sum(axis=0)
        nign = (targets == IGNORE).sum(axis=0)
        result: dict[str, Any] = {
            "kind": "multi",
            "mAP": _nanmean(ap["AP"]),
            "mAP_voc07": _nanmean(ap["AP_voc07"]),
            "mAP_voc12": _nanmean(ap["AP_voc12"]),
            **{key: at_threshold[key] for key in ("CP", "CR", "CF1", "OP", "OR", "OF1")},
            "num_samples": int(scores.shape[0]),
            "num_classes": self.num_classes,
            "num_classes_evaluated": int((npos > 0).sum()),
            "num_ignored": int(nign.sum()),
            "num_nonfinite": self._num_nonfinite,
            "class_names": list(names),
            "thresholds": at_threshold["thresholds"],
            "per_class": {
                name: {
                    "AP": float(ap["AP"][i]),
                    "AP_voc07": float(ap["AP_voc07"][i]),
                    "AP_voc12": float(ap["AP_voc12"][i]),
                    "threshold": float(at_threshold["thresholds"][i]),
                    "precision": float(at_threshold["precision"][i]),
                    "recall": float(at_threshold["recall"][i]),
                    "f1": float(at_threshold["f1"][i]),
                    "num_positives": int(npos[i]),
                    "num_negatives": int(nneg[i]),
                    "num_ignored": int(nign[i]),
                }
                for i, name in enumerate(names)
            },
        }
        if with_curves:
            result["curves"] = {}
            for i, name in enumerate(names):
                curve = precision_recall_curve_points(scores[:, i], targets[:, i], max_points=curve_points)
                if self.from_logits:
                    curve["thresholds"] = sigmoid(curve["thresholds"])
                result["curves"][name] = curve
        return result
