"""How big a model is and how much memory a device has: what both engines and the router weigh.

Kept apart from `router.py` so the engines can ask without importing the module that
chooses between them.
"""

from __future__ import annotations

import psutil

from evalfleet.types import ModelConfig


def device_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return psutil.virtual_memory().total / 2**30


def _weights_dtype(model: ModelConfig) -> str:
    if model.dtype != "auto":
        return model.dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def estimate_model_size(model_config: ModelConfig | str) -> float:
    """Weights in GB (GiB, as nvidia-smi prints it), from config.json alone: parameters × bytes of the dtype."""
    from evalfleet.planning import estimate_weights_gb, profile_model

    if isinstance(model_config, str):
        model_config = ModelConfig(path=model_config)
    profile = profile_model(model_config.path)
    return float(estimate_weights_gb(profile, _weights_dtype(model_config)))
