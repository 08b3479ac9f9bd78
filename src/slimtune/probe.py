"""`slimtune probe`: linear probes on several end points and learning rates over one frozen pass.

DINOv2's linear evaluation, made a command: the backbone runs once per image (eval mode, eval
preprocessing, no augmentation), every requested end point is averaged over space and cached in
memory-mapped files, and one linear head per (end point, learning rate) trains on the cached
features: every epoch after the extraction costs no forward pass, and a second probe of the same
checkpoint, data and preprocessing (say with other learning rates) costs none at all. The heads
are evaluated on the evaluation split (accuracy, or mAP for multi-label data), the table is printed,
saved as JSON and plotted, and the best head is saved with its backbone as a normal checkpoint
(`nets.endpoint_head.EndpointHead`) that `eval` and `predict` load like a training run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint.restore import restore
from .data import build_source, resolve_split
from .data.base import StreamSource
from .data.labels import write_labels_file
from .data.loader import build_loader
from .errors import ConfigError, DataError
from .evaluate.metrics import SingleLabelAccumulator, average_precisions
from .features import resolve_endpoints
from .nets.base import pooled_features
from .nets.endpoint_head import EndpointHead
from .nets.registry import ModelSpec, get_model_spec
from .preprocessing import get_preprocessing
from .runtime import inference_layout

log = logging.getLogger("slimtune.probe")
RESULTS_FILENAME = "probe_results.json"


@dataclass
class FeatureSet:
    """Pooled end-point features of one split, memory-mapped, with their targets."""

    features: dict[str, np.ndarray]  # end point -> [N, C] float32 (np.memmap)
    targets: np.ndarray              # [N] int64, or [N, K] float32 with 1/0/-1 for multi-label
    forward_passes: int              # batches the backbone ran to build this set (0: all cached)


def _sha(content: Any) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _files_identity(path: Optional[str]) -> list:
    """What identifies a checkpoint's content cheaply: each file's name, size and modification time."""
    if not path:
        return ["random-init"]
    root = Path(path)
    files = sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else \
        sorted(root.parent.glob(root.name + "*"))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _source_identity(source: Any) -> str:
    """The image list (paths / records, in order) a split reads, as a digest."""
    if isinstance(source, StreamSource):
        return _sha([[str(s), s.stat().st_size, s.stat().st_mtime_ns] for s in source.shards])
    digest = hashlib.sha256()
    for index in range(len(source)):
        digest.update(source.describe(index).encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()[:20]


def _file_stem(endpoint: str) -> str:
    return endpoint.replace("/", "__")


def extract_features(model: nn.Module, source: Any, spec: ModelSpec, endpoints: list[str], cache_dir: Path,
                     key: str, *, preprocessing_name: str, image_size: int, batch_size: int, num_workers: int,
                     labels_offset: int, device: torch.device) -> FeatureSet:
    """Pooled features of `endpoints` for every image of `source`, from the cache when there.

    One backbone pass per batch computes every end point still missing; files are written under a
    temporary name and renamed when complete, so an interrupted extraction is never reused.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = {ep: cache_dir / f"{key}-{_file_stem(ep)}.npy" for ep in endpoints}
    targets_path = cache_dir / f"{key}-targets.npy"
    missing = [ep for ep, path in paths.items() if not path.is_file()]
    forward_passes = 0
    if missing or not targets_path.is_file():
        missing = list(paths)  # the targets and every file must come from one pass
        preprocess = get_preprocessing(preprocessing_name, is_training=False)
        loader = build_loader(source, preprocess, (image_size, image_size), batch_size=batch_size, training=False,
                              channels=spec.in_channels, num_workers=num_workers, labels_offset=labels_offset)
        rows: dict[str, Any] = {}
        targets: list[np.ndarray] = []
        count = 0
        model.eval()
        layout = inference_layout(model)
        with torch.inference_mode():
            for batch in loader:
                if not len(batch):
                    continue
                _, end_points = model.forward_endpoints(layout(batch.images.to(device)))
                forward_passes += 1
                for ep in missing:
                    pooled = pooled_features(end_points[ep]).flatten(1).float().cpu().numpy()
                    if ep not in rows:
                        rows[ep] = np.lib.format.open_memmap(paths[ep].with_suffix(".tmp"), mode="w+",
                                                             dtype=np.float32, shape=(len(source), pooled.shape[1]))
                    rows[ep][count:count + len(pooled)] = pooled
                targets.append(batch.targets.numpy())
                count += len(batch)
        if count == 0:
            raise DataError("no readable image to probe")
        for ep, array in rows.items():
            array.flush()
            del array
        np.save(targets_path.with_suffix(".tmp.npy"), np.concatenate(targets))
        for ep in missing:
            # Skipped (unreadable) images leave unused rows at the end: cut them off.
            full = np.load(paths[ep].with_suffix(".tmp"), mmap_mode="r")
            if count < len(full):
                np.save(paths[ep].with_suffix(".cut.npy"), np.asarray(full[:count]))
                del full
                os.replace(paths[ep].with_suffix(".cut.npy"), paths[ep].with_suffix(".tmp"))
            else:
                del full
            os.replace(paths[ep].with_suffix(".tmp"), paths[ep])
        os.replace(targets_path.with_suffix(".tmp.npy"), targets_path)
    features = {ep: np.load(path, mmap_mode="r") for ep, path in paths.items()}
    return FeatureSet(features, np.load(targets_path), forward_passes)


