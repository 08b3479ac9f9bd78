"""`slimtune models`: the registry as a table (name, image size, preprocessing, classes, accuracy).

Listing reads the registry only: no network is built, so it answers as fast as the net modules
import. Parameter counts need a build (on the meta device) and are asked for with `--params`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .registry import get_model_spec, list_models


def parameter_count(name: str, num_classes: Optional[int] = None) -> int:
    """Parameters of a registered net, counted on the meta device (no memory, no time)."""
    spec = get_model_spec(name)
    with torch.device("meta"):
        model = spec.build(spec.checkpoint_num_classes if num_classes is None else num_classes)
    return sum(p.numel() for p in model.parameters())


def _accuracy(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_model_table(pattern: Optional[str] = None, with_params: bool = False, source: str = "slim") -> str:
    """One line per registered network matching the glob `pattern`; `with_params` adds parameter counts.

    source 'timm' / 'torchvision' lists that library's architectures (as `--model_name` takes them)
    with their pretrained config's eval input; their weights come from --checkpoint_path.
    """
    if source != "slim":
        return _foreign_table(source, pattern, with_params)
    names = list_models(pattern)
    if not names:
        return f"no model matches {pattern!r}"
    header = ["name", "size", "preprocessing", "classes", "top-1", "top-5"]
    header += ["params"] if with_params else []
    rows = [tuple(header + ["published checkpoint"])]
    for name in names:
        spec = get_model_spec(name)
        row = [name, str(spec.default_image_size), spec.preprocessing, str(spec.checkpoint_num_classes),
               _accuracy(spec.published_top1), _accuracy(spec.published_top5)]
        if with_params:
            row.append(f"{parameter_count(name) / 1e6:.2f}M")
        rows.append(tuple(row + [spec.published_checkpoint or "-"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _foreign_table(source: str, pattern: Optional[str], with_params: bool) -> str:
    from .foreign import describe

    names = list_models(pattern, source=source)
    if not names:
        return f"no {source} model matches {pattern!r}"
    rows = [("name", "size", "interpolation", "crop_pct") + (("params",) if with_params else ())]
    for name in names:
        size, interpolation, crop_pct = describe(*name.split(":", 1))
        row = (name, str(size), interpolation, f"{crop_pct:.3f}")
        rows.append(row + ((f"{parameter_count(name) / 1e6:.2f}M",) if with_params else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
