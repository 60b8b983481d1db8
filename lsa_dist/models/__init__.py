"""The LSA model family: plain PyTorch modules, named variants, official-weight import."""

from .flops import count_macs
from .lsa import (
    CIFAR_SHIFTS,
    IMAGENET_SHIFTS,
    LSA,
    LSAConfig,
    ModelConfigError,
    count_parameters,
    fit_pos_tables,
    resize_pos_table,
)
from .official import (
    OFFICIAL_CONFIGS,
    OfficialCheckpointError,
    config_from_official,
    from_official,
    load_official_checkpoint,
)
from .zoo import create_model, list_models, model_config

__all__ = [
    "CIFAR_SHIFTS",
    "IMAGENET_SHIFTS",
    "LSA",
    "LSAConfig",
    "ModelConfigError",
    "OFFICIAL_CONFIGS",
    "OfficialCheckpointError",
    "config_from_official",
    "count_macs",
    "count_parameters",
    "create_model",
    "fit_pos_tables",
    "from_official",
    "list_models",
    "load_official_checkpoint",
    "model_config",
    "resize_pos_table",
]
