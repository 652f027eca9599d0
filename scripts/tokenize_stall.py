"""How long the router's event loop stalls while a ~1.9 MB prompt is tokenized, three ways:
`encode` on a thread (what the router did), the batch call on a thread (it releases the GIL
while encoding), and the router's worker processes (`router/text/workers.py`).

    .venv/bin/python scripts/tokenize_stall.py

A ticker sleeps 5 ms in a loop on the event loop; the longest interval between its ticks is
the stall. Garbage collection is frozen first, as the router does after start-up.
"""

from __future__ import annotations

import asyncio
import gc
import time
from concurrent.futures import Executor, ThreadPoolExecutor

from router.text.tokenizer import Tokenizer
from router.text.workers import start_workers, warm_up
from shard.checkpoint.convert import default_cache_dir, default_gguf_path, ensure_converted

MAX_INPUT = 8191


def huge_prompt() -> str:
    words = [f"w{i}x{i % 7}" for i in range(3000)]
    return " ".join(words[i * 7919 % 3000] for i in range(300_000))[:1_900_000]


def plain_encode(tokenizer: Tokenizer, text: str, keep: int | None) -> tuple[int, list[int]]:
    ids = tokenizer._tokenizer.encode(text).ids
    return len(ids), ids[len(ids) - min(len(ids), keep or len(ids)) :]


async def longest_stall(executor: Executor, call, *args) -> tuple[float, float]:
    """(seconds the call took, the longest gap between 5 ms ticks meanwhile)."""
    loop = asyncio.get_running_loop()
    ticks: list[float] = []
    done = False

    async def ticker() -> None:
        while not done:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    await loop.run_in_executor(executor, call, *args)
    took = time.perf_counter() - start
    done = True
    await task
    return took, max(b - a for a, b in zip(ticks, ticks[1:]))


async def main() -> None:
    tokenizer = Tokenizer.from_dir(ensure_converted(default_gguf_path(), default_cache_dir()))
    text = huge_prompt()
    threads = ThreadPoolExecutor(2)
    workers = start_workers(2)
    await warm_up(workers, tokenizer, 2)
    gc.freeze()
    print(f"prompt: {len(text):,} characters, {len(tokenizer.encode(text)):,} tokens")
    for keep, case in ((None, "too long (refused)"), (10, "truncate=10 (served)")):
        runs = [
            ("encode on a thread", threads, plain_encode, tokenizer, text, keep),
            ("batch call on a thread", threads, tokenizer.encode_tail, text, True, keep, MAX_INPUT),
            ("worker process", workers, tokenizer.encode_tail, text, True, keep, MAX_INPUT),
        ]
        for name, executor, call, *args in runs:
            took, stall = await longest_stall(executor, call, *args)
            print(f"{case:22} {name:24} {took:5.2f} s, longest loop stall {stall * 1000:6.1f} ms")
    workers.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
