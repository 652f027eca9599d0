"""One registry from the Hugging Face `architectures` name to the family that serves it
natively; every other causal LM the installed transformers knows runs through the
transformers backend (shard/models/transformers_backend.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from shard.checkpoint.gguf_weights import GGUFWeights, is_gguf_dir
from shard.checkpoint.weights import Weights
from shard.distributed import SINGLE, Dist, check_divisible
from shard.models import gemma, granite, llama, mixtral, olmo2, phi3, qwen3, smollm3
from shard.models.config import ModelConfig
from shard.models.decoder import DecoderForCausalLM, DecoderSpec
from shard.models.errors import UnsupportedModel
from shard.models.llama_decode import attach_compiled_decoder
from shard.quant.loaders import Quantizer

FAMILIES = (llama, qwen3, mixtral, gemma, phi3, olmo2, granite, smollm3)
NATIVE = {arch: family for family in FAMILIES for arch in family.ARCHITECTURES}
IMPLEMENTATIONS = ("auto", "native", "transformers")


def architecture_of(model_dir: Path) -> str:
    """config.json's first architecture (Llama where it names none and its model type is
    llama's or absent, as in old checkpoints; else its model type)."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise UnsupportedModel(f"{model_dir} has no config.json: it is not a model checkpoint")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnsupportedModel(f"{path} is not valid JSON ({e})") from None
    if raw.get("architectures"):
        return raw["architectures"][0]
    model_type = raw.get("model_type", "llama")
    return "LlamaForCausalLM" if model_type == "llama" else f"model type {model_type}"


def implementation_for(architecture: str, requested: str = "auto") -> str:
    """Which implementation serves `architecture`: "native" or "transformers"."""
    if requested not in IMPLEMENTATIONS:
        raise UnsupportedModel(f"unknown model implementation {requested!r}")
    if requested == "native" and architecture not in NATIVE:
        native = ", ".join(sorted(NATIVE))
        raise UnsupportedModel(
            f"architecture {architecture} has no native implementation ({native}); "
            "leave --model-impl at auto to serve it through the transformers backend"
        )
    if requested == "transformers" or architecture not in NATIVE:
        return "transformers"
    return "native"


def check_tensor_parallel(spec: DecoderSpec, config: ModelConfig, dist: Dist) -> None:
    if dist.world_size == 1:
        return
    if spec.no_tensor_parallel:
        raise UnsupportedModel(
            f"{config.architecture} cannot be split across {dist.world_size} shards: "
            f"{spec.no_tensor_parallel}; run it with --num-shard 1"
        )
    intermediate = spec.moe.expert.intermediate_size if spec.moe else spec.mlp.intermediate_size
    try:
        check_divisible(config.num_heads, config.num_kv_heads, intermediate, dist.world_size)
    except ValueError as e:
        raise UnsupportedModel(str(e)) from None


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    dist: Dist = SINGLE,
    quantize: str = "none",
    keep_dense: bool = False,
    rope_scaling: dict | None = None,
    implementation: str = "auto",
):
    """Builds the model for `model_dir`'s architecture and loads this rank's weights;
    `quantize` is a resolved method (shard.quant.loaders.resolve_method); keep_dense: see
    shard.quant.loaders.Quantizer; `rope_scaling` replaces config.json's."""
    architecture = architecture_of(Path(model_dir))
    if implementation_for(architecture, implementation) == "transformers":
        from shard.models.transformers_backend import load_transformers_model

        return load_transformers_model(Path(model_dir), architecture, dtype, device, dist, quantize)
    config = ModelConfig.from_dir(Path(model_dir))
    if rope_scaling is not None:
        config = replace(config, rope_scaling=rope_scaling)
    family = NATIVE[config.architecture]
    try:
        spec = family.decoder_spec(config)
    except (KeyError, ValueError) as e:
        raise UnsupportedModel(f"{config.architecture}: config.json cannot be served: {e}") from e
    check_tensor_parallel(spec, config, dist)
    quantizer = None if quantize == "none" else Quantizer(quantize, Path(model_dir), keep_dense)
    reader = GGUFWeights if is_gguf_dir(Path(model_dir)) else Weights
    weights = reader(Path(model_dir), dtype, device, dist, quantizer)
    with torch.device(device):
        model = DecoderForCausalLM(config, spec, weights)
    weights.close()
    attach_compiled_decoder(model)
    return model.eval()
