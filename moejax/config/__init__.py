"""Typed, validated configuration: the public names of the config package.

- `choices`: the allowed values of every fixed-choice field (imports nothing);
- `coerce`: ConfigDict sections -> frozen dataclasses, with errors naming the field;
- `v4`: the DeepSeek-V4 model section (`V4Config`);
- `schema`: every other section, `Config` and `resolve` (validation);
- `files`: experiment config files and 'a.b.c=value' overrides.
"""
from moejax.config.choices import (
                                   ARCHITECTURES,
                                   ATTENTION_IMPLS,
                                   ATTENTION_TYPES,
                                   DISPATCHES,
                                   DROPLESS_BACKENDS,
                                   DTYPES,
                                   EXPERT_PARALLEL,
                                   EXPERT_TRANSPORTS,
                                   MESH_AXES,
                                   REMAT_POLICIES,
                                   ROPE_STYLES,
                                   SCORE_FUNCTIONS,
)
from moejax.config.coerce import dataclass_from_dict
from moejax.config.files import (
                                   apply_overrides,
                                   builtin_config_dir,
                                   builtin_config_names,
                                   config_file,
                                   config_path,
                                   load_config,
                                   load_config_file,
)
from moejax.config.mesh import MeshConfig, mesh_config
from moejax.config.schema import (
                                   AnyModelConfig,
                                   Config,
                                   DataConfig,
                                   MLAConfig,
                                   ModelConfig,
                                   MoEConfig,
                                   MTPConfig,
                                   OptimizerConfig,
                                   RopeConfig,
                                   TrainConfig,
                                   model_config,
                                   resolve,
                                   validate,
                                   validate_model,
)
from moejax.config.v4 import V4Config, v4_config

__all__ = ["ARCHITECTURES", "ATTENTION_IMPLS", "ATTENTION_TYPES", "DISPATCHES",
           "DROPLESS_BACKENDS", "DTYPES", "EXPERT_PARALLEL", "EXPERT_TRANSPORTS", "MESH_AXES",
           "REMAT_POLICIES", "ROPE_STYLES", "SCORE_FUNCTIONS", "AnyModelConfig", "Config",
           "DataConfig", "MLAConfig", "MTPConfig", "MeshConfig", "MoEConfig", "ModelConfig",
           "OptimizerConfig", "RopeConfig", "TrainConfig", "V4Config", "apply_overrides",
           "builtin_config_dir", "builtin_config_names", "config_file", "config_path",
           "dataclass_from_dict", "load_config", "load_config_file", "mesh_config",
           "model_config", "resolve", "v4_config", "validate", "validate_model"]
