"""What a grammar costs the shard per token: the time to compute a request's mask and apply it
to its logits row, and to advance the matcher past the chosen token, on the real tokenizer.

    .venv/bin/python scripts/grammar_mask_cost.py [--tokens 400]

Walks each grammar with random logits (the mask decides what may follow, the argmax picks),
the benchmark's long JSON schema among them, and prints the median and p90 per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmark.__main__ import LONG_JSON_SCHEMA  # noqa: E402
from common.grammar import GRAMMAR_JSON, GRAMMAR_REGEX  # noqa: E402
from shard.checkpoint.convert import default_cache_dir, default_gguf_path, ensure_converted  # noqa: E402
from shard.sampling.grammar import GrammarCompiler  # noqa: E402

GRAMMARS = {
    "long JSON schema (benchmark)": (GRAMMAR_JSON, json.dumps(LONG_JSON_SCHEMA)),
    "any JSON object": (GRAMMAR_JSON, json.dumps({"type": "object"})),
    "regex [a-z ]{0,2000}": (GRAMMAR_REGEX, "[a-z ]{0,2000}"),
}


def walk(compiler: GrammarCompiler, kind: int, grammar: str, tokens: int, vocab: int):
    state = compiler.state(kind, grammar)
    generator = torch.Generator().manual_seed(0)
    masks, accepts = [], []
    for _ in range(tokens):
        logits = torch.randn(vocab, generator=generator)
        start = time.perf_counter()
        state.mask(logits)
        masks.append(time.perf_counter() - start)
        token = int(logits.argmax())
        start = time.perf_counter()
        done = state.accept(token)
        accepts.append(time.perf_counter() - start)
        if done:
            break
    return masks, accepts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=400)
    args = parser.parse_args()
    model_dir = ensure_converted(default_gguf_path(), default_cache_dir())
    config = json.loads((model_dir / "config.json").read_text())
    eos = config["eos_token_id"]
    compiler = GrammarCompiler(
        model_dir / "tokenizer.json",
        config["vocab_size"],
        tuple(eos) if isinstance(eos, list) else (eos,),
    )
    compiler.tokenizer()  # built once per shard, not per request
    for name, (kind, grammar) in GRAMMARS.items():
        start = time.perf_counter()
        compiler.state(kind, grammar)
        compile_ms = 1000 * (time.perf_counter() - start)
        masks, accepts = walk(compiler, kind, grammar, args.tokens, config["vocab_size"])
        ms = sorted(1000 * (m + a) for m, a in zip(masks, accepts))
        print(
            f"{name}: compiled in {compile_ms:.1f} ms; {len(ms)} tokens, mask + advance "
            f"median {statistics.median(ms):.3f} ms, p90 {ms[int(0.9 * len(ms))]:.3f} ms "
            f"(mask alone median {1000 * statistics.median(masks):.3f} ms)"
        )


if __name__ == "__main__":
    main()
