"""Generate TF-Slim golden outputs (and a few TF checkpoints) for slimtune's parity tests.

Developer-only: run with the TensorFlow reference environment, never at test time::

    /work/tfenv/bin/python tools/tf_reference/make_parity_fixtures.py \
        --slim_src /work/slim_src --out tests/golden [--nets vgg_16,lenet] [--seed 0] [--write_checkpoint]

For every config it builds the research/slim net in graph mode inside its nets_factory arg_scope
(is_training=False), assigns ``slimtune.testing.seeded_slim_weights`` to every variable, runs the
two ``seeded_inputs`` images and writes ``<out>/<config>.npz`` (see slimtune.testing for the
format).  It refuses to write a fixture whose logits are non-finite, constant, or nearly the same
for both images: such a fixture would pass for a broken net.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent.parent
sys.path.insert(0, str(_HERE))

from slim_env import load_slim  # noqa: E402


def _load_testing_module() -> Any:
    """Load src/slimtune/testing.py by path: it is numpy-only, while the slimtune package
    imports torch, which the TF environment does not have."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slimtune_testing", _REPO / "src" / "slimtune" / "testing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


_testing = _load_testing_module()
seeded_inputs = _testing.seeded_inputs
seeded_slim_weights = _testing.seeded_slim_weights
write_golden = _testing.write_golden

BATCH = 2
MIN_RELATIVE_LOGIT_DIFFERENCE = 0.05


@dataclass(frozen=True)
class FixtureConfig:
    """One golden: which slim net, with which kwargs, at which input size."""

    model_name: str                      # nets_factory name
    num_classes: int | None
    image_size: int
    net_kwargs: dict[str, Any] = field(default_factory=dict)   # extra kwargs to the net function
    channels: int = 3
    checkpoint: str | None = None        # "v1" / "v2": --write_checkpoint saves this TF format
    image_width: int | None = None       # a non-square input: image_size x image_width (height x width)


