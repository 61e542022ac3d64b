"""SQ-VAE Explorer core: models, training, evaluation and exploration (no UI code).

The names below load their module when first used (PEP 562): `import sqvae_core.rundir` or
`sqvae_core.config` costs no torch import, so listing runs and reading their JSON files stays fast.
"""
from importlib import import_module

__version__ = "0.1.0"
_HOMES = {"MODEL_KINDS": "config", "ModelConfig": "config", "MODELS": "models", "build_model": "models",
          "Bundle": "rundir", "BundleError": "rundir", "load_bundle": "rundir",
          "RunLogger": "runlogger"}
__all__ = list(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
