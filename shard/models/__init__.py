"""One registry from the Hugging Face `architectures` name to our model class."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from shard.distributed import SINGLE, Dist, check_divisible
from shard.models.config import ModelConfig
from shard.models.llama import LlamaForCausalLM
from shard.quant.loaders import Quantizer
from shard.weights import Weights

MODEL_CLASSES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    dist: Dist = SINGLE,
    quantize: str = "none",
    keep_dense: bool = False,
    rope_scaling: dict | None = None,
):
    """Builds the model for `model_dir`'s architecture and loads this rank's weights;
    `quantize` is a resolved method (shard.quant.loaders.resolve_method); keep_dense: see
    shard.quant.loaders.Quantizer; `rope_scaling` replaces config.json's."""
    config = ModelConfig.from_dir(Path(model_dir))
    if rope_scaling is not None:
        config = replace(config, rope_scaling=rope_scaling)
    model_class = MODEL_CLASSES.get(config.architecture)
    if model_class is None:
        supported = ", ".join(sorted(MODEL_CLASSES))
        raise ValueError(f"architecture {config.architecture!r} is not supported ({supported})")
    check_divisible(
        config.num_heads, config.num_kv_heads, config.intermediate_size, dist.world_size
    )
    quantizer = None if quantize == "none" else Quantizer(quantize, Path(model_dir), keep_dense)
    weights = Weights(Path(model_dir), dtype, device, dist, quantizer)
    with torch.device(device):
        model = model_class(config, weights)
    weights.close()
    return model.eval()