CONFIGS: dict[str, FixtureConfig] = {
    # Small nets (MNIST / CIFAR-10 sizes).
    "lenet": FixtureConfig("lenet", 10, 28, channels=1),
    "cifarnet": FixtureConfig("cifarnet", 10, 32),
    # VGG / AlexNet / OverFeat: 1000 classes, no BatchNorm, biases everywhere.
    "vgg_a": FixtureConfig("vgg_a", 1000, 224),
    "vgg_16": FixtureConfig("vgg_16", 1000, 224),
    "vgg_19": FixtureConfig("vgg_19", 1000, 224),
    "vgg_16_headless": FixtureConfig("vgg_16", 0, 224),
    "vgg_16_gp256": FixtureConfig("vgg_16", 1000, 256, {"global_pool": True}),
    "alexnet_v2": FixtureConfig("alexnet_v2", 1000, 224),
    "overfeat": FixtureConfig("overfeat", 1000, 231),
    # Dense (fully convolutional) and any-size modes of the conv-as-FC heads; 1000 classes so that
    # each shares its seeded weights with the family's main config (the tests generate them once).
    "vgg_16_dense100": FixtureConfig("vgg_16", 1000, 100, {"fc_conv_padding": "SAME", "spatial_squeeze": False}),
    "alexnet_v2_gp257": FixtureConfig("alexnet_v2", 1000, 257, {"global_pool": True}),
    "alexnet_v2_headless": FixtureConfig("alexnet_v2", 0, 224),
    "overfeat_dense263": FixtureConfig("overfeat", 1000, 263, {"spatial_squeeze": False}),
    # ResNet v1 (1000 classes, as the published slim checkpoints) and v2 (1001 classes).
    "resnet_v1_50": FixtureConfig("resnet_v1_50", 1000, 224),
    "resnet_v1_101": FixtureConfig("resnet_v1_101", 1000, 224),
    "resnet_v1_152": FixtureConfig("resnet_v1_152", 1000, 224),
    "resnet_v1_200": FixtureConfig("resnet_v1_200", 1000, 224),
    "resnet_v1_50_os16": FixtureConfig("resnet_v1_50", 1000, 224, {"output_stride": 16}),
    "resnet_v1_50_os8": FixtureConfig("resnet_v1_50", 1000, 224, {"output_stride": 8}),
    "resnet_v1_50_headless": FixtureConfig("resnet_v1_50", 0, 224),
    "resnet_v2_50": FixtureConfig("resnet_v2_50", 1001, 224),
    "resnet_v2_101": FixtureConfig("resnet_v2_101", 1001, 224),
    "resnet_v2_152": FixtureConfig("resnet_v2_152", 1001, 224),
    "resnet_v2_200": FixtureConfig("resnet_v2_200", 1001, 224),
    "resnet_v2_50_headless": FixtureConfig("resnet_v2_50", 0, 224),
    # Dense prediction mode at an odd size: feature maps 50->25->13->7->4 exercise SAME padding.
    "resnet_v2_50_nopool": FixtureConfig("resnet_v2_50", 1001, 100,
                                         {"global_pool": False, "spatial_squeeze": False}),
    # MobileNets (1001 classes).
    "mobilenet_v1": FixtureConfig("mobilenet_v1", 1001, 224),
    "mobilenet_v1_075": FixtureConfig("mobilenet_v1_075", 1001, 224),
    "mobilenet_v1_050": FixtureConfig("mobilenet_v1_050", 1001, 224),
    "mobilenet_v1_025": FixtureConfig("mobilenet_v1_025", 1001, 224),
    "mobilenet_v1_160": FixtureConfig("mobilenet_v1", 1001, 160),
    "mobilenet_v2": FixtureConfig("mobilenet_v2", 1001, 224),
    "mobilenet_v2_140": FixtureConfig("mobilenet_v2_140", 1001, 224),
    "mobilenet_v2_035": FixtureConfig("mobilenet_v2_035", 1001, 224),
    # MobileNet variants (small multipliers keep them cheap): the published 0.5_160 and 0.25_128
    # sizes, any size with global_pool (odd: symmetric SAME pads), dense logits (AvgPool_1a's
    # stride 2 at 320 -> 2x2), v2's output_stride (atrous) and use_explicit_padding (differs from
    # SAME at even sizes).
    "mobilenet_v1_050_160": FixtureConfig("mobilenet_v1_050", 1001, 160),
    "mobilenet_v1_025_128": FixtureConfig("mobilenet_v1_025", 1001, 128),
    "mobilenet_v1_025_gp193": FixtureConfig("mobilenet_v1_025", 1001, 193, {"global_pool": True}),
    "mobilenet_v1_025_dense320": FixtureConfig("mobilenet_v1_025", 1001, 320, {"spatial_squeeze": False}),
    "mobilenet_v2_035_os16": FixtureConfig("mobilenet_v2_035", 1001, 224, {"output_stride": 16}),
    "mobilenet_v2_035_explicit150": FixtureConfig("mobilenet_v2_035", 1001, 150, {"use_explicit_padding": True}),
    # Checkpoint fixtures: real TF-written files, kept small (few classes, tiny images) so they
    # can be committed (~0.5 + 0.8 + 0.9 MB).  The fc3 input of lenet and cifarnet grows with
    # the image (4x4 pools down to 1x1x64), and their conv layers are the same at any size.
    "lenet_ckpt": FixtureConfig("lenet", 10, 4, channels=1, checkpoint="v1"),
    "cifarnet_ckpt": FixtureConfig("cifarnet", 10, 4, checkpoint="v2"),
    "mobilenet_v1_025_ckpt": FixtureConfig("mobilenet_v1_025", 10, 64, checkpoint="v2"),
    # ResNet extras at odd sizes: store_non_strided_activations with output_stride 16 (both of
    # stack_blocks_dense's post-block branches: subsample, then rate *= block stride), v1's
    # depth_multiplier/min_base_depth with dense logits, and v2's atrous output_stride 8.
    "resnet_v1_50_nonstrided_os16": FixtureConfig("resnet_v1_50", 1000, 97,
                                                  {"store_non_strided_activations": True, "output_stride": 16}),
    "resnet_v1_50_dm025_dense65": FixtureConfig("resnet_v1_50", 10, 65,
                                                {"depth_multiplier": 0.25, "min_base_depth": 20,
                                                 "global_pool": False, "spatial_squeeze": False}),
    "resnet_v2_50_os8": FixtureConfig("resnet_v2_50", 1001, 97, {"output_stride": 8}),
}
# Functions called with the loaded slim environment before any fixture is made (e.g. to register
# fixture-only networks in nets_factory's maps).
SLIM_HOOKS: list[Any] = []

