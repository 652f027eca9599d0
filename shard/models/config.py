"""The model hyper-parameters the shard needs, read from a Hugging Face `config.json`.

Both config styles are understood: transformers < 5 (`rope_theta`, `rope_scaling`) and
transformers >= 5 (`rope_parameters` holding `rope_theta` and the scaling fields, or one such
dict per layer type, as Gemma 3's). The fields every family shares are typed here; a family's
own fields (soft-capping, multipliers, experts) are read from `raw` by its file in
shard/models/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str | None = None
    hidden_act: str = "silu"
    mlp_bias: bool = False
    partial_rotary_factor: float = 1.0
    layer_types: tuple[str, ...] = ()  # "full_attention" / "sliding_attention" per layer
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # config.json itself

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        architectures = raw.get("architectures") or ["LlamaForCausalLM"]
        num_heads = raw["num_attention_heads"]
        rope = rope_parameters(raw, "full_attention")
        rope_theta = rope.pop("rope_theta", None) or raw.get("rope_theta") or 10000.0
        partial = rope.pop("partial_rotary_factor", None) or raw.get("partial_rotary_factor", 1.0)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            architecture=architectures[0],
            model_type=raw.get("model_type", "llama"),
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            vocab_size=raw["vocab_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", raw.get("model_type") == "qwen2"),
            sliding_window=raw.get("sliding_window")
            if raw.get("use_sliding_window", True)
            else None,
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            hidden_act=raw.get("hidden_act") or raw.get("hidden_activation") or "silu",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            partial_rotary_factor=float(partial),
            layer_types=tuple(raw.get("layer_types") or ()),
            raw=raw,
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        config = cls.from_dict(normalized_config(Path(model_dir)))
        return config.with_generation_eos(Path(model_dir) / "generation_config.json")

    def with_generation_eos(self, path: Path) -> "ModelConfig":
        """generation_config.json may list more end-of-sequence ids than config.json."""
        if not path.exists():
            return self
        eos = json.loads(path.read_text()).get("eos_token_id")
        extra = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        merged = tuple(dict.fromkeys(self.eos_token_ids + extra))
        return ModelConfig(**{**self.__dict__, "eos_token_ids": merged})

    def layer_type(self, index: int) -> str:
        """ "sliding_attention" or "full_attention": config.json's layer_types where it has
        them, else every layer windowed when the model has a sliding window."""
        if self.layer_types:
            return self.layer_types[index]
        return "sliding_attention" if self.sliding_window else "full_attention"


def normalized_config(model_dir: Path) -> dict:
    """config.json as transformers reads it, defaults filled in (layer_types, rope_parameters,
    SmolLM3's no_rope_layers, ...) whatever version wrote it; config.json itself where the
    installed transformers does not know the model type."""
    raw = json.loads((model_dir / "config.json").read_text())
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, KeyError, OSError, TypeError):
        return raw
    return {**raw, **{k: v for k, v in config.to_dict().items() if v is not None}}


def rope_parameters(raw: dict, layer_type: str) -> dict:
    """The rotary fields of `layer_type`'s layers (rope_theta, rope_type, scaling fields)."""
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if isinstance(rope.get(layer_type), dict):  # one dict per layer type
        rope = dict(rope[layer_type])
    elif any(isinstance(v, dict) for v in rope.values()):
        rope = dict(next(v for v in rope.values() if isinstance(v, dict)))
    return rope
