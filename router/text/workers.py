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
from multiprocessing import resource_tracker

from common.parent import exit_with_parent
from router.text.tokenizer import Tokenizer


def start_workers(count: int) -> ProcessPoolExecutor:
    """`count` worker processes, started on first use; each ends with the router, however the
    router ends. Spawned, not forked: the router runs threads (asyncio, gRPC) that a fork
    would copy mid-state."""
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(count, mp_context=context, initializer=exit_with_parent)


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """Ends the workers, then multiprocessing's resource tracker (a helper process that spawn
    starts), so that no process outlives the router. The tracker has no public stop: without
    this it ends on its own a moment after the router, which a supervisor sees as a leftover."""
    pool.shutdown(wait=True, cancel_futures=True)
    tracker = resource_tracker._resource_tracker
    if hasattr(tracker, "_stop"):
        tracker._stop()


async def warm_up(pool: ProcessPoolExecutor, tokenizer: Tokenizer, count: int) -> None:
    """Starts every worker and loads the tokenizer in each, before the first request."""
    loop = asyncio.get_running_loop()
    await asyncio.gather(
        *(loop.run_in_executor(pool, tokenizer.encode, "warm") for _ in range(count))
    )
