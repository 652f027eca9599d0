"""How the benchmark starts each server (benchmark/servers.py)."""

from __future__ import annotations

from benchmark.servers import llama_kv_args, ours


def test_ours_gets_llama_servers_kv_cache_unless_it_sizes_its_own() -> None:
    assert llama_kv_args("", 8704) == "--max-batch-total-tokens 8704 --kv-cache-dtype float16"
    assert llama_kv_args("--kv-cache-memory 1GiB", 8704) == "--kv-cache-dtype float16"
    assert llama_kv_args("--kv-cache-dtype bfloat16", 512) == "--max-batch-total-tokens 512"
    spec = ours("--quantize none", llama_kv_args("--quantize none", 512))
    assert spec.name == "ours --quantize none"  # the table names what the user asked for
    assert spec.argv[-6:] == (
        "--quantize", "none", "--max-batch-total-tokens", "512", "--kv-cache-dtype", "float16",
    )  # fmt: skip
