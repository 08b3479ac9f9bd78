"""Settings of each command as dataclasses; flags, YAML recipes and defaults all come from here.

Flags keep slim's names (underscores); dashed spellings are accepted too. `--config recipe.yaml`
supplies any of them and explicit flags override the file. The resolved settings, defaults
included, are written next to the checkpoints so a run can always be repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError


def _flag(default: Any, help: str, *, choices: Optional[tuple] = None, aliases: tuple[str, ...] = (),
          repeatable: bool = False) -> Any:
    meta = {"help": help, "choices": choices, "aliases": aliases, "repeatable": repeatable}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataSettings:
    """Where the images come from and how they are prepared (shared by train, eval, predict)."""

    dataset_name: Optional[str] = _flag(None, "named dataset: digits (bundled), flowers, cifar10, mnist, imagenet, "
                                               "visualwakewords, voc; omit when --dataset_dir is an image folder, "
                                               "a VOC devkit, a manifest or converted TFRecords")
    dataset_dir: Optional[str] = _flag(None, "dataset directory (or manifest file)")
    dataset_split_name: str = _flag("train", "split to read")
    labels_offset: int = _flag(0, "subtracted from every label (slim: 1 to train 1000-class nets on 1001-class data)")
    preprocessing_name: Optional[str] = _flag(None, "vgg, inception, cifarnet or lenet (default: the model's)")
    use_grayscale: bool = _flag(False, "convert images to grayscale")
    num_workers: Optional[int] = _flag(None, "DataLoader worker processes (default: min(4, CPU cores))",
                                       aliases=("num_preprocessing_threads", "num_readers"))
    on_bad_image: str = _flag("skip", "unreadable images: skip and count, or fail", choices=("skip", "fail"))
    multi_label: Optional[bool] = _flag(None, "multi-label task: sigmoid cross-entropy on multi-hot targets "
                                              "(implied by VOC and multi-label manifests)")
    max_image_pixels: int = _flag(50_000_000, "images with more pixels are bad images, refused from their header "
                                              "before decoding (Pillow warns at ~89 M)")

    def __post_init__(self) -> None:
        # Every way of making settings (flags, YAML, code) is checked here, when they are made.
        validate_config(self)
        if type(self.max_image_pixels) is not int or self.max_image_pixels < 1:
            raise ConfigError(f"--max_image_pixels must be a positive integer, got {self.max_image_pixels!r}")
        # The decoders (and the loader workers they run in) read the limit from the environment.
        import os

        os.environ["SLIMTUNE_MAX_IMAGE_PIXELS"] = str(self.max_image_pixels)


@dataclass
class TrainConfig(DataSettings):
    """Every setting of `slimtune train`, with slim's names and defaults unless noted."""

    model_name: Optional[str] = _flag(None, "network: a registered name, timm:NAME / torchvision:NAME (their own "
                                      "parameter names as scopes; weights from --checkpoint_path, never downloaded), "
                                      "path/to/file.py:fn or module:fn")
    train_dir: str = _flag("runs/train", "where checkpoints, TensorBoard events and the resolved config go")
    num_classes: Optional[int] = _flag(None, "override the class count (default: from the dataset)")
    train_image_size: Optional[int] = _flag(None, "training input size (default: the model's)")
    batch_size: int = _flag(32, "images per step per process")
    max_number_of_steps: Optional[int] = _flag(None, "stop after this many global steps")
    num_epochs: Optional[float] = _flag(None, "stop after this many epochs (when max_number_of_steps is not set)")
    optimizer: str = _flag("rmsprop", "optimizer",
                           choices=("adadelta", "adagrad", "adam", "adamw", "ftrl", "momentum", "rmsprop", "sgd"))
    learning_rate: float = _flag(0.01, "initial learning rate")
    learning_rate_decay_type: str = _flag("exponential", "learning-rate schedule",
                                          choices=("fixed", "exponential", "polynomial", "cosine"))
    learning_rate_decay_factor: float = _flag(0.94, "exponential decay factor")
    num_epochs_per_decay: float = _flag(2.0, "epochs between exponential decays / length of polynomial decay")
    end_learning_rate: float = _flag(1e-4, "final rate of polynomial and cosine decay")
    warmup_epochs: float = _flag(0.0, "linear warmup length in epochs")
    weight_decay: float = _flag(4e-5, "L2 on conv/fc weights (slim's regularizer: not on biases or BatchNorm; "
                                      "decoupled for adamw); frozen weights get none")
    label_smoothing: float = _flag(0.0, "label smoothing of the softmax cross-entropy")
    aux_loss_weight: float = _flag(0.4, "weight of the loss on a net's auxiliary head (AuxLogits: Inception v3/v4, "
                                        "Inception-ResNet-v2, NASNet), as slim's 0.4; 0 disables it")
    opt_epsilon: Optional[float] = _flag(None, "optimizer epsilon (default per optimizer: adam 1e-8, "
                                               "rmsprop 1.0 as TF, adadelta 1e-6; slim used 1.0 for all)")
    adadelta_rho: float = _flag(0.95, "Adadelta decay")
    adagrad_initial_accumulator_value: float = _flag(0.1, "Adagrad starting accumulator")
    adam_beta1: float = _flag(0.9, "Adam beta1")
    adam_beta2: float = _flag(0.999, "Adam beta2")
    ftrl_learning_rate_power: float = _flag(-0.5, "FTRL learning-rate power")
    ftrl_initial_accumulator_value: float = _flag(0.1, "FTRL starting accumulator")
    ftrl_l1: float = _flag(0.0, "FTRL l1")
    ftrl_l2: float = _flag(0.0, "FTRL l2")
    momentum: float = _flag(0.9, "momentum of the momentum optimizer")
    rmsprop_momentum: float = _flag(0.9, "RMSProp momentum")
    rmsprop_decay: float = _flag(0.9, "RMSProp decay")
    pos_weight: Optional[str] = _flag(None, "multi-label: positive-class weight, one number or a comma list per class, "
                                            "or 'auto' (negatives/positives of the training set)")
    checkpoint_path: Optional[str] = _flag(None, "warm-start checkpoint (file, V2 prefix or directory); "
                                                 "ignored when train_dir already holds a checkpoint")
    checkpoint_exclude_scopes: Optional[str] = _flag(None, "comma list of scopes not restored (scope boundaries)")
    trainable_scopes: Optional[str] = _flag(None, "comma list of scopes to train; the rest is frozen, "
                                                  "BatchNorm statistics included")
    ignore_missing_vars: bool = _flag(False, "skip model tensors the checkpoint lacks")
    checkpoint_name_map: list = _flag([], "rename rule MODEL_PREFIX=CHECKPOINT_PREFIX, 're:REGEX=REPLACEMENT', "
                                          "or 'auto' (repeatable)", repeatable=True)
    freeze_batch_norm: bool = _flag(False, "keep every BatchNorm on its moving statistics")
    learning_rate_multipliers: Optional[dict] = _flag(None, "per-scope learning-rate multipliers "
                                                            "'SCOPE=X,REGEX=Y' (a mapping in YAML): the first "
                                                            "pattern that selects a parameter wins (scope "
                                                            "boundaries, slim or torch spelling, 'heads' = the "
                                                            "classifier heads; a pattern with regex characters "
                                                            "is a regex); 0 freezes as --trainable_scopes does")
    layer_decay: Optional[float] = _flag(None, "layer-wise learning-rate decay (timm/BEiT): depth d of D trains at "
                                                "rate x decay^(D-d), heads at the full rate; multiplies "
                                                "--learning_rate_multipliers")
    head_epochs: Optional[float] = _flag(None, "two-phase fine-tuning in one run: first train only the classifier "
                                               "heads for this many epochs at --head_learning_rate, then the "
                                               "whole net (or --trainable_scopes) on the main schedule (--num_epochs / "
                                               "--max_number_of_steps count after the head phase)")
    head_learning_rate: Optional[float] = _flag(None, "fixed learning rate of the --head_epochs phase "
                                                      "(default: --learning_rate)")
    dry_run: bool = _flag(False, "print the restore plan and the run's settings, then stop")
    log_every_n_steps: int = _flag(10, "log and refresh the progress line every N steps")
    save_interval_secs: float = _flag(600.0, "save a checkpoint every N seconds")
    save_every_n_steps: Optional[int] = _flag(None, "also save a checkpoint every N steps")
    save_summaries_secs: float = _flag(60.0, "write histograms and image summaries every N seconds")
    keep_checkpoint_max: int = _flag(5, "checkpoints kept in train_dir")
    eval_every_n_steps: Optional[int] = _flag(None, "evaluate on --eval_split_name every N steps while training")
    eval_split_name: Optional[str] = _flag(None, "split evaluated during training (default: test, else validation)")
    validation_fraction: Optional[float] = _flag(None, "hold out this fraction of the training split (the same "
                                                        "images for a given --seed) and evaluate on it during "
                                                        "training; it is not trained on")
    seed: int = _flag(0, "random seed (weights, data order, augmentation)")
    deterministic: bool = _flag(False, "deterministic algorithms: a CPU run repeats bit for bit")
    device: str = _flag("auto", "cpu, cuda, cuda:N or auto")
    channels_last: Optional[bool] = _flag(None, "channels-last memory format (default: on)")
    amp: bool = _flag(False, "deprecated: --precision bf16 on CPU, fp16 on CUDA")
    precision: str = _flag("fp32", "autocast precision of forward and loss (weights and optimizer stay float32): "
                                   "bf16 (CPU with avx512_bf16/AMX, or GPU), fp16 (CUDA only, with loss scaling); "
                                   "bf16 measured 1.7x fp32 on resnet_v1_50 on a 2-core avx512_bf16 CPU "
                                   "(benchmarks/results/precision_cpu.md)",
                           choices=("fp32", "bf16", "fp16"))
    compile: bool = _flag(False, "torch.compile the network (first steps compile; needs a C++ compiler on CPU; "
                                 "measured slower than eager on a 2-core CPU, see benchmarks/results/precision_cpu.md)")
    accumulate_steps: int = _flag(1, "micro-batches of --batch_size per optimizer step (gradient accumulation): "
                                     "the step sees N x batch_size images; the schedule and --num_epochs count "
                                     "optimizer steps")
    clip_gradient_norm: float = _flag(0.0, "clip gradients to this L2 norm (slim's create_train_op: each "
                                           "gradient tensor by its own norm); 0 = off")
    clip_gradient_mode: str = _flag("per_tensor", "per_tensor (slim's tf.clip_by_norm of each gradient) or "
                                                  "global (torch's clip_grad_norm_ over all of them)",
                                    choices=("per_tensor", "global"))
    moving_average_decay: Optional[float] = _flag(None, "keep an exponential moving average of the trainable "
                                                        "weights and BatchNorm statistics (slim's flag; TF's "
                                                        "warm-up min(decay, (1+step)/(10+step))), saved as "
                                                        "model.ckpt-N.ema.safetensors; eval, predict and export "
                                                        "use it unless --no_moving_average")
    verbose: bool = _flag(False, "print the restore plan tensor by tensor (it is always saved as "
                                 "restore_plan.txt in train_dir)")
    config: Optional[str] = _flag(None, "YAML file with any of these settings (flags override it)")
    gradient_checkpointing: bool = _flag(False, "recompute each cell in backward instead of keeping its "
                                                "activations (nets with cells: NASNet, PNASNet); less memory, "
                                                "about one more forward per step")
    # Running on many processes (torchrun); all of these are ignored by a single process.
    sync_batch_norm: bool = _flag(False, "BatchNorm statistics over the global batch of all processes (training "
                                         "with a small batch per GPU); one all-reduce per BatchNorm layer")
    find_unused_parameters: bool = _flag(False, "DDP searches the graph every step for trainable tensors the loss "
                                                "does not reach; needed only by nets with such tensors (frozen "
                                                "scopes and an aux head at --aux_loss_weight 0 do not need it)")
    bucket_cap_mb: float = _flag(25.0, "DDP gradient bucket size in MB: each bucket is all-reduced as soon as "
                                       "backward has filled it, overlapping communication with backward")
    distributed_timeout: Optional[float] = _flag(None, "seconds a collective waits for a rank that stopped "
                                                       "responding before every rank stops with a line naming it "
                                                       "(default: torch's, 30 min gloo / 10 min NCCL)")


