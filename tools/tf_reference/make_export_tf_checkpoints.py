"""Step 1 of the tf-checkpoint export fixture (slimtune side; run with slimtune's venv, not TF's).

    PYTHONPATH=src python tools/tf_reference/make_export_tf_checkpoints.py --out /tmp/export_tf

For each config it restores the parity golden's seeded slim weights into the slimtune net, saves
that as a train_dir checkpoint, runs `slimtune export --format tf-checkpoint`, and writes beside
the export the NHWC inputs (real photos, preprocessed) and slimtune's logits on them. Step 2,
check_exported_tf_checkpoint.py (TF env), loads the export in TF-Slim and records the result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from slimtune.checkpoint.restore import restore
from slimtune.export import export
from slimtune.export.verify import load_verification_images, preprocess_batch
from slimtune.nets.registry import get_model_spec
from slimtune.testing import load_golden

REPO = Path(__file__).resolve().parent.parent.parent
#: config -> input size: MobileNet (depthwise layout, BN with gamma) and ResNet v2 (standalone preact/postnorm BNs).
CONFIGS = {"mobilenet_v1_025": 96, "resnet_v2_50": 64}


def make(config: str, size: int, out: Path) -> None:
    """Export one config and record its inputs and slimtune logits."""
    reference = load_golden(REPO / "tests" / "golden" / f"{config}.npz")
    spec = get_model_spec(reference.model_name)
    kwargs = {k: v for k, v in reference.model_kwargs.items() if k != "num_classes"}
    model = spec.build(reference.num_classes, **kwargs).eval()
    restore(model, reference.weights())
    folder = out / config
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.ckpt-1.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"model_name": reference.model_name, "num_classes": str(reference.num_classes),
                        "image_size": str(size), "format": "slimtune", "step": "1"})
    export(str(weights), "tf-checkpoint", str(folder / "export" / "model.ckpt"))
    images = preprocess_batch(load_verification_images(None, spec.in_channels), spec.preprocessing, size)
    with torch.no_grad():
        logits = model(images).numpy()
    np.save(folder / "inputs_nhwc.npy", images.permute(0, 2, 3, 1).contiguous().numpy())
    np.save(folder / "slimtune_logits.npy", logits)
    (folder / "config.json").write_text(json.dumps({
        "config": config, "model_name": reference.model_name, "num_classes": reference.num_classes,
        "net_kwargs": kwargs, "image_size": size}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    for config in args.configs.split(","):
        make(config, CONFIGS[config], Path(args.out))


if __name__ == "__main__":
    main()
