"""Export-friendly model definitions per family. Llama, Mistral and Qwen2 share one decoder."""

from compiler.models.config import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    UnsupportedModelError,
    parse_hf_config,
    rope_cos_sin_cache,
)
from compiler.models.llama import CausalLM, build_meta_model

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CausalLM",
    "ModelConfig",
    "UnsupportedModelError",
    "build_meta_model",
    "parse_hf_config",
    "rope_cos_sin_cache",
]
