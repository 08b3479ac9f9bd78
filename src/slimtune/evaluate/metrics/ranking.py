"""Multi-label ranking core: per-class AP in three definitions, PR curves, F1-tuned thresholds."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from slimtune.errors import ConfigError, DataError

from .common import IGNORE, as_numpy, safe_div

# Classes handled per vectorized pass: bounds temporaries to a few (N x 64) arrays.
_CLASS_BLOCK = 64
# The 11 recall levels of the VOC2007 rule, as integers i for t = i / 10 (compared exactly).
_VOC07_LEVELS = range(11)


def check_multilabel(scores: np.ndarray, targets: np.ndarray, num_classes: int | None = None) -> None:
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


def prepare_targets(targets: Any) -> np.ndarray:
    t = as_numpy(targets)
    if t.dtype == bool:
        return t.astype(np.int8)
    if np.issubdtype(t.dtype, np.floating):
        # Float targets (from a BCE target tensor) are fine when they hold exact -1/0/1.
        if t.size and not np.isin(t, (-1.0, 0.0, 1.0)).all():
            raise DataError("targets must be 1 (positive), 0 (negative) or -1 (ignore)")
    return t.astype(np.int8)


def prepare_scores(scores: Any) -> np.ndarray:
    """Scores as float32/float64 with NaN replaced by -inf (ranked last, never above a threshold)."""
    s = as_numpy(scores)
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
        f1 = safe_div(2 * self.tp, self.tp + self.fp + npos[:, None])
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


def class_blocks(num_classes: int) -> Iterable[slice]:
    for start in range(0, num_classes, _CLASS_BLOCK):
        yield slice(start, min(start + _CLASS_BLOCK, num_classes))


def ranked_block(scores: np.ndarray, targets: np.ndarray, cols: slice) -> _RankedBlock:
    return _RankedBlock(
        np.ascontiguousarray(scores[:, cols].T), np.ascontiguousarray(targets[:, cols].T)
    )


def average_precisions(scores: Any, targets: Any) -> dict[str, np.ndarray]:
    """Per-class AP in its three forms (keys AP, AP_voc07, AP_voc12); NaN for classes without positives."""
    s, t = prepare_scores(scores), prepare_targets(targets)
    check_multilabel(s, t)
    parts = [ranked_block(s, t, cols).average_precisions() for cols in class_blocks(s.shape[1])]
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
    s, t = prepare_scores(scores), prepare_targets(targets)
    check_multilabel(s, t)
    if s.shape[0] == 0:
        return np.full(s.shape[1], float(fallback))
    return np.concatenate(
        [ranked_block(s, t, cols).best_f1_thresholds(float(fallback)) for cols in class_blocks(s.shape[1])]
    )


def precision_recall_curve_points(
    scores_c: Any, targets_c: Any, max_points: int | None = None
) -> dict[str, np.ndarray]:
    """One class's PR curve at every distinct score (ignored entries dropped), by decreasing threshold.

    Returns arrays `precision`, `recall`, `thresholds` (same length; recall non-decreasing). With
    `max_points`, an evenly spaced subset that keeps the first and last points is returned.
    """
    s = prepare_scores(np.asarray(as_numpy(scores_c)).reshape(-1, 1))
    t = prepare_targets(np.asarray(as_numpy(targets_c)).reshape(-1, 1))
    check_multilabel(s, t)
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


