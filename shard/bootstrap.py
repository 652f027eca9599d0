"""Builds a shard from its config (threads, model, attention backend, generator) and runs
its gRPC server until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common.tracing import setup_tracing
from shard import numerics
from shard.attention import get_backend
from shard.config import ShardConfig
from shard.distributed import init_distributed
from shard.engine.generator import Generator
from shard.engine.model_runner import ModelRunner
from shard.models import load_model
from shard.models.config import ModelConfig
from shard.placement import resolve_placement
from shard.quant.loaders import QuantizationError, resolve_method
from shard.sampling.grammar import GrammarCompiler
from shard.sampling.watermark import Watermark
from shard.server import DEFAULT_MAX_PREFILL_TOKENS, TextGenerationService, serve

log = logging.getLogger(__name__)


def build_service(config: ShardConfig) -> TextGenerationService:
    """Loads the model on the one thread that will run every model step.

    All torch work of a shard stays on that thread: each thread that calls into torch's
    OpenMP gets its own team of worker threads, and two teams on the same cores made every
    step ~50 % slower (measured on 2 cores: 33 ms -> 50 ms per decode step).
    """
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    config = placed(config)
    generator, attention_impl = executor.submit(load_generator, config).result()
    return TextGenerationService(config, generator, attention_impl, executor)


def placed(config: ShardConfig) -> ShardConfig:
    """`config` with its device, dtype, backend, block size and KV budget decided (again: the
    decision is idempotent)."""
    checkpoint = ModelConfig.from_dir(Path(config.model_dir))
    return resolve_placement(config, checkpoint.torch_dtype)


def use_device(config: ShardConfig) -> torch.device:
    """Makes the rank's device current (NCCL and every CUDA allocation follow it) and caps the
    process at `cuda_memory_fraction` of it, as TGI does."""
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.set_per_process_memory_fraction(config.cuda_memory_fraction, device)
    return device


def serving_quantization(config: ShardConfig, device: torch.device) -> str:
    """The --quantize method the model loads with on `device` (GGUF blocks: the CPU only)."""
    quantize = resolve_method(config.quantize, Path(config.model_dir))
    if quantize == "gguf" and config.quantize is None and device.type != "cpu":
        log.info("a GGUF file's blocks are served on the CPU only: dense weights on %s", device)
        quantize = "none"  # the converted checkpoint holds dense weights too
    if quantize != "none" and device.type != "cpu":
        raise QuantizationError(f"--quantize {quantize} runs on the CPU only, not {device}")
    return quantize


def set_numerics(config: ShardConfig, device: torch.device) -> None:
    """The process's numeric mode (shard/numerics.py), before the model loads."""
    if config.batch_invariant and device.type != "cpu" and config.attention != "triton":
        raise ValueError(
            f"--batch-invariant true on {device} needs --attention triton, not "
            f"{config.attention} (its kernels change their work split with the batch)"
        )
    numerics.configure(batch_invariant=config.batch_invariant)


def load_generator(config: ShardConfig) -> tuple[Generator, str]:
    """Builds the generator: the model on its device, the backend, the runner."""
    config = placed(config)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = use_device(config)
    dist = init_distributed(
        config.rank,
        config.world_size,
        config.master_addr,
        config.master_port,
        device,
        config.collective_timeout,
    )
    quantize = serving_quantization(config, device)
    set_numerics(config, device)
    # Quantization the user did not ask for (a GGUF model's own) keeps dense copies as well
    # where steps of many rows use them (batch invariance off): the fastest setting for both
    # one and many streams; an explicit --quantize saves memory.
    keep_dense = config.quantize is None and not config.batch_invariant
    model = load_model(
        config.model_dir,
        config.torch_dtype,
        device,
        dist,
        quantize,
        keep_dense,
        rope_scaling=config.rope_scaling,
        implementation=config.model_impl,
    )
    backend = get_backend(config.attention, device, block_size=config.block_size)
    runner = ModelRunner(
        model, backend, config.block_size, device, config.torch_dtype, quantize,
        kv_dtype=config.torch_kv_dtype,
    )  # fmt: skip
    watermark = Watermark(config.watermark_gamma, config.watermark_delta)
    eos = model.config.eos_token_ids
    tokenizer_file = Path(config.model_dir) / "tokenizer.json"
    grammars = (
        GrammarCompiler(tokenizer_file, model.config.vocab_size, tuple(eos))
        if tokenizer_file.exists()
        else None
    )
    generator = Generator(runner, eos, DEFAULT_MAX_PREFILL_TOKENS, watermark, grammars)
    log.info(
        "loaded %s (%s implementation, %s, quantize %s, %s, attention %s, %d threads, "
        "batch invariance %s)",
        config.model_id,
        model.implementation,
        config.dtype,
        quantize,
        device,
        backend.name,
        torch.get_num_threads(),
        "on" if config.batch_invariant else "off",
    )
    return generator, backend.name


async def run_forever(config: ShardConfig, service: TextGenerationService) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tracing = setup_tracing(config.otlp_endpoint, config.otlp_service_name)
    try:
        await serve(config, service, stop, traced=tracing.enabled)
    finally:
        tracing.shutdown()  # bounded: a collector that is down never holds the exit
    if config.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # exiting with gloo threads alive aborts
    if service.fatal is not None:
        raise SystemExit(f"shard {config.rank} stopped after a collective failure: {service.fatal}")
