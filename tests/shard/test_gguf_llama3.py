"""Llama 3.x GGUF files: llama.cpp's converter turns config.json's llama3 rope_scaling into a
rope_freqs tensor (one divisor per frequency) and drops the scaling fields; our converter
recovers the scaling from the tensor, so the model serves and equals transformers."""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shard.checkpoint.convert import llama3_scaling

LLAMA_CPP = Path(
    os.environ.get("LLAMA_CPP_DIR", Path.home() / ".cache/llama-server/llama.cpp")
)  # where ../shared/tools/build-llama-server.sh links llama.cpp's tree


def llama_cpp_rope_factors(head_dim, theta, factor, low, high, original) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py writes as rope_freqs (its LlamaModel)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen, high_wavelen = original / low, original / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@pytest.mark.parametrize(
    "head_dim, theta, factor", [(128, 500000.0, 8.0), (64, 500000.0, 32.0), (16, 500000.0, 32.0)]
)
def test_llama3_scaling_is_recovered_from_rope_freqs(head_dim, theta, factor):
    """Llama 3.1 (factor 8) and 3.2 (factor 32): Meta's low 1, high 4, original 8192."""
    factors = llama_cpp_rope_factors(head_dim, theta, factor, 1.0, 4.0, 8192)
    assert llama3_scaling(factors, head_dim, theta) == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def test_rope_freqs_that_match_no_llama3_scaling_are_refused():
    factors = np.linspace(1.0, 5.0, 64, dtype=np.float32)
    with pytest.raises(ValueError, match="matches no llama3 rope scaling"):
        llama3_scaling(factors, 128, 500000.0)


@pytest.mark.skipif(
    not (LLAMA_CPP / "convert_hf_to_gguf.py").exists(),
    reason=f"llama.cpp's converter is not at {LLAMA_CPP} (set LLAMA_CPP_DIR)",
)
def test_a_gguf_from_llama_cpps_converter_matches_transformers(tmp_path, smollm2_dir):
    import transformers

    from shard.attention import get_backend
    from shard.checkpoint.convert import convert_gguf
    from shard.models import load_model
    from tests.conftest import save_tiny_model
    from tests.shard.test_families import new_cache, reference_logits, sequences, step

    hf_dir = save_tiny_model(
        tmp_path / "hf", vocab_size=49152, max_position_embeddings=131072, head_dim=16,
        rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
    )  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, hf_dir / name)
    gguf = tmp_path / "model-f32.gguf"
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP / "gguf-py")}
    command = [sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(hf_dir)]
    subprocess.run(command + ["--outtype", "f32", "--outfile", str(gguf)], env=env, check=True)
    model = load_model(convert_gguf(gguf, tmp_path / "ours", progress=False), torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    seqs = sequences(random.Random(0), [40])
    seqs[0].tokens = [random.Random(1).randrange(49152) for _ in range(40)]
    logits = step(model, new_cache(model), get_backend("sdpa", "cpu"), seqs, [40])
    torch.testing.assert_close(logits, reference_logits(hf, seqs[0].tokens), atol=1e-4, rtol=0)
