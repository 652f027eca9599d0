"""Load test of the HTTP server: N concurrent /generate_stream clients, M new tokens each.

    .venv/bin/python scripts/load_test.py                 # starts the launcher on the default model
    .venv/bin/python scripts/load_test.py --url http://127.0.0.1:3000 --streams 1,16

Reports, for each concurrency: generated tokens/s over the whole run, time to first token
(p50/p90) and time per output token (p50). Starting the launcher itself (no --url) passes the
remaining arguments through, e.g. `-- --dtype bfloat16`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain in detail how a compiler turns source code into machine code.",
    "Describe the history of the Roman Empire.",
    "Give me a detailed recipe for lasagna, step by step.",
]


async def one_stream(session: aiohttp.ClientSession, url: str, prompt: str, new_tokens: int):
    body = {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens}}
    start = time.perf_counter()
    first = None
    tokens = 0
    async with session.post(f"{url}/generate_stream", json=body) as response:
        async for line in response.content:
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"])
            tokens += 1
            first = first or time.perf_counter() - start
    return first, tokens, time.perf_counter() - start


def chat_prompts() -> list[str]:
    """The prompts as user turns in the default model's chat template (an instruct model given
    raw text often answers with end-of-sequence at once)."""
    sys.path.insert(0, str(ROOT))
    from router.text.tokenizer import Tokenizer
    from shard.convert import default_cache_dir, default_gguf_path, ensure_converted

    tokenizer = Tokenizer.from_dir(ensure_converted(default_gguf_path(), default_cache_dir()))
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]


async def run(url: str, streams: int, new_tokens: int) -> dict:
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.perf_counter()
        prompts = chat_prompts()
        jobs = [one_stream(session, url, prompts[i % 4], new_tokens) for i in range(streams)]
        results = await asyncio.gather(*jobs)
        wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    tpot = [(r[2] - r[0]) / (r[1] - 1) for r in results if r[1] > 1] or [0.0]
    return {
        "streams": streams,
        "tokens": sum(r[1] for r in results),
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p90": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "tpot_p50_ms": 1000 * statistics.median(tpot),
    }


def start_launcher(port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "launcher",
        "--port",
        str(port),
        "--hostname",
        "127.0.0.1",
        "--shard-uds-path",
        f"/tmp/textgen-load-{os.getpid()}",
        *extra,
    ]
    process = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise TimeoutError("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None)
    parser.add_argument("--port", type=int, default=3999)
    parser.add_argument("--streams", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("launcher_args", nargs="*")
    args = parser.parse_args()
    process = None if args.url else start_launcher(args.port, args.launcher_args)
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        asyncio.run(run(url, 2, 8))  # warm up
        columns = ("streams", "tokens", "tok/s", "TTFT p50", "TTFT p90", "TPOT p50")
        print("".join(f"{c:>10}" for c in columns))
        for n in map(int, args.streams.split(",")):
            r = asyncio.run(run(url, n, args.new_tokens))
            print(
                f"{r['streams']:>10}{r['tokens']:>10}{r['tokens_per_s']:>10.1f}"
                f"{r['ttft_p50']:>9.2f}s{r['ttft_p90']:>9.2f}s{r['tpot_p50_ms']:>8.1f}ms",
                flush=True,
            )
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(120)


if __name__ == "__main__":
    main()
