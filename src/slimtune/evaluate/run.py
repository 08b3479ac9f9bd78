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

from ..compiled_inference import inference_forward
from ..config import EvalConfig
from ..data import build_source, resolve_split
from ..data.loader import build_loader
from ..errors import CheckpointError, ConfigError
from ..nets.registry import ModelSpec, get_model_spec
from ..preprocessing import get_preprocessing
from ..checkpoint import train_dir as ckpt
from ..runtime import default_num_workers, inference_layout, pick_device
from .metrics import MultiLabelAccumulator, SingleLabelAccumulator, to_jsonable

log = logging.getLogger("slimtune.eval")
THRESHOLDS_FILENAME = "thresholds.json"


def evaluate_model(model: nn.Module, source: Any, spec: ModelSpec, *, preprocessing_name: Optional[str] = None,
                   image_size: Optional[int] = None, batch_size: int = 100, device: torch.device | str = "cpu",
                   multi_label: bool = False, num_workers: int = 0, labels_offset: int = 0,
                   use_grayscale: bool = False, max_num_batches: Optional[int] = None,
                   thresholds: Any = 0.5, on_bad_image: str = "skip", with_curves: bool = False,
                   return_scores: bool = False, channels_last: bool = True, compile: bool = False) -> dict[str, Any]:
    """Run `model` over every sample of `source` once and return the metrics (in the channels-last
    layout unless `channels_last` is False: see runtime.inference_layout).

    `compile` runs the forward compiled with frozen weights (compiled_inference.CompiledInference,
    checked against the eager model on the first batch); only for weights that no longer change,
    so never during training. results["forward"] then says whether it ran compiled."""
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
    layout = inference_layout(model, channels_last)
    forward = inference_forward(model, compile, batch_size, device)
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
            logits = forward(layout(batch.images.to(device))).float()
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
    if compile:
        results["forward"] = forward.status
    if return_scores:
        results["_scores"] = np.concatenate(all_scores) if all_scores else np.zeros((0, num_classes))
        results["_indices"] = indices
    return results


def _describe(source: Any, index: int) -> str:
    """Where a sample comes from (a file path for folders, VOC and manifests)."""
    describe = getattr(source, "describe", None)
    return describe(index) if callable(describe) else str(index)


def load_for_eval(checkpoint_path: str | Path, model_name: Optional[str], num_classes: Optional[int],
                  device: torch.device, moving_average: bool = True
                  ) -> tuple[nn.Module, ModelSpec, dict[str, str], Path]:
    """Build the network recorded in (or named for) a checkpoint and load its weights.

    A run trained with --moving_average_decay is loaded with its averaged weights unless
    `moving_average` is False (slim's eval used the averages); meta["weights"] then says which:
    "moving_average" or "raw".
    """
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
        loaded = ckpt.load_run_weights(model, weights, moving_average)
        meta = {**meta, "weights": "moving_average" if loaded != weights else "raw"}
    else:
        from ..checkpoint.restore import LOAD_ADVICE, restore

        model = spec.build(classes if classes is not None else spec.checkpoint_num_classes)
        restore(model, str(checkpoint_path), advice=LOAD_ADVICE)  # eval/predict can exclude nothing
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
    model, spec, meta, weights = load_for_eval(target, config.model_name, None, device,
                                               moving_average=not config.no_moving_average)
    split = resolve_split(config.dataset_name, config.dataset_dir, config.dataset_split_name)
    recorded_multi = meta.get("multi_label") == "true" if "multi_label" in meta else None
    if config.multi_label is not None and recorded_multi is not None and config.multi_label != recorded_multi:
        raise ConfigError(f"--multi_label {str(config.multi_label).lower()} contradicts the checkpoint {weights.name}, "
                          f"trained {'multi' if recorded_multi else 'single'}-label: drop --multi_label")
    # A manifest is read in the checkpoint's task type, so a contradicting line names its file and line.
    source = build_source(config.dataset_name, config.dataset_dir, split,
                          multi_label=config.multi_label if config.multi_label is not None else recorded_multi)
    multi_label = recorded_multi if recorded_multi is not None else source.multi_label
    if config.multi_label is not None:
        multi_label = config.multi_label
    check_labels_match(model, meta, weights, source, multi_label, config.labels_offset,
                       _dataset_label(config), split)
    # Raw weights of a run that has averages are the unusual choice: their results get their own file.
    raw_of_averaged = meta.get("weights") == "raw" and ckpt.averages_path(weights).is_file()
    stem = _results_stem(config, weights, split, ".raw" if raw_of_averaged else "")
    image_size = config.eval_image_size or (int(meta["image_size"]) if meta.get("image_size") else None)
    preprocessing_name = config.preprocessing_name or meta.get("preprocessing")
    if config.thresholds and not multi_label:
        raise ConfigError(f"--thresholds applies to multi-label models; {weights.name} is single-label "
                          "(its prediction is the top class): drop --thresholds")
    thresholds = _thresholds(config, weights) if multi_label else 0.5
    results = evaluate_model(model, source, spec, preprocessing_name=preprocessing_name, image_size=image_size,
                             batch_size=config.batch_size, device=device, multi_label=multi_label,
                             num_workers=default_num_workers(config.num_workers), labels_offset=config.labels_offset,
                             use_grayscale=config.use_grayscale, max_num_batches=config.max_num_batches,
                             thresholds=thresholds, on_bad_image=config.on_bad_image, with_curves=config.report,
                             return_scores=multi_label and config.thresholds == "tune", compile=config.compile)
    if multi_label and config.thresholds == "tune":
        results["tuning"] = _tune_and_save(results, source, weights, split, _dataset_label(config), thresholds)
        results["tuned_thresholds"] = results["tuning"]["thresholds"]
    results.pop("_scores", None)
    results.pop("_indices", None)
    step = int(meta.get("step", 0)) if meta.get("step") else None
    results.update({"checkpoint": str(weights), "step": step, "split": split, "model_name": spec.name,
                    "dataset": _dataset_identity(config), "weights": meta.get("weights", "raw")})
    out_dir = _out_dir(config, weights)
    out_dir.mkdir(parents=True, exist_ok=True)
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


