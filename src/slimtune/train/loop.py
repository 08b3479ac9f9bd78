"""`slimtune train`: the whole training run, readable top to bottom.

Order of business: resolve data and model -> restore (resume from train_dir, else warm start from
--checkpoint_path) -> freeze what should not train -> optimizer and schedule -> loop over steps
(forward, loss, backward, update; log, summarize, evaluate, save) -> final checkpoint.
A run killed at any point resumes from its last checkpoint when the same command runs again.
"""

from __future__ import annotations

import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import __version__
from ..config import TrainConfig, dump_config
from ..data import build_source, resolve_split
from ..data.base import ImageSource
from ..data.labels import write_labels_file
from ..data.loader import build_loader, set_loader_epoch
from ..errors import ConfigError, DataError
from ..nets.registry import ModelSpec, get_model_spec
from ..preprocessing import get_preprocessing
from . import checkpoints as ckpt
from .freeze import apply_trainable_scopes, decay_groups
from .losses import batch_accuracy, sigmoid_loss, softmax_loss
from .optimizers import build_optimizer
from .runtime import Runtime, all_reduce_sum, default_num_workers, seed_everything, setup_runtime, teardown_runtime
from .schedules import learning_rate_at

log = logging.getLogger("slimtune.train")


@dataclass
class TrainResult:
    """What a training run produced."""

    train_dir: Path
    step: int
    checkpoint: Optional[Path]
    last_loss: float = float("nan")
    skipped_images: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _setup_logging(train_dir: Path, is_main: bool) -> None:
    log.setLevel(logging.INFO)
    if is_main and not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == train_dir.resolve()
                           for h in log.handlers):
        handler = logging.FileHandler(train_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def _say(message: str, runtime: Runtime) -> None:
    """A line for the user (stderr) and the train log, from the main process only."""
    if runtime.is_main:
        print(message, file=sys.stderr, flush=True)
        log.info(message)


def _versions() -> dict[str, str]:
    import torchvision

    return {"slimtune": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _num_classes(config: TrainConfig, source: Any) -> int:
    if config.num_classes is not None:
        return config.num_classes
    classes = source.num_classes - (0 if source.multi_label else config.labels_offset)
    if classes <= 0:
        raise DataError("the dataset has no classes; check --dataset_dir / labels.txt")
    return classes


def _pos_weight(config: TrainConfig, source: Any, num_classes: int) -> Optional[torch.Tensor]:
    """--pos_weight: a number, a comma list, or 'auto' (negatives / positives per class)."""
    if not config.pos_weight:
        return None
    if config.pos_weight == "auto":
        if not isinstance(source, ImageSource):
            raise ConfigError("--pos_weight auto needs a dataset with random access (not TFRecord shards)")
        targets = np.stack([np.asarray(t, dtype=np.float32) for t in source.targets()])
        positives = (targets > 0.5).sum(0)
        negatives = (targets == 0).sum(0)
        return torch.tensor(negatives / np.maximum(positives, 1), dtype=torch.float32)
    values = [float(v) for v in config.pos_weight.split(",")]
    if len(values) not in (1, num_classes):
        raise ConfigError(f"--pos_weight has {len(values)} values; give 1 or {num_classes}")
    return torch.tensor(values * (num_classes if len(values) == 1 else 1), dtype=torch.float32)


def build_model(spec: ModelSpec, num_classes: int, config: TrainConfig) -> nn.Module:
    """The network, initialized from the seed."""
    torch.manual_seed(config.seed)
    model = spec.build(num_classes, image_size=config.train_image_size)
    if config.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise ConfigError(f"--gradient_checkpointing: {spec.name} does not support it (NASNet and PNASNet do)")
        model.gradient_checkpointing = True
    return model


def _warm_start(model: nn.Module, config: TrainConfig, runtime: Runtime) -> Any:
    """Restore --checkpoint_path with the exclusions, name maps and policies asked for; print the plan."""
    from ..checkpoint.restore import restore

    plan = restore(model, config.checkpoint_path, exclude_scopes=config.checkpoint_exclude_scopes or (),
                   name_map=config.checkpoint_name_map or None, ignore_missing_vars=config.ignore_missing_vars,
                   dry_run=config.dry_run)
    _say(str(plan), runtime)
    return plan


def _trainable_names(model: nn.Module, config: TrainConfig) -> Optional[set[str]]:
    if not config.trainable_scopes:
        return None
    from ..checkpoint.scopes import select_params

    # The raw text goes in so that errors quote the scope as the user spelled it.
    return set(select_params(model, config.trainable_scopes))


def _steps(config: TrainConfig, num_samples: int, runtime: Runtime) -> tuple[int, float, Optional[int]]:
    """(batches per epoch per process, steps per epoch for schedules, total steps or None)."""
    global_batch = config.batch_size * runtime.world_size
    if num_samples < global_batch:
        raise DataError(f"the split has {num_samples} images, fewer than one batch of {global_batch}; "
                        f"lower --batch_size")
    batches_per_epoch = num_samples // global_batch
    steps_per_epoch = num_samples / global_batch
    if config.max_number_of_steps is not None:
        total = config.max_number_of_steps
    elif config.num_epochs is not None:
        total = math.ceil(config.num_epochs * batches_per_epoch)
    else:
        total = None
    return batches_per_epoch, steps_per_epoch, total


def _summaries(writer: Any, model: nn.Module, images: torch.Tensor, step: int) -> None:
    """Weight histograms and a grid of input images (each image rescaled to [0, 1] for display)."""
    import torchvision

    for name, parameter in model.named_parameters():
        writer.add_histogram(f"weights/{name}", parameter.detach().float().cpu(), step)
    sample = images[:16].detach().float().cpu()
    low = sample.amin(dim=(1, 2, 3), keepdim=True)
    high = sample.amax(dim=(1, 2, 3), keepdim=True)
    grid = torchvision.utils.make_grid((sample - low) / (high - low).clamp(min=1e-6), nrow=4)
    writer.add_image("inputs", grid, step)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training job as configured; return where it ended."""
    if not config.model_name:
        raise ConfigError("--model_name is required (see `slimtune models`)")
    runtime = setup_runtime(config.device)
    try:
        return _train(config, runtime)
    finally:
        teardown_runtime(runtime)


def _train(config: TrainConfig, runtime: Runtime) -> TrainResult:
    train_dir = Path(config.train_dir)
    if runtime.is_main:
        train_dir.mkdir(parents=True, exist_ok=True)
        _setup_logging(train_dir, runtime.is_main)
    seed_everything(config.seed + runtime.rank, config.deterministic)

    # Data and model.
    spec = get_model_spec(config.model_name)
    split = resolve_split(config.dataset_name, config.dataset_dir, config.dataset_split_name)
    source = build_source(config.dataset_name, config.dataset_dir, split)
    multi_label = source.multi_label if config.multi_label is None else config.multi_label
    if multi_label != source.multi_label:
        raise ConfigError("--multi_label needs multi-label targets (VOC, a multi-label manifest or converted data)"
                          if multi_label else "this dataset has multi-label targets: drop --multi_label false")
    num_classes = _num_classes(config, source)
    latest = ckpt.latest_checkpoint(train_dir)
    if latest is not None:
        ckpt.check_same_model(latest, spec.name, num_classes)
    model = build_model(spec, num_classes, config)

    # Restore: a checkpoint in train_dir wins (resume everything); else warm-start.
    if latest is not None:
        if config.checkpoint_path:
            _say(f"Ignoring --checkpoint_path because a checkpoint already exists in {train_dir} "
                 f"(step {latest.step}); resuming from it", runtime)
        ckpt.load_weights_into(model, latest.weights)
    elif config.checkpoint_path:
        _warm_start(model, config, runtime)
    trainable = _trainable_names(model, config)
    trainable_count = apply_trainable_scopes(model, trainable, config.freeze_batch_norm)
    total_count = sum(p.numel() for p in model.parameters())
    if config.dry_run:
        _say(f"dry run: {trainable_count:,} of {total_count:,} parameters would train; nothing was trained", runtime)
        return TrainResult(train_dir, latest.step if latest else 0, latest.weights if latest else None)
    if trainable_count == 0:
        raise ConfigError(f"--trainable_scopes {config.trainable_scopes!r} leaves nothing to train")

    model.to(runtime.device)
    # channels-last is faster for these convnets on GPU and on CPU (oneDNN; depthwise backward
    # in NCHW is especially slow there).
    channels_last = config.channels_last if config.channels_last is not None else True
    if channels_last:
        model.to(memory_format=torch.channels_last)
    module: nn.Module = model
    if runtime.distributed:
        module = DistributedDataParallel(model, device_ids=[runtime.device] if runtime.device.type == "cuda" else None)

    # Input pipeline.
    image_size = config.train_image_size or spec.default_image_size
    preprocess = get_preprocessing(config.preprocessing_name or spec.preprocessing, is_training=True,
                                   use_grayscale=config.use_grayscale)
    loader = build_loader(source, preprocess, (image_size, image_size), batch_size=config.batch_size,
                          training=True, channels=spec.in_channels, num_workers=default_num_workers(config.num_workers),
                          seed=config.seed, on_bad_image=config.on_bad_image, rank=runtime.rank,
                          world_size=runtime.world_size, labels_offset=config.labels_offset,
                          pin_memory=runtime.device.type == "cuda")
    batches_per_epoch, steps_per_epoch, total_steps = _steps(config, len(source), runtime)

    # Optimizer and schedule.
    # Kernels only get decay (slim's regularizers); AdamW applies the same groups decoupled.
    groups = decay_groups(model, config.weight_decay)
    optimizer = build_optimizer(
        config.optimizer, groups, config.learning_rate, opt_epsilon=config.opt_epsilon,
        adadelta_rho=config.adadelta_rho, adagrad_initial_accumulator_value=config.adagrad_initial_accumulator_value,
        adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2,
        ftrl_learning_rate_power=config.ftrl_learning_rate_power,
        ftrl_initial_accumulator_value=config.ftrl_initial_accumulator_value, ftrl_l1=config.ftrl_l1,
        ftrl_l2=config.ftrl_l2, momentum=config.momentum, rmsprop_momentum=config.rmsprop_momentum,
        rmsprop_decay=config.rmsprop_decay)

    def rate_at(step: int) -> float:
        return learning_rate_at(step, learning_rate=config.learning_rate, decay_type=config.learning_rate_decay_type,
                                steps_per_epoch=steps_per_epoch, num_epochs_per_decay=config.num_epochs_per_decay,
                                decay_factor=config.learning_rate_decay_factor,
                                end_learning_rate=config.end_learning_rate, warmup_epochs=config.warmup_epochs,
                                total_steps=total_steps)

    step = 0
    if latest is not None:
        state = ckpt.load_state(latest)
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        _say(f"Resumed from {latest.weights.name} at step {step}", runtime)

    pos_weight = _pos_weight(config, source, num_classes) if multi_label else None
    if pos_weight is not None:
        pos_weight = pos_weight.to(runtime.device)
    class_names = source.class_names[config.labels_offset:] if not multi_label else source.class_names
    metadata = {"model_name": spec.name, "num_classes": str(num_classes), "multi_label": str(multi_label).lower(),
                "class_names": ckpt.metadata_json(class_names[:num_classes]),
                "image_size": str(image_size),
                "preprocessing": config.preprocessing_name or spec.preprocessing}
    writer = None
    if runtime.is_main:
        write_labels_file(train_dir, class_names[:num_classes])
        dump_config(config, train_dir / "config.yaml",
                    {"resolved": {"model": spec.name, "num_classes": num_classes, "multi_label": multi_label,
                                  "split": split, "num_samples": len(source), "image_size": image_size,
                                  "world_size": runtime.world_size, "total_steps": total_steps,
                                  "steps_per_epoch": steps_per_epoch, "device": str(runtime.device),
                                  "trainable_parameters": trainable_count, "parameters": total_count},
                     "versions": _versions()})
        dump_config(config, train_dir / f"config-{time.strftime('%Y%m%d-%H%M%S')}.yaml", {"versions": _versions()})
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(train_dir))
        _say(f"Training {spec.name} ({num_classes} classes, {'multi-label' if multi_label else 'single-label'}) "
             f"on {len(source)} images of split {split!r}: {trainable_count:,}/{total_count:,} parameters train; "
             f"{total_steps if total_steps is not None else 'unlimited'} steps; train_dir {train_dir}", runtime)

    def save(at_step: int) -> Path:
        saved = ckpt.save_checkpoint(train_dir, at_step, model,
                                     {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()},
                                     metadata, keep=config.keep_checkpoint_max)
        return saved.weights

    result = TrainResult(train_dir, step, latest.weights if latest else None)
    evaluator = _make_evaluator(config, spec, runtime, multi_label) if config.eval_every_n_steps else None
    progress = None
    if runtime.is_main:
        from tqdm import tqdm
        progress = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
                        disable=None)
    last_save_time = last_summary_time = time.time()
    window_start, window_images = time.time(), 0
    autocast_dtype = torch.bfloat16 if runtime.device.type == "cpu" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and runtime.device.type == "cuda")
    module.train()
    try:
        while total_steps is None or step < total_steps:
            epoch, start_batch = divmod(step, batches_per_epoch)
            set_loader_epoch(loader, epoch, start_batch)
            step_at_epoch_start = step
            for batch_number, batch in enumerate(loader, start=start_batch):
                if batch_number >= batches_per_epoch or (total_steps is not None and step >= total_steps):
                    break
                if batch.bad:
                    result.skipped_images += len(batch.bad)
                    for description in batch.bad:
                        log.warning("skipped unreadable image %s", description)
                if len(batch) == 0:
                    continue
                images = batch.images.to(runtime.device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                targets = batch.targets.to(runtime.device, non_blocking=True)
                rate = rate_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = rate
                if hasattr(model, "set_training_step"):
                    model.set_training_step(step)  # NASNet's drop path grows with training progress
                with torch.autocast(runtime.device.type, dtype=autocast_dtype, enabled=config.amp):
                    logits, end_points = _forward(module, images)
                    aux = end_points.get("AuxLogits") if isinstance(end_points, dict) else None
                    if multi_label:
                        loss = sigmoid_loss(logits.float(), targets, pos_weight,
                                            aux.float() if aux is not None else None)
                    else:
                        loss = softmax_loss(logits.float(), targets, config.label_smoothing,
                                            aux.float() if aux is not None else None)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                window_images += len(batch) * runtime.world_size
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower --learning_rate")

                if step % config.log_every_n_steps == 0 or step == total_steps:
                    stats = torch.stack([loss.detach().float(), batch_accuracy(logits.float(), targets, multi_label)])
                    stats = all_reduce_sum(stats, runtime) / runtime.world_size
                    loss_value, accuracy = float(stats[0]), float(stats[1])
                    elapsed = max(time.time() - window_start, 1e-9)
                    speed = window_images / elapsed
                    window_start, window_images = time.time(), 0
                    result.last_loss = loss_value
                    result.history.append({"step": step, "loss": loss_value, "accuracy": accuracy, "lr": rate})
                    if runtime.is_main:
                        writer.add_scalar("losses/total_loss", loss_value, step)
                        writer.add_scalar("learning_rate", rate, step)
                        writer.add_scalar("train/accuracy", accuracy, step)
                        writer.add_scalar("train/images_per_sec", speed, step)
                        log.info("step %d: loss %.4f, accuracy %.3f, lr %.3g, %.1f images/s",
                                 step, loss_value, accuracy, rate, speed)
                        progress.set_postfix(loss=f"{loss_value:.4f}", acc=f"{accuracy:.3f}", lr=f"{rate:.2g}",
                                             img_s=f"{speed:.0f}")
                if progress is not None:
                    progress.update(1)
                now = time.time()
                if runtime.is_main and (now - last_summary_time >= config.save_summaries_secs or step == 1):
                    _summaries(writer, model, images, step)
                    last_summary_time = now
                due_by_steps = config.save_every_n_steps and step % config.save_every_n_steps == 0
                if runtime.is_main and (due_by_steps or now - last_save_time >= config.save_interval_secs):
                    result.checkpoint = save(step)
                    last_save_time = now
                if evaluator is not None and step % config.eval_every_n_steps == 0:
                    evaluator(model, step, writer)
                    module.train()
            if step == step_at_epoch_start:
                raise DataError(f"a whole epoch gave no readable image ({result.skipped_images} skipped); "
                                f"check the dataset")
    except KeyboardInterrupt:
        if runtime.is_main:
            result.checkpoint = save(step)
            _say(f"\nInterrupted: saved {result.checkpoint.name} at step {step}; run the same command to resume",
                 runtime)
        raise
    finally:
        if progress is not None:
            progress.close()
    if runtime.is_main:
        if result.checkpoint is None or ckpt.latest_checkpoint(train_dir).step != step:
            result.checkpoint = save(step)
        if evaluator is not None and step % config.eval_every_n_steps != 0:
            evaluator(model, step, writer)
        writer.close()
        if result.skipped_images:
            _say(f"{result.skipped_images} unreadable images were skipped (see {train_dir / 'train.log'})", runtime)
        _say(f"Finished at step {step}: {result.checkpoint}", runtime)
    result.step = step
    return result


def _forward(module: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits and end points; plain modules without forward_endpoints give no end points."""
    target = module.module if isinstance(module, DistributedDataParallel) else module
    if hasattr(target, "forward_endpoints") and not isinstance(module, DistributedDataParallel):
        return target.forward_endpoints(images)
    return module(images), {}


def _make_evaluator(config: TrainConfig, spec: ModelSpec, runtime: Runtime, multi_label: bool):
    """An in-training evaluation on --eval_split_name, logged to TensorBoard under eval/."""
    from ..evaluate.run import evaluate_model

    split = config.eval_split_name or resolve_split(config.dataset_name, config.dataset_dir, "auto")
    source = build_source(config.dataset_name, config.dataset_dir, split)

    def run(model: nn.Module, step: int, writer: Any) -> None:
        if not runtime.is_main:
            return
        results = evaluate_model(model, source, spec, preprocessing_name=config.preprocessing_name,
                                 image_size=config.train_image_size, batch_size=config.batch_size,
                                 device=runtime.device, multi_label=multi_label,
                                 num_workers=default_num_workers(config.num_workers),
                                 labels_offset=config.labels_offset, use_grayscale=config.use_grayscale)
        for key in ("Accuracy", "Recall_5", "mAP", "mAP_voc07"):
            if key in results:
                writer.add_scalar(f"eval/{key}", results[key], step)
        headline = {k: round(float(results[k]), 4) for k in ("Accuracy", "Recall_5", "mAP") if k in results}
        _say(f"eval at step {step} on {split!r}: {headline}", runtime)

    return run
