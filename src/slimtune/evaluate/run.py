"""`slimtune eval`: evaluate a checkpoint (or each new one, with --watch) on a dataset split.

Every sample is counted exactly once: the loader does not wrap around (slim's eval did, counting
some samples twice), and the count is checked against the split size minus skipped images.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..config import EvalConfig
from ..data import build_source, resolve_split
from ..data.loader import build_loader
from ..errors import CheckpointError, ConfigError
from ..nets.registry import ModelSpec, get_model_spec
from ..preprocessing import get_preprocessing
from ..checkpoint import train_dir as ckpt
from ..runtime import default_num_workers, pick_device
from .metrics import MultiLabelAccumulator, SingleLabelAccumulator, to_jsonable

log = logging.getLogger("slimtune.eval")
THRESHOLDS_FILENAME = "thresholds.json"


def evaluate_model(model: nn.Module, source: Any, spec: ModelSpec, *, preprocessing_name: Optional[str] = None,
                   image_size: Optional[int] = None, batch_size: int = 100, device: torch.device | str = "cpu",
                   multi_label: bool = False, num_workers: int = 0, labels_offset: int = 0,
                   use_grayscale: bool = False, max_num_batches: Optional[int] = None,
                   thresholds: Any = 0.5, on_bad_image: str = "skip", with_curves: bool = False,
                   return_scores: bool = False) -> dict[str, Any]:
    """Run `model` over every sample of `source` once and return the metrics."""
    device = torch.device(device)
    size = image_size or spec.default_image_size
    preprocess = get_preprocessing(preprocessing_name or spec.preprocessing, is_training=False,
                                   use_grayscale=use_grayscale)
    loader = build_loader(source, preprocess, (size, size), batch_size=batch_size, training=False,
                          channels=spec.in_channels, num_workers=num_workers, on_bad_image=on_bad_image,
                          labels_offset=labels_offset, pin_memory=device.type == "cuda")
    num_classes = getattr(model, "num_classes", None) or len(source.class_names)
    names = list(source.class_names[labels_offset:] if not multi_label else source.class_names)[:num_classes]
    accumulator = (MultiLabelAccumulator(num_classes, names) if multi_label
                   else SingleLabelAccumulator(num_classes, names))
    was_training = model.training
    model.eval()
    skipped: list[str] = []
    seen: list[np.ndarray] = []
    all_scores: list[np.ndarray] = []
    start = time.time()
    with torch.no_grad():
        for number, batch in enumerate(loader):
            if max_num_batches is not None and number >= max_num_batches:
                break
            skipped.extend(batch.bad)
            if len(batch) == 0:
                continue
            logits = model(batch.images.to(device)).float()
            scores = torch.sigmoid(logits) if multi_label else logits
            if multi_label:
                accumulator.update(scores.cpu().numpy(), batch.targets.numpy())
            else:  # sample ids (file paths) let the report show misclassified examples
                accumulator.update(scores.cpu().numpy(), batch.targets.numpy(),
                                   sample_ids=[_describe(source, int(i)) for i in batch.indices])
            seen.append(batch.indices.numpy())
            if return_scores:
                all_scores.append(scores.cpu().numpy())
    model.train(was_training)
    indices = np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64)
    if len(np.unique(indices)) != len(indices):
        raise RuntimeError("evaluation saw a sample twice; this is a bug in slimtune's loader")
    if max_num_batches is None and len(indices) + len(skipped) != len(source):
        raise RuntimeError(f"evaluation saw {len(indices)} + {len(skipped)} skipped of {len(source)} samples")
    if multi_label:
        results = accumulator.compute(thresholds=thresholds, with_curves=with_curves)
    else:
        results = accumulator.compute()
    results.update({"num_skipped": len(skipped), "skipped": skipped[:100],
                    "seconds": round(time.time() - start, 3)})
    if return_scores:
        results["_scores"] = np.concatenate(all_scores) if all_scores else np.zeros((0, num_classes))
        results["_indices"] = indices
    return results


def _describe(source: Any, index: int) -> str:
    """Where a sample comes from (a file path for folders, VOC and manifests)."""
    describe = getattr(source, "describe", None)
    return describe(index) if callable(describe) else str(index)


def load_for_eval(checkpoint_path: str | Path, model_name: Optional[str], num_classes: Optional[int],
                  device: torch.device) -> tuple[nn.Module, ModelSpec, dict[str, str], Path]:
    """Build the network recorded in (or named for) a checkpoint and load its weights."""
    if not Path(checkpoint_path).exists() and not Path(f"{checkpoint_path}.index").exists():
        raise CheckpointError(f"checkpoint not found: {checkpoint_path}")
    weights = ckpt.resolve_weights(checkpoint_path) if Path(checkpoint_path).is_dir() else Path(checkpoint_path)
    meta: dict[str, str] = {}
    if weights.suffix == ".safetensors" and weights.is_file():
        meta = ckpt.read_metadata(weights)
    # "model" is how the run named its net (a registered name, file.py:fn or module:fn), rebuildable
    # from here; "model_name" alone was recorded by older runs.
    name = model_name or meta.get("model") or meta.get("model_name")
    if not name:
        raise ConfigError(f"{weights} does not record its network: pass --model_name")
    spec = get_model_spec(name)
    classes = int(meta["num_classes"]) if meta.get("num_classes") else num_classes
    trained_size = int(meta["image_size"]) if meta.get("image_size") else None
    if meta.get("format") == "slimtune":
        from ..nets.endpoint_head import build_probe_model, is_probe_checkpoint

        model = build_probe_model(spec, meta, trained_size) if is_probe_checkpoint(meta) else \
            spec.build(classes, image_size=trained_size)
        ckpt.load_weights_into(model, weights)
    else:
        from ..checkpoint.restore import restore

        model = spec.build(classes if classes is not None else spec.checkpoint_num_classes)
        restore(model, str(checkpoint_path))
    if not isinstance(getattr(model, "num_classes", None), int) and classes is not None:
        model.num_classes = classes  # a custom net need not carry it; the checkpoint does
    return model.to(device).eval(), spec, meta, weights


def _class_names(meta: dict[str, str], source: Any, offset: int) -> list[str]:
    if meta.get("class_names"):
        return json.loads(meta["class_names"])
    return list(source.class_names[offset:])


def _thresholds(config: EvalConfig, weights: Path) -> Any:
    """--thresholds: a number, a comma list, 'tune', or the saved per-class thresholds."""
    if config.thresholds and config.thresholds != "tune":
        values = [float(v) for v in config.thresholds.split(",")]
        return values[0] if len(values) == 1 else np.array(values)
    saved = weights.parent / THRESHOLDS_FILENAME
    if saved.is_file():
        return np.array(json.loads(saved.read_text())["thresholds"])
    return 0.5


def evaluate_checkpoint(config: EvalConfig, checkpoint: Optional[Path] = None) -> dict[str, Any]:
    """Evaluate one checkpoint as configured; write results JSON (and report) beside it."""
    device = pick_device(config.device)
    target = checkpoint or Path(config.checkpoint_path)
    model, spec, meta, weights = load_for_eval(target, config.model_name, None, device)
    split = resolve_split(config.dataset_name, config.dataset_dir, config.dataset_split_name)
    source = build_source(config.dataset_name, config.dataset_dir, split)
    multi_label = meta.get("multi_label") == "true" if "multi_label" in meta else source.multi_label
    if config.multi_label is not None:
        multi_label = config.multi_label
    image_size = config.eval_image_size or (int(meta["image_size"]) if meta.get("image_size") else None)
    preprocessing_name = config.preprocessing_name or meta.get("preprocessing")
    thresholds = _thresholds(config, weights) if multi_label else 0.5
    results = evaluate_model(model, source, spec, preprocessing_name=preprocessing_name, image_size=image_size,
                             batch_size=config.batch_size, device=device, multi_label=multi_label,
                             num_workers=default_num_workers(config.num_workers), labels_offset=config.labels_offset,
                             use_grayscale=config.use_grayscale, max_num_batches=config.max_num_batches,
                             thresholds=thresholds, on_bad_image=config.on_bad_image, with_curves=config.report,
                             return_scores=multi_label and config.thresholds == "tune")
    if multi_label and config.thresholds == "tune":
        from .metrics import tune_thresholds

        targets = np.stack([np.asarray(source.targets()[i], dtype=np.float32) for i in results["_indices"]])
        tuned = tune_thresholds(results["_scores"], targets)
        (weights.parent / THRESHOLDS_FILENAME).write_text(json.dumps(
            {"thresholds": tuned.tolist(), "split": split, "checkpoint": weights.name}, indent=1))
        results["tuned_thresholds"] = tuned.tolist()
    results.pop("_scores", None)
    results.pop("_indices", None)
    step = int(meta.get("step", 0)) if meta.get("step") else None
    results.update({"checkpoint": str(weights), "step": step, "split": split, "model_name": spec.name})
    out_dir = Path(config.eval_dir) if config.eval_dir else weights.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{weights.name.removesuffix('.safetensors')}.eval-{split}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(to_jsonable(results), indent=1))
    results["results_file"] = str(json_path)
    if config.report:
        from .report import write_report

        report_dir = out_dir / f"{stem}-report"
        results["report_file"] = str(write_report(report_dir, results, "multi" if multi_label else "single",
                                                  _class_names(meta, source, config.labels_offset),
                                                  title=f"{spec.name} on {split}"))
    _write_events(out_dir / "eval", results, step or 0)
    return results


def _write_events(eval_dir: Path, results: dict[str, Any], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(eval_dir)) as writer:
        for key in ("Accuracy", "Recall_5", "mAP", "mAP_voc07", "CF1", "OF1"):
            if isinstance(results.get(key), (int, float)):
                writer.add_scalar(f"eval/{key}", results[key], step)


def headline(results: dict[str, Any]) -> str:
    """One line with the main numbers."""
    parts = [f"{k}={results[k]:.4f}" for k in ("Accuracy", "Recall_5", "mAP", "mAP_voc07", "CF1", "OF1")
             if isinstance(results.get(k), (int, float))]
    parts.append(f"samples={results.get('num_samples')}")
    if results.get("num_skipped"):
        parts.append(f"skipped={results['num_skipped']}")
    return " ".join(parts)


def watch(config: EvalConfig, max_evaluations: Optional[int] = None) -> list[dict[str, Any]]:
    """Evaluate each new checkpoint of a train_dir as it appears (slim's evaluation_loop)."""
    train_dir = Path(config.checkpoint_path)
    if not train_dir.is_dir():
        raise ConfigError(f"--watch needs a train_dir, got {train_dir}")
    done: set[int] = set()
    evaluations: list[dict[str, Any]] = []
    last_new = time.time()
    while True:
        latest = ckpt.latest_checkpoint(train_dir)
        if latest is not None and latest.step not in done:
            try:
                results = evaluate_checkpoint(config, latest.weights)
            except CheckpointError:
                # Pruned between listing and reading: the next look finds the newer one.
                continue
            done.add(latest.step)
            evaluations.append(results)
            print(f"step {latest.step}: {headline(results)}", file=sys.stderr, flush=True)
            last_new = time.time()
            if max_evaluations is not None and len(evaluations) >= max_evaluations:
                return evaluations
        elif config.timeout_secs is not None and time.time() - last_new > config.timeout_secs:
            return evaluations
        time.sleep(config.eval_interval_secs)
