"""The validation workers: `--validation-workers` processes that tokenize prompts, render chat
templates and build /tokenize answers, as TGI's validation workers do in Rust threads.

Processes, not threads: the tokenizer releases the GIL while it encodes, but turning a
megabyte prompt's million ids into Python objects, and freeing its Rust encoding, hold the GIL
for 100+ ms, which would freeze every stream for that long. In a worker process that work
never touches the router's GIL; only the ids kept (at most max_input_tokens) come back. The
tokenizer travels to a worker as its directory name and is loaded there once.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from router.text.tokenizer import Tokenizer


def start_workers(count: int) -> ProcessPoolExecutor:
    # spawn, not fork: the router runs threads (asyncio, gRPC) that a fork would copy mid-state
    return ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"))


async def warm_up(pool: ProcessPoolExecutor, tokenizer: Tokenizer, count: int) -> None:
    """Starts every worker and loads the tokenizer in each, before the first request."""
    loop = asyncio.get_running_loop()
    await asyncio.gather(
        *(loop.run_in_executor(pool, tokenizer.encode, "warm") for _ in range(count))
    )
