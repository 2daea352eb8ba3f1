"""rosa_scale: fine-tune language models with ROSA (Random Orthogonal Subspace Adaptation)."""
from .config import RosaConfig, TrainConfig, load_config
from .factorize import merge, split
from .layer import RosaLinear
from .model import adapter_parameters, apply_rosa, merge_rosa, rosa_layers
from .quant import QuantRosaLinear
from .resample import resample

__version__ = "0.1.0"

__all__ = [
    "QuantRosaLinear",
    "RosaConfig",
    "RosaLinear",
    "TrainConfig",
    "adapter_parameters",
    "apply_rosa",
    "load_config",
    "merge",
    "merge_rosa",
    "resample",
    "rosa_layers",
    "split",
]
