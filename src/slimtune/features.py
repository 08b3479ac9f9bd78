"""Pull one end point's activations out of a net for a set of images, and store them with the paths.

The net must have slim's uniform signature, `forward_endpoints(x) -> (logits, end_points)`. Images
arrive decoded and preprocessed (the caller owns decoding and preprocessing): single [C, H, W]
tensors, or [N, C, H, W] batches, in any mix.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ConfigError, DataError
from .runtime import inference_layout

PathLike = Union[str, Path]


def _batches(images: Iterable[Any], batch_size: int) -> Iterator[Tensor]:
    """Regroup single images and batches into batches of `batch_size` (the last may be smaller)."""
    pending: list[Tensor] = []
    count = 0
    for item in images:
        if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
            item = item[0]  # (image, label) pairs from a dataset
        if not isinstance(item, Tensor) or item.dim() not in (3, 4):
            shape = list(item.shape) if isinstance(item, Tensor) else type(item).__name__
            raise ConfigError(f"extract_features takes preprocessed [C, H, W] or [N, C, H, W] tensors, got {shape}")
        chunk = item.unsqueeze(0) if item.dim() == 3 else item
        pending.append(chunk)
        count += chunk.shape[0]
        while count >= batch_size:
            merged = torch.cat(pending, dim=0)
            yield merged[:batch_size]
            rest = merged[batch_size:]
            pending, count = ([rest] if rest.shape[0] else []), rest.shape[0]
    if count:
        yield torch.cat(pending, dim=0)


def _pick(end_points: dict, endpoint: str, model: nn.Module) -> Tensor:
    scope = getattr(model, "scope", "") or ""
    return end_points[resolve_endpoints(list(end_points), [endpoint], scope)[0]]


def resolve_endpoints(available: list[str], wanted: list[str], scope: str) -> list[str]:
    """Map requested end points onto the net's names; short forms resolve under its scope
    (`block4` -> `resnet_v1_50/block4`). Unknown ones get one line with the nearest names."""
    resolved = []
    for name in wanted:
        candidates = [name, f"{scope}/{name}", name.replace(".", "/"), name.replace("/", ".")]
        found = next((c for c in candidates if c in available), None)
        if found is None:
            tails = [a for a in available if a.endswith("/" + name)]
            found = tails[0] if len(tails) == 1 else None
        if found is None:
            close = difflib.get_close_matches(name, available, n=3, cutoff=0.4)
            hint = f" (nearest: {', '.join(close)})" if close else ""
            raise ConfigError(f"the net has no end point {name!r}{hint}; its end points are {', '.join(available)}")
        resolved.append(found)
    return list(dict.fromkeys(resolved))


def endpoint_names(model: nn.Module, example: Tensor) -> list[str]:
    """The end point names `model` produces for an input like `example` ([C,H,W] or [N,C,H,W])."""
    x = example.unsqueeze(0) if example.dim() == 3 else example[:1]
    with torch.inference_mode():
        return list(_forward_endpoints(model)(x)[1])


def _forward_endpoints(model: nn.Module):
    forward = getattr(model, "forward_endpoints", None)
    if not callable(forward):
        raise ConfigError(f"{type(model).__name__} has no forward_endpoints(x) -> (logits, end_points); "
                          "feature extraction needs a slimtune net (or a module with that method)")
    return forward


def extract_features(model: nn.Module, endpoint: str, images: Iterable[Any], batch_size: int = 32,
                     device: Optional[Union[str, torch.device]] = None, channels_last: bool = True) -> Tensor:
    """Activations of `endpoint` for every image, stacked [N, ...] as float32 on the CPU.

    The net runs in eval mode (restored afterwards) under inference mode, in the channels-last layout
    unless `channels_last` is False (runtime.inference_layout). An unknown end point raises
    ConfigError listing the available ones.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    forward = _forward_endpoints(model)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    layout = inference_layout(model, channels_last)
    outputs: list[Tensor] = []
    try:
        with torch.inference_mode():
            for batch in _batches(images, batch_size):
                _, end_points = forward(layout(batch.to(device)))
                outputs.append(_pick(end_points, endpoint, model).detach().float().contiguous().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        raise DataError("extract_features got no images")
    return torch.cat(outputs, dim=0)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def write_features(out_path: PathLike, features: Union[Tensor, np.ndarray], image_paths: Sequence[PathLike],
                   endpoint: Optional[str] = None) -> list[Path]:
    """Store features [N, ...] with the N image paths; returns the files written.

    `.npy`: the array, plus a sidecar `<name>.json` holding {"endpoint", "shape", "image_paths"}.
    `.safetensors`: tensor "features", with the paths (JSON) and end point in the file's metadata.
    """
    path = Path(out_path)
    array = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    paths = [str(p) for p in image_paths]
    if array.shape[0] != len(paths):
        raise DataError(f"{array.shape[0]} feature rows but {len(paths)} image paths; they must pair up one to one")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".safetensors"):
        raise ConfigError(f"feature output '{path}' must end in .npy or .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if suffix == ".npy":
        np.save(path, array)
        sidecar = _sidecar(path)
        sidecar.write_text(json.dumps({"endpoint": endpoint, "shape": list(array.shape), "image_paths": paths},
                                      indent=1) + "\n")
        return [path, sidecar]
    from safetensors.numpy import save_file

    metadata = {"image_paths": json.dumps(paths), "format": "slimtune-features"}
    if endpoint:
        metadata["endpoint"] = endpoint
    save_file({"features": array}, str(path), metadata=metadata)
    return [path]


def read_features(path: PathLike) -> tuple[np.ndarray, list[str]]:
    """Load what `write_features` stored: (features, image paths)."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        sidecar = _sidecar(path)
        if not sidecar.exists():
            raise DataError(f"{path} has no sidecar {sidecar.name} with its image paths")
        return np.load(path, allow_pickle=False), list(json.loads(sidecar.read_text())["image_paths"])
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
        if "image_paths" not in metadata:
            raise DataError(f"{path} holds no image paths in its metadata (not written by slimtune features)")
        return handle.get_tensor("features"), list(json.loads(metadata["image_paths"]))


def features_command(*, model_name: Optional[str], endpoint: str, images: Sequence[str], output: PathLike,
                     checkpoint_path: Optional[str] = None, num_classes: Optional[int] = None,
                     image_size: Optional[int] = None, preprocessing_name: Optional[str] = None,
                     batch_size: int = 32, device: str = "auto", name_map: Optional[Sequence[str]] = None) -> Path:
    """`slimtune features`: decode + eval-preprocess images, run the net, store one end point."""
    from .checkpoint.restore import FEATURES_ADVICE, restore
    from .data.decode import decode_image
    from .nets.registry import get_model_spec
    from .data.folder import expand_inputs
    from .preprocessing import get_preprocessing
    from .runtime import pick_device

    torch_device = pick_device(device)
    meta: dict[str, str] = {}
    if not model_name and checkpoint_path:
        # A slimtune run's checkpoint records how to rebuild its net (custom nets too).
        from .evaluate.run import load_for_eval

        model, spec, meta, _ = load_for_eval(checkpoint_path, None, num_classes, torch_device)
    else:
        if not model_name:
            raise ConfigError("features needs --checkpoint_path (a slimtune run) or --model_name")
        spec = get_model_spec(model_name)
        model = spec.build(spec.checkpoint_num_classes if num_classes is None else num_classes)
        if checkpoint_path:
            # Advice in the plan names only flags `slimtune features` accepts.
            restore(model, checkpoint_path, name_map=list(name_map) if name_map else None, advice=FEATURES_ADVICE)
    model.to(torch_device)
    paths = expand_inputs(images)
    size = image_size or (int(meta["image_size"]) if meta.get("image_size") else spec.default_image_size)
    preprocess = get_preprocessing(preprocessing_name or meta.get("preprocessing") or spec.preprocessing,
                                   is_training=False)
    tensors = (preprocess(torch.from_numpy(decode_image(p, spec.in_channels, description=str(p))).permute(2, 0, 1),
                          size, size) for p in paths)
    features = extract_features(model, endpoint, tensors, batch_size=batch_size, device=torch_device)
    write_features(output, features, paths, endpoint=endpoint)
    return Path(output)
