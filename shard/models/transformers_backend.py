"""Any causal LM the installed transformers knows, served with our paged KV cache.

transformers' model code runs as it is (its embeddings, rotary, norms, MLPs, experts), on one
flattened step: input_ids [1, T] and each token's own position, without a transformers cache.
Its attention modules call the function registered here under ATTENTION (transformers'
AttentionInterface, as vLLM's and TGI's transformers backends do): it writes the layer's new
K/V at the step's slots and attends through the block tables with the shard's attention backend,
sliding windows and soft-capping included. So continuous batching, prefix caching, chunked
prefill and every sampling feature work as for the native families; only the speed differs
(no compiled decoder, no quantized products).

A model class whose attention does not go through the interface (transformers'
`_supports_attention_backend` is False) is refused, with the reason, as are remote code,
checkpoints that are not causal LMs, --quantize and tensor parallelism.
"""

from __future__ import annotations

import contextvars
import json
import logging
from pathlib import Path

import torch
from torch import nn

from shard.distributed import Dist
from shard.engine.forward_context import ForwardContext
from shard.models.config import ModelConfig
from shard.models.errors import UnsupportedModel

log = logging.getLogger(__name__)

ATTENTION = "textgen_paged"
_step: contextvars.ContextVar[ForwardContext] = contextvars.ContextVar("textgen_step")


def paged_attention(
    module: nn.Module,
    query: torch.Tensor,  # [1, heads, T, Dk]
    key: torch.Tensor,  # [1, kv_heads, T, Dk]
    value: torch.Tensor,  # [1, kv_heads, T, Dv]
    attention_mask: torch.Tensor | None,  # None: no mask is built for this implementation
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature -> ([1, T, heads, Dv], no weights)."""
    ctx = _step.get()
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, D]
    width = max(k.shape[-1], v.shape[-1])
    if isinstance(ctx, _Probe):
        ctx.shapes.add((k.shape[1], width))
        return query.new_zeros(1, q.shape[0], q.shape[1], value.shape[-1]), None
    if k.shape[-1] < width:
        k = nn.functional.pad(k, (0, width - k.shape[-1]))
    if v.shape[-1] < width:  # MLA (DeepSeek): values narrower than keys share the cache row
        v = nn.functional.pad(v, (0, width - v.shape[-1]))
    cache = ctx.kv_cache[module.layer_idx]
    cache.write(k, v, ctx.attn.slots)
    scale = scaling if scaling is not None else key.shape[-1] ** -0.5
    out = ctx.backend.forward(
        q.contiguous(), cache, ctx.attn, scale, window=sliding_window, softcap=softcap
    )
    return out[..., : value.shape[-1]].unsqueeze(0), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, paged_attention)


class TransformersModel(nn.Module):
    """transformers' model behind the interface the runner drives (shard/engine/model_runner.py)."""

    implementation = "transformers"

    def __init__(self, hf_model: nn.Module, config: ModelConfig):
        super().__init__()
        self.hf, self.config = hf_model, config
        self.body = hf_model.get_decoder()
        self.lm_head = hf_model.get_output_embeddings()
        self.decoder = self.rotary = None  # no compiled decoder, no table to grow
        self.num_kv_heads, self.head_dim = cache_shape(self.body, self.lm_head.weight.device)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden] (after the final norm)."""
        token = _step.set(ctx)
        try:
            out = self.body(
                input_ids=input_ids.unsqueeze(0),
                position_ids=positions.unsqueeze(0),
                use_cache=False,
            )
        finally:
            _step.reset(token)
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, V] fp32
        """The LM head and what the families' heads add after it (transformers applies these
        in each CausalLM's forward)."""
        c = self.hf.config
        logits = self.lm_head(hidden)
        if getattr(c, "logit_scale", None) is not None:  # Cohere
            logits = logits * c.logit_scale
        if getattr(c, "logits_scaling", None) is not None:  # Granite family
            logits = logits / c.logits_scaling
        if getattr(c, "final_logit_softcapping", None) is not None:  # Gemma 2/3
            cap = c.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


class _Probe:
    """Stands for a step while cache_shape runs the model once: records the K/V shapes."""

    def __init__(self):
        self.shapes: set[tuple[int, int]] = set()


