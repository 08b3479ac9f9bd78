"""`--format tf-checkpoint`: slim's variable names, shapes and values, read back with slimtune's own V2 reader.

The reference is TF-Slim's own variable list recorded in the parity goldens (names and TF
shapes from the real slim graph) and the seeded TF-layout weights those goldens were made with:
a net restored from those weights must export exactly them again (the restore direction reversed).
`tools/tf_reference/check_exported_tf_checkpoint.py` loads such an export in TF-Slim itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from slimtune.checkpoint import read_checkpoint
from slimtune.checkpoint.restore import restore
from slimtune.checkpoint.tf_v2 import TFV2Reader
from slimtune.export import export
from slimtune.nets.registry import get_model_spec
from slimtune.testing import load_golden

GOLDEN = Path(__file__).parent / "golden"


def _run_from_golden(tmp_path: Path, config: str, image_size: int):
    reference = load_golden(GOLDEN / f"{config}.npz")
    spec = get_model_spec(reference.model_name)
    kwargs = {k: v for k, v in reference.model_kwargs.items() if k != "num_classes"}
    model = spec.build(reference.num_classes, image_size=image_size, **kwargs).eval()
    restore(model, reference.weights())
    run = tmp_path / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.ckpt-1.safetensors"),
              metadata={"model_name": reference.model_name, "num_classes": str(reference.num_classes),
                        "image_size": str(image_size), "format": "slimtune", "step": "1",
                        "class_names": json.dumps([str(i) for i in range(reference.num_classes)])})
    return reference, run / "model.ckpt-1.safetensors"


@pytest.mark.parametrize("config,size", [("mobilenet_v1_025", 96), ("lenet", 28), ("cifarnet", 32),
                                         pytest.param("resnet_v2_50", 64, marks=pytest.mark.slow)])
def test_tf_checkpoint_has_slims_names_layouts_and_values(tmp_path, config, size):
    reference, run = _run_from_golden(tmp_path, config, size)
    result = export(str(run), "tf-checkpoint", str(tmp_path / "out" / "model.ckpt"), quiet=True)
    assert result.comparison.max_abs_diff <= 1e-4 * result.comparison.largest_logit
    prefix = tmp_path / "out" / "model.ckpt"
    assert (tmp_path / "out" / "model.ckpt.index").is_file()
    assert (tmp_path / "out" / "model.ckpt.data-00000-of-00001").is_file()
    assert 'model_checkpoint_path: "model.ckpt"' in (tmp_path / "out" / "checkpoint").read_text()
    reader = TFV2Reader(str(prefix))
    expected = reference.weights()
    assert sorted(reader.keys()) == sorted(name for name, _ in reference.variables)
    for name, shape in reference.variables:
        assert tuple(reader.shape(name)) == tuple(shape), name
        np.testing.assert_array_equal(np.asarray(reader[name]), expected[name], err_msg=name)
    assert not list((tmp_path / "out").glob(".*partial*"))


@pytest.mark.slow  # the export's own verification (restore into a fresh net, same logits) runs every time
def test_tf_checkpoint_round_trips_through_restore(tmp_path):
    """What `slimtune train --checkpoint_path` would restore from the export is the trained net."""
    reference, run = _run_from_golden(tmp_path, "mobilenet_v1_025", 96)
    out = tmp_path / "export" / "mnet.ckpt"
    export(str(run), "tf-checkpoint", str(out), quiet=True)
    spec = get_model_spec("mobilenet_v1_025")
    model = spec.build(1001).eval()
    restore(model, str(out))
    original = read_checkpoint(str(run))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, torch.as_tensor(np.asarray(original[name])), rtol=0, atol=0)


@pytest.mark.parametrize("config", ["mobilenet_v1_025", pytest.param("resnet_v2_50", marks=pytest.mark.slow)])
def test_tf_slim_loaded_this_export_and_computed_the_same_logits(tmp_path, config):
    """tests/fixtures/export_tf/<config>.npz records what TF-Slim (tf.train.Saver + research/slim's
    net) computed from a slimtune export of these weights, and the SHA-256 of the files it loaded
    (tools/tf_reference/check_exported_tf_checkpoint.py): today's export must write the very same
    bytes, and slimtune's net must compute TF's logits on the same photos."""
    import hashlib

    fixture = np.load(Path(__file__).parent / "fixtures" / "export_tf" / f"{config}.npz")
    reference, weights = _run_from_golden(tmp_path, config, int(fixture["image_size"]))
    prefix = tmp_path / "export" / "model.ckpt"
    export(str(weights), "tf-checkpoint", str(prefix), quiet=True)
    for suffix, key in ((".index", "index_sha256"), (".data-00000-of-00001", "data_sha256")):
        digest = hashlib.sha256(Path(str(prefix) + suffix).read_bytes()).hexdigest()
        assert digest == str(fixture[key]), f"{suffix} differs from the bundle TF-Slim loaded"
    model = get_model_spec(reference.model_name).build(reference.num_classes).eval()
    restore(model, str(prefix))
    with torch.no_grad():
        logits = model(torch.from_numpy(fixture["inputs"]).permute(0, 3, 1, 2).contiguous()).numpy()
    tf_logits = fixture["tf_logits"]
    assert np.max(np.abs(logits - tf_logits)) <= 1e-4 * np.max(np.abs(tf_logits))
    assert len(np.unique(tf_logits.argmax(-1))) > 1 or tf_logits.shape[0] == 1  # photos tell apart