# ---- BEGIN inception configs (issue 13: Inception v1-v4, Inception-ResNet-v2) ----------------------
# Reduced widths (depth_multiplier) and small inputs keep the default-run goldens cheap; the full
# nets at their published sizes are checked too (their tests run with -m slow). Sizes: v3's 224
# renames AuxLogits/Conv2d_2a_5x5 to Conv2d_2a_3x3; 107 is the smallest input v3/v4/IRv2 accept
# with their aux head. Options of slim's base networks that the net functions do not forward
# (final_endpoint, use_separable_conv, align_feature_maps, output_stride) reach them through
# `_register_inception_extras`; a config with final_endpoint runs the base only (no classes), and
# its golden's logits are the base output.
INCEPTION_CONFIGS: dict[str, FixtureConfig] = {
    "inception_v1": FixtureConfig("inception_v1", 1001, 224),
    "inception_v1_gp160": FixtureConfig("inception_v1", 1001, 160, {"global_pool": True}),
    "inception_v2": FixtureConfig("inception_v2", 1001, 224),
    "inception_v2_dm025": FixtureConfig("inception_v2", 1001, 224, {"depth_multiplier": 0.25}),
    "inception_v2_dm025_gp97": FixtureConfig("inception_v2", 1001, 97, {"depth_multiplier": 0.25,
                                                                       "global_pool": True}),
    "inception_v2_dm025_noseparable": FixtureConfig("inception_v2", 1001, 150, {"depth_multiplier": 0.25,
                                                                               "use_separable_conv": False}),
    "inception_v3": FixtureConfig("inception_v3", 1001, 299),
    "inception_v3_dm025": FixtureConfig("inception_v3", 1001, 299, {"depth_multiplier": 0.25}),
    "inception_v3_dm025_224": FixtureConfig("inception_v3", 1001, 224, {"depth_multiplier": 0.25}),
    "inception_v3_dm025_gp331": FixtureConfig("inception_v3", 1001, 331, {"depth_multiplier": 0.25,
                                                                         "global_pool": True}),
    "inception_v3_dm025_headless": FixtureConfig("inception_v3", 0, 299, {"depth_multiplier": 0.25}),
    "inception_v3_dm025_base_6a": FixtureConfig("inception_v3", None, 150, {"depth_multiplier": 0.25,
                                                                           "final_endpoint": "Mixed_6a"}),
    "inception_v4": FixtureConfig("inception_v4", 1001, 299),
    "inception_v4_107": FixtureConfig("inception_v4", 1001, 107),
    "inception_resnet_v2": FixtureConfig("inception_resnet_v2", 1001, 299),
    "inception_resnet_v2_107": FixtureConfig("inception_resnet_v2", 1001, 107),
    "inception_resnet_v2_aligned_99": FixtureConfig("inception_resnet_v2", 1001, 99, {"align_feature_maps": True}),
    "inception_resnet_v2_relu6_noaux75": FixtureConfig("inception_resnet_v2", 1001, 75,
                                                       {"activation_fn": "relu6", "create_aux_logits": False}),
    "inception_resnet_v2_base_os8": FixtureConfig("inception_resnet_v2", None, 75,
                                                  {"final_endpoint": "PreAuxLogits", "output_stride": 8}),
    # TF-written checkpoints (V1 and V2 formats), thin nets and few classes so they stay small.
    "inception_v2_ckpt": FixtureConfig("inception_v2", 10, 64, {"depth_multiplier": 0.1, "global_pool": True},
                                       checkpoint="v1"),
    "inception_v3_ckpt": FixtureConfig("inception_v3", 10, 107, {"depth_multiplier": 0.1}, checkpoint="v2"),
}
CONFIGS.update(INCEPTION_CONFIGS)

