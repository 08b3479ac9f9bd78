"""`slimtune predict`: images, folders or globs -> top-k labels with names and probabilities.

Single-label models give the k most probable classes (softmax); multi-label models give every
class whose sigmoid probability reaches its threshold (the per-class thresholds tuned by
`slimtune eval --thresholds tune` when the train_dir has them, else 0.5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from .compiled_inference import inference_forward
from .data.decode import BadImageError, decode_image
from .data.folder import expand_inputs
from .errors import ConfigError
from .evaluate.run import THRESHOLDS_FILENAME, load_for_eval
from .preprocessing import get_preprocessing
from .runtime import inference_layout, pick_device


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


def predict(checkpoint_path: Optional[str], inputs: Sequence[str], *, model_name: Optional[str] = None, top_k: int = 5,
            batch_size: int = 32, image_size: Optional[int] = None, preprocessing_name: Optional[str] = None,
            threshold: Optional[float] = None, device: str = "auto", on_bad_image: str = "skip",
            model: Optional[str] = None, moving_average: bool = True, compile: bool = False) -> list[Prediction]:
    """Predict labels for every input image with a trained checkpoint (file or train_dir), or with an
    exported model file (`model`: .onnx, run in onnxruntime with the file's own metadata).
    A run's moving-average weights are used when it saved some, unless `moving_average` is False.
    `compile` runs the checkpoint's forward compiled (compiled_inference.CompiledInference)."""
    if top_k < 1:
        raise ConfigError("--top_k must be >= 1")
    if batch_size < 1:
        raise ConfigError("--batch_size must be >= 1")
    if model is not None:
        if checkpoint_path:
            raise ConfigError("give --checkpoint_path or --model, not both")
        if compile:
            raise ConfigError("--compile applies to checkpoints; an exported .onnx runs in onnxruntime: drop --compile")
        return predict_exported(model, inputs, top_k=top_k, batch_size=batch_size, threshold=threshold,
                                on_bad_image=on_bad_image)
    if not checkpoint_path:
        raise ConfigError("predict needs --checkpoint_path (a train_dir or checkpoint) or --model (an exported .onnx)")
    torch_device = pick_device(device)
    model, spec, meta, weights = load_for_eval(checkpoint_path, model_name, None, torch_device, moving_average)
    layout = inference_layout(model)
    forward = inference_forward(model, compile, batch_size, torch_device)
    paths = expand_inputs(inputs)
    multi_label = meta.get("multi_label") == "true"
    names = _class_names(meta, weights, model.num_classes)
    size = image_size or (int(meta["image_size"]) if meta.get("image_size") else spec.default_image_size)
    preprocess = get_preprocessing(preprocessing_name or meta.get("preprocessing") or spec.preprocessing,
                                   is_training=False)
    if threshold is not None and not multi_label:
        raise ConfigError(f"--threshold applies to multi-label models; {weights.name} is single-label "
                          "(use --top_k): drop --threshold")
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
            logits = forward(layout(torch.stack(tensors).to(torch_device))).float().cpu()
        for path, row in zip(kept, logits):
            predictions.append(Prediction(str(path), _labels(row, names, multi_label, top_k, thresholds)))
    order = {str(p): i for i, p in enumerate(paths)}
    predictions.sort(key=lambda p: order[p.path])
    return predictions


def predict_exported(model_path: str, inputs: Sequence[str], *, top_k: int = 5, batch_size: int = 32,
                     threshold: Optional[float] = None, on_bad_image: str = "skip") -> list[Prediction]:
    """Predict with an ONNX file written by `slimtune export`: onnxruntime, with labels, image size,
    preprocessing and thresholds from the file's metadata (no slimtune checkpoint needed)."""
    path = Path(model_path).expanduser()
    if path.suffix.lower() != ".onnx":
        raise ConfigError(f"--model {model_path}: predict runs exported .onnx files (use --checkpoint_path for "
                          "checkpoints and train_dirs)")
    if not path.is_file():
        raise ConfigError(f"--model {model_path}: no such file")
    from .export.formats import INPUT_NAME, onnx_session

    try:
        session = onnx_session(path)
    except Exception as error:  # onnxruntime's own exception types
        raise ConfigError(f"--model {model_path}: onnxruntime cannot load it ({str(error).splitlines()[0]})") from error
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if meta.get("exported_by") != "slimtune":
        raise ConfigError(f"--model {model_path}: not written by `slimtune export` (no slimtune metadata)")
    names = json.loads(meta["class_names"])
    multi_label = meta.get("multi_label") == "true"
    size, channels = int(meta["image_size"]), int(meta.get("in_channels", "3"))
    raw_input = meta.get("with_preprocessing") == "true"
    preprocess = None if raw_input else get_preprocessing(meta["preprocessing"], is_training=False)
    saved = json.loads(meta.get("thresholds") or "null")
    thresholds = np.full(len(names), 0.5 if threshold is None else threshold, dtype=np.float32)
    if multi_label and threshold is None and saved:
        thresholds = np.asarray(saved, dtype=np.float32)
    paths = expand_inputs(inputs)
    predictions: list[Prediction] = []
    # Images of different sizes cannot share a uint8 batch: a with-preprocessing model gets one at a time.
    step = 1 if raw_input else batch_size
    for start in range(0, len(paths), step):
        arrays, kept = [], []
        for image_path in paths[start:start + step]:
            try:
                array = decode_image(image_path, channels, description=str(image_path))
            except BadImageError as error:
                if on_bad_image == "fail":
                    raise
                predictions.append(Prediction(str(image_path), error=str(error)))
                continue
            arrays.append(array if raw_input else
                          preprocess(torch.from_numpy(array).permute(2, 0, 1), size, size).numpy())
            kept.append(image_path)
        if not arrays:
            continue
        logits = session.run(["logits"], {INPUT_NAME: np.stack(arrays)})[0]
        for image_path, row in zip(kept, torch.from_numpy(np.asarray(logits, dtype=np.float32))):
            predictions.append(Prediction(str(image_path), _labels(row, names, multi_label, top_k, thresholds)))
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