def _loss(logits: Tensor, targets: Tensor, multi_label: bool) -> Tensor:
    if not multi_label:
        return nn.functional.cross_entropy(logits, targets)
    keep = targets >= 0  # -1: ignored (VOC 'difficult')
    losses = nn.functional.binary_cross_entropy_with_logits(logits, targets.clamp(min=0), reduction="none")
    return (losses * keep).sum() / keep.sum().clamp(min=1)


def train_heads(train: FeatureSet, learning_rates: list[float], num_classes: int, multi_label: bool, *,
                num_epochs: int, batch_size: int, seed: int = 0, weight_decay: float = 0.0
                ) -> dict[tuple[str, float], nn.Linear]:
    """One linear head per (end point, learning rate), all on the same mini-batches of cached features.

    SGD with momentum 0.9 and a cosine schedule over the run, as DINOv2's linear evaluation.
    """
    heads: dict[tuple[str, float], nn.Linear] = {}
    groups = []
    for ep, array in train.features.items():
        for rate in learning_rates:
            head = nn.Linear(array.shape[1], num_classes)
            # Every rate of an end point starts from the same weights, whatever else is probed.
            init = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(ep.encode()))
            with torch.no_grad():
                head.weight.normal_(0.0, 0.01, generator=init)
                head.bias.zero_()
            heads[(ep, rate)] = head
            groups.append({"params": list(head.parameters()), "lr": rate, "initial_lr": rate})
    optimizer = torch.optim.SGD(groups, lr=learning_rates[0], momentum=0.9, weight_decay=weight_decay)
    count = len(train.targets)
    steps_per_epoch = math.ceil(count / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, num_epochs * steps_per_epoch))
    targets = torch.from_numpy(train.targets)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_epochs):
        order = torch.randperm(count, generator=generator).numpy()
        for start in range(0, count, batch_size):
            index = np.sort(order[start:start + batch_size])  # sorted: sequential reads of the memmaps
            batch_targets = targets[index]
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros(())
            for ep, array in train.features.items():
                x = torch.from_numpy(np.array(array[index]))
                for rate in learning_rates:
                    loss = loss + _loss(heads[(ep, rate)](x), batch_targets, multi_label)
            loss.backward()  # the heads share no parameter: the sum's gradient is each head's own
            optimizer.step()
            schedule.step()
    return heads


def score_head(head: nn.Linear, features: np.ndarray, targets: np.ndarray, multi_label: bool,
               chunk: int = 4096) -> float:
    """Accuracy (single-label, as `slimtune eval` counts it) or mAP (multi-label) of one head."""
    with torch.no_grad():
        logits = np.concatenate([head(torch.from_numpy(np.array(features[i:i + chunk]))).numpy()
                                 for i in range(0, len(features), chunk)])
    if multi_label:
        return float(np.nanmean(average_precisions(1.0 / (1.0 + np.exp(-logits)), targets)["AP"]))
    accumulator = SingleLabelAccumulator(logits.shape[1])
    accumulator.update(logits, targets)
    return float(accumulator.compute()["Accuracy"])