# Base-network options per net: (module, net function, base function, options the net does not forward).
_INCEPTION_BASE_OPTIONS = {
    "inception_v2": ("nets.inception_v2", "inception_v2_base", ("final_endpoint", "use_separable_conv")),
    "inception_v3": ("nets.inception_v3", "inception_v3_base", ("final_endpoint",)),
    "inception_v4": ("nets.inception_v4", "inception_v4_base", ("final_endpoint",)),
    "inception_resnet_v2": ("nets.inception_resnet_v2", "inception_resnet_v2_base",
                            ("final_endpoint", "align_feature_maps", "output_stride")),
}


def _register_inception_extras(env: Any) -> None:
    """Let the Inception net functions take their base network's options: with final_endpoint the
    base alone runs (slim's *_base(images, final_endpoint=...)); the other options reach the base
    the net builds. Without them the nets are exactly slim's."""
    for net, (module_name, base_name, options) in _INCEPTION_BASE_OPTIONS.items():
        module = env.import_module(module_name)
        original = env.nets_factory.networks_map[net]

        def network(images: Any, num_classes: Any = None, is_training: bool = False, *, _module: Any = module,
                    _base: str = base_name, _options: tuple = options, _net: Any = original, **kwargs: Any) -> Any:
            base_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in _options}
            if isinstance(kwargs.get("activation_fn"), str):  # 'relu6' in the golden -> tf.nn.relu6
                kwargs["activation_fn"] = getattr(env.tf.nn, kwargs["activation_fn"])
            base = getattr(_module, _base)
            if "final_endpoint" in base_kwargs:
                slim = _module.slim  # the nets set batch norm's and dropout's mode this way
                with slim.arg_scope([slim.batch_norm, slim.dropout], is_training=is_training):
                    return base(images, **base_kwargs, **kwargs)
            setattr(_module, _base, functools.partial(base, **base_kwargs))
            try:
                return _net(images, num_classes=num_classes, is_training=is_training, **kwargs)
            finally:
                setattr(_module, _base, base)

        network.default_image_size = original.default_image_size
        env.nets_factory.networks_map[net] = network


SLIM_HOOKS.append(_register_inception_extras)
# ---- END inception configs -----------------------------------------------------------------------


# ---- MOBILENET_V3 block (begin) -----------------------------------------------------------------
# MobileNet v3 is not in /work/slim_src (67c403fc); generate these configs from a later tree:
#   --slim_src /work/slim_src_v3        upstream 0ba83cf0: nets/mobilenet/mobilenet_v3.py (v3 nets)
#   --slim_src /work/slim_src_edgetpu   the same tree with mobilenet_v3.py of upstream 03cdc5fe,
#                                       which adds V3_EDGETPU (mobilenet_edgetpu*)
# Each golden records the tree's SOURCE_REVISION. Neither tree's nets_factory lists these nets yet;
# _mobilenet_v3_network_fn builds them as upstream's later nets_factory does: inside
# mobilenet_v3.training_scope(weight_decay=...), called with num_classes and is_training=False.
# Late-2019 research/slim still writes `np.int` (gone in numpy 2) when mobilenet_v3 is imported,
# and `from tensorflow.contrib import slim` (slim_env registers tensorflow.contrib.* for that).
if "int" not in np.__dict__:
    np.int = int  # type: ignore[attr-defined]

#: nets_factory name -> (mobilenet_v3 attribute, which tree has it)
MOBILENET_V3_FACTORY: dict[str, tuple[str, str]] = {
    "mobilenet_v3_large": ("large", "/work/slim_src_v3"),
    "mobilenet_v3_small": ("small", "/work/slim_src_v3"),
    "mobilenet_v3_large_minimalistic": ("large_minimalistic", "/work/slim_src_v3"),
    "mobilenet_v3_small_minimalistic": ("small_minimalistic", "/work/slim_src_v3"),
    "mobilenet_edgetpu": ("edge_tpu", "/work/slim_src_edgetpu"),
    "mobilenet_edgetpu_075": ("edge_tpu_075", "/work/slim_src_edgetpu"),
}


