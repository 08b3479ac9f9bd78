"""`slimtune train`: the whole training run, readable top to bottom.

Order of business: resolve data and model -> restore (resume from train_dir, else warm start from
--checkpoint_path) -> freeze what should not train -> optimizer and schedule -> loop over steps
(forward, loss, backward, update; log, summarize, evaluate, save) -> final checkpoint.
A run killed at any point resumes from its last checkpoint when the same command runs again.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import platform
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import __version__
from ..config import TrainConfig, config_to_dict, dump_config
from ..data import build_source, resolve_split
from ..data.base import ImageSource, holdout_split
from ..data.labels import write_labels_file
from ..data.loader import build_loader, set_loader_epoch
from ..errors import ConfigError, DataError, TrainingDiverged
from ..nets.registry import ModelSpec, get_model_spec
from ..preprocessing import get_preprocessing
from ..checkpoint import train_dir as ckpt
from .distributed import (agree_on_setup, check_even_epoch, epoch_samples, lost_ranks_error, looks_like_lost_rank,
                          rank0_then_wait, resume_batch_size, run_shape, unused_parameters, unused_parameters_error,
                          wrap_ddp)
from .freeze import apply_trainable_scopes, decay_groups, freeze_aux_head
from .ema import WeightAverage
from .mechanics import autocast_dtype, check_compiler, clip_gradients, loss_shares, micro_batch_groups
from .rates import ResolvedRates, resolve_rates
from .losses import aux_logits_of, batch_accuracy, sigmoid_loss, softmax_loss
from .optimizers import build_optimizer
from ..runtime import Runtime, all_reduce_sum, default_num_workers, seed_everything, setup_runtime, teardown_runtime
from .schedules import learning_rate_at
from .signals import StopRequests, TrainingInterrupted, signal_name

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
    if classes == 1 and not source.multi_label:
        names = list(source.class_names[config.labels_offset:])[:1]
        raise DataError(f"the dataset has one class ({', '.join(map(str, names)) or '?'}): a single-label "
                        f"classifier needs at least two; add a folder of another class (or use --multi_label "
                        f"targets for yes/no per class)")
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
    from .dry_run import restore_and_report

    return restore_and_report(model, config, say=lambda message: _say(message, runtime), is_main=runtime.is_main)


def _trainable_names(model: nn.Module, config: TrainConfig) -> Optional[set[str]]:
    if not config.trainable_scopes:
        return None
    from ..checkpoint.scopes import select_params

    # The raw text goes in so that errors quote the scope as the user spelled it.
    return set(select_params(model, config.trainable_scopes))


def _steps(config: TrainConfig, num_samples: int, runtime: Runtime,
           samples_per_epoch: Optional[int] = None) -> tuple[int, float, Optional[int]]:
    """(batches per epoch per process, steps per epoch for schedules, total steps or None).

    `samples_per_epoch` (default: all images less the remainder that would leave ranks uneven) is
    the run's, kept when it resumes at another world size so that epochs keep their steps.
    """
    global_batch = config.batch_size * runtime.world_size
    if num_samples < global_batch:
        raise DataError(f"the split has {num_samples} images, fewer than one batch of {global_batch}; "
                        f"lower --batch_size")
    # Every image each epoch: the last, partial batch is kept (under DDP each rank gets the same
    # number of images, so at most world_size - 1 are left out of an epoch).
    if samples_per_epoch is None:
        samples_per_epoch = epoch_samples(num_samples, runtime.world_size)
    batches_per_epoch = math.ceil(samples_per_epoch / global_batch)
    # With --accumulate_steps N an optimizer step takes N batches: the schedule, --num_epochs and
    # --max_number_of_steps count optimizer steps (a step of N x B images, as one batch of N x B).
    steps_per_epoch = float(math.ceil(batches_per_epoch / config.accumulate_steps))
    if config.max_number_of_steps is not None:
        total = config.max_number_of_steps
    elif config.num_epochs is not None:
        total = math.ceil(config.num_epochs * steps_per_epoch)
    else:
        total = None
    if total is not None:
        total += _head_steps(config, steps_per_epoch)  # the main schedule counts after the head phase
    return batches_per_epoch, steps_per_epoch, total


def _apply_trainable(model: nn.Module, trainable: Optional[set[str]], config: TrainConfig) -> tuple[int, int]:
    """Freeze all but `trainable` (apply_trainable_scopes), then an aux head no loss reaches
    (--aux_loss_weight 0: DDP must not wait for its gradients), at the start and at the --head_epochs
    switch alike; returns (trainable parameter count, aux-head tensors frozen)."""
    trainable_count = apply_trainable_scopes(model, trainable, config.freeze_batch_norm)
    frozen_aux = freeze_aux_head(model) if not config.aux_loss_weight else 0
    if frozen_aux:
        trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable_count, frozen_aux


def _head_steps(config: TrainConfig, steps_per_epoch: float) -> int:
    """Optimizer steps of the --head_epochs phase (0 without it)."""
    return math.ceil(config.head_epochs * steps_per_epoch) if config.head_epochs else 0


def _phase_trainable(model: nn.Module, config: TrainConfig, rates: Optional[ResolvedRates],
                     head_phase: bool) -> tuple[Optional[set[str]], Optional[dict[str, float]]]:
    """(trainable names or None for all, learning-rate multipliers or None) of a phase.

    The head phase of --head_epochs trains the classifier heads the registry marks, at one rate;
    the main phase trains --trainable_scopes less what a multiplier of 0 freezes.
    """
    if head_phase:
        from ..checkpoint.scopes import expand_heads, select_params

        heads = expand_heads("heads", model)
        if not heads:
            raise ConfigError(f"--head_epochs: {getattr(model, 'spec', None) and model.spec.name or 'this net'} "
                              f"marks no classifier heads; use --trainable_scopes in a first run instead")
        return set(select_params(model, heads, flag="--head_epochs")), None
    trainable = _trainable_names(model, config)
    if rates is None:
        return trainable, None
    return rates.restrict(trainable), rates.multipliers


def _runner(model: nn.Module, runtime: Runtime, config: TrainConfig) -> tuple[nn.Module, Optional[nn.Module]]:
    """(the module the loop runs, its torch.compile'd forward or None): the model itself, or under DDP
    a wrapper over its trainable tensors (built again when --head_epochs changes what trains: DDP
    only reduces what trained when it was made)."""
    module: nn.Module = model
    if runtime.distributed:
        # DDP wraps a module whose forward is forward_endpoints: the same forward, end points (aux
        # heads) included, as a single process runs, and DDP's gradient hooks see all of it.
        module = wrap_ddp(_EndpointsForward(model), runtime, config.find_unused_parameters, config.bucket_cap_mb)
    compiled = None
    if config.compile:
        # forward_endpoints is what a step calls, so that (or DDP's forward, which calls it) is compiled.
        compiled = torch.compile(module if runtime.distributed else _EndpointsForward(model))
    return module, compiled


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
    runtime = setup_runtime(config.device, config.distributed_timeout)
    try:
        return _train(config, runtime)
    except Exception as error:
        if runtime.distributed and not runtime.prepared:
            # This rank failed while preparing: tell the others (waiting in agree_on_setup), so
            # that every rank stops with the same line instead of waiting for this one.
            try:
                settled = agree_on_setup(runtime, error)
            except Exception:  # noqa: BLE001  (the others are gone too: this rank's own error is the news)
                raise error from None
            if settled is not error:
                raise settled from None
        elif runtime.distributed and looks_like_lost_rank(error):
            raise lost_ranks_error(error, runtime, config.distributed_timeout, runtime.step) from None
        raise
    finally:
        teardown_runtime(runtime)


def _train(config: TrainConfig, runtime: Runtime) -> TrainResult:
    train_dir = Path(config.train_dir)
    # Settings this device cannot run are refused before anything is written (fp16 on a CPU).
    precision = autocast_dtype(config.precision, config.amp, runtime.device)
    if config.compile:
        check_compiler(runtime.device)
    if runtime.is_main and not config.dry_run:  # a dry run creates nothing
        train_dir.mkdir(parents=True, exist_ok=True)
        _setup_logging(train_dir, runtime.is_main)
    seed_everything(config.seed + runtime.rank, config.deterministic, runtime.device)

    # Data and model.
    spec = get_model_spec(config.model_name)
    split = resolve_split(config.dataset_name, config.dataset_dir, config.dataset_split_name)
    source = build_source(config.dataset_name, config.dataset_dir, split, multi_label=config.multi_label)
    multi_label = source.multi_label if config.multi_label is None else config.multi_label
    if multi_label != source.multi_label:
        raise ConfigError("--multi_label needs multi-label targets (VOC, a multi-label manifest or converted data)"
                          if multi_label else "this dataset has multi-label targets: drop --multi_label false")
    num_classes = _num_classes(config, source)
    held_out = None
    if config.validation_fraction:
        if not isinstance(source, ImageSource):
            raise ConfigError("--validation_fraction needs a dataset with random access (image folder, manifest, "
                              "VOC, .npz); TFRecord shards: convert a validation split with `slimtune data convert`")
        source, held_out = holdout_split(source, config.validation_fraction, seed=config.seed)
        if len(held_out) == 0:
            raise ConfigError(f"--validation_fraction {config.validation_fraction:g} of {len(source)} images holds "
                              f"out none; raise it")
    latest = ckpt.latest_checkpoint(train_dir)
    state: dict[str, Any] = {}
    samples_per_epoch = epoch_samples(len(source), runtime.world_size)
    if latest is not None:
        ckpt.check_same_model(latest, spec.name, num_classes)
        state = ckpt.load_state(latest)
        shape = run_shape(state)
        if shape is not None:
            # The run's global batch and epoch stay what they were, whatever the world size now.
            batch_size, why = resume_batch_size(shape, config.batch_size, runtime.world_size, train_dir)
            if why:
                _say(why, runtime)
                config = dataclasses.replace(config, batch_size=batch_size)
            samples_per_epoch = min(shape[2], len(source))
            check_even_epoch(samples_per_epoch, config.batch_size, runtime.world_size)
    model = build_model(spec, num_classes, config)

    # Restore: a checkpoint in train_dir wins (resume everything); else warm-start.
    plan = None
    if latest is not None:
        if config.checkpoint_path:
            _say(f"Ignoring --checkpoint_path because a checkpoint already exists in {train_dir} "
                 f"(step {latest.step}); resuming from it", runtime)
        ckpt.load_weights_into(model, latest.weights)
    elif config.checkpoint_path:
        plan = _warm_start(model, config, runtime)
    if config.head_learning_rate is not None and not config.head_epochs:
        raise ConfigError("--head_learning_rate is the rate of the --head_epochs phase: add --head_epochs K "
                          "(or drop it)")
    rates = resolve_rates(model, config.learning_rate_multipliers, config.layer_decay, config.learning_rate, spec)
    head_steps = _head_steps(config, _steps(config, len(source), runtime, samples_per_epoch)[1]) if config.head_epochs else 0
    head_phase = (latest.step if latest is not None else 0) < head_steps
    main_trainable, _ = _phase_trainable(model, config, rates, head_phase=False)
    if rates is not None and main_trainable is not None and not main_trainable:
        raise ConfigError(f"--trainable_scopes {config.trainable_scopes!r} with --learning_rate_multipliers "
                          f"{config.learning_rate_multipliers!r} leave nothing to train")
    if rates is not None:
        # The table describes the main phase (the head phase trains the heads at one rate).
        rates.mark_frozen(main_trainable)
        _say(rates.format(), runtime)
        if plan is not None and runtime.is_main and not config.dry_run:
            from .dry_run import RESTORE_PLAN_FILENAME

            with open(train_dir / RESTORE_PLAN_FILENAME, "a", encoding="utf-8") as handle:
                handle.write("\n" + rates.format() + "\n")
    trainable, multipliers = _phase_trainable(model, config, rates, head_phase)
    trainable_count, frozen_aux = _apply_trainable(model, trainable, config)
    if frozen_aux:
        _say(f"--aux_loss_weight 0: the auxiliary head's {frozen_aux} tensors are frozen", runtime)
    total_count = sum(p.numel() for p in model.parameters())
    if config.dry_run:
        from .dry_run import finish_dry_run

        finish_dry_run(config, plan, trainable_count, total_count, say=lambda message: _say(message, runtime),
                       resolved={"model": spec.name, "num_classes": num_classes, "multi_label": multi_label,
                                 "split": split, "num_samples": len(source),
                                 "image_size": config.train_image_size or spec.default_image_size,
                                 "preprocessing": config.preprocessing_name or spec.preprocessing,
                                 "total_steps": _steps(config, len(source), runtime, samples_per_epoch)[2],
                                 **({"head_steps": head_steps} if head_steps else {}),
                                 **({"learning_rates": rates.as_list()} if rates is not None else {}),
                                 "resume_from": str(latest.weights) if latest else None})
        return TrainResult(train_dir, latest.step if latest else 0, latest.weights if latest else None)
    if trainable_count == 0:
        raise ConfigError(f"--trainable_scopes {config.trainable_scopes!r} leaves nothing to train")

    model.to(runtime.device)
    # channels-last is faster for these convnets on GPU and on CPU (oneDNN; depthwise backward
    # in NCHW is especially slow there).
    channels_last = config.channels_last if config.channels_last is not None else True
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if config.sync_batch_norm and runtime.distributed:
        _enable_sync_batch_norm(model, runtime)

    # Input pipeline.
    image_size = config.train_image_size or spec.default_image_size
    preprocess = get_preprocessing(config.preprocessing_name or spec.preprocessing, is_training=True,
                                   use_grayscale=config.use_grayscale)
    loader = build_loader(source, preprocess, (image_size, image_size), batch_size=config.batch_size,
                          training=True, channels=spec.in_channels, num_workers=default_num_workers(config.num_workers),
                          seed=config.seed, on_bad_image=config.on_bad_image, rank=runtime.rank,
                          world_size=runtime.world_size, labels_offset=config.labels_offset,
                          pin_memory=runtime.device.type == "cuda", drop_last=False,
                          epoch_size=samples_per_epoch)
    batches_per_epoch, steps_per_epoch, total_steps = _steps(config, len(source), runtime, samples_per_epoch)

    # Optimizer and schedule.
    # Kernels only get decay (slim's regularizers); AdamW applies the same groups decoupled.
    groups = decay_groups(model, config.weight_decay, multipliers)
    optimizer = build_optimizer(config.optimizer, groups, config.learning_rate, config)
    # Each group's share of the scheduled rate (--learning_rate_multipliers x --layer_decay), kept
    # here: a restored optimizer state brings back the saved groups' settings, not this run's.
    group_multipliers = [group.get("lr_multiplier", 1.0) for group in groups]

    def rate_at(step: int) -> float:
        if step < head_steps:  # the --head_epochs phase: one fixed rate
            return config.head_learning_rate or config.learning_rate
        # The main schedule starts when the head phase ends, as it would in a second run.
        return learning_rate_at(step - head_steps, learning_rate=config.learning_rate,
                                decay_type=config.learning_rate_decay_type, steps_per_epoch=steps_per_epoch,
                                num_epochs_per_decay=config.num_epochs_per_decay,
                                decay_factor=config.learning_rate_decay_factor,
                                end_learning_rate=config.end_learning_rate, warmup_epochs=config.warmup_epochs,
                                total_steps=None if total_steps is None else total_steps - head_steps)

    step = 0
    averages = WeightAverage(model, config.moving_average_decay) if config.moving_average_decay and \
        runtime.is_main else None
    if latest is not None:
        if averages is not None and latest.averages is not None:
            from safetensors.torch import load_file

            averages.load(load_file(str(latest.averages), device=str(runtime.device)))
        elif averages is not None:
            _say(f"{latest.weights.name} has no moving averages: they start from its weights", runtime)
        elif latest.averages is not None and runtime.is_main:
            _say(f"Not keeping the moving averages of {latest.weights.name} (no --moving_average_decay)", runtime)
        step = int(state["step"])
        _set_rng_state(state, runtime)
        restored, why = _restore_optimizer(optimizer, state, config, model)
        if not restored and head_steps and step == head_steps:
            why = "the head phase of --head_epochs ended here; the whole net trains from now on"
        _say(f"Resumed from {latest.weights.name} at step {step}" +
             (f" (head phase of --head_epochs, {head_steps} steps)" if head_phase else "") +
             ("" if restored else f"; the optimizer state starts fresh ({why})"), runtime)
        _say_changed_settings(train_dir, config, runtime)
        if total_steps is not None and step >= total_steps:
            _say(f"{train_dir} is already at step {step}, the last step of this run (of {total_steps}): nothing to "
                 f"train; raise --max_number_of_steps / --num_epochs to train further", runtime)
            return TrainResult(train_dir, step, latest.weights)

    pos_weight = _pos_weight(config, source, num_classes) if multi_label else None
    if pos_weight is not None:
        pos_weight = pos_weight.to(runtime.device)
    class_names = source.class_names[config.labels_offset:] if not multi_label else source.class_names
    metadata = {"model_name": spec.name, "num_classes": str(num_classes), "multi_label": str(multi_label).lower(),
                # How to rebuild the net: eval/predict/features need only the checkpoint (custom nets too).
                "model": _rebuild_spec(config.model_name), "model_kwargs": ckpt.metadata_json(
                    {"image_size": config.train_image_size} if config.train_image_size else {}),
                "class_names": ckpt.metadata_json(class_names[:num_classes]),
                "image_size": str(image_size),
                "preprocessing": config.preprocessing_name or spec.preprocessing}
    writer = None
    if runtime.is_main:
        write_labels_file(train_dir, class_names[:num_classes])
        run_record = dict(
                    {"resolved": {"model": spec.name, "num_classes": num_classes, "multi_label": multi_label,
                                  "split": split, "num_samples": len(source), "image_size": image_size,
                                  "world_size": runtime.world_size, "total_steps": total_steps,
                                  "steps_per_epoch": steps_per_epoch, "batches_per_epoch": batches_per_epoch,
                                  "epochs": (total_steps / steps_per_epoch) if total_steps is not None else None,
                                  "device": str(runtime.device),
                                  "trainable_parameters": trainable_count, "parameters": total_count,
                                  **({"head_steps": head_steps} if head_steps else {}),
                                  **({"learning_rates": rates.as_list()} if rates is not None else {})},
                     "versions": _versions()})
        dump_config(config, train_dir / f"config-{time.strftime('%Y%m%d-%H%M%S')}.yaml", {"versions": _versions()})
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(train_dir))
        _say(f"Training {spec.name} ({num_classes} classes, {'multi-label' if multi_label else 'single-label'}) "
             f"on {len(source)} images of split {split!r}: {trainable_count:,}/{total_count:,} parameters train; "
             f"{total_steps if total_steps is not None else 'unlimited'} steps; train_dir {train_dir}", runtime)

    config_saved = False

    def save(at_step: int) -> Path:
        # Called between steps only: the RNG state saved is the one the next step starts from.
        nonlocal config_saved
        saved = ckpt.save_checkpoint(train_dir, at_step, model,
                                     {"optimizer": optimizer.state_dict(), **_rng_state(runtime),
                                      "optimizer_name": config.optimizer,
                                      # The run's shape, kept when it resumes at another world size.
                                      "world_size": runtime.world_size, "batch_size": config.batch_size,
                                      "epoch_samples": samples_per_epoch,
                                      "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)},
                                     metadata, keep=config.keep_checkpoint_max,
                                     averages=averages.averaged_state(model) if averages is not None else None)
        if not config_saved:
            # config.yaml describes the run that wrote the checkpoints: written once this run has
            # saved one, so a run that fails earlier leaves the last good run's config in place.
            _write_config_atomically(config, train_dir / "config.yaml", run_record)
            config_saved = True
        return saved.weights

    result = TrainResult(train_dir, step, latest.weights if latest else None)
    evaluator = (_make_evaluator(config, spec, runtime, multi_label, split, held_out, source)
                 if config.eval_every_n_steps else None)
    progress = None
    if runtime.is_main:
        from tqdm import tqdm
        progress = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
                        disable=None)
    last_save_time = last_summary_time = time.time()
    window_start, window_images = time.time(), 0
    # float16 needs loss scaling (its range is narrow); bfloat16 has float32's range and needs none.
    scaler = torch.amp.GradScaler("cuda", enabled=precision == torch.float16)
    trainable_parameters = [p for p in model.parameters() if p.requires_grad]
    accumulate = config.accumulate_steps
    # The first step whose loss was not finite, kept on the device: checking it every step would
    # wait for the GPU every step; it is read at the log interval and before each save.
    first_bad_step = torch.zeros((), dtype=torch.long, device=runtime.device)
    step_lines = runtime.is_main and not sys.stderr.isatty()  # nohup, SLURM, notebooks: slim's step lines
    # SIGINT/SIGTERM/SIGHUP raise a flag that is acted on between steps (nothing is printed from
    # the handler itself: it may interrupt a write to stderr).
    stop = StopRequests()
    checked_unused = False
    # Every rank prepared: from here on they meet in collectives (DDP's first is in its constructor).
    settled = agree_on_setup(runtime, None)
    runtime.prepared = True  # (also when another rank failed: the agreement is over either way)
    if settled is not None:
        raise settled
    module, compiled = _runner(model, runtime, config)
    module.train()
    stop.install()
    try:
        while total_steps is None or step < total_steps:
            # An optimizer step takes `accumulate` consecutive batches of the epoch (fewer at its end).
            epoch, step_in_epoch = divmod(step, int(steps_per_epoch))
            start_batch = step_in_epoch * accumulate
            set_loader_epoch(loader, epoch, start_batch)
            step_at_epoch_start = step
            for micro in micro_batch_groups(itertools.islice(loader, max(batches_per_epoch - start_batch, 0)),
                                            accumulate):
                if total_steps is not None and step >= total_steps:
                    break
                for batch in micro:
                    if batch.bad:
                        result.skipped_images += len(batch.bad)
                        for description in batch.bad:
                            log.warning("skipped unreadable image %s", description)
                micro = [batch for batch in micro if len(batch)]
                if not micro:
                    continue
                if head_phase and step >= head_steps:
                    # Phase 2 of --head_epochs: the whole net (as configured), a fresh optimizer.
                    head_phase = False
                    trainable, multipliers = _phase_trainable(model, config, rates, head_phase=False)
                    trainable_count, _ = _apply_trainable(model, trainable, config)
                    groups = decay_groups(model, config.weight_decay, multipliers)
                    optimizer = build_optimizer(config.optimizer, groups, config.learning_rate, config)
                    group_multipliers = [group.get("lr_multiplier", 1.0) for group in groups]
                    trainable_parameters = [p for p in model.parameters() if p.requires_grad]
                    if averages is not None:
                        averages.track_new(model)  # the body's averages start from its weights now
                    module, compiled = _runner(model, runtime, config)
                    checked_unused = False
                    module.train()
                    _say(f"Head phase done at step {step}: {trainable_count:,}/{total_count:,} parameters train "
                         f"from now on", runtime)
                rate = rate_at(step)
                for group, multiplier in zip(optimizer.param_groups, group_multipliers, strict=True):
                    group["lr"] = rate * multiplier
                if hasattr(model, "set_training_step"):
                    model.set_training_step(step)  # NASNet's drop path grows with training progress
                optimizer.zero_grad(set_to_none=True)
                # Each micro-batch's mean loss, weighted by its share of the step's images: the summed
                # gradients are those of one batch of all of them (weight 1.0 without accumulation).
                shares = loss_shares([batch.targets for batch in micro], multi_label)
                loss = accuracy_sum = torch.zeros((), device=runtime.device)
                for index, (batch, share) in enumerate(zip(micro, shares)):
                    images = batch.images.to(runtime.device, non_blocking=True)
                    if channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    targets = batch.targets.to(runtime.device, non_blocking=True)
                    # Under DDP the gradients are all-reduced once, with the last micro-batch's backward.
                    syncing = module.no_sync() if runtime.distributed and index < len(micro) - 1 else nullcontext()
                    with syncing:
                        with torch.autocast(runtime.device.type, dtype=precision or torch.float32,
                                            enabled=precision is not None):
                            logits, end_points = compiled(images) if compiled is not None else \
                                _forward(module, images)
                            aux = aux_logits_of(end_points, config.aux_loss_weight)
                            if multi_label:
                                micro_loss = sigmoid_loss(logits.float(), targets, pos_weight,
                                                          aux.float() if aux is not None else None,
                                                          config.aux_loss_weight)
                            else:
                                micro_loss = softmax_loss(logits.float(), targets, config.label_smoothing,
                                                          aux.float() if aux is not None else None,
                                                          config.aux_loss_weight)
                        scaler.scale(micro_loss * share).backward()
                    loss = loss + micro_loss.detach() * share
                    accuracy_sum = accuracy_sum + batch_accuracy(logits.detach().float(), targets, multi_label) * share
                if not checked_unused and runtime.distributed and not config.find_unused_parameters:
                    # Checked once, before the update: DDP would fail at the next step, and the
                    # tensors sharing a bucket with them were not averaged in this one.
                    checked_unused = True
                    unused = unused_parameters(model)
                    if unused:
                        raise unused_parameters_error(unused)
                if config.clip_gradient_norm:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                    clip_gradients(trainable_parameters, config.clip_gradient_norm, config.clip_gradient_mode)
                scaler.step(optimizer)
                scaler.update()
                if averages is not None:
                    averages.update(model, step)  # TF's num_updates: the global step before this one
                step += 1
                runtime.step = step
                window_images += sum(len(batch) for batch in micro) * runtime.world_size
                first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(loss.detach()),
                                             torch.full_like(first_bad_step, step), first_bad_step)

                if step % config.log_every_n_steps == 0 or step == total_steps:
                    _check_finite(first_bad_step, runtime, config, collective=True)
                    stats = torch.stack([loss.detach().float(), accuracy_sum.float()])
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
                        if step_lines:
                            print(f"step {step}: loss {loss_value:.4f}, accuracy {accuracy:.3f}, "
                                  f"{speed:.1f} images/s, lr {rate:.3g}", file=sys.stderr, flush=True)
                if progress is not None:
                    progress.update(1)
                now = time.time()
                if runtime.is_main and (now - last_summary_time >= config.save_summaries_secs or step == 1):
                    _summaries(writer, model, images, step)
                    last_summary_time = now
                due_by_steps = config.save_every_n_steps and step % config.save_every_n_steps == 0
                if _save_due(bool(due_by_steps), now - last_save_time >= config.save_interval_secs, step, config,
                             runtime):
                    # Never save weights gone to NaN; under DDP every rank stops together.
                    _check_finite(first_bad_step, runtime, config, collective=True)
                    if runtime.is_main:
                        result.checkpoint = save(step)
                    rank0_then_wait(runtime)
                    last_save_time = now
                if evaluator is not None and step % config.eval_every_n_steps == 0:
                    evaluator(averages.averaged_model(model) if averages else model, step, writer)
                    module.train()
                if _stop_now(stop, step, config, runtime) and step != total_steps:
                    _check_finite(first_bad_step, runtime, config)
                    raise TrainingInterrupted(stop.signum or signal.SIGINT)
            if step == step_at_epoch_start:
                raise DataError(f"a whole epoch gave no readable image ({result.skipped_images} skipped); "
                                f"check the dataset")
    except TrainingInterrupted as interrupted:
        if runtime.is_main and not interrupted.immediate:
            # A stop request seen between steps: save that boundary.
            result.checkpoint = save(step)
            _say(f"Interrupted by {signal_name(interrupted.signum)}: saved {result.checkpoint.name} at step "
                 f"{step}; run the same command to resume", runtime)
        if not interrupted.immediate:
            rank0_then_wait(runtime)  # no rank exits (and makes torchrun stop rank 0) mid-save
        elif runtime.is_main:
            _say(f"Stopped by a second {signal_name(interrupted.signum)} without saving; the last checkpoint "
                 f"({_latest_name(train_dir)}) is intact; run the same command to resume from it", runtime)
        raise
    finally:
        stop.restore()
        if progress is not None:
            progress.close()
    if runtime.is_main:
        _check_finite(first_bad_step, runtime, config)
        if result.checkpoint is None or ckpt.latest_checkpoint(train_dir).step != step:
            result.checkpoint = save(step)
    rank0_then_wait(runtime)
    if runtime.is_main:
        if evaluator is not None and step % config.eval_every_n_steps != 0:
            evaluator(averages.averaged_model(model) if averages else model, step, writer)
        writer.close()
        if result.skipped_images:
            _say(f"{result.skipped_images} unreadable images were skipped (see {train_dir / 'train.log'})", runtime)
        _say(f"Finished at step {step}: {result.checkpoint}", runtime)
    result.step = step
    return result


def _save_due(by_steps: bool, by_time: bool, step: int, config: TrainConfig, runtime: Runtime) -> bool:
    """Whether to save now. Alone: by steps or by rank 0's clock. Under DDP the decision is shared
    (rank 0 saves while the others wait for it): the clock is read at the log interval, where the
    ranks meet anyway, so it costs no extra synchronization per step."""
    if not runtime.distributed:
        return by_steps or by_time
    if by_steps:
        return True
    if step % config.log_every_n_steps:
        return False
    flag = torch.tensor(1 if (by_time and runtime.is_main) else 0, device=runtime.device)
    return bool(all_reduce_sum(flag, runtime))


def _enable_sync_batch_norm(model: nn.Module, runtime: Runtime) -> None:
    """--sync_batch_norm: slimtune's BatchNorm layers share statistics over all ranks; torch's own
    (in a user's net) become torch.nn.SyncBatchNorm, which runs on CUDA only."""
    from ..nets.sync_batch_norm import enable_sync_batch_norm, torch_batch_norms

    own = enable_sync_batch_norm(model)
    foreign = torch_batch_norms(model)
    if foreign and runtime.device.type != "cuda":
        raise ConfigError(f"--sync_batch_norm: {len(foreign)} torch.nn BatchNorm layers ({foreign[0]}, ...) "
                          f"synchronize on CUDA only; build the net with slimtune.nets.layers.BatchNorm, or drop "
                          f"--sync_batch_norm")
    if foreign:
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(module, child_name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    if not own and not foreign:
        _say("--sync_batch_norm: the net has no BatchNorm layer; nothing to synchronize", runtime)


def _rebuild_spec(model_name: str) -> str:
    """--model_name as it can be given again from anywhere: a file path made absolute."""
    location, sep, function = model_name.rpartition(":")
    if sep and (location.endswith(".py") or "/" in location or "\\" in location):
        return f"{Path(location).expanduser().resolve()}:{function}"
    return model_name


def _write_config_atomically(config: TrainConfig, path: Path, extra: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    dump_config(config, temporary, extra)
    temporary.replace(path)


def _restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any], config: TrainConfig,
                       model: nn.Module) -> tuple[bool, str]:
    """Load the saved optimizer state when it belongs to this optimizer and these trainable tensors.

    A rerun with another --optimizer or other --trainable_scopes (phase 2 of a two-phase recipe)
    keeps the weights and the step and starts the optimizer fresh; returns (restored, why not).
    """
    saved_name = state.get("optimizer_name")
    if saved_name is not None and saved_name != config.optimizer:
        return False, f"it was {saved_name}, now {config.optimizer}"
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    saved_trainable = state.get("trainable")
    if saved_trainable is not None and list(saved_trainable) != trainable:
        return False, (f"the trainable tensors changed: {len(saved_trainable)} before, {len(trainable)} now "
                       f"(--trainable_scopes)")
    before = optimizer.state_dict()
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError, RuntimeError, TypeError) as error:
        optimizer.load_state_dict(before)
        return False, f"the saved state does not fit this optimizer: {str(error).splitlines()[0][:120]}"
    return True, ""


# Settings whose change between runs is expected (how far to train, where to log) or not a setting.
_NOT_COMPARED = {"config", "max_number_of_steps", "num_epochs", "dry_run", "checkpoint_path", "device",
                 "num_workers", "log_every_n_steps", "save_interval_secs", "save_summaries_secs",
                 "save_every_n_steps", "eval_every_n_steps", "keep_checkpoint_max"}


def _say_changed_settings(train_dir: Path, config: TrainConfig, runtime: Runtime) -> None:
    """One line listing the settings that differ from the run that wrote train_dir's config.yaml."""
    import yaml

    try:
        saved = yaml.safe_load((train_dir / "config.yaml").read_text(encoding="utf-8")).get("settings", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return
    current = config_to_dict(config)
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in current.items()
               if k in saved and k not in _NOT_COMPARED and saved[k] != v
               and not (isinstance(v, list) and list(saved[k] or []) == v)]
    if changed:
        _say(f"Settings changed since the run that saved this train_dir: {', '.join(changed)}", runtime)


def _rng_state(runtime: Runtime) -> dict[str, Any]:
    """The RNG state of a step boundary: CPU, and the run's CUDA device when it uses one."""
    state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(runtime.device)
    return state


def _set_rng_state(state: dict[str, Any], runtime: Runtime) -> None:
    torch.set_rng_state(state["torch_rng"])
    if runtime.device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], runtime.device)