def _training_split(weights: Path) -> Optional[str]:
    """The split the checkpoint's run trained on, from the config.yaml beside it (None if unknown)."""
    saved = weights.parent / "config.yaml"
    if not saved.is_file():
        return None
    try:
        import yaml

        data = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, ImportError):
        return None
    resolved = data.get("resolved") if isinstance(data, dict) else None
    split = resolved.get("split") if isinstance(resolved, dict) else None
    return str(split) if split else None


def _splits_overlap(a: str, b: str) -> bool:
    """True when two split names share images (VOC's trainval holds train and val)."""
    return a == b or {a, b} in ({"trainval", "train"}, {"trainval", "val"}, {"all", a}, {"all", b})


def _tune_and_save(results: dict[str, Any], source: Any, weights: Path, split: str, dataset: str,
                   used: Any) -> dict[str, Any]:
    """Tune per-class F1 thresholds on the evaluated scores, save them beside the checkpoint, and
    measure CF1/OF1 at the tuned thresholds (the ones eval and predict use from now on)."""
    from .metrics import threshold_metrics, tune_thresholds

    targets = np.stack([np.asarray(source.targets()[i], dtype=np.float32) for i in results["_indices"]])
    scores = results["_scores"]
    tuned = tune_thresholds(scores, targets)
    before = threshold_metrics(scores, targets, used)
    after = threshold_metrics(scores, targets, tuned)
    trained_on = _training_split(weights)
    overlap = trained_on is not None and _splits_overlap(trained_on, split)
    saved = weights.parent / THRESHOLDS_FILENAME
    saved.write_text(json.dumps({"thresholds": tuned.tolist(), "split": split, "dataset": dataset,
                                 "checkpoint": weights.name, "CF1": after["CF1"], "OF1": after["OF1"]}, indent=1))
    old = used if np.ndim(used) == 0 else "saved per-class"
    summary = (f"tuned {len(tuned)} per-class thresholds (each class's best F1) on {dataset} split {split!r}, "
               f"{len(targets)} images: CF1 {before['CF1']:.4f} -> {after['CF1']:.4f}, OF1 {before['OF1']:.4f} -> "
               f"{after['OF1']:.4f} (from thresholds {old} to the tuned ones, on this same split); saved to {saved}; "
               f"eval and predict of this checkpoint use them from now on")
    if overlap:
        summary += (f". WARNING: the model trained on split {trained_on!r}, which holds these images: tuned "
                    f"thresholds and their F1 are optimistic; tune on a held-out split")
    return {"thresholds": tuned.tolist(), "file": str(saved), "split": split, "dataset": dataset,
            "CF1": after["CF1"], "OF1": after["OF1"], "CP": after["CP"], "CR": after["CR"],
            "OP": after["OP"], "OR": after["OR"], "CF1_before": before["CF1"], "OF1_before": before["OF1"],
            "training_split": trained_on, "tuned_on_training_images": overlap, "summary": summary}