def _mobilenet_v3_function(env: Any, model_name: str) -> Any:
    """research/slim's mobilenet_v3.<fn> for a nets_factory name, or a clear error naming the tree."""
    attribute, tree = MOBILENET_V3_FACTORY[model_name]
    try:
        module = env.import_module("nets.mobilenet.mobilenet_v3")
    except ImportError as error:
        raise SystemExit(f"{model_name}: {env.slim_src} has no nets/mobilenet/mobilenet_v3.py ({error}); "
                         f"run with --slim_src {tree}")
    if not hasattr(module, attribute):
        raise SystemExit(f"{model_name}: {env.slim_src}'s mobilenet_v3.py has no {attribute}; "
                         f"run with --slim_src {tree}")
    return getattr(module, attribute)


def _mobilenet_v3_network_fn(env: Any, model_name: str, num_classes: int | None) -> Any:
    """Upstream nets_factory's network_fn for the v3 family (arg scope: mobilenet_v3.training_scope)."""
    func = _mobilenet_v3_function(env, model_name)
    module = env.import_module("nets.mobilenet.mobilenet_v3")

    def network_fn(images: Any, **kwargs: Any) -> Any:
        with env.slim.arg_scope(module.training_scope(weight_decay=0.0)):
            return func(images, num_classes=num_classes, is_training=False, **kwargs)
    return network_fn


def _mobilenet_v3_configs_elsewhere(names: list[str], slim_src: str) -> list[str]:
    """With --nets all, the MOBILENET_V3 configs whose tree is not --slim_src (they are made by
    their own run, see above); every other config stays."""
    here = os.path.realpath(slim_src)
    return [name for name in names if CONFIGS[name].model_name in MOBILENET_V3_FACTORY
            and os.path.realpath(MOBILENET_V3_FACTORY[CONFIGS[name].model_name][1]) != here]


CONFIGS.update({
    # The six nets at their published size (1001 classes).
    "mobilenet_v3_large": FixtureConfig("mobilenet_v3_large", 1001, 224),
    "mobilenet_v3_small": FixtureConfig("mobilenet_v3_small", 1001, 224),
    "mobilenet_v3_large_minimalistic": FixtureConfig("mobilenet_v3_large_minimalistic", 1001, 224),
    "mobilenet_v3_small_minimalistic": FixtureConfig("mobilenet_v3_small_minimalistic", 1001, 224),
    "mobilenet_edgetpu": FixtureConfig("mobilenet_edgetpu", 1001, 224),
    "mobilenet_edgetpu_075": FixtureConfig("mobilenet_edgetpu_075", 1001, 224),
    # A non-square input: the last map (8x10) is not square, so reduce_to_1x1 falls back to its 7x7/1
    # VALID window (2x4), Conv_2 runs on that and the global pool averages it.
    "mobilenet_v3_small_250x300": FixtureConfig("mobilenet_v3_small", 1001, 250, image_width=300),
    # The published 0.75 multiplier of v3-large at a small odd size (asymmetric SAME pads).
    "mobilenet_v3_large_075_97": FixtureConfig("mobilenet_v3_large", 1001, 97, {"depth_multiplier": 0.75}),
    # finegrain_classification_mode keeps Conv_2 at 1024 under a 0.5 multiplier.
    "mobilenet_v3_small_minimalistic_050_finegrain": FixtureConfig(
        "mobilenet_v3_small_minimalistic", 1001, 96,
        {"depth_multiplier": 0.5, "finegrain_classification_mode": True}),
    # output_stride 4: past stride 4 the fused blocks keep their own stride (slim's partial) while
    # the later depthwise convs turn atrous (rates 2, 4, 8).
    "mobilenet_edgetpu_075_os4": FixtureConfig("mobilenet_edgetpu_075", 1001, 96, {"output_stride": 4}),
    # Real TF-written checkpoints, small enough to commit: V2 (v3-large: squeeze-excite, hard-swish,
    # biased Conv_2) and V1 (EdgeTPU: fused blocks).
    "mobilenet_v3_large_025_ckpt": FixtureConfig("mobilenet_v3_large", 10, 64, {"depth_multiplier": 0.25},
                                                 checkpoint="v2"),
    "mobilenet_edgetpu_025_ckpt": FixtureConfig("mobilenet_edgetpu", 10, 64, {"depth_multiplier": 0.25},
                                                checkpoint="v1"),
})
# ---- MOBILENET_V3 block (end) -------------------------------------------------------------------