@dataclass
class EvalConfig(DataSettings):
    """Settings of `slimtune eval`."""

    checkpoint_path: str = _flag("runs/train", "checkpoint file, or a train_dir (its latest checkpoint)")
    model_name: Optional[str] = _flag(None, "network (default: recorded in the checkpoint)")
    eval_dir: Optional[str] = _flag(None, "where results and TensorBoard events go (default: beside the checkpoint)")
    eval_image_size: Optional[int] = _flag(None, "evaluation input size (default: the model's)")
    batch_size: int = _flag(100, "images per batch")
    max_num_batches: Optional[int] = _flag(None, "evaluate only this many batches")
    watch: bool = _flag(False, "evaluate each new checkpoint of the train_dir while training runs")
    eval_interval_secs: float = _flag(30.0, "with --watch: seconds between looks for a new checkpoint")
    timeout_secs: Optional[float] = _flag(None, "with --watch: stop after this long without a new checkpoint")
    thresholds: Optional[str] = _flag(None, "multi-label: threshold, comma list, or 'tune' to tune per class on "
                                            "this split and save them with the model")
    report: bool = _flag(True, "write an HTML report with plots beside the results")
    no_moving_average: bool = _flag(False, "evaluate the raw weights even when the run saved moving averages "
                                            "(which are used by default, as slim's eval did)")
    device: str = _flag("auto", "cpu, cuda, cuda:N or auto")
    compile: bool = _flag(False, "torch.compile the forward with frozen weights (1.1-1.5x on CPU after a 30-80 s "
                                 "compile; checked against eager on the first batch; needs a C++ compiler on CPU)")
    config: Optional[str] = _flag(None, "YAML file with any of these settings")
    # slim evaluated 'test' by default, which flowers and imagenet lack: 'auto' picks test, else
    # validation, else the only split there is.
    dataset_split_name: str = _flag("auto", "split to evaluate (auto: test, else validation, else val)")