def _check_finite(first_bad_step: torch.Tensor, runtime: Runtime, config: TrainConfig,
                  collective: bool = False) -> None:
    """Stop with one line naming the first step whose loss was NaN or infinite (one host sync).

    `collective` (every process calls it at the same step) makes all processes stop together.
    """
    bad = first_bad_step
    if collective and runtime.distributed:
        bad = first_bad_step.clone()
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    bad_step = int(bad)
    if bad_step:
        raise TrainingDiverged(f"the loss became NaN or infinite at step {bad_step} (learning rate "
                               f"{config.learning_rate:g}); lower --learning_rate (e.g. "
                               f"{config.learning_rate / 10:g}) or add --warmup_epochs; nothing was saved "
                               f"after the last good checkpoint")


def _stop_now(stop: StopRequests, step: int, config: TrainConfig, runtime: Runtime) -> bool:
    """Whether a stop signal was received; under DDP a collective decision at the log interval."""
    if not runtime.distributed:
        return stop.requested
    if step % config.log_every_n_steps:
        return False
    flag = torch.tensor(1 if stop.requested else 0, device=runtime.device)
    return bool(all_reduce_sum(flag, runtime))


def _latest_name(train_dir: Path) -> str:
    latest = ckpt.latest_checkpoint(train_dir)
    return latest.weights.name if latest else "none yet"


