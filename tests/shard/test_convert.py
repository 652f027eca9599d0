"""Tests for shard.checkpoint.convert: GGUF -> HF checkpoint, checked against transformers' GGUF
loader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shard.checkpoint import convert
from shard.checkpoint.convert import (
    convert_gguf,
    default_cache_dir,
    default_gguf_path,
    ensure_converted,
    unpermute_rope_rows,
)

SAMPLES = [
    "Hello, world!",
    "Crème brûlée à la façon de Zoë, naïve señor",
    "I love 🤗 and 🚀🚀 (emoji) — ok?",
    "def f(x):\n    return {'a': x ** 2}  # 12345\n\tpass",
    "<|im_start|>user\nhi<|im_end|>\n",
]


def _gguf_or_skip() -> Path:
    try:
        return default_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return _gguf_or_skip()


@pytest.fixture(scope="module")
def converted(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_gguf(gguf_path, tmp_path_factory.mktemp("converted"), progress=False, dense=True)


@pytest.fixture(scope="module")
def served(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory a server prepares: metadata, and a link to the file."""
    return convert_gguf(gguf_path, tmp_path_factory.mktemp("served"), progress=False)


@pytest.fixture(scope="module")
def hf_gguf_model(gguf_path: Path):
    """The model as transformers' own GGUF loader builds it (dequantize + Q/K un-permute).

    ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` would do the same but
    insists on ``accelerate``; this calls the loader it uses underneath directly.
    """
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = LlamaForCausalLM(config)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    result = model.load_state_dict(parsed["tensors"], strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim in spirit."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def test_unpermute_inverts_llama_cpp_permute() -> None:
    weight = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)  # 6 heads, head_dim 8
    permuted = _llama_cpp_permute(weight, 6)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, 6), weight)


def test_hf_tensor_names() -> None:
    assert convert.hf_tensor_name("blk.7.attn_k.weight") == "model.layers.7.self_attn.k_proj.weight"
    assert convert.hf_tensor_name("blk.0.ffn_norm.weight") == (
        "model.layers.0.post_attention_layernorm.weight"
    )
    assert convert.hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError):
        convert.hf_tensor_name("blk.0.attn_qkv.weight")


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("TEXTGEN_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "textgen"


@pytest.mark.slow
def test_tensors_match_transformers_gguf_loader(converted: Path, hf_gguf_model) -> None:
    ours = load_file(converted / "model.safetensors")
    reference = hf_gguf_model.state_dict()
    assert set(ours) == set(reference) - {"lm_head.weight"}  # tied: no lm_head saved
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name]), name
    assert ours["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert ours["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert ours["model.embed_tokens.weight"].shape == (49152, 576)


@pytest.mark.slow
def test_served_directory_reads_every_tensor_from_the_file(served: Path, hf_gguf_model) -> None:
    """No tensor is copied into the directory; read from the file (Q/K rows restored, blocks
    dequantized), every tensor equals transformers' loader's, bit for bit."""
    from shard.checkpoint.gguf_weights import GGUFWeights

    assert not list(served.glob("*.safetensors"))
    assert (served / "model.gguf").resolve() == default_gguf_path().resolve()
    weights = GGUFWeights(served, torch.float32)
    reference = hf_gguf_model.state_dict()
    assert set(weights.tensors) == set(reference) - {"lm_head.weight"}
    for name in weights.tensors:
        assert torch.equal(weights.get(name), reference[name]), name
    weights.close()


@pytest.mark.slow
def test_config_loads_and_matches(converted: Path, hf_gguf_model) -> None:
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(converted)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers) == (576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert (config.vocab_size, config.intermediate_size, config.head_dim) == (49152, 1536, 64)
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert config.max_position_embeddings == 8192
    reference = hf_gguf_model.config
    assert config.rope_parameters["rope_theta"] == reference.rope_parameters["rope_theta"]
    assert config.rms_norm_eps == pytest.approx(reference.rms_norm_eps)
    generation = GenerationConfig.from_pretrained(converted)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)


@pytest.mark.slow
def test_converted_model_logits_match(converted: Path, hf_gguf_model) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(converted).eval()
    ids = torch.tensor([[1, 9690, 198, 19556, 905, 28, 638, 359, 346, 47, 2]])
    with torch.no_grad():
        ours = model(ids).logits
        reference = hf_gguf_model(ids).logits
    assert torch.allclose(ours, reference, atol=1e-4)


@pytest.mark.slow
def test_tokenizer_matches_gguf_tokenizer(converted: Path, hf_gguf_tokenizer) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert ids == hf_gguf_tokenizer.encode(text), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("Hello")[0] != tokenizer.bos_token_id  # GGUF: add_bos_token false
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.chat_template == hf_gguf_tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    saved = json.loads((converted / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == hf_gguf_tokenizer.chat_template


@pytest.mark.slow
def test_plain_tokenizers_library_agrees(converted: Path, hf_gguf_tokenizer) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(converted / "tokenizer.json"))
    for text in SAMPLES:
        assert tokenizer.encode(text).ids == hf_gguf_tokenizer.encode(text), text


@pytest.mark.slow
def test_output_is_safetensors_only(converted: Path) -> None:
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "model.gguf"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert pickles == []


@pytest.mark.slow
def test_ensure_converted_is_idempotent(
    gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = ensure_converted(gguf_path, tmp_path, progress=False)
    assert first.parent == tmp_path and first.name.startswith(gguf_path.stem + "-")
    assert (first / "model.gguf").is_symlink() and (first / "config.json").is_file()
    mtime = (first / "config.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("second ensure_converted call must not convert again")

    monkeypatch.setattr(convert, "convert_gguf", fail)
    second = ensure_converted(gguf_path, tmp_path, progress=False)
    assert second == first
    assert (second / "config.json").stat().st_mtime_ns == mtime
    leftovers = [p.name for p in tmp_path.iterdir() if p.is_dir() and p != first]
    assert leftovers == []  # temp dir was renamed into place, nothing else left behind


@pytest.mark.slow
def test_ensure_converted_cleans_up_on_failure(
    gguf_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(gguf: Path, out_dir: Path, progress: bool = True, dense: bool = False) -> Path:
        (Path(out_dir) / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(convert, "convert_gguf", boom)
    with pytest.raises(RuntimeError):
        ensure_converted(gguf_path, tmp_path, progress=False)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []
    assert not os.listdir(tmp_path) or all(n.endswith(".lock") for n in os.listdir(tmp_path))


def test_ensure_converted_concurrent_callers_convert_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"not really gguf")
    calls: list[Path] = []

    def fake_convert(path: Path, out_dir: Path, progress: bool = True, dense: bool = False) -> Path:
        calls.append(Path(out_dir))
        time.sleep(0.2)  # give the other threads time to pile up on the lock
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(convert, "convert_gguf", fake_convert)
    cache = tmp_path / "cache"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_converted(gguf, cache, False)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(set(results)) == 1 and len(results) == 4
    assert (results[0] / "config.json").is_file()
    assert results[0].name.startswith("tiny-")