def _plot(table: dict[str, dict[str, float]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    endpoints = list(table)
    rates = list(next(iter(table.values())))
    values = np.array([[table[ep][r] for r in rates] for ep in endpoints])
    figure, axes = plt.subplots(figsize=(1.4 * len(rates) + 3, 0.5 * len(endpoints) + 1.5))
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(rates)), rates)
    axes.set_yticks(range(len(endpoints)), endpoints)
    axes.set_xlabel("learning rate")
    for row in range(len(endpoints)):
        for col in range(len(rates)):
            axes.text(col, row, f"{values[row, col]:.3f}", ha="center", va="center", color="white")
    figure.colorbar(image, label=metric)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def format_table(table: dict[str, dict[str, float]], metric: str) -> str:
    """The results as aligned text: one row per end point, one column per learning rate."""
    rates = list(next(iter(table.values())))
    width = max(len(ep) for ep in table) + 2
    lines = [f"{metric:<{width}}" + "".join(f"{'lr=' + r:>12}" for r in rates)]
    lines += [f"{ep:<{width}}" + "".join(f"{row[r]:>12.4f}" for r in rates) for ep, row in table.items()]
    return "\n".join(lines)


def _check_settings(endpoints: list[str], learning_rates: list[float], num_epochs: int, batch_size: int) -> None:
    if not endpoints:
        raise ConfigError("--endpoints needs at least one end point")
    if not learning_rates or any(not math.isfinite(r) or r <= 0 for r in learning_rates):
        raise ConfigError(f"--learning_rates must be positive numbers, got {learning_rates}")
    if num_epochs < 1 or batch_size < 1:
        raise ConfigError("--num_epochs and --batch_size must be >= 1")


def run_probe(*, model_name: str, endpoints: list[str], learning_rates: list[float], output_dir: str,
              checkpoint_path: Optional[str] = None, dataset_name: Optional[str] = None,
              dataset_dir: Optional[str] = None, train_split: str = "train", eval_split: str = "auto",
              num_epochs: int = 10, batch_size: int = 64, image_size: Optional[int] = None,
              preprocessing_name: Optional[str] = None, labels_offset: int = 0, num_workers: int = 0,
              seed: int = 0, weight_decay: float = 0.0, cache_dir: Optional[str] = None,
              device: str = "cpu") -> dict[str, Any]:
    """Probe `endpoints` x `learning_rates`; return the table, the best head and where things went."""
    _check_settings(endpoints, learning_rates, num_epochs, batch_size)
    spec = get_model_spec(model_name)
    torch_device = torch.device(device)
    backbone = spec.build(0, image_size=image_size)
    if checkpoint_path:
        restore(backbone, checkpoint_path)
    backbone.to(torch_device).eval()
    size = image_size or spec.default_image_size
    preprocessing = preprocessing_name or spec.preprocessing
    with torch.inference_mode():
        available = list(backbone.forward_endpoints(torch.zeros(1, spec.in_channels, size, size,
                                                                device=torch_device))[1])
    endpoints = resolve_endpoints(available, endpoints, spec.scope)

    eval_split = resolve_split(dataset_name, dataset_dir, eval_split)
    train_source = build_source(dataset_name, dataset_dir, train_split)
    eval_source = build_source(dataset_name, dataset_dir, eval_split)
    multi_label = train_source.multi_label
    class_names = list(train_source.class_names if multi_label else train_source.class_names[labels_offset:])
    if list(eval_source.class_names) != list(train_source.class_names):
        raise DataError(f"splits {train_split} and {eval_split} name different classes")
    out = Path(output_dir)
    cache = Path(cache_dir) if cache_dir else out / "feature_cache"
    common = {"model": spec.name, "checkpoint": _files_identity(checkpoint_path), "preprocessing": preprocessing,
              "image_size": size, "labels_offset": labels_offset}
    sets = {}
    for split, source in ((train_split, train_source), (eval_split, eval_source)):
        key = _sha({**common, "images": _source_identity(source)})
        sets[split] = extract_features(backbone, source, spec, endpoints, cache, key, preprocessing_name=preprocessing,
                                       image_size=size, batch_size=batch_size, num_workers=num_workers,
                                       labels_offset=labels_offset, device=torch_device)
    train_set, eval_set = sets[train_split], sets[eval_split]

    heads = train_heads(train_set, learning_rates, len(class_names), multi_label, num_epochs=num_epochs,
                        batch_size=batch_size, seed=seed, weight_decay=weight_decay)
    metric = "mAP" if multi_label else "Accuracy"
    table: dict[str, dict[str, float]] = {ep: {} for ep in endpoints}
    for (ep, rate), head in heads.items():
        table[ep][f"{rate:g}"] = score_head(head, eval_set.features[ep], eval_set.targets, multi_label)
    best_ep, best_rate = max(heads, key=lambda k: table[k[0]][f"{k[1]:g}"])
    best_value = table[best_ep][f"{best_rate:g}"]

    out.mkdir(parents=True, exist_ok=True)
    best_weights = save_probe_checkpoint(out / "best", backbone, spec, heads[(best_ep, best_rate)], best_ep,
                                     class_names, multi_label, size, preprocessing,
                                     check=(eval_set.features[best_ep], eval_source, labels_offset))
    results = {"metric": metric, "table": table, "endpoints": endpoints, "learning_rates": learning_rates,
               "best": {"endpoint": best_ep, "learning_rate": best_rate, metric: best_value,
                        "checkpoint": str(best_weights)},
               "train_split": train_split, "eval_split": eval_split, "num_train": len(train_set.targets),
               "num_eval": len(eval_set.targets), "num_epochs": num_epochs,
               "forward_passes": train_set.forward_passes + eval_set.forward_passes, "feature_cache": str(cache)}
    (out / RESULTS_FILENAME).write_text(json.dumps(results, indent=1) + "\n")
    _plot(table, metric, out / "probe_results.png")
    print(format_table(table, metric), file=sys.stderr)
    print(f"best: {best_ep} at lr={best_rate:g}: {metric}={best_value:.4f}, saved to {best_weights}", file=sys.stderr)
    return results


