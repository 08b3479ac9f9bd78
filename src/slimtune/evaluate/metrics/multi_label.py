"""Multi-label thresholded metrics (CP/CR/CF1/OP/OR/OF1) and the accumulator that reports them with AP/mAP."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from slimtune.errors import ConfigError, DataError

from .common import IGNORE, as_numpy, harmonic_f1, nanmean, resolve_class_names, safe_div, sigmoid
from .ranking import (check_multilabel, class_blocks, prepare_scores, prepare_targets, ranked_block,
                      precision_recall_curve_points, tune_thresholds)


def threshold_metrics(scores: Any, targets: Any, thresholds: float | Any = 0.5) -> dict[str, Any]:
    """CP, CR, CF1, OP, OR, OF1 and per-class precision/recall/F1 for predictions `score >= threshold`.

    Per-class ("C") metrics average precision and recall over the classes that have positives
    (precision is 0 for such a class that predicts nothing); CF1 = 2*CP*CR / (CP + CR), the usual
    multi-label definition (not the mean of per-class F1s). Overall ("O") metrics pool the
    true/false positives of all classes: OP = sum TP / sum (TP + FP), OR = sum TP / sum P,
    OF1 = 2*OP*OR / (OP + OR). Ignored (-1) entries count nowhere.
    """
    s, t = prepare_scores(scores), prepare_targets(targets)
    check_multilabel(s, t)
    c = s.shape[1]
    thr = _thresholds_array(thresholds, c)
    predicted = s >= thr[None, :]
    positive, negative = t == 1, t == 0
    tp = (predicted & positive).sum(axis=0)
    fp = (predicted & negative).sum(axis=0)
    npos = positive.sum(axis=0)
    precision = safe_div(tp, tp + fp)
    recall = safe_div(tp, npos, empty=float("nan"))
    evaluable = npos > 0
    cp = float(precision[evaluable].mean()) if evaluable.any() else float("nan")
    cr = float(recall[evaluable].mean()) if evaluable.any() else float("nan")
    op = float(safe_div(tp.sum(), tp.sum() + fp.sum()))
    orr = float(safe_div(tp.sum(), npos.sum(), empty=float("nan")))
    return {
        "CP": cp,
        "CR": cr,
        "CF1": float(harmonic_f1(cp, cr)) if evaluable.any() else float("nan"),
        "OP": op,
        "OR": orr,
        "OF1": float(harmonic_f1(op, orr)) if npos.sum() else float("nan"),
        "thresholds": thr,
        "precision": precision,
        "recall": recall,
        "f1": np.where(evaluable, harmonic_f1(precision, np.nan_to_num(recall)), np.nan),
        "true_positives": tp,
        "false_positives": fp,
    }


def _logit(p: np.ndarray) -> np.ndarray:
    """Inverse sigmoid; 0 -> -inf and 1 -> +inf."""
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def _thresholds_array(thresholds: float | Any, num_classes: int) -> np.ndarray:
    thr = np.asarray(as_numpy(thresholds), dtype=np.float64)
    if thr.ndim == 0:
        return np.full(num_classes, float(thr))
    thr = thr.reshape(-1)
    if thr.shape[0] != num_classes:
        raise ConfigError(f"got {thr.shape[0]} thresholds for {num_classes} classes: pass one per class or a single float")
    return thr



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
        self.class_names = resolve_class_names(num_classes, class_names)
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
        raw = as_numpy(scores)
        t = prepare_targets(targets)
        if raw.ndim == 1 and self.num_classes == 1:
            raw, t = raw[:, None], t.reshape(-1, 1)
        nan_count = int(np.isnan(raw).sum()) if np.issubdtype(raw.dtype, np.floating) else 0
        s = prepare_scores(raw)
        check_multilabel(s, t, self.num_classes)
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
        parts = [ranked_block(scores, targets, cols).average_precisions() for cols in class_blocks(self.num_classes)]
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
            "mAP": nanmean(ap["AP"]),
            "mAP_voc07": nanmean(ap["AP_voc07"]),
            "mAP_voc12": nanmean(ap["AP_voc12"]),
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
