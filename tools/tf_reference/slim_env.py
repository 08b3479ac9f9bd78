"""Import TF-Slim's ``research/slim`` source on TensorFlow 2.21 (developer-only oracle).

The research/slim tree (nets/, preprocessing/, datasets/) was written for TF 1.x: it does
``import tensorflow as tf`` and then uses ``tf.contrib.slim``, ``tf.variable_scope``,
``tf.contrib.layers`` and friends.  TF 2.21 has neither ``tf.contrib`` nor the 1.x names at the
top level, and tf_slim's ``batch_norm`` needs a module that tf-keras 2.21 moved.  This module
patches exactly that and nothing else, so the nets compute what slim computes.

Usage (run with /work/tfenv/bin/python; never imported by slimtune or its tests)::

    import sys; sys.path.insert(0, "/work/main/tools/tf_reference")
    from slim_env import load_slim

    slim_env = load_slim("/work/slim_src")          # research/slim checkout
    tf = slim_env.tf                                 # == tensorflow.compat.v1
    with tf.Graph().as_default():
        images = tf.placeholder(tf.float32, [2, 224, 224, 3])
        net_fn = slim_env.nets_factory.get_network_fn("resnet_v1_50", num_classes=1000)
        logits, end_points = net_fn(images)          # built inside its arg_scope
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            ...

    # other research/slim modules by their own import path:
    resnet_utils = slim_env.import_module("nets.resnet_utils")
    vgg_pre = slim_env.preprocessing_factory.get_preprocessing("vgg_16")

What it does:
  1. aliases ``tf_keras.legacy_tf_layers[.*]`` to ``tf_keras.src.legacy_tf_layers[.*]`` (TF 2.21
     lazily imports the former for ``tf.layers.BatchNormalization``, which tf_slim's batch_norm uses);
  2. registers ``tensorflow.contrib`` and its ``slim``/``framework``/``layers``/``training``/
     ``util``/``quantize`` pieces in ``sys.modules``, all backed by the ``tf_slim`` pip package;
  3. while importing the research/slim packages, makes ``import tensorflow`` resolve to a proxy
     that forwards to ``tensorflow.compat.v1`` and carries ``.contrib``.  The swap is undone
     afterwards; the slim modules keep the proxy as their ``tf`` global.
Everything runs in graph mode: build inside ``tf.Graph().as_default()`` and run with Sessions.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any

_SLIM_PACKAGES = ("nets", "preprocessing", "datasets", "deployment")


def _alias_tf_keras_legacy_layers() -> None:
    """Point tf_keras.legacy_tf_layers[.x] at tf_keras.src.legacy_tf_layers[.x] (TF 2.21 bug)."""
    import tf_keras
    import tf_keras.src.legacy_tf_layers as legacy

    sys.modules.setdefault("tf_keras.legacy_tf_layers", legacy)
    tf_keras.legacy_tf_layers = legacy
    for sub in ("base", "convolutional", "core", "normalization", "pooling",
                "migration_utils", "variable_scope_shim"):
        module = importlib.import_module(f"tf_keras.src.legacy_tf_layers.{sub}")
        sys.modules.setdefault(f"tf_keras.legacy_tf_layers.{sub}", module)
        setattr(legacy, sub, module)


class _HParams:
    """Minimal stand-in for tf.contrib.training.HParams (used by research/slim NASNet configs)."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def set_hparam(self, name: str, value: Any) -> None:
        if name not in self.__dict__:
            raise ValueError(f"unknown hparam {name}")
        self.__dict__[name] = value

    def add_hparam(self, name: str, value: Any) -> None:
        self.__dict__[name] = value

    def values(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def parse(self, spec: str) -> "_HParams":
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, raw = item.split("=", 1)
            current = self.__dict__[key]
            self.__dict__[key] = type(current)(raw) if not isinstance(current, bool) else raw.lower() in ("1", "true")
        return self


class _FallbackModule(types.ModuleType):
    """A module whose missing attributes come from a backing object (e.g. tf_slim)."""

    def __init__(self, name: str, backing: Any) -> None:
        super().__init__(name)
        self._backing = backing

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__"):
            raise AttributeError(item)
        return getattr(self._backing, item)


def _install_contrib(tf_real: Any) -> types.ModuleType:
    """Register a tf_slim-backed ``tensorflow.contrib`` in sys.modules and return it."""
    import tf_slim
    import tf_slim.nets

    if "tensorflow.contrib" in sys.modules:
        return sys.modules["tensorflow.contrib"]
    contrib = types.ModuleType("tensorflow.contrib")
    slim_mod = tf_slim  # tf.contrib.slim *is* tf_slim (same arg scopes, same layers)
    framework = _FallbackModule("tensorflow.contrib.framework", tf_slim)
    layers = _FallbackModule("tensorflow.contrib.layers", tf_slim)
    training = types.ModuleType("tensorflow.contrib.training")
    training.HParams = _HParams
    util = types.ModuleType("tensorflow.contrib.util")
    util.constant_value = tf_real.get_static_value
    util.make_tensor_proto = tf_real.make_tensor_proto
    quantize = types.ModuleType("tensorflow.contrib.quantize")

    def _no_quantize(*_args: Any, **_kwargs: Any) -> None:
        raise NotImplementedError("tf.contrib.quantize is gone in TF 2.x; not needed for float parity")

    quantize.create_eval_graph = _no_quantize
    quantize.create_training_graph = _no_quantize
    for name, module in (("slim", slim_mod), ("framework", framework), ("layers", layers),
                         ("training", training), ("util", util), ("quantize", quantize)):
        setattr(contrib, name, module)
        sys.modules[f"tensorflow.contrib.{name}"] = module
    sys.modules["tensorflow.contrib"] = contrib
    sys.modules["tensorflow.contrib.slim.nets"] = tf_slim.nets
    return contrib


class _TF1Proxy(types.ModuleType):
    """What ``import tensorflow as tf`` means inside research/slim: tf.compat.v1 plus .contrib."""

    def __init__(self, tf_real: Any, contrib: types.ModuleType) -> None:
        super().__init__("tensorflow")
        self._v1 = tf_real.compat.v1
        self._real = tf_real
        self.contrib = contrib
        # Keep submodule imports (``tensorflow.python.ops``) resolvable through the proxy.
        self.__path__ = list(getattr(tf_real, "__path__", []))
        self.__version__ = tf_real.__version__

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__"):
            raise AttributeError(item)
        try:
            return getattr(self._v1, item)
        except AttributeError:
            return getattr(self._real, item)


def _patch_control_flow_ops() -> None:
    """inception_preprocessing uses control_flow_ops.switch/merge; make sure both exist."""
    from tensorflow.python.ops import control_flow_ops

    if not hasattr(control_flow_ops, "switch") or not hasattr(control_flow_ops, "merge"):
        from tensorflow.python.ops import gen_control_flow_ops

        control_flow_ops.switch = getattr(control_flow_ops, "switch", gen_control_flow_ops.switch)
        control_flow_ops.merge = getattr(control_flow_ops, "merge", gen_control_flow_ops.merge)


@dataclass
class SlimModules:
    """The research/slim entry points plus the TF handles they run on."""

    tf: Any                      # tensorflow.compat.v1
    slim: Any                    # tf_slim
    nets_factory: Any
    preprocessing_factory: Any
    dataset_factory: Any | None
    slim_src: str
    versions: dict[str, str] = field(default_factory=dict)
    _proxy: Any = None

    def import_module(self, name: str) -> Any:
        """Import another research/slim module (e.g. 'nets.resnet_utils') under the shim."""
        return _import_with_proxy(name, self._proxy)


def _import_with_proxy(name: str, proxy: types.ModuleType) -> Any:
    """Import ``name`` while ``import tensorflow`` resolves to the TF1 proxy."""
    real = sys.modules["tensorflow"]
    sys.modules["tensorflow"] = proxy
    try:
        return importlib.import_module(name)
    finally:
        sys.modules["tensorflow"] = real


def load_slim(slim_src: str) -> SlimModules:
    """Apply every alias/patch and return research/slim's factories, ready for graph mode."""
    slim_src = os.path.abspath(slim_src)
    if not os.path.isfile(os.path.join(slim_src, "nets", "nets_factory.py")):
        raise FileNotFoundError(f"{slim_src} does not hold research/slim (nets/nets_factory.py missing)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf_real
    import tf_slim

    _alias_tf_keras_legacy_layers()
    _patch_control_flow_ops()
    contrib = _install_contrib(tf_real)
    proxy = _TF1Proxy(tf_real, contrib)

    for package in _SLIM_PACKAGES:
        loaded = sys.modules.get(package)
        if loaded is not None and not os.path.abspath(getattr(loaded, "__file__", "") or "").startswith(slim_src):
            raise ImportError(f"a different top-level '{package}' package is already imported: {loaded}")
    if slim_src not in sys.path:
        sys.path.insert(0, slim_src)

    nets_factory = _import_with_proxy("nets.nets_factory", proxy)
    preprocessing_factory = _import_with_proxy("preprocessing.preprocessing_factory", proxy)
    try:
        dataset_factory = _import_with_proxy("datasets.dataset_factory", proxy)
    except ImportError:  # dataset readers are optional for net parity
        dataset_factory = None
    versions = {"tensorflow": tf_real.__version__,
                "tf_slim": getattr(tf_slim, "__version__", _dist_version("tf-slim")),
                "tf_keras": _dist_version("tf-keras"),
                "slim_src_revision": _read_revision(slim_src)}
    return SlimModules(tf=tf_real.compat.v1, slim=tf_slim, nets_factory=nets_factory,
                       preprocessing_factory=preprocessing_factory, dataset_factory=dataset_factory,
                       slim_src=slim_src, versions=versions, _proxy=proxy)


def _dist_version(dist: str) -> str:
    """Installed version of a distribution, or 'unknown'."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _read_revision(slim_src: str) -> str:
    """First line of slim_src/SOURCE_REVISION (the upstream commit the tree was taken from)."""
    path = os.path.join(slim_src, "SOURCE_REVISION")
    if not os.path.isfile(path):
        return "unknown"
    with open(path, encoding="utf-8") as handle:
        return handle.readline().strip()
