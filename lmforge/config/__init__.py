"""A run's configuration: the schema (schema.py), reading YAML + overrides (load.py), LLaMA-Factory's keys
(llamafactory.py). The names most callers need are re-exported here."""

from .load import load_config
from .schema import (
                     SECTIONS,
                     Config,
                     DataConfig,
                     MethodConfig,
                     ModelConfig,
                     PreferenceConfig,
                     TrainConfig,
                     known_paths,
)

__all__ = ["SECTIONS", "Config", "DataConfig", "MethodConfig", "ModelConfig", "PreferenceConfig", "TrainConfig",
           "known_paths", "load_config"]
