"""`slimtune predict`: images, folders or globs -> top-k labels with names and probabilities.

Single-label models give the k most probable classes (softmax); multi-label models give every
class whose sigmoid probability reaches its threshold (the per-class thresholds tuned by
`slimtune eval --thresholds tune` when the train_dir has them, else 0.5).
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from .data.decode import BadImageError, decode_image
from .data.folder import IMAGE_EXTENSIONS, list_images
from .errors import ConfigError, DataError
from .evaluate.run import THRESHOLDS_FILENAME, load_for_eval
from .preprocessing import get_preprocessing
from .runtime import pick_device


@dataclass
class Prediction:
    """The labels predicted for one image."""

    path: str
    labels: list[dict] = field(default_factory=list)
    error: Optional[str] = None

    def to_json(self) -> str:
        """One JSON line."""
        data = {"path": self.path, "labels": self.labels}
        if self.error:
            data["error"] = self.error
        return json.dumps(data)


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Image files from paths, folders (recursively) and glob patterns, in the order given."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found.extend(list_images(path))
        elif path.is_file():
            found.append(path)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            found.extend(p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            raise DataError(f"{item}: no such image, folder or glob match")
    if not found:
        raise DataError(f"no images found in {', '.join(inputs)}")
    return found


def _class_names(meta: dict[str, str], weights: Path, count: int) -> list[str]:
    if meta.get("class_names"):
        return json.loads(meta["class_names"])
    labels = weights.parent / "labels.txt"
    if labels.is_file():
        from .data.labels import labels_to_names, read_labels_file
        return labels_to_names(read_labels_file(labels))
    # A published ImageNet checkpoint carries no labels of its own: slim's class names.
    from .data.imagenet import imagenet_class_names
    return imagenet_class_names(count) or [str(i) for i in range(count)]


def predict(checkpoint_path: str, inputs: Sequence[str], *, model_name: Optional[str] = None, top_k: int = 5,
            batch_size: int = 32, image_size: Optional[int] = None, preprocessing_name: Optional[str] = None,
            threshold: Optional[float] = None, device: str = "auto", on_bad_image: str = "skip") -> list[Prediction]:
    """Predict labels for every input image with a trained checkpoint (file or train_dir)."""
    if top_k < 1:
        raise ConfigError("--top_k must be >= 1")
    torch_device = pick_device(device)
    model, spec, meta, weights = load_for_eval(checkpoint_path, model_name, None, torch_device)
    paths = expand_inputs(inputs)
    multi_label = meta.get("multi_label") == "true"
    names = _class_names(meta, weights, model.num_classes)
    size = image_size or (int(meta["image_size"]) if meta.get("image_size") else spec.default_image_size)
    preprocess = get_preprocessing(preprocessing_name or meta.get("preprocessing") or spec.preprocessing,
                                   is_training=False)
    thresholds = np.full(len(names), 0.5 if threshold is None else threshold, dtype=np.float32)
    saved = weights.parent / THRESHOLDS_FILENAME
    if multi_label and threshold is None and saved.is_file():
        thresholds = np.asarray(json.loads(saved.read_text())["thresholds"], dtype=np.float32)
    predictions: list[Prediction] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        tensors, kept = [], []
        for path in chunk:
            try:
                array = decode_image(path, spec.in_channels, description=str(path))
            except BadImageError as error:
                if on_bad_image == "fail":
                    raise
                predictions.append(Prediction(str(path), error=str(error)))
                continue
            tensors.append(preprocess(torch.from_numpy(array).permute(2, 0, 1), size, size))
            kept.append(path)
        if not tensors:
            continue
        with torch.no_grad():
            logits = model(torch.stack(tensors).to(torch_device)).float().cpu()
        for path, row in zip(kept, logits):
            predictions.append(Prediction(str(path), _labels(row, names, multi_label, top_k, thresholds)))
    order = {str(p): i for i, p in enumerate(paths)}
    predictions.sort(key=lambda p: order[p.path])
    return predictions


def _labels(logits: torch.Tensor, names: list[str], multi_label: bool, top_k: int,
            thresholds: np.ndarray) -> list[dict]:
    if multi_label:
        probabilities = torch.sigmoid(logits).numpy()
        chosen = np.flatnonzero(probabilities >= thresholds[:len(probabilities)])
        chosen = chosen[np.argsort(-probabilities[chosen])]
    else:
        probabilities = torch.softmax(logits, dim=-1).numpy()
        chosen = np.argsort(-probabilities)[:top_k]
    return [{"index": int(i), "name": names[i] if i < len(names) else str(i),
             "probability": round(float(probabilities[i]), 6)} for i in chosen]


def format_table(predictions: Iterable[Prediction]) -> str:
    """A readable table: one block per image, one line per label."""
    lines = []
    for prediction in predictions:
        lines.append(prediction.path)
        if prediction.error:
            lines.append(f"    skipped: {prediction.error}")
        elif not prediction.labels:
            lines.append("    (no label above its threshold)")
        for label in prediction.labels:
            lines.append(f"    {label['probability']:8.4f}  {label['name']}  [{label['index']}]")
    return "\n".join(lines)