def _get_network_fn(env: Any, model_name: str, num_classes: int | None) -> Any:
    """The slim tree's nets_factory network_fn (inference, no weight decay), or, for nets that this
    tree's nets_factory does not list yet, the same construction from a block below."""
    if model_name in MOBILENET_V3_FACTORY:
        return _mobilenet_v3_network_fn(env, model_name, num_classes)
    return env.nets_factory.get_network_fn(model_name, num_classes=num_classes, weight_decay=0.0,
                                           is_training=False)


def _networks_map_entry(env: Any, model_name: str) -> Any:
    """The nets_factory networks_map function of a net (see _get_network_fn)."""
    if model_name in MOBILENET_V3_FACTORY:
        return _mobilenet_v3_function(env, model_name)
    return env.nets_factory.networks_map[model_name]


# ---- NASNET block (NASNet-A / PNASNet-5): begin -------------------------------------------------
# Reduced variants (fewer cells and filters; slim's own hyper-parameters otherwise) keep the
# committed goldens small. Flat hyper-parameter kwargs (num_cells=...) become slim's `config=`
# HParams (see _nasnet_call_kwargs). The aux head exists only in slim's training graph, so the
# recorded variable list comes from a training graph (_nasnet_manifest): the eval run uses a subset.
# Sizes >= 115 give the aux head a map >= 8 (a 2x2 aux conv); 121 is odd (SAME and factorized
# reduction at odd sizes).
_NASNET_SMALL = {"num_cells": 6, "num_conv_filters": 8}
_NASNET_LARGE_SMALL = {"num_cells": 6, "num_conv_filters": 12}
NASNET_CONFIGS: dict[str, FixtureConfig] = {
    "nasnet_cifar_r": FixtureConfig("nasnet_cifar", 10, 32, dict(_NASNET_SMALL)),
    "nasnet_mobile_r": FixtureConfig("nasnet_mobile", 1001, 121, dict(_NASNET_SMALL)),
    "nasnet_mobile_r_headless": FixtureConfig("nasnet_mobile", 0, 121, dict(_NASNET_SMALL)),
    "nasnet_mobile_r_bounded": FixtureConfig("nasnet_mobile", 1001, 121,
                                             {**_NASNET_SMALL, "use_bounded_activation": True}),
    "nasnet_large_r": FixtureConfig("nasnet_large", 1001, 121, dict(_NASNET_LARGE_SMALL)),
    "pnasnet_mobile_r": FixtureConfig("pnasnet_mobile", 1001, 121, dict(_NASNET_SMALL)),
    "pnasnet_large_r": FixtureConfig("pnasnet_large", 1001, 121, dict(_NASNET_LARGE_SMALL)),
    # Not yet generated nor tested (10-15 min of TF each on the shared 2-core machine): the bounded
    # and headless variants and the published mobile architectures at 224 (meant for -m slow).
    "nasnet_mobile": FixtureConfig("nasnet_mobile", 1001, 224),
    "pnasnet_mobile": FixtureConfig("pnasnet_mobile", 1001, 224),
    # TF-written checkpoints (V1 and V2), tiny: no aux head, so the eval graph holds every variable.
    "nasnet_cifar_ckpt": FixtureConfig("nasnet_cifar", 10, 8, {"num_cells": 3, "num_conv_filters": 4,
                                                                "use_aux_head": 0}, checkpoint="v1"),
    "pnasnet_mobile_ckpt": FixtureConfig("pnasnet_mobile", 10, 40, {"num_cells": 3, "num_conv_filters": 4,
                                                                     "use_aux_head": 0}, checkpoint="v2"),
}
CONFIGS.update(NASNET_CONFIGS)
_NASNET_DEFAULT_CONFIGS = {
    "nasnet_cifar": ("nets.nasnet.nasnet", "cifar_config"),
    "nasnet_mobile": ("nets.nasnet.nasnet", "mobile_imagenet_config"),
    "nasnet_large": ("nets.nasnet.nasnet", "large_imagenet_config"),
    "pnasnet_mobile": ("nets.nasnet.pnasnet", "mobile_imagenet_config"),
    "pnasnet_large": ("nets.nasnet.pnasnet", "large_imagenet_config"),
}


