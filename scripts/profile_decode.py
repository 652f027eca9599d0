"""Where a decode step's time goes, in the shard's own process layout (one model thread).

    .venv/bin/python scripts/profile_decode.py [--model-id X.gguf] [--dtype float32]
        [--batch 1,16] [--steps 30]

Loads the model as a shard does, prefills B requests, then times decode steps: wall time per
step, the part spent in the forward and in sampling, and torch.profiler's top operators by
self CPU time, with the number of operator calls per step (the eager-dispatch overhead).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pb import generate_pb2 as pb  # noqa: E402
from shard.bootstrap import load_generator  # noqa: E402
from shard.checkpoint.convert import default_cache_dir, default_gguf_path, ensure_converted  # noqa: E402
from shard.checkpoint.model_files import resolve_model_dir  # noqa: E402
from shard.config import MemoryBudget, ShardConfig  # noqa: E402
from shard.engine.batch import Batch, request_from_pb  # noqa: E402


def requests(batch: int, prompt: int, new: int, block_size: int) -> list[pb.Request]:
    out, next_block = [], 1
    for i in range(batch):
        tokens = prompt + new
        n = (tokens + block_size - 1) // block_size
        blocks = list(range(next_block, next_block + n))
        next_block += n
        slots = [b * block_size + k for b in blocks for k in range(block_size)][:tokens]
        out.append(
            pb.Request(
                id=i,
                input_ids=[(17 * i + j) % 1000 + 100 for j in range(prompt)],
                truncate=prompt,
                blocks=blocks,
                slots=slots,
                parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0),
                stopping_parameters=pb.StoppingCriteriaParameters(
                    max_new_tokens=new, ignore_eos_token=True
                ),
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-id", default=None, help="as the launcher's (default: SmolLM2)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", default=None, help="as the shard's --quantize")
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.model_id:
        model_dir = resolve_model_dir(args.model_id)
    else:
        model_dir = ensure_converted(default_gguf_path(), default_cache_dir())
    config = ShardConfig(
        model_dir=str(model_dir),
        model_id=str(model_dir),
        uds_path="/tmp/unused",
        dtype=args.dtype,
        quantize=args.quantize,
        kv_cache_memory=MemoryBudget(bytes=256 * 2**20),
    )
    generator, attention = load_generator(config)
    runner = generator.runner
    runner.allocate_cache(2048)
    print(
        f"dtype {args.dtype}, quantize {runner.quantize}, "
        f"attention {attention}, threads {torch.get_num_threads()}"
    )
    for batch_size in (int(b) for b in args.batch.split(",")):
        pbs = requests(batch_size, 64, args.steps + 12, runner.block_size)
        states = [
            request_from_pb(r, runner.block_size, runner.num_blocks, runner.config.vocab_size)
            for r in pbs
        ]
        batch = Batch(0, states, runner.block_size)
        generator.step(batch)  # prefill
        for _ in range(5):  # warm up
            generator.step(batch)
        walls, forwards, samples = [], [], []
        for _ in range(args.steps):
            start = time.perf_counter()
            _, timings = generator.step(batch)
            walls.append(time.perf_counter() - start)
            forwards.append(timings.forward_ns / 1e9)
            samples.append(timings.decode_ns / 1e9)
        ms = lambda xs: 1000 * sorted(xs)[len(xs) // 2]  # noqa: E731
        rate = batch_size / (ms(walls) / 1000)
        print(
            f"\nbatch {batch_size}: step {ms(walls):.2f} ms (forward {ms(forwards):.2f}, "
            f"sampling+bookkeeping {ms(samples):.2f}) -> {rate:.0f} tok/s"
        )
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                generator.step(batch)
        events = prof.key_averages()
        calls = sum(e.count for e in events if e.key.startswith("aten::")) / 5
        total_self = sum(e.self_cpu_time_total for e in events) / 5 / 1000
        print(f"  {calls:.0f} aten operator calls per step; profiled self CPU {total_self:.2f} ms")
        print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
