"""Typed configuration: pydantic models with defaults and descriptions, YAML loading, overrides, flat dicts.

    perceptual  the stage-2 loss's perceptual terms (a list of nets with weights) and their paired crop
    sections  every setting, in one of the section models, each field with a description (`biflow config show`
              prints them beside the values)
    loading   YAML files and `--set a.b=value` overrides (and a sweep's settings) through one `apply_overrides`;
              unknown keys (with the closest known name), wrong types and out-of-range values raise `ConfigError`
              with a one-line message that names the key and where its value came from
    flat      `flatten` turns a config into `{"forward.width": 64, ...}` (the keys of MLflow params and Tune axes);
              `commented_yaml` is what `biflow config show` prints
"""
from biflow.config.flat import commented_yaml, flatten, unflatten
from biflow.config.loading import (
    Blame,
    Origin,
    Override,
    apply_overrides,
    build_config,
    check_keys,
    closest,
    load_config,
    load_yaml,
    read_yaml_mapping,
    unknown,
    validate,
)
from biflow.config.perceptual import PerceptualCropConfig, PerceptualTermConfig
from biflow.config.sections import (
    FLOW_GEOMETRY,
    FORWARD_SIZES,
    REVERSE_SIZES,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ForwardConfig,
    LatentConfig,
    ReverseConfig,
    ReverseLossConfig,
    Section,
    TokenModel,
    TrainConfig,
)

__all__ = [
    "FLOW_GEOMETRY", "FORWARD_SIZES", "REVERSE_SIZES", "Blame", "ConfigError", "DataConfig", "ExperimentConfig",
    "ForwardConfig", "LatentConfig", "Origin", "Override", "PerceptualCropConfig", "PerceptualTermConfig", "ReverseConfig", "ReverseLossConfig", "Section",
    "TokenModel", "TrainConfig", "apply_overrides", "build_config", "check_keys", "closest", "commented_yaml",
    "flatten", "load_config", "load_yaml", "read_yaml_mapping", "unflatten", "unknown", "validate",
]
