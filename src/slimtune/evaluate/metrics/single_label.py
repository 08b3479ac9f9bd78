"""Single-label metrics: slim's Accuracy and Recall_5, confusion matrix, per-class accuracy."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from slimtune.errors import ConfigError, DataError

from .common import IGNORE, as_numpy, nanmean, resolve_class_names, safe_div


class SingleLabelAccumulator:
    """Streaming single-label metrics: feed each evaluated sample exactly once via `update`.

    `Accuracy` is argmax accuracy (ties go to the lowest class index, like tf.argmax).
    `Recall_k` follows tf.nn.in_top_k, as slim's `streaming_recall_at_k` does: a sample counts when
    fewer than k classes score strictly higher than its true class, so ties at the boundary count as
    hits. `Recall_k` is reported only when there are more than k classes: with k or fewer every sample
    is a hit, so the number would say nothing (`topk_not_reported` names the ones left out and why).
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
        self.class_names = resolve_class_names(num_classes, class_names)
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
        logits = as_numpy(logits)
        labels = as_numpy(labels)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        n = self._check_batch(logits, labels)
        keep = labels != IGNORE
        if mask is not None:
            mask = as_numpy(mask).astype(bool).reshape(-1)
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
        for i, k in enumerate(self.topk):
            self._topk_hits[i] += int((rank < k).sum())
        self._confusion += np.bincount(labels * c + predicted, minlength=c * c).reshape(c, c)

        if sample_ids is not None and self.max_examples_per_pair > 0:
            wrong = np.flatnonzero(predicted != labels)
            if wrong.size:
                # Softmax of the misclassified rows only: what the report shows under each thumbnail.
                shifted = np.exp(logits[wrong] - logits[wrong].max(axis=1, keepdims=True))
                probabilities = shifted / shifted.sum(axis=1, keepdims=True)
            for row, i in enumerate(wrong):
                bucket = self._examples.setdefault((int(labels[i]), int(predicted[i])), [])
                if len(bucket) < self.max_examples_per_pair:
                    bucket.append((sample_ids[i], float(probabilities[row, predicted[i]]),
                                   float(probabilities[row, labels[i]])))

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
        per_class_accuracy = safe_div(correct, self._support, empty=float("nan"))
        predicted_count = confusion.sum(axis=0)
        per_class_precision = safe_div(correct, predicted_count, empty=float("nan"))

        result: dict[str, Any] = {
            "kind": "single",
            "Accuracy": float(correct.sum() / n),
        }
        not_reported = {}
        for k, hits in zip(self.topk, self._topk_hits):
            if k < self.num_classes:
                result[f"Recall_{k}"] = float(hits / n)
            elif k > 1:
                not_reported[f"Recall_{k}"] = (f"needs more than {k} classes (there are {self.num_classes}): "
                                               "every sample would count as a hit")
        result.update(
            {
                "topk_not_reported": not_reported,
                "mean_per_class_accuracy": nanmean(per_class_accuracy),
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
                    {"true": names[t], "predicted": names[p], "samples": [e[0] for e in entries],
                     "predicted_probability": [round(e[1], 6) for e in entries],
                     "true_probability": [round(e[2], 6) for e in entries]}
                    for (t, p), entries in sorted(self._examples.items(),
                                                  key=lambda kv: (-confusion[kv[0]], kv[0]))
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


