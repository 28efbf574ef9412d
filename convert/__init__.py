"""Conversion of checkpoints to and from this package, and upload to the Hugging Face Hub.

Pure state-dict converters (each over one key table, see `keymap`): `huginn_to_ours` / `ours_to_huginn`
(published huginn-0125 format), `pretrain_to_ours` (pretraining-code checkpoints), `retrofit_state_dict`
(Llama / Qwen2 / Qwen3 -> recurrent depth). Folder converters stream tensors shard by shard into an atomically
written destination: `convert_huginn`, `convert_pretrain`, `convert_retrofit`. `upload` publishes a folder with its
model code and a rendered model card.
"""

from .card import lm_eval_to_eval_results, render_model_card
from .checkpoint import CheckpointError, LazyStateDict, open_checkpoint
from .huginn import convert_huginn, huginn_config_from_ours, huginn_config_to_ours, huginn_to_ours, ours_to_huginn
from .keymap import KeyMismatchError, KeyTable, expected_state
from .pretrain import convert_pretrain, pretrain_to_ours
from .retrofit import LayerSelection, convert_retrofit, retrofit_config, retrofit_state_dict
from .upload import upload, upload_files

__all__ = [
    "CheckpointError",
    "KeyMismatchError",
    "KeyTable",
    "LayerSelection",
    "LazyStateDict",
    "convert_huginn",
    "convert_pretrain",
    "convert_retrofit",
    "expected_state",
    "huginn_config_from_ours",
    "huginn_config_to_ours",
    "huginn_to_ours",
    "lm_eval_to_eval_results",
    "open_checkpoint",
    "ours_to_huginn",
    "pretrain_to_ours",
    "render_model_card",
    "retrofit_config",
    "retrofit_state_dict",
    "upload",
    "upload_files",
]
