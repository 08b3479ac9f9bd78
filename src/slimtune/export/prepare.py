"""What an export starts from: the trained net, its resolved config, and an inference-only copy of it.

`load_source` reads the network, class count, labels, image size and preprocessing from the
run's checkpoint (a train_dir or a weights file written by `slimtune train`; flags override);
a checkpoint without that record (a slim checkpoint, a bare weights file) needs --model_name and
--num_classes. `inference_copy` turns the net into what is exported: BatchNorm folded into the
convolution before it (standalone BNs such as ResNet v2's `preact`/`postnorm` become one
per-channel multiply-add), dropout removed, auxiliary heads unused, and a wrapper that returns
both `logits` and `probabilities` (softmax, or sigmoid for a multi-label run).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..nets.layers import BatchNorm
from ..nets.registry import ModelSpec, get_model_spec
from ..runtime import channels_last_batch, inference_layout

#: slim's eval preprocessing as (mean, std) per channel where it is one: x_float = (x_uint8 - mean) / std.
PREPROCESSING_NORMALIZATION: dict[str, tuple[list[float], list[float]]] = {
    "vgg": ([123.68, 116.78, 103.94], [1.0, 1.0, 1.0]),
    "inception": ([127.5, 127.5, 127.5], [127.5, 127.5, 127.5]),
    "lenet": ([128.0, 128.0, 128.0], [128.0, 128.0, 128.0]),
}


@dataclass
class ExportSource:
    """A trained net and everything a deployer needs to feed it and read its outputs."""

    model: nn.Module
    spec: ModelSpec
    model_name: str
    num_classes: int
    image_size: int
    preprocessing: str
    multi_label: bool = False
    class_names: list[str] = field(default_factory=list)
    thresholds: Optional[list[float]] = None
    checkpoint: str = ""

    @property
    def in_channels(self) -> int:
        """Input channels of the net (3 for RGB nets)."""
        return self.spec.in_channels

    def metadata(self) -> dict[str, str]:
        """The resolved config as string key/values (ONNX metadata_props, sidecar JSON, .pt2 extra files)."""
        from ..preprocessing.factory import resolve_preprocessing_name

        family = resolve_preprocessing_name(self.preprocessing)
        mean, std = PREPROCESSING_NORMALIZATION.get(family, (None, None))
        info: dict[str, Any] = {
            "model_name": self.model_name, "num_classes": self.num_classes, "image_size": self.image_size,
            "in_channels": self.in_channels, "preprocessing": family, "multi_label": self.multi_label,
            "class_names": self.class_names, "input_layout": "NCHW float32 (preprocessed)",
            "normalization": ("per_image_standardization" if family == "cifarnet" else "(x - mean) / std"),
            "mean": mean, "std": std,
            "thresholds": self.thresholds if self.thresholds is not None
            else ([0.5] * self.num_classes if self.multi_label else None),
            "outputs": "logits, probabilities (" + ("sigmoid" if self.multi_label else "softmax") + ")",
            "source_checkpoint": self.checkpoint, "exported_by": "slimtune",
        }
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}


def load_source(checkpoint_path: str, *, model_name: Optional[str] = None, num_classes: Optional[int] = None,
                image_size: Optional[int] = None, preprocessing_name: Optional[str] = None,
                labels_file: Optional[str] = None, multi_label: Optional[bool] = None,
                moving_average: bool = True) -> ExportSource:
    """Build the trained network from a train_dir or checkpoint file; flags override what it records.

    A run's moving-average weights (--moving_average_decay) are exported when present, unless
    `moving_average` is False.
    """
    from ..checkpoint import train_dir as ckpt
    from ..evaluate.run import THRESHOLDS_FILENAME

    path = Path(checkpoint_path).expanduser()
    if not path.exists() and not Path(str(path) + ".index").exists():
        raise ConfigError(f"--checkpoint_path {checkpoint_path}: no such run directory or checkpoint")
    if path.is_dir() and ckpt.latest_checkpoint(path) is None and not any(path.glob("*.index")):
        raise ConfigError(f"{path} holds no checkpoint (model.ckpt-<step>.safetensors or a slim .index)")
    weights = ckpt.resolve_weights(path) if path.is_dir() and ckpt.latest_checkpoint(path) else path
    meta: dict[str, str] = {}
    if weights.suffix == ".safetensors" and weights.is_file():
        meta = ckpt.read_metadata(weights)
    # "model" is how a run names its net (registered name, file.py:fn or module:fn); older runs wrote "model_name".
    name = model_name or meta.get("model") or meta.get("model_name")
    classes = num_classes if num_classes is not None else (int(meta["num_classes"]) if meta.get("num_classes") else None)
    if not name or classes is None:
        raise ConfigError(f"{checkpoint_path} carries no saved config (model name and class count): "
                          "pass --model_name and --num_classes")
    spec = get_model_spec(name)
    size = image_size or (int(meta["image_size"]) if meta.get("image_size") else spec.default_image_size)
    if meta.get("format") == "slimtune":
        if meta.get("model_name") and meta["model_name"] != spec.name:
            raise ConfigError(f"{weights} holds {meta['model_name']}, not {spec.name}: drop --model_name")
        from ..nets.endpoint_head import build_probe_model, is_probe_checkpoint

        built_size = size if spec.sized_by_input else None
        model = build_probe_model(spec, meta, built_size) if is_probe_checkpoint(meta) else \
            spec.build(classes, image_size=built_size)
        weights = ckpt.load_run_weights(model, weights, moving_average)
    else:
        from ..checkpoint.restore import restore

        model = spec.build(classes, image_size=size if spec.sized_by_input else None)
        restore(model, str(checkpoint_path))
    is_multi = multi_label if multi_label is not None else meta.get("multi_label") == "true"
    names = _class_names(meta, weights, classes, labels_file)
    thresholds = None
    saved = weights.parent / THRESHOLDS_FILENAME
    if is_multi and saved.is_file():
        thresholds = [float(v) for v in json.loads(saved.read_text())["thresholds"]]
    return ExportSource(model=model.eval(), spec=spec, model_name=spec.name, num_classes=classes, image_size=size,
                        preprocessing=preprocessing_name or meta.get("preprocessing") or spec.preprocessing,
                        multi_label=is_multi, class_names=names, thresholds=thresholds, checkpoint=str(weights))


def _class_names(meta: dict[str, str], weights: Path, count: int, labels_file: Optional[str]) -> list[str]:
    from ..data.labels import labels_to_names, read_labels_file

    if labels_file:
        return labels_to_names(read_labels_file(Path(labels_file)))[:count]
    if meta.get("class_names"):
        return json.loads(meta["class_names"])[:count]
    labels = weights.parent / "labels.txt"
    if labels.is_file():
        return labels_to_names(read_labels_file(labels))[:count]
    from ..data.imagenet import imagenet_class_names

    return imagenet_class_names(count) or [str(i) for i in range(count)]


class ChannelAffine(nn.Module):
    """A BatchNorm in inference: y = x * scale + shift per channel (dim 1), its statistics folded in."""

    def __init__(self, norm: BatchNorm) -> None:
        super().__init__()
        scale = torch.rsqrt(norm.running_var.detach().double() + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.detach().double()
        shift = -norm.running_mean.detach().double() * scale
        if norm.bias is not None:
            shift = shift + norm.bias.detach().double()
        self.register_buffer("scale", scale.float())
        self.register_buffer("shift", shift.float())

    def forward(self, x: Tensor) -> Tensor:
        """x * scale + shift, broadcast over every dimension after the channels."""
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(view) + self.shift.view(view)


def _fold_into(module: nn.Module) -> bool:
    """Fold module.BatchNorm into the kernel it follows (conv, separable pointwise, linear); False if it can't."""
    norm = getattr(module, "BatchNorm", None)
    if not isinstance(norm, BatchNorm):
        return False
    if hasattr(module, "pointwise_weight"):
        kernel_name = "pointwise_weight"
    elif hasattr(module, "kernel_name") and hasattr(module, "_folded"):
        kernel_name = module.kernel_name
    elif type(module).__name__ == "Linear" and isinstance(getattr(module, "weight", None), nn.Parameter):
        kernel_name = "weight"
    else:
        return False
    kernel = getattr(module, kernel_name).detach().double()
    bias = module.bias.detach().double() if getattr(module, "bias", None) is not None else None
    scale = torch.rsqrt(norm.running_var.detach().double() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach().double()
    shift = -norm.running_mean.detach().double() * scale
    if bias is not None:
        shift = shift + bias * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach().double()
    folded = kernel * scale.view((-1,) + (1,) * (kernel.dim() - 1))
    setattr(module, kernel_name, nn.Parameter(folded.float(), requires_grad=False))
    module.bias = nn.Parameter(shift.float(), requires_grad=False)
    module.BatchNorm = None
    return True


def fold_batch_norms(model: nn.Module) -> dict[str, int]:
    """Fold every BatchNorm of `model` (in place): into the layer before it where it follows a
    kernel in the same layer, else into a per-channel affine. Returns the counts of each."""
    folded = 0
    for module in list(model.modules()):
        folded += _fold_into(module)
    affine = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BatchNorm):
                setattr(module, child_name, ChannelAffine(child))
                affine += 1
    return {"folded": folded, "affine": affine}


