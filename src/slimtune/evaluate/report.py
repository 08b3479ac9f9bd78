"""HTML evaluation report: one self-contained folder holding report.html and its PNG plots.

`write_report` takes the dict from `SingleLabelAccumulator.compute()` or
`MultiLabelAccumulator.compute(with_curves=True)` -- either in memory or read back from the JSON
written with `to_jsonable` (lists instead of arrays, None instead of NaN) -- so a report can be
regenerated later from saved metrics. Plots use matplotlib's Agg renderer through `Figure` objects
(no pyplot global state, no display); the page has no scripts and loads nothing from the network.
Example images are embedded as base64 PNG thumbnails so the folder can be copied anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from slimtune.errors import ConfigError

REPORT_NAME = "report.html"
CONFUSION_PNG = "confusion_matrix.png"
PER_CLASS_ACCURACY_PNG = "per_class_accuracy.png"
AP_PNG = "average_precision.png"
PR_CURVES_PNG = "pr_curves.png"

# Readability limits: beyond these, plots show a selection and say so in their caption.
MAX_CONFUSION_CLASSES = 30
MAX_ANNOTATED_CLASSES = 30
MAX_BAR_CLASSES = 50
MAX_AP_BAR_CLASSES = 40
MAX_PR_CURVES = 24
MAX_EXAMPLE_PAIRS = 30
MAX_EXAMPLES_PER_PAIR = 4
THUMBNAIL_SIZE = 128

_AP_FORMS = (
    ("AP", "AP (area, sklearn)"),
    ("AP_voc07", "AP VOC07 11-point"),
    ("AP_voc12", "AP VOC2010+ all-points"),
)


def write_report(
    out_dir: Path | str,
    results: Mapping[str, Any],
    kind: str,
    class_names: Sequence[str] | None = None,
    *,
    examples: Mapping[tuple[Any, Any], Sequence[Path | str]] | None = None,
    title: str = "",
) -> Path:
    """Write report.html and its PNG plots into out_dir; return the path of report.html.

    `kind` is 'single' or 'multi'. `examples` maps (true, predicted) pairs -- class names or
    indices -- to image paths shown as thumbnails (single-label only); without it, the results'
    `misclassified_examples` are used where their sample ids are readable image files.
    """
    if kind not in ("single", "multi"):
        raise ConfigError(f"report kind must be 'single' or 'multi', got {kind!r}")
    if results.get("kind", kind) != kind:
        raise ConfigError(f"results are from a {results['kind']!r} evaluation but kind={kind!r} was asked for")
    names = [str(n) for n in (class_names if class_names is not None else results.get("class_names", []))]
    per_class = results.get("per_class", {})
    if not names:
        names = list(per_class)
    missing = [n for n in names if n not in per_class]
    if missing:
        raise ConfigError(
            f"class {missing[0]!r} has no per-class results: pass the class names the metrics were computed with"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heading = title or ("Single-label evaluation" if kind == "single" else "Multi-label evaluation")
    body = _run_section(results)
    if kind == "single":
        body += _single_label_sections(out, results, names, examples)
    else:
        body += _multi_label_sections(out, results, names)
    page = _PAGE.format(title=_esc(heading), body="\n".join(body))
    report = out / REPORT_NAME
    report.write_text(page, encoding="utf-8")
    return report


def _run_section(results: Mapping[str, Any]) -> list[str]:
    """Which checkpoint, step, train_dir and split these results describe (when the results say)."""
    checkpoint = results.get("checkpoint")
    rows = [
        ("Model", results.get("model_name")),
        ("Checkpoint", checkpoint),
        ("Step", results.get("step")),
        ("Train dir", str(Path(checkpoint).parent) if checkpoint else None),
        ("Dataset", results.get("dataset_dir")),
        ("Split", results.get("split")),
    ]
    rows = [(key, value) for key, value in rows if value is not None]
    return [_section("Run", _key_value_table(rows))] if rows else []


# ----------------------------------------------------------------------------------------------
# Single-label
# ----------------------------------------------------------------------------------------------


def _single_label_sections(
    out: Path, results: Mapping[str, Any], names: list[str], examples: Mapping | None
) -> list[str]:
    per_class = results["per_class"]
    recall_keys = [k for k in results if k.startswith("Recall_")]
    headline = [("Accuracy", results.get("Accuracy"))]
    headline += [(k, results[k]) for k in recall_keys]
    headline += [
        ("Mean per-class accuracy", results.get("mean_per_class_accuracy")),
        ("Samples evaluated", results.get("num_samples")),
        ("Samples ignored", results.get("num_ignored")),
        ("Samples with NaN logits", results.get("num_nonfinite")),
    ]
    sections = [_section("Summary", _key_value_table(headline))]

    confusion = np.asarray(results["confusion_matrix"], dtype=np.int64)
    shown = _plot_confusion(out / CONFUSION_PNG, confusion, names)
    caption = "Rows: true class, columns: predicted class; colour = fraction of the true class's samples."
    if len(shown) < len(names):
        caption += (
            f" Showing the {len(shown)} of {len(names)} classes with the most confusions "
            "(sum of their off-diagonal row and column counts)."
        )
    sections.append(_section("Confusion matrix", _figure(CONFUSION_PNG, caption)))

    accuracy = np.array([_num(per_class[n].get("accuracy")) for n in names])
    shown_bars = _plot_per_class_accuracy(out / PER_CLASS_ACCURACY_PNG, accuracy, names)
    caption = "Per-class accuracy (recall of each true class)."
    if shown_bars < len(names):
        caption += f" Showing the {shown_bars} lowest of {len(names)} classes."
    sections.append(_section("Per-class accuracy", _figure(PER_CLASS_ACCURACY_PNG, caption)))

    pairs = [tuple(p) for p in results.get("most_confused", [])]
    sections.append(
        _section(
            "Most confused pairs",
            _table(["True class", "Predicted as", "Count"], pairs) if pairs else "<p>No misclassifications.</p>",
        )
    )

    example_pairs = _example_paths(examples, results, names)
    if example_pairs:
        sections.append(_section("Misclassified examples", _examples_html(example_pairs, pairs)))

    rows = [
        (
            n,
            per_class[n].get("support"),
            per_class[n].get("accuracy"),
            per_class[n].get("precision"),
        )
        for n in names
    ]
    sections.append(_section("Per-class results", _table(["Class", "Samples", "Accuracy", "Precision"], rows)))
    return sections


def _plot_confusion(path: Path, confusion: np.ndarray, names: list[str]) -> np.ndarray:
    """Heat map of the row-normalized confusion matrix; returns the class indices shown."""
    c = confusion.shape[0]
    if c <= MAX_CONFUSION_CLASSES:
        shown = np.arange(c)
    else:
        off = confusion.copy()
        np.fill_diagonal(off, 0)
        involvement = off.sum(axis=0) + off.sum(axis=1)
        # Most involved first, ties by index; then back to index order so related classes stay adjacent.
        shown = np.sort(np.lexsort((np.arange(c), -involvement))[:MAX_CONFUSION_CLASSES])
    support = confusion.sum(axis=1)
    sub = confusion[np.ix_(shown, shown)]
    fraction = sub / np.maximum(support[shown], 1)[:, None]
    k = len(shown)
    side = max(4.0, 0.32 * k + 2.5)
    fig = _figure_obj(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    labels = [_short(names[i]) for i in shown]
    font = 8 if k <= 20 else 6
    ax.set_xticks(range(k), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(k), labels, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= MAX_ANNOTATED_CLASSES:
        for i in range(k):
            for j in range(k):
                if sub[i, j]:
                    colour = "white" if fraction[i, j] > 0.5 else "black"
                    ax.text(j, i, str(sub[i, j]), ha="center", va="center", fontsize=font, color=colour)
    _save(fig, path)
    return shown


def _plot_per_class_accuracy(path: Path, accuracy: np.ndarray, names: list[str]) -> int:
    """Horizontal bars of per-class accuracy (lowest ones when there are many); returns bars drawn."""
    index = np.arange(len(names))
    if len(names) > MAX_BAR_CLASSES:
        known = index[np.isfinite(accuracy)]
        index = known[np.argsort(accuracy[known], kind="stable")][:MAX_BAR_CLASSES]
    values = np.nan_to_num(accuracy[index], nan=0.0)
    fig = _figure_obj(7.0, max(2.5, 0.22 * len(index) + 1.0))
    ax = fig.add_subplot()
    ax.barh(range(len(index)), values, color="#4c72b0")
    for y, value in enumerate(accuracy[index]):  # the number too, so a 0 bar is not just a gap
        ax.text(min(np.nan_to_num(value), 0.9) + 0.01, y, _plain(value), va="center", fontsize=6)
    ax.set_yticks(range(len(index)), [_short(names[i]) for i in index], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return len(index)


Example = tuple[Path, Optional[float], Optional[float]]  # image, P(predicted class), P(true class)


def _example_paths(
    examples: Mapping | None, results: Mapping[str, Any], names: list[str]
) -> dict[tuple[str, str], list[Example]]:
    """(true, predicted) names -> (image, probabilities), from `examples` or the results' sample ids
    that are files (with the probabilities the results recorded for them)."""
    pairs: dict[tuple[str, str], list[Example]] = {}
    if examples is not None:
        for (true, predicted), paths in examples.items():
            key = (_class_name(true, names), _class_name(predicted, names))
            pairs.setdefault(key, []).extend((Path(p), None, None) for p in paths)
    else:
        for entry in results.get("misclassified_examples", []):
            samples = entry.get("samples", [])
            predicted_p = entry.get("predicted_probability") or [None] * len(samples)
            true_p = entry.get("true_probability") or [None] * len(samples)
            files = [(Path(s), p, t) for s, p, t in zip(samples, predicted_p, true_p)
                     if isinstance(s, (str, Path)) and Path(s).is_file()]
            if files:
                pairs[(str(entry["true"]), str(entry["predicted"]))] = files
    return pairs


def _class_name(value: Any, names: list[str]) -> str:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= value < len(names):
            raise ConfigError(f"example class index {value} is outside [0, {len(names)})")
        return names[int(value)]
    return str(value)


def _examples_html(example_pairs: dict[tuple[str, str], list[Example]], ranked: list[tuple]) -> str:
    rank = {(str(t), str(p)): i for i, (t, p, *_rest) in enumerate(ranked)}
    order = sorted(example_pairs, key=lambda pair: (rank.get(pair, len(rank)), pair))
    blocks, unreadable = [], 0
    for true, predicted in order[:MAX_EXAMPLE_PAIRS]:
        images = []
        for path, predicted_p, true_p in example_pairs[(true, predicted)][:MAX_EXAMPLES_PER_PAIR]:
            uri = _thumbnail_data_uri(path)
            if uri is None:
                unreadable += 1
                continue
            caption = _esc(path.name)
            if predicted_p is not None and true_p is not None:
                caption += f"<br>{_esc(predicted)} {predicted_p:.2f} &middot; {_esc(true)} {true_p:.2f}"
            images.append(f'<figure class="example"><img class="thumb" src="{uri}" alt="{_esc(path.name)}" '
                          f'title="{_esc(str(path))}"><figcaption>{caption}</figcaption></figure>')
        if images:
            blocks.append(
                f"<div class=\"pair\"><h3>{_esc(true)} &rarr; predicted {_esc(predicted)}</h3>{''.join(images)}</div>"
            )
    note = f"<p>{unreadable} example image(s) could not be read and are left out.</p>" if unreadable else ""
    return "".join(blocks) + note


def _thumbnail_data_uri(path: Path) -> str | None:
    """The image at `path` as a base64 PNG thumbnail data URI, or None if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            thumb = image.convert("RGB")
            thumb.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            buffer = io.BytesIO()
            thumb.save(buffer, format="PNG")
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------
# Multi-label
# ----------------------------------------------------------------------------------------------