def _names_text(multi_label: bool, names: list[str], count: int) -> str:
    shown = ", ".join(names[:6]) + (", …" if len(names) > 6 else "")
    return f"{'multi' if multi_label else 'single'}-label, {count} classes" + (f" ({shown})" if names else "")


def _unnamed(names: list[str]) -> bool:
    """Class names that are only their own indices (a manifest of indices, an .npz without names)."""
    return names == [str(i) for i in range(len(names))]


def check_labels_match(model: nn.Module, meta: dict[str, str], weights: Path, source: Any, multi_label: bool,
                       labels_offset: int, dataset: str, split: str) -> None:
    """Refuse, before any image is read, a checkpoint whose label set is not the data's.

    Compares the task type (multi vs single label), the class count and, when the checkpoint
    records them, the class names in order: a checkpoint evaluated on another label set gives
    numbers that look plausible and mean nothing.
    """
    data_names = list(source.class_names if source.multi_label else source.class_names[labels_offset:])
    data_multi = bool(source.multi_label)
    count = getattr(model, "num_classes", None) or (int(meta["num_classes"]) if meta.get("num_classes") else None)
    recorded = json.loads(meta["class_names"]) if meta.get("class_names") else []
    problem = None
    if multi_label != data_multi:
        problem = "task type"
    elif recorded and recorded == data_names:
        return
    elif count is not None and count != len(data_names):
        problem = "class count"
    elif recorded and not _unnamed(data_names) and not _unnamed(recorded) and recorded != data_names[:len(recorded)]:
        problem = "class names" if sorted(recorded) != sorted(data_names[:len(recorded)]) else "class order"
    if problem is None:
        return
    ours = _names_text(multi_label, recorded, count if count is not None else len(recorded))
    theirs = _names_text(data_multi, data_names, len(data_names))
    offset = f" with --labels_offset {labels_offset}" if labels_offset else ""
    raise ConfigError(f"checkpoint {weights.name} does not fit {dataset} split {split!r} ({problem} differs): "
                      f"it was trained {ours}, the data is {theirs}{offset}; evaluate on data with the "
                      f"checkpoint's classes")


def _dataset_label(config: EvalConfig) -> str:
    """A short name for the evaluated dataset (for messages and result file names)."""
    if config.dataset_dir:
        path = Path(config.dataset_dir).expanduser()
        name = path.stem if path.is_file() else path.name
        return name or str(path)
    return config.dataset_name or "digits"


def _dataset_identity(config: EvalConfig) -> dict[str, Optional[str]]:
    """What was evaluated, recorded in the results so files of different datasets never get mixed up."""
    directory = str(Path(config.dataset_dir).expanduser().resolve()) if config.dataset_dir else None
    return {"name": config.dataset_name or (None if directory else "digits"), "dir": directory}


def _out_dir(config: EvalConfig, weights: Path) -> Path:
    return Path(config.eval_dir) if config.eval_dir else weights.parent


def _results_stem(config: EvalConfig, weights: Path, split: str, kind: str = "") -> str:
    """`<checkpoint>.eval-<dataset>-<split>`; a file of that name from another dataset (same folder
    name, other path) is never overwritten: this one gets a short hash of its path."""
    import hashlib
    import re

    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", _dataset_label(config)).strip("._") or "data"
    stem = f"{weights.name.removesuffix('.safetensors')}{kind}.eval-{label}-{split}"
    existing = _out_dir(config, weights) / f"{stem}.json"
    if existing.is_file():
        try:
            recorded = json.loads(existing.read_text()).get("dataset")
        except (OSError, ValueError):
            recorded = None
        if isinstance(recorded, dict) and recorded != _dataset_identity(config):
            digest = hashlib.sha1(json.dumps(_dataset_identity(config), sort_keys=True).encode()).hexdigest()[:8]
            stem = f"{stem}-{digest}"
    return stem


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
    if results.get("weights") == "moving_average":
        parts.append("weights=moving_average")
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
