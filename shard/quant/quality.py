"""How much a quantization changes a model's predictions, against the float32 oracle.

For each prompt, transformers (float32, dense) continues greedily for `new_tokens`; the
quantized model then reads the same tokens (teacher forcing: a prefill, then one decode step
per token) and at every
generated position we compare its argmax with the oracle's greedy token, and the two
next-token distributions by KL(oracle || quantized). The same measure as llama.cpp's
`perplexity --kl-divergence`. The embedded model's oracle is its GGUF dequantized to float32,
so for it the measure isolates what the served path adds (int8 activations in the decode
kernels, bfloat16). Run it as `python -m shard.quant.quality [--quantize gguf]`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from shard.engine.forward_context import AttentionMetadata
from shard.engine.model_runner import ModelRunner

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in one paragraph.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish and German.",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Give me a short recipe for pancakes.",
]


@dataclass
class Quality:
    positions: int
    agreement: float  # share of positions where the quantized argmax is the oracle's token
    mean_kl: float  # nats


def oracle_continuations(model_dir: Path, prompts: list[str], new_tokens: int):
    """(token ids of prompt + greedy continuation, prompt length, oracle logits [L, V])."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True
            )
            ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
            full = model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
            logits = model(full).logits[0].float()  # [L, V]
            out.append((full[0].tolist(), ids.shape[1], logits))
    return out


def runner_logits(runner: ModelRunner, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Our model's logits [L - prompt_len + 1, V] for the positions that predict generated
    tokens: the prompt in one prefill step, then one decode step (one row) per token, as the
    server runs them (decode steps are where the quantized kernels read the weights)."""
    size = runner.block_size
    blocks = list(range(1, 1 + math.ceil(len(ids) / size)))
    slots = [b * size + k for b in blocks for k in range(size)][: len(ids)]

    def step(start: int, end: int) -> torch.Tensor:
        meta = AttentionMetadata.build(
            [end - start], [end], [blocks], slots[start:end], size, runner.device
        )
        return runner.forward(ids[start:end], list(range(start, end)), meta, [end - start - 1])

    rows = [step(0, prompt_len)]
    rows += [step(p, p + 1) for p in range(prompt_len, len(ids) - 1)]
    return torch.cat(rows)


def compare(runner: ModelRunner, oracle) -> Quality:
    agree = positions = 0
    kl_total = 0.0
    for ids, prompt_len, reference in oracle:
        ours = runner_logits(runner, ids, prompt_len)
        rows = slice(prompt_len - 1, len(ids) - 1)  # the rows that predict generated tokens
        target = torch.tensor(ids[prompt_len:], device=ours.device)
        agree += int((ours.argmax(-1) == target).sum())
        log_p = F.log_softmax(reference[rows].to(ours.device), -1)
        log_q = F.log_softmax(ours, -1)
        kl_total += float((log_p.exp() * (log_p - log_q)).sum())
        positions += len(target)
    return Quality(positions, agree / positions, kl_total / positions)


def main() -> None:
    from shard.bootstrap import load_generator
    from shard.checkpoint.model_files import resolve_model_dir
    from shard.config import MemoryBudget, ShardConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--model-id", default=None)
    parser.add_argument("--quantize", default=None, help="as the shard's (default: its default)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model_id)
    oracle = oracle_continuations(model_dir, PROMPTS, args.new_tokens)
    config = ShardConfig(
        model_dir=str(model_dir),
        model_id=str(model_dir),
        dtype=args.dtype,
        quantize=args.quantize,
        kv_cache_memory=MemoryBudget(bytes=64 * 2**20),
    )
    generator, _ = load_generator(config)
    generator.runner.allocate_cache(256)
    quality = compare(generator.runner, oracle)
    print(
        f"quantize {generator.runner.quantize}, dtype {args.dtype}: {quality.positions} "
        f"positions, greedy agreement {quality.agreement:.1%}, mean KL {quality.mean_kl:.4f} nats"
    )


if __name__ == "__main__":
    main()