def _nasnet_call_kwargs(env: Any, config: FixtureConfig) -> dict[str, Any]:
    """The net function's kwargs: for NASNet/PNASNet, hyper-parameters go into slim's `config` HParams."""
    if config.model_name not in _NASNET_DEFAULT_CONFIGS or not config.net_kwargs:
        return dict(config.net_kwargs)
    module_name, function_name = _NASNET_DEFAULT_CONFIGS[config.model_name]
    hparams = getattr(env.import_module(module_name), function_name)()
    for key, value in config.net_kwargs.items():
        hparams.set_hparam(key, value)
    return {"config": hparams}


def _nasnet_manifest(env: Any, config: FixtureConfig, manifest: list) -> list:
    """NASNet/PNASNet with classes: the variables of slim's training graph (eval's plus the aux head)."""
    if config.model_name not in _NASNET_DEFAULT_CONFIGS or not config.num_classes:
        return manifest
    tf = env.tf
    with tf.Graph().as_default():
        images = tf.placeholder(tf.float32, [BATCH, config.image_size, config.image_size, config.channels])
        network_fn = env.nets_factory.get_network_fn(config.model_name, num_classes=config.num_classes,
                                                     weight_decay=0.0, is_training=True)
        network_fn(images, **_nasnet_call_kwargs(env, config))
        model_variables = set(v.name for v in tf.model_variables())
        full = [(v.op.name, tuple(v.shape.as_list())) for v in tf.global_variables() if v.name in model_variables]
    assert set(manifest) <= set(full), f"{config.model_name}: eval variables missing from the training graph"
    return full
# ---- NASNET block: end ---------------------------------------------------------------------------


def _partial_keywords(fn: Any) -> dict[str, Any]:
    """Keyword defaults a nets_factory entry bakes in (e.g. depth_multiplier of mobilenet_v1_075)."""
    keywords: dict[str, Any] = {}
    while isinstance(fn, functools.partial):
        keywords = {**fn.keywords, **keywords}
        fn = fn.func
    return {k: v for k, v in keywords.items() if isinstance(v, (int, float, str, bool, type(None)))}


def _check_logits(name: str, logits: np.ndarray) -> float:
    """Refuse weak fixtures: non-finite, constant, or the two images giving similar logits."""
    assert np.all(np.isfinite(logits)), f"{name}: logits are not finite"
    flat = logits.reshape(logits.shape[0], -1).astype(np.float64)
    assert flat.std() > 1e-6 * max(np.abs(flat).max(), 1e-30), f"{name}: logits are constant"
    assert np.all(flat.std(axis=1) > 0), f"{name}: logits of one image are constant"
    difference = np.linalg.norm(flat[0] - flat[1]) / max(np.linalg.norm(flat[0]), np.linalg.norm(flat[1]))
    assert difference > MIN_RELATIVE_LOGIT_DIFFERENCE, (
        f"{name}: the two inputs give logits only {difference:.2%} apart; the fixture would be weak")
    return float(difference)


def _assert_inference_graph(name: str, graph: Any) -> None:
    """Inference means BN uses moving statistics and dropout is off; check the graph says so."""
    for op in graph.get_operations():
        if op.type.startswith("FusedBatchNorm"):
            assert not op.get_attr("is_training"), f"{name}: {op.name} normalises with batch statistics"
        assert "/moments/" not in op.name, f"{name}: {op.name} computes batch moments (training-mode BN)"
        random = op.type.startswith("Random") and "/Initializer/" not in op.name  # initializers are fine
        assert not random, f"{name}: {op.name} ({op.type}) is random (dropout on?)"


