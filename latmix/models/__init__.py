"""Everything that knows transformers' models: module names, sizes, blocks, attention, loading.

adapter     the roles of latmix (seven linears per block, norms, embedding, lm_head) on a model's modules
blocks      decoder blocks: their inputs, their output format, running one, checkpointing, block names
attention   latmix's step inside transformers' attention (q/k rotation and KV quantization)
loading     the config, the model and the tokenizer from a local path or the hub
outliers    the outlier-injection reparametrization (a synthetic stress test)
cache       checkpoints built once from a pinned package (SmolLM2-135M), verified on use
"""

from latmix.models.adapter import ADAPTERS, LINEAR_ROLES, LlamaFamilyAdapter, get_adapter, model_dimensions
from latmix.models.blocks import (
    block_index,
    block_inputs,
    block_output,
    decoder_layers,
    gradient_checkpointing,
    input_device,
    run_block,
)
from latmix.models.loading import load_config, load_model
from latmix.models.outliers import inject_channel_outliers

__all__ = [
    "ADAPTERS",
    "LINEAR_ROLES",
    "LlamaFamilyAdapter",
    "block_index",
    "block_inputs",
    "block_output",
    "decoder_layers",
    "get_adapter",
    "gradient_checkpointing",
    "inject_channel_outliers",
    "input_device",
    "load_config",
    "load_model",
    "model_dimensions",
    "run_block",
]
