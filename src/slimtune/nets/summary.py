"""`slimtune models`: the registry as a table (name, image size, preprocessing, parameters)."""

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


def format_model_table(pattern: Optional[str] = None) -> str:
    """One line per registered network matching the glob `pattern`."""
    names = list_models(pattern)
    if not names:
        return f"no model matches {pattern!r}"
    rows = [("name", "size", "preprocessing", "classes", "params", "published checkpoint")]
    for name in names:
        spec = get_model_spec(name)
        rows.append((name, str(spec.default_image_size), spec.preprocessing, str(spec.checkpoint_num_classes),
                     f"{parameter_count(name) / 1e6:.2f}M", spec.published_checkpoint or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)