def _scalar_type(annotation: Any) -> Any:
    """The concrete type inside Optional[...]."""
    if get_origin(annotation) is Union:
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return inner[0] if inner else str
    return annotation


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add one flag per field of `config_class` (underscore and dash spellings, slim aliases)."""
    hints = get_type_hints(config_class)
    for item in fields(config_class):
        kind = _scalar_type(hints[item.name])
        names = [item.name] + list(item.metadata.get("aliases", ()))
        spellings = []
        for name in names:
            spellings.append(f"--{name}")
            if "_" in name:
                spellings.append(f"--{name.replace('_', '-')}")
        help_text = item.metadata.get("help", "")
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        if default not in (None, [], ""):
            help_text += f" (default: {default})"
        options: dict[str, Any] = dict(dest=item.name, default=argparse.SUPPRESS, help=help_text)
        if item.metadata.get("repeatable"):
            options["action"] = "append"
        elif kind is bool:
            options.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
            spellings += [f"--no{name}" for name in names[:1]]
        else:
            options["type"] = kind if kind in (int, float) else str
            if item.metadata.get("choices"):
                options["choices"] = item.metadata["choices"]
        if kind is bool and not item.metadata.get("repeatable"):
            parser.add_argument(*spellings[:-1], **options)
            parser.add_argument(spellings[-1], dest=item.name, action="store_const", const=False,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            parser.add_argument(*spellings, **options)


RECIPES_DIR = Path(__file__).parent / "recipes"
SAVED_SECTIONS = {"settings", "resolved", "versions"}  # the layout dump_config writes


def bundled_recipes() -> list[str]:
    """Names of the recipes shipped with slimtune (usable as `--config NAME`)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_yaml(path: Union[str, Path]) -> dict[str, Any]:
    """Read a YAML recipe (a file, or a bundled recipe's name) into a flat dict of settings."""
    path = Path(path)
    if not path.is_file() and (RECIPES_DIR / f"{path.name}.yaml").is_file():
        path = RECIPES_DIR / f"{path.name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file (bundled recipes: {', '.join(bundled_recipes())})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of setting: value")
    if isinstance(data.get("settings"), dict) and set(data) <= SAVED_SECTIONS:
        # A run's saved config.yaml: its settings reproduce the run; resolved facts and versions
        # are records, not settings. Its own `config` entry (the recipe it came from) is history.
        data = {k: v for k, v in data["settings"].items() if k != "config"}
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def build_config(config_class: type, given: dict[str, Any]):
    """Merge defaults < YAML file < explicit values into a config instance; unknown keys are errors."""
    known = {item.name: item for item in fields(config_class)}
    aliases = {alias: item.name for item in fields(config_class) for alias in item.metadata.get("aliases", ())}
    merged: dict[str, Any] = {}
    if given.get("config"):
        merged.update(load_yaml(given["config"]))
    merged.update({k: v for k, v in given.items()})
    values: dict[str, Any] = {}
    hints = get_type_hints(config_class)
    for key, value in merged.items():
        name = aliases.get(key, key)
        if name not in known:
            close = difflib.get_close_matches(name, list(known) + list(aliases), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown setting {key!r}{hint}")
        values[name] = _coerce(name, value, hints[name], known[name])
    return config_class(**values)


def _coerce(name: str, value: Any, annotation: Any, item: dataclasses.Field) -> Any:
    """Check and convert a value from YAML or code to the field's type (range and choices: validate_config)."""
    kind = _scalar_type(annotation)
    if value is None:
        return None
    if item.metadata.get("repeatable"):
        return list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        if kind is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if isinstance(value, bool) and kind in (int, float):
            raise TypeError("a true/false value is not a number")
        if kind is int:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError("not a whole number")
            return int(number)
        if kind is float:
            return float(value)
        if kind is str and isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        if kind is str:
            if isinstance(value, dict):
                raise TypeError("a mapping is not text")
            return str(value)
    except (TypeError, ValueError, OverflowError, argparse.ArgumentTypeError) as error:
        raise ConfigError(f"setting {name}: {value!r} is not a valid {kind.__name__}") from error
    return value


# Allowed ranges: (low, high); a bound in a one-item list is exclusive, None is open.
RANGES: dict[str, tuple[Any, Any]] = {
    "learning_rate": ([0.0], None), "end_learning_rate": (0.0, None), "learning_rate_decay_factor": ([0.0], 1.0),
    "num_epochs_per_decay": ([0.0], None), "warmup_epochs": (0.0, None), "weight_decay": (0.0, None),
    "label_smoothing": (0.0, [1.0]), "opt_epsilon": ([0.0], None), "adadelta_rho": (0.0, 1.0),
    "adagrad_initial_accumulator_value": (0.0, None), "adam_beta1": (0.0, [1.0]), "adam_beta2": (0.0, [1.0]),
    "ftrl_learning_rate_power": (None, 0.0), "ftrl_initial_accumulator_value": ([0.0], None),
    "ftrl_l1": (0.0, None), "ftrl_l2": (0.0, None), "momentum": (0.0, 1.0), "rmsprop_momentum": (0.0, 1.0),
    "rmsprop_decay": (0.0, 1.0), "batch_size": (1, None), "max_number_of_steps": (1, None),
    "num_epochs": ([0.0], None), "num_classes": (1, None), "train_image_size": (1, None),
    "eval_image_size": (1, None), "labels_offset": (0, None), "num_workers": (0, None),
    "log_every_n_steps": (1, None), "save_every_n_steps": (1, None), "keep_checkpoint_max": (1, None),
    "eval_every_n_steps": (1, None), "save_interval_secs": (0.0, None), "save_summaries_secs": (0.0, None),
    "max_num_batches": (1, None), "eval_interval_secs": (0.0, None), "timeout_secs": (0.0, None),
    "seed": (0, None), "validation_fraction": ([0.0], [1.0]), "bucket_cap_mb": ([0.0], None),
    "distributed_timeout": ([0.0], None),
    "accumulate_steps": (1, None), "clip_gradient_norm": (0.0, None), "moving_average_decay": ([0.0], [1.0]),
    "layer_decay": ([0.0], 1.0), "head_epochs": ([0.0], None), "head_learning_rate": ([0.0], None),
}
# Durations where infinity means "never"; every other float must be finite.
_INFINITE_OK = {"save_interval_secs", "save_summaries_secs", "eval_interval_secs", "timeout_secs"}


def _check_range(name: str, value: Any) -> None:
    if isinstance(value, float) and (math.isnan(value) or (math.isinf(value) and name not in _INFINITE_OK)):
        raise ConfigError(f"setting {name}: {value} is not a finite number")
    low, high = RANGES.get(name, (None, None))
    for bound, below in ((low, True), (high, False)):
        if bound is None:
            continue
        exclusive = isinstance(bound, list)
        limit = bound[0] if exclusive else bound
        outside = (value <= limit if exclusive else value < limit) if below else \
                  (value >= limit if exclusive else value > limit)
        if outside:
            relation = (">" if exclusive else ">=") if below else ("<" if exclusive else "<=")
            raise ConfigError(f"setting {name}: {value!r} is out of range (must be {relation} {limit:g})")


def validate_config(config: Any) -> None:
    """Check every field's type, range and choices; one ConfigError line naming the field."""
    hints = get_type_hints(type(config))
    for item in fields(config):
        value = getattr(config, item.name)
        if value is None:
            continue
        kind = _scalar_type(hints[item.name])
        if item.metadata.get("repeatable"):
            if not isinstance(value, list):
                raise ConfigError(f"setting {item.name}: expected a list, got {value!r}")
            continue
        wrong_type = (kind is bool and not isinstance(value, bool)) or \
                     (kind is int and (isinstance(value, bool) or not isinstance(value, int))) or \
                     (kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)))) or \
                     (kind is str and not isinstance(value, str))
        if wrong_type:
            raise ConfigError(f"setting {item.name}: {value!r} is not a valid {getattr(kind, '__name__', kind)}")
        choices = item.metadata.get("choices")
        if choices and value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"setting {item.name}: {value!r} is not one of {', '.join(map(str, choices))}{hint}")
        if kind in (int, float):
            _check_range(item.name, value)


def config_to_dict(config: Any) -> dict[str, Any]:
    """All settings as a plain dict (for saving and printing)."""
    return dataclasses.asdict(config)


def dump_config(config: Any, path: Union[str, Path], extra: Optional[dict[str, Any]] = None) -> Path:
    """Write the resolved settings (and extra facts such as package versions) as YAML."""
    data = {"settings": config_to_dict(config)}
    if extra:
        data.update(extra)
    path = Path(path)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False), encoding="utf-8")
    return path
