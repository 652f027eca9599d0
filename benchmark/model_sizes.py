"""Random-weight checkpoints of real models' shapes, as GGUF files made by llama.cpp's own tools.

    python -m benchmark.model_sizes llama3-1b [--type Q4_K_M]     (prints the GGUF's path)

Speed and memory do not depend on the weights' values, so a checkpoint of Llama 3.2 1B's shape
built offline by transformers stands in for the real one. It is converted to a bf16 GGUF by
llama.cpp's `convert_hf_to_gguf.py` and quantized by `llama-quantize`, as users make theirs
(../shared/tools/build-llama-server.sh builds both; LLAMA_SERVER_DIR says where). Every step
is cached under the model cache, keyed by the shape.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import typer

from shard.config import default_cache_dir

# config.json fields of each shape (the rest: transformers' LlamaConfig / MixtralConfig
# defaults). Vocabulary and rope scaling as the real models have them.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
SHAPES = {
    "llama3-1b": {  # Llama 3.2 1B: 1.24B parameters with the tied 128k embedding
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
        "max_position_embeddings": 131072,
    },
    "llama3-8b": {  # Llama 3.1 8B
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
        "max_position_embeddings": 131072,
    },
}


def llama_tools() -> Path:
    return Path(os.environ.get("LLAMA_SERVER_DIR", Path.home() / ".cache" / "llama-server"))


def build_checkpoint(shape: str, out: Path) -> Path:
    """A random bf16 checkpoint of `shape` in `out`, with the embedded model's tokenizer (its
    vocabulary padded to the shape's by the converter)."""
    import torch
    import transformers

    from shard.checkpoint.convert import default_gguf_path, ensure_converted

    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config = transformers.AutoConfig.for_model(**{**SHAPES[shape], "torch_dtype": "bfloat16"})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # one tensor at a time: no float32 copy of the model
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(tmp, max_shard_size="2GB")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        ensure_converted(default_gguf_path(), default_cache_dir())
    )
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def build_gguf(shape: str, ggml_type: str = "Q4_K_M") -> Path:
    """The GGUF of `shape` quantized to `ggml_type` by llama-quantize (cached)."""
    root = default_cache_dir() / "model-sizes" / shape
    target = root / f"{shape}-{ggml_type}.gguf"
    if target.exists():
        return target
    tools = llama_tools()
    converter, quantize = tools / "llama.cpp" / "convert_hf_to_gguf.py", tools / "llama-quantize"
    if not converter.exists() or not quantize.exists():
        raise FileNotFoundError(
            f"llama.cpp's converter and llama-quantize are not in {tools}: run "
            "../shared/tools/build-llama-server.sh"
        )
    bf16 = root / f"{shape}-bf16.gguf"
    if not bf16.exists():
        hf = build_checkpoint(shape, root / "hf")
        env = {**os.environ, "PYTHONPATH": str(tools / "llama.cpp" / "gguf-py")}
        cmd = [sys.executable, str(converter), str(hf), "--outtype", "bf16"]
        subprocess.run([*cmd, "--outfile", str(bf16) + ".tmp"], check=True, env=env)
        os.replace(str(bf16) + ".tmp", bf16)
    subprocess.run([str(quantize), str(bf16), str(target) + ".tmp", ggml_type], check=True)
    os.replace(str(target) + ".tmp", target)
    return target


def main(
    shape: str = typer.Argument(..., help=f"one of {', '.join(SHAPES)}"),
    ggml_type: str = typer.Option("Q4_K_M", "--type", help="llama-quantize's type name"),
) -> None:
    if shape not in SHAPES:
        raise typer.BadParameter(f"unknown shape {shape!r}: {', '.join(SHAPES)}")
    print(build_gguf(shape, ggml_type))


if __name__ == "__main__":
    typer.run(main)
