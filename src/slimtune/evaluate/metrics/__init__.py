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

The package is split by job: `common` (shared helpers), `single_label`, `ranking` (AP, PR
curves, tuned thresholds) and `multi_label` (thresholded metrics and the accumulator).
"""

from .common import IGNORE, sigmoid, to_jsonable
from .multi_label import MultiLabelAccumulator, threshold_metrics
from .ranking import average_precisions, precision_recall_curve_points, tune_thresholds
from .single_label import SingleLabelAccumulator, most_confused_pairs

__all__ = ["IGNORE", "MultiLabelAccumulator", "SingleLabelAccumulator", "average_precisions", "most_confused_pairs",
           "precision_recall_curve_points", "sigmoid", "threshold_metrics", "to_jsonable", "tune_thresholds"]
