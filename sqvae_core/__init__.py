"""SQ-VAE Explorer core: models, training, evaluation and exploration (no UI code)."""
from .config import MODEL_KINDS, ModelConfig
from .models import MODELS, build_model
from .rundir import Bundle, BundleError, load_bundle

__version__ = "0.1.0"
__all__ = ["MODEL_KINDS", "MODELS", "ModelConfig", "build_model", "Bundle", "BundleError", "load_bundle"]
