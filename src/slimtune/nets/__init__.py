"""slimtune's networks: one file per slim family, registered with `register_model`."""

from .base import SlimNet
from .registry import ModelSpec, create_model, get_model_spec, list_models, register_model

__all__ = ["SlimNet", "ModelSpec", "create_model", "get_model_spec", "list_models", "register_model"]
