"""Decode speed of one shard process over gRPC, against transformers' generate() in the same run.

    .venv/bin/python scripts/bench_shard.py [--model-id DIR] [--dtypes float32,bfloat16]

For each dtype it starts `python -m shard serve` as a real process, prefills B requests and
times the Decode RPCs; the baseline is transformers' generate() with its KV cache on the same
checkpoint and dtype. Prints tokens/s and the ratio to the baseline (this machine is shared and
noisy: compare ratios, not absolute figures).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pb import generate_pb2 as pb  # noqa: E402
from pb import generate_pb2_grpc as pb_grpc  # noqa: E402
from shard.checkpoint.model_files import resolve_model_dir  # noqa: E402


def start_shard(model_dir: Path, dtype: str, socket_prefix: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "shard",
        "serve",
        "--model-id",
        str(model_dir),
        "--dtype",
        dtype,
        "--uds-path",
        socket_prefix,
        "--kv-cache-memory",
        "1GiB",
        "--exit-with-parent",
    ]
    return subprocess.Popen(cmd, cwd=ROOT)


def connect(socket_prefix: str, proc: subprocess.Popen):
    path = f"{socket_prefix}-0"
    deadline = time.time() + 300
    while not os.path.exists(path):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("shard did not start")
        time.sleep(0.2)
    channel = grpc.insecure_channel(f"unix://{path}")
    grpc.channel_ready_future(channel).result(timeout=60)
    return pb_grpc.TextGenerationServiceStub(channel)


def requests(batch_size: int, prompt_len: int, new_tokens: int, block_size: int, first_block: int):
    out, block = [], first_block
    per_request = (prompt_len + new_tokens + block_size - 1) // block_size
    for i in range(batch_size):
        blocks = list(range(block, block + per_request))
        block += per_request
        out.append(
            pb.Request(
                id=i,
                input_ids=[(17 * i + 31 * k) % 4000 + 100 for k in range(prompt_len)],
                blocks=blocks,
                parameters=pb.NextTokenChooserParameters(),
                stopping_parameters=pb.StoppingCriteriaParameters(
                    max_new_tokens=new_tokens, ignore_eos_token=True
                ),
            )
        )
    return out


def shard_decode_tps(stub, batch_size: int, prompt_len: int, new_tokens: int) -> float:
    batch = pb.Batch(id=batch_size, requests=requests(batch_size, prompt_len, new_tokens, 16, 1))
    response = stub.Prefill(pb.PrefillRequest(batch=batch))
    start, steps = time.perf_counter(), 0
    while response.HasField("batch"):
        response = stub.Decode(pb.DecodeRequest(batches=[response.batch]))
        steps += 1
    return batch_size * steps / (time.perf_counter() - start)


def transformers_decode_tps(
    model_dir: Path, dtype: str, batch_size: int, prompt_len: int, new_tokens: int
) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype)
    ).eval()
    ids = torch.tensor(
        [[(17 * i + 31 * k) % 4000 + 100 for k in range(prompt_len)] for i in range(batch_size)]
    )
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        total = time.perf_counter() - start
    return batch_size * (new_tokens - 1) / max(total - prefill, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-id", default=None)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model_id)
    print(
        f"model {model_dir}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'dtype':<10}{'batch':>6}{'shard tok/s':>14}{'transformers tok/s':>20}{'ratio':>8}")
    for dtype in args.dtypes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            proc = start_shard(model_dir, dtype, f"{tmp}/bench")
            try:
                stub = connect(f"{tmp}/bench", proc)
                stub.Warmup(pb.WarmupRequest(max_prefill_tokens=2048))
                for b in map(int, args.batch_sizes.split(",")):
                    shard_decode_tps(stub, b, args.prompt_len, 8)  # warm the code paths
                    ours = shard_decode_tps(stub, b, args.prompt_len, args.new_tokens)
                    base = (
                        float("nan")
                        if args.no_baseline
                        else transformers_decode_tps(
                            model_dir, dtype, b, args.prompt_len, args.new_tokens
                        )
                    )
                    print(
                        f"{dtype:<10}{b:>6}{ours:>14.1f}{base:>20.1f}{ours / base:>8.2f}",
                        flush=True,
                    )
            finally:
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
