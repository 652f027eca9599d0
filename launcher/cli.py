"""`python -m launcher`: TGI's launcher flags -> one validated `LauncherConfig` -> the commands
for `shard prepare`, the shards and the router -> `processes.launch`.

Every flag keeps TGI's name and default and also reads its upper-snake environment variable
(`--max-concurrent-requests` / `MAX_CONCURRENT_REQUESTS`), so TGI deployment files work as they
are. The environment is read when the command runs, never at import time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Annotated, Any

import typer

from common.logs import python_level, setup_logging
from launcher.commands import launch_plan, prepare_command, router_command, shard_command
from launcher.config import (
    ConfigError,
    LauncherConfig,
    is_memory_budget,
    resolve_config,
)
from launcher.processes import ExitCode, StopSignal, Timing, launch

# Re-exported: the config lives in `launcher.config`, the commands in `launcher.commands`.
__all__ = [
    "ConfigError",
    "LauncherConfig",
    "app",
    "is_memory_budget",
    "launch_plan",
    "main",
    "prepare_command",
    "resolve_config",
    "router_command",
    "run",
    "shard_command",
    "supervise",
]

log = logging.getLogger("launcher")


def run(flags: Mapping[str, Any], environ: Mapping[str, str]) -> int:
    """Validates the flags, then launches and supervises; returns the exit code."""
    try:
        level = python_level(environ.get("LOG_LEVEL", "info"))
    except ValueError:
        level = "info"  # resolve_config refuses it below, logged at this level
    setup_logging(bool(flags["json_output"]), level, "launcher")
    try:
        config = resolve_config(flags, environ)
    except ConfigError as err:
        log.error("invalid arguments: %s", err)
        return ExitCode.ERROR
    return supervise(config)


def supervise(config: LauncherConfig) -> int:
    """Runs the deployment until a stop signal or a crash; returns the exit code."""
    log.info(
        "launching %s: %d shard(s), %s, quantize %s, port %d",
        config.model_name,
        config.num_shard,
        config.dtype,
        config.quantize or "default",
        config.port,
    )
    with StopSignal() as stop:
        return launch(
            launch_plan(config), stop, Timing(graceful_timeout=config.graceful_termination_timeout)
        )


app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)


Opt = typer.Option  # every flag below: (TGI's name, its env var, TGI's default)


@app.command()
def main(
    model_id: Annotated[
        str | None,
        Opt(
            envvar="MODEL_ID",
            help="Local HF directory, .gguf file or Hub repo id; default: SmolLM2-135M-Instruct",
        ),
    ] = None,
    revision: Annotated[str | None, Opt(envvar="REVISION", help="Hub commit or branch")] = None,
    validation_workers: Annotated[
        int, Opt(envvar="VALIDATION_WORKERS", help="Tokenizer worker processes in the router")
    ] = 2,
    sharded: Annotated[
        str | None,
        Opt(envvar="SHARDED", metavar="true|false", help="Shard the model across processes"),
    ] = None,
    num_shard: Annotated[
        int | None, Opt(envvar="NUM_SHARD", help="Default: entries in CUDA_VISIBLE_DEVICES, else 1")
    ] = None,
    dtype: Annotated[
        str | None,
        Opt(
            envvar="DTYPE",
            help="float32, bfloat16 or float16. Default: bfloat16 where the CPU computes it "
            "natively (AVX512-BF16 or AMX), float32 elsewhere",
        ),
    ] = None,
    quantize: Annotated[
        str | None,
        Opt(
            envvar="QUANTIZE",
            help="Weight quantization: int8 (= eetq, per channel), int4 (groups of 32), gguf "
            "(a GGUF file's own blocks), gptq, awq, or none. Default: the checkpoint's own "
            "(the embedded GGUF model's blocks, GPTQ/AWQ), else none",
        ),
    ] = None,
    max_concurrent_requests: Annotated[int, Opt(envvar="MAX_CONCURRENT_REQUESTS")] = 128,
    max_best_of: Annotated[int, Opt(envvar="MAX_BEST_OF")] = 2,
    max_stop_sequences: Annotated[int, Opt(envvar="MAX_STOP_SEQUENCES")] = 4,
    max_top_n_tokens: Annotated[int, Opt(envvar="MAX_TOP_N_TOKENS")] = 5,
    max_input_tokens: Annotated[int | None, Opt(envvar="MAX_INPUT_TOKENS")] = None,
    max_input_length: Annotated[
        int | None, Opt(envvar="MAX_INPUT_LENGTH", help="Legacy name of --max-input-tokens")
    ] = None,
    max_total_tokens: Annotated[int | None, Opt(envvar="MAX_TOTAL_TOKENS")] = None,
    waiting_served_ratio: Annotated[float, Opt(envvar="WAITING_SERVED_RATIO")] = 0.3,
    max_batch_prefill_tokens: Annotated[
        int | None, Opt(envvar="MAX_BATCH_PREFILL_TOKENS", help="Default: 4096")
    ] = None,
    max_batch_total_tokens: Annotated[int | None, Opt(envvar="MAX_BATCH_TOTAL_TOKENS")] = None,
    max_waiting_tokens: Annotated[int, Opt(envvar="MAX_WAITING_TOKENS")] = 20,
    max_batch_size: Annotated[int | None, Opt(envvar="MAX_BATCH_SIZE")] = None,
    hostname: Annotated[str, Opt(envvar="HOSTNAME")] = "0.0.0.0",
    port: Annotated[int, Opt("--port", "-p", envvar="PORT")] = 3000,
    shard_uds_path: Annotated[
        str,
        Opt(
            envvar="SHARD_UDS_PATH",
            help="Socket prefix: shard r listens on {path}-{r}",
        ),
    ] = "/tmp/text-generation-server",
    master_addr: Annotated[str, Opt(envvar="MASTER_ADDR")] = "localhost",
    master_port: Annotated[int, Opt(envvar="MASTER_PORT")] = 29500,
    json_output: Annotated[
        bool, Opt("--json-output", envvar="JSON_OUTPUT", help="Log JSON lines")
    ] = False,
    cors_allow_origin: Annotated[
        list[str] | None, Opt(envvar="CORS_ALLOW_ORIGIN", help="Allowed CORS origin (repeatable)")
    ] = None,
    api_key: Annotated[
        str | None, Opt(envvar="API_KEY", help="Bearer token required on inference routes")
    ] = None,
    max_client_batch_size: Annotated[int, Opt(envvar="MAX_CLIENT_BATCH_SIZE")] = 4,
    payload_limit: Annotated[
        int, Opt(envvar="PAYLOAD_LIMIT", help="Maximum request body in bytes")
    ] = 2_000_000,
    enable_prefill_logprobs: Annotated[
        bool, Opt("--enable-prefill-logprobs", envvar="ENABLE_PREFILL_LOGPROBS")
    ] = False,
    disable_grammar_support: Annotated[
        bool,
        Opt(
            "--disable-grammar-support",
            envvar="DISABLE_GRAMMAR_SUPPORT",
            help="Refuse grammar, response_format and tool calls (422)",
        ),
    ] = False,
    graceful_termination_timeout: Annotated[
        float,
        Opt(
            "--graceful-termination-timeout",
            "-g",
            envvar="GRACEFUL_TERMINATION_TIMEOUT",
            help="Seconds the router may drain on SIGTERM before it is killed",
        ),
    ] = 90,
    disable_custom_kernels: Annotated[
        bool,
        Opt(
            "--disable-custom-kernels",
            envvar="DISABLE_CUSTOM_KERNELS",
            help="Accepted for TGI compatibility",
        ),
    ] = False,
    kv_cache_memory: Annotated[
        str,
        Opt(
            envvar="KV_CACHE_MEMORY",
            help="KV cache size: bytes (e.g. 2GiB) or a fraction of free memory",
        ),
    ] = "0.3",
    attention: Annotated[str, Opt(envvar="ATTENTION", help="auto, sdpa, torch or flash")] = "auto",
    block_size: Annotated[int, Opt(envvar="BLOCK_SIZE", help="Tokens per KV block")] = 16,
    cache_dir: Annotated[
        str | None, Opt(envvar="CACHE_DIR", help="Where converted models live")
    ] = None,
) -> None:
    """Starts the shards and the router, and supervises them until a signal or a crash."""
    flags = dict(locals())  # every flag by name; resolve_config turns them into the config
    raise typer.Exit(run(flags, os.environ))
