"""Write TF-Slim's variable list of the published NASNet / PNASNet architectures (developer-only).

    /work/tfenv/bin/python tools/tf_reference/make_nasnet_manifest.py \
        --slim_src /work/slim_src --out tests/fixtures/nasnet_variables.json.gz

Builds each net of slim's nets_factory with its default hyper-parameters, class count and image
size in a *training* graph (slim adds the auxiliary head only when is_training, and the published
checkpoints hold it) and records every model variable's name and shape, in graph order. The
parity tests check slimtune's full architectures against this list without running them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

from slim_env import load_slim  # noqa: E402

NETS = {"nasnet_cifar": (10, 32), "nasnet_mobile": (1001, 224), "nasnet_large": (1001, 331),
        "pnasnet_mobile": (1001, 224), "pnasnet_large": (1001, 331)}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slim_src", default="/work/slim_src")
    parser.add_argument("--out", default=str(_HERE.parent.parent / "tests" / "fixtures" / "nasnet_variables.json.gz"))
    args = parser.parse_args(argv)
    env = load_slim(args.slim_src)
    tf = env.tf
    result = {"slim_src": args.slim_src, "versions": {k: str(v) for k, v in env.versions.items()}}
    for name, (classes, size) in NETS.items():
        with tf.Graph().as_default():
            images = tf.placeholder(tf.float32, [1, size, size, 3])
            network_fn = env.nets_factory.get_network_fn(name, num_classes=classes, is_training=True)
            network_fn(images)
            model_variables = set(v.name for v in tf.model_variables())
            variables = [[v.op.name, v.shape.as_list()] for v in tf.global_variables() if v.name in model_variables]
        result[name] = {"num_classes": classes, "image_size": size, "count": len(variables), "variables": variables}
        print(f"{name}: {len(variables)} variables", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out, "wt") as handle:
        json.dump(result, handle, separators=(",", ":"))
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raise SystemExit(main())
