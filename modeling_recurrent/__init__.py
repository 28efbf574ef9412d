"""Recurrent-depth language models for Hugging Face Transformers.

`import modeling_recurrent` registers the configuration and model with the Auto classes, for this package's own
`recurrent_depth` folders and for published huginn-0125 folders (`model_type: huginn_raven`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_recurrent_depth import RecurrentCache
from .configuration_recurrent_depth import HuginnRavenConfig, RecurrentDepthConfig
from .modeling_recurrent_depth import (
    HuginnRavenForCausalLM,
    RecurrentDepthForCausalLM,
    RecurrentDepthModel,
    RecurrentDepthOutput,
)
from .static_cache_recurrent_depth import StaticRecurrentCache

# Saved folders carry a copy of the model code (auto_map), so they also load with trust_remote_code=True where
# this package is not installed.
RecurrentDepthConfig.register_for_auto_class()
RecurrentDepthForCausalLM.register_for_auto_class("AutoModelForCausalLM")

AutoConfig.register(RecurrentDepthConfig.model_type, RecurrentDepthConfig, exist_ok=True)
AutoConfig.register(HuginnRavenConfig.model_type, HuginnRavenConfig, exist_ok=True)
AutoModel.register(RecurrentDepthConfig, RecurrentDepthModel, exist_ok=True)
AutoModelForCausalLM.register(RecurrentDepthConfig, RecurrentDepthForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(HuginnRavenConfig, HuginnRavenForCausalLM, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "HuginnRavenConfig",
    "HuginnRavenForCausalLM",
    "RecurrentCache",
    "RecurrentDepthConfig",
    "RecurrentDepthForCausalLM",
    "RecurrentDepthModel",
    "RecurrentDepthOutput",
    "StaticRecurrentCache",
]