def _multi_label_sections(out: Path, results: Mapping[str, Any], names: list[str]) -> list[str]:
    per_class = results["per_class"]
    headline = [
        ("mAP (area under PR curve, = sklearn average_precision_score)", results.get("mAP")),
        ("mAP VOC2007 11-point", results.get("mAP_voc07")),
        ("mAP VOC2010+ all-points interpolated", results.get("mAP_voc12")),
        ("Samples evaluated", results.get("num_samples")),
        ("Classes with positives", results.get("num_classes_evaluated")),
        ("Ignored (difficult) entries", results.get("num_ignored")),
        ("NaN scores", results.get("num_nonfinite")),
    ]
    sections = [_section("Summary", _key_value_table(headline) + _AP_EXPLANATION)]

    thresholds = np.array([_num(per_class[n].get("threshold")) for n in names])
    same = np.all(thresholds == thresholds[0]) if len(thresholds) else True
    where = f"threshold {thresholds[0]:.4g} for every class" if same else "per-class thresholds (table below)"
    rows = [[_num(results.get(k)) for k in ("CP", "CR", "CF1", "OP", "OR", "OF1")]]
    sections.append(
        _section(
            "Thresholded metrics",
            f"<p>Predictions are score &ge; {where}. C* average over classes with positives "
            "(CF1 = 2&middot;CP&middot;CR/(CP+CR)); O* pool all classes' counts.</p>"
            + _table(["CP", "CR", "CF1", "OP", "OR", "OF1"], rows),
        )
    )

    ap = {key: np.array([_num(per_class[n].get(key)) for n in names]) for key, _ in _AP_FORMS}
    _plot_average_precision(out / AP_PNG, ap, names)
    caption = "Per-class average precision in its three forms."
    if len(names) > MAX_AP_BAR_CLASSES:
        caption = "Per-class average precision, classes sorted by each AP form (too many classes for bars)."
    sections.append(_section("Average precision per class", _figure(AP_PNG, caption)))

    curves = results.get("curves")
    if curves:
        shown = _plot_pr_curves(out / PR_CURVES_PNG, curves, per_class, names, ap["AP"])
        caption = "Precision-recall curves; the dot is the operating point at the class's threshold."
        if shown < len(names):
            caption += f" Showing the {shown} classes with the lowest AP of {len(names)}."
        sections.append(_section("Precision-recall curves", _figure(PR_CURVES_PNG, caption)))
    else:
        sections.append(
            _section(
                "Precision-recall curves",
                "<p>Not available: compute the results with MultiLabelAccumulator.compute(with_curves=True).</p>",
            )
        )

    headers = ["Class", "Positives", "Ignored", "AP", "AP VOC07", "AP VOC2010+", "Threshold", "Precision", "Recall", "F1"]
    keys = ["num_positives", "num_ignored", "AP", "AP_voc07", "AP_voc12", "threshold", "precision", "recall", "f1"]
    present = [n for n in names if per_class[n].get("num_positives") != 0]
    absent = [n for n in names if per_class[n].get("num_positives") == 0]
    rows = [[n] + [per_class[n].get(k) for k in keys] for n in present]
    note = (f"<p>No positives in this split (no AP, left out of mAP): {_esc(', '.join(absent))}.</p>"
            if absent else "")
    sections.append(_section("Per-class results and thresholds", _table(headers, rows) + note))
    return sections