def _endpoints(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits and end points; plain modules without forward_endpoints give no end points."""
    if hasattr(model, "forward_endpoints"):
        return model.forward_endpoints(images)
    return model(images), {}


class _EndpointsForward(nn.Module):
    """forward(images) -> (logits, end points): the module DistributedDataParallel wraps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return _endpoints(self.model, images)


def _forward(module: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits and end points, the same way with and without DDP (aux heads do not vanish under DDP)."""
    if isinstance(module, DistributedDataParallel):
        return module(images)
    return _endpoints(module, images)


def _shared_images(train_source: Any, eval_source: Any) -> int:
    """How many evaluation images are also training images (0 when the sources cannot tell)."""
    if not (isinstance(train_source, ImageSource) and isinstance(eval_source, ImageSource)):
        return 0
    training = {train_source.describe(i) for i in range(len(train_source))}
    if any(name.startswith("sample ") for name in list(training)[:1]):
        return 0  # in-memory arrays (digits, .npz) name samples by index only: indices are not images
    return sum(eval_source.describe(i) in training for i in range(len(eval_source)))


def _make_evaluator(config: TrainConfig, spec: ModelSpec, runtime: Runtime, multi_label: bool,
                    train_split: str = "train", held_out: Optional[ImageSource] = None,
                    train_source: Any = None):
    """An in-training evaluation, logged to TensorBoard under eval/ and to eval_during_training.jsonl.

    It never silently evaluates the training images: with no split besides the training one it
    refuses (unless --eval_split_name names it on purpose) and suggests --validation_fraction.
    """
    from ..data import available_splits
    from ..evaluate.run import evaluate_model

    if held_out is not None:
        source = held_out
        images = (f"{len(held_out)} images held out of split {train_split!r} by --validation_fraction "
                  f"{config.validation_fraction:g} (seed {config.seed}; not trained on)")
    else:
        split = config.eval_split_name or resolve_split(config.dataset_name, config.dataset_dir, "auto")
        source = build_source(config.dataset_name, config.dataset_dir, split, multi_label=config.multi_label)
        # Split names can differ for the same images (a folder without split folders is both
        # 'train' and 'all'): compare the images themselves where the sources can say.
        shared = _shared_images(train_source, source)
        if (split == train_split or shared) and not config.eval_split_name:
            splits = available_splits(config.dataset_name, config.dataset_dir)
            raise ConfigError(f"--eval_every_n_steps: the dataset has no split besides the training split "
                              f"{train_split!r} (it has: {', '.join(splits) or 'one'}), so evaluation would "
                              f"use the training images; add --validation_fraction 0.1 to hold some out, or "
                              f"--eval_split_name {train_split} to evaluate them on purpose")
        images = f"{len(source)} images of split {split!r}" + (
            " (the training images)" if split == train_split or shared == len(source)
            else f" ({shared} of them training images)" if shared else "")
    record = Path(config.train_dir) / "eval_during_training.jsonl"

    def run(model: nn.Module, step: int, writer: Any) -> None:
        if not runtime.is_main:
            return
        results = evaluate_model(model, source, spec, preprocessing_name=config.preprocessing_name,
                                 image_size=config.train_image_size, batch_size=config.batch_size,
                                 device=runtime.device, multi_label=multi_label,
                                 num_workers=default_num_workers(config.num_workers),
                                 labels_offset=config.labels_offset, use_grayscale=config.use_grayscale,
                                 channels_last=config.channels_last is not False)
        for key in ("Accuracy", "Recall_5", "mAP", "mAP_voc07"):
            if key in results:
                writer.add_scalar(f"eval/{key}", results[key], step)
        headline = {k: round(float(results[k]), 4) for k in ("Accuracy", "Recall_5", "mAP") if k in results}
        with open(record, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "images": images, "num_samples": results.get("num_samples"),
                                     **headline}) + "\n")
        _say(f"eval at step {step} on {images}: {headline}", runtime)

    return run