def _drop_dropout(model: nn.Module) -> int:
    dropped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.dropout._DropoutNd):
                setattr(module, child_name, nn.Identity())
                dropped += 1
    return dropped


class InferenceModel(nn.Module):
    """The exported graph: x -> (logits, probabilities); only the main head's path is computed."""

    def __init__(self, net: nn.Module, multi_label: bool) -> None:
        super().__init__()
        self.net = net
        self.multi_label = multi_label
        self.channels_last = False

    def use_channels_last(self) -> "InferenceModel":
        """Make the captured graph run channels-last whatever the caller's layout: the kernels are
        stored channels-last and the input is reordered first. TorchScript and torch.export keep the
        layout a graph was captured in, and oneDNN's CPU convolutions run faster channels-last (a
        traced resnet_v1_50 at batch 16: 19.5 -> 28.7 img/s on 2 cores). Not for ONNX, which has no
        layouts (its runtime picks its own)."""
        inference_layout(self.net)
        self.channels_last = True
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits [N, C] and their softmax (sigmoid when multi-label)."""
        if self.channels_last:
            x = channels_last_batch(x)
        logits = self.net(x)
        probabilities = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return logits, probabilities


def inference_copy(model: nn.Module, multi_label: bool = False) -> tuple[InferenceModel, dict[str, int]]:
    """An eval-mode deep copy of `model` ready to export: BN folded, dropout off, aux heads unused.

    Auxiliary classifier heads (`classifier_scopes[1:]`, e.g. InceptionV3/AuxLogits) only feed
    training losses: they are removed from the copy, and a net whose forward still needs them
    fails here rather than exporting a training-only branch.
    """
    net = copy.deepcopy(model).cpu().float().eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    stats = fold_batch_norms(net)
    stats["dropout_removed"] = _drop_dropout(net)
    stats["aux_heads_removed"] = 0
    for scope in tuple(getattr(net, "classifier_scopes", ()))[1:]:
        parent_name, _, leaf = scope.replace("/", ".").rpartition(".")
        try:
            parent = net.get_submodule(parent_name) if parent_name else net
        except AttributeError:
            continue
        if isinstance(getattr(parent, leaf, None), nn.Module):
            setattr(parent, leaf, None)
            stats["aux_heads_removed"] += 1
    if hasattr(net, "aux_logits"):  # nets that compute AuxLogits on a switch
        try:
            net.aux_logits = False
        except (AttributeError, TypeError):
            pass
    return InferenceModel(net, multi_label).eval(), stats
