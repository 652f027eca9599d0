"""`shard serve`: one model shard process (one tensor-parallel rank) serving gRPC."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Optional

import typer

from common.logs import setup_logging
from common.parent import exit_with_parent
from shard.models.errors import UnsupportedModel

log = logging.getLogger("shard")

app = typer.Typer(add_completion=False, help=__doc__)


@app.callback()
def main() -> None:
    """Model shard of the text generation server."""


@app.command()
def serve(
    model_id: Optional[str] = typer.Option(
        None, help="Local HF directory, .gguf file or Hub repo id; default: SmolLM2-135M-Instruct"
    ),
    revision: Optional[str] = typer.Option(None),
    uds_path: str = typer.Option(
        "/tmp/text-generation-server", help="Socket path prefix; rank r listens on {uds_path}-{r}"
    ),
    rank: int = typer.Option(0, envvar="RANK"),
    world_size: int = typer.Option(1, envvar="WORLD_SIZE"),
    master_addr: str = typer.Option("localhost", envvar="MASTER_ADDR"),
    master_port: int = typer.Option(29500, envvar="MASTER_PORT"),
    watermark_gamma: float = typer.Option(0.5, envvar="WATERMARK_GAMMA"),
    watermark_delta: float = typer.Option(2.0, envvar="WATERMARK_DELTA"),
    collective_timeout: float = typer.Option(
        120.0, envvar="COLLECTIVE_TIMEOUT", help="Seconds before a stuck collective fails the rank"
    ),
    dtype: Optional[str] = typer.Option(
        None, help="float32, bfloat16 or float16; default: the checkpoint's on a GPU, else by CPU"
    ),
    kv_cache_dtype: Optional[str] = typer.Option(
        None, help="float32, bfloat16 or float16 (the CPU only); default: the model's dtype"
    ),
    quantize: Optional[str] = typer.Option(
        None,
        envvar="QUANTIZE",
        help="int8 (= eetq), int4, gguf, gptq, awq or none. Default: the checkpoint's own "
        "(a GGUF file's blocks, GPTQ/AWQ), else none",
    ),
    prefix_caching: bool = typer.Option(
        True,
        envvar="PREFIX_CACHING",
        help="Tell the router it may reuse the K/V of shared prompt prefixes (cache_len)",
    ),
    device: str = typer.Option("auto", help="auto (cuda:{rank % GPUs}, else cpu), cpu, cuda[:N]"),
    attention: str = typer.Option("auto", help="auto, sdpa, torch, flash or triton"),
    block_size: Optional[int] = typer.Option(
        None, help="Tokens per KV cache block; default: the attention backend's"
    ),
    kv_cache_memory: Optional[str] = typer.Option(
        None,
        help="KV cache size: bytes (e.g. 2GiB) or a fraction of free memory; default 0.3 on "
        "the CPU, 0.9 on a GPU",
    ),
    cuda_memory_fraction: float = typer.Option(
        1.0, envvar="CUDA_MEMORY_FRACTION", help="Share of the GPU's memory this shard may use"
    ),
    cuda_graphs: Optional[str] = typer.Option(
        None, envvar="CUDA_GRAPHS", help="Decode batch sizes to capture on a GPU; 0: none"
    ),
    model_impl: str = typer.Option(
        "auto", envvar="MODEL_IMPL", help="auto, native or transformers: the code serving the model"
    ),
    batch_invariant: Optional[str] = typer.Option(
        None,
        envvar="BATCH_INVARIANT",
        help="true|false: outputs independent of the batch, prefix cache and chunking; "
        "default true on the CPU, false on a GPU",
    ),
    num_threads: Optional[int] = typer.Option(None, help="torch intra-op threads"),
    cache_dir: Optional[Path] = typer.Option(None, help="Where converted models live"),
    rope_scaling: Optional[str] = typer.Option(None, help="linear or dynamic (NTK)"),
    rope_factor: Optional[float] = typer.Option(None),
    otlp_endpoint: Optional[str] = typer.Option(None, help="OTLP gRPC collector for traces"),
    otlp_service_name: str = typer.Option("text-generation-inference.server"),
    json_output: bool = typer.Option(False, "--json-output"),
    log_level: str = typer.Option("info"),
    parent_death_signal: bool = typer.Option(
        False, "--exit-with-parent", help="Exit when the parent process dies"
    ),
) -> None:
    """Loads the model and serves the TextGenerationService on a unix socket until SIGTERM."""
    setup_logging(json_output, log_level, f"shard[{rank}]")
    if parent_death_signal:
        exit_with_parent()
    from shard.bootstrap import build_service, run_forever
    from shard.checkpoint.model_files import resolve_model_dir
    from shard.config import MemoryBudget, ShardConfig, parse_switch, rope_override
    from shard.engine.cuda_graphs import parse_cuda_graphs

    model_dir = resolve_model_dir(model_id, revision, cache_dir)
    config = ShardConfig(
        model_dir=str(model_dir),
        model_id=model_id or str(model_dir),
        uds_path=uds_path,
        rank=rank,
        world_size=world_size,
        dtype=dtype,
        kv_cache_dtype=kv_cache_dtype,
        quantize=quantize,
        device=device,
        attention=attention,
        block_size=block_size,
        kv_cache_memory=MemoryBudget.parse(kv_cache_memory) if kv_cache_memory else None,
        cuda_memory_fraction=cuda_memory_fraction,
        cuda_graphs=parse_cuda_graphs(cuda_graphs),
        batch_invariant=parse_switch("--batch-invariant", batch_invariant),
        model_impl=model_impl,
        num_threads=num_threads,
        master_addr=master_addr,
        master_port=master_port,
        collective_timeout=collective_timeout,
        watermark_gamma=watermark_gamma,
        watermark_delta=watermark_delta,
        use_prefix_caching=prefix_caching,
        rope_scaling=rope_override(rope_scaling, rope_factor),
        otlp_endpoint=otlp_endpoint,
        otlp_service_name=otlp_service_name,
    )
    try:
        service = build_service(config)
    except UnsupportedModel as refused:  # one line, no traceback: what it is and what to do
        log.error("cannot serve %s: %s", config.model_id, refused)
        raise typer.Exit(1) from None
    asyncio.run(run_forever(config, service))


@app.command()
def prepare(
    model_id: Optional[str] = typer.Option(
        None, help="Local HF directory, .gguf file or Hub repo id; default: SmolLM2-135M-Instruct"
    ),
    revision: Optional[str] = typer.Option(None),
    cache_dir: Optional[Path] = typer.Option(None, help="Where converted models live"),
    json_output: bool = typer.Option(False, "--json-output"),
) -> None:
    """Resolves (and converts once, for .gguf) the model; prints its local directory last."""
    setup_logging(json_output, "info", "shard")
    from shard.checkpoint.convert import GGUFError
    from shard.checkpoint.gguf_weights import is_gguf_dir
    from shard.checkpoint.model_files import resolve_model_dir
    from shard.checkpoint.weights import CheckpointError, list_safetensors
    from shard.models.check import check_servable

    try:
        model_dir = resolve_model_dir(model_id, revision, cache_dir)
        if not is_gguf_dir(model_dir):  # a GGUF's tensors are read from its file
            list_safetensors(model_dir)  # refuses pickle-only checkpoints before shards start
        implementation = check_servable(model_dir)  # and architectures nothing here serves
    except (CheckpointError, UnsupportedModel, GGUFError) as refused:
        log.error("cannot serve %s: %s", model_id or "the default model", refused)
        raise typer.Exit(1) from None
    log.info("%s: served by the %s implementation", model_dir.name, implementation)
    print(model_dir, flush=True)


if __name__ == "__main__":
    app()
