"""Evaluation: metrics accumulators (numpy) and the HTML report (matplotlib, imported on first use)."""

from typing import Any

from slimtune.evaluate.metrics import (
    IGNORE,
    MultiLabelAccumulator,
    SingleLabelAccumulator,
    average_precisions,
    most_confused_pairs,
    precision_recall_curve_points,
    sigmoid,
    threshold_metrics,
    to_jsonable,
    tune_thresholds,
)

__all__ = [
    "IGNORE",
    "MultiLabelAccumulator",
    "SingleLabelAccumulator",
    "average_precisions",
    "most_confused_pairs",
    "precision_recall_curve_points",
    "sigmoid",
    "threshold_metrics",
    "to_jsonable",
    "tune_thresholds",
    "write_report",
]


def __getattr__(name: str) -> Any:
    # matplotlib costs a noticeable import time; only report users should pay it.
    if name == "write_report":
        from slimtune.evaluate.report import write_report

        return write_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
