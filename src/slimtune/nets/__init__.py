"""slimtune's networks: one file per slim family, registered with `register_model`.

The model contract
------------------
Every registered net honours it; ``tests/test_models.py`` checks each clause on every net that
`list_models()` returns, so a new family is checked the moment it registers.

1. **Build.** ``create_model(name, num_classes=None, **options)`` (or the registered builder) gives a
   `SlimNet`; ``num_classes=0`` builds a headless backbone. It builds on the meta device too
   (``with torch.device("meta")``), which is how shapes are checked at no cost.
2. **Train.** In train mode, ``model(x)`` is ``[N, num_classes]`` and a backward pass reaches
   every parameter that requires grad (nothing is built that the forward pass skips).
3. **Headless.** With ``num_classes=0``, ``model(x)`` is the pooled features ``[N, num_features]``
   and no variable of a classifier-head scope exists.
4. **Entry points** (one signature on every net, from `SlimNet`; a net implements only the hooks
   ``_forward_features``, ``_forward_head`` and ``_build_classifier``):
   ``forward_features(x)`` -> the final feature map before pooling and head;
   ``forward_head(features, pre_logits=False)`` -> logits, or ``[N, num_features]``;
   ``forward(x, with_end_points=False)`` and ``forward_endpoints(x)`` -> slim's
   ``(logits, end_points)``; ``forward(x) == forward_head(forward_features(x))``.
5. **Heads.** ``get_classifier()`` is the main classifier layer (``nn.Identity()`` when headless);
   ``reset_classifier(n)`` rebuilds every head for n classes (0: none) under slim's own scope
   names, so the state_dict equals that of a net built for n classes, and on the body's device.
   ``classifier_scopes`` (also in the registry) lists the head scopes, main first; each holds
   variables.
6. **End points.** Slim's names, in slim's order, the same on every call: the body's end points
   (recorded by ``_forward_features``) first, then the head's; the returned logits are one of them.
7. **Names.** ``state_dict()`` keys are slim's variable names with '/' -> '.' and the leaf renamed
   (weights -> weight, biases -> bias, depthwise_weights -> depthwise_weight, BatchNorm gamma/beta/
   moving_mean/moving_variance -> weight/bias/running_mean/running_var); shapes are torch's
   layouts of slim's (HWIO -> OIHW, [in, out] -> [out, in]). Checked against the variables of the
   TF-made goldens (tests/golden), so every family needs at least one golden.
8. **Registry.** Each registration records the default and smallest image size, preprocessing,
   checkpoint classes, scope, classifier scopes, first conv and published tarball: what
   `create_model`'s ``pretrained``/``in_chans``/``features_only`` and `pretrained_cfg` use. An
   input below the smallest size is a one-line ConfigError naming that size.
"""

from .base import SlimNet
from .registry import ModelSpec, create_model, get_model_spec, list_models, register_model

__all__ = ["SlimNet", "ModelSpec", "create_model", "get_model_spec", "list_models", "register_model"]
