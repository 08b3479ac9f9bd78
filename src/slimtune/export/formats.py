"""One writer and one runtime loader per export format.

Each writer gets the inference model (see prepare.inference_copy), an example input and the
resolved config, and writes ONE file at a temporary path; its loader runs that file in the
format's own runtime (onnxruntime, torch.jit.load, torch.export.load, a fresh create_model for
safetensors) and returns the logits, so that `run.export` can compare them with the eager model
before the file is moved into place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

#: ONNX opset written (>= 17: LayerNormalization etc.; 18 is what torch's exporter targets natively).
DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "probabilities")
METADATA_FILE = "slimtune.json"

Runner = Callable[[np.ndarray], np.ndarray]


def require(module: str, extra: str, what: str) -> object:
    """Import an optional dependency, or a one-line error naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(f"{what} needs the optional package '{module.split('.')[0]}' ({error.msg}): "
                          f"pip install 'slimtune[{extra}]'") from error


def _batch_dim(name: str = "batch") -> object:
    return torch.export.Dim(name, min=1, max=4096)


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str],
               opset: int = DEFAULT_OPSET, dynamic_spatial: bool = False) -> None:
    """torch.onnx (dynamo) export: input `input` with a dynamic batch axis, outputs logits/probabilities."""
    require("onnx", "export", "ONNX export")
    require("onnxscript", "export", "ONNX export")
    import onnx

    if opset < 17:
        raise ConfigError(f"--opset {opset}: slimtune writes ONNX opset 17 or newer")
    shape = {0: _batch_dim()}
    if dynamic_spatial:
        shape.update({1: torch.export.Dim("height", min=1, max=8192), 2: torch.export.Dim("width", min=1, max=8192)})
    program = torch.onnx.export(model, (example,), None, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                opset_version=opset, dynamo=True, external_data=False,
                                dynamic_shapes={"x": shape}, optimize=True, verbose=False)
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "slimtune"
    onnx.save(proto, str(path))


def onnx_session(path: Union[Path, bytes], threads: Optional[int] = None):
    """An onnxruntime CPU session for `path` (or a serialized model)."""
    ort = require("onnxruntime", "export", "running an ONNX model")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def load_onnx(path: Path) -> Runner:
    """Run an exported ONNX file in onnxruntime: input array -> logits."""
    session = onnx_session(path)
    return lambda x: session.run([OUTPUT_NAMES[0]], {INPUT_NAME: x})[0]


def onnx_metadata(path: Path) -> dict[str, str]:
    """The metadata slimtune stored in an ONNX file (onnxruntime's view of metadata_props)."""
    return dict(onnx_session(path).get_modelmeta().custom_metadata_map)


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]) -> None:
    """torch.jit.trace of the inference model, the resolved config as an extra file (slimtune.json)."""
    with torch.no_grad():
        traced = torch.jit.trace(model, (example,), check_trace=False, strict=False)
    traced = torch.jit.freeze(traced.eval())
    torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})


def load_torchscript(path: Path) -> Runner:
    """Run a TorchScript file through torch.jit.load."""
    module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x))[0].numpy()
    return run


def write_exported_program(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str],
                           dynamic_spatial: bool = False) -> None:
    """torch.export of the inference model (dynamic batch) saved as .pt2 with the config as an extra file."""
    shape = {0: _batch_dim()}
    if dynamic_spatial:
        shape.update({1: torch.export.Dim("height", min=1, max=8192), 2: torch.export.Dim("width", min=1, max=8192)})
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes={"x": shape}, strict=False)
    torch.export.save(program, str(path), extra_files={METADATA_FILE: json.dumps(metadata)})


def load_exported_program(path: Path) -> Runner:
    """Run a .pt2 through torch.export.load."""
    module = torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x))[0].numpy()
    return run


def write_safetensors(source_model: nn.Module, path: Path, metadata: dict[str, str]) -> Path:
    """The trained (unfolded) weights under slimtune's names + a JSON sidecar of the resolved config.

    The header carries the same metadata as a train_dir checkpoint (format=slimtune), so
    `slimtune predict/eval --checkpoint_path` and `create_model` + `load_state_dict` both read it.
    Returns the sidecar's path (written beside the weights, `<name>.json`).
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in source_model.state_dict().items()}
    header = {"model_name": metadata["model_name"], "num_classes": metadata["num_classes"],
              "image_size": metadata["image_size"], "preprocessing": metadata["preprocessing"],
              "multi_label": metadata["multi_label"], "class_names": metadata["class_names"], "format": "slimtune"}
    save_file(tensors, str(path), metadata=header)
    sidecar = path.with_suffix(".json")
    config = {k: json.loads(v) if k not in ("model_name", "preprocessing", "input_layout", "normalization",
                                            "outputs", "source_checkpoint", "exported_by") else v
              for k, v in metadata.items()}
    config["create_model"] = {"name": metadata["model_name"], "num_classes": int(metadata["num_classes"])}
    sidecar.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return sidecar


def load_safetensors(path: Path, sidecar: Path) -> Runner:
    """Rebuild the net from the sidecar alone (create_model), load the weights, run eager."""
    from safetensors.torch import load_file

    from ..nets.registry import get_model_spec

    config = json.loads(sidecar.read_text(encoding="utf-8"))
    spec = get_model_spec(config["create_model"]["name"])
    model = spec.build(config["create_model"]["num_classes"], image_size=config.get("image_size"))
    model.load_state_dict(load_file(str(path)), strict=True)
    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()
    return run
