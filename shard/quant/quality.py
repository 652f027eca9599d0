"""How much a quantization changes a model's predictions, against the float32 oracle.

For each prompt, transformers (float32, dense) continues greedily for `new_tokens`; the
quantized model then reads the same tokens (teacher forcing: a prefill, then one decode step
per token) and at every
generated position we compare its argmax with the oracle's greedy token, and the two
next-token distributions by KL(oracle || quantized). The same measure as llama.cpp's
`perplexity --kl-divergence`. The embedded model's oracle is its GGUF dequantized to float32,
so for it the measure isolates what the served path adds (int8 activations in the decode
kernels, bfloat16). Run it as `python -m shard.quant.quality [--quantize gguf]`.

With `--llama-server BIN` the oracle is llama.cpp itself on the same GGUF file (`--model-id
X.gguf`): its greedy continuation, and at each position its top-10 log-probabilities
(`n_probs`); the KL is then over those 10 tokens, both distributions renormalized to them.
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


def llama_server_continuations(
    binary: str, gguf: Path, model_dir: Path, prompts: list[str], new_tokens: int, top: int = 10
):
    """(prompt + llama-server's greedy continuation, prompt length, its top-`top` log-probs
    at each generated position as (ids [P, top], logprobs [P, top]))."""
    import socket
    import subprocess
    import time

    import requests
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [binary, "-m", str(gguf), "--port", str(port), "-t", "2", "-c", "4096", "--host",
         "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url, out = f"http://127.0.0.1:{port}", []
    try:
        for _ in range(600):
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        for prompt in prompts:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True
            )
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            answer = requests.post(
                f"{url}/completion",
                json={"prompt": ids, "n_predict": new_tokens, "n_probs": top, "temperature": 0,
                      "ignore_eos": True, "cache_prompt": False, "return_tokens": True},
                timeout=600,
            ).json()  # fmt: skip
            probs = answer["completion_probabilities"]
            top_ids = torch.tensor([[t["id"] for t in p["top_logprobs"]] for p in probs])
            top_lp = torch.tensor([[t["logprob"] for t in p["top_logprobs"]] for p in probs])
            out.append((ids + [p["id"] for p in probs], len(ids), (top_ids, top_lp)))
    finally:
        server.terminate()
        server.wait()
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


def compare_to_top(runner: ModelRunner, oracle) -> Quality:
    """compare() against an oracle that gives only its top tokens' log-probabilities."""
    agree = positions = 0
    kl_total = 0.0
    for ids, prompt_len, (top_ids, top_lp) in oracle:
        ours = F.log_softmax(runner_logits(runner, ids, prompt_len).float().cpu(), -1)
        target = torch.tensor(ids[prompt_len:])
        agree += int((ours.argmax(-1) == target).sum())
        log_p = F.log_softmax(top_lp, -1)  # renormalized to the oracle's top tokens
        log_q = F.log_softmax(ours.gather(1, top_ids), -1)
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
    parser.add_argument("--llama-server", default=None, help="its binary: llama.cpp is the oracle")
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model_id)
    if args.llama_server:
        gguf = Path(args.model_id)
        oracle = llama_server_continuations(
            args.llama_server, gguf, model_dir, PROMPTS, args.new_tokens
        )
    else:
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
    quality = (compare_to_top if args.llama_server else compare)(generator.runner, oracle)
    versus = "llama-server (KL over its top 10)" if args.llama_server else "transformers float32"
    print(
        f"quantize {generator.runner.quantize}, dtype {args.dtype}, against {versus}: "
        f"{quality.positions} positions, greedy agreement {quality.agreement:.1%}, "
        f"mean KL {quality.mean_kl:.4f} nats"
    )


if __name__ == "__main__":
    main()