def make_fixture(env: Any, config_name: str, config: FixtureConfig, out_dir: Path, seed: int,
                 write_checkpoint: bool) -> dict[str, Any]:
    """Build, run and record one config; return a summary line's data."""
    tf = env.tf
    started = time.time()
    width = config.image_width or config.image_size
    inputs = seeded_inputs(BATCH, config.image_size, width, config.channels, seed)
    graph = tf.Graph()
    with graph.as_default():
        images = tf.placeholder(tf.float32, [BATCH, config.image_size, width, config.channels],
                                name="images")
        network_fn = _get_network_fn(env, config.model_name, num_classes=config.num_classes)
        logits_t, end_points_t = network_fn(images, **_nasnet_call_kwargs(env, config))
        _assert_inference_graph(config_name, graph)
        variables = tf.global_variables()
        model_variables = set(v.name for v in tf.model_variables())
        extra = [v.name for v in variables if v.name not in model_variables]
        assert not extra, f"{config_name}: non-model variables in an inference graph: {extra[:5]}"
        manifest = [(v.op.name, tuple(v.shape.as_list())) for v in variables]
        manifest = _nasnet_manifest(env, config, manifest)
        weights = seeded_slim_weights(manifest, seed)
        with tf.Session(graph=graph) as sess:
            for variable in variables:
                variable.load(weights[variable.op.name], session=sess)
            fetched = sess.run({"logits": logits_t, "end_points": dict(end_points_t)}, {images: inputs})
            if write_checkpoint and config.checkpoint:
                version = (tf.train.SaverDef.V1 if config.checkpoint == "v1" else tf.train.SaverDef.V2)
                saver = tf.train.Saver(var_list=variables, write_version=version)
                saver.save(sess, str(out_dir / f"{config_name}.ckpt"), write_meta_graph=False,
                           write_state=False)
    logits = np.asarray(fetched["logits"], dtype=np.float32)
    difference = _check_logits(config_name, logits)
    for ep_name, value in fetched["end_points"].items():
        assert np.all(np.isfinite(value)), f"{config_name}: end point {ep_name} is not finite"
    model_kwargs = {"num_classes": config.num_classes, **_partial_keywords(
        _networks_map_entry(env, config.model_name)), **config.net_kwargs}
    versions = {key: str(value) for key, value in env.versions.items()}
    path = write_golden(out_dir / f"{config_name}.npz", config_name=config_name, model_name=config.model_name,
                        model_kwargs=model_kwargs, seed=seed, input_seed=seed, inputs=inputs,
                        variables=manifest, logits=logits, end_points=fetched["end_points"],
                        versions=versions)
    return {"config": config_name, "logits_shape": logits.shape, "end_points": len(fetched["end_points"]),
            "variables": len(manifest), "logit_difference": difference,
            "max_abs_logit": float(np.abs(logits).max()), "bytes": path.stat().st_size,
            "seconds": time.time() - started}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slim_src", default="/work/slim_src", help="research/slim checkout")
    parser.add_argument("--out", default=str(_REPO / "tests" / "golden"), help="output directory")
    parser.add_argument("--nets", default="all", help="comma list of config names, or 'all'")
    parser.add_argument("--seed", type=int, default=0, help="weights and inputs seed")
    parser.add_argument("--write_checkpoint", action="store_true",
                        help="also save the TF checkpoint of configs that name a format (V1/V2)")
    parser.add_argument("--list", action="store_true", help="print the config table and exit")
    args = parser.parse_args(argv)

    if args.list:
        for name, config in CONFIGS.items():
            print(f"{name:24s} {config.model_name:18s} classes={config.num_classes} "
                  f"size={config.image_size} {config.net_kwargs} {config.checkpoint or ''}")
        return 0
    names = list(CONFIGS) if args.nets == "all" else [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; see --list")
    if args.nets == "all":
        elsewhere = _mobilenet_v3_configs_elsewhere(names, args.slim_src)
        if elsewhere:
            print(f"skipping {len(elsewhere)} MobileNet v3 config(s) that need another --slim_src "
                  "(tools/tf_reference/README.md, section 5)")
        names = [name for name in names if name not in elsewhere]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = load_slim(args.slim_src)
    for hook in SLIM_HOOKS:
        hook(env)
    print(f"versions: {env.versions}")
    total = 0
    for name in names:
        summary = make_fixture(env, name, CONFIGS[name], out_dir, args.seed, args.write_checkpoint)
        total += summary["bytes"]
        print(f"{name:24s} logits{tuple(summary['logits_shape'])} end_points={summary['end_points']:3d} "
              f"vars={summary['variables']:4d} diff={summary['logit_difference']:.2f} "
              f"max|logit|={summary['max_abs_logit']:.3g} {summary['bytes'] / 1024:.0f} KiB "
              f"{summary['seconds']:.1f}s", flush=True)
    print(f"total golden size: {total / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raise SystemExit(main())