def _plot_average_precision(path: Path, ap: dict[str, np.ndarray], names: list[str]) -> None:
    """Grouped horizontal bars per class, or sorted AP curves when there are too many classes."""
    colours = ("#4c72b0", "#dd8452", "#55a868")
    if len(names) <= MAX_AP_BAR_CLASSES:
        fig = _figure_obj(8.0, max(3.0, 0.45 * len(names) + 1.2))
        ax = fig.add_subplot()
        height = 0.8 / len(_AP_FORMS)
        y = np.arange(len(names))
        for i, ((key, label), colour) in enumerate(zip(_AP_FORMS, colours)):
            ax.barh(y + (i - 1) * height, np.nan_to_num(ap[key]), height=height, label=label, color=colour)
        ax.set_yticks(y, [_short(n) for n in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("average precision")
        ax.grid(axis="x", alpha=0.3)
    else:
        fig = _figure_obj(8.0, 4.5)
        ax = fig.add_subplot()
        for (key, label), colour in zip(_AP_FORMS, colours):
            values = np.sort(ap[key][np.isfinite(ap[key])])[::-1]
            ax.plot(np.arange(1, len(values) + 1), values, label=label, color=colour)
        ax.set_xlabel("class rank")
        ax.set_ylabel("average precision")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)


def _plot_pr_curves(
    path: Path, curves: Mapping[str, Any], per_class: Mapping[str, Any], names: list[str], ap: np.ndarray
) -> int:
    """Small multiples of per-class PR curves (the lowest-AP classes when there are many); returns panels."""
    index = np.array([i for i, n in enumerate(names) if n in curves], dtype=int)
    if len(index) > MAX_PR_CURVES:
        key = np.where(np.isfinite(ap[index]), ap[index], np.inf)  # classes without positives last
        index = np.sort(index[np.argsort(key, kind="stable")[:MAX_PR_CURVES]])
    columns = min(5, max(1, len(index)))
    rows = max(1, math.ceil(len(index) / columns))
    # Fixed margins instead of constrained layout: with many panels the layout solver dominates.
    fig = _figure_obj(2.6 * columns, 2.3 * rows + 0.5, layout=None)
    axes = np.atleast_1d(fig.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)).ravel()
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.5 / (2.3 * rows + 0.5) + 0.04, top=0.95, wspace=0.12, hspace=0.3)
    for ax in axes[len(index):]:
        ax.set_axis_off()
    for ax, i in zip(axes, index):
        name = names[i]
        recall = np.asarray(curves[name]["recall"], dtype=float)
        precision = np.asarray(curves[name]["precision"], dtype=float)
        if recall.size:
            # Precision P_i holds over the recall interval ending at R_i, hence 'pre' steps from recall 0.
            ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre", color="#4c72b0", linewidth=1.2)
        p, r = _num(per_class[name].get("precision")), _num(per_class[name].get("recall"))
        if math.isfinite(p) and math.isfinite(r):
            ax.plot([r], [p], "o", color="#c44e52", markersize=4)
        ap_text = f"{ap[i]:.3f}" if math.isfinite(ap[i]) else "n/a"
        ax.set_title(f"{_short(name, 18)}  AP={ap_text}", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    fig.supxlabel("recall", fontsize=9)
    fig.supylabel("precision", fontsize=9)
    _save(fig, path)
    return len(index)


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def _figure_obj(width: float, height: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)  # Agg explicitly: no display, whatever backend pyplot would pick
    return fig


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png")


def _num(value: Any) -> float:
    """A metric value as float; None (NaN after a JSON round trip) becomes NaN."""
    return float("nan") if value is None else float(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4f}" if math.isfinite(value) else "&ndash;"
    return _esc(str(value))


def _plain(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "n/a"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def _section(heading: str, content: str) -> str:
    return f"<section><h2>{_esc(heading)}</h2>\n{content}\n</section>"


def _figure(filename: str, caption: str) -> str:
    return f'<figure><img src="{_esc(filename)}" alt="{_esc(caption)}"><figcaption>{_esc(caption)}</figcaption></figure>'


def _key_value_table(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in items if v is not None)
    return f'<table class="kv">{rows}</table>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_AP_EXPLANATION = """
<p class="note"><b>AP definitions.</b> <i>mAP</i>: area under the raw precision-recall step curve,
no interpolation (tied scores form one threshold) &mdash; identical to scikit-learn's
<code>average_precision_score</code>. <i>VOC2007 11-point</i>: mean over recall levels
0, 0.1, &hellip;, 1 of the maximum precision at recall &ge; level (the VOC2007 devkit rule).
<i>VOC2010+ all-points</i>: area under the monotone (interpolated) precision envelope (the
VOC2010&ndash;2012 devkit rule). 'Difficult' (ignored) entries are left out of their class.</p>
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
h1 {{ border-bottom: 2px solid #4c72b0; padding-bottom: .3em; }}
section {{ margin-bottom: 2em; }}
table {{ border-collapse: collapse; font-size: 0.9em; margin: .5em 0; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: right; }}
th {{ background: #f0f3f8; }}
td:first-child, table.kv th {{ text-align: left; }}
figure {{ margin: 0; }}
figure img {{ max-width: 100%; }}
figcaption {{ font-size: 0.85em; color: #555; }}
.pair {{ display: inline-block; vertical-align: top; margin: 0 1em 1em 0; }}
.pair h3 {{ font-size: 0.9em; margin: .2em 0; }}
.thumb {{ margin: 2px; border: 1px solid #ddd; }}
.example {{ display: inline-block; margin: 0 4px 4px 0; font-size: 0.75em; text-align: center; }}
.note {{ font-size: 0.85em; color: #444; max-width: 60em; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""
