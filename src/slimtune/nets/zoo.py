"""Import every network family file in this package so their @register_model decorators run.

Adding a network is one new file in slimtune/nets/: nothing here needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil

_INFRASTRUCTURE = {"base", "layers", "registry", "zoo"}

for _module in pkgutil.iter_modules(importlib.import_module("slimtune.nets").__path__):
    if _module.name not in _INFRASTRUCTURE and not _module.name.startswith("_"):
        importlib.import_module(f"slimtune.nets.{_module.name}")
