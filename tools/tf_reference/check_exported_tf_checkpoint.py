"""Step 2 of the tf-checkpoint export fixture: TF-Slim itself loads slimtune's export.

    /work/tfenv/bin/python tools/tf_reference/check_exported_tf_checkpoint.py \
        --slim_src /work/slim_src --exports /tmp/export_tf --out tests/fixtures/export_tf

For each config exported by make_export_tf_checkpoints.py it builds research/slim's net in graph
mode (nets_factory, is_training=False), restores EVERY graph variable from slimtune's V2 bundle
with a plain tf.compat.v1.train.Saver (a missing name or a wrong shape fails here), runs the
photos and compares TF's logits with slimtune's. It records in `<out>/<config>.npz` TF's logits,
the inputs, and the SHA-256 of the two bundle files TF loaded, so the test suite can prove that
today's export writes byte-identical files (tests/test_export_tf.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

from slim_env import load_slim  # noqa: E402


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(env, folder: Path, out: Path) -> None:
    """Load one export in TF-Slim, run it, record the result."""
    tf = env.tf
    config = json.loads((folder / "config.json").read_text())
    inputs = np.load(folder / "inputs_nhwc.npy")
    expected = np.load(folder / "slimtune_logits.npy")
    prefix = folder / "export" / "model.ckpt"
    graph = tf.Graph()
    with graph.as_default():
        images = tf.placeholder(tf.float32, list(inputs.shape), name="images")
        network_fn = env.nets_factory.get_network_fn(config["model_name"], num_classes=config["num_classes"],
                                                     weight_decay=0.0, is_training=False)
        logits_t, _ = network_fn(images, **config["net_kwargs"])
        variables = tf.global_variables()
        saver = tf.train.Saver(var_list=variables)
        with tf.Session(graph=graph) as sess:
            saver.restore(sess, str(prefix))
            logits = np.asarray(sess.run(logits_t, {images: inputs}), dtype=np.float32)
    logits = logits.reshape(expected.shape)
    diff = float(np.max(np.abs(logits - expected)))
    scale = float(np.max(np.abs(expected)))
    print(f"{config['config']}: TF-Slim restored {len(variables)} variables from slimtune's export; "
          f"max |TF - slimtune| {diff:.3g} (largest |logit| {scale:.4g}, ratio {diff / scale:.3g})")
    if not diff <= 1e-4 * scale:
        raise SystemExit(f"{config['config']}: TF-Slim's logits differ from slimtune's")
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / f"{config['config']}.npz", inputs=inputs, tf_logits=logits,
                        image_size=config["image_size"], num_variables=len(variables),
                        index_sha256=sha256(Path(str(prefix) + ".index")),
                        data_sha256=sha256(Path(str(prefix) + ".data-00000-of-00001")),
                        tf_version=tf.__version__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slim_src", default="/work/slim_src")
    parser.add_argument("--exports", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    env = load_slim(args.slim_src)
    for folder in sorted(Path(args.exports).iterdir()):
        if (folder / "config.json").is_file():
            check(env, folder, Path(args.out))


if __name__ == "__main__":
    main()