def save_probe_checkpoint(out_dir: Path, backbone: nn.Module, spec: ModelSpec, head: nn.Linear, endpoint: str,
                          class_names: list[str], multi_label: bool, image_size: int, preprocessing: str,
                          check: Optional[tuple[np.ndarray, Any, int]] = None) -> Path:
    """Save backbone + head as `out_dir/model.safetensors`, a checkpoint `eval`/`predict` load; with
    `check`, first prove that the whole model gives the head's logits on the first cached images
    (same preprocessing, same pooling). Returns the weights file."""
    from safetensors.torch import save_file

    model = EndpointHead(backbone, endpoint, len(class_names), head.in_features)
    model.get_classifier().load_state_dict(head.state_dict())
    if check is not None:
        features, source, offset = check
        _check_saved_model(model, head, features, source, spec, image_size, preprocessing, offset)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    metadata = {"format": "slimtune", "model_name": spec.name, "num_classes": str(len(class_names)),
                "class_names": json.dumps(class_names), "multi_label": "true" if multi_label else "false",
                "image_size": str(image_size), "preprocessing": preprocessing, "step": "0",
                "probe_endpoint": endpoint, "probe_num_features": str(head.in_features)}
    weights = out_dir / "model.safetensors"
    save_file(tensors, str(weights), metadata=metadata)
    write_labels_file(out_dir / "labels.txt", class_names)
    return weights


def _check_saved_model(model: EndpointHead, head: nn.Linear, features: np.ndarray, source: Any, spec: ModelSpec,
                       image_size: int, preprocessing: str, labels_offset: int, count: int = 8) -> None:
    preprocess = get_preprocessing(preprocessing, is_training=False)
    loader = build_loader(source, preprocess, (image_size, image_size), batch_size=count, training=False,
                          channels=spec.in_channels, labels_offset=labels_offset)
    batch = next(iter(loader))
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        whole = model(batch.images.to(device)).cpu()
        cached = head(torch.from_numpy(np.array(features[:len(batch)])))
    difference = float((whole - cached).abs().max())
    if difference > 1e-4 * max(1.0, float(cached.abs().max())):
        raise RuntimeError(f"the saved probe model disagrees with its head on cached features by {difference:g}")
