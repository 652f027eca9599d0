"""The transformers backend: architectures without a native family run transformers' own
model code, attending through our paged KV cache. Each is checked against transformers on the
same tiny random checkpoint (float32): a prompt prefilled in two chunks (the first as a cached
prefix) beside another sequence, then greedy decoding; and those that cannot be served are
refused with one clear message."""

from __future__ import annotations

import json
import random

import pytest
import torch

from shard.attention import get_backend
from shard.models import implementation_for, load_model
from shard.models.errors import UnsupportedModel
from tests.shard.test_families import new_cache, reference_logits, sequences, step

BASE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    vocab_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip

SERVED = {  # transformers config class -> overrides
    "GPTNeoXConfig": dict(),
    "Starcoder2Config": dict(num_key_value_heads=2, sliding_window=8),
    "CohereConfig": dict(num_key_value_heads=2, logit_scale=0.5),
    "Glm4Config": dict(num_key_value_heads=2, head_dim=16),
    "DeepseekV3Config": dict(
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4,
    ),
    "PhiConfig": dict(),
    "GPT2Config": dict(n_embd=64, n_layer=2, n_head=4),
    "OPTConfig": dict(ffn_dim=96, word_embed_proj_dim=64),
    "Qwen2MoeConfig": dict(
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    ),
    "GPTJConfig": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "Cohere2Config": dict(num_key_value_heads=2, sliding_window=8),
    "Exaone4Config": dict(num_key_value_heads=2, sliding_window=8),
    "NemotronConfig": dict(num_key_value_heads=2, head_dim=16),
}  # fmt: skip

REFUSED = {  # config class -> (overrides, what the message says)
    "FalconConfig": (dict(new_decoder_architecture=True, num_kv_heads=2), "custom attention"),
    "BloomConfig": (dict(n_layer=2, n_head=4), "custom attention"),
    "GptOssConfig": (
        dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, num_key_value_heads=2),
        "sinks",
    ),
}


def save(tmp_path, class_name: str, overrides: dict):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, class_name)(**{**BASE, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    return tmp_path, reference.eval()


@pytest.mark.parametrize("class_name", sorted(SERVED))
def test_architecture_served_through_transformers_matches_it(tmp_path, class_name):
    path, hf = save(tmp_path, class_name, SERVED[class_name])
    model = load_model(path, torch.float32)
    assert model.implementation == "transformers"
    backend, rng = get_backend("sdpa", "cpu"), random.Random(0)
    seqs = sequences(rng, [20, 9])
    cache = new_cache(model)
    step(model, cache, backend, seqs, [12, 5])  # a cached prefix, then the rest
    logits = step(model, cache, backend, seqs, [8, 4])
    expected = torch.cat(
        [reference_logits(hf, seqs[0].tokens)[12:], reference_logits(hf, seqs[1].tokens)[5:]]
    )
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    last = logits[[7, 11]]
    for _ in range(12):  # greedy, both sequences in every step
        for s, row in zip(seqs, last):
            s.tokens.append(int(row.argmax()))
        last = step(model, cache, backend, seqs, [1, 1])
    for s in seqs:
        greedy = reference_logits(hf, s.tokens[:-1]).argmax(-1)[-12:].tolist()
        assert greedy == s.tokens[-12:]


@pytest.mark.parametrize("class_name", sorted(REFUSED))
def test_architecture_transformers_cannot_page_is_refused_clearly(tmp_path, class_name):
    import transformers

    overrides, reason = REFUSED[class_name]
    config = getattr(transformers, class_name)(**{**BASE, **overrides})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match=reason) as refused:
        load_model(tmp_path, torch.float32)
    assert "\n" not in str(refused.value)


def test_remote_code_only_is_refused(tmp_path):
    config = {**BASE, "architectures": ["MyModelForCausalLM"], "model_type": "my_model"}
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_my.MyModelForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="MyModelForCausalLM.*remote code"):
        load_model(tmp_path, torch.float32)


def test_not_a_causal_lm_is_refused(tmp_path):
    import transformers

    transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match="vit.*not a causal language model"):
        load_model(tmp_path, torch.float32)


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(UnsupportedModel, match="no config.json"):
        load_model(tmp_path, torch.float32)


def test_choosing_the_implementation():
    assert implementation_for("LlamaForCausalLM") == "native"
    assert implementation_for("LlamaForCausalLM", "transformers") == "transformers"
    assert implementation_for("GPTNeoXForCausalLM") == "transformers"
    with pytest.raises(UnsupportedModel, match="no native implementation"):
        implementation_for("GPTNeoXForCausalLM", "native")


def test_a_native_family_forced_through_transformers_gives_the_same_logits(tmp_path):
    from tests.shard.families import save_family

    path = save_family("gemma2", tmp_path / "m")
    native = load_model(path, torch.float32)
    through = load_model(path, torch.float32, implementation="transformers")
    backend, seqs = get_backend("sdpa", "cpu"), sequences(random.Random(3), [30])
    a = step(native, new_cache(native), backend, seqs, [30])
    seqs[0].cache_len = 0
    b = step(through, new_cache(through), backend, seqs, [30])
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