def cache_shape(body: nn.Module, device) -> tuple[int, int]:
    """(KV heads, head size) of every layer's cache row: what the attention modules hand the
    attention function on a one-token step (config fields name them differently in every
    family: multi-query, MLA's key and value sizes, ...)."""
    probe = _Probe()
    token = _step.set(probe)
    try:
        with torch.inference_mode():
            ids = torch.zeros(1, 1, dtype=torch.int64, device=device)
            body(input_ids=ids, position_ids=torch.zeros_like(ids), use_cache=False)
    finally:
        _step.reset(token)
    if len(probe.shapes) != 1:
        raise UnsupportedModel(f"its layers' K/V shapes differ ({sorted(probe.shapes)})")
    return probe.shapes.pop()


def load_transformers_model(
    model_dir: Path,
    arch: str,
    dtype: torch.dtype,
    device: torch.device | str,
    dist: Dist,
    quantize: str,
) -> TransformersModel:
    """transformers' own model for `model_dir`, attending through our paged cache."""
    if dist.world_size > 1:
        raise UnsupportedModel(
            f"{arch} runs through the transformers backend, which does not split across "
            f"shards; run it with --num-shard 1"
        )
    if quantize != "none":
        raise UnsupportedModel(
            f"{arch} runs through the transformers backend, which serves dense weights only; "
            f"leave --quantize unset"
        )
    model_class = causal_lm_class(model_dir, arch)
    register_attention()
    hf = model_class.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=ATTENTION, local_files_only=True
    )
    hf = hf.to(device).eval()
    if any(getattr(m, "sinks", None) is not None for m in hf.modules()):
        raise UnsupportedModel(
            f"{arch}: its attention has per-head sinks (an extra softmax logit), which the paged "
            "attention kernels do not implement yet"
        )
    log.info("%s runs through the transformers backend (%s)", arch, model_class.__name__)
    return TransformersModel(hf, serving_config(hf, arch, model_dir))


def serving_config(hf: nn.Module, arch: str, model_dir: Path) -> ModelConfig:
    """What the rest of the shard reads of a model (layers, vocabulary, end tokens, length),
    from transformers' config (its attribute names resolve every family's aliases)."""
    c = hf.config
    eos = getattr(c, "eos_token_id", None)
    heads = c.num_attention_heads
    config = ModelConfig(
        architecture=arch,
        model_type=c.model_type,
        hidden_size=c.hidden_size,
        intermediate_size=getattr(c, "intermediate_size", 0) or 0,
        num_layers=c.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=heads,  # the cache's are probed (cache_shape)
        head_dim=c.hidden_size // heads,
        vocab_size=c.vocab_size,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=getattr(c, "max_position_embeddings", None) or 2048,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        bos_token_id=getattr(c, "bos_token_id", None),
    )
    return config.with_generation_eos(model_dir / "generation_config.json")


def causal_lm_class(model_dir: Path, arch: str):
    """transformers' causal-LM class for the checkpoint, or UnsupportedModel saying why not."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((model_dir / "config.json").read_text())
    if raw.get("model_type") not in transformers.CONFIG_MAPPING:
        if raw.get("auto_map"):
            raise UnsupportedModel(
                f"{arch} exists only as remote code in its repository, which this server "
                "never runs; use a checkpoint of an architecture transformers ships"
            )
        raise UnsupportedModel(
            f"{arch}: model type {raw.get('model_type')!r} is unknown to transformers "
            f"{transformers.__version__}; a newer transformers may know it"
        )
    try:
        hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, OSError) as e:
        first = str(e).splitlines()[0]
        raise UnsupportedModel(
            f"{arch}: transformers cannot read its config.json ({first})"
        ) from None
    mapping = AutoModelForCausalLM._model_mapping
    if type(hf_config) not in mapping:
        raise UnsupportedModel(
            f"{arch} (model_type {hf_config.model_type}) is not a causal language model "
            "transformers knows; this server serves text generation models only"
        )
    model_class = mapping[type(hf_config)]
    if not getattr(model_class, "_supports_attention_backend", False):
        raise UnsupportedModel(
            f"{arch}: transformers' {model_class.__name__} does not take a custom attention "
            "function, so it cannot attend through the paged KV cache; it is not supported"
        )
    return model_class
